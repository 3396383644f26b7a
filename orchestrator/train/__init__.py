"""Training on Ray Train: the step, checkpoints, the worker loop and the driver side."""
