"""Report: the files of a run folder (CSV, PNG, one self-contained HTML page).

Plots are drawn from the saved CSV and JSON files, so that they can be drawn again later with
`python -m ucgrade.report RUN_DIR`.
"""

import base64
import datetime
import html
import itertools
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on a hospital server or in CI

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, roc_auc_score, roc_curve  # noqa: E402

from . import files  # noqa: E402
from .cli import UserError, run_cli  # noqa: E402
from .metrics import LABELS, REMISSION_SCALARS, SCALARS, fmt, timing_note  # noqa: E402

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "train_images_per_s"]


# ----------------------------------------------------------------------------- CSV files


def write_history(path, history):
    files.write_csv(path, history, HISTORY_FIELDS)


def read_history(path):
    rows = files.read_csv(path)
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in rows]


def prediction_rows(relpaths, targets, probs, class_names, extra=None):
    """One row per image: path, true and predicted class, its probability, and every class probability."""
    rows = []
    for i, (path, target, p) in enumerate(zip(relpaths, targets, probs)):
        predicted = int(np.argmax(p))
        row = {
            "path": path,
            "true": class_names[int(target)],
            "predicted": class_names[predicted],
            "p_predicted": f"{p[predicted]:.6f}",
            "correct": int(predicted == int(target)),
        }
        row.update({f"p_{name}": f"{value:.6f}" for name, value in zip(class_names, p)})
        if extra:
            row.update({key: values[i] for key, values in extra.items()})
        rows.append(row)
    return rows


def write_predictions(path, rows):
    files.write_csv(path, rows, list(rows[0].keys()))


def read_predictions(path, class_names):
    """(rows, targets, probs) from a predictions.csv."""
    rows = files.read_csv(path)
    targets = np.array([class_names.index(r["true"]) for r in rows])
    probs = np.array([[float(r[f"p_{name}"]) for name in class_names] for r in rows])
    return rows, targets, probs


# ----------------------------------------------------------------------------- plots


def plot_curves(history, path):
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "loss", "Loss"), (fig.add_subplot(1, 2, 2), "acc", "Accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.lower())
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not epoch 1.2
        if key == "acc":
            ax.set_ylim(0, 1.02)
    fig.tight_layout()
    files.save_figure(path, fig)


def plot_confusion(matrix, class_names, path, normalize=False, title=None):
    """Counts, or rows normalised by true class; readable for up to about 10 classes."""
    matrix = np.asarray(matrix, dtype=float if normalize else int)
    totals = matrix.sum(1, keepdims=True)
    if normalize:
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    n = len(class_names)
    size = max(4.5, 0.75 * n + 2.5)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(matrix, display_labels=class_names)
    display.plot(
        ax=ax,
        cmap="Blues",
        colorbar=True,
        values_format=".2f" if normalize else "d",
        xticks_rotation=45 if n > 4 else "horizontal",
    )
    if normalize:
        display.im_.set_clim(0, 1)
        # a row of fractions hides how few images it may rest on
        ax.set_yticks(range(n), [f"{name} (n={int(t)})" for name, t in zip(class_names, totals[:, 0])])
    else:
        display.im_.colorbar.locator = MaxNLocator(integer=True)  # counts have no fractional ticks
        display.im_.colorbar.update_ticks()
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title or ("Confusion matrix\nnormalised by true grade" if normalize else "Confusion matrix\n(counts)"))
    fig.tight_layout()
    files.save_figure(path, fig)


def plot_confusions(matrix, class_names, run_dir, pooled=False):
    """confusion_matrix.png (counts) and confusion_matrix_normalized.png (by true grade)."""
    title = "Pooled out-of-fold confusion matrix\n" if pooled else "Confusion matrix\n"
    plot_confusion(matrix, class_names, Path(run_dir) / "confusion_matrix.png", title=title + "(counts)")
    plot_confusion(
        matrix,
        class_names,
        Path(run_dir) / "confusion_matrix_normalized.png",
        normalize=True,
        title=title + "normalised by true grade",
    )


