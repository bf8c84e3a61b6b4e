"""`xception eval`: the one evaluation driver. It serves our checkpoints (or any weights file the model
reads) and exported .onnx graphs (run by onnxruntime), with or without --report (per-class accuracy and
the confusion matrix). The input size and crop are the weights' own unless a flag says otherwise."""

from __future__ import annotations

import os
import time

import torch

from ..config import Config, UserError
from ..model.deploy import Opened, open_weights
from ..model.weights import build_model, eval_settings, load_into
from ..report import write_eval_report
from ..runtime import rank_zero_log, synchronize
from .loop import Confusion, evaluate
from .precision import Precision
from .setup import Run


def evaluate_weights(cfg: Config) -> dict:
    """Evaluate --resume/--weights on DATA/val; print loss, top-1/top-5 and the seed's result block."""
    t_start = time.perf_counter()
    if not cfg.resume:
        raise UserError("xception eval needs the weights to evaluate: --resume PATH (or --weights PATH)")
    what = open_weights(cfg.resume, cfg.image_size)
    size, crop = eval_settings(what.saved, cfg.image_size, cfg.crop_pct, cfg.resume, rank_zero_log())
    run = Run(cfg.replace(image_size=size, crop_pct=crop), need_train=False, kind="eval")
    try:
        run.check_classes(what.class_names, cfg.resume)
        model, precision, channels_last, device_type = _model(run, what)
        extra = [Confusion(len(run.classes), run.ctx.device)] if cfg.eval_report else []
        progress = run.report.progress(len(run.val_loader), "eval")
        t0 = time.perf_counter()
        val = evaluate(model, run.val_loader, run.ctx, precision, channels_last, extra, progress)
        progress.close()
        fps = val["count"] / (time.perf_counter() - t0)
        run.log(f"eval {cfg.resume} on {val['count']} images: loss {val['loss']:.4f} top1 {val['top1']:.3f} "
                f"top5 {val['top5']:.3f}")
        if cfg.eval_report and run.ctx.is_main:
            write_eval_report(val["confusion"], run.classes, cfg.output_dir, os.path.basename(cfg.resume), run.log)
        result = {"fps": fps, "top1": val["top1"], "loss": val["loss"], "e2e_seconds": time.perf_counter() - t_start}
        run.report.finish(result, device_type, run.ctx.world_size)
        return {k: v for k, v in val.items() if k != "confusion"} | {"fps": fps}
    finally:
        run.close()


def _model(run: Run, what: Opened) -> tuple:
    """(callable model, precision, channels_last, device name for the case log)."""
    if what.graph is not None:
        if run.ctx.distributed:
            raise UserError("evaluating an .onnx file runs in one process; leave out --nproc/torchrun")
        run.log(f"eval {what.source} with onnxruntime ({', '.join(what.graph.session.get_providers())}), "
                f"{run.cfg.image_size} px, crop {run.cfg.crop_pct}")
        return what.graph, Precision("cpu"), False, "onnxruntime"
    net = build_model(None, len(run.classes), keras_exact=what.weights.keras_exact)
    load_into(net, what.weights, allow_new_head=False, log=run.log)
    model = run.place(net, frozen=True)  # the weights stay fixed in an eval run
    if run.cfg.compile:
        _compile_warmup(model, run)
    return model, run.precision, run.channels_last, run.ctx.device.type


@torch.no_grad()
def _compile_warmup(model, run: Run) -> None:
    """Compile on a synthetic batch of the val batches' shape before the clock starts, so that img/s never
    includes it and no val batch is spent on it."""
    size = run.cfg.image_size
    images = torch.zeros(run.val_loader.batch_size, 3, size, size, device=run.ctx.device)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.eval()
    t0 = time.perf_counter()
    with run.precision.autocast():
        model(images)
    synchronize(run.ctx.device)
    run.log(f"torch.compile: {time.perf_counter() - t0:.1f} s to compile for eval (not counted in img/s)")
