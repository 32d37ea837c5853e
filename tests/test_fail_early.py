"""Fail early and plainly (issue 13): mistakes a new user makes are named before any image is decoded, and
before the settings are printed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, cli, make_folder, run_script

from ucgrade import figures
from ucgrade.data import scan_folder
from ucgrade.files import read_csv
from ucgrade.groups import read_groups


@pytest.fixture
def images_unread(monkeypatch):
    """qq.py must stop before reading any image."""
    monkeypatch.setattr("ucgrade.data.read_data", lambda *args: pytest.fail("the images were read"))


def test_the_project_folder_as_data_is_refused_with_the_folder_meant(tmp_path, images_unread):
    project = tmp_path / "project"
    make_folder(project / "data", {"mild": 2, "moderate": 2})
    (project / "docs").mkdir()
    code, out, err = cli("qq.py", "--data", project, "--out", project / "outputs", *FAST).lines()
    assert code == 2 and not out
    assert err == [
        f"error: --data '{project}' holds the --out folder '{project / 'outputs'}', so its 'grades' would include "
        f"the tool's own outputs; pass the folder that has one sub-folder of images per grade, probably --data "
        f"{project / 'data'}."
    ]


def test_a_data_folder_whose_grades_hold_run_folders_is_refused(tmp_path, images_unread):
    project = tmp_path / "project"
    make_folder(project / "data", {"mild": 2, "moderate": 2})
    (project / "old_outputs" / "train").mkdir(parents=True)
    (project / "old_outputs" / "train" / "config.json").write_text("{}")
    code, out, err = cli("qq.py", "--data", project, "--out", tmp_path / "out", *FAST).lines()
    assert code == 2 and not out
    assert err[0].startswith(f"error: --data '{project}' holds run folders (old_outputs/train), so its 'grades'")
    assert err[0].endswith(f"probably --data {project / 'data'}.")


def test_a_missing_data_folder_is_named_before_the_settings(tmp_path, images_unread):
    code, out, err = cli("qq.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "out", *FAST).lines()
    assert code == 2 and not out  # not after 24 lines of settings
    assert err == [
        f"error: the data folder '{tmp_path / 'nowhere'}' does not exist; pass --data with a folder that has one "
        "sub-folder per grade."
    ]


def test_a_groups_file_with_a_problem_is_named_before_any_image_is_read(tmp_path, images_unread):
    data = make_folder(tmp_path / "data", {"mild": 2, "moderate": 2})
    groups = tmp_path / "groups.csv"
    groups.write_text("file,patient\nmild/mild_000.jpg,p1\n")
    code, out, err = cli("qq.py", "--data", data, "--out", tmp_path / "out", "--groups", groups).lines()
    assert code == 2 and not out
    assert err == [
        f"error: --groups file '{groups}' needs the header 'path,group', separated by commas, semicolons or tabs "
        "(its first line is 'file,patient'); path is relative to --data, group e.g. a patient id."
    ]


def test_an_image_without_a_group_is_named_before_any_image_is_decoded(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", {"mild": 3, "moderate": 3})
    groups = tmp_path / "groups.csv"
    rows = [f"{p.relative_to(data).as_posix()},patient {k}" for k, p in enumerate(sorted(data.rglob("*.jpg")))]
    groups.write_text("path,group\n" + "\n".join(rows[1:]) + "\n")  # mild/mild_000.jpg has no row
    monkeypatch.setattr("ucgrade.data.read_images", lambda *args, **kwargs: pytest.fail("the images were decoded"))
    argv = ["--data", data, "--out", tmp_path / "out", "--groups", groups, *FAST]
    code, _, err = cli("qq.py", *argv).lines()
    assert code == 2
    assert err == [
        f"error: --groups file '{groups}' has no group for 1 image(s): mild/mild_000.jpg; add a row 'path,group' for "
        "each (paths relative to --data)."
    ]
    assert not (tmp_path / "out").exists()


def test_a_file_that_will_not_decode_needs_no_group(tmp_path):
    """A groups file made from a run's split.csv leaves out the files that run skipped: they are skipped again."""
    data = make_folder(tmp_path / "data", {"mild": 4, "moderate": 4})
    groups = tmp_path / "groups.csv"
    rows = [f"{p.relative_to(data).as_posix()},patient {k}" for k, p in enumerate(sorted(data.rglob("*.jpg")))]
    groups.write_text("path,group\n" + "\n".join(rows) + "\n")
    (data / "mild" / "broken.jpg").write_bytes(b"not a JPEG")  # no row in the groups file
    argv = ["--data", data, "--out", tmp_path / "out", "--groups", groups, *FAST, "--epochs", "1", "--val-split", "0.5"]
    code, _, err = cli("qq.py", *argv)
    assert code == 0, err
    assert "has no group" not in err
    skipped = read_csv(tmp_path / "out" / "train" / "skipped.csv")
    assert [row["path"] for row in skipped] == [str(data / "mild" / "broken.jpg")]


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_semicolon_or_tab_groups_file_as_european_excel_saves_it_is_read(tmp_path, separator):
    data = make_folder(tmp_path / "data", {"mild": 4, "moderate": 4})
    groups = tmp_path / "groups.csv"
    rows = [
        f"{p.relative_to(data).as_posix()}{separator}patient {k // 2}"
        for k, p in enumerate(sorted(data.rglob("*.jpg")))
    ]
    groups.write_text("\ufeff" + f"path{separator}group\r\n" + "\r\n".join(rows) + "\r\n", encoding="utf-8")
    image_set, _ = scan_folder(data)
    assert read_groups(groups, image_set) == [f"patient {k // 2}" for k in range(8)]


