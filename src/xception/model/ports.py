"""Foreign weights in our names: timm's `legacy_xception` and Cadene's `xception` state dicts (the same port,
classifier `fc` or `last_linear`), timm's aligned Xceptions (xception41/65/71, 41p/65p: named as ours but
for the classifier), and the author's Keras `.h5` files (`xception_weights_tf_dim_ordering_tf_
kernels[_notop].h5`) or any Keras 2/3 legacy-HDF5 save of `keras.applications.Xception`.

Each translation returns (state dict with our keys, {our key: the file's name for it}); the names are for
error messages that point into the user's file.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..config import UserError

# Our blocks with a residual shortcut, in network order; timm's block1..block12, Keras's block2..block13.
BLOCKS = [f"entry_flow.{i}" for i in (2, 3, 4)] + [f"middle_flow.{i}" for i in range(8)] + ["exit_flow.0"]
DOWN_BLOCKS = [BLOCKS[0], BLOCKS[1], BLOCKS[2], BLOCKS[11]]
BN_NAMES = ("weight", "bias", "running_mean", "running_var")
KERAS_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def is_timm_naming(state: dict) -> bool:
    return "conv1.weight" in state and any(k.startswith("block1.") for k in state)


def from_timm(state: dict, head: str) -> tuple:
    """timm/Cadene names -> ours; `head` is the classifier's name (fc or last_linear)."""
    out, origin = {}, {}

    def put(ours: str, theirs: str) -> None:
        if theirs in state:
            out[ours], origin[ours] = state[theirs], theirs
        else:
            origin.setdefault(ours, theirs)

    def put_bn(ours: str, theirs: str) -> None:
        for name in BN_NAMES + ("num_batches_tracked",):
            put(f"{ours}.{name}", f"{theirs}.{name}")

    # timm's conv1/bn1, conv2/bn2 (plain stem convolutions) and conv3/bn3, conv4/bn4 (separable, exit flow)
    for n, ours in ((1, "entry_flow.0"), (2, "entry_flow.1"), (3, "exit_flow.1"), (4, "exit_flow.2")):
        pairs = ([(".0.weight", ".weight")] if n <= 2 else
                 [(".0.depthwise.weight", ".conv1.weight"), (".0.pointwise.weight", ".pointwise.weight")])
        for our_suffix, their_suffix in pairs:
            put(ours + our_suffix, f"conv{n}{their_suffix}")
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
    put("fc.weight", f"{head}.weight")
    put("fc.bias", f"{head}.bias")
    return out, origin


def to_timm(state: dict, arch: str) -> dict:
    """Our names -> timm's, the inverse of from_timm (legacy_xception, classifier fc) and of from_timm_aligned
    (the aligned family keeps our names but for the classifier, timm's head.fc)."""
    if arch != "xception":
        return {("head." + k if k.startswith("fc.") else k): v for k, v in state.items()}
    names = {}
    for n, ours in ((1, "entry_flow.0"), (2, "entry_flow.1")):
        names.update({f"{ours}.0.": f"conv{n}.", f"{ours}.1.": f"bn{n}."})
    for n, ours in ((3, "exit_flow.1"), (4, "exit_flow.2")):
        names.update({f"{ours}.0.depthwise.": f"conv{n}.conv1.", f"{ours}.0.pointwise.": f"conv{n}.pointwise.",
                      f"{ours}.1.": f"bn{n}."})
    for b, ours in enumerate(BLOCKS, start=1):
        units = [f"{ours}.sep1", f"{ours}.sep2"] if ours in DOWN_BLOCKS else [f"{ours}.body.{i}" for i in range(3)]
        index = 0
        for j, unit in enumerate(units):
            index += 0 if b == 1 and j == 0 else 1  # timm's rep: a ReLU before every unit but block1's first
            names.update({f"{unit}.conv.depthwise.": f"block{b}.rep.{index}.conv1.",
                          f"{unit}.conv.pointwise.": f"block{b}.rep.{index}.pointwise.",
                          f"{unit}.bn.": f"block{b}.rep.{index + 1}."})
            index += 2
        if ours in DOWN_BLOCKS:
            names.update({f"{ours}.shortcut.0.": f"block{b}.skip.", f"{ours}.shortcut.1.": f"block{b}.skipbn."})
    names["fc."] = "fc."
    out = {}
    for key, value in state.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"no timm name for our {key}")
        out[names[prefix] + key[len(prefix):]] = value
    return out


def is_timm_aligned_naming(state: dict) -> bool:
    """timm's aligned Xceptions (and ours, aligned.py, which keep timm's names): a stem and blocks."""
    return any(k.startswith("stem.") for k in state) and any(k.startswith("blocks.") for k in state)


def from_timm_aligned(state: dict) -> tuple:
    """timm aligned names -> ours: only the classifier differs (timm's head.fc is our top-level fc); every
    other tensor keeps its name. A state dict already in our names passes through unchanged."""
    out, origin = {}, {}
    for theirs, value in state.items():
        ours = "fc." + theirs[len("head.fc."):] if theirs.startswith("head.fc.") else theirs
        out[ours], origin[ours] = value, theirs
    return out, origin


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_keras_h5(path: str, flag: str = "--weights") -> tuple:
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
    return from_keras(layers, path)


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


def from_keras(layers: list, source: str) -> tuple:
    """[(Keras layer name, {attribute: array})] in the file's order -> ours."""
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
    return out, origin
