"""The EMA decay warm-up's two shapes (--ema-warmup-shape), each against its formula: the decay sequence,
its cap at --ema-decay, and the average after 3 updates (float64)."""

import pytest
import torch
from torch import nn

from xception.cli import build_parser, config_from_args
from xception.config import Config, UserError
from xception.engine.ema import WARMUP_SHAPES, Ema
from xception.engine.loop import Step
from xception.engine.precision import Precision

FORMULAS = {
    "ratio": lambda n: (1 + n) / (10 + n),
    "power": lambda n: 1 - (1 + n) ** (-2 / 3),
}


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).double()


def sgd_step(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return Step(net, nn.CrossEntropyLoss(), opt, sched, Precision("cpu"), 1, None)


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_the_shapes_are_the_flag_choices_and_the_default_is_valid():
    assert set(FORMULAS) == set(WARMUP_SHAPES)
    assert Config().ema_warmup_shape in WARMUP_SHAPES


@pytest.mark.parametrize("shape", sorted(FORMULAS))
def test_the_decay_sequence_is_the_formula_and_capped(shape):
    net = small_net()
    for cap in (0.99, 0.35):  # 0.99 is above every early value; 0.35 cuts both ramps within n = 0..5
        ema = Ema(net, sgd_step(net), decay=cap, warmup=True, shape=shape)
        seen = []
        for n in range(6):
            ema.updates = n  # the decay depends on the count alone
            seen.append(ema.current_decay())
        expect = [min(cap, FORMULAS[shape](n)) for n in range(6)]
        assert seen == pytest.approx(expect, abs=1e-15)
        assert max(seen) <= cap
        if cap == 0.35:
            assert seen[-1] == cap and seen[0] < cap  # the cap bites inside the range
    assert Ema(net, sgd_step(net), decay=0.9, warmup=False, shape=shape).current_decay() == 0.9


def test_the_two_shapes_differ_and_power_is_the_longer_window():
    for n in range(1, 200):
        assert FORMULAS["power"](n) > FORMULAS["ratio"](n)


@pytest.mark.parametrize("shape", sorted(FORMULAS))
def test_the_ema_after_3_updates_is_the_formula(shape):
    net = small_net()
    step = sgd_step(net)
    ema = Ema(net, step, decay=0.9, warmup=True, shape=shape)
    snapshots = []
    for i in range(3):
        step(*batch(i))
        ema.after_step(i, None, False)
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
    # the first update copies; the later ones (n = 1, 2 updates before them) mix with min(0.9, f(n))
    expect = dict(snapshots[0])
    for n, snap in zip((1, 2), snapshots[1:]):
        d = min(0.9, FORMULAS[shape](n))
        expect = {k: d * expect[k] + (1 - d) * snap[k] if snap[k].is_floating_point() else snap[k]
                  for k in snap}
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, expect[key], rtol=0, atol=1e-12), key
    assert ema.updates == 3


def test_the_flag_reaches_the_config_and_a_bad_shape_is_refused():
    parse = lambda *a: config_from_args(build_parser().parse_args(["train", "--data_path", "x", *a]))
    assert parse("--ema", "--ema-warmup", "--ema-warmup-shape", "power").ema_warmup_shape == "power"
    assert parse().ema_warmup_shape == Config().ema_warmup_shape
    modern = parse("--recipe", "modern")
    assert modern.ema_warmup is True and modern.ema_warmup_shape == Config().ema_warmup_shape
    with pytest.raises(SystemExit):
        parse("--ema-warmup-shape", "cosine")
    with pytest.raises(UserError, match="--ema-warmup-shape"):
        Config(ema_warmup_shape="cosine").validate()
    with pytest.raises(ValueError):
        Ema(small_net(), sgd_step(small_net()), decay=0.9, warmup=True, shape="cosine")
