"""Numbers a clinician cannot misread (issue 23): no abbreviated flags, one grading precision, early refusals,
export records that match the files, readable predict.py lines."""

import importlib
import json
import socket

import pytest
from conftest import FAST, ROOT, cli, make_folder

from ucgrade import device
from ucgrade.images import load_image
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
