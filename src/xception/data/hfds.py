"""Hugging Face `datasets` as --data_path: a DatasetDict written by `save_to_disk`, a folder of Parquet files
laid out as on the Hub (train-*.parquet, validation-*.parquet, also under data/), or `hf:ORG/NAME[@REV]`
loaded through `datasets.load_dataset` (its cache; HF_HUB_OFFLINE respected).

Each split becomes an `HfSplit`, which looks like folder.Split to the rest of the pipeline (root, classes,
samples of (row, class index)), and an `HfDataset`, the image-folder dataset reading a row's encoded bytes
instead of a file: the bytes go through the transform's `load_bytes`, so a JPEG takes the fast decoder, and
FolderLoader (samplers, workers, --skip-bad-images) wraps it unchanged. Classes come from the label column:
a ClassLabel's names in order, a string column's sorted distinct values, an integer column's "0".."N-1".
The decode check before the first epoch reads every row's bytes (`screen_rows`); a split that passed is
remembered by its `datasets` fingerprint in the output folder.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as td
from PIL import Image, UnidentifiedImageError

from ..config import UserError, import_extra
from ..files import WriteError, atomic_write, show
from .check import SKIP_HINT, BadImageError, default_workers
from .loaders import FolderDataset, FolderLoader
from .transforms import build_transform

PREFIX = "hf:"
VAL_SPLITS = ("val", "validation", "test")  # the evaluation split, in order of preference
SPLIT_NAMES = ("train",) + VAL_SPLITS
CHECKED_NAME = "hf-image-check.json"  # in the output folder: fingerprints of the splits that decoded cleanly


def _datasets():
    datasets = import_extra("datasets", "reading a Hugging Face dataset", "hf")
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # a log file or a captured stderr: no progress bars
    return datasets


def _is_saved(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("dataset_dict.json", "state.json"))


def parquet_files(path: str) -> list:
    """The .parquet files of the Hub's layouts under `path`, as sorted paths relative to it: in path itself,
    data/, SPLIT/ or X/SPLIT/ (never a walk of the whole tree: an image folder may hold millions of files)."""
    subdirs = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    places = ["", "data"] + list(SPLIT_NAMES) + [os.path.join(d, s) for d in subdirs for s in SPLIT_NAMES]
    found = set()
    for place in places:
        folder = os.path.join(path, place)
        if os.path.isdir(folder):
            found.update(os.path.join(place, e.name) for e in os.scandir(folder)
                         if e.name.endswith(".parquet") and e.is_file())
    return sorted(found)


def is_hf_source(path: str) -> bool:
    """hf:NAME, a saved dataset folder, a folder holding Parquet files, or one Parquet file."""
    if path.startswith(PREFIX):
        return True
    if os.path.isfile(path):
        return path.endswith(".parquet")
    return os.path.isdir(path) and (_is_saved(path) or bool(parquet_files(path)))


def split_of(relpath: str):
    """The split a Parquet file belongs to, from its folders or its name's first word, as the Hub lays them
    out (data/train-00000-of-00004.parquet, validation-0.parquet, default/test/0000.parquet), or None."""
    *folders, name = relpath.split(os.sep)
    for word in folders + [re.split(r"[-_.]", name, maxsplit=1)[0]]:
        if word.lower() in SPLIT_NAMES:
            return word.lower()
    return None


def hub_name(path: str) -> tuple:
    """hf:ORG/NAME[@REVISION] -> (ORG/NAME, REVISION or None)."""
    name, at, revision = path[len(PREFIX):].partition("@")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or (at and not revision):
        raise UserError(f"--data_path {path}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION (a dataset on the "
                        f"Hugging Face Hub)")
    return name, revision or None


def _load_hub(path: str) -> dict:
    datasets = _datasets()
    name, revision = hub_name(path)
    try:
        return dict(datasets.load_dataset(name, revision=revision))
    except Exception as e:  # offline without a cache, unknown name, no access: all the user's to mend
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = ("; HF_HUB_OFFLINE is set and it is not in the cache: load it once online" if offline
                else "; check the name and your network (or HF_ENDPOINT, HF_TOKEN)")
        raise UserError(f"--data_path {path}: cannot load {name} ({_first_line(e)}){hint}")


def load_splits(path: str) -> dict:
    """{split name: datasets.Dataset} of any of the three forms."""
    if path.startswith(PREFIX):
        return _load_hub(path)
    datasets = _datasets()
    if os.path.isfile(path):
        raise UserError(f"--data_path {path}: one Parquet file has no splits; give the folder holding "
                        f"train-*.parquet and validation-*.parquet")
    if _is_saved(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:  # a damaged or foreign folder
            raise UserError(f"--data_path {path}: cannot read the saved dataset ({_first_line(e)})")
        if not isinstance(loaded, datasets.DatasetDict):
            raise UserError(f"--data_path {path}: a saved single split; save a DatasetDict with train and "
                            f"validation splits (DatasetDict(train=..., validation=...).save_to_disk)")
        return dict(loaded)
    files = {}
    for rel in parquet_files(path):
        if split_of(rel):
            files.setdefault(split_of(rel), []).append(os.path.join(path, rel))
    if not files:
        raise UserError(f"--data_path {path}: no Parquet file named for a split; name them train-*.parquet "
                        f"and validation-*.parquet (or put them in train/ and validation/)")
    try:
        return dict(datasets.load_dataset("parquet", data_files=files))
    except Exception as e:  # unreadable files, splits with other columns
        raise UserError(f"--data_path {path}: cannot read its Parquet files ({_first_line(e)})")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def pick_splits(splits: dict, path: str, need_train: bool, log=print) -> tuple:
    """(train name or None, val name): val, else validation, else test (said in a line)."""
    have = ", ".join(sorted(splits)) or "none"
    if need_train and "train" not in splits:
        raise UserError(f"--data_path {path}: no train split (it has: {have})")
    val = next((s for s in VAL_SPLITS if s in splits), None)
    if val is None:
        raise UserError(f"--data_path {path}: no val, validation or test split to evaluate on (it has: {have})")
    if val != "val":
        log(f"data: {show(path)} has no val split; evaluating on its {val} split")
    return ("train" if need_train else None), val


def _image_column(ds, column: str, path: str, split: str):
    """The split with `column` giving encoded bytes: an Image feature is read undecoded."""
    datasets = _datasets()
    if column not in ds.column_names:
        raise UserError(f"--data_path {path}: {split} split has no column {column!r} (--image-column); its "
                        f"columns: {', '.join(ds.column_names)}")
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, dict) and "bytes" in feature or getattr(feature, "dtype", "") in ("binary", "large_binary"):
        return ds
    raise UserError(f"--data_path {path}: column {column!r} holds {feature}, not images; name the image "
                    f"column with --image-column")


def _labels(ds, column: str, path: str, split: str) -> tuple:
    """(the label column's feature, its values as a list)."""
    if column not in ds.column_names:
        raise UserError(f"--data_path {path}: {split} split has no column {column!r} (--label-column); its "
                        f"columns: {', '.join(ds.column_names)}")
    return ds.features[column], ds.with_format("arrow")[column].to_pylist()


def class_names(feature, values: dict, path: str, column: str) -> tuple:
    """(class names, {split: int64 targets}) from the label column of every split: a ClassLabel's names, a
    string column's sorted distinct values, an integer column's "0".."N-1"."""
    names = getattr(feature, "names", None)
    every = [v for vs in values.values() for v in vs]
    if any(v is None for v in every):
        raise UserError(f"--data_path {path}: column {column!r} has samples without a label; remove them")
    if names is None and all(isinstance(v, str) for v in every):
        names = sorted(set(every))
        index = {n: i for i, n in enumerate(names)}
        return names, {s: np.array([index[v] for v in vs], dtype=np.int64) for s, vs in values.items()}
    if any(isinstance(v, (list, tuple)) for v in every):
        raise UserError(f"--data_path {path}: column {column!r} holds several labels per row; multi-label "
                        f"training reads list files (a CSV with `a;b` label cells), not datasets yet")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in every):
        raise UserError(f"--data_path {path}: column {column!r} holds {feature}; labels must be a ClassLabel, "
                        f"strings or integers (name the label column with --label-column)")
    targets = {s: np.asarray(vs, dtype=np.int64) for s, vs in values.items()}
    if names is None:
        names = [str(i) for i in range(max(every, default=-1) + 1)]
    for split, t in targets.items():
        bad = t[(t < 0) | (t >= len(names))]
        if len(bad):
            raise UserError(f"--data_path {path}: {split} split: label {bad[0]} is not one of the {len(names)} "
                            f"classes 0..{len(names) - 1}" + (" (-1: an unlabelled sample)" if bad[0] == -1 else ""))
    return list(names), targets


