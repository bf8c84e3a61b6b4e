"""`xception bench` (compute): the JSON it promises, and the fast inference path it times is correct."""

import json

import torch

from conftest import run_cli
from xception import Xception
from xception.fuse import fold_batchnorm


def test_bench_train_prints_one_json_object_with_both_sides():
    proc = run_cli("bench", "--mode", "train", "--image-size", 71, "--batch-size", 2, "--repeats", 1,
                   "--steps", 1, "--warmup", 1, "--json", "--timm-channels-last")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("ours_img_s", "timm_img_s", "ratio", "mode", "image_size", "batch_size", "dtype", "device",
                "torch_version", "ours_settings", "timm_settings"):
        assert key in out, key
    assert out["ours_img_s"] > 0 and out["timm_img_s"] > 0
    assert abs(out["ratio"] - out["ours_img_s"] / out["timm_img_s"]) < 1e-9
    assert out["timm_settings"]["channels_last"] is True and out["mode"] == "train"


def test_bench_rejects_a_too_small_image_in_one_line():
    proc = run_cli("bench", "--image-size", 32)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--image-size" in proc.stderr


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
