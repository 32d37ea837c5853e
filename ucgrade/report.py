"""Report: the files of a run folder (CSV, PNG, one self-contained HTML page).

Plots are drawn from the saved CSV and JSON files, so that they can be drawn again later with
`python -m ucgrade.report RUN_DIR`.
"""

import base64
import datetime
import html
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on a hospital server or in CI

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from . import files  # noqa: E402
from .metrics import REMISSION_SCALARS, SCALARS  # noqa: E402

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
        row = {"path": path, "true": class_names[int(target)], "predicted": class_names[predicted], "p_predicted": f"{p[predicted]:.6f}", "correct": int(predicted == int(target))}
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
        if key == "acc":
            ax.set_ylim(0, 1.02)
    fig.tight_layout()
    files.save_figure(path, fig)


def plot_confusion(matrix, class_names, path, normalize=False, title=None):
    """Counts, or rows normalised by true class; readable for up to about 10 classes."""
    matrix = np.asarray(matrix, dtype=float if normalize else int)
    if normalize:
        totals = matrix.sum(1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    n = len(class_names)
    size = max(4.5, 0.75 * n + 2.5)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(matrix, display_labels=class_names)
    display.plot(ax=ax, cmap="Blues", colorbar=True, values_format=".2f" if normalize else "d", xticks_rotation=45 if n > 4 else "horizontal")
    if normalize:
        display.im_.set_clim(0, 1)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title or ("Confusion matrix (normalised by true grade)" if normalize else "Confusion matrix (counts)"))
    fig.tight_layout()
    files.save_figure(path, fig)


def plot_roc(targets, probs, class_names, path, remission=None):
    """One-vs-rest ROC curve per grade, and remission vs active when that split is given."""
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    for c, name in enumerate(class_names):
        positives = np.asarray(targets) == c
        if 0 < positives.sum() < len(positives):
            RocCurveDisplay.from_predictions(positives, probs[:, c], ax=ax, name=name, plot_chance_level=False)
    if remission is not None:
        cut = class_names.index(remission)
        active = np.asarray(targets) > cut
        if 0 < active.sum() < len(active):
            RocCurveDisplay.from_predictions(active, probs[:, cut + 1:].sum(1), ax=ax, name="active vs remission", linestyle="--", color="black")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set_title("ROC curves (one grade vs the rest)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    files.save_figure(path, fig)


def plot_errors(rows, data_root, img_size, path, max_images=12):
    """A grid of the most confidently wrong images; returns how many were shown (0 draws nothing)."""
    from .data import UnreadableImage, eval_transform, load_image

    wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["p_predicted"]))[:max_images]
    if not wrong:
        return 0
    cols = min(4, len(wrong))
    nrows = (len(wrong) + cols - 1) // cols
    fig = Figure(figsize=(3 * cols, 3.4 * nrows))
    for k, row in enumerate(wrong):
        ax = fig.add_subplot(nrows, cols, k + 1)
        try:
            image = eval_transform(img_size)(load_image(Path(data_root) / row["path"])).permute(1, 2, 0).numpy()
            ax.imshow(image)
        except UnreadableImage:
            ax.text(0.5, 0.5, "image missing", ha="center")
        ax.set_title(f"true: {row['true']}\npredicted: {row['predicted']} (p={float(row['p_predicted']):.2f})", fontsize=9)
        ax.axis("off")
    fig.suptitle("Most confidently wrong validation images")
    fig.tight_layout()
    files.save_figure(path, fig)
    return len(wrong)


