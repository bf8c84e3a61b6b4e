"""Image files -> 3xHxW uint8 tensors: the decoders, and the two families of transforms, which both
read a file (`load(path)`) or its bytes (`load_bytes(data)`):

* `Uint8Train` / `Uint8Eval` (`--loader tv`, the default): decode, crop, resize and flip in uint8, never
  float, with the sample's memory channels-last (HxWx3): the antialiased uint8 resize is ~2.5x faster on
  that layout, the collated batch is NHWC, and the device-side conversion to a channels_last float batch
  (loaders.to_device) then needs no transpose.
* `pil_train` / `pil_eval` (`--loader pil`): the reference, Pillow + torchvision transforms v2.

Training augmentation beyond crop and flip (--auto-augment, --random-erase) is torchvision's v2 ops, the
same on both families, in the reference order: crop, resize, flip, then the auto-augment policy on the
uint8 image, then random erasing last (`augment_ops`). The DALI graph has neither (data/dali.py refuses).

Decoder choice (measured, docs/performance.md "Input pipeline"): TorchCodec's decode_jpeg (libjpeg-turbo,
EXIF orientation applied, greyscale and CMYK made RGB exactly as Pillow does) for JPEGs; Pillow with
reduced-size DCT decoding (Image.draft) when the pixels needed are at most half the stored size in both
directions; Pillow (`load_rgb`) for every other format. Crop parameters come from torchvision's own
RandomResizedCrop and resizing is torch's antialiased uint8 kernel (the same filter as PIL's), so the
augmentation is the reference one.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import get_worker_info
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

try:  # TorchCodec is a dependency; should its wheel be missing on a platform, Pillow decodes everything
    from torchcodec.decoders import decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect range, as in the reference transform
ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# What random erasing writes into its rectangle. to_device maps 128 to +0.004, about the mean of the
# model's [-1, 1] input: the uint8 equivalent of erasing to 0 after Normalize, as torchvision's reference
# recipe does. Black (0) would become -1, an extreme value, and value="random" is no option on uint8:
# torchvision writes its float N(0, 1) noise into the uint8 image, which makes 0/1 and wrapped 254/255
# speckle, not noise.
ERASE_VALUE = 128


def load_rgb(path) -> Image.Image:
    """Open any supported image (a path or a file object) as RGB, honouring the EXIF orientation (as a
    camera shows the photo); 16-bit images are scaled to 8 bits, palettes resolved through RGBA."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            img = img.point(lambda v: v * (1 / 256)).convert("L")  # 16-bit -> 8-bit, not clipped
        elif img.mode == "P":
            img = img.convert("RGBA")  # palette transparency is resolved through RGBA
        return img.convert("RGB")


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    return int(image_size / crop_pct)


def _pil_to_hwc(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


def _chw(hwc: torch.Tensor) -> torch.Tensor:
    return hwc.permute(2, 0, 1)


def jpeg_size(data: bytes):
    """(width, height) as stored, from the JPEG's frame header, or None if it has none. Pillow's full
    header parse costs about a tenth of a decode, and only the size is needed to rule a reduction out."""
    pos, end = 2, len(data) - 9
    while pos < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def _jpeg(data: bytes) -> torch.Tensor:
    """A JPEG -> 3xHxW uint8, EXIF orientation applied; greyscale and CMYK become RGB (as Pillow does)."""
    if decode_jpeg is None:
        return _pil(data)
    try:
        return decode_jpeg(data, mode="RGB")  # applies the EXIF orientation
    except RuntimeError:  # a JPEG libjpeg-turbo refuses through TorchCodec: Pillow copes, or says why
        return _pil(data)


def _pil(data: bytes) -> torch.Tensor:
    return _chw(_pil_to_hwc(load_rgb(io.BytesIO(data))))


def decode_reduced(data: bytes, need, floor: int) -> tuple:
    """Decode so that the image is still at least `need(oriented_w, oriented_h) -> (min_w, min_h)` pixels,
    letting libjpeg drop DCT coefficients (1/2, 1/4, 1/8) when that is allowed. `floor`: the shortest
    short side that could ever allow a reduction; below it `need` is not called (nor EXIF read). Returns
    (3xHxW uint8, scale of the result relative to the stored, oriented size). Non-JPEGs: full size."""
    if data[:3] != JPEG_MAGIC:
        return _pil(data), 1.0
    size = jpeg_size(data)
    if size is None or min(size) < floor:
        return _jpeg(data), 1.0
    img = Image.open(io.BytesIO(data))
    try:
        w, h = img.size
        turned = img.getexif().get(ORIENTATION, 1) in TRANSPOSED
        ow, oh = (h, w) if turned else (w, h)
        min_w, min_h = need(ow, oh)
        if ow < 2 * min_w or oh < 2 * min_h:  # no reduction for this crop: the fast full decoder
            return _jpeg(data), 1.0
        want = (min_h, min_w) if turned else (min_w, min_h)
        img.draft("RGB", (max(1, want[0]), max(1, want[1])))
        scale = img.size[0] / w
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return _chw(_pil_to_hwc(img)), scale
    finally:
        img.close()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]


