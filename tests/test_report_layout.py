"""The report a clinician reads in one minute (issue 15): labels that fit, integer epochs, visible ROC curves,
the summary first and the settings last, a page that prints on A4.

The plots are real matplotlib figures, drawn with `fig.canvas.draw()` and measured by the window extents of
their texts; the reports are written from real runs.
"""

import base64
import io
import itertools
import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import FAST, cli, make_folder, train
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from test_report_cam import Page

from ucgrade import figures, files, pages, records, sections

HYPERKVASIR = [  # as the public dataset names its folders: a shared prefix, the grade at the end
    "ulcerative-colitis-grade-0-1",
    "ulcerative-colitis-grade-1",
    "ulcerative-colitis-grade-1-2",
    "ulcerative-colitis-grade-2",
    "ulcerative-colitis-grade-2-3",
    "ulcerative-colitis-grade-3",
]
SHORT = ["mayo0", "mayo1", "mayo2", "mayo3", "mayo4", "mayo5"]
LONG = [  # 30 characters each, nothing in common at the start; the last one with no place to break
    "endoscopic-remission-no-ulcers",
    "mild-disease-erythema-vascular",
    "moderate-disease-friability-xx",
    "severe-disease-spontaneous-bld",
    "indeterminate-activity-unclear",
    "Ulcerativecolitisworstgradeabc",
]
NAMES = {"short": SHORT, "30 characters": LONG, "shared prefix": HYPERKVASIR}


def drawn(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def extent(artist, renderer):
    return artist.get_window_extent(renderer)


def assert_apart(boxes, what):
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), f"{what} {i} and {j} overlap: {a} {b}"


def confusion_case(n, kind):
    names = NAMES[kind][:n]
    rng = np.random.default_rng(n)
    targets = np.repeat(np.arange(n), 7)
    preds = np.clip(targets + rng.integers(-1, 2, len(targets)), 0, n - 1)
    matrix = [[int(np.sum((targets == i) & (preds == j))) for j in range(n)] for i in range(n)]
    return names, matrix


# ----------------------------------------------------------------------------- grade names


def test_shared_prefix_is_named_once_and_the_distinct_part_shown():
    prefix, labels = figures.grade_labels(HYPERKVASIR)
    assert prefix == "ulcerative-colitis-grade-"
    assert labels == ["0-1", "1", "1-2", "2", "2-3", "3"]
    # a shared start is cut only after a separator, and never leaves a name empty
    assert figures.grade_labels(["mild", "moderate", "severe"]) == ("", ["mild", "moderate", "severe"])
    assert figures.grade_labels(SHORT[:4]) == ("", SHORT[:4])
    assert figures.grade_labels(["mayo_0", "mayo_1"]) == ("mayo_", ["0", "1"])
    assert figures.grade_labels(["uc", "uc-severe"]) == ("", ["uc", "uc-severe"])
    assert figures.grade_labels(["grade 1", "grade 2", "grade 3"]) == ("grade ", ["1", "2", "3"])


@pytest.mark.parametrize("width", [0.3, 0.7, 1.2, 3.0])
def test_long_names_are_wrapped_never_cut(width):
    for name in LONG + HYPERKVASIR + ["a", "grade 1 (mild)"]:
        lines = figures.wrap(name, width).split("\n")
        assert "".join(lines) == name  # every character kept, in order
        assert all(lines)
        if width >= 1.2 and "-" in name:
            assert all(line.endswith("-") for line in lines[:-1]), lines  # broken after the hyphens


# ----------------------------------------------------------------------------- confusion matrices


