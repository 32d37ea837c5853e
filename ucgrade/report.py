"""Report: the files of a run folder (CSV, PNG, one self-contained HTML page).

Plots are drawn from the saved CSV and JSON files, so that they can be drawn again later with
`python -m ucgrade.report RUN_DIR`. Every plot is laid out in inches from its number of grades and
the measured width of their names, so that labels fit whatever the grades are called.
"""

import base64
import csv
import datetime
import html
import io
import itertools
import json
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen on a hospital server or in CI
# grade names and file names are plain text: a class folder 'sev_$1_$2' must not be read as mathtext
matplotlib.rcParams["text.parse_math"] = False
matplotlib.rcParams["text.usetex"] = False

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.textpath import TextToPath  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from . import files, stats  # noqa: E402
from .cli import UserError, disk_full, run_cli  # noqa: E402
from .metrics import LABELS, REMISSION_SCALARS, SCALARS, fmt, timing_note  # noqa: E402

HISTORY_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_qwk",
    "lr",
    "epoch_time_s",
    "train_images_per_s",
]


# ----------------------------------------------------------------------------- CSV files


def write_history(path, history):
    files.write_csv(path, history, HISTORY_FIELDS)


def read_history(path):
    rows = files.read_csv(path)
    # a run begun before val_qwk was kept has no value for its earlier epochs
    return [{k: (int(v) if k == "epoch" else float(v or "nan")) for k, v in row.items()} for row in rows]


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
        row.update({prob_column(name): f"{value:.6f}" for name, value in zip(class_names, p)})
        if extra:
            row.update({key: values[i] for key, values in extra.items()})
        rows.append(row)
    return rows


def prob_column(class_name):
    """The column of a grade's probability: 'prob:' cannot collide with a fixed column (a grade named 'predicted'
    would have overwritten p_predicted)."""
    return f"prob:{class_name}"


def write_predictions(path, rows):
    files.write_csv(path, rows, list(rows[0].keys()))


def read_predictions(path, class_names):
    """(rows, targets, probs) from a predictions.csv."""
    rows = files.read_csv(path)
    targets = np.array([class_names.index(r["true"]) for r in rows])
    probs = np.array([[float(r[prob_column(name)]) for name in class_names] for r in rows])
    return rows, targets, probs


# ----------------------------------------------------------------------------- grade names on plots

LABEL_POINTS = 10  # tick labels
SEPARATORS = "-_ ./"
_TEXT_PATHS = TextToPath()


def text_width(text, points=LABEL_POINTS):
    """Inches that one line of text takes as matplotlib draws it, with 5% to spare for hinting."""
    width, _, _ = _TEXT_PATHS.get_text_width_height_descent(text, FontProperties(size=points), ismath=False)
    return 1.05 * width / 72


def text_height(text, points=LABEL_POINTS):
    """Inches that text of one or more lines takes (matplotlib spaces lines by 1.2 font sizes)."""
    return (text.count("\n") + 1) * 1.2 * points / 72


def grade_labels(class_names):
    """(prefix, labels): the start that all grade names share, up to a separator, and the rest of each name.

    ['ulcerative-colitis-grade-0-1', 'ulcerative-colitis-grade-1'] gives ('ulcerative-colitis-grade-', ['0-1', '1']);
    names with no such start in common come back whole, with the prefix ''.
    """
    names = [str(name) for name in class_names]
    prefix = os.path.commonprefix(names)
    prefix = prefix[: max(prefix.rfind(s) for s in SEPARATORS) + 1]
    if len(names) < 2 or prefix in names:
        return "", names
    return prefix, [name[len(prefix) :] for name in names]


def prefix_note(prefix):
    """The line that names the shared start of the grade names once, where the plot shows only the rest."""
    return f"grades: {prefix}…" if prefix else ""


def wrap(text, width, points=LABEL_POINTS):
    """text in lines of at most `width` inches, broken after a separator where it can and inside a word only
    where one word is too wide. Nothing is cut: joining the lines gives the text back."""

    def fits(line):  # a separator at the end of a line may stand out a little, as a hyphen does in print
        return text_width(line.rstrip(SEPARATORS) or line, points) <= width

    pieces = []
    for piece in re.findall(r"[^-_ ./]*[-_ ./]|[^-_ ./]+", text):
        while len(piece) > 1 and not fits(piece):
            k = len(piece) - 1
            while k > 1 and not fits(piece[:k]):
                k -= 1
            pieces.append(piece[:k])
            piece = piece[k:]
        pieces.append(piece)
    lines = []
    for piece in pieces:
        if lines and fits(lines[-1] + piece):
            lines[-1] += piece
        else:
            lines.append(piece)
    return "\n".join(lines)


def widest_line(texts, points=LABEL_POINTS):
    return max(text_width(line, points) for text in texts for line in text.split("\n"))


# ----------------------------------------------------------------------------- plots


def curves_figure(history):
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
        # half an epoch around the first and last, so that even one epoch has a whole number on its axis
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if key == "acc":
            ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def plot_curves(history, path):
    files.save_figure(path, curves_figure(history))


