"""Deployment and operations: the CLI, model bootstrap, the offline side's wiring, the demo and its
simulated users, the container image and the Serve config."""