def check_classes(path: str, names: list, targets: dict) -> None:
    """The folder layout's rules: train and val hold the same classes, none empty, at least two."""
    present = {s: {names[i] for i in np.unique(t)} for s, t in targets.items()}
    if len(present) == 2:
        (train, in_train), (val, in_val) = present.items()
        if in_train != in_val:
            raise UserError(f"--data_path {path}: the {train} and {val} splits must hold the same classes; "
                            f"only in {train}: {sorted(in_train - in_val) or 'none'}; only in {val}: "
                            f"{sorted(in_val - in_train) or 'none'}")
    for split, have in present.items():
        empty = [n for n in names if n not in have]
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise UserError(f"--data_path {path}: {split} split has no samples of class(es) {shown}")
    if len(names) < 2:
        raise UserError(f"--data_path {path}: only one class ({names[0] if names else 'none'}); a classifier "
                        f"needs at least two")


class Samples:
    """(row, class index) of the rows used, as Split.samples, from int64 arrays (`rows` None: every row)."""

    def __init__(self, targets: np.ndarray, rows: np.ndarray | None = None):
        self.targets, self.rows = targets, rows

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple:
        return (index if self.rows is None else int(self.rows[index])), int(self.targets[index])

    def __iter__(self):
        rows = range(len(self.targets)) if self.rows is None else self.rows.tolist()
        return zip(rows, self.targets.tolist())

    def without(self, bad_rows: set) -> "Samples":
        rows = np.arange(len(self.targets)) if self.rows is None else self.rows
        keep = ~np.isin(rows, np.fromiter(bad_rows, dtype=np.int64, count=len(bad_rows)))
        return Samples(self.targets[keep], rows[keep])


