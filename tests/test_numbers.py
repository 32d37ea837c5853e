"""Numbers a clinician cannot misread (issue 23): no abbreviated flags, one grading precision, early refusals,
export records that match the files, readable predict.py lines."""

import contextlib
import importlib
import io
import json
import re
import socket

import numpy as np
import pytest
from conftest import FAST, ROOT, cli, copy_run, make_folder
from test_report_cam import Page
from test_report_layout import section

from ucgrade import device, files, scoring
from ucgrade.images import load_image
from ucgrade.metrics import RANDOM_WEIGHTS
from ucgrade.torch_grader import torch_grader

SCRIPTS = {  # every parser of the project, by the module that builds it
    "qq": ROOT,
    "predict": ROOT,
    "export": ROOT,
    "speed": ROOT / "benchmarks",
    "ablations": ROOT / "benchmarks",
    "render_report": ROOT / "tools",
    "ucgrade.demo": ROOT,
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_parser_takes_an_abbreviated_flag(name, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS[name]))
    parser = importlib.import_module(name).get_args_parser()
    assert parser.allow_abbrev is False


def test_epoch_is_not_epochs(small_data, tmp_path):
    code, out, err = cli("qq.py", "--data", small_data, "--out", tmp_path / "out", *FAST, "--epoch", "3")
    assert code == 2 and out == ""
    assert err.startswith("error: unrecognized arguments: --epoch 3"), err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("predict.py", "image.jpg", "--eval", "--device", "cpu")
    assert code == 2 and "unrecognized arguments: --eval" in err


@pytest.fixture
def no_network(monkeypatch):
    """Every socket this process tries to open, refused and counted: the refusals must come before any download."""
    opened = []

    def refuse(*args, **kwargs):
        opened.append(args)
        raise OSError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return opened