def validation_above_training(history):
    """Validation accuracy above training accuracy in more than half of the epochs."""
    return 2 * sum(row["val_acc"] > row["train_acc"] for row in history) > len(history)


def confusion_figure(matrix, class_names, normalize=False, title=None):
    """Counts, or rows normalised by true grade: cells of a set size in inches, the grade names wrapped to fit
    them, and the figure as large as its grades and names need."""
    matrix = np.asarray(matrix, dtype=float if normalize else int)
    totals = matrix.sum(1, keepdims=True)
    if normalize:
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    n = len(class_names)
    prefix, labels = grade_labels(class_names)
    # inches: 1.1 for up to three grades, so that both matrices stand side by side in the report, down to 0.8 for
    # five and more; wider when the longest word of a name needs it
    words = [word for label in labels for word in re.split(r"(?<=[-_ ./])", label)]
    cell = min(1.4, max(0.8, min(1.1, 3.3 / n), widest_line(words) + 0.12))
    xlabels = [wrap(label, cell - 0.12) for label in labels]  # 0.12 in between neighbours
    row_lines = int(cell / text_height("x")) - (1 if normalize else 0)  # lines of a y label that fit in a cell
    ywidth = 1.8
    while any(wrap(label, ywidth).count("\n") >= row_lines for label in labels) and ywidth < 6:
        ywidth += 0.4
    ylabels = [wrap(label, ywidth) for label in labels]
    if normalize:  # a row of fractions hides how few images it may rest on
        ylabels = [
            label + (" " if text_width(label.split("\n")[-1] + f" (n={t})") <= ywidth else "\n") + f"(n={t})"
            for label, t in zip(ylabels, totals[:, 0].astype(int))
        ]
    vmax = 1 if normalize else max(int(matrix.max()), 1)
    side = n * cell
    left = 0.15 + 0.3 + widest_line(ylabels) + 0.12  # margin, axis label, tick labels, ticks
    bottom = 0.15 + 0.3 + max(text_height(label) for label in xlabels) + 0.12
    right = 0.2 + 0.2 + 0.12 + text_width(f"{vmax:.1f}" if normalize else str(vmax), 9) + 0.15  # gap, colour bar
    width = left + side + right
    centre = left + side / 2  # the title stands over the matrix
    heading = "\n".join(
        wrap(line, 2 * min(centre, width - centre) - 0.2, 12)
        for line in (title or "Confusion matrix").split("\n") + ([prefix_note(prefix)] if prefix else [])
    )
    height = bottom + side + 0.15 + text_height(heading, 12) + 0.15
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    colorbar_ax = fig.add_axes(((left + side + 0.2) / width, bottom / height, 0.2 / width, side / height))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    colorbar = fig.colorbar(image, cax=colorbar_ax)
    if not normalize:
        colorbar.locator = MaxNLocator(integer=True)  # counts have no fractional ticks
        colorbar.update_ticks()
    colorbar_ax.tick_params(labelsize=9)
    for i, j in itertools.product(range(n), range(n)):
        value = matrix[i, j]
        ax.text(
            j,
            i,
            f"{value:.2f}" if normalize else str(value),
            ha="center",
            va="center",
            fontsize=14 if cell >= 1 else 12,
            color="white" if value > vmax / 2 else "#222",
        )
    ax.set_xticks(range(n), xlabels, fontsize=LABEL_POINTS, multialignment="center")
    ax.set_yticks(range(n), ylabels, fontsize=LABEL_POINTS, multialignment="right")
    ax.set_xlabel("predicted grade", fontsize=11)
    ax.set_ylabel("true grade", fontsize=11)
    fig.text(centre / width, 1 - 0.15 / height, heading, ha="center", va="top", fontsize=12)
    return fig


def plot_confusion(matrix, class_names, path, normalize=False, title=None):
    """Counts, or rows normalised by true class."""
    title = title or ("Confusion matrix\nnormalised by true grade" if normalize else "Confusion matrix\n(counts)")
    files.save_figure(path, confusion_figure(matrix, class_names, normalize, title))


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


# dash patterns and markers of the ROC curves, grade by grade: curves that coincide still show through each other
ROC_DASHES = [(0, ()), (0, (7, 3)), (0, (1.5, 2)), (0, (7, 2, 1.5, 2)), (0, (3, 2)), (0, (10, 2, 1.5, 2, 1.5, 2))]
ROC_MARKERS = "osD^vPX*<>"


