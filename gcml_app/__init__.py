"""GCML app: decentralized personalized federated segmentation as a MONAI Label app."""

__version__ = "0.1.0"
