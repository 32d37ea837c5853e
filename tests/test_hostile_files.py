"""Hostile or unlucky files (issue 13): pipes, sockets and devices are found by stat and never opened, very
thin images are refused by their header, each with its reason in skipped.csv, in training and in predict.py."""

import csv
import os
import socket
import struct
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, copy_run, make_folder
from PIL import Image

from ucgrade import files


@pytest.fixture(scope="module")
def hostile_run(module_tmp):
    """One run over a data folder that holds a pipe, a socket, a link to a device and a 3 x 90 px strip."""
    data = make_folder(module_tmp / "data", {"mild": 6, "moderate": 6})
    os.mkfifo(data / "mild" / "pipe.jpg")  # open() would wait for a writer for ever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(data / "mild" / "socket.png"))
    os.symlink("/dev/zero", data / "moderate" / "device.jpg")  # endless bytes if it were read
    Image.new("RGB", (3, 90), "red").save(data / "moderate" / "thin.png")
    code = cli("qq.py", "--data", data, "--out", module_tmp / "out", *FAST, "--epochs", "1", "--cam-examples", "0").code
    server.close()
    rows = files.read_csv(module_tmp / "out" / "train" / "skipped.csv")
    skipped = {Path(row["path"]).relative_to(data).as_posix(): row["reason"] for row in rows}
    return code, data, skipped


def test_a_pipe_in_a_grade_folder_is_skipped_without_being_opened(hostile_run):
    code, _, skipped = hostile_run
    assert code == 0
    assert skipped["mild/pipe.jpg"].startswith("not a regular file")


def test_a_socket_in_a_grade_folder_is_skipped(hostile_run):
    assert hostile_run[2]["mild/socket.png"].startswith("not a regular file")


def test_a_link_to_a_device_in_a_grade_folder_is_skipped(hostile_run):
    assert hostile_run[2]["moderate/device.jpg"].startswith("not a regular file")


def test_a_very_thin_image_is_refused_with_the_rule(hostile_run):
    assert hostile_run[2]["moderate/thin.png"].startswith("3x90 px: the longer side is over 20 times the shorter")


def test_predict_names_a_pipe_and_a_thin_image_and_grades_the_rest(hostile_run, trained_run):
    _, data, _ = hostile_run
    inputs = [data / "mild" / "pipe.jpg", data / "moderate" / "thin.png", data / "mild" / "mild_000.jpg"]
    code, out, err = cli("predict.py", "--weights", trained_run / "best.pt", *inputs).lines()
    assert code == 1, err
    assert not any("Traceback" in line for line in err), err
    text = "\n".join(out + err)
    assert "pipe.jpg" in text and "not a regular file" in text
    assert "thin.png" in text and "over 20 times the shorter" in text
    assert any("mild_000.jpg" in line and "not a regular file" not in line for line in out), out


def zip_bomb(path, gib=4):
    """A .pt of a few MB whose one entry inflates to gib GiB of zeros, written by hand: zipfile would take 10 s to
    compress that much, while one deflate block of 16 MiB of zeros, flushed so that it stands alone, repeats.
    (Its CRC is left 0: nothing reads that far.)"""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(16 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    stream = block * (gib * 64) + compressor.flush()
    name, size = b"archive/data/0", gib << 30
    zip64 = struct.pack("<HHQQ", 1, 16, size, len(stream))  # sizes that do not fit 32 bits
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(zip64))
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(zip64),
        0, 0, 0, 0, 0,
    )  # fmt: skip
    head = local + name + zip64 + stream
    directory = central + name + zip64
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(directory), len(head), 0)
    path.write_bytes(head + directory + end)
    return path


def test_a_zip_bomb_checkpoint_is_refused_from_its_directory(tmp_path):
    bomb = zip_bomb(tmp_path / "best.pt")
    assert bomb.stat().st_size < 5e6 and sum(i.file_size for i in zipfile.ZipFile(bomb).infolist()) == 4 << 30
    image = make_folder(tmp_path / "data", {"mild": 1}) / "mild" / "mild_000.jpg"
    start = time.perf_counter()
    code, out, err = cli("predict.py", "--weights", bomb, image).lines()
    assert time.perf_counter() - start < 5  # nothing was inflated (it took 33 s and 5 GB)
    assert code == 2 and not out
    assert not any("Traceback" in line for line in err), err
    assert err == [
        f"error: checkpoint '{bomb}' would unpack to 4.3 GB, more than the 1.4 GB that a checkpoint of any "
        "architecture this tool knows can need, so it was not loaded (a zip bomb, or not a model of this tool); use "
        "a file written by this tool or by torch.save."
    ]


