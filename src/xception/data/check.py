"""Bad input files: the decode check of every image before training (also `xception check-data DIR`),
which remembers the files it found good so that a resumed run checks only new or changed ones, and the
policy for a file that still fails inside a loader worker: name it, or with --skip-bad-images skip and
count it."""

from __future__ import annotations

import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch.distributed as td
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..config import UserError
from ..files import WriteError, atomic_write, show
from ..runtime import cpu_count
from .folder import IMG_EXTENSIONS, Split, scan_dataset
from .listfile import is_list_file, read_list_file

SKIP_HINT = "remove or replace it, or pass --skip-bad-images to skip such files"
CACHE_NAME = "image-check-cache.npy"  # in the output folder: keys of the files found good


def _looks_like_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return bool(head) and all(b in b"\t\n\r" or 32 <= b < 127 for b in head)


def reason(path: str, exc: BaseException) -> str:
    """Why `path` cannot be used, in words, from the exception its decoding raised."""
    if isinstance(exc, PermissionError):
        return "cannot be read (permission denied); make it readable (chmod a+r) or move it out of the dataset"
    if isinstance(exc, FileNotFoundError):
        return "vanished while the data was being read; restore it or remove it from the dataset"
    if isinstance(exc, Image.DecompressionBombError):
        return (f"larger than Pillow's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS} pixels "
                f"(2 x PIL.Image.MAX_IMAGE_PIXELS), a limit kept on purpose since such a file can exhaust "
                f"memory; shrink it, or {SKIP_HINT}")
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        return f"empty file (0 bytes); {SKIP_HINT}"
    if isinstance(exc, UnidentifiedImageError):
        what = "a text file, not an image" if _looks_like_text(path) else "not an image format Pillow can read"
        return f"{what}; {SKIP_HINT}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated image ({text}); {SKIP_HINT}"
    return f"corrupt image ({type(exc).__name__}: {text[:160]}); {SKIP_HINT}"


def check_image(path: str):
    """None if `path` decodes, else the reason it does not. JPEGs decode at 1/8 scale (libjpeg's draft
    mode), which still reads every byte of the entropy-coded data, so truncation and corruption show."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
    except Exception as e:  # any decoder failure makes the file unusable; say which
        return reason(path, e)
    return None


def count_ignored(root: str, extensions) -> tuple:
    """Files under root/<class>/ that the loader ignores (unknown extension): (count, one example)."""
    count, example = 0, None
    for entry in sorted(os.scandir(root), key=lambda e: e.name) if os.path.isdir(root) else ():
        if not entry.is_dir():
            continue
        for folder, _, names in os.walk(entry.path, followlinks=True):
            for name in names:
                if not name.lower().endswith(extensions):
                    count += 1
                    example = example or os.path.join(folder, name)
    return count, example


def scan_files(paths: list, workers: int, desc: str) -> list:
    """Check every path in parallel (threads: Pillow decodes without the GIL); (path, reason) of the bad
    ones, in the order given. A tqdm bar on a terminal."""
    bad = []
    bar = tqdm(total=len(paths), desc=desc, unit="img", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty() or not paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, why in zip(paths, pool.map(check_image, paths, chunksize=64)):
            if why is not None:
                bad.append((path, why))
            bar.update(1)
    bar.close()
    return bad


def default_workers() -> int:
    return max(1, min(cpu_count(), 32))


class CheckCache:
    """The files found good by earlier checks, as 64-bit keys of (absolute path, size, mtime): a file that
    changes gets a new key and is checked again. 8 bytes a file (10 MB for ImageNet), a sorted array."""

    def __init__(self, folder: str | None):
        self.path = os.path.join(folder, CACHE_NAME) if folder else None
        self.known = np.zeros(0, dtype=np.uint64)
        if self.path and os.path.isfile(self.path):
            try:
                self.known = np.load(self.path, allow_pickle=False).astype(np.uint64)
            except (OSError, ValueError):
                self.known = np.zeros(0, dtype=np.uint64)  # unreadable: check everything again

    def keys(self, paths: list) -> np.ndarray:
        """The files' keys; all 0 (= check it) without a cache folder, so that no file is stat-ed."""
        out = np.zeros(len(paths), dtype=np.uint64)
        for i, path in enumerate(paths if self.path else ()):
            try:
                st = os.stat(path)
            except OSError:
                continue  # key 0 is never stored: a vanished file is checked (and reported) again
            text = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape")
            out[i] = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") or 1
        return out

    def unchecked(self, keys: np.ndarray) -> np.ndarray:
        return ~np.isin(keys, self.known) | (keys == 0)

    def add_and_save(self, keys: np.ndarray, log=print) -> None:
        new = np.setdiff1d(keys[keys != 0], self.known)
        if self.path is None or not len(new):
            return
        self.known = np.union1d(self.known, new)
        try:
            atomic_write(self.path, lambda f: np.save(f, self.known, allow_pickle=False))
        except WriteError as e:  # only a cache: the next run checks everything again
            log(f"warning: {e}; the next run will check every image again")