def plot_roc(targets, probs, class_names, path, remission=None):
    """One-vs-rest ROC curve per grade, and remission vs active when that split is given."""
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()

    def curve(positives, scores, label, **style):
        # drawn with plain matplotlib: RocCurveDisplay's styling arguments change between sklearn versions
        fpr, tpr, _ = roc_curve(positives, scores)
        ax.plot(fpr, tpr, label=f"{label} (AUC = {roc_auc_score(positives, scores):.2f})", **style)

    for c, name in enumerate(class_names):
        positives = np.asarray(targets) == c
        if 0 < positives.sum() < len(positives):
            curve(positives, probs[:, c], name)
    if remission is not None:
        cut = class_names.index(remission)
        active = np.asarray(targets) > cut
        if 0 < active.sum() < len(active):
            curve(active, probs[:, cut + 1 :].sum(1), "active vs remission", linestyle="--", color="black")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_title("ROC curves (one grade vs the rest)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    files.save_figure(path, fig)


def plot_errors(rows, data_root, img_size, path, max_images=12):
    """A grid of the most confidently wrong images; returns how many were shown (0 draws nothing)."""
    from .data import UnreadableImage, eval_transform, load_image

    wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["p_predicted"]))[
        :max_images
    ]
    if not wrong:
        Path(path).unlink(missing_ok=True)  # a resumed or redone evaluation must not show old errors
        return 0
    cols = min(4, len(wrong))
    nrows = (len(wrong) + cols - 1) // cols
    fig = Figure(figsize=(3 * cols, 3.9 * nrows + 0.4))  # each row: the image and a three-line caption
    for k, row in enumerate(wrong):
        ax = fig.add_subplot(nrows, cols, k + 1)
        try:
            image = eval_transform(img_size)(load_image(Path(data_root) / row["path"])).permute(1, 2, 0).numpy()
            ax.imshow(image)
        except UnreadableImage:
            ax.text(0.5, 0.5, "image missing", ha="center")
        name = Path(row["path"]).name
        name = name if len(name) <= 30 else name[:13] + "..." + name[-14:]
        ax.set_title(
            f"{name}\ntrue: {row['true']}\npredicted: {row['predicted']} (p={float(row['p_predicted']):.2f})",
            fontsize=9,
        )
        ax.axis("off")
    fig.suptitle("Most confidently wrong validation images")
    fig.tight_layout(
        rect=(0, 0, 1, 1 - 0.4 / (3.9 * nrows + 0.4))
    )  # the top 0.4 inch holds the title, clear of the captions
    files.save_figure(path, fig)
    return len(wrong)


def write_evaluation(run_dir, result, rows, targets, probs, data_root, img_size, remission_upto, pooled=False):
    """The files of one evaluation: predictions.csv, the confusion matrices, roc.png and errors.png."""
    write_predictions(Path(run_dir) / "predictions.csv", rows)
    plot_confusions(result["confusion_matrix"], result["class_names"], run_dir, pooled)
    plot_roc(targets, probs, result["class_names"], Path(run_dir) / "roc.png", remission_upto)
    plot_errors(rows, data_root, img_size, Path(run_dir) / "errors.png")


# ----------------------------------------------------------------------------- HTML report

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pair{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.pair img{max-width:calc(50% - 1em);box-sizing:border-box}
img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:.9em}.warn{color:#a40}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;width:250px}.gallery img{width:100%}.gallery figcaption{font-size:.85em}
"""


def _is_number(value):
    try:
        float(str(value).split(" ± ")[0])
        return True
    except ValueError:
        return False


def table(header, rows):
    """An HTML table; numbers are right-aligned so that their digits line up, text stays left-aligned."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if _is_number(c) else ''}>{html.escape(str(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def embed_png(path, alt=""):
    data = Path(path).read_bytes()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def pair(*images):
    return '<div class="pair">' + "".join(images) + "</div>"


def metrics_html(metrics):
    parts = [
        table(
            ["metric", "value", "meaning"], [[LABELS[name], fmt(metrics.get(name)), SCALARS[name]] for name in SCALARS]
        )
    ]
    per_class = [
        [name, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), r["support"]]
        for name, r in metrics["per_class"].items()
    ]
    parts.append(table(["grade", "precision", "recall", "F1", "support"], per_class))
    remission = metrics.get("remission")
    if remission:
        parts.append(
            f"<h3>Remission ({html.escape(', '.join(remission['remission_classes']))}) vs active disease ({html.escape(', '.join(remission['active_classes']))})</h3>"
        )
        parts.append(
            table(
                ["metric", "value", "meaning"],
                [[LABELS[name], fmt(remission[name]), REMISSION_SCALARS[name]] for name in REMISSION_SCALARS],
            )
        )
        c = remission["confusion"]
        parts.append(
            f'<p class="note">An image is called active when its predicted grade is above {html.escape(remission["remission_classes"][-1])}. '
            f"Active images: {c['tp']} called active, {c['fn']} called remission; remission images: {c['tn']} called remission, {c['fp']} called active.</p>"
        )
    return "\n".join(parts)


