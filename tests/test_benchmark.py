"""The speed benchmark (issue 5) runs end to end on tiny data, so that it cannot rot. No timing asserts:
the numbers depend on the machine and on what else runs on it; they only have to be there and be sane."""

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_scripts

from ucgrade import device as device_module
from ucgrade.device import cpu_has_fast_bf16

# One thread: on a busy machine (a CI runner, tests in parallel) two spinning OpenMP threads can run
# several times slower than one, and the smoke test only has to exercise every part. On the CPU, chosen
# explicitly: the precisions the test expects measured are the CPU's, on a machine with a GPU too.
TINY = [
    "--quick",
    "--device",
    "cpu",
    "--images",
    "12",
    "--img-size",
    "64",
    "--epochs",
    "1",
    "--frozen-epochs",
    "2",
    "--steps",
    "2",
    "--infer-batch",
    "4",
    "--threads",
    "1",
    "--folder-images",
    "24",
]


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def benchmarks(module_tmp):
    """speed.py and ablations.py, side by side (one thread each): their results and JSON files."""
    speed, ablations = module_tmp / "speed.json", module_tmp / "ablations.json"
    ablation_args = ["--only", "layout", "normalize", "--img-size", "64", "--rounds", "1", "--threads", "1"]
    speed_result, ablations_result = run_scripts(
        ("benchmarks/speed.py", *TINY, "--json", speed),
        ("benchmarks/ablations.py", *ablation_args, "--device", "cpu", "--json", ablations),
        timeout=300,
    )
    return {"speed": (speed_result, speed), "ablations": (ablations_result, ablations)}


