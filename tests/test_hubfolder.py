"""`xception export --format hf` (a folder in timm's Hub layout: config.json, model.safetensors, a model card),
`xception push` (huggingface_hub's upload_folder, against the loopback Hub of test_hub.py) and reading the
pushed repository back with `--pretrained hf-hub:ORG/NAME`. timm loads the folder itself (`local-dir:`) and must
give our logits."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY, one_line_error, read_metrics, run_cli
from test_hub import fake_hub  # noqa: F401  (the fixture)
from xception.checkpoint import Checkpoint
from xception.model.family import build_arch
from xception.model.weights import build_model, read_weights

timm = pytest.importorskip("timm")


def ours(path):
    return build_model(read_weights(str(path), choice="best"), log=lambda *a: None).eval()


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    data, run, _ = trained_run
    out = tmp_path_factory.mktemp("hf") / "folder"
    proc = run_cli("export", "--weights", run / "model_best.pth.tar", "--format", "hf", "--out", out,
                   "--license", "apache-2.0")
    assert proc.returncode == 0, proc.stderr
    return run, out


def test_timm_reads_the_folder_and_gives_our_logits(exported):
    run, out = exported
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 71, 71)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(run / "model_best.pth.tar")(x), rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    ckpt = Checkpoint.load(str(run / "model_best.pth.tar"))
    assert config["architecture"] == "legacy_xception" and config["label_names"] == ckpt.class_names
    assert tuple(theirs.pretrained_cfg["input_size"]) == (3, 71, 71) and theirs.pretrained_cfg["crop_pct"] == 1.0
    assert theirs.pretrained_cfg["label_names"] == ckpt.class_names


def test_the_card_holds_the_runs_real_figures_and_command(exported):
    run, out = exported
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: timm\n")
    metrics = read_metrics(run)
    final = metrics[-1]
    row = next(line for line in card.splitlines() if line.startswith("| final |"))
    assert row.split("|")[2].strip() == final["epoch"]
    assert f"{float(final['top1']):.3f}" in row
    command = next(line for line in card.splitlines() if line.startswith("xception train "))
    for flag, value in zip(TINY[::2], TINY[1::2]):  # the flags the run was given, with their values
        if flag in ("--print-freq", "--workers"):
            continue
        assert f" {flag} {value}" in command or f" {flag} {float(value):g}" in command, (flag, command)
    assert "--epochs 2" in command


def test_the_aligned_family_keeps_timms_names(tmp_path):
    net = build_arch("xception41", num_classes=3).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so that a misplaced one shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "a.pth.tar"
    Checkpoint(model=net.state_dict(), arch="xception41", class_names=["a", "b", "c"]).save(str(ckpt))
    proc = run_cli("export", "--weights", ckpt, "--format", "hf", "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    theirs = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), net(x), rtol=1e-5, atol=1e-5)


def test_an_existing_folder_with_files_is_left_alone(exported, tmp_path):
    run, _ = exported
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = run_cli("export", "--weights", run / "model_best.pth.tar", "--format", "hf", "--out", out)
    assert "already exists; xception export --format hf never writes over it" in one_line_error(proc)
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    proc = run_cli("push", tmp_path / "nothing", "--repo", "org/name")
    assert "not a folder written by xception export --format hf" in one_line_error(proc)


def test_push_then_predict_by_name_reads_it_back(exported, fake_hub, tmp_path, capsys):  # noqa: F811
    from xception import cli

    run, out = exported
    fake, _ = fake_hub
    os.environ["HF_TOKEN"] = "hf_loopback"  # upload_folder wants a token; the loopback Hub takes any
    try:
        assert cli.main(["push", str(out), "--repo", "someone/digits"]) == 0
    finally:
        del os.environ["HF_TOKEN"]
    assert sorted(fake.repos["someone/digits"]) == ["README.md", "config.json", "model.safetensors"]
    assert fake.repos["someone/digits"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    image = _images(run)[0]
    capsys.readouterr()
    assert cli.main(["predict", str(image), "--pretrained", "hf-hub:someone/digits", "--json"]) == 0
    by_name = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert cli.main(["predict", str(image), "--weights", str(run / "model_best.pth.tar"), "--json"]) == 0
    by_file = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert [t["class"] for t in by_name] == [t["class"] for t in by_file]  # the label names came back
    for a, b in zip(by_name, by_file):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def _images(run):
    return sorted(Path(Checkpoint.load(str(run / "model_best.pth.tar")).args["data_path"]).glob("val/*/*"))
