"""`xception bench` (compute): the JSON it promises, and the fast inference path it times is correct."""

import argparse
import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, one_line_error, run_cli
from xception import Xception
from xception import checkpoint as ckpt
from xception.engine import loop
from xception.engine.precision import Precision
from xception.model.deploy import fold_batchnorm
from xception.tools import syncdebug


def run_gpu_script(out, **settings):
    """benchmarks/gpu.sh at batch 2 with every CUDA-only choice swapped for a tiny CPU one, and `settings`
    (environment variables) on top: (the CompletedProcess, the rows it wrote to `out`)."""
    env = dict(os.environ, DEVICE="cpu", SIZE="71", DTYPES="float32", COMPILED_DTYPES="", SYNC_DTYPES="float32",
               REPEATS="1", STEPS="1", WARMUP="1", OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="2")
    env.update(settings)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, [json.loads(line) for line in out.read_text().splitlines()]


def test_gpu_script_runs_small_on_cpu_survives_a_failing_setting_and_counts_host_reads(tmp_path):
    # One run covers the loop and its flags, the JSON that `xception bench --json` promises, a configuration
    # that fails (an unknown dtype: bench exits 2) without stopping the others, and the sync-debug row.
    proc, rows = run_gpu_script(tmp_path / "gpu.jsonl", DTYPES="float32 nosuchdtype")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "5 configurations succeeded, 4 failed" in proc.stdout
    failed = [r for r in rows if r.get("failed")]
    synced = [r for r in rows if "sync_debug" in r]
    timed = [r for r in rows if r not in failed and r not in synced]
    assert [(r["mode"], r["dtype"], r["settings"]) for r in failed] == [
        (mode, "nosuchdtype", settings) for mode in ("train", "infer")
        for settings in ("--channels-last --timm-channels-last", "--no-channels-last")]
    for r in failed:
        assert r["exit_code"] == 2 and "invalid choice: 'nosuchdtype'" in r["error"], r
    assert [(r["mode"], r["ours_settings"]["channels_last"], r["timm_settings"]["channels_last"]) for r in timed] \
        == [("train", True, True), ("train", False, False), ("infer", True, True), ("infer", False, False)]
    for r in timed:
        for key in ("ours_img_s", "timm_img_s", "ratio", "mode", "image_size", "batch_size", "dtype", "device",
                    "torch_version", "gflop_per_image", "ours_gflops", "cudnn_benchmark"):
            assert key in r, key
        assert r["ours_img_s"] > 0 and r["timm_img_s"] > 0 and r["image_size"] == 71 and r["batch_size"] == 2
        assert abs(r["ratio"] - r["ours_img_s"] / r["timm_img_s"]) < 1e-9
        assert r["cudnn_benchmark"] is False  # autotuning is for CUDA only
    # FlopCounterMode's count: a training step is 3 forwards, inference 1.
    assert abs(timed[0]["gflop_per_image"] - 3 * timed[2]["gflop_per_image"]) < 1e-9
    # The sync-debug row: the real loop reads the device at its print steps (so the counter works) and
    # nowhere else; CUDA syncs are not counted on the CPU.
    [row] = synced
    s = row["sync_debug"]
    assert row["mode"] == "train" and row["ours_settings"]["loop"] == "engine.loop.train_one_epoch"
    assert s["steps"] == 20 and s["print_freq"] == 10
    assert s["host_reads_outside_print_steps"] == 0 and s["host_reads_at_print_steps"] > 0, s
    assert s["syncs_per_step"] == 0 and s["cuda_syncs_outside_print_steps"] is None
    assert s["quiet_steps_with_reads_or_syncs"] == {}


def test_gpu_script_fails_when_every_configuration_fails(tmp_path):
    # `false` for python: each configuration exits 1 at once, with nothing on stderr.
    proc, rows = run_gpu_script(tmp_path / "gpu.jsonl", PYTHON="false")
    assert proc.returncode != 0
    assert "0 configurations succeeded, 5 failed" in proc.stdout
    assert [r["mode"] for r in rows] == ["train", "train", "infer", "infer", "train"]
    assert all(r["failed"] and r["exit_code"] == 1 and r["error"] == "" for r in rows), rows
    assert rows[-1]["settings"] == "--channels-last --sync-debug"