# ----------------------------------------------------------------------------- HTML report

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:.9em}.warn{color:#a40}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;width:250px}.gallery figcaption{font-size:.85em}
"""


def table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def embed_png(path_or_bytes, alt=""):
    data = Path(path_or_bytes).read_bytes() if isinstance(path_or_bytes, (str, Path)) else path_or_bytes
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metrics_html(metrics):
    parts = [table(["metric", "value", "meaning"], [[name, _fmt(metrics.get(name)), SCALARS[name]] for name in SCALARS])]
    per_class = [[name, _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]), r["support"]] for name, r in metrics["per_class"].items()]
    parts.append(table(["grade", "precision", "recall", "F1", "support"], per_class))
    remission = metrics.get("remission")
    if remission:
        parts.append(f"<h3>Remission ({html.escape(', '.join(remission['remission_classes']))}) vs active disease ({html.escape(', '.join(remission['active_classes']))})</h3>")
        parts.append(table(["metric", "value", "meaning"], [[name, _fmt(remission[name]), REMISSION_SCALARS[name]] for name in REMISSION_SCALARS]))
    return "\n".join(parts)


def inference_html(timing):
    if not timing:
        return "<p>not measured</p>"
    return table(
        ["device", "precision", "batch 1 mean (ms)", "median (ms)", "p95 (ms)", f"throughput at batch {timing['throughput_batch_size']} (img/s)"],
        [[timing["device"], timing["precision"], _fmt(timing["batch1_mean_ms"], 1), _fmt(timing["batch1_median_ms"], 1), _fmt(timing["batch1_p95_ms"], 1), _fmt(timing["throughput_images_per_s"], 1)]],
    )


def dataset_html(run_dir):
    run_dir = Path(run_dir)
    split = files.read_csv(run_dir / "split.csv") if (run_dir / "split.csv").exists() else []
    counts = {}
    for row in split:
        counts.setdefault(row["class"], {}).setdefault(row["subset"], 0)
        counts[row["class"]][row["subset"]] += 1
    subsets = sorted({row["subset"] for row in split})
    rows = [[name] + [c.get(s, 0) for s in subsets] + [sum(c.values())] for name, c in counts.items()]
    parts = [table(["grade"] + subsets + ["total"], rows)]
    if split and "group" in split[0]:
        groups = {s: len({r["group"] for r in split if r["subset"] == s}) for s in subsets}
        parts.append("<p>Split by group (for example patient): " + ", ".join(f"{n} groups in {s}" for s, n in groups.items()) + ".</p>")
    skipped_path = run_dir / "skipped.csv"
    skipped = files.read_csv(skipped_path) if skipped_path.exists() else []
    if skipped:
        parts.append(f'<p class="warn">{len(skipped)} file(s) were skipped:</p>' + table(["file", "reason"], [[r["path"], r["reason"]] for r in skipped]))
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
        f"Best epoch {best} of {metrics.get('epochs_completed')} ({html.escape(status)}). "
        f"Validation accuracy {_fmt(metrics['accuracy'])}, balanced accuracy {_fmt(metrics['balanced_accuracy'])}, "
        f"QWK {_fmt(metrics['qwk'])}, on {metrics['num_images']} validation images. "
        f"ImageNet weights: {'yes' if config.get('pretrained_used') else 'no'}.</p>"
    )
    sections = [("Summary", summary), ("Dataset and split", dataset_html(run_dir))]
    sections.append(("Settings", table(["setting", "value"], [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in config.items()])))
    sections.append(("Training curves", embed_png(run_dir / "curves.png", "loss and accuracy curves")))
    sections.append(("Confusion matrices (best model, validation set)", embed_png(run_dir / "confusion_matrix.png", "confusion matrix") + embed_png(run_dir / "confusion_matrix_normalized.png", "normalised confusion matrix")))
    sections.append(("Metrics (best model, validation set)", metrics_html(metrics)))
    if (run_dir / "roc.png").exists():
        sections.append(("ROC curves", embed_png(run_dir / "roc.png", "ROC curves")))
    sections.append(("Inference time", inference_html(metrics.get("inference_time"))))
    if (run_dir / "errors.png").exists():
        sections.append(("Most confidently wrong images", embed_png(run_dir / "errors.png", "errors")))
    else:
        sections.append(("Most confidently wrong images", "<p>No validation image was misclassified.</p>"))
    if cams:
        figures = "".join(f"<figure>{embed_png(p, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, p in cams)
        sections.append(("Grad-CAM: where the model looked", '<p class="note">Red marks the regions that raised the score of the predicted grade most.</p><div class="gallery">' + figures + "</div>"))
    write_report(run_dir / "report.html", f"UC severity grading run: {run_dir.name}", sections)


def cv_report(run_dir, summary_table, pooled):
    """report.html of a cross-validation run: the fold table, pooled metrics and links to each fold's report."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    folds = config["folds"]
    header = list(summary_table[0].keys())
    sections = [
        ("Summary", f"<p>{folds}-fold cross-validation{' grouped by ' + html.escape(str(config['groups'])) if config.get('groups') else ''}. "
                    f"Each image is validated exactly once; the pooled out-of-fold predictions of all {pooled['num_images']} images are scored below. "
                    f"Grades in order: <b>{html.escape(' < '.join(pooled['class_names']))}</b>.</p>"),
        ("Metrics per fold (mean ± standard deviation)", table(header, [[row[h] for h in header] for row in summary_table])),
        ("Pooled out-of-fold metrics", metrics_html(pooled)),
        ("Pooled confusion matrices", embed_png(run_dir / "confusion_matrix.png", "confusion matrix") + embed_png(run_dir / "confusion_matrix_normalized.png", "normalised confusion matrix")),
        ("ROC curves (pooled)", embed_png(run_dir / "roc.png", "ROC curves")),
        ("Settings", table(["setting", "value"], [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in config.items()])),
        ("Folds", "<p>Each fold folder holds its own report.html, checkpoints, curves and Grad-CAM examples: "
                  + ", ".join(f"fold{k}/report.html" for k in range(1, folds + 1)) + ".</p>"),
    ]
    write_report(run_dir / "report.html", f"UC severity grading, cross-validation: {run_dir.name}", sections)


def redraw(run_dir):
    """Draw curves.png, the confusion matrices and roc.png again from a run folder's files."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    class_names = metrics["class_names"]
    plot_curves(read_history(run_dir / "history.csv"), run_dir / "curves.png")
    plot_confusion(metrics["confusion_matrix"], class_names, run_dir / "confusion_matrix.png")
    plot_confusion(metrics["confusion_matrix"], class_names, run_dir / "confusion_matrix_normalized.png", normalize=True)
    _, targets, probs = read_predictions(run_dir / "predictions.csv", class_names)
    plot_roc(targets, probs, class_names, run_dir / "roc.png", (metrics.get("remission") or {}).get("remission_classes", [None])[-1])


if __name__ == "__main__":
    for run in sys.argv[1:]:
        redraw(run)
        print(f"redrew the plots of {run}")
