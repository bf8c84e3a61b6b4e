"""`xception predict IMAGE_OR_DIR... --weights W` (or `--pretrained W`): class names and probabilities for images.

The eval transform is the one the weights were trained with (the checkpoint's saved image_size and
crop_pct; an exported graph's metadata; the model's defaults for foreign weights), with the EXIF orientation
honoured. Folders are searched recursively and batched. A file that cannot be read is reported and
skipped. Weights may be any format `create_model` reads, or an .onnx file from `xception export`; a
checkpoint holding an EMA too predicts with the weights its run ranked higher unless --raw-weights or
--ema-weights (a line on stderr says which). The weights may
also be a name of published weights (model/hub.py): `imagenet` (timm's legacy_xception.tf_in1k from the Hugging
Face Hub), `keras` (the author's Keras .h5) or `hf-hub:ORG/REPO[@REV]`, downloaded once into the usual caches;
`xception predict IMAGE --pretrained imagenet` needs no checkpoint of ours. Weights of 1000 classes that carry no
class names are labelled with the ImageNet names shipped with the package (no download).

Multi-label weights (a run trained with several labels per image; a checkpoint's run settings or an exported
graph's metadata say so, model/deploy.py `label_mode`) are read with a sigmoid per class instead of a softmax:
each image's "labels" are the classes whose probability exceeds the threshold (--threshold, else the one the
run saved, else 0.5), most probable first, and its "top" the K most probable classes as for single-label
weights. The text output then lists the labels (or says that none passed the threshold); single-label output
is as it always was.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..config import MIN_INPUT_SIZE, UserError
from ..data import to_device
from ..data.folder import IMG_EXTENSIONS
from ..data.transforms import pil_eval
from ..model.deploy import fold_batchnorm, label_mode, open_weights, temperature_of
from ..model.hub import imagenet_class_names
from ..model.weights import build_model, eval_settings, locate, weights_choice
from ..report import Progress
from ..runtime import default_channels_last, resolve_device


@dataclass
class PredictOptions:
    topk: int = 5
    batch_size: int = 16
    workers: int = 0
    image_size: int | None = None  # None: the weights' own
    crop_pct: float | None = None
    device: str = "auto"
    weights_choice: str = "best"  # of a checkpoint holding an EMA too: best (its run's choice), model or ema
    threshold: float | None = None  # multi-label weights: None = the weights' own (saved), else 0.5

    def check(self) -> None:
        if self.topk < 1:
            raise UserError(f"--topk must be at least 1, got {self.topk}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.image_size is not None and self.image_size < MIN_INPUT_SIZE:
            raise UserError(f"--image-size must be at least {MIN_INPUT_SIZE}, got {self.image_size}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise UserError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise UserError(f"--threshold must be in (0, 1), got {self.threshold}")


@dataclass
class Predictor:
    """Weights ready to run: `model` maps normalised float batches to logits; how to read them (`multi_label`:
    a sigmoid per class and labels above `threshold`, else a softmax; threshold None when single-label)."""
    model: object
    class_names: list
    image_size: int
    crop_pct: float
    multi_label: bool = False
    threshold: float | None = None
    temperature: float = 1.0  # a calibrated checkpoint's (or graph's): the logits are divided by it

    def transform(self):
        """The eval transform its inputs go through (file or uploaded bytes -> uint8 CHW at image_size)."""
        return pil_eval(self.image_size, self.crop_pct)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / self.temperature
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def class_names_for(saved, num_classes: int) -> list:
    if saved and len(saved) == num_classes:
        return [str(n) for n in saved]
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


def collect_images(inputs: list) -> tuple:
    """(image paths in order, [(path, problem)]) from files and folders given on the command line."""
    paths, problems = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for folder, dirs, names in os.walk(item, followlinks=True):
                dirs.sort()
                found += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
            if not found:
                problems.append((item, "folder holds no images"))
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            problems.append((item, "no such file or folder"))
    return paths, problems


class _Images:
    """Decoded, eval-transformed uint8 images; a file that fails gives its error text instead."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform.load(self.paths[i]), None
        except Exception as e:  # any decoder failure: PIL raises OSError, ValueError, SyntaxError, ...
            return i, None, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _collate(items):
    return items


def load_predictor(weights: str, device, opts: PredictOptions, log=print, fold: bool = True) -> Predictor:
    """The model (or exported graph) of `weights` on `device`, its class names, the input size and crop to
    evaluate at, and whether to read its outputs as multi-label (and at which threshold). `fold`: BatchNorm
    folded into the convolutions and channels_last where that is the faster layout, as export and bench infer
    do (the same logits to rounding, 1.2-1.4x the images per second on a CPU); explain keeps the layers as
    trained for Grad-CAM."""
    opened = open_weights(weights, opts.image_size, choice=opts.weights_choice)
    if opened.graph is not None:
        model, num = opened.graph, opened.graph.num_outputs()
        if opts.weights_choice != "best":
            log(f"note: --raw-weights/--ema-weights do not apply to {weights}: a graph holds the weights it was "
                f"exported with")
    else:
        if opened.weights.choice_note:
            log(opened.weights.choice_note)
        model = build_model(opened.weights, log=log).eval().to(device)
        num = model.num_classes
        if fold:
            model = fold_batchnorm(model)
            if default_channels_last(device):
                model = model.to(memory_format=torch.channels_last)
    arch = opened.weights.arch if opened.weights is not None else "xception"
    size, pct = eval_settings(opened.saved, opts.image_size, opts.crop_pct, weights, log, arch)
    multi_label, own = label_mode(opened.saved)
    if not multi_label and opts.threshold is not None:
        log(f"note: --threshold applies to multi-label weights only; {weights} is single-label (softmax)")
    threshold = (own if opts.threshold is None else opts.threshold) if multi_label else None
    return Predictor(model, class_names_for(opened.class_names, num), size, pct, multi_label, threshold,
                     temperature_of(opened.saved))


