"""Everything a run shows and writes about itself, through one `Reporter`: progress on the terminal, the
epoch line, metrics.csv (written here and read here), TensorBoard scalars, the pictures (plots.py draws
them), and the seed's result block and ${CaseName}.log. Only the main process
reports; on the others every method is silent."""

from __future__ import annotations

import csv
import io
import os
import sys

from tqdm import tqdm

from . import plots
from .config import METRICS_NAME, UserError
from .files import write_text

METRICS_FIELDS = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_sec", "epoch_seconds",
                  "bad_images_skipped", "overflow_steps_skipped", "ema_top1", "ema_top5", "balanced_acc",
                  "map", "f1_micro", "f1_macro", "ema_map"]  # the last four: multi-label runs (in percent)
TENSORBOARD_DIR = "tensorboard"


class Progress:
    """A tqdm bar on a terminal; a plain line every `print_freq` iterations otherwise (logs, CI). With a
    TensorBoard writer (`board`), the values also go there at global step `base + step`."""

    def __init__(self, enabled: bool, total: int, desc: str, print_freq: int = 10, board=None, base: int = 0):
        self.enabled, self.total, self.desc, self.print_freq = enabled, total, desc, print_freq
        self.board, self.base = board, base
        self.stream = sys.stderr
        self.bar = None
        self.done = 0
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, step: int, **values) -> None:
        if not self.enabled:
            return
        if self.board is not None:
            for key, value in values.items():
                self.board.add_scalar(f"train/{key}", value, self.base + step)
        shown = {k: _fmt(k, v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(step - self.done)
            if shown:
                self.bar.set_postfix(shown, refresh=False)
        elif values and (step % self.print_freq == 0 or step == self.total):
            print(f"{self.desc} [{step}/{self.total}] " + " ".join(f"{k} {v}" for k, v in shown.items()),
                  file=self.stream, flush=True)
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(key: str, value) -> str:
    if key == "lr":
        return f"{value:.4g}"
    if key == "img_s":
        return f"{value:.1f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


FAULT_COLUMNS = {"bad_images_skipped": "skipped_images", "overflow_steps_skipped": "overflow_skipped_steps"}


def epoch_line(epoch: int, epochs: int, row: dict, faults: tuple = ()) -> str:
    """The epoch's summary line; `faults`: the FAULT_COLUMNS to show (always when non-zero)."""
    scores = " ".join(f"{key} {row[key]:.3f}" for key in ("top1", "top5", "balanced_acc", "map", "f1_micro",
                                                           "f1_macro") if row.get(key) is not None)
    line = (f"epoch {epoch}/{epochs}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} {scores}"
            f" lr {row['lr']:.4g} img/s {row['images_per_sec']:.1f} time {row['epoch_seconds']:.1f}s")
    if row.get("ema_top1") is not None:
        line += f" ema_top1 {row['ema_top1']:.3f} ema_top5 {row['ema_top5']:.3f}"
    if row.get("ema_map") is not None:
        line += f" ema_map {row['ema_map']:.3f}"
    for column, label in FAULT_COLUMNS.items():
        if column in row and (column in faults or row[column]):
            line += f" {label} {row[column]}"
    return line


def result_block(fps: float, top1: float, seconds: float) -> str:
    """The seed's three result lines, which its users' scripts grep for."""
    return (f"Final Performance images/sec : {fps:.3f}\n"
            f"Final Train Accuracy : {top1:.3f}\n"
            f"E2E Training Duration sec : {seconds:.0f}")


def case_name(template: str | None, batch_size: int, world_size: int, kind: str) -> str:
    template = template or "Xception_bs{bs}_{np}p_" + kind
    try:
        return template.format(bs=batch_size, np=world_size)
    except (KeyError, IndexError, ValueError):
        raise UserError(f"--case-name {template}: only {{bs}} and {{np}} may stand in braces")


def case_log(case: str, ranks: int, batch_size: int, device_type: str, result: dict) -> str:
    """The seed's ${CaseName}.log, one `key = value` per line. `result`: fps, top1, loss, e2e_seconds."""
    fps = result["fps"]
    values = {"Network": "Xception", "RankSize": ranks, "BatchSize": batch_size, "DeviceType": device_type,
              "CaseName": case, "ActualFPS": f"{fps:.3f}",
              "TrainingTime": f"{batch_size * 1000 / fps:.3f}" if fps else "inf",
              "TrainAccuracy": f"{result['top1']:.3f}", "ActualLoss": f"{result['loss']:.4f}",
              "E2ETrainingTime": f"{result['e2e_seconds']:.0f}"}
    return "".join(f"{key} = {value}\n" for key, value in values.items())


def read_metrics(path: str) -> dict:
    """metrics.csv -> {column: [float or None, ...]}, rows sorted by epoch (a resumed run may repeat one:
    the last row of an epoch wins)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; give the --output-dir of a training run (it holds {METRICS_NAME})")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_epoch = {}
    for row in rows:
        try:
            by_epoch[int(float(row["epoch"]))] = row
        except (KeyError, TypeError, ValueError):
            continue
    if not by_epoch:
        raise UserError(f"{path}: holds no epoch rows yet; plot after the first epoch has finished")
    ordered = [by_epoch[e] for e in sorted(by_epoch)]

    def num(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return None
    return {key: [num(r.get(key)) for r in ordered] for key in ordered[0]}


def append_metrics(path: str, row: dict) -> None:
    """Add one row; the whole file is rewritten atomically, so a full disk never leaves a torn row."""
    old = ""
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = f.read()
    buffer = io.StringIO()
    # a file begun by an older version keeps its columns (a resumed run must not shift them)
    fields = next(csv.reader(io.StringIO(old)), None) if old else None
    writer = csv.DictWriter(buffer, fieldnames=fields or METRICS_FIELDS, extrasaction="ignore")
    if not old:
        writer.writeheader()
    writer.writerow(row)
    write_text(path, old + buffer.getvalue())


def curves(output_dir: str, out: str | None = None) -> str:
    """Draw OUTPUT_DIR/curves.png (or `out`) from the run's metrics.csv."""
    metrics = read_metrics(os.path.join(output_dir, METRICS_NAME))
    out = out or os.path.join(output_dir, plots.CURVES_NAME)
    plots.write_curves(metrics, os.path.abspath(output_dir), out)
    return out


class Reporter:
    """What one run reports, from its main process. `kind`: "acc" for training, "eval" for evaluation
    (the default case name's suffix, as in the seed)."""

    def __init__(self, cfg, ctx, kind: str, log=print):
        self.cfg, self.ctx, self.log, self.kind = cfg, ctx, log, kind
        self.main = ctx.is_main
        self.case = case_name(cfg.case_name, cfg.batch_size, ctx.world_size, kind)
        self.metrics_path = os.path.join(cfg.output_dir, METRICS_NAME)
        self.board = None
        if cfg.tensorboard and self.main and kind == "acc":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)")
            path = os.path.join(cfg.output_dir, TENSORBOARD_DIR)
            self.board = SummaryWriter(path)
            log(f"tensorboard: logging to {path} (view with: tensorboard --logdir {path})")

    def progress(self, total: int, desc: str, global_base: int = 0) -> Progress:
        return Progress(self.main, total, desc, self.cfg.print_freq, self.board, global_base)

    def epoch(self, row: dict, faults: tuple = ()) -> None:
        """The epoch line, a metrics.csv row and the epoch's TensorBoard scalars."""
        if not self.main:
            return
        self.log(epoch_line(row["epoch"], self.cfg.epochs, row, faults))
        append_metrics(self.metrics_path, row)
        if self.board is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"epoch/{key}", value, row["epoch"])
            self.board.flush()

    def finish(self, result: dict, device_type: str, ranks: int) -> None:
        """The seed's result block and ${CaseName}.log; after training also curves.png."""
        if not self.main:
            return
        self.log(result_block(result["fps"], result["top1"], result["e2e_seconds"]))
        if self.kind == "acc":
            self._curves_at_end()
        write_text(os.path.join(self.cfg.output_dir, f"{self.case}.log"),
                   case_log(self.case, ranks, self.cfg.batch_size, device_type, result))

    def _curves_at_end(self) -> None:
        try:
            import matplotlib  # noqa: F401  (optional: the `interop` extra)
        except ImportError:
            self.log(f"{plots.CURVES_NAME} skipped: matplotlib is not installed (pip install matplotlib)")
            return
        self.log(f"training curves: {curves(self.cfg.output_dir)}")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
