"""List files: a dataset named image by image in a file instead of laid out in class folders.

    CSV      --data_path LIST.csv, a header and one row per image: path, label, split (train, val or test),
             optionally group (the video, patient ... an image comes from); other columns are ignored.
    text     --train-list FILE --val-list FILE, one `path label` a line (blank lines and # comments skipped).

Relative paths are relative to the list's own folder; with text lists and --data_path, to --data_path.
Classes are the sorted distinct train labels, or the order of --classes FILE (one name a line).

Several labels per image: a label cell `cat;dog` (names separated by `;`; an empty cell is an image with no
label) makes the list multi-label, as --multi-label does for a list whose cells hold one name each. Its
samples' targets are then tuples of class indices (the loader makes them multi-hot rows). The reader
returns the same `Split`s as the folder layout, so every folder pipeline (decode check and its cache,
--skip-bad-images, --loader tv|pil, the resumable sampler, the sharded evaluation) works unchanged. A
mistake in a list is one line naming the file and the row (the header is row 1, as in a spreadsheet).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Optional

from ..config import UserError, check_file
from ..files import show
from .folder import Split

SPLITS = ("train", "val", "test", "calib")  # calib: held out for fitting a temperature
REQUIRED = ("path", "label", "split")
MULTI_LABEL = ";"


@dataclass
class Row:
    file: str  # the list file it was read from
    number: int  # its row (CSV, header = 1) or line (text list) in that file
    path: str  # absolute
    label: str
    split: str
    group: Optional[str] = None
    names: tuple = ()  # the class names of its label cell (make_splits fills it)


def is_list_file(path: str) -> bool:
    return bool(path) and path.lower().endswith(".csv")


def _error(file: str, number: int, text: str) -> UserError:
    return UserError(f"{show(file)} row {number}: {text}")


def _check_label(file: str, number: int, label: str) -> str:
    """The cell as written (stripped); whether it may be empty or hold several names is decided once the
    whole list is read (make_splits), since one `a;b` cell anywhere makes the list multi-label."""
    return label.strip()


def _names(label: str) -> tuple:
    """The class names of a multi-label cell, sorted, each once ('b;a;;b' -> ('a', 'b'))."""
    return tuple(sorted({part.strip() for part in label.split(MULTI_LABEL) if part.strip()}))


def label_names(rows: list, multi: bool) -> list:
    """Each row's class names (a tuple): a multi-label cell's names, or the cell itself in a single-label
    list, where an empty one is refused."""
    if multi:
        return [_names(r.label) for r in rows]
    for r in rows:
        if not r.label:
            raise _error(r.file, r.number, "empty label; every image needs its class name (an image without "
                                           "labels belongs in a multi-label list: one with a `cat;dog` cell, "
                                           "or read with --multi-label)")
    return [(r.label,) for r in rows]


def _open_text(path: str, flag: str):
    check_file(path, flag, "a list file")
    return open(path, newline="", encoding="utf-8-sig")  # utf-8-sig: a spreadsheet's byte-order mark is dropped


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _csv_row(file: str, number: int, cells: dict, base: str, has_group: bool) -> Row:
    path, split = cells.get("path", "").strip(), cells.get("split", "").strip().lower()
    if not path:
        raise _error(file, number, "empty path")
    label = _check_label(file, number, cells.get("label", ""))
    if not split:
        raise _error(file, number, "no split; every row needs train, val or test in the split column")
    if split not in SPLITS:
        raise _error(file, number, f"unknown split {cells['split'].strip()!r}; use train, val or test")
    group = cells.get("group", "").strip() if has_group else None
    return Row(file, number, _resolve(base, path), label, split, group)


def read_csv(file: str) -> tuple:
    """(rows, has_group) of a CSV list file; refuses a missing column or a bad cell, naming the row."""
    base = os.path.dirname(os.path.abspath(file))
    rows = []
    try:
        with _open_text(file, "--data_path") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise UserError(f"{show(file)} row 1: no {', '.join(repr(c) for c in missing)} column in the "
                                f"header; a list file needs the columns path, label, split (and optionally group)")
            has_group = "group" in header
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                rows.append(_csv_row(file, reader.line_num, dict(zip(header, cells)), base, has_group))
    except UnicodeDecodeError:
        raise UserError(f"{show(file)}: not UTF-8 text; save the list as UTF-8 CSV")
    except csv.Error as e:
        raise UserError(f"{show(file)}: not a readable CSV file ({e})")
    return rows, has_group


def read_text_list(file: str, split: str, flag: str, root: str | None = None) -> list:
    """Rows of a `path label` list (whitespace between; the last field is the label, so a path may hold
    spaces); relative paths are relative to `root`, else to the list's folder."""
    base = root or os.path.dirname(os.path.abspath(file))
    rows = []
    try:
        with _open_text(file, flag) as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                fields = text.rsplit(None, 1)
                if len(fields) < 2:
                    raise _error(file, number, f"expected 'path label', got {text[:80]!r}")
                label = _check_label(file, number, fields[1])
                rows.append(Row(file, number, _resolve(base, fields[0]), label, split))
    except UnicodeDecodeError:
        raise UserError(f"{flag} {show(file)}: not UTF-8 text")
    return rows


