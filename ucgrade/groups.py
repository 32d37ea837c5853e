"""The --groups CSV: which group (patient) each image belongs to, so that a split keeps a group on one side.

Its format is checked before any image is read (read_group_file), and its paths once more against
the images that decoded (read_groups).
"""

import csv
import io
from pathlib import Path

from .cli import UserError
from .images import UnreadableImage, load_image


def _read_group_rows(path):
    """The rows of a --groups CSV, separated by commas, or by semicolons or tabs as European Excel saves it."""
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