def test_quick_benchmark_writes_every_number(benchmarks):
    result, out = benchmarks["speed"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert "speed-up over the baseline" in result.stdout
    numbers = json.loads(out.read_text())

    setup = numbers["setup"]
    assert setup["device"] == "cpu" and setup["threads"] == 1 and setup["img_size"] == 64 and setup["quick"] is True
    assert math.isclose(setup["train_gflop_per_image"], 24.6 * (64 / 224) ** 2)
    measured = ["fp32"] + (["bf16"] if cpu_has_fast_bf16() else [])
    for precision in measured:
        ceiling = numbers["ceiling"][precision]
        assert positive(ceiling["matmul_gflop_s"]) and positive(ceiling["conv_gflop_s"])
        assert ceiling["gflop_s"] == max(ceiling["matmul_gflop_s"], ceiling["conv_gflop_s"])
    if "bf16" not in measured:  # emulated bf16 is not timed (a minute per matmul on AVX2): named instead
        assert "no native bf16" in numbers["ceiling"]["bf16"]["skipped"]
        assert "ceiling bf16: not measured" in result.stdout

    data = numbers["data"]
    assert data["images"] == 12 and data["train"] + data["val"] == 12 and data["classes"] == 3
    assert data["cached"] is True and positive(data["cache_mb"])

    runs = [numbers["project"], numbers["baseline"]] + ([numbers["project_fp32"]] if "project_fp32" in numbers else [])
    for run in runs:
        epochs = run["whole_epochs"]
        assert len(epochs["epochs"]) >= 1
        for key in ("images_per_s", "gflop_s", "of_fp32_ceiling", "epoch_s", "first_epoch_s", "epoch_s_per_800_images"):
            assert positive(epochs[key]), key
        assert positive(epochs["of_bf16_ceiling"]) if "bf16" in measured else epochs["of_bf16_ceiling"] is None
        assert math.isclose(epochs["images_per_s"], data["train"] / epochs["epoch_s"])
        assert 0 <= epochs["val_acc"] <= 1
        assert positive(run["part"]["peak_rss_mb"]) and positive(run["part"]["seconds"])
    for run in (numbers["project"], numbers["baseline"]):
        assert positive(run["steps_alone"]["images_per_s"]) and positive(run["steps_alone"]["gflop_s"])
    assert numbers["project"]["batch_size"] == 16 and numbers["baseline"]["batch_size"] == 4

    inference = numbers["inference"]
    for run in (inference["project"], inference["baseline"]):
        assert positive(run["batch1_mean_ms"]) and positive(run["batch1_median_ms"])
    assert (
        positive(inference["project"]["throughput_images_per_s"]) and inference["project"]["throughput_batch_size"] == 4
    )
    assert positive(inference["project"]["checkpoint_mb"])

    # issue 11: the CPU's instruction sets, and batch-1 inference side by side on the same images
    features = setup["cpu_features"]
    assert features["torch_cpu_capability"] and "--precision auto chose" in result.stdout
    if features["instruction_sets"] is not None:
        assert set(features["instruction_sets"]) == {"AVX2", "AVX-512", "AVX-512 BF16", "AMX", "VNNI"}
        assert "AVX-512 BF16 " in result.stdout
    side = inference["side_by_side"]
    cpu_precision = side["precision_auto"]
    expected = {"torch eager fp32", f"torch eager {cpu_precision}", "ONNX Runtime fp32", "ONNX Runtime int8"}
    assert set(side["timings"]) == expected and side["threads"] == 1 and side["images"] == data["val"]
    for timing in side["timings"].values():
        assert positive(timing["batch1_median_ms"]) and positive(timing["batch1_mean_ms"])
    assert side["onnx_fp32_vs_torch_fp32"]["top1_agreement"] == 1.0
    assert side["onnx_fp32_vs_torch_fp32"]["max_probability_difference"] <= 1e-3
    assert 0 <= side["onnx_int8_vs_onnx_fp32"]["top1_agreement"] <= 1 and side["calibration_images"] == data["train"]
    assert "batch-1 inference on the CPU, side by side" in result.stdout and "ONNX Runtime int8" in result.stdout
    # issue 19: predict.py on a folder as a whole process, and the time after the last epoch of a qq.py run
    assert set(side["folders"]) == {"int8 .onnx", "best.pt"}
    for row in side["folders"].values():
        assert row["images"] == row["graded"] == 24 and positive(row["wall_s"]) and positive(row["model_batch1_s"])
        assert row["wall_over_model_batch1"] == pytest.approx(row["wall_s"] / row["model_batch1_s"])
    assert result.stdout.count("predict.py on a folder of 24 images with") == 2
    after = numbers["after_training"]
    assert positive(after["epoch_s"]) and positive(after["after_training_s"]) and after["target"] == 0.25
    assert "after the last epoch (evaluation, calibration, timing, plots, Grad-CAM, report)" in result.stdout

    accuracy = numbers["accuracy"]
    assert (
        0 <= accuracy["val_acc"] <= 1 and 0 <= accuracy["fp32_val_acc"] <= 1 and accuracy["val_images"] == data["val"]
    )
    frozen = numbers["frozen_backbone"]
    assert frozen["epochs"] == 2 and positive(frozen["total_s"]) and 0 < frozen["features_s"] <= frozen["total_s"]
    assert all(positive(v) for v in numbers["speedup"].values())


def test_ablations_run(benchmarks):
    result, out = benchmarks["ablations"]
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(out.read_text())
    assert numbers["device"] == "cpu" and numbers["threads"] == 1 and numbers["img_size"] == 64
    for question in ("layout", "normalize"):
        options = {name: r for name, r in numbers[question].items() if isinstance(r, dict)}
        assert len(options) >= 2
        for r in options.values():
            assert positive(r["best_images_per_s"]) and positive(r["ratio_best"])


@pytest.fixture
def ceiling_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ceiling

    return ceiling


def test_ceiling_skips_bf16_on_a_cpu_without_native_bf16(ceiling_module, monkeypatch):
    """On an AVX2-only CPU the bf16 ceiling is not measured (emulated, one matmul takes a minute), on any machine."""
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(ceiling_module, "cpu_has_fast_bf16", lambda: False)
    ceiling = ceiling_module.measure_ceilings(torch.device("cpu"), quick=True)
    assert "no native bf16" in ceiling["bf16"]["skipped"] and "gflop_s" not in ceiling["bf16"]
    assert positive(ceiling["fp32"]["gflop_s"])
    shares = ceiling_module.throughput(10.0, 64, ceiling)
    assert shares["of_bf16_ceiling"] is None and positive(shares["of_fp32_ceiling"])


def python(code):
    """python -c code from the repository's root, in an environment without TQDM_DISABLE."""
    env = {name: value for name, value in os.environ.items() if name != "TQDM_DISABLE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_importing_the_benchmarks_leaves_tqdm_disable_alone():
    code = "import os, sys\nsys.path.insert(0, 'benchmarks')\nimport ablations, speed\n"
    code += "print(os.environ.get('TQDM_DISABLE'))"
    assert python(code) == ["None"]


@pytest.mark.parametrize("script", ["speed", "ablations"])
def test_a_benchmark_run_as_a_script_disables_bars_before_tqdm_is_imported(script):
    """Set after torch has imported tqdm, TQDM_DISABLE would not reach the bars tqdm makes itself."""
    code = (
        f"import os, runpy, sys\nsys.path.insert(0, 'benchmarks')\nsys.argv = ['{script}.py', '--help']\n"
        f"try:\n    runpy.run_path('benchmarks/{script}.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "import tqdm\nprint(os.environ['TQDM_DISABLE'], tqdm.tqdm(range(1)).disable)"
    )
    assert python(code)[-2:] == ["1", "True"]


def int8_conv(path, weight_bits):
    """An .onnx of one int8 convolution (QLinearConv) whose weights span weight_bits bits, signed."""
    from onnx import TensorProto, helper, numpy_helper, save

    top = 2 ** (weight_bits - 1) - 1
    weights = np.random.default_rng(0).integers(-top, top + 1, (8, 3, 3, 3)).astype(np.int8)
    constants = [
        numpy_helper.from_array(np.array(value, dtype), name)
        for name, value, dtype in [
            ("x_scale", 0.02, np.float32), ("x_zero", 0, np.uint8), ("w_scale", 0.01, np.float32),
            ("w_zero", 0, np.int8), ("y_scale", 0.5, np.float32), ("y_zero", 128, np.uint8),
        ]
    ]  # fmt: skip
    inputs = ["x", "x_scale", "x_zero", "w", "w_scale", "w_zero", "y_scale", "y_zero"]
    graph = helper.make_graph(
        [helper.make_node("QLinearConv", inputs, ["y"])],
        "int8 conv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 8, 222, 222])],
        [numpy_helper.from_array(weights, "w"), *constants],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def cpu_flags():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return set(text.split())


@pytest.mark.skipif(
    shutil.which("objdump") is None or platform.machine() != "x86_64", reason="needs objdump on x86-64 Linux"
)
def test_the_avx2_copy_of_onnx_runtime_runs_the_avx2_kernels_in_place_of_the_installed_one(tmp_path):
    """benchmarks/avx2_onnxruntime.py patches every xgetbv of a copy, which a process then imports in place of the
    installed ONNX Runtime. With 7-bit weights, as export.py writes them, its int8 outputs are the installed ones bit
    for bit. With 8-bit weights, a CPU with AVX-512 VNNI (and no AVX-VNNI or AMX, which the copy would still use)
    gives other outputs through the copy: AVX2's 16-bit sums saturate, so the copy really runs the AVX2 kernels."""
    copy, seven = tmp_path / "ort", int8_conv(tmp_path / "seven.onnx", 7)
    result = subprocess.run(
        [sys.executable, "benchmarks/avx2_onnxruntime.py", copy, "--check", seven],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    patched = re.search(r"(\d+) xgetbv instructions now report AVX state only", result.stdout)
    assert patched and int(patched.group(1)) > 0, result.stdout
    assert f"{seven}: batch 1 median" in result.stdout and "ms with the AVX2 kernels" in result.stdout
    assert "the same outputs" in result.stdout, result.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import onnxruntime; print(onnxruntime.__file__)"],
        env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(copy / "onnxruntime"))
    again = subprocess.run(
        [sys.executable, "benchmarks/avx2_onnxruntime.py", copy], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 1 and again.stderr.strip() == f"error: {copy / 'onnxruntime'} exists; give a new folder."
    assert sorted(path.name for path in copy.iterdir()) == ["onnxruntime"]  # nothing half-made beside it

    flags = cpu_flags()
    if "avx512_vnni" not in flags or flags & {"avx_vnni", "amx_int8"}:
        pytest.skip("only a CPU with AVX-512 VNNI and without AVX-VNNI or AMX shows the AVX2 kernels' saturation")
    eight = int8_conv(tmp_path / "eight.onnx", 8)
    script = "\n".join(
        [
            "import sys; sys.argv[1:] = []",
            "sys.path.insert(0, 'benchmarks')",
            "import avx2_onnxruntime as a",
            f"a.check({str(eight)!r}, {str(copy)!r})",
        ]
    )
    checked = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    assert "outputs differ" in checked.stdout and "overflow AVX2's 16-bit sums" in checked.stdout, checked.stdout
