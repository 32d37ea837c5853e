"""Late failures (issue 13): once the last epoch is saved, metrics.json, predictions.csv and report.html are
written even if an optional part (Grad-CAM, a plot, the timing) fails; the failure is named in the output and
the report, and the exit code (3) says so. A full disk is one sentence, and a stop in the report phase says
that the report is being finished."""

import json
import os
import resource
import shutil
import signal

from conftest import FAST, cli, make_folder

from ucgrade import engine, evaluate, figures

ONE_EPOCH = [*FAST, "--epochs", "1", "--cache", "ram"]


def assert_results_written(run_dir):
    for name in ("metrics.json", "predictions.csv", "report.html"):
        assert (run_dir / name).is_file(), name


def test_grade_names_with_mathtext_characters_are_drawn_as_plain_text(tmp_path):
    names = ["sev_$1_$2", "a^{b}\\c%d"]
    data = make_folder(tmp_path / "data", {name: 6 for name in names})
    code, _, err = cli("qq.py", "--data", data, "--out", tmp_path / "out", *ONE_EPOCH, "--cam-examples", "0").lines()
    assert code == 0, err
    assert not any("Traceback" in line or "warning" in line for line in err), err
    run_dir = tmp_path / "out" / "train"
    assert_results_written(run_dir)
    for plot in ("curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png", "roc.png"):
        assert (run_dir / plot).is_file(), plot
    assert json.loads((run_dir / "metrics.json").read_text())["class_names"] == sorted(names)


def test_data_folder_deleted_after_the_scan_keeps_the_finished_training(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", {"mild": 6, "moderate": 6})
    original = evaluate.evaluate_split

    def delete_then_evaluate(*args, **kwargs):  # the folder goes after training, as when a drive is unplugged
        shutil.rmtree(data)
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_split", delete_then_evaluate)
    code, _, err = cli("qq.py", "--data", data, "--out", tmp_path / "out", *ONE_EPOCH, "--cam-examples", "2").lines()
    assert code == 3, err
    assert not any("Traceback" in line for line in err), err
    assert any(line.startswith("warning: Grad-CAM could not be made") and "not found" in line for line in err), err
    assert "Grad-CAM could not be made" in err[-1], err
    run_dir = tmp_path / "out" / "train"
    assert_results_written(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert [f["part"] for f in metrics["failed"]] == ["Grad-CAM"]
    page = (run_dir / "report.html").read_text()
    assert "What failed" in page and "Grad-CAM: " in page


def test_a_failing_timing_and_plot_are_named_and_the_rest_is_written(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", {"mild": 6, "moderate": 6})

    def broken(*args, **kwargs):
        raise ValueError("the clock went backwards")

    monkeypatch.setattr(engine, "measure_inference_time", broken)
    monkeypatch.setattr(figures, "plot_confusions", broken)
    code, _, err = cli("qq.py", "--data", data, "--out", tmp_path / "out", *ONE_EPOCH, "--cam-examples", "0").lines()
    assert code == 3, err
    assert not any("Traceback" in line for line in err), err
    assert "the inference time, the confusion matrices could not be made" in err[-1], err
    run_dir = tmp_path / "out" / "train"
    assert_results_written(run_dir)
    assert not (run_dir / "confusion_matrix.png").exists()
    page = (run_dir / "report.html").read_text()
    assert "the confusion matrices: ValueError: the clock went backwards" in page
    assert "confusion_matrix.png could not be drawn" in page and "Inference time" in page


def test_a_cross_validation_report_names_what_failed_in_the_folds_and_the_pooled_part(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", {"mild": 4, "moderate": 4})

    def broken(*args, **kwargs):
        raise ValueError("the clock went backwards")

    monkeypatch.setattr(engine, "measure_inference_time", broken)  # in every fold
    monkeypatch.setattr(figures, "plot_roc", broken)  # in every fold and in the pooled part
    code, _, err = cli("qq.py", "--data", data, "--out", tmp_path / "out", *ONE_EPOCH, "--folds", "2").lines()
    assert code == 3, err
    assert not any("Traceback" in line for line in err), err
    assert err[-1] == (
        "warning: the training finished and metrics.json, predictions.csv and report.html are written, but the "
        "inference time, roc.png could not be made (the warnings above and the report say why)."
    )
    run_dir = tmp_path / "out" / "train"
    assert_results_written(run_dir)
    pooled = json.loads((run_dir / "metrics.json").read_text())
    assert pooled["failed"] == [{"part": "roc.png", "reason": "ValueError: the clock went backwards"}]
    page = (run_dir / "report.html").read_text()
    assert '<h3 class="warn">What failed</h3>' in page
    parts = ("the inference time", "roc.png")
    items = ["<li>roc.png: ValueError: the clock went backwards</li>"]
    items += [f"<li>fold{k}: {part}: ValueError: the clock went backwards</li>" for k in (1, 2) for part in parts]
    assert all(item in page for item in items), page[page.index("What failed") :][:1500]
    assert page.index(items[0]) < page.index(items[1]) < page.index(items[3])  # the pooled part, then the folds


def test_a_full_disk_is_one_sentence_with_the_space_a_run_needs(tmp_path):
    data = make_folder(tmp_path / "data", {"mild": 6, "moderate": 6})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, hard))  # ulimit -f: a stand-in for a full disk
    try:
        code, _, err = cli(
            "qq.py", "--data", data, "--out", tmp_path / "out", *ONE_EPOCH, "--cam-examples", "0"
        ).lines()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 1, err
    assert not any("Traceback" in line or "enforce fail" in line for line in err), err
    assert len(err) == 1 and err[0].startswith("error: no space left while writing"), err
    assert "needs about 300 MB" in err[0] and "--resume" in err[0]
    assert not list((tmp_path / "out" / "train").glob(".*.tmp"))  # no half-written checkpoint is left


def test_ctrl_c_in_the_report_phase_says_the_report_is_being_finished(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", {"mild": 6, "moderate": 6})
    original = engine.measure_inference_time

    def interrupted_timing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "measure_inference_time", interrupted_timing)
    code, _, err = cli("qq.py", "--data", data, "--out", tmp_path / "out", *ONE_EPOCH, "--cam-examples", "0").lines()
    assert code == 0, err
    assert any("SIGINT received: finishing the metrics and the report first, about" in line for line in err), err
    assert not any("stopping after the current batch" in line for line in err), err
    assert_results_written(tmp_path / "out" / "train")


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_images_are_read(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", {"mild": 3, "moderate": 3})
    read = []
    monkeypatch.setattr("ucgrade.data.read_data", lambda *args: read.append(args))
    out = "/proc/ucgrade-out"  # read-only even for root, where a chmod'ed folder is not
    code, out_lines, err = cli("qq.py", "--data", data, "--out", out, *ONE_EPOCH).lines()
    assert code == 2 and not read
    assert not any("Traceback" in line for line in err), err
    assert len(err) == 1 and err[0].startswith(f"error: --out '{out}' cannot be written ('/proc': "), err
    assert err[0].endswith("give a folder you can write to, or fix its permissions, before the images are read.")
    assert not out_lines  # the settings are printed after the checks
