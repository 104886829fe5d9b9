"""Training: the losses, the poly schedule, the trainer and its run-time and distributed state."""
