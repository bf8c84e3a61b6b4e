"""Weight import: detect a file's format and translate its tensors to our model's names and layouts.

Formats read:

* ours: a checkpoint written by `xception train` (or a bare state dict with our names);
* timm's ``legacy_xception`` and Cadene's ``xception`` (the same port, classifier ``fc`` or
  ``last_linear``), as a torch ``.pth`` state dict or a ``model.safetensors`` file;
* the author's Keras ``.h5`` files (``xception_weights_tf_dim_ordering_tf_kernels[_notop].h5``) and
  any Keras 2 or Keras 3 legacy-HDF5 save of ``keras.applications.Xception``.

Every path ends in `Imported`: a state dict with our names, where each tensor came from (for errors),
and whether the weights want Keras numerics (BatchNorm eps 1e-3, TF "same" max-pools).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .config import UserError

HEAD_KEYS = ("fc.weight", "fc.bias")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

# Our blocks with a residual shortcut, in network order; timm's block1..block12, Keras's block2..block13.
BLOCKS = [f"entry_flow.{i}" for i in (2, 3, 4)] + [f"middle_flow.{i}" for i in range(8)] + ["exit_flow.0"]
DOWN_BLOCKS = [BLOCKS[0], BLOCKS[1], BLOCKS[2], BLOCKS[11]]
BN_SUFFIXES = {"weight": "weight", "bias": "bias", "running_mean": "running_mean", "running_var": "running_var"}
KERAS_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


@dataclass
class Imported:
    state: dict  # our key -> tensor
    fmt: str  # "xception", "timm", "cadene" or "keras"
    keras_exact: bool = False
    origin: dict = field(default_factory=dict)  # our key -> the file's name for it
    class_names: list | None = None
    args: dict = field(default_factory=dict)  # our checkpoints' saved run settings

    @property
    def num_classes(self) -> int | None:
        w = self.state.get("fc.weight")
        return None if w is None else int(w.shape[0])


def sniff(path: str, flag: str = "--weights") -> str:
    """'hdf5', 'safetensors', 'onnx' or 'torch', from the first bytes (not the file name)."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder; give a weights file (.pth, .pth.tar, .safetensors, .h5)")
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


def read_weights(path: str, flag: str = "--weights") -> Imported:
    kind = sniff(path, flag)
    if kind == "hdf5":
        return read_keras_h5(path, flag)
    if kind == "onnx":
        raise UserError(f"{flag} {path}: an ONNX file holds a finished graph, not trainable weights; "
                        f"give the checkpoint it was exported from")
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{flag} {path}: reading .safetensors needs the safetensors package "
                            f"(pip install safetensors)")
        try:
            state = load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise UserError(f"{flag} {path}: not a readable safetensors file ({type(e).__name__})")
        obj = {"state_dict": state}
    else:
        from .checkpoint import load_checkpoint
        obj = load_checkpoint(path, flag=flag)
    from .checkpoint import model_state
    try:
        state = model_state(obj)
    except UserError as e:
        raise UserError(f"{flag} {path}: {e}")
    return from_state_dict(state, path, obj)


def from_state_dict(state: dict, source: str, obj: dict | None = None) -> Imported:
    """Recognise the naming (ours, timm, Cadene) and translate."""
    obj = obj or {}
    if any(k.startswith(("entry_flow.", "middle_flow.", "exit_flow.")) for k in state):
        return Imported(dict(state), "xception", keras_exact=bool(obj.get("keras_exact", False)),
                        origin={k: k for k in state}, class_names=obj.get("class_names"),
                        args=obj.get("args") or {})
    if "conv1.weight" in state and any(k.startswith("block1.") for k in state):
        fmt = "cadene" if any(k.startswith("last_linear.") for k in state) else "timm"
        return _timm_import(state, fmt)
    sample = ", ".join(sorted(state)[:3])
    raise UserError(f"{source}: tensor names ({sample}, ...) are neither ours nor timm's/Cadene's "
                    f"legacy_xception; is this an Xception state dict?")


