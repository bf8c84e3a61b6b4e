"""The uint8 input pipeline (data/transforms.py, data/loaders.py): same augmentation as the reference
transforms, same pixels as the plain PIL path within interpolation tolerance, channels-last uint8 batches;
the loaders behind build_loaders (folder, DALI); and `bench --mode data`."""

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from conftest import save_image
from xception.config import Config
from xception.data import to_device
from xception.data import transforms as decode
from xception.data.transforms import Uint8Eval, Uint8Train, load_rgb, pil_eval, pil_train


def smooth_image(w, h, seed=0):
    """A photo-like image: smooth colour fields (so resampling filters agree to within a level or two)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return low.resize((w, h), Image.BICUBIC)


def as_hwc(x):
    return x.permute(1, 2, 0).numpy().astype(np.int16)


def decode_full(data: bytes) -> torch.Tensor:
    """Any image file's bytes at full size (no reduced decode): TorchCodec for a JPEG, Pillow otherwise."""
    image, scale = decode.decode_reduced(data, None, math.inf)  # no size reaches the floor: never reduced
    assert scale == 1.0
    return image


@pytest.fixture
def torchcodec_calls(monkeypatch):
    """Records every call of TorchCodec's JPEG decoder (and whether it returned), so a test can tell that
    a JPEG really went through it and not through the Pillow fallback."""
    real, calls = decode.decode_jpeg, []

    def spy(*args, **kwargs):
        calls.append("called")
        out = real(*args, **kwargs)
        calls[-1] = "decoded"
        return out

    monkeypatch.setattr(decode, "decode_jpeg", spy)
    return calls


def test_crop_parameters_have_the_reference_distribution():
    """Independent draws of ours and of torchvision v2 RandomResizedCrop: area share and log aspect
    quantiles agree, and every crop fits the image."""
    h, w, n = 375, 500, 4000
    ours = Uint8Train(299, scale=(0.08, 1.0))
    ref = v2.RandomResizedCrop(299, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    image = torch.empty(1, 1, 1).expand(3, h, w)
    torch.manual_seed(1)
    mine = [ours.crop_params(h, w) for _ in range(n)]
    torch.manual_seed(2)
    drawn = [ref.make_params([image]) for _ in range(n)]
    theirs = [(d["top"], d["left"], d["height"], d["width"]) for d in drawn]
    for top, left, ch, cw in mine:
        assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w
    for stat in (lambda p: p[2] * p[3] / (h * w), lambda p: math.log(p[3] / p[2]),
                 lambda p: (p[0] + p[2] / 2) / h, lambda p: (p[1] + p[3] / 2) / w):
        a, b = np.array([stat(p) for p in mine]), np.array([stat(p) for p in theirs])
        qa, qb = np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9]), np.quantile(b, [0.1, 0.25, 0.5, 0.75, 0.9])
        assert np.abs(qa - qb).max() < 0.04 * (b.max() - b.min()), (qa, qb)
    area = np.array([p[2] * p[3] / (h * w) for p in mine])
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0


def test_train_path_matches_the_reference_transform_with_the_same_seed(tmp_path):
    """Same torch seed: the reference (PIL image -> v2 RandomResizedCrop + flip) and ours (decoder ->
    uint8 channels-last crop/resize/flip) pick the same crops and flips, so only the interpolation
    implementations differ."""
    path = save_image(smooth_image(500, 375), tmp_path / "a.png")
    cfg = Config(image_size=97, crop_scale=(0.08, 1.0))
    ref, ours = pil_train(cfg.image_size, cfg.crop_scale), Uint8Train(97, cfg.crop_scale)
    flips = 0
    for seed in range(12):
        torch.manual_seed(seed)
        expected = as_hwc(ref(load_rgb(path)))
        torch.manual_seed(seed)
        got = ours.load(path)
        assert got.shape == (3, 97, 97) and got.dtype == torch.uint8
        diff = np.abs(as_hwc(got) - expected)
        assert diff.mean() < 1.0 and diff.max() <= 12, (seed, diff.mean(), diff.max())
        flipped = np.abs(as_hwc(got.flip(-1)) - expected).mean()
        flips += flipped < diff.mean()
    assert flips == 0  # a flip mismatch would show as a much larger difference than the unflipped one


