import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, save_image
from xception.config import Config, UserError
from xception.data import to_device
from xception.data.folder import scan_dataset
from xception.data.loaders import EvalSampler
from xception.data.transforms import eval_resize_size, load_rgb, pil_eval, pil_train


def test_scan_finds_classes_and_images(tiny_data):
    train, val = scan_dataset(tiny_data)
    assert train.classes == val.classes == ["cat", "dog", "fox"]
    assert len(train.samples) == 12 and len(val.samples) == 9


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_is_refused(tiny_data, missing):
    import shutil
    shutil.rmtree(os.path.join(tiny_data, missing))
    with pytest.raises(UserError, match=f"no {missing}/"):
        scan_dataset(tiny_data)


def test_data_path_that_is_a_file_or_absent(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        scan_dataset(str(f))
    with pytest.raises(UserError, match="no such folder"):
        scan_dataset(str(tmp_path / "absent"))


def test_empty_class_folder_is_named(tiny_data):
    os.makedirs(os.path.join(tiny_data, "train", "empty_one"))
    os.makedirs(os.path.join(tiny_data, "val", "empty_one"))
    with pytest.raises(UserError, match="empty_one"):
        scan_dataset(tiny_data)


def test_class_folder_with_only_non_images_counts_as_empty(tiny_data):
    folder = os.path.join(tiny_data, "train", "notes")
    os.makedirs(folder)
    open(os.path.join(folder, "readme.txt"), "w").close()
    with pytest.raises(UserError, match="notes"):
        scan_dataset(tiny_data)


def test_differing_class_lists_name_the_classes(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b"))
    os.rename(os.path.join(root, "val", "b"), os.path.join(root, "val", "c"))
    with pytest.raises(UserError) as err:
        scan_dataset(root)
    assert "only in train: ['b']" in str(err.value) and "only in val: ['c']" in str(err.value)


@pytest.mark.parametrize("mode,ext", [("L", "png"), ("P", "gif"), ("RGBA", "png"), ("CMYK", "jpg"),
                                      ("RGB", "bmp"), ("RGB", "webp"), ("I;16", "png")])
def test_every_mode_and_format_becomes_rgb(tmp_path, mode, ext):
    if mode == "I;16":
        img = Image.fromarray(np.full((20, 30), 40000, np.uint16))
    else:
        img = Image.new(mode, (30, 20))
    out = load_rgb(save_image(img, tmp_path / f"x.{ext}"))
    assert out.mode == "RGB" and out.size == (30, 20)
    if mode == "I;16":  # scaled from 16 bits to 8, not clipped to white
        assert np.asarray(out)[0, 0, 0] == 40000 // 256


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_rgb(save_image(img, tmp_path / "r.jpg", exif=exif))
    assert out.size == (20, 40)


def test_train_and_eval_transforms_give_uint8_squares():
    cfg = Config(image_size=71, crop_scale=(0.5, 1.0))
    img = Image.new("RGB", (120, 90), (10, 20, 30))
    for t in (pil_train(cfg.image_size, cfg.crop_scale), pil_eval(71, 0.875)):
        x = t(img)
        assert x.dtype == torch.uint8 and x.shape == (3, 71, 71)
    assert eval_resize_size(299, 0.8975) == 333


def test_eval_transform_resizes_the_short_side_then_centre_crops():
    # A left half black / right half white 200x100 image: after resize to short side 100 and a centre crop
    # of 80, the crop spans columns 60..140 of 200, so its left half is black and its right half white.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 100:] = 255
    x = pil_eval(80, 0.8)(Image.fromarray(arr))
    assert x.shape == (3, 80, 80)
    assert x[:, :, :35].max() < 10 and x[:, :, 45:].min() > 245


def test_to_device_scales_to_minus_one_one_in_the_requested_layout():
    batch = torch.tensor([0, 255], dtype=torch.uint8).repeat(2, 3, 71, 36)[..., :71]
    out = to_device(batch, torch.device("cpu"), channels_last=True)
    assert out.dtype == torch.float32 and out.min() == -1 and out.max() == 1
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_sampler_gives_every_sample_exactly_once(world):
    seen = sorted(i for rank in range(world) for i in EvalSampler(11, rank, world))
    assert seen == list(range(11))
