"""Grade a labelled external test set: `python predict.py TEST_DIR --evaluate`.

TEST_DIR is an ImageFolder whose sub-folders are grades of the model. The folder of results (test,
test2, ... inside the run's folder, or --eval-out) gets what a validation split gets, made by the
same code: metrics.json with 95% intervals, predictions.csv, both confusion matrices, roc.png,
errors.png, report.html and, with --groups, the patient-level section and patients.csv.

A cross-validation run folder grades with each fold's model, and the mean of their probabilities
(an ensemble) is what the report scores; each model's own figures are in metrics.json and the report.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files, metrics, scoring
from .cli import UserError
from .images import UnreadableImage, files_under, is_image_file, load_image, preprocess

BATCH = 16


@dataclass
class Grader:
    """One model file: its grades, its input size, and probs(uint8 batch N x 3 x S x S) -> N x C."""

    path: Path
    class_names: list
    img_size: int
    resize_size: int
    probs: object
    ood: object = None  # ood.OodScorer of a .pt calibrated at training, else None
    run_dir: Path = None


@dataclass
class TestSet:
    root: Path
    class_names: list  # the model's grades
    paths: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (path, reason)
    missing: list = field(default_factory=list)  # grades of the model with no images here

    def relpath(self, i):
        return self.paths[i].relative_to(self.root).as_posix()


# ----------------------------------------------------------------------------- which models


def model_files(args):
    """The model files to grade with: --weights (a file, a run folder, or a cross-validation run folder,
    whose folds' best.pt are all used), or the newest run under --out."""
    if args.weights:
        weights = Path(args.weights)
        if not weights.exists():
            raise UserError(f"--weights '{weights}' does not exist; give a best.pt, an .onnx or a run folder.")
    else:
        weights = newest_run(args.out)
        print(f"using {weights} (the newest run under {args.out}/)", file=sys.stderr)
    if weights.is_file():
        return [weights]
    if (weights / "best.pt").is_file():
        return [weights / "best.pt"]
    folds = sorted(weights.glob("fold*/best.pt"), key=lambda p: int(p.parent.name.removeprefix("fold") or 0))
    if folds:
        return folds
    raise UserError(
        f"--weights '{weights}' is a folder without a best.pt (or fold folders with one); give a run folder written "
        "by qq.py, its best.pt, or an .onnx written by export.py."
    )


def newest_run(out_dir):
    candidates = sorted(
        [*Path(out_dir).glob("*/best.pt"), *Path(out_dir).glob("*/fold*/best.pt")], key=lambda p: p.stat().st_mtime
    )
    if not candidates:
        raise UserError(
            f"no trained model found under '{out_dir}/'; train one first with 'python qq.py', or pass --weights "
            "with a run folder."
        )
    newest = candidates[-1]
    return newest.parent if newest.parent.parent == Path(out_dir) else newest.parent.parent


def load_grader(path, args):
    """The Grader of a .pt (on --device) or of an .onnx (ONNX Runtime on the CPU)."""
    if path.suffix.lower() == ".onnx":
        from .onnx_grade import load_onnx_model, probabilities

        model = load_onnx_model(path)
        return Grader(path, model.class_names, model.img_size, model.resize_size, lambda b: probabilities(model, b))
    import torch

    from . import ood
    from .device import autocast, choose_device, choose_precision
    from .engine import to_input
    from .model import load_checkpoint, model_from_checkpoint

    device = choose_device(args.device)
    precision = choose_precision(device, args.precision)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path).to(device).eval()
    mean, std = checkpoint["mean"], checkpoint["std"]

    @torch.inference_mode()
    def probs(batch):
        with autocast(device, precision):
            logits = model(to_input(torch.from_numpy(batch), device, mean, std))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    scorer = ood.scorer(model, checkpoint, device, precision)
    return Grader(path, checkpoint["class_names"], checkpoint["img_size"], checkpoint["resize_size"], probs, scorer)


# ----------------------------------------------------------------------------- the test images


