"""List files (CSV and `path label` text lists) as a data source, and `xception split` cross-validation folds."""

import csv
import os
from collections import Counter, defaultdict

import pytest

from xception.config import Config, UserError
from xception.data.listfile import read_list_file, read_list_splits
from xception.tools.split import write_folds

from conftest import TINY, one_line_error, read_metrics, run_cli


def write_csv(path, rows, header=("path", "label", "split", "group")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def folder_rows(data, base):
    """Rows (path relative to `base`, label, split, group) for make_image_folder's images; groups of two."""
    rows = []
    for split in ("train", "val"):
        for label in sorted(os.listdir(os.path.join(data, split))):
            for name in sorted(os.listdir(os.path.join(data, split, label))):
                path = os.path.relpath(os.path.join(data, split, label, name), base)
                rows.append([path, label, split, f"{split}-{label}-{int(name.split('.')[0]) // 2}"])
    return rows


@pytest.fixture
def listed(shared_data, tmp_path):
    """A CSV beside a copy-free view of the shared tiny folder: (csv path, rows)."""
    rows = folder_rows(shared_data, tmp_path)
    return write_csv(tmp_path / "list.csv", rows), rows


def test_csv_gives_the_folder_splits(listed, shared_data, tmp_path):
    path, rows = listed
    extra = [r + ["ignored"] for r in rows] + [[rows[0][0], "cat", "test", "t", "x"]]
    path = write_csv(tmp_path / "extra.csv", extra, ("path", "label", "split", "group", "note"))
    train, val = read_list_file(path)
    assert train.classes == val.classes == ["cat", "dog", "fox"]
    assert (len(train.samples), len(val.samples)) == (12, 9)  # the test row is not trained or evaluated on
    assert all(os.path.isabs(p) and os.path.isfile(p) for p, _ in train.samples + val.samples)
    assert len(train.groups) == len(train.samples) and train.groups[0] == "train-cat-0"
    assert [train.classes[c] for _, c in train.samples] == [r[1] for r in rows if r[2] == "train"]
    evaluated = read_list_file(path, need_train=False)
    assert evaluated[0] is None and evaluated[1].samples == val.samples


def test_classes_file_fixes_the_order(listed, tmp_path):
    path, rows = listed
    (tmp_path / "classes.txt").write_text("fox\ncat\n\ndog\nwolf\n")
    train, val = read_list_file(path, classes_file=str(tmp_path / "classes.txt"))
    assert train.classes == ["fox", "cat", "dog", "wolf"]
    assert [train.classes[c] for _, c in train.samples] == [r[1] for r in rows if r[2] == "train"]


def test_text_lists(shared_data, tmp_path):
    rows = folder_rows(shared_data, tmp_path)
    for split in ("train", "val"):
        lines = [f"{p} {label}" for p, label, s, _ in rows if s == split]
        (tmp_path / f"{split}.txt").write_text("# path label\n\n" + "\n".join(lines) + "\n")
    cfg = Config(train_list=str(tmp_path / "train.txt"), val_list=str(tmp_path / "val.txt"))
    train, val = read_list_splits(cfg, need_train=True)
    assert train.classes == ["cat", "dog", "fox"] and (len(train.samples), len(val.samples)) == (12, 9)
    # --data_path with text lists: the folder their relative paths start from
    (tmp_path / "rooted.txt").write_text("train/cat/0.jpg cat\ntrain/dog/1.png dog\n")
    cfg = Config(data_path=shared_data, train_list=str(tmp_path / "rooted.txt"), val_list=str(tmp_path / "rooted.txt"))
    assert read_list_splits(cfg, need_train=True)[0].samples[0][0] == os.path.join(shared_data, "train/cat/0.jpg")
    (tmp_path / "bad.txt").write_text("train/cat/0.jpg cat\nonlyonefield\n")
    with pytest.raises(UserError, match=r"bad.txt row 2: expected 'path label'"):
        read_list_splits(cfg.replace(val_list=str(tmp_path / "bad.txt")), need_train=True)


def _bad(rows, case):
    """The rows changed so as to show one mistake, and the row number the error must name."""
    rows = [list(r) for r in rows]
    if case == "missing image":
        rows[3][0] = "nowhere/gone.jpg"
        return rows, 5
    if case == "unknown split":
        rows[4][2] = "holdout"
        return rows, 6
    if case == "missing split":
        rows[5][2] = " "
        return rows, 7
    if case == "empty label":
        rows[6][1] = ""
        return rows, 8
    if case == "not in classes":
        rows[2][1] = "wolf"
        return rows, 4
    if case == "only in val":
        rows[-1][1] = "wolf"
        return rows, len(rows) + 1
    if case == "several labels, one only in val":
        rows[-1][1] = "cat;wolf"
        return rows, len(rows) + 1
    raise AssertionError(case)


BAD_CASES = {"missing image": "no such image file", "unknown split": "unknown split 'holdout'",
             "missing split": "no split", "empty label": "empty label", "not in classes": "not in --classes",
             "only in val": "only in val", "several labels, one only in val": "class 'wolf' is only in val"}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_are_one_line_naming_the_row(listed, tmp_path, case):
    _, rows = listed
    changed, number = _bad(rows, case)
    path = write_csv(tmp_path / "bad.csv", changed)
    classes = None
    if case == "not in classes":
        (tmp_path / "classes.txt").write_text("cat\ndog\nfox\n")
        classes = str(tmp_path / "classes.txt")
    with pytest.raises(UserError) as e:
        read_list_file(path, classes_file=classes)
    message = str(e.value)
    assert BAD_CASES[case] in message and "\n" not in message and "bad.csv" in message
    assert f"row {number}" in message


def test_missing_column_and_bad_combinations(listed, tmp_path, shared_data):
    _, rows = listed
    path = write_csv(tmp_path / "nosplit.csv", [r[:2] for r in rows], ("path", "label"))
    with pytest.raises(UserError, match=r"nosplit.csv row 1: no 'split' column"):
        read_list_file(path)
    with pytest.raises(UserError, match="--classes orders the classes of a list file"):
        read_list_splits(Config(data_path=shared_data, classes_file="c.txt"), True)
    with pytest.raises(UserError, match="--data_path is required"):
        read_list_splits(Config(), True)
    with pytest.raises(UserError, match="not both"):
        read_list_splits(Config(data_path=listed[0], train_list="a.txt", val_list="b.txt"), True)
    with pytest.raises(UserError, match="go together"):
        read_list_splits(Config(train_list="a.txt"), True)
    with pytest.raises(UserError, match="--loader dali reads image folders"):
        read_list_splits(Config(data_path=listed[0], loader="dali"), True)
    assert read_list_splits(Config(data_path=shared_data), True) is None  # an image folder: not ours


def test_bad_row_through_the_cli(listed, tmp_path):
    _, rows = listed
    changed, number = _bad(rows, "several labels, one only in val")
    path = write_csv(tmp_path / "bad.csv", changed)
    line = one_line_error(run_cli("check-data", path))
    assert f"bad.csv row {number}: class 'wolf' is only in val" in line


# --- folds ------------------------------------------------------------------------------------------------

def fake_images(tmp_path, counts, groups_of=None):
    """Empty image files (split only checks that they exist) and a CSV listing them, all split train."""
    rows = []
    for label, n in counts.items():
        os.makedirs(tmp_path / "img" / label, exist_ok=True)
        for i in range(n):
            (tmp_path / "img" / label / f"{i}.jpg").write_bytes(b"")
            group = f"{label}-g{i // groups_of}" if groups_of else ""
            rows.append([f"img/{label}/{i}.jpg", label, "train" if i % 3 else "val", group])
    return write_csv(tmp_path / "all.csv", rows)


def read_folds(paths):
    return [list(csv.DictReader(open(p))) for p in paths]


def test_folds_are_stratified_and_cover_every_image_once(tmp_path, capsys):
    counts = {"a": 7, "b": 5, "c": 12}
    data = fake_images(tmp_path, counts)
    paths = write_folds(data, 3, str(tmp_path / "folds"), seed=1)
    assert [os.path.basename(p) for p in paths] == ["fold-1.csv", "fold-2.csv", "fold-3.csv"]
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    folds = read_folds(paths)
    held = Counter(r["path"] for rows in folds for r in rows if r["split"] == "val")
    assert len(held) == sum(counts.values()) and set(held.values()) == {1}
    for rows in folds:
        assert len(rows) == sum(counts.values())
        assert all(os.path.isfile(tmp_path / "folds" / r["path"]) for r in rows)  # relative to the folder
        val = Counter(r["label"] for r in rows if r["split"] == "val")
        for label, n in counts.items():
            assert abs(val[label] - n / 3) <= 1, (label, val[label])
    again = write_folds(data, 3, str(tmp_path / "again"), seed=1)
    assert read_folds(again) == folds  # the seed fixes the folds


def test_groups_never_straddle(tmp_path):
    data = fake_images(tmp_path, {"a": 12, "b": 9, "c": 15}, groups_of=3)
    folds = read_folds(write_folds(data, 3, str(tmp_path / "folds"), seed=0))
    held = Counter(r["path"] for rows in folds for r in rows if r["split"] == "val")
    assert len(held) == 36 and set(held.values()) == {1}
    for rows in folds:
        sides = defaultdict(set)
        for r in rows:
            sides[r["group"]].add(r["split"])
        assert all(len(s) == 1 for s in sides.values()), sides
        assert {r["label"] for r in rows if r["split"] == "val"} == {"a", "b", "c"}


def test_split_refusals(tmp_path, shared_data):
    data = fake_images(tmp_path, {"a": 4, "b": 2}, groups_of=None)
    with pytest.raises(UserError, match="--folds must be 2 or more"):
        write_folds(data, 1, str(tmp_path / "f"))
    with pytest.raises(UserError, match="class 'b' has 2 images, fewer than --folds 3"):
        write_folds(data, 3, str(tmp_path / "f"))
    grouped = fake_images(tmp_path / "g", {"a": 6, "b": 6}, groups_of=3)
    with pytest.raises(UserError, match="class 'a' has 2 groups, fewer than --folds 3"):
        write_folds(grouped, 3, str(tmp_path / "f"))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "fold-1.csv").write_text("mine\n")
    with pytest.raises(UserError, match="already holds fold files"):
        write_folds(shared_data, 2, str(out))
    assert (out / "fold-1.csv").read_text() == "mine\n"
    (out / "fold-1.csv").unlink()
    (out / "notes.txt").write_text("mine\n")  # a non-empty folder without fold files is fine
    assert len(write_folds(shared_data, 3, str(out))) == 3  # an image folder: train and val pooled
    assert sum(1 for r in read_folds([out / "fold-1.csv"])[0] if r["split"] == "val") == 7


