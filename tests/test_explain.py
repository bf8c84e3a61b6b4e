"""`xception explain`: Grad-CAM heatmaps on the final feature map of every arch of the family, a map that
finds the one feature of a made-up image, and the one-line refusals (an .onnx graph, an unknown --class).
The checkpoints are built without training (random init; test 2 fits only the classifier, in closed form)."""

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error, run_cli
from xception import cli
from xception.checkpoint import Checkpoint
from xception.data import to_device
from xception.model import Xception
from xception.model.family import ARCH_NAMES, build_arch
from xception.tools.explain import ExplainOptions, explain, target_layer

pytest.importorskip("pytorch_grad_cam")

CLASSES = ["ant", "bee", "cat", "dog", "eel"]
SIZE = 71  # the model minimum: a 3 x 3 final map


def save_checkpoint(path, model, arch, class_names, size):
    Checkpoint(model=model.state_dict(), arch=arch, class_names=list(class_names),
               args={"image_size": size, "crop_pct": 1.0}).save(str(path))
    return str(path)


def noise_image(path, size=(SIZE, SIZE), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_arch_gets_a_heatmap_of_its_input_size(arch, tmp_path, capsys):
    """A random-init checkpoint of each arch: one PNG of the input size (71 x 71 RGB) and a map that is
    not flat; for xception, a second run (of --class bee) into the same folder writes -1 files."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pth.tar", build_arch(arch, len(CLASSES)), arch, CLASSES, SIZE)
    image = noise_image(tmp_path / "photo.png")
    out = tmp_path / "maps"
    try:
        result = explain([image], ckpt, str(out), ExplainOptions(device="cpu"))
        if arch == "xception":  # once is enough: the next file's name and --class do not depend on the arch
            again = explain([image], ckpt, str(out), ExplainOptions(class_name="bee", device="cpu"))
    finally:
        os.remove(ckpt)  # up to 170 MB each: not kept among pytest's temporary folders
    assert result["errors"] == [] and len(result["explained"]) == 1
    first = result["explained"][0]
    assert first["file"] == str(out / "photo-gradcam.png") and first["class"] in CLASSES
    assert 0 < first["probability"] <= 1
    with Image.open(first["file"]) as png:
        assert png.size == (SIZE, SIZE) and png.mode == "RGB"
    heatmap = np.load(out / "photo-gradcam.npy")
    assert heatmap.shape == (SIZE, SIZE) and heatmap.std() > 0 and 0 <= heatmap.min() <= heatmap.max() <= 1
    if arch != "xception":
        return
    second = again["explained"][0]
    assert second["file"] == str(out / "photo-gradcam-1.png") and second["class"] == "bee"
    assert sorted(os.listdir(out)) == ["photo-gradcam-1.npy", "photo-gradcam-1.png", "photo-gradcam.npy",
                                       "photo-gradcam.png"]


def square_images(positions, size, side):
    """uint8 N x 3 x size x size: black, with a white side x side square at each (top, left); None: blank."""
    out = torch.zeros(len(positions), 3, size, size, dtype=torch.uint8)
    for i, where in enumerate(positions):
        if where is not None:
            out[i, :, where[0]:where[0] + side, where[1]:where[1] + side] = 255
    return out


def square_detector(size, side, seed=0):
    """A random-init xception whose class 1 ("square") is a linear probe, fitted in closed form on pooled
    final features, that tells an image with a white square somewhere from a blank one: its classifier row
    is the mean feature of square images minus that of blank ones. Where the square sits is never a label:
    the probe knows only *that* there is one, so the map must find *where* by itself. The BatchNorms first
    take their statistics from the same images (one forward pass in training mode): with the initial ones
    (mean 0, variance 1) the activations grow ~1e4-fold through the body and a square anywhere changes
    every cell of the final map alike, so nothing could be localised (checked: with them the square's
    quadrant won 1 to 2 times in 4 per seed; with them fitted, 4 in 4 for seeds 0-3)."""
    torch.manual_seed(seed)
    model = Xception(num_classes=2)
    rng = np.random.default_rng(seed)
    spots = [tuple(int(v) for v in rng.integers(0, size - side, 2)) for _ in range(8)]
    batch = to_device(square_images(spots + [None] * 4, size, side), torch.device("cpu"), channels_last=False)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.momentum = None  # a plain average over what it sees: here, this one batch
        model.train()(batch)
        pooled = model.eval().forward_features(batch).mean(dim=(2, 3))
        square, blank = pooled[:8].mean(0), pooled[8:].mean(0)
        direction, middle = square - blank, (square + blank) / 2
        model.fc.weight.copy_(torch.stack([-direction, direction]))
        model.fc.bias.copy_(torch.stack([middle @ direction, -(middle @ direction)]))
    return model


def test_the_map_is_highest_in_the_quadrant_of_the_only_feature(tmp_path):
    """Images of 128 px (a 4 x 4 final map), black but for one white 40 px square, put in each quadrant in
    turn; the square detector of `square_detector` calls each "square", and the mean of its map over the
    square's quadrant beats the mean over every other quadrant."""
    size, side, half = 128, 40, 64
    ckpt = save_checkpoint(tmp_path / "squares.pth.tar", square_detector(size, side), "xception",
                           ["blank", "square"], size)
    corners = {"top-left": (12, 12), "top-right": (12, 76), "bottom-left": (76, 12), "bottom-right": (76, 76)}
    images = []
    for name, where in corners.items():
        pixels = square_images([where], size, side)[0].permute(1, 2, 0).numpy()
        images.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(pixels).save(images[-1])
    try:
        result = explain(images, ckpt, str(tmp_path / "maps"), ExplainOptions(device="cpu"))
    finally:
        os.remove(ckpt)
    assert [e["class"] for e in result["explained"]] == ["square"] * 4
    for (name, (top, left)), entry in zip(corners.items(), result["explained"]):
        heatmap = np.load(entry["file"][:-len(".png")] + ".npy")
        quadrants = {q: heatmap[t // half * half:t // half * half + half, l // half * half:l // half * half + half]
                     .mean() for q, (t, l) in corners.items()}
        assert max(quadrants, key=quadrants.get) == name, (name, quadrants)


def test_target_layer_is_the_module_that_returns_the_final_feature_map():
    """xception: the exit flow; the aligned nets: their final `act` (after the last block)."""
    torch.manual_seed(0)
    xception = build_arch("xception", 3)
    assert target_layer(xception) is xception.exit_flow
    aligned = build_arch("xception41p", 3)
    assert target_layer(aligned) is aligned.act


def run_explain(capsys, *args):
    """`xception explain ARGS` in this process (no interpreter start): what run_cli would return."""
    code = cli.main(["explain", *map(str, args)])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-cli")
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "model.pth.tar", Xception(num_classes=len(CLASSES)), "xception", CLASSES, SIZE)
    return ckpt, noise_image(root / "photo.png")


def test_an_onnx_graph_is_refused_in_one_line(tmp_path, small_checkpoint):
    """The refusal goes by the file's name: no graph needs exporting to be refused."""
    _, image = small_checkpoint
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"\x08\x07\x12\x07pytorch")  # the first bytes of an ONNX protobuf
    line = one_line_error(run_cli("explain", image, "--weights", graph, "--out", tmp_path / "maps"))
    assert "gradients" in line and "checkpoint" in line, line
    assert not os.path.exists(tmp_path / "maps")


