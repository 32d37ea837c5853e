"""Interruptions and runs that go wrong (issue 3): real signals to real processes, resume, atomic
files, a diverging loss and running out of memory.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, cli, make_folder, user_lines
from PIL import Image

from ucgrade import data, engine, files
from ucgrade.interrupt import GracefulStop
from ucgrade.model import load_checkpoint

EPOCHS = 3
# --step-size 1: the learning rate halves every epoch, so a scheduler that is not restored shows
RUN = [*FAST, "--cam-examples", "0", "--epochs", str(EPOCHS), "--seed", "3", "--step-size", "1", "--gamma", "0.5"]
NUMBERS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # history columns that do not depend on timing


@pytest.fixture(scope="module")
def data24(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), {"mild": 8, "moderate": 8, "severe": 8})


@pytest.fixture(scope="module")
def reference(data24, module_tmp):
    """The run of RUN never interrupted, on a machine whose free memory cannot hold the decoded images:
    --cache auto streams them from disk, read in this process (--workers 0). (run folder, what it printed)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "available_memory_bytes", lambda: 100_000)  # 24 images decoded need ~0.4 MB
        code, said, err = cli("qq.py", "--data", data24, "--out", module_tmp, "--name", "full", *RUN, "--workers", "0")
    assert code == 0, err
    return module_tmp / "full", said


def history_of(run_dir):
    return [{key: float(row[key]) for key in NUMBERS} for row in files.read_csv(run_dir / "history.csv")]


def interrupt_after_first_epoch(args, run_dir, signum, log_dir, whole_group=False):
    """Start qq.py, send signum once history.csv has a row, and wait for the process to end.

    whole_group: signal the process and its DataLoader workers, as Ctrl-C in a terminal or a job
    scheduler's SIGTERM does. Returns (exit code, seconds from the signal to the exit, stderr).
    """
    with open(log_dir / "stderr.txt", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "qq.py"), *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=whole_group,
        )
        history = run_dir / "history.csv"
        deadline = time.monotonic() + 300
        try:
            while not (
                history.is_file() and len(history.read_text().splitlines()) >= 2
            ):  # written atomically: never half a file
                assert process.poll() is None, "the run ended before its first epoch was written"
                assert time.monotonic() < deadline, "no epoch finished within 5 minutes"
                time.sleep(0.02)
            if whole_group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
            sent = time.monotonic()
            code = process.wait(timeout=120)
            seconds = time.monotonic() - sent
        finally:
            if process.poll() is None:
                (os.killpg if whole_group else os.kill)(process.pid, signal.SIGKILL)
                process.wait()
    return code, seconds, (log_dir / "stderr.txt").read_bytes().decode("utf-8", "replace")


def check_interrupted_run(run_dir, code, seconds, stderr):
    """What an interrupted run must leave behind; returns the number of finished epochs."""
    assert code == 130 and "Traceback" not in stderr
    assert seconds < 20, f"took {seconds:.1f} s to stop"
    message = user_lines(stderr)[-1]
    assert message.startswith("interrupted: training stopped after epoch ") and message.endswith(
        f"Resume with: python qq.py --resume {run_dir}"
    )
    finished = len(history_of(run_dir))
    assert 1 <= finished < EPOCHS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["status"] == "interrupted"
        and metrics["epochs_completed"] == finished
        and metrics["resume"] == f"python qq.py --resume {run_dir}"
    )
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == finished
    assert 1 <= load_checkpoint(run_dir / "best.pt")["epoch"] <= finished
    with Image.open(run_dir / "curves.png") as curves:
        curves.verify()
    return finished


