"""Training recipes (issue 21): --recipe and each of its parts as a flag, checked against their definitions."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, cli, make_folder

from ucgrade import engine, files, presets
from ucgrade.cli import run_cli
from ucgrade.model import build_model, load_checkpoint
from ucgrade.torch_grader import GradingModel, torch_grader

NUMBERS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")  # the history columns that do not depend on timing
# every part of the endoscopy recipe put back to the seed's, by the flags that override a recipe
SEED_BY_FLAGS = ["--augment", "seed", "--label-smoothing", "0", "--weight-decay", "0", "--schedule", "step"]
SEED_BY_FLAGS += ["--warmup-epochs", "0", "--ema", "0", "--no-tta"]
# every option at once; --lr 0.01: a warmup and cosine whose learning rates history.csv shows in full digits
EVERY_OPTION = ["--recipe", "endoscopy", "--loss", "cdw-ce", "--cdw-alpha", "2", "--optimizer", "adamw"]
EVERY_OPTION += ["--ema", "0.9", "--tta", "--select", "qwk", "--warmup-epochs", "1", "--lr", "0.01", "--epochs", "3"]


@pytest.fixture(scope="module")
def data18(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), {"mild": 6, "moderate": 6, "severe": 6}, size=64)


def history_of(run_dir):
    return [{key: float(row[key]) for key in NUMBERS} for row in files.read_csv(run_dir / "history.csv")]


# ----------------------------------------------------------------------------- definitions


def test_cdw_ce_is_its_definition_on_hand_computed_cases():
    """-sum_i |i - c|^alpha log(1 - p_i), mean over the batch, or weighted by the grade's weight."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    logits, targets = probs.log(), torch.tensor([0, 2])
    first = -(1**2 * math.log(1 - 0.2) + 2**2 * math.log(1 - 0.1))  # grade 0: one and two grades away
    second = -(2**2 * math.log(1 - 0.1) + 1**2 * math.log(1 - 0.3))  # grade 2
    cpu = torch.device("cpu")
    loss = engine.make_criterion("none", [0, 1, 2], 3, cpu, loss="cdw-ce", cdw_alpha=2)
    assert loss(logits, targets).item() == pytest.approx((first + second) / 2, rel=1e-6)
    alpha5 = -(math.log(0.8) + 2**5 * math.log(0.9))
    assert engine.make_criterion("none", [0, 1, 2], 3, cpu, loss="cdw-ce", cdw_alpha=5)(
        logits[:1], targets[:1]
    ).item() == pytest.approx(alpha5, rel=1e-6)
    # --balance weights: scikit-learn's balanced weights, n / (grades * count): 6/(3*3), 6/(3*1), 6/(3*2)
    labels = [0, 0, 0, 1, 2, 2]
    weighted = engine.make_criterion("weights", labels, 3, cpu, loss="cdw-ce", cdw_alpha=2)
    w0, w2 = 6 / 9, 6 / 6
    assert weighted(logits, targets).item() == pytest.approx((w0 * first + w2 * second) / (w0 + w2), rel=1e-6)
    # a confident right answer costs about nothing, and a probability of 1 on a wrong grade stays finite
    assert loss(torch.tensor([[0.0, 0.0, 40.0]]), torch.tensor([2])).item() == pytest.approx(0, abs=1e-12)
    far = loss(torch.tensor([[0.0, 0.0, 40.0]]), torch.tensor([0])).item()
    assert far == pytest.approx(-(4 * (math.log(2) - 40) + 1 * math.log(1 - math.exp(-40))), rel=1e-6)


