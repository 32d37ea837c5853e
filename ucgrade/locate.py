"""Which model file grades: the one answer of predict.py, predict.py --evaluate and export.py.

A model is given as a .pt (best.pt or last.pt), an .onnx written by export.py, a run folder (its best.pt),
a cross-validation run folder (its folds' best.pt), or not at all: then the newest run under --out.
Without torch, so that a grading-only install finds its .onnx the same way.
"""

import sys
from pathlib import Path

from . import files
from .cli import UserError


def fold_models(run_dir):
    """The folds' best.pt of a cross-validation run folder, in fold order ([] for any other folder)."""
    folds = Path(run_dir).glob("fold*/best.pt")
    return sorted((p for p in folds if p.parent.name[4:].isdigit()), key=lambda p: int(p.parent.name[4:]))


def newest_model(out_dir):
    """best.pt of the run under out_dir whose best model was written last (a fold's, for a cross-validation run)."""
    out_dir = Path(out_dir)
    candidates = sorted([*out_dir.glob("*/best.pt"), *out_dir.glob("*/fold*/best.pt")], key=lambda p: p.stat().st_mtime)
    if not candidates and (out_dir / "best.pt").is_file():
        raise UserError(
            f"'{out_dir}' is a run folder itself (--out is the folder that holds the runs); pass --weights "
            f"{out_dir / 'best.pt'}."
        )
    if not candidates:
        raise UserError(
            f"no trained model found under '{out_dir.resolve()}/'; train one first with 'python qq.py' (from "
            "the project folder), pass --out with the folder that holds the runs, or pass --weights path/to/best.pt."
        )
    return candidates[-1]


def is_fold_model(path, out_dir):
    """True for outputs/RUN/foldK/best.pt: a fold of a cross-validation run."""
    return Path(path).parent.parent != Path(out_dir)


def run_summary(run_dir):
    """', validation accuracy 0.91 after 25 of 25 epochs' from a run's metrics.json, so that a throwaway run used
    by default is noticed; '' when the file says nothing."""
    try:
        metrics = files.read_json(Path(run_dir) / "metrics.json")
        accuracy, done, epochs = metrics.get("accuracy"), metrics.get("epochs_completed"), metrics.get("epochs")
    except (OSError, ValueError, AttributeError):
        return ""
    parts = [f"validation accuracy {accuracy:.2f}" if isinstance(accuracy, (int, float)) else ""]
    parts.append(f"after {done} of {epochs} epochs" if done is not None and epochs is not None else "")
    status = metrics.get("status")
    parts.append(f"({status})" if status and status != "finished" else "")
    text = " ".join(part for part in parts if part)
    return f", {text}" if text else ""


def find_models(weights=None, out="outputs", folds="refuse"):
    """The model file(s) to grade with, in fold order.

    weights: a .pt, an .onnx, a run folder or a cross-validation run folder; None: the newest run under out.
    folds: what a cross-validation run gives: "all" its folds' models (an ensemble), or "refuse" (one model is
    wanted, and the message says how to choose one).
    """
    if weights is None:
        newest = newest_model(out)
        chosen = newest.parent.parent if is_fold_model(newest, out) else newest
        if folds == "refuse" and chosen != newest:
            raise UserError(
                f"the newest run '{chosen}' is a cross-validation run, whose folds each hold a model; choose one "
                f"with --weights, for example --weights {chosen / 'fold1' / 'best.pt'}."
            )
        summary = run_summary(newest.parent) if chosen == newest else ""
        print(f"using {chosen} (the newest run under {out}/{summary})", file=sys.stderr)
        return models_in(chosen, folds)
    path = Path(weights)
    if not path.exists():
        raise UserError(f"--weights '{path}' does not exist; give a best.pt, an .onnx or a run folder.")
    return models_in(path, folds)


def models_in(path, folds="refuse", flag="--weights"):
    """The model file(s) that path stands for: itself (a file), a run folder's best.pt, or its folds' best.pt.

    folds: "all" (every fold's), "refuse", or an int K (export.py --fold K); flag: the option that gave path,
    for the messages (None: a positional argument, as export.py's RUN_OR_CHECKPOINT).
    """
    path = Path(path)
    fold = folds if isinstance(folds, int) and not isinstance(folds, bool) else None
    named = f"{flag} '{path}'" if flag else f"'{path}'"
    if not path.is_dir() and fold is not None:
        raise UserError(f"--fold chooses a fold of a cross-validation run folder, but '{path}' is a file.")
    if not path.is_dir():  # a file, or something else that the loader then names (/dev/null, a pipe)
        return [path]
    fold_files = fold_models(path)
    if (path / "best.pt").is_file() and fold is not None:
        raise UserError(f"--fold is for cross-validation runs, and '{path}' is not one; leave --fold out.")
    if (path / "best.pt").is_file():
        return [path / "best.pt"]
    if fold_files and folds == "all":
        return fold_files
    if fold_files and fold is not None:
        if not (path / f"fold{fold}" / "best.pt").is_file():
            raise UserError(f"'{path}' has no fold {fold} with a best.pt; choose --fold 1 to {len(fold_files)}.")
        return [path / f"fold{fold}" / "best.pt"]
    if fold_files and not flag:
        raise UserError(
            f"'{path}' is a cross-validation run with a model per fold; choose one with --fold K "
            f"(1 to {len(fold_files)}), or give a fold's best.pt."
        )
    if fold_files:
        raise UserError(
            f"{named} is a folder without a best.pt; give a best.pt or last.pt written by qq.py (a "
            f"cross-validation run keeps one per fold, such as {path / 'fold1' / 'best.pt'})."
        )
    if not flag:
        raise UserError(f"'{path}' holds no best.pt; give a run folder written by qq.py, or a checkpoint file.")
    raise UserError(
        f"{named} is a folder without a best.pt; give a best.pt or last.pt written by qq.py, a run folder, or an "
        ".onnx written by export.py."
    )
