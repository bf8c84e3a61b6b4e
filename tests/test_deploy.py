"""Fine-tune, predict, export and plot through the command line, as a user would, on CPU at 71 px."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, eval_figures, make_image_folder, one_line_error, run_cli

# The tests read the session's `trained_run` (2 epochs, 71 px, crop 1, TINY flags) and never write into it.
pytestmark = pytest.mark.slow


def own_settings(weights):
    """The line eval/predict/export print when they take the input size and crop from the weights."""
    return f"{weights}: input image size 71 (the weights' own), crop pct 1 (the weights' own)"


def png_size(path):
    with Image.open(path) as img:
        return img.size, len(np.unique(np.asarray(img.convert("L"))))


def test_training_writes_curves_and_plot_redraws_them(trained_run, tmp_path):
    _, out, proc = trained_run
    assert "training curves:" in proc.stdout
    (w, h), levels = png_size(out / "curves.png")
    assert w >= 600 and h >= 400 and levels > 20  # a real drawing, not a blank canvas
    redo = run_cli("plot", out, "--out", tmp_path / "again.png")
    assert redo.returncode == 0, redo.stderr
    assert (tmp_path / "again.png").stat().st_size > 10_000
    assert "metrics.csv" in one_line_error(run_cli("plot", tmp_path))


def test_finetune_on_other_classes_with_frozen_backbone_and_tensorboard(trained_run, tmp_path):
    _, out, _ = trained_run
    data2 = make_image_folder(tmp_path / "data2", classes=("left", "right"), seed=5)
    ft = tmp_path / "ft"
    proc = run_cli("train", "--data_path", data2, "--epochs", 1, "--freeze-epochs", 1, "--tensorboard",
                   "--pretrained", out / "checkpoint.pth.tar", "--output-dir", ft, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "loaded all but the classifier" in proc.stdout and "2-class classifier" in proc.stdout
    assert "training only the classifier" in proc.stdout
    before = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    after = torch.load(ft / "checkpoint.pth.tar", weights_only=True)
    assert after["class_names"] == ["left", "right"]
    assert after["model"]["fc.weight"].shape == (2, 2048)
    backbone = [k for k in before["model"] if not k.startswith("fc.")]
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in backbone)  # frozen, BN stats too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(ft / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/top1", "epoch/val_loss"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # 8 images, batch 4, --print-freq 1
    assert (ft / "curves.png").exists()


def test_predict_prints_class_names_and_skips_bad_files(trained_run, tmp_path):
    data, out, _ = trained_run
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.open(os.path.join(data, "val", "dog", "1.png")).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    proc = run_cli("predict", folder, tmp_path / "missing.png", "--weights", out / "checkpoint.pth.tar",
                   "--topk", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [os.path.basename(p["path"]) for p in result["predictions"]] == ["a.png", "b.jpg"]
    top = result["predictions"][0]["top"]
    assert len(top) == 2 and {t["class"] for t in top} <= {"cat", "dog", "fox"}
    # sorted probabilities (a model trained this briefly can be so sure that the runner-up rounds to 0)
    assert 1 >= top[0]["probability"] >= top[1]["probability"] >= 0 and top[0]["probability"] > 0
    assert result["image_size"] == 71  # the checkpoint's training size, not the default 299
    assert result["crop_pct"] == 1  # and its eval crop, not the default 0.8975
    assert own_settings(out / "checkpoint.pth.tar") in proc.stderr.splitlines()
    bad = {os.path.basename(e["path"]) for e in result["errors"]}
    assert bad == {"broken.jpg", "missing.png"}
    assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr
    text = run_cli("predict", folder / "a.png", "--weights", out / "checkpoint.pth.tar")
    assert text.returncode == 0 and text.stdout.startswith(str(folder / "a.png") + ": ")
    assert "unknown weights format" in one_line_error(run_cli("predict", folder / "a.png", "--weights",
                                                               folder / "broken.jpg"))


def test_predict_with_timm_weights_gives_timms_top5(tmp_path):
    timm = pytest.importorskip("timm")
    from xception.data.transforms import load_rgb, pil_eval

    torch.manual_seed(1)
    ref = timm.create_model("legacy_xception", pretrained=False).eval()
    with torch.no_grad():
        ref.fc.weight.mul_(50)
    torch.save(ref.state_dict(), tmp_path / "legacy_xception.pth")
    img = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(img)
    proc = run_cli("predict", img, "--weights", tmp_path / "legacy_xception.pth", "--image-size", 71, "--json")
    assert proc.returncode == 0, proc.stderr
    weights = tmp_path / "legacy_xception.pth"
    assert f"{weights}: input image size 71 (from the flag), crop pct 0.8975 (the default)" in proc.stderr
    ours = json.loads(proc.stdout)["predictions"][0]["top"]
    x = pil_eval(71, 0.8975)(load_rgb(str(img))).float()[None] / 127.5 - 1
    with torch.no_grad():
        probs = ref(x).softmax(1)[0]
    top5 = probs.topk(5)
    assert [t["index"] for t in ours] == top5.indices.tolist()
    assert np.allclose([t["probability"] for t in ours], top5.values.tolist(), atol=1e-5)
    names = [line for line in open(os.path.join(os.path.dirname(__import__("xception").__file__),
                                                "imagenet_classes.txt")).read().splitlines() if line]
    assert [t["class"] for t in ours] == [names[i] for i in top5.indices.tolist()]  # ImageNet names


def test_export_onnx_verifies_and_evaluates_like_pytorch(trained_run, tmp_path):
    data, out, _ = trained_run
    ckpt = out / "checkpoint.pth.tar"
    onnx_path = tmp_path / "xception.onnx"
    proc = run_cli("export", "--weights", ckpt, "--format", "onnx", "--out", onnx_path)  # any batch, by default
    assert proc.returncode == 0, proc.stderr
    assert "max |difference|" in proc.stdout and onnx_path.stat().st_size > 1_000_000
    assert "at batch 1 and 3" in proc.stdout and "input Nx3x71x71" in proc.stdout
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (1, 32):  # the plain onnxruntime session a user writes, at two batch sizes
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 71, 71)).astype(np.float32)
        assert session.run(None, {"input": x})[0].shape == (batch, 3)
    assert own_settings(ckpt) in proc.stdout.splitlines()  # the graph's metadata: 71 px, crop 1
    ev = {}
    for name, weights in (("torch", ckpt), ("onnx", onnx_path)):  # size and crop: the weights' own
        r = run_cli("eval", "--data_path", data, "--weights", weights, "--output-dir", tmp_path / name,
                    "--batch-size", 4, "--workers", 0, *(["--report"] if name == "onnx" else []))
        assert r.returncode == 0, r.stderr
        assert own_settings(weights) in r.stdout.splitlines()
        ev[name] = eval_figures(r)
    assert ev["torch"][0] == "9" and ev["onnx"][:1] + ev["onnx"][2:] == ev["torch"][:1] + ev["torch"][2:]
    # the folded graph in onnxruntime's kernels (chosen by CPU): the loss (~3e2 for this run) to rounding,
    # relative to its size, or to the printed 4 decimals
    assert float(ev["onnx"][1]) == pytest.approx(float(ev["torch"][1]), rel=1e-5, abs=1e-4)
    rows = list(csv.DictReader(open(tmp_path / "onnx" / "per_class.csv")))
    assert [r["class"] for r in rows] == ["cat", "dog", "fox"] and sum(int(r["images"]) for r in rows) == 9
    assert png_size(tmp_path / "onnx" / "confusion.png")[1] > 10
    pred = run_cli("predict", os.path.join(data, "val"), "--weights", onnx_path, "--json")
    ref = run_cli("predict", os.path.join(data, "val"), "--weights", ckpt, "--json")
    assert pred.returncode == 0 and ref.returncode == 0, pred.stderr + ref.stderr
    a, b = json.loads(pred.stdout)["predictions"], json.loads(ref.stdout)["predictions"]
    assert [p["top"][0]["class"] for p in a] == [p["top"][0]["class"] for p in b]


def test_export_torchscript_and_a_failed_verification(trained_run, tmp_path, monkeypatch):
    _, out, _ = trained_run
    import re
    from xception.config import UserError
    from xception.model.deploy import load_torchscript
    from xception.tools import export

    path = tmp_path / "xception.pt"
    lines = []
    err = export.export(str(out / "checkpoint.pth.tar"), "torchscript", str(path), log=lines.append)
    # BatchNorm folded: equal to rounding, relative to the logits' size (max|logit| ~3e2 for this run, where
    # 1e-4 is a few float32 ulps); a fold that dropped BatchNorm's eps is off by ~8e-5 of it
    scale = float(re.search(r"max\|logit\| ([0-9.e+-]+)\)", " ".join(lines)).group(1))
    assert err < 1e-5 * scale and path.exists()
    module, meta = load_torchscript(str(path))
    assert meta["class_names"] == ["cat", "dog", "fox"] and meta["image_size"] == 71 and meta["crop_pct"] == 1
    assert module(torch.zeros(3, 3, 71, 71)).shape == (3, 3)
    monkeypatch.setattr(export, "ATOL", -1.0)  # no graph can pass: the export must refuse to write
    bad = tmp_path / "bad.onnx"
    with pytest.raises(UserError, match="FAILED verification") as info:
        export.export(str(out / "checkpoint.pth.tar"), "onnx", str(bad), log=lambda *a: None)
    assert info.value.exit_code == 1 and not bad.exists() and os.listdir(tmp_path) == ["xception.pt"]


def test_confusion_summary_for_many_classes(tmp_path):
    pytest.importorskip("matplotlib")
    from xception.plots import most_confused, write_confusion

    k = 1000
    matrix = np.diag(np.full(k, 5))
    matrix[3, 7], matrix[10, 2] = 4, 2
    names = [f"class{i}" for i in range(k)]
    assert most_confused(matrix, names, 2) == [(4, "class3", "class7"), (2, "class10", "class2")]
    path = write_confusion(matrix, names, str(tmp_path / "c.png"), "imagenet")
    assert png_size(path)[0][0] >= 1000


def test_bad_pretrained_and_export_inputs_give_one_line(tiny_data, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    line = one_line_error(run_cli("train", "--data_path", tiny_data, "--pretrained", notes, "--output-dir",
                                  tmp_path / "o", *TINY))
    assert "--pretrained" in line and "unknown weights format" in line
    line = one_line_error(run_cli("export", "--weights", tmp_path / "none.pth", "--format", "onnx",
                                  "--out", tmp_path / "x.onnx"))
    assert "no such file" in line and not (tmp_path / "x.onnx").exists()


def test_a_static_batch_export_fixes_the_batch_and_still_serves_any_count(trained_run, tmp_path):
    data, out, _ = trained_run
    onnx_path = tmp_path / "static.onnx"
    proc = run_cli("export", "--weights", out / "checkpoint.pth.tar", "--format", "onnx", "--out", onnx_path,
                   "--static-batch", 2)
    assert proc.returncode == 0, proc.stderr
    assert "at batch 2:" in proc.stdout and "input 2x3x71x71" in proc.stdout
    from xception.model.deploy import OnnxModel
    graph = OnnxModel(str(onnx_path))
    assert graph.fixed_batch == 2
    assert graph(torch.zeros(3, 3, 71, 71)).shape == (3, 3)  # chunks of 2, the last one padded
    threads = torch.get_num_threads()
    try:  # onnxruntime runs on torch's intra-op thread count, which serve --threads sets
        torch.set_num_threads(1)
        assert OnnxModel(str(onnx_path)).session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(threads)
    bad = run_cli("export", "--weights", out / "checkpoint.pth.tar", "--format", "torchscript", "--out",
                  tmp_path / "t.pt", "--static-batch", 2)
    assert bad.returncode == 2 and "--static-batch" in one_line_error(bad)
