"""ONNX export, ONNX Runtime grading in fp32 and int8, and a torch-free predict.py (issue 11).

One tiny run (ResNet18, 1 epoch, 64 px, random weights) is exported once with --int8; the tests read it."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import FAST, ROOT, cli, copy_run, run_script, run_scripts, train, user_lines

from ucgrade import device, files, onnx_export, onnx_grade
from ucgrade.cli import PRECISIONS, UserError

# What a grading-only install (requirements-predict.txt) lacks, and tqdm, which it has but predict.py must not need
# (a bar is drawn only on a terminal): importing any of these fails.
NOT_INSTALLED = ("torch", "torchvision", "matplotlib", "sklearn", "scipy", "tqdm", "onnx")
# predict.py with a .pt chooses its device and precision (an .onnx runs on the CPU in its own precision).
ON_THE_CPU_IN_FP32 = ["--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def run(small_data, module_tmp):
    torch.manual_seed(0)
    assert train(["--data", small_data, "--out", module_tmp, "--epochs", "1", *FAST]) == 0
    return module_tmp / "train"


@pytest.fixture(scope="module")
def exported(run):
    """The run exported by the command a user types: model.onnx, model.int8.onnx and export.json."""
    result = run_script("export.py", run, "--int8")
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class Payload:
    """Unpickling this calls open(marker, "w"), which creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def validation_images(run):
    config = json.loads((run / "config.json").read_text())
    return [os.path.join(config["data"], r["path"]) for r in files.read_csv(run / "split.csv") if r["subset"] == "val"]