def _timm_import(state: dict, fmt: str) -> Imported:
    out, origin = {}, {}

    def put(ours: str, theirs: str) -> None:
        if theirs in state:
            out[ours], origin[ours] = state[theirs], theirs
        else:
            origin.setdefault(ours, theirs)

    def put_bn(ours: str, theirs: str) -> None:
        for a, b in BN_SUFFIXES.items():
            put(f"{ours}.{b}", f"{theirs}.{a}")
        put(f"{ours}.num_batches_tracked", f"{theirs}.num_batches_tracked")

    for n, ours in ((1, "entry_flow.0"), (2, "entry_flow.1")):
        put(f"{ours}.0.weight", f"conv{n}.weight")
        put_bn(f"{ours}.1", f"bn{n}")
    for b, ours in enumerate(BLOCKS, start=1):
        prefix = f"block{b}.rep."
        # The block's Sequential mixes ReLU, separable conv, BN and pool; their order gives the pairing.
        seps = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                       if k.startswith(prefix) and k.endswith(".conv1.weight")})
        bns = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                      if k.startswith(prefix) and k.endswith(".running_mean")})
        units = [f"{ours}.sep1", f"{ours}.sep2"] if ours in DOWN_BLOCKS else [f"{ours}.body.{i}" for i in range(3)]
        if len(seps) != len(units) or len(bns) != len(units):
            origin[f"{units[0]}.conv.depthwise.weight"] = f"{prefix}*.conv1.weight"
            continue  # reported as missing below
        for unit, s, n in zip(units, seps, bns):
            put(f"{unit}.conv.depthwise.weight", f"{prefix}{s}.conv1.weight")
            put(f"{unit}.conv.pointwise.weight", f"{prefix}{s}.pointwise.weight")
            put_bn(f"{unit}.bn", f"{prefix}{n}")
        if ours in DOWN_BLOCKS:
            put(f"{ours}.shortcut.0.weight", f"block{b}.skip.weight")
            put_bn(f"{ours}.shortcut.1", f"block{b}.skipbn")
    for n, ours in ((3, "exit_flow.1"), (4, "exit_flow.2")):
        put(f"{ours}.0.depthwise.weight", f"conv{n}.conv1.weight")
        put(f"{ours}.0.pointwise.weight", f"conv{n}.pointwise.weight")
        put_bn(f"{ours}.1", f"bn{n}")
    head = "last_linear" if fmt == "cadene" else "fc"
    put("fc.weight", f"{head}.weight")
    put("fc.bias", f"{head}.bias")
    return Imported(out, fmt, keras_exact=False, origin=origin)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str, flag: str = "--weights") -> Imported:
    """The author's weights file, or a Keras 2/3 legacy HDF5 save (whole model or weights only)."""
    try:
        import h5py
    except ImportError:
        raise UserError(f"{flag} {path}: reading Keras .h5 files needs h5py (pip install h5py)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{flag} {path}: not a readable HDF5 file ({e})")
    with f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise UserError(f"{flag} {path}: an HDF5 file without Keras layer names; give a Keras weights "
                            f"file in the legacy .h5 layout (model.save('x.h5') or the published "
                            f"xception_weights_tf_dim_ordering_tf_kernels.h5)")
        layers = []  # (layer name, {attribute: array}) in the file's (= the model's) order
        for name in map(_text, group.attrs["layer_names"]):
            g = group[name]
            tensors = {}
            for wname in map(_text, g.attrs.get("weight_names", [])):
                attr = wname.split("/")[-1].split(":")[0]  # Keras 2: kernel:0, Keras 3: kernel
                if wname in g:  # a listed but absent dataset is reported as a missing tensor below
                    tensors[attr] = g[wname][()]
            if tensors:
                layers.append((name, tensors))
    return _keras_import(layers, path)


def _keras_target(name: str) -> str | None:
    """Our module prefix for a named Keras layer (without its _bn suffix), or None."""
    if name == "predictions":
        return "fc"
    m = re.fullmatch(r"block(\d+)_(conv|sepconv)(\d)", name)
    if not m:
        return None
    block, kind, unit = int(m.group(1)), m.group(2), int(m.group(3))
    if block == 1 and kind == "conv" and unit in (1, 2):
        return f"entry_flow.{unit - 1}.0"
    if kind != "sepconv":
        return None
    if 2 <= block <= 4 and unit in (1, 2):
        return f"entry_flow.{block}.sep{unit}.conv"
    if 5 <= block <= 12 and unit in (1, 2, 3):
        return f"middle_flow.{block - 5}.body.{unit - 1}.conv"
    if block == 13 and unit in (1, 2):
        return f"exit_flow.0.sep{unit}.conv"
    if block == 14 and unit in (1, 2):
        return f"exit_flow.{unit}.0"
    return None


def _bn_of(conv_target: str) -> str:
    """Our BN that follows a conv prefix: x.sepN.conv -> x.sepN.bn, entry_flow.0.0 -> entry_flow.0.1."""
    if conv_target.endswith(".conv"):
        return conv_target[:-len("conv")] + "bn"
    return conv_target[:-1] + "1"


