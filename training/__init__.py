"""The offline side: preference sets, DPO/KTO on Ray Train, the evaluation gate, the cycle and the
scheduler. It reads feedback and publishes versions only through `service`'s store and registry."""
