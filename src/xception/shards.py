"""WebDataset tar shards: `xception prepare` writes them from an image folder, and the loaders read them,
from a local folder or from a URL (anything webdataset's gopen opens: http(s)://, file://, pipe:...).

Layout of OUT: train-000000.tar ..., val-000000.tar ..., and index.json (classes, settings, and per split
and per shard the sample and class counts). Each sample is KEY.jpg (re-encoded, short side at most
--max-size) and KEY.cls (class index as text); KEY is the sample's position in the sorted source listing.

Splitting: shards are whole units of work. Every epoch the shard list is permuted (the same permutation on
every rank, from the seed and the epoch) and dealt to the job's rank x worker slots, so no sample can be
read twice in an epoch. Training gives every slot the same number of full batches, computed from the
index (no communication), so every rank runs the same number of steps and DDP never waits on a rank that
ran out: the samples past that count (the tail) are dropped for the epoch. Validation deals the shards the
same way, unshuffled and with no drop: every sample exactly once across the job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

from .config import UserError

INDEX = "index.json"
FORMAT = "xception-shards-1"
DEFAULT_MAX_SIZE = 384
DEFAULT_QUALITY = 90  # Pillow, 4:2:0 chroma: visually lossless for training, ~40 KB at 384 px
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MIN_SHARDS = 64  # enough for 8 ranks x 8 workers without idle slots
SHUFFLE_BUFFER = 1000  # samples (encoded JPEGs, ~40 MB) held per worker for the in-shard shuffle


# writing


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_path", "--data-path", dest="data_path", required=True, metavar="DIR",
                   help="image folder with train/<class>/<image> and val/<class>/<image>")
    p.add_argument("--out", required=True, metavar="SHARDS_DIR", help="where the shards and index.json go")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                   help=f"re-encode with the short side at most this many pixels (default {DEFAULT_MAX_SIZE}; "
                        f"0 keeps the size)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help=f"JPEG quality (default {DEFAULT_QUALITY})")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help=f"samples per shard at most (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--min-shards", type=int, default=DEFAULT_MIN_SHARDS,
                   help=f"at least this many shards per split (default {DEFAULT_MIN_SHARDS}), so that every "
                        f"rank x worker slot gets one")
    p.add_argument("-j", "--workers", type=int, default=None, help="encoding threads (default: the CPUs)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out images that fail to decode")


def run(args) -> int:
    prepare(args.data_path, args.out, max_size=args.max_size, quality=args.quality,
            shard_size=args.shard_size, min_shards=args.min_shards, workers=args.workers,
            skip_bad=args.skip_bad_images)
    return 0


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
    import io

    from PIL import Image

    from .data import load_rgb
    img = load_rgb(path)  # EXIF orientation applied, every mode made RGB
    short = min(img.size)
    if max_size and short > max_size:
        w, h = img.size
        img = img.resize((round(w * max_size / short), round(h * max_size / short)), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(data_path: str, out: str, max_size: int = DEFAULT_MAX_SIZE, quality: int = DEFAULT_QUALITY,
            shard_size: int = DEFAULT_SHARD_SIZE, min_shards: int = DEFAULT_MIN_SHARDS, workers=None,
            skip_bad: bool = False, log=print) -> dict:
    """Write (or finish writing) the shards of data_path into out; returns the index. Resumable: a
    shard is recorded in index.json only once its tar file is complete (written under a temporary name,
    then renamed), so an interrupted run rewrites just the shard it was writing."""
    from concurrent.futures import ThreadPoolExecutor

    import webdataset as wds
    from tqdm import tqdm

    from .data import scan_dataset
    from .datacheck import default_workers, show

    if shard_size < 1 or min_shards < 1 or max_size < 0 or not 1 <= quality <= 100:
        raise UserError("--shard-size and --min-shards must be positive, --max-size 0 or more, --quality 1..100")
    train, val = scan_dataset(data_path)
    os.makedirs(out, exist_ok=True)
    settings = {"format": FORMAT, "classes": train.classes, "max_size": max_size, "quality": quality,
                "shard_size": shard_size, "min_shards": min_shards,
                "source": {name: len(s.samples) for name, s in (("train", train), ("val", val))}}
    index_path = os.path.join(out, INDEX)
    index = dict(settings, splits={}, complete=False)
    if os.path.exists(index_path):
        with open(index_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in settings} != settings:
            raise UserError(f"--out {out}: holds shards of another source or other settings; "
                            f"choose an empty --out, or delete its {INDEX}")
        index = old
    total = len(train.samples) + len(val.samples)
    done_images = sum(s["count"] + s.get("skipped", 0) for sp in index["splits"].values() for s in sp["shards"])
    bar = tqdm(total=total, initial=done_images, desc="prepare", unit="img", file=sys.stderr,
               disable=not sys.stderr.isatty())
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for name, split in (("train", train), ("val", val)):
            entry = index["splits"].setdefault(name, {"count": 0, "class_counts": [0] * len(split.classes),
                                                      "shards": []})
            finished = {s["name"] for s in entry["shards"]}
            for k, (start, end) in enumerate(plan(len(split.samples), shard_size, min_shards)):
                shard = f"{name}-{k:06d}.tar"
                if shard in finished and os.path.exists(os.path.join(out, shard)):
                    continue
                items = [(i, *split.samples[i]) for i in range(start, end)]
                encoded = pool.map(lambda it: _encode_or_error(it[1], max_size, quality), items)
                record = {"name": shard, "count": 0, "skipped": 0, "class_counts": [0] * len(split.classes)}
                tmp = os.path.join(out, shard + ".tmp")
                with wds.TarWriter(tmp, encoder=False, mtime=0) as sink:
                    for (i, path, target), (data, error) in zip(items, encoded):
                        bar.update(1)
                        if error is not None:
                            if not skip_bad:
                                raise UserError(f"{show(path)}: {error}")
                            log(f"warning: skipping {show(path)}: {error.split(';')[0]}")
                            record["skipped"] += 1
                            continue
                        sink.write({"__key__": f"{i:09d}", "jpg": data, "cls": str(target).encode()})
                        record["count"] += 1
                        record["class_counts"][target] += 1
                os.replace(tmp, os.path.join(out, shard))
                entry["shards"] = [s for s in entry["shards"] if s["name"] != shard] + [record]
                entry["shards"].sort(key=lambda s: s["name"])
                entry["count"] = sum(s["count"] for s in entry["shards"])
                entry["class_counts"] = [sum(c) for c in zip(*(s["class_counts"] for s in entry["shards"]))]
                _write_json(index_path, index)
    bar.close()
    index["complete"] = True
    _write_json(index_path, index)
    log(f"prepared {out}: " + ", ".join(f"{n} {index['splits'][n]['count']} images in "
                                        f"{len(index['splits'][n]['shards'])} shards" for n in ("train", "val"))
        + f" (short side <= {max_size} px, JPEG quality {quality})")
    return index


def _encode_or_error(path: str, max_size: int, quality: int) -> tuple:
    from .datacheck import reason
    try:
        return encode(path, max_size, quality), None
    except Exception as e:  # any decoder failure makes the file unusable; say which
        return None, reason(path, e)


# reading


def is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def is_shard_source(path: str) -> bool:
    """A shard set: a folder holding index.json, the index file itself, or a URL (of either)."""
    if is_remote(path):
        return True
    return path.endswith(INDEX) and os.path.isfile(path) or os.path.isfile(os.path.join(path, INDEX))


def read_index(path: str) -> tuple:
    """(index, base) where a shard's URL is base + "/" + its name."""
    import webdataset as wds
    url = path if path.endswith(INDEX) else path.rstrip("/") + "/" + INDEX
    base = url[:-len(INDEX)].rstrip("/")
    try:
        with wds.gopen(url, "rb") as f:
            index = json.loads(f.read())
    except Exception as e:  # a missing file, an unreachable host, a broken pipe command: all the user's
        raise UserError(f"--data_path {path}: cannot read {url} ({type(e).__name__}: {e})")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"--data_path {path}: {url} is not an index written by `xception prepare`")
    if not index.get("complete"):
        raise UserError(f"--data_path {path}: `xception prepare` has not finished this shard set; "
                        f"run it again with the same flags to complete it")
    return index, base


