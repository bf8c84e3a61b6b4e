"""What a run shows and writes: progress, one line and one metrics.csv row per epoch, the seed's result
block and its key = value summary file. Only the main process reports; the others stay silent."""

from __future__ import annotations

import csv
import os
import sys

from tqdm import tqdm

METRICS_FIELDS = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_sec", "epoch_seconds",
                  "bad_images_skipped", "overflow_steps_skipped"]


class Progress:
    """A tqdm bar on a terminal; a plain line every `print_freq` iterations otherwise (logs, CI)."""

    def __init__(self, enabled: bool, total: int, desc: str, print_freq: int = 10, stream=None):
        self.enabled, self.total, self.desc, self.print_freq = enabled, total, desc, print_freq
        self.stream = stream or sys.stderr
        self.bar = None
        self.done = 0
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, step: int, **values) -> None:
        if not self.enabled:
            return
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


def append_metrics(path: str, row: dict) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def epoch_line(epoch: int, epochs: int, row: dict) -> str:
    return (f"epoch {epoch}/{epochs}: train_loss {row['train_loss']:.4f} val_loss {row['val_loss']:.4f} "
            f"top1 {row['top1']:.3f} top5 {row['top5']:.3f} lr {row['lr']:.4g} "
            f"img/s {row['images_per_sec']:.1f} time {row['epoch_seconds']:.1f}s")


def result_block(fps: float, top1: float, seconds: float) -> str:
    """The seed's three result lines, which its users' scripts grep for."""
    return (f"Final Performance images/sec : {fps:.3f}\n"
            f"Final Train Accuracy : {top1:.3f}\n"
            f"E2E Training Duration sec : {seconds:.0f}")


def write_case_log(output_dir: str, case_name: str, values: dict) -> str:
    """The seed's ${CaseName}.log, one `key = value` per line."""
    path = os.path.join(output_dir, f"{case_name}.log")
    with open(path, "w") as f:
        for key, value in values.items():
            f.write(f"{key} = {value}\n")
    return path
