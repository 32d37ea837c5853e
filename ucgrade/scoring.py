"""Scoring: one step for every evaluation (a validation split, the pooled folds, an external test set).

score() computes the metrics, their 95% intervals, the patient level and the out-of-distribution summary,
writes predictions.csv, the plots, metrics.json and the report page, and prints the summary. The callers
differ only in where the predictions come from, and say the rest in a Scoring.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import evidence, figures, files, metrics, pages, records
from .cli import UserError, disk_full


@dataclass
class Scoring:
    """One evaluation to score: its predictions, and what its caller adds or names its own way."""

    out_dir: Path
    class_names: list
    relpaths: list  # of the images, relative to data_root
    targets: np.ndarray  # N
    probs: np.ndarray  # N x C
    data_root: Path  # where the images are, for the grid of wrong images
    img_size: int
    page: str  # the kind of report page: run, cv or test (pages.KINDS)
    remission_upto: str = None
    patient_grade: str = "max"
    groups: list = None  # a group (patient) per image, or None
    ood: dict = None  # the out-of-distribution summary (flagged, images, rate), or None without the check
    columns: dict = field(default_factory=dict)  # more columns of predictions.csv: name -> a value per image
    fields: dict = field(default_factory=dict)  # more fields of metrics.json
    failed: list = field(default_factory=list)  # (part, reason) of the caller's optional parts that failed
    write_more: object = None  # write_more(result): the caller's own files, such as cv_summary.csv
    cams: object = None  # cams(): Grad-CAM overlays, (caption, PNG path) each, made after the plots
    terminal: object = metrics.format_metrics  # terminal(result): the table printed first
    notes: list = field(default_factory=list)  # lines printed after the intervals


def score(scoring):
    """Score one evaluation, write its files and page, print its summary; returns (metrics.json, failed)."""
    s = scoring
    result = metrics.compute_metrics(s.targets, s.probs, s.class_names, s.remission_upto)
    evidence.add_evidence(result, s.targets, s.probs, s.out_dir, s.groups, s.patient_grade, s.remission_upto)
    if s.ood is not None:
        result["out_of_distribution"] = s.ood
    if s.write_more:
        s.write_more(result)
    result |= s.fields
    result["warnings"] = metrics.warnings(result)
    failed = s.failed
    failed += write_evaluation(s, result)
    write_metrics(s.out_dir, result, failed)
    cams = None  # the page finds a cross-validation run's in its folds
    if s.cams:
        before = len(failed)
        cams = attempt(failed, "Grad-CAM", s.cams) or []
        if len(failed) > before:  # metrics.json, written before Grad-CAM, names what is missing
            write_metrics(s.out_dir, result, failed)
    pages.write_report(s.out_dir, s.page, cams)
    print(s.terminal(result))
    print(evidence.format_evidence(result))
    for warning in result["warnings"]:
        print(f"warning: {warning}.")
    for line in s.notes:
        print(line)
    return result, failed


def write_metrics(out_dir, result, failed):
    """metrics.json, with the optional parts that could not be made under "failed"."""
    if failed:
        result["failed"] = [{"part": part, "reason": reason} for part, reason in failed]
    files.write_json(Path(out_dir) / "metrics.json", result)


def write_evaluation(scoring, result):
    """predictions.csv, the confusion matrices, roc.png and errors.png.

    predictions.csv must be written; a plot that fails is left out. Returns the failures, a list of
    (part, reason), for the output and the report.
    """
    s = scoring
    columns = {name: values for name, values in s.columns.items() if values is not None}
    rows = records.prediction_rows(s.relpaths, s.targets, s.probs, s.class_names, columns)
    records.write_predictions(Path(s.out_dir) / "predictions.csv", rows)
    out_dir, names = Path(s.out_dir), s.class_names
    failed = []
    attempt(failed, "the confusion matrices", figures.plot_confusions, result["confusion_matrix"], names, out_dir,
            s.page == "cv")  # fmt: skip
    attempt(failed, "roc.png", figures.plot_roc, s.targets, s.probs, names, out_dir / "roc.png", s.remission_upto)
    kind = pages.KINDS[s.page]
    if kind.pictures:
        attempt(failed, "errors.png", figures.plot_errors, rows, s.data_root, s.img_size, out_dir / "errors.png",
                class_names=names, images=kind.images)  # fmt: skip
    return failed


def attempt(failed, part, function, *args, **kwargs):
    """function(*args, **kwargs), for an optional part of a finished run (a plot, Grad-CAM, the timing): a
    failure is printed and added to failed as (part, reason) instead of losing the files that must be written.
    A full disk, a stop and a user's mistake still end the run."""
    try:
        return function(*args, **kwargs)
    except (UserError, KeyboardInterrupt, MemoryError):
        raise
    except OSError as error:
        if disk_full(error):
            raise
        reason = f"{error.strerror or error}" + (f": '{error.filename}'" if error.filename else "")
    except Exception as error:  # an optional part must not lose a finished training, whatever went wrong
        reason = f"{type(error).__name__}: {error}"
    reason = " ".join(reason.split())[:300]
    print(f"warning: {part} could not be made ({reason}); the run's other files are written.", file=sys.stderr)
    failed.append((part, reason))
    return None
