"""Grade a labelled external test set: `python predict.py TEST_DIR --evaluate`.

TEST_DIR is an ImageFolder whose sub-folders are grades of the model. The folder of results (test,
test2, ... inside the run's folder, or --eval-out) gets what a validation split gets, made by the
same code: metrics.json with 95% intervals, predictions.csv, both confusion matrices, roc.png,
errors.png, report.html and, with --groups, the patient-level section and patients.csv.

A cross-validation run folder grades with each fold's model, and the mean of their probabilities
(an ensemble) is what the report scores; each model's own figures are in metrics.json and the report.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files, interrupt, metrics, scoring
from .cli import UserError
from .grader import grade_files, load_grader
from .images import _is_utf8, files_under, is_image_file
from .locate import find_models


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
        found, left_out = 0, []
        for path in files_under(root / name, inside=root, left_out=left_out) if name in folders else []:
            reason = file_problem(path)
            if reason:
                test_set.skipped.append((printable(path), reason))
                continue
            test_set.paths.append(path)
            test_set.labels.append(label)
            found += 1
        for link, target in left_out:  # a link to / would walk the whole machine, /proc included
            test_set.skipped.append((printable(link), f"a linked folder that leads out of the test folder (to "
                                     f"{printable(target)}), so it was not followed"))  # fmt: skip
        if not found:
            test_set.missing.append(name)
    if not test_set.paths:
        raise UserError(
            f"the test folder '{root}' has no images in sub-folders named after the model's grades "
            f"({', '.join(class_names)}); put the images in '{root}/<grade>/<image>'."
        )
    return test_set


def file_problem(path):
    """Why a file of the test folder is not graded, as training says it of its data ('' for an image file)."""
    if not _is_utf8(path):  # CSV, JSON and HTML are UTF-8: such a name would fail them after grading
        return "the file name is not valid UTF-8; rename the file"
    if not is_image_file(path):
        return "not an image file (by its extension)"
    return ""


def printable(path):
    """A path as UTF-8 text: undecodable bytes of its name become U+FFFD."""
    return Path(os.fsencode(path).decode("utf-8", "replace"))


def grade_test_set(graders, test_set):
    """Each model's probabilities (one N x C array per grader) of the readable images, and the (scores, flagged)
    of the first model with an out-of-distribution check (or None); unreadable images move to skipped. The
    images are decoded once, in batches, for every model."""
    each, scores, paths, labels, offset = [[] for _ in graders], [], [], [], 0
    scorer = next((g for g in graders if g.has_ood), None)
    for batch in grade_files(graders, test_set.paths):
        test_set.skipped += batch.unreadable
        for probs, grades in zip(each, batch.grades):
            probs.append(grades.probs)
        if scorer is not None:
            scores.append(batch.grades[graders.index(scorer)].ood_scores)
        paths += [batch.paths[i] for i in batch.kept]
        labels += [test_set.labels[offset + i] for i in batch.kept]
        offset += len(batch.paths)
    test_set.paths, test_set.labels = paths, labels
    each = [np.concatenate(probs) for probs in each]
    if scorer is None:
        return each, None
    scores = np.concatenate(scores)
    return each, (scores, scorer.flagged(scores))


# ----------------------------------------------------------------------------- leakage


def training_files(graders):
    """(paths of the images the models trained on, or None when the run's split.csv or data are not at hand)."""
    paths = set()
    for grader in graders:
        run_dir = grader.path.parent
        split_csv, config_json = run_dir / "split.csv", run_dir / "config.json"
        if not split_csv.is_file() or not config_json.is_file():
            return None
        data_root = Path(files.read_json(config_json)["data"])
        if not data_root.is_dir():
            return None
        paths |= {data_root / row["path"] for row in files.read_csv(split_csv) if row.get("subset") == "train"}
    return paths


def leaked_images(test_set, graders):
    """(test images whose bytes are those of a training image, True) or ([], False) when it cannot be checked."""
    train = training_files(graders)
    if train is None:
        print(
            "note: not checked for test images the model trained on (leakage): the run's split.csv or its data "
            "folder is not at hand beside the model.",
            file=sys.stderr,
        )
        return [], False
    hashes = {files.sha256_of(p) for p in train if p.is_file()}
    leaked = [test_set.relpath(i) for i, p in enumerate(test_set.paths) if files.sha256_of(p) in hashes]
    if leaked:
        print(
            f"warning: {len(leaked)} test image(s) have the same bytes as images the model trained on (leakage), "
            f"such as {leaked[0]}; remove them for an honest estimate.",
            file=sys.stderr,
        )
    return leaked, True


# ----------------------------------------------------------------------------- the evaluation


def results_folder(args, graders, test_root):
    """The results folder, made before grading (so that a mistake costs no grading time): --eval-out, or test,
    test2, ... in the run's folder; a number is added to a name that exists. Never at the root of the filesystem,
    and never inside the test folder, whose next evaluation would grade the plots as test images."""
    if args.eval_out:
        wanted = Path(args.eval_out)
        files.check_folder_path(wanted, "--eval-out")
        if wanted.name in ("", ".", "..") or wanted.resolve().parent == wanted.resolve():
            raise UserError(
                f"--eval-out '{wanted}' names no new folder; give the results folder to create, such as "
                "--eval-out results/test."
            )
        parent, name = wanted.resolve().parent, wanted.name
    else:
        parent, name = graders[0].path.parent.parent if len(graders) > 1 else graders[0].path.parent, "test"
    root, where = Path(test_root).resolve(), (parent / name).resolve()
    if where == root or root in where.parents:
        raise UserError(
            f"the results folder '{parent / name}' would be inside the test folder '{test_root}', whose next "
            "evaluation would grade its plots as test images; give --eval-out a folder outside it."
        )
    return files.new_run_dir(parent, name)


def evaluate_test_set(args, test_dir):
    """Grade TEST_DIR with the model(s), write the results folder and print where it is; the exit code."""
    models = find_models(args.weights, args.out, "all")
    graders = [load_grader(path, args.device, args.precision, args.threads) for path in models]
    first = graders[0]
    if any(g.class_names != first.class_names or g.img_size != first.img_size for g in graders):
        raise UserError("the fold models of this run differ in their grades or input size; evaluate one at a time.")
    config = run_config(first)
    from_run = {"analysis_settings": inherit_analysis_settings(args, first, config)}
    from_run["pretrained_used"] = config.get("pretrained_used")  # a model from random weights is warned of
    metrics.check_remission_grade(args.remission_upto, first.class_names)
    test_set = scan_test_folder(test_dir, first.class_names)
    out_dir = results_folder(args, graders, test_set.root)
    print(f"results folder: {out_dir} (filled once the test set is graded and scored)", flush=True)
    # written into a hidden folder and moved into place at the end: Ctrl-C, SIGTERM or a full disk leave nothing
    with interrupt.stop_at_once(), files.written_whole(out_dir) as partial:
        each, scores = grade_test_set(graders, test_set)
        for path, reason in test_set.skipped:
            print(f"warning: skipped {path}: {reason}", file=sys.stderr)
        if not test_set.paths:
            raise UserError(f"no image in the test folder '{test_dir}' could be read; see the warnings above.")
        groups = read_test_groups(args.groups, test_set) if args.groups else None
        if test_set.missing:
            print(
                f"note: the test set has no images of {', '.join(test_set.missing)}; those grades are scored as "
                "absent.",
                file=sys.stderr,
            )
        leaked, checked = leaked_images(test_set, graders)
        from_run["images_in_training"] = len(leaked) if checked else None
        score_test_set(args, test_set, graders, each, scores, groups, partial, from_run)
    print(f"\ntest results in {out_dir}  (open {out_dir / 'report.html'} in a browser)")
    return 0


ANALYSIS_DEFAULTS = {"remission_upto": None, "patient_grade": "max"}


def run_config(grader):
    """The config.json of the run beside the model file, or {} where there is none (a model copied elsewhere)."""
    path = grader.path.parent / "config.json"
    try:
        return files.read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def inherit_analysis_settings(args, grader, config):
    """--remission-upto and --patient-grade from the command line, else as the model's run was trained with (its
    config), else the defaults; the grade order is always the model's. Sets them on args, prints where each came
    from and returns {setting: {"value", "from"}}."""
    where = {}
    for key, default in ANALYSIS_DEFAULTS.items():
        if getattr(args, key) is not None:
            where[key] = "the command line"
        elif config.get(key) is not None:
            setattr(args, key, config[key])
            where[key] = "the run's config.json"
        else:
            setattr(args, key, default)
            where[key] = "the default"
    order = "the run's --class-order" if config.get("class_order") else "the model"
    settings = {key: {"value": getattr(args, key), "from": source} for key, source in where.items()}
    settings["class_order"] = {"value": grader.class_names, "from": order}
    flags = [f"--{key.replace('_', '-')} {getattr(args, key) or 'none'} (from {where[key]})" for key in where]
    print(f"analysis settings: {'; '.join(flags)}; grade order {', '.join(grader.class_names)} (from {order})")
    return settings


def score_test_set(args, test_set, graders, each, scores, groups, out_dir, known):
    """Score the mean of the models' probabilities (each: one N x C per model) and the out-of-distribution scores
    (None without the check), write the results into out_dir and print their summary. known: the fields of
    metrics.json that the caller found (the run's analysis settings, its weights, the test images it trained on)."""
    class_names, targets, probs = test_set.class_names, np.asarray(test_set.labels), np.mean(each, axis=0)
    fields = {
        "status": "finished",
        "evaluated": "test set",
        "test_dir": str(test_set.root.resolve()),
        "weights": [str(g.path.resolve()) for g in graders],
        "ensemble": len(graders) > 1,
        "missing_grades": test_set.missing,
        "skipped_files": len(test_set.skipped),
        "precision": graders[0].precision,
        "runtime": graders[0].runtime,
        **known,
    }
    if scores is None:
        reason = (
            "needs an .onnx exported by a newer export.py"
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
        )
    )  # fmt: skip


def scalars(result):
    keep = [*metrics.SCALARS, "remission"]
    return {key: result[key] for key in keep if key in result}


def read_test_groups(path, test_set):
    """One group (patient) per test image, from a path,group CSV with paths relative to TEST_DIR."""
    from .groups import read_groups

    return read_groups(path, test_set)  # a TestSet has what read_groups reads of an ImageSet: paths and relpath


def flagged_summary(scores):
    flagged = int(scores[1].sum())
    return {"flagged": flagged, "images": len(scores[1]), "rate": flagged / max(len(scores[1]), 1)}
