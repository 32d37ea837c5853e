"""Evaluate: the kept model of a split on its validation images, and every file a reader needs from it.

One split's evaluation writes metrics.json, predictions.csv, the plots, Grad-CAM overlays and
report.html; cross_validation() pools the folds' out-of-fold predictions. A run stopped before its
evaluation keeps what it has, with "status": "interrupted" and how to resume.
"""

import contextlib
from dataclasses import dataclass, field

import numpy as np

from . import data, engine, evidence, figures, files, metrics, ood, presets, records, scoring
from .cam import write_cams
from .cli import RunInterrupted, UserError
from .distributed import barrier, shard
from .interrupt import GracefulStop
from .model import load_checkpoint


@dataclass
class Evaluation:
    """The figures of one model on its validation images, and the predictions they come from."""

    result: dict  # metrics.json
    probs: np.ndarray  # N x C
    targets: np.ndarray  # N
    val: np.ndarray  # the images' indices
    failed: list = field(default_factory=list)  # (part, reason) of the optional parts that could not be made


def evaluate_split(args, image_set, split, model, history, runtime, validation=None):
    """Evaluate the split's best.pt on its validation images; write metrics, predictions, plots and the report.

    validation: the kept epoch's own validation pass (loss, probabilities, targets, features) when training ran
    it with the weights of best.pt; otherwise best.pt is evaluated here."""
    barrier(runtime)  # process 0 has written best.pt
    model.load_state_dict(load_checkpoint(split.run_dir / "best.pt")["model"])
    val_loss, probs, targets, features = validation or validation_pass(args, image_set, split, model, runtime)
    if not runtime.is_main:  # the files and the timing are made once
        return Evaluation(None, probs, targets, split.val)
    finishing(runtime, len(split.val), args.cam_examples)
    resize = presets.resize_size_for(args.img_size)
    val_set = data.ImageDataset(image_set, split.val, presets.val_transform(args.img_size), resize)
    crops = (val_set[i][0] for i in range(len(val_set)))
    failed = []
    timing = scoring.attempt(
        failed, "the inference time", engine.measure_inference_time, model, crops, runtime.device,
        runtime.precision, args.batch_size,
    )  # fmt: skip
    fields = {
        "status": "finished",
        "epochs_completed": len(history),
        "epochs": args.epochs,
        "best_epoch": engine.best_epoch(history, args.select)["epoch"],
        "val_loss": val_loss,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "pretrained_used": pretrained_used(split.run_dir),
        "inference_time": timing,
    }
    out_of_distribution = ood.calibrate(model, image_set, split, args, runtime, features)  # into best.pt
    scoring.attempt(failed, "curves.png", figures.plot_curves, history, split.run_dir / "curves.png")
    evaluation = Evaluation(None, probs, targets, split.val, failed)
    notes = [timing_line(timing)] if timing else []
    if note := timing and metrics.timing_note(timing):
        notes.append(f"note: {note}.")

    def cams():
        return write_cams(model, image_set, evaluation, split.run_dir, args.img_size, args.cam_examples)

    evaluation.result, _ = scoring.score(
        scoring_of(args, image_set, split.run_dir, evaluation, {"group": split.groups}, page="run",
                   ood=out_of_distribution, fields=fields, failed=failed, cams=cams, notes=notes)
    )  # fmt: skip
    finishing(runtime, None)
    return evaluation


def pretrained_used(run_dir):
    """Whether the run's models started from ImageNet weights, as its config.json records."""
    return files.read_json(run_dir / "config.json").get("pretrained_used")


def validation_pass(args, image_set, split, model, runtime):
    """(loss, probabilities, targets, features) of the model on the split's validation images."""
    resize = presets.resize_size_for(args.img_size)
    val_share = data.ImageDataset(image_set, shard(split.val, runtime), presets.val_transform(args.img_size), resize)
    val_loader = data.make_loader(val_share, args.batch_size, 0, runtime)
    val_loss, _, probs, targets, features = engine.evaluate(
        model, val_loader, runtime, "best model", features=True, tta=args.tta
    )
    return val_loss, probs, targets, features


def scoring_of(args, image_set, out_dir, evaluation, columns, **differs):
    """The scoring.Scoring of an evaluation of a run; differs: what its caller adds or names its own way.

    columns: {name: a value per image of the set, or None to leave it out}; "group" also makes the patient level.
    """
    columns = {name: [values[i] for i in evaluation.val] for name, values in columns.items() if values is not None}
    return scoring.Scoring(
        out_dir=out_dir,
        class_names=image_set.class_names,
        relpaths=[image_set.relpath(i) for i in evaluation.val],
        targets=evaluation.targets,
        probs=evaluation.probs,
        data_root=image_set.root,
        img_size=args.img_size,
        remission_upto=args.remission_upto,
        patient_grade=args.patient_grade,
        groups=columns.get("group"),
        columns=columns,
        **differs,
    )


def finishing(runtime, num_images, cam_examples=0):
    """After the last epoch and the evaluation nothing is left to save, so a Ctrl-C makes the run say that it
    finishes the report, and about how long that takes, instead of claiming to stop after a batch.
    num_images None: the report is done, and a Ctrl-C stops again (the next fold)."""
    if not isinstance(runtime.stop, GracefulStop):
        return
    seconds = 10 + min(num_images or 0, 50) // 5 + 2 * cam_examples  # the timing, the plots, Grad-CAM: rough
    doing = f"finishing the metrics and the report first, about {seconds} s"
    runtime.stop.finishing = None if num_images is None else doing


