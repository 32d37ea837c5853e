"""Grading speed, for benchmarks/speed.py: the four ways to grade on a CPU side by side, and predict.py on a folder.

Everything here grades through ucgrade.grader, as predict.py does: torch eager fp32 and in the precision
--precision auto chooses (a .pt), and ONNX Runtime fp32 and int8 (an .onnx made by export.py's code).

- Batch 1, side by side: each grader's forward pass on one uint8 crop, in interleaved rounds (a machine that
  gets busy slows every candidate alike), with their top-1 agreement and accuracy.
- A folder: `python predict.py FOLDER --weights MODEL` as a whole process (start-up, decoding, batches, output)
  on FOLDER_IMAGES files, for the int8 .onnx and the .pt. Its wall time is set against the same model's own
  batch-1 time x FOLDER_IMAGES, measured in the same run: at most 1.5 times that (issue 19) means decoding,
  start-up and output are under half of the work.
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ucgrade import engine, files, onnx_export
from ucgrade.device import choose_precision
from ucgrade.grader import load_grader
from ucgrade.images import files_under, is_image_file
from ucgrade.model import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FOLDER_IMAGES = 1000
FOLDER_TARGET = 1.5  # the folder's wall time over the model's batch-1 time x its images (issue 19)


def export_models(checkpoint_path, calibration_crops, folder):
    """model.onnx and model.int8.onnx of the checkpoint in folder, by export.py's code: their paths and seconds."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = load_grader(checkpoint_path, "cpu", "fp32").extra["model"]
    metadata = onnx_export.metadata_for(checkpoint, files.sha256_of(checkpoint_path), "fp32")
    start = time.perf_counter()
    fp32_bytes = onnx_export.export_onnx(model, checkpoint, metadata)
    export_s = time.perf_counter() - start
    int8_bytes = onnx_export.quantize_int8(fp32_bytes, calibration_crops, metadata | {"precision": "int8"})
    quantise_s = time.perf_counter() - start - export_s
    paths = {"fp32": Path(folder) / "model.onnx", "int8": Path(folder) / "model.int8.onnx"}
    files.write_bytes(paths["fp32"], fp32_bytes)
    files.write_bytes(paths["int8"], int8_bytes)
    return paths, {"onnx_export_s": export_s, "int8_quantisation_s": quantise_s}


def side_by_side(checkpoint_path, onnx_paths, crops, labels, threads, rounds):
    """Batch-1 grading of the same crops by each grader, in interleaved rounds; their agreement and accuracy."""
    precision = choose_precision(torch.device("cpu"), "auto")
    graders = {"torch eager fp32": load_grader(checkpoint_path, "cpu", "fp32")}
    if precision != "fp32":
        graders[f"torch eager {precision}"] = load_grader(checkpoint_path, "cpu", precision)
    graders |= {f"ONNX Runtime {name}": load_grader(path, threads=threads) for name, path in onnx_paths.items()}
    inputs = [np.ascontiguousarray(crop)[None] for crop in crops]
    times = {name: [] for name in graders}
    for _ in range(rounds):
        for name, grader in graders.items():
            times[name] += engine.time_each(grader.forward, inputs)
    timings = {
        name: {
            "batch1_median_ms": statistics.median(t),
            "batch1_mean_ms": statistics.fmean(t),
            "batch1_p95_ms": float(np.percentile(t, 95)),
        }
        for name, t in times.items()
    }
    stacked = np.concatenate(inputs)
    grades = {name: grader.grade_crops(stacked) for name, grader in graders.items()}
    torch_fp32, fp32, int8 = (grades[n] for n in ("torch eager fp32", "ONNX Runtime fp32", "ONNX Runtime int8"))
    paths = [str(i) for i in range(len(inputs))]  # the crops have no files here
    return {
        "device": "cpu",
        "threads": threads,
        "images": len(inputs),
        "rounds": rounds,
        "precision_auto": precision,
        "timings": timings,
        "onnx_mb": onnx_paths["fp32"].stat().st_size / 2**20,
        "int8_mb": onnx_paths["int8"].stat().st_size / 2**20,
        "onnx_fp32_vs_torch_fp32": onnx_export.agreement(torch_fp32, fp32, paths),
        "onnx_int8_vs_onnx_fp32": onnx_export.agreement(fp32, int8, paths),
        "accuracy": {
            "torch_fp32": float((torch_fp32.probs.argmax(1) == labels).mean()),
            "onnx_fp32": float((fp32.probs.argmax(1) == labels).mean()),
            "onnx_int8": float((int8.probs.argmax(1) == labels).mean()),
        },
    }


