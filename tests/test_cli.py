"""The command line as a user meets it: train -> eval -> resume, result lines, and one-line errors."""

import os
import shutil

import pytest
import torch

from conftest import eval_figures, one_line_error, read_metrics, run_cli, weights

pytestmark = pytest.mark.slow

TINY = ["--image-size", "71", "--batch-size", "4", "--workers", "0", "--seed", "3", "--lr", "0.05",
        "--warmup-epochs", "0.5", "--print-freq", "1"]


def test_train_writes_checkpoints_metrics_and_the_seed_result_block(trained_run):
    _, out, proc = trained_run  # 2 epochs of conftest.TINY: 71 px, batch 4, one process
    for line in ("Final Performance images/sec :", "Final Train Accuracy :", "E2E Training Duration sec :"):
        assert proc.stdout.count(line) == 1
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "metrics.csv", "Xception_bs4_1p_acc.log"):
        assert (out / name).exists(), name
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["lr"]) == 0.0  # cosine reaches zero on the last iteration
    assert all(float(r["images_per_sec"]) > 0 for r in rows)
    case = dict(line.split(" = ") for line in (out / "Xception_bs4_1p_acc.log").read_text().splitlines())
    assert case["RankSize"] == "1" and case["BatchSize"] == "4"
    assert case["TrainAccuracy"] == f"{float(rows[-1]['top1']):.3f}"
    state = torch.load(out / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["class_names"] == ["cat", "dog", "fox"]
    assert {"model", "optimizer", "scheduler", "scaler", "best_acc1", "args"} <= set(state)
    assert not any(k.startswith("module.") for k in state["model"])


def test_resume_continues_on_the_same_lr_curve_and_weights(tiny_data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli("train", "--data_path", tiny_data, "--epochs", 3, "--output-dir", full, *TINY).returncode == 0
    # Stop after epoch 1 of the same 3-epoch schedule (--stop-after-epochs), then resume to the end.
    proc = run_cli("train", "--data_path", tiny_data, "--epochs", 3, "--stop-after-epochs", 1, "--output-dir", part,
                   *TINY)
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in read_metrics(part)] == ["1"]
    proc = run_cli("train", "--data_path", tiny_data, "--epochs", 3, "--output-dir", part, *TINY,
                   "--resume", part / "checkpoint.pth.tar")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    a, b = read_metrics(full), read_metrics(part)
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    wa, wb = weights(full / "checkpoint.pth.tar"), weights(part / "checkpoint.pth.tar")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7, msg=key)

    # eval of the final checkpoint reproduces the last epoch's val figures exactly
    proc = run_cli("eval", "--data_path", tiny_data, "--resume", full / "checkpoint.pth.tar", "--image-size", 71,
                   "--batch-size", 4, "--workers", 0, "--output-dir", tmp_path / "ev")
    assert proc.returncode == 0, proc.stderr
    assert f"Final Train Accuracy : {float(a[-1]['top1']):.3f}" in proc.stdout
    assert f"top5 {float(a[-1]['top5']):.3f}" in proc.stdout
    assert (tmp_path / "ev" / "Xception_bs4_1p_eval.log").exists()


def test_existing_checkpoint_is_never_overwritten(tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth.tar").write_bytes(b"precious")
    line = one_line_error(run_cli("train", "--data_path", tiny_data, "--epochs", 1, "--output-dir", out, *TINY))
    assert "already holds checkpoint.pth.tar" in line
    assert (out / "checkpoint.pth.tar").read_bytes() == b"precious"


def test_data_layout_errors_give_one_line(tiny_data, tmp_path):
    assert "no such folder" in one_line_error(run_cli("train", "--data_path", tmp_path / "nope"))
    shutil.rmtree(os.path.join(tiny_data, "val"))
    assert "no val/" in one_line_error(run_cli("train", "--data_path", tiny_data, "--output-dir", tmp_path / "o"))
    os.makedirs(os.path.join(tiny_data, "val", "cat"))
    os.makedirs(os.path.join(tiny_data, "val", "dog"))
    os.makedirs(os.path.join(tiny_data, "val", "fox"))
    line = one_line_error(run_cli("train", "--data_path", tiny_data, "--output-dir", tmp_path / "o"))
    assert "without images: cat, dog, fox" in line


def test_checkpoint_of_other_classes_is_refused_for_resume_and_eval(tiny_data, tmp_path):
    from conftest import make_image_folder
    other = make_image_folder(tmp_path / "other", classes=("a", "b"))
    out = tmp_path / "o"
    assert run_cli("train", "--data_path", other, "--epochs", 1, "--output-dir", out, *TINY).returncode == 0
    line = one_line_error(run_cli("eval", "--data_path", tiny_data, "--resume", out / "checkpoint.pth.tar",
                                  "--image-size", 71, "--batch-size", 4, "--workers", 0))
    assert "--pretrained" in line


def test_compiled_eval_keeps_compile_time_apart_and_agrees_with_eager(trained_run, tmp_path):
    data, out, _ = trained_run  # eval only reads the checkpoint
    ckpt = out / "checkpoint.pth.tar"
    figures = {}
    for flag in ("--compile", "--no-compile"):
        proc = run_cli("eval", "--data_path", data, "--resume", ckpt, flag, "--output-dir", tmp_path / flag,
                       "--image-size", "71", "--batch-size", "4", "--workers", "0")
        assert proc.returncode == 0, proc.stderr
        figures[flag] = [float(v) for v in eval_figures(proc)[1:]]  # loss, top1, top5
        assert ("to compile for eval" in proc.stdout) == (flag == "--compile")
    # Frozen, fused graph vs eager: the same top-1/top-5 and the loss to float tolerance.
    assert figures["--compile"][1:] == figures["--no-compile"][1:]
    # The loss relative to its size (~3e2 for this run: 1e-3 there is a few float32 ulps, and the fused kernels
    # differ by CPU), or to the printed 4 decimals
    assert figures["--compile"][0] == pytest.approx(figures["--no-compile"][0], rel=1e-5, abs=1e-4)
