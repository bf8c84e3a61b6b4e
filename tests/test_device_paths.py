"""What the CUDA and NPU paths do differently, checked on the CPU with stand-ins for the device modules:
kernel choice (cuDNN autotuning, --deterministic), the fused optimizer, pinned memory and the copy stream,
the random streams a resume restores, the NPU loss scaler, and eval's compile warm-up."""

import sys
import types

import pytest
import torch
from torch import nn

from xception.cli import config_from_args
from xception.config import Config
from xception.data import loaders
from xception.engine import optim
from xception.engine.evaluate import _compile_warmup
from xception.engine.precision import Precision, make_precision
from xception.runtime import DistContext, capture_rng, configure_kernels, restore_rng


NPU = types.SimpleNamespace(type="npu", index=0)  # torch.device("npu") exists only once torch_npu is loaded


@pytest.fixture
def kernel_settings():
    """Put torch's global kernel choices back after a test changes them."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_cudnn_autotunes_on_cuda_unless_deterministic(kernel_settings):
    configure_kernels(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    configure_kernels(torch.device("cuda", 0), deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    configure_kernels(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_deterministic_is_a_train_and_eval_flag():
    from xception import cli
    parser = cli.build_parser()
    for command in (["train"], ["eval", "--resume", "w.pth"]):
        args = parser.parse_args([*command, "--data_path", "d", "--deterministic"])
        assert config_from_args(args).deterministic is True
        assert config_from_args(parser.parse_args([*command, "--data_path", "d"])).deterministic is False


def test_the_optimizer_is_fused_on_cuda_only():
    net = nn.Linear(3, 2)
    assert optim.build_optimizer(net, Config(), torch.device("cuda", 0)).defaults["fused"] is True
    assert not optim.build_optimizer(net, Config(), torch.device("cpu")).defaults["fused"]


class FakeNpu:
    """Stands in for torch.npu: records the stream and random-state calls the code makes."""

    def __init__(self):
        self.calls = []
        self.state = torch.tensor([7, 8, 9], dtype=torch.uint8)

    class Stream:
        def __init__(self, device):
            self.device = device

        def wait_stream(self, other):
            FakeNpu.last.calls.append(("wait", other))

    def stream(self, s):
        self.calls.append(("on side stream", s))
        return __import__("contextlib").nullcontext()

    def current_stream(self, device):
        return FakeNpu.Stream(device)

    def get_rng_state(self, device):
        return self.state.clone()

    def set_rng_state(self, state, device):
        self.calls.append(("set rng", state.tolist()))


@pytest.fixture
def fake_npu(monkeypatch):
    npu = FakeNpu()
    FakeNpu.last = npu
    real = torch.get_device_module
    monkeypatch.setattr(torch, "get_device_module", lambda kind=None: npu if kind == "npu" else real(kind))
    return npu


def test_npu_batches_are_pinned_and_copied_on_a_side_stream(fake_npu):
    assert loaders.pinned(NPU) and not loaders.pinned(torch.device("cpu"))
    batches = [("batch", i) for i in range(3)]
    out = list(loaders.prefetch(iter(batches), NPU))
    assert out == batches
    side = [c for c in fake_npu.calls if c[0] == "on side stream"]
    waits = [c for c in fake_npu.calls if c[0] == "wait"]
    assert len(side) == 3 and len(waits) == 3  # each batch copied on the side stream, and waited for
    assert all(c[1] is side[0][1] and c[1].device is NPU for c in side + waits)


def test_a_resume_restores_the_npu_random_stream(fake_npu):
    state = capture_rng(NPU)
    assert state["npu"].tolist() == [7, 8, 9]
    restore_rng(state, NPU)
    assert ("set rng", [7, 8, 9]) in fake_npu.calls


def test_fp16_on_npu_uses_torch_npus_loss_scaler(monkeypatch):
    made = []

    class NpuScaler:
        def __init__(self, **kwargs):
            made.append(kwargs)

    fake = types.ModuleType("torch_npu")
    fake.npu = types.SimpleNamespace(amp=types.SimpleNamespace(GradScaler=NpuScaler), utils=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    dynamic = make_precision(Config(amp=True), NPU)
    static = make_precision(Config(amp=True, loss_scale="128"), NPU)
    assert isinstance(dynamic.scaler, NpuScaler) and isinstance(static.scaler, NpuScaler)
    assert made == [{}, {"init_scale": 128.0}] and static.static_scale == 128.0


def test_the_eval_compile_warm_up_reads_no_val_batch():
    """DALI cannot restart an epoch, so a warm-up on a real val batch would cost the evaluation its first
    batches: the warm-up runs on a synthetic batch of the val batches' shape."""
    class OneShotLoader:
        batch_size = 3

        def __iter__(self):
            raise AssertionError("the warm-up read the val loader")

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
            return x.mean((2, 3))

    run = types.SimpleNamespace(cfg=Config(image_size=75), val_loader=OneShotLoader(),
                                ctx=DistContext(torch.device("cpu")), channels_last=True,
                                precision=Precision("cpu"), log=lambda *a: None)
    _compile_warmup(Probe(), run)
    assert seen == [((3, 3, 75, 75), True)]
