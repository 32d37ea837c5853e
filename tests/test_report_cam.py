"""The report, the plots and Grad-CAM (issue 4): what a clinician opens, checked on real runs."""

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import torch
from conftest import ROOT, cli, make_folder
from PIL import Image

from ucgrade import figures, presets, sections, stats
from ucgrade.cam import cam_on_original, cam_overlay, grad_cam
from ucgrade.demo import make_image
from ucgrade.files import read_csv
from ucgrade.model import build_model, load_checkpoint, model_from_checkpoint


class Page(HTMLParser):
    """Every tag with its attributes, and the visible text."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, text):
        self.text.append(text)


def embedded_pngs(page):
    """The decoded bytes of every <img>; fails on any image that is not embedded."""
    images = []
    for tag, attrs in page.tags:
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:60]
            images.append(base64.b64decode(attrs["src"].split(",", 1)[1]))
    return images


def assert_self_contained(page):
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href"):
            assert key not in attrs or attrs[key].startswith("data:"), (tag, attrs[key][:80])


def test_report_is_self_contained_and_shows_the_run(trained_run):
    run = trained_run
    page = Page((run / "report.html").read_text())
    assert_self_contained(page)
    pngs = embedded_pngs(page)
    for png in pngs:
        Image.open(io.BytesIO(png)).verify()  # each one a whole PNG
    # the run's own plots, byte for byte
    for name in ("curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png", "roc.png"):
        assert (run / name).read_bytes() in pngs, name
    wrong = [r for r in read_csv(run / "predictions.csv") if r["true"] != r["predicted"]]
    assert (run / "errors.png").exists() == bool(wrong)
    if wrong:
        assert (run / "errors.png").read_bytes() in pngs
    cams = read_csv(run / "cam" / "index.csv")
    assert 1 <= len(cams) <= 2  # --cam-examples 2
    for row in cams:
        assert (run / "cam" / row["file"]).read_bytes() in pngs

    text = " ".join(" ".join(page.text).split())
    # what flatters the figures is said next to them: the best epoch chosen on them, and no --groups
    assert (
        "The best epoch was chosen by its accuracy on these same validation images, so these figures lean optimistic"
        in text
    )
    assert "The split was made image by image (no --groups file)" in text
    for heading in (
        "Dataset and split",
        "Settings",
        "Training curves",
        "Confusion matrices",
        "Metrics",
        "ROC curves",
        "Inference time",
        "Most confidently wrong images",
        "Grad-CAM",
    ):
        assert heading in text, heading
    # dataset counts, as split.csv has them
    split = read_csv(run / "split.csv")
    for grade in ("mild", "moderate", "severe"):
        n_train = sum(r["class"] == grade and r["subset"] == "train" for r in split)
        n_val = sum(r["class"] == grade and r["subset"] == "val" for r in split)
        assert f"{grade} {n_train} {n_val} {n_train + n_val}" in text, grade
    assert "No files were skipped." in text
    metrics = json.loads((run / "metrics.json").read_text())
    # the metrics table: name, value, its 95% CI, the majority-grade baseline where it has one (issue 23), one line
    # for clinicians
    ci, baseline = sections.ci_text, metrics["baseline"]
    assert f"QWK {metrics['qwk']:.3f} {ci(metrics, 'qwk')} 0.000 quadratic weighted kappa" in text
    assert (
        f"macro F1 {metrics['macro_f1']:.3f} {ci(metrics, 'macro_f1')} F1 (the balance of precision and recall)" in text
    )
    assert (
        f"balanced accuracy {metrics['balanced_accuracy']:.3f} {ci(metrics, 'balanced_accuracy')} "
        f"{baseline['balanced_accuracy']:.3f} mean of the per-grade" in text
    )
    assert f"MAE (grade steps) {metrics['mae_grades']:.3f}" in text
    for grade, row in metrics["per_class"].items():  # with the exact interval of the recall (issue 23)
        recall_ci = stats.interval_text(metrics["recall_intervals"][grade])
        assert (
            f"{grade} {row['precision']:.3f} {row['recall']:.3f} {recall_ci} {row['f1']:.3f} {row['support']}" in text
        )
    # the inference row, whole: the device, the precision and the four figures of metrics.json, under their headings
    timing = metrics["inference_time"]
    html_text = (run / "report.html").read_text()
    start = html_text.index("<h2>Inference time</h2>")
    rows = [
        re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)
        for row in re.findall(r"<tr>(.*?)</tr>", html_text[start : html_text.index("</section>", start)])
    ]
    assert rows == [
        ["device", "precision", "batch 1 mean (ms)", "median (ms)", "p95 (ms)", "throughput at batch 8 (img/s)"],
        [
            "cpu",
            metrics["precision"],
            *(f"{timing[key]:.1f}" for key in ("batch1_mean_ms", "batch1_median_ms", "batch1_p95_ms")),
            f"{timing['throughput_images_per_s']:.1f}",
        ],
    ]
    assert timing["device"] == "cpu" and timing["precision"] == metrics["precision"]
    assert "img_size 64" in text and "epochs 3" in text
    for row in cams:
        assert row["caption"] in text


def test_error_grid_shows_only_wrong_images(tmp_path):
    root = make_folder(tmp_path / "data", {"mild": 3, "severe": 2})
    rows = [
        {"path": "mild/mild_000.jpg", "true": "mild", "predicted": "severe", "p_predicted": "0.91"},
        {"path": "mild/mild_001.jpg", "true": "mild", "predicted": "mild", "p_predicted": "0.99"},
        {"path": "severe/severe_000.jpg", "true": "severe", "predicted": "mild", "p_predicted": "0.55"},
    ]
    assert figures.plot_errors(rows, root, 64, tmp_path / "errors.png") == 2
    with Image.open(tmp_path / "errors.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    assert figures.plot_errors([rows[1]], root, 64, tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()


def test_plots_stay_readable_with_ten_grades(tmp_path):
    names = [f"grade_{i}_{'x' * (i % 4)}" for i in range(10)]
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(10), 6)
    preds = np.clip(targets + rng.integers(-1, 2, len(targets)), 0, 9)
    matrix = [[int(np.sum((targets == i) & (preds == j))) for j in range(10)] for i in range(10)]
    probs = rng.dirichlet(np.ones(10), len(targets))
    figures.plot_confusion(matrix, names, tmp_path / "cm10.png")
    figures.plot_confusion(matrix, names, tmp_path / "cm10n.png", normalize=True)
    figures.plot_confusion([row[:3] for row in matrix[:3]], names[:3], tmp_path / "cm3.png")
    figures.plot_roc(targets, probs, names, tmp_path / "roc10.png", remission=names[1])
    sizes = {}
    for name in ("cm10", "cm10n", "cm3", "roc10"):
        with Image.open(tmp_path / f"{name}.png") as image:
            image.load()
            sizes[name] = image.size
    assert sizes["cm10"][0] > 1.5 * sizes["cm3"][0]  # the figure grows with the grades instead of squeezing the labels


# ----------------------------------------------------------------------------- Grad-CAM


def test_predict_cam_writes_an_overlay_per_image_at_its_size(trained_run, tmp_path):
    rng = np.random.default_rng(5)
    images = []
    for style, size in (("severe", (150, 110)), ("mild", (97, 131)), ("moderate", (120, 120))):
        path = tmp_path / f"{style}.jpg"
        make_image(style, rng, 160).resize(size).save(path)
        images.append((path, size))
    cam_dir = tmp_path / "heatmaps"
    argv = [*[p for p, _ in images], "--weights", trained_run / "best.pt", "--cam", cam_dir, "--json"]
    result = cli("predict.py", *argv, "--precision", "fp32", "--device", "cpu")
    assert result.code == 0
    assert f"Grad-CAM overlays of 3 image(s) written to {cam_dir}" in result.err
    predictions = json.loads(result.out)["predictions"]
    for (path, size), prediction in zip(images, predictions):
        overlay_path = cam_dir / f"{path.stem}_cam.png"
        assert prediction["cam"] == str(overlay_path) and overlay_path.is_file()
        overlay = np.asarray(Image.open(overlay_path).convert("RGB"), dtype=float)
        original = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        assert overlay.shape == original.shape == (size[1], size[0], 3)
        assert np.abs(overlay - original).mean() > 3  # the heatmap is drawn on it


def test_heatmap_has_the_image_size_and_follows_the_content(trained_run, tmp_path):
    checkpoint = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(checkpoint).eval()
    rng = np.random.default_rng(7)
    heatmaps = []
    for k, style in enumerate(("mild", "severe", "moderate")):
        path = tmp_path / f"{k}.png"
        make_image(style, rng, 160).resize((150, 110)).save(path)
        overlay, heatmap, predicted = cam_overlay(model, path, checkpoint)
        assert heatmap.shape == (110, 150) and overlay.size == (150, 110)
        assert predicted in checkpoint["class_names"]
        assert 0 <= heatmap.min() and heatmap.max() <= 1
        assert heatmap.std() > 0.05  # not a constant
        heatmaps.append(heatmap)
    assert np.abs(heatmaps[0] - heatmaps[1]).mean() > 0.02 and np.abs(heatmaps[1] - heatmaps[2]).mean() > 0.02


def test_heatmap_follows_a_salient_patch():
    """A textured patch on a flat background, moved around: the heat moves with it."""
    torch.manual_seed(0)
    model = build_model(2, arch="resnet18").eval()  # Grad-CAM reads layer4 of any ResNet; ResNet18 is 3 times faster
    with torch.no_grad():  # class 0 = the total activation of the last stage, so the evidence is where the texture is
        model.fc.weight.zero_()
        model.fc.weight[0] = 1.0
        model.fc.bias.zero_()
    texture = np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    for x, y in ((60, 30), (190, 150), (60, 150)):
        image = np.full((240, 300, 3), 120, dtype=np.uint8)
        image[y : y + 56, x : x + 56] = texture
        crop = presets.eval_transform(224)(Image.fromarray(image)).unsqueeze(0)
        cams, classes = grad_cam(model, crop)
        heatmap = cam_on_original(cams[0], (300, 240), 224)
        assert classes == [0] and heatmap.shape == (240, 300)
        inside = heatmap[y : y + 56, x : x + 56].mean()
        assert inside > 2.5 * heatmap.mean(), (x, y)
        peak_y, peak_x = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert abs(peak_x - (x + 28)) < 40 and abs(peak_y - (y + 28)) < 40, (x, y, peak_x, peak_y)


def test_heatmap_lands_where_the_crop_came_from():
    """A mark found in the model's centre crop, mapped back, falls on the same mark in the original."""
    width, height, img_size = 146, 100, 64
    image = np.zeros((height, width, 3), dtype=np.uint8)
    mark_x, mark_y = 100, 30  # inside the centre crop, off centre in both directions
    image[mark_y - 2 : mark_y + 3, mark_x - 2 : mark_x + 3] = 255
    crop = presets.eval_transform(img_size)(Image.fromarray(image))[0].numpy().astype(float)
    cy, cx = np.unravel_index(crop.argmax(), crop.shape)
    cam = np.zeros((img_size, img_size))
    cam[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = 1
    heatmap = cam_on_original(cam, (width, height), img_size)
    assert heatmap.shape == (height, width)
    peak_y, peak_x = np.unravel_index(heatmap.argmax(), heatmap.shape)
    assert abs(peak_x - mark_x) <= 2 and abs(peak_y - mark_y) <= 2
    # the margins that the centre crop cut off get no heat: the crop is the middle 100 * 64/73 = 88 px
    assert heatmap[:, :28].max() == 0 and heatmap[:, 119:].max() == 0


def test_plots_are_redrawn_from_a_run_folder(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("*.pt"))  # the plots' files
    plots = ("curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png", "roc.png")
    for name in plots:
        (run / name).unlink()
    result = subprocess.run([sys.executable, "-m", "ucgrade.report", run], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == f"redrew the plots of {run}\n", result.stderr
    for name in plots:
        Image.open(run / name).verify()
    # no traceback for a folder that is not a finished run: one line and exit code 2, from the same main
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text((run / "config.json").read_text())
    (tmp_path / "stopped").mkdir()
    (tmp_path / "stopped" / "config.json").write_text((run / "config.json").read_text())
    (tmp_path / "stopped" / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    (tmp_path / "empty").mkdir()
    for folder, message in (
        (tmp_path / "nothing", "does not exist or is not a folder"),
        (tmp_path / "empty", "is not a run folder written by qq.py (it has no config.json)"),
        (tmp_path / "started", "has no evaluated model yet"),
        (tmp_path / "stopped", "has no evaluated model yet"),
    ):
        captured = cli("ucgrade.report", folder)
        assert captured.code == 2, folder
        assert captured.out == "" and captured.err.startswith(f"error: '{folder}' ") and message in captured.err
        assert len(captured.err.splitlines()) == 1