@pytest.mark.parametrize("size", [(500, 375), (375, 500)])
def test_eval_path_matches_the_plain_pil_path(tmp_path, size):
    """Without a reduced decode (the resize target is over half the short side) the pixels are the PIL
    path's: the same libjpeg-turbo decode, the same antialiased bicubic filter."""
    path = save_image(smooth_image(*size), tmp_path / "a.jpg", quality=90)
    expected = as_hwc(pil_eval(299, 0.8975)(load_rgb(path)))
    got = Uint8Eval(299, 0.8975).load(path)
    assert got.shape == (3, 299, 299)
    diff = np.abs(as_hwc(got) - expected)
    assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())


def test_large_jpeg_decodes_reduced_and_still_matches(tmp_path, monkeypatch):
    """A 1600x1200 JPEG evaluated at 113 px: Pillow's draft decodes it at 1/4 or 1/8 scale, and the
    result still matches the full-size PIL path within interpolation tolerance."""
    path = save_image(smooth_image(1600, 1200), tmp_path / "big.jpg", quality=92)
    drafts = []
    from PIL.JpegImagePlugin import JpegImageFile
    real = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, *a: drafts.append(a) or real(self, *a))
    got = Uint8Eval(113, 0.875).load(path)
    assert drafts, "the reduced-size decoder was not used"
    expected = as_hwc(pil_eval(113, 0.875)(load_rgb(path)))
    diff = np.abs(as_hwc(got) - expected)
    # libjpeg's DCT-domain downscale is a different (box-like) filter than bicubic: a level or two off
    assert diff.mean() < 2.5 and diff.max() <= 16, (diff.mean(), diff.max())
    data = open(path, "rb").read()
    image, scale = decode.decode_reduced(data, lambda w, h: (w // 4, h // 4), 2)
    assert scale == 0.25 and tuple(image.shape) == (3, 300, 400)


@pytest.mark.parametrize("reduced", [False, True])
def test_exif_orientation_is_honoured(tmp_path, reduced, torchcodec_calls):
    """Reduced: Pillow's draft decode, then exif_transpose. Full size: TorchCodec applies the orientation."""
    img = smooth_image(800, 600)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = open(save_image(img, tmp_path / "r.jpg", exif=exif, quality=95), "rb").read()
    if reduced:
        out, scale = decode.decode_reduced(data, lambda w, h: (w // 2, h // 2), 2)
        assert scale == 0.5 and tuple(out.shape) == (3, 400, 300)
    else:
        out = decode_full(data)
        assert torchcodec_calls == ["decoded"]  # TorchCodec decoded it (no fallback to Pillow)
        assert tuple(out.shape) == (3, 800, 600)
        ref = np.asarray(load_rgb(io.BytesIO(data))).astype(np.int16)
        assert np.abs(as_hwc(out) - ref).mean() < 0.5


@pytest.mark.parametrize("mode,ext", [("CMYK", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("P", "gif"),
                                      ("RGB", "webp")])
def test_other_modes_and_formats_become_the_same_rgb_as_pil(tmp_path, mode, ext, torchcodec_calls):
    img = smooth_image(60, 40).convert(mode)
    path = save_image(img, tmp_path / f"x.{ext}")
    out = decode_full(open(path, "rb").read())
    # greyscale and CMYK JPEGs are made RGB by TorchCodec itself; other formats never reach it
    assert torchcodec_calls == (["decoded"] if ext == "jpg" else [])
    ref = np.asarray(load_rgb(path)).astype(np.int16)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 40, 60)
    assert np.abs(as_hwc(out) - ref).max() <= 1


def test_jpeg_size_reads_the_frame_header(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 3
    data = open(save_image(smooth_image(123, 45), tmp_path / "s.jpg", exif=exif, progressive=True), "rb").read()
    assert decode.jpeg_size(data) == (123, 45)
    assert decode.jpeg_size(b"\xff\xd8\xff\xe0\x00") is None


def test_batches_are_uint8_channels_last_and_normalise_on_the_device(tmp_path):
    imgs = [Uint8Train(71).apply(smooth_image(90, 80, seed=s)) for s in range(3)]
    images, targets = decode.collate([(x, i) for i, x in enumerate(imgs)])
    assert images.shape == (3, 3, 71, 71) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert targets.tolist() == [0, 1, 2]
    out = to_device(images, torch.device("cpu"), channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = torch.stack(imgs).float() / 127.5 - 1
    assert torch.allclose(out, expected, atol=1e-6)


def test_no_deprecation_warning_when_decoding_a_jpeg(tmp_path, torchcodec_calls):
    """Decoding a JPEG through the uint8 transforms (TorchCodec, and the reduced Pillow path for a large
    one) raises no DeprecationWarning: the decoder we call is not on its way out."""
    small = open(save_image(smooth_image(120, 90), tmp_path / "s.jpg", quality=90), "rb").read()
    large = open(save_image(smooth_image(1600, 1200), tmp_path / "l.jpg", quality=90), "rb").read()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for transform in (Uint8Train(71), Uint8Eval(71, 0.875)):
            for data in (small, large):
                assert transform.load_bytes(data).shape == (3, 71, 71)
    assert "decoded" in torchcodec_calls  # the small JPEG went through TorchCodec
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, DeprecationWarning)]
    assert not deprecations, deprecations


def test_folder_loader_with_a_worker(tmp_path):
    """The worker path, through build_loaders: shared-memory NHWC batches arrive intact in the main process."""
    from conftest import make_image_folder
    from xception.data import build_loaders
    from xception.data.folder import scan_split
    from xception.runtime import DistContext
    root = make_image_folder(tmp_path / "d", n_train=2, n_val=1)
    cfg = Config(data_path=root, image_size=71, crop_pct=0.875, batch_size=2, workers=1, seed=0,
                 check_data=False)
    val = build_loaders(cfg, DistContext(torch.device("cpu")), need_train=False, log=lambda *a: None).val
    assert len(val) == 2 and val.batch_size == 2 and val.num_samples == 3
    batches = list(val)
    assert [b[0].shape[0] for b in batches] == [2, 1]
    assert all(b[0].dtype == torch.uint8 and b[0].is_contiguous(memory_format=torch.channels_last)
               for b in batches)
    samples = scan_split(f"{root}/val").samples
    ref = [pil_eval(71, 0.875)(load_rgb(p)) for p, _ in samples]
    got = torch.cat([b[0] for b in batches])
    assert (got.int() - torch.stack(ref).int()).abs().float().mean() < 1.0
    assert torch.cat([b[1] for b in batches]).tolist() == [c for _, c in samples]
    assert val.skipped() == 0


def test_data_bench_prints_one_json_object(tmp_path, capsys):
    from xception.cli import build_parser
    from xception.tools.bench import run
    args = build_parser().parse_args(["bench", "--mode", "data", "--synthetic", "8", "-j", "0", "--image-size", "71",
                                      "-b", "2", "--json", "--repeats", "1"])
    assert run(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("ours_img_s", "baseline_img_s", "ratio", "per_worker_img_s", "workers", "image_size", "mode"):
        assert key in result
    assert result["mode"] == "data" and result["image_size"] == 71 and result["files"] == 8
    assert result["ours_img_s"] > 0 and result["baseline_img_s"] > 0 and result["ratio"] > 0


class _Recorder:
    """Stands in for nvidia.dali: every operator call is recorded with its arguments."""

    def __init__(self):
        self.calls = []

    def op(self, name):
        recorder = self

        class Node:
            def __init__(self, label):
                self.label = label

            def gpu(self):
                recorder.calls.append(("gpu", self.label, {}))
                return Node(self.label + ".gpu")

            def __iter__(self):  # readers return (data, labels)
                return iter((Node(name + ".data"), Node(name + ".labels")))

        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return Node(name)
        return call

    def modules(self):
        import types as pytypes
        fn = pytypes.SimpleNamespace(
            readers=pytypes.SimpleNamespace(file=self.op("readers.file")),
            decoders=pytypes.SimpleNamespace(image=self.op("decoders.image"),
                                             image_random_crop=self.op("decoders.image_random_crop")),
            resize=self.op("resize"), crop_mirror_normalize=self.op("crop_mirror_normalize"),
            random=pytypes.SimpleNamespace(coin_flip=self.op("random.coin_flip")))
        dtypes = pytypes.SimpleNamespace(RGB="RGB", UINT8="UINT8", INTERP_LINEAR="LINEAR", INTERP_CUBIC="CUBIC")
        recorder = self

        def pipeline_def(**settings):
            def wrap(graph_fn):
                def make():
                    recorder.calls.append(("pipeline", (), settings))
                    graph_fn()
                    return pytypes.SimpleNamespace(build=lambda: recorder.calls.append(("build", (), {})))
                return make
            return wrap
        dali = pytypes.ModuleType("nvidia.dali")
        dali.fn, dali.types, dali.pipeline_def = fn, dtypes, pipeline_def
        nvidia = pytypes.ModuleType("nvidia")
        nvidia.dali = dali
        return {"nvidia": nvidia, "nvidia.dali": dali, "nvidia.dali.fn": fn, "nvidia.dali.types": dtypes}


@pytest.mark.parametrize("train", [True, False])
def test_dali_pipeline_is_built_with_our_transforms_and_rank_sharding(monkeypatch, train):
    import sys
    from xception.data import dali
    from xception.data.folder import Split
    rec = _Recorder()
    for name, module in rec.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    split = Split("root", ["a", "b"], [("x/0.jpg", 0), ("x/1.jpg", 1), ("x/2.jpg", 1)])
    cfg = Config(image_size=299, crop_scale=(0.2, 0.9), crop_pct=0.875, seed=7)
    dali.build_pipeline(split, cfg, train, dali.Placement(batch=16, rank=1, world=4, device_id=1, threads=3))
    ops = {name: kw for name, _, kw in rec.calls}
    assert ops["pipeline"]["batch_size"] == 16 and ops["pipeline"]["device_id"] == 1
    assert ops["pipeline"]["num_threads"] == 3 and "build" in ops
    reader = ops["readers.file"]
    assert reader["files"] == ["x/0.jpg", "x/1.jpg", "x/2.jpg"] and reader["labels"] == [0, 1, 1]
    assert reader["shard_id"] == 1 and reader["num_shards"] == 4 and reader["name"] == dali.READER
    if train:
        assert reader["shuffle_after_epoch"] and reader["shuffle_after_epoch_seed"] == 7
        crop = ops["decoders.image_random_crop"]
        assert crop["device"] == "mixed" and crop["output_type"] == "RGB"
        assert crop["random_area"] == [0.2, 0.9] and crop["random_aspect_ratio"] == [3 / 4, 4 / 3]
        assert ops["resize"] == dict(resize_x=299, resize_y=299, interp_type="LINEAR", antialias=True)
        assert ops["random.coin_flip"] == {"probability": 0.5}
        assert ops["crop_mirror_normalize"]["dtype"] == "UINT8" and "mirror" in ops["crop_mirror_normalize"]
    else:
        assert reader["pad_last_batch"] and reader["stick_to_shard"] and "shuffle_after_epoch" not in reader
        assert ops["decoders.image"]["device"] == "mixed"
        assert ops["resize"] == dict(resize_shorter=341, interp_type="CUBIC", antialias=True)  # 299 / 0.875
        assert ops["crop_mirror_normalize"]["crop"] == (299, 299)
    assert ("gpu", "readers.file.labels", {}) in rec.calls


def test_dali_loader_refuses_a_cpu_run():
    from xception.config import UserError
    from xception.data import build_loaders
    from xception.data.dali import dali_loaders
    from xception.runtime import DistContext
    cpu = DistContext(torch.device("cpu"))
    with pytest.raises(UserError, match="CUDA"):
        dali_loaders(Config(data_path="x"), cpu, True)
    with pytest.raises(UserError, match="CUDA"):  # the same refusal through the one door
        build_loaders(Config(data_path="x", loader="dali", image_size=71, crop_pct=0.875, seed=0), cpu, True)


def test_dali_graph_runs_on_the_cpu_when_dali_is_installed(tmp_path):
    """The real library (where installed) runs the same graph with CPU decoding: valid operator
    arguments, per-rank shards, and eval pixels close to the PIL path."""
    pytest.importorskip("nvidia.dali")
    from xception.data import dali
    from xception.data.folder import scan_split
    for k in range(3):
        folder = tmp_path / "val" / f"c{k}"
        folder.mkdir(parents=True)
        save_image(smooth_image(500 - 60 * k, 375 + 40 * k, seed=k), folder / "0.jpg", quality=90)
    split = scan_split(str(tmp_path / "val"))
    cfg = Config(image_size=113, crop_pct=0.875, seed=3)
    labels = []
    for rank in (0, 1):
        out = dali.build_pipeline(split, cfg, False, dali.Placement(2, rank, 2, None, 1, device="cpu")).run()
        images, got = np.array(out[0].as_tensor()), np.array(out[1].as_tensor()).ravel().tolist()
        shard = (3 * (rank + 1)) // 2 - (3 * rank) // 2  # DALI's contiguous shard of the 3 files
        labels += got[:shard]  # the rest of the batch is padding
        ref = as_hwc(pil_eval(113, 0.875)(load_rgb(split.samples[got[0]][0])))
        assert images.shape[1:] == (113, 113, 3)
        assert np.abs(images[0].astype(np.int16) - ref).mean() < 2.5
    assert sorted(labels) == [0, 1, 2]
    train = dali.build_pipeline(split, cfg, True, dali.Placement(2, 0, 1, None, 1, device="cpu")).run()
    assert np.array(train[0].as_tensor()).shape == (2, 113, 113, 3)


def _dali_train_split(tmp_path):
    """12 tiny training images, each labelled with its own index, so a batch's labels name its files."""
    from conftest import make_image_folder
    from xception.data.folder import Split, scan_split
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=1, size=(40, 32))
    found = scan_split(f"{root}/train")
    return Split(found.root, [str(i) for i in range(12)], [(path, i) for i, (path, _) in enumerate(found.samples)])


def _dali_train_iterator(split):
    """The real train graph on DALI's CPU backend, batch 2 (6 steps per DALI epoch), wrapped as dali_loaders
    wraps it."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    from xception.data import dali
    where = dali.Placement(2, 0, 1, None, 1, device="cpu")
    pipe = dali.build_pipeline(split, Config(image_size=32, seed=3), True, where)
    return DALIGenericIterator([pipe], ["images", "labels"], reader_name=dali.READER, auto_reset=True,
                               last_batch_policy=LastBatchPolicy.DROP)


def _train_epoch_labels(loader, steps_per_epoch, stop_after=None):
    """One epoch consumed as engine/loop.py train_one_epoch consumes it: n = min(len, --steps-per-epoch)
    steps, a break on the step past n, or an early break when a hook stops the run (the generator is
    returned, left suspended). The labels of every batch taken."""
    n = min(len(loader), steps_per_epoch or len(loader))
    batches, taken = iter(loader), []
    for i, (images, targets) in enumerate(batches):
        if i >= n:
            break
        assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8 and targets.dtype == torch.int64
        taken.append(targets.tolist())
        if i + 1 == stop_after:
            break
    return taken, batches


@pytest.mark.parametrize("steps_per_epoch", [2, None])
def test_dali_loader_starts_every_epoch_at_the_start_of_a_dali_epoch(tmp_path, steps_per_epoch):
    """--steps-per-epoch below the DALI epoch, and an epoch a stopped run abandoned after one batch: every
    epoch still has len() batches, and they are the first batches of the next DALI epoch (the files a fresh
    pipeline reads in that epoch), not the rest of an unfinished one."""
    pytest.importorskip("nvidia.dali")
    from xception.data.dali import DaliLoader
    split = _dali_train_split(tmp_path)
    fresh = _dali_train_iterator(split)
    reference = [[out[0]["labels"].reshape(-1).tolist() for out in fresh] for _ in range(4)]
    assert [len(epoch) for epoch in reference] == [6] * 4 and reference[0] != reference[1]
    loader = DaliLoader(_dali_train_iterator(split), split, 6, 2, steps_per_epoch)
    assert len(loader) == (steps_per_epoch or 6)
    n = min(len(loader), steps_per_epoch or len(loader))  # = len(loader): the loop never cuts an epoch itself
    held = []  # abandoned generators stay alive, as a stopped epoch's may
    for epoch, stop_after in enumerate([None, 1, None, None]):
        loader.set_epoch(epoch)
        taken, batches = _train_epoch_labels(loader, steps_per_epoch, stop_after)
        held.append(batches)
        assert len(taken) == (stop_after or n), epoch
        assert taken == reference[epoch][:len(taken)], epoch


def test_dali_loader_refuses_to_resume_part_way_through_an_epoch():
    """A fresh DALI reader cannot continue the checkpoint's epoch (its file order starts over): one line
    that says so and names the way out, instead of dropping batches of other files."""
    from xception.config import UserError
    from xception.data.dali import DaliLoader
    from xception.data.folder import Split
    loader = DaliLoader(iter(()), Split("root", ["a"], [("a/0.jpg", 0)] * 8), 4, 2)
    loader.set_epoch(4)  # an epoch from its start is fine
    loader.set_epoch(4, start_step=0)
    with pytest.raises(UserError) as caught:
        loader.set_epoch(4, start_step=3)
    text = str(caught.value)
    assert "\n" not in text and "--loader dali" in text and "--loader tv" in text
    assert "3 steps of epoch 5" in text  # epochs counted from 1, as the resume log does


def test_dali_loaders_cut_training_epochs_to_steps_per_epoch(tmp_path, monkeypatch):
    """dali_loaders hands --steps-per-epoch to the training loader (so the loop never cuts a DALI epoch
    itself) and not to evaluation, which reads every image once. The "mixed" graph is swapped for the CPU
    one, so this runs without a GPU."""
    pytest.importorskip("nvidia.dali")
    import dataclasses
    from conftest import make_image_folder
    from xception.data import dali
    from xception.runtime import DistContext
    build = dali.build_pipeline
    monkeypatch.setattr(dali, "build_pipeline", lambda split, cfg, train, where: build(
        split, cfg, train, dataclasses.replace(where, device_id=None, device="cpu")))
    root = make_image_folder(tmp_path / "d", n_train=4, n_val=3, size=(40, 32))  # 12 train, 9 val images
    cfg = Config(data_path=root, batch_size=4, workers=0, image_size=32, crop_pct=1.0, seed=0, steps_per_epoch=2)
    classes, train, val = dali.dali_loaders(cfg, DistContext(torch.device("cuda", 0)), True, log=lambda _: None)
    assert len(classes) == 3 and len(train) == 2 and len(val) == 3  # 3 full train batches, cut to 2
    for epoch in range(2):
        train.set_epoch(epoch)
        assert [len(targets) for _, targets in train] == [4, 4]
    assert sorted(t for _, targets in val for t in targets.tolist()) == [0] * 3 + [1] * 3 + [2] * 3


def test_loader_choice_through_build_loaders(tmp_path):
    """--loader pil gives the Pillow reference transforms, auto the uint8 ones, and a plain image folder
    is read by the folder pipeline (not as a shard set); both honour the Loader contract."""
    from conftest import make_image_folder
    from xception.cli import build_parser, config_from_args
    from xception.data import build_loaders
    from xception.data.folder import scan_split
    from xception.data.loaders import FolderLoader, Loader
    from xception.data.transforms import PilTransform
    from xception.runtime import DistContext
    root = make_image_folder(tmp_path / "d", n_train=2, n_val=1)
    args = build_parser().parse_args(["train", "--data_path", root, "--loader", "pil"])
    assert config_from_args(args).loader == "pil"
    ctx = DistContext(torch.device("cpu"))
    samples = scan_split(f"{root}/val").samples
    for loader, train_type, eval_type, reference in (("pil", PilTransform, PilTransform, pil_eval(71, 0.875)),
                                                     ("auto", Uint8Train, Uint8Eval, Uint8Eval(71, 0.875))):
        cfg = Config(data_path=root, loader=loader, image_size=71, crop_pct=0.875, batch_size=2, workers=0,
                     seed=0, check_data=False)
        loaders = build_loaders(cfg, ctx, need_train=True, log=lambda *a: None)
        assert loaders.classes == ["cat", "dog", "fox"] and loaders.skipped == 0
        for part in (loaders.train, loaders.val):
            assert isinstance(part, FolderLoader) and isinstance(part, Loader)  # not a shard set
        assert type(loaders.train.dataset.transform) is train_type
        assert type(loaders.val.dataset.transform) is eval_type
        assert len(loaders.train) == 3 and loaders.train.num_samples == 6 and loaders.train.batch_size == 2
        loaders.train.set_epoch(0)
        assert all(x.shape == (2, 3, 71, 71) and x.dtype == torch.uint8 for x, _ in loaders.train)
        # the eval pixels are exactly those of the chosen transform family
        got = torch.cat([x for x, _ in loaders.val])
        assert torch.equal(got, torch.stack([reference.load(p) for p, _ in samples]))
    assert build_loaders(Config(data_path=root, image_size=71, crop_pct=0.875, seed=0, workers=0, batch_size=2,
                                check_data=False), ctx, need_train=False, log=lambda *a: None).train is None


def test_prefetch_is_a_pass_through_off_cuda():
    from xception.data.loaders import prefetch
    batches = [(torch.arange(3), torch.tensor([1])), (torch.arange(2), torch.tensor([0]))]
    out = prefetch(iter(batches), torch.device("cpu"))
    assert not isinstance(out, list) and iter(out) is out  # a generator: lazy, one batch at a time
    got = list(out)
    assert len(got) == 2 and all(g is b for g, b in zip(got, batches))  # the very same batches, no copy
    assert list(prefetch(iter([]), torch.device("cpu"))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_copies_batches_to_the_gpu_in_order():
    from xception.data.loaders import prefetch
    device = torch.device("cuda", 0)
    batches = [(torch.full((2, 3), k, dtype=torch.uint8).pin_memory(), torch.tensor([k]), f"tag{k}")
               for k in range(4)]
    got = list(prefetch(iter(batches), device))
    assert len(got) == 4
    for k, (x, t, tag) in enumerate(got):
        assert x.device == device and t.device == device and tag == f"tag{k}"
        assert torch.equal(x.cpu(), batches[k][0]) and t.item() == k
