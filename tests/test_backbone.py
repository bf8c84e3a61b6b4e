"""The backbone (model/backbone.py) and gradient checkpointing, for every arch.

Backbone: for output strides 32, 16 and 8 the maps have the channels and sizes `feature_info` says; at 32
the deepest map is the classifier's forward_features; at 16 and 8 the dilated maps hold the stride-32 maps
on every (32 / output_stride)-th position (same weights, atrous convolution); a classifier file of any
class count loads into a backbone, whose maps then equal the classifier's own (read with forward hooks).
Checkpointing: one training step gives the same loss, gradients and BatchNorm running statistics as
without it (torch's checkpoint alone would update those statistics twice; a control test shows it).

Kept fast: each arch is built once (a module fixture), inputs are the smallest (71 px for xception, 48
for the aligned nets: their stride-32 map is then 2x2, so dilation has positions to check), batch 1 or 2,
one intra-op thread (test_family.py says why).
"""

import argparse
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from xception import create_model
from xception.config import Config, UserError
from xception.engine.setup import Run
from xception.flags import add_run_flags
from xception.toolflags import add_bench_flags
from xception.model import ARCH_NAMES, Backbone
from xception.model.family import build_arch
from xception.model.xception import MiddleBlock
from xception.tools.bench import _time_model

OUTPUT_STRIDES = (32, 16, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def input_size(arch: str) -> int:
    return 71 if arch == "xception" else 48


def with_stats(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BatchNorm statistics and affines, so that an eval-mode map depends on every buffer loaded."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return net


@pytest.fixture(scope="module")
def nets():
    """arch -> a 7-class classifier in eval mode, with random BatchNorm statistics; built once."""
    torch.manual_seed(0)
    return {arch: with_stats(build_arch(arch, num_classes=7), i).eval() for i, arch in enumerate(ARCH_NAMES)}


def image(arch: str, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, input_size(arch), input_size(arch), generator=torch.Generator().manual_seed(1))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding, relative to the map's scale (dilated convolutions sum in another order)."""
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_maps_match_feature_info_and_dilation_keeps_the_stride_32_values(nets, arch):
    net, x = nets[arch], image(arch)
    with torch.no_grad():
        reference = Backbone(copy.deepcopy(net)).eval()(x)
        assert torch.equal(reference[-1], net.forward_features(x))  # the deepest map is forward_features
        for output_stride in OUTPUT_STRIDES:
            backbone = Backbone(copy.deepcopy(net), output_stride=output_stride).eval()
            maps = backbone(x)
            assert [f["reduction"] for f in backbone.feature_info] == [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
            for m, ref, info, stride in zip(maps, reference, backbone.feature_info, (2, 4, 8, 16, 32)):
                assert m.shape[1] == info["num_chs"]
                # The aligned nets pad every stride: a map is ceil(input / reduction); the original's stem does not.
                if arch != "xception":
                    assert m.shape[-1] == math.ceil(x.shape[-1] / info["reduction"])
                step = stride // info["reduction"]  # 1 up to the output stride, then 2, 4
                assert close(m[..., ::step, ::step], ref), (output_stride, info)


def test_xception_map_sizes_at_299_px():
    """The original's unpadded stem: 299 px gives 147, 74, 37, 19, 10 (timm's sizes), and 19 from stride 16 on
    at output stride 16. Shapes only, on the meta device."""
    with torch.device("meta"):
        for output_stride, last in ((32, 10), (16, 19), (8, 37)):
            maps = Backbone(build_arch("xception"), output_stride=output_stride)(torch.empty(1, 3, 299, 299))
            assert [m.shape[-1] for m in maps] == [147, 74, 37, 19 if output_stride > 8 else 37, last]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_a_classifier_file_loads_into_the_backbone_with_the_classifier_dropped(nets, arch, tmp_path):
    net, x = nets[arch], image(arch)
    path = tmp_path / "classifier.pth"
    torch.save(net.state_dict(), path)
    backbone = create_model(weights=str(path), features_only=True, log=lambda *a: None).eval()
    assert isinstance(backbone, Backbone) and backbone.arch == arch
    body = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert backbone.state_dict().keys() == body.keys()  # the classifier's names, without its head
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in body.items())
    seen = {}
    hooks = [net.get_submodule(f["module"]).register_forward_hook(
        lambda _m, _i, out, name=f["module"]: seen.setdefault(name, out.clone())) for f in backbone.feature_info]
    with torch.no_grad():
        maps, _ = backbone(x), net(x)
    for h in hooks:
        h.remove()
    assert all(torch.equal(m, seen[f["module"]]) for m, f in zip(maps, backbone.feature_info))


def test_out_indices_pick_maps_and_drop_the_unused_end():
    torch.manual_seed(0)
    backbone = create_model("xception41", features_only=True, out_indices=(3, 1), output_stride=16)
    assert backbone.out_indices == (1, 3) and [f["reduction"] for f in backbone.feature_info] == [4, 16]
    assert not any(k.startswith(("blocks.12.", "act", "fc")) for k in backbone.state_dict())
    maps = backbone(torch.randn(2, 3, 48, 48))
    assert [tuple(m.shape[1:]) for m in maps] == [(128, 12, 12), (728, 3, 3)]
    sum(m.mean() for m in maps).backward()
    assert all(p.grad is not None for p in backbone.parameters())  # nothing left unused (DDP needs that)


@pytest.mark.parametrize("kwargs, says", [
    (dict(features_only=True, output_stride=12), "output_stride must be 8, 16 or 32"),
    (dict(output_stride=16), "features_only=True"),
    (dict(out_indices=(1,)), "features_only=True"),
    (dict(features_only=True, out_indices=(0, 5)), "out_indices must be distinct feature indices 0..4"),
    (dict(features_only=True, out_indices=(2, 2)), "out_indices must be distinct"),
])
def test_bad_backbone_arguments_are_refused_in_one_line(kwargs, says):
    with pytest.raises(UserError) as e:
        create_model("xception", **kwargs)
    assert says in str(e.value) and "\n" not in str(e.value)


def train_step(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """(loss, gradients, BatchNorm buffers) of one training step's forward and backward."""
    model.train()
    out = model(x)
    loss = sum(m.square().mean() for m in out) if isinstance(out, list) else F.cross_entropy(out, torch.tensor([1, 3]))
    loss.backward()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    return loss.detach(), [p.grad for p in model.parameters()], buffers


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_checkpointing_gives_the_same_loss_gradients_and_running_stats(nets, arch):
    plain, checkpointed = copy.deepcopy(nets[arch]), copy.deepcopy(nets[arch])
    checkpointed.set_grad_checkpointing(True)
    x = image(arch, batch=2)
    loss, grads, buffers = train_step(plain, x)
    loss_c, grads_c, buffers_c = train_step(checkpointed, x)
    assert torch.equal(loss, loss_c)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_c))
    assert buffers.keys() == buffers_c.keys() and all(torch.equal(buffers[k], buffers_c[k]) for k in buffers)
    assert all(v.item() == 1 for k, v in buffers_c.items() if k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("arch", ["xception", "xception41p"])
def test_a_checkpointed_dilated_backbone_trains_as_the_plain_one(nets, arch):
    plain = Backbone(copy.deepcopy(nets[arch]), output_stride=8)
    checkpointed = Backbone(copy.deepcopy(nets[arch]), output_stride=8)
    checkpointed.set_grad_checkpointing(True)
    x = image(arch, batch=2)
    (loss, grads, buffers), (loss_c, grads_c, buffers_c) = (train_step(m, x) for m in (plain, checkpointed))
    assert torch.equal(loss, loss_c) and all(torch.equal(buffers[k], buffers_c[k]) for k in buffers)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_c))


