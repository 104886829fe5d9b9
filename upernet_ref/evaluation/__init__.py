"""Evaluation: the confusion-matrix metrics, whole / sliding / multi-scale inference, evaluation
of a dataset and prediction of single images."""
