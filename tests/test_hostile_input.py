"""Test sets, exports and the grading-only install under hostile or careless input (issue 22): bounded memory
from an .onnx, a test folder that never leaves itself, nothing half-written, no NaN, no crash on a name, and
logs a person can read. One tiny run (ResNet18, 1 epoch, 64 px, random weights) and its fp32 .onnx are shared."""

import contextlib
import json
import math
import os
import pty
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from conftest import FAST, ROOT, cli, make_folder, run_script, run_scripts, train, user_lines
from onnx import numpy_helper
from PIL import Image
from test_export import NOT_INSTALLED

from ucgrade import cli as cli_module
from ucgrade import files, progress
from ucgrade.demo import write_video
from ucgrade.grader import load_grader

CPU = ["--device", "cpu"]


@pytest.fixture(scope="module")
def run(small_data, module_tmp):
    torch.manual_seed(0)
    assert train(["--data", small_data, "--out", module_tmp / "out", "--epochs", "1", *FAST]) == 0
    assert cli("export.py", module_tmp / "out" / "train").code == 0
    return module_tmp / "out" / "train"


@pytest.fixture
def test_dir(tmp_path):
    return make_folder(tmp_path / "t", {"mild": 3, "severe": 3}, seed=5)


def one_sentence(result, code=2):
    """The single line of a refusal: on stderr, no traceback."""
    lines = user_lines(result.err)
    assert result.code == code, result.err[-2000:]
    assert "Traceback" not in result.err and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def edited_onnx(run, path, metadata=None, nan_head=False):
    """A copy of the run's model.onnx with some metadata replaced, or its last layer's weights set to NaN."""
    model = onnx.load(str(run / "model.onnx"))
    if metadata:
        props = {p.key: p.value for p in model.metadata_props} | metadata
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
    if nan_head:
        gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
        weight = next(t for t in model.graph.initializer if t.name == gemm.input[1])
        weight.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(weight), np.nan), weight.name))
    onnx.save(model, str(path))
    return path


def results_folders(*folders):
    return sorted(p for folder in folders for p in folder.iterdir() if p.name.startswith(("test", ".test")))


# ----------------------------------------------------------------------------- 1. bounded memory from an .onnx


def test_an_onnx_whose_description_would_not_fit_is_one_sentence(run, small_data, tmp_path):
    image = small_data / "mild" / "mild_000.jpg"
    cases = {
        "huge": ({"img_size": "100000", "resize_size": "100000"}, "are not from 64 to 4096 px"),
        "twice": ({"class_names": json.dumps(["mild", "mild", "severe"])}, "each once"),
        "empty": ({"class_names": json.dumps(["mild", "", "severe"])}, "not a list of grade names"),
        "shape": ({"img_size": "128", "resize_size": "146"}, "is not (batch, 3, 128, 128)"),
        "grades": ({"class_names": json.dumps(["a", "b", "c", "d"])}, "(batch, 4)"),
        "nan": ({"ood_threshold": "nan"}, "ood_threshold nan is not a number"),
    }
    for name, (metadata, expected) in cases.items():
        path = edited_onnx(run, tmp_path / f"{name}.onnx", metadata)
        message = one_sentence(cli("predict.py", image, "--weights", path))
        assert "description inside" in message and expected in message, message


# ----------------------------------------------------------------------------- 2., 3. a test folder stays itself