def test_host_read_counter_counts_each_kind_of_read():
    ledger = syncdebug.StepLedger()
    t = torch.tensor([1.5])
    with syncdebug.HostReadCounter(ledger):
        ledger.enter(0)
        t.item(), t.tolist(), float(t), int(t)
        if t > 1:  # __bool__
            ledger.enter(1)
            u = t * 2 + 1  # device work: no read
        ledger.enter("after")
    assert u.shape == (1,)
    assert ledger.reads == {0: 5}
    t.item()  # outside the mode: not counted
    assert ledger.reads == {0: 5}


def small_net(num_classes):
    """In Xception's place where what is tested is the counting, not the model: 20 steps in a second."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, num_classes))


def count_on_cpu(dtype):
    """The sync-debug count of 20 steps at batch 2, 71 px on the CPU: (its "sync_debug" block, our settings)."""
    args = argparse.Namespace(batch_size=2, image_size=71, steps=1, repeats=1, channels_last=True, dtype=dtype)
    ledger, steps, settings, cuda = syncdebug.count_syncs(args, torch.device("cpu"))
    assert not cuda and steps == 20
    return syncdebug.summarize(ledger, steps, cuda), settings


def test_sync_debug_sees_the_loss_scaler_read_that_fused_sgd_removes(monkeypatch):
    # The fp16 path of the GPU, imitated on the CPU (bf16 autocast, a CPU GradScaler): with a plain SGD the
    # scaler reads its overflow flag on the host every step; with the fused SGD (what build_optimizer picks
    # on CUDA) the flag goes into the kernel and the quiet steps read nothing.
    monkeypatch.setattr(syncdebug, "Xception", small_net)
    monkeypatch.setattr(syncdebug, "bench_precision",
                        lambda dtype, device: Precision("cpu", torch.bfloat16, torch.amp.GradScaler("cpu")))
    found = {}
    for fused in (False, True):
        monkeypatch.setattr(syncdebug, "build_optimizer", lambda model, cfg, device, fused=fused: torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, fused=fused))
        s, settings = count_on_cpu("float16")
        assert settings["loss_scaler"] and settings["optimizer"].endswith("fused" if fused else "default")
        found[fused] = s["host_reads_outside_print_steps"]
    assert found == {False: 18, True: 0}


def test_sync_debug_counts_a_read_added_to_every_step(monkeypatch):
    # A step that reads its loss (as a careless progress line would) must show up outside the print steps.
    real_call = loop.Step.__call__

    def reading_step(self, images, targets):
        loss = real_call(self, images, targets)
        loss.item()
        return loss

    monkeypatch.setattr(loop.Step, "__call__", reading_step)
    monkeypatch.setattr(syncdebug, "Xception", small_net)
    s, settings = count_on_cpu("float32")
    assert settings["precision"] == "fp32"
    assert s["host_reads_outside_print_steps"] == 18 and s["syncs_per_step"] == 18 / 20
    assert sorted(map(int, s["quiet_steps_with_reads_or_syncs"])) == [i for i in range(20) if i not in (9, 19)]
    # the print steps: the added read at each, plus the loop's own reads (the progress line's loss, the guard)
    assert s["host_reads_at_print_steps"] > 2


def test_bench_refuses_sync_debug_outside_training_in_one_line():
    proc = run_cli("bench", "--mode", "infer", "--sync-debug")
    assert proc.returncode == 2 and "--mode train" in one_line_error(proc)


def test_bench_rejects_a_too_small_image_in_one_line():
    proc = run_cli("bench", "--image-size", 32)
    assert proc.returncode == 2 and "--image-size" in one_line_error(proc)


def test_fast_paths_match_the_plain_eager_model():
    torch.manual_seed(0)
    model = Xception(num_classes=7)
    for m in model.modules():  # non-trivial BN statistics and scales, so folding is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(2, 3, 71, 71)
    model.eval()
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    folded = fold_batchnorm(model)
    torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-4)
    # Gradients: channels_last training step equals NCHW in float64 (rounding cannot flip a ReLU there).
    a = Xception(num_classes=7).double().train()
    b = Xception(num_classes=7).double().train()
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    xd = x.double()
    y = torch.tensor([1, 5])
    torch.nn.functional.cross_entropy(a(xd), y).backward()
    torch.nn.functional.cross_entropy(b(xd.contiguous(memory_format=torch.channels_last)), y).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_compiled_model_matches_eager_forward_and_gradients():
    # float64, so that the compiled kernels' different summation order cannot flip a ReLU.
    torch.manual_seed(0)
    eager = Xception(num_classes=7).double().train()
    compiled_copy = Xception(num_classes=7).double().train()
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_copy)
    x = torch.randn(2, 3, 71, 71, dtype=torch.float64)
    y = torch.tensor([1, 5])
    ref = eager(x)
    out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    torch.nn.functional.cross_entropy(ref, y).backward()
    torch.nn.functional.cross_entropy(out, y).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_copy.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10, msg=name)
    # What the trainer saves from a compiled model: the plain model's keys, loadable without compile.
    assert ckpt.unwrap(compiled) is compiled_copy
    assert list(ckpt.clean_state_dict(compiled.state_dict())) == list(eager.state_dict())


def test_bench_times_fp32_and_int8_onnx_beside_ours_in_one_run(tmp_path):
    # `bench --mode infer --onnx FP32 INT8`: a row per graph, on the same batch shape as ours, with its ratios.
    import pytest
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from xception.tools.export import export
    from xception.tools.quantize import quantize
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth.tar"
    ckpt.Checkpoint(model=Xception(num_classes=3).state_dict(), arch="xception", class_names=["a", "b", "c"],
                    args={"image_size": 71, "crop_pct": 1.0}).save(str(weights))
    fp32, int8 = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    export(str(weights), "onnx", fp32, log=lambda *a: None)
    quantize(fp32, int8, torch.randn(4, 3, 71, 71))
    proc = run_cli("bench", "--mode", "infer", "--image-size", 71, "-b", 2, "--repeats", 1, "--steps", 1,
                   "--warmup", 1, "--onnx", fp32, int8, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    rows = result["onnx"]
    assert [(r["file"], r["precision"]) for r in rows] == [(fp32, "fp32"), (int8, "int8")]
    assert all(r["img_s"] > 0 and r["runtime"].startswith("onnxruntime") for r in rows)
    for r in rows:
        assert abs(r["ratio_to_ours"] - r["img_s"] / result["ours_img_s"]) < 1e-9
    assert "ratio_to_fp32_onnx" not in rows[0]
    assert abs(rows[1]["ratio_to_fp32_onnx"] - rows[1]["img_s"] / rows[0]["img_s"]) < 1e-9
    # a graph of another size is refused before anything is timed, saying how to match it
    line = one_line_error(run_cli("bench", "--mode", "infer", "--image-size", 99, "-b", 2, "--onnx", fp32))
    assert f"--onnx {fp32}: its input is" in line and "--image-size 99" in line


def test_bench_refuses_a_missing_or_non_onnx_file_in_one_line(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a graph\n")
    missing = one_line_error(run_cli("bench", "--mode", "infer", "--onnx", tmp_path / "none.onnx"))
    assert f"--onnx {tmp_path / 'none.onnx'}: no such file" in missing
    bad = one_line_error(run_cli("bench", "--mode", "infer", "--onnx", text))
    assert f"--onnx {text}: onnxruntime cannot load it as an ONNX graph" in bad
    train = one_line_error(run_cli("bench", "--mode", "train", "--onnx", text))
    assert "--onnx times onnxruntime on the CPU" in train and "--mode infer" in train