def folder_of_images(data_dir, folder, count=FOLDER_IMAGES):
    """A folder of count image files, hard links to (or copies of) the images of data_dir, taken in turn."""
    sources = [p for p in files_under(data_dir) if is_image_file(p)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = sources[i % len(sources)]
        target = folder / f"{i:05d}{source.suffix.lower()}"
        try:
            os.link(source, target)
        except OSError:
            target.write_bytes(source.read_bytes())
    return folder


def time_folder(weights, folder, batch1_ms, threads):
    """predict.py on the folder as a whole process, against the model's batch-1 time x its images."""
    count = len(list(Path(folder).iterdir()))
    command = [sys.executable, str(ROOT / "predict.py"), str(folder), "--weights", str(weights)]
    if Path(weights).suffix == ".pt":
        command += ["--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"predict.py failed on {folder}: {result.stderr[-1000:]}")
    graded = len(result.stdout.splitlines())
    model_s = batch1_ms * count / 1000
    return {
        "images": count,
        "graded": graded,
        "wall_s": wall,
        "images_per_s": count / wall,
        "model_batch1_s": model_s,
        "wall_over_model_batch1": wall / model_s,
        "target": FOLDER_TARGET,
    }


def time_after_training(data_dir, img_size, device, folder, threads):
    """A one-epoch `python qq.py` run as a whole process: its epoch's seconds, and the seconds from the epoch's end
    (history.csv written) to the process's end: the best model's evaluation, the out-of-distribution calibration,
    the inference timing, the plots, Grad-CAM and the report, which every fold of --folds pays again. Issue 19's
    target: under a quarter of the epoch."""
    out = Path(folder) / "runs"
    command = [sys.executable, str(ROOT / "qq.py"), "--data", str(data_dir), "--out", str(out), "--epochs", "1"]
    command += ["--img-size", str(img_size), "--device", str(device), "--pretrained", "no"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    end = time.time()
    if result.returncode != 0:
        raise RuntimeError(f"qq.py failed: {result.stderr[-1000:]}")
    history = out / "train" / "history.csv"
    epoch_s = float(files.read_csv(history)[0]["epoch_time_s"])
    after_s = end - history.stat().st_mtime
    return {"epoch_s": epoch_s, "after_training_s": after_s, "share_of_epoch": after_s / epoch_s, "target": 0.25}


def print_side_by_side(side):
    """Batch-1 inference of the four ways to grade on a CPU, measured side by side."""
    reference = side["timings"]["torch eager fp32"]["batch1_median_ms"]
    print(
        f"\nbatch-1 inference on the CPU, side by side ({side['images']} validation images x {side['rounds']} "
        f"round(s), {side['threads']} threads; from a uint8 crop to its grade)"
    )
    print(f"{'':<26}{'median ms':>10}{'mean ms':>9}{'p95 ms':>8}{'speed-up':>10}")
    for name, t in side["timings"].items():
        auto = " (auto)" if name == f"torch eager {side['precision_auto']}" else ""
        print(
            f"{name + auto:<26}{t['batch1_median_ms']:>10.1f}{t['batch1_mean_ms']:>9.1f}{t['batch1_p95_ms']:>8.1f}"
            f"{reference / t['batch1_median_ms']:>9.2f}x"
        )
    fp32, int8, accuracy = side["onnx_fp32_vs_torch_fp32"], side["onnx_int8_vs_onnx_fp32"], side["accuracy"]
    print(
        f"top-1 agreement: ONNX Runtime fp32 with torch fp32 {fp32['top1_agreement']:.1%} (largest probability "
        f"difference {fp32['max_probability_difference']:.2g}), int8 with fp32 {int8['top1_agreement']:.1%}; "
        f"accuracy torch fp32 {accuracy['torch_fp32']:.3f}, ONNX fp32 {accuracy['onnx_fp32']:.3f}, "
        f"int8 {accuracy['onnx_int8']:.3f}"
    )
    print(
        f"export {side['onnx_export_s']:.1f} s ({side['onnx_mb']:.0f} MB), int8 quantisation "
        f"{side['int8_quantisation_s']:.1f} s "
        f"({side['int8_mb']:.0f} MB, calibrated on {side['calibration_images']} training images)"
    )
    for name, row in side.get("folders", {}).items():
        verdict = "meets" if row["wall_over_model_batch1"] <= row["target"] else "misses"
        print(
            f"predict.py on a folder of {row['images']} images with {name}: {row['wall_s']:.1f} s wall "
            f"({row['images_per_s']:.1f} img/s), {row['wall_over_model_batch1']:.2f}x the model's batch-1 time "
            f"x {row['images']} ({row['model_batch1_s']:.1f} s); {verdict} the target of {row['target']}x"
        )


def print_after_training(row):
    verdict = "meets" if row["share_of_epoch"] <= row["target"] else "misses"
    print(
        f"after the last epoch (evaluation, calibration, timing, plots, Grad-CAM, report): "
        f"{row['after_training_s']:.1f} s, {row['share_of_epoch']:.0%} of the {row['epoch_s']:.1f} s epoch; "
        f"{verdict} the target of {row['target']:.0%}"
    )
