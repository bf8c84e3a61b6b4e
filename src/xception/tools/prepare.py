"""`xception prepare`: write an image folder as WebDataset tar shards (the format data/shards.py reads).

Images are re-encoded as JPEG (short side at most --max-size, EXIF orientation applied). Resumable: a shard
is recorded in index.json only once its tar file is complete (written under a temporary name, then
renamed), so an interrupted run rewrites just the shard it was writing.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..config import ShardSettings, UserError
from ..data.check import default_workers, reason
from ..data.folder import scan_dataset
from ..data.listfile import is_list_file, read_list_file
from ..data.shards import FORMAT, INDEX
from ..data.transforms import load_rgb
from ..files import WriteError, show, write_text


def plan(count: int, shard_size: int, min_shards: int) -> list:
    """Shard boundaries: as few shards as --shard-size allows but at least --min-shards, sizes differing
    by at most one (so that per-slot sample counts, and hence the dropped tail, stay small)."""
    shards = max(math.ceil(count / shard_size), min(min_shards, count), 1)
    base, extra = divmod(count, shards)
    bounds, start = [], 0
    for k in range(shards):
        end = start + base + (k < extra)
        bounds.append((start, end))
        start = end
    return bounds


def encode(path: str, max_size: int, quality: int) -> bytes:
    img = load_rgb(path)  # EXIF orientation applied, every mode made RGB
    short = min(img.size)
    if max_size and short > max_size:
        w, h = img.size
        img = img.resize((round(w * max_size / short), round(h * max_size / short)), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _encode_or_error(path: str, settings: ShardSettings) -> tuple:
    try:
        return encode(path, settings.max_size, settings.quality), None
    except Exception as e:  # any decoder failure makes the file unusable; say which
        return None, reason(path, e)


def _start_index(out: str, header: dict) -> dict:
    """The index to continue: the one in `out` when it was written with the same source and settings."""
    path = os.path.join(out, INDEX)
    if not os.path.exists(path):
        return dict(header, splits={}, complete=False)
    with open(path) as f:
        old = json.load(f)
    if {k: old.get(k) for k in header} != header:
        raise UserError(f"--out {out}: holds shards of another source or other settings; "
                        f"choose an empty --out, or delete its {INDEX}")
    return old


def _write_shard(path: str, items: list, encoded, n_classes: int, skip_bad: bool, progress, log) -> dict:
    """One tar file (under a temporary name, renamed when complete); returns its index record."""
    record = {"name": os.path.basename(path), "count": 0, "skipped": 0, "class_counts": [0] * n_classes}
    tmp = path + ".tmp"
    try:
        with wds.TarWriter(tmp, encoder=False, mtime=0) as sink:
            for (i, source, target), (data, error) in zip(items, encoded):
                progress.update(1)
                if error is not None:
                    if not skip_bad:
                        raise UserError(f"{show(source)}: {error}")
                    log(f"warning: skipping {show(source)}: {error.split(';')[0]}")
                    record["skipped"] += 1
                    continue
                sink.write({"__key__": f"{i:09d}", "jpg": data, "cls": str(target).encode()})
                record["count"] += 1
                record["class_counts"][target] += 1
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the finished shards and index.json stay; a rerun continues
        raise WriteError(path, e) from None
    return record


def _record(entry: dict, record: dict) -> None:
    entry["shards"] = sorted([s for s in entry["shards"] if s["name"] != record["name"]] + [record],
                             key=lambda s: s["name"])
    entry["count"] = sum(s["count"] for s in entry["shards"])
    entry["class_counts"] = [sum(c) for c in zip(*(s["class_counts"] for s in entry["shards"]))]


def prepare(data_path: str, out: str, settings: ShardSettings = ShardSettings(), workers: int | None = None,
            skip_bad: bool = False, log=print) -> dict:
    """Write (or finish writing) the shards of data_path into out; returns the index."""
    settings.check()
    train, val = read_list_file(data_path) if is_list_file(data_path) else scan_dataset(data_path)
    if val.multi_label:
        raise UserError(f"{data_path}: a multi-label list; shard sets hold one label per image, so train "
                        f"from the list file itself (--data_path {data_path})")
    os.makedirs(out, exist_ok=True)
    header = {"format": FORMAT, "classes": train.classes, **asdict(settings),
              "source": {name: len(s.samples) for name, s in (("train", train), ("val", val))}}
    index = _start_index(out, header)
    index_path = os.path.join(out, INDEX)
    done = sum(s["count"] + s.get("skipped", 0) for sp in index["splits"].values() for s in sp["shards"])
    progress = tqdm(total=len(train.samples) + len(val.samples), initial=done, desc="prepare", unit="img",
                    file=sys.stderr, disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for name, split in (("train", train), ("val", val)):
            entry = index["splits"].setdefault(name, {"count": 0, "class_counts": [0] * len(split.classes),
                                                      "shards": []})
            finished = {s["name"] for s in entry["shards"]}
            for k, (start, end) in enumerate(plan(len(split.samples), settings.shard_size, settings.min_shards)):
                shard = os.path.join(out, f"{name}-{k:06d}.tar")
                if os.path.basename(shard) in finished and os.path.exists(shard):
                    continue
                items = [(i, *split.samples[i]) for i in range(start, end)]
                encoded = pool.map(lambda it: _encode_or_error(it[1], settings), items)
                _record(entry, _write_shard(shard, items, encoded, len(split.classes), skip_bad, progress, log))
                write_text(index_path, json.dumps(index, indent=1))
    progress.close()
    index["complete"] = True
    write_text(index_path, json.dumps(index, indent=1))
    log(f"prepared {out}: " + ", ".join(f"{n} {index['splits'][n]['count']} images in "
                                        f"{len(index['splits'][n]['shards'])} shards" for n in ("train", "val"))
        + (f" (short side <= {settings.max_size} px" if settings.max_size else " (original size")
        + f", JPEG quality {settings.quality})")
    return index
