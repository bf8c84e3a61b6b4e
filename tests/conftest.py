"""Shared fixtures: tiny image-folder datasets the tests make themselves, and a CLI runner."""

import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(root, classes=("cat", "dog", "fox"), n_train=4, n_val=3, size=(80, 72), seed=0,
                      exts=("jpg", "png")):
    """DATA/{train,val}/<class>/<n>.{jpg,png}: each class a distinct colour plus noise, so it is learnable.
    `n_train`/`n_val`: images per class, or a sequence of per-class counts (skewed sets)."""
    rng = np.random.default_rng(seed)
    for split, n_split in (("train", n_train), ("val", n_val)):
        counts = [n_split] * len(classes) if isinstance(n_split, int) else list(n_split)
        for c, (name, n) in enumerate(zip(classes, counts)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                base = np.zeros((size[1], size[0], 3), np.uint8)
                base[..., c % 3] = 200
                img = np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8)
                ext = exts[i % len(exts)]
                Image.fromarray(img).save(os.path.join(folder, f"{i}.{ext}"))
    return str(root)


@pytest.fixture
def tiny_data(tmp_path):
    """3 classes, 4 train and 3 val images each (12 train, 9 val): an odd val count on purpose."""
    return make_image_folder(tmp_path / "data")


# Flags of a tiny CPU run: the model's minimum input, a non-default eval crop, one process, fixed seed.
TINY = ["--image-size", "71", "--crop-pct", "1", "--batch-size", "4", "--workers", "0", "--seed", "3",
        "--lr", "0.05", "--print-freq", "1"]


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory):
    """The tiny folder of `tiny_data`, made once per test run, for tests that only read it."""
    return make_image_folder(tmp_path_factory.mktemp("shared") / "data")


@pytest.fixture(scope="session")
def trained_run(shared_data, tmp_path_factory):
    """A 2-epoch run on `shared_data` with TINY flags (71 px, crop 1), trained once per test run:
    (data folder, output folder, the CompletedProcess). Tests must not write into its output folder."""
    out = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("train", "--data_path", shared_data, "--epochs", 2, "--output-dir", out, *TINY)
    assert proc.returncode == 0, proc.stderr
    return shared_data, out, proc


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m xception ARGS` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "2")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "xception", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_script(name, *args, cwd=None, env=None, timeout=600):
    full_env = dict(os.environ)
    full_env["PYTHON"] = sys.executable
    full_env.update(env or {})
    return subprocess.run(["bash", os.path.join(ROOT, "test", name), *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc):
    """A user error: non-zero exit, exactly one line on stderr, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def eval_figures(proc):
    """(count, loss, top1, top5) as printed by `xception eval`, as strings."""
    m = re.search(r"on (\d+) images: loss ([\d.]+) top1 ([\d.]+) top5 ([\d.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return m.groups()


def read_metrics(folder):
    """The rows of FOLDER/metrics.csv."""
    with open(os.path.join(folder, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def weights(path):
    """The model state dict of one of our checkpoints."""
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def save_image(img, path, **kw):
    img.save(path, **kw)
    return str(path)