def test_a_zip_bomb_is_refused_by_resume_and_by_export_too(trained_run, tmp_path):
    """Every reader of a checkpoint goes through the same check: --resume reads last.pt, export.py best.pt."""
    run_dir = copy_run(trained_run, tmp_path / "train")
    for name in ("last.pt", "best.pt"):
        (run_dir / name).unlink()  # hard links to the shared run's: replaced, not written into
        zip_bomb(run_dir / name, gib=2)
    config = (run_dir / "config.json").read_bytes()
    for script, argv, name in (
        ("qq.py", ["--resume", run_dir, "--epochs", "4"], "last.pt"),
        ("export.py", [run_dir], "best.pt"),
    ):
        code, out, err = cli(script, *argv).lines()
        assert code == 2 and not any("Traceback" in line for line in err), err
        assert err == [
            f"error: checkpoint '{run_dir / name}' would unpack to 2.1 GB, more than the 1.4 GB that a checkpoint of "
            "any architecture this tool knows can need, so it was not loaded (a zip bomb, or not a model of this "
            "tool); use a file written by this tool or by torch.save."
        ], script
    assert (run_dir / "config.json").read_bytes() == config  # the refused resumption is not recorded
    assert sorted(p.name for p in run_dir.glob("*.onnx")) == []


def test_imagenet_weights_that_unpack_beyond_their_architecture_are_refused(tmp_path, monkeypatch):
    bomb = zip_bomb(tmp_path / "resnet18.pth", gib=1)
    monkeypatch.setattr("ucgrade.data.read_data", lambda *args: pytest.fail("the images were read"))
    data = make_folder(tmp_path / "data", {"mild": 1, "moderate": 1})
    argv = ["--data", data, "--out", tmp_path / "out", "--arch", "resnet18", "--weights", bomb, "--epochs", "1"]
    code, _, err = cli("qq.py", *argv).lines()
    assert code == 2
    assert err[-1].startswith(f"error: --weights file '{bomb}' would unpack to 1.1 GB, more than the 0.4 GB that a ")
    assert "checkpoint of resnet18 can need" in err[-1]


def test_a_checkpoint_with_compressed_entries_is_refused(trained_run, tmp_path):
    repacked = tmp_path / "best.pt"
    with zipfile.ZipFile(trained_run / "best.pt") as source, zipfile.ZipFile(repacked, "w") as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry), compress_type=zipfile.ZIP_DEFLATED)
        target.writestr("best/extra.txt", "not written by torch.save")
    code, _, err = cli("predict.py", "--weights", repacked, trained_run / "report.html").lines()
    assert code == 2
    assert err[-1].startswith(f"error: checkpoint '{repacked}' holds entries that torch.save does not write (")
    assert "compressed, or unexpected names), so it was not loaded" in err[-1]


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("class_names", [["mild"], ["moderate"], ["severe"]], "class_names must be a list of non-empty texts"),
        ("img_size", 0, "img_size must be a whole number from 64 to 4096 pixels (it is 0)"),
        ("img_size", -5, "img_size must be a whole number from 64 to 4096 pixels (it is -5)"),
        ("img_size", "64", "img_size must be a whole number from 64 to 4096 pixels (it is '64')"),
    ],
)
def test_an_edited_checkpoint_field_is_one_sentence(trained_run, tmp_path, field, value, problem):
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True)
    checkpoint[field] = value
    edited = tmp_path / "best.pt"
    torch.save(checkpoint, edited)
    code, out, err = cli("predict.py", "--weights", edited, trained_run.parent / "x.jpg").lines()
    assert code == 2 and not out
    assert err == [f"error: checkpoint '{edited}' was damaged or edited: {problem}. Use another best.pt or last.pt."]


def test_a_resume_from_optimizer_state_of_the_wrong_shape_is_refused_before_config_json_changes(trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "train")
    last = torch.load(run_dir / "last.pt", weights_only=True)
    last["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(5, 5)
    (run_dir / "last.pt").unlink()  # a hard link to the shared run's: replaced, not written into
    torch.save(last, run_dir / "last.pt")
    config = (run_dir / "config.json").read_bytes()
    code, out, err = cli("qq.py", "--resume", run_dir, "--epochs", "4").lines()
    assert code == 2 and not out
    assert err == [
        f"error: checkpoint '{run_dir / 'last.pt'}' was damaged or edited: its optimizer state does not fit the "
        "resnet50 model (parameter 0 has another shape). Use another best.pt or last.pt."
    ]
    assert (run_dir / "config.json").read_bytes() == config  # a refused resumption is not recorded


def test_a_second_resume_of_a_run_in_progress_is_refused(trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "train")
    (run_dir / "run.lock").write_text(f"{os.getppid()}\n{socket.gethostname()}\n")  # a live process holds it
    config = (run_dir / "config.json").read_bytes()
    code, out, err = cli("qq.py", "--resume", run_dir, "--epochs", "4").lines()
    assert code == 2
    assert err == [
        f"error: '{run_dir}' is already being resumed by process {os.getppid()} on {socket.gethostname()}; wait for "
        f"it to finish (if that process is gone, delete {run_dir / 'run.lock'})."
    ]
    assert (run_dir / "config.json").read_bytes() == config


def test_a_stale_lock_is_taken_over_and_released(trained_run, tmp_path):
    run_dir = copy_run(trained_run, tmp_path / "train")
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run_dir / "run.lock").write_text(f"{gone.pid}\n{socket.gethostname()}\n")
    code, out, err = cli(
        "qq.py", "--resume", run_dir, "--epochs", "4", "--cam-examples", "0", "--device", "cpu"
    ).lines()
    assert code == 0, err
    assert f"note: removed a stale {run_dir / 'run.lock'} (its process {gone.pid} is gone)." in out
    assert not (run_dir / "run.lock").exists()


