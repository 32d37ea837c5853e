"""Splits: which images each model of a run trains and validates on, and the folders they write to.

A hold-out run trains one model; --folds K trains K, each in a fold folder of the run. A resumed
run keeps the split its split.csv records, so every model goes on with the images it had.
Every split is stratified by grade and seeded; with --groups (groups.py) a patient stays on one side.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files
from .cli import UserError
from .groups import read_groups

VAL_SPLIT_DEFAULT = 0.2  # qq.py's --val-split; another value given with --folds gets a note


@dataclass
class Split:
    """One model's images (indices into the ImageSet) and the folder it writes to."""

    train: np.ndarray
    val: np.ndarray
    run_dir: Path
    groups: list = None  # the group (patient) of every image of the set, or None
    fold: int = None  # 1..K in a cross-validation run, None in a hold-out run

    @property
    def resume_dir(self):
        """The folder that --resume takes: a fold resumes with its whole run."""
        return self.run_dir.parent if self.fold else self.run_dir

    @property
    def finished(self):
        """A fold that finished before the run was interrupted is not trained again."""
        return self.fold is not None and files.read_status(self.run_dir) == "finished"


def plan(args, image_set, resumed=None):
    """(groups, [(train, val)]): one hold-out split, or args.folds folds, each checked to hold every grade
    on both sides. A resumed run takes its split and its groups from its split.csv."""
    saved_csv = Path(args.resume or "") / "split.csv"
    saved = read_split(saved_csv, image_set) if resumed and saved_csv.is_file() else None
    if args.groups and saved is not None:  # the groups CSV may have moved with the images
        groups = [saved[i]["group"] for i in range(len(image_set.paths))]
    else:
        groups = read_groups(args.groups, image_set) if args.groups else None
    if groups is None and not resumed:
        print(
            "note: without --groups, images are split one by one; if a patient has several images, some may land in "
            "training and others in validation, which flatters the validation metrics. Give --groups patients.csv "
            "to keep each patient on one side."
        )
    folds = saved_split(args, saved) if saved is not None else new_split(args, image_set, groups)
    remedy = "use fewer --folds" if args.folds else "use a different --val-split"
    for train, val in folds:  # every fold, before a run folder exists or a fold trains for nothing
        check_split(image_set, train, val, groups, remedy=remedy)
    return groups, folds


def saved_split(args, saved):
    """The (train, val) pairs of a run's split.csv rows ({image index: row})."""
    column = "fold" if args.folds else "subset"
    subset_of = {i: row[column] for i, row in saved.items()}
    names = [str(k) for k in range(1, args.folds + 1)] if args.folds else ["val"]
    return [
        (
            np.array(sorted(i for i, s in subset_of.items() if s != name)),
            np.array(sorted(i for i, s in subset_of.items() if s == name)),
        )
        for name in names
    ]


def new_split(args, image_set, groups):
    if args.folds:
        if args.val_split != VAL_SPLIT_DEFAULT:
            print(
                f"note: --val-split is not used with --folds {args.folds}: each fold validates on 1/{args.folds} "
                "of the images."
            )
        return split_folds(image_set.labels, args.folds, args.seed, groups)
    n_splits = grouped_holdout_folds(args.val_split)
    if groups is not None and abs(1 / n_splits - args.val_split) > 0.01:
        print(
            f"note: with --groups, the validation side is 1 of {n_splits} groupings of the patients, about "
            f"{1 / n_splits:.0%} of the images rather than the {args.val_split:.0%} of --val-split; pick 0.5, 0.33, "
            "0.25, 0.2 ... to get what you ask."
        )
    return [split_holdout(image_set.labels, args.val_split, args.seed, groups)]