def test_label_smoothing_is_cross_entropy_with_smoothed_targets():
    cpu = torch.device("cpu")
    logits, targets = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0])
    smoothed = torch.tensor([[1 - 0.1 + 0.1 / 3, 0.1 / 3, 0.1 / 3]])
    expected = -(smoothed * logits.log_softmax(1)).sum().item()
    criterion = engine.make_criterion("none", [0, 1, 2], 3, cpu, label_smoothing=0.1)
    assert criterion(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_ema_is_a_foreach_lerp_with_a_warmed_up_decay(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = engine.make_ema(model, 0.5)
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or lerp(*a))
    weights = []
    for step in range(4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()(torch.randn(4, 2))  # moves the batch-norm statistics and its count of batches
        weights.append(model[0].weight.detach().clone())
        ema.update_parameters(model)
    expected = weights[0]  # the first update copies
    for n, w in enumerate(weights[1:], start=1):
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * w
    assert torch.allclose(ema.module[0].weight, expected, atol=1e-6)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked == 4  # counted, not averaged
    assert calls == [6, 6, 6]  # one foreach call over the 4 parameters and 2 statistics, per update after the first
    assert engine.make_ema(model, 0) is None


def test_tta_grades_the_mean_probability_of_the_picture_and_its_flips():
    torch.manual_seed(0)
    model = build_model(3, arch="resnet18").eval()
    crops = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    plain = GradingModel(model, {"tta": False})
    with torch.no_grad():
        views = [plain(crops.flip(dims) if dims else crops) for dims in ((), (3,), (2,), (2, 3))]
        graded = GradingModel(model, {"tta": True})(crops)
    assert torch.allclose(graded, torch.stack(views).mean(0), atol=1e-6)
    assert not torch.allclose(graded, views[0], atol=1e-4)
    # validation (engine.evaluate) grades the same mean
    loader = [(crops, torch.tensor([0, 1]))]
    runtime = type("Runtime", (), {"device": torch.device("cpu"), "precision": "fp32", "world_size": 1})()
    runtime.is_main, runtime.should_stop = True, lambda: False
    _, _, probs, _ = engine.evaluate(model, loader, runtime, tta=True)
    assert np.allclose(probs, graded.numpy(), atol=1e-5)


def test_lr_factor_warms_up_then_follows_the_schedule():
    cosine = [engine.lr_factor("cosine", 5, 2, 7, 0.1, epoch) for epoch in range(5)]
    assert cosine == pytest.approx(
        [1 / 3, 2 / 3, 1, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 / 3 * math.pi))]
    )
    step = [engine.lr_factor("step", 6, 1, 2, 0.1, epoch) for epoch in range(6)]
    assert step == pytest.approx([0.5, 1, 1, 0.1, 0.1, 0.01])


def test_endoscopy_augmentation_draws_only_from_torch_and_varies_orientation_and_colour():
    image = torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8)
    transform = presets.train_transform(64, "endoscopy")

    def augmented(seed):
        np.random.seed(seed + 1)  # other generators do not matter
        torch.manual_seed(seed)
        return transform(image)

    first = augmented(0)
    assert first.dtype == torch.uint8 and first.shape == (3, 64, 64)
    assert torch.equal(first, augmented(0)) and not torch.equal(first, augmented(1))
    steps = [type(step).__name__ for step in transform.transforms]
    assert steps == [
        "RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "QuarterTurn", "ColorJitter",
        "TrivialAugmentWide",
    ]  # fmt: skip
    assert [type(step).__name__ for step in presets.train_transform(64).transforms] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
    ]


# ----------------------------------------------------------------------------- runs


def test_seed_recipe_gives_the_default_run_and_flags_override_a_recipe(data18, tmp_path):
    """The default, --recipe seed, and the endoscopy recipe with each of its parts put back by a flag train
    bit for bit the same epochs (main's code gave this history too: compared when the recipes came in)."""
    base = ["--data", data18, "--out", tmp_path, *FAST, "--epochs", "2", "--step-size", "1"]
    runs = {
        "default": [],
        "seed": ["--recipe", "seed"],
        "overridden": ["--recipe", "endoscopy", *SEED_BY_FLAGS],
    }
    for name, argv in runs.items():
        assert cli("qq.py", *base, "--name", name, *argv).code == 0
    histories = [history_of(tmp_path / name) for name in runs]
    assert histories[0] == histories[1] == histories[2] and histories[0][1]["lr"] == 0.0001
    config = json.loads((tmp_path / "overridden" / "config.json").read_text())
    assert config["recipe"] == "endoscopy" and config["augment"] == "seed" and config["ema"] == 0
    assert config["label_smoothing"] == 0 and config["optimizer"] == "sgd"  # the recipe's, where no flag was given


