"""ImageNet weights: a local --weights file, the torch hub cache with no network, and the offline fallback."""

import functools
import hashlib
import http.server
import json
import shutil
import socket
import threading
import time

import pytest
import torch
import torchvision
from conftest import cli, make_folder, run_script, train, user_lines

from ucgrade import model as model_module
from ucgrade.cli import UserError
from ucgrade.files import read_csv

ARGS = ["--img-size", "64", "--batch-size", "8", "--epochs", "1", "--cam-examples", "0", "--device", "cpu"]
UNREACHABLE = "http://127.0.0.1:9/models/resnet50-0676ba61.pth"  # the discard port: refused at once
# A web proxy on the discard port, for a process of its own: every download is refused at once, whether
# or not the machine has internet, and the tool's code and its real URL stay as they are.
NO_NETWORK = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
NO_NETWORK |= {"no_proxy": "", "NO_PROXY": ""}


@pytest.fixture(scope="module")
def imagenet_like():
    """A ResNet50 state_dict with 1000 classes, like torchvision's file, but made up here."""
    torch.manual_seed(123)
    return torchvision.models.resnet50().state_dict()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), {"mild": 5, "moderate": 5, "severe": 5})


def backbone_matches(run_dir, state):
    best = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    return all(torch.equal(best[k], v) for k, v in state.items() if not k.startswith("fc.") and v.is_floating_point())


def test_local_weights_file_is_loaded(tmp_path, tiny_data, imagenet_like):
    weights = tmp_path / "my_resnet50.pth"
    torch.save(imagenet_like, weights)
    # with a frozen backbone the trained model keeps the loaded weights exactly; Grad-CAM still
    # works on it, although no weight of the backbone needs a gradient
    argv = ["--data", tiny_data, "--out", tmp_path / "out", "--weights", weights, "--freeze-backbone", *ARGS]
    code, out, err = cli("qq.py", *argv, "--cam-examples", "2")
    assert code == 0, err
    assert "--freeze-backbone without ImageNet weights" not in out
    run = tmp_path / "out" / "train"
    cams = read_csv(run / "cam" / "index.csv")
    assert len(cams) == 2 and all((run / "cam" / row["file"]).stat().st_size > 1000 for row in cams)
    config = json.loads((run / "config.json").read_text())
    assert config["pretrained_used"] is True and config["weights_source"] == str(weights)
    assert torch.load(run / "best.pt", weights_only=True)["pretrained"] is True
    assert backbone_matches(run, imagenet_like)


def test_hub_cache_is_used_without_network(tmp_path, tiny_data, imagenet_like, isolated_torch_home, monkeypatch):
    cached = isolated_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_like, cached)
    monkeypatch.setattr(model_module, "imagenet_url", lambda arch: UNREACHABLE)  # any network use would fail
    assert model_module.imagenet_weights_path() == cached
    assert train(["--data", tiny_data, "--out", tmp_path, "--pretrained", "yes", "--freeze-backbone", *ARGS]) == 0
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["pretrained_used"] is True and config["weights_source"] == str(cached)
    assert backbone_matches(tmp_path / "train", imagenet_like)


def test_offline_auto_warns_and_trains_from_random_weights(
    tmp_path, tiny_data, isolated_torch_home, monkeypatch, capsys
):
    monkeypatch.setattr(model_module, "imagenet_url", lambda arch: UNREACHABLE)
    start = time.perf_counter()
    state, source = model_module.get_imagenet_weights("auto")
    assert time.perf_counter() - start < 12
    assert state is None and "random" in source
    out = capsys.readouterr().out
    expected = isolated_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert "are not available" in out and str(expected) in out and "--weights FILE" in out and "random weights" in out

    assert train(["--data", tiny_data, "--out", tmp_path, *ARGS, "--arch", "resnet18"]) == 0  # any arch falls back
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["pretrained_used"] is False and config["pretrained"] == "auto"
    assert torch.load(tmp_path / "train" / "best.pt", weights_only=True)["pretrained"] is False