def _keras_names() -> dict:
    """Our key -> the Keras tensor name it comes from, for every named layer of Keras's Xception."""
    units = [("block1_conv", 1, 2)] + [(f"block{b}_sepconv", 1, 3 if 5 <= b <= 12 else 2) for b in range(2, 15)]
    names = {"fc.weight": "predictions/kernel", "fc.bias": "predictions/bias"}
    for stem, first, last in units:
        for u in range(first, last + 1):
            layer = f"{stem}{u}"
            target = _keras_target(layer)
            if target.endswith(".conv") or target.startswith("exit_flow.") and target.endswith(".0"):
                names[f"{target}.depthwise.weight"] = f"{layer}/depthwise_kernel"
                names[f"{target}.pointwise.weight"] = f"{layer}/pointwise_kernel"
            else:
                names[f"{target}.weight"] = f"{layer}/kernel"
            for a, b in KERAS_BN.items():
                names[f"{_bn_of(target)}.{b}"] = f"{layer}_bn/{a}"
    return names


def _keras_import(layers: list, source: str) -> Imported:
    import numpy as np
    import torch

    out, origin = {}, _keras_names()
    unnamed_convs, unnamed_bns = [], []

    def put(ours: str, array, theirs: str, perm=None) -> None:
        t = torch.from_numpy(np.ascontiguousarray(array.transpose(perm) if perm else array)).float()
        out[ours], origin[ours] = t, theirs

    def put_bn(ours: str, tensors: dict, layer: str) -> None:
        for a, b in KERAS_BN.items():
            if a in tensors:
                put(f"{ours}.{b}", tensors[a], f"{layer}/{a}")
            else:
                origin[f"{ours}.{b}"] = f"{layer}/{a}"
        out[f"{ours}.num_batches_tracked"] = torch.tensor(0)

    for name, tensors in layers:
        is_bn = "moving_mean" in tensors
        base = name[:-len("_bn")] if name.endswith("_bn") else name
        target = _keras_target(base)
        if target is None:
            if name.startswith("block") or name == "predictions":
                raise UserError(f"{source}: unexpected Keras layer {name}; is this keras.applications.Xception?")
            (unnamed_bns if is_bn else unnamed_convs).append((name, tensors))
            continue
        if is_bn:
            put_bn(_bn_of(target), tensors, name)
        elif target == "fc":
            for a, ours, perm in (("kernel", "fc.weight", (1, 0)), ("bias", "fc.bias", None)):
                if a in tensors:
                    put(ours, tensors[a], f"{name}/{a}", perm)
        elif "depthwise_kernel" in tensors or "pointwise_kernel" in tensors:
            # depthwise (kh, kw, in, 1) -> (in, 1, kh, kw); pointwise (1, 1, in, out) -> (out, in, 1, 1)
            for a, ours, perm in (("depthwise_kernel", "depthwise", (2, 3, 0, 1)),
                                  ("pointwise_kernel", "pointwise", (3, 2, 0, 1))):
                key = f"{target}.{ours}.weight"
                if a in tensors and tensors[a].ndim == 4:
                    put(key, tensors[a], f"{name}/{a}", perm)
                else:
                    origin[key] = f"{name}/{a}"
        elif "kernel" in tensors and tensors["kernel"].ndim == 4:
            put(f"{target}.weight", tensors["kernel"], f"{name}/kernel", (3, 2, 0, 1))  # (kh,kw,in,out)
        else:
            origin[f"{target}.weight"] = f"{name}/kernel"
    # The residual 1x1 convs and their BNs have no block name; they come in network order.
    for i, block in enumerate(DOWN_BLOCKS):
        if i < len(unnamed_convs):
            name, tensors = unnamed_convs[i]
            if "kernel" in tensors and tensors["kernel"].ndim == 4:
                put(f"{block}.shortcut.0.weight", tensors["kernel"], f"{name}/kernel", (3, 2, 0, 1))
        origin.setdefault(f"{block}.shortcut.0.weight", f"residual conv {i + 1} of 4 (unnamed Conv2D)")
        if i < len(unnamed_bns):
            name, tensors = unnamed_bns[i]
            put_bn(f"{block}.shortcut.1", tensors, name)
        else:
            for b in KERAS_BN.values():
                origin[f"{block}.shortcut.1.{b}"] = f"residual BatchNormalization {i + 1} of 4 (unnamed)"
    if len(unnamed_convs) > 4 or len(unnamed_bns) > 4:
        extra = (unnamed_convs[4:] + unnamed_bns[4:])[0][0]
        raise UserError(f"{source}: unexpected Keras layer {extra} (Xception has 4 unnamed residual convs "
                        f"and BNs); is this keras.applications.Xception?")
    return Imported(out, "keras", keras_exact=True, origin=origin)


