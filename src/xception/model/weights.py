"""Weights in, in one place: detect a file's format from its first bytes, read it into our names
(`Weights`), and load it into a model with the one rule for the classifier (`load_into`).

Formats: our checkpoints (or a bare state dict with our names), for any arch of family.py; timm's
legacy_xception and Cadene's xception, and timm's aligned Xceptions, as a torch `.pth` or a
`model.safetensors` file; the author's Keras `.h5` (ports.py translates the foreign names). What the weights
say about their own use (the arch, class names, the image size and crop they were trained and evaluated at,
Keras numerics) travels in `Weights`, never as attributes stuck onto a module.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import Checkpoint, clean_state_dict, is_checkpoint, is_state_dict, load_file
from ..config import UserError, check_file
from . import ports
from .backbone import Backbone, check_backbone_args
from .family import ARCH_NAMES, arch_info, arch_of_state_dict, build_arch
from .hub import preprocessing_of, resolve_pretrained

HEAD_KEYS = ("fc.weight", "fc.bias")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass
class Weights:
    state: dict  # our key -> tensor
    fmt: str  # "xception", "timm", "cadene" or "keras"
    source: str  # the path, for messages
    keras_exact: bool = False
    origin: dict = field(default_factory=dict)  # our key -> the file's name for it
    class_names: list | None = None
    args: dict = field(default_factory=dict)  # our checkpoints' saved run settings
    # Our checkpoints that hold an EMA next to the trained weights: which of the two `state` is, "ema" or
    # "model". None: the file holds one set of weights, so there was nothing to choose.
    variant: str | None = None
    forced: bool = False  # the variant was asked for by a flag (--raw-weights, --ema-weights), not the run's choice
    arch: str = "xception"  # which net of family.ARCHS the tensors belong to

    @property
    def num_classes(self) -> int | None:
        w = self.state.get("fc.weight")
        return None if w is None else int(w.shape[0])

    @property
    def choice_note(self) -> str | None:
        """The line eval/predict/export/average print when the file offered a choice of weights (so that a
        result is never silently the EMA's); None when it did not."""
        if self.variant is None:
            return None
        if self.forced:
            return (f"using the EMA weights of {self.source} (--ema-weights), not its trained ones"
                    if self.variant == "ema" else
                    f"using the trained weights of {self.source} (--raw-weights), not the EMA it also holds")
        if self.variant == "ema":
            return (f"using the EMA weights of {self.source}: they scored higher than the trained ones in the "
                    f"run's evaluation (--raw-weights for the trained ones)")
        return (f"using the trained weights of {self.source}: they scored at least as high as the EMA it also "
                f"holds in the run's evaluation (--ema-weights for the EMA)")


WEIGHT_CHOICES = ("best", "model", "ema")


def weights_choice(raw: bool, ema: bool) -> str:
    """From --raw-weights / --ema-weights: "model", "ema", or "best" (neither: the weights that the run's own
    evaluation ranked higher, which is what model_best's best_acc1 measured)."""
    if raw and ema:
        raise UserError("--raw-weights and --ema-weights: give one of them (or neither: the weights the run's "
                        "evaluation ranked higher)")
    return "model" if raw else "ema" if ema else "best"


def sniff(path: str, flag: str = "--weights") -> str:
    """'hdf5', 'safetensors', 'onnx' or 'torch', from the first bytes (not the file name)."""
    check_file(path, flag, "a weights file (.pth, .pth.tar, .safetensors, .h5)")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch's zip format, or a legacy pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    if path.lower().endswith(".onnx"):
        return "onnx"
    raise UserError(f"{flag} {path}: unknown weights format; expected one of our checkpoints, a timm/Cadene "
                    f".pth or .safetensors state dict, or a Keras .h5 file")


def locate(path: str, flag: str = "--weights", arch: str | None = None) -> str:
    """A local file for `path`: a published name ("imagenet", "keras", "hf-hub:ORG/REPO[@REV]", see hub.py;
    "imagenet" of `arch`) is downloaded or found in the cache; any other string is a path, as it is."""
    resolved = resolve_pretrained(path, arch or "xception", flag)
    return path if resolved is None else resolved[0]


def read_weights(path: str, flag: str = "--weights", choice: str = "model", arch: str | None = None) -> Weights:
    """The weights of any file we read, or of a published name (`locate`). `choice` (see from_checkpoint):
    which weights of our checkpoint that holds an EMA next to the trained ones. The weights of an hf-hub
    repository carry the input size and crop of its pretrained_cfg in `args`, as a checkpoint carries its
    run's (eval_settings reads them there); settings the file itself holds win."""
    path = locate(path, flag, arch)
    weights = _read_file(path, flag, choice)
    published = preprocessing_of(path)
    names = published.pop("class_names", None)
    if weights.class_names is None and names is not None and len(names) == weights.num_classes:
        weights.class_names = names
    published = {k: v for k, v in published.items() if weights.args.get(k) is None}
    if published:
        weights.args = {**weights.args, **published}
    return weights


def _read_file(path: str, flag: str, choice: str) -> Weights:
    kind = sniff(path, flag)
    if kind == "hdf5":
        state, origin = ports.read_keras_h5(path, flag)
        return Weights(state, "keras", path, keras_exact=True, origin=origin)
    if kind == "onnx":
        raise UserError(f"{flag} {path}: an ONNX file holds a finished graph, not trainable weights; "
                        f"give the checkpoint it was exported from")
    obj = _read_safetensors(path, flag) if kind == "safetensors" else load_file(path, flag=flag)
    if is_checkpoint(obj):
        return from_checkpoint(Checkpoint.from_dict(obj, f"{flag} {path}"), path, choice)
    state = obj.get("state_dict", obj.get("model", obj))  # a bare state dict, or one inside a dict
    if not is_state_dict(state):
        raise UserError(f"{flag} {path}: the file holds no model state dict")
    return from_state_dict(state, path)


def _read_safetensors(path: str, flag: str) -> dict:
    try:
        from safetensors.torch import load_file as load_safetensors
    except ImportError:
        raise UserError(f"{flag} {path}: reading .safetensors needs the safetensors package "
                        f"(pip install safetensors)")
    try:
        return load_safetensors(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise UserError(f"{flag} {path}: not a readable safetensors file ({type(e).__name__})")


def from_checkpoint(ckpt: Checkpoint, source: str, choice: str = "model") -> Weights:
    """The checkpoint's weights where it holds an EMA too: `choice` "model" (the default: a resume must
    continue the trained weights, never the average), "ema", or "best": the ones the run's evaluation of that
    epoch ranked higher (`best_source`; model_best's best_acc1 is their top-1), for eval, predict, export,
    average and --pretrained."""
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"choice must be one of {WEIGHT_CHOICES}, got {choice!r}")
    if ckpt.ema is None:
        state, variant = ckpt.model, None
    else:
        variant = ckpt.best_source if choice == "best" else choice
        state = ckpt.ema if variant == "ema" else ckpt.model
    arch = ckpt.arch
    if (arch == "xception") != any(k.startswith("entry_flow.") for k in state):
        # The tensors contradict the recorded arch (a writer that left it at its default): they win.
        arch = arch_of_state_dict(state) or arch
    return Weights(dict(state), "xception", source, keras_exact=ckpt.keras_exact, origin={k: k for k in state},
                   class_names=ckpt.class_names, args=ckpt.args, variant=variant, arch=arch,
                   forced=choice != "best")


def from_state_dict(state: dict, source: str) -> Weights:
    """Recognise the naming (ours, timm's legacy or aligned, Cadene's) and the arch, and translate."""
    state = clean_state_dict(state)
    if any(k.startswith(("entry_flow.", "middle_flow.", "exit_flow.")) for k in state):
        return Weights(dict(state), "xception", source, origin={k: k for k in state})
    if ports.is_timm_naming(state):
        fmt = "cadene" if any(k.startswith("last_linear.") for k in state) else "timm"
        ours, origin = ports.from_timm(state, "last_linear" if fmt == "cadene" else "fc")
        return Weights(ours, fmt, source, origin=origin)
    if ports.is_timm_aligned_naming(state):
        # Ours and timm's differ only in the classifier's name; a headless file counts as timm's.
        fmt = "xception" if "fc.weight" in state else "timm"
        ours, origin = ports.from_timm_aligned(state)
        arch = arch_of_state_dict(ours)
        if arch is None:
            raise UserError(f"{source}: an aligned Xception state dict (stem.*, blocks.*) whose tensors match "
                            f"none of {', '.join(ARCH_NAMES[1:])}; is it complete and unmodified?")
        return Weights(ours, fmt, source, origin=origin, arch=arch)
    sample = ", ".join(sorted(state)[:3])
    raise UserError(f"{source}: tensor names ({sample}, ...) are neither ours nor timm's/Cadene's "
                    f"(legacy_xception, xception41/65/71, 41p/65p); is this an Xception state dict?")


def _head_rule(own: dict, state: dict, weights: Weights, allow_new_head: bool) -> str | None:
    """Why the classifier stays fresh (None: it loads). A head of another class count, or none in the
    file, is a head swap when allowed and an error naming the tensor otherwise."""
    head = [state.get(k) for k in HEAD_KEYS]
    if all(h is not None and h.shape == own[k].shape for h, k in zip(head, HEAD_KEYS)):
        return None
    if any(h is None for h in head) and not all(h is None for h in head):
        missing = next(k for k, h in zip(HEAD_KEYS, head) if h is None)
        raise UserError(f"{weights.source}: missing tensor {weights.origin.get(missing, missing)}")
    why = ("the file has no classifier" if head[0] is None else
           f"the file's classifier has {head[0].shape[0]} classes, the model {own['fc.weight'].shape[0]}")
    if not allow_new_head:
        raise UserError(f"{weights.source}: {why}; use --pretrained {weights.source} to fine-tune a new classifier")
    return why


def load_into(model: nn.Module, weights: Weights, allow_new_head: bool = True, log=print) -> bool:
    """THE weight loader, for every arch. Returns True when the classifier was left fresh (head swap: the
    file has none, or one of another class count, and `allow_new_head`). Weights of another arch, and any
    other gap or shape mismatch, are an error that names the file's tensor."""
    model_arch = getattr(model, "arch", "xception")  # aligned nets say; the original has no attribute
    if weights.arch != model_arch:
        raise UserError(f"{weights.source} holds {weights.arch} weights, not {model_arch}; pass --arch "
                        f"{weights.arch} or other weights")
    own = model.state_dict()
    state = dict(weights.state)
    for key in own:  # tiny files of old ports lack these counters; they do not affect the numerics
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0)
    why_new = _head_rule(own, state, weights, allow_new_head)
    if why_new:
        for k in HEAD_KEYS:
            state.pop(k, None)
    for key, value in state.items():
        name = weights.origin.get(key, key)
        if key not in own:
            raise UserError(f"{weights.source}: unexpected tensor {name}; is this an Xception weights file?")
        if key.endswith(".pointwise.weight") and value.dim() == 2 and own[key].dim() == 4:
            value = state[key] = value[:, :, None, None]  # some old ports store 1x1 kernels as matrices
        if value.shape != own[key].shape:
            raise UserError(f"{weights.source}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(own[key].shape)} (for {key})")
    missing = [k for k in own if k not in state and not (why_new and k in HEAD_KEYS)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{weights.source}: missing tensor {weights.origin.get(missing[0], missing[0])}{more} "
                        f"(for {missing[0]}); the file is incomplete or not an Xception")
    model.load_state_dict(state, strict=False)
    if weights.keras_exact and not model.keras_exact:
        model.set_keras_exact(True)  # weights fine-tuned from Keras's keep its numerics
    if why_new:
        log(f"{weights.source}: loaded all but the classifier ({why_new}); a new {own['fc.weight'].shape[0]}-class "
            f"classifier starts from scratch")
    return bool(why_new)


