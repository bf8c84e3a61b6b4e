"""`xception bench` (compute): the JSON it promises, and the fast inference path it times is correct."""

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, one_line_error, run_cli
from xception import Xception
from xception import checkpoint as ckpt
from xception.model.deploy import fold_batchnorm


def test_gpu_script_runs_small_on_cpu_and_writes_one_json_object_per_setting(tmp_path):
    # benchmarks/gpu.sh with every CUDA-only choice swapped for a CPU one: the loop, the flags it passes
    # and the JSON that `xception bench --json` promises.
    out = tmp_path / "gpu.jsonl"
    env = dict(os.environ, DEVICE="cpu", SIZE="71", DTYPES="float32", COMPILED_DTYPES="", REPEATS="1",
               STEPS="1", WARMUP="1", OUT=str(out), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["mode"], r["ours_settings"]["channels_last"], r["timm_settings"]["channels_last"]) for r in rows] \
        == [("train", True, True), ("train", False, False), ("infer", True, True), ("infer", False, False)]
    for r in rows:
        for key in ("ours_img_s", "timm_img_s", "ratio", "mode", "image_size", "batch_size", "dtype", "device",
                    "torch_version", "gflop_per_image", "ours_gflops"):
            assert key in r, key
        assert r["ours_img_s"] > 0 and r["timm_img_s"] > 0 and r["image_size"] == 71 and r["batch_size"] == 2
        assert abs(r["ratio"] - r["ours_img_s"] / r["timm_img_s"]) < 1e-9
    # FlopCounterMode's count: a training step is 3 forwards, inference 1.
    assert abs(rows[0]["gflop_per_image"] - 3 * rows[2]["gflop_per_image"]) < 1e-9


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
