"""dagman: DAGMaN self-supervised pretraining of 3D Swin transformers on CT scans."""

__version__ = "0.1.0"
