"""Every arch of the family through the commands: train, resume, eval, export to ONNX (run in onnxruntime),
predict, bench and `xception models`."""

import json

import pytest
import torch

from conftest import TINY, one_line_error, run_cli
from xception import cli
from xception.checkpoint import Checkpoint
from xception.model.family import ARCH_NAMES, arch_info, build_arch

ALIGNED = [a for a in ARCH_NAMES if a != "xception"]


@pytest.mark.parametrize("arch", ALIGNED)
def test_each_arch_evaluates_and_exports_to_onnx(arch, shared_data, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    ckpt = tmp_path / "c.pth.tar"
    Checkpoint(model=build_arch(arch, num_classes=3).state_dict(), arch=arch, class_names=["cat", "dog", "fox"],
               args={"image_size": 71, "crop_pct": 1.0}).save(str(ckpt))
    assert cli.main(["eval", "--data_path", shared_data, "--resume", str(ckpt), "-b", "4", "-j", "0",
                     "--device", "cpu", "--output-dir", str(tmp_path / "e")]) == 0
    assert "on 9 images" in capsys.readouterr().out
    onnx = tmp_path / "m.onnx"
    assert cli.main(["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(onnx)]) == 0
    out = capsys.readouterr().out
    assert "verified onnx" in out and onnx.exists()
    import onnx as onnx_lib
    meta = {p.key: p.value for p in onnx_lib.load(str(onnx)).metadata_props}
    assert json.loads(meta["xception"])["arch"] == arch


def test_an_aligned_arch_trains_resumes_and_predicts_through_the_cli(shared_data, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data_path", shared_data, "--output-dir", out, *TINY, "--arch", "xception41p",
                   "--epochs", 2, "--stop-after-epochs", 1, "--lr", "0.01")
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert saved["arch"] == "xception41p" and saved["args"]["arch"] == "xception41p"
    wrong = run_cli("train", "--data_path", shared_data, "--output-dir", out, *TINY, "--arch", "xception65",
                    "--epochs", 2, "--resume", out / "checkpoint.pth.tar")
    assert wrong.returncode == 2 and "xception41p" in one_line_error(wrong)
    again = run_cli("train", "--data_path", shared_data, "--output-dir", out, *TINY, "--epochs", 2,
                    "--resume", out / "checkpoint.pth.tar", "--lr", "0.01")
    assert again.returncode == 0 and "epoch 2/2" in again.stdout, again.stderr
    pred = run_cli("predict", f"{shared_data}/val/cat", "--weights", out / "checkpoint.pth.tar", "--json")
    assert pred.returncode == 0, pred.stderr
    assert len(json.loads(pred.stdout)["predictions"]) == 3


def test_models_lists_the_family_with_its_parameters(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["arch"] for r in rows] == list(ARCH_NAMES)
    for r in rows:
        assert r["params"] == arch_info(r["arch"]).params and r["gflops"] > 10 and r["top1"] > 78


def test_bench_times_an_aligned_arch_against_timms(capsys):
    pytest.importorskip("timm")
    assert cli.main(["bench", "--arch", "xception41", "--mode", "infer", "--image-size", "71", "-b", "1",
                     "--repeats", "1", "--steps", "1", "--warmup", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["arch"] == "xception41" and row["timm_settings"]["model"] == "xception41" and row["ours_img_s"] > 0