def test_pretrained_yes_fails_clearly_offline(tmp_path, tiny_data, isolated_torch_home, monkeypatch):
    monkeypatch.setattr(model_module, "imagenet_url", lambda arch: UNREACHABLE)
    with pytest.raises(UserError) as error:
        model_module.get_imagenet_weights("yes")
    message = str(error.value)
    assert (
        str(isolated_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
        and "--weights FILE" in message
    )


def test_pretrained_yes_cli_exit_code_and_message(tmp_path, tiny_data, isolated_torch_home):
    """As a user offline would see it: one line, exit code 2, no traceback, no run folder."""
    result = run_script(
        "qq.py",
        "--data",
        tiny_data,
        "--out",
        tmp_path / "out",
        "--pretrained",
        "yes",
        *ARGS,
        env={"TORCH_HOME": str(isolated_torch_home), **NO_NETWORK},
        timeout=120,
    )
    cached = isolated_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = user_lines(result.stderr)
    assert line.startswith(
        f"error: The ImageNet weights for resnet50 are not available: download from {url} failed ("
    ), line
    hint = f"download {url} on a machine with internet and copy it to {cached} (or set TORCH_HOME)"
    assert line.endswith(f"; to use them offline, {hint}, or pass --weights FILE."), line
    assert not (tmp_path / "out").exists() and not cached.exists()


def test_silent_server_gives_up_within_the_timeout(tmp_path):
    """A server (or proxy) that accepts the connection but never answers must not hang the run."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"http://127.0.0.1:{server.getsockname()[1]}/resnet50-0676ba61.pth"
        start = time.perf_counter()
        error = model_module._download(url, tmp_path / "resnet50-0676ba61.pth", timeout=1.0)
        assert ("no answer" in error or "timed out" in error) and time.perf_counter() - start < 4
    assert not (tmp_path / "resnet50-0676ba61.pth").exists()


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www over HTTP on localhost."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_into_the_hub_cache_checks_the_hash(
    http_server, tiny_data, tmp_path, imagenet_like, isolated_torch_home, monkeypatch
):
    www, base = http_server
    torch.save(imagenet_like, www / "weights.pth")
    digest = hashlib.sha256((www / "weights.pth").read_bytes()).hexdigest()
    (www / f"resnet50-{digest[:8]}.pth").write_bytes((www / "weights.pth").read_bytes())
    (www / "resnet50-00000000.pth").write_bytes((www / "weights.pth").read_bytes())  # a name whose hash is wrong

    monkeypatch.setattr(model_module, "imagenet_url", lambda arch: f"{base}/resnet50-{digest[:8]}.pth")
    state, source = model_module.get_imagenet_weights("yes")
    cached = isolated_torch_home / "hub" / "checkpoints" / f"resnet50-{digest[:8]}.pth"
    assert source == str(cached) and cached.is_file()
    assert all(torch.equal(state[k], v) for k, v in imagenet_like.items())

    monkeypatch.setattr(model_module, "imagenet_url", lambda arch: f"{base}/resnet50-00000000.pth")
    with pytest.raises(UserError, match="damaged"):
        model_module.get_imagenet_weights("yes")
    assert not (isolated_torch_home / "hub" / "checkpoints" / "resnet50-00000000.pth").exists()


def test_a_resumed_cross_validation_starts_its_next_fold_from_the_same_weights(tmp_path, tiny_data):
    """A fold that had not begun when a --weights run stopped starts from that file too, not from
    random weights; a fold that had begun continues from its own last.pt. (ResNet18: three times as fast.)"""
    torch.manual_seed(18)
    imagenet_like = torchvision.models.resnet18().state_dict()
    weights = tmp_path / "my_resnet18.pth"
    torch.save(imagenet_like, weights)
    assert (
        train(
            [
                "--data",
                tiny_data,
                "--out",
                tmp_path / "out",
                "--weights",
                weights,
                "--folds",
                "2",
                "--freeze-backbone",
                *ARGS,
                "--arch",
                "resnet18",
            ]
        )
        == 0
    )
    run = tmp_path / "out" / "train"
    shutil.rmtree(run / "fold2")  # as if the run had stopped before fold 2 began
    (run / "metrics.json").write_text(json.dumps({"status": "interrupted", "folds": 2, "folds_finished": 1}))
    assert train(["--resume", run, "--device", "cpu"]) == 0
    assert torch.load(run / "fold2" / "best.pt", weights_only=True)["pretrained"] is True
    assert backbone_matches(run / "fold2", imagenet_like)
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"

    # every fold has begun: resuming needs no weights, so the file may be gone (or the machine offline)
    weights.unlink()
    (run / "fold2" / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    (run / "metrics.json").write_text(json.dumps({"status": "interrupted", "folds": 2, "folds_finished": 1}))
    history = (run / "fold2" / "history.csv").read_text()
    fold1 = {p.name: p.read_bytes() for p in (run / "fold1").iterdir() if p.is_file()}
    code, said, err = cli("qq.py", "--resume", run, "--device", "cpu")
    assert code == 0, err
    assert "fold 1/2 already finished" in said and f"resuming {run / 'fold2'} after epoch 1 of 1" in said
    assert (run / "fold2" / "history.csv").read_text() == history  # its one epoch was done: evaluated, not retrained
    assert {p.name: p.read_bytes() for p in (run / "fold1").iterdir() if p.is_file()} == fold1
    assert backbone_matches(run / "fold2", imagenet_like)  # from its own best.pt, the weights file being gone
    assert json.loads((run / "fold2" / "metrics.json").read_text())["status"] == "finished"
    pooled = json.loads((run / "metrics.json").read_text())
    assert pooled["status"] == "finished" and pooled["folds"] == 2
    assert sorted(r["path"] for r in read_csv(run / "predictions.csv")) == sorted(
        r["path"] for r in read_csv(run / "split.csv")
    )
