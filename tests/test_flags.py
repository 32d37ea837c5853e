"""Invalid flag values (issue 3): one clear line naming the flag, exit code 2, before any work starts."""

import errno

import pytest
import torch
from conftest import FAST, ROOT, cli, run_scripts, user_lines

from ucgrade.cli import run_cli
from ucgrade.device import setup_backends

INVALID = [
    (["--val-split", "0"], "--val-split must be between 0 and 1"),
    (["--epochs", "0"], "--epochs must be at least 1 (got 0)."),
    (["--batch-size", "-1"], "--batch-size must be at least 1 (got -1)."),
    (["--img-size", "7"], "--img-size must be at least 64 pixels"),
    (["--lr", "inf"], "--lr must be a positive number (got inf)."),
    (["--lr", "0"], "--lr must be a positive number (got 0.0)."),
    (
        ["--name", "2026/run"],
        "--name '2026/run' must be a plain folder name, without '/'; the run folder goes under --out.",
    ),
    (["--name", ".."], "--name '..' must be a plain folder name"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295 (got -1)."),
    (["--groups", str(ROOT / "tests")], f"--groups '{ROOT / 'tests'}' is a folder; give the file itself."),
    (
        ["--out", str(ROOT / "README.md" / "runs")],
        f"--out '{ROOT / 'README.md' / 'runs'}' cannot be a folder, because '{ROOT / 'README.md'}' is a file; give "
        "a folder.",
    ),
]
if not torch.cuda.is_available():
    INVALID.append((["--device", "cuda"], "--device cuda was asked for, but this machine has no CUDA GPU"))


@pytest.mark.parametrize("flag, expected", INVALID, ids=[" ".join(flag) for flag, _ in INVALID])
def test_invalid_flags_stop_before_any_work(flag, expected, small_data, tmp_path):
    code, out, err = cli("qq.py", "--data", small_data, "--out", tmp_path / "out", "--epochs", "1", *FAST, *flag)
    assert code == 2
    lines = user_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "reading" not in out  # the data was not even scanned
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_predict_rejects_a_missing_device(trained_run, small_data):
    code, out, err = cli(
        "predict.py", small_data / "mild" / "mild_000.jpg", "--weights", trained_run / "best.pt", "--device", "cuda"
    )
    assert code == 2
    assert (
        err == "error: --device cuda was asked for, but this machine has no CUDA GPU that PyTorch can use; "
        "use --device cpu or auto.\n"
    )
    assert out == ""


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("bf16", True), ("fp16", True)])
def test_fp32_on_a_gpu_is_true_fp32(precision, tf32):
    """setup_backends only sets torch's global flags, so its CUDA branch runs here too; TF32 is for mixed precision."""
    flags = (
        (torch.backends.cudnn, "benchmark"),
        (torch.backends.cudnn, "allow_tf32"),
        (torch.backends.cuda.matmul, "allow_tf32"),
    )
    before = [getattr(module, name) for module, name in flags]
    try:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
        setup_backends(torch.device("cuda"), precision)
        assert torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        for (module, name), value in zip(flags, before):
            setattr(module, name, value)


def test_predict_cam_folder_under_a_file_is_one_sentence(trained_run, small_data):
    image, notes = small_data / "mild" / "mild_000.jpg", small_data / "mild" / "mild_001.jpg"
    code, out, err = cli(
        "predict.py", image, "--weights", trained_run / "best.pt", "--cam", notes / "cams", "--device", "cpu"
    )
    assert code == 2
    assert err == f"error: --cam '{notes / 'cams'}' cannot be a folder, because '{notes}' is a file; give a folder.\n"
    assert out == ""


def test_a_failed_file_operation_is_one_sentence_and_a_closed_pipe_is_left_to_main_entry(capsys):
    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "outputs/train/last.pt")

    def no_permission(args):
        raise OSError(errno.EACCES, "Permission denied", "outputs/train/last.pt")

    def reader_gone(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    assert run_cli(disk_full, None) == 1
    assert capsys.readouterr().err.startswith(
        "error: no space left while writing 'outputs/train/last.pt' (No space left on device): a run of ResNet50 "
        "needs about 300 MB free"
    )
    assert run_cli(no_permission, None) == 1
    assert capsys.readouterr().err == (
        "error: could not write or read 'outputs/train/last.pt': Permission denied; "
        "free disk space or check the folder's permissions, then run again.\n"
    )
    with pytest.raises(BrokenPipeError):
        run_cli(reader_gone, None)


def test_a_command_line_mistake_is_one_line_without_the_usage_block(small_data, tmp_path):
    """The scripts as a user runs them, side by side: argparse's mistakes and a value check_args refuses."""
    out = tmp_path / "out"
    results = run_scripts(
        ("qq.py", "--select", "worst"),
        ("qq.py", "--epochs", "ten"),
        ("qq.py", "--lerning-rate", "0.01"),
        ("predict.py",),
        ("qq.py", "--data", small_data, "--out", out, *FAST, "--val-split", "1.5"),
    )
    expected = [  # argparse's own words, which vary a little between Python versions, then ours
        ("error: argument --select: invalid choice: 'worst'", "qq.py"),
        ("error: argument --epochs: invalid int value: 'ten'", "qq.py"),
        ("error: unrecognized arguments: --lerning-rate 0.01", "qq.py"),
        ("error: the following arguments are required: IMAGE", "predict.py"),
    ]
    for result, (start, script) in zip(results, expected):
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(start), result.stderr
        assert result.stderr.endswith(f"; see python {script} --help.\n"), result.stderr
    refused = results[-1]
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    assert refused.stderr == "error: --val-split must be between 0 and 1, for example 0.2 (got 1.5).\n"
    assert not out.exists()
