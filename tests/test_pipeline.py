"""The whole pipeline: qq.py trains and writes every output, predict.py grades images (issue 2)."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from html import escape as html_escape
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, cli, grade_with_library, make_folder, run_script, run_scripts
from PIL import Image

import qq
from ucgrade import data, engine, files, presets, splits
from ucgrade.cam import cam_overlay
from ucgrade.files import read_csv
from ucgrade.images import load_image
from ucgrade.model import load_checkpoint, model_from_checkpoint
from ucgrade.torch_grader import torch_grader


def timed_as(times):
    """engine.time_each that runs the model as usual but reports the given batch-1 milliseconds (as many as it
    timed), so that the run's note on spread times can be checked on times known in advance."""
    real = engine.time_each

    def time_each(run, inputs, warmup=5):
        measured = real(run, inputs, warmup)
        return [times[0]] * (len(measured) - len(times) + 1) + list(times[1:])

    return time_each


SPREAD = (10.0, 100.0, 100.0)  # a median of 10 ms and a p95 of 100 ms: another program was using the device
STEADY = (10.0, 12.0)  # a p95 of under 12 ms


@pytest.fixture(scope="module")
def runs(small_data, module_tmp):
    """Three runs in one --out folder, trained in this process, with what each printed.

    train: 1 epoch in fp32 (right and wrong images on every CPU), seed 5, every validation image through Grad-CAM,
    batch-1 times that spread widely.
    train2, and train3 (asked for as --name train, which exists by then): seed 7, the last of 3 epochs kept
    (--select last, --lr 0.01), with steady times; alike but for the loading of the images: train2 decodes
    them once (--cache ram, no loader process), train3 streams them from disk through a loader process
    (--cache off --workers 1).
    """
    out = module_tmp / "outputs"
    printed = {}

    def run(name, argv, times):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "time_each", timed_as(times))
            code, printed[name], err = cli("qq.py", "--data", small_data, "--out", out, *FAST, *argv)
        assert code == 0, err

    run("train", ["--epochs", "1", "--seed", "5", "--cam-examples", "20", "--precision", "fp32"], SPREAD)
    first = {name: (out / "train" / name).read_bytes() for name in ("best.pt", "history.csv")}
    seven = ["--epochs", "3", "--seed", "7", "--select", "last", "--lr", "0.01"]
    run("train2", [*seven, "--cache", "ram", "--workers", "0"], STEADY)
    run("train3", ["--name", "train", *seven, "--cache", "off", "--workers", "1"], STEADY)
    digest = hashlib.sha256(first["best.pt"]).hexdigest()
    return SimpleNamespace(out=out, printed=printed, first_digest=digest, first_history=first["history.csv"])


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
    metrics = json.loads((trained_run / "metrics.json").read_text())
    grader = torch_grader(trained_run / "best.pt", "cpu", metrics["precision"])
    rows = [r for r in read_csv(trained_run / "split.csv") if r["subset"] == "val"]
    probs = grader.grade([load_image(small_data / r["path"]) for r in rows]).probs
    correct = sum(grader.class_names[int(p.argmax())] == r["class"] for p, r in zip(probs, rows))
    assert correct / len(rows) == pytest.approx(metrics["accuracy"])


def test_split_is_stratified_disjoint_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 11
    train, val = splits.split_holdout(labels, 0.2, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    counts = np.bincount(np.array(labels)[val])
    assert counts.tolist() == [10, 6, 2]  # round(0.2 * n) per class
    again_train, again_val = splits.split_holdout(labels, 0.2, seed=3)
    assert again_val.tolist() == val.tolist() and again_train.tolist() == train.tolist()
    assert splits.split_holdout(labels, 0.2, seed=4)[1].tolist() != val.tolist()
    # tiny classes still get one image on each side
    train, val = splits.split_holdout([0, 0, 1, 1, 1], 0.2, seed=0)
    assert sorted(np.array([0, 0, 1, 1, 1])[val].tolist()) == [0, 1]


def test_split_csv_matches_seed(runs):
    # train3 streams its images from disk through a loader process; train2 decodes them once and has none
    a, b = read_csv(runs.out / "train2" / "split.csv"), read_csv(runs.out / "train3" / "split.csv")
    assert a == b
    val = [r for r in a if r["subset"] == "val"]
    assert {r["class"] for r in val} == {"mild", "moderate", "severe"} and len(val) == 6
    assert read_csv(runs.out / "train" / "split.csv") != a  # another seed, another split
    # the same seed also gives the same training, however the images are loaded: identical histories apart
    # from the timing
    ha, hb = read_csv(runs.out / "train2" / "history.csv"), read_csv(runs.out / "train3" / "history.csv")
    assert len(ha) == len(hb) == 3
    for ra, rb in zip(ha, hb):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-6)


