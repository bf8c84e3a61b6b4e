"""`xception predict IMAGE_OR_DIR... --weights W`: class names and probabilities for images.

The eval transform is the one the weights were trained with (the checkpoint's saved image_size and
crop_pct; an exported graph's metadata; 299 px / 0.8975 for foreign weights), with the EXIF orientation
honoured. Folders are searched recursively and batched. A file that cannot be read is reported and
skipped. Weights may be any format `create_model` reads, or an .onnx file from `xception export`.
"""

from __future__ import annotations

import json
import os
import sys

from .config import UserError

IMAGENET_CLASSES_FILE = "imagenet_classes.txt"


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--weights", required=True, metavar="PATH",
                   help="our checkpoint, a timm/Cadene .pth/.safetensors, a Keras .h5, or an exported .onnx")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("-b", "--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("-j", "--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="override the weights' input resolution")
    p.add_argument("--crop-pct", type=float, default=None, help="override the weights' eval crop fraction")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")


def imagenet_classes() -> list:
    """The 1000 ImageNet class names in the standard index order, shipped with the package."""
    from importlib import resources

    text = resources.files(__package__).joinpath(IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    names = [line for line in text.splitlines() if line]
    assert len(names) == 1000, f"{IMAGENET_CLASSES_FILE} holds {len(names)} names"
    return names


def class_names_for(saved, num_classes: int) -> list:
    if saved and len(saved) == num_classes:
        return [str(n) for n in saved]
    if num_classes == 1000:
        return imagenet_classes()
    return [f"class {i}" for i in range(num_classes)]


def collect_images(inputs: list) -> tuple:
    """(image paths in order, [(path, problem)]) from files and folders given on the command line."""
    from .data import IMG_EXTENSIONS

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
        from .data import load_rgb
        try:
            return i, self.transform(load_rgb(self.paths[i])), None
        except Exception as e:  # any decoder failure: PIL raises OSError, ValueError, SyntaxError, ...
            return i, None, (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _collate(items):
    return items


def load_predictor(weights: str, device, image_size=None, crop_pct=None, log=print) -> tuple:
    """(callable on normalised float batches -> logits, class names, image_size, crop_pct)."""
    from .weights import sniff

    if sniff(weights) == "onnx":
        from .export import OnnxModel

        model = OnnxModel(weights)
        size = image_size or model.image_size or 299
        if model.image_size and size != model.image_size:
            raise UserError(f"--image-size {size}: {weights} was exported for {model.image_size} px inputs")
        pct = crop_pct or model.meta.get("crop_pct") or 0.8975
        num = model.num_classes or model.session.get_outputs()[0].shape[-1]
        return model, class_names_for(model.meta.get("class_names"), int(num)), size, pct
    from .export import eval_settings
    from .weights import create_model

    model = create_model(weights=weights, log=log).eval().to(device)
    size, pct = eval_settings(model, image_size, crop_pct)
    names = class_names_for(model.weights_info.get("class_names"), model.num_classes)
    return model, names, size, pct


def predict(inputs: list, weights: str, topk: int = 5, batch_size: int = 16, workers: int = 0,
            image_size=None, crop_pct=None, device: str = "auto", log=None) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from .data import eval_transform, to_device
    from .distributed import resolve_device
    from .model import MIN_INPUT_SIZE
    from .report import Progress

    log = log or (lambda *a: print(*a, file=sys.stderr))
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if image_size is not None and image_size < MIN_INPUT_SIZE:
        raise UserError(f"--image-size must be at least {MIN_INPUT_SIZE}, got {image_size}")
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise UserError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    dev = resolve_device(device)
    paths, problems = collect_images(inputs)
    if not paths:
        where = "; ".join(f"{p}: {why}" for p, why in problems[:3])
        raise UserError(f"nothing to predict: {where}")
    model, names, size, pct = load_predictor(weights, dev, image_size, crop_pct, log)
    k = min(topk, len(names))
    loader = DataLoader(_Images(paths, eval_transform(size, pct)), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    progress = Progress(True, len(loader), "predict", print_freq=max(1, len(loader) // 10))
    results = [None] * len(paths)
    with torch.no_grad():
        for step, items in enumerate(loader, 1):
            good = [(i, t) for i, t, err in items if err is None]
            problems += [(paths[i], err) for i, _, err in items if err is not None]
            if good:
                batch = to_device(torch.stack([t for _, t in good]), dev, channels_last=False)
                probs = torch.softmax(model(batch).float(), dim=1).cpu()
                top = probs.topk(k, dim=1)
                for row, (i, _) in enumerate(good):
                    results[i] = {"path": paths[i], "top": [
                        {"class": names[c], "index": int(c), "probability": round(float(p), 6)}
                        for p, c in zip(top.values[row].tolist(), top.indices[row].tolist())]}
            progress.update(step, images=min(step * batch_size, len(paths)))
    progress.close()
    return {"weights": weights, "image_size": size, "crop_pct": pct,
            "predictions": [r for r in results if r is not None],
            "errors": [{"path": p, "error": why} for p, why in problems]}


def run(args) -> int:
    out = predict(args.inputs, args.weights, args.topk, args.batch_size, args.workers, args.image_size,
                  args.crop_pct, args.device)
    try:
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            for r in out["predictions"]:
                print(f"{r['path']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.2f}%"
                                                  for t in r["top"]))
        sys.stdout.flush()
    except BrokenPipeError:  # `xception predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    for e in out["errors"]:
        print(f"xception predict: skipped {e['path']}: {e['error']}", file=sys.stderr)
    if out["errors"]:
        print(f"xception predict: {len(out['predictions'])} image(s) predicted, {len(out['errors'])} skipped",
              file=sys.stderr)
    return 0 if out["predictions"] else 1
