"""Devices and precisions chosen explicitly, so that every path runs on every machine that has it: bf16 also
on a CPU that only emulates it, fp32 also on one that would choose bf16, and the GPU path where there is a GPU.
"""

import json

import pytest
import torch
from conftest import FAST, cli, make_folder

from ucgrade.files import read_csv
from ucgrade.records import prob_column


@pytest.fixture(scope="module")
def data12(tmp_path_factory):
    """Twelve images: a CPU that emulates bf16 trains 16 times slower in it than in fp32."""
    return make_folder(tmp_path_factory.mktemp("data"), {"mild": 4, "moderate": 4, "severe": 4})


def train_and_grade(data, out, device, precision, tolerance):
    """Train one epoch on device in precision, then grade the validation images with predict.py on the
    same device and precision: they get the probabilities the run's evaluation wrote. The precision used."""
    code, said, err = cli(
        "qq.py", "--data", data, "--out", out, *FAST, "--epochs", "1", "--device", device, "--precision", precision
    ).lines()
    assert code == 0, err
    run = out / "train"
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    used = config["precision_used"]
    assert ["precision", "used", used] in [line.split() for line in said], said  # the settings block says it
    assert ["device", device] in [line.split() for line in said], said
    assert config["device"] == device and metrics["device"] == device
    assert metrics["precision"] == metrics["inference_time"]["precision"] == used

    rows = read_csv(run / "predictions.csv")
    images = [data / row["path"] for row in rows]
    code, printed, err = cli(
        "predict.py", *images, "--weights", run / "best.pt", "--device", device, "--precision", used, "--json"
    )
    assert code == 0, err
    graded = json.loads(printed)
    assert [p["path"] for p in graded["predictions"]] == [str(path) for path in images]
    for row, prediction in zip(rows, graded["predictions"]):
        probabilities = prediction["probabilities"]
        assert prediction["grade"] == max(probabilities, key=probabilities.get)
        for name, p in probabilities.items():
            assert p == pytest.approx(float(row[prob_column(name)]), abs=tolerance), (row["path"], name)
    return used


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.03)], ids=["fp32", "bf16"])
def test_a_forced_precision_is_used_said_and_recorded(precision, tolerance, data12, tmp_path):
    """Whatever the CPU would choose by itself (bf16 where it computes bf16 natively, else fp32)."""
    assert train_and_grade(data12, tmp_path, "cpu", precision, tolerance) == precision


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU: the GPU path (mixed precision, pinned memory) is not run on this machine",
)
def test_the_gpu_path_trains_and_grades(data12, tmp_path):
    used = train_and_grade(data12, tmp_path, "cuda", "auto", tolerance=0.03)
    assert used == ("bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16")
