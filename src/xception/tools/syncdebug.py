"""`xception bench --mode train --sync-debug`: what makes the host wait for the device in our real training
loop (engine.loop.train_one_epoch with the engine's Step, StepGuard, optimizer and scheduler, built as
`xception train` builds them with its default settings), counted step by step. The loop promises to read
device values only at print steps; this measures that promise.

Two counters, both attributed to the step during which they fire:

* host reads: calls of Tensor.item / tolist / __bool__ / __float__ / __int__ made anywhere inside the loop,
  seen by a TorchFunctionMode (it intercepts each of the five in torch 2.14; tested). On every device, so
  the CPU tests can check the counting itself.
* CUDA syncs: on CUDA only, the warnings torch emits under torch.cuda.set_sync_debug_mode("warn"). They catch
  what a host read misses (a copy to the CPU, nonzero, masked indexing), but not torch.cuda.synchronize():
  the loop's two deliberate clock syncs (first step, end of timing warm-up) are not counted.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..config import Config
from ..model import Xception
from ..runtime import DistContext
from ..engine.hooks import StepGuard
from ..engine.loop import EpochPlan, Step, train_one_epoch
from ..engine.optim import build_optimizer, build_scheduler
from ..engine.precision import Precision

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
SYNC_WARNING = "called a synchronizing CUDA operation"  # the text of torch's warn mode (c10 warn_or_error_on_sync)
PRINT_FREQ = 10
MIN_STEPS = 20  # two print intervals at least, so that steps between print steps exist
DISTINCT_BATCHES = 2  # synthetic batches, reused: 25 distinct 299 px batches of 128 would pin ~0.9 GB


class StepLedger:
    """Counts per place in the epoch: a step index (0-based), "before" the first batch or "after" the last.
    `caught` is the list that warnings.catch_warnings(record=True) fills; its sync warnings are moved to the
    current place whenever the place changes."""

    def __init__(self):
        self.place = "before"
        self.reads = Counter()
        self.syncs = Counter()
        self.caught: list = []

    def enter(self, place) -> None:
        self.settle()
        self.place = place

    def settle(self) -> None:
        self.syncs[self.place] += sum(SYNC_WARNING in str(w.message) for w in self.caught)
        self.caught.clear()


class HostReadCounter(TorchFunctionMode):
    """Counts the Tensor methods that copy a value to the host (and so wait for the device) into
    ledger.reads[ledger.place]; every call goes on unchanged."""

    def __init__(self, ledger: StepLedger):
        super().__init__()
        self.ledger = ledger
        self.watched = {getattr(torch.Tensor, name) for name in HOST_READS}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.watched:
            self.ledger.reads[self.ledger.place] += 1
        return func(*args, **(kwargs or {}))


class LedgerLoader:
    """`steps` batches cycled from `pool`. Handing out batch i opens step i in the ledger, so whatever the loop
    does until it asks for the next batch (the step, the hooks, a print step's reads) counts for step i."""

    def __init__(self, pool: list, steps: int, ledger: StepLedger):
        self.pool, self.steps, self.ledger = pool, steps, ledger

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            self.ledger.enter(i)
            yield self.pool[i % len(self.pool)]
        self.ledger.enter("after")  # the epoch's closing sums and clock reads


class _SilentProgress:
    """Stands in for the training's progress line: the loop still reads the loss for it at print steps."""

    def update(self, done, **values) -> None:
        pass


def bench_precision(dtype: str, device: torch.device) -> Precision:
    """As training runs: fp16 with a dynamic loss scaler on an accelerator, bf16 without one, else fp32.
    On the CPU the asked dtype is kept, but never a loss scaler (training does not scale there either)."""
    autocast = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if autocast == torch.float16 and device.type != "cpu":
        return Precision(device.type, autocast, torch.amp.GradScaler(device.type))
    return Precision(device.type, autocast)


def _batches(args, device: torch.device) -> list:
    """uint8 NCHW images and int64 targets on the host, as a loader hands them over; pinned on CUDA, as the
    real loader's are, since a non-blocking copy from pageable memory would not be asynchronous."""
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(DISTINCT_BATCHES):
        images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                               generator=g)
        targets = torch.randint(0, 1000, (args.batch_size,), generator=g)
        pool.append((images.pin_memory(), targets.pin_memory()) if device.type == "cuda" else (images, targets))
    return pool


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """E.g. "SGD momentum fused": the implementation is what the GPU issue checks (fused on CUDA)."""
    d = optimizer.defaults
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "torch's default"
    return f"{type(optimizer).__name__}{' momentum' if d.get('momentum') else ''} {impl}"


