"""The whole pipeline: qq.py trains and writes every output, predict.py grades images (issue 2)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, make_folder, run_script, train
from PIL import Image

import qq
from ucgrade import data, engine, files
from ucgrade.device import choose_device, choose_precision
from ucgrade.engine import predict_image
from ucgrade.files import read_csv
from ucgrade.model import load_checkpoint, model_from_checkpoint


def test_run_writes_every_output(trained_run):
    run = trained_run
    for name in [
        "best.pt",
        "last.pt",
        "history.csv",
        "curves.png",
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "metrics.json",
        "split.csv",
        "config.json",
        "predictions.csv",
        "roc.png",
        "report.html",
        "skipped.csv",
    ]:
        assert (run / name).is_file(), name
    for png in run.glob("*.png"):
        with Image.open(png) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["img_size"] == 64 and config["pretrained_used"] is False

    history = read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert set(history[0]) >= {"train_loss", "val_loss", "train_acc", "val_acc", "lr", "epoch_time_s"}

    split = read_csv(run / "split.csv")
    n_val = sum(r["subset"] == "val" for r in split)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["mild", "moderate", "severe"]
    assert np.array(metrics["confusion_matrix"]).sum() == n_val == metrics["num_images"]
    assert 0 <= metrics["accuracy"] <= 1
    timing = metrics["inference_time"]
    assert (
        timing["batch1_mean_ms"] > 0
        and timing["batch1_median_ms"] > 0
        and timing["batch1_p95_ms"] >= timing["batch1_median_ms"]
    )
    assert timing["throughput_images_per_s"] > 0 and timing["throughput_batch_size"] == 8
    assert len(read_csv(run / "predictions.csv")) == n_val


def test_checkpoints_describe_themselves(trained_run):
    history = read_csv(trained_run / "history.csv")
    best_epoch = max(history, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"])))["epoch"]
    for name, epoch in (("best.pt", int(best_epoch)), ("last.pt", 3)):
        checkpoint = torch.load(trained_run / name, map_location="cpu", weights_only=True)
        assert checkpoint["arch"] == "resnet50"
        assert checkpoint["class_names"] == ["mild", "moderate", "severe"]
        assert checkpoint["img_size"] == 64 and checkpoint["resize_size"] == 73
        assert checkpoint["mean"] == [0.485, 0.456, 0.406] and checkpoint["std"] == [0.229, 0.224, 0.225]
        assert checkpoint["epoch"] == epoch
        assert set(checkpoint["val_metrics"]) == {"val_acc", "val_loss"}
        assert checkpoint["model"]["fc.weight"].shape == (3, 2048)
    assert "optimizer" in torch.load(trained_run / "last.pt", weights_only=True)


def test_best_checkpoint_reproduces_the_reported_metrics(trained_run, small_data):
    """The saved best.pt, run again over the validation images, gives the metrics.json accuracy."""
    checkpoint = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(checkpoint)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    device = torch.device("cpu")
    precision = metrics["precision"]
    rows = [r for r in read_csv(trained_run / "split.csv") if r["subset"] == "val"]
    correct = sum(
        predict_image(small_data / r["path"], model, checkpoint, device, precision)[0] == r["class"] for r in rows
    )
    assert correct / len(rows) == pytest.approx(metrics["accuracy"])


def test_split_is_stratified_disjoint_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 11
    train, val = data.split_holdout(labels, 0.2, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    counts = np.bincount(np.array(labels)[val])
    assert counts.tolist() == [10, 6, 2]  # round(0.2 * n) per class
    again_train, again_val = data.split_holdout(labels, 0.2, seed=3)
    assert again_val.tolist() == val.tolist() and again_train.tolist() == train.tolist()
    assert data.split_holdout(labels, 0.2, seed=4)[1].tolist() != val.tolist()
    # tiny classes still get one image on each side
    train, val = data.split_holdout([0, 0, 1, 1, 1], 0.2, seed=0)
    assert sorted(np.array([0, 0, 1, 1, 1])[val].tolist()) == [0, 1]


def test_split_csv_matches_seed(small_data, tmp_path):
    # b streams its images from disk through a loader process; a decodes them once and has none
    for name, loading in (("a", ["--cache", "ram", "--workers", "0"]), ("b", ["--cache", "off", "--workers", "1"])):
        assert (
            train(
                [
                    "--data",
                    small_data,
                    "--out",
                    tmp_path,
                    "--name",
                    name,
                    "--epochs",
                    "2",
                    "--seed",
                    "7",
                    *FAST,
                    *loading,
                ]
            )
            == 0
        )
    a, b = read_csv(tmp_path / "a" / "split.csv"), read_csv(tmp_path / "b" / "split.csv")
    assert a == b
    val = [r for r in a if r["subset"] == "val"]
    assert {r["class"] for r in val} == {"mild", "moderate", "severe"} and len(val) == 6
    # the same seed also gives the same training, however the images are loaded: identical histories apart
    # from the timing
    ha, hb = read_csv(tmp_path / "a" / "history.csv"), read_csv(tmp_path / "b" / "history.csv")
    assert len(ha) == len(hb) == 2
    for ra, rb in zip(ha, hb):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-6)


def test_validation_transform_is_deterministic_and_matches_prediction(tmp_path):
    path = make_folder(tmp_path, {"mild": 1}, size=150) / "mild" / "mild_000.jpg"
    Image.open(path).resize((150, 110)).save(path)  # not square
    cached = data.read_resized(path, data.resize_size_for(96))
    crop = data.val_transform(96)
    first, second = crop(cached), crop(cached)
    assert torch.equal(first, second) and first.shape == (3, 96, 96)
    # the cache path used in validation and the file path used by predict.py give the same pixels
    assert torch.equal(first, data.eval_transform(96)(data.load_image(path)))


def test_training_transform_is_random():
    image = torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8)
    transform = data.train_transform(64)
    views = [transform(image) for _ in range(4)]
    assert all(v.shape == (3, 64, 64) for v in views)
    assert not all(torch.equal(views[0], v) for v in views[1:])


def test_predict_cli_matches_model_in_memory_and_the_run_evaluation(trained_run, small_data):
    evaluated = {r["path"]: r for r in read_csv(trained_run / "predictions.csv")}  # the validation images
    images = [small_data / path for path in sorted(evaluated)]
    result = run_script("predict.py", *images, "--weights", trained_run / "best.pt", "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    checkpoint = load_checkpoint(trained_run / "best.pt")
    model = model_from_checkpoint(checkpoint)
    device = choose_device("cpu")
    precision = choose_precision(device, "auto")
    for image, predicted in zip(images, output["predictions"]):
        grade, probabilities = predict_image(image, model, checkpoint, device, precision)
        assert predicted["path"] == str(image) and predicted["grade"] == grade
        assert predicted["probabilities"] == pytest.approx(probabilities, abs=1e-6)
        assert sum(predicted["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        # predict.py sees an image as the run's evaluation did (the file decoded and cropped anew,
        # one image at a time instead of a cached batch, both in bf16 on this CPU)
        row = evaluated[image.relative_to(small_data).as_posix()]
        assert predicted["grade"] == row["predicted"]
        assert predicted["probabilities"] == pytest.approx(
            {name: float(row[f"prob:{name}"]) for name in checkpoint["class_names"]}, abs=5e-3
        )


def test_predict_cli_text_output_and_folders(trained_run, small_data):
    result = run_script(
        "predict.py", small_data / "moderate", small_data / "mild" / "mild_000.jpg", "--out", trained_run.parent
    )
    assert result.returncode == 0, result.stderr
    assert f"using {trained_run / 'best.pt'}" in result.stderr  # the newest run, said out loud
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 11
    first = lines[0]
    path, rest = first.split(": ", 1)
    assert path.endswith("moderate_000.jpg")
    grade = rest.split(" ")[0]
    assert grade in ("mild", "moderate", "severe") and "(p=" in rest
    assert all(f"{name}=" in rest for name in ("mild", "moderate", "severe"))


@pytest.mark.parametrize("output", [[], ["--json"]], ids=["lines", "json"])
def test_predict_output_cut_short_by_a_pipe_is_no_error(trained_run, small_data, output):
    """`python predict.py folder/ | head -1`: the reader stops early, which is no reason for a traceback.
    Run as in a user's shell, where stdout to a pipe is block-buffered (no PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "predict.py"), small_data, "--weights", trained_run / "best.pt", *output],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if not output:  # one line per image: read the first, as head -1 does, and stop while the next is graded
        assert process.stdout.readline().startswith(str(small_data).encode())
    process.stdout.close()  # the JSON is written at the end, so it meets a reader that has already gone
    code = process.wait(timeout=300)
    stderr = process.stderr.read().decode()
    assert code == 141 and "Traceback" not in stderr and "Error" not in stderr, stderr


