"""`xception eval --report`: the files that answer "how good, for which class, at which threshold, how
sure, for which group, and where wrong", written from every image's logits (analysis.py computes):

    summary.json         the run-level figures (and under "groups" the group-level ones)
    per_class.csv        one row per class: precision, recall, F1, support (multi-label also AP)
    predictions.csv      one row per image: path, label, pred, correct, prob_<class> for every class
    confusion.csv/.png   single-label: true class x predicted class
    roc_pr.png           binary (two classes or --positive): ROC and precision-recall curves, operating points
    reliability.png      single-label: accuracy against confidence, ECE (before and after a --calibrate)
    mistakes.png         the most confident mistakes, with their true and predicted labels
    groups.csv           with --group-by/--group-regex: one row per group, as predictions.csv
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np

from . import analysis, plots
from .config import UserError
from .files import write_text

CONFUSION_CSV_MAX_CLASSES = 100
MISTAKES_SHOWN = 16


@dataclass
class Evaluated:
    """Every image of an evaluation, in the split's order."""
    logits: np.ndarray | None  # N x C (None: a group level, whose probabilities are given)
    targets: np.ndarray  # N class indices, or N x C multi-hot
    paths: list
    classes: list
    groups: list | None = None  # each image's group (--group-by/--group-regex), or None
    multi_label: bool = False
    threshold: float = 0.5  # multi-label: a label is predicted above it
    temperature: float = 1.0  # logits are divided by it before the softmax/sigmoid

    def probabilities(self, temperature: float | None = None) -> np.ndarray:
        t = self.temperature if temperature is None else temperature
        return analysis.sigmoid(self.logits, t) if self.multi_label else analysis.softmax(self.logits, t)


def image_groups(cfg, paths: list, groups: list | None) -> list | None:
    """Each image's group: a list file's group column (--group-by group) or the first capture group (else
    the whole match) of --group-regex on its path; None without either flag."""
    if cfg.group_by:
        if cfg.group_by != "group":
            raise UserError(f"--group-by {cfg.group_by}: a list file's column to group by is `group`")
        if groups is None:
            raise UserError("--group-by group needs a CSV list file with a group column")
        return [g or f"(no group) {p}" for g, p in zip(groups, paths)]
    if not cfg.group_regex:
        return None
    try:
        pattern = re.compile(cfg.group_regex)
    except re.error as e:
        raise UserError(f"--group-regex {cfg.group_regex!r}: not a regular expression ({e})") from None
    out = []
    for path in paths:
        m = pattern.search(path)
        if m is None:
            raise UserError(f"--group-regex {cfg.group_regex!r} does not match {path}; every image needs a group")
        out.append(m.group(1) if m.groups() else m.group(0))
    return out


def write_report(ev: Evaluated, output_dir: str, positive: int | None, target_fpr: float, title: str = "",
                 log=print, before: float | None = None) -> dict:
    """Write the report's files into `output_dir`; returns the summary (what summary.json holds).
    `before`: the temperature before a calibration, whose ECE the summary and the diagram show too."""
    with warnings.catch_warnings():  # a tiny or one-class split: scikit-learn warns of undefined figures
        warnings.simplefilter("ignore")
        return _write_report(ev, output_dir, positive, target_fpr, title, log, before)


def _write_report(ev: Evaluated, output_dir: str, positive, target_fpr: float, title: str, log, before) -> dict:
    probs = ev.probabilities()
    summary, files = _level(ev, probs, ev.paths, "", output_dir, positive, target_fpr)
    if before is not None and not ev.multi_label:
        summary["ece_before_calibration"] = analysis.expected_calibration_error(ev.probabilities(before), ev.targets)[0]
        summary["temperature"] = ev.temperature
    if ev.groups is not None:
        names, mean, labels = analysis.by_group(probs, ev.targets, ev.groups)
        grouped = Evaluated(None, labels, names, ev.classes, None, ev.multi_label, ev.threshold)
        summary["groups"], more = _level(grouped, mean, names, "groups", output_dir, positive, target_fpr)
        files.update(more)
    files["summary"] = os.path.join(output_dir, "summary.json")
    write_text(files["summary"], json.dumps(_plain(summary), indent=1) + "\n")
    _pictures(ev, probs, summary, output_dir, title, files, log)
    _log_summary(summary, log)
    log("report: " + ", ".join(files.values()))
    return summary


def _level(ev: Evaluated, probs: np.ndarray, names: list, kind: str, output_dir: str, positive, target_fpr) -> tuple:
    """(summary, files) of one level: images (kind "") or groups (kind "groups", whose rows go to groups.csv)."""
    files = {}
    if ev.multi_label:
        table, summary = analysis.multilabel(probs, ev.targets, ev.threshold)
    else:
        table = analysis.per_class(probs, ev.targets)
        summary = analysis.summary(probs, ev.targets, positive, target_fpr)
    predictions = os.path.join(output_dir, "groups.csv" if kind else "predictions.csv")
    write_text(predictions, _predictions_csv(ev, probs, names, table["pred"], "group" if kind else "path"))
    files[kind + "_predictions" if kind else "predictions"] = predictions
    if not kind:
        files["per_class"] = os.path.join(output_dir, "per_class.csv")
        write_text(files["per_class"], _per_class_csv(ev, table))
    return summary, files


def _label_text(classes: list, target, multi_label: bool) -> str:
    if multi_label:
        return ";".join(str(c) for c, on in zip(classes, target) if on)
    return str(classes[int(target)])