class FileTransform:
    """A transform that reads the file itself, so that it can choose the decoder and the decoded size."""

    def load(self, path: str) -> torch.Tensor:
        with open(path, "rb") as f:
            return self.load_bytes(f.read())

    def load_bytes(self, data: bytes) -> torch.Tensor:
        raise NotImplementedError


class Uint8Train(FileTransform):
    """RandomResizedCrop(size, scale, 3/4..4/3, bilinear, antialias) + p=0.5 horizontal flip, on uint8,
    then `augment` (a v2 transform of a uint8 image, from augment_ops) if given. Also callable on a
    decoded PIL image or uint8 tensor (`apply`)."""

    def __init__(self, size: int, scale=(0.08, 1.0), hflip: bool = True, augment=None):
        self.size, self.scale, self.hflip, self.augment = size, tuple(scale), hflip, augment

    def crop_params(self, height: int, width: int) -> tuple:
        """(top, left, h, w): torchvision's own RandomResizedCrop sampler, on torch's random stream."""
        return v1.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width),
                                               list(self.scale), list(RATIO))

    def load_bytes(self, data: bytes) -> torch.Tensor:
        chosen = {}

        def need(w, h):  # sample the crop on the oriented full-size image, before decoding
            chosen["box"] = box = self.crop_params(h, w)
            side = min(box[2], box[3])
            return math.ceil(w * self.size / side), math.ceil(h * self.size / side)

        # a crop side is at most the image's short side; halving needs it at 2x the output
        image, scale = decode_reduced(data, need, 2 * self.size)
        if "box" not in chosen:  # a non-JPEG: crop parameters on the decoded image
            return self.apply(image)
        top, left, h, w = chosen["box"]
        if scale != 1.0:
            ih, iw = image.shape[1:]
            top, left = min(round(top * scale), ih - 1), min(round(left * scale), iw - 1)
            h, w = max(1, min(round(h * scale), ih - top)), max(1, min(round(w * scale), iw - left))
        return self._crop_resize_flip(image, top, left, h, w)

    def apply(self, image) -> torch.Tensor:
        image = _as_chw(image)
        return self._crop_resize_flip(image, *self.crop_params(*image.shape[1:]))

    __call__ = apply

    def _crop_resize_flip(self, image, top, left, h, w) -> torch.Tensor:
        # torch's antialiased bilinear on a channels-last uint8 crop: the kernel behind torchvision's
        # resize (same filter, same output), called directly to save its dispatch (~15% of this step)
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                              antialias=True, align_corners=False)
        if self.hflip and torch.rand(1).item() < 0.5:
            out = out.flip(-1)
        if self.augment is None:
            return _channels_last(out[0])
        # the v2 ops return plain CHW memory; back to channels-last, the layout collate copies fastest
        return _channels_last(self.augment(out[0]))


class Uint8Eval(FileTransform):
    """Resize the short side to int(size / crop_pct) (bicubic, antialias), centre-crop size: uint8."""

    def __init__(self, size: int, crop_pct: float):
        self.size, self.resize_to = size, eval_resize_size(size, crop_pct)

    def load_bytes(self, data: bytes) -> torch.Tensor:
        def need(w, h):
            short = min(w, h)
            return math.ceil(w * self.resize_to / short), math.ceil(h * self.resize_to / short)

        return self.apply(decode_reduced(data, need, 2 * self.resize_to)[0])

    def apply(self, image) -> torch.Tensor:
        out = F.resize(_channels_last(_as_chw(image)), [self.resize_to], InterpolationMode.BICUBIC, antialias=True)
        return _channels_last(F.center_crop(out, [self.size, self.size]))

    __call__ = apply


