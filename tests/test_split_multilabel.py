"""`xception split` of multi-label CSV lists (`a;b` label cells): iterative stratification, groups kept whole."""

import csv
import os
import sys
from collections import Counter, defaultdict

import pytest
from PIL import Image

from xception.config import UserError
from xception.tools.split import write_folds

from conftest import run_cli

pytest.importorskip("iterstrat")

# label cell -> how many images carry it; positives: a 9, b 12, c 9, d 3 (d: one per fold with 3 folds)
CELLS = {"a;b": 6, "a": 2, "a;d": 1, "b;c": 3, "c;d": 2, "c": 4, "b": 3, "": 3}
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def make_list(tmp_path, cells=CELLS, group_size=0, name="multi.csv"):
    """Tiny PNGs (8x8, one colour) and a CSV listing them with the given label cells (train and val mixed);
    with group_size, consecutive images of a cell share a group."""
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    rows = []
    for label, n in cells.items():
        for i in range(n):
            path = folder / f"{len(rows)}.png"
            Image.new("RGB", (8, 8), COLOURS[len(rows) % len(COLOURS)]).save(path)
            group = f"{label or 'none'}-g{i // group_size}" if group_size else ""
            rows.append([os.path.relpath(path, tmp_path), label, "val" if len(rows) % 4 == 0 else "train", group])
    file = tmp_path / name
    with open(file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "group"])
        writer.writerows(rows)
    return str(file)


def read_folds(paths):
    return [list(csv.DictReader(open(p, newline=""))) for p in paths]


def names(cell):
    return [n for n in cell.split(";") if n]


def held_out_once(folds, total):
    held = Counter(r["path"] for rows in folds for r in rows if r["split"] == "val")
    assert len(held) == total and set(held.values()) == {1}, held


def test_multilabel_folds_spread_every_label(tmp_path, capsys):
    data = make_list(tmp_path)
    paths = write_folds(data, 3, str(tmp_path / "folds"), seed=0)
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    folds = read_folds(paths)
    total = sum(CELLS.values())
    held_out_once(folds, total)
    positives = Counter(n for cell, k in CELLS.items() for n in names(cell) for _ in range(k))
    for rows in folds:
        assert len(rows) == total
        assert Counter(r["label"] for r in rows) == Counter({c: k for c, k in CELLS.items()})  # `a;b` kept
        assert all(os.path.isfile(tmp_path / "folds" / r["path"]) for r in rows)
        val = Counter(n for r in rows if r["split"] == "val" for n in names(r["label"]))
        for label, n in positives.items():
            assert abs(val[label] - n / 3) <= 1, (label, val[label], n)
        assert val["d"] == 1  # the rarest label: exactly one of its three positives held out per fold
    source = {r["path"]: r["label"] for r in read_folds([data])[0]}
    assert all(source[os.path.relpath(tmp_path / "folds" / r["path"], tmp_path)] == r["label"]
               for r in folds[0])  # each image keeps its own cell


def test_groups_never_straddle(tmp_path):
    cells = {"a;b": 9, "a": 6, "b;c": 6, "c": 9, "": 3}
    data = make_list(tmp_path, cells, group_size=3)
    folds = read_folds(write_folds(data, 3, str(tmp_path / "folds"), seed=2))
    held_out_once(folds, sum(cells.values()))
    for rows in folds:
        sides = defaultdict(set)
        for r in rows:
            sides[r["group"]].add(r["split"])
        assert all(len(s) == 1 for s in sides.values()), sides
        held = {n for r in rows if r["split"] == "val" for n in names(r["label"])}
        assert held == {"a", "b", "c"}  # every label has groups held out in every fold


def test_rows_without_a_group_are_groups_of_their_own(tmp_path):
    cells = {"a;b": 4, "a": 4, "b": 4}
    data = make_list(tmp_path, cells, group_size=2)
    with open(data) as f:
        rows = list(csv.reader(f))
    for row in rows[1:5]:
        row[3] = ""  # the `a;b` images: no group
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    folds = read_folds(write_folds(data, 2, str(tmp_path / "folds"), seed=0))
    held_out_once(folds, 12)
    for rows in folds:
        sides = defaultdict(set)
        for r in rows:
            if r["group"]:
                sides[r["group"]].add(r["split"])
        assert all(len(s) == 1 for s in sides.values()), sides


def test_same_seed_same_bytes(tmp_path):
    data = make_list(tmp_path)
    first = write_folds(data, 3, str(tmp_path / "one"), seed=4)
    again = write_folds(data, 3, str(tmp_path / "two"), seed=4)
    other = write_folds(data, 3, str(tmp_path / "three"), seed=5)
    read = [[open(p, "rb").read() for p in paths] for paths in (first, again, other)]
    assert read[0] == read[1]
    assert read[0] != read[2]


def test_refusals(tmp_path, monkeypatch):
    data = make_list(tmp_path, {"a;b": 4, "b": 2, "c": 2})
    with pytest.raises(UserError, match="class 'c' has 2 images, fewer than --folds 3"):
        write_folds(data, 3, str(tmp_path / "f"))
    (tmp_path / "g").mkdir()
    grouped = make_list(tmp_path / "g", {"a;b": 6, "b": 6}, group_size=3)
    with pytest.raises(UserError, match="class 'a' has 2 groups, fewer than --folds 3"):
        write_folds(grouped, 3, str(tmp_path / "f"))
    empty = make_list(tmp_path, {"": 3, ";": 1}, name="empty.csv")  # `;` alone: multi-label, no names
    with pytest.raises(UserError, match="only 0 class"):
        write_folds(empty, 2, str(tmp_path / "f"))
    monkeypatch.setitem(sys.modules, "iterstrat.ml_stratifiers", None)  # the package not installed
    with pytest.raises(UserError, match=r"pip install 'xception\[folds\]'"):
        write_folds(data, 2, str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()  # refused before writing anything


def test_single_label_empty_cell_is_refused(tmp_path):
    data = make_list(tmp_path, {"a": 4, "b": 4, "": 1}, name="single.csv")  # no `;` cell: single-label
    with pytest.raises(UserError, match=r"single.csv row 10: empty label") as error:
        write_folds(data, 2, str(tmp_path / "f"))
    assert "\n" not in str(error.value)


def test_cli_end_to_end(tmp_path, capsys):
    """One real `python -m xception split` run; the refusal in process (same wiring, no second start-up)."""
    from xception.cli import main
    data = make_list(tmp_path)
    out = tmp_path / "folds"
    proc = run_cli("split", data, "--folds", 3, "--out", out, "--seed", 1)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["fold-1.csv", "fold-2.csv", "fold-3.csv"]
    held_out_once(read_folds([out / f for f in sorted(os.listdir(out))]), sum(CELLS.values()))
    assert "fold 3: train" in proc.stdout
    assert main(["split", data, "--folds", "7", "--out", str(tmp_path / "more")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "class 'd' has 3 images, fewer than --folds 7" in error
