"""Xception (Chollet 2017) for PyTorch: model, training, evaluation."""

from .model import Xception, create_model

__all__ = ["Xception", "create_model"]
__version__ = "0.1.0"
