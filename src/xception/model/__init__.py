"""The network (xception.py), weights in (weights.py, ports.py) and out (deploy.py)."""

from .weights import create_model
from .xception import Xception

__all__ = ["Xception", "create_model"]
