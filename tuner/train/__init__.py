"""Training: the per-worker loop, optimizer and schedule, checkpoints, reporting, Ray Train driver."""
