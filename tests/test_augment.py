"""--auto-augment and --random-erase (data/transforms.py): torchvision's v2 ops after crop, resize and flip
on both training paths (uint8 and Pillow), drawing from torch's generator only; the DALI refusal; the
shard-set path; and a short real training run with both."""

import os
import random

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from conftest import TINY, make_image_folder
from xception.config import Config, ShardSettings, UserError
from xception.data import build_loaders, transforms
from xception.data.transforms import ERASE_VALUE, PilTransform, Uint8Train, build_transform
from xception.runtime import DistContext

SIZE = 48  # output side: well under the 80 x 72 source images
POLICIES = ["ra", "ta", "aa", "augmix"]
LOADERS = ["tv", "pil"]  # tv: the default uint8 path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two 80 x 72 training images, a JPEG and a PNG (the uint8 path decodes them differently)."""
    root = make_image_folder(tmp_path_factory.mktemp("aug") / "d", classes=("a",), n_train=2, n_val=1)
    return [os.path.join(root, "train", "a", name) for name in ("0.jpg", "1.png")]


def train_transform(loader, **settings):
    # crop_scale (0.5, 1): crops large enough that a rectangle erased inside them is easy to see
    return build_transform(Config(loader=loader, image_size=SIZE, crop_scale=(0.5, 1.0), **settings), train=True)


def reseed_others(seed):
    random.seed(seed)
    np.random.seed(seed)


def seeded(transform, path, seed):
    torch.manual_seed(seed)
    return transform.load(path)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_auto_augment_keeps_uint8_and_size_and_changes_pixels(images, loader, policy):
    """Same seed, same crop and flip (the policy draws after them): the plain output is the image the
    policy received, and for some seed the policy changed it."""
    plain, augmented = train_transform(loader), train_transform(loader, auto_augment=policy)
    changed = 0
    for seed in range(4):
        for path in images:
            out, ref = seeded(augmented, path, seed), seeded(plain, path, seed)
            assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)
            changed += not torch.equal(out, ref)
    assert changed > 0


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_auto_augment_follows_the_torch_seed_only(images, loader, policy):
    """Same torch seed, same output, whatever Python's and NumPy's generators hold (a resumed run restores
    torch's state); another torch seed gives other outputs."""
    augmented = train_transform(loader, auto_augment=policy, random_erase=0.5)
    outputs = []
    for seed in range(3):
        reseed_others(seed)
        first = [seeded(augmented, path, seed) for path in images]
        reseed_others(seed + 100)
        again = [seeded(augmented, path, seed) for path in images]
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        outputs.append(torch.stack(first))
    assert not torch.equal(outputs[0], outputs[1]) or not torch.equal(outputs[1], outputs[2])


def test_randaugment_takes_the_magnitude_and_op_count():
    op = transforms.augment_ops(Config(auto_augment="ra", ra_magnitude=13, ra_num_ops=3))[0]
    assert isinstance(op, v2.RandAugment) and op.magnitude == 13 and op.num_ops == 3
    kinds = {name: type(transforms.auto_augment_op(name)) for name in POLICIES}
    assert kinds == {"ra": v2.RandAugment, "ta": v2.TrivialAugmentWide, "aa": v2.AutoAugment, "augmix": v2.AugMix}
    assert transforms.auto_augment_op("aa").policy == v2.AutoAugmentPolicy.IMAGENET


def erased_box(out, ref):
    """(top, left, bottom, right) of the pixels where `out` differs from `ref`, or None."""
    rows, cols = np.nonzero((out != ref).any(0).numpy())
    return None if rows.size == 0 else (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)


@pytest.mark.parametrize("loader", LOADERS)
def test_random_erase_fills_one_rectangle_and_leaves_the_rest(images, loader):
    plain, erasing = train_transform(loader), train_transform(loader, random_erase=1.0)
    for seed in range(3):
        for path in images:
            out, ref = seeded(erasing, path, seed), seeded(plain, path, seed)
            assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)
            box = erased_box(out, ref)
            assert box is not None, (seed, path)
            top, left, bottom, right = box
            assert (out[:, top:bottom, left:right] == ERASE_VALUE).all()  # a filled rectangle ...
            outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
            outside[top:bottom, left:right] = False
            assert torch.equal(out[:, outside], ref[:, outside])  # ... and nothing else touched
            assert 0 < (bottom - top) * (right - left) < SIZE * SIZE


@pytest.mark.parametrize("loader", LOADERS)
def test_random_erase_zero_and_no_policy_change_nothing(images, loader):
    off = train_transform(loader, random_erase=0.0, auto_augment=None)
    if isinstance(off, Uint8Train):
        assert off.augment is None  # no extra step at all on the fast path
    plain = train_transform(loader)
    for seed in range(3):
        for path in images:
            assert torch.equal(seeded(off, path, seed), seeded(plain, path, seed))