def inference_html(timing):
    if not timing:
        return "<p>not measured</p>"
    note = timing_note(timing)
    return table(
        [
            "device",
            "precision",
            "batch 1 mean (ms)",
            "median (ms)",
            "p95 (ms)",
            f"throughput at batch {timing['throughput_batch_size']} (img/s)",
        ],
        [
            [
                timing["device"],
                timing["precision"],
                fmt(timing["batch1_mean_ms"], 1),
                fmt(timing["batch1_median_ms"], 1),
                fmt(timing["batch1_p95_ms"], 1),
                fmt(timing["throughput_images_per_s"], 1),
            ]
        ],
    ) + (f'<p class="warn">{note[0].upper() + note[1:]}.</p>' if note else "")


def dataset_html(run_dir, split=None, class_names=None):
    """Images per grade and subset, the groups, and the skipped files.

    split: rows with the keys class, subset (and group); default: the run's split.csv.
    """
    run_dir = Path(run_dir)
    if split is None:
        split = files.read_csv(run_dir / "split.csv") if (run_dir / "split.csv").exists() else []
    counts = {name: {} for name in class_names or []}  # grade order, not the order of the rows
    for row in split:
        counts.setdefault(row["class"], {}).setdefault(row["subset"], 0)
        counts[row["class"]][row["subset"]] += 1
    subsets = sorted(
        {row["subset"] for row in split}, key=lambda s: (s != "train", len(s), s)
    )  # train, val; fold2 before fold10
    rows = [[name] + [c.get(s, 0) for s in subsets] + [sum(c.values())] for name, c in counts.items()]
    rows.append(["all grades"] + [sum(r[k] for r in rows) for k in range(1, len(subsets) + 2)])
    parts = [table(["grade"] + subsets + ["total"], rows)]
    if split and "group" in split[0]:
        groups = {s: len({r["group"] for r in split if r["subset"] == s}) for s in subsets}
        parts.append(
            "<p>Split by group (for example patient): "
            + ", ".join(f"{n} groups in {s}" for s, n in groups.items())
            + ".</p>"
        )
        subsets_of = {}
        for r in split:
            subsets_of.setdefault(r["group"], set()).add(r["subset"])
        leaks = sorted(g for g, found in subsets_of.items() if len(found) > 1)
        if leaks:
            parts.append(
                f'<p class="warn">{len(leaks)} group(s) appear in more than one subset: {html.escape(", ".join(leaks[:10]))}.</p>'
            )
        else:
            parts.append("<p>Checked: no group appears in more than one subset.</p>")
    skipped_path = run_dir / "skipped.csv"
    skipped = files.read_csv(skipped_path) if skipped_path.exists() else []
    if skipped:
        parts.append(
            f'<p class="warn">{len(skipped)} file(s) were skipped:</p>'
            + table(["file", "reason"], [[r["path"], r["reason"]] for r in skipped])
        )
    else:
        parts.append("<p>No files were skipped.</p>")
    return "\n".join(parts)


def write_report(path, title, sections):
    """sections: list of (heading, html). One self-contained page: every image is embedded."""
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f'<p class="note">Generated {generated} by ucgrade. Research tool: not a medical device; review the results before relying on them.</p>\n'
        f"{body}\n</body></html>\n"
    )
    files.write_text(path, page)


