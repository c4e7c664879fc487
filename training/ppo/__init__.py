"""PPO for the RLHF path: the pure math in `losses`, the loop in `trainer`."""
