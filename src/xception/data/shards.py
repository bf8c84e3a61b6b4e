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

import json
import math
import os
import random
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import UserError, derive_seed
from .loaders import Loader, per_process, pinned, prefetch, skip_batches
from .transforms import build_transform, collate

INDEX = "index.json"
FORMAT = "xception-shards-1"
SHUFFLE_BUFFER = 1000  # samples (encoded JPEGs, ~40 MB) held per worker for the in-shard shuffle


def is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def is_shard_source(path: str) -> bool:
    """A shard set: a folder holding index.json, the index file itself, or a URL (of either)."""
    if is_remote(path):
        return True
    return path.endswith(INDEX) and os.path.isfile(path) or os.path.isfile(os.path.join(path, INDEX))


def read_index(path: str) -> tuple:
    """(index, base) where a shard's URL is base + "/" + its name."""
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
        random.Random(derive_seed(seed, epoch)).shuffle(order)
    return order[slot::slots]


def train_quota(counts: list, slots: int, batch: int) -> int:
    """Full batches every slot can deliver in any epoch: each gets at least floor(S / slots) shards,
    holding at least as many samples as that many of the smallest shards, whatever the permutation."""
    return sum(sorted(counts)[:len(counts) // slots]) // batch


@dataclass
class Slots:
    """The job's reading slots, one per (rank, loader worker), and the seed that permutes the shards."""
    rank: int
    world: int
    workers: int
    seed: int

    def __post_init__(self):
        self.workers = max(1, self.workers)


class ShardStream(IterableDataset):
    """One rank's view of a split, as collated uint8 batches. In training every slot yields exactly `quota`
    full batches, in evaluation all its samples (the last batch partial). With `with_keys` set, batches
    carry the samples' keys too (for tests)."""

    with_keys = False

    def __init__(self, base: str, split: dict, transform, batch: int, train: bool, slots: Slots):
        self.urls = [f"{base}/{s['name']}" for s in split["shards"]]
        self.counts = [s["count"] for s in split["shards"]]
        self.transform, self.batch, self.train = transform, batch, train
        self.rank, self.workers, self.seed = slots.rank, slots.workers, slots.seed
        self.slots = slots.world * slots.workers
        self.samples = sum(self.counts)
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # seen by persistent workers
        self.quota = train_quota(self.counts, self.slots, batch) if train else None
        mine = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        self.steps = (self.quota * self.workers if train else
                      sum(math.ceil(sum(self.counts[k] for k in deal(len(self.counts), self.slots, slot)) / batch)
                          for slot in mine))

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.samples

    def batches_per_rank(self) -> int:
        return self.steps

    def slot_samples(self, slot: int, epoch: int):
        """(key, jpeg bytes, class) of one slot's shards, shuffled in training."""
        mine = deal(len(self.urls), self.slots, slot, epoch if self.train else None, self.seed)
        if not mine:  # more slots than shards (evaluation): this one has nothing to read
            return
        stages = [wds.SimpleShardList([self.urls[k] for k in mine]), wds.tarfile_to_samples()]
        if self.train:
            rng = random.Random(derive_seed(self.seed, epoch, slot))
            stages.append(wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER // 10, rng=rng))
        for sample in wds.DataPipeline(*stages):
            yield sample["__key__"], sample["jpg"], int(sample["cls"])

    def __iter__(self):
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
                yield self._collate(pending)
                pending = []
        if pending and not self.train:
            yield self._collate(pending)

    def _collate(self, items):
        images, targets = collate([(x, t) for x, t, _ in items])
        return (images, targets, [k for _, _, k in items]) if self.with_keys else (images, targets)


class ShardLoader(Loader):
    """A DataLoader over a ShardStream: every rank runs the same number of training steps, from the index."""

    def __init__(self, stream: ShardStream, workers: int, device):
        self.stream, self.device = stream, device
        self.batch_size, self.num_samples = stream.batch, stream.samples
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pinned(device),
                                 persistent_workers=workers > 0)
        self.start_step = 0

    def __len__(self) -> int:
        return self.stream.batches_per_rank()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.stream.set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self):
        batches = skip_batches(iter(self.loader), self.start_step)
        self.start_step = 0
        return prefetch(batches, self.device)


def _workers_for(shards: int, name: str, train: bool, cfg, ctx, log) -> int:
    """Loader workers per process for a split of `shards` shards: fewer when there are more rank x worker
    slots than shards, since a slot without a shard idles (training would fail on it)."""
    _, workers = per_process(cfg, ctx)
    if shards >= ctx.world_size * max(1, workers):
        return workers
    fewer = shards // ctx.world_size
    if fewer < 1 and (train or shards == 0):
        raise UserError(f"--data_path {cfg.data_path}: {shards} {name} shards for {ctx.world_size} "
                        f"processes; run `xception prepare` with --min-shards {ctx.world_size * 8}")
    log(f"warning: {shards} {name} shards: {fewer} loader worker(s) per process instead of "
        f"{workers}; prepare with more shards (--min-shards) to use them all")
    return fewer


def shard_loader(index: dict, base: str, train: bool, cfg, ctx, log=print) -> ShardLoader:
    name = "train" if train else "val"
    split = index["splits"][name]
    per_rank, _ = per_process(cfg, ctx)
    workers = _workers_for(len(split["shards"]), name, train, cfg, ctx, log)
    transform = build_transform(cfg, train)
    stream = ShardStream(base, split, transform, per_rank, train, Slots(ctx.rank, ctx.world_size, workers,
                                                                        cfg.seed or 0))
    if train and stream.quota < 1:
        raise UserError(f"--data_path {cfg.data_path}: too few training samples per loader slot for a "
                        f"batch of {per_rank} per process; lower -b or --workers")
    if train and stream.quota * stream.slots * per_rank < stream.samples:
        log(f"shards: {stream.quota * stream.slots * per_rank} of {stream.samples} training samples per epoch "
            f"(each at most once; the tail that does not fill every rank's batches equally is dropped, a "
            f"different one each epoch)")
    return ShardLoader(stream, workers, ctx.device)