def build_model(weights: Weights | None, num_classes: int | None = None, drop_rate: float = 0.0,
                keras_exact: bool | None = None, log=print, arch: str | None = None,
                flag: str = "--pretrained") -> nn.Module:
    """The weights' arch (without weights: `arch`, default xception) for `num_classes` (None: the file's,
    else 1000) with `weights` loaded (head swap allowed). An `arch` other than the weights' is refused
    (`flag` names the weights in that message). `keras_exact` None: the Keras numerics exactly when the
    weights ask for them (xception only)."""
    if weights is None:
        return build_arch(arch or "xception", num_classes or 1000, drop_rate, bool(keras_exact))
    if arch is not None and arch != weights.arch:
        raise UserError(f"{flag} {weights.source} holds {weights.arch} weights; pass --arch {weights.arch} "
                        f"or other weights")
    exact = weights.keras_exact if keras_exact is None else keras_exact
    model = build_arch(weights.arch, num_classes or weights.num_classes or 1000, drop_rate, exact)
    load_into(model, dataclasses.replace(weights, keras_exact=exact), allow_new_head=True, log=log)
    if weights.fmt != "xception" or exact:
        log(f"{weights.source}: {weights.fmt} weights imported"
            + (" (Keras numerics: BatchNorm eps 1e-3, TF 'same' max-pool padding)" if exact else ""))
    return model


