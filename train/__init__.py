"""Training: the step, the loop, optimizers, losses, checkpoints and metrics."""
