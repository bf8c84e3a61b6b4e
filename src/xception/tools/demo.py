"""`xception demo`: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download), written
as an image-folder tree and trained through the same loader and training code as any dataset."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

from ..config import MIN_INPUT_SIZE, Config, UserError
from ..files import make_folder
from ..engine import train

# Digits are not ImageNet photos: a mirrored 2 is not a 2, and an 8% crop of an 8x8 scan is noise.
# So no flips and crops of at least half the image; 71 px is the model's minimum input.
DEMO_SETTINGS = dict(image_size=MIN_INPUT_SIZE, crop_pct=1.0, crop_scale=(0.5, 1.0), hflip=False, epochs=4, batch_size=32,
                     lr=0.02, momentum=0.9, weight_decay=5e-5, warmup_epochs=1, label_smoothing=0.1,
                     workers=1, seed=0, print_freq=10)


def write_digits(root: str, val_fraction: float = 0.2, seed: int = 0) -> tuple:
    """Write root/{train,val}/<digit>/<n>.png (80/20 split, stratified, fixed seed). Reuses a finished tree."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)  # 0..16 grey levels -> 0..255
    train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=val_fraction,
                                          stratify=digits.target, random_state=seed)
    parent = os.path.dirname(os.path.abspath(root))
    if os.path.exists(os.path.join(root, ".complete")):
        return len(train_idx), len(val_idx)
    if os.path.exists(root):
        # Ours would hold .complete (the tree is renamed into place whole), so this is somebody's data.
        raise UserError(f"{root}: exists and is not a digits tree written by the demo; "
                        f"choose another --output-dir or move it away")
    make_folder(parent, "--output-dir")
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=parent)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in indices:
            folder = os.path.join(tmp, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(os.path.join(folder, f"{i:04d}.png"))
    open(os.path.join(tmp, ".complete"), "w").close()
    os.replace(tmp, root)
    return len(train_idx), len(val_idx)


def run_demo(output_dir: str, epochs: int | None = None, device: str = "auto", workers: int | None = None) -> dict:
    data = os.path.join(output_dir, "digits")
    n_train, n_val = write_digits(data)
    settings = dict(DEMO_SETTINGS)
    if epochs is not None:
        settings["epochs"] = epochs
    if workers is not None:
        settings["workers"] = workers
    print(f"demo: scikit-learn digits, {n_train} train / {n_val} val PNGs in {data}")
    print("demo settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    result = train(Config(data_path=data, output_dir=output_dir, device=device, **settings))
    print(f"demo: val top-1 {result['top1']:.2f}%")
    print(f"demo: checkpoint {result['checkpoint']}")
    print(f"demo: metrics    {result['metrics']}")
    print(f"demo: data       {data}")
    return result