def open_folders(args, run_dir, image_set, plan, config, runtime):
    """The Splits of a run (plan: the groups and the (train, val) pairs of plan()), each with its folder;
    split.csv records which image went where. Only the main process writes.

    A cross-validation run gets fold1..foldK, each with its own config.json and split.csv (a finished
    fold keeps its files); the run's split.csv then names the fold that validates each image.
    """
    groups, folds = plan
    group_column = ["group"] if groups is not None else []
    if not args.folds:
        split = Split(*folds[0], run_dir, groups)
        if runtime.is_main:
            _write_subsets(split, image_set)
        return [split]
    splits = [Split(train, val, run_dir / f"fold{k}", groups, fold=k) for k, (train, val) in enumerate(folds, 1)]
    if not runtime.is_main:
        return splits
    fold_of = {int(i): k for k, (_, val) in enumerate(folds, 1) for i in val}
    rows = split_rows(image_set, fold_of, groups, column="fold")
    files.write_csv(run_dir / "split.csv", rows, ["path", "class", "fold"] + group_column)
    for split in splits:
        split.run_dir.mkdir(exist_ok=True)
        if not split.finished:
            files.write_json(split.run_dir / "config.json", config | {"fold": split.fold})
            _write_subsets(split, image_set)
    return splits


def _write_subsets(split, image_set):
    subset_of = {int(i): "train" for i in split.train} | {int(i): "val" for i in split.val}
    rows = split_rows(image_set, subset_of, split.groups)
    columns = ["path", "class", "subset"] + (["group"] if split.groups is not None else [])
    files.write_csv(split.run_dir / "split.csv", rows, columns)


# ----------------------------------------------------------------------------- splitting the images


def split_holdout(labels, val_fraction, seed, groups=None):
    """Split indices into train and validation, stratified per class and seeded.

    Without groups, each class puts round(n * val_fraction) images (at least one, and at most n - 1)
    in validation. With groups, each group stays on one side, and the validation side aims at one
    of grouped_holdout_folds(val_fraction) parts of the images (a fifth for 0.2): the split is the
    best of many candidates (see best_grouped_holdout).
    """
    labels = np.asarray(labels)
    if groups is not None:
        n_splits = grouped_holdout_folds(val_fraction)
        _check_split_size(labels, n_splits, groups, remedy="use a larger --val-split")
        return best_grouped_holdout(labels, groups, n_splits, seed)
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = min(max(1, int(round(len(members) * val_fraction))), len(members) - 1)
        val.extend(rng.permutation(members)[:n_val].tolist())
    val = np.sort(np.array(val, dtype=int))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def grouped_holdout_folds(val_fraction):
    """With groups, the validation side is one of this many parts: 1/5 for 0.2, 1/3 for 0.3, 1/2 for 0.6."""
    return max(2, round(1 / val_fraction))