def one_error_line(result):
    """The single line of a refusal: on stderr, no traceback, exit code 2."""
    lines = user_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_export_writes_checked_models_that_describe_themselves(run, exported):
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    figures = json.loads((run / "export.json").read_text())
    n_val, n_train = len(validation_images(run)), 30 - len(validation_images(run))
    assert "ONNX Runtime fp32 against torch fp32 on" in exported.stdout and "top-1 agreement 100.0%" in exported.stdout

    fp32 = figures["fp32"]["against_torch_fp32"]
    assert fp32["images"] == n_val and fp32["top1_agreement"] == 1.0
    assert fp32["max_probability_difference"] <= onnx_export.FP32_TOLERANCE
    int8 = figures["int8"]
    assert int8["calibration_images"] == n_train and int8["against_fp32"]["images"] == n_val
    for model in (figures["fp32"], int8):
        assert 0 <= model["accuracy"] <= 1 and "qwk" in model
    assert figures["checkpoint_sha256"] == files.sha256_of(run / "best.pt")

    for name, precision in (("model.onnx", "fp32"), ("model.int8.onnx", "int8")):
        model = onnx.load(str(run / name))
        onnx.checker.check_model(model)
        metadata = {p.key: p.value for p in model.metadata_props}
        assert json.loads(metadata["class_names"]) == checkpoint["class_names"] == ["mild", "moderate", "severe"]
        assert (metadata["img_size"], metadata["resize_size"], metadata["arch"]) == ("64", "73", checkpoint["arch"])
        assert checkpoint["arch"] == "resnet18"
        assert metadata["checkpoint_sha256"] == figures["checkpoint_sha256"] and metadata["precision"] == precision
        (graph_input,) = model.graph.input
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == ["batch", 3, 64, 64]
    int8_ops = {node.op_type for node in onnx.load(str(run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= int8_ops

    # any batch size: the same probabilities for three crops at once as one by one
    model = onnx_grade.onnx_grader(run / "model.onnx")
    crops = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    batch = model.forward(crops).probs
    single = np.concatenate([model.forward(crops[i : i + 1]).probs for i in range(3)])
    assert batch.shape == (3, 3) and np.allclose(batch.sum(1), 1, atol=1e-5) and np.allclose(batch, single, atol=1e-6)


def test_pt_onnx_and_int8_grade_the_same_images_alike(run, exported, small_data):
    images = validation_images(run)
    pt, fp32, int8 = [
        json.loads(result.stdout)
        for result in run_scripts(
            ("predict.py", small_data, "--weights", run / "best.pt", *ON_THE_CPU_IN_FP32, "--json"),
            ("predict.py", small_data, "--weights", run / "model.onnx", "--json"),
            ("predict.py", *images, "--weights", run / "model.int8.onnx", "--json"),
        )
    ]
    assert len(pt["predictions"]) == len(fp32["predictions"]) == 30 and pt["class_names"] == fp32["class_names"]
    for a, b in zip(pt["predictions"], fp32["predictions"]):
        assert a["path"] == b["path"] and a["grade"] == b["grade"]
        for grade, p in a["probabilities"].items():
            assert abs(p - b["probabilities"][grade]) <= onnx_export.FP32_TOLERANCE
    assert set(int8) == set(fp32) and not int8["errors"] and int8["weights"].endswith("model.int8.onnx")

    # predict.py's int8 grades are those export.py checked: the same preprocessing, the same model
    fp32_of = {p["path"]: p for p in fp32["predictions"]}
    same = sum(p["grade"] == fp32_of[p["path"]]["grade"] for p in int8["predictions"])
    recorded = json.loads((run / "export.json").read_text())["int8"]["against_fp32"]
    assert same == recorded["top1_same"] and len(images) == recorded["images"]
    for p in int8["predictions"]:
        assert set(p) == {"path", "grade", "probability", "probabilities", "out_of_distribution", "ood_score"}
        assert max(abs(q - fp32_of[p["path"]]["probabilities"][g]) for g, q in p["probabilities"].items()) < 0.1


def test_predict_with_an_onnx_needs_no_torch(run, exported, small_data, tmp_path):
    """A grading-only install: importing torch, torchvision, matplotlib, scikit-learn (and the rest) fails."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(f"import sys\nfor name in {NOT_INSTALLED!r}:\n    sys.modules[name] = None\n")
    env = {"PYTHONPATH": str(tmp_path)}
    image = small_data / "severe" / "severe_000.jpg"
    check = subprocess.run([sys.executable, "-c", "import torch"], env=os.environ | env, capture_output=True, text=True)
    assert check.returncode != 0 and "import of torch halted" in check.stderr  # the blocker works

    lines = run_script("predict.py", image, small_data / "mild", "--weights", run / "model.onnx", env=env)
    assert lines.returncode == 0, lines.stderr[-2000:]
    assert len(user_lines(lines.stdout)) == 11 and user_lines(lines.stdout)[0].startswith(f"{image}: ")
    as_json = run_script("predict.py", image, "--weights", run / "model.int8.onnx", "--json", env=env)
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["predictions"][0]["path"] == str(image)
    missing = run_script("predict.py", image, tmp_path / "nothing.jpg", "--weights", run / "model.onnx", env=env)
    assert missing.returncode == 1 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    assert run_script("predict.py", "--help", env=env).returncode == 0
    pt = run_script("predict.py", image, "--weights", run / "best.pt", *ON_THE_CPU_IN_FP32, env=env)
    needs_torch = one_error_line(pt)
    assert "needs torch" in needs_torch and "export.py" in needs_torch


def test_predict_refuses_bad_onnx_files_in_one_sentence(run, exported, small_data, tmp_path):
    image = small_data / "mild" / "mild_000.jpg"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes((run / "model.onnx").read_bytes()[:5000])
    plain = onnx.load(str(run / "model.onnx"))
    del plain.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(plain, str(foreign))
    results = run_scripts(
        ("predict.py", image, "--weights", corrupt),
        ("predict.py", image, "--weights", foreign),
        ("predict.py", image, "--weights", run / "model.onnx", "--cam", tmp_path / "cams"),
        ("predict.py", image, "--weights", run / "model.onnx", "--device", "cuda"),
    )
    messages = [one_error_line(result) for result in results]
    assert "not a readable ONNX model" in messages[0]
    assert "without ucgrade's description" in messages[1] and "export.py" in messages[1]
    assert "--cam needs the .pt" in messages[2] and not (tmp_path / "cams").exists()
    assert "runs on the CPU" in messages[3]


def test_export_refuses_bad_input_in_one_sentence(run, tmp_path):
    """Each mistake is one sentence before any work (run in this process: a traceback would fail the test)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    crafted = tmp_path / "crafted.pt"
    marker = tmp_path / "code_ran"
    torch.save({"format": "ucgrade-checkpoint", "model": Payload(marker)}, crafted)
    cv = tmp_path / "cv"
    for k in (1, 2):
        (cv / f"fold{k}").mkdir(parents=True)
        os.link(run / "best.pt", cv / f"fold{k}" / "best.pt")
    messages = []
    for argv in ([empty], [crafted], [cv], [run, "--fold", "2"], [run, "--out", tmp_path / "model.pt"]):
        code, _, lines = cli("export.py", *argv).lines()
        assert code == 2
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        messages.append(lines[0])
    assert "holds no best.pt" in messages[0]
    assert "not loaded (it could run code)" in messages[1] and not marker.exists()
    assert "cross-validation run" in messages[2] and "--fold K (1 to 2)" in messages[2]
    assert "not one" in messages[3]
    assert "must name an .onnx file" in messages[4]
    assert not list(tmp_path.rglob("*.onnx"))


def test_one_fold_of_a_cross_validation_run_is_checked_on_its_own_fold(run, tmp_path):
    """A fold's checkpoint records its fold; its validation images are that fold's rows of the run's split.csv."""
    cv = tmp_path / "cv"
    (cv / "fold1").mkdir(parents=True)
    (cv / "fold2").mkdir()
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    checkpoint["config"] |= {"fold": 1, "folds": 2}
    torch.save(checkpoint, cv / "fold1" / "best.pt")
    rows = files.read_csv(run / "split.csv")
    folded = [{"path": r["path"], "class": r["class"], "fold": 1 if r["subset"] == "val" else 2} for r in rows]
    files.write_csv(cv / "split.csv", folded, ["path", "class", "fold"])

    code, _, err = cli("export.py", cv, "--fold", "1")
    assert code == 0, err
    figures = json.loads((cv / "fold1" / "export.json").read_text())
    assert figures["validation_images"] == len(validation_images(run)) and (cv / "fold1" / "model.onnx").is_file()


def test_export_refuses_a_model_that_disagrees_beyond_the_tolerance(run, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", 0.0)  # any rounding difference now counts as disagreement
    out = tmp_path / "grader.onnx"
    code, _, error = cli("export.py", run, "--out", out).lines()
    assert code == 2
    assert len(error) == 1 and "more than the tolerance of 0" in error[0] and "was not written" in error[0]
    assert not out.exists()


def test_every_precision_the_scripts_offer_is_one_the_device_code_handles():
    """qq.py and predict.py offer cli.PRECISIONS (known without torch); device.choose_precision takes each."""
    cpu = torch.device("cpu")
    assert set(PRECISIONS) == {"auto", "fp32", "bf16", "fp16"}
    assert device.choose_precision(cpu, "auto") in ("fp32", "bf16")
    assert [device.choose_precision(cpu, name) for name in ("fp32", "bf16")] == ["fp32", "bf16"]
    with pytest.raises(UserError, match="fp16 is for GPUs"):
        device.choose_precision(cpu, "fp16")


def test_the_exported_graph_normalises_like_training(run):
    """GradingModel's arithmetic is presets.normalize's: the same probabilities from the same uint8 crops."""
    from ucgrade.model import load_checkpoint, model_from_checkpoint
    from ucgrade.presets import normalize
    from ucgrade.torch_grader import GradingModel

    checkpoint = load_checkpoint(run / "best.pt")
    model = model_from_checkpoint(checkpoint).eval()
    crops = np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    with torch.inference_mode():
        graph, _ = GradingModel(model, checkpoint)(torch.from_numpy(crops))
        by_hand = torch.softmax(model(normalize(torch.from_numpy(crops), checkpoint["mean"], checkpoint["std"])), 1)
    assert np.allclose(graph.numpy(), by_hand.numpy(), atol=1e-6)


def test_shipped_requirements_name_the_grading_packages():
    lines = (ROOT / "requirements-predict.txt").read_text().splitlines()
    names = {line.split(">=")[0].strip().lower() for line in lines if line.strip() and not line.startswith("#")}
    assert names == {"onnxruntime", "numpy", "pillow", "av", "tqdm"}


def test_a_second_export_without_int8_never_leaves_a_mismatched_pair(run, exported, tmp_path):
    """export.json describes every model in the folder (issue 23): an int8 model of the same checkpoint keeps its
    record; one of another checkpoint is removed, and said."""
    again = copy_run(run, tmp_path / "again")
    int8_record = json.loads((run / "export.json").read_text())["int8"]
    code, out, err = cli("export.py", again)
    assert code == 0, err
    assert json.loads((again / "export.json").read_text())["int8"] == int8_record
    assert (again / "model.int8.onnx").is_file() and "kept" in out and "validation (" in out and "int8 " in out
    # another checkpoint (as after --resume): the int8 model beside would grade as the old one
    checkpoint = torch.load(again / "best.pt", weights_only=True)
    checkpoint["model"]["fc.bias"] += 1.0
    (again / "best.pt").unlink()  # a hard link to the shared run's: replaced, not written into
    torch.save(checkpoint, again / "best.pt")
    code, out, err = cli("export.py", again)
    assert code == 0, err
    assert not (again / "model.int8.onnx").exists() and "int8" not in json.loads((again / "export.json").read_text())
    assert f"note: removed {again / 'model.int8.onnx'}, which was not exported from this checkpoint" in err
