"""Training and evaluation: the run set-up (setup.py), the one epoch loop and evaluation pass (loop.py),
the hooks around a step (hooks.py), numeric precision (precision.py), and the two drivers: `train(cfg)`
(train.py) and `evaluate_weights(cfg)` (evaluate.py)."""

from .evaluate import evaluate_weights
from .train import train

__all__ = ["train", "evaluate_weights"]