def count_syncs(args, device: torch.device) -> tuple:
    """Train Xception for max(MIN_STEPS, steps x repeats) steps through train_one_epoch, counting host reads
    (and CUDA syncs) per step. Returns (ledger, steps, our settings, whether CUDA syncs were counted)."""
    cfg = Config(epochs=1)  # the training defaults: lr, momentum, weight decay, label smoothing
    steps = max(MIN_STEPS, args.steps * args.repeats)
    ctx = DistContext(device)
    torch.manual_seed(0)
    model = Xception(num_classes=1000).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, device)
    precision = bench_precision(args.dtype, device)
    step = Step(model, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), optimizer,
                build_scheduler(optimizer, cfg, steps), precision)
    # Not installed: the guard's signal handlers are not needed, its per-step checks are.
    guard = StepGuard(ctx, precision.scaler is not None, cfg.max_nonfinite_steps, log=lambda *a: None)
    ledger = StepLedger()
    loader = LedgerLoader(_batches(args, device), steps, ledger)
    plan = EpochPlan(steps, PRINT_FREQ, args.channels_last)
    cuda = device.type == "cuda"
    previous = torch.cuda.get_sync_debug_mode() if cuda else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not one per source line
        ledger.caught = caught
        try:
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            with HostReadCounter(ledger):
                train_one_epoch(step, loader, ctx, plan, hooks=[guard], progress=_SilentProgress())
        finally:
            if cuda:  # back to what it was (normally "default"), also after an error such as out of memory
                torch.cuda.set_sync_debug_mode(previous)
        ledger.settle()
    settings = {"channels_last": args.channels_last, "fold_bn": False, "compile": False,
                "optimizer": _optimizer_name(optimizer), "precision": precision.name,
                "loss_scaler": precision.scaler is not None, "loop": "engine.loop.train_one_epoch"}
    return ledger, steps, settings, cuda


def summarize(ledger: StepLedger, steps: int, cuda: bool) -> dict:
    """The "sync_debug" block of the JSON: counts at print steps (where the loop may read the device: every
    PRINT_FREQ-th step and the last) and outside them (where the goal is 0)."""
    printing = {i for i in range(steps) if (i + 1) % PRINT_FREQ == 0 or i + 1 == steps}
    quiet = [i for i in range(steps) if i not in printing]
    reads_out = sum(ledger.reads[i] for i in quiet)
    syncs_out = sum(ledger.syncs[i] for i in quiet) if cuda else None
    # Where the quiet steps did read or sync: the first place to look when the goal is missed.
    offenders = {str(i): {"host_reads": ledger.reads[i], "cuda_syncs": ledger.syncs[i] if cuda else None}
                 for i in quiet if ledger.reads[i] or ledger.syncs[i]}
    return {
        "steps": steps, "print_freq": PRINT_FREQ,
        "host_reads_outside_print_steps": reads_out,
        "host_reads_at_print_steps": sum(ledger.reads[i] for i in printing),
        "cuda_syncs_outside_print_steps": syncs_out,
        "cuda_syncs_at_print_steps": sum(ledger.syncs[i] for i in printing) if cuda else None,
        "syncs_per_step": (syncs_out if cuda else reads_out) / steps,
        "host_reads_around_epoch": ledger.reads["before"] + ledger.reads["after"],
        "cuda_syncs_around_epoch": ledger.syncs["before"] + ledger.syncs["after"] if cuda else None,
        "quiet_steps_with_reads_or_syncs": offenders,
    }