def weights_file(weights: str, flag: str = "--weights", log=print) -> str:
    """The local file of `weights`: a path as given, or a name of published weights downloaded (or found in
    the cache) by model/hub.py. The file's own contents say its architecture to the loader."""
    local = locate(weights, flag)
    if local != weights:
        log(f"{flag} {weights}: {local}")
    return local


def _entry(names: list, index: int, probability: float) -> dict:
    return {"class": names[index], "index": int(index), "probability": round(float(probability), 6)}


def top_results(predictor: Predictor, logits: torch.Tensor, k: int) -> list:
    """Per image of a batch: its top-k classes, and for multi-label weights its labels above the threshold."""
    probs = predictor.probabilities(logits).cpu()
    top = probs.topk(k, dim=1)
    names, out = predictor.class_names, []
    for row in range(probs.shape[0]):
        pairs = zip(top.values[row].tolist(), top.indices[row].tolist())
        result = {"top": [_entry(names, c, p) for p, c in pairs]}
        if predictor.multi_label:
            ranked = probs[row].sort(descending=True)
            pairs = zip(ranked.values.tolist(), ranked.indices.tolist())
            result["labels"] = [_entry(names, c, p) for p, c in pairs if p > predictor.threshold]
        out.append(result)
    return out


def predict(inputs: list, weights: str, opts: PredictOptions = PredictOptions(), log=None,
            flag: str = "--weights") -> dict:
    """`weights`: a weights file, or a name of published weights (`flag` is the option that gave it, for
    messages). The result's "weights" is `weights` as given, "weights_file" the file read; "multi_label" and
    "threshold" say how the outputs were read (threshold None for single-label weights)."""
    log = log or (lambda *a: print(*a, file=sys.stderr))
    opts.check()
    dev = resolve_device(opts.device)
    paths, problems = collect_images(inputs)
    if not paths:
        where = "; ".join(f"{p}: {why}" for p, why in problems[:3])
        raise UserError(f"nothing to predict: {where}")
    local = weights_file(weights, flag, log)
    predictor = load_predictor(local, dev, opts, log)
    k = min(opts.topk, len(predictor.class_names))
    loader = DataLoader(_Images(paths, predictor.transform()), batch_size=opts.batch_size, num_workers=opts.workers,
                        collate_fn=_collate)
    progress = Progress(True, len(loader), "predict", print_freq=max(1, len(loader) // 10))
    results = [None] * len(paths)
    with torch.no_grad():
        for step, items in enumerate(loader, 1):
            good = [(i, t) for i, t, err in items if err is None]
            problems += [(paths[i], err) for i, _, err in items if err is not None]
            if good:
                batch = to_device(torch.stack([t for _, t in good]), dev, channels_last=False)
                for (i, _), result in zip(good, top_results(predictor, predictor.model(batch), k)):
                    results[i] = {"path": paths[i], **result}
            progress.update(step, images=min(step * opts.batch_size, len(paths)))
    progress.close()
    return {"weights": weights, "weights_file": local, "image_size": predictor.image_size, "crop_pct": predictor.crop_pct,
            "multi_label": predictor.multi_label, "threshold": predictor.threshold,
            "predictions": [r for r in results if r is not None],
            "errors": [{"path": p, "error": why} for p, why in problems]}


def text_line(result: dict, threshold: float | None) -> str:
    """One image's line of the text output: its top classes, or for multi-label weights (`threshold` not
    None) its labels above the threshold."""
    shown = result["top"] if threshold is None else result["labels"]
    if not shown:
        said = f"{threshold:.2f}" if round(threshold, 2) == threshold else f"{threshold:g}"  # 0.50, 0.995
        return f"{result['path']}: (no label above {said})"
    return f"{result['path']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.2f}%" for t in shown)


def run(args) -> int:
    opts = PredictOptions(args.topk, args.batch_size, args.workers, args.image_size, args.crop_pct, args.device,
                          weights_choice(args.raw_weights, args.ema_weights), getattr(args, "threshold", None))
    if (args.weights is None) == (args.pretrained is None):
        raise UserError("give the weights once: --weights PATH or --pretrained NAME|PATH (NAME: imagenet, keras, "
                        f"hf-hub:ORG/REPO[@REV]){', not both' if args.weights else ''}")
    flag, weights = ("--weights", args.weights) if args.weights is not None else ("--pretrained", args.pretrained)
    out = predict(args.inputs, weights, opts, flag=flag)
    try:
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            for r in out["predictions"]:
                print(text_line(r, out["threshold"] if out["multi_label"] else None))
        sys.stdout.flush()
    except BrokenPipeError:  # `xception predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for e in out["errors"]:
        print(f"xception predict: skipped {e['path']}: {e['error']}", file=sys.stderr)
    if out["errors"]:
        print(f"xception predict: {len(out['predictions'])} image(s) predicted, {len(out['errors'])} skipped",
              file=sys.stderr)
    return 0 if out["predictions"] else 1