def split_folds(labels, n_splits, seed, groups=None, remedy="use fewer --folds"):
    """K stratified folds (grouped when groups is given): a list of (train, val) index arrays.

    Without groups, scikit-learn's StratifiedKFold shuffled with seed. With groups, the best of
    many candidates (see best_grouped_folds).
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    _check_split_size(labels, n_splits, groups, remedy)
    if groups is not None:
        return best_grouped_folds(labels, groups, n_splits, seed)
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; check_split then names the class
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
        return [(np.sort(train), np.sort(val)) for train, val in folds]


def _check_split_size(labels, n_splits, groups, remedy):
    units, unit = (len(labels), "images") if groups is None else (len(set(groups)), "groups")
    if n_splits > units:
        raise UserError(
            f"a split into {n_splits} parts needs at least {n_splits} {unit}, but there are {units}; "
            f"{remedy} or add {unit}."
        )
    largest = int(np.bincount(labels).max())
    if groups is None and n_splits > largest:  # StratifiedKFold needs one image of some grade per fold
        raise UserError(
            f"a split into {n_splits} parts needs a grade with at least {n_splits} images, but the largest has "
            f"{largest}; use at most --folds {largest}, or add images."
        )


# A grouped split cannot be stratified exactly: whole groups move, and a group may hold several
# grades. So the grouped splits are searched for: the candidates are the folds of seeded shuffles
# of scikit-learn's StratifiedGroupKFold (the first is the split of earlier versions) and greedy
# assignments of the groups, grade by grade, in seeded orders. Among the candidates in which every
# grade has images on both sides (of every fold), the one closest to the requested share and to
# the grade proportions wins; ties go to the earlier candidate, so a seed always gives one split.
# When no candidate has every grade on both sides, the closest one is returned and check_split
# names the grade and the number of groups per grade.


def best_grouped_holdout(labels, groups, n_splits, seed):
    """(train, val) index arrays: every group on one side, the validation side about 1/n_splits of the images."""
    codes, counts = _images_per_group_and_grade(labels, groups)
    target = 1 / n_splits
    candidates = []  # True for the groups on the validation side
    for state, order in _search_seeds(seed, len(counts)):
        fold_of = _stratified_group_folds(labels, codes, n_splits, state)
        if fold_of is not None:
            candidates += [fold_of == k for k in range(n_splits)]
        candidates.append(_greedy_holdout(counts, target, order))
    totals = counts.sum(0)
    in_val = _best(
        candidates,
        valid=[_covers(counts[c].sum(0), totals) for c in candidates],
        score=[_side_score(counts[c].sum(0), totals, target) for c in candidates],
    )
    return np.flatnonzero(~in_val[codes]), np.flatnonzero(in_val[codes])


def best_grouped_folds(labels, groups, n_splits, seed):
    """[(train, val)] for n_splits folds: every group in one fold, each fold about 1/n_splits of the images."""
    codes, counts = _images_per_group_and_grade(labels, groups)
    candidates = []  # the fold of every group
    for state, order in _search_seeds(seed, len(counts)):
        fold_of = _stratified_group_folds(labels, codes, n_splits, state)
        candidates += [] if fold_of is None else [fold_of]
        candidates.append(_greedy_folds(counts, n_splits, order))
    totals = counts.sum(0)
    sides = [[counts[fold_of == k].sum(0) for k in range(n_splits)] for fold_of in candidates]
    fold_of = _best(
        candidates,
        valid=[all(_covers(val, totals) for val in s) for s in sides],
        score=[sum(_side_score(val, totals, 1 / n_splits) for val in s) for s in sides],
    )
    return [(np.flatnonzero(fold_of[codes] != k), np.flatnonzero(fold_of[codes] == k)) for k in range(n_splits)]


def _images_per_group_and_grade(labels, groups):
    """The group of each image (0 .. G-1) and a G x C table of images per group and grade present."""
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    _, grades = np.unique(labels, return_inverse=True)
    counts = np.zeros((codes.max() + 1, grades.max() + 1), dtype=int)
    np.add.at(counts, (codes, grades), 1)
    return codes, counts


def _search_seeds(seed, n_groups):
    """(StratifiedGroupKFold random_state, order of the groups) pairs, from seed: the first state is
    seed itself. Fewer for many groups, where one try already splits well, to keep the search ~1 s."""
    n_tries = min(10, max(1, 10_000 // n_groups))
    rng = np.random.default_rng(seed)
    states = [seed, *rng.integers(2**31, size=n_tries - 1).tolist()]
    return [(state, rng.permutation(n_groups)) for state in states]


def _stratified_group_folds(labels, codes, n_splits, state):
    """The fold of every group in StratifiedGroupKFold, or None where it refuses to split (when every grade
    has fewer images than folds)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if n_splits > np.bincount(labels).max():
        return None
    fold_of = np.zeros(codes.max() + 1, dtype=int)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=state)
        for k, (_, val) in enumerate(folds.split(np.zeros(len(labels)), labels, codes)):
            fold_of[codes[val]] = k
    return fold_of


def _greedy_holdout(counts, target, order):
    """Validation groups: first one group of every grade (rarest grades first), then, in order,
    each group that brings the side closer to the target; never a grade's last training group."""
    totals = counts.sum(0)
    in_val = np.zeros(len(counts), dtype=bool)
    val = np.zeros(counts.shape[1], dtype=int)
    for grade in np.argsort((counts > 0).sum(0), kind="stable"):
        for g in order:
            if val[grade] > 0:
                break
            if not in_val[g] and counts[g, grade] > 0 and np.all(val + counts[g] < totals):
                in_val[g], val = True, val + counts[g]
    score = _side_score(val, totals, target)
    for g in order:
        if not in_val[g] and np.all(val + counts[g] < totals):
            new_score = _side_score(val + counts[g], totals, target)
            if new_score < score:
                in_val[g], val, score = True, val + counts[g], new_score
    return in_val


