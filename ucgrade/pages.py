"""Report pages: a single run, a cross-validation run and a test set, each one page of the same sections.

A page is read from the files of its folder (metrics.json, config.json, predictions.csv, the plots), so that
it can be written again later. Kinds of page differ only in their words and in where their data is found;
the summary card and the sections come from sections.SUMMARY and sections.SECTIONS.
"""

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from . import files, htmlparts, records, sections


@dataclass
class Page:
    """The data of one page; a section shows what exists here and leaves out what does not."""

    folder: Path
    kind: "Kind"
    metrics: dict  # the folder's metrics.json
    config: dict = None  # the run's config.json; None for a test set
    cams: list = field(default_factory=list)  # (caption, PNG path) of the Grad-CAM overlays
    failed: list = field(default_factory=list)  # (part, reason) of the optional parts that could not be made
    split: list = field(default_factory=list)  # rows with class, subset (and group) for the dataset section
    curves: list = field(default_factory=list)  # (heading, curves.png, history)
    fold_dirs: list = field(default_factory=list)
    fold_metrics: list = field(default_factory=list)
    fold_table: list = field(default_factory=list)  # the rows of cv_summary.csv


@dataclass(frozen=True)
class Kind:
    """What one kind of page calls things, and how it finds its data."""

    title: str  # with {name}, the folder's name
    images: str  # what the scored images are: validation images, test images
    load: object  # load(page): fills in the page's data from its folder
    headings: dict = field(default_factory=dict)  # section key -> this page's heading, where it differs
    model: str = ""  # the caveats: whose epoch was chosen, how, and what else to do
    selection: str = ""
    remedy: str = ""
    dataset_note: str = ""  # a sentence above the dataset table
    pictures: bool = True  # what is scored are pictures: a grid of the wrong ones, a check for training images


def failures(metrics):
    return [(f["part"], f["reason"]) for f in metrics.get("failed", [])]


def load_run(page):
    folder = page.folder
    page.config = files.read_json(folder / "config.json")
    page.split = files.read_csv(folder / "split.csv") if (folder / "split.csv").exists() else []
    if (folder / "history.csv").exists():
        page.curves = [("", folder / "curves.png", records.read_history(folder / "history.csv"))]
    if page.cams is None:
        page.cams = records.read_cams(folder)


def load_cross_validation(page):
    folder = page.folder
    page.config = files.read_json(folder / "config.json")
    page.fold_dirs = [folder / f"fold{k}" for k in range(1, page.config["folds"] + 1)]
    page.fold_metrics = [files.read_json(d / "metrics.json") for d in page.fold_dirs]
    page.fold_table = files.read_csv(folder / "cv_summary.csv")
    for fold, metrics in zip(page.fold_dirs, page.fold_metrics):  # after the pooled part's own
        page.failed += [(f"{fold.name}: {part}", reason) for part, reason in failures(metrics)]
    page.split = [
        {"class": r["true"], "subset": f"fold{r['fold']}"} | ({"group": r["group"]} if "group" in r else {})
        for r in files.read_csv(folder / "predictions.csv")
    ]
    page.curves = [
        (d.name, d / "curves.png", records.read_history(d / "history.csv"))
        for d in page.fold_dirs
        if (d / "curves.png").exists() and (d / "history.csv").exists()
    ]
    # a few Grad-CAM overlays, taken from the folds in turn
    per_fold = [[(f"{d.name}: {caption}", path) for caption, path in records.read_cams(d)] for d in page.fold_dirs]
    cams = [c for group in itertools.zip_longest(*per_fold) for c in group if c is not None]
    page.cams = cams[: max(map(len, per_fold), default=0)]


def load_test_set(page):
    predictions = files.read_csv(page.folder / "predictions.csv")
    page.split = [{"class": r["true"], "subset": f"test {page.kind.images}"} for r in predictions]
    page.cams = []


KINDS = {
    "run": Kind(
        title="UC severity grading run: {name}",
        images="validation images",
        load=load_run,
        headings={
            "confusion": "Confusion matrices (best.pt, validation set)",
            "metrics": "Metrics (best.pt, validation set)",
        },
        model="The model",
        selection="The best epoch was chosen by its accuracy on these same validation images",
        remedy="or compare runs by cross-validation (--folds)",
    ),
    "cv": Kind(
        title="UC severity grading, cross-validation: {name}",
        images="validation images",
        load=load_cross_validation,
        headings={
            "confusion": "Pooled confusion matrices",
            "metrics": "Pooled out-of-fold metrics",
            "roc": "ROC curves (pooled)",
            "errors": "Most confidently wrong images (pooled)",
            "dataset": "Dataset and folds",
        },
        model="Each fold's model",
        selection="Each fold's model is its best epoch, chosen by its accuracy on that fold's validation images",
        dataset_note="<p>Images validated in each fold (each fold's model trained on the other folds):</p>",
    ),
    "test": Kind(
        title="UC severity grading, test set: {name}",
        images="test images",
        load=load_test_set,
        headings={
            "confusion": "Confusion matrices (test set)",
            "metrics": "Metrics (test set)",
            "dataset": "Test images",
        },
    ),
    "videos": Kind(
        title="UC severity grading, videos: {name}",
        images="videos",
        load=load_test_set,
        headings={
            "confusion": "Confusion matrices (a grade per video)",
            "metrics": "Metrics (a grade per video)",
            "dataset": "Test videos",
        },
        pictures=False,
    ),
}


def write_report(folder, kind, cams=None):
    """report.html of an evaluation folder; kind: run, cv or test. cams: the Grad-CAM overlays, (caption, PNG
    path) each, of a run just evaluated (default: those listed in its cam/index.csv)."""
    folder = Path(folder)
    metrics = files.read_json(folder / "metrics.json")
    page = Page(folder, KINDS[kind], metrics, cams=cams, failed=failures(metrics))
    page.kind.load(page)
    summary = "".join(part(page) for part in sections.SUMMARY)
    shown = [(key, heading, section(page)) for key, heading, section in sections.SECTIONS]
    body = [(page.kind.headings.get(key, heading), content) for key, heading, content in shown if content is not None]
    htmlparts.write_page(folder / "report.html", page.kind.title.format(name=folder.name), summary, body)