def roc_figure(targets, probs, class_names, remission=None):
    """One-vs-rest ROC curve per grade, and remission vs active when that split is given.

    A good model's curves coincide, so each grade has its own colour, dash pattern and hollow marker, the
    earlier ones drawn wider and with larger markers, and its AUC in the legend beside the plot."""
    prefix, labels = grade_labels(class_names)
    targets = np.asarray(targets)
    probs = np.asarray(probs)
    curves = [(targets == c, probs[:, c], label) for c, label in enumerate(labels)]
    curves = [(positives, scores, label) for positives, scores, label in curves if 0 < positives.sum() < len(targets)]
    if remission is not None:
        cut = class_names.index(remission)
        active = targets > cut
        if 0 < active.sum() < len(active):
            curves.append((active, probs[:, cut + 1 :].sum(1), "active vs remission"))
    side, left, bottom = 4.2, 0.85, 0.7
    entries = [
        wrap(f"{label} (AUC {roc_auc_score(positives, scores):.2f})", 2.6, 9) for positives, scores, label in curves
    ] + ["chance"]
    legend_title = "\n".join(wrap(line, 2.6, 9) for line in ["grade vs the rest", prefix_note(prefix)] if line)
    legend_width = widest_line(entries + [legend_title], 9) + 0.6  # the text, its line sample and the padding
    legend_height = sum(text_height(entry, 9) + 0.07 for entry in entries) + text_height(legend_title, 9) + 0.3
    width = left + side + 0.2 + legend_width + 0.15  # the legend stands right of the plot
    height = bottom + max(side, legend_height) + 0.45
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    grades = sum(label != "active vs remission" for *_, label in curves)
    for k, ((positives, scores, label), entry) in enumerate(zip(curves, entries)):
        fpr, tpr, _ = roc_curve(positives, scores)
        if k < grades:
            wider = (grades - 1 - k) / max(grades - 1, 1)  # 1 for the first grade drawn, 0 for the last
            style = {
                "color": f"C{k % 10}",
                "linestyle": ROC_DASHES[k % len(ROC_DASHES)],
                "linewidth": 1.5 + 2 * wider,
                "marker": ROC_MARKERS[k % len(ROC_MARKERS)],
                "markersize": 5 + 8 * wider,
                "markerfacecolor": "none",
                "alpha": 0.85,
            }
        else:
            style = {"color": "black", "linestyle": (0, (4, 4)), "linewidth": 1.2}
        ax.plot(fpr, tpr, label=entry, **style)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance", zorder=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(-0.05, 1.05)  # clear of the frame, where a perfect curve runs
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("ROC curves (one grade vs the rest)")
    ax.legend(
        loc="upper left",
        bbox_to_anchor=((left + side + 0.2) / width, (bottom + side) / height),
        bbox_transform=fig.transFigure,
        fontsize=9,
        title=legend_title,
        title_fontsize=9,
        frameon=False,
    )
    return fig


def plot_roc(targets, probs, class_names, path, remission=None):
    """roc.png: one-vs-rest ROC curve per grade, and remission vs active when that split is given."""
    files.save_figure(path, roc_figure(targets, probs, class_names, remission))