def test_eval_transforms_are_not_augmented(images):
    for loader in LOADERS:
        cfg = Config(loader=loader, image_size=SIZE, crop_pct=0.875)
        ref = build_transform(cfg, train=False)
        aug = build_transform(cfg.replace(auto_augment="ra", random_erase=1.0), train=False)
        for path in images:
            assert torch.equal(seeded(aug, path, 0), seeded(ref, path, 1))


def test_the_pil_path_augments_the_pil_image_and_erases_the_tensor():
    t = train_transform("pil", auto_augment="ta", random_erase=0.5)
    assert isinstance(t, PilTransform)
    kinds = [type(step) for step in t.compose.transforms]
    assert kinds.index(v2.TrivialAugmentWide) < kinds.index(v2.PILToTensor) < kinds.index(v2.RandomErasing)
    assert kinds[-1] is v2.RandomErasing


@pytest.mark.parametrize("need_train", [True, False])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_dali_refuses_the_augmentation_in_one_line_naming_the_loader(device, need_train):
    """Before the device check, so the message is the same everywhere; evaluations are not refused."""
    from xception.data.dali import dali_loaders
    ctx = DistContext(torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
    for settings, named in ((dict(auto_augment="ra"), "--auto-augment ra"),
                            (dict(random_erase=0.25), "--random-erase 0.25"),
                            (dict(auto_augment="augmix", random_erase=0.5), "--auto-augment augmix and --random-erase 0.5")):
        cfg = Config(data_path="nowhere", loader="dali", image_size=71, crop_pct=0.875, seed=0, **settings)
        for call in (lambda: dali_loaders(cfg, ctx, need_train), lambda: build_loaders(cfg, ctx, need_train)):
            with pytest.raises(UserError) as caught:
                call()
            text = str(caught.value)
            if need_train:
                assert "\n" not in text and text.startswith(named) and "--loader tv" in text, text
            else:  # past the augmentation check: the device check, or the missing folder / DALI
                assert "--auto-augment" not in text and "--random-erase" not in text, text


def test_shard_sets_get_the_augmentation(tmp_path):
    """A shard set's training batches pass through the same transform: with --random-erase 1 the first
    image of the first batch differs from the plain one in a rectangle of ERASE_VALUE."""
    from xception.tools import prepare as prep
    data = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=2, n_val=1)
    out = str(tmp_path / "shards")
    prep.prepare(data, out, ShardSettings(max_size=72, shard_size=2, min_shards=1), workers=1, log=lambda *a: None)
    ctx = DistContext(torch.device("cpu"))

    def first_batch(**settings):
        cfg = Config(data_path=out, image_size=SIZE, crop_pct=0.875, crop_scale=(0.5, 1.0), batch_size=2, workers=0,
                     seed=0, **settings)
        train = build_loaders(cfg, ctx, need_train=True, log=lambda *a: None).train
        train.set_epoch(0)
        torch.manual_seed(5)
        return next(iter(train))[0]

    plain, erased = first_batch(), first_batch(random_erase=1.0)
    assert erased.shape == plain.shape == (2, 3, SIZE, SIZE) and erased.dtype == torch.uint8
    # only the first image is comparable: erasing it draws from the generator before the second one's crop
    top, left, bottom, right = erased_box(erased[0], plain[0])
    assert (erased[0, :, top:bottom, left:right] == ERASE_VALUE).all()


def test_a_short_training_run_with_randaugment_and_random_erase(tmp_path, monkeypatch):
    """`xception train --auto-augment ra --random-erase 0.25` end to end, in-process on the CPU: it exits 0,
    and the training images went through RandAugment and RandomErasing (counted), at the run's size."""
    from xception import cli
    data = make_image_folder(tmp_path / "d")
    seen = {"RandAugment": [], "RandomErasing": []}
    for cls in (v2.RandAugment, v2.RandomErasing):
        def counting(self, *inputs, _forward=cls.forward, _name=cls.__name__):
            seen[_name].append(tuple(inputs[0].shape))
            return _forward(self, *inputs)
        monkeypatch.setattr(cls, "forward", counting)
    args = ["train", "--data_path", data, "--output-dir", tmp_path / "out", *TINY, "--epochs", "1",
            "--steps-per-epoch", "2", "--auto-augment", "ra", "--random-erase", "0.25", "--device", "cpu"]
    assert cli.main([str(a) for a in args]) == 0
    assert seen["RandAugment"] and seen["RandomErasing"]
    assert set(seen["RandAugment"]) == set(seen["RandomErasing"]) == {(3, 71, 71)}