@pytest.mark.parametrize("normalize", [False, True], ids=["counts", "normalised"])
@pytest.mark.parametrize("kind", list(NAMES))
@pytest.mark.parametrize("n", [2, 4, 6])
def test_confusion_matrix_labels_fit(n, kind, normalize):
    names, matrix = confusion_case(n, kind)
    fig = figures.confusion_figure(matrix, names, normalize, "Confusion matrix\n(counts)")
    renderer = drawn(fig)
    ax, colorbar_ax = fig.axes
    figure_box = fig.bbox
    xlabels, ylabels = ax.get_xticklabels(), ax.get_yticklabels()
    assert len(xlabels) == len(ylabels) == n
    x_boxes = [extent(t, renderer) for t in xlabels]
    y_boxes = [extent(t, renderer) for t in ylabels]
    colorbar_box = colorbar_ax.get_tightbbox(renderer)  # the bar with its tick labels
    title = next(t for t in fig.texts if t.get_text().startswith("Confusion matrix"))
    for box in x_boxes + y_boxes + [colorbar_box, extent(title, renderer)]:
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1, box
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1, box
    assert_apart(x_boxes, "x labels")
    assert_apart(y_boxes, "y labels")
    for box in x_boxes + y_boxes:
        assert not box.overlaps(colorbar_box)
        assert not box.overlaps(extent(title, renderer))
    assert not any(box.overlaps(extent(ax.xaxis.label, renderer)) for box in x_boxes)
    assert not any(box.overlaps(extent(ax.yaxis.label, renderer)) for box in y_boxes)
    # every label is its whole distinct part, wrapped but never cut; a shared prefix is named once, in the title
    prefix, distinct = figures.grade_labels(names)
    assert [t.get_text().replace("\n", "") for t in xlabels] == distinct
    counted = [re.sub(r"\s*\(n=\d+\)$", "", t.get_text().replace("\n", "")) for t in ylabels]
    assert counted == distinct
    if normalize:
        assert all(re.search(r"\(n=7\)$", t.get_text()) for t in ylabels)
    everything = " ".join(t.get_text().replace("\n", "") for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    if prefix:
        assert title.get_text().replace("\n", "").count(prefix) == 1
        assert everything.count(prefix) == 1
    else:
        assert "grades:" not in title.get_text()
    # cells large enough to read their numbers at the report's size, not squeezed by the labels
    cell = ax.get_window_extent(renderer).width / fig.dpi / n
    assert cell >= 0.79
    assert all(t.get_fontsize() >= 12 for t in ax.texts)


def test_confusion_matrix_sizes_itself_to_its_grades():
    sizes = {}
    for n in (2, 4, 6):
        names, matrix = confusion_case(n, "short")
        sizes[n] = figures.confusion_figure(matrix, names).get_size_inches()
    assert sizes[2][0] < sizes[4][0] < sizes[6][0] and sizes[2][1] < sizes[4][1] < sizes[6][1]
    # longer names take more room beside the matrix, not from its cells
    names, matrix = confusion_case(6, "30 characters")
    long_fig = figures.confusion_figure(matrix, names)
    names, matrix = confusion_case(6, "short")
    short_ax = figures.confusion_figure(matrix, names).axes[0]
    assert long_fig.get_size_inches()[0] > sizes[6][0]
    assert long_fig.axes[0].get_position().width * long_fig.get_size_inches()[0] >= (
        short_ax.get_position().width * sizes[6][0] - 1e-6
    )


# ----------------------------------------------------------------------------- training curves


@pytest.mark.parametrize("epochs", [1, 2, 3, 7, 25])
def test_epoch_ticks_are_whole_numbers(epochs):
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_acc": 0.5, "val_acc": 0.6}
        for e in range(1, epochs + 1)
    ]
    fig = figures.curves_figure(history)
    drawn(fig)
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert all(t.get_text() == str(int(t.get_position()[0])) for t in ax.get_xticklabels() if t.get_text())


def test_validation_above_training_is_noticed():
    above = [{"train_acc": 0.6, "val_acc": 0.7}, {"train_acc": 0.8, "val_acc": 0.9}, {"train_acc": 0.9, "val_acc": 0.9}]
    assert sections.validation_above_training(above)
    assert not sections.validation_above_training([{"train_acc": 0.9, "val_acc": 0.7}, above[0]])