def create_model(arch: str | None = None, num_classes: int | None = None, weights: str | None = None,
                 drop_rate: float = 0.0, keras_exact: bool | None = None, log=print,
                 pretrained: str | None = None, **backbone) -> nn.Module:
    """Build `arch` (one of ARCH_NAMES; None: the weights' arch, else "xception") and optionally load
    `weights` (or its other name `pretrained`): one of our checkpoints, a timm/Cadene legacy_xception or timm
    aligned Xception .pth or .safetensors file, a Keras .h5 file, or a published name ("imagenet": the
    arch's ImageNet weights, "keras", "hf-hub:ORG/REPO[@REV]"); the format and the arch are detected from the
    file, and an `arch` other than the file's is refused.

    When `num_classes` differs from the file's (or the file has no classifier), everything but the
    classifier is loaded and the classifier keeps its fresh initialisation; `log` says so. `num_classes`
    None takes the file's. `keras_exact` None picks the Keras numerics exactly for Keras weights.

    `backbone` keywords: `features_only=True` gives a `Backbone` (backbone.py) instead, returning the feature
    maps of `out_indices` (default all: strides 2, 4, 8, 16, 32) with the classifier dropped after loading;
    `output_stride=16` or 8 dilates its last stages instead of striding (backbone only: a classifier keeps 32).
    """
    unknown = sorted(set(backbone) - {"features_only", "out_indices", "output_stride"})
    if unknown:
        raise TypeError(f"create_model() got an unexpected keyword argument {unknown[0]!r}")
    features_only = bool(backbone.get("features_only", False))
    out_indices, output_stride = backbone.get("out_indices"), backbone.get("output_stride", 32)
    if arch is not None:
        arch_info(arch)  # an unknown name is refused before any file is read
    indices = check_backbone_args(out_indices, output_stride)
    if not features_only and (output_stride != 32 or out_indices is not None):
        raise UserError(f"output_stride and out_indices are for a backbone: pass features_only=True "
                        f"(a classifier has output stride 32)")
    weights = weights or pretrained
    loaded = read_weights(weights, "weights", choice="best", arch=arch) if weights is not None else None
    if loaded is not None and arch is not None and arch != loaded.arch:
        raise UserError(f"{weights} holds {loaded.arch} weights; pass arch={loaded.arch!r} or other weights")
    model = build_model(loaded, num_classes, drop_rate, keras_exact, log, arch=arch)
    return Backbone(model, indices, output_stride) if features_only else model


def eval_settings(saved: dict, image_size: int | None, crop_pct: float | None, source: str,
                  log=print, arch: str = "xception") -> tuple:
    """(image_size, crop_pct) to evaluate with: a flag given by the user wins (with a warning when it differs
    from the weights' own), else the setting the weights were trained and evaluated at (`saved`: our
    checkpoint's args, or an exported graph's metadata), else `arch`'s default (family.ARCHS: the crop of
    its published weights). Says which it used."""
    info = arch_info(arch)
    chosen, said = [], []
    for flag, given, key, default in (("--image-size", image_size, "image_size", info.image_size),
                                      ("--crop-pct", crop_pct, "crop_pct", info.crop_pct)):
        own = saved.get(key)
        if given is not None:
            if own is not None and float(own) != float(given):
                log(f"warning: {flag} {given} overrides the {key.replace('_', ' ')} {own} that {source} "
                    f"was trained and evaluated at")
            value, why = given, "from the flag"
        elif own is not None:
            value, why = own, "the weights' own"
        else:
            value, why = default, "the default"
        chosen.append(type(default)(value))
        said.append(f"{key.replace('_', ' ')} {chosen[-1]:g} ({why})")
    log(f"{source}: input " + ", ".join(said))
    return tuple(chosen)
