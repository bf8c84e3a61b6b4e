"""`xception eval`: the one evaluation driver. It serves our checkpoints (or any weights file the model
reads) and exported .onnx graphs (run by onnxruntime), with or without --report (evalreport.py's files) and
--calibrate (a fitted temperature). The input size and crop are the weights' own unless a flag says otherwise. A checkpoint
holding an EMA is evaluated with the weights its run ranked higher (--raw-weights, --ema-weights choose);
--tta flip averages each image's logits with its mirror's (`FlipTTA`)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..config import Config, UserError
from ..model.deploy import Opened, open_weights
from ..model.weights import build_model, eval_settings, load_into, weights_choice
from ..analysis import expected_calibration_error, fit_temperature, softmax
from ..checkpoint import Checkpoint
from ..evalreport import Evaluated, image_groups, write_report
from ..runtime import rank_zero_log, synchronize
from .loop import evaluate, val_metrics
from .precision import Precision
from .setup import Run


def evaluate_weights(cfg: Config) -> dict:
    """Evaluate --resume/--weights on DATA/val; print the scores and the seed's result block; with --report
    write evalreport.py's files, with --calibrate fit a temperature and write a checkpoint carrying it."""
    t_start = time.perf_counter()
    if not cfg.resume:
        raise UserError("xception eval needs the weights to evaluate: --resume PATH (or --weights PATH)")
    what = open_weights(cfg.resume, cfg.image_size, choice=weights_choice(cfg.raw_weights, cfg.ema_weights),
                        arch=cfg.arch)
    arch = what.weights.arch if what.weights is not None else "xception"
    size, crop = eval_settings(what.saved, cfg.image_size, cfg.crop_pct, cfg.resume, rank_zero_log(), arch)
    calibrated = _calibrated_path(cfg, what)
    # Run checks its config again: it gets the file read (a published name is resolved to one), not the name
    run = Run(_labels_as_saved(cfg.replace(image_size=size, crop_pct=crop, resume=what.source), what.saved),
              need_train=False, kind="eval")
    try:
        run.check_classes(what.class_names, cfg.resume, (what.saved or {}).get("multi_label"))
        positive = _report_settings(run)
        model, precision, channels_last, device_type = _model(run, what)
        progress = run.report.progress(len(run.val_loader), "eval")
        t0 = time.perf_counter()
        val = evaluate(model, run.val_loader, run.ctx, precision, channels_last, _metrics(run), progress)
        progress.close()
        fps = val["count"] / (time.perf_counter() - t0)
        run.log(f"eval {cfg.resume}{_variant(what, run.cfg)} on {val['count']} images: loss {val['loss']:.4f} "
                + score_text(val, run.cfg))
        temperature = _calibrate(run, what, val, calibrated) if cfg.calibrate else run.cfg.temperature
        if cfg.eval_report and run.ctx.is_main:
            _report(run, val, temperature, positive, os.path.basename(cfg.resume))
        score = val["map"] if run.cfg.multi_label else val["top1"]
        result = {"fps": fps, "top1": score, "loss": val["loss"], "e2e_seconds": time.perf_counter() - t_start}
        run.report.finish(result, device_type, run.ctx.world_size)
        return {k: v for k, v in val.items() if k not in ("logits", "targets")} | {"fps": fps, "temperature": temperature}
    finally:
        run.close()


def score_text(val: dict, cfg: Config) -> str:
    """The scores of an evaluation as the result line shows them."""
    if cfg.multi_label:
        return (f"mAP {val['map']:.3f} f1_micro {val['f1_micro']:.3f} f1_macro {val['f1_macro']:.3f} "
                f"(threshold {cfg.threshold:g})")
    return f"top1 {val['top1']:.3f} top5 {val['top5']:.3f} balanced_acc {val['balanced_acc']:.3f}"


def _labels_as_saved(cfg: Config, saved: dict | None) -> Config:
    """Weights trained multi-label read their data as multi-label, at their own --threshold unless given;
    a calibrated checkpoint's (or graph's) temperature divides the logits."""
    saved = saved or {}
    given = cfg.explicit if cfg.explicit is not None else ("threshold",)
    threshold = cfg.threshold if "threshold" in given or "threshold" not in saved else float(saved["threshold"])
    return cfg.replace(multi_label=cfg.multi_label or bool(saved.get("multi_label")), threshold=threshold,
                       temperature=float(saved.get("temperature") or 1.0))


def _calibrated_path(cfg: Config, what: Opened) -> str | None:
    """Where --calibrate writes its checkpoint; refused before any work when it cannot be written."""
    if not cfg.calibrate:
        return None
    if what.weights is None or not what.weights.args:
        raise UserError(f"--calibrate {cfg.resume}: calibrates our checkpoints (it writes a copy carrying the "
                        f"temperature); give the checkpoint, not an exported graph or foreign weights")
    if cfg.multi_label or what.saved.get("multi_label"):
        raise UserError("--calibrate fits one softmax temperature: single-label runs only")
    stem = os.path.basename(what.source).split(".")[0]
    path = os.path.join(cfg.output_dir, f"{stem}-calibrated.pth.tar")
    if os.path.exists(path):
        raise UserError(f"--calibrate: {path} exists; it is never overwritten: move it or choose another "
                        f"--output-dir")
    return path