def test_torch_checkpoint_alone_would_update_the_running_stats_twice():
    """Why the networks' checkpointing keeps BatchNorm statistics out of the recomputation: the control."""
    torch.manual_seed(0)
    block = MiddleBlock(4, bn_eps=1e-5).train()
    twin = copy.deepcopy(block)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    block(x).sum().backward()
    checkpoint(twin, x, use_reentrant=False).sum().backward()
    bn, bn_twin = block.body[0].bn, twin.body[0].bn
    assert bn_twin.num_batches_tracked.item() == 2 and bn.num_batches_tracked.item() == 1
    assert not torch.allclose(bn.running_mean, bn_twin.running_mean)


def test_the_flag_reaches_the_network_before_it_is_placed():
    p = argparse.ArgumentParser()
    add_run_flags(p)
    assert vars(p.parse_args(["--grad-checkpointing"]))["grad_checkpointing"] is True
    run = Run.__new__(Run)  # place() alone: no data, no processes
    run.ctx = SimpleNamespace(device=torch.device("cpu"), distributed=False)
    run.channels_last = False
    for on in (True, False):
        run.cfg = Config(grad_checkpointing=on, compile=False)
        net = torch.nn.Module()
        net.set_grad_checkpointing = lambda enable=True, net=net: setattr(net, "checkpointing", enable)
        run.place(net)
        assert getattr(net, "checkpointing", False) is on
        run.place(net, frozen=True)  # an evaluation run never turns it on
        assert getattr(net, "checkpointing", False) is on


def test_bench_reports_peak_memory_next_to_img_s():
    p = argparse.ArgumentParser()
    add_bench_flags(p)
    args = p.parse_args(["--grad-checkpointing", "--image-size", "71", "-b", "2", "--repeats", "1", "--steps", "1",
                         "--warmup", "1"])
    assert args.grad_checkpointing
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 1000))
    stats = _time_model(tiny, args, torch.device("cpu"), channels_last=True, train=True)
    assert stats["peak_mem_kind"] == "cpu_peak_rss" and stats["peak_mem_mib"] > 10  # the interpreter is more
