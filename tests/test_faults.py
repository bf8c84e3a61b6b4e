"""Fault injection, part 1: bad input files and folders, bad flags, hostile and broken checkpoints,
and a writer killed mid-save. Every user-facing fault must end in one line naming the culprit (or a
counted skip), never a traceback."""

import builtins
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, one_line_error, read_metrics, run_cli
from xception import checkpoint as ckpt
from xception import cli
from xception.config import Config, UserError
from xception.data import check
from xception.data.folder import scan_dataset
from xception.files import show
from xception.runtime import DistContext

pytestmark = pytest.mark.faults

TINY = ["--image-size", "71", "--batch-size", "4", "--workers", "0", "--seed", "3", "--print-freq", "1",
        "--epochs", "1", "--device", "cpu"]
CPU = DistContext(torch.device("cpu"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path, side=20000):
    """A PNG that claims side x side pixels (400 Mpx, over Pillow's limit) in a few hundred bytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + _png_chunk(b"IEND", b""))


def _jpeg_bytes(seed=0):
    import io
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def add_bad_files(folder) -> dict:
    """One of every bad file, in `folder`; returns {kind: path}."""
    folder = str(folder)
    good = _jpeg_bytes()
    corrupt = bytearray(good)
    corrupt[200:] = bytes(np.random.default_rng(1).integers(0, 255, len(good) - 200, dtype=np.uint8))
    files = {
        "corrupt": ("corrupt.jpg", bytes(corrupt)),
        "truncated": ("truncated.jpg", good[: len(good) // 2]),
        "empty": ("empty.jpg", b""),
        "text": ("notes.png", b"this is a text file, not a picture\n"),
    }
    out = {}
    for kind, (name, data) in files.items():
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        out[kind] = path
    out["bomb"] = os.path.join(folder, "bomb.png")
    write_bomb(out["bomb"])
    raw = os.fsencode(folder) + b"/bad-\xff\xfe.jpg"  # a name that is not valid UTF-8
    with open(raw, "wb") as f:
        f.write(good[:300])
    out["non_utf8"] = os.fsdecode(raw)
    with open(os.path.join(folder, "labels.csv"), "w") as f:  # unknown extension: ignored, counted
        f.write("a,b\n")
    return out


def add_odd_good_files(folder) -> list:
    """Images that are unusual but valid: they must train."""
    folder = str(folder)
    paths = []

    def save(img, name, **kw):
        path = os.path.join(folder, name)
        img.save(path, **kw)
        paths.append(path)

    save(Image.new("RGB", (1, 1), (200, 0, 0)), "one_pixel.png")
    save(Image.new("RGB", (600, 2), (200, 0, 0)), "wide.png")  # aspect ratio 300:1
    save(Image.fromarray(np.full((30, 40), 50000, np.uint16)), "sixteen_bit.png")
    save(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "cmyk.jpg")
    save(Image.new("RGBA", (40, 30), (200, 0, 0, 128)), "rgba.png")
    save(Image.new("RGB", (40, 30), (200, 0, 0)).convert("P"), "palette.gif")
    save(Image.new("L", (40, 30), 90), "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    save(Image.new("RGB", (40, 20), (200, 0, 0)), "exif_rotated.jpg", exif=exif)
    raw = os.fsencode(folder) + b"/good-\xff.png"
    Image.new("RGB", (40, 30), (200, 0, 0)).save(open(raw, "wb"), format="PNG")
    paths.append(os.fsdecode(raw))
    return paths


@pytest.fixture
def bad_data(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog"), n_train=4, n_val=2)
    bad = add_bad_files(os.path.join(root, "train", "cat"))
    good = add_odd_good_files(os.path.join(root, "train", "dog"))
    return root, bad, good


# ---- single files: what the check says about each ------------------------------------------------


def test_each_bad_file_gets_a_reason_that_says_what_to_do(bad_data):
    _, bad, good = bad_data
    expect = {"corrupt": "corrupt image", "truncated": "truncated image", "empty": "empty file (0 bytes)",
              "text": "a text file, not an image", "bomb": "decompression-bomb limit",
              "non_utf8": "truncated image"}
    for kind, path in bad.items():
        why = check.check_image(path)
        assert why is not None and expect[kind] in why, (kind, why)
        assert "--skip-bad-images" in why or "remove" in why
    assert str(2 * Image.MAX_IMAGE_PIXELS) in check.check_image(bad["bomb"])  # Pillow's own limit, kept
    for path in good:
        assert check.check_image(path) is None, path


def test_unreadable_file_is_named_with_permission_advice(tmp_path, monkeypatch):
    path = str(tmp_path / "locked.jpg")
    with open(path, "wb") as f:
        f.write(_jpeg_bytes())
    if os.geteuid() != 0:  # as root chmod 000 does not stop reads; then refuse the open ourselves
        os.chmod(path, 0)
    else:
        real_open = builtins.open

        def locked_open(file, *a, **k):
            if os.fspath(file) == path:
                raise PermissionError(13, "Permission denied", path)
            return real_open(file, *a, **k)
        monkeypatch.setattr(builtins, "open", locked_open)
    why = check.check_image(path)
    assert why is not None and "permission denied" in why and "chmod" in why


def test_non_utf8_names_are_shown_printably():
    name = os.fsdecode(b"/data/train/cat/x\xff.jpg")
    assert show(name) == "/data/train/cat/x\\xff.jpg"  # printable on any terminal


# ---- folders: structure errors and the pre-scan --------------------------------------------------


def test_a_single_class_is_refused(tmp_path):  # the other layout errors: test_data.py
    one = make_image_folder(tmp_path / "one", classes=("solo",), n_train=2, n_val=1)
    with pytest.raises(UserError, match="only one class"):
        scan_dataset(one)


def test_prescan_refuses_the_first_bad_file_or_drops_and_counts_them(bad_data, tmp_path):
    root, bad, good = bad_data
    train, val = scan_dataset(root)
    cfg = Config(data_path=root, workers=2, output_dir=str(tmp_path / "out"))
    os.makedirs(cfg.output_dir)
    with pytest.raises(UserError) as err:
        check.screen([train, val], cfg, CPU, log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message and "--skip-bad-images" in message and "check-data" in message
    assert any(show(p) in message for p in bad.values())
    logged = []
    cfg.skip_bad_images = True
    (train2, val2), skipped = check.screen([train, val], cfg, CPU, log=logged.append)
    assert skipped == len(bad) == 6
    assert len(train2.samples) == len(train.samples) - 6 and val2.samples == val.samples
    assert any("1 file(s) without an image extension ignored" in m for m in logged)
    assert sum("warning: skipping" in m for m in logged) == 6


def test_skipping_every_image_of_a_class_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=1, n_val=1)
    with open(os.path.join(root, "train", "b", "0.jpg"), "wb") as f:
        f.write(b"junk")
    train, val = scan_dataset(root)
    cfg = Config(data_path=root, skip_bad_images=True, output_dir=str(tmp_path))
    with pytest.raises(UserError, match="no readable image left"):
        check.screen([train, val], cfg, CPU, log=lambda m: None)


def test_check_data_cli_lists_every_bad_file_and_ends_in_one_error(bad_data):
    root, bad, _ = bad_data
    proc = run_cli("check-data", root, "--workers", 2)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "--skip-bad-images" in line
    for path in bad.values():
        assert f"bad: {show(path)}:" in proc.stdout
    assert "ignored" in proc.stdout and ": 6 bad" in proc.stdout
    ok = run_cli("check-data", root, "--skip-bad-images")
    assert ok.returncode == 0 and "Traceback" not in ok.stderr


def test_train_stops_before_any_epoch_on_a_folder_of_bad_files(bad_data, tmp_path):
    root, bad, _ = bad_data
    out = tmp_path / "out"
    line = one_line_error(run_cli("train", "--data_path", root, "--output-dir", out, *TINY))
    assert any(show(p) in line for p in bad.values()) and "--skip-bad-images" in line
    assert not (out / "checkpoint.pth.tar").exists() and not (out / "metrics.csv").exists()


def test_train_with_skip_bad_images_counts_the_skips(bad_data, tmp_path):
    root, bad, good = bad_data
    out = tmp_path / "out"
    proc = run_cli("train", "--data_path", root, "--output-dir", out, "--skip-bad-images", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped_images 6" in proc.stdout
    assert read_metrics(out)[0]["bad_images_skipped"] == "6"
    assert f"{4 + len(good) + 4} train" in proc.stdout  # every odd-but-valid image is trained on


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_breaks_inside_the_loader_is_named_or_skipped(tmp_path, workers):
    """--no-check-data: the loader meets the bad file itself, in the main process or in a worker."""
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), n_train=2, n_val=1)
    bad = os.path.join(root, "train", "a", "zz_truncated.jpg")
    with open(bad, "wb") as f:
        f.write(_jpeg_bytes()[:500])
    flags = ["--data_path", root, "--no-check-data", *TINY, "--workers", workers, "--batch-size", 5]  # one batch
    line = one_line_error(run_cli("train", "--output-dir", tmp_path / "o1", *flags))
    assert line.startswith(f"xception: error: {bad}: truncated image")
    proc = run_cli("train", "--output-dir", tmp_path / "o2", "--skip-bad-images", *flags)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: skipping {bad}" in proc.stderr and "Traceback" not in proc.stderr
    assert read_metrics(tmp_path / "o2")[0]["bad_images_skipped"] == "1"


# ---- flags ----------------------------------------------------------------------------------------


def _main(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (unknown flag, not a number) exit from parse_args
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


@pytest.mark.parametrize("flags,expect", [
    (["--epochs", "0"], "--epochs must be a positive number"),
    (["--epochs", "-1"], "--epochs must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be a positive number"),
    (["--batch-size", "-4"], "--batch-size must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--image-size", "70"], "--image-size must be at least 71"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be a positive number"),
    (["--nproc", "2", "--batch-size", "3"], "must divide evenly by the 2 processes"),
    (["--resume", "/no/such/checkpoint.pth.tar"], "no such file"),
    (["--epochs", "two"], "--epochs"),
    (["--no-such-flag"], "unrecognized"),
    (["--device", "tpu"], "--device"),
    (["--crop-scale", "0.9", "0.1"], "--crop-scale"),
    (["--mixup", "-1"], "--mixup must be 0 (off) or a positive alpha"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be 1 or more"),
    (["--recipe", "nosuch"], "--recipe"),
    (["--ema-decay", "1.5"], "--ema-decay must be in (0, 1)"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be positive"),
    (["--random-erase", "2"], "--random-erase must be in [0, 1]"),
    (["--grad-accum-steps", "9"], "--grad-accum-steps 9: an epoch has only"),
])
def test_bad_flags_are_one_line_and_exit_2(tiny_data, tmp_path, capsys, flags, expect):
    code, line = _main(capsys, "train", "--data_path", tiny_data, "--output-dir", tmp_path / "o", "--device", "cpu",
                       *flags)
    assert code == 2 and expect in line


def test_resume_from_a_file_that_is_not_a_checkpoint(tiny_data, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    code, line = _main(capsys, "train", "--data_path", tiny_data, "--output-dir", tmp_path / "o", *TINY,
                       "--resume", notes)
    assert code == 2 and "not a readable checkpoint" in line and str(notes) in line


def test_output_dir_that_cannot_be_written(tiny_data, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, line = _main(capsys, "train", "--data_path", tiny_data, "--output-dir", blocker / "sub", *TINY)
    assert code == 2 and "cannot create it" in line
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if os.fspath(p) == str(locked) else real_access(p, m))
    code, line = _main(capsys, "train", "--data_path", tiny_data, "--output-dir", locked, *TINY)
    assert code == 2 and "not writable" in line


def test_checkpoint_of_another_class_count_needs_pretrained(tiny_data, tmp_path, capsys):
    from xception.model import Xception
    path = tmp_path / "two.pth.tar"
    ckpt.Checkpoint(Xception(num_classes=2).state_dict(), epoch=1, class_names=["a", "b"]).save(str(path))
    code, line = _main(capsys, "train", "--data_path", tiny_data, "--output-dir", tmp_path / "o", *TINY,
                       "--resume", path)
    assert code == 2 and "trained on 2 classes" in line and "--pretrained" in line


# ---- checkpoints ----------------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs os.makedirs(marker): what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tiny_data, tmp_path, capsys):
    marker = str(tmp_path / "pwned")
    evil = tmp_path / "evil.pth.tar"
    torch.save({"model": {}, "epoch": 1, "payload": Exploit(marker)}, evil)
    with pytest.raises(UserError, match="refused"):
        ckpt.load_file(str(evil))
    for command in ("train", "eval"):
        code, line = _main(capsys, command, "--data_path", tiny_data, "--output-dir", tmp_path / "o", "--image-size",
                           71, "--batch-size", 4, "--workers", 0, "--device", "cpu", "--resume", evil)
        assert code == 2 and "refused" in line and "trust" in line
    assert not os.path.exists(marker)  # the payload never ran


def test_a_checkpoint_with_a_wrong_tensor_shape_names_the_tensor(tiny_data, tmp_path, capsys):
    from xception.model import Xception
    state = Xception(num_classes=3).state_dict()
    key = next(k for k, v in state.items() if v.dim() == 4)
    state[key] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad_shape.pth.tar"
    ckpt.Checkpoint(state, epoch=1, class_names=["cat", "dog", "fox"]).save(str(path))
    code, line = _main(capsys, "eval", "--data_path", tiny_data, "--resume", path, "--image-size", 71,
                       "--batch-size", 4, "--workers", 0, "--device", "cpu", "--output-dir", tmp_path / "o")
    assert code == 2 and f"tensor {key} has shape (3, 3, 3, 3)" in line and "size mismatch" not in line


WRITER = textwrap.dedent("""
    import sys, torch
    from xception.files import atomic_write
    path = sys.argv[1]
    for version in range(1, 1000):
        print("saving", version, flush=True)
        state = {"version": version, "weights": torch.full((2_000_000,), float(version))}
        atomic_write(path, lambda f: torch.save(state, f))
""")


@pytest.mark.parametrize("moment", ["on_start", "mid_write", "later"])
def test_a_writer_killed_mid_save_leaves_a_loadable_checkpoint(tmp_path, moment):
    """kill -9 while version 3 is being saved over version 2: before the temporary file exists, while it
    is being written (seen in the folder), or a little later (written, maybe renamed)."""
    import time
    path = tmp_path / "checkpoint.pth.tar"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "saving 3":
                break
        if moment == "mid_write":
            deadline = time.monotonic() + 30
            while not any(n.startswith(".tmp-") for n in os.listdir(tmp_path)) and time.monotonic() < deadline:
                time.sleep(0.0005)
            assert time.monotonic() < deadline, "the writer never started its temporary file"
        elif moment == "later":
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    state = ckpt.load_file(str(path))
    # version 2 was complete before "saving 3"; later the writer may have finished 3 and gone on
    assert state["version"] in (2, 3) if moment != "later" else state["version"] >= 2
    assert torch.equal(state["weights"], torch.full((2_000_000,), float(state["version"])))
