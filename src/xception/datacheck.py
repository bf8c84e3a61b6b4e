"""Bad input files: a parallel pre-scan (`xception check-data DIR`, also run before training unless
--no-check-data), and a dataset guard that names, or with --skip-bad-images skips and counts, an image
that still fails to decode inside a loader worker."""

from __future__ import annotations

import os
import sys

from .config import UserError

SKIP_HINT = "remove or replace it, or pass --skip-bad-images to skip such files"
MAX_SKIPS_IN_A_ROW = 32  # a guard that finds this many bad files in a row is looking at a broken dataset
COUNTER_SLOTS = 257  # one slot per loader worker (and the main process), so no two writers share one


def show(path: str) -> str:
    """A path as the user can read and paste it, also when its name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _looks_like_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return bool(head) and all(b in b"\t\n\r" or 32 <= b < 127 for b in head)


def reason(path: str, exc: BaseException) -> str:
    """Why `path` cannot be used, in words, from the exception its decoding raised."""
    from PIL import Image, UnidentifiedImageError

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
    from PIL import Image

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
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 32))


def _one_error(bad: list, data_path: str) -> UserError:
    path, why = bad[0]
    more = (f" ({len(bad) - 1} more bad file(s); `xception check-data {show(data_path)}` lists them all)"
            if len(bad) > 1 else "")
    return UserError(f"{show(path)}: {why}{more}")


def _drop(split, bad_paths: set):
    from dataclasses import replace
    kept = [(p, c) for p, c in split.samples if p not in bad_paths]
    have = {c for _, c in kept}
    lost = [name for i, name in enumerate(split.classes) if i not in have]
    if lost:
        raise UserError(f"{show(split.root)}: class folder(s) with no readable image left after skipping "
                        f"bad files: {', '.join(map(show, lost[:5]))}; add good images or remove the folder")
    return replace(split, samples=kept)


def find_bad(cfg, ctx, splits: list, log=print) -> list:
    """Warn about ignored files, then decode-check every sample, each rank a share: [(path, reason)]."""
    from .data import IMG_EXTENSIONS

    for split in splits:
        ignored, example = count_ignored(split.root, IMG_EXTENSIONS)
        if ignored:
            log(f"warning: {show(split.root)}: {ignored} file(s) without an image extension ignored "
                f"(e.g. {show(example)})")
    paths = [p for s in splits for p, _ in s.samples]
    # --workers is the node's total, as for the loaders: each process checks with its share
    workers = max(1, (cfg.workers or default_workers()) // max(1, getattr(ctx, "local_world_size", 1)))
    bad = scan_files(paths[ctx.rank::ctx.world_size], workers, "check-data")
    if ctx.world_size > 1:
        import torch.distributed as td
        gathered = [None] * ctx.world_size
        td.all_gather_object(gathered, bad)
        order = {p: i for i, p in enumerate(paths)}
        bad = sorted((b for part in gathered for b in part), key=lambda b: order[b[0]])
    return bad


def screen(cfg, ctx, splits: list, log=print) -> tuple:
    """Before any epoch: refuse the first bad file or, with --skip-bad-images, drop and log every bad
    one. Returns the splits left and the count skipped."""
    splits = list(splits)
    present = [s for s in splits if s is not None]
    bad = find_bad(cfg, ctx, present, log)
    if not bad:
        return splits, 0
    if not cfg.skip_bad_images:
        raise _one_error(bad, cfg.data_path)
    for path, why in bad:
        log(f"warning: skipping {show(path)}: {why.split(';')[0]}")
    log(f"warning: --skip-bad-images: {len(bad)} bad file(s) skipped before training")
    bad_paths = {p for p, _ in bad}
    return [None if s is None else _drop(s, bad_paths) for s in splits], len(bad)


class BadImageError(UserError):
    """A file that fails to decode in the loader. DataLoader re-raises a worker's exception as
    type(exc)(message + the worker's traceback); keep our own line so the user still sees one line."""

    def __init__(self, message: str, exit_code: int = 2):
        if "Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("BadImageError: ", 1)[-1]
        super().__init__(message, exit_code)


class GuardedDataset:
    """Wraps a map-style dataset of (path, class) samples. A sample that fails to load stops the run
    with one line naming the file or, with skip=True, is logged, counted, and replaced by the next one
    (so batches keep their size and the run its data order)."""

    def __init__(self, dataset, skip: bool):
        import torch
        self.dataset, self.skip = dataset, skip
        self.counts = torch.zeros(COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name in ("dataset", "skip", "counts"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _path(self, index: int) -> str:
        return self.dataset.split.samples[index][0]

    def skipped(self) -> int:
        return int(self.counts.sum())

    def __getitem__(self, index: int):
        from torch.utils.data import get_worker_info
        for _ in range(MAX_SKIPS_IN_A_ROW):
            try:
                return self.dataset[index]
            except Exception as e:
                path = self._path(index)
                why = check_image(path)
                if not self.skip:
                    if why is None:
                        raise  # the file decodes: a bug of ours, which deserves its traceback
                    raise BadImageError(f"{show(path)}: {why}") from None
                why = why or reason(path, e)
                info = get_worker_info()
                self.counts[0 if info is None else 1 + info.id % (COUNTER_SLOTS - 1)] += 1
                print(f"warning: skipping {show(path)}: {why.split(';')[0]}", file=sys.stderr, flush=True)
                index = (index + 1) % len(self.dataset)
        raise BadImageError(f"{show(self._path(index))}: {MAX_SKIPS_IN_A_ROW} unreadable files in a row; "
                            f"run `xception check-data` on the dataset and fix it")


def guard(dataset, cfg) -> GuardedDataset:
    return GuardedDataset(dataset, cfg.skip_bad_images)


# `xception check-data DIR`


def add_arguments(p) -> None:
    p.add_argument("data_path", metavar="DIR", help="dataset root holding train/<class>/ and val/<class>/")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="parallel checking threads (default: the CPUs available, at most 32)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="report bad files but exit 0, as training with --skip-bad-images would skip them")


def run(args) -> int:
    from .config import Config
    from .data import scan_dataset
    from .distributed import DistContext

    train, val = scan_dataset(args.data_path, need_train=True)
    cfg = Config(data_path=args.data_path, workers=args.workers or default_workers())
    bad = find_bad(cfg, DistContext(device=None), [train, val])
    for path, why in bad:
        print(f"bad: {show(path)}: {why.split(';')[0]}")
    print(f"checked {len(train.samples) + len(val.samples)} images ({len(train.samples)} train, "
          f"{len(val.samples)} val) in {len(train.classes)} classes: {len(bad)} bad")
    if bad and not args.skip_bad_images:
        first = show(bad[0][0])
        raise UserError(f"{first}: {bad[0][1].split(';')[0]}; it and {len(bad) - 1} more bad file(s) are "
                        f"listed above; remove or replace them, or train with --skip-bad-images"
                        if len(bad) > 1 else f"{first}: {bad[0][1]}")
    if bad:
        present = {p for p, _ in bad}
        for split in (train, val):
            _drop(split, present)  # a class with nothing readable left cannot be skipped around
    return 0
