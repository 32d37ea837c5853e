"""Figures: the plots of an evaluation (curves, confusion matrices, ROC curves, the error grid), drawn with
matplotlib from the saved files.

Every plot is laid out in inches from its number of grades and the measured width of their names, so that
labels fit whatever the grades are called.
"""

import itertools
import re
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
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from . import files  # noqa: E402
from .grader import SEPARATORS, grade_labels  # noqa: E402

# ----------------------------------------------------------------------------- grade names on plots

LABEL_POINTS = 10  # tick labels
_TEXT_PATHS = TextToPath()


def text_width(text, points=LABEL_POINTS):
    """Inches that one line of text takes as matplotlib draws it, with 5% to spare for hinting."""
    width, _, _ = _TEXT_PATHS.get_text_width_height_descent(text, FontProperties(size=points), ismath=False)
    return 1.05 * width / 72


def text_height(text, points=LABEL_POINTS):
    """Inches that text of one or more lines takes (matplotlib spaces lines by 1.2 font sizes)."""
    return (text.count("\n") + 1) * 1.2 * points / 72


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
    if normalize:  # a row of fractions hides how few images it may rest on; below its grade where the row has room,
        # so that the two matrices of six grades stand side by side in the report
        ylabels = [
            label + ("\n" if label.count("\n") + 2 <= row_lines + 1 or text_width(label.split("\n")[-1] + f" (n={t})")
                     > ywidth else " ") + f"(n={t})"
            for label, t in zip(ylabels, totals[:, 0].astype(int))
        ]  # fmt: skip
    vmax = 1 if normalize else max(int(matrix.max()), 1)
    side = n * cell
    left = 0.15 + 0.3 + widest_line(ylabels) + 0.12  # margin, axis label, tick labels, ticks
    bottom = 0.15 + 0.3 + max(text_height(label) for label in xlabels) + 0.12
    right = 0.12 + 0.15 + 0.12 + text_width(f"{vmax:.1f}" if normalize else str(vmax), 9) + 0.15  # gap, colour bar
    width = left + side + right
    centre = left + side / 2  # the title stands over the matrix
    heading = "\n".join(
        wrap(line, 2 * min(centre, width - centre) - 0.2, 12)
        for line in (title or "Confusion matrix").split("\n") + ([prefix_note(prefix)] if prefix else [])
    )
    height = bottom + side + 0.15 + text_height(heading, 12) + 0.15
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    colorbar_ax = fig.add_axes(((left + side + 0.12) / width, bottom / height, 0.15 / width, side / height))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
    colorbar = fig.colorbar(image, cax=colorbar_ax)
    if not normalize:
        colorbar.locator = MaxNLocator(integer=True)  # counts have no fractional ticks
        colorbar.update_ticks()
    colorbar_ax.tick_params(labelsize=9)
    write_cells(ax, matrix, normalize, 14 if cell >= 1 else 12, vmax)
    ax.set_xticks(range(n), xlabels, fontsize=LABEL_POINTS, multialignment="center")
    ax.set_yticks(range(n), ylabels, fontsize=LABEL_POINTS, multialignment="right")
    ax.set_xlabel("predicted grade", fontsize=11)
    ax.set_ylabel("true grade", fontsize=11)
    fig.text(centre / width, 1 - 0.15 / height, heading, ha="center", va="top", fontsize=12)
    return fig


def write_cells(ax, matrix, normalize, points, vmax):
    """The number in each cell of a confusion matrix, white on the dark cells."""
    for i, j in itertools.product(range(len(matrix)), range(len(matrix))):
        value = matrix[i, j]
        text = f"{value:.2f}" if normalize else str(value)
        ax.text(j, i, text, ha="center", va="center", fontsize=points, color="white" if value > vmax / 2 else "#222")


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
    curves = roc_curves(np.asarray(targets), np.asarray(probs), class_names, labels, remission)
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
        ax.plot(fpr, tpr, label=entry, **roc_style(k, grades))
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


def roc_curves(targets, probs, class_names, labels, remission):
    """(positives, scores, label) of each grade present and absent somewhere, then of active vs remission."""
    curves = [(targets == c, probs[:, c], label) for c, label in enumerate(labels)]
    curves = [(positives, scores, label) for positives, scores, label in curves if 0 < positives.sum() < len(targets)]
    if remission is not None:
        cut = class_names.index(remission)
        active = targets > cut
        if 0 < active.sum() < len(active):
            curves.append((active, probs[:, cut + 1 :].sum(1), "active vs remission"))
    return curves


def roc_style(k, grades):
    """The line of the k-th curve: a grade's own colour, dashes and hollow marker, or black for active vs remission."""
    if k >= grades:
        return {"color": "black", "linestyle": (0, (4, 4)), "linewidth": 1.2}
    wider = (grades - 1 - k) / max(grades - 1, 1)  # 1 for the first grade drawn, 0 for the last
    return {
        "color": f"C{k % 10}",
        "linestyle": ROC_DASHES[k % len(ROC_DASHES)],
        "linewidth": 1.5 + 2 * wider,
        "marker": ROC_MARKERS[k % len(ROC_MARKERS)],
        "markersize": 5 + 8 * wider,
        "markerfacecolor": "none",
        "alpha": 0.85,
    }


def plot_roc(targets, probs, class_names, path, remission=None):
    """roc.png: one-vs-rest ROC curve per grade, and remission vs active when that split is given."""
    files.save_figure(path, roc_figure(targets, probs, class_names, remission))


def plot_errors(rows, data_root, img_size, path, max_images=12, class_names=None, images="validation images"):
    """A grid of the most confidently wrong images; returns how many were shown (0 draws nothing).

    class_names: the grades, to show the part of their names that differs (default: the names in rows); images:
    what they are, for the heading (validation images, test images).
    """
    from .images import UnreadableImage, load_image, preprocess  # torch-free: predict.py --evaluate with an .onnx
    from .presets import resize_size_for

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
            image = preprocess(load_image(Path(data_root) / row["path"]), img_size, resize_size_for(img_size))
            image = image.transpose(1, 2, 0)
            ax.imshow(image)
        except UnreadableImage:
            ax.text(0.5, 0.5, "image missing", ha="center")
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    fig.text(0.5, 1 - 0.15 / height, heading, ha="center", va="top", fontsize=12)
    files.save_figure(path, fig)
    return len(wrong)