def test_every_option_with_folds_is_recorded_applied_and_graded(data18, tmp_path):
    code, said, err = cli("qq.py", "--data", data18, "--out", tmp_path, *FAST, *EVERY_OPTION, "--folds", "2")
    assert code == 0, err
    run = tmp_path / "train"
    config = json.loads((run / "config.json").read_text())
    expected = {"recipe": "endoscopy", "augment": "endoscopy", "loss": "cdw-ce", "cdw_alpha": 2.0}
    expected |= {"label_smoothing": 0.0, "optimizer": "adamw", "weight_decay": 1e-4, "schedule": "cosine"}
    expected |= {"warmup_epochs": 1, "ema": 0.9, "tta": True, "select": "qwk"}
    assert {key: config[key] for key in expected} == expected
    assert "  tta              True" in said  # the settings printed at the start
    page = (run / "fold1" / "report.html").read_text()
    assert "moving average (EMA 0.9), which is what was evaluated and saved" in page and "Best-QWK epoch" in page
    assert "CDW-CE loss (alpha 2.0)" in page and "test-time flips averaged" in page
    for fold in ("fold1", "fold2"):
        history = files.read_csv(run / fold / "history.csv")
        # warmup: 0.01 x 1/2; then the cosine over the 2 epochs left: 0.01, 0.01 x (1 + cos(pi/2)) / 2
        assert [float(row["lr"]) for row in history] == pytest.approx([0.005, 0.01, 0.005])
        qwk = [float(row["val_qwk"]) if row["val_qwk"] != "nan" else -math.inf for row in history]
        chosen = max(range(3), key=lambda i: (qwk[i], float(history[i]["val_acc"]), -float(history[i]["val_loss"])))
        metrics = json.loads((run / fold / "metrics.json").read_text())
        assert metrics["best_epoch"] == chosen + 1
        best, last = load_checkpoint(run / fold / "best.pt"), load_checkpoint(run / fold / "last.pt")
        assert best["tta"] is True and best["epoch"] == chosen + 1
        assert not torch.equal(last["model"]["fc.weight"], last["raw_model"]["fc.weight"])  # the EMA is saved
        assert last["ema_updates"] == 3 * 2  # 9 training images in batches of 8, 3 epochs
        grader = torch_grader(run / fold / "best.pt", "cpu", "fp32")  # the EMA checkpoint reloads, and grades
        assert grader.extra["model"].fc.weight.equal(best["model"]["fc.weight"])
        rows = files.read_csv(run / fold / "predictions.csv")
        paths = [data18 / row["path"] for row in rows]
        from ucgrade.images import load_image

        probs = grader.grade([load_image(p) for p in paths]).probs
        recorded = np.array([[float(row[f"prob:{c}"]) for c in grader.class_names] for row in rows])
        assert np.abs(probs - recorded).max() < 2e-3  # validation (bf16) and the grader (fp32) both with TTA


def test_frozen_backbone_with_every_option_goes_on_exactly_with_resume(data18, tmp_path):
    """A run of 2 epochs resumed to 3 trains the epochs of a run of 3 (the EMA of the head, the schedule of 3)."""
    base = ["--data", data18, "--out", tmp_path, *FAST, *EVERY_OPTION, "--freeze-backbone", "--schedule", "step"]
    assert cli("qq.py", *base, "--name", "full").code == 0
    assert cli("qq.py", *base, "--name", "cut", "--epochs", "2").code == 0
    assert cli("qq.py", "--resume", tmp_path / "cut", "--epochs", "3", "--device", "cpu").code == 0
    assert history_of(tmp_path / "cut") == history_of(tmp_path / "full")
    full, cut = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert full["ema_updates"] == cut["ema_updates"] > 0


