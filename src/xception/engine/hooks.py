"""Hooks that act around the steps of an epoch (loop.Hook):

* `StepGuard` stops a run cleanly: on SIGTERM/SIGINT (preemption; SIGUSR1 too inside a SLURM job) after
  the current step, so that a checkpoint can record the position inside the epoch and every rank's random
  streams; and on non-finite losses, before anything is saved. All ranks agree on a stop with one small
  all-reduce, so they stop at the same step and none waits alone in a collective.
* `HeadOnly` trains only the classifier for the first --freeze-epochs epochs.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

from ..checkpoint import unwrap
from ..config import EXIT_NONFINITE, EXIT_PREEMPTED, UserError
from ..runtime import restore_rng
from .loop import Hook

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_signals() -> tuple:
    """The signals that stop a run after the current step: SIGTERM and SIGINT, and inside a SLURM job also
    SIGUSR1, the usual warning before a time limit (`sbatch --signal=USR1@120`, or B:USR1 forwarded by the
    batch script as examples/slurm/train.sbatch does)."""
    in_slurm = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    return SIGNALS + ((signal.SIGUSR1,) if in_slurm and hasattr(signal, "SIGUSR1") else ())
NEVER = 2 ** 62  # "no step went non-finite" in the guard's device flag
HEAD_MODULES = ("fc", "dropout", "global_pool")


class Preempted(UserError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_PREEMPTED)


class Diverged(UserError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_NONFINITE)


class StepGuard(Hook):
    """Watches the steps. The loss's finiteness is tracked on the device and read only at the loop's
    check steps (print steps and an epoch's last), so a non-finite loss stops the run at most a print
    interval later, and never before the step that went wrong is named. A signal is seen at once on one
    process, and at the next check step when there are several (they must agree)."""

    def __init__(self, ctx, loss_scaling: bool, max_nonfinite: int, log=print, accum: int = 1):
        self.ctx, self.log = ctx, log
        self.accum = accum  # a signal stops only where an optimizer step ends (no gradients half-accumulated)
        # Without loss scaling a non-finite loss has already reached the weights: stop at the first.
        self.limit = max_nonfinite if loss_scaling else 1
        self.loss_scaling = loss_scaling
        self.signal_name = None
        self.stop = None  # None, "signal" or "nonfinite"
        self.stop_step = None  # the step (1-based, of its epoch) at which the non-finite streak hit the limit
        self.steps_done = 0  # of the current epoch, counted from its start
        self.resume_rng = None  # the random streams to restore when an epoch starts part-way
        self._old = {}
        # on the device: current run of non-finite losses, and the step where it first reached the limit
        self._streak = torch.zeros((), dtype=torch.int64, device=ctx.device)
        self._hit = torch.full((), NEVER, dtype=torch.int64, device=ctx.device)

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
        if threading.current_thread() is threading.main_thread():
            for s in stop_signals():
                self._old[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    # steps

    def epoch_start(self, epoch: int) -> None:
        """The loader has been positioned (and a resumed epoch's first batches dropped): the random streams
        saved at the interruption come back now, so augmentation and dropout continue exactly."""
        if self.resume_rng is not None:
            restore_rng(self.resume_rng, self.ctx.device)
            self.resume_rng = None

    def after_step(self, step: int, loss: torch.Tensor, check: bool) -> bool:
        self.steps_done = step + 1
        finite = torch.isfinite(loss).all()
        self._streak = torch.where(finite, torch.zeros_like(self._streak), self._streak + 1)
        self._hit = torch.where((self._streak >= self.limit) & (self._hit == NEVER), step + 1, self._hit)
        at_boundary = (step + 1) % self.accum == 0
        if check or (self.signal_name and not self.ctx.distributed and at_boundary):
            return self._agree()
        return False

    def _agree(self) -> bool:
        """One read of the device (and one all-reduce with several processes): any rank's signal, and the
        earliest step at which any rank's non-finite streak reached the limit."""
        flags = torch.stack([-self._hit, torch.tensor(1 if self.signal_name else 0, device=self.ctx.device)])
        neg_hit, signalled = self.ctx.all_reduce(flags, "max").tolist()
        if -neg_hit < NEVER:
            self.stop, self.stop_step = "nonfinite", -neg_hit
        elif signalled:
            self.stop = "signal"
            self.signal_name = self.signal_name or "a signal on another rank"
        return self.stop is not None

    def diverged_message(self, epoch: int, ckpt_path: str | None, last_epoch_saved: int) -> str:
        where = f"epoch {epoch + 1} step {self.stop_step}"
        why = (f"for {self.limit} steps in a row (--max-nonfinite-steps {self.limit}), with fp16 loss scaling"
               if self.loss_scaling else "without loss scaling, so the weights are already damaged")
        kept = (f"the last good checkpoint {ckpt_path} (epoch {last_epoch_saved}) is kept unchanged"
                if ckpt_path else "no checkpoint had been written yet")
        return (f"the training loss is not finite at {where} ({why}); stopped without saving: {kept}; "
                f"lower --lr or add --warmup-epochs, then continue with --resume or start over")


class HeadOnly(Hook):
    """--freeze-epochs K: train only the classifier for the first K epochs, then the whole network.

    While frozen, the backbone's weights do not move and its BatchNorm layers use their running statistics
    (eval mode) and do not update them, so the new head learns on the features the pretrained weights give.
    On one process the backbone's parameters also stop requiring gradients (no backward through it: much
    faster). Under DistributedDataParallel the parameter set must not change after wrapping, so there the
    gradients are still computed and all-reduced, and dropped as each optimizer step begins: with `step`
    (the loop.Step that trains `model`) in its `before_update`, ahead of unscaling and --clip-grad-norm, so
    that the clip measures only the head's gradients, the ones applied; without it (a caller that steps
    `optimizer` itself) in an optimizer step pre-hook."""

    def __init__(self, model, optimizer, epochs: int, log=print, step=None):
        self.wrapped = model is not unwrap(model)
        self.inner = unwrap(model)
        self.optimizer, self.epochs, self.log, self.step = optimizer, epochs, log, step
        self.backbone = [p for name, p in self.inner.named_parameters() if name.split(".")[0] not in HEAD_MODULES]
        self.handles = []

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def epoch_start(self, epoch: int) -> None:
        want = epoch < self.epochs
        if want and not self.active:
            self._freeze()
            span = f"epoch {epoch + 1}" if epoch + 1 == self.epochs else f"epochs {epoch + 1}-{self.epochs}"
            self.log(f"{span}: training only the classifier (backbone frozen, BatchNorm statistics fixed); "
                     f"the whole network trains from epoch {self.epochs + 1}")
        elif not want and self.active:
            self.unfreeze()
            if epoch == self.epochs:
                self.log(f"epoch {epoch + 1}: backbone unfrozen, training the whole network")

    def _freeze(self) -> None:
        def backbone_eval(module, inputs):
            for name, child in module.named_children():
                if name not in HEAD_MODULES:
                    child.eval()

        def drop_backbone_grads(*_):
            for p in self.backbone:
                p.grad = None  # SGD skips a parameter without a gradient: no step, decay or momentum

        self.handles = [self.inner.register_forward_pre_hook(backbone_eval)]
        if self.step is not None:
            hooks = self.step.before_update
            hooks.append(drop_backbone_grads)

            class Handle:  # removable like torch's hook handles
                @staticmethod
                def remove():
                    hooks.remove(drop_backbone_grads)

            self.handles.append(Handle())
        else:
            self.handles.append(self.optimizer.register_step_pre_hook(drop_backbone_grads))
        if not self.wrapped:
            for p in self.backbone:
                p.requires_grad_(False)

    def unfreeze(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for p in self.backbone:
            p.requires_grad_(True)


def resume_position(ckpt, guard: StepGuard, ctx, log=print) -> int:
    """The step of the epoch a checkpoint stopped at (0 at an epoch's end); its random streams go to the
    guard, which restores them once the epoch's loader is positioned."""
    if ckpt.epoch_step and ckpt.rng:
        if len(ckpt.rng) == ctx.world_size:
            guard.resume_rng = ckpt.rng[ctx.rank]
        else:
            log(f"warning: the checkpoint was written by {len(ckpt.rng)} processes, this run has "
                f"{ctx.world_size}: the epoch continues at step {ckpt.epoch_step}, with fresh random "
                f"augmentation streams")
    return ckpt.epoch_step