def test_validation_transform_is_deterministic_and_matches_prediction(tmp_path):
    path = make_folder(tmp_path, {"mild": 1}, size=150) / "mild" / "mild_000.jpg"
    Image.open(path).resize((150, 110)).save(path)  # not square
    cached = data.read_resized(path, presets.resize_size_for(96))
    crop = presets.val_transform(96)
    first, second = crop(cached), crop(cached)
    assert torch.equal(first, second) and first.shape == (3, 96, 96)
    # the cache path used in validation and the file path used by predict.py give the same pixels
    assert torch.equal(first, presets.eval_transform(96)(data.load_image(path)))


def test_training_transform_is_random():
    image = torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8)
    transform = presets.train_transform(64)
    views = [transform(image) for _ in range(4)]
    assert all(v.shape == (3, 64, 64) for v in views)
    assert not all(torch.equal(views[0], v) for v in views[1:])


@pytest.fixture(scope="module")
def predicted(trained_run, small_data):
    """predict.py as a user runs it, twice at once (each process spends seconds importing torch): the validation
    images with --json, and a folder and a file with the lines and the newest run under --out."""
    evaluated = {r["path"]: r for r in read_csv(trained_run / "predictions.csv")}  # the validation images
    images = [small_data / path for path in sorted(evaluated)]
    precision = json.loads((trained_run / "metrics.json").read_text())["precision"]  # that of the run's evaluation
    as_json, as_lines = run_scripts(
        ("predict.py", *images, "--weights", trained_run / "best.pt", "--json", "--device", "cpu", "--precision",
         precision),
        ("predict.py", small_data / "moderate", small_data / "mild" / "mild_000.jpg", "--out", trained_run.parent,
         "--device", "cpu"),
    )  # fmt: skip
    return SimpleNamespace(evaluated=evaluated, images=images, json=as_json, lines=as_lines, precision=precision)


