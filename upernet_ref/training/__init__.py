"""Training: the losses, the poly schedule, the data order, the run-time state, the one training
step and the loop (`trainer`)."""