def test_a_test_folder_never_leaves_itself_and_lists_what_it_skipped(run, test_dir, tmp_path):
    os.symlink("/", test_dir / "mild" / "root")
    os.symlink("/etc", test_dir / "severe" / "etc")
    (test_dir / "severe" / "sub").mkdir()
    os.link(test_dir / "severe" / "severe_000.jpg", test_dir / "severe" / "sub" / "again.jpg")
    os.symlink(test_dir / "severe" / "sub", test_dir / "mild" / "inside")  # stays inside the test folder: followed
    latin1 = os.path.join(os.fsencode(test_dir / "mild"), b"caf\xe9.jpg")
    os.link(os.fsencode(test_dir / "mild" / "mild_000.jpg"), latin1)
    result = cli("predict.py", test_dir, "--evaluate", "--weights", run / "model.onnx", "--eval-out", tmp_path / "r")
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["num_images"] == 8  # 3 + 3, sub/again.jpg as severe and through the link as mild; none of /
    skipped = {row.split(",")[0]: row for row in (tmp_path / "r" / "skipped.csv").read_text().splitlines()[1:]}
    assert set(skipped) == {f"{test_dir}/mild/root", f"{test_dir}/severe/etc", f"{test_dir}/mild/caf\ufffd.jpg"}
    assert "leads out of the test folder (to /etc)" in skipped[f"{test_dir}/severe/etc"]
    assert "not valid UTF-8" in skipped[f"{test_dir}/mild/caf\ufffd.jpg"]


# ----------------------------------------------------------------------------- 4., 11. --eval-out


def test_eval_out_stays_where_it_should_and_is_checked_before_grading(run, test_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(tmp_path)
    cases = [
        ("/", "names no new folder"),
        (".", "names no new folder"),
        ("..", "names no new folder"),
        (test_dir / "results", "inside the test folder"),
        (tmp_path / "a_file", "because"),
        (tmp_path / "a_file" / "r", "is a file"),
    ]
    for eval_out, expected in cases:
        result = cli("predict.py", test_dir, "--evaluate", "--weights", run / "model.onnx", "--eval-out", eval_out)
        assert expected in one_sentence(result), result.err
        assert "results folder:" not in result.out  # refused before any grading
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "t"] and not (test_dir / "results").exists()
    assert not (ROOT / "train").exists() and not list(test_dir.glob("test*"))
    # a model kept inside the test folder: its default results folder (test, beside it) would be there too
    (test_dir / "mild" / "model.onnx").write_bytes((run / "model.onnx").read_bytes())
    result = cli("predict.py", test_dir, "--evaluate", "--weights", test_dir / "mild" / "model.onnx")
    assert "inside the test folder" in one_sentence(result)


# ----------------------------------------------------------------------------- 5. nothing half-written


def test_a_full_disk_or_a_stop_while_evaluating_leaves_no_results_folder(run, test_dir, monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # ulimit -f: a stand-in for a full disk
    try:
        result = cli("predict.py", test_dir, "--evaluate", "--weights", run / "model.onnx")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    lines = user_lines(result.err)
    assert result.code == 1 and "Traceback" not in result.err and lines[-1].startswith("error: "), lines
    message = lines[-1]
    assert message.startswith("error: no space left") and "run predict.py again" in message
    assert "--resume" not in message and "ResNet50" not in message
    assert results_folders(run) == []

    from ucgrade import pages

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pages, "write_report", stopped)  # Ctrl-C at the last file, report.html
    assert cli("predict.py", test_dir, "--evaluate", "--weights", run / "model.onnx").code == 130
    assert results_folders(run) == []