def test_predict_cli_matches_model_in_memory_and_the_run_evaluation(trained_run, small_data, predicted):
    result = predicted.json
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["weights"] == str(trained_run / "best.pt") and output["errors"] == []
    assert [p["path"] for p in output["predictions"]] == [str(image) for image in predicted.images]
    # in the precision of the run's evaluation, with the threads run_scripts gave predict.py
    library = grade_with_library(predicted.images, trained_run / "best.pt", threads=1, precision=predicted.precision)
    assert output["precision"] == predicted.precision
    for image, prediction in zip(predicted.images, output["predictions"]):
        grade, probabilities = library[str(image)]
        assert prediction["grade"] == grade
        assert prediction["probabilities"] == pytest.approx(probabilities, abs=1e-6)
        assert sum(prediction["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        # `probability` is that of the grade, the largest of them
        assert (
            prediction["probability"] == prediction["probabilities"][grade] == max(prediction["probabilities"].values())
        )
        # predict.py sees an image as the run's evaluation did (the file decoded and cropped anew,
        # one image at a time instead of a cached batch, in the precision the CPU chose for both)
        row = predicted.evaluated[image.relative_to(small_data).as_posix()]
        assert prediction["grade"] == row["predicted"]
        assert prediction["probabilities"] == pytest.approx(
            {name: float(row[f"prob:{name}"]) for name in output["class_names"]}, abs=5e-3
        )


LINE = re.compile(  # README: `path: grade (p=0.87)  grade_a=0.05 grade_b=0.87 ...`, the OOD warning maybe between
    r"(?P<path>.+): (?P<grade>\S+) \(p=(?P<p>\d\.\d\d)\)(  \[not like the training images: grade not reliable\])?"
    r"  (?P<values>\S+=\d\.\d{3}(  \S+=\d\.\d{3})*)"
)


def test_predict_cli_text_output_and_folders(trained_run, small_data, predicted):
    result = predicted.lines
    assert result.returncode == 0, result.stderr
    assert f"using {trained_run / 'best.pt'}" in result.stderr  # the newest run, said out loud
    # every image of the folder, in order, then the file
    images = sorted((small_data / "moderate").iterdir()) + [small_data / "mild" / "mild_000.jpg"]
    assert len(images) == 11
    lines = result.stdout.splitlines()
    matches = [LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [m["path"] for m in matches] == [str(image) for image in images]
    library = grade_with_library(images, trained_run / "best.pt", threads=1)  # as run_scripts gave predict.py
    for m in matches:
        grade, probabilities = library[m["path"]]
        printed = dict(value.split("=") for value in m["values"].split("  "))
        assert list(printed) == ["mild", "moderate", "severe"]
        for name, value in printed.items():  # each to 3 decimals, as the library has it
            assert float(value) == pytest.approx(probabilities[name], abs=5e-4 + 1e-6), (m["path"], name)
        # the grade and its p: the largest per-grade value, as in --json
        assert m["grade"] == grade == max(printed, key=lambda name: float(printed[name]))
        assert float(m["p"]) == pytest.approx(probabilities[grade], abs=5e-3 + 1e-6)
        assert float(m["p"]) == pytest.approx(float(printed[grade]), abs=5e-3 + 1e-6)


def test_predict_output_cut_short_by_a_pipe_is_no_error(trained_run, small_data):
    """`python predict.py folder/ | head -1`: the reader stops early, which is no reason for a traceback.
    Run as in a user's shell, where stdout to a pipe is block-buffered (no PYTHONUNBUFFERED); one line per image,
    and --json, side by side."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    inputs = [small_data] * 20  # 600 images: batches grade fast, and the readers must go while work is left
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "predict.py"), *inputs, "--weights", trained_run / "best.pt", *output],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, output in (("lines", ["--device", "cpu"]), ("json", ["--device", "cpu", "--json"]))
    }
    processes["json"].stdout.close()  # the JSON is written at the end, so it meets a reader that has already gone
    # one line per image: read the first, as head -1 does, and stop while the next is graded
    assert processes["lines"].stdout.readline().startswith(str(small_data).encode())
    for name, process in processes.items():
        process.stdout.close()
        code = process.wait(timeout=300)
        stderr = process.stderr.read().decode()
        assert code == 141 and "Traceback" not in stderr and "Error" not in stderr, (name, stderr)


def told_apart(first, second):
    """Whether two lists of {grade: probability} differ somewhere by more than 0.1%, down to the smallest
    probabilities (a model sure of its grade gives the others 1e-30, which an absolute tolerance would miss)."""
    pairs = [(a[name], b[name]) for a, b in zip(first, second, strict=True) for name in a]
    return any(a != pytest.approx(b, rel=1e-3, abs=1e-30) for a, b in pairs)


def test_predict_uses_the_newest_of_several_runs(runs, small_data):
    images = [small_data / grade / f"{grade}_000.jpg" for grade in ("mild", "moderate", "severe")]
    now = time.time()
    by_run = {}
    for newest in ("train2", "train"):  # by the time its best.pt was written, not by its name
        for age, name in enumerate(n for n in ("train", "train2", "train3") if n != newest):
            os.utime(runs.out / name / "best.pt", (now - 100 * (age + 1), now - 100 * (age + 1)))
        os.utime(runs.out / newest / "best.pt", (now, now))
        code, out, err = cli("predict.py", *images, "--out", runs.out, "--device", "cpu", "--json")
        assert code == 0, err
        weights = runs.out / newest / "best.pt"
        metrics = json.loads((runs.out / newest / "metrics.json").read_text())
        epochs = metrics["epochs"]
        assert err == (
            f"using {weights} (the newest run under {runs.out}/, validation accuracy {metrics['accuracy']:.2f} after "
            f"{epochs} of {epochs} epochs)\n"
        )
        output = json.loads(out)
        assert output["weights"] == str(weights)
        library = grade_with_library(images, weights)
        assert [p["path"] for p in output["predictions"]] == list(library)
        for prediction in output["predictions"]:
            assert prediction["probabilities"] == pytest.approx(library[prediction["path"]][1], rel=1e-5, abs=1e-30)
        by_run[newest] = [p["probabilities"] for p in output["predictions"]]
    assert told_apart(by_run["train"], by_run["train2"])  # the checks above tell the two models apart


def test_predict_takes_last_pt(trained_run, small_data):
    images = sorted((small_data / "mild").iterdir())[:3]
    code, out, err = cli("predict.py", *images, "--weights", trained_run / "last.pt", "--device", "cpu", "--json")
    assert code == 0, err
    output = json.loads(out)
    assert output["weights"] == str(trained_run / "last.pt") and output["errors"] == []
    library = grade_with_library(images, trained_run / "last.pt")
    assert [p["path"] for p in output["predictions"]] == list(library)
    for prediction in output["predictions"]:
        grade, probabilities = library[prediction["path"]]
        assert prediction["grade"] == grade
        assert prediction["probabilities"] == pytest.approx(probabilities, rel=1e-5, abs=1e-30)


def test_predict_cam_keeps_two_images_of_the_same_name_apart(runs, small_data, tmp_path):
    """a/scan.jpg and b/scan.jpg get an overlay each, of their own image, and a second call overwrites neither."""
    images = [tmp_path / "a" / "scan.jpg", tmp_path / "b" / "scan.jpg"]
    for image, (source, size) in zip(images, ((small_data / "mild" / "mild_001.jpg", (90, 70)),
                                              (small_data / "severe" / "severe_002.jpg", (64, 100)))):  # fmt: skip
        image.parent.mkdir()
        Image.open(source).resize(size).save(image)
    weights = runs.out / "train" / "best.pt"
    cam_dir = tmp_path / "heatmaps"
    checkpoint = load_checkpoint(weights)
    model = model_from_checkpoint(checkpoint).eval()
    written = []
    for call in range(2):
        code, out, err = cli("predict.py", *images, "--weights", weights, "--cam", cam_dir, "--json", "--device", "cpu")
        assert code == 0, err
        predictions = json.loads(out)["predictions"]
        expected = [cam_dir / f"scan_cam{k if k > 1 else ''}.png" for k in (2 * call + 1, 2 * call + 2)]
        assert [p["cam"] for p in predictions] == [str(path) for path in expected]
        for image, prediction in zip(images, predictions):
            overlay, _, _ = cam_overlay(
                model, image, checkpoint, target_class=checkpoint["class_names"].index(prediction["grade"])
            )
            with Image.open(prediction["cam"]) as saved:
                assert saved.size == Image.open(image).size
                assert np.abs(np.asarray(saved.convert("RGB"), int) - np.asarray(overlay, int)).max() <= 1
        written += [(path, path.read_bytes()) for path in expected]
    assert sorted(cam_dir.iterdir()) == sorted(path for path, _ in written)
    assert all(path.read_bytes() == content for path, content in written)  # the first call's overlays are kept


def test_second_run_does_not_overwrite_the_first(runs, tmp_path):
    first = runs.out / "train"
    assert hashlib.sha256((first / "best.pt").read_bytes()).hexdigest() == runs.first_digest
    assert (first / "history.csv").read_bytes() == runs.first_history
    assert json.loads((first / "config.json").read_text())["seed"] == 5
    assert json.loads((runs.out / "train2" / "config.json").read_text())["seed"] == 7
    # a named run that exists gets a number too
    config = json.loads((runs.out / "train3" / "config.json").read_text())
    assert config["seed"] == 7 and config["cache"] == "off" and (runs.out / "train3" / "best.pt").is_file()
    assert sorted(path.name for path in runs.out.iterdir()) == ["train", "train2", "train3"]
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
        "--quiet",
        "--recipe",
        "--augment",
        "--loss",
        "--cdw-alpha",
        "--label-smoothing",
        "--optimizer",
        "--weight-decay",
        "--schedule",
        "--warmup-epochs",
        "--ema",
        "--tta",
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


def test_select_last_keeps_the_last_epoch_and_says_the_figures_are_not_chosen_on_validation(runs):
    epoch_lines = [line for line in runs.printed["train3"].splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all(line.endswith("  saved") for line in epoch_lines)  # not "best"
    run = runs.out / "train3"
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


# ----------------------------------------------------------------------------- what a run prints and shows


def test_widely_spread_inference_times_are_noted_in_the_terminal_and_the_report(runs):
    note = (
        "note: the times varied widely (p95 over twice the median), so another program was probably using the "
        "device; quote the median."
    )
    spread = [line.strip() for line in runs.printed["train"].splitlines()]
    timing = json.loads((runs.out / "train" / "metrics.json").read_text())["inference_time"]
    assert timing["batch1_median_ms"] == 10 and timing["batch1_p95_ms"] == 100  # the times given
    line = next(i for i, text in enumerate(spread) if text.startswith("inference on cpu ("))
    assert "median 10.0 ms, p95 100.0 ms per image" in spread[line]
    assert spread[line + 1] == note  # under the timing it is about
    assert "The times varied widely" in (runs.out / "train" / "report.html").read_text()
    for name in ("train2", "train3"):  # steady times: no note
        assert "median 10.0 ms, p95 11.5 ms per image" in runs.printed[name]
        assert "varied widely" not in runs.printed[name]
        assert "varied widely" not in (runs.out / name / "report.html").read_text()


def test_grad_cam_shows_the_most_confident_right_image_per_grade_then_the_errors(runs):
    run = runs.out / "train"  # --cam-examples 20: every validation image
    rows = read_csv(run / "predictions.csv")
    names = json.loads((run / "metrics.json").read_text())["class_names"]
    cams = read_csv(run / "cam" / "index.csv")
    shown = [re.fullmatch(r"(.+): true (\S+), predicted (\S+) \(p=(\d\.\d\d)\)", row["caption"]) for row in cams]
    assert all(shown), cams
    by_path = {Path(row["path"]).name: row for row in rows}  # a caption names the file (issue 23)

    def p(row):
        return float(row[f"prob:{row['predicted']}"])

    right = {name: [r for r in rows if r["true"] == r["predicted"] == name] for name in names}
    graded = [name for name in names if right[name]]  # in grade order, the grades with a right image
    wrong = [r for r in rows if r["true"] != r["predicted"]]
    assert graded and wrong, "this run should have right and wrong images, to show the order of both"
    assert len(cams) == len(graded) + len(wrong)
    for m, name in zip(shown, graded):  # first the most confident right image of each grade
        row = by_path[m[1]]
        assert row["true"] == row["predicted"] == m[2] == m[3] == name
        assert p(row) == max(p(r) for r in right[name]) and m[4] == f"{p(row):.2f}"
    errors = [by_path[m[1]] for m in shown[len(graded) :]]  # then the errors, the most confident first
    assert sorted(r["path"] for r in errors) == sorted(r["path"] for r in wrong)
    assert [p(r) for r in errors] == sorted((p(r) for r in errors), reverse=True)
    for m, row in zip(shown[len(graded) :], errors):
        assert (m[2], m[3], m[4]) == (row["true"], row["predicted"], f"{p(row):.2f}")
    # the report shows them in that order
    report = (run / "report.html").read_text()
    positions = [report.index(html_escape(row["caption"])) for row in cams]
    assert positions == sorted(positions)