def _calibrate(run: Run, what: Opened, val: dict, out: str) -> float:
    """Fit the temperature on the evaluated logits (undoing the one they were read with), log the NLL and
    ECE before and after, and (main process) write the checkpoint with it."""
    raw = val["logits"] * run.cfg.temperature
    temperature = fit_temperature(raw, val["targets"])
    before = expected_calibration_error(softmax(raw, run.cfg.temperature), val["targets"])[0]
    after = expected_calibration_error(softmax(raw, temperature), val["targets"])[0]
    run.log(f"calibrate: temperature {temperature:.4f} (was {run.cfg.temperature:g}); ECE {100 * before:.2f}% -> "
            f"{100 * after:.2f}% on {len(raw)} images; top-1 unchanged")
    if run.ctx.is_main:
        ckpt = Checkpoint.load(what.source, "--weights")
        ckpt.args = dict(ckpt.args, temperature=temperature)
        ckpt.save(out)
        run.log(f"calibrate: wrote {out} (eval, predict and export apply its temperature)")
    return temperature


def _report_settings(run: Run) -> int | None:
    """Refuse report flags that do not fit the data before evaluating; the index of --positive (or None)."""
    if (run.cfg.group_by or run.cfg.group_regex) and run.val_loader.sample_names() is None:
        raise UserError("--group-by/--group-regex need the images' names: an image folder, a list file or a "
                        "dataset, not a shard set or --loader dali")
    name = run.cfg.positive
    if name is None:
        return None
    if name not in run.classes:
        raise UserError(f"--positive {name}: no such class; the classes are {', '.join(map(str, run.classes[:8]))}"
                        + (" ..." if len(run.classes) > 8 else ""))
    return list(run.classes).index(name)


def _metrics(run: Run) -> list:
    return val_metrics(run.ctx, run.cfg.multi_label, run.cfg.threshold, run.cfg.eval_report or run.cfg.calibrate)


def _report(run: Run, val: dict, temperature: float, positive: int | None, title: str) -> None:
    # a streamed split (shards, DALI) names its rows by position
    names = run.val_loader.sample_names() or [f"#{k}" for k in range(len(val["targets"]))]
    ev = Evaluated(val["logits"] * run.cfg.temperature, val["targets"], names, list(run.classes),
                   image_groups(run.cfg, names, run.val_loader.sample_groups()), run.cfg.multi_label,
                   run.cfg.threshold, temperature)
    before = run.cfg.temperature if run.cfg.calibrate else None
    write_report(ev, run.cfg.output_dir, positive, run.cfg.target_fpr, title, run.log, before)


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean of the logits of each image and of its left-right mirror. Images
    are NCHW (or channels_last, the same logical layout), so the mirror is a flip of the last dimension.
    `inner` may be an OnnxModel too: it is only called on tensors (and is then a plain attribute)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # averaged in float32: under fp16 autocast the two logits could overflow when added in half
        return (self.inner(x).float() + self.inner(x.flip(-1)).float()) / 2


def _variant(what: Opened, cfg: Config) -> str:
    """' (EMA weights, tta flip)' and the like for the result line, so that a figure names what made it."""
    parts = []
    if what.weights is not None and what.weights.variant is not None:
        parts.append("EMA weights" if what.weights.variant == "ema" else "trained weights")
    if cfg.tta:
        parts.append(f"tta {cfg.tta}")
    return f" ({', '.join(parts)})" if parts else ""


def _model(run: Run, what: Opened) -> tuple:
    """(callable model, precision, channels_last, device name for the case log)."""
    if what.graph is not None:
        if run.ctx.distributed:
            raise UserError("evaluating an .onnx file runs in one process; leave out --nproc/torchrun")
        run.log(f"eval {what.source} with onnxruntime ({', '.join(what.graph.session.get_providers())}), "
                f"{run.cfg.image_size} px, crop {run.cfg.crop_pct}")
        if run.cfg.raw_weights or run.cfg.ema_weights:
            run.log(f"note: --raw-weights/--ema-weights do not apply to {what.source}: a graph holds the "
                    f"weights it was exported with")
        return _tta(what.graph, run), Precision("cpu"), False, "onnxruntime"
    if what.weights.choice_note:
        run.log(what.weights.choice_note)
    net = build_model(None, len(run.classes), keras_exact=what.weights.keras_exact, arch=what.weights.arch)
    load_into(net, what.weights, allow_new_head=False, log=run.log)
    model = run.place(net, frozen=True)  # the weights stay fixed in an eval run
    if run.cfg.compile:
        _compile_warmup(model, run)
    return _tta(model, run), run.precision, run.channels_last, run.ctx.device.type


class Tempered(nn.Module):
    """The logits of `inner` divided by a calibrated temperature (the ranking, so top-1, is unchanged)."""

    def __init__(self, inner, temperature: float):
        super().__init__()
        self.inner, self.temperature = inner, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).float() / self.temperature


def _tta(model, run: Run):
    """The model as evaluated: wrapped for --tta (outside torch.compile, so the compiled graph is the plain
    model's and is reused for the mirror, which has the same shape), and for a calibrated temperature."""
    if run.cfg.tta not in (None, "flip"):
        raise UserError(f"--tta {run.cfg.tta}: unknown; the choice is flip")
    model = FlipTTA(model) if run.cfg.tta else model
    if run.cfg.temperature != 1.0:
        run.log(f"temperature {run.cfg.temperature:.4g} (a calibrated checkpoint): the logits are divided by it")
        model = Tempered(model, run.cfg.temperature)
    return model


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
