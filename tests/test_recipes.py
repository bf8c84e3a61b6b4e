"""The recipe ingredients, each against its formula (float64 where the maths is exact): EMA, gradient
accumulation, clipping, no decay on norm/bias, mixup/CutMix targets, the paper's staircase; and the
named recipes."""

import math

import pytest
import torch
from torch import nn

from conftest import TINY, run_cli
from xception.cli import build_parser, config_from_args
from xception.config import Config
from xception.engine.ema import Ema
from xception.engine.loop import Step
from xception.engine.mix import build_mix
from xception.engine.optim import build_optimizer, build_scheduler
from xception.engine.precision import Precision
from xception.recipes import RECIPES


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).double()


def make_step(net, lr=0.1, accum=1, clip=None, momentum=0.9):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return Step(net, nn.CrossEntropyLoss(), opt, sched, Precision("cpu"), accum, clip)


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_after_3_steps_is_the_formula(warmup):
    net = small_net()
    step = make_step(net)
    ema = Ema(net, step, decay=0.9, warmup=warmup)
    snapshots = []
    for i in range(3):
        step(*batch(4, i))
        ema.after_step(i, None, False)
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
    # the first update copies; the n-th later one (n = 1, 2) mixes with decay d_n
    decays = [min(0.9, (1 + n) / (10 + n)) if warmup else 0.9 for n in (1, 2)]
    for key, value in ema.module.state_dict().items():
        if not value.is_floating_point():
            continue
        expect = snapshots[0][key]
        for d, snap in zip(decays, snapshots[1:]):
            expect = d * expect + (1 - d) * snap[key]
        assert torch.allclose(value, expect, rtol=0, atol=1e-12), key
    assert ema.updates == 3


def test_ema_every_k_steps_updates_every_k_optimizer_steps():
    net = small_net()
    step = make_step(net, accum=2)
    ema = Ema(net, step, decay=0.5, every=2)
    for i in range(8):  # 8 batches = 4 optimizer steps = 2 EMA updates
        step(*batch(2, i))
        ema.after_step(i, None, False)
    assert step.updates == 4 and ema.updates == 2


def test_two_accumulated_batches_equal_one_step_of_the_double_batch():
    x, y = batch(8, 1)
    one, two = small_net(), small_net()
    for net in (one, two):
        net[1].eval()  # BatchNorm statistics fixed: the two ways then compute the same function
    make_step(one)(x, y)
    step = make_step(two, accum=2)
    step(x[:4], y[:4])
    assert step.updates == 0 and all(p.grad is not None for p in two.parameters())  # waiting, not stepped
    step(x[4:], y[4:])
    assert step.updates == 1
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name


@pytest.mark.parametrize("limit", [1e-3, 1e6])
def test_clipping_bounds_the_gradient_norm_and_leaves_small_ones_alone(limit):
    x, y = batch(4, 2)
    seen = {}
    net = small_net()
    reference = small_net()
    nn.CrossEntropyLoss()(reference(x), y).backward()
    unclipped = torch.cat([p.grad.flatten() for p in reference.parameters()])
    step = make_step(net, clip=limit)
    step.optimizer.register_step_pre_hook(
        lambda opt, *_: seen.update(g=torch.cat([p.grad.flatten() for p in net.parameters()])))
    step(x, y)
    norm = seen["g"].norm()
    if limit < unclipped.norm():
        assert norm <= limit and norm == pytest.approx(limit, rel=1e-3)  # torch adds 1e-6 to the divisor
    else:
        assert torch.equal(seen["g"], unclipped)


def test_without_decay_on_norm_and_bias_only_the_other_weights_shrink():
    net = small_net()
    before = {k: v.clone() for k, v in net.named_parameters()}
    opt = build_optimizer(net, Config(lr=0.1, momentum=0.0, weight_decay=0.5, wd_norm_bias=False), torch.device("cpu"))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {"0.weight", "5.weight"}  # conv and linear weights; BatchNorm and the biases stay