def _as_chw(image) -> torch.Tensor:
    return _chw(_pil_to_hwc(image.convert("RGB"))) if isinstance(image, Image.Image) else image


class PilTransform(FileTransform):
    """The reference path (`--loader pil`): Pillow decodes, torchvision transforms v2 augment the PIL image;
    `after` runs on the uint8 tensor it becomes."""

    def __init__(self, steps: list, after: list = ()):
        self.compose = v2.Compose(steps + [v2.PILToTensor()] + list(after))

    def load(self, path: str) -> torch.Tensor:
        return self.compose(load_rgb(path))

    def load_bytes(self, data: bytes) -> torch.Tensor:
        return self.compose(load_rgb(io.BytesIO(data)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.compose(image)


def pil_train(size: int, scale=(0.08, 1.0), hflip: bool = True, policy=None, erase=None) -> PilTransform:
    """`policy` (an auto-augment op) works on the PIL image, as in torchvision's reference recipe; `erase`
    (RandomErasing) on the tensor, as on the uint8 path."""
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    steps = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)] + flip
    return PilTransform(steps + ([policy] if policy else []), [erase] if erase else [])


def pil_eval(size: int, crop_pct: float) -> PilTransform:
    return PilTransform([v2.Resize(eval_resize_size(size, crop_pct), interpolation=InterpolationMode.BICUBIC,
                                   antialias=True), v2.CenterCrop(size)])


def auto_augment_op(name, magnitude: int = 9, num_ops: int = 2):
    """The --auto-augment policy as a torchvision v2 op (it takes uint8 tensors and PIL images alike), or
    None. Geometric ops interpolate bilinearly, as torchvision's classification recipe asks (v2's default
    is nearest). All of them draw from torch's global generator, which the run seeds per rank, epoch and
    loader worker and a checkpoint restores: the augmentation is reproducible and resumes exactly."""
    bilinear = InterpolationMode.BILINEAR
    if name is None:
        return None
    if name == "ra":
        return v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=bilinear)
    if name == "ta":
        return v2.TrivialAugmentWide(interpolation=bilinear)
    if name == "aa":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear)
    if name == "augmix":
        return v2.AugMix(interpolation=bilinear)
    raise ValueError(f"unknown auto-augment policy {name!r}")  # Config.validate refuses it first


def augment_ops(cfg) -> tuple:
    """(auto-augment op or None, RandomErasing or None) for the run's settings."""
    policy = auto_augment_op(cfg.auto_augment, cfg.ra_magnitude, cfg.ra_num_ops)
    erase = v2.RandomErasing(p=cfg.random_erase, value=ERASE_VALUE) if cfg.random_erase > 0 else None
    return policy, erase


def build_transform(cfg, train: bool) -> FileTransform:
    """The run's train or eval transform: cfg.loader pil is the reference, anything else the uint8 path.
    Only training gets --auto-augment and --random-erase."""
    if not train:
        make_eval = pil_eval if cfg.loader == "pil" else Uint8Eval
        return make_eval(cfg.image_size, cfg.crop_pct)
    policy, erase = augment_ops(cfg)
    if cfg.loader == "pil":
        return pil_train(cfg.image_size, cfg.crop_scale, cfg.hflip, policy, erase)
    ops = [op for op in (policy, erase) if op is not None]
    return Uint8Train(cfg.image_size, cfg.crop_scale, cfg.hflip, v2.Compose(ops) if ops else None)


def collate(batch: list) -> tuple:
    """[(3xHxW uint8, class)] -> (N x 3 x H x W uint8 with NHWC memory, int64 classes); multi-hot float
    rows for classes stack to N x classes. Inside a loader worker the batch goes straight into shared
    memory, the one copy on its way to the trainer."""
    images, targets = zip(*batch)
    c, h, w = images[0].shape
    out = torch.empty((len(images), h, w, c), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    torch.stack([x.permute(1, 2, 0) for x in images], out=out)
    if isinstance(targets[0], torch.Tensor):
        return out.permute(0, 3, 1, 2), torch.stack(targets)
    return out.permute(0, 3, 1, 2), torch.as_tensor(targets, dtype=torch.int64)