def failures_line(evaluations):
    """One sentence naming the optional parts that could not be made, or '' when nothing failed."""
    failed = [part for evaluation in evaluations for part, _ in evaluation.failed]
    if not failed:
        return ""
    return (
        f"the training finished and metrics.json, predictions.csv and report.html are written, but "
        f"{', '.join(dict.fromkeys(failed))} could not be made (the warnings above and the report say why)."
    )


def timing_line(timing):
    return (
        f"inference on {timing['device']} ({timing['precision']}): batch 1 mean {timing['batch1_mean_ms']:.1f} ms, "
        f"median {timing['batch1_median_ms']:.1f} ms, p95 {timing['batch1_p95_ms']:.1f} ms per image; "
        f"{timing['throughput_images_per_s']:.1f} img/s at batch {timing['throughput_batch_size']}"
    )


def read_finished(split, image_set, folds):
    """The Evaluation of a fold that finished before the run was interrupted, from its files."""
    print(f"fold {split.fold}/{folds} already finished")
    path = split.run_dir / "predictions.csv"
    rows, targets, probs = records.read_predictions(path, image_set.class_names)
    if [r["path"] for r in rows] != [image_set.relpath(i) for i in split.val]:
        raise UserError(
            f"the predictions.csv of '{split.run_dir}' are not for the images of its fold in split.csv; the run "
            "folder changed, so start a new run instead of resuming."
        )
    return Evaluation(files.read_json(split.run_dir / "metrics.json"), probs, targets, split.val)


def cross_validation(args, image_set, run_dir, groups, evaluations):
    """Pool the folds' out-of-fold predictions: every image validated once, by the model that did not train on it."""
    fold_results = [e.result for e in evaluations]
    pooled = Evaluation(
        None,
        np.concatenate([e.probs for e in evaluations]),
        np.concatenate([e.targets for e in evaluations]),
        np.concatenate([e.val for e in evaluations]),
    )
    fold_of = np.repeat(np.arange(1, len(evaluations) + 1), [len(e.val) for e in evaluations])
    fold_column = np.zeros(len(image_set.paths), dtype=int)
    fold_column[pooled.val] = fold_of
    table = []

    def write_summary(result):  # cv_summary.json and .csv: the folds' spread beside the pooled figures
        summary = metrics.summarize_folds(fold_results)
        per_fold_keys = list(metrics.SCALARS) + ["num_images", "best_epoch"]
        per_fold = [
            {key: m[key] for key in per_fold_keys + (["remission"] if "remission" in m else [])} for m in fold_results
        ]
        cv_summary = {"folds": args.folds, "grouped": groups is not None, "mean_std": summary}
        files.write_json(run_dir / "cv_summary.json", cv_summary | {"pooled_out_of_fold": result, "per_fold": per_fold})
        table.extend(metrics.fold_table(summary, fold_results, result))
        files.write_csv(run_dir / "cv_summary.csv", table, list(table[0].keys()))

    def terminal(result):
        lines = [f"\ncross-validation over {args.folds} folds (mean ± std; pooled out-of-fold):"]
        for row in table:
            mean, std, pooled_value = (row[key] or "n/a" for key in ("mean", "std", "pooled"))
            lines.append(f"  {row['metric']:<24}{mean:>7} ± {std:<7} pooled {pooled_value}")
        return "\n".join(lines)

    pooled.result, pooled.failed = scoring.score(
        scoring_of(args, image_set, run_dir, pooled, {"fold": fold_column.tolist(), "group": groups}, page="cv",
                   ood=evidence.pooled_flagged(fold_results), fields={"status": "finished", "folds": args.folds,
                   "precision": fold_results[0].get("precision"), "pretrained_used": pretrained_used(run_dir)},
                   write_more=write_summary, terminal=terminal)
    )  # fmt: skip
    return pooled


@contextlib.contextmanager
def keep_when_interrupted(args, split, runtime):
    """A stop (Ctrl-C, SIGTERM, a closed output pipe) keeps the finished epochs: the split's metrics.json
    says "interrupted" and how to resume, and the message says what was kept."""
    try:
        yield
    except (RunInterrupted, KeyboardInterrupt, BrokenPipeError):  # a second Ctrl-C stops at once
        history_csv = split.run_dir / "history.csv"
        history = records.read_history(history_csv) if history_csv.is_file() else []
        if runtime.is_main:
            write_interrupted(args, split, history)
        if history:
            done = (
                f"after epoch {len(history)} of {args.epochs}; {split.run_dir} keeps best.pt, last.pt, history.csv "
                "and curves.png of the finished epochs"
            )
        else:
            done = (
                f"before the first of {args.epochs} epochs finished, so {split.run_dir} has no checkpoint yet and "
                "resuming starts the training from the beginning"
            )
        raise RunInterrupted(
            f"training stopped {done}. Resume with: python qq.py --resume {split.resume_dir}"
        ) from None


def write_interrupted(args, split, history):
    resume = f"python qq.py --resume {split.resume_dir}"
    if history:
        figures.plot_curves(history, split.run_dir / "curves.png")
    best = engine.best_epoch(history, args.select) or {}
    status = {"status": "interrupted", "epochs_completed": len(history), "epochs": args.epochs}
    best = {"best_epoch": best.get("epoch"), "best_val_acc": best.get("val_acc")}
    files.write_json(split.run_dir / "metrics.json", status | best | {"resume": resume})
    if split.fold:
        folds = {"status": "interrupted", "folds": args.folds, "folds_finished": split.fold - 1, "resume": resume}
        files.write_json(split.resume_dir / "metrics.json", folds)
