"""Two fixes: (1) under DDP, --freeze-epochs with --clip-grad-norm clips only the head's gradients, the ones
applied, as on one process; (2) every setting a --recipe turns on can be turned off again on the command
line (`none`, `0`, `--no-X`), and that choice wins over the recipe."""

import os

import pytest
import torch
from torch import nn

from conftest import TINY, one_line_error, run_cli
from xception.cli import build_parser, config_from_args
from xception.config import Config, UserError
from xception.engine.hooks import HeadOnly
from xception.engine.loop import Step
from xception.engine.precision import Precision
from xception.recipes import RECIPE_SETTINGS, RECIPES

# --- (1) DDP + --freeze-epochs + --clip-grad-norm -------------------------------------------------------

LR, CLIP = 0.1, 1e-3  # a clip far below the head's gradient norm: every step is clipped


class Net(nn.Module):
    """A backbone with BatchNorm and a classifier named `fc`, as HeadOnly tells the head apart."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x))


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def frozen_clipped_step(model, images, targets):
    """One optimizer step of the first (frozen) epoch, built as engine/train.py builds it."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    step = Step(model, nn.CrossEntropyLoss(), opt, sched, Precision("cpu"), 1, CLIP)
    freezer = HeadOnly(model, opt, epochs=1, log=lambda *a: None, step=step)
    freezer.epoch_start(0)
    model.train()
    step(images, targets)


def ddp_worker(rank, world, init_file, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = Net().double()
        images, targets = fixed_batch()
        frozen_clipped_step(DistributedDataParallel(net), images[rank::world], targets[rank::world])
        if rank == 0:
            torch.save(net.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_ddp_frozen_backbone_clips_only_the_heads_gradients_as_one_process_does(tmp_path):
    torch.manual_seed(0)
    init = Net().double()
    start = {k: v.clone() for k, v in init.state_dict().items()}
    one = Net().double()
    one.load_state_dict(start)
    frozen_clipped_step(one, *fixed_batch())  # 1 process, whole batch: backbone without gradients
    torch.multiprocessing.spawn(ddp_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path / "ddp.pt")), nprocs=2)
    two = torch.load(tmp_path / "ddp.pt", weights_only=True)
    ref, ddp = one.state_dict(), two
    head = torch.cat([(ref[k] - start[k]).flatten() for k in ("fc.weight", "fc.bias")])
    assert head.norm().item() == pytest.approx(LR * CLIP, rel=1e-3)  # clipped: the step is lr x clip long
    step = torch.cat([(ddp[k] - start[k]).flatten() for k in ("fc.weight", "fc.bias")])
    # before the fix the clip also measured the backbone's gradients, which DDP keeps until the step
    assert step.norm().item() == pytest.approx(head.norm().item(), rel=1e-9), "head step norm under DDP"
    for key in start:  # the backbone and its BatchNorm statistics did not move; the head moved as on 1 process
        torch.testing.assert_close(ddp[key], ref[key], rtol=1e-9, atol=1e-12, msg=key)
        if not key.startswith("fc."):
            assert torch.equal(ddp[key], start[key]), key


def test_head_only_takes_its_hook_out_of_the_step_when_unfrozen():
    net = Net().double()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    step = Step(net, nn.CrossEntropyLoss(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
                Precision("cpu"))
    freezer = HeadOnly(net, opt, epochs=1, log=lambda *a: None, step=step)
    freezer.epoch_start(0)
    assert len(step.before_update) == 1
    freezer.epoch_start(1)
    assert step.before_update == [] and not freezer.active


# --- (2) every recipe setting can be switched off -------------------------------------------------------

# For each recipe setting that has an "off": the flags that say so, and the Config value they must give.
OFF = {
    "amp": (["--no-amp"], False),
    "auto_augment": (["--auto-augment", "none"], None),
    "random_erase": (["--random-erase", "0"], 0),
    "mixup": (["--mixup", "0"], 0),
    "cutmix": (["--cutmix", "0"], 0),
    "drop_rate": (["--drop-rate", "0"], 0),
    "label_smoothing": (["--label-smoothing", "0"], 0),
    "warmup_epochs": (["--warmup-epochs", "0"], 0),
    "weight_decay": (["--wd", "0"], 0),
    "momentum": (["--momentum", "0"], 0),
    "ema": (["--no-ema"], False),
    "ema_warmup": (["--no-ema-warmup"], False),
    "nesterov": (["--no-nesterov"], False),
    "wd_norm_bias": (["--wd-norm-bias"], True),  # off: the recipe's "no decay on norm and bias" undone
}
# Settings that are amounts, not features: nothing to switch off.
NO_OFF = {"batch_size", "decay_epochs", "decay_rate", "ema_decay", "epochs", "lr", "opt", "sched"}


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", "--data_path", "d", *argv]))


def test_every_recipe_setting_is_classified():
    """A new recipe setting must say here whether it can be switched off (and then be tested below)."""
    assert set(RECIPE_SETTINGS) == set(OFF) | NO_OFF
    assert not set(OFF) & NO_OFF


@pytest.mark.parametrize("setting", sorted(OFF))
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_an_explicit_off_wins_over_the_recipe(recipe, setting):
    flags, off = OFF[setting]
    cfg = parse("--recipe", recipe, *flags)
    value = getattr(cfg, setting)
    assert (value is off) if off is None or isinstance(off, bool) else (value == off), (recipe, setting, value)
    cfg.validate()
    # everything else is still the recipe's
    for key, value in RECIPES[recipe].items():
        if key != setting:
            assert getattr(cfg, key) == value, key
    assert cfg.to_dict()[setting] == off  # what the checkpoint's args record


def test_auto_augment_none_is_the_plain_default():
    def settings(cfg):  # leaving out the record of which flags were given
        return {k: v for k, v in cfg.to_dict().items() if k != "explicit"}

    assert settings(parse("--auto-augment", "none")) == settings(parse()) == settings(Config(data_path="d"))
    assert parse("--recipe", "modern").auto_augment == "ta"


def test_modern_recipe_with_dali_is_accepted_once_its_augmentation_is_off(shared_data, tmp_path):
    """The DALI graph has no auto-augment or random erasing, so it refuses a run that asks for them; with
    both switched off, --recipe modern passes that check (and meets the next: DALI needs a CUDA GPU)."""
    from xception.data.dali import dali_loaders
    from xception.runtime import DistContext
    ctx = DistContext(device=torch.device("cpu"))
    with pytest.raises(UserError, match="--auto-augment ta and --random-erase 0.1: not available with --loader dali"):
        dali_loaders(parse("--recipe", "modern", "--loader", "dali"), ctx, need_train=True)
    with pytest.raises(UserError, match="--loader dali decodes on a CUDA GPU"):
        dali_loaders(parse("--recipe", "modern", "--loader", "dali", "--auto-augment", "none", "--random-erase", "0"),
                     ctx, need_train=True)
    # the same through the command line
    proc = run_cli("train", "--data_path", shared_data, "--output-dir", tmp_path, *TINY, "--epochs", 1,
                   "--device", "cpu", "--recipe", "modern", "--loader", "dali", "--auto-augment", "none",
                   "--random-erase", "0", env={"CUDA_VISIBLE_DEVICES": ""})
    line = one_line_error(proc)
    assert "not available with --loader dali" not in line and "--auto-augment" not in line, line
    assert "--loader dali decodes on a CUDA GPU" in line, line
    assert not os.path.exists(tmp_path / "checkpoint.pth.tar")