def test_recipes_benchmark_writes_paired_differences_whose_intervals_hold_the_hand_computed_one(data18, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import recipes

    argv = [data18, "--folds", "2", "--out", tmp_path, "--resamples", "400", "--candidates", "seed", "seed --ema 0.5"]
    argv += [*FAST, "--epochs", "1"]
    assert run_cli(recipes.main, recipes.get_args_parser().parse_args([str(a) for a in argv])) == 0
    out = tmp_path / "recipes"
    rows = files.read_csv(out / "recipes.csv")
    assert [(r["candidate"], r["metric"]) for r in rows] == [
        (c, m) for c in ("seed", "seed --ema 0.5") for m in ("accuracy", "qwk", "macro_f1", "mae_grades")
    ]
    assert "data:image/png;base64," in (out / "recipes.html").read_text()
    # by hand, from the two runs' out-of-fold predictions of the same images
    seed, ema = (files.read_csv(out / name / "predictions.csv") for name in ("candidate1", "candidate2"))
    right = {name: {r["path"]: r["true"] == r["predicted"] for r in rows_} for name, rows_ in (("s", seed), ("e", ema))}
    assert right["s"].keys() == right["e"].keys() and len(right["s"]) == 18
    by_hand = (sum(right["e"].values()) - sum(right["s"].values())) / 18
    accuracy = next(r for r in rows if r["candidate"] == "seed --ema 0.5" and r["metric"] == "accuracy")
    assert float(accuracy["difference_to_seed"]) == pytest.approx(by_hand)
    assert float(accuracy["difference_low"]) <= by_hand <= float(accuracy["difference_high"])
    assert accuracy["excludes_0"] == str(
        float(accuracy["difference_low"]) > 0 or float(accuracy["difference_high"]) < 0
    )


def test_the_mayo_demo_data_is_imbalanced_grouped_and_readable(tmp_path):
    from ucgrade.data import scan_folder
    from ucgrade.demo import make_mayo_dataset
    from ucgrade.groups import read_groups

    root = make_mayo_dataset(tmp_path / "mayo", images=50, size=64)
    image_set, _ = scan_folder(root)
    assert image_set.class_names == ["mayo0", "mayo1", "mayo2", "mayo3"] and image_set.class_counts() == [28, 13, 5, 4]
    groups = read_groups(root / "patients.csv", image_set)
    assert len(groups) == 50 and 50 / 6 <= len(set(groups)) <= 50 / 2 + 4  # 2 to 6 pictures per patient


def test_every_option_resumes_exactly_after_ctrl_c(data18, tmp_path):
    """A real SIGINT to a real process after its first epoch, then --resume: the epochs, the EMA and the weights
    of a run never interrupted (the augmentation's and the EMA's states are in last.pt)."""
    import signal

    from test_interrupt_resume import interrupt_after_first_epoch

    base = ["--data", data18, "--out", tmp_path, *FAST, *EVERY_OPTION, "--workers", "0"]
    assert cli("qq.py", *base, "--name", "full").code == 0
    run = tmp_path / "cut"
    code, _, stderr = interrupt_after_first_epoch([*base, "--name", "cut"], run, signal.SIGINT, tmp_path)
    assert code == 130 and 1 <= len(history_of(run)) < 3, stderr  # how fast it stops: test_interrupt_resume
    assert cli("qq.py", "--resume", run, "--device", "cpu").code == 0
    assert history_of(run) == history_of(tmp_path / "full")
    full, cut = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(run / "last.pt")
    for key in ("model", "raw_model"):
        assert all(torch.equal(full[key][k], cut[key][k]) for k in full[key]), key
    assert full["ema_updates"] == cut["ema_updates"]


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "convnext_tiny"])
def test_every_arch_trains_a_step_of_cdw_ce_with_ema_and_grades_with_tta(arch):
    """The parts that touch the model, on each kind of backbone: batch norm (ResNet, EfficientNet) and layer norm."""
    torch.manual_seed(0)
    model = build_model(3, arch=arch).to(memory_format=torch.channels_last)
    ema = engine.make_ema(model, 0.5)
    criterion = engine.make_criterion("none", [0, 1, 2], 3, torch.device("cpu"), loss="cdw-ce")
    optimizer, _ = engine.make_optimizer(model.parameters(), presets.apply_recipe(argparse.Namespace(
        recipe="endoscopy", optimizer="adamw", lr=0.01), {"optimizer", "lr"}))  # fmt: skip
    images = torch.stack(
        [presets.train_transform(64, "endoscopy")(torch.randint(0, 256, (3, 73, 80), dtype=torch.uint8)) for _ in "ab"]
    )
    for _ in range(2):
        loss = criterion(model.train()(presets.normalize(images)), torch.tensor([0, 2]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
    head = {"resnet18": "fc.weight", "efficientnet_b0": "classifier.1.weight", "convnext_tiny": "classifier.2.weight"}
    assert not torch.equal(ema.module.state_dict()[head[arch]], model.state_dict()[head[arch]])
    with torch.no_grad():
        probs = GradingModel(ema.module.eval(), {"tta": True})(images)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))


