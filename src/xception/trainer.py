"""A whole run: set up, train epoch by epoch with checkpoints and reports, or evaluate a checkpoint."""

from __future__ import annotations

import math
import os
import random
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from . import checkpoint as ckpt
from . import datacheck, inputs, plots, preempt, prefetch, report
from .config import Config, UserError
from .data import FolderDataset, eval_transform, make_loader, scan_dataset, train_transform
from .distributed import DistContext, cleanup, convert_sync_batchnorm, setup
from .engine import evaluate, make_precision, train_one_epoch
from .finetune import HeadOnly
from .fuse import compile_frozen
from .observe import Board
from .weights import apply_saved_numerics
from .model import Xception

WARMUP_START_FACTOR = 0.01  # linear warm-up starts at 1% of --lr


def default_channels_last(device: torch.device) -> bool:
    # Measured on x86 CPUs (docs/performance.md): NHWC is 22-35% faster than NCHW for training here.
    # On CUDA it is the usual choice for autocast on tensor cores, but not measured by us yet
    # (benchmarks/gpu.sh measures both layouts); --no-channels-last overrides.
    return device.type in ("cpu", "cuda")


def build_scheduler(optimizer, cfg: Config, iters_per_epoch: int):
    """Linear warm-up then cosine to zero, stepped every iteration."""
    total = cfg.epochs * iters_per_epoch
    warmup = min(round(cfg.warmup_epochs * iters_per_epoch), total - 1)
    cosine = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    if warmup <= 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup)
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Each rank augments differently, each epoch differently, and the same again after a resume."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def seed_epoch(seed: int, ctx: DistContext, epoch: int, generator: torch.Generator, loader) -> None:
    s = epoch_seed(seed, ctx.rank, epoch)
    torch.manual_seed(s)  # dropout, and augmentation when loading in the main process
    random.seed(s)
    generator.manual_seed(s)  # shuffling and the seeds of the loader's workers
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output-dir {path}: cannot create it ({e.strerror})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path}: not writable; choose a folder you can write to")


