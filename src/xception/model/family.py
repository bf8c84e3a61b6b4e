"""The Xception family we build: the original (`xception`, the default) and the aligned Xceptions of
aligned.py. One registry, `ARCHS`, says for each arch how to build it, what timm calls it, the input it
was evaluated at and the accuracy published for it; `build_arch` builds one, and `arch_of_state_dict`
tells which arch a plain state dict belongs to (for a bare timm file, which names no arch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..checkpoint import clean_state_dict
from ..config import DEFAULT_CROP_PCT, DEFAULT_IMAGE_SIZE, MIN_INPUT_SIZE, UserError
from .aligned import SPECS, XceptionAligned
from .xception import Xception

HEAD_PREFIXES = ("fc.", "head.", "last_linear.")  # classifiers: ours, timm's aligned, Cadene's


@dataclass(frozen=True)
class ArchInfo:
    name: str
    build: Callable[[int, float], nn.Module]  # (num_classes, drop_rate) -> a freshly initialised net
    timm_name: str  # the same network in timm (its weights import 1:1, see ports.py)
    params: int  # trainable parameters with a 1000-class classifier (timm's count, which ours equals)
    top1: float  # ImageNet-1k val accuracy published for the weights in `published`
    top5: float
    published: str  # where top1/top5 come from
    crop_pct: float  # the evaluation crop of those weights: resize to image_size / crop_pct, crop
    image_size: int = DEFAULT_IMAGE_SIZE
    min_input_size: int = 32  # the aligned nets run on any size; from 32 px down their final map is 1x1


def _aligned(name: str, params: int, top1: float, top5: float, weights: str, crop_pct: float) -> ArchInfo:
    """An aligned Xception: timm names it as we do, and its published weights are timm's NAME.WEIGHTS."""
    return ArchInfo(name, functools.partial(XceptionAligned, SPECS[name]), name, params, top1, top5,
                    f"timm {name}.{weights}", crop_pct)


# Accuracies and crops are timm's for its best published weights of each arch (facts.md). xception65
# has two sets; its entry is the ra3 one (83.186, crop 0.94), not tf_in1k (79.558, crop 0.903).
ARCHS: dict[str, ArchInfo] = {info.name: info for info in (
    ArchInfo("xception", lambda num_classes, drop_rate: Xception(num_classes, drop_rate), "legacy_xception",
             22_855_952, 79.058, 94.396, "timm legacy_xception.tf_in1k", DEFAULT_CROP_PCT,
             min_input_size=MIN_INPUT_SIZE),
    #        name           params      top1    top5    weights    crop
    _aligned("xception41",  26_969_560, 78.550, 94.282, "tf_in1k", 0.903),
    _aligned("xception65",  39_916_312, 83.186, 96.596, "ra3_in1k", 0.94),
    _aligned("xception71",  42_338_736, 79.920, 94.908, "tf_in1k", 0.903),
    _aligned("xception41p", 26_907_752, 81.978, 95.784, "ra3_in1k", 0.94),
    _aligned("xception65p", 39_819_560, 83.160, 96.506, "ra3_in1k", 0.94),
)}
ARCH_NAMES = tuple(ARCHS)  # "xception" first: the default


def arch_info(arch: str) -> ArchInfo:
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_NAMES)}")
    return ARCHS[arch]


def build_arch(arch: str = "xception", num_classes: int = 1000, drop_rate: float = 0.0,
               keras_exact: bool = False) -> nn.Module:
    """A freshly initialised `arch` net. `keras_exact` (Keras numerics) exists for the original only."""
    info = arch_info(arch)
    if arch == "xception":
        return Xception(num_classes, drop_rate, keras_exact=keras_exact)
    if keras_exact:
        raise UserError(f"Keras numerics (keras_exact) exist only for xception, not {arch}")
    return info.build(num_classes, drop_rate)


def _body(state: dict) -> dict:
    """key -> shape of everything but the classifier (its class count varies) and the BN step counters
    (old ports lack them), with wrapper prefixes (module., _orig_mod.) removed."""
    return {k: tuple(v.shape) for k, v in clean_state_dict(state).items()
            if not k.startswith(HEAD_PREFIXES) and not k.endswith("num_batches_tracked")}


@functools.lru_cache(maxsize=None)
def _signature(arch: str) -> tuple:
    """An aligned arch's body keys and shapes, from a net built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return tuple(sorted(_body(ARCHS[arch].build(1000, 0.0).state_dict()).items()))


def arch_of_state_dict(state: dict) -> str | None:
    """The arch whose tensors `state` holds, in our names or timm's; None when none fits. The original has
    names no other arch uses (ours: entry_flow.*; timm's legacy_xception and Cadene's: conv1, block1.rep.*):
    they are enough, and the loader checks every shape. The aligned nets share their names, and their
    timm names are ours but for the classifier: their keys and shapes must match one arch exactly."""
    body = _body(state)
    if any(k.startswith("entry_flow.") for k in body) or (
            "conv1.weight" in body and any(k.startswith("block1.rep.") for k in body)):
        return "xception"
    body = tuple(sorted(body.items()))
    return next((arch for arch in ARCH_NAMES[1:] if _signature(arch) == body), None)