@pytest.mark.parametrize(
    "layout, flags, expected",
    [
        ("flat", [], "has no class sub-folders"),
        ("graded", ["--remission-upto", "mayo9"], "--remission-upto 'mayo9' is not one of the grades"),
        ("graded", ["--class-order", "mild,severe,moderate,extra"], "--class-order names extra"),
    ],
)
def test_a_wrong_layout_or_grade_is_refused_before_the_banner_and_any_download(
    layout, flags, expected, tmp_path, no_network
):
    data = tmp_path / "data"
    if layout == "flat":  # images straight in the folder, no grade sub-folders
        make_folder(tmp_path / "made", {"mild": 3})
        (tmp_path / "made" / "mild").rename(data)
    else:
        make_folder(data, {"mild": 3, "moderate": 3, "severe": 3})
    # --pretrained auto (the default) would try the ImageNet download first
    code, out, err = cli("qq.py", "--data", data, "--out", tmp_path / "out", "--device", "cpu", *flags)
    assert code == 2 and expected in err, err
    assert "settings:" not in out and out == "", out
    assert no_network == []
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- one grading precision


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU that runs bf16 natively, as far as the precision choice can tell: auto would choose bf16 on it."""
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)


def test_predict_grades_in_fp32_by_default_and_says_so(trained_run, small_data, bf16_cpu):
    images = [small_data / "mild" / "mild_000.jpg", small_data / "severe" / "severe_001.jpg"]
    code, out, err = cli("predict.py", *images, "--weights", trained_run / "best.pt", "--json", "--device", "cpu")
    assert code == 0, err
    output = json.loads(out)
    assert output["precision"] == "fp32"
    reference = torch_grader(trained_run / "best.pt", "cpu", "fp32").grade([load_image(p) for p in images]).probs
    for prediction, probs in zip(output["predictions"], reference):
        assert list(prediction["probabilities"].values()) == pytest.approx(probs.tolist(), rel=1e-5, abs=1e-30)
    code, out, err = cli("predict.py", *images, "--weights", trained_run / "best.pt", "--json", "--device", "cpu",
                         "--precision", "bf16")  # fmt: skip
    assert code == 0 and json.loads(out)["precision"] == "bf16"  # still there when asked for


# ----------------------------------------------------------------------------- the report: intervals, baseline


def score_page(tmp_path, names, true, predicted, fields=None):
    """One real scoring step (predictions.csv, plots, metrics.json, the test page) of these grades, on real images;
    returns (metrics.json, report.html, what the terminal got)."""
    root = make_folder(tmp_path / "images", {name: true.count(k) for k, name in enumerate(names)})
    relpaths = [f"{names[k]}/{p.name}" for k in range(len(names)) for p in sorted((root / names[k]).iterdir())]
    probs = np.full((len(true), len(names)), 0.1 / (len(names) - 1))
    probs[np.arange(len(true)), predicted] = 0.9
    out = tmp_path / "test"
    out.mkdir()
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal):
        scoring.score(scoring.Scoring(out, names, relpaths, np.asarray(true), probs, root, 64, "test",
                                      remission_upto=names[0], fields=fields or {}))  # fmt: skip
    return files.read_json(out / "metrics.json"), (out / "report.html").read_text(), terminal.getvalue()


def card(page):
    return " ".join(" ".join(Page(section(page, "Summary")).text).split())


def test_24_of_24_is_reported_with_its_exact_interval_and_the_method(tmp_path):
    names = ["mild", "moderate", "severe"]
    true = [0] * 8 + [1] * 8 + [2] * 8
    result, page, terminal = score_page(tmp_path, names, true, true)
    assert result["intervals"]["accuracy"]["method"] == "Clopper-Pearson"
    assert "1.00-1.00" not in page and "1.000-1.000" not in page and "1.00-1.00" not in terminal
    assert f"{'accuracy':<32}1.00 (0.86-1.00)" in terminal
    assert f"{'QWK':<32}1.00 (no interval: the resamples did not vary)" in terminal
    assert "95% CI 0.86-1.00" in card(page)  # the accuracy tile
    # the tables: the interval is one right-aligned cell that never wraps, the degenerate one says so
    assert "<td class=num>0.86-1.00</td>" in page and "<td class=num>none</td>" not in page
    assert "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}" in page
    metrics_table = " ".join(Page(section(page, "Metrics")).text)
    assert "QWK 1.000 none" in metrics_table
    assert "mild 1.000 1.000 0.63-1.00" in metrics_table  # each grade's recall, 8 of 8, with its exact interval
    # the method named under each table: the metrics, the remission one
    notes = re.findall(r'<p class="note">95% CI: (.*?)</p>', section(page, "Metrics"))
    assert len(notes) == 2 and all("exact (Clopper-Pearson)" in n and "percentile bootstrap" in n for n in notes)


def test_a_model_no_better_than_the_largest_grade_is_warned_of_in_card_table_terminal_and_json(tmp_path):
    names = ["mild", "moderate", "severe"]
    true = [0] * 13 + [1] * 7 + [2] * 5  # always "mild" scores 13/25 = 0.52
    predicted = [0] * 25
    fields = {"pretrained_used": False, "precision": "fp32"}
    result, page, terminal = score_page(tmp_path, names, true, predicted, fields)
    assert result["baseline"] == {"grade": "mild", "accuracy": 0.52, "balanced_accuracy": pytest.approx(1 / 3),
                                  "qwk": 0.0}  # fmt: skip
    beaten, weights = result["warnings"]
    assert beaten.startswith("the model does not beat always answering the largest grade, mild (accuracy 0.520 ")
    assert "random weights" in weights and "--weights FILE" in weights
    summary = section(page, "Summary")
    assert summary.index('<p class="warn">Warning: the model does not beat') < summary.index('class="tiles"')
    assert '<p class="warn">Warning: the model started from random weights' in summary
    assert "always mild: 0.520" in card(page) and "always mild: 0.000" in card(page)  # under accuracy and QWK
    assert "Graded in fp32." in card(page)
    table = " ".join(Page(section(page, "Metrics")).text)
    assert "metric value 95% CI always mild meaning" in table and "accuracy 0.520 0.31-0.72 0.520 share" in table
    assert f"warning: {beaten}." in terminal.splitlines() and f"warning: {weights}." in terminal.splitlines()
    assert terminal.splitlines()[0].startswith("metric                 value  baseline  (always mild)")


def test_the_two_confusion_matrices_of_six_grades_stand_side_by_side_at_1280_px(tmp_path):
    names = [f"ulcerative-colitis-grade-{g}" for g in ("0-1", "1", "1-2", "2", "2-3", "3")]
    true = [k for k in range(6) for _ in range(3)]
    _, page, _ = score_page(tmp_path, names, true, [min(t + 1, 5) for t in true])
    pair = re.search(r'<div class="pair">(.*?)</div>', section(page, "Confusion matrices")).group(1)
    widths = [int(w) for w in re.findall(r'<img alt="[^"]*" width="(\d+)"', pair)]
    assert len(widths) == 2
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    body = int(re.search(r"body\{[^}]*max-width:(\d+)px", css).group(1))
    # a window 1280 px wide, less a scroll bar (17 px) and the page's padding (1em each side)
    content = min(body, 1280 - 17 - 32)
    wide = re.search(r"@media screen and \(min-width:(\d+)px\)\{\.pair\{flex-wrap:nowrap\}", css)
    assert wide and int(wide.group(1)) <= 1280  # side by side there, shrunk to fit if they must
    assert (content - 16) / sum(widths) >= 0.9  # by at most 10%: 10-point labels still read at 9 points or more


# ----------------------------------------------------------------------------- a test set, as the run was analysed


@pytest.fixture
def remission_run(trained_run, tmp_path):
    """The shared run as if trained with --remission-upto mild --patient-grade mean-prob: settings that change only
    its analysis, which its config.json records (the training itself is the same)."""
    run = copy_run(trained_run, tmp_path / "run")
    config = files.read_json(run / "config.json")
    files.write_json(run / "config.json", config | {"remission_upto": "mild", "patient_grade": "mean-prob"})
    return run


def test_evaluate_takes_the_runs_analysis_settings_and_grades_in_fp32(remission_run, tmp_path, bf16_cpu):
    test_dir = make_folder(tmp_path / "test", {"mild": 2, "moderate": 2, "severe": 2}, seed=9)
    groups = tmp_path / "groups.csv"
    rows = [
        {"path": f"{g}/{g}_{i:03d}.jpg", "group": f"{g}{i}"} for g in ("mild", "moderate", "severe") for i in (0, 1)
    ]
    files.write_csv(groups, rows, ["path", "group"])
    argv = [test_dir, "--evaluate", "--weights", remission_run, "--device", "cpu", "--groups", groups]
    code, out, err = cli("predict.py", *argv)
    assert code == 0, err
    assert (
        "analysis settings: --remission-upto mild (from the run's config.json); --patient-grade mean-prob (from the "
        "run's config.json); grade order mild, moderate, severe (from the model)" in out
    )
    result = files.read_json(remission_run / "test" / "metrics.json")
    assert result["remission"]["remission_classes"] == ["mild"] and result["patient_level"]["rule"] == "mean-prob"
    assert result["analysis_settings"]["remission_upto"] == {"value": "mild", "from": "the run's config.json"}
    assert result["precision"] == "fp32" and result["runtime"] == "torch on cpu"  # not bf16, though auto would be
    assert result["pretrained_used"] is False and any("random weights" in w for w in result["warnings"])
    page = (remission_run / "test" / "report.html").read_text()
    assert "Remission (mild) vs active disease" in page
    assert "Graded in fp32 (torch on cpu). Settings: --remission-upto mild from the run's config.json" in card(page)
    # the command line still decides
    code, out, err = cli("predict.py", *argv, "--remission-upto", "moderate", "--patient-grade", "max")
    assert code == 0, err
    assert "--remission-upto moderate (from the command line); --patient-grade max (from the command line)" in out
    result = files.read_json(remission_run / "test2" / "metrics.json")
    assert result["remission"]["remission_classes"] == ["mild", "moderate"] and result["patient_level"]["rule"] == "max"


def test_a_run_from_random_weights_says_so_first_and_names_its_precision_and_cam_files(trained_run):
    result = files.read_json(trained_run / "metrics.json")
    assert result["pretrained_used"] is False and RANDOM_WEIGHTS in result["warnings"]
    page = (trained_run / "report.html").read_text()
    summary = card(page)
    assert f"Warning: {RANDOM_WEIGHTS}." in summary
    assert f"Graded in {result['precision']}." in summary
    assert f"always {result['baseline']['grade']}: {result['baseline']['accuracy']:.3f}" in summary
    captions = [row["caption"] for row in files.read_csv(trained_run / "cam" / "index.csv")]
    assert captions and all(re.match(r"[^/\\]+\.jpg: true ", caption) for caption in captions), captions
