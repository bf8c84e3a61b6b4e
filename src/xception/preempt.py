"""Stopping a training run cleanly: on SIGTERM/SIGINT (preemption) after the current step, with a
checkpoint that records the position inside the epoch and the random streams, so --resume continues at
the exact iteration; and on non-finite losses, without overwriting the last good checkpoint."""

from __future__ import annotations

import itertools
import os
import random
import signal
import sys

import torch
from torch.utils.data import DistributedSampler

from .config import UserError

EXIT_NONFINITE = 3  # the loss stopped being finite: lower --lr, or resume from the last good checkpoint
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a resumable checkpoint; run again with --resume
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ResumableSampler(DistributedSampler):
    """torch's DistributedSampler that can start part-way through an epoch: `skip` samples of this rank's
    share are left out of the next pass (set after set_epoch), without loading them. Its length stays the
    whole epoch's, so step numbers keep counting from the epoch's start."""

    skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


def capture_rng(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng(ctx) -> list:
    """Every rank's random streams, in rank order (each rank augments with its own)."""
    mine = capture_rng(ctx.device)
    if not ctx.distributed:
        return [mine]
    out = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, mine)
    return out


class Preempted(UserError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_PREEMPTED)


class Diverged(UserError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_NONFINITE)


class StepGuard:
    """Watches a training run step by step. After every step all ranks agree (one tiny all-reduce) on
    whether to stop, so they stop at the same step and no rank waits alone in a collective."""

    def __init__(self, ctx, optimizer, loss_scaling: bool, max_nonfinite: int, log=print):
        self.ctx, self.log = ctx, log
        # Without loss scaling a non-finite loss has already reached the weights: stop at the first.
        self.limit = max_nonfinite if loss_scaling else 1
        self.loss_scaling = loss_scaling
        self.signal_name = None
        self.stop = None  # None, "signal" or "nonfinite"
        self.streak = 0
        self.steps_done = 0  # of the current epoch, counted from its start
        self.attempted = self.taken = 0
        self.resume_rng = None  # the random streams to restore when an epoch starts part-way
        self._old = {}
        optimizer.register_step_post_hook(self._count_step)

    def _count_step(self, *_):
        self.taken += 1

    @property
    def overflow_skipped(self) -> int:
        """Steps the fp16 loss scaler skipped (gradients overflowed) since the run started."""
        return self.attempted - self.taken

    # signals

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # asked twice: stop now, as without us
            self.uninstall()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signal_name = name
        if self.ctx.is_main:
            os.write(2, f"xception: {name} received: finishing the current step, then saving a resumable "
                        f"checkpoint (send it again to stop at once)\n".encode())

    def install(self) -> "StepGuard":
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    # steps

    def batches(self, loader, start_step: int):
        """The loader's batches from `start_step` of the epoch on: the sampler leaves the earlier samples
        out unread, or, for a loader without one that can, they are read and dropped. Then the random
        streams saved at the interruption come back, so augmentation and dropout continue exactly."""
        self.steps_done = start_step
        if not start_step:
            return loader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.skip = start_step * loader.batch_size
            self._restore()
            return loader
        return self._drop_then(loader, start_step)

    def _drop_then(self, loader, start_step: int):
        batches = iter(loader)
        for _ in range(start_step):
            next(batches, None)
        self._restore()
        yield from batches

    def _restore(self):
        if self.resume_rng is not None:
            restore_rng(self.resume_rng, self.ctx.device)
            self.resume_rng = None

    def after_step(self, step: int, loss: torch.Tensor) -> bool:
        """Called after step `step` (0-based, of the epoch); True when the run must stop now."""
        self.attempted += 1
        self.steps_done = step + 1
        finite = bool(torch.isfinite(loss).all())
        self.streak = 0 if finite else self.streak + 1
        flags = [1.0 if self.signal_name else 0.0, float(self.streak)]
        if self.ctx.distributed:
            t = torch.tensor(flags, dtype=torch.float64, device=self.ctx.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flags = t.tolist()
        self.streak = int(flags[1])
        if self.streak >= self.limit:
            self.stop = "nonfinite"
        elif flags[0]:
            self.stop = "signal"
            self.signal_name = self.signal_name or "a signal on another rank"
        return self.stop is not None

    def diverged_message(self, epoch: int, ckpt_path: str, last_epoch_saved) -> str:
        where = f"epoch {epoch + 1} step {self.steps_done}"
        why = (f"for {self.streak} steps in a row (--max-nonfinite-steps {self.limit}), with fp16 loss scaling"
               if self.loss_scaling else "without loss scaling, so the weights are already damaged")
        kept = (f"the last good checkpoint {ckpt_path} (epoch {last_epoch_saved}) is kept unchanged"
                if last_epoch_saved else "no checkpoint had been written yet")
        return (f"the training loss is not finite at {where} ({why}); stopped without saving: {kept}; "
                f"lower --lr or add --warmup-epochs, then continue with --resume or start over")


def resume_position(state: dict, guard: StepGuard, ctx, log=print) -> int:
    """The step of the epoch a checkpoint stopped at (0 at an epoch's end), and its random streams."""
    step = int(state.get("epoch_step") or 0)
    saved = state.get("rng")
    if step and saved:
        if len(saved) == ctx.world_size:
            guard.resume_rng = saved[ctx.rank]
        else:
            log(f"warning: the checkpoint was written by {len(saved)} processes, this run has {ctx.world_size}: "
                f"the epoch continues at step {step}, with fresh random augmentation streams")
    return step


def fault_counts(run, guard: StepGuard) -> tuple:
    """(images the loaders of this process skipped so far, steps the loss scaler skipped so far)."""
    loaders = [run.train_loader, run.val_loader]
    images = sum(ld.dataset.skipped() for ld in loaders if ld is not None and hasattr(ld.dataset, "skipped"))
    return images, guard.overflow_skipped


def fault_deltas(run, guard: StepGuard, before: tuple) -> dict:
    """This epoch's metrics.csv columns: bad images skipped (pre-scan and loaders, all processes) and
    steps the fp16 loss scaler skipped. Every process must call it (one all-reduce)."""
    images, overflow = fault_counts(run, guard)
    during = torch.tensor([float(images - before[0])], dtype=torch.float64, device=guard.ctx.device)
    during = int(guard.ctx.all_reduce_sum(during).item())
    return {"bad_images_skipped": run.bad_skipped + during, "overflow_steps_skipped": overflow - before[1]}


def fault_summary(row: dict, cfg, guard: StepGuard) -> str:
    out = ""
    if cfg.skip_bad_images or row["bad_images_skipped"]:
        out += f" skipped_images {row['bad_images_skipped']}"
    if guard.loss_scaling or row["overflow_steps_skipped"]:
        out += f" overflow_skipped_steps {row['overflow_steps_skipped']}"
    return out


def report_failed_ranks(failures: dict, nproc: int) -> int:
    """One line naming the process that failed first, from torchrun's failures {rank: ProcessFailure}.
    torchrun stops the survivors with SIGTERM, and they may then fail too, so those are named last."""
    codes = {rank: f.exitcode for rank, f in failures.items()}
    if len(set(codes.values())) == 1 and next(iter(codes.values())) in (EXIT_NONFINITE, EXIT_PREEMPTED):
        return next(iter(codes.values()))  # every rank stopped the same way and rank 0 has said why

    def how(f) -> str:
        return f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"

    first = min(failures, key=lambda r: (failures[r].exitcode == -signal.SIGTERM, failures[r].timestamp, r))
    others = [f"rank {r} {how(f)}" for r, f in sorted(failures.items()) if r != first]
    print(f"xception: error: rank {first} failed first: it {how(failures[first])} (its output is above)"
          + (f"; then {', '.join(others)}" if others else "") + f"; {len(failures)} of {nproc} processes failed",
          file=sys.stderr)
    return 1


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another process of the job went away (not a bug of this one)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(exc)
    return isinstance(exc, dist_error) or (isinstance(exc, RuntimeError) and (
        "gloo" in text or "Connection reset by peer" in text or "Connection closed by peer" in text))
