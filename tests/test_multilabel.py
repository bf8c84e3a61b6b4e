"""Several labels per image: list files with `a;b` label cells, the multi-label loss, mAP and F1 as
scikit-learn computes them, the best checkpoint by mAP, a bitwise resume after SIGTERM, the evaluation
in one and two processes, and the report's per-image predictions."""

import csv
import itertools
import json
import os
import random
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from conftest import one_line_error, read_metrics, run_cli
from test_faults_runtime import signal_after, start
from xception.config import EXIT_PREEMPTED, Config, UserError
from xception.data.listfile import read_list_file, read_list_splits
from xception.data.loaders import FolderDataset
from xception.data.transforms import build_transform, collate
from xception.engine.loop import MultiLabel
from xception.engine.loss import MultiLabelLoss
from xception.runtime import DistContext

NAMES = ["blue", "green", "red"]
# 16 train images, batch 4: 4 steps per epoch; one loader process, one thread: exact random streams
FLAGS = ["--image-size", "71", "--crop-pct", "1", "--batch-size", "4", "--workers", "0", "--seed", "5",
         "--print-freq", "1", "--epochs", "2", "--device", "cpu", "--lr", "0.05"]
ENV = {"OMP_NUM_THREADS": "1"}
# the multi-label ingredients that draw random numbers or carry state: mixup of multi-hot targets, the EMA
RECIPE = ["--loss", "asl", "--label-smoothing", "0.1", "--mixup", "0.4", "--ema", "--ema-decay", "0.5"]


def write_list(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "group"])
        writer.writerows(rows)
    return str(path)


