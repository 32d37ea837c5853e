"""torchrun: one model trained by several processes (gloo on the CPU here; NCCL on GPUs), issue 10."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, ROOT, cli, copy_run, make_folder, train

from ucgrade import data
from ucgrade.files import read_csv

# 30 images: 24 train (three global batches of 8, four images per process), 6 validation (3 per process).
# ResNet18 on --device cpu, so the processes meet over gloo on any machine; fp32, which every CPU runs natively.
RUN = [*FAST, "--precision", "fp32"]
OUTPUTS = [
    "best.pt", "last.pt", "history.csv", "curves.png", "confusion_matrix.png", "confusion_matrix_normalized.png",
    "roc.png", "metrics.json", "predictions.csv", "split.csv", "skipped.csv", "config.json", "report.html",
    "cam/index.csv",
]  # fmt: skip


def torchrun(*args, logs):
    """The command line of torchrun with two processes on this machine, as a user would type it (its own
    logs in logs, not in a folder of the machine's temp folder that it would leave behind)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return command + ["--log-dir", str(logs), str(ROOT / "qq.py"), *map(str, args)]


def run_torchrun(*args, logs, env=None, timeout=600):
    full_env = dict(os.environ) | {"OMP_NUM_THREADS": "1"} | (env or {})
    command = torchrun(*args, logs=logs)
    return subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), {"mild": 10, "moderate": 10, "severe": 10}, size=64)


@pytest.fixture(scope="module")
def two_and_one(tiny, module_tmp):
    """A 2-process run with --sync-bn and a 1-process run of the same settings (the same global batch),
    trained side by side: torchrun in the background, the one process in this one.

    resnet18: a ResNet50 from random weights at 64 px has channels of nearly constant value in its last
    stage, where any two correct batch norms differ by several percent in the gradient (torch's own
    BatchNorm2d against the textbook formula, in one process, by up to 11%), so it would test that
    conditioning rather than the distribution."""
    argv = ["--data", tiny, "--epochs", "2", "--sync-bn", *RUN, "--cam-examples", "1"]
    env = dict(os.environ) | {"OMP_NUM_THREADS": "1"}
    command = torchrun("--out", module_tmp / "two", *argv, logs=module_tmp / "logs")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # one thread, as torchrun gives each process: the thread count alone changes the losses of this
    # run by 0.15% after six steps (the reductions' order), as much as a real difference would
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(["--out", module_tmp / "one", *argv]) == 0
    except BaseException:
        process.kill()
        raise
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = process.communicate(timeout=600)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return module_tmp / "two", module_tmp / "one", result


def test_two_processes_write_one_run_with_every_file_and_every_validation_image_once(two_and_one):
    two, one, result = two_and_one
    assert os.listdir(two) == ["train"]  # process 0 made the folder and named it for the other
    run = two / "train"
    for name in OUTPUTS:
        assert (run / name).is_file(), name
    split = read_csv(run / "split.csv")
    assert split == read_csv(one / "train" / "split.csv")  # the same split as one process with the same seed
    val = [row["path"] for row in split if row["subset"] == "val"]
    predicted = [row["path"] for row in read_csv(run / "predictions.csv")]
    assert predicted == val and len(set(predicted)) == len(val) == 6  # each image once, in the split's order
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_images"] == 6 and sum(map(sum, metrics["confusion_matrix"])) == 6
    truth = {row["path"]: row["class"] for row in split}
    correct = sum(truth[row["path"]] == row["predicted"] for row in read_csv(run / "predictions.csv"))
    assert metrics["accuracy"] == pytest.approx(correct / 6)  # from all the validation images, not one process's
    config = json.loads((run / "config.json").read_text())
    assert config["processes"] == 2 and config["sync_bn"] is True
    assert result.stdout.count("run folder:") == 1  # one process speaks for the run


def test_two_processes_with_sync_bn_train_as_one_process_with_the_same_global_batch(two_and_one):
    """Same images, augmentation seeds, initial weights and global batches, batch norm over the global
    batch, one thread per process: only the order of the floating-point sums across processes differs,
    which moves the first epoch's training loss by about 1e-5 relative (1e-4 allowed). Its validation
    loss moves by about 4e-4 (1e-3 allowed), because each process validates batches of 4 instead of 8
    and the running statistics come from GlobalBatchNorm's sums. Per-process batch norm changes the first
    epoch's training loss by 3% (1.2612 against 1.2245).

    The second epoch is compared by its learning rate only: by then this run from random
    weights is so ill-conditioned that, with an AVX2-only CPU's kernels, the thread count alone moves its
    loss by 0.2% and the two correct batch norms (torch's, and GlobalBatchNorm's global sums) by 1%, more
    than per-process batch norm does there (0.65%). (With AVX-512 kernels all three agree to 1e-5.)"""
    two, one, _ = two_and_one
    got, want = read_csv(two / "train" / "history.csv"), read_csv(one / "train" / "history.csv")
    assert len(got) == len(want) == 2
    for key, tolerance in (("train_loss", 1e-4), ("val_loss", 1e-3)):
        assert float(got[0][key]) == pytest.approx(float(want[0][key]), rel=tolerance), key
    assert float(got[0]["train_acc"]) == pytest.approx(float(want[0]["train_acc"]), rel=1e-6)
    assert got[0]["val_acc"] == want[0]["val_acc"]
    assert [float(row["lr"]) for row in got] == pytest.approx([float(row["lr"]) for row in want], rel=1e-9)