def test_an_unknown_class_is_refused_in_one_line_naming_some(tmp_path, small_checkpoint, capsys):
    ckpt, image = small_checkpoint
    line = one_line_error(run_explain(capsys, image, "--weights", ckpt, "--out", tmp_path / "maps", "--class",
                                  "bees", "--device", "cpu"))
    assert "--class bees" in line and "did you mean bee" in line and "ant, bee, cat" in line, line


def test_nothing_to_explain_is_one_line(tmp_path, small_checkpoint, capsys):
    ckpt, _ = small_checkpoint
    line = one_line_error(run_explain(capsys, tmp_path / "missing.png", "--weights", ckpt, "--out", tmp_path))
    assert "nothing to explain" in line and "missing.png" in line, line


def test_the_cli_prints_one_line_per_image_and_skips_a_bad_file(tmp_path, small_checkpoint, capsys):
    ckpt, image = small_checkpoint
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    proc = run_explain(capsys, image, bad, "--weights", ckpt, "--out", tmp_path / "maps", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image}: class "), proc.stdout
    assert lines[0].endswith(f"-> {tmp_path / 'maps' / 'photo-gradcam.png'}") and "(prob " in lines[0]
    assert f"skipped {bad}" in proc.stderr and "Traceback" not in proc.stderr


def test_without_the_grad_cam_package_the_error_says_what_to_install(tmp_path, small_checkpoint, capsys,
                                                                     monkeypatch):
    ckpt, image = small_checkpoint
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # what an import of a missing package meets
    line = one_line_error(run_explain(capsys, image, "--weights", ckpt, "--out", tmp_path / "maps"))
    assert line.endswith("xception explain needs the grad-cam package: pip install 'xception[explain]'"), line