def deal(shards: int, slots: int, slot: int, epoch: int = None, seed: int = 0) -> list:
    """The shard numbers of one slot (rank * workers + worker): a permutation of all shards, the same
    on every rank for a given seed and epoch (None: unshuffled), dealt round-robin."""
    order = list(range(shards))
    if epoch is not None:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[slot::slots]


def train_quota(counts: list, slots: int, batch: int) -> int:
    """Full batches every slot can deliver in any epoch: each gets at least floor(S / slots) shards,
    holding at least as many samples as that many of the smallest shards, whatever the permutation."""
    return sum(sorted(counts)[:len(counts) // slots]) // batch


def _torch_dataset():
    import torch
    from torch.utils.data import IterableDataset

    class ShardStream(IterableDataset):
        """One rank's view of a split. Yields collated uint8 batches (decode.collate); in training every
        worker yields exactly `quota` full batches, in evaluation all its samples (last batch partial)."""

        def __init__(self, base: str, split: dict, transform, batch: int, train: bool, rank: int = 0,
                     world: int = 1, workers: int = 0, seed: int = 0, with_keys: bool = False):
            self.urls = [f"{base}/{s['name']}" for s in split["shards"]]
            self.counts = [s["count"] for s in split["shards"]]
            self.transform, self.batch, self.train = transform, batch, train
            self.rank, self.world, self.workers, self.seed = rank, world, max(1, workers), seed
            self.slots, self.with_keys = world * self.workers, with_keys
            self.samples = sum(self.counts)
            self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers
            self.quota = train_quota(self.counts, self.slots, batch) if train else None

        def set_epoch(self, epoch: int) -> None:
            self.epoch.fill_(epoch)

        def __len__(self) -> int:  # the samples of the split (the log line); batches: ShardLoader
            return self.samples

        def batches_per_rank(self) -> int:
            if self.train:
                return self.quota * self.workers
            return sum(math.ceil(sum(self.counts[k] for k in deal(len(self.counts), self.slots, slot))
                                 / self.batch) for slot in self._my_slots())

        def _my_slots(self):
            return range(self.rank * self.workers, (self.rank + 1) * self.workers)

        def slot_samples(self, slot: int, epoch: int):
            """(key, jpeg bytes, class) of one slot's shards, shuffled in training."""
            import webdataset as wds
            mine = deal(len(self.urls), self.slots, slot, epoch if self.train else None, self.seed)
            if not mine:  # more slots than shards (evaluation): this one has nothing to read
                return
            stages = [wds.SimpleShardList([self.urls[k] for k in mine]), wds.tarfile_to_samples()]
            if self.train:
                rng = random.Random((self.seed * 1_000_003 + epoch) * 10_007 + slot)
                stages.append(wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER // 10, rng=rng))
            for sample in wds.DataPipeline(*stages):
                yield sample["__key__"], sample["jpg"], int(sample["cls"])

        def __iter__(self):
            from torch.utils.data import get_worker_info

            from .decode import collate
            info = get_worker_info()
            slot = self.rank * self.workers + (0 if info is None else info.id)
            limit = self.quota * self.batch if self.train else None
            pending, delivered = [], 0
            for key, data, target in self.slot_samples(slot, int(self.epoch.item())):
                if limit is not None and delivered >= limit:
                    break
                pending.append((self.transform.load_bytes(data), target, key))
                delivered += 1
                if len(pending) == self.batch:
                    yield self._collate(pending, collate)
                    pending = []
            if pending and not self.train:
                yield self._collate(pending, collate)

        def _collate(self, items, collate):
            images, targets = collate([(x, t) for x, t, _ in items])
            return (images, targets, [k for _, _, k in items]) if self.with_keys else (images, targets)

    return ShardStream


class ShardLoader:
    """A DataLoader over a ShardStream, with the length and the epoch hook the training loop expects
    (len = batches of this rank; .sampler.set_epoch reshuffles)."""

    def __init__(self, stream, loader):
        self.dataset, self.loader, self.sampler = stream, loader, stream
        self.batch_size = stream.batch

    def __len__(self) -> int:
        return self.dataset.batches_per_rank()

    def __iter__(self):
        return iter(self.loader)


def make_shard_loaders(cfg, ctx, need_train: bool, log=print) -> tuple:
    """(classes, train loader or None, val loader) over the shard set at cfg.data_path."""
    from torch.utils.data import DataLoader

    from .data import split_workers
    from .decode import EvalTransform, TrainTransform

    index, base = read_index(cfg.data_path)
    ShardStream = _torch_dataset()
    per_rank = cfg.batch_size // ctx.world_size
    workers = split_workers(cfg.workers, ctx.local_world_size)

    def loader(name, transform, train):
        split = index["splits"][name]
        shards = len(split["shards"])
        w = workers
        if shards < ctx.world_size * max(1, w):  # more slots than shards would leave slots idle, or empty
            w = shards // ctx.world_size
            if w < 1 and (train or shards == 0):
                raise UserError(f"--data_path {cfg.data_path}: {shards} {name} shards for {ctx.world_size} "
                                f"processes; run `xception prepare` with --min-shards {ctx.world_size * 8}")
            log(f"warning: {shards} {name} shards: {w} loader worker(s) per process instead of "
                f"{workers}; prepare with more shards (--min-shards) to use them all")
        stream = ShardStream(base, split, transform, per_rank, train, ctx.rank, ctx.world_size, w,
                             seed=cfg.seed or 0)
        if train and stream.quota < 1:
            raise UserError(f"--data_path {cfg.data_path}: too few training samples per loader slot for a "
                            f"batch of {per_rank} per process; lower -b or --workers")
        dl = DataLoader(stream, batch_size=None, num_workers=w, pin_memory=ctx.device.type == "cuda",
                        persistent_workers=w > 0)
        return ShardLoader(stream, dl)

    train_loader = None
    if need_train:
        train_loader = loader("train", TrainTransform(cfg.image_size, cfg.crop_scale, cfg.hflip), True)
        used = train_loader.dataset.quota * train_loader.dataset.slots * per_rank
        if used < train_loader.dataset.samples:
            log(f"shards: {used} of {train_loader.dataset.samples} training samples per epoch (each at most "
                f"once; the tail that does not fill every rank's batches equally is dropped, a different one "
                f"each epoch)")
    val_loader = loader("val", EvalTransform(cfg.image_size, cfg.crop_pct), False)
    return index["classes"], train_loader, val_loader
