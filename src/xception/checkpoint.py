"""Checkpoints: atomic writes, safe loads (weights_only), portable state dicts."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile

import torch
from torch import nn

from .config import UserError

FORMAT = "xception-checkpoint"
CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Xception inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict) -> dict:
    """Drop wrapper prefixes so a checkpoint loads whatever wrapped the model that wrote it."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: a crash at any moment leaves
    either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def save_atomic(obj: dict, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def copy_atomic(src: str, dst: str) -> None:
    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)
    _atomic_write(dst, write)


def load_checkpoint(path: str, flag: str = "--resume") -> dict:
    """Load with weights_only=True: tensors and plain containers only, so a crafted pickle cannot run code."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; give a checkpoint file such as {CHECKPOINT_NAME}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text advises weights_only=False; not ours to repeat. Name what the file wanted.
        wanted = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line]
        if not wanted:
            raise UserError(f"{flag} {path}: not a readable checkpoint (not a file written by torch.save); "
                            f"give a checkpoint.pth.tar written by xception train")
        raise UserError(f"{flag} {path}: refused: it holds objects other than tensors and plain data "
                        f"({wanted[0][:200]}), which could run code when loaded; only load checkpoints you "
                        f"trust and wrote yourself")
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}); "
                        f"the file may be truncated or of another format")
    if not isinstance(obj, dict):
        raise UserError(f"{flag} {path}: not a checkpoint (holds a {type(obj).__name__}, not a dict)")
    return obj


def model_state(obj: dict) -> dict:
    """The model's state dict from one of our checkpoints or from a bare state dict."""
    state = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("the file holds no model state dict")
    return clean_state_dict(state)


def load_weights(model: nn.Module, state: dict, source: str, allow_new_head: bool = True) -> list:
    """Load `state` into `model`. A classifier of another class count is left at its fresh initialisation
    (fine-tuning) and reported; any other missing, unexpected or mis-shaped tensor is a clear error."""
    own = model.state_dict()
    skipped = []
    if allow_new_head:
        for key in ("fc.weight", "fc.bias"):
            if key in state and key in own and state[key].shape != own[key].shape:
                skipped.append(key)
    state = {k: v for k, v in state.items() if k not in skipped}
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise UserError(f"{source}: tensor {key} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(own[key].shape)}; is this an Xception checkpoint?")
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown tensor(s), e.g. {unexpected[0]}")
        raise UserError(f"{source}: does not match the Xception model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)
    return skipped
