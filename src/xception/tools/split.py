"""`xception split DATA --folds K --out DIR`: K stratified cross-validation folds as CSV list files.

DATA is an image folder in the seed's layout (train/ and val/ pooled) or a CSV list file (its train and val
rows pooled; its test rows are copied as test into every fold, a fixed test set). Each DIR/fold-k.csv holds
every pooled image: fold k's held-out part with split val (or --val-split test), the others with split train.
With a group column, scikit-learn's StratifiedGroupKFold keeps all images of a group on one side of every
fold; without one, StratifiedKFold. Both shuffle with --seed, so the same command writes the same folds.
Paths are written relative to DIR, so the lists work where they are (and move along with the images).

Multi-label lists (a label cell such as `cat;dog` anywhere; an empty cell is an image with no label) cannot
go through StratifiedKFold, which stratifies one class per row. They are split by iterative stratification
(Sechidis et al. 2011, the iterative-stratification package: pip install 'xception[folds]'): it deals out
the rarest label's images first, each to the fold that still lacks most of that label, so every fold holds
out about 1/K of each label's positives although one image counts towards several labels. With groups, a
group is one unit labelled with the union of its images' labels, and its images all take the group's fold.
Label cells are written as they are in the source, so `cat;dog` stays `cat;dog`.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections import defaultdict

from ..config import UserError
from ..data.folder import scan_dataset
from ..data.listfile import MULTI_LABEL, Row, check_images, is_list_file, label_names, read_csv
from ..files import make_folder, show, write_text

FOLD_NAME = "fold-{}.csv"
NEED_ITERSTRAT = ("xception split: multi-label folds need the iterative-stratification package: "
                  "pip install 'xception[folds]'")


def pooled_rows(data: str) -> tuple:
    """(rows to split, test rows kept aside, has_group) of an image folder or a CSV list file."""
    if is_list_file(data):
        rows, has_group = read_csv(data)
        pool = [r for r in rows if r.split in ("train", "val")]
        check_images(pool)
        return pool, [r for r in rows if r.split == "test"], has_group
    train, val = scan_dataset(data, need_train=True)
    return [Row(s.root, 0, path, s.classes[c], "train") for s in (train, val)
            for path, c in s.samples], [], False


def _units(rows: list, has_group: bool) -> list:
    """The unit each row is split with: its group, or the row itself when it has none (or there are none)."""
    return [r.group if has_group and r.group else ("row", i) for i, r in enumerate(rows)]


def _check_counts(rows: list, folds: int, data: str, has_group: bool, names: list | None = None) -> None:
    """Every class needs at least `folds` images (or groups) holding it, else some fold has none of it to
    hold out; a single-label list needs two classes, a multi-label one (`names` given) one."""
    multi = names is not None
    members = defaultdict(set)
    for unit, held in zip(_units(rows, has_group), names if multi else [(r.label,) for r in rows]):
        for label in held:
            members[label].add(unit)
    if len(members) < (1 if multi else 2):
        raise UserError(f"{show(data)}: only {len(members)} class; folds need at least "
                        + ("one labelled image" if multi else "two"))
    unit = "groups" if has_group else "images"
    for label in sorted(members):
        if len(members[label]) < folds:
            raise UserError(f"{show(data)}: class {label!r} has {len(members[label])} {unit}, fewer than "
                            f"--folds {folds}; use fewer folds or add {unit} of it")


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {show(out)}: is a file; give a folder for the fold lists")
    held = sorted(glob.glob(os.path.join(glob.escape(out), FOLD_NAME.format("*"))))
    if held:
        raise UserError(f"--out {show(out)}: already holds fold files ({os.path.basename(held[0])} ...); "
                        f"xception split never writes over them: choose another folder or remove them")


def assign_folds(rows: list, folds: int, seed: int, has_group: bool) -> list:
    """The held-out fold (0..folds-1) of each row, stratified by label, groups kept whole."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = [r.label for r in rows]
    fold_of = [0] * len(rows)
    if has_group:  # a row without a group is a group of its own
        groups = [r.group if r.group else f"\0row{i}" for i, r in enumerate(rows)]
        parts = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(rows, labels, groups)
    else:
        parts = StratifiedKFold(folds, shuffle=True, random_state=seed).split(rows, labels)
    for k, (_, held_out) in enumerate(parts):
        for i in held_out:
            fold_of[i] = k
    return fold_of


def assign_multilabel_folds(names: list, rows: list, folds: int, seed: int, has_group: bool) -> list:
    """The held-out fold of each row of a multi-label list (`names`: each row's class names), by iterative
    stratification over units (a group, labelled with the union of its images' names, or a single row)."""
    import numpy as np
    try:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    except ImportError:
        raise UserError(NEED_ITERSTRAT) from None
    classes = sorted({n for held in names for n in held})
    column = {name: c for c, name in enumerate(classes)}
    units = _units(rows, has_group)
    index = {}  # unit -> its position, in order of first appearance (so the same list gives the same folds)
    for unit in units:
        index.setdefault(unit, len(index))
    # a single class would be a 1-column target, which the splitter takes for binary: add "has no label"
    targets = np.zeros((len(index), max(len(classes), 2)), dtype=bool)
    for unit, held in zip(units, names):
        targets[index[unit], [column[n] for n in held]] = True
    if len(classes) == 1:
        targets[:, 1] = ~targets[:, 0]
    unit_fold = np.zeros(len(index), dtype=int)
    splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros((len(index), 1)), targets)):
        unit_fold[held_out] = k
    return [int(unit_fold[index[unit]]) for unit in units]


def _fold_text(rows: list, held: list, test: list, out: str, has_group: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "split"] + (["group"] if has_group else []))
    base = os.path.abspath(out)
    for r, split in [(r, s) for r, s in zip(rows, held)] + [(r, "test") for r in test]:
        writer.writerow([os.path.relpath(r.path, base), r.label, split] + ([r.group or ""] if has_group else []))
    return buffer.getvalue()


def write_folds(data: str, folds: int, out: str, seed: int = 0, val_split: str = "val", log=print) -> list:
    """Write out/fold-1.csv ... fold-K.csv; returns their paths."""
    if folds < 2:
        raise UserError(f"--folds must be 2 or more, got {folds}")
    _check_out(out)
    rows, test, has_group = pooled_rows(data)
    grouped = any(r.group for r in rows)  # a group column left blank: every image its own group
    multi = any(MULTI_LABEL in r.label for r in rows + test)  # as training reads the list (make_splits)
    names = label_names(rows, multi)
    if multi:
        _check_counts(rows, folds, data, grouped, names)
        fold_of = assign_multilabel_folds(names, rows, folds, seed, grouped)
    else:
        _check_counts(rows, folds, data, grouped)
        fold_of = assign_folds(rows, folds, seed, grouped)
    make_folder(out, "--out")
    paths = []
    for k in range(folds):
        held = [val_split if f == k else "train" for f in fold_of]
        path = os.path.join(out, FOLD_NAME.format(k + 1))
        write_text(path, _fold_text(rows, held, test, out, has_group))
        n_val = held.count(val_split)
        log(f"fold {k + 1}: train {len(rows) - n_val}, {val_split} {n_val}"
            + (f", test {len(test)}" if test else "") + f" -> {show(path)}")
        paths.append(path)
    return paths