class HfSplit:
    """A split of a Hugging Face dataset in folder.Split's shape; `read(row)` gives the row's encoded image."""
    multi_label = False  # one label per row (a Sequence of ClassLabel is refused when the labels are read)
    groups = None  # no group column

    def __init__(self, path: str, part: str, classes: list, ds, column: str, targets: np.ndarray):
        self.root, self.part, self.classes, self.column = f"{show(path)} [{part}]", part, classes, column
        self.images = ds.select_columns([column])  # rows read only this column (Arrow, memory-mapped)
        self.samples = Samples(targets)
        self.fingerprint = getattr(ds, "_fingerprint", None)  # datasets' hash of the data and its history

    def cell(self, row: int):
        return self.images[int(row)][self.column]

    def read(self, row: int) -> bytes:
        value = self.cell(row)
        if isinstance(value, dict):  # an Image feature: the bytes, or (a dataset of local files) the path
            if value.get("bytes") is not None:
                return value["bytes"]
            if not value.get("path"):
                raise ValueError("neither image bytes nor a file path")
            with open(value["path"], "rb") as f:
                return f.read()
        if value is None:
            raise ValueError("no image")
        return value

    def name(self, row: int) -> str:
        try:
            value = self.cell(row)
        except Exception:  # naming must not fail
            value = None
        path = value.get("path") if isinstance(value, dict) else None
        return f"{self.root} row {row}" + (f" ({show(path)})" if path else "")


def check_bytes(data) -> str | None:
    """None if `data` decodes as an image, else why not (check.check_image for bytes)."""
    if not data:
        return f"no image bytes; {SKIP_HINT}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
    except UnidentifiedImageError:
        return f"not an image format Pillow can read; {SKIP_HINT}"
    except Exception as e:  # any decoder failure makes the sample unusable; say which
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = "truncated" if "truncated" in text.lower() else "corrupt"
        return f"{kind} image ({type(e).__name__}: {text[:160]}); {SKIP_HINT}"
    return None


class HfDataset(FolderDataset):
    """FolderDataset over an HfSplit: a sample's key is its row, its image the row's bytes."""

    def load(self, row) -> torch.Tensor:
        return self.transform.load_bytes(self.split.read(row))

    def failed(self, row, exc: Exception) -> None:
        try:
            why = check_bytes(self.split.read(row))
        except Exception as e:  # the row itself cannot be read
            why = f"unreadable ({type(e).__name__}: {e}); {SKIP_HINT}"
        if not self.skip_bad:
            if why is None:
                raise exc  # it decodes after all: a bug of ours, with its traceback
            raise BadImageError(f"{self.name(row)}: {why}") from None
        print(f"warning: skipping {self.name(row)}: {(why or str(exc)).split(';')[0]}", file=sys.stderr, flush=True)

    def name(self, row) -> str:
        return self.split.name(row)