class Run:
    """Everything a training or evaluation run holds; built once from the config."""

    def __init__(self, cfg: Config, need_train: bool):
        self.cfg = cfg
        self.ctx = setup(cfg.device, cfg.dist_backend)
        cfg.validate(self.ctx.world_size)
        self.log = print if self.ctx.is_main else (lambda *a, **k: None)
        if cfg.seed is None:
            seed = torch.tensor(random.SystemRandom().randrange(2**31), device="cpu")
            if self.ctx.distributed:  # every rank must agree on the seed
                seed = seed.to(self.ctx.device)
                torch.distributed.broadcast(seed, 0)
            cfg.seed = int(seed.item())
        if self.ctx.is_main:
            check_output_dir(cfg.output_dir)
        self.bad_skipped = 0  # files the pre-scan left out (--skip-bad-images)
        self.generator = torch.Generator()
        streamed = inputs.streamed_loaders(cfg, self.ctx, need_train, self.log)  # a shard set, --loader dali
        if streamed is not None:
            self.classes, self.train_loader, self.val_loader = streamed
        else:
            train_split, val_split = scan_dataset(cfg.data_path, need_train=need_train)
            if cfg.check_data:
                (train_split, val_split), self.bad_skipped = datacheck.screen(cfg, self.ctx,
                                                                              [train_split, val_split], self.log)
            self.classes = val_split.classes
            self.val_loader = make_loader(datacheck.guard(inputs.folder_dataset(val_split, cfg, train=False), cfg),
                                          cfg, self.ctx, train=False, generator=torch.Generator())
            self.train_loader = None
            if need_train:
                self.train_loader = make_loader(datacheck.guard(inputs.folder_dataset(train_split, cfg, train=True),
                                                                cfg), cfg, self.ctx, train=True, generator=self.generator)
        # on CUDA the next batch's host-to-device copy runs on a side stream during the current step
        self.train_loader = prefetch.for_device(self.train_loader, self.ctx.device)
        self.val_loader = prefetch.for_device(self.val_loader, self.ctx.device)
        self.channels_last = (default_channels_last(self.ctx.device) if cfg.channels_last is None
                              else cfg.channels_last)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = Xception(num_classes=len(self.classes), drop_rate=cfg.drop_rate)
        self.precision = make_precision(cfg, self.ctx.device, warn=self.log)

    def place_model(self, frozen: bool = False) -> nn.Module:
        """Move to the device and layout; wrap for data parallelism; with --compile, compile (`frozen`: for
        inference with fixed weights, fuse.compile_frozen). Returns the module to call."""
        model = self.model.to(self.ctx.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.ctx.distributed:
            if self.cfg.sync_bn:
                model = convert_sync_batchnorm(model, self.ctx.device)
                self.model = model
            ids = [self.ctx.device.index] if self.ctx.device.type in ("cuda", "npu") else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:  # lazy: the first call in each mode compiles, timed apart from img/s
            model = compile_frozen(model) if frozen else torch.compile(model)
        return model

    def check_classes(self, state: dict, source: str) -> None:
        saved = state.get("class_names")
        if saved is not None and list(saved) != list(self.classes):
            raise UserError(f"{source}: trained on {len(saved)} classes {_preview(saved)}, the data has "
                            f"{len(self.classes)} {_preview(self.classes)}; use --pretrained {source} "
                            f"to fine-tune on these classes")


def _preview(names) -> str:
    names = list(names)
    return "(" + ", ".join(map(str, names[:4])) + (", ..." if len(names) > 4 else "") + ")"


def _case_name(cfg: Config, world_size: int, kind: str) -> str:
    template = cfg.case_name or "Xception_bs{bs}_{np}p_" + kind
    try:
        return template.format(bs=cfg.batch_size, np=world_size)
    except (KeyError, IndexError, ValueError):
        raise UserError(f"--case-name {template}: only {{bs}} and {{np}} may stand in braces")


def train(cfg: Config) -> dict:
    """Train for cfg.epochs (resuming if asked), evaluating and checkpointing after every epoch."""
    t_start = time.perf_counter()
    if cfg.resume == "auto":  # for restarts (torchrun --max-restarts, requeued jobs): resume if there is one
        found = os.path.join(cfg.output_dir, ckpt.CHECKPOINT_NAME)
        cfg.resume = found if os.path.isfile(found) else None
    run = Run(cfg, need_train=True)
    ctx, log = run.ctx, run.log
    guard = board = None
    try:
        case = _case_name(cfg, ctx.world_size, "acc")
        ckpt_path = os.path.join(cfg.output_dir, ckpt.CHECKPOINT_NAME)
        if os.path.exists(ckpt_path) and not (cfg.resume and os.path.exists(cfg.resume)
                                               and os.path.samefile(cfg.resume, ckpt_path)):
            raise UserError(f"--output-dir {cfg.output_dir}: already holds {ckpt.CHECKPOINT_NAME}; continue it "
                            f"with --resume {ckpt_path}, or choose another --output-dir")
        if cfg.pretrained:
            from .weights import create_model
            run.model = create_model(len(run.classes), weights=cfg.pretrained, drop_rate=cfg.drop_rate, log=log,
                                     flag="--pretrained")
        model = run.place_model()
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        iters = len(run.train_loader)
        if cfg.steps_per_epoch:
            iters = min(iters, cfg.steps_per_epoch)
        scheduler = build_scheduler(optimizer, cfg, iters)
        guard = preempt.StepGuard(ctx, optimizer, run.precision.scaler is not None, cfg.max_nonfinite_steps, log)
        freezer = HeadOnly(model, optimizer, cfg.freeze_epochs, log)  # --freeze-epochs
        board = Board(cfg.tensorboard and ctx.is_main, cfg.output_dir, iters, log)  # --tensorboard
        start_epoch, start_step, best_top1 = 0, 0, -math.inf
        if cfg.resume:
            state = ckpt.load_checkpoint(cfg.resume)
            run.check_classes(state, cfg.resume)
            ckpt.load_weights(ckpt.unwrap(model), ckpt.model_state(state), cfg.resume, allow_new_head=False)
            apply_saved_numerics(model, state)
            try:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                if run.precision.scaler is not None and state.get("scaler"):
                    run.precision.scaler.load_state_dict(state["scaler"])
            except (KeyError, ValueError) as e:
                raise UserError(f"--resume {cfg.resume}: holds no resumable training state ({e}); "
                                f"use --pretrained to start a new run from its weights")
            start_epoch, best_top1 = int(state["epoch"]), float(state.get("best_acc1", -math.inf))
            start_step = preempt.resume_position(state, guard, ctx, log)
            log(f"resumed from {cfg.resume}: epoch {start_epoch} done"
                + (f" and {start_step} steps of epoch {start_epoch + 1}" if start_step else "")
                + f", best top-1 {best_top1:.3f}")
            if start_epoch >= cfg.epochs:
                raise UserError(f"--resume {cfg.resume}: already trained {start_epoch} epochs; "
                                f"raise --epochs above {start_epoch} to train further")
        log(f"training on {ctx.world_size} x {ctx.device.type} ({run.precision.name}, "
            f"{'channels_last' if run.channels_last else 'NCHW'}{', compiled' if cfg.compile else ''}), "
            f"{len(run.train_loader.dataset)} train / "
            f"{len(run.val_loader.dataset)} val images, {len(run.classes)} classes, "
            f"global batch {cfg.batch_size}, {iters} iterations per epoch")

        metrics_path = os.path.join(cfg.output_dir, "metrics.csv")
        fps_images = fps_seconds = 0.0
        last = None
        end_epoch = min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs)
        if start_epoch >= end_epoch:
            raise UserError(f"--stop-after-epochs {cfg.stop_after_epochs}: the checkpoint has already "
                            f"trained {start_epoch} epochs; raise it or leave it out")
        saved_epoch = start_epoch if cfg.resume else 0

        def state(epoch: int, **extra) -> dict:
            return {
                "format": ckpt.FORMAT, "arch": "xception", "epoch": epoch,
                "model": ckpt.clean_state_dict(ckpt.unwrap(model).state_dict()),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": run.precision.scaler.state_dict() if run.precision.scaler else None,
                "best_acc1": best_top1, "args": cfg.to_dict(), "class_names": list(run.classes),
                "keras_exact": bool(getattr(ckpt.unwrap(model), "keras_exact", False)), **extra,
            }

        guard.install()
        for epoch in range(start_epoch, end_epoch):
            seed_epoch(cfg.seed, ctx, epoch, run.generator, run.train_loader)
            progress = report.Progress(ctx.is_main, iters, f"epoch {epoch + 1}/{cfg.epochs}", cfg.print_freq)
            progress = board.wrap(progress, epoch)
            freezer.set_epoch(epoch)
            counts_before = preempt.fault_counts(run, guard)
            stats = train_one_epoch(model, run.train_loader, criterion, optimizer, scheduler, run.precision,
                                    ctx, cfg, progress, run.channels_last, start_step=start_step, guard=guard)
            start_step = 0
            progress.close()
            if cfg.compile and epoch == start_epoch:
                log(f"torch.compile: the first step took {stats.first_step_seconds:.1f} s (compilation, not "
                    f"counted in img/s)")
            if guard.stop == "nonfinite":  # the weights may be damaged: keep the last checkpoint as it is
                raise preempt.Diverged(guard.diverged_message(epoch, ckpt_path, saved_epoch))
            if guard.stop == "signal":
                rng = preempt.gather_rng(ctx)
                if ctx.is_main:
                    ckpt.save_atomic(state(epoch, epoch_step=guard.steps_done, rng=rng), ckpt_path)
                ctx.barrier()
                raise preempt.Preempted(f"stopped by {guard.signal_name} at epoch {epoch + 1} step "
                                        f"{guard.steps_done}/{iters}; saved {ckpt_path}; continue from that "
                                        f"step with the same flags and --resume {ckpt_path}")
            val = evaluate(model, run.val_loader, run.precision, ctx, run.channels_last)
            fps_images += stats.images_per_sec * stats.seconds
            fps_seconds += stats.seconds
            last = {"epoch": epoch + 1, "train_loss": stats.loss, "val_loss": val["loss"], "top1": val["top1"],
                    "top5": val["top5"], "lr": optimizer.param_groups[0]["lr"],
                    "images_per_sec": stats.images_per_sec, "epoch_seconds": stats.seconds,
                    **preempt.fault_deltas(run, guard, counts_before)}
            is_best = val["top1"] > best_top1
            best_top1 = max(best_top1, val["top1"])
            if ctx.is_main:
                log(report.epoch_line(epoch + 1, cfg.epochs, last) + preempt.fault_summary(last, cfg, guard))
                report.append_metrics(metrics_path, last)
                board.epoch(last)
                ckpt.save_atomic(state(epoch + 1), ckpt_path)
                saved_epoch = epoch + 1
                if is_best:
                    ckpt.copy_atomic(ckpt_path, os.path.join(cfg.output_dir, ckpt.BEST_NAME))
            ctx.barrier()

        e2e = time.perf_counter() - t_start
        fps = fps_images / fps_seconds if fps_seconds else 0.0
        result = {"fps": fps, "top1": last["top1"], "top5": last["top5"], "loss": last["train_loss"],
                  "e2e_seconds": e2e, "checkpoint": ckpt_path, "metrics": metrics_path}
        if ctx.is_main:
            log(report.result_block(fps, last["top1"], e2e))
            plots.curves_at_end(cfg.output_dir, log)
            report.write_case_log(cfg.output_dir, case, {
                "Network": "Xception", "RankSize": ctx.world_size, "BatchSize": cfg.batch_size,
                "DeviceType": ctx.device.type, "CaseName": case, "ActualFPS": f"{fps:.3f}",
                "TrainingTime": f"{cfg.batch_size * 1000 / fps:.3f}" if fps else "inf",
                "TrainAccuracy": f"{last['top1']:.3f}", "ActualLoss": f"{last['train_loss']:.4f}",
                "E2ETrainingTime": f"{e2e:.0f}",
            })
        return result
    finally:
        if guard is not None:
            guard.uninstall()
        if board is not None:
            board.close()
        cleanup()


