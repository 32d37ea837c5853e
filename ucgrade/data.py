"""Data: scan an ImageFolder tree, read images safely, split them, and feed them to the model.

Images are decoded once, before training starts. Each one is resized so that its shorter side is
`resize_size` (256 for a 224 crop) and kept in memory as uint8. Training crops and flips from that
cache; validation and prediction take the centre crop. Files that cannot be used are found in this
first pass and listed, instead of failing halfway through an epoch.
"""

import functools
import hashlib
import io
import math
import os
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from .cli import RunInterrupted, UserError
from .distributed import processes_on_this_machine
from .files import check_image_folder, read_csv, sha256_of

# Reading and preprocessing images needs no torch: they live in images.py, for the torch-free grader,
# and are re-exported here for the rest of the package.
from .images import (  # noqa: F401
    IMAGE_EXTENSIONS,
    NOT_REGULAR,
    UnreadableImage,
    _is_utf8,
    _to_rgb,
    files_under,
    is_image_file,
    is_regular_file,
    load_image,
    preprocess,
    resize_shorter_side,
    to_chw,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSet:
    """The images found under a data folder, in class order."""

    root: Path
    class_names: list
    paths: list  # Path of each usable image
    labels: list  # class index of each image
    skipped: list = field(default_factory=list)  # (path, reason) of each file not used
    images: list = None  # decoded uint8 CHW tensors, or None when streaming from disk
    digests: list = None  # SHA-256 of each usable file, taken when it is decoded

    def fingerprint(self):
        """One SHA-256 of every usable image's path and content (after read_images): a resumed run checks its
        data against it."""
        lines = sorted(f"{self.relpath(i)}\0{digest}\n" for i, digest in enumerate(self.digests))
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def relpath(self, i):
        return self.paths[i].relative_to(self.root).as_posix()

    def class_counts(self):
        return np.bincount(self.labels, minlength=len(self.class_names)).tolist()


# ----------------------------------------------------------------------------- reading images


def resize_size_for(img_size):
    """The shorter side to resize to before a centre crop of img_size (256 for 224, as for ImageNet)."""
    return int(round(img_size * 256 / 224))


def read_resized(path, resize_size):
    """Load an image and resize its shorter side to resize_size: a uint8 tensor of shape (3, H, W)."""
    return torch.from_numpy(to_chw(resize_shorter_side(load_image(path), resize_size)))  # PIL resize, antialiased


# ----------------------------------------------------------------------------- scanning a folder


def _class_folders(root, class_order):
    root = check_image_folder(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(
            f"the data folder '{root}' has no class sub-folders; put the images in '{root}/<grade>/<image>' with "
            "one sub-folder per grade."
        )
    if class_order:
        missing = [name for name in class_order if name not in folders]
        if missing:
            raise UserError(
                f"--class-order names {', '.join(missing)}, which is not a sub-folder of '{root}' (found: "
                f"{', '.join(folders)})."
            )
        if len(set(class_order)) != len(class_order):
            raise UserError("--class-order lists a class twice; list each class once, in grade order.")
        unused = [name for name in folders if name not in class_order]
        if unused:
            raise UserError(
                f"--class-order leaves out the sub-folder(s) {', '.join(unused)} of '{root}'; list every class, in "
                "grade order."
            )
        folders = list(class_order)
    return root, folders


def scan_folder(root, class_order=None):
    """List the candidate images of an ImageFolder tree: root/<class>/[sub-folders/]<image>.

    Files whose names do not end in an image extension are skipped with a reason. A class folder
    with no image files is reported and left out if it sorts before or after all the others (an
    empty grade in between is an error); at least two classes must remain.
    """
    root, folders = _class_folders(root, class_order)
    class_names, paths, labels, skipped, empty = [], [], [], [], []
    for name in folders:
        images = []
        for path in files_under(root / name):
            if not _is_utf8(path):  # e.g. Latin-1 bytes from an old export: CSV and JSON outputs need UTF-8
                skipped.append(
                    (
                        Path(os.fsencode(path).decode("utf-8", "replace")),
                        "the file name is not valid UTF-8; rename the file",
                    )
                )
            elif not is_regular_file(path):  # a pipe named x.jpg would block the first open() for ever
                skipped.append((path, NOT_REGULAR))
            elif is_image_file(path):
                images.append(path)
            else:
                skipped.append((path, "not an image file (by its extension)"))
        if not images:
            empty.append(name)
            continue
        labels += [len(class_names)] * len(images)
        class_names.append(name)
        paths += images
    if empty and class_order:
        raise UserError(
            f"the class folder(s) {', '.join(empty)} in '{root}' hold no images; add images or leave the class out "
            "of --class-order."
        )
    if len(class_names) < 2:
        detail = f" (empty: {', '.join(empty)})" if empty else ""
        raise UserError(
            f"'{root}' has images for only {len(class_names)} "
            f"{'class' if len(class_names) == 1 else 'classes'}{detail}; a classifier needs at least two grades "
            "with images."
        )
    inner = [name for name in empty if class_names[0] < name < class_names[-1]]  # folders are in sorted order here
    if inner:
        below, above = max(n for n in class_names if n < inner[0]), min(n for n in class_names if n > inner[0])
        raise UserError(
            f"the class folder '{inner[0]}' in '{root}' holds no images, and leaving out a grade between '{below}' "
            f"and '{above}' would make QWK and MAE count those two as neighbours; add its images, or remove the "
            "folder to grade on a scale without it."
        )
    return ImageSet(root, class_names, paths, labels, skipped), empty


def estimate_cache_bytes(paths, resize_size):
    """Bytes needed to hold every image resized to resize_size on its shorter side, from the headers alone."""
    total = 0
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as image:
                    w, h = image.size
        except Exception:  # unreadable files are reported by the decode pass
            continue
        short, long = min(w, h), max(w, h)
        total += 3 * resize_size * math.ceil(long * resize_size / max(short, 1))
    return total


def available_memory_bytes():
    """Memory the process could still use, from /proc/meminfo where present."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def read_images(image_set, resize_size, keep, stop=None):
    """Decode every image once. Keep the resized uint8 tensors when keep is True.

    Files that fail to decode move from image_set.paths to image_set.skipped with the reason.
    stop() is polled between images so that Ctrl-C stops a long scan promptly.
    """
    paths, labels, images, digests = [], [], [], []
    for path, label in zip(tqdm(image_set.paths, desc="reading images", unit="img", leave=False), image_set.labels):
        if stop is not None and stop():
            break
        try:
            image = read_resized(path, resize_size)
        except UnreadableImage as error:
            image_set.skipped.append((path, str(error)))
            continue
        try:
            digest = sha256_of(path)  # from the page cache, just read
        except OSError as error:  # gone or locked between the decode and this read
            image_set.skipped.append((path, f"cannot be read ({error.strerror or error})"))
            continue
        paths.append(path)
        labels.append(label)
        digests.append(digest)
        if keep:
            images.append(image)
    image_set.paths, image_set.labels, image_set.digests = paths, labels, digests
    image_set.images = images if keep else None
    return image_set


# ----------------------------------------------------------------------------- splitting


def check_class_sizes(image_set, minimum=2):
    for name, count in zip(image_set.class_names, image_set.class_counts()):
        if count == 0:
            raise UserError(
                f"class '{name}' has no readable images left after skipping bad files; add images to "
                f"'{image_set.root / name}'."
            )
        if count < minimum:
            raise UserError(
                f"class '{name}' has only {count} usable image(s); it needs at least {minimum} so that training "
                "and validation each get one. Add images or remove the folder."
            )


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


def _read_group_rows(path):
    """The rows of a --groups CSV, separated by commas, or by semicolons or tabs as European Excel saves it."""
    import csv

    if not path.is_file():
        raise UserError(f"--groups file '{path}' does not exist; give a CSV with the columns path,group.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        header = text.split("\n", 1)[0]
        cells = {d: {cell.strip().strip('"') for cell in header.split(d)} for d in ",;\t"}
        delimiter = next((d for d in ",;\t" if {"path", "group"} <= cells[d]), ",")
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(
            f"--groups file '{path}' is not a readable CSV ({error}); save it as UTF-8 CSV with the columns path,group."
        ) from None
    if not rows or not {"path", "group"} <= set(rows[0]):
        found = f" (its first line is '{header.strip()[:60]}')" if header.strip() else " (it is empty)"
        raise UserError(
            f"--groups file '{path}' needs the header 'path,group', separated by commas, semicolons or tabs{found}; "
            "path is relative to --data, group e.g. a patient id."
        )
    return rows


def read_group_file(path):
    """{path relative to --data: group} of a --groups CSV; checked before any image is read."""
    path = Path(path)
    rows = _read_group_rows(path)
    group_of = {}
    for row_number, row in enumerate(rows, start=2):
        rel = Path(
            (row["path"] or "").strip().replace("\\", "/")
        ).as_posix()  # also a Windows path, as Excel may save it
        group = (row["group"] or "").strip()
        if not group:
            continue  # an image with no group in any row is reported below
        if group_of.get(rel, group) != group:
            raise UserError(
                f"--groups file '{path}' gives '{rel}' two groups ('{group_of[rel]}' and, in row {row_number}, "
                f"'{group}'); keep one row per image."
            )
        group_of[rel] = group
    return group_of


def decodes(path):
    try:
        load_image(path)
        return True
    except UnreadableImage:
        return False


def read_groups(path, image_set, before_decoding=False):
    """Read a path,group CSV (paths relative to the data folder): one group id per image.

    Called once right after the scan, before the slow decode (before_decoding=True), so that an image
    without a group stops the run at once, and again for the split, on the images that decoded. Before
    decoding, a file without a group is decoded on its own: one that cannot be is skipped later, and
    needs no group."""
    path = Path(path)
    group_of = read_group_file(path)
    groups, missing = [], []
    for i in range(len(image_set.paths)):
        rel = image_set.relpath(i)
        if rel in group_of:
            groups.append(group_of[rel])
        elif not before_decoding or decodes(image_set.paths[i]):
            missing.append(rel)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"--groups file '{path}' has no group for {len(missing)} image(s): {shown}; add a row 'path,group' for "
            "each (paths relative to --data)."
        )
    unknown = sorted(set(group_of) - {image_set.relpath(i) for i in range(len(image_set.paths))})
    if unknown and not before_decoding:  # a typo, or an image skipped as unreadable: said, not an error
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        print(
            f"note: --groups file '{path}' names {len(unknown)} path(s) that are not usable images under --data, "
            f"which are left out: {shown}."
        )
    return groups


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
    for row in read_csv(path):
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


# ----------------------------------------------------------------------------- transforms and loaders


def train_transform(img_size):
    """Random crop and flip of a cached uint8 tensor."""
    return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip()])


def val_transform(img_size):
    """The centre crop of a cached, already resized uint8 tensor: the same pixels as eval_transform."""
    return v2.CenterCrop(img_size)


def eval_transform(img_size, resize_size=None):
    """The one evaluation preprocessing: PIL image -> resize -> centre crop -> uint8 tensor.

    It is images.preprocess, which the torch-free ONNX grader uses too. Validation takes the same
    centre crop of the cached, already resized tensor, which gives the same pixels; normalize() then
    maps either to the model's input. A checkpoint stores both sizes.
    """
    resize_size = resize_size or resize_size_for(img_size)
    return functools.partial(_preprocess_tensor, img_size=img_size, resize_size=resize_size)


def _preprocess_tensor(image, img_size, resize_size):
    return torch.from_numpy(preprocess(image, img_size, resize_size))


@functools.lru_cache(maxsize=8)
def _mean_std(device, mean, std):
    # made once per device: a fresh tensor per batch would be a blocking host-to-GPU copy each step
    return torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (N, 3, H, W) on any device -> normalised float32 in channels_last."""
    mean, std = _mean_std(images.device, tuple(mean), tuple(std))
    images = images.float().div_(255).sub_(mean).div_(std)
    return images.contiguous(memory_format=torch.channels_last)


class ImageDataset(torch.utils.data.Dataset):
    """Items of an ImageSet, from the in-memory cache or, when streaming, from disk."""

    def __init__(self, image_set, indices, transform, resize_size):
        self.image_set = image_set
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.resize_size = resize_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        item, seed = key if isinstance(key, tuple) else (key, None)
        i = self.indices[item]
        if self.image_set.images is not None:
            image = self.image_set.images[i]
        else:
            image = read_resized(self.image_set.paths[i], self.resize_size)
        if seed is None:
            return self.transform(image), self.image_set.labels[i]
        with torch.random.fork_rng(devices=[]):  # the transforms draw from the global CPU generator
            torch.default_generator.manual_seed(seed)
            return self.transform(image), self.image_set.labels[i]


class FeatureViews(torch.utils.data.Dataset):
    """Precomputed backbone features of several views (V x N x D); each item is one view, drawn at random."""

    def __init__(self, views, labels):
        self.views = views
        self.labels = labels

    def __len__(self):
        return self.views.shape[1]

    def __getitem__(self, key):
        i, seed = key
        view = int(torch.randint(len(self.views), (), generator=torch.Generator().manual_seed(seed)))
        return self.views[view, i], self.labels[i]


class SeededSampler(torch.utils.data.Sampler):
    """(index, seed) pairs: every training item draws its augmentation from a seed of its own,
    taken from `generator` in the main process, so that a run's random crops are the same with
    any --workers and --cache, and --resume replays them.

    With several processes (rank of world_size), every process draws the same permutation and seeds
    and takes every world_size-th pair from its rank, so that the processes' batches together are
    the batch one process would take; the permutation is padded from its start to a multiple of
    world_size, so every process takes as many steps."""

    def __init__(self, sampler, generator, rank=0, world_size=1):
        self.sampler = sampler
        self.generator = generator
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return math.ceil(len(self.sampler) / self.world_size)

    def __iter__(self):
        indices = list(self.sampler)
        seeds = torch.randint(2**62, (len(indices),), generator=self.generator).tolist()
        pairs = list(zip(indices, seeds))
        pairs += pairs[: len(self) * self.world_size - len(pairs)]
        return iter(pairs[self.rank :: self.world_size])


def default_workers(cached, device):
    """Loader processes that suit the device: none for cached images on a CPU, whose cores the
    model needs (1 worker made training 0.5x as fast on 2 cores: BENCHMARKS.md), else up to 4."""
    if cached and device.type == "cpu":
        return 0
    return min(4, max(1, (os.cpu_count() or 2) - 1))


def make_loader(dataset, batch_size, workers, runtime, shuffle=False, generator=None, sampler=None):
    """A training loader (shuffle or a sampler) hands the dataset (index, seed) pairs: SeededSampler,
    which gives each of several processes its share of every epoch."""
    if sampler is None and shuffle:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if sampler is not None:
        sampler = SeededSampler(sampler, generator, runtime.rank, runtime.world_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        # persistent workers skip the loader's per-epoch draw from `generator`: the order would depend on --workers
        persistent_workers=False,
        generator=generator,
        worker_init_fn=_leave_signals_to_the_main_process if workers > 0 else None,
    )


def _leave_signals_to_the_main_process(worker_id):
    """Ctrl-C and SIGTERM reach every process of the group. A worker that died of them would crash
    the run; ignoring them lets the main process stop after the batch and then shut the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ----------------------------------------------------------------------------- a run's images


def read_data(args, stop=None):
    """Scan the data folder, decode every image once (into memory when it fits), and report what was skipped."""
    image_set, empty = scan_folder(args.data, args.class_order)
    for name in empty:
        print(f"warning: class folder '{name}' holds no images and is ignored.")
    check_remission_grade(args.remission_upto, image_set.class_names)  # before the slow decode
    if args.groups and not args.resume:  # a resumed run takes its groups from its split.csv
        read_groups(args.groups, image_set, before_decoding=True)
    resize = resize_size_for(args.img_size)
    need = estimate_cache_bytes(image_set.paths, resize)
    processes = processes_on_this_machine()  # under torchrun each process keeps its own cache
    keep = args.cache == "ram" or (args.cache == "auto" and need * processes < available_memory_bytes() / 2)
    print(f"reading {len(image_set.paths)} images from {args.data} ...")
    read_images(image_set, resize, keep=keep, stop=stop)
    if stop is not None and stop():
        raise RunInterrupted("stopped while reading the images; nothing was trained, so run qq.py again")
    if keep:
        each = f" in each of {processes} processes" if processes > 1 else ""
        print(f"decoded images cached in memory: {need / 2**20:.0f} MB{each}")
    else:
        print(f"streaming images from disk (cache {args.cache}; decoded they would need {need / 2**30:.1f} GB)")
    if image_set.skipped:
        count = len(image_set.skipped)
        print(f"warning: skipped {count} file(s) that cannot be used (listed in skipped.csv of the run):")
        for path, reason in image_set.skipped:
            print(f"  {path}: {reason}")
    check_class_sizes(image_set)
    grades = ", ".join(f"{n} ({c})" for n, c in zip(image_set.class_names, image_set.class_counts()))
    print(f"classes (grade order): {grades}")
    return image_set


def check_remission_grade(remission_upto, class_names):
    if remission_upto is None:
        return
    if remission_upto not in class_names:
        raise UserError(
            f"--remission-upto {remission_upto!r} is not one of the grades ({', '.join(class_names)}); name the last "
            "grade that counts as remission."
        )
    if remission_upto == class_names[-1]:
        raise UserError(
            f"--remission-upto {remission_upto!r} is the most severe grade, which leaves no active grades; name a "
            "milder grade."
        )
