"""Splits: which images each model of a run trains and validates on, and the folders they write to.

A hold-out run trains one model; --folds K trains K, each in a fold folder of the run. A resumed
run keeps the split its split.csv records, so every model goes on with the images it had.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data, files

VAL_SPLIT_DEFAULT = 0.2  # qq.py's default; another value given with --folds gets a note


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
    saved = data.read_split(saved_csv, image_set) if resumed and saved_csv.is_file() else None
    if args.groups and saved is not None:  # the groups CSV may have moved with the images
        groups = [saved[i]["group"] for i in range(len(image_set.paths))]
    else:
        groups = data.read_groups(args.groups, image_set) if args.groups else None
    if groups is None and not resumed:
        print(
            "note: without --groups, images are split one by one; if a patient has several images, some may land in "
            "training and others in validation, which flatters the validation metrics. Give --groups patients.csv "
            "to keep each patient on one side."
        )
    folds = saved_split(args, saved) if saved is not None else new_split(args, image_set, groups)
    remedy = "use fewer --folds" if args.folds else "use a different --val-split"
    for train, val in folds:  # every fold, before a run folder exists or a fold trains for nothing
        data.check_split(image_set, train, val, groups, remedy=remedy)
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
        return data.split_folds(image_set.labels, args.folds, args.seed, groups)
    n_splits = data.grouped_holdout_folds(args.val_split)
    if groups is not None and abs(1 / n_splits - args.val_split) > 0.01:
        print(
            f"note: with --groups, the validation side is 1 of {n_splits} groupings of the patients, about "
            f"{1 / n_splits:.0%} of the images rather than the {args.val_split:.0%} of --val-split; pick 0.5, 0.33, "
            "0.25, 0.2 ... to get what you ask."
        )
    return [data.split_holdout(image_set.labels, args.val_split, args.seed, groups)]


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
    rows = data.split_rows(image_set, fold_of, groups, column="fold")
    files.write_csv(run_dir / "split.csv", rows, ["path", "class", "fold"] + group_column)
    for split in splits:
        split.run_dir.mkdir(exist_ok=True)
        if not split.finished:
            files.write_json(split.run_dir / "config.json", config | {"fold": split.fold})
            _write_subsets(split, image_set)
    return splits


def _write_subsets(split, image_set):
    subset_of = {int(i): "train" for i in split.train} | {int(i): "val" for i in split.val}
    rows = data.split_rows(image_set, subset_of, split.groups)
    columns = ["path", "class", "subset"] + (["group"] if split.groups is not None else [])
    files.write_csv(split.run_dir / "split.csv", rows, columns)
