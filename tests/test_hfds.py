"""Hugging Face datasets as --data_path (data/hfds.py): a save_to_disk DatasetDict, a Parquet folder, hf:NAME."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, eval_figures, one_line_error, read_metrics, run_cli

datasets = pytest.importorskip("datasets", reason="needs the datasets package (pip install 'xception[hf]')")

from xception.config import Config, UserError  # noqa: E402
from xception.data import build_loaders  # noqa: E402
from xception.data import hfds  # noqa: E402
from xception.runtime import DistContext  # noqa: E402

CPU = DistContext(torch.device("cpu"))
CLASSES = ["cat", "dog", "fox"]


def encoded(c: int, i: int, rng) -> bytes:
    """An 80x72 image of class c (its colour plus noise): JPEG for even i, PNG for odd."""
    base = np.zeros((72, 80, 3), np.uint8)
    base[..., c % 3] = 200
    img = np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG" if i % 2 == 0 else "PNG")
    return out.getvalue()


def split(n: int, rng, string_labels=False):
    rows = [(c, i) for c in range(len(CLASSES)) for i in range(n)]
    label = datasets.Value("string") if string_labels else datasets.ClassLabel(names=CLASSES)
    features = datasets.Features({"image": datasets.Image(), "label": label, "note": datasets.Value("string")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": encoded(c, i, rng), "path": f"{CLASSES[c]}_{i}.{'jpg' if i % 2 == 0 else 'png'}"}
                  for c, i in rows],
        "label": [CLASSES[c] if string_labels else c for c, _ in rows],
        "note": ["x"] * len(rows)}, features=features)


def make_dict(string_labels=False, val_name="validation"):
    """3 classes, 4 train and 3 val images each, JPEG and PNG bytes in an Image feature."""
    rng = np.random.default_rng(0)
    return datasets.DatasetDict({"train": split(4, rng, string_labels), val_name: split(3, rng, string_labels)})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "saved"
    make_dict().save_to_disk(str(path))
    return str(path)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """load_dataset's cache in the test's folder, not the user's."""
    cache = str(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def loaders(path, need_train=True, **kw):
    """The loaders of `path`; the decode check's memo goes beside it, into a folder of its own."""
    kw.setdefault("output_dir", os.path.join(os.path.dirname(str(path)), "out-" + os.path.basename(str(path))))
    os.makedirs(kw["output_dir"], exist_ok=True)
    cfg = Config(data_path=str(path), image_size=71, crop_pct=1.0, batch_size=4, workers=0, seed=0, **kw)
    return build_loaders(cfg, CPU, need_train, torch.Generator().manual_seed(0), log=lambda *a: None)


def test_saved_dataset_trains_and_evaluates_through_the_cli(saved, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data_path", saved, "--epochs", 1, "--steps-per-epoch", 1, "--output-dir", out, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "evaluating on its validation split" in proc.stdout
    assert "[train]: 12 images decode-checked, 0 bad" in proc.stdout
    rows = read_metrics(out)
    assert len(rows) == 1
    ev = run_cli("eval", "--data_path", saved, "--resume", out / "checkpoint.pth.tar", "--image-size", 71,
                 "--crop-pct", 1, "--batch-size", 4, "--workers", 0, "--output-dir", tmp_path / "ev")
    assert ev.returncode == 0, ev.stderr
    count, _, top1, _ = eval_figures(ev)
    assert count == "9" and float(top1) == pytest.approx(float(rows[0]["top1"]), abs=1e-3)


def test_saved_dataset_loaders_give_classes_and_uint8_batches(saved):
    got = loaders(saved)
    assert got.classes == CLASSES
    assert got.train.num_samples == 12 and got.val.num_samples == 9
    assert got.train.class_counts == [4, 4, 4]
    got.train.set_epoch(0)
    images, targets = next(iter(got.train))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 71, 71)
    seen = torch.cat([t for _, t in got.val])
    assert seen.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_jpeg_bytes_take_the_fast_path(saved, monkeypatch):
    from xception.data import transforms
    calls = []
    real = transforms._jpeg
    monkeypatch.setattr(transforms, "_jpeg", lambda data: calls.append(1) or real(data))
    got = loaders(saved, need_train=False)
    list(got.val)
    assert len(calls) == 6  # the 2 JPEGs of each class's 3 val images; the PNGs go through Pillow


def test_parquet_folder_trains_and_evaluates(tmp_path, hf_cache):
    folder = tmp_path / "pq"
    dd = make_dict()
    dd["train"].to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    dd["validation"].to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    assert hfds.is_hf_source(str(folder))
    got = loaders(folder)
    assert got.classes == CLASSES and got.train.num_samples == 12 and got.val.num_samples == 9
    got.train.set_epoch(0)
    assert sum(len(t) for _, t in got.train) == 12
    assert sum(len(t) for _, t in got.val) == 9


def test_string_labels_are_sorted_distinct_values(tmp_path):
    path = tmp_path / "strings"
    dd = make_dict(string_labels=True, val_name="val")
    # reverse the train rows so that sorting, not first appearance, orders the classes
    dd["train"] = dd["train"].select(range(len(dd["train"]) - 1, -1, -1))
    dd.save_to_disk(str(path))
    got = loaders(path)
    assert got.classes == CLASSES
    assert got.val.class_counts == [3, 3, 3]


def test_integer_labels_without_classlabel_are_numbered(tmp_path):
    path = tmp_path / "ints"
    dd = make_dict().cast_column("label", datasets.Value("int64"))
    dd.save_to_disk(str(path))
    assert loaders(path).classes == ["0", "1", "2"]


def test_missing_column_is_one_line(saved, tmp_path):
    proc = run_cli("train", "--data_path", saved, "--label-column", "species", "--epochs", 1,
                   "--output-dir", tmp_path / "o", *TINY)
    line = one_line_error(proc)
    assert "no column 'species'" in line and "image, label, note" in line


def test_a_path_of_neither_kind_is_one_line(tmp_path):
    (tmp_path / "odd").mkdir()
    datasets.Dataset.from_dict({"a": [1, 2]}).to_parquet(str(tmp_path / "odd" / "stuff.parquet"))
    line = one_line_error(run_cli("train", "--data_path", tmp_path / "odd", "--output-dir", tmp_path / "o", *TINY))
    assert "no Parquet file named for a split" in line
    with pytest.raises(UserError, match="one Parquet file has no splits"):
        hfds.load_splits(str(tmp_path / "odd" / "stuff.parquet"))


def test_parquet_files_are_split_by_name():
    assert hfds.split_of(os.path.join("data", "train-00000-of-00004.parquet")) == "train"
    assert hfds.split_of("validation-0.parquet") == "validation"
    assert hfds.split_of(os.path.join("default", "test", "0000.parquet")) == "test"
    assert hfds.split_of("val.parquet") == "val"
    assert hfds.split_of("trainer-0.parquet") is None


def test_split_and_class_rules(tmp_path):
    only_train = make_dict()
    del only_train["validation"]
    with pytest.raises(UserError, match="no val, validation or test split"):
        hfds.pick_splits(dict(only_train), "D", True)
    with pytest.raises(UserError, match="no train split"):
        hfds.pick_splits({"test": None}, "D", True)
    lines = []
    picked = hfds.pick_splits({"train": 0, "test": 0, "validation": 0}, "D", True, lines.append)
    assert picked == ("train", "validation")
    assert lines and "validation" in lines[0]
    targets = {"train": np.array([0, 0, 1]), "validation": np.array([0, 1, 2])}
    with pytest.raises(UserError, match=r"only in train: none; only in validation: \['c'\]"):
        hfds.check_classes("D", ["a", "b", "c"], targets)
    with pytest.raises(UserError, match="no samples of class"):
        hfds.check_classes("D", ["a", "b", "c"], {"validation": np.array([0, 1])})
    with pytest.raises(UserError, match="-1: an unlabelled sample"):
        hfds.class_names(datasets.ClassLabel(names=["a", "b"]), {"train": [0, -1]}, "D", "label")


def test_a_bad_image_is_named_or_skipped(tmp_path):
    path = tmp_path / "bad"
    dd = make_dict()
    rows = dd["validation"].to_dict()
    rows["image"][1] = {"bytes": b"not an image", "path": "broken.png"}
    dd["validation"] = datasets.Dataset.from_dict(rows, features=dd["validation"].features)
    dd.save_to_disk(str(path))
    # the decode check before the first epoch
    with pytest.raises(UserError, match=r"\[validation\] row 1 \(broken.png\): not an image format"):
        loaders(path, need_train=False)
    got = loaders(path, need_train=False, skip_bad_images=True)
    assert got.skipped == 1 and got.val.num_samples == 8
    assert sorted(torch.cat([t for _, t in got.val]).tolist()) == [0, 0, 1, 1, 1, 2, 2, 2]
    # without it, in the loader
    with pytest.raises(UserError, match=r"row 1 \(broken.png\): not an image format"):
        list(loaders(path, need_train=False, check_data=False).val)
    got = loaders(path, need_train=False, check_data=False, skip_bad_images=True)
    assert sum(len(t) for _, t in got.val) == 9 and got.val.skipped() == 1


def test_a_clean_check_is_remembered(saved, tmp_path):
    lines = []
    cfg = Config(data_path=saved, image_size=71, crop_pct=1.0, batch_size=4, workers=0, output_dir=str(tmp_path))
    build_loaders(cfg, CPU, True, log=lines.append)
    assert sum("decode-checked" in line for line in lines) == 2
    assert os.path.isfile(tmp_path / hfds.CHECKED_NAME)
    lines.clear()
    build_loaders(cfg, CPU, True, log=lines.append)
    assert not any("decode-checked" in line for line in lines)


def test_hub_names_parse_and_offline_without_cache_is_one_line(hf_cache, monkeypatch):
    assert hfds.hub_name("hf:org/name") == ("org/name", None)
    assert hfds.hub_name("hf:org/name@v1.0") == ("org/name", "v1.0")
    assert hfds.is_hf_source("hf:org/name")
    with pytest.raises(UserError, match="expected hf:ORG/NAME"):
        hfds.hub_name("hf:")
    # offline (as HF_HUB_OFFLINE=1 sets it at import) with an empty cache: one line, no download tried
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as caught:
        hfds.load_splits("hf:no-such-org/no-such-set")
    line = str(caught.value)
    assert "\n" not in line and "hf:no-such-org/no-such-set" in line and "HF_HUB_OFFLINE" in line