def check_and_load(model, imported: Imported, source: str, log=print) -> bool:
    """Load `imported` into `model`. Returns True when the classifier was left fresh (head swap): the file
    has none (a _notop file) or one of another class count. Any other gap or shape mismatch is an error
    that names the file's tensor."""
    import torch

    own = model.state_dict()
    state = dict(imported.state)
    for key in own:  # tiny files of old ports lack these counters; they do not affect the numerics
        if key.endswith("num_batches_tracked") and key not in state and key not in HEAD_KEYS:
            state[key] = torch.tensor(0)
    new_head = False
    head = [state.get(k) for k in HEAD_KEYS]
    if any(h is None for h in head) or any(h.shape != own[k].shape for h, k in zip(head, HEAD_KEYS)):
        if all(h is None for h in head):
            why = "the file has no classifier"
        elif any(h is None for h in head):
            missing = next(k for k, h in zip(HEAD_KEYS, head) if h is None)
            raise UserError(f"{source}: missing tensor {imported.origin.get(missing, missing)}")
        else:
            why = f"the file's classifier has {head[0].shape[0]} classes, the model {own['fc.weight'].shape[0]}"
        new_head = True
        for k in HEAD_KEYS:
            state.pop(k, None)
    for key, value in state.items():
        name = imported.origin.get(key, key)
        if key not in own:
            raise UserError(f"{source}: unexpected tensor {name}; is this an Xception weights file?")
        if key.endswith(".pointwise.weight") and value.dim() == 2 and own[key].dim() == 4:
            value = state[key] = value[:, :, None, None]  # some old ports store 1x1 kernels as matrices
        if value.shape != own[key].shape:
            raise UserError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(own[key].shape)} (for {key})")
    missing = [k for k in own if k not in state and not (new_head and k in HEAD_KEYS)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{source}: missing tensor {imported.origin.get(missing[0], missing[0])}{more} "
                        f"(for {missing[0]}); the file is incomplete or not an Xception")
    model.load_state_dict(state, strict=False)
    if new_head:
        log(f"{source}: loaded all but the classifier ({why}); a new {own['fc.weight'].shape[0]}-class "
            f"classifier starts from scratch")
    return new_head


def create_model(num_classes: int | None = None, weights: str | None = None, drop_rate: float = 0.0,
                 keras_exact: bool | None = None, log=print, flag: str = "--weights"):
    """Build Xception, loading `weights` in any supported format. `num_classes` None: the file's class
    count (1000 for a _notop file). `keras_exact` None: Keras numerics exactly when the weights ask for it."""
    from .model import Xception

    if weights is None:
        return Xception(num_classes=num_classes or 1000, drop_rate=drop_rate, keras_exact=bool(keras_exact))
    imported = read_weights(weights, flag)
    exact = imported.keras_exact if keras_exact is None else keras_exact
    model = Xception(num_classes=num_classes or imported.num_classes or 1000, drop_rate=drop_rate,
                     keras_exact=exact)
    check_and_load(model, imported, weights, log)
    if imported.fmt != "xception" or exact:
        log(f"{weights}: {imported.fmt} weights imported"
            + (" (Keras numerics: BatchNorm eps 1e-3, TF 'same' max-pool padding)" if exact else ""))
    # What predict and export need to know about the weights (plain data, no tensors).
    model.weights_info = {"format": imported.fmt, "class_names": imported.class_names, "args": imported.args,
                          "source": weights}
    return model


def set_keras_exact(model, exact: bool) -> None:
    """Switch a built model's numerics in place (BN eps, max-pool padding): no weights change."""
    from torch import nn

    from .model import DownBlock, max_pool

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3 if exact else 1e-5
        if isinstance(m, DownBlock):
            m.pool = max_pool(exact)
    if hasattr(model, "keras_exact"):
        model.keras_exact = exact


def apply_saved_numerics(model, checkpoint: dict) -> None:
    """A checkpoint fine-tuned from Keras weights keeps the Keras numerics when resumed or evaluated."""
    from .checkpoint import unwrap

    if checkpoint.get("keras_exact"):
        set_keras_exact(unwrap(model), True)
