"""`xception average CKPT... -o OUT`: one checkpoint holding the mean of several checkpoints' weights and
BatchNorm buffers (weight averaging of, e.g., a run's last few kept epochs), for eval, predict and export.

What is averaged: of each input, the weights `xception eval` would use, i.e. of an input that holds an EMA
too, the ones its run's evaluation ranked higher (--raw-weights: always the trained weights, --ema-weights:
always the EMA); a line per input says which.
Floating-point tensors are summed in float64, divided by the count and cast back to their dtype, so the
mean does not depend on the order of the inputs beyond float64 rounding, and one input comes back bitwise
(x -> float64 -> / 1 -> x is exact). Integer tensors are counters (BatchNorm's num_batches_tracked): a mean
of counts means nothing, so the largest is kept.

The output is a plain, not resumable checkpoint (no optimizer, scheduler or EMA): the mean in `model`, the
class names, Keras numerics and run settings (`args`, which hold the eval image size and crop) of the first
input, and the largest epoch of the inputs. It is never written over an existing file.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..checkpoint import Checkpoint
from ..config import UserError
from ..files import check_new_path
from ..model.hub import is_name
from ..model.weights import Weights, from_checkpoint, weights_choice

FLAG = "checkpoint"  # how an input is named in messages: "checkpoint PATH: no such file"


def _check_same(first: Checkpoint, ckpt: Checkpoint, ref: dict, state: dict, path: str, first_path: str) -> None:
    """Refuse an input that is not the same network as the first: its classes, numerics, tensors (`ref`:
    the first's names, shapes and dtypes)."""
    mine, theirs = list(first.class_names or []), list(ckpt.class_names or [])
    if mine != theirs:
        i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        where = (f"{len(mine)} and {len(theirs)} classes" if len(mine) != len(theirs) else
                 f"class {i} is {mine[i]!r} in {first_path}, {theirs[i]!r} in {path}")
        raise UserError(f"average of checkpoints with different class lists: {first_path} and {path} ({where})")
    if bool(ckpt.keras_exact) != bool(first.keras_exact):
        raise UserError(f"average of checkpoints with different numerics: {first_path} and {path} disagree on "
                        f"Keras numerics (keras_exact)")
    missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    if missing or extra:
        name, why = (missing[0], "lacks") if missing else (extra[0], "has the extra")
        raise UserError(f"average of checkpoints with different tensors: {path} {why} tensor {name} "
                        f"(compared with {first_path})")
    for key, value in ref.items():
        if state[key].shape != value.shape:
            raise UserError(f"average of checkpoints with different shapes: tensor {key} is "
                            f"{tuple(state[key].shape)} in {path}, {tuple(value.shape)} in {first_path}")


def _accumulate(sums: dict, state: dict) -> None:
    """Add one input into the running float64 sums (floats) or maxima (integer counters), in place."""
    for key, value in state.items():
        if value.is_floating_point():
            sums[key] += value.double()
        else:
            sums[key] = torch.maximum(sums[key], value.to(sums[key].dtype))


def _start(state: dict) -> dict:
    # copies: float64 inputs would otherwise be summed into in place
    return {k: v.to(torch.float64, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}


def average(paths: list, out: str, choice: str = "best", log=print) -> Checkpoint:
    """Write the mean of `paths`' weights to `out` and return it. Inputs are read one at a time, so memory
    holds one checkpoint and the float64 sums, whatever the count."""
    if not paths:
        raise UserError("xception average needs at least one checkpoint")
    for path in paths:  # a published name is one network's weights, not checkpoints of one run to average
        if is_name(path):
            raise UserError(f"{FLAG} {path}: published weights by name are not checkpoints of ours; xception "
                            f"average takes checkpoints of one network and class list (e.g. a run's kept epochs): "
                            f"train from {path} with --pretrained {path} and average that run's checkpoints")
    check_new_path(out, "average")
    first = ref = sums = None
    epoch = 0
    for path in paths:
        ckpt = Checkpoint.load(path, FLAG)
        weights: Weights = from_checkpoint(ckpt, path, choice)
        if first is None:
            # keep of the first input only what the result needs: not its optimizer state, not its tensors
            # (meta tensors carry their names, shapes and dtypes)
            first = dataclasses.replace(ckpt, model={}, optimizer=None, scheduler=None, scaler=None, rng=None,
                                        ema=None)
            ref = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in weights.state.items()}
            sums = _start(weights.state)
        else:
            _check_same(first, ckpt, ref, weights.state, path, paths[0])
            _accumulate(sums, weights.state)
        epoch = max(epoch, int(ckpt.epoch))
        if weights.choice_note:
            log(weights.choice_note)
        del ckpt, weights  # memory holds the sums and one input at a time
    mean = {k: (s / len(paths)).to(ref[k].dtype) if ref[k].is_floating_point() else s for k, s in sums.items()}
    result = Checkpoint(model=mean, epoch=epoch, arch=first.arch, best_acc1=-math.inf, args=dict(first.args),
                        class_names=first.class_names, keras_exact=first.keras_exact)
    check_new_path(out, "average")  # once more: the inputs took a while to read, and we never write over a file
    result.save(out)
    log(f"wrote {out}: the mean of {len(paths)} checkpoint(s) ({len(mean)} tensors; epoch {epoch}; not resumable, "
        f"use it with eval, predict, export or --pretrained)")
    return result


def run(args) -> int:
    average(args.checkpoints, args.out, choice=weights_choice(args.raw_weights, args.ema_weights))
    return 0
