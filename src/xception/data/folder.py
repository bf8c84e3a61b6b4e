"""The seed's data layout, DATA/train/<class>/<image> and DATA/val/<class>/<image>: listing it and
refusing what cannot be trained on (a missing split, an empty class, train and val with other classes)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..config import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Split:
    root: str
    classes: list
    samples: list  # (path, class index), or with multi_label (path, tuple of class indices)
    groups: Optional[list] = None  # list files: each sample's group (video, patient ...), aligned with samples
    multi_label: bool = False  # several labels per image (a list file's `a;b` cells)


def scan_split(root: str) -> Split:
    """List `root/<class>/<image>`; refuse a missing split, an empty class or a split without images."""
    if not os.path.isdir(root):
        raise UserError(f"{root}: no such folder; the data path must hold train/ and val/, "
                        f"each with one sub-folder per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"{root}: no class folders; put each class's images in {root}/<class>/")
    samples, empty = [], []
    for index, name in enumerate(classes):
        files = []
        for folder, _, names in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
        if not files:
            empty.append(name)
        samples += [(path, index) for path in files]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserError(f"{root}: class folder(s) without images: {shown}; add images or remove them")
    return Split(root, classes, samples)


def scan_dataset(data_path: str, need_train: bool = True) -> tuple:
    """The seed's layout, DATA/train/<class>/ and DATA/val/<class>/, with identical class lists."""
    if not os.path.exists(data_path):
        raise UserError(f"--data_path {data_path}: no such folder")
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path}: is a file; give the folder that holds train/ and val/")
    missing = [s for s in (("train", "val") if need_train else ("val",))
               if not os.path.isdir(os.path.join(data_path, s))]
    if missing:
        raise UserError(f"--data_path {data_path}: no {' or '.join(s + '/' for s in missing)} folder; "
                        f"expected {data_path}/train/<class>/<image> and {data_path}/val/<class>/<image>")
    val = scan_split(os.path.join(data_path, "val"))
    if not need_train:
        return None, val
    train = scan_split(os.path.join(data_path, "train"))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise UserError(f"--data_path {data_path}: train/ and val/ must hold the same classes; "
                        f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}")
    if len(train.classes) < 2:
        raise UserError(f"--data_path {data_path}: only one class ({train.classes[0]}); a classifier needs at "
                        f"least two class folders in train/ and val/")
    return train, val