def test_predict_names_the_absolute_folder_searched_and_the_default_runs_accuracy(trained_run, tmp_path):
    image = trained_run / "curves.png"  # any image will do
    code, _, err = cli("predict.py", image, "--out", "elsewhere").lines()
    assert code == 2
    assert err[0].startswith(f"error: no trained model found under '{Path('elsewhere').resolve()}/'")

    code, _, err = cli("predict.py", image, "--out", trained_run.parent).lines()
    accuracy = json.loads((trained_run / "metrics.json").read_text())["accuracy"]
    assert code == 0, err
    assert err[0] == (
        f"using {trained_run / 'best.pt'} (the newest run under {trained_run.parent}/, validation accuracy "
        f"{accuracy:.2f} after 3 of 3 epochs)"
    )


def test_help_and_a_mistyped_flag_answer_without_importing_torch(tmp_path):
    """--help and a command-line mistake answer at once: torch (seconds to import) is not loaded for them."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = sys.modules['torchvision'] = None\n")
    env = {"PYTHONPATH": str(tmp_path)}
    check = subprocess.run([sys.executable, "-c", "import torch"], env=os.environ | env, capture_output=True, text=True)
    assert "import of torch halted" in check.stderr  # the blocker works
    for script in ("qq.py", "predict.py"):
        shown = run_script(script, "--help", env=env)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert f"examples:\n  python {script}" in shown.stdout and "--weights" in shown.stdout
        mistyped = run_script(script, "--arch" if script == "qq.py" else "--precision", "resnet5", env=env)
        assert mistyped.returncode == 2 and "Traceback" not in mistyped.stderr
        assert mistyped.stderr.startswith("error: argument --") and "invalid choice: 'resnet5'" in mistyped.stderr
    assert "python predict.py -- -scan.jpg" in run_script("predict.py", "--help", env=env).stdout


def test_errors_png_names_each_image_by_its_path_under_the_data_folder(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", {"mild": 1, "severe": 1})
    for grade in ("mild", "severe"):
        (data / grade / f"{grade}_000.jpg").rename(data / grade / "IMG_0007.jpg")
    rows = [
        {"path": "mild/IMG_0007.jpg", "true": "mild", "predicted": "severe", "p_predicted": "0.9"},
        {"path": "severe/IMG_0007.jpg", "true": "severe", "predicted": "mild", "p_predicted": "0.8"},
    ]
    drawn = []
    monkeypatch.setattr(figures.files, "save_figure", lambda path, fig: drawn.append(fig))
    assert figures.plot_errors(rows, data, 64, tmp_path / "errors.png", class_names=["mild", "severe"]) == 2
    titles = [ax.get_title() for ax in drawn[0].axes]
    assert [title.split("\n")[0] for title in titles] == ["mild/IMG_0007.jpg", "severe/IMG_0007.jpg"]
