"""Hostile or unlucky files (issue 13): pipes, sockets and devices are found by stat and never opened, very
thin images are refused by their header, each with its reason in skipped.csv, in training and in predict.py."""

import os
import socket
from pathlib import Path

import pytest
from conftest import FAST, make_folder, user_lines
from PIL import Image

import predict
import qq
from ucgrade import files
from ucgrade.cli import run_cli


def run(module, argv, capsys):
    """(exit code, stdout lines, stderr lines) of qq.py or predict.py through the CLI wrapper in this process."""
    code = run_cli(module.main, module.get_args_parser().parse_args([str(a) for a in argv]))
    captured = capsys.readouterr()
    return code, user_lines(captured.out), user_lines(captured.err)


@pytest.fixture(scope="module")
def hostile_run(module_tmp):
    """One run over a data folder that holds a pipe, a socket, a link to a device and a 3 x 90 px strip."""
    data = make_folder(module_tmp / "data", {"mild": 6, "moderate": 6})
    os.mkfifo(data / "mild" / "pipe.jpg")  # open() would wait for a writer for ever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(data / "mild" / "socket.png"))
    os.symlink("/dev/zero", data / "moderate" / "device.jpg")  # endless bytes if it were read
    Image.new("RGB", (3, 90), "red").save(data / "moderate" / "thin.png")
    code = run_cli(qq.main, qq.get_args_parser().parse_args(
        [str(a) for a in ["--data", data, "--out", module_tmp / "out", *FAST, "--epochs", "1", "--cam-examples", "0"]]
    ))  # fmt: skip
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


def test_predict_names_a_pipe_and_a_thin_image_and_grades_the_rest(hostile_run, trained_run, capsys):
    _, data, _ = hostile_run
    inputs = [data / "mild" / "pipe.jpg", data / "moderate" / "thin.png", data / "mild" / "mild_000.jpg"]
    code, out, err = run(predict, ["--weights", trained_run / "best.pt", *inputs], capsys)
    assert code == 1, err
    assert not any("Traceback" in line for line in err), err
    text = "\n".join(out + err)
    assert "pipe.jpg" in text and "not a regular file" in text
    assert "thin.png" in text and "over 20 times the shorter" in text
    assert any("mild_000.jpg" in line and "not a regular file" not in line for line in out), out