def scan_test_folder(root, class_names):
    """The images of TEST_DIR/<grade>/..., labelled with the model's grade indices. Grades of the model
    may be missing (noted); a folder that is not one of its grades is an error that names it."""
    root = Path(root)
    if not root.is_dir():
        problem = "is a file" if root.exists() else "does not exist"
        raise UserError(f"test folder '{root}' {problem}; give a folder with one sub-folder per grade of the model.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in class_names]
    if unknown:
        raise UserError(
            f"the test folder '{root}' has the sub-folder(s) {', '.join(repr(n) for n in unknown)}, which are not "
            f"grades of the model ({', '.join(class_names)}); rename or remove them."
        )
    test_set = TestSet(root, list(class_names))
    for label, name in enumerate(class_names):
        found = 0
        for path in files_under(root / name) if name in folders else []:
            if is_image_file(path):
                test_set.paths.append(path)
                test_set.labels.append(label)
                found += 1
            else:
                test_set.skipped.append((path, "not an image file (by its extension)"))
        if not found:
            test_set.missing.append(name)
    if not test_set.paths:
        raise UserError(
            f"the test folder '{root}' has no images in sub-folders named after the model's grades "
            f"({', '.join(class_names)}); put the images in '{root}/<grade>/<image>'."
        )
    return test_set


def decode(test_set, img_size, resize_size):
    """The preprocessed uint8 crops (N x 3 x S x S) of the readable images; unreadable ones move to skipped."""
    crops, paths, labels = [], [], []
    for path, label in zip(test_set.paths, test_set.labels):
        try:
            crops.append(preprocess(load_image(path), img_size, resize_size))
        except UnreadableImage as error:
            test_set.skipped.append((path, str(error)))
            continue
        paths.append(path)
        labels.append(label)
    test_set.paths, test_set.labels = paths, labels
    return np.stack(crops) if crops else np.zeros((0, 3, img_size, img_size), np.uint8)


def in_batches(function, crops):
    return np.concatenate([function(crops[i : i + BATCH]) for i in range(0, len(crops), BATCH)])


# ----------------------------------------------------------------------------- leakage


def training_files(graders):
    """(paths of the images the models trained on, or None when the run's split.csv or data are not at hand)."""
    paths = set()
    for grader in graders:
        run_dir = grader.run_dir
        split_csv, config_json = run_dir / "split.csv", run_dir / "config.json"
        if not split_csv.is_file() or not config_json.is_file():
            return None
        data_root = Path(json.loads(config_json.read_text())["data"])
        if not data_root.is_dir():
            return None
        paths |= {data_root / row["path"] for row in files.read_csv(split_csv) if row.get("subset") == "train"}
    return paths


def leaked_images(test_set, graders):
    """(test images whose bytes are those of a training image, True) or ([], False) when it cannot be checked."""
    train = training_files(graders)
    if train is None:
        return [], False
    hashes = {files.sha256_of(p) for p in train if p.is_file()}
    return [test_set.relpath(i) for i, p in enumerate(test_set.paths) if files.sha256_of(p) in hashes], True


# ----------------------------------------------------------------------------- the evaluation


def results_folder(args, graders):
    if args.eval_out:
        files.check_folder_path(args.eval_out, "--eval-out")
        return files.new_run_dir(Path(args.eval_out).parent, Path(args.eval_out).name)
    run_dir = graders[0].run_dir.parent if len(graders) > 1 else graders[0].run_dir
    return files.new_run_dir(run_dir, "test")


def evaluate_test_set(args, test_dir):
    """Grade TEST_DIR with the model(s), write the results folder and print where it is; the exit code."""
    graders = [load_grader(path, args) for path in model_files(args)]
    for grader in graders:
        grader.run_dir = grader.path.parent
    first = graders[0]
    if any(g.class_names != first.class_names or g.img_size != first.img_size for g in graders):
        raise UserError("the fold models of this run differ in their grades or input size; evaluate one at a time.")
    class_names = first.class_names
    from .data import check_remission_grade

    check_remission_grade(args.remission_upto, class_names)
    test_set = scan_test_folder(test_dir, class_names)
    crops = decode(test_set, first.img_size, first.resize_size)
    for path, reason in test_set.skipped:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    if not len(crops):
        raise UserError(f"no image in the test folder '{test_dir}' could be read; see the warnings above.")
    groups = read_test_groups(args.groups, test_set) if args.groups else None
    if test_set.missing:
        print(
            f"note: the test set has no images of {', '.join(test_set.missing)}; those grades are scored as absent.",
            file=sys.stderr,
        )
    leaked, checked = leaked_images(test_set, graders)
    if leaked:
        print(
            f"warning: {len(leaked)} test image(s) have the same bytes as images the model trained on (leakage), "
            f"such as {leaked[0]}; remove them for an honest estimate.",
            file=sys.stderr,
        )
    each = [in_batches(g.probs, crops) for g in graders]
    scores = ood_scores(graders, crops)
    return score_test_set(args, test_set, graders, each, scores, groups, leaked if checked else None)


def score_test_set(args, test_set, graders, each, scores, groups, leaked):
    """Score the mean of the models' probabilities (each: one N x C per model) and the out-of-distribution scores
    (None without the check), write the results folder and print its summary; the exit code."""
    class_names, targets, probs = test_set.class_names, np.asarray(test_set.labels), np.mean(each, axis=0)
    out_dir = results_folder(args, graders)
    fields = {
        "status": "finished",
        "evaluated": "test set",
        "test_dir": str(test_set.root.resolve()),
        "weights": [str(g.path.resolve()) for g in graders],
        "ensemble": len(graders) > 1,
        "missing_grades": test_set.missing,
        "skipped_files": len(test_set.skipped),
        "images_in_training": None if leaked is None else len(leaked),
    }
    if scores is None:
        reason = (
            "needs the .pt the model was exported from"
            if graders[0].path.suffix.lower() == ".onnx"
            else "needs a best.pt written by a newer qq.py"
        )
        print(f"note: the check for images unlike the training images {reason}; it was left out.", file=sys.stderr)
    if len(graders) > 1:
        fields["per_model"] = [
            {"weights": str(g.path.resolve())}
            | scalars(metrics.compute_metrics(targets, p, class_names, args.remission_upto))
            for g, p in zip(graders, each)
        ]
    columns = {"group": groups}
    if scores is not None:
        columns |= {"ood_score": [f"{s:.3f}" for s in scores[0]], "out_of_distribution": [int(f) for f in scores[1]]}
    skipped = [{"path": str(p), "reason": r} for p, r in test_set.skipped]
    scoring.score(
        scoring.Scoring(
            out_dir=out_dir, class_names=class_names, relpaths=[test_set.relpath(i) for i in range(len(targets))],
            targets=targets, probs=probs, data_root=test_set.root, img_size=graders[0].img_size, page="test",
            remission_upto=args.remission_upto, patient_grade=args.patient_grade, groups=groups,
            ood=None if scores is None else flagged_summary(scores), columns=columns, fields=fields,
            write_more=lambda result: files.write_csv(out_dir / "skipped.csv", skipped, ["path", "reason"]),
            notes=[f"\ntest results in {out_dir}  (open {out_dir / 'report.html'} in a browser)"],
        )
    )  # fmt: skip
    return 0


def scalars(result):
    keep = [*metrics.SCALARS, "remission"]
    return {key: result[key] for key in keep if key in result}


def read_test_groups(path, test_set):
    """One group (patient) per test image, from a path,group CSV with paths relative to TEST_DIR."""
    from .data import ImageSet, read_groups

    return read_groups(path, ImageSet(test_set.root, test_set.class_names, test_set.paths, test_set.labels))


def ood_scores(graders, crops):
    """(scores, flagged) of the first model that has an out-of-distribution calibration, or None."""
    scorer = next((g.ood for g in graders if g.ood is not None), None)
    if scorer is None:
        return None
    scores = in_batches(scorer.scores, crops)
    return scores, scores > scorer.threshold


def flagged_summary(scores):
    flagged = int(scores[1].sum())
    return {"flagged": flagged, "images": len(scores[1]), "rate": flagged / max(len(scores[1]), 1)}