def test_second_run_does_not_overwrite_the_first(small_data, tmp_path):
    assert train(["--data", small_data, "--out", tmp_path, "--epochs", "1", *FAST]) == 0
    first = tmp_path / "train"
    digest = hashlib.sha256((first / "best.pt").read_bytes()).hexdigest()
    history = (first / "history.csv").read_text()
    assert train(["--data", small_data, "--out", tmp_path, "--epochs", "1", "--seed", "5", *FAST]) == 0
    assert (tmp_path / "train2" / "best.pt").is_file()
    assert hashlib.sha256((first / "best.pt").read_bytes()).hexdigest() == digest
    assert (first / "history.csv").read_text() == history
    # a named run that exists gets a number too
    assert train(["--data", small_data, "--out", tmp_path, "--name", "train", "--epochs", "1", *FAST]) == 0
    assert (tmp_path / "train3" / "best.pt").is_file()
    # and a name that ends in a number gets a dash before its own
    assert [files.new_run_dir(tmp_path, "visit2").name for _ in range(3)] == ["visit2", "visit2-2", "visit2-3"]


def test_help_shows_every_flag_with_default():
    result = run_script("qq.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    flags = [
        "--data",
        "--out",
        "--name",
        "--arch",
        "--epochs",
        "--batch-size",
        "--lr",
        "--momentum",
        "--step-size",
        "--gamma",
        "--val-split",
        "--seed",
        "--img-size",
        "--workers",
        "--device",
        "--precision",
        "--pretrained",
        "--weights",
        "--class-order",
        "--remission-upto",
        "--groups",
        "--patient-grade",
        "--folds",
        "--balance",
        "--select",
        "--sync-bn",
        "--freeze-backbone",
        "--cache",
        "--compile",
        "--cam-examples",
        "--resume",
    ]
    options = [a for a in qq.get_args_parser()._actions if a.option_strings != ["-h", "--help"]]
    assert sorted(a.option_strings[0] for a in options) == sorted(
        flags
    )  # a new flag is added to this list, and to the README
    for action in options:
        assert action.option_strings[0] in text
        assert "default" in action.help, f"{action.option_strings[0]} does not say its default"
    for default in [
        "(default: data)",
        "(default: outputs)",
        "(default: 25)",
        "(default: 16)",
        "(default: 0.001)",
        "(default: 0.9)",
        "(default: 7)",
        "(default: 0.1)",
        "(default: 0.2)",
        "(default: 224)",
        "(default: auto)",
    ]:
        assert default in text, default