def hf_splits(cfg, need_train: bool, log=print) -> tuple:
    """(train HfSplit or None, val HfSplit) of cfg.data_path."""
    path = cfg.data_path
    splits = load_splits(path)
    train_name, val_name = pick_splits(splits, path, need_train, log)
    chosen = [s for s in (train_name, val_name) if s is not None]
    data = {s: _image_column(splits[s], cfg.image_column, path, s) for s in chosen}
    labels = {s: _labels(splits[s], cfg.label_column, path, s) for s in chosen}
    kinds = {s: getattr(f, "names", None) for s, (f, _) in labels.items()}
    if len(set(map(str, kinds.values()))) > 1:
        raise UserError(f"--data_path {path}: the splits' {cfg.label_column!r} columns name other classes: "
                        + "; ".join(f"{s}: {n}" for s, n in kinds.items()))
    names, targets = class_names(labels[val_name][0], {s: v for s, (_, v) in labels.items()}, path,
                                 cfg.label_column)
    check_classes(path, names, targets)
    made = {s: HfSplit(path, s, names, data[s], cfg.image_column, targets[s]) for s in chosen}
    return (made[train_name] if train_name else None), made[val_name]


def _row_reason(split: HfSplit, row: int):
    try:
        return check_bytes(split.read(row))
    except Exception as e:  # the row itself cannot be read
        return f"unreadable ({_first_line(e)}); {SKIP_HINT}"


def find_bad_rows(split: HfSplit, ctx, workers: int) -> list:
    """Decode-check every row (each rank a share, threads: Pillow decodes without the GIL): [(row, why)]."""
    mine = [row for row, _ in split.samples][ctx.rank::ctx.world_size]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = [(r, w) for r, w in zip(mine, pool.map(lambda r: _row_reason(split, r), mine, chunksize=64)) if w]
    if ctx.world_size > 1:
        parts = [None] * ctx.world_size
        td.all_gather_object(parts, found)
        found = [b for part in parts for b in part]
    return sorted(found)


def _memo(cfg):
    """(file remembering the fingerprints of splits found good, their list): in the output folder."""
    path = os.path.join(cfg.output_dir, CHECKED_NAME) if cfg.output_dir else None
    try:
        with open(path) as f:
            return path, list(json.load(f))
    except (TypeError, OSError, ValueError):
        return path, []


def screen_rows(splits: list, cfg, ctx, log=print) -> int:
    """The decode check of the folder layout (data/check.py), over the rows' bytes: refuse the first bad
    image or, with --skip-bad-images, log and leave out every bad one. A split whose fingerprint passed
    before (in OUTPUT/hf-image-check.json) is not checked again. Returns the count left out."""
    path, known = _memo(cfg)
    workers = max(1, (cfg.workers or default_workers()) // max(1, ctx.local_world_size))
    skipped, good = 0, []
    for split in (s for s in splits if s is not None):
        key = f"{split.fingerprint}:{len(split.samples)}" if split.fingerprint else None
        if key is not None and key in known:
            continue
        bad = find_bad_rows(split, ctx, workers)
        log(f"check-data: {split.root}: {len(split.samples)} images decode-checked, {len(bad)} bad")
        if bad and not cfg.skip_bad_images:
            more = f" ({len(bad) - 1} more bad image(s) in the split)" if len(bad) > 1 else ""
            raise UserError(f"{split.name(bad[0][0])}: {bad[0][1]}{more}")
        for row, why in bad:
            log(f"warning: skipping {split.name(row)}: {why.split(';')[0]}")
        split.samples = split.samples.without({row for row, _ in bad})
        check_classes(cfg.data_path, split.classes, {split.part: split.samples.targets})
        skipped += len(bad)
        good += [key] if key is not None and not bad else []
    if good and path and ctx.is_main:
        try:
            atomic_write(path, lambda f: f.write(json.dumps(known + good).encode()))
        except WriteError as e:  # only a memo: the next run checks again
            log(f"warning: {e}; the next run will check every image again")
    return skipped


def hf_loaders(cfg, ctx, need_train: bool, generator: torch.Generator, log=print) -> tuple:
    """(classes, train FolderLoader or None, val FolderLoader, images skipped) over a Hugging Face dataset."""
    train_split, val_split = hf_splits(cfg, need_train, log)
    skipped = screen_rows([train_split, val_split], cfg, ctx, log) if cfg.check_data else 0

    def loader(split, train: bool, gen: torch.Generator) -> FolderLoader:
        dataset = HfDataset(split, build_transform(cfg, train), cfg.skip_bad_images)
        return FolderLoader(dataset, cfg, ctx, train, gen)

    train = loader(train_split, True, generator) if need_train else None
    return val_split.classes, train, loader(val_split, False, torch.Generator()), skipped
