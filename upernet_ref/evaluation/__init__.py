"""Evaluation: the confusion-matrix metrics, whole / sliding / multi-scale inference and the
evaluation of a dataset with the published protocol. (Prediction files for images: `predictions`.)"""