def test_mixed_targets_are_probabilities():
    x, y = torch.randn(8, 3, 10, 10), torch.randint(0, 5, (8,))
    torch.manual_seed(0)
    for flags in (dict(mixup=1.0), dict(cutmix=1.0), dict(mixup=1.0, cutmix=1.0)):
        mixed, soft = build_mix(Config(**flags), 5)(x, y)
        assert soft.shape == (8, 5) and soft.dtype.is_floating_point and mixed.shape == x.shape
        assert torch.allclose(soft.sum(1), torch.ones(8))
        assert (soft.max(1).values < 0.99).any()  # some rows really are mixtures
    assert build_mix(Config(), 5) is None


def test_the_papers_staircase_at_epoch_boundaries():
    net = nn.Linear(2, 2)
    cfg = Config(epochs=10, lr=0.045, sched="exponential", decay_epochs=2, decay_rate=0.94)
    opt = build_optimizer(net, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, steps_per_epoch=3)
    for epoch in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.045 * 0.94 ** math.floor(epoch / 2), rel=1e-12)
        for _ in range(3):
            opt.step()
            sched.step()


def test_warm_up_composes_with_the_staircase():
    cfg = Config(epochs=6, lr=1.0, sched="step", decay_epochs=2, decay_rate=0.5, warmup_epochs=1)
    opt = build_optimizer(nn.Linear(2, 2), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, steps_per_epoch=4)
    lrs = []
    for _ in range(24):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[1] < lrs[2] < lrs[3] < 1.0  # linear warm-up in epoch 1
    assert lrs[4] == lrs[7] == 1.0 and lrs[8] == lrs[15] == 0.5 and lrs[16] == lrs[23] == 0.25


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", "--data_path", "d", *argv]))


def test_a_recipe_fills_defaults_and_explicit_flags_win():
    paper = parse("--recipe", "paper")
    for key, value in RECIPES["paper"].items():
        assert getattr(paper, key) == value, key
    mine = parse("--recipe", "paper", "--lr", "0.01", "--no-ema")
    assert mine.lr == 0.01 and mine.ema is False and mine.sched == "exponential"
    plain = parse()
    assert plain.lr == Config().lr and plain.sched == "cosine" and plain.ema is False


def test_the_resolved_recipe_is_printed_and_saved(shared_data, tmp_path):
    proc = run_cli("train", "--data_path", shared_data, "--output-dir", tmp_path, *TINY, "--recipe", "paper",
                   "--epochs", 1, "--steps-per-epoch", 1, "--no-ema")
    assert proc.returncode == 0, proc.stderr
    assert "recipe paper:" in proc.stdout and "sched exponential" in proc.stdout and "ema False" in proc.stdout
    args = torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)["args"]
    assert args["recipe"] == "paper" and args["weight_decay"] == 1e-5 and args["epochs"] == 1


def test_ema_runs_are_evaluated_both_ways_and_keep_the_best_epochs(shared_data, tmp_path):
    proc = run_cli("train", "--data_path", shared_data, "--output-dir", tmp_path, *TINY, "--epochs", 3,
                   "--ema", "--ema-decay", "0.5", "--keep-checkpoints", 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" ema_top1 ") == 3  # the epoch line shows both
    import csv
    import re
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    scores = [max(float(r["top1"]), float(r["ema_top1"])) for r in rows]
    best_epoch = 1 + max(range(3), key=lambda i: (scores[i], -i))
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-epoch*.pth.tar"))
    assert kept == [f"checkpoint-epoch{best_epoch}.pth.tar"]
    best = torch.load(tmp_path / "model_best.pth.tar", map_location="cpu", weights_only=True)
    i = best_epoch - 1
    # one EMA update per optimizer step: the best epoch's file holds best_epoch x (steps per epoch), whichever
    # epoch the run's arithmetic made best
    steps = int(re.search(r"(\d+) iterations per epoch", proc.stdout).group(1))
    assert best["epoch"] == best_epoch and best["ema"] is not None
    assert steps > 0 and best["ema_updates"] == best_epoch * steps
    assert best["best_source"] == ("ema" if float(rows[i]["ema_top1"]) > float(rows[i]["top1"]) else "model")