def test_sigterm_during_the_int8_export_leaves_nothing_in_tmpdir(run, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "export.py"), run, "--int8", "--out", tmp_path / "m.onnx"],
        env=os.environ | {"TMPDIR": str(tmpdir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # the calibration is under way
        if line.startswith("int8: calibrating"):
            break
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: stopped by SIGTERM" in err and "Traceback" not in err
    # .ses: the 51-byte session id that importing onnxruntime writes (and keeps) in TMPDIR, whatever the export does
    assert [p.name for p in tmpdir.iterdir()] in ([], [".ses"]) and not (tmp_path / "m.int8.onnx").exists()


def test_the_full_disk_advice_fits_the_command(monkeypatch):
    error = OSError(28, "No space left on device", "outputs/train/model.int8.onnx")
    monkeypatch.setattr(sys, "argv", ["export.py"])
    message = cli_module.disk_full_message(error)
    assert "run export.py again" in message and "--resume" not in message and "300 MB" not in message
    monkeypatch.setattr(sys, "argv", ["qq.py"])
    assert "qq.py --resume" in cli_module.disk_full_message(error)


# ----------------------------------------------------------------------------- 6. NaN


def test_a_model_that_outputs_nan_is_one_sentence_and_json_stays_json(run, small_data, test_dir, tmp_path):
    image = small_data / "mild" / "mild_000.jpg"
    nan_onnx = edited_onnx(run, tmp_path / "nan.onnx", nan_head=True)
    nan_pt = tmp_path / "nan.pt"
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    checkpoint["model"]["fc.weight"] = torch.full_like(checkpoint["model"]["fc.weight"], math.nan)
    torch.save(checkpoint, nan_pt)
    for weights in (nan_onnx, nan_pt):
        result = cli("predict.py", image, "--weights", weights, "--json", *CPU)
        assert "not numbers (NaN or infinite)" in one_sentence(result) and result.out == ""
    result = cli("predict.py", test_dir, "--evaluate", "--weights", nan_onnx, "--eval-out", tmp_path / "r")
    assert "not numbers" in one_sentence(result) and not (tmp_path / "r").exists()


def test_an_edited_ood_block_in_a_checkpoint_is_one_sentence(run, small_data, tmp_path):
    image = small_data / "mild" / "mild_000.jpg"
    cases = {
        "nan_threshold": (lambda ood: ood | {"threshold": math.nan}, "threshold must be a positive number"),
        "text_threshold": (lambda ood: ood | {"threshold": "12"}, "threshold must be a positive number"),
        "list_mean": (lambda ood: ood | {"mean": [0.0] * 512}, "ood mean must be a tensor of 512"),
        "short_mean": (lambda ood: ood | {"mean": ood["mean"][:10]}, "ood mean must be a tensor of 512"),
        "nan_precision": (lambda ood: ood | {"precision": ood["precision"] * math.nan}, "not numbers"),
        "not_a_dict": (lambda ood: [1, 2], "ood block must map names"),
    }
    for name, (edit, expected) in cases.items():
        checkpoint = torch.load(run / "best.pt", weights_only=True)
        checkpoint["ood"] = edit(checkpoint["ood"])
        torch.save(checkpoint, tmp_path / f"{name}.pt")
        message = one_sentence(cli("predict.py", image, "--weights", tmp_path / f"{name}.pt", *CPU))
        assert "was damaged or edited" in message and expected in message, message


# ----------------------------------------------------------------------------- 7. the grading-only install


def blocker(folder, names):
    """A sitecustomize.py that makes importing each of names fail as on an install without them: no entry in
    sys.modules (scipy looks there for torch), and ModuleNotFoundError with the module's name."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n\n\nclass NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {names!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n\n\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
    )
    return {"PYTHONPATH": str(folder)}


def test_every_script_on_a_grading_only_install_is_one_sentence(run, test_dir, tmp_path):
    env = blocker(tmp_path / "grading_only", NOT_INSTALLED)
    results = [
        run_script("predict.py", test_dir, "--evaluate", "--weights", run / "model.onnx", env=env),
        run_script("export.py", run, "--out", tmp_path / "m.onnx", env=env),
        run_script("qq.py", "--data", test_dir, "--out", tmp_path / "out", *FAST, env=env),
    ]
    messages = [one_sentence(cli_result(result)) for result in results]
    assert "--evaluate" in messages[0] and "pip install scikit-learn matplotlib" in messages[0]
    assert "export.py needs torch" in messages[1] and "requirements.txt" in messages[1]
    assert "qq.py needs torch" in messages[2]
    assert results_folders(run) == [] and not (tmp_path / "m.onnx").exists()


def test_a_test_set_is_scored_with_an_onnx_and_no_torch(run, test_dir, tmp_path):
    """With scikit-learn and matplotlib added to a grading-only install, --evaluate works in full."""
    torch_free = [name for name in NOT_INSTALLED if name not in ("sklearn", "scipy", "matplotlib")]
    env = blocker(tmp_path / "no_torch", torch_free)
    result = run_script("predict.py", test_dir, "--evaluate", "--weights", run / "model.onnx", "--eval-out",
                        tmp_path / "r", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "could not be made" not in result.stderr  # errors.png too
    assert {"metrics.json", "report.html", "roc.png", "predictions.csv"} <= {p.name for p in (tmp_path / "r").iterdir()}


def on_a_terminal(argv, env):
    """Run argv with its stderr on a pseudo-terminal, as in a terminal window (isatty() is true there): (exit code,
    stdout, what it wrote to the terminal, its newlines as the terminal sends them: \\r\\n)."""
    master, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(arg) for arg in argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal
    )
    os.close(terminal)
    written = []
    with contextlib.suppress(OSError):  # EIO: the process has closed its end
        while chunk := os.read(master, 4096):
            written.append(chunk)
    os.close(master)
    stdout, _ = process.communicate(timeout=600)
    return process.returncode, stdout.decode(), b"".join(written).decode(errors="replace")


def without_tqdm_disable():
    return {name: value for name, value in os.environ.items() if name != "TQDM_DISABLE"}


def test_a_terminal_without_tqdm_gets_the_line_a_log_gets(tmp_path):
    """progress() on a real (pseudo-)terminal: a tqdm bar, and on an install without tqdm the one line of a log."""
    code = "from ucgrade import progress\nprogress.LONG_PHASE_S = 0\n"
    code += "bar = progress.progress(range(3), 'features', 'batches')\nprint(type(bar).__name__, sum(bar))"
    status, out, _ = on_a_terminal([sys.executable, "-c", code], without_tqdm_disable())
    assert status == 0 and out.split() == ["tqdm", "3"]  # the terminal is one: tqdm draws there
    no_tqdm = without_tqdm_disable() | blocker(tmp_path / "no_tqdm", ["tqdm"])
    status, out, terminal = on_a_terminal([sys.executable, "-c", code], no_tqdm)
    assert status == 0 and out.split() == ["Progress", "3"], terminal
    assert re.fullmatch(r"features: 3 batches in \d+\.\d s\r\n", terminal), terminal


def test_predict_with_an_onnx_on_a_terminal_needs_no_tqdm(run, small_data, tmp_path):
    """A grading-only install, used from a terminal: an image and a video (whose frames would get a bar) graded."""
    severe = [Image.open(path) for path in sorted((small_data / "severe").glob("*.jpg"))]
    clip = write_video(tmp_path / "clip.mp4", [(severe, 2)], 96)
    image = small_data / "mild" / "mild_000.jpg"
    env = without_tqdm_disable() | blocker(tmp_path / "grading_only", NOT_INSTALLED)
    argv = [sys.executable, ROOT / "predict.py", image, clip, "--weights", run / "model.onnx"]
    status, out, terminal = on_a_terminal([*argv, "--video-out", tmp_path / "v", "--min-gradable", "1"], env)
    assert status == 0 and "Traceback" not in terminal, terminal[-2000:]
    lines = user_lines(out)
    assert len(lines) == 2 and lines[0].startswith(f"{image}: ") and lines[1].startswith(f"{clip}: "), lines
    assert len(files.read_csv(tmp_path / "v" / "clip" / "frames.csv")) == 10  # 2 s at 5 frames/s


def cli_result(completed):
    from conftest import Result

    return Result(completed.returncode, completed.stdout, completed.stderr)


# ----------------------------------------------------------------------------- 8. output encodings


def test_a_name_the_terminal_cannot_show_is_escaped_not_a_crash(run, small_data, tmp_path):
    folder = tmp_path / "modéré"
    folder.mkdir()
    (folder / "é.jpg").write_bytes((small_data / "mild" / "mild_000.jpg").read_bytes())
    result = run_script("predict.py", folder, "--weights", run / "model.onnx", env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mod\\xe9r\\xe9/\\xe9.jpg: " in result.stdout


# ----------------------------------------------------------------------------- 9. threads


def test_threads_are_capped_by_the_cores_this_process_may_use(run, small_data, monkeypatch):
    image = small_data / "mild" / "mild_000.jpg"
    own = torch.get_num_threads()
    try:
        assert cli("predict.py", image, "--weights", run / "best.pt", "--threads", "1", *CPU).code == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # taskset -c 0, or a job's share of a node
        assert cli("predict.py", image, "--weights", run / "best.pt", *CPU).code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(own)
    assert "--threads must be at least 1" in one_sentence(cli("predict.py", image, "--threads", "0"))
    grader = load_grader(run / "model.onnx", threads=1)
    assert grader.grade([np.zeros((80, 80, 3), np.uint8)]).probs.shape == (1, 3)


# ----------------------------------------------------------------------------- 10. logs a person can read


def test_a_run_logged_to_a_file_has_a_line_per_phase_and_no_carriage_returns(small_data, tmp_path):
    argv = ["--data", small_data, "--epochs", "2", *FAST]
    logged, quiet = run_scripts(
        ("qq.py", *argv, "--out", tmp_path / "a", "--freeze-backbone"),
        ("qq.py", *argv, "--out", tmp_path / "b", "--quiet"),
    )
    assert logged.returncode == 0 and quiet.returncode == 0, logged.stderr[-2000:] + quiet.stderr[-2000:]
    assert "\r" not in logged.stderr and "\x1b" not in logged.stderr
    # a long phase (5 s or more: the backbone's features of 24 images, on a busy CPU the reading too) is one line
    phase = re.compile(r"(reading images|features|features \(mirrored\)): \d+ (images|batches) in \d+\.\d s")
    lines = logged.stderr.splitlines()
    assert len(lines) <= 4 and all(phase.fullmatch(line) for line in lines), lines
    assert quiet.stderr == "", quiet.stderr
    assert len([line for line in logged.stdout.splitlines() if line.startswith("epoch ")]) == 2


def test_a_long_phase_is_one_line_in_a_log_and_none_with_tqdm_disable(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LONG_PHASE_S", 0)  # every phase counts as long
    assert list(progress.progress(range(3), "features", "batches")) == [0, 1, 2]
    assert re.fullmatch(r"features: 3 batches in \d+\.\d s\n", capsys.readouterr().err)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(progress.progress(range(3), "features", "batches")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- 11. the small ones


def test_the_small_ones(run, test_dir, tmp_path):
    # export.py --out NAME.int8.onnx --int8 would write NAME.int8.int8.onnx
    message = one_sentence(cli("export.py", run, "--out", tmp_path / "m.int8.onnx", "--int8"))
    assert f"give --out {tmp_path / 'm.onnx'}" in message and not list(tmp_path.glob("*.onnx"))
    # a pipe named .onnx is not 'a folder without a best.pt'
    os.mkfifo(tmp_path / "pipe.onnx")
    message = one_sentence(cli("predict.py", test_dir, "--evaluate", "--weights", tmp_path / "pipe.onnx"))
    assert "is not a file" in message and "folder" not in message
    # an .onnx away from its run folder: the leakage check is said to be left out, in the terminal
    (tmp_path / "away").mkdir()
    (tmp_path / "away" / "model.onnx").write_bytes((run / "model.onnx").read_bytes())
    result = cli("predict.py", test_dir, "--evaluate", "--weights", tmp_path / "away" / "model.onnx")
    assert result.code == 0 and "not checked for test images the model trained on" in result.err


def test_a_peer_killed_without_a_message_is_said_so(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def peer_gone(args):
        raise RuntimeError("Connection closed by peer")

    assert cli_module.run_cli(peer_gone, None) == 1
    assert "if it printed none, it was killed" in capsys.readouterr().err


def test_grading_needs_no_home_folder(run, small_data):
    env = {key: value for key, value in os.environ.items() if key not in ("HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME")}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            small_data / "mild" / "mild_000.jpg",
            "--weights",
            run / "model.onnx",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