def test_csv_trains_on_a_fold_and_evaluates(shared_data, tmp_path, capsys):
    """The CLI end to end: split a CSV with groups into folds (in process: the command's wiring and flags),
    train 1 epoch on fold 2, evaluate the checkpoint on the original CSV's val rows."""
    from xception.cli import main
    data = write_csv(tmp_path / "list.csv", folder_rows(shared_data, tmp_path))
    assert main(["split", data, "--folds", "3", "--out", str(tmp_path / "folds"), "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert len(printed.strip().splitlines()) == 3 and "fold 2: train" in printed
    assert main(["split", data, "--folds", "1", "--out", str(tmp_path / "more")]) == 2
    assert capsys.readouterr().err.strip() == "xception: error: --folds must be 2 or more, got 1"
    out = tmp_path / "run"
    proc = run_cli("train", "--data_path", tmp_path / "folds" / "fold-2.csv", "--epochs", 1, "--output-dir", out,
                   *TINY)
    assert proc.returncode == 0, proc.stderr
    assert len(read_metrics(out)) == 1
    proc = run_cli("eval", "--data_path", data, "--resume", out / "checkpoint.pth.tar", "--output-dir",
                   tmp_path / "eval", "--workers", 0, "-b", 4)
    assert proc.returncode == 0, proc.stderr
    assert "on 9 images" in proc.stdout


def test_skipping_bad_files_keeps_groups_aligned():
    from xception.data.check import drop_bad
    from xception.data.folder import Split
    samples = [("0.jpg", 0), ("1.jpg", 1), ("2.jpg", 0), ("3.jpg", 1)]
    split = Split("list.csv", ["a", "b"], samples, ["g0", "g1", "g2", "g3"])
    kept = drop_bad(split, {"2.jpg"})
    assert kept.samples == [("0.jpg", 0), ("1.jpg", 1), ("3.jpg", 1)] and kept.groups == ["g0", "g1", "g3"]
    assert drop_bad(Split("d", ["a"], [("0.jpg", 0)]), set()).groups is None


def test_prepare_writes_shards_from_a_list_file(listed, tmp_path):
    from xception.config import ShardSettings
    from xception.tools import prepare as prep
    path, rows = listed
    index = prep.prepare(path, str(tmp_path / "shards"), ShardSettings(max_size=64, shard_size=4, min_shards=2),
                         workers=1, log=lambda *a: None)
    assert index["classes"] == ["cat", "dog", "fox"]
    assert index["splits"]["train"]["count"] == sum(r[2] == "train" for r in rows) == 12
    assert index["splits"]["val"]["count"] == 9


def test_eval_split_test_reads_the_test_rows_with_the_training_classes(listed, tmp_path):
    _, rows = listed
    changed = [r[:2] + ["test" if r[2] == "val" and r[1] == "cat" else r[2]] + r[3:] for r in rows]
    path = write_csv(tmp_path / "t.csv", changed)
    _, held = read_list_splits(Config(data_path=path, eval_split="test"), need_train=False)
    assert held.classes == ["cat", "dog", "fox"] and len(held.samples) == 3
    assert {held.classes[c] for _, c in held.samples} == {"cat"}
    with pytest.raises(UserError, match="no calib images"):
        read_list_splits(Config(data_path=path, eval_split="calib"), need_train=False)
    with pytest.raises(UserError, match="--split test reads the rows of that split of a CSV"):
        read_list_splits(Config(data_path=str(tmp_path), eval_split="test"), need_train=False)