def test_cache_auto_streams_the_images_when_they_do_not_fit(reference):
    run, said = reference
    assert any(
        line.startswith("streaming images from disk (cache auto; decoded they would need ")
        for line in said.splitlines()
    ), said
    assert "decoded images cached in memory" not in said  # the cached run below says so, with its memory
    assert len(history_of(run)) == EPOCHS and json.loads((run / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "loading, resume_flags",
    [([], []), (["--cache", "off", "--workers", "1"], ["--workers", "0"])],
    ids=["cached", "streamed-by-a-worker-then-resumed-without"],
)
def test_ctrl_c_keeps_finished_epochs_and_resume_matches_an_uninterrupted_run(
    data24, reference, tmp_path, loading, resume_flags
):
    run = tmp_path / "out" / "cut"
    code, seconds, stderr = interrupt_after_first_epoch(
        ["--data", data24, "--out", tmp_path / "out", "--name", "cut", *RUN, *loading], run, signal.SIGINT, tmp_path
    )
    assert "SIGINT received: stopping after the current batch" in stderr
    finished = check_interrupted_run(run, code, seconds, stderr)
    before = history_of(run)

    code, said, err = cli("qq.py", "--resume", run, *resume_flags, "--device", "cpu")
    assert code == 0, err
    assert f"resuming {run} after epoch {finished} of {EPOCHS}" in said
    assert ("decoded images cached in memory" in said) is (not loading)  # the run's --cache, auto or off
    assert os.listdir(tmp_path / "out") == ["cut"]  # the same folder, no new one
    history = history_of(run)
    assert len(history) == EPOCHS and history[:finished] == before
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"

    # the same seed without the interruption, its images streamed in the main process: the same history,
    # metrics and weights, whatever --cache and --workers were
    reference = reference[0]
    for epoch, (got, want) in enumerate(zip(history, history_of(reference)), 1):
        for key in NUMBERS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (epoch, key)
    got, want = (json.loads((r / "metrics.json").read_text()) for r in (run, reference))
    assert got["confusion_matrix"] == want["confusion_matrix"] and got["best_epoch"] == want["best_epoch"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "val_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert files.read_csv(run / "split.csv") == files.read_csv(reference / "split.csv")
    got, want = (load_checkpoint(r / "best.pt")["model"] for r in (run, reference))
    assert all(torch.allclose(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-6) for k in want)


def test_ctrl_c_in_the_first_epoch_says_there_is_no_checkpoint_yet(data24, tmp_path, monkeypatch):
    real = engine.train_one_epoch

    def press_ctrl_c_as_the_first_epoch_starts(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled by qq.py's GracefulStop: the epoch stops after its first batch
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", press_ctrl_c_as_the_first_epoch_starts)
    run = tmp_path / "out" / "early"
    code, _, err = cli("qq.py", "--data", data24, "--out", tmp_path / "out", "--name", "early", *RUN).lines()
    assert code == 130
    assert err[-1] == (
        f"interrupted: training stopped before the first of {EPOCHS} epochs finished, so {run} has no checkpoint "
        "yet and resuming "
        f"starts the training from the beginning. Resume with: python qq.py --resume {run}"
    )
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"


def test_a_second_ctrl_c_stops_at_once_and_the_run_is_still_marked_interrupted(data24, tmp_path, monkeypatch):
    """Ctrl-C twice, in training and then in the report after the last epoch: the first asks to stop after
    the batch, or to finish the report; the second stops at once. Each time the run says it was interrupted
    and resumes; the last resume only evaluates."""
    run = tmp_path / "out" / "twice"
    resume = f"Resume with: python qq.py --resume {run}"
    went_on = []

    def ctrl_c_twice(real):
        def pressed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the handler raises KeyboardInterrupt here
            went_on.append(real.__name__)
            return real(*args, **kwargs)

        return pressed

    def epoch_two_pressed(model, criterion, optimizer, data_loader, runtime, epoch, *rest):
        step = ctrl_c_twice(real_epoch) if epoch == 2 else real_epoch
        return step(model, criterion, optimizer, data_loader, runtime, epoch, *rest)

    real_epoch = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", epoch_two_pressed)
    argv = ["--data", data24, "--out", tmp_path / "out", "--name", "twice", *RUN, "--epochs", "2"]
    code, _, lines = cli("qq.py", *argv).lines()
    assert code == 130
    assert "SIGINT received: stopping after the current batch (Ctrl-C again stops at once)." in lines, lines
    assert lines[-1] == (
        f"interrupted: training stopped after epoch 1 of 2; {run} keeps best.pt, last.pt, history.csv and curves.png "
        f"of the finished epochs. {resume}"
    )
    assert not went_on and len(history_of(run)) == 1 and load_checkpoint(run / "last.pt")["epoch"] == 1
    status = json.loads((run / "metrics.json").read_text())
    assert status["status"] == "interrupted" and status["epochs_completed"] == 1

    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    monkeypatch.setattr(engine, "measure_inference_time", ctrl_c_twice(engine.measure_inference_time))
    code, _, lines = cli("qq.py", "--resume", run, "--device", "cpu").lines()
    assert code == 130
    assert any(line.startswith("SIGINT received: finishing the metrics and the report first, about ") for line in lines)
    assert lines[-1] == (
        f"interrupted: training stopped after epoch 2 of 2; {run} keeps best.pt, last.pt, history.csv and curves.png "
        f"of the finished epochs. {resume}"
    )
    assert not went_on and len(history_of(run)) == 2 and not (run / "report.html").exists()
    status = json.loads((run / "metrics.json").read_text())
    assert (
        status["status"] == "interrupted"
        and status["epochs_completed"] == 2
        and status["resume"] == f"python qq.py --resume {run}"
    )

    monkeypatch.undo()
    code, out, err = cli("qq.py", "--resume", run, "--device", "cpu")
    assert code == 0, err
    assert f"resuming {run} after epoch 2 of 2" in out
    assert len(history_of(run)) == 2 and (run / "report.html").is_file()
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


def test_sigterm_to_the_process_and_its_loader_workers_stops_the_run(data24, tmp_path):
    run = tmp_path / "out" / "train"
    args = [
        "--data",
        data24,
        "--out",
        tmp_path / "out",
        *RUN,
        "--cache",
        "off",
        "--workers",
        "2",
    ]  # images read by 2 worker processes
    code, seconds, stderr = interrupt_after_first_epoch(args, run, signal.SIGTERM, tmp_path, whole_group=True)
    assert (
        stderr.count("SIGTERM received: stopping after the current batch") == 1
    )  # said by the main process, not by each worker
    check_interrupted_run(run, code, seconds, stderr)


# A process group signalled while a loader's workers start: the time between torch's signal handlers and the
# worker_init_fn of each worker is made 1 s long, and SIGTERM reaches the group within it.
WORKERS_SIGNALLED_AS_THEY_START = """
import os, signal, sys, time
import torch
from torch.utils.data._utils import signal_handling
sys.path.insert(0, {root!r})
from ucgrade import data

handlers = signal_handling._set_worker_signal_handlers
def slow_start():
    handlers()  # torch's: a SIGTERM that its parent did not send kills the worker
    time.sleep(1.0)
signal_handling._set_worker_signal_handlers = slow_start
received = []
signal.signal(signal.SIGTERM, lambda *_: received.append("SIGTERM"))
loader = {loader}(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=2, num_workers=2,
                       worker_init_fn=data._leave_signals_to_the_main_process)
batches = iter(loader)
os.killpg(0, signal.SIGTERM)
print(sorted(int(i) for batch in batches for i in batch[0]), received)
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_a_signal_while_the_loader_workers_start_reaches_only_the_main_process():
    """A scheduler's SIGTERM to the group as an epoch's workers start: with the project's loader the workers
    live on and the main process alone gets the signal, to stop after its batch; a plain DataLoader loses a worker,
    and the run would end in a traceback or hang (test_sigterm_to_the_process_and_its_loader_workers_stops_the_run met
    it once, in CI, when its signal came as the second epoch's workers started)."""
    outcomes = {}
    for loader, seconds in (("data.SignalSafeLoader", 60), ("torch.utils.data.DataLoader", 20)):
        script = WORKERS_SIGNALLED_AS_THEY_START.format(root=str(ROOT), loader=loader)
        try:
            result = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds, start_new_session=True
            )
            outcomes[loader] = (result.returncode, result.stdout.strip(), result.stderr)
        except subprocess.TimeoutExpired:
            outcomes[loader] = (None, "", "hung")
    code, out, err = outcomes["data.SignalSafeLoader"]
    assert code == 0 and out == "[0, 1, 2, 3, 4, 5, 6, 7] ['SIGTERM']", err
    code, _, err = outcomes["torch.utils.data.DataLoader"]
    # a lost worker is an error, or a process that never ends (its other worker ignores the SIGTERM of exit)
    lost = re.search(r"DataLoader worker \(pid.*\) (is killed by signal: Terminated|exited unexpectedly)", err)
    assert code != 0 and (lost or err == "hung"), err


def test_a_diverging_loss_stops_the_run_with_a_hint(small_data, tmp_path):
    # 1e30: the training loss is nan at the second step. 50: the weights blow up so that the
    # validation loss is nan while the training loss still looks finite.
    for lr in ("1e30", "50"):
        argv = ["--data", small_data, "--out", tmp_path / f"lr{lr}", *FAST, "--epochs", "3", "--precision", "fp32"]
        code, _, lines = cli("qq.py", *argv, "--lr", lr).lines()
        assert code == 2
        assert len(lines) == 1 and "lower the learning rate (for example --lr" in lines[0], lines
        assert (
            "the training loss became nan in epoch 1, batch 2"
            if lr == "1e30"
            else "the validation loss became nan in epoch 1"
        ) in lines[0]
        run = tmp_path / f"lr{lr}" / "train"
        assert not (run / "metrics.json").exists()
        for name in ("best.pt", "last.pt"):  # nothing broken was kept as a model
            if (run / name).exists():
                assert all(torch.isfinite(t).all() for t in load_checkpoint(run / name)["model"].values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS limits memory this way on Linux only")
def test_running_out_of_memory_suggests_a_smaller_batch(tmp_path):
    """The real qq.main under a real memory limit: set after the imports, it leaves room to start
    but not for a batch of 16 images of 448 x 448 pixels through ResNet50."""
    data = make_folder(tmp_path / "data", {"mild": 6, "moderate": 6, "severe": 6})
    driver = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        import qq
        import torch  # noqa: F401  (loaded before the limit is set, as qq.main loads it)
        from ucgrade.cli import run_cli

        with open("/proc/self/status") as status:
            in_use = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        limit = in_use + 1000 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.exit(run_cli(qq.main, qq.get_args_parser().parse_args(sys.argv[1:])))
    """)
    args = [
        "--data",
        data,
        "--out",
        tmp_path / "out",
        "--img-size",
        "448",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--pretrained",
        "no",
        "--cam-examples",
        "0",
        "--device",
        "cpu",
    ]
    result = subprocess.run([sys.executable, "-c", driver, *map(str, args)], cwd=ROOT, capture_output=True)
    stderr = result.stderr.decode("utf-8", "replace")
    assert "run folder:" in result.stdout.decode()  # it got as far as training
    assert result.returncode == 2 and "Traceback" not in stderr, stderr
    assert user_lines(stderr) == [
        "error: ran out of memory with --batch-size 32; try a smaller --batch-size, for example 16, or a smaller "
        "--img-size."
    ]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    class FailsHalfway:
        def __reduce__(self):
            raise RuntimeError("disk full")  # as if the write broke off

    path = tmp_path / "last.pt"
    files.save_torch(path, {"epoch": 1, "weights": torch.ones(1000)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        files.save_torch(path, {"epoch": 2, "weights": torch.zeros(1000), "bad": FailsHalfway()})
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # the temporary file is gone too

    files.write_json(tmp_path / "metrics.json", {"status": "finished"})
    with pytest.raises(ValueError):
        files.write_json(tmp_path / "metrics.json", {"status": "interrupted", "loss": float("nan")})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"status": "finished"}


def test_a_kill_during_a_checkpoint_write_leaves_a_whole_file(tmp_path):
    """SIGKILL a process that keeps rewriting a large checkpoint: whenever the kill lands, the file
    holds one complete version, never a mix or a truncated one."""
    target = tmp_path / "last.pt"
    writer = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from ucgrade import files
        versions = [{{"version": v, "weights": torch.full((4_000_000,), float(v))}} for v in range(2)]
        i = 0
        while True:
            files.save_torch({str(target)!r}, versions[i % 2])
            i += 1
    """)
    process = subprocess.Popen([sys.executable, "-c", writer])
    try:
        deadline = time.monotonic() + 120
        while not target.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        mid_write = False
        for _ in range(50):  # kill it while a temporary file is being written, which is most of the time
            time.sleep(np.random.default_rng().uniform(0.05, 0.3))
            if list(tmp_path.glob(".last.pt.*.tmp")):
                process.kill()
                process.wait()
                mid_write = bool(list(tmp_path.glob(".last.pt.*.tmp")))
                break
    finally:
        process.kill()
        process.wait()
    assert mid_write, "could not catch the writer in the middle of a write"
    checkpoint = torch.load(target, weights_only=True)
    assert checkpoint["weights"].shape == (4_000_000,) and (checkpoint["weights"] == checkpoint["version"]).all()


def test_an_interrupted_cross_validation_resumes_as_a_whole(data24, tmp_path):
    """Ctrl-C in fold 2 of 2: the message names the whole run, which resumes with the folds of its
    split.csv, keeps the finished fold as it is and continues fold 2 from its last.pt. A fold folder
    alone is refused, because resuming it would nest a new cross-validation."""
    out = tmp_path / "out"
    run = out / "cv"
    history = run / "fold2" / "history.csv"

    def press_ctrl_c_after_an_epoch():
        deadline = time.monotonic() + 300
        while not (history.is_file() and len(history.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)  # handled by qq.py's GracefulStop in the main thread

    presser = threading.Thread(target=press_ctrl_c_after_an_epoch)
    presser.start()
    code, _, lines = cli("qq.py", "--data", data24, "--out", out, "--name", "cv", "--folds", "2", *RUN).lines()
    presser.join()
    assert code == 130, lines
    assert lines[-1].startswith("interrupted: training stopped after epoch ") and lines[-1].endswith(
        f"Resume with: python qq.py --resume {run}"
    )
    assert json.loads((run / "metrics.json").read_text()) == {
        "status": "interrupted",
        "folds": 2,
        "folds_finished": 1,
        "resume": f"python qq.py --resume {run}",
    }
    assert json.loads((run / "fold2" / "metrics.json").read_text())["resume"] == f"python qq.py --resume {run}"
    interrupted_after = len(history_of(run / "fold2"))
    assert 1 <= interrupted_after < EPOCHS
    split = (run / "split.csv").read_text()
    fold1 = {p.name: p.read_bytes() for p in (run / "fold1").iterdir() if p.is_file()}

    for argv, message in [
        (
            ["--resume", run / "fold1"],
            f"'{run / 'fold1'}' is one fold of a cross-validation run; resume the whole run with: python qq.py "
            f"--resume {run}",
        ),
        (["--resume", run, "--epochs", "4"], "--epochs cannot change when a cross-validation run is resumed"),
    ]:
        code, _, lines = cli("qq.py", *argv, "--device", "cpu").lines()
        assert code == 2
        assert len(lines) == 1 and message in lines[0], lines

    code, said, err = cli("qq.py", "--resume", run, "--device", "cpu")
    assert code == 0, err
    assert (
        "fold 1/2 already finished" in said
        and f"resuming {run / 'fold2'} after epoch {interrupted_after} of {EPOCHS}" in said
    )
    assert os.listdir(out) == ["cv"] and sorted(p.name for p in run.glob("fold*")) == ["fold1", "fold2"]
    assert (run / "split.csv").read_text() == split
    assert {
        p.name: p.read_bytes() for p in (run / "fold1").iterdir() if p.is_file()
    } == fold1  # the finished fold is untouched
    for k in (1, 2):
        fold = run / f"fold{k}"
        assert (
            len(history_of(fold)) == EPOCHS and json.loads((fold / "metrics.json").read_text())["status"] == "finished"
        )
        validated = sorted(r["path"] for r in files.read_csv(run / "split.csv") if r["fold"] == str(k))
        assert sorted(r["path"] for r in files.read_csv(fold / "predictions.csv")) == validated
    pooled = files.read_csv(run / "predictions.csv")
    assert sorted(r["path"] for r in pooled) == sorted(r["path"] for r in files.read_csv(run / "split.csv"))
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


def test_a_loader_process_hit_before_it_ignores_signals_leaves_the_stop_to_the_run(capfd):
    """A data loader process is forked with the run's handler and only then ignores signals: a SIGTERM to the
    whole process group in between must neither print a second "SIGTERM received" nor stop it (seen on an
    AVX2 CPU, where the loader processes start more slowly). The run's own process handles the signal."""
    with GracefulStop() as stop:
        pid = os.fork()
        if pid == 0:  # the loader process, before its worker_init_fn
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(1 if stop() else 0)
        _, status = os.waitpid(pid, 0)
        assert not stop()
    assert os.WEXITSTATUS(status) == 0 and "SIGTERM received" not in capfd.readouterr().err