def _greedy_folds(counts, n_splits, order):
    """The fold of every group: first, grade by grade (rarest first), a group for every fold that lacks
    the grade; then, in order, each other group to the fold where it helps the balance most."""
    totals = counts.sum(0)
    fold_of = np.full(len(counts), -1)
    sizes = np.zeros((n_splits, counts.shape[1]), dtype=int)
    for grade in np.argsort((counts > 0).sum(0), kind="stable"):
        for g in order:
            lacking = np.flatnonzero(sizes[:, grade] == 0)
            if not len(lacking):
                break
            if fold_of[g] < 0 and counts[g, grade] > 0:
                k = lacking[np.argmin(sizes[lacking].sum(1))]  # the smallest fold that lacks the grade
                fold_of[g], sizes[k] = k, sizes[k] + counts[g]
    for g in order:
        if fold_of[g] < 0:
            change = [
                _side_score(sizes[k] + counts[g], totals, 1 / n_splits) - _side_score(sizes[k], totals, 1 / n_splits)
                for k in range(n_splits)
            ]
            k = int(np.argmin(change))
            fold_of[g], sizes[k] = k, sizes[k] + counts[g]
    return fold_of


def _covers(val, totals):
    """Every grade has images on both sides: in val (images per grade) and in the rest."""
    return bool(np.all(val > 0) and np.all(val < totals))


def _side_score(val, totals, target):
    """How far a validation side (images per grade) is from the target share of all images, plus how
    far its grade proportions are from those of all images (total variation distance, 0 to 1)."""
    n_val, n = val.sum(), totals.sum()
    proportions = 0.5 * np.abs(val / n_val - totals / n).sum() if n_val else 1.0
    return abs(n_val / n - target) + proportions


def _best(candidates, valid, score):
    """The valid candidate with the lowest score (rounded, so that ties go to the earlier one)."""
    best = min(range(len(candidates)), key=lambda i: (not valid[i], round(float(score[i]), 9), i))
    return candidates[best]


def split_rows(image_set, subset_of, groups=None, column="subset"):
    """Rows of split.csv: path, class, and the subset (or fold) of every image in subset_of."""
    rows = []
    for i in sorted(subset_of):
        row = {"path": image_set.relpath(i), "class": image_set.class_names[image_set.labels[i]], column: subset_of[i]}
        if groups is not None:
            row["group"] = groups[i]
        rows.append(row)
    return rows


def read_split(path, image_set):
    """{image index: its row of a run's split.csv (subset or fold, and group)}, for --resume; the images
    must still be there."""
    index = {image_set.relpath(i): i for i in range(len(image_set.paths))}
    split = {}
    for row in files.read_csv(path):
        if row["path"] not in index:
            raise UserError(
                f"the image '{row['path']}' of the run's split.csv is missing or unreadable in '{image_set.root}'; "
                "the data changed, so start a new run instead of resuming."
            )
        split[index[row["path"]]] = row
    return split


def check_split(image_set, train, val, groups=None, remedy="use a different --val-split"):
    """Every class needs images on both sides of a split; say which one does not, and with groups, how
    many groups each class has (a grouped split is searched for, so then no better one was found)."""
    labels = np.asarray(image_set.labels)
    for side, indices in (("training", train), ("validation", val)):
        present = set(labels[indices].tolist())
        for label, name in enumerate(image_set.class_names):
            if label not in present:
                hint = ""
                if groups is not None:
                    per_class = [
                        len({groups[i] for i in np.flatnonzero(labels == c)}) for c in range(len(image_set.class_names))
                    ]
                    table = ", ".join(f"{n} {count}" for n, count in zip(image_set.class_names, per_class))
                    hint = (
                        f" (its images come from {per_class[label]} group(s), and a group cannot be split; "
                        f"groups per class: {table})"
                    )
                raise UserError(
                    f"class '{name}' has no {side} images in this split{hint}; add images of that class or {remedy}."
                )
