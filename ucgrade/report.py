"""Redraw the plots of finished runs: `python -m ucgrade.report RUN [RUN ...]`.

Plots are drawn from the saved CSV and JSON files (figures.py draws them, records.py reads the files), so
that they can be drawn again later, for example after a change to how they are laid out.
"""

import csv
import sys
from pathlib import Path

from . import figures, files, records
from .cli import UserError, run_cli


def read_saved(path, read, *args):
    """read(path, *args) for a file of a run folder; a damaged file (invalid JSON, a truncated CSV, a missing
    column) is one sentence that names it."""
    try:
        return read(path, *args)
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, csv.Error) as error:
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise UserError(
            f"'{path}' is damaged ({' '.join(what.split())[:120]}), so the plots cannot be drawn from it; restore "
            "it from a backup, or resume or repeat the run to write it again."
        ) from None


def _read_metrics(path):
    metrics = files.read_json(path)
    return metrics, list(metrics["class_names"]), metrics["confusion_matrix"]


def redraw(run_dir):
    """Draw curves.png, the confusion matrices and roc.png again from a run folder's files."""
    run_dir = Path(run_dir)
    metrics, class_names, matrix = read_saved(run_dir / "metrics.json", _read_metrics)
    if (run_dir / "history.csv").exists():  # a cross-validation folder has none; its folds do
        figures.plot_curves(read_saved(run_dir / "history.csv", records.read_history), run_dir / "curves.png")
    figures.plot_confusions(matrix, class_names, run_dir, pooled="folds" in metrics)
    _, targets, probs = read_saved(run_dir / "predictions.csv", records.read_predictions, class_names)
    figures.plot_roc(
        targets,
        probs,
        class_names,
        run_dir / "roc.png",
        (metrics.get("remission") or {}).get("remission_classes", [None])[-1],
    )


def main(runs):
    """python -m ucgrade.report RUN [RUN ...]: redraw the plots of finished runs."""
    if not runs or runs[0] in ("-h", "--help"):
        print(
            "usage: python -m ucgrade.report RUN [RUN ...]   "
            "(from the project folder) redraws the plots of finished runs"
        )
        return 0 if runs else 2
    for run in runs:
        path = Path(run) / "metrics.json"
        if not Path(run).is_dir():
            raise UserError(f"'{run}' does not exist or is not a folder; give a run folder under outputs/.")
        if not (Path(run) / "config.json").is_file():
            raise UserError(
                f"'{run}' is not a run folder written by qq.py (it has no config.json); give a folder under outputs/."
            )
        if not path.is_file() or "confusion_matrix" not in read_saved(path, files.read_json):
            raise UserError(
                f"'{run}' has no evaluated model yet (it was interrupted before one); "
                f"resume it with: python qq.py --resume {run}"
            )
        redraw(run)
        print(f"redrew the plots of {run}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
