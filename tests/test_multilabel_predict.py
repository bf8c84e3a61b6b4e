"""`xception predict` and `export` on multi-label weights: a sigmoid per class, labels above a threshold,
and graph metadata that says so. The checkpoints are built without training: the classifier's weight is
zero and its bias fixed, so every image gets the same, known logits."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error, run_cli
from xception import cli
from xception.checkpoint import Checkpoint
from xception.model import Xception

CLASSES = ["cat", "dog", "fox"]
LOGITS = [3.0, -3.0, 0.5]  # sigmoid: ~0.953, ~0.047, ~0.622


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def save_checkpoint(path, args):
    """A 3-class checkpoint whose logits are LOGITS for any image."""
    torch.manual_seed(0)
    model = Xception(num_classes=len(CLASSES))
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor(LOGITS))
    Checkpoint(model=model.state_dict(), class_names=list(CLASSES), args=dict(args)).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(multi-label checkpoint, single-label checkpoint, an image)."""
    root = tmp_path_factory.mktemp("multilabel")
    multi = save_checkpoint(root / "multi.pth.tar", {"multi_label": True, "threshold": 0.5, "image_size": 71,
                                                     "crop_pct": 1.0})
    single = save_checkpoint(root / "single.pth.tar", {"image_size": 71, "crop_pct": 1.0})
    image = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(image)
    return multi, single, str(image)


def run_predict(capsys, *args):
    """(exit code, stdout, stderr) of `xception predict ARGS --device cpu` in this process."""
    code = cli.main(["predict", *map(str, args), "--device", "cpu"])
    out = capsys.readouterr()
    return code, out.out, out.err


def predict_json(capsys, *args):
    code, out, err = run_predict(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_multi_label_json_lists_the_labels_above_the_saved_threshold(files, capsys):
    multi, _, image = files
    result = predict_json(capsys, image, "--weights", multi)
    assert result["multi_label"] is True and result["threshold"] == 0.5
    (pred,) = result["predictions"]
    assert [t["class"] for t in pred["labels"]] == ["cat", "fox"]  # most probable first; dog (0.047) absent
    assert [t["index"] for t in pred["labels"]] == [0, 2]
    for entry, logit in zip(pred["labels"], (LOGITS[0], LOGITS[2])):
        assert entry["probability"] == pytest.approx(sigmoid(logit), abs=1e-4)
    # "top" is still the top-k, of sigmoid probabilities (which need not sum to 1)
    assert [t["class"] for t in pred["top"]] == ["cat", "fox", "dog"]
    assert pred["top"][2]["probability"] == pytest.approx(sigmoid(LOGITS[1]), abs=1e-4)


def test_the_threshold_flag_overrides_the_saved_one(files, capsys):
    multi, _, image = files
    result = predict_json(capsys, image, "--weights", multi, "--threshold", 0.9)
    assert result["threshold"] == 0.9
    assert [t["class"] for t in result["predictions"][0]["labels"]] == ["cat"]
    result = predict_json(capsys, image, "--weights", multi, "--threshold", 0.99)
    assert result["predictions"][0]["labels"] == []


def test_multi_label_text_output(files, capsys):
    multi, _, image = files
    code, out, err = run_predict(capsys, image, "--weights", multi)
    assert code == 0, err
    cat, fox = 100 * sigmoid(LOGITS[0]), 100 * sigmoid(LOGITS[2])
    assert out == f"{image}: cat {cat:.2f}%, fox {fox:.2f}%\n"
    code, out, err = run_predict(capsys, image, "--weights", multi, "--threshold", 0.99)
    assert code == 0, err
    assert out == f"{image}: (no label above 0.99)\n"


def test_single_label_weights_keep_softmax_and_their_output(files, capsys):
    _, single, image = files
    result = predict_json(capsys, image, "--weights", single, "--topk", 2)
    assert result["multi_label"] is False and result["threshold"] is None
    (pred,) = result["predictions"]
    assert set(pred) == {"path", "top"}  # no "labels" for single-label weights
    probs = torch.softmax(torch.tensor(LOGITS), 0).tolist()
    assert [t["class"] for t in pred["top"]] == ["cat", "fox"]
    assert [t["probability"] for t in pred["top"]] == [round(probs[0], 6), round(probs[2], 6)]
    code, out, err = run_predict(capsys, image, "--weights", single, "--threshold", 0.9)
    assert code == 0, err
    line = ", ".join(f"{CLASSES[i]} {100 * round(probs[i], 6):.2f}%" for i in (0, 2, 1))
    assert out == f"{image}: {line}\n"  # the format single-label predictions always had
    assert "--threshold applies to multi-label weights only" in err


def test_export_metadata_and_predict_on_the_graph(files, capsys, tmp_path):
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed: ONNX export and inference are not available")
    multi, single, image = files
    from xception.model.deploy import OnnxModel

    graph = tmp_path / "multi.onnx"
    assert cli.main(["export", "--weights", multi, "--format", "onnx", "--out", str(graph)]) == 0
    assert "multi-label: a sigmoid per class, threshold 0.5" in capsys.readouterr().out
    meta = OnnxModel(str(graph)).meta
    assert meta["multi_label"] is True and meta["threshold"] == 0.5 and "sigmoid" in meta["outputs"]
    ours = predict_json(capsys, image, "--weights", multi)["predictions"][0]
    got = predict_json(capsys, image, "--weights", graph)
    assert got["multi_label"] is True and got["threshold"] == 0.5
    labels = got["predictions"][0]["labels"]
    assert [t["class"] for t in labels] == [t["class"] for t in ours["labels"]] == ["cat", "fox"]
    assert [t["probability"] for t in labels] == pytest.approx([t["probability"] for t in ours["labels"]],
                                                               abs=1e-4)
    assert predict_json(capsys, image, "--weights", graph, "--threshold", 0.9)["predictions"][0]["labels"][0][
        "class"] == "cat"
    plain = tmp_path / "single.onnx"
    assert cli.main(["export", "--weights", single, "--format", "onnx", "--out", str(plain)]) == 0
    capsys.readouterr()
    meta = OnnxModel(str(plain)).meta
    assert meta["multi_label"] is False and meta["threshold"] == 0.5 and "softmax" in meta["outputs"]


def test_a_threshold_out_of_range_is_a_one_line_error(files):
    multi, _, image = files
    for bad in ("1.5", "0"):
        line = one_line_error(run_cli("predict", image, "--weights", multi, "--threshold", bad, "--device", "cpu"))
        assert f"--threshold must be in (0, 1), got {float(bad)}" in line