# ----------------------------------------------------------------------------- ROC curves


@pytest.mark.parametrize("n", [2, 4, 6])
def test_roc_curves_of_a_perfect_model_all_stay_visible(n):
    """The curves of a perfect model coincide; each must still change the picture where it is drawn."""
    names = HYPERKVASIR[:n]
    targets = np.repeat(np.arange(n), 5)
    probs = np.full((len(targets), n), 0.1 / n)
    probs[np.arange(len(targets)), targets] += 0.9
    fig = figures.roc_figure(targets, probs, names, remission=names[0])
    renderer = drawn(fig)
    ax = fig.axes[0]
    curves = [line for line in ax.get_lines() if line.get_label() != "chance"]
    assert len(curves) == n + 1  # every grade, and active vs remission

    def picture():
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)

    box = ax.get_window_extent(renderer)
    height = fig.canvas.get_width_height()[1]
    inside = (slice(int(height - box.y1), int(height - box.y0)), slice(int(box.x0), int(box.x1)))
    everything = picture()[inside]
    for line in curves:
        line.set_visible(False)
        without = picture()[inside]
        line.set_visible(True)
        changed = (np.abs(everything - without).max(-1) > 60).sum()
        assert changed >= 100, (line.get_label(), changed)  # at least a hundred pixels of its own colour
    styles = {(str(line.get_linestyle()), line.get_marker(), line.get_linewidth()) for line in curves}
    assert len(styles) == len(curves)  # no two curves drawn alike
    # the AUC of every grade in the legend, which stays inside the figure and clear of the axis texts
    legend = ax.get_legend()
    entries = [t.get_text() for t in legend.get_texts()]
    _, distinct = figures.grade_labels(names)
    for label in distinct:
        assert f"{label} (AUC 1.00)" in entries
    assert "active vs remission (AUC 1.00)" in entries
    assert "ulcerative-colitis-grade-" in legend.get_title().get_text()
    legend_box = extent(legend, renderer)
    assert fig.bbox.x0 <= legend_box.x0 and legend_box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= legend_box.y0
    assert not legend_box.overlaps(extent(ax.xaxis.label, renderer))
    assert not legend_box.overlaps(box)