@torch.no_grad()
def compile_warmup(model: nn.Module, run: Run, log) -> None:
    """Compile on one val-shaped batch before the clock starts, so that img/s never includes it."""
    from .data import to_device
    from .distributed import synchronize

    images, _ = next(iter(run.val_loader))
    model.eval()
    t0 = time.perf_counter()
    with run.precision.autocast():
        model(to_device(images, run.ctx.device, run.channels_last))
    synchronize(run.ctx.device)
    log(f"torch.compile: {time.perf_counter() - t0:.1f} s to compile for eval (not counted in img/s)")


def evaluate_checkpoint(cfg: Config) -> dict:
    """Evaluate the checkpoint given by --resume on DATA/val; print top-1/top-5 and the result block."""
    if not cfg.resume:
        raise UserError("xception eval needs the checkpoint to evaluate: --resume PATH (or --weights PATH)")
    if cfg.resume.lower().endswith(".onnx"):  # an exported graph, run by onnxruntime
        from .evalreport import evaluate_onnx
        return evaluate_onnx(cfg)
    t_start = time.perf_counter()
    run = Run(cfg, need_train=False)
    ctx, log = run.ctx, run.log
    try:
        case = _case_name(cfg, ctx.world_size, "eval")
        state = ckpt.load_checkpoint(cfg.resume)
        run.check_classes(state, cfg.resume)
        ckpt.load_weights(run.model, ckpt.model_state(state), cfg.resume, allow_new_head=False)
        apply_saved_numerics(run.model, state)
        model = run.place_model(frozen=True)  # the weights stay fixed in an eval run
        if cfg.compile:
            compile_warmup(model, run, log)
        progress = report.Progress(ctx.is_main, len(run.val_loader), "eval", cfg.print_freq)
        t0 = time.perf_counter()
        if cfg.eval_report:  # the same figures, plus the confusion matrix
            from .evalreport import evaluate_and_report, write_report
            val = evaluate_and_report(model, run.val_loader, run.precision, ctx, run.channels_last, progress)
        else:
            val = evaluate(model, run.val_loader, run.precision, ctx, run.channels_last, progress)
        progress.close()
        seconds = time.perf_counter() - t0
        fps = val["count"] / seconds
        e2e = time.perf_counter() - t_start
        if ctx.is_main:
            log(f"eval {cfg.resume} on {val['count']} images: loss {val['loss']:.4f} top1 {val['top1']:.3f} "
                f"top5 {val['top5']:.3f}")
            if cfg.eval_report:
                write_report(val, run.classes, cfg.output_dir, os.path.basename(cfg.resume), log)
            log(report.result_block(fps, val["top1"], e2e))
            report.write_case_log(cfg.output_dir, case, {
                "Network": "Xception", "RankSize": ctx.world_size, "BatchSize": cfg.batch_size,
                "DeviceType": ctx.device.type, "CaseName": case, "ActualFPS": f"{fps:.3f}",
                "TrainingTime": f"{cfg.batch_size * 1000 / fps:.3f}",
                "TrainAccuracy": f"{val['top1']:.3f}", "ActualLoss": f"{val['loss']:.4f}",
                "E2ETrainingTime": f"{e2e:.0f}",
            })
        return {**val, "fps": fps}
    finally:
        cleanup()
