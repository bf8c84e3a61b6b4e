"""The networks (xception.py, aligned.py; the family's registry in family.py; as feature extractors in
backbone.py), weights in (weights.py, ports.py) and out (deploy.py)."""

from .aligned import XceptionAligned
from .backbone import Backbone
from .family import ARCH_NAMES
from .weights import create_model
from .xception import Xception

__all__ = ["ARCH_NAMES", "Backbone", "Xception", "XceptionAligned", "create_model"]
