"""Shared test data: generated ImageFolders, a small trained run, and the CLI in this process or a subprocess."""

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import pytest
import torch

from ucgrade.cli import run_cli
from ucgrade.demo import make_image
from ucgrade.grader import GRADING_PRECISION
from ucgrade.images import load_image
from ucgrade.torch_grader import torch_grader

ROOT = Path(__file__).resolve().parent.parent
# Small and fast, on a device chosen explicitly (a GPU would change precisions and timings): ResNet18 at
# 64 px trains about three times as fast as ResNet50 (on a 2-core CPU with bf16, 200 images/s against 70),
# and writes checkpoints of half the size. A test that needs Grad-CAM overlays or the method's
# ResNet50 asks for them (--cam-examples, --arch resnet50); trained_run is a ResNet50 run.
FAST = ["--img-size", "64", "--batch-size", "8", "--pretrained", "no", "--device", "cpu"]
FAST += ["--arch", "resnet18", "--cam-examples", "0"]


def make_folder(root, counts, size=72, seed=0, ext=".jpg"):
    """An ImageFolder of synthetic endoscopy-like images: counts maps grade -> number of images."""
    rng = np.random.default_rng(seed)
    grades = {"mild": "mild", "moderate": "moderate", "severe": "severe"}
    root = Path(root)
    for k, (name, n) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        style = grades.get(name, ("mild", "moderate", "severe")[k % 3])
        for i in range(n):
            make_image(style, rng, size).save(folder / f"{name}_{i:03d}{ext}")
    return root


def copy_run(run_dir, destination, **copytree_args):
    """A copy of a run folder whose .pt files are hard links: the tool replaces a checkpoint by an atomic
    rename, never writes into one, so the copy and the original stay apart at no cost in disk or time.
    A test that changes a .pt of the copy must replace the file too (os.replace, or unlink it first); the
    links also share the files' times and permissions, so it must not os.utime or chmod them either."""

    def link_checkpoints(source, target):
        if source.endswith(".pt"):
            os.link(source, target)
            return target
        return shutil.copy2(source, target)

    return Path(shutil.copytree(run_dir, destination, copy_function=link_checkpoints, **copytree_args))


def grade_with_library(images, weights, threads=None, precision=GRADING_PRECISION):
    """{str(path): (grade, probabilities)} from the torch grader, one image at a time, with the checkpoint on the CPU
    in the precision predict.py grades in by default (fp32), or another. threads: those of a predict.py to compare
    with, if not this process's (the order of a sum's terms moves the probabilities by about 1e-7)."""
    grader = torch_grader(weights, "cpu", precision)
    own = torch.get_num_threads()
    torch.set_num_threads(threads or own)
    try:
        graded = {}
        for path in images:
            probs = grader.grade([load_image(path)]).probs[0]
            graded[str(path)] = (grader.class_names[int(probs.argmax())], dict(zip(grader.class_names, probs.tolist())))
        return graded
    finally:
        torch.set_num_threads(own)


class Result(NamedTuple):
    """What a command printed and how it ended: the exit code, the whole stdout and stderr."""

    code: int
    out: str
    err: str

    def lines(self):
        """(exit code, stdout lines, stderr lines) as a terminal shows them (see user_lines)."""
        return self.code, user_lines(self.out), user_lines(self.err)


def cli(script, *argv):
    """`python SCRIPT ARGV...` in this process: qq.py, predict.py, export.py, or a module run with -m (ucgrade.report).

    As the command line runs it: argparse reads the arguments (a mistake exits 2 with its line), and main runs
    through cli.run_cli, so a UserError is one line on stderr and exit code 2. What it prints is captured and then
    passed on to this process's streams, so that pytest shows it beside a failing test. In this process, unlike
    run_script, a test can monkeypatch the code, and torch is imported only once.
    """
    argv = [str(arg) for arg in argv]
    module = importlib.import_module(script.removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    # sys.argv as the shell sets it: argparse names the script in its messages after sys.argv[0]
    try:
        with (
            mock.patch.object(sys, "argv", [script, *argv]),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            if hasattr(module, "get_args_parser"):
                code = run_cli(module.main, module.get_args_parser().parse_args(argv))
            else:  # python -m ucgrade.report: its main takes the arguments as they are
                code = run_cli(module.main, argv)
    except SystemExit as stop:  # argparse: --help, or a mistake on the command line
        code = stop.code
    finally:  # also when an unexpected exception goes on to fail the test
        print(out.getvalue(), end="")
        print(err.getvalue(), end="", file=sys.stderr)
    return Result(code, out.getvalue(), err.getvalue())


def train(argv):
    """qq.py with these arguments, in this process; returns the exit code."""
    return cli("qq.py", *argv).code


def run_script(script, *args, cwd=ROOT, env=None, timeout=600):
    """Run qq.py or predict.py as a user would, with no ImageNet weights in reach."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_scripts(*commands, cwd=ROOT, timeout=600):
    """Run several commands, each (script, *args), at the same time; their results in order.

    Each process spends seconds importing torch, so running them side by side saves test time. They share
    the cores instead of each starting a thread per core, which would make them wait for one another.
    The output is decoded without newline translation, so that user_lines() sees the carriage returns.
    """
    threads = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // len(commands)))}
    processes = [
        subprocess.Popen(
            [sys.executable, str(ROOT / script), *map(str, args)],
            cwd=cwd,
            env=os.environ | (threads if len(commands) > 1 else {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for script, *args in commands
    ]
    results = []
    for command, process in zip(commands, processes):
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(
            subprocess.CompletedProcess(
                command, process.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
            )
        )
    return results


def user_lines(stream):
    """The lines a user reads in a terminal: progress-bar redraws (carriage returns) resolved, blanks dropped."""
    lines = (line.rsplit("\r", 1)[-1].strip() for line in stream.split("\n"))  # not splitlines(): it splits at \r
    return [line for line in lines if line]


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory, request):
    """A passing suite leaves nothing in the temp folder (issue 13), not even the small data folders that
    fixtures share; a failing one keeps them, beside the folders of the failed tests, to look into."""
    yield
    if request.session.testsfailed == 0:
        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_torch_home(tmp_path_factory, monkeypatch):
    """Every test gets an empty torch hub cache, so no test depends on downloaded weights."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    yield home
    shutil.rmtree(home, ignore_errors=True)  # a passing suite leaves nothing in the temp folder (issue 13)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """A folder for the runs one test module shares, deleted when the module is done: a run takes ~300 MB."""
    path = tmp_path_factory.mktemp("module")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("data"), {"mild": 10, "moderate": 10, "severe": 10})
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_run(small_data, tmp_path_factory):
    """One finished run of the method (ResNet50), shared by the tests that only read its outputs or copy it."""
    out = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    assert (
        train(["--data", small_data, "--out", out, "--epochs", "3", *FAST, "--arch", "resnet50", "--cam-examples", "2"])
        == 0
    )
    yield out / "train"
    shutil.rmtree(out, ignore_errors=True)  # ~300 MB