def find_bad(splits: list, ctx, workers: int, cache_dir: str | None = None, log=print) -> list:
    """Warn about ignored files, then decode-check every sample not known good, each rank a share:
    [(path, reason)] in dataset order, the same on every rank. `cache_dir` remembers the good ones."""
    for split in splits:
        ignored, example = count_ignored(split.root, IMG_EXTENSIONS)
        if ignored:
            log(f"warning: {show(split.root)}: {ignored} file(s) without an image extension ignored "
                f"(e.g. {show(example)})")
    paths = [p for s in splits for p, _ in s.samples]
    cache = CheckCache(cache_dir)  # every rank reads it; rank 0 writes it
    mine = paths[ctx.rank::ctx.world_size]
    keys = cache.keys(mine)
    todo = [p for p, new in zip(mine, cache.unchecked(keys)) if new]
    bad = scan_files(todo, workers, "check-data")
    bad_paths = {p for p, _ in bad}
    good = keys[[p not in bad_paths for p in mine]]
    checked = len(todo)
    if ctx.world_size > 1:
        parts = [None] * ctx.world_size
        td.all_gather_object(parts, (bad, checked, good))
        bad = [b for part in parts for b in part[0]]
        checked = sum(part[1] for part in parts)
        good = np.concatenate([part[2] for part in parts])
    if ctx.is_main:
        if cache.path and checked < len(paths):
            log(f"check-data: {checked} new or changed of {len(paths)} images decode-checked; the other "
                f"{len(paths) - checked} passed an earlier check ({cache.path})")
        cache.add_and_save(good, log)
    order = {p: i for i, p in enumerate(paths)}
    return sorted(bad, key=lambda b: order[b[0]])


def _one_error(bad: list, data_path: str) -> UserError:
    path, why = bad[0]
    more = (f" ({len(bad) - 1} more bad file(s); `xception check-data {show(data_path)}` lists them all)"
            if len(bad) > 1 else "")
    return UserError(f"{show(path)}: {why}{more}")


def drop_bad(split: Split, bad_paths: set) -> Split:
    keep = [p not in bad_paths for p, _ in split.samples]
    kept = [s for s, k in zip(split.samples, keep) if k]
    have = {c for _, c in kept}
    if split.multi_label:  # a class that lost its images has no positives left: mAP leaves it out
        have = set(range(len(split.classes)))
    lost = [name for i, name in enumerate(split.classes) if i not in have]
    if lost:
        raise UserError(f"{show(split.root)}: class folder(s) with no readable image left after skipping "
                        f"bad files: {', '.join(map(show, lost[:5]))}; add good images or remove the folder")
    groups = None if split.groups is None else [g for g, k in zip(split.groups, keep) if k]
    return replace(split, samples=kept, groups=groups)


def screen(splits: list, cfg, ctx, log=print) -> tuple:
    """Before any epoch: refuse the first bad file or, with --skip-bad-images, drop and log every bad one.
    Returns the splits left (None stays None) and the count skipped."""
    # --workers is the node's total, as for the loaders: each process checks with its share
    workers = max(1, (cfg.workers or default_workers()) // max(1, ctx.local_world_size))
    bad = find_bad([s for s in splits if s is not None], ctx, workers, cfg.output_dir, log)
    if not bad:
        return list(splits), 0
    if not cfg.skip_bad_images:
        raise _one_error(bad, cfg.data_path)
    for path, why in bad:
        log(f"warning: skipping {show(path)}: {why.split(';')[0]}")
    log(f"warning: --skip-bad-images: {len(bad)} bad file(s) skipped before training")
    bad_paths = {p for p, _ in bad}
    return [None if s is None else drop_bad(s, bad_paths) for s in splits], len(bad)


class BadImageError(UserError):
    """A file that fails to decode in the loader. DataLoader re-raises a worker's exception as
    type(exc)(message + the worker's traceback); keep our own line so the user still sees one line."""

    def __init__(self, message: str, exit_code: int = 2):
        if "Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("BadImageError: ", 1)[-1]
        super().__init__(message, exit_code)


def failed_sample(path: str, exc: Exception, skip: bool) -> str:
    """A sample failed to load in a loader: raise the one-line error (or, when the file decodes after all,
    the original exception: a bug of ours deserves its traceback); with `skip`, log it and return why."""
    why = check_image(path)
    if not skip:
        if why is None:
            raise exc
        raise BadImageError(f"{show(path)}: {why}") from None
    why = why or reason(path, exc)
    print(f"warning: skipping {show(path)}: {why.split(';')[0]}", file=sys.stderr, flush=True)
    return why


def check_folder(data_path: str, workers: int | None, skip_bad: bool, ctx) -> int:
    """`xception check-data DIR`: list every bad file; exit 2 on any unless `skip_bad`."""
    train, val = read_list_file(data_path) if is_list_file(data_path) else scan_dataset(data_path, need_train=True)
    bad = find_bad([train, val], ctx, workers or default_workers())
    for path, why in bad:
        print(f"bad: {show(path)}: {why.split(';')[0]}")
    print(f"checked {len(train.samples) + len(val.samples)} images ({len(train.samples)} train, "
          f"{len(val.samples)} val) in {len(train.classes)} classes: {len(bad)} bad")
    if bad and not skip_bad:
        first = show(bad[0][0])
        raise UserError(f"{first}: {bad[0][1].split(';')[0]}; it and {len(bad) - 1} more bad file(s) are "
                        f"listed above; remove or replace them, or train with --skip-bad-images"
                        if len(bad) > 1 else f"{first}: {bad[0][1]}")
    if bad:
        present = {p for p, _ in bad}
        for split in (train, val):
            drop_bad(split, present)  # a class with nothing readable left cannot be skipped around
    return 0
