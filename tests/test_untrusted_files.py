"""Untrusted and mismatched files (issue 3): checkpoints load with weights_only=True, and every
damaged, crafted or wrong file gets one clear line instead of a traceback or, worse, running its code.
"""

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import FAST, ROOT, cli, copy_run, user_lines
from PIL import Image

from ucgrade import device as device_module
from ucgrade import files
from ucgrade.device import choose_precision
from ucgrade.model import build_model
from ucgrade.settings import precision_used

# qq.py flags for runs that pass --weights (which --pretrained no would contradict)
WEIGHTS_RUN = ["--img-size", "64", "--batch-size", "8", "--epochs", "1", "--cam-examples", "0"]
CPU = ["--device", "cpu"]  # every run and every grading chooses its device: a GPU would change precisions


class Payload:
    """Unpickling this calls open(marker, "w"), which creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def replace_file(path, content):
    """Write a new file in place of path: a hard-linked checkpoint of copy_run is never written into."""
    path.unlink()
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)


def test_every_torch_load_in_the_code_is_weights_only():
    sources = [p for p in ROOT.rglob("*.py") if not {"tests", ".venv", "venv"} & set(p.relative_to(ROOT).parts)]
    calls = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "torch.load",
                "pickle.load",
                "pickle.loads",
                "torch.jit.load",
            ):
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", ast.unparse(node.func), safe))
    assert calls, "found no torch.load at all"
    assert all(safe for _, _, safe in calls), [c for c in calls if not c[2]]


def test_the_payload_runs_when_loaded_without_weights_only(tmp_path):
    """The control for the tests below: the crafted file really carries code that runs."""
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"model": Payload(marker)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert marker.exists()


def test_a_pickle_payload_never_runs(trained_run, small_data, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    crafted = torch.load(trained_run / "last.pt", weights_only=True)  # a real checkpoint ...
    crafted["model"] = Payload(marker)  # ... with the payload where the weights belong
    evil = tmp_path / "evil.pt"
    torch.save(crafted, evil)
    run = copy_run(trained_run, tmp_path / "runs" / "train")
    replace_file(run / "last.pt", crafted)

    for script, argv, path in [
        ("predict.py", [small_data / "mild" / "mild_000.jpg", "--weights", evil], evil),
        ("qq.py", ["--data", small_data, "--out", tmp_path / "out", "--weights", evil, *WEIGHTS_RUN], evil),
        ("qq.py", ["--resume", run, "--epochs", "4"], run / "last.pt"),
    ]:
        code, _, lines = cli(script, *argv, *CPU).lines()  # in this process: the payload would make the marker
        assert code == 2, lines
        assert (
            len(lines) == 1
            and lines[0].startswith("error: ")
            and f"'{path}' holds Python objects other than tensors" in lines[0]
        ), lines
        assert "it could run code" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert torch.load(trained_run / "last.pt", weights_only=True)["epoch"] == 3  # the shared run is untouched


def test_payloads_in_other_shapes_never_run(tmp_path, small_data):
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save(Payload(marker), tmp_path / "bare.pt")  # the payload is the whole file
    torch.save(
        {"model": Payload(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False
    )  # torch's old format
    for name in ("bare.pt", "legacy.pt"):
        code, _, lines = cli(
            "predict.py", small_data / "mild" / "mild_000.jpg", "--weights", tmp_path / name, *CPU
        ).lines()
        assert code == 2 and len(lines) == 1 and "it could run code" in lines[0], lines
    assert not marker.exists()


def test_damaged_or_mismatched_checkpoints_get_one_clear_line(trained_run, small_data, tmp_path):
    good = torch.load(trained_run / "best.pt", weights_only=True)
    raw = (trained_run / "best.pt").read_bytes()
    cases = {
        "truncated.pt": (raw[: len(raw) // 2], "is not a readable PyTorch file; it may be truncated or corrupt"),
        "empty.pt": (b"", "is not a readable PyTorch file"),
        "text.pt": (b"these are not weights\n", "is not a readable PyTorch file"),
        "bare_state_dict.pt": (good["model"], "holds a bare state_dict without class names or preprocessing"),
        "list.pt": ([1, 2, 3], "is not a checkpoint written by qq.py"),
        "other_arch.pt": (
            good | {"arch": "vit_b_16"},
            "is for the architecture 'vit_b_16', which this tool does not know",
        ),
        "resnet18_weights.pt": (
            good | {"model": torchvision.models.resnet18(num_classes=3).state_dict()},
            "do not fit a resnet50 with 3 classes (Missing key(s)",
        ),
        "four_classes.pt": (
            good | {"class_names": ["a", "b", "c", "d"], "num_classes": 4},
            "do not fit a resnet50 with 4 classes (size mismatch for fc.weight",
        ),
        "no_class_names.pt": ({k: v for k, v in good.items() if k != "class_names"}, "is incomplete (no class_names)"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        code, _, lines = cli("predict.py", small_data / "mild" / "mild_000.jpg", "--weights", path, *CPU).lines()
        assert code == 2, name
        assert (
            len(lines) == 1 and lines[0].startswith("error: ") and f"'{path}'" in lines[0] and expected in lines[0]
        ), (name, lines)
        assert len(lines[0]) < 400, lines[0]  # one sentence, not a list of 200 missing keys


def test_weights_must_be_an_imagenet_resnet50(trained_run, small_data, tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    torch.save(build_model(3).state_dict(), tmp_path / "resnet50_3_classes.pth")
    raw = (trained_run / "best.pt").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 3])
    torch.save(["not", "weights"], tmp_path / "list.pth")
    cases = {
        "resnet18.pth": "is not an ImageNet resnet50 state_dict (Missing key(s) in state_dict",
        "resnet50_3_classes.pth": "is not an ImageNet resnet50 state_dict (size mismatch for fc.weight",
        "truncated.pth": "is not a readable PyTorch file; it may be truncated or corrupt",
        "list.pth": "does not hold a state_dict of tensors",
    }
    for name, expected in cases.items():
        out = tmp_path / f"out_{name}"
        code, _, lines = cli(
            "qq.py", "--data", small_data, "--out", out, "--weights", tmp_path / name, *WEIGHTS_RUN, *CPU
        ).lines()
        assert code == 2, name
        assert len(lines) == 1 and expected in lines[0] and str(tmp_path / name) in lines[0] and len(lines[0]) < 400, (
            name,
            lines,
        )
        assert not out.exists()
    code, _, lines = cli(
        "qq.py",
        "--data",
        small_data,
        "--out",
        tmp_path / "out",
        "--weights",
        trained_run / "best.pt",
        *WEIGHTS_RUN,
        *CPU,
    ).lines()
    assert code == 2 and "is a checkpoint of this tool, not ImageNet weights" in lines[0] and "--resume" in lines[0]


def test_resume_refuses_what_it_cannot_continue(trained_run, small_data, tmp_path, monkeypatch):
    last = torch.load(trained_run / "last.pt", weights_only=True)
    raw = (trained_run / "last.pt").read_bytes()
    cases = {
        "bare": (last["model"], "holds a bare state_dict"),
        "best_only": (
            {k: v for k, v in last.items() if k not in ("optimizer", "lr_scheduler", "history", "rng")},
            "holds no training state",
        ),
        "truncated": (raw[:1000], "is not a readable PyTorch file"),
        "other_classes": (
            last | {"class_names": ["a", "b", "c"]},
            "was trained on the classes a, b, c, but the data folder now has mild, moderate, severe",
        ),
    }
    history = (trained_run / "history.csv").read_text()
    for name, (content, expected) in cases.items():
        run = copy_run(trained_run, tmp_path / name)
        replace_file(run / "last.pt", content)
        code, _, lines = cli("qq.py", "--resume", run, "--epochs", "4", *CPU).lines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (name, lines)
        assert (run / "history.csv").read_text() == history  # nothing was trained or appended

    # without last.pt a run cannot go on, and must not start over in its own folder
    run = copy_run(trained_run, tmp_path / "no_last")
    (run / "last.pt").unlink()
    best = (run / "best.pt").read_bytes()
    code, _, lines = cli("qq.py", "--resume", run, "--epochs", "4", *CPU).lines()
    assert code == 2 and len(lines) == 1 and f"'{run}' has finished epochs but no last.pt" in lines[0], lines
    assert (run / "history.csv").read_text() == history and (run / "best.pt").read_bytes() == best

    code, _, lines = cli("qq.py", "--resume", run / "best.pt", *CPU).lines()
    assert code == 2 and lines == [
        f"error: --resume '{run / 'best.pt'}' is a file; give its run folder, such as --resume {run}."
    ]
    code, _, lines = cli(
        "qq.py", "--resume", run, "--epochs", "4", "--name", "again", "--out", tmp_path / "elsewhere", *CPU
    ).lines()
    assert code == 2 and lines == [
        f"error: --name and --out do not apply to --resume, which goes on in the run's own folder '{run}'; leave "
        "them out."
    ]
    code, _, lines = cli("qq.py", "--resume", tmp_path / "no_such_run", *CPU).lines()
    assert code == 2 and lines == [
        f"error: --resume '{tmp_path / 'no_such_run'}' does not exist; give a run folder under outputs/ written by "
        "qq.py."
    ]

    # fewer epochs than the run has trained cannot be continued; more extend it. The run is one written before
    # --select and --arch were recorded, and an fp16 run from a GPU, which a CPU goes on with in its own
    # precision, saying so: fp32 here, as on a CPU without native bf16 (the choice is stood in for, on any CPU)
    run = copy_run(trained_run, tmp_path / "extended")
    started = json.loads((run / "config.json").read_text())
    older = {k: v for k, v in started.items() if k not in ("select", "arch")}
    (run / "config.json").write_text(json.dumps(older | {"precision_used": "fp16", "device": "cuda"}))
    code, _, lines = cli("qq.py", "--resume", run, "--epochs", "2", *CPU).lines()
    assert code == 2 and lines == [
        "error: --epochs 2 is fewer than the 3 epochs the run has already trained; give --epochs 3 or more, or "
        "leave it out."
    ]
    resume = ["--resume", run, "--cam-examples", "0", *CPU]
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: False)
    code, out, _ = cli("qq.py", *resume, "--epochs", "4")
    assert code == 0
    assert "note: the run trained in fp16, which cpu does not run fast; it goes on in fp32." in out
    assert len(files.read_csv(run / "history.csv")) == 4
    config = json.loads((run / "config.json").read_text())
    assert (
        config["epochs"] == 4 and config["command"] == started["command"] and config["started"] == started["started"]
    )  # how it began stays
    assert [r["precision_used"] for r in config["resumed"]] == ["fp32"]
    # it goes on in the precision it last used, although the CPU's own choice would now be bf16
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: True)
    code, out, _ = cli("qq.py", *resume, "--epochs", "5")
    assert code == 0
    assert "note:" not in out
    resumed = json.loads((run / "config.json").read_text())["resumed"]
    assert [r["precision_used"] for r in resumed] == ["fp32", "fp32"]
    monkeypatch.undo()

    # the data changed since the run started: one more image of a class
    data = shutil.copytree(small_data, tmp_path / "data")
    shutil.copy(data / "mild" / "mild_000.jpg", data / "mild" / "new.jpg")
    run = copy_run(trained_run, tmp_path / "changed")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"data": str(data)}))
    code, _, lines = cli("qq.py", "--resume", run, "--epochs", "4", *CPU).lines()
    assert code == 2 and len(lines) == 1, lines
    assert (
        "changed since the run started (then: mild 10, moderate 10, severe 10; now: mild 11, moderate 10, severe 10)"
        in lines[0]
    )

    # the same number of images per grade, but not the same images: one renamed, or two that swapped grades
    for change, missing in [
        ("renamed", {"mild/mild_003.jpg"}),
        ("swapped", {"mild/mild_003.jpg", "moderate/moderate_003.jpg"}),
    ]:
        data = shutil.copytree(small_data, tmp_path / change)
        if change == "renamed":
            (data / "mild" / "mild_003.jpg").rename(data / "mild" / "mild_100.jpg")
        else:
            (data / "mild" / "mild_003.jpg").rename(data / "moderate" / "mild_003.jpg")
            (data / "moderate" / "moderate_003.jpg").rename(data / "mild" / "moderate_003.jpg")
        run = copy_run(trained_run, tmp_path / f"{change}_run")
        (run / "config.json").write_text(
            json.dumps(json.loads((run / "config.json").read_text()) | {"data": str(data)})
        )
        config = (run / "config.json").read_text()
        code, _, lines = cli("qq.py", "--resume", run, "--epochs", "4", *CPU).lines()
        gone = next(row["path"] for row in files.read_csv(run / "split.csv") if not (data / row["path"]).is_file())
        assert gone in missing and code == 2, (change, lines)
        assert lines == [
            f"error: the image '{gone}' of the run's split.csv is missing or unreadable in '{data}'; the data "
            "changed, so start a new run instead of resuming."
        ], (change, lines)
        assert (run / "config.json").read_text() == config and (run / "history.csv").read_text() == history
    # the same files by name, but one edited (here: another image's pixels under its name)
    data = shutil.copytree(small_data, tmp_path / "edited")
    (data / "mild" / "mild_003.jpg").write_bytes((data / "severe" / "severe_003.jpg").read_bytes())
    run = copy_run(trained_run, tmp_path / "edited_run")
    (run / "config.json").write_text(json.dumps(json.loads((run / "config.json").read_text()) | {"data": str(data)}))
    config = (run / "config.json").read_text()
    code, _, lines = cli("qq.py", "--resume", run, "--epochs", "4", *CPU).lines()
    assert code == 2 and lines == [
        f"error: the usable images in '{data}' changed since the run started: the same files by name, but the "
        "content of some differs; resuming needs the same data, so start a new run instead."
    ], lines
    assert (run / "config.json").read_text() == config and (run / "history.csv").read_text() == history

    # a finished run has nothing to resume unless --epochs extends it
    run = copy_run(trained_run, tmp_path / "finished")
    code, _, lines = cli("qq.py", "--resume", run, *CPU).lines()
    assert code == 2 and lines == [
        f"error: '{run}' has already finished its 3 epochs; to train it longer, pass --epochs with more than 3."
    ]
    # flags that would change the run are refused, not silently ignored: also --img-size 224, the default,
    # against the run's 64;
    # --batch-size 8 and --seed 0 are what the run has, and --cache may change
    code, _, lines = cli(
        "qq.py",
        "--resume",
        run,
        "--epochs",
        "4",
        "--lr",
        "0.1",
        "--img-size",
        "224",
        "--batch-size",
        "8",
        "--seed",
        "0",
        "--cache",
        "off",
        *CPU,
    ).lines()
    assert code == 2 and lines == [
        "error: --lr, --img-size cannot change when a run is resumed, because the run goes on with the settings in its "
        "config.json; leave them out, or start a new run with them."
    ]
    assert files.read_csv(trained_run / "history.csv") == files.read_csv(run / "history.csv")  # untouched


def test_resume_finds_the_data_from_anywhere_and_after_a_move(small_data, tmp_path, monkeypatch):
    moved = shutil.copytree(small_data, tmp_path / "data")
    # the patients CSV lives in the data folder and moves with it
    images = sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*.jpg"))
    (moved / "patients.csv").write_text("path,group\n" + "".join(f"{rel},p{i // 2}\n" for i, rel in enumerate(images)))
    monkeypatch.chdir(tmp_path)
    args = [
        "--data",
        "data",
        "--groups",
        "data/patients.csv",
        "--out",
        "runs",
        "--epochs",
        "1",
        *FAST,
        "--cam-examples",
        "0",
    ]
    assert cli("qq.py", *args).code == 0
    run = tmp_path / "runs" / "train"
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == str(moved) and config["groups"] == str(moved / "patients.csv")  # absolute paths
    split = files.read_csv(run / "split.csv")
    monkeypatch.chdir(ROOT)  # resumed from another folder
    moved = moved.rename(tmp_path / "moved")
    code, _, lines = cli("qq.py", "--resume", run, "--epochs", "2", *CPU).lines()
    assert code == 2 and "does not exist" in lines[0] and "--data" in lines[0], lines
    # the images moved, the groups CSV with them: --data is enough, and later resumes find the new place
    assert cli("qq.py", "--resume", run, "--epochs", "2", "--data", moved, *CPU).code == 0
    assert json.loads((run / "config.json").read_text())["data"] == str(moved)
    assert cli("qq.py", "--resume", run, "--epochs", "3", "--cache", "off", *CPU).code == 0
    assert len(files.read_csv(run / "history.csv")) == 3
    assert files.read_csv(run / "split.csv") == split
    assert [r["group"] for r in files.read_csv(run / "predictions.csv")] == [
        r["group"] for r in split if r["subset"] == "val"
    ]


def test_predict_grades_the_good_images_and_names_each_bad_one(trained_run, small_data, tmp_path):
    good = [small_data / "mild" / "mild_000.jpg", tmp_path / "Aufnahme ü 2.jpg"]
    shutil.copy(small_data / "severe" / "severe_000.jpg", good[1])
    jpeg = good[0].read_bytes()
    bad = {
        tmp_path / "no_such.jpg": "no such file or folder",
        tmp_path / "truncated.jpg": "truncated or corrupt image",
        tmp_path / "x.jpg": "not an image Pillow can read",
        tmp_path / "empty.jpg": "empty file (0 bytes)",
        tmp_path / "no_images": "folder has no images",
    }
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "x.jpg").write_text("a text file with a .jpg name")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("no pictures here")
    inputs = [good[0], *list(bad)[:3], good[1], *list(bad)[3:]]
    code, out, err = cli("predict.py", *inputs, "--weights", trained_run / "best.pt", *CPU)

    assert code == 1, err
    graded = out.strip().split("\n")
    assert [line.split(": ")[0] for line in graded] == [str(p) for p in good]  # the good ones, in order
    errors = user_lines(err)
    for path, reason in bad.items():
        assert any(line.startswith(f"error: {path}: {reason}") for line in errors), (path, errors)
    assert errors[-1] == "5 input(s) failed and 2 image(s) were graded; see the errors above."
    assert len(errors) == 6, errors  # one line for each bad input, then the count


def test_predict_with_nothing_to_grade_or_no_model(trained_run, tmp_path, monkeypatch):
    (tmp_path / "no_images").mkdir()
    code, _, lines = cli("predict.py", tmp_path / "no_images", "--weights", trained_run / "best.pt", *CPU).lines()
    assert (
        code == 1
        and lines[0]
        == f"error: {tmp_path / 'no_images'}: folder has no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)"
    )

    monkeypatch.chdir(tmp_path)  # no outputs/ here, and no --weights
    code, _, lines = cli("predict.py", trained_run.parent.parent / "image.jpg", *CPU).lines()
    assert code == 2
    assert lines == [
        f"error: no trained model found under '{tmp_path.resolve() / 'outputs'}/'; train one first with 'python qq.py' "
        "(from the project folder), pass --out with the folder that holds the runs, or pass --weights path/to/best.pt."
    ]

    # a run folder given where a file or the folder of runs is meant
    code, _, lines = cli("predict.py", trained_run.parent.parent / "image.jpg", "--out", trained_run, *CPU).lines()
    assert code == 2
    assert lines == [
        f"error: '{trained_run}' is a run folder itself (--out is the folder that holds the runs); pass --weights "
        f"{trained_run / 'best.pt'}."
    ]
    code, _, lines = cli("predict.py", trained_run.parent.parent / "image.jpg", "--weights", tmp_path, *CPU).lines()
    assert code == 2 and lines[0].startswith(
        f"error: --weights '{tmp_path}' is a folder without a best.pt; give a best.pt or last.pt"
    ), lines
    code, _, lines = cli("predict.py", trained_run.parent.parent / "image.jpg", "--weights", "/dev/null", *CPU).lines()
    assert code == 2 and lines == [
        "error: checkpoint '/dev/null' is not a file; pass --weights with a best.pt from a run folder under outputs/."
    ]


def test_predict_names_a_run_folder_or_a_non_image_file_given_as_input(trained_run, small_data, tmp_path):
    image, animation = small_data / "severe" / "severe_000.jpg", tmp_path / "loop.gif"
    Image.open(image).save(animation)  # Pillow reads it, but training would skip it by its extension
    code, _, lines = cli(
        "predict.py", trained_run, animation, image, "--weights", trained_run / "best.pt", *CPU
    ).lines()
    assert code == 1
    assert lines[:2] == [
        f"error: {trained_run}: a run folder written by qq.py, not a folder of images; to grade with its model, "
        "pass it as --weights",
        f"error: {animation}: not an image file by its extension (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp), so "
        "it is skipped, as in training",
    ]
    assert lines[-1] == "2 input(s) failed and 1 image(s) were graded; see the errors above."


def test_predict_takes_a_run_folder_for_weights_and_skips_hidden_folders(trained_run, small_data, tmp_path):
    folder = tmp_path / "visit"
    shutil.copytree(small_data / "severe", folder)
    shutil.copytree(small_data / "mild", folder / ".ipynb_checkpoints")  # a notebook's copies: not the user's images
    elsewhere = shutil.copytree(small_data / "moderate", tmp_path / "elsewhere")
    (folder / "moderate").symlink_to(elsewhere, target_is_directory=True)  # a linked folder is followed ...
    (folder / "moderate" / "again").symlink_to(folder, target_is_directory=True)  # ... once, even when it links back
    code, out, _ = cli("predict.py", folder, "--weights", trained_run, "--json", *CPU)
    assert code == 0
    from_folder = json.loads(out)
    assert [Path(p["path"]).parent for p in from_folder["predictions"]] == [folder] * 10 + [folder / "moderate"] * 10
    code, out, _ = cli("predict.py", folder, "--weights", trained_run / "best.pt", "--json", *CPU)
    assert code == 0
    assert json.loads(out) == from_folder  # the run folder means its best.pt


def test_resume_on_a_cpu_without_fast_bf16_goes_on_in_fp32(monkeypatch, capsys):
    """A bf16 run from a GPU or a newer CPU, resumed on a CPU that only emulates bf16."""
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: False)
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "auto", precision_used({"precision_used": "bf16"})) == "fp32"
    assert (
        capsys.readouterr().out == "note: the run trained in bf16, which cpu does not run fast; it goes on in fp32.\n"
    )
    assert (
        choose_precision(
            cpu, "auto", precision_used({"precision_used": "bf16", "resumed": [{"precision_used": "fp32"}]})
        )
        == "fp32"
    )
    assert choose_precision(cpu, "bf16", precision_used({"precision_used": "fp32"})) == "bf16"  # asked for: as asked
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_resume_on_a_gpu_keeps_fp16_and_leaves_bf16_only_where_it_is_emulated(monkeypatch, capsys, fast_bf16):
    """The CUDA choice needs no GPU: only the compute-capability check is stood in for."""
    monkeypatch.setattr(device_module, "cuda_has_fast_bf16", lambda device: fast_bf16)
    cuda = torch.device("cuda")
    assert (
        choose_precision(cuda, "auto", precision_used({"precision_used": "fp16"})) == "fp16"
    )  # with its loss scaling, on any GPU
    assert choose_precision(cuda, "auto", precision_used({"precision_used": "fp32"})) == "fp32"
    assert capsys.readouterr().out == ""
    assert choose_precision(cuda, "auto", precision_used({"precision_used": "bf16"})) == (
        "bf16" if fast_bf16 else "fp16"
    )
    assert capsys.readouterr().out == (
        "" if fast_bf16 else "note: the run trained in bf16, which cuda does not run fast; it goes on in fp16.\n"
    )
