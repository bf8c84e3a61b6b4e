"""`xception eval --report` (per-class accuracy, confusion matrix) and `xception eval` of an exported .onnx.

The report files go to OUTPUT_DIR: per_class.csv (class, images, correct, accuracy), confusion.csv (for up
to 100 classes) and confusion.png (the full matrix for a few classes, the most confused pairs for many).
"""

from __future__ import annotations

import csv
import os
import time

from .config import UserError

CONFUSION_CSV_MAX_CLASSES = 100


def evaluate_and_report(model, loader, precision, ctx, channels_last: bool, progress=None) -> dict:
    """engine.evaluate's loss/top-1/top-5, plus the confusion matrix (summed over the processes)."""
    import torch
    from torch import nn

    from .data import to_device

    model.eval()
    from .checkpoint import unwrap

    device = ctx.device
    n = getattr(unwrap(model), "num_classes", None)  # known up front: a rank with no images still joins in
    confusion = torch.zeros(n * n, dtype=torch.float64, device=device) if n else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, (images, targets) in enumerate(loader):
            images = to_device(images, device, channels_last)
            targets = targets.to(device)
            with precision.autocast():
                logits = model(images)
            logits = logits.float().to(device)
            if confusion is None:
                n = logits.shape[1]
                confusion = torch.zeros(n * n, dtype=torch.float64, device=device)
            loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(targets[:, None])
            sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                                 torch.tensor(float(targets.numel()), dtype=torch.float64, device=device)])
            confusion += torch.bincount(targets * n + top[:, 0], minlength=n * n).double()
            if progress is not None:
                progress.update(i + 1)
    loss, top1, top5, count = ctx.all_reduce_sum(sums).tolist()
    matrix = ctx.all_reduce_sum(confusion).view(n, n).long().cpu() if confusion is not None else None
    count = max(count, 1)
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count),
            "confusion": matrix}


def write_report(val: dict, class_names: list, output_dir: str, title: str = "", log=print) -> dict:
    """per_class.csv, confusion.csv/.png; logs the worst classes and the most confused pairs."""
    matrix = val["confusion"].numpy()
    names = [str(c) for c in class_names]
    if matrix.shape[0] != len(names):
        raise UserError(f"the model has {matrix.shape[0]} classes, the data {len(names)}")
    per_class = os.path.join(output_dir, "per_class.csv")
    rows = []
    with open(per_class, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "images", "correct", "accuracy"])
        for i, name in enumerate(names):
            total, right = int(matrix[i].sum()), int(matrix[i, i])
            acc = 100.0 * right / total if total else float("nan")
            rows.append((acc, name, total))
            w.writerow([name, total, right, f"{acc:.3f}"])
    files = {"per_class": per_class}
    if len(names) <= CONFUSION_CSV_MAX_CLASSES:
        path = os.path.join(output_dir, "confusion.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted"] + names)
            for i, name in enumerate(names):
                w.writerow([name] + [int(v) for v in matrix[i]])
        files["confusion_csv"] = path
    from .plots import most_confused, write_confusion
    try:
        files["confusion_png"] = write_confusion(matrix, names, os.path.join(output_dir, "confusion.png"), title)
    except ImportError:
        log("confusion.png skipped: matplotlib is not installed (pip install matplotlib)")
    worst = sorted((r for r in rows if r[2]), key=lambda r: r[0])[:5]
    log("per-class top-1, lowest: " + ", ".join(f"{name} {acc:.1f}% of {n}" for acc, name, n in worst))
    pairs = most_confused(matrix, names, 5)
    if pairs:
        log("most confused (true -> predicted): " + ", ".join(f"{t} -> {p} x{c}" for c, t, p in pairs))
    log("report: " + ", ".join(files.values()))
    return files


def evaluate_onnx(cfg) -> dict:
    """`xception eval --weights model.onnx`: the exported graph on DATA/val, through onnxruntime, with the
    image size and crop the graph was exported with."""
    from . import report
    from .engine import Precision
    from .export import OnnxModel
    from .distributed import cleanup
    from .trainer import Run, _case_name

    if not os.path.isfile(cfg.resume):
        raise UserError(f"--weights {cfg.resume}: no such file")
    model = OnnxModel(cfg.resume)
    meta = model.meta
    if model.image_size:
        cfg.image_size = int(model.image_size)
    cfg.crop_pct = float(meta.get("crop_pct") or cfg.crop_pct)
    t_start = time.perf_counter()
    run = Run(cfg, need_train=False)
    ctx, log = run.ctx, run.log
    try:
        if ctx.distributed:
            raise UserError("evaluating an .onnx file runs in one process; leave out --nproc/torchrun")
        saved = meta.get("class_names")
        if saved is not None and list(saved) != list(run.classes):
            raise UserError(f"{cfg.resume}: exported for {len(saved)} classes that differ from the data's "
                            f"{len(run.classes)} class folders")
        log(f"eval {cfg.resume} with onnxruntime ({', '.join(model.session.get_providers())}), "
            f"{cfg.image_size} px, crop {cfg.crop_pct}")
        progress = report.Progress(ctx.is_main, len(run.val_loader), "eval", cfg.print_freq)
        t0 = time.perf_counter()
        val = evaluate_and_report(model, run.val_loader, Precision("cpu"), ctx, False, progress)
        progress.close()
        fps = val["count"] / (time.perf_counter() - t0)
        e2e = time.perf_counter() - t_start
        log(f"eval {cfg.resume} on {val['count']} images: loss {val['loss']:.4f} top1 {val['top1']:.3f} "
            f"top5 {val['top5']:.3f}")
        if getattr(cfg, "eval_report", False):
            write_report(val, run.classes, cfg.output_dir, os.path.basename(cfg.resume), log)
        log(report.result_block(fps, val["top1"], e2e))
        case = _case_name(cfg, 1, "eval")
        report.write_case_log(cfg.output_dir, case, {
            "Network": "Xception", "RankSize": 1, "BatchSize": cfg.batch_size, "DeviceType": "onnxruntime",
            "CaseName": case, "ActualFPS": f"{fps:.3f}", "TrainingTime": f"{cfg.batch_size * 1000 / fps:.3f}",
            "TrainAccuracy": f"{val['top1']:.3f}", "ActualLoss": f"{val['loss']:.4f}", "E2ETrainingTime": f"{e2e:.0f}",
        })
        return {k: v for k, v in val.items() if k != "confusion"} | {"fps": fps}
    finally:
        cleanup()