def run_report(run_dir, cams=()):
    """Build report.html for a single training run from the files in run_dir.

    cams: list of (caption, PNG path) Grad-CAM overlays.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = metrics.get("best_epoch")
    status = metrics.get("status", "finished")
    summary = (
        f"<p>Grades in order: <b>{html.escape(' < '.join(metrics['class_names']))}</b>. "
        f"{'Last' if config.get('select') == 'last' else 'Best'} epoch {best} of {metrics.get('epochs_completed')} ({html.escape(status)}). "
        f"Validation accuracy {fmt(metrics['accuracy'])}, balanced accuracy {fmt(metrics['balanced_accuracy'])}, "
        f"QWK {fmt(metrics['qwk'])}, on {metrics['num_images']} validation images. "
        f"ImageNet weights: {'yes' if config.get('pretrained_used') else 'no'}.</p>"
        + caveats(
            config,
            "The model",
            "The best epoch was chosen by its accuracy on these same validation images",
            "or compare runs by cross-validation (--folds)",
        )
    )
    sections = [("Summary", summary), ("Dataset and split", dataset_html(run_dir, class_names=metrics["class_names"]))]
    sections.append(
        (
            "Settings",
            table(
                ["setting", "value"],
                [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in config.items()],
            ),
        )
    )
    sections.append(("Training curves", embed_png(run_dir / "curves.png", "loss and accuracy curves")))
    sections.append(
        (
            "Confusion matrices (best.pt, validation set)",
            pair(
                embed_png(run_dir / "confusion_matrix.png", "confusion matrix"),
                embed_png(run_dir / "confusion_matrix_normalized.png", "normalised confusion matrix"),
            ),
        )
    )
    sections.append(("Metrics (best.pt, validation set)", metrics_html(metrics)))
    if (run_dir / "roc.png").exists():
        sections.append(("ROC curves", embed_png(run_dir / "roc.png", "ROC curves")))
    sections.append(("Inference time", inference_html(metrics.get("inference_time"))))
    if (run_dir / "errors.png").exists():
        sections.append(("Most confidently wrong images", embed_png(run_dir / "errors.png", "errors")))
    else:
        sections.append(("Most confidently wrong images", "<p>No validation image was misclassified.</p>"))
    if cams:
        sections.append(("Grad-CAM: where the model looked", cams_html(cams)))
    write_report(run_dir / "report.html", f"UC severity grading run: {run_dir.name}", sections)


def caveats(config, model, selection, remedy=""):
    """What makes the metrics of a report lean optimistic: the choice of the best epoch (not with
    --select last) and, without --groups, the split."""
    if config.get("select") == "last":
        notes = (
            f'<p class="note">{model} is that of the last epoch (--select last), chosen without looking at the validation images, '
            "so the choice of epoch does not flatter these figures.</p>"
        )
    else:
        notes = (
            f'<p class="note">{selection}, so these figures lean optimistic (--select last avoids this); for an estimate to publish, '
            f"grade a separate test set with predict.py{', ' + remedy if remedy else ''}.</p>"
        )
    if not config.get("groups"):
        notes += (
            '<p class="warn">The split was made image by image (no --groups file): if a patient contributed several images, '
            "some may be in training and others in validation, which flatters every metric here.</p>"
        )
    return notes


def read_cams(run_dir):
    """The Grad-CAM overlays listed in run_dir/cam/index.csv: a list of (caption, PNG path)."""
    index = Path(run_dir) / "cam" / "index.csv"
    return [(row["caption"], index.parent / row["file"]) for row in files.read_csv(index)] if index.exists() else []


def cams_html(cams):
    figures = "".join(
        f"<figure>{embed_png(p, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, p in cams
    )
    return (
        '<p class="note">Red marks the regions that raised the score of the predicted grade most.</p><div class="gallery">'
        + figures
        + "</div>"
    )


def _label(name):
    return "remission " + LABELS[name.removeprefix("remission_")] if name.startswith("remission_") else LABELS[name]


def cv_report(run_dir, summary_table, pooled):
    """report.html of a cross-validation run: the fold table, the pooled metrics and plots, and each fold's curves.

    Everything is embedded, as in a single run's report; each fold folder also keeps its own report.html.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    folds = config["folds"]
    fold_dirs = [run_dir / f"fold{k}" for k in range(1, folds + 1)]
    predictions = files.read_csv(run_dir / "predictions.csv")
    split = [
        {"class": r["true"], "subset": f"fold{r['fold']}"} | ({"group": r["group"]} if "group" in r else {})
        for r in predictions
    ]
    fold_table = table(
        ["metric", "mean ± std"] + [f"fold{k}" for k in range(1, folds + 1)] + ["pooled"],
        [
            [_label(row["metric"]), f"{row['mean']} ± {row['std']}" if row["mean"] else "n/a"]
            + [row[f"fold{k}"] or "n/a" for k in range(1, folds + 1)]
            + [row["pooled"] or "n/a"]
            for row in summary_table
        ],
    )
    timings = [json.loads((d / "metrics.json").read_text()).get("inference_time") for d in fold_dirs]
    timing_rows = [
        [
            f"fold{k}",
            t["device"],
            t["precision"],
            fmt(t["batch1_mean_ms"], 1),
            fmt(t["batch1_median_ms"], 1),
            fmt(t["batch1_p95_ms"], 1),
            fmt(t["throughput_images_per_s"], 1),
        ]
        for k, t in enumerate(timings, 1)
        if t
    ]
    # a few Grad-CAM overlays, taken from the folds in turn
    per_fold = [[(f"fold{k}: {caption}", path) for caption, path in read_cams(d)] for k, d in enumerate(fold_dirs, 1)]
    cams = [c for group in itertools.zip_longest(*per_fold) for c in group if c is not None][
        : max(map(len, per_fold), default=0)
    ]
    sections = [
        (
            "Summary",
            f"<p>{folds}-fold cross-validation{' grouped by ' + html.escape(str(config['groups'])) if config.get('groups') else ''}. "
            f"Each image is validated exactly once, by the model that did not train on it; the pooled out-of-fold predictions of all {pooled['num_images']} images are scored below. "
            f"Grades in order: <b>{html.escape(' < '.join(pooled['class_names']))}</b>. ImageNet weights: {'yes' if config.get('pretrained_used') else 'no'}.</p>"
            + caveats(
                config,
                "Each fold's model",
                "Each fold's model is its best epoch, chosen by its accuracy on that fold's validation images",
            ),
        ),
        (
            "Dataset and folds",
            "<p>Images validated in each fold (each fold's model trained on the other folds):</p>"
            + dataset_html(run_dir, split, pooled["class_names"]),
        ),
        ("Metrics per fold (mean ± standard deviation over the folds)", fold_table),
        ("Pooled out-of-fold metrics", metrics_html(pooled)),
        (
            "Pooled confusion matrices",
            pair(
                embed_png(run_dir / "confusion_matrix.png", "confusion matrix"),
                embed_png(run_dir / "confusion_matrix_normalized.png", "normalised confusion matrix"),
            ),
        ),
        ("ROC curves (pooled)", embed_png(run_dir / "roc.png", "ROC curves")),
        (
            "Training curves",
            "".join(
                f"<h3>fold{k}</h3>" + embed_png(d / "curves.png", f"fold{k} curves")
                for k, d in enumerate(fold_dirs, 1)
                if (d / "curves.png").exists()
            ),
        ),
        (
            "Inference time",
            table(
                ["fold", "device", "precision", "batch 1 mean (ms)", "median (ms)", "p95 (ms)", "throughput (img/s)"],
                timing_rows,
            )
            if timing_rows
            else "<p>not measured</p>",
        ),
        (
            "Most confidently wrong images (pooled)",
            embed_png(run_dir / "errors.png", "errors")
            if (run_dir / "errors.png").exists()
            else "<p>No image was misclassified.</p>",
        ),
    ]
    if cams:
        sections.append(("Grad-CAM: where the model looked", cams_html(cams)))
    sections += [
        (
            "Settings",
            table(
                ["setting", "value"],
                [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in config.items()],
            ),
        ),
        (
            "Folds",
            "<p>Each fold folder also holds its own report.html, checkpoints, predictions and Grad-CAM overlays: "
            + ", ".join(f"fold{k}/report.html" for k in range(1, folds + 1))
            + ".</p>",
        ),
    ]
    write_report(run_dir / "report.html", f"UC severity grading, cross-validation: {run_dir.name}", sections)


def redraw(run_dir):
    """Draw curves.png, the confusion matrices and roc.png again from a run folder's files."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    class_names = metrics["class_names"]
    if (run_dir / "history.csv").exists():  # a cross-validation folder has none; its folds do
        plot_curves(read_history(run_dir / "history.csv"), run_dir / "curves.png")
    plot_confusions(metrics["confusion_matrix"], class_names, run_dir, pooled="folds" in metrics)
    _, targets, probs = read_predictions(run_dir / "predictions.csv", class_names)
    plot_roc(
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
            "usage: python -m ucgrade.report RUN [RUN ...]   (from the project folder) redraws the plots of finished runs"
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
        if not path.is_file() or "confusion_matrix" not in json.loads(path.read_text()):
            raise UserError(
                f"'{run}' has no evaluated model yet (it was interrupted before one); resume it with: python qq.py --resume {run}"
            )
        redraw(run)
        print(f"redrew the plots of {run}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
