"""`xception export --int8`: onnxruntime's static quantization, calibrated on train images, checked on val,
refused in one line when top-1 drops more than --max-drop."""

import csv
import json
import os

import pytest
import torch

from conftest import make_image_folder, one_line_error, run_cli
from xception.checkpoint import Checkpoint
from xception.model.weights import build_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def tie(tmp_path_factory):
    """A checkpoint whose two logits differ by 1e-3 only (identical classifier rows, biases 0 and 1e-3): fp32
    always says b, while int8's output quantization rounds the two logits together (a tie: argmax a). Its
    list file's val rows are all b: fp32 top-1 100, int8 0. (checkpoint, list file)."""
    root = tmp_path_factory.mktemp("int8")
    data = make_image_folder(root / "data", classes=("a", "b"), n_train=4, n_val=3)
    rows = [[os.path.join(data, "train", c, f), c, "train"] for c in ("a", "b")
            for f in sorted(os.listdir(os.path.join(data, "train", c)))]
    rows += [[os.path.join(data, "val", "b", f), "b", "val"] for f in sorted(os.listdir(os.path.join(data, "val", "b")))]
    with open(root / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])
    torch.manual_seed(0)
    net = build_model(None, 2, arch="xception").eval()
    with torch.no_grad():
        net.fc.weight[1] = net.fc.weight[0]
        net.fc.bias[:] = torch.tensor([0.0, 1e-3])
    ckpt = root / "tie.pth.tar"
    Checkpoint(model=net.state_dict(), arch="xception", class_names=["a", "b"],
               args={"image_size": 71, "crop_pct": 1.0}).save(str(ckpt))
    return ckpt, root / "list.csv"


@pytest.mark.slow
def test_a_lossy_int8_graph_is_refused_and_the_default_fp32_classifier_keeps_it(tie, tmp_path):
    ckpt, listed = tie
    out = tmp_path / "model-int8.onnx"
    flags = ["export", "--weights", ckpt, "--format", "onnx", "--out", out, "--int8", "--calibration", listed,
             "--calibration-images", 8, "--max-drop", 0]
    # Every layer int8 (--int8-exclude none): the quantized logits tie, fp32 100 -> int8 0, refused.
    line = one_line_error(run_cli(*flags, "--int8-exclude", "none"))
    assert "--int8: top-1 dropped 100.000 points (fp32 100.000 -> int8 0.000), more than --max-drop 0" in line
    assert "was not written" in line and "--int8-exclude first,last" in line
    assert not out.exists() and not list(tmp_path.iterdir())
    # The default keeps the first convolution and the classifier fp32: the logits keep their 1e-3 gap.
    kept = run_cli(*flags)
    assert kept.returncode == 0, kept.stderr
    assert "kept fp32: first,last" in kept.stdout
    assert "int8: top-1 on 3 val images: fp32 100.000, int8 100.000, drop 0.000 points" in kept.stdout
    import onnx
    graph = onnx.load(str(out))
    meta = json.loads({p.key: p.value for p in graph.metadata_props}["xception"])
    assert meta["precision"] == "int8" and meta["class_names"] == ["a", "b"] and meta["image_size"] == 71
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    gemm = [n for n in graph.graph.node if n.op_type == "Gemm"]
    assert meta["fp32_layers"] == [convs[0].name, gemm[-1].name]
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    # the kept layers read fp32 weights (no DequantizeLinear before them); the other convolutions int8 ones
    for kept in (convs[0], gemm[-1]):
        assert producers.get(kept.input[1]) != "DequantizeLinear", kept.name
    assert producers.get(convs[1].input[1]) == "DequantizeLinear"
    ev = run_cli("eval", "--data_path", listed, "--weights", out, "--workers", 0, "--output-dir", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr
    assert "on 3 images: loss" in ev.stdout and " top1 100.000 " in ev.stdout  # the INT8 top-1 export printed
    again = one_line_error(run_cli(*flags))
    assert "exists" in again and out.exists()  # never written over


def test_int8_exclude_takes_first_last_or_none(tie, tmp_path):
    for bad in ("middle", "first,first", ""):
        line = one_line_error(run_cli("export", "--weights", tie[0], "--format", "onnx", "--out",
                                      tmp_path / "x.onnx", "--int8", "--calibration", tie[1], "--int8-exclude", bad))
        assert "--int8-exclude must be none or a comma list of first, last" in line, line
    assert not list(tmp_path.iterdir())


def test_int8_needs_calibration_data(tie, tmp_path):
    line = one_line_error(run_cli("export", "--weights", tie[0], "--format", "onnx", "--out", tmp_path / "x.onnx",
                                  "--int8"))
    assert "--int8 writes ONNX: give --format onnx and --calibration DATA" in line


@pytest.mark.slow
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_is_fed_batch_by_batch(tie, tmp_path, method):
    """The histogram methods go through onnxruntime's strided calibration (our reader's len and set_range),
    one batch of 8 at a time: without it they hold every activation of every image (22 GB at 299 px, 200
    images). 16 train images: two batches, merged into one histogram per tensor."""
    from xception.tools.quantize import _Batches

    reader = _Batches(torch.zeros(20, 3, 4, 4), "input")
    reader.set_range(1, 3)
    assert len(reader) == 3 and [b["input"].shape[0] for b in iter(reader.get_next, None)] == [8, 4]
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_train=8, n_val=2)
    out = tmp_path / f"{method}.onnx"
    proc = run_cli("export", "--weights", tie[0], "--format", "onnx", "--out", out, "--int8", "--calibration",
                   data, "--calibration-images", 16, "--calibration-method", method, "--max-drop", 100)
    assert proc.returncode == 0, proc.stderr
    assert f"int8: calibrating on 16 train images of {data} ({method}," in proc.stdout, proc.stdout
    import onnx
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["xception"])
    assert meta["precision"] == "int8" and meta["calibration_method"] == method