def make_multilabel_list(root, n_train=16, n_val=8, seed=0, size=(80, 72)):
    """LIST.csv of images on which each class is a colour channel switched on (any subset, the empty one
    too): its label cell names the channels on, `;`-separated. Groups of two images."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    subsets = [s for r in range(4) for s in itertools.combinations(range(3), r)]
    rows = []
    for split, n, shift in (("train", n_train, 0), ("val", n_val, 3)):
        for i in range(n):
            on = subsets[(i + shift) % len(subsets)]
            img = rng.integers(0, 50, (size[1], size[0], 3)).astype(np.uint8)
            for c in on:
                img[..., 2 - c] += 180  # blue is channel 2, red channel 0
            path = f"img/{split}{i}.png"
            Image.fromarray(img).save(os.path.join(root, path))
            rows.append([path, ";".join(NAMES[c] for c in on), split, f"{split}{i // 2}"])
    return write_list(os.path.join(root, "list.csv"), rows)


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    return make_multilabel_list(tmp_path_factory.mktemp("multilabel"))


# --- the list, the targets and the batch ---

def test_a_semicolon_cell_makes_the_list_multi_label_with_tuples_of_classes(listed):
    train, val = read_list_file(listed)
    assert train.multi_label and val.multi_label and train.classes == NAMES
    with open(listed) as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    for (path, target), row in zip(train.samples, rows):
        assert path.endswith(row["path"]) and [NAMES[i] for i in target] == sorted(filter(None, row["label"].split(";")))
    assert () in [t for _, t in train.samples]  # the empty cell: an image without labels


def test_multi_hot_batches(listed):
    train, _ = read_list_file(listed)
    cfg = Config(image_size=71, crop_pct=1.0)
    dataset = FolderDataset(train, build_transform(cfg, False))
    images, targets = collate([dataset[i] for i in range(8)])
    assert images.shape == (8, 3, 71, 71) and targets.dtype == torch.float32 and targets.shape == (8, 3)
    expected = torch.zeros(8, 3)
    for row, (_, labels) in enumerate(train.samples[:8]):
        expected[row, list(labels)] = 1
    assert torch.equal(targets, expected)


def test_multi_label_flag_and_the_errors_name_the_row(tmp_path, listed):
    base = os.path.dirname(listed)
    one_each = write_list(tmp_path / "one.csv", [[os.path.join(base, "img/train1.png"), "blue", "train", ""],
                                                 [os.path.join(base, "img/train2.png"), "green", "train", ""],
                                                 [os.path.join(base, "img/val0.png"), "", "val", ""]])
    with pytest.raises(UserError, match=r"one.csv row 4: empty label"):
        read_list_file(one_each)
    _, val = read_list_splits(Config(data_path=one_each, multi_label=True), need_train=True)
    assert val.multi_label and val.samples[0][1] == ()
    only_val = write_list(tmp_path / "v.csv", [[os.path.join(base, "img/train1.png"), "blue;green", "train", ""],
                                               [os.path.join(base, "img/val0.png"), "green;red", "val", ""]])
    with pytest.raises(UserError, match=r"v.csv row 3: class 'red' is only in val"):
        read_list_file(only_val)
    with pytest.raises(UserError, match="several labels per image .* are read from a list file"):
        read_list_splits(Config(data_path=str(tmp_path), multi_label=True), need_train=True)


# --- the loss and the metrics ---

def test_bce_label_smoothing_pulls_targets_towards_one_half_and_asl_reduces_to_bce():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), (torch.rand(6, 4) > 0.5).float()
    smoothed = MultiLabelLoss(0.2)(logits, targets)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.1)
    assert torch.allclose(smoothed, manual)
    plain = MultiLabelLoss(0.0)(logits, targets)
    assert torch.allclose(MultiLabelLoss(asymmetric=True, gamma_neg=0, clip=0)(logits, targets), plain, atol=1e-6)
    # an easy negative (p < clip) costs nothing under ASL; under BCE it still does
    easy = torch.tensor([[-4.0]])
    assert MultiLabelLoss(asymmetric=True)(easy, torch.zeros(1, 1)).item() == 0
    assert MultiLabelLoss()(easy, torch.zeros(1, 1)).item() > 0


def test_map_and_f1_equal_scikit_learn():
    torch.manual_seed(1)
    logits = torch.randn(40, 5) * 2
    targets = (torch.rand(40, 5) > 0.6).float()
    targets[:, 3] = 0  # a class without positives: left out of mAP and macro F1
    metric = MultiLabel(torch.device("cpu"), threshold=0.4)
    for part in (slice(0, 16), slice(16, 40)):
        metric.update(logits[part], targets[part], None)
    out = metric.result(DistContext(torch.device("cpu")))
    y, s = targets.numpy().astype(bool), torch.sigmoid(logits).numpy()
    keep = y.any(axis=0)
    assert out["count"] == 40
    assert out["map"] == pytest.approx(100 * average_precision_score(y[:, keep], s[:, keep], average="macro"))
    assert out["f1_macro"] == pytest.approx(100 * f1_score(y[:, keep], s[:, keep] > 0.4, average="macro"))
    assert out["f1_micro"] == pytest.approx(100 * f1_score(y, s > 0.4, average="micro"))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert out["loss"] == pytest.approx(bce.item(), rel=1e-6)


# --- end to end: train, resume, evaluate, predict ---

@pytest.fixture(scope="module")
def trained(listed, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml-run")
    proc = run_cli("train", "--data_path", listed, "--output-dir", out, *FLAGS, *RECIPE, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_a_multi_label_run_ranks_its_epochs_by_map(trained):
    out, proc = trained
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["top1"] == "" and r["balanced_acc"] == "" for r in rows)
    scores = [max(float(r["map"]), float(r["ema_map"])) for r in rows]
    assert all(0 <= float(r[k]) <= 100 for r in rows for k in ("map", "f1_micro", "f1_macro"))
    assert re.search(r"epoch 2/2: train_loss [\d.]+ val_loss [\d.]+ map [\d.]+ f1_micro [\d.]+ f1_macro", proc.stdout)
    best = torch.load(out / "model_best.pth.tar", map_location="cpu", weights_only=True)
    assert best["best_acc1"] == pytest.approx(max(scores)) and best["args"]["multi_label"] is True
    assert best["epoch"] == 1 + scores.index(max(scores))


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_then_resume_is_bitwise_equal(listed, trained, tmp_path):
    step = random.Random().randint(1, 7)  # after batch `step` of 8 (2 epochs x 4)
    marker = f"epoch {1 + (step - 1) // 4}/2 [{(step - 1) % 4 + 1}/4]"
    out = tmp_path / "part"
    code, _, err = signal_after(start("train", "--data_path", listed, "--output-dir", out, *FLAGS, *RECIPE),
                                marker, signal.SIGTERM)
    assert code == EXIT_PREEMPTED and "Traceback" not in err, (marker, err)
    proc = run_cli("train", "--data_path", listed, "--output-dir", out, *FLAGS, *RECIPE, "--resume",
                   out / "checkpoint.pth.tar", env=ENV)
    assert proc.returncode == 0, proc.stderr
    full = torch.load(trained[0] / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    resumed = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    for part in ("model", "ema"):
        unequal = [k for k in full[part] if not torch.equal(full[part][k], resumed[part][k])]
        assert not unequal, f"{part}, interrupted after {marker}: {len(unequal)} tensors differ"
    assert [r["map"] for r in read_metrics(out)][-1] == read_metrics(trained[0])[-1]["map"]


@pytest.mark.slow
def test_eval_report_equals_scikit_learn_and_two_processes_agree(listed, trained, tmp_path):
    from xception.cli import config_from_args, build_parser
    ckpt = trained[0] / "model_best.pth.tar"
    args = build_parser().parse_args(["eval", "--data_path", listed, "--resume", str(ckpt), "--workers", "0",
                                      "--device", "cpu", "--output-dir", str(tmp_path), "--report",
                                      "--threshold", "0.6"])
    from xception.engine import evaluate_weights
    val = evaluate_weights(config_from_args(args))
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == val["count"] == 8
    scores = np.array([[float(r[f"prob_{n}"]) for n in NAMES] for r in rows])
    truth = np.array([[n in r["label"].split(";") for n in NAMES] for r in rows])
    keep = truth.any(axis=0)
    assert val["map"] == pytest.approx(100 * average_precision_score(truth[:, keep], scores[:, keep]), abs=1e-9)
    assert val["f1_micro"] == pytest.approx(100 * f1_score(truth, scores > 0.6, average="micro"), abs=1e-9)
    assert val["f1_macro"] == pytest.approx(100 * f1_score(truth[:, keep], scores[:, keep] > 0.6,
                                                           average="macro"), abs=1e-9)
    assert all(r["pred"] == ";".join(n for n, s in zip(NAMES, p) if s > 0.6) for r, p in zip(rows, scores))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["map"] == pytest.approx(val["map"] / 100, abs=1e-9)
    two = run_cli("eval", "--data_path", listed, "--resume", ckpt, "--workers", "0", "--device", "cpu",
                  "--nproc", "2", "--output-dir", tmp_path / "two", "--threshold", "0.6")
    assert two.returncode == 0, two.stderr
    assert f"on 8 images: loss {val['loss']:.4f} mAP {val['map']:.3f} f1_micro {val['f1_micro']:.3f} " \
           f"f1_macro {val['f1_macro']:.3f}" in two.stdout


@pytest.mark.slow
def test_multi_label_weights_refuse_single_label_data_and_flags_that_do_not_fit(listed, trained, shared_data,
                                                                               tmp_path):
    ckpt = trained[0] / "checkpoint.pth.tar"
    line = one_line_error(run_cli("eval", "--data_path", shared_data, "--resume", ckpt, "--workers", "0",
                                  "--output-dir", tmp_path))
    assert "several labels per image (--multi-label, or weights trained multi-label) are read from a list" in line
    line = one_line_error(run_cli("train", "--data_path", listed, "--output-dir", tmp_path, *FLAGS, "--loss", "ce"))
    assert "--loss ce is for single-label data" in line
    line = one_line_error(run_cli("train", "--data_path", listed, "--output-dir", tmp_path, *FLAGS,
                                  "--sampler", "balanced"))
    assert "--sampler balanced" in line and "multi-label" in line
    line = one_line_error(run_cli("train", "--data_path", shared_data, "--output-dir", tmp_path, *FLAGS,
                                  "--loss", "asl"))
    assert "--loss asl is for multi-label data" in line
    line = one_line_error(run_cli("prepare", "--data_path", listed, "--out", tmp_path / "shards"))
    assert "multi-label" in line and not (tmp_path / "shards").exists()


@pytest.mark.slow
def test_predict_names_every_label_above_the_threshold(listed, trained):
    image = os.path.join(os.path.dirname(listed), "img", "val0.png")
    proc = run_cli("predict", image, "--weights", trained[0] / "model_best.pth.tar", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    result = out["predictions"][0]
    above = sorted((t for t in result["top"] if t["probability"] > out["threshold"]),
                   key=lambda t: -t["probability"])
    assert out["multi_label"] is True and [t["class"] for t in result["labels"]] == [t["class"] for t in above]
