"""`xception eval --report` and `--calibrate`: the per-class table, the summary, the binary curves and
operating points, ECE and the temperature, group-level results; every figure equal to scikit-learn's (or
the textbook formula) on the written predictions.csv, the same rows from one and two processes."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, classification_report, f1_score,
                             roc_auc_score)

from conftest import one_line_error, run_cli
from xception import analysis
from xception.evalreport import Evaluated, write_report


def ece_by_hand(probs, targets, bins=15):
    """Guo et al.'s ECE, written out: bins (k/B, (k+1)/B] of the top probability."""
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == targets
    total = 0.0
    for k in range(bins):
        inside = (conf > k / bins) & (conf <= (k + 1) / bins)
        if k == 0:
            inside |= conf == 0
        if inside.any():
            total += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    return total


def read_predictions(folder):
    with open(os.path.join(folder, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    names = [k[len("prob_"):] for k in rows[0] if k.startswith("prob_")]
    probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    targets = np.array([names.index(r["label"]) for r in rows])
    return rows, names, probs, targets


def check_against_sklearn(folder, positive=None):
    """The report's summary.json and per_class.csv against scikit-learn on its own predictions.csv."""
    rows, names, probs, targets = read_predictions(folder)
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    pred = probs.argmax(axis=1)
    assert [r["pred"] for r in rows] == [names[p] for p in pred]
    assert [r["correct"] for r in rows] == [str(int(p == t)) for p, t in zip(pred, targets)]
    ref = classification_report(targets, pred, labels=range(len(names)), output_dict=True, zero_division=0)
    with open(os.path.join(folder, "per_class.csv")) as f:
        table = list(csv.DictReader(f))
    for c, row in enumerate(table):
        assert row["class"] == names[c] and int(row["support"]) == ref[str(c)]["support"]
        for key in ("precision", "recall", "f1"):
            assert float(row[key]) == pytest.approx(ref[str(c)][key if key != "f1" else "f1-score"], abs=1e-6)
    assert summary["macro_f1"] == pytest.approx(ref["macro avg"]["f1-score"], abs=1e-6)
    assert summary["weighted_f1"] == pytest.approx(ref["weighted avg"]["f1-score"], abs=1e-6)
    assert summary["top1"] == pytest.approx(np.mean(pred == targets), abs=1e-6)
    assert summary["balanced_acc"] == pytest.approx(balanced_accuracy_score(targets, pred), abs=1e-6)
    assert summary["ece"] == pytest.approx(ece_by_hand(probs, targets), abs=1e-6)
    if len(names) == 2 or positive is not None:
        p = 1 if positive is None else names.index(positive)
        assert summary["roc_auc"] == pytest.approx(roc_auc_score(targets == p, probs[:, p]), abs=1e-6)
        assert summary["average_precision"] == pytest.approx(average_precision_score(targets == p, probs[:, p]),
                                                             abs=1e-6)
    elif len(set(targets)) == len(names):
        assert summary["roc_auc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr"), abs=1e-6)
    return summary, rows


# --- the figures, on made-up predictions ---

def made_up(n=60, classes=3, seed=0, scale=1.0):
    """Logits and labels drawn from the softmax of the logits (calibrated by construction), then scaled."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, classes))
    probs = analysis.softmax(logits)
    targets = np.array([rng.choice(classes, p=p) for p in probs])
    return logits * scale, targets


def test_report_equals_scikit_learn_on_its_predictions(tmp_path):
    logits, targets = made_up()
    paths = [f"img/{i}.png" for i in range(len(targets))]
    write_report(Evaluated(logits, targets, paths, ["a", "b", "c"]), str(tmp_path), None, 0.05, log=lambda *a: None)
    summary, rows = check_against_sklearn(tmp_path)
    assert [r["path"] for r in rows] == paths and summary["images"] == 60 and "curves" not in summary
    assert (tmp_path / "confusion.csv").is_file() and (tmp_path / "reliability.png").stat().st_size > 1000


def test_binary_operating_points(tmp_path):
    logits, targets = made_up(n=80, classes=2, seed=1)
    write_report(Evaluated(logits, targets, [f"{i}" for i in range(80)], ["real", "fake"]), str(tmp_path),
                 None, 0.1, log=lambda *a: None)
    summary, _ = check_against_sklearn(tmp_path)
    _, _, probs, targets = read_predictions(tmp_path)
    score, positive = probs[:, 1], targets == 1
    points = summary["operating_points"]
    at_fpr = points["fpr<=0.1"]
    picked = score >= at_fpr["threshold"]
    assert np.mean(picked[~positive]) <= 0.1 and at_fpr["recall"] == pytest.approx(np.mean(picked[positive]))
    # no threshold with FPR <= 0.1 reaches a higher recall
    assert all(np.mean(score[positive] >= t) <= at_fpr["recall"] + 1e-12 for t in score if np.mean(score[~positive] >= t) <= 0.1)
    best = points["best_f1"]
    assert best["f1"] == pytest.approx(max(f1_score(positive, score >= t) for t in score), abs=1e-9)
    eer = points["eer"]
    assert abs(eer["fpr"] - (1 - eer["recall"])) <= 2 / positive.sum() + 2 / (~positive).sum()
    assert (tmp_path / "roc_pr.png").stat().st_size > 1000


def test_group_level_auc_is_computed_from_the_mean_of_each_groups_probabilities(tmp_path):
    """Positive-class probabilities of six images in three groups, chosen so that groups and images
    disagree. Images: positives 0.9 0.1 0.2 0.3, negatives 0.6 0.7: 2 of the 8 pairs ranked right, AUC 0.25.
    Groups (mean): A (0.9, 0.1, 0.2) -> 0.4 and C (0.3) positive, B (0.6, 0.7) -> 0.65 negative: AUC 0."""
    p = np.array([0.9, 0.1, 0.2, 0.6, 0.7, 0.3])
    logits = np.log(np.stack([1 - p, p], axis=1))
    targets = np.array([1, 1, 1, 0, 0, 1])
    groups = ["A", "A", "A", "B", "B", "C"]
    summary = write_report(Evaluated(logits, targets, [f"{i}.png" for i in range(6)], ["neg", "pos"], groups),
                           str(tmp_path), None, 0.5, log=lambda *a: None)
    assert summary["roc_auc"] == pytest.approx(0.25)
    assert summary["groups"]["roc_auc"] == pytest.approx(0.0) and summary["groups"]["images"] == 3
    with open(tmp_path / "groups.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["label"]) for r in rows] == [("A", "pos"), ("B", "neg"), ("C", "pos")]
    assert [float(r["prob_pos"]) for r in rows] == pytest.approx([0.4, 0.65, 0.3])


def test_temperature_scaling_lowers_ece_of_an_overconfident_model_and_keeps_top1():
    logits, targets = made_up(n=400, classes=4, seed=2, scale=4.0)  # calibrated at T = 4
    t = analysis.fit_temperature(logits, targets)
    assert 2.5 < t < 6
    before = analysis.expected_calibration_error(analysis.softmax(logits), targets)[0]
    after = analysis.expected_calibration_error(analysis.softmax(logits, t), targets)[0]
    assert after < before / 2
    assert np.array_equal(analysis.softmax(logits, t).argmax(axis=1), logits.argmax(axis=1))


# --- end to end, from a trained checkpoint ---

@pytest.fixture(scope="module")
def calibrated(trained_run, tmp_path_factory):
    """eval --report --calibrate of the shared trained run, grouped by class folder: its output folder."""
    data, out, _ = trained_run
    folder = tmp_path_factory.mktemp("calibrated")
    one = run_cli("eval", "--data_path", data, "--resume", out / "checkpoint.pth.tar", "--workers", 0,
                  "--output-dir", folder, "--report", "--calibrate", "--group-regex", r"val/(\w+)/")
    assert one.returncode == 0, one.stderr
    assert "calibrate: temperature" in one.stdout and "top-1 unchanged" in one.stdout
    return folder


@pytest.mark.slow
def test_eval_report_and_calibrate_through_the_cli(trained_run, calibrated, tmp_path):
    data, out, _ = trained_run
    ckpt = out / "checkpoint.pth.tar"
    summary, rows = check_against_sklearn(calibrated)
    assert summary["groups"]["images"] == 3  # the class folders as groups
    assert summary["ece_before_calibration"] >= summary["ece"] - 1e-9
    weights = calibrated / "checkpoint-calibrated.pth.tar"
    t = torch.load(weights, map_location="cpu", weights_only=True)["args"]["temperature"]
    assert t == pytest.approx(summary["temperature"]) and t > 0
    two = run_cli("eval", "--data_path", data, "--resume", weights, "--workers", 0, "--nproc", 2,
                  "--output-dir", tmp_path / "two", "--report")
    assert two.returncode == 0, two.stderr
    assert f"temperature {t:.4g}" in two.stdout
    rows2, _, probs2, _ = read_predictions(tmp_path / "two")
    assert [r["path"] for r in rows2] == [r["path"] for r in rows]  # every image once, in the split's order
    _, _, probs1, _ = read_predictions(calibrated)
    assert np.allclose(probs2, probs1, atol=1e-5)  # the calibrated probabilities, from two processes
    again = one_line_error(run_cli("eval", "--data_path", data, "--resume", ckpt, "--workers", 0,
                                   "--output-dir", calibrated, "--calibrate"))
    assert "checkpoint-calibrated.pth.tar exists" in again and "never overwritten" in again
    line = one_line_error(run_cli("eval", "--data_path", data, "--resume", ckpt, "--workers", 0,
                                  "--output-dir", tmp_path / "x", "--report", "--positive", "wolf"))
    assert "--positive wolf: no such class" in line


@pytest.mark.slow
def test_the_temperature_travels_to_onnx_and_back(trained_run, calibrated, tmp_path):
    pytest.importorskip("onnxruntime")
    data, _, _ = trained_run
    calibrated = calibrated / "checkpoint-calibrated.pth.tar"
    onnx = tmp_path / "model.onnx"
    exported = run_cli("export", "--weights", calibrated, "--format", "onnx", "--out", onnx)
    assert exported.returncode == 0, exported.stderr
    import onnx as onnx_lib
    meta = json.loads({p.key: p.value for p in onnx_lib.load(str(onnx)).metadata_props}["xception"])
    t = torch.load(calibrated, map_location="cpu", weights_only=True)["args"]["temperature"]
    assert meta["temperature"] == pytest.approx(t)
    figures = {}
    for name, weights in (("ckpt", calibrated), ("onnx", onnx)):
        r = run_cli("eval", "--data_path", data, "--resume", weights, "--workers", 0, "--output-dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
        figures[name] = [line.split(": ", 1)[1] for line in r.stdout.splitlines() if " images: loss " in line][0]
    assert float(figures["onnx"].split()[1]) == pytest.approx(float(figures["ckpt"].split()[1]), rel=1e-4, abs=1e-4)
    pred = json.loads(run_cli("predict", os.path.join(data, "val"), "--weights", onnx, "--json").stdout)
    ref = json.loads(run_cli("predict", os.path.join(data, "val"), "--weights", calibrated, "--json").stdout)
    assert [p["top"][0]["probability"] for p in pred["predictions"]] == pytest.approx(
        [p["top"][0]["probability"] for p in ref["predictions"]], abs=1e-4)


def gathered_by_two_ranks(rows_of):
    """_gather_rows on two simulated ranks (threads) whose all_reduce sums what both hand in at each call."""
    import threading
    from types import SimpleNamespace
    from xception.engine.loop import _gather_rows
    barrier, calls, out = threading.Barrier(2), {}, {}

    def all_reduce(rank, tensor, op="sum"):
        key = len([k for k in calls if k[0] == rank])
        calls[(rank, key)] = tensor.clone()
        barrier.wait()
        both = [calls[(r, key)] for r in (0, 1)]
        result = torch.stack(both).max(0).values if op == "max" else both[0] + both[1]
        barrier.wait()
        tensor.copy_(result)
        return tensor

    def rank(r):
        ctx = SimpleNamespace(distributed=True, world_size=2, rank=r,
                              all_reduce=lambda t, op="sum": all_reduce(r, t, op))
        out[r] = _gather_rows(rows_of[r], ctx, torch.device("cpu"))
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(out[0], out[1])
    return out[0]


def test_gathered_rows_come_back_in_the_splits_order_or_in_rank_order():
    rows = torch.arange(10, dtype=torch.float32).view(5, 2)  # samples 0..4, two columns each
    # EvalSampler: rank 0 holds samples 0, 2, 4, rank 1 holds 1, 3 (in two batches)
    interleaved = gathered_by_two_ranks({0: [rows[0::2]], 1: [rows[1:2], rows[3:4]]})
    assert torch.equal(interleaved, rows)
    # a pipeline sharding otherwise (4 and 1 rows): rank 0's rows first, then rank 1's
    other = gathered_by_two_ranks({0: [rows[[4, 0, 1, 2]]], 1: [rows[[3]]]})
    assert torch.equal(other, rows[[4, 0, 1, 2, 3]])