def _predictions_csv(ev: Evaluated, probs: np.ndarray, names: list, pred, first: str) -> str:
    """One row per image (or group): the true label(s), the predicted one(s), whether they agree, and every
    class's probability at full precision (repr), so that scikit-learn on this file reproduces the report."""
    header = [first, "label", "pred", "correct"] + [f"prob_{c}" for c in ev.classes]
    lines = [_csv_line(header)]
    for k, name in enumerate(names):
        if ev.multi_label:
            label, guess = _label_text(ev.classes, ev.targets[k], True), _label_text(ev.classes, pred[k], True)
            correct = bool((pred[k] == ev.targets[k].astype(bool)).all())
        else:
            label, guess = _label_text(ev.classes, ev.targets[k], False), str(ev.classes[int(pred[k])])
            correct = int(pred[k]) == int(ev.targets[k])
        lines.append(_csv_line([name, label, guess, int(correct)] + [repr(float(p)) for p in probs[k]]))
    return "".join(lines)


def _per_class_csv(ev: Evaluated, table: dict) -> str:
    if ev.multi_label:
        lines = [_csv_line(["class", "support", "ap", "precision", "recall", "f1"])]
        for c, name in enumerate(ev.classes):
            ap = table["ap"][c]
            lines.append(_csv_line([name, int(table["support"][c]), "" if ap is None else repr(ap),
                                    *(repr(float(table[k][c])) for k in ("precision", "recall", "f1"))]))
        return "".join(lines)
    correct = np.bincount(ev.targets[table["pred"] == ev.targets], minlength=len(ev.classes))
    lines = [_csv_line(["class", "images", "correct", "accuracy", "precision", "recall", "f1", "support"])]
    for c, name in enumerate(ev.classes):
        n = int(table["support"][c])
        lines.append(_csv_line([name, n, int(correct[c]), f"{100 * correct[c] / n:.3f}" if n else "",
                                *(repr(float(table[k][c])) for k in ("precision", "recall", "f1")), n]))
    return "".join(lines)


def _pictures(ev: Evaluated, probs: np.ndarray, summary: dict, output_dir: str, title: str, files: dict,
              log) -> None:
    """confusion.csv and the PNGs (skipped with a line when matplotlib is missing)."""
    matrix = None
    if not ev.multi_label:
        from sklearn.metrics import confusion_matrix
        matrix = confusion_matrix(ev.targets, probs.argmax(axis=1), labels=np.arange(len(ev.classes)))
    if matrix is not None and len(ev.classes) <= CONFUSION_CSV_MAX_CLASSES:
        files["confusion_csv"] = os.path.join(output_dir, "confusion.csv")
        write_text(files["confusion_csv"], _csv_line(["true \\ predicted"] + [str(c) for c in ev.classes]) + "".join(
            _csv_line([name] + [int(v) for v in matrix[i]]) for i, name in enumerate(ev.classes)))
    try:
        import matplotlib  # noqa: F401  (optional: the `interop` extra)
    except ImportError:
        log("report pictures skipped: matplotlib is not installed (pip install matplotlib)")
        return
    png = lambda name: os.path.join(output_dir, name)  # noqa: E731
    if matrix is not None:
        files["confusion_png"] = plots.write_confusion(matrix, ev.classes, png("confusion.png"), title)
        _, bins = analysis.expected_calibration_error(probs, ev.targets)
        files["reliability"] = plots.write_reliability(bins, summary["ece"], png("reliability.png"), title)
        if summary.get("curves"):
            files["roc_pr"] = plots.write_roc_pr(summary["curves"], summary, png("roc_pr.png"), title)
    mistakes = _mistakes(ev, probs)
    if mistakes:
        files["mistakes"] = plots.write_contact_sheet(mistakes, png("mistakes.png"), "most confident mistakes")


def _mistakes(ev: Evaluated, probs: np.ndarray) -> list:
    """(path, caption) of the MISTAKES_SHOWN wrong images the model was surest of (multi-label: an image
    with any label wrong, sure by its most decided probability)."""
    if ev.multi_label:
        guesses = probs > ev.threshold
        wrong = np.flatnonzero((guesses != ev.targets.astype(bool)).any(axis=1))
        sure = np.abs(probs - 0.5).max(axis=1) + 0.5
    else:
        guesses = probs.argmax(axis=1)
        wrong = np.flatnonzero(guesses != ev.targets)
        sure = probs.max(axis=1)
    out = []
    for k in wrong[np.argsort(-sure[wrong], kind="stable")][:MISTAKES_SHOWN]:
        true = _label_text(ev.classes, ev.targets[k], ev.multi_label) or "-"
        guess = _label_text(ev.classes, guesses[k], ev.multi_label) or "-"
        if os.path.isfile(ev.paths[k]):
            out.append((ev.paths[k], f"true {true}\npred {guess} ({100 * sure[k]:.0f}%)"))
    return out


def _log_summary(summary: dict, log) -> None:
    keys = ("top1", "macro_f1", "weighted_f1", "balanced_acc", "roc_auc", "average_precision", "ece",
            "ece_before_calibration", "map", "f1_micro", "f1_macro")
    shown = [f"{k} {summary[k]:.4f}" for k in keys if isinstance(summary.get(k), float)]
    groups = summary.get("groups")
    if groups:
        shown.append(f"| {groups['images']} groups: " + " ".join(
            f"{k} {groups[k]:.4f}" for k in keys if isinstance(groups.get(k), float)))
    log("report: " + " ".join(shown))


def _plain(value):
    """JSON-ready: numpy scalars to Python numbers, the curves' arrays left out."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "curves"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _csv_line(values: list) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()