FIXED_COLUMNS = ["correct", "fold", "group", "p_predicted", "path", "predicted", "true"]


@pytest.fixture(scope="module")
def formula_run(module_tmp):
    """A run whose grades are named as predictions.csv's fixed columns and one formula, grouped by ids that a
    spreadsheet would run as formulas."""
    names = ["=1+1", *FIXED_COLUMNS]
    data = make_folder(module_tmp / "formula_data", {name: 3 for name in names})
    groups = module_tmp / "groups.csv"
    starts = ["=HYPERLINK(1)", "+x", "-x", "@x", "'x"]
    with open(groups, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "group"])
        for k, path in enumerate(sorted(data.rglob("*.jpg"))):
            writer.writerow([path.relative_to(data).as_posix(), f"{starts[k % 5]}{k}"])
    argv = ["--data", data, "--out", module_tmp / "formula_out", "--groups", groups, *FAST, "--epochs", "1"]
    code = cli("qq.py", *argv, "--cam-examples", "0").code
    return code, module_tmp / "formula_out" / "train", names


def test_a_grade_named_as_a_fixed_column_keeps_its_own_probability_column(formula_run):
    code, run_dir, names = formula_run
    assert code == 0
    rows = files.read_csv(run_dir / "predictions.csv")
    assert list(rows[0])[:5] == ["path", "true", "predicted", "p_predicted", "correct"]
    assert [column for column in rows[0] if column.startswith("prob:")] == [f"prob:{name}" for name in sorted(names)]
    for row in rows:  # the fixed columns hold what they say, whatever the grades are called
        assert row["true"] in names and row["predicted"] in names and row["correct"] in ("0", "1")
        assert float(row["p_predicted"]) == max(float(row[f"prob:{name}"]) for name in names)
    assert cli("ucgrade.report", run_dir).code == 0  # python -m ucgrade.report reads them back


def test_cells_that_a_spreadsheet_would_run_are_written_as_text_and_read_back_unchanged(formula_run):
    code, run_dir, _ = formula_run
    raw = (run_dir / "split.csv").read_text() + (run_dir / "predictions.csv").read_text()
    assert "'=HYPERLINK(1)0" in raw and "'+x1" in raw and "'-x2" in raw and "'@x3" in raw and "''x4" in raw
    assert "\n'=1+1/" in raw
    assert not any(line.startswith(("=", "+", "-", "@")) for line in raw.splitlines())
    groups = {row["group"] for row in files.read_csv(run_dir / "split.csv")}
    assert {"=HYPERLINK(1)0", "+x1", "-x2", "@x3", "'x4"} <= groups
    assert any(row["path"].startswith("=1+1/") for row in files.read_csv(run_dir / "predictions.csv"))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("metrics.json", lambda text: text[: len(text) // 2]),  # invalid JSON
        ("predictions.csv", lambda text: text[: len(text) - 30]),  # the last row cut short
        ("predictions.csv", lambda text: text.replace("prob:", "p_")),  # the columns of another version
    ],
)
def test_redrawing_from_a_damaged_file_names_it(trained_run, tmp_path, name, damage):
    run_dir = copy_run(trained_run, tmp_path / "train")
    (run_dir / name).write_text(damage((run_dir / name).read_text()))
    code, _, err = cli("ucgrade.report", run_dir).lines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: '{run_dir / name}' is damaged ("), err
    assert err[0].endswith(
        "so the plots cannot be drawn from it; restore it from a backup, or resume or repeat the run to write it again."
    )


def test_an_image_name_that_starts_with_a_dash_gets_a_hint_about_double_dash():
    code, _, err = cli("predict.py", "-dash.jpg").lines()
    assert code == 2
    assert err == [
        "error: the following arguments are required: IMAGE; see python predict.py --help. If '-dash.jpg' is a file "
        "name, put -- before the file names that start with '-': python predict.py -- -dash.jpg"
    ]
    code, _, err = cli("predict.py", "--wieghts", "x", "a.jpg")  # a mistyped flag gets no such hint
    assert code == 2 and "put --" not in err
