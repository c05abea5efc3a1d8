"""Downstream clinical tasks (classification, outcome prediction, segmentation) built on pretrained encoders.

:mod:`dagman.tasks.metrics` holds the evaluation metrics shared by every task.
"""