@pytest.mark.parametrize("kind", list(NAMES))
def test_roc_legend_holds_long_names_whole(kind):
    names = NAMES[kind]
    rng = np.random.default_rng(1)
    targets = np.repeat(np.arange(6), 6)
    probs = rng.dirichlet(np.ones(6), len(targets))
    fig = figures.roc_figure(targets, probs, names)
    renderer = drawn(fig)
    legend = fig.axes[0].get_legend()
    _, distinct = figures.grade_labels(names)
    texts = [t.get_text().replace("\n", "") for t in legend.get_texts()]
    assert [text.rsplit(" (AUC", 1)[0] for text in texts[:-1]] == distinct and texts[-1] == "chance"
    box = extent(legend, renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1


# ----------------------------------------------------------------------------- error grid


def test_error_captions_show_the_distinct_part_and_stay_apart(tmp_path, monkeypatch):
    names = HYPERKVASIR[:4]
    root = make_folder(tmp_path / "data", {name: 2 for name in names})
    rows = [  # eight wrong images, two rows of the grid
        {
            "path": f"{true}/{true}_{k // 4:03d}.jpg",
            "true": true,
            "predicted": names[(k + 1) % 4],
            "p_predicted": f"{0.9 - k / 20:.2f}",
        }
        for k, true in enumerate(names * 2)
    ]
    saved, save_figure = [], files.save_figure
    monkeypatch.setattr(files, "save_figure", lambda path, fig: saved.append(fig) or save_figure(path, fig))
    assert figures.plot_errors(rows, root, 64, tmp_path / "errors.png", class_names=names) == 8
    Image.open(tmp_path / "errors.png").verify()
    fig = saved[0]
    renderer = drawn(fig)
    captions = [ax.title for ax in fig.axes]
    lines = captions[0].get_text().split("\n")  # the path under the data folder, wrapped, never cut
    assert "".join(lines[:-2]) == "ulcerative-colitis-grade-0-1/ulcerative-colitis-grade-0-1_000.jpg"
    assert lines[-2:] == ["true: 0-1", "predicted: 1 (p=0.90)"]
    heading = next(t for t in fig.texts if t.get_text().startswith("Most confidently wrong"))
    assert "grades: ulcerative-colitis-grade-…" in heading.get_text()
    texts = [extent(t, renderer) for t in captions] + [extent(heading, renderer)]
    assert_apart(texts, "captions")
    images = [extent(ax, renderer) for ax in fig.axes]
    assert_apart(images, "images")
    for box in texts:  # no caption on an image, the one above included
        assert not any(box.overlaps(image) for image in images)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1


# ----------------------------------------------------------------------------- the HTML page


def h2s(html_text):
    return re.findall(r"<h2>(.*?)</h2>", html_text)


def section(html_text, heading):
    """The HTML of the section under one <h2> heading."""
    start = html_text.index(f"<h2>{heading}")
    return html_text[start : html_text.index("</section>", start)]


def test_single_run_report_reads_in_the_order_a_clinician_needs(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.pt"))
    history = records.read_history(run / "history.csv")
    for above in (True, False):  # the sentence under the curves follows the history
        rows = [row | {"val_acc": row["train_acc"] + (0.1 if above else -0.1)} for row in history]
        records.write_history(run / "history.csv", rows)
        pages.write_report(run, "run", records.read_cams(run))
        text = (run / "report.html").read_text()
        sentence = "training images are augmented and validation images are not"
        assert (sentence in section(text, "Training curves")) == above
        assert text.count(sentence) == (1 if above else 0)

    order = h2s(text)
    assert order[0] == "Summary"
    expected = [
        "Confusion matrices",
        "Metrics",
        "Training curves",
        "ROC curves",
        "Most confidently wrong images",
        "Grad-CAM",
        "Inference time",
        "Dataset and split",
        "Settings",
    ]
    positions = [next(i for i, h in enumerate(order) if h.startswith(name)) for name in expected]
    assert positions == sorted(positions) and positions[0] == 1 and order[-1] == "Settings"

    metrics = json.loads((run / "metrics.json").read_text())
    card = section(text, "Summary")
    assert text.index('<section class="card">') < text.index("<h2>Summary")
    card_text = " ".join(" ".join(Page(card).text).split())
    assert "Grades in order: mild < moderate < severe" in card_text
    for label, key in (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("QWK", "qwk")):
        assert f"{label} {metrics[key]:.3f}" in card_text, label
    assert f"on {metrics['num_images']} validation images" in card_text
    assert "so these figures lean optimistic" in card_text  # the note on the choice of the best epoch
    assert "The split was made image by image" in card_text

    settings = section(text, "Settings")
    cells = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", settings)
    values = dict(cells)
    config = json.loads((run / "config.json").read_text())
    assert len(cells) == len(config)
    assert "class=num" not in settings  # values left-aligned next to their names
    assert values["weights"] == values["groups"] == "–"
    assert values["freeze_backbone"] == "no" and values["pretrained_used"] == "no"
    assert values["class_names"] == "mild, moderate, severe" and values["img_size"] == "64"
    assert not re.search(r"\b(None|null|False|True|false|true)\b", " ".join(values.values()))


def test_plots_are_shown_at_their_size_and_print_on_a4(trained_run):
    text = (trained_run / "report.html").read_text()
    for width, data in re.findall(r'<img alt="[^"]*" width="(\d+)" src="data:image/png;base64,([^"]+)"', text)[:4]:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert int(width) == round(image.width * 96 / image.info["dpi"][0])  # inches at 96 CSS px each
    css = re.sub(r"\s+", "", text[text.index("<style>") : text.index("</style>")])
    assert "@page{size:A4" in css
    print_rules = css[css.index("@mediaprint{") :]
    assert "img{max-width:100%;height:auto" in css  # no image wider than the page
    assert "max-height:250mm" in print_rules  # nor taller than an A4 page's printable height
    assert "break-inside:avoid" in print_rules  # and none split across two pages


# ----------------------------------------------------------------------------- a real run with six long grade names


@pytest.fixture(scope="module")
def hyperkvasir_cv_run(module_tmp):
    """One epoch of 2-fold cross-validation on six grade folders named as a public dataset names them."""
    root = make_folder(module_tmp / "data", {name: 4 for name in HYPERKVASIR})
    torch.manual_seed(0)
    argv = ["--data", root, "--out", module_tmp / "out", "--epochs", "1", "--folds", "2", *FAST]
    # Grad-CAM overlays too (two per fold), for their place in the report
    assert train([*argv, "--remission-upto", HYPERKVASIR[1], "--precision", "fp32", "--cam-examples", "2"]) == 0
    return module_tmp / "out" / "train"


def test_cross_validation_report_with_six_long_grade_names(hyperkvasir_cv_run):
    run = hyperkvasir_cv_run
    text = (run / "report.html").read_text()
    order = h2s(text)
    expected = [
        "Summary",
        "Pooled confusion matrices",
        "Pooled out-of-fold metrics",
        "Metrics per fold",
        "Training curves",
        "ROC curves",
        "Most confidently wrong images",
        "Grad-CAM",
        "Inference time",
        "Dataset and folds",
        "Settings",
        "Folds",
    ]
    positions = [next(i for i, h in enumerate(order) if h.startswith(name)) for name in expected]
    assert positions == sorted(positions)
    card_text = " ".join(" ".join(Page(section(text, "Summary")).text).split())
    pooled = json.loads((run / "metrics.json").read_text())
    assert f"accuracy {pooled['accuracy']:.3f} folds:" in card_text
    sensitivity = pooled["remission"]["sensitivity"]
    assert f"sensitivity {sensitivity:.3f} active: above ulcerative-colitis-grade-1 folds:" in card_text
    assert "lean optimistic" in card_text
    # the run's own confusion matrix, drawn again from its files, has labels that fit
    fig = figures.confusion_figure(pooled["confusion_matrix"], pooled["class_names"], normalize=True)
    renderer = drawn(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0-1", "1", "1-2", "2", "2-3", "3"]
    assert_apart([extent(t, renderer) for t in ax.get_xticklabels()], "x labels")
    with Image.open(run / "confusion_matrix.png") as image:
        assert image.width < 1400  # six short labels: no room spent on the shared prefix


def test_predict_lines_with_six_long_grade_names_fit_120_characters(hyperkvasir_cv_run, tmp_path, monkeypatch):
    """issue 23: a line per image of about 330 characters with the whole names; the part that differs, as the plots
    show it, and the shared start named once."""
    image = next((hyperkvasir_cv_run.parent.parent / "data" / HYPERKVASIR[3]).iterdir())
    shutil.copy(image, tmp_path / "scan.jpg")
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(
        "predict.py", "scan.jpg", "--weights", hyperkvasir_cv_run / "fold1" / "best.pt", "--device", "cpu"
    )
    assert code == 0, err
    (line,) = out.splitlines()
    assert len(line) < 120, line
    assert re.fullmatch(r"scan\.jpg: (0-1|1|1-2|2|2-3|3) \(p=\d\.\d\d\)(  \[[^]]+\])?  0-1=\d\.\d{3}  1=\d\.\d{3}  "
                        r"1-2=\d\.\d{3}  2=\d\.\d{3}  2-3=\d\.\d{3}  3=\d\.\d{3}", line), line  # fmt: skip
    assert "ulcerative-colitis-grade-" not in out and err.count("ulcerative-colitis-grade-") == 1
