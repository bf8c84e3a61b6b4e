"""`xception explain IMAGE_OR_DIR... --weights W --out DIR`: Grad-CAM heatmaps of where a network looked.

Grad-CAM (Selvaraju et al. 2017) answers "which parts of this image made the network say class C?". It takes
the final convolutional feature map A (K channels over an h x w grid), the gradient of C's logit with respect
to A, and averages that gradient over the grid into one weight per channel; the weighted sum of the channels,
kept where positive, is a coarse h x w map of the evidence for C, stretched to the input's size and drawn over
the image (red: much evidence, blue: none). The map is normalised per image: it shows where, not how much.
Every net of the family ends on global average pooling and one linear layer, so the channel weights are C's
row of the classifier (over h * w): the map is exactly how much each grid cell adds to C's logit (the class
activation map of Zhou et al. 2016). Its grid is the input size over 32 (3 x 3 at 71 px, 10 x 10 at 299 px),
so the heatmap is blurry by nature.

The layer is the network's final feature map, the one its pooling averages (`target_layer`): for xception the
exit flow's last separable convolution after BN and ReLU, for the aligned nets their last block (and, for the
pre-activation ones, the ReLU after it). Any earlier layer would need the rest of the body to turn its
activations into evidence for a class; this one feeds the classifier directly.

The weights are read as `predict` reads them (tools/predict.py: our checkpoints, timm/Cadene/Keras files, or a
published name such as `imagenet`), and each image gets the same eval transform (resize, centre crop at the
weights' input size). The class explained is the top prediction (highest logit; for multi-label weights the
probability printed is its sigmoid) unless --class names one. An exported .onnx graph is refused: Grad-CAM
needs gradients, which only the PyTorch model has. For each image, OUT/<stem>-gradcam.png holds the cropped
image with the heatmap over it and OUT/<stem>-gradcam.npy the map itself (float32, the input's height x width,
in [0, 1]); an existing file is never overwritten (a -1, -2, ... suffix is added).
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import UserError, import_extra
from ..data import to_device
from ..files import atomic_write, make_folder, show
from ..model.weights import sniff
from ..runtime import resolve_device
from .predict import PredictOptions, Predictor, collect_images, load_predictor, weights_file

SUFFIX = "-gradcam"


@dataclass
class ExplainOptions:
    class_name: str | None = None  # None: each image's top class
    image_size: int | None = None  # None: the weights' own
    device: str = "auto"


def grad_cam_api() -> tuple:
    """(GradCAM, ClassifierOutputTarget, show_cam_on_image) of the grad-cam package, an optional extra."""
    def part(module: str):
        return import_extra(module, "xception explain", "explain", package="grad-cam")

    return (part("pytorch_grad_cam").GradCAM, part("pytorch_grad_cam.utils.model_targets").ClassifierOutputTarget,
            part("pytorch_grad_cam.utils.image").show_cam_on_image)


def target_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the network's final feature map (what `forward_features` returns and the
    global pooling averages): the layer Grad-CAM should watch. Found by running a small blank input through
    `forward_features` and taking the LAST module to finish that returned that very tensor. For xception
    that is `exit_flow`; for the aligned nets `act` (Identity, or the ReLU after a pre-activation last block).
    Taking the last one matters: a BatchNorm whose output an in-place ReLU then rewrites returns the same
    tensor, but a gradient hooked there would be taken before that ReLU."""
    finished = []
    hooks = [m.register_forward_hook(lambda m, i, o: finished.append((m, o)))
             for m in model.modules() if m is not model]
    side = max(int(getattr(model, "min_input_size", 32)), 32)
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, 3, side, side, device=param.device,
                                                          dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    found = [m for m, out in finished if out is features]
    if not found:
        raise RuntimeError(f"{type(model).__name__}: no module returns the final feature map")
    return found[-1]


