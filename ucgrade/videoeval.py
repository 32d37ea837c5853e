"""Video-level evaluation: `python predict.py VIDEO_DIR --evaluate --labels videos.csv`.

videos.csv has the columns path,grade and optionally patient (paths relative to VIDEO_DIR). Each video is
graded as `predict.py video.mp4` grades it (its own results folder, under videos/ of the evaluation), and
the videos' grades are scored by the scoring step of still images (ucgrade.scoring): QWK, accuracy,
remission vs active, 95% bootstrap intervals (over patients when given), confusion matrices and the report,
so that the figures compare with the trial papers' video-level ones (Gottlieb et al. 2021: QWK 0.844).

A video's grade is the clinical convention's (the worst grade held for --min-segment seconds): a grade, not a
probability, so it is scored as one-hot probabilities, as a patient's worst grade is. The grade of the gradable
frames' mean probabilities is scored beside it. A video that is not gradable is left out and listed, never
given a guessed grade.
"""

import csv
import io
import sys
from pathlib import Path

import numpy as np

from . import files, metrics, scoring
from .cli import RunInterrupted, UserError
from .grader import load_grader
from .interrupt import GracefulStop
from .locate import find_models
from .video import VideoError, is_video_file
from .videograde import grade_video, video_settings


def read_labels(path, video_dir, class_names):
    """[(video path, grade index, patient or None)] of a path,grade[,patient] CSV; one sentence for a mistake."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels file '{path}' does not exist; give a CSV with the columns path,grade.")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"--labels file '{path}' is not a readable CSV ({error}); save it as UTF-8 CSV.") from None
    if not rows or not {"path", "grade"} <= set(rows[0]):
        raise UserError(f"--labels file '{path}' needs the header path,grade (and optionally patient).")
    labelled = []
    for number, row in enumerate(rows, start=2):
        video, grade = Path(video_dir) / (row["path"] or "").strip(), (row["grade"] or "").strip()
        if grade not in class_names:
            raise UserError(
                f"--labels file '{path}', row {number}: '{grade}' is not a grade of the model "
                f"({', '.join(class_names)})."
            )
        if not is_video_file(video):
            raise UserError(f"--labels file '{path}', row {number}: '{row['path']}' is not a video file by its name.")
        patient = (row.get("patient") or "").strip() or None
        labelled.append((video, class_names.index(grade), patient))
    patients = [p for _, _, p in labelled]
    if any(patients) and not all(patients):
        raise UserError(f"--labels file '{path}' gives a patient for some videos only; give one for every video.")
    return labelled


def evaluate_videos(args, video_dir):
    """Grade the labelled videos of VIDEO_DIR, score their grades and write the results folder; the exit code."""
    if not Path(video_dir).is_dir():
        raise UserError(f"the video folder '{video_dir}' is not a folder; give the folder that --labels names from.")
    weights = find_models(args.weights, args.out)[0]
    grader = load_grader(weights, args.device, args.precision)
    from .data import check_remission_grade

    check_remission_grade(args.remission_upto, grader.class_names)
    labelled = read_labels(args.labels, video_dir, grader.class_names)
    out_dir = results_folder(args, weights)
    settings = video_settings(args)
    settings.video_out = out_dir / "videos"
    graded, skipped = [], []
    with GracefulStop() as stop:
        for video, target, patient in labelled:
            try:
                summary = grade_video(grader, video, settings, stop, weights)
            except VideoError as error:
                skipped.append({"path": str(video), "reason": str(error)})
                print(f"error: {video}: {error}", file=sys.stderr)
                continue
            print(video_line(summary, grader.class_names[target]), file=sys.stderr)
            if summary["gradable"]:
                graded.append((video, target, patient, summary))
            else:
                skipped.append({"path": str(video), "reason": f"not gradable: {summary['reason']}"})
            if stop():
                raise RunInterrupted(f"the evaluation was stopped; the videos graded so far are in {out_dir}/videos/")
    if not graded:
        raise UserError(f"none of the {len(labelled)} labelled videos could be graded; see the lines above.")
    score_videos(args, out_dir, video_dir, grader, graded, skipped)
    return 0


def video_line(summary, truth):
    grade = summary["grade"] or f"not gradable ({summary['reason']})"
    return f"{summary['video']}: {grade} (labelled {truth})"


def results_folder(args, weights):
    if args.eval_out:
        files.check_folder_path(args.eval_out, "--eval-out")
        return files.new_run_dir(Path(args.eval_out).parent, Path(args.eval_out).name)
    return files.new_run_dir(Path(weights).parent, "video_test")


def score_videos(args, out_dir, video_dir, grader, graded, skipped):
    """Score the gradable videos' grades (one-hot) like a test set, with the mean-probability grade beside them."""
    class_names = grader.class_names
    targets = np.array([target for _, target, _, _ in graded])
    probs = np.eye(len(class_names))[[class_names.index(s["grade"]) for *_, s in graded]]
    mean_probs = np.array([[s["mean_probabilities"][name] for name in class_names] for *_, s in graded])
    patients = [patient for _, _, patient, _ in graded]
    mean_rule = metrics.compute_metrics(targets, mean_probs, class_names, args.remission_upto)
    fields = {
        "status": "finished",
        "evaluated": "videos",
        "test_dir": str(Path(video_dir).resolve()),
        "weights": [str(Path(grader.path).resolve())],
        "ensemble": False,
        "missing_grades": [n for k, n in enumerate(class_names) if k not in set(targets.tolist())],
        "skipped_files": len(skipped),
        "video_rule": "the worst grade held for --min-segment seconds of gradable frames (scored as one-hot)",
        "mean_probability_rule": {key: mean_rule[key] for key in (*metrics.SCALARS, "remission") if key in mean_rule},
        "video_settings": video_settings(args).as_dict(),
    }
    rows = [
        {"path": rel(v, video_dir), "true": class_names[t], "grade": s["grade"], **segment_columns(s)}
        for v, t, _, s in graded
    ]

    def write_more(result):
        files.write_csv(out_dir / "skipped.csv", skipped, ["path", "reason"])
        files.write_csv(out_dir / "videos.csv", rows, list(rows[0]))

    qwk = mean_rule.get("qwk")
    scoring.score(
        scoring.Scoring(
            out_dir=out_dir, class_names=class_names, relpaths=[rel(v, video_dir) for v, *_ in graded],
            targets=targets, probs=probs, data_root=Path(video_dir), img_size=grader.img_size, page="videos",
            remission_upto=args.remission_upto, patient_grade="max", groups=patients if patients[0] else None,
            fields=fields, write_more=write_more,
            notes=[f"the mean-probability grade instead: QWK {metrics.fmt(qwk)}, accuracy "
                   f"{metrics.fmt(mean_rule['accuracy'])}",
                   f"\nvideo results in {out_dir}  (open {out_dir / 'report.html'} in a browser)"],
        )
    )  # fmt: skip


def rel(path, root):
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def segment_columns(summary):
    worst = summary["worst_segment"]
    return {
        "worst_start": worst["start"],
        "worst_end": worst["end"],
        "mean_probability_grade": summary["mean_probability_grade"],
        "gradable_share": summary["gradable_share"],
        "report": f"videos/{Path(summary['out']).name}/report.html",
    }