def test_select_last_keeps_the_last_epoch_and_says_the_figures_are_not_chosen_on_validation(
    small_data, tmp_path, capsys
):
    assert (
        train(["--data", small_data, "--out", tmp_path, "--epochs", "3", "--select", "last", "--lr", "0.01", *FAST])
        == 0
    )
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all(line.endswith("  saved") for line in epoch_lines)  # not "best"
    run = tmp_path / "train"
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    assert best["epoch"] == last["epoch"] == 3
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == 3 and json.loads((run / "config.json").read_text())["select"] == "last"
    # the metrics are those of the last epoch's model: its validation accuracy in history.csv
    assert metrics["accuracy"] == pytest.approx(float(read_csv(run / "history.csv")[-1]["val_acc"]))
    report = (run / "report.html").read_text()
    assert (
        "Last epoch 3 of 3" in report
        and "chosen without looking at the validation images" in report
        and "lean optimistic" not in report
    )


def test_best_epoch_is_chosen_on_validation_accuracy_unless_select_last():
    history = [
        {"epoch": 1, "val_acc": 0.8, "val_loss": 0.5},
        {"epoch": 2, "val_acc": 0.8, "val_loss": 0.4},
        {"epoch": 3, "val_acc": 0.6, "val_loss": 0.9},
    ]
    assert engine.best_epoch(history)["epoch"] == 2  # ties go to the lower loss
    assert engine.best_epoch(history, "last")["epoch"] == 3
    assert engine.best_epoch([], "last") is None and engine.best_epoch([]) is None