def plot_errors(rows, data_root, img_size, path, max_images=12, class_names=None, images="validation images"):
    """A grid of the most confidently wrong images; returns how many were shown (0 draws nothing).

    class_names: the grades, to show the part of their names that differs (default: the names in rows); images:
    what they are, for the heading (validation images, test images).
    """
    from .data import UnreadableImage, load_image
    from .presets import eval_transform

    wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["p_predicted"]))
    wrong = wrong[:max_images]
    if not wrong:
        Path(path).unlink(missing_ok=True)  # a resumed or redone evaluation must not show old errors
        return 0
    names = list(class_names or sorted({r["true"] for r in rows} | {r["predicted"] for r in rows}))
    prefix, labels = grade_labels(names)
    short = dict(zip(names, labels))
    captions = []
    for row in wrong:
        lines = [
            row["path"],  # relative to the data folder: two IMG_0007.jpg of different grades differ by their folder
            f"true: {short[row['true']]}",
            f"predicted: {short[row['predicted']]} (p={float(row['p_predicted']):.2f})",
        ]
        captions.append("\n".join(wrap(line, 2.8, 9) for line in lines))  # long file names wrapped, not cut
    # laid out in inches: a strip for the heading, then rows of a caption above a 2.7 in image
    cols = min(4, len(wrong))
    nrows = (len(wrong) + cols - 1) // cols
    caption_height = max(text_height(caption, 9) for caption in captions) + 0.1
    row_height = caption_height + 2.7 + 0.25
    heading = f"Most confidently wrong {images}" + (f"\n{prefix_note(prefix)}" if prefix else "")
    heading_height = 0.15 + text_height(heading, 12) + 0.15
    width, height = 3 * cols, heading_height + nrows * row_height
    fig = Figure(figsize=(width, height))
    for k, (row, caption) in enumerate(zip(wrong, captions)):
        left = 3 * (k % cols) + 0.15
        bottom = height - heading_height - (k // cols) * row_height - caption_height - 2.7
        ax = fig.add_axes((left / width, bottom / height, 2.7 / width, 2.7 / height))
        try:
            image = eval_transform(img_size)(load_image(Path(data_root) / row["path"])).permute(1, 2, 0).numpy()
            ax.imshow(image)
        except UnreadableImage:
            ax.text(0.5, 0.5, "image missing", ha="center")
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.text(0.5, 1 - 0.15 / height, heading, ha="center", va="top", fontsize=12)
    files.save_figure(path, fig)
    return len(wrong)


def write_evaluation(
    run_dir, result, rows, targets, probs, data_root, img_size, remission_upto, pooled=False, images="validation images"
):
    """The files of one evaluation: predictions.csv, the confusion matrices, roc.png and errors.png.

    predictions.csv must be written; a plot that fails is left out. Returns the failures, a list of
    (part, reason), for the output and the report.
    """
    class_names = result["class_names"]
    write_predictions(Path(run_dir) / "predictions.csv", rows)
    failed = []
    attempt(failed, "the confusion matrices", plot_confusions, result["confusion_matrix"], class_names, run_dir, pooled)
    attempt(failed, "roc.png", plot_roc, targets, probs, class_names, Path(run_dir) / "roc.png", remission_upto)
    attempt(
        failed, "errors.png", plot_errors, rows, data_root, img_size, Path(run_dir) / "errors.png",
        class_names=class_names, images=images,
    )  # fmt: skip
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


# ----------------------------------------------------------------------------- HTML report

# Plots are shown at their size in inches (96 CSS pixels each), so that their 10-point labels read as 10 points.
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
  color:#222;line-height:1.35}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
  vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.settings td{white-space:pre-line;overflow-wrap:anywhere}table.settings td:first-child{white-space:nowrap}
.card{border:1px solid #c9d3e0;border-radius:6px;background:#f6f8fb;padding:0 1.2em .6em;margin-top:1.2em}
.card h2{border:0;margin-top:.6em}
.tiles{display:flex;flex-wrap:wrap;gap:.6em;margin:.7em 0}
.tile{flex:1 1 0;min-width:7.5em;max-width:14em;background:#fff;border:1px solid #d5dbe5;border-radius:4px;
  padding:.35em .8em}
.tile span{display:block;color:#555;font-size:.9em}.tile b{display:block;font-size:1.7em;
  font-variant-numeric:tabular-nums}.tile small{display:block;color:#666;font-size:.8em;overflow-wrap:anywhere}
.pair{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
img{max-width:100%;height:auto;border:1px solid #eee}.note{color:#666;font-size:.9em}.warn{color:#a40}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;width:250px}.gallery img{width:100%}
.gallery figcaption{font-size:.85em}
@page{size:A4;margin:14mm 12mm}
@media print{
  body{max-width:none;margin:0;padding:0;font-size:10pt}
  h2{break-after:avoid;page-break-after:avoid}
  img{max-height:250mm;object-fit:contain}
  img,figure,tr,.card,.tile{break-inside:avoid;page-break-inside:avoid}
  .gallery figure{width:30%}
}
"""


def _is_number(value):
    try:
        float(str(value).split(" ± ")[0])
        return True
    except ValueError:
        return False


def table(header, rows, numbers=True, css_class=None):
    """An HTML table. With numbers, numbers are right-aligned so that their digits line up; text stays left."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if numbers and _is_number(c) else ''}>{html.escape(str(c))}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table{f' class={css_class}' if css_class else ''}><tr>{head}</tr>{body}</table>"


def embed_png(path, alt=""):
    """An <img> with the PNG inside, as wide as its figure is in inches (at 96 CSS pixels an inch); a plot that
    could not be drawn is named instead."""
    if not Path(path).is_file():
        return f'<p class="warn">{html.escape(Path(path).name)} could not be drawn (metrics.json says why).</p>'
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        dpi = image.info.get("dpi", (96, 96))[0] or 96
        width = round(image.width * 96 / dpi)
    return (
        f'<img alt="{html.escape(alt)}" width="{width}" '
        f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'
    )


def confusion_pair(folder):
    """The two confusion matrices of an evaluation folder, side by side: counts and normalised by true grade."""
    return pair(
        embed_png(Path(folder) / "confusion_matrix.png", "confusion matrix"),
        embed_png(Path(folder) / "confusion_matrix_normalized.png", "normalised confusion matrix"),
    )


def pair(*images):
    return '<div class="pair">' + "".join(images) + "</div>"


def tiles(items):
    """The headline figures of the summary card: (label, value, details) each, details a list of short lines."""
    return (
        '<div class="tiles">'
        + "".join(
            f'<div class="tile"><span>{html.escape(label)}</span><b>{html.escape(value)}</b>'
            + "".join(f"<small>{html.escape(detail)}</small>" for detail in details)
            + "</div>"
            for label, value, details in items
        )
        + "</div>"
    )


HEADLINE = ["accuracy", "balanced_accuracy", "qwk", "macro_f1"]


def headline(metrics, spread=None):
    """(label, value, details) of the figures a clinician looks at first.

    spread: metric key -> 'mean ± std' over the folds of a cross-validation run.
    """
    spread = spread or {}

    def details(key):
        return [text for text in (spread.get(key) and f"folds: {spread[key]}", interval_text(metrics, key)) if text]

    items = [(LABELS[name], fmt(metrics.get(name)), details(name)) for name in HEADLINE]
    remission = metrics.get("remission")
    if remission:
        last = remission["remission_classes"][-1]
        items += [
            (
                "sensitivity",
                fmt(remission["sensitivity"]),
                [f"active: above {last}", *details("remission_sensitivity")],
            ),
            (
                "specificity",
                fmt(remission["specificity"]),
                [f"remission: up to {last}", *details("remission_specificity")],
            ),
        ]
    return items


def interval_text(metrics, name):
    """'95% CI 0.76-0.86' for a key of stats.INTERVAL_METRICS, or '' when metrics has no interval for it."""
    interval = (metrics.get("intervals") or {}).get(name)
    if not interval or interval["low"] is None:
        return ""
    return "95% CI " + stats.format_ci(0.0, interval).split("(", 1)[1].rstrip(")")


def ci_text(metrics, name):
    """The 95% interval of a metric as a table shows it: '0.76-0.86', or 'n/a'."""
    return interval_text(metrics, name).removeprefix("95% CI ") or "n/a"


def bootstrap_note(metrics):
    unit = (metrics.get("bootstrap") or {}).get("unit", "image")
    return (
        f'<p class="note">95% CI: percentile bootstrap of {stats.N_RESAMPLES} resamples of {unit}s '
        f"(seeded){', whole patients at a time' if unit == 'patient' else ''}; n/a where a metric is undefined "
        "on too many resamples.</p>"
    )


def metric_rows(metrics, names, meanings):
    """Rows of a metrics table: label, value, its 95% CI when metrics has intervals, and the meaning."""
    with_ci = "intervals" in metrics
    return [
        [LABELS[_key(name)], fmt(stats.metric_value(metrics, name))]
        + ([ci_text(metrics, name)] if with_ci else [])
        + [meanings[_key(name)]]
        for name in names
    ]


def metrics_html(metrics):
    header = ["metric", "value"] + (["95% CI"] if "intervals" in metrics else []) + ["meaning"]
    parts = [table(header, metric_rows(metrics, SCALARS, SCALARS))]
    if "intervals" in metrics:
        parts.append(bootstrap_note(metrics))
    per_class = [
        [name, fmt(r["precision"]), fmt(r["recall"]), fmt(r["f1"]), r["support"]]
        for name, r in metrics["per_class"].items()
    ]
    parts.append(table(["grade", "precision", "recall", "F1", "support"], per_class))
    remission = metrics.get("remission")
    if remission:
        parts.append(
            f"<h3>Remission ({html.escape(', '.join(remission['remission_classes']))}) "
            f"vs active disease ({html.escape(', '.join(remission['active_classes']))})</h3>"
        )
        names = [f"remission_{name}" for name in REMISSION_SCALARS]
        parts.append(table(header, metric_rows(metrics, names, REMISSION_SCALARS)))
        c = remission["confusion"]
        parts.append(
            '<p class="note">An image is called active when its predicted grade is above '
            f"{html.escape(remission['remission_classes'][-1])}. "
            f"Active images: {c['tp']} called active, {c['fn']} called remission; "
            f"remission images: {c['tn']} called remission, {c['fp']} called active.</p>"
        )
    return "\n".join(parts)


def patient_rule_text(rule):
    """How a patient's grades are made from their images' grades."""
    if rule == "max":
        return "the worst grade among their images, true and predicted (the Mayo convention)"
    return "the worst true grade among their images; predicted: the grade of their images' mean probabilities"


def patients_html(run_dir, metrics):
    """The patient-level section: how grades are made, the confusion matrix and the metrics with their CIs."""
    level = metrics["patient_level"]
    patients = level["metrics"] | {"intervals": level["intervals"], "bootstrap": {"unit": "patient"}}
    names = ["accuracy", "qwk", "balanced_accuracy", "macro_f1", "mae_grades"]
    if level["rule"] == "mean-prob":
        names.append("roc_auc_ovr_macro")
    if "remission" in patients:
        names += [f"remission_{name}" for name in REMISSION_SCALARS if name != "auroc" or level["rule"] != "max"]
    meanings = SCALARS | REMISSION_SCALARS
    rows = [
        [_label(name), fmt(stats.metric_value(patients, name)), ci_text(patients, name), meanings[_key(name)]]
        for name in names
    ]
    png = Path(run_dir) / "patients_confusion_matrix.png"
    return (
        f"<p>{patients['num_patients']} patients ({metrics['num_images']} images). A patient's grade is "
        f"{html.escape(patient_rule_text(level['rule']))} (--patient-grade {html.escape(level['rule'])}); "
        "one row per patient in patients.csv.</p>"
        + (embed_png(png, "patient-level confusion matrix") if png.exists() else "")
        + table(["metric", "value", "95% CI", "meaning"], rows)
        + bootstrap_note(patients)
        + '<p class="note">Patient-level intervals are wider than image-level ones: there are fewer patients than '
        "images, and each patient counts once.</p>"
    )


def ood_html(metrics, images="validation images"):
    """One sentence on the images flagged as unlike the training images, or '' without the check."""
    flags = metrics.get("out_of_distribution")
    if not flags:
        return ""
    css = "warn" if flags["rate"] > 0.05 else "note"
    return (
        f'<p class="{css}">Unlike the training images (out-of-distribution check): {flags["flagged"]} of '
        f"{flags['images']} {images} ({100 * flags['rate']:.1f}%) flagged; the check is calibrated at training to "
        "flag about 1% of the validation images, and a flagged image's grade is not reliable.</p>"
    )


def patient_summary(metrics):
    """One line of the summary card with the patient-level accuracy and QWK, or '' without groups."""
    level = metrics.get("patient_level")
    if not level:
        return ""
    patients = level["metrics"] | {"intervals": level["intervals"]}
    figures = ", ".join(
        f"{LABELS[name]} {fmt(patients[name], 2)} ({ci_text(patients, name)})" for name in ("accuracy", "qwk")
    )
    return (
        f"<p>Per patient ({patients['num_patients']} patients, --patient-grade {html.escape(level['rule'])}): "
        f"{html.escape(figures)}. The intervals resample whole patients.</p>"
    )


def _key(name):
    return name.removeprefix("remission_")


def patient_section(run_dir, metrics):
    """[("Patient level", html)] when the evaluation had groups, else []."""
    return [("Patient level", patients_html(run_dir, metrics))] if metrics.get("patient_level") else []


def timing_cells(timing):
    """A row of the inference-time table: device, precision, batch-1 mean, median and p95 ms, throughput."""
    keys = ("batch1_mean_ms", "batch1_median_ms", "batch1_p95_ms", "throughput_images_per_s")
    return [timing["device"], timing["precision"], *(fmt(timing[key], 1) for key in keys)]


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
        [timing_cells(timing)],
    ) + (f'<p class="warn">{note[0].upper() + note[1:]}.</p>' if note else "")


def curves_html(curves):
    """The training curves, (heading, curves.png, history) each, and one sentence under them when validation
    accuracy runs above training accuracy."""
    parts = [
        (f"<h3>{html.escape(heading)}</h3>" if heading else "") + embed_png(png, f"{heading} loss and accuracy curves")
        for heading, png, _ in curves
    ]
    if any(validation_above_training(history) for *_, history in curves):
        parts.append(
            '<p class="note">Validation accuracy runs above training accuracy: training images are augmented '
            "and validation images are not, so the training figures come from harder images.</p>"
        )
    return "\n".join(parts)


def setting_text(value):
    """A setting as a reader wants it: '–' for none, yes/no, lists and records spelled out, not JSON."""
    if value is None or value == "" or value == []:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {setting_text(v)}" for key, v in value.items())
    if isinstance(value, list):
        return ("\n" if any(isinstance(v, dict) for v in value) else ", ").join(setting_text(v) for v in value)
    return str(value)


def settings_html(config):
    """The resolved settings: each value left-aligned next to its name."""
    return table(["setting", "value"], [[key, setting_text(value)] for key, value in config.items()], False, "settings")


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
                f'<p class="warn">{len(leaks)} group(s) appear in more than one subset: '
                f"{html.escape(', '.join(leaks[:10]))}.</p>"
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


def write_report(path, title, summary, sections):
    """One self-contained page, every image embedded: the summary card, then sections, a list of (heading, html)."""
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = f'<section class="card">\n<h2>Summary</h2>\n{summary}\n</section>\n' + "\n".join(
        f"<section>\n<h2>{html.escape(heading)}</h2>\n{content}\n</section>" for heading, content in sections
    )
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f'<p class="note">Generated {generated} by ucgrade. '
        "Research tool: not a medical device; review the results before relying on them.</p>\n"
        f"{body}\n</body></html>\n"
    )
    files.write_text(path, page)


def grades_html(class_names):
    return f"<p>Grades in order: <b>{html.escape(' < '.join(class_names))}</b>.</p>"


def failed_html(failed):
    """The optional parts of a finished run that could not be made, (part, reason) each, for the summary card."""
    if not failed:
        return ""
    items = "".join(f"<li>{html.escape(part)}: {html.escape(reason)}</li>" for part, reason in failed)
    return (
        '<h3 class="warn">What failed</h3><p class="warn">Training finished and the metrics and predictions are '
        f"complete, but these parts could not be made:</p><ul>{items}</ul>"
    )


def run_report(run_dir, cams=(), failed=()):
    """Build report.html for a single training run from the files in run_dir.

    cams: list of (caption, PNG path) Grad-CAM overlays. failed: (part, reason) of the optional parts that failed.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    chosen = "Last" if config.get("select") == "last" else "Best"
    summary = (
        grades_html(metrics["class_names"])
        + tiles(headline(metrics))
        + f"<p>{chosen} epoch {metrics.get('best_epoch')} of {metrics.get('epochs_completed')} "
        f"({html.escape(metrics.get('status', 'finished'))}), scored on {metrics['num_images']} validation images. "
        f"ImageNet weights: {'yes' if config.get('pretrained_used') else 'no'}.</p>"
        + patient_summary(metrics)
        + ood_html(metrics)
        + caveats(
            config,
            "The model",
            "The best epoch was chosen by its accuracy on these same validation images",
            "or compare runs by cross-validation (--folds)",
        )
        + failed_html(failed)
    )
    sections = [
        (
            "Confusion matrices (best.pt, validation set)",
            confusion_pair(run_dir),
        ),
        ("Metrics (best.pt, validation set)", metrics_html(metrics)),
        *patient_section(run_dir, metrics),
    ]
    if (run_dir / "history.csv").exists():
        history = read_history(run_dir / "history.csv")
        sections.append(("Training curves", curves_html([("", run_dir / "curves.png", history)])))
    if (run_dir / "roc.png").exists():
        sections.append(("ROC curves", embed_png(run_dir / "roc.png", "ROC curves")))
    if (run_dir / "errors.png").exists():
        sections.append(("Most confidently wrong images", embed_png(run_dir / "errors.png", "errors")))
    else:
        sections.append(("Most confidently wrong images", "<p>No validation image was misclassified.</p>"))
    if cams:
        sections.append(("Grad-CAM: where the model looked", cams_html(cams)))
    sections += [
        ("Inference time", inference_html(metrics.get("inference_time"))),
        ("Dataset and split", dataset_html(run_dir, class_names=metrics["class_names"])),
        ("Settings", settings_html(config)),
    ]
    write_report(run_dir / "report.html", f"UC severity grading run: {run_dir.name}", summary, sections)


def caveats(config, model, selection, remedy=""):
    """What makes the metrics of a report lean optimistic: the choice of the best epoch (not with
    --select last) and, without --groups, the split."""
    if config.get("select") == "last":
        notes = (
            f'<p class="note">{model} is that of the last epoch (--select last), chosen without looking at the '
            "validation images, so the choice of epoch does not flatter these figures.</p>"
        )
    else:
        notes = (
            f'<p class="note">{selection}, so these figures lean optimistic (--select last avoids this); '
            "for an estimate to publish, grade a separate test set with predict.py"
            f"{', ' + remedy if remedy else ''}.</p>"
        )
    if not config.get("groups"):
        notes += (
            '<p class="warn">The split was made image by image (no --groups file): if a patient contributed several '
            "images, some may be in training and others in validation, which flatters every metric here.</p>"
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
        '<p class="note">Red marks the regions that raised the score of the predicted grade most.</p>'
        f'<div class="gallery">{figures}</div>'
    )


def _label(name):
    return "remission " + LABELS[_key(name)] if name.startswith("remission_") else LABELS[name]


def cv_report(run_dir, summary_table, pooled, failed=()):
    """report.html of a cross-validation run: the pooled metrics and plots, the fold table, and each fold's curves.

    Everything is embedded, as in a single run's report; each fold folder also keeps its own report.html.
    failed: (part, reason) of the pooled parts that could not be made; the folds' own come from their metrics.json.
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
    spread = {row["metric"]: f"{row['mean']} ± {row['std']}" for row in summary_table if row["mean"]}
    fold_metrics = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    timings = [m.get("inference_time") for m in fold_metrics]
    fold_failed = [
        (f"fold{k}: {f['part']}", f["reason"]) for k, m in enumerate(fold_metrics, 1) for f in m.get("failed", [])
    ]
    timing_rows = [[f"fold{k}", *timing_cells(t)] for k, t in enumerate(timings, 1) if t]
    # a few Grad-CAM overlays, taken from the folds in turn
    per_fold = [[(f"fold{k}: {caption}", path) for caption, path in read_cams(d)] for k, d in enumerate(fold_dirs, 1)]
    cams = [c for group in itertools.zip_longest(*per_fold) for c in group if c is not None]
    cams = cams[: max(map(len, per_fold), default=0)]
    grouped = f" grouped by {html.escape(str(config['groups']))}" if config.get("groups") else ""
    summary = (
        f"<p>{folds}-fold cross-validation{grouped}. Each image is validated exactly once, by the model that did not "
        f"train on it; the pooled out-of-fold predictions of all {pooled['num_images']} images are scored here.</p>"
        + grades_html(pooled["class_names"])
        + tiles(headline(pooled, spread))
        + f"<p>ImageNet weights: {'yes' if config.get('pretrained_used') else 'no'}.</p>"
        + patient_summary(pooled)
        + ood_html(pooled)
        + caveats(
            config,
            "Each fold's model",
            "Each fold's model is its best epoch, chosen by its accuracy on that fold's validation images",
        )
        + failed_html([*failed, *fold_failed])
    )
    curves = [
        (f"fold{k}", d / "curves.png", read_history(d / "history.csv"))
        for k, d in enumerate(fold_dirs, 1)
        if (d / "curves.png").exists() and (d / "history.csv").exists()
    ]
    sections = [
        (
            "Pooled confusion matrices",
            confusion_pair(run_dir),
        ),
        ("Pooled out-of-fold metrics", metrics_html(pooled)),
        *patient_section(run_dir, pooled),
        ("Metrics per fold (mean ± standard deviation over the folds)", fold_table),
        ("Training curves", curves_html(curves)),
        ("ROC curves (pooled)", embed_png(run_dir / "roc.png", "ROC curves")),
        (
            "Most confidently wrong images (pooled)",
            embed_png(run_dir / "errors.png", "errors")
            if (run_dir / "errors.png").exists()
            else "<p>No image was misclassified.</p>",
        ),
    ]
    if cams:
        sections.append(("Grad-CAM: where the model looked", cams_html(cams)))
    timing_header = [
        "fold",
        "device",
        "precision",
        "batch 1 mean (ms)",
        "median (ms)",
        "p95 (ms)",
        "throughput (img/s)",
    ]
    sections += [
        ("Inference time", table(timing_header, timing_rows) if timing_rows else "<p>not measured</p>"),
        (
            "Dataset and folds",
            "<p>Images validated in each fold (each fold's model trained on the other folds):</p>"
            + dataset_html(run_dir, split, pooled["class_names"]),
        ),
        ("Settings", settings_html(config)),
        (
            "Folds",
            "<p>Each fold folder also holds its own report.html, checkpoints, predictions and Grad-CAM overlays: "
            + ", ".join(f"fold{k}/report.html" for k in range(1, folds + 1))
            + ".</p>",
        ),
    ]
    write_report(run_dir / "report.html", f"UC severity grading, cross-validation: {run_dir.name}", summary, sections)


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


def _read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _read_metrics(path):
    metrics = _read_json(path)
    return metrics, list(metrics["class_names"]), metrics["confusion_matrix"]


def test_report(out_dir):
    """report.html of a test set graded by predict.py --evaluate, from the files in out_dir."""
    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    weights = metrics["weights"]
    models = (
        f"the mean probabilities of {len(weights)} fold models (an ensemble)"
        if metrics.get("ensemble")
        else html.escape(weights[0])
    )
    notes = []
    if metrics.get("missing_grades"):
        notes.append(
            f"<p class=note>The test set has no images of {html.escape(', '.join(metrics['missing_grades']))}; "
            "those grades are absent from the figures.</p>"
        )
    leaked = metrics.get("images_in_training")
    if leaked:
        notes.append(
            f'<p class="warn">{leaked} test image(s) have the same bytes as images the model trained on: that is '
            "leakage, and it flatters every figure here; remove them from the test set.</p>"
        )
    elif leaked is None:
        notes.append(
            '<p class="note">Not checked for images the model trained on: the run\'s split.csv or its data folder '
            "is not at hand.</p>"
        )
    else:
        notes.append("<p>Checked: no test image has the bytes of an image the model trained on.</p>")
    summary = (
        f"<p>Test set <b>{html.escape(metrics['test_dir'])}</b>: {metrics['num_images']} images graded by "
        f"{models}.</p>"
        + grades_html(metrics["class_names"])
        + tiles(headline(metrics))
        + patient_summary(metrics)
        + ood_html(metrics, "test images")
        + "".join(notes)
    )
    sections = [
        (
            "Confusion matrices (test set)",
            confusion_pair(out_dir),
        ),
        ("Metrics (test set)", metrics_html(metrics)),
        *patient_section(out_dir, metrics),
    ]
    if metrics.get("per_model"):
        header = ["model"] + [LABELS[name] for name in SCALARS]
        rows = [[Path(m["weights"]).parent.name] + [fmt(m.get(name)) for name in SCALARS] for m in metrics["per_model"]]
        rows.append(["ensemble (mean probabilities)"] + [fmt(metrics.get(name)) for name in SCALARS])
        sections.append(("Each fold's model", table(header, rows)))
    sections.append(("ROC curves", embed_png(out_dir / "roc.png", "ROC curves")))
    if (out_dir / "errors.png").exists():
        sections.append(("Most confidently wrong images", embed_png(out_dir / "errors.png", "errors")))
    else:
        sections.append(("Most confidently wrong images", "<p>No test image was misclassified.</p>"))
    counts = np.bincount(
        [metrics["class_names"].index(r["true"]) for r in files.read_csv(out_dir / "predictions.csv")],
        minlength=len(metrics["class_names"]),
    )
    skipped = files.read_csv(out_dir / "skipped.csv") if (out_dir / "skipped.csv").exists() else []
    dataset = table(["grade", "test images"], [[n, int(c)] for n, c in zip(metrics["class_names"], counts)])
    if skipped:
        dataset += f'<p class="warn">{len(skipped)} file(s) were skipped:</p>' + table(
            ["file", "reason"], [[r["path"], r["reason"]] for r in skipped]
        )
    else:
        dataset += "<p>No files were skipped.</p>"
    sections.append(("Test images", dataset))
    write_report(out_dir / "report.html", f"UC severity grading, test set: {out_dir.name}", summary, sections)


def redraw(run_dir):
    """Draw curves.png, the confusion matrices and roc.png again from a run folder's files."""
    run_dir = Path(run_dir)
    metrics, class_names, matrix = read_saved(run_dir / "metrics.json", _read_metrics)
    if (run_dir / "history.csv").exists():  # a cross-validation folder has none; its folds do
        plot_curves(read_saved(run_dir / "history.csv", read_history), run_dir / "curves.png")
    plot_confusions(matrix, class_names, run_dir, pooled="folds" in metrics)
    _, targets, probs = read_saved(run_dir / "predictions.csv", read_predictions, class_names)
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
        if not path.is_file() or "confusion_matrix" not in read_saved(path, _read_json):
            raise UserError(
                f"'{run}' has no evaluated model yet (it was interrupted before one); "
                f"resume it with: python qq.py --resume {run}"
            )
        redraw(run)
        print(f"redrew the plots of {run}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