def test_sigint_to_torchrun_stops_every_process_and_resume_finishes_the_run(tiny, tmp_path):
    """--epochs 40: a ResNet18 epoch takes a fraction of a second, so the signal lands during training; the
    resumed run then trains one epoch more than the interrupted one had finished, and finishes."""
    out = tmp_path / "out"
    env = dict(os.environ) | {"OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        torchrun("--data", tiny, "--out", out, "--epochs", "40", *RUN, logs=tmp_path / "logs"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the workers can be counted after it ends
    )
    history = out / "train" / "history.csv"
    deadline = time.monotonic() + 300
    while not (history.is_file() and len(read_csv(history)) >= 1) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    start = time.monotonic()
    process.send_signal(signal.SIGINT)  # to torchrun only, as a scheduler or a user's kill would
    _, stderr = process.communicate(timeout=60)
    seconds = time.monotonic() - start
    assert process.returncode != 0
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # no process of the group is left
    assert seconds < 30, seconds
    run = out / "train"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["resume"] == f"python qq.py --resume {run}"
    finished = len(read_csv(history))
    assert 1 <= finished < 40 and (run / "last.pt").is_file()
    assert f"Resume with: python qq.py --resume {run}" in stderr

    # resumed by one process: the run goes on, and says that the images are dealt out differently
    code, said, err = cli("qq.py", "--resume", run, "--epochs", finished + 1, "--device", "cpu")
    assert code == 0, err[-3000:]
    assert "note: the run trained in 2 process(es) and goes on in 1" in said
    assert len(read_csv(history)) == finished + 1
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


def test_a_process_that_fails_stops_the_others_with_one_clear_message(tiny, tmp_path):
    """Process 1 raises in its first epoch (a sitecustomize stands in for a failure on one machine);
    process 0, waiting for it in a collective, stops too, and both exit non-zero."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import ucgrade.engine as engine\n"
        "    from ucgrade.cli import UserError\n\n"
        "    def failing(*args, **kwargs):\n"
        "        raise UserError('process 1 could not go on (a stand-in for a failure on one process).')\n\n"
        "    engine.train_one_epoch = failing\n"
    )
    start = time.monotonic()
    pythonpath = os.pathsep.join([str(tmp_path), str(ROOT)])
    result = run_torchrun(
        "--data",
        tiny,
        "--out",
        tmp_path / "out",
        "--epochs",
        "2",
        *RUN,
        logs=tmp_path / "logs",
        env={"PYTHONPATH": pythonpath},
    )
    assert time.monotonic() - start < 120  # startup included; the stop itself takes seconds
    assert result.returncode != 0
    # each process writes its own line (the other's progress bar may stand before it on the screen)
    assert result.stderr.count("error: process 1 could not go on (a stand-in for a failure on one process).") == 1
    peer = "error: process 0 stopped because another process of this torchrun run stopped first; its message above"
    assert result.stderr.count(peer) == 1

    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


def test_a_batch_that_does_not_divide_among_the_processes_is_one_sentence(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    argv = ["--data", tiny, "--out", tmp_path, "--batch-size", "10", "--device", "cpu"]
    code, _, err = cli("qq.py", *argv).lines()
    assert code == 2
    assert err == [
        "error: --batch-size 10 does not divide among the 4 processes that torchrun starts, and it is the global "
        "batch; give a multiple of 4, such as 8."
    ]


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_the_shares_of_the_processes_make_up_the_one_process_epoch(balance):
    """Every process draws the same permutation and seeds and takes every world_size-th pair: the
    shares, interleaved, are the one-process sequence (padded from its start to a multiple)."""
    weights = torch.tensor([1.0, 1.0, 4.0, 1.0, 2.0, 1.0, 1.0])

    def sampler(generator):
        if balance == "sampler":
            return torch.utils.data.WeightedRandomSampler(weights, 7, replacement=True, generator=generator)
        return torch.utils.data.RandomSampler(range(7), generator=generator)

    def epoch(rank, world_size):
        generator = torch.Generator().manual_seed(3)
        return list(data.SeededSampler(sampler(generator), generator, rank, world_size))

    one = epoch(0, 1)
    shares = [epoch(rank, 2) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4  # 7 padded to 8: every process takes as many steps
    assert [pair for step in zip(*shares) for pair in step] == one + one[:1]


def test_cross_validation_with_a_frozen_backbone_under_torchrun(tiny, tmp_path):
    """--folds and --freeze-backbone (features computed by shares, gathered in order) under torchrun."""
    argv = ["--data", tiny, "--freeze-backbone", "--epochs", "2", *RUN]
    cv = run_torchrun("--out", tmp_path / "cv", "--folds", "2", *argv, logs=tmp_path / "logs")
    assert cv.returncode == 0, cv.stderr[-3000:]
    run = tmp_path / "cv" / "train"
    pooled = read_csv(run / "predictions.csv")
    assert sorted(row["path"] for row in pooled) == sorted(row["path"] for row in read_csv(run / "split.csv"))
    assert json.loads((run / "metrics.json").read_text())["num_images"] == 30 == len(pooled)
    assert (run / "cv_summary.json").is_file() and (run / "report.html").is_file()
    for fold in ("fold1", "fold2"):
        assert len(read_csv(run / fold / "history.csv")) == 2 and (run / fold / "report.html").is_file()


def test_resume_under_torchrun_by_the_same_number_of_processes(two_and_one, tmp_path):
    """--resume of a 2-process run by 2 processes says nothing about the order of the images (a copy of the
    module's run, which the other tests read as it is)."""
    run = copy_run(two_and_one[0] / "train", tmp_path / "train")
    resumed = run_torchrun("--resume", run, "--epochs", "3", "--device", "cpu", logs=tmp_path / "logs")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(read_csv(run / "history.csv")) == 3 and "process(es) and goes on" not in resumed.stdout
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    assert [r["processes"] for r in json.loads((run / "config.json").read_text())["resumed"]] == [2]
    assert len(read_csv(two_and_one[0] / "train" / "history.csv")) == 2  # the copy went on, not the module's run