def read_classes(file: str) -> list:
    """--classes FILE: one class name a line, in the order of the model's outputs."""
    with _open_text(file, "--classes") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise UserError(f"--classes {show(file)}: no class names; give one name a line")
    seen = set()
    for name in names:
        if name in seen:
            raise UserError(f"--classes {show(file)}: class {name!r} is listed twice")
        seen.add(name)
    return names


def check_images(rows: list) -> None:
    missing = [r for r in rows if not os.path.isfile(r.path)]
    if missing:
        first = missing[0]
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise _error(first.file, first.number, f"no such image file {show(first.path)}{more}")


def make_splits(rows: list, source: str, classes: list | None, need_train: bool, has_group: bool,
                multi: bool = False, held: str = "val") -> tuple:
    """(train, evaluated) Splits of the rows (train None when not needed); the evaluated one is the rows of
    split `held` (val; an evaluation may ask for test or calib). Checks labels, classes and files.
    Multi-label when `multi` or when any label cell holds a ';'."""
    multi = multi or any(MULTI_LABEL in r.label for r in rows)
    train = [r for r in rows if r.split == "train"]
    val = [r for r in rows if r.split == held]
    if need_train and not train:
        raise UserError(f"{show(source)}: no training images (no row with split train)")
    if not val:
        raise UserError(f"{show(source)}: no {'validation' if held == 'val' else held} images (no row with "
                        f"split {held})")
    for r, names in zip(train + val, label_names(train + val, multi)):
        r.names = names
    if classes is not None:
        known = set(classes)
        for r in train + val:
            unknown = [n for n in r.names if n not in known]
            if unknown:
                raise _error(r.file, r.number, f"label {unknown[0]!r} is not in --classes")
    else:
        classes = sorted({n for r in (train or val) for n in r.names})
    if train:
        taught = {n for r in train for n in r.names}
        for r in val:
            unseen = [n for n in r.names if n not in taught]
            if unseen:
                raise _error(r.file, r.number, f"class {unseen[0]!r} is only in val (no train row has it); "
                                               f"add training images of it or remove the row")
    if need_train and len(classes) < (1 if multi else 2):
        raise UserError(f"{show(source)}: only one class ({classes[0]}); a classifier needs at least two"
                        if classes else f"{show(source)}: no image has a label")
    check_images((train if need_train else []) + val)
    index = {name: i for i, name in enumerate(classes)}

    def target(r: Row):
        found = tuple(index[n] for n in r.names)
        return found if multi else found[0]

    def split_of(part: list) -> Split:
        return Split(source, list(classes), [(r.path, target(r)) for r in part],
                     [r.group for r in part] if has_group else None, multi_label=multi)

    return (split_of(train) if need_train else None), split_of(val)


def read_list_file(file: str, need_train: bool = True, classes_file: str | None = None, multi: bool = False,
                   held: str = "val") -> tuple:
    """(train, val) Splits of a CSV list file (train None when not needed; `held`: the split evaluated)."""
    rows, has_group = read_csv(file)
    classes = read_classes(classes_file) if classes_file else None
    return make_splits(rows, file, classes, need_train, has_group, multi, held)


def read_list_splits(cfg, need_train: bool):
    """The run's (train, val) Splits when its data is a list (a CSV --data_path, or --train-list/--val-list),
    else None (an image folder or shard set: the caller's business)."""
    text = bool(cfg.train_list or cfg.val_list)
    if cfg.eval_split != "val" and not is_list_file(cfg.data_path):
        raise UserError(f"--split {cfg.eval_split} reads the rows of that split of a CSV list file; an image "
                        f"folder, a text list, a shard set or a dataset is evaluated on its val split")
    if not text and not is_list_file(cfg.data_path):
        if cfg.multi_label:
            raise UserError(f"--data_path {cfg.data_path}: several labels per image (--multi-label, or weights "
                            f"trained multi-label) are read from a list file (a CSV --data_path, or --train-list "
                            f"and --val-list) whose label cells name several classes, like cat;dog")
        if cfg.classes_file:
            raise UserError("--classes orders the classes of a list file (a CSV --data_path, or --train-list "
                            "and --val-list); an image folder's classes are its sub-folders, a shard set's "
                            "and a dataset's their own")
        if not cfg.data_path:
            raise UserError("--data_path is required (an image folder, a shard set or a CSV list file), "
                            "or give --train-list and --val-list")
        return None
    if cfg.loader == "dali":
        raise UserError("--loader dali reads image folders; for a list file use --loader tv or pil")
    if not text:
        return read_list_file(cfg.data_path, need_train, cfg.classes_file, cfg.multi_label, cfg.eval_split)
    if is_list_file(cfg.data_path):
        raise UserError("--data_path is a CSV list file: give it or --train-list/--val-list, not both")
    if not cfg.val_list or (need_train and not cfg.train_list):
        raise UserError("--train-list and --val-list go together: give both (xception eval: --val-list)")
    root = cfg.data_path or None
    if root and not os.path.isdir(root):
        raise UserError(f"--data_path {show(root)}: no such folder (with --train-list/--val-list it is the "
                        f"folder the lists' relative paths start from)")
    rows = read_text_list(cfg.val_list, "val", "--val-list", root)
    if cfg.train_list:
        rows = read_text_list(cfg.train_list, "train", "--train-list", root) + rows
    classes = read_classes(cfg.classes_file) if cfg.classes_file else None
    return make_splits(rows, cfg.train_list or cfg.val_list, classes, need_train, False, cfg.multi_label)