def class_index(names: list, wanted: str, weights: str) -> int:
    """The index of class `wanted` among `names`; a one-line error naming a few classes when it is none."""
    if wanted in names:
        return names.index(wanted)
    close = difflib.get_close_matches(wanted, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    some = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise UserError(f"--class {wanted}: not a class of {weights}; {hint}its {len(names)} classes: {some}")


def free_stem(folder: str, stem: str) -> str:
    """FOLDER/STEM-gradcam, or with -1, -2, ... added, such that neither its .png nor its .npy exists yet:
    nothing is overwritten."""
    base, n = os.path.join(folder, stem + SUFFIX), 0
    while any(os.path.lexists(base + ext) for ext in (".png", ".npy")):
        n += 1
        base = os.path.join(folder, f"{stem}{SUFFIX}-{n}")
    return base


def save_outputs(base: str, picture: np.ndarray, heatmap: np.ndarray) -> str:
    """BASE.npy (the raw float32 map, HxW in [0, 1]) and BASE.png (the overlay); returns the .png's path."""
    atomic_write(base + ".npy", lambda f: np.save(f, heatmap.astype(np.float32)))
    atomic_write(base + ".png", lambda f: Image.fromarray(picture).save(f, format="PNG"))
    return base + ".png"


def overlay(image: torch.Tensor, heatmap: np.ndarray, show_cam) -> np.ndarray:
    """The uint8 3xHxW `image` with the HxW `heatmap` (values in [0, 1]) drawn over it: uint8 HxWx3 RGB."""
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255
    return show_cam(rgb, heatmap, use_rgb=True)


def load_for_gradients(weights: str, opts: ExplainOptions, device, log) -> Predictor:
    """The PyTorch model of `weights` (a file or a published name) on `device`, as predict loads it; an
    exported graph is refused, for it has no gradients to give."""
    local = weights_file(weights, "--weights", log)
    if sniff(local, "--weights") == "onnx":
        raise UserError(f"--weights {weights}: an exported graph has no gradients, which Grad-CAM needs; give "
                        f"the checkpoint it was exported from")
    predict_opts = PredictOptions(image_size=opts.image_size, device=opts.device)
    predict_opts.check()
    return load_predictor(local, device, predict_opts, log, fold=False)  # Grad-CAM watches the layers as trained


def explain_one(predictor: Predictor, cam, target_class, image: torch.Tensor, wanted: int | None,
                device) -> tuple:
    """(class index, its probability, HxW heatmap in [0, 1]) of one uint8 3xHxW image: the class is `wanted`,
    or when None the image's top one (highest logit). `cam` is a GradCAM on the model, `target_class` the
    package's ClassifierOutputTarget."""
    batch = to_device(image[None], device, channels_last=False)
    with torch.no_grad():
        logits = predictor.model(batch)
    index = int(logits[0].argmax()) if wanted is None else wanted
    probability = float(predictor.probabilities(logits)[0, index])
    heatmap = cam(input_tensor=batch, targets=[target_class(index)])[0]
    return index, probability, heatmap


def explain(inputs: list, weights: str, out: str, opts: ExplainOptions = ExplainOptions(), log=None) -> dict:
    """Write OUT/<stem>-gradcam.png for each image of `inputs` (files and folders, as predict takes them).
    Returns {"explained": [{path, class, index, probability, file}], "errors": [{path, error}]}: `file` is
    the PNG written (the raw map is beside it, as .npy)."""
    log = log or (lambda *a: print(*a, file=sys.stderr))
    grad_cam, target_class, show_cam = grad_cam_api()
    paths, problems = collect_images(inputs)
    if not paths:
        raise UserError("nothing to explain: " + "; ".join(f"{p}: {why}" for p, why in problems[:3]))
    device = resolve_device(opts.device)
    notes = []  # what loading says waits until --class is known good: an error stays one line
    predictor = load_for_gradients(weights, opts, device, notes.append)
    names = predictor.class_names
    wanted = None if opts.class_name is None else class_index(names, opts.class_name, weights)
    for note in notes:
        log(note)
    make_folder(out, "--out")
    transform = predictor.transform()
    cam = grad_cam(model=predictor.model, target_layers=[target_layer(predictor.model)])
    explained = []
    try:
        for path in paths:
            try:
                image = transform.load(path)
            except Exception as e:  # any decoder failure, reported and skipped as predict does
                problems.append((path, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]))
                continue
            index, probability, heatmap = explain_one(predictor, cam, target_class, image, wanted, device)
            base = free_stem(out, os.path.splitext(os.path.basename(path))[0])
            target = save_outputs(base, overlay(image, heatmap, show_cam), heatmap)
            explained.append({"path": path, "class": names[index], "index": index,
                              "probability": probability, "file": target})
    finally:
        cam.activations_and_grads.release()  # the hooks come off: the model is as it was
    return {"explained": explained, "errors": [{"path": p, "error": why} for p, why in problems]}


def run(args) -> int:
    opts = ExplainOptions(args.class_name, args.image_size, args.device)
    result = explain(args.inputs, args.weights, args.out, opts)
    for e in result["explained"]:
        print(f"{e['path']}: class {e['class']} (prob {100 * e['probability']:.2f}%) -> {show(e['file'])}")
    sys.stdout.flush()
    for e in result["errors"]:
        print(f"xception explain: skipped {e['path']}: {e['error']}", file=sys.stderr)
    if not result["explained"]:
        raise UserError(f"nothing to explain: none of the {len(result['errors'])} image(s) could be read")
    return 0