def test_every_option_under_torchrun(data18, tmp_path):
    """Two processes: the EMA of the module under DistributedDataParallel, CDW-CE, the schedule and TTA on each
    process's share of the validation images, gathered in order."""
    from test_torchrun import RUN, run_torchrun

    result = run_torchrun("--data", data18, "--out", tmp_path, *RUN, *EVERY_OPTION, logs=tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "train"
    assert [float(row["lr"]) for row in files.read_csv(run / "history.csv")] == pytest.approx([0.005, 0.01, 0.005])
    val = [row["path"] for row in files.read_csv(run / "split.csv") if row["subset"] == "val"]
    assert sorted(row["path"] for row in files.read_csv(run / "predictions.csv")) == sorted(val)  # each once
    last = load_checkpoint(run / "last.pt")
    assert last["tta"] is True and last["ema_updates"] == 3 * 2 and last["config"]["processes"] == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipe", "endoscopy", "--epochs", "2"], "the 2 warmup epochs (--warmup-epochs, or the recipe's) leave no"),
        (["--loss", "cdw-ce", "--label-smoothing", "0.1"], "--label-smoothing is cross-entropy's, and --loss cdw-ce"),
        (["--ema", "1"], "--ema must be a decay in [0, 1)"),
        (["--cdw-alpha", "0"], "--cdw-alpha must be positive"),
    ],
)
def test_impossible_recipe_settings_are_one_sentence_before_any_image_is_read(argv, message, tmp_path):
    code, _, err = cli("qq.py", "--data", tmp_path / "nowhere", "--out", tmp_path, *argv).lines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: " + message), err


def test_recipe_cdw_ce_drops_the_recipes_label_smoothing():
    import qq

    args = qq.get_args_parser().parse_args(["--recipe", "endoscopy", "--loss", "cdw-ce"])
    from ucgrade.settings import resolve

    resolved, _ = resolve(args, qq.get_args_parser())
    assert (resolved.loss, resolved.label_smoothing, resolved.ema, resolved.augment) == (
        "cdw-ce",
        0.0,
        0.999,
        "endoscopy",
    )


def test_a_run_recorded_before_the_recipes_resumes_with_the_seeds(data18, tmp_path):
    """config.json without the recipe's settings, history.csv and last.pt without val_qwk: resumed as seed."""
    from ucgrade.settings import RUN_SETTINGS

    base = ["--data", data18, "--out", tmp_path, "--name", "old", *FAST, "--freeze-backbone", "--epochs", "1"]
    assert cli("qq.py", *base).code == 0
    run = tmp_path / "old"
    config = json.loads((run / "config.json").read_text())
    new = [key for key in RUN_SETTINGS if key in presets.RECIPE_FIELDS + ("recipe",)]
    new = [
        key for key in new if key not in ("epochs", "batch_size", "img_size", "lr", "momentum", "step_size", "gamma")
    ]
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in new}))
    rows = [{k: v for k, v in row.items() if k != "val_qwk"} for row in files.read_csv(run / "history.csv")]
    files.write_csv(run / "history.csv", rows, list(rows[0]))
    last = torch.load(run / "last.pt", weights_only=True)
    last["history"] = [{k: v for k, v in row.items() if k != "val_qwk"} for row in last["history"]]
    (run / "last.pt").unlink()  # a hard link in no other run, but replaced as the tool replaces files
    torch.save(last, run / "last.pt")
    code, said, err = cli("qq.py", "--resume", run, "--epochs", "2", "--device", "cpu")
    assert code == 0, err
    history = files.read_csv(run / "history.csv")
    assert [row["val_qwk"] for row in history][0] == "" and history[1]["val_qwk"] != ""
    assert json.loads((run / "config.json").read_text())["epochs"] == 2


def test_the_onnx_graph_of_a_tta_checkpoint_averages_the_flips_for_any_batch(tmp_path):
    """export.py traces GradingModel with one crop; the graph must still grade a batch of 3, each crop's
    out-of-distribution score from its own features."""
    import onnxruntime

    from ucgrade import ood
    from ucgrade.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model(3, arch="resnet18").eval()
    stats, _ = ood.fit(np.random.default_rng(0).normal(size=(40, 512)), np.random.default_rng(1).normal(size=(8, 512)))
    checkpoint = {"tta": True, "ood": stats, "img_size": 64, "class_names": ["a", "b", "c"]}
    graph = export_onnx(model, checkpoint, {"tta": "true"})
    session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
    crops = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    probs, scores = session.run(None, {"images": crops.numpy()})
    with torch.no_grad():
        want_probs, want_scores = GradingModel(model, checkpoint)(crops)
        one = [GradingModel(model, checkpoint)(crops[i : i + 1])[1] for i in range(3)]
    assert probs.shape == (3, 3) and scores.shape == (3,)
    assert np.allclose(probs, want_probs.numpy(), atol=1e-5) and np.allclose(scores, want_scores.numpy(), rtol=1e-4)
    assert np.allclose(scores, torch.cat(one).numpy(), rtol=1e-4)  # each crop's own, not the first view's of all
