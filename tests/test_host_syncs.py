"""The training epoch and the evaluation pass never read a device value on the host outside a print step
(a read waits for the device, so the CPU cannot queue the next step ahead). Counted on the CPU by patching
the Tensor methods that read a value; on a GPU, benchmarks/gpu.sh counts real synchronisations
(`xception bench --sync-debug`)."""

import importlib

import pytest
import torch

from conftest import make_image_folder
from xception import cli
from xception.engine import loop

train = importlib.import_module("xception.engine.train")  # the module; the package exports train()

READS = ("item", "tolist", "__bool__", "__float__", "__int__")
STEPS, PRINT_FREQ = 20, 10


@pytest.fixture
def recorded_reads(monkeypatch):
    """Every host read of a tensor during training, with where it happened: ("train", step) for the
    steps of an epoch (1-based, the step being run or just run; 0 before the first), ("eval", batch)
    inside the evaluation loop (0 before the first batch), ("eval-end", 0) once its sums are combined."""
    where = {"phase": None, "n": 0}
    reads = []

    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            if where["phase"] is not None:
                reads.append((where["phase"], where["n"], _name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    real_call = loop.Step.__call__

    def counted_step(self, images, targets):
        where["n"] += 1
        return real_call(self, images, targets)

    def in_phase(phase, fn, reset=True):
        def wrapped(*args, **kwargs):
            where["phase"] = phase
            if reset:
                where["n"] = 0
            try:
                return fn(*args, **kwargs)
            finally:
                where["phase"] = None
        return wrapped

    real_to_device, real_result = loop.to_device, loop.TopK.result

    def batch_arrives(*args):  # in the evaluation loop, a batch starts here
        if where["phase"] == "eval":
            where["n"] += 1
        return real_to_device(*args)

    def eval_end(self, ctx):
        where["phase"], where["n"] = "eval-end", 0
        return real_result(self, ctx)

    monkeypatch.setattr(loop.Step, "__call__", counted_step)
    monkeypatch.setattr(train, "train_one_epoch", in_phase("train", train.train_one_epoch))
    monkeypatch.setattr(train, "evaluate", in_phase("eval", train.evaluate))
    monkeypatch.setattr(loop, "to_device", batch_arrives)
    monkeypatch.setattr(loop.TopK, "result", eval_end)
    return reads


def test_an_epoch_reads_the_device_only_at_print_steps(tmp_path, recorded_reads, capsys):
    # 3 classes x 14 images, batch 2: 21 batches, of which the epoch takes 20; 9 val images in 5 batches.
    # One loader worker: the augmentation's own reads of random numbers happen there, not here.
    data = make_image_folder(tmp_path / "data", n_train=14, size=(72, 72))
    code = cli.main(["train", "--data_path", data, "--output-dir", str(tmp_path / "out"), "--epochs", "1",
                     "--steps-per-epoch", str(STEPS), "--print-freq", str(PRINT_FREQ), "--image-size", "71",
                     "--batch-size", "2", "--workers", "1", "--seed", "1", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    train_reads = [(n, name) for phase, n, name in recorded_reads if phase == "train"]
    # step 0: the loader's start (the sampler's order, on the host); augmentation reads run in the worker
    assert {n for n, _ in train_reads} <= {0, PRINT_FREQ, STEPS}, train_reads
    assert any(n == PRINT_FREQ for n, _ in train_reads)  # the print steps do read (the counter works)
    eval_reads = [(n, name) for phase, n, name in recorded_reads if phase == "eval" and n > 0]
    assert eval_reads == [], eval_reads  # none once the first batch has arrived
    assert any(phase == "eval-end" for phase, _, _ in recorded_reads)
