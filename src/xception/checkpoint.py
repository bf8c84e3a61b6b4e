"""The one owner of the checkpoint format: what a checkpoint holds (`Checkpoint`), how it is written
(atomically) and how it is read (weights_only, so a crafted file cannot run code).

Format "xception-checkpoint", version 1: a dict of plain types and tensors with the keys below. Files
written before the version key existed are version 1 too. Everything else in the package reads and writes
checkpoints through `Checkpoint`, never through the dict's keys.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .config import CHECKPOINT_NAME, UserError, check_file
from .files import atomic_write

FORMAT = "xception-checkpoint"
VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict) -> dict:
    """Drop wrapper prefixes so a state dict loads whatever wrapped the model that wrote it."""
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


@dataclass
class Checkpoint:
    """A training run's state after `epoch` epochs (and `epoch_step` steps of the next one, when a signal
    stopped it mid-epoch). `model` is a plain state dict (no wrapper prefixes)."""

    model: dict
    epoch: int = 0
    arch: str = "xception"
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    best_acc1: float = -math.inf
    args: dict = field(default_factory=dict)  # the run's Config.to_dict()
    class_names: list | None = None
    keras_exact: bool = False  # Keras numerics (BatchNorm eps 1e-3, TF "same" max-pools)
    epoch_step: int = 0  # steps done of epoch `epoch + 1` (a mid-epoch stop), else 0
    rng: list | None = None  # every rank's random streams at a mid-epoch stop, in rank order
    ema: dict | None = None  # --ema: the averaged weights and BatchNorm buffers (a plain state dict, as `model`)
    ema_updates: int = 0  # how many updates the average has had (its decay warm-up and resume need it)
    # With an EMA: which weights scored higher in this epoch's evaluation, "model" or "ema" (model_best: the
    # ones best_acc1 measured); eval, predict, export, average and --pretrained use them by default.
    best_source: str = "model"
    # {"mlflow": run id, "wandb": run id} of the experiment trackers the run logs to (engine/track.py): a
    # resume continues those runs. Added within version 1: older readers ignore the key, older files lack it.
    trackers: dict | None = None

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "version": VERSION}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        out["model"] = clean_state_dict(self.model)
        if self.ema is not None:
            out["ema"] = clean_state_dict(self.ema)
        return out

    @classmethod
    def from_dict(cls, obj: dict, source: str) -> "Checkpoint":
        """Our dict (any version up to VERSION). Refuses another program's file or a newer version."""
        if not is_checkpoint(obj):
            raise UserError(f"{source}: not a checkpoint written by xception train")
        version = int(obj.get("version", 1))
        if version > VERSION:
            raise UserError(f"{source}: checkpoint format version {version} is newer than this xception "
                            f"reads ({VERSION}); upgrade xception")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in obj.items() if k in known and v is not None}
        if not is_state_dict(values.get("model")):
            raise UserError(f"{source}: the checkpoint holds no model state dict")
        values["model"] = clean_state_dict(values["model"])
        if values.get("ema") is not None:
            values["ema"] = clean_state_dict(values["ema"])
        trackers = values.get("trackers", {})
        if not (isinstance(trackers, dict) and all(isinstance(v, str) for v in trackers.values())):
            raise UserError(f"{source}: its trackers entry is not a {{name: run id}} table")
        return cls(**values)

    @property
    def resumable(self) -> bool:
        return self.optimizer is not None and self.scheduler is not None

    def save(self, path: str) -> None:
        atomic_write(path, lambda f: torch.save(self.to_dict(), f))

    @classmethod
    def load(cls, path: str, flag: str = "--resume") -> "Checkpoint":
        return cls.from_dict(load_file(path, flag), f"{flag} {path}")


def is_checkpoint(obj: dict) -> bool:
    return obj.get("format") == FORMAT


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_file(path: str, flag: str = "--resume") -> dict:
    """A dict saved with torch.save (ours, or a foreign state dict), loaded with weights_only=True: tensors
    and plain containers only."""
    check_file(path, flag, f"a checkpoint file such as {CHECKPOINT_NAME}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text advises weights_only=False; not ours to repeat. Name what the file wanted.
        wanted = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line]
        if not wanted:
            raise UserError(f"{flag} {path}: not a readable checkpoint (not a file written by torch.save); "
                            f"give a {CHECKPOINT_NAME} written by xception train")
        raise UserError(f"{flag} {path}: refused: it holds objects other than tensors and plain data "
                        f"({wanted[0][:200]}), which could run code when loaded; only load checkpoints you "
                        f"trust and wrote yourself")
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint ({type(e).__name__}); "
                        f"the file may be truncated or of another format")
    if not isinstance(obj, dict):
        raise UserError(f"{flag} {path}: not a checkpoint (holds a {type(obj).__name__}, not a dict)")
    return obj
