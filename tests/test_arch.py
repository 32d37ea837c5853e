"""--arch: every backbone of model.py's table trains, grades, resumes and explains itself (issue 9)."""

import json

import pytest
import torch
import torchvision
from conftest import cli, make_folder, train

from ucgrade import model as model_module
from ucgrade.cam import grad_cam
from ucgrade.files import read_csv
from ucgrade.model import ARCHITECTURES, backbone, build_model, head, load_checkpoint, model_from_checkpoint

SMALL = ["--img-size", "64", "--batch-size", "8", "--cam-examples", "1", "--epochs", "1", "--device", "cpu"]
TINY = [*SMALL, "--pretrained", "no"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), {"mild": 5, "moderate": 5, "severe": 5}, size=64)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_row_of_the_table_builds_a_model_with_its_head_backbone_and_cam_layer(arch):
    """Each row: the head becomes a 3-grade Linear, the backbone feeds it, Grad-CAM finds its layer,
    and a checkpoint rebuilds the same model from its "arch"."""
    torch.manual_seed(0)
    model = build_model(3, arch=arch).eval()
    assert model.arch == arch and isinstance(head(model), torch.nn.Linear) and head(model).out_features == 3
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x = images.float() / 255
    with torch.no_grad():
        features = backbone(model).eval()(x)
        assert features.shape == (2, head(model).in_features)
        assert torch.allclose(head(model)(features), model(x), atol=1e-5)  # the backbone is the model minus its head
    cams, classes = grad_cam(model, images)
    assert cams.shape == (2, 64, 64) and len(classes) == 2 and 0 <= cams.min() and cams.max() <= 1
    config = {"class_names": ["a", "b", "c"], "img_size": 64}
    rebuilt = model_from_checkpoint(model_module.make_checkpoint(model, config, 1, {})).eval()
    assert rebuilt.arch == arch
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_an_arch_trains_predicts_resumes_and_draws_grad_cam(arch, tiny_data, tmp_path):
    assert train(["--data", tiny_data, "--out", tmp_path, "--arch", arch, *TINY]) == 0
    run = tmp_path / "train"
    checkpoint = load_checkpoint(run / "best.pt")
    assert checkpoint["arch"] == arch and json.loads((run / "config.json").read_text())["arch"] == arch
    assert (run / "cam" / read_csv(run / "cam" / "index.csv")[0]["file"]).stat().st_size > 1000  # the run's Grad-CAM

    # predict.py builds the model that the checkpoint's arch names, and draws its Grad-CAM
    image = tiny_data / "severe" / "severe_000.jpg"
    code, out, err = cli("predict.py", image, "--weights", run, "--device", "cpu", "--cam", tmp_path / "cams", "--json")
    assert code == 0, err
    graded = json.loads(out)["predictions"][0]
    assert graded["grade"] in ("mild", "moderate", "severe") and sum(graded["probabilities"].values()) == pytest.approx(
        1
    )
    assert (tmp_path / "cams" / "severe_000_cam.png").stat().st_size > 1000

    # resume goes on with the same backbone, and another --arch is one sentence
    code, _, err = cli("qq.py", "--resume", run, "--epochs", "2", "--device", "cpu").lines()
    assert code == 0, err
    assert len(read_csv(run / "history.csv")) == 2 and load_checkpoint(run / "last.pt")["arch"] == arch
    other = "resnet34" if arch != "resnet34" else "resnet18"
    code, _, err = cli("qq.py", "--resume", run, "--epochs", "3", "--arch", other, "--device", "cpu").lines()
    assert code == 2 and err == [
        "error: --arch cannot change when a run is resumed, because the run goes on with the settings in its "
        "config.json; leave them out, or start a new run with them."
    ]


def test_a_local_resnet18_file_in_the_hub_cache_is_used_offline(tiny_data, tmp_path, isolated_torch_home, monkeypatch):
    """torchvision's file name for resnet18 in $TORCH_HOME/hub/checkpoints is found without any network."""
    torch.manual_seed(1)
    imagenet_like = torchvision.models.resnet18().state_dict()
    cached = isolated_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_like, cached)
    unreachable = "http://127.0.0.1:9/models/resnet18-f37072fd.pth"  # the discard port: any download would fail
    monkeypatch.setattr(model_module, "imagenet_url", lambda arch: unreachable)
    argv = ["--data", tiny_data, "--out", tmp_path, "--arch", "resnet18", "--freeze-backbone", "--pretrained", "yes"]
    assert train([*argv, *SMALL]) == 0
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert config["pretrained_used"] is True and config["weights_source"] == str(cached)
    best = load_checkpoint(tmp_path / "train" / "best.pt")["model"]
    kept = [k for k, v in imagenet_like.items() if not k.startswith("fc.") and v.is_floating_point()]
    assert kept and all(torch.equal(best[k], imagenet_like[k]) for k in kept)  # the frozen backbone is the file's


def test_a_resnet50_file_given_for_resnet18_is_refused_in_one_sentence(tiny_data, tmp_path):
    weights = tmp_path / "resnet50-0676ba61.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    argv = ["--data", tiny_data, "--out", tmp_path / "out", "--arch", "resnet18", "--weights", weights, *SMALL]
    code, _, err = cli("qq.py", *argv).lines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --weights '{weights}' is not an ImageNet resnet18 state_dict (")
    assert err[0].endswith(
        "give torchvision's resnet18-f37072fd.pth or an equivalent file, or the --arch it was made for."
    )
    assert not (tmp_path / "out").exists()  # refused before a run folder was made
