"""Training: the loop, schedule, checkpoints and resume, callbacks, and the `tunesmith train` orchestration."""
