"""Grade order, remission, patient-level splits, cross-validation and class balance (issue 4).

The runs are real: generated images, qq.py trained for one epoch, its files read back. Expected
values are recomputed here from predictions.csv and split.csv, not taken from the code under test.
"""

import csv
import json
import statistics

import numpy as np
import pytest
import torch
from conftest import FAST, make_folder, run_script, train
from test_metrics import kappa_by_definition
from test_report_cam import Page, assert_self_contained, embedded_pngs

import qq
from ucgrade import data, engine, splits
from ucgrade.cli import run_cli
from ucgrade.device import Runtime
from ucgrade.files import read_csv
from ucgrade.train import make_loaders

ONE_EPOCH = [*FAST, "--epochs", "1", "--precision", "fp32"]  # fp32: no bf16 kernel warm-up in a fresh process


def write_groups(root, csv_path, leave_out=()):
    """Two images per patient, and one patient ("shared") with an image of every grade."""
    rows = []
    for grade in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for i, image in enumerate(sorted((root / grade).glob("*.jpg"))):
            rel = image.relative_to(root).as_posix()
            if rel not in leave_out:
                rows.append((rel, "shared" if i == 0 else f"{grade}-{(i - 1) // 2}"))
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "group"), *rows])
    return csv_path


def cli_error(argv, capsys):
    """What `python qq.py ARGV` does with a user mistake: (exit code, stderr lines)."""
    code = run_cli(qq.main, qq.get_args_parser().parse_args([str(a) for a in argv]))
    # as a terminal shows it: a progress bar redrawn with carriage returns and cleared leaves nothing
    lines = (line.rsplit("\r", 1)[-1].strip() for line in capsys.readouterr().err.split("\n"))
    return code, [line for line in lines if line]


def assert_no_group_split(rows):
    sides = {}
    for row in rows:
        sides.setdefault(row["group"], set()).add(row["subset"])
    assert all(len(s) == 1 for s in sides.values()), {g: s for g, s in sides.items() if len(s) > 1}


@pytest.fixture(scope="module")
def graded_data(tmp_path_factory):
    """Folder names that do not sort in grade order (mild < normal < severe), one unusable file."""
    root = make_folder(tmp_path_factory.mktemp("graded"), {"normal": 10, "mild": 8, "severe": 6})
    (root / "normal" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def holdout_run(graded_data, module_tmp):
    """python qq.py with --groups, --class-order and --remission-upto, as a user runs it."""
    out = module_tmp / "holdout"
    out.mkdir()
    groups = write_groups(graded_data, out / "patients.csv")
    result = run_script(
        "qq.py",
        "--data",
        graded_data,
        "--out",
        out,
        "--groups",
        groups,
        "--class-order",
        "normal,mild,severe",
        "--remission-upto",
        "normal",
        "--balance",
        "weights",
        *ONE_EPOCH,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "train", result.stdout


def test_holdout_keeps_every_patient_on_one_side(holdout_run, graded_data):
    run, _ = holdout_run
    split = read_csv(run / "split.csv")
    assert len(split) == 24 and {r["path"] for r in split} == {
        p.relative_to(graded_data).as_posix() for p in graded_data.rglob("*.jpg")
    }
    assert all(r["group"] for r in split)
    assert_no_group_split(split)
    val = [r for r in split if r["subset"] == "val"]
    assert 0 < len(val) < len(split)
    assert {r["class"] for r in val} == {"normal", "mild", "severe"}  # as stratified as the patients allow
    assert [r["group"] for r in read_csv(run / "predictions.csv")]  # predictions carry the patient too


def test_class_order_sets_the_grades(holdout_run):
    run, stdout = holdout_run
    assert "classes (grade order): normal (10), mild (8), severe (6)" in stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["normal", "mild", "severe"]
    assert torch.load(run / "best.pt", weights_only=True)["class_names"] == ["normal", "mild", "severe"]
    # QWK and MAE use this order: recompute them from the predictions with normal=0, mild=1, severe=2
    rows = read_csv(run / "predictions.csv")
    order = {"normal": 0, "mild": 1, "severe": 2}
    targets = np.array([order[r["true"]] for r in rows])
    preds = np.array([order[r["predicted"]] for r in rows])
    matrix = [[int(np.sum((targets == i) & (preds == j))) for j in range(3)] for i in range(3)]
    assert metrics["confusion_matrix"] == matrix
    assert metrics["mae_grades"] == pytest.approx(np.mean(np.abs(targets - preds)))
    if len(set(targets) | set(preds)) > 1:
        assert metrics["qwk"] == pytest.approx(kappa_by_definition(matrix), abs=1e-9)
    assert "Grades in order: <b>normal &lt; mild &lt; severe</b>" in (run / "report.html").read_text()


def test_remission_block_is_printed_stored_and_right(holdout_run):
    run, stdout = holdout_run
    assert "remission (normal) vs active (mild, severe):" in stdout
    for name in ("sensitivity", "specificity", "ppv", "npv", "auroc"):
        assert any(line.strip().startswith(name) for line in stdout.splitlines()), name
    block = json.loads((run / "metrics.json").read_text())["remission"]
    rows = read_csv(run / "predictions.csv")
    active = np.array([r["true"] != "normal" for r in rows])
    called = np.array([r["predicted"] != "normal" for r in rows])
    tp, fn = int(np.sum(active & called)), int(np.sum(active & ~called))
    tn, fp = int(np.sum(~active & ~called)), int(np.sum(~active & called))
    assert block["confusion"] == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}

    def ratio(a, b):
        return None if a + b == 0 else pytest.approx(a / (a + b))

    assert block["sensitivity"] == ratio(tp, fn) and block["specificity"] == ratio(tn, fp)
    assert block["ppv"] == ratio(tp, fp) and block["npv"] == ratio(tn, fn)
    assert 0 <= block["auroc"] <= 1
    report = (run / "report.html").read_text()
    assert (
        "Remission (normal) vs active disease (mild, severe)" in report and "notes.txt" in report
    )  # skipped file listed
    assert "lean optimistic" in report and "image by image" not in report  # split by patient


def test_bad_remission_class_is_one_clear_sentence(graded_data, tmp_path, capsys):
    result = run_script("qq.py", "--data", graded_data, "--out", tmp_path, "--remission-upto", "mayo1", *ONE_EPOCH)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: --remission-upto 'mayo1' is not one of the grades (mild, normal, severe)")
    assert not any(tmp_path.iterdir())  # nothing written
    code, lines = cli_error(
        ["--data", graded_data, "--out", tmp_path, "--remission-upto", "severe", *ONE_EPOCH], capsys
    )
    assert code == 2 and len(lines) == 1 and "most severe grade" in lines[0]


@pytest.mark.parametrize(
    "order, message",
    [
        ("normal,mild", "leaves out the sub-folder(s) severe"),
        ("normal,mild,severe,mayo3", "names mayo3, which is not a sub-folder"),
        ("normal,mild,mild,severe", "lists a class twice"),
        ("normal,mild,mild", "lists a class twice"),  # not "leaves out severe"
    ],
)
def test_class_order_is_validated(graded_data, tmp_path, capsys, order, message):
    code, lines = cli_error(["--data", graded_data, "--out", tmp_path, "--class-order", order, *ONE_EPOCH], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_groups_file_missing_images_is_an_error(graded_data, tmp_path, capsys):
    groups = write_groups(
        graded_data, tmp_path / "patients.csv", leave_out={"mild/mild_003.jpg", "severe/severe_005.jpg"}
    )
    code, lines = cli_error(["--data", graded_data, "--out", tmp_path / "out", "--groups", groups, *ONE_EPOCH], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "has no group for 2 image(s): mild/mild_003.jpg, severe/severe_005.jpg" in lines[0]
    assert not (tmp_path / "out").exists()


def test_groups_file_giving_an_image_two_patients_is_an_error(graded_data, tmp_path, capsys):
    groups = write_groups(graded_data, tmp_path / "patients.csv")
    rows = groups.read_text().splitlines()
    groups.write_text(
        "\n".join([*rows, "mild/mild_001.jpg,mild-0", "mild/mild_002.jpg", "mild/mild_003.jpg,p99"]) + "\n"
    )
    code, lines = cli_error(["--data", graded_data, "--out", tmp_path / "out", "--groups", groups, *ONE_EPOCH], capsys)
    # a repeated row that agrees is fine, a row without a group adds nothing, and a second patient is refused
    assert code == 2 and len(lines) == 1, lines
    assert "gives 'mild/mild_003.jpg' two groups ('mild-1' and, in row 28, 'p99'); keep one row per image" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("val_split, note", [(0.2, False), (0.3, True), (0.6, True)])
def test_a_grouped_validation_share_that_differs_from_val_split_is_pointed_out(
    graded_data, tmp_path, capsys, val_split, note
):
    image_set, _ = data.scan_folder(graded_data)
    groups = data.read_groups(write_groups(graded_data, tmp_path / "patients.csv"), image_set)
    args = qq.get_args_parser().parse_args(["--data", str(graded_data), "--val-split", str(val_split)])
    [(train, val)] = splits.new_split(args, image_set, groups)
    n_splits = {0.2: 5, 0.3: 3, 0.6: 2}[val_split]
    assert len(train) + len(val) == 24 and abs(len(val) / 24 - 1 / n_splits) < 0.1
    out = capsys.readouterr().out
    if val_split == 0.3:  # and with --folds, --val-split plays no part
        args = qq.get_args_parser().parse_args(["--data", str(graded_data), "--val-split", "0.3", "--folds", "3"])
        assert len(splits.new_split(args, image_set, groups)) == 3
        out += capsys.readouterr().out
        assert "note: --val-split is not used with --folds 3: each fold validates on 1/3 of the images." in out
    if note:
        assert (
            f"note: with --groups, the validation side is 1 of {n_splits} groupings of the patients, about "
            f"{1 / n_splits:.0%} of the images rather than the {val_split:.0%} of --val-split" in out
        )
    else:
        assert out == ""


def test_groups_file_with_windows_paths_works_and_unknown_rows_are_named(graded_data, tmp_path, capsys):
    image_set, _ = data.scan_folder(graded_data)
    posix = write_groups(graded_data, tmp_path / "patients.csv")
    windows = tmp_path / "patients_windows.csv"
    windows.write_text(posix.read_text().replace("/", "\\") + "mild\\ghost.jpg,p1\nnormal/notes.txt,p2\n")
    assert data.read_groups(windows, image_set) == data.read_groups(posix, image_set)
    out = capsys.readouterr().out
    assert (
        f"note: --groups file '{windows}' names 2 path(s) that are not usable images under --data, which are left "
        "out: mild/ghost.jpg, normal/notes.txt." in out
    )


def test_too_few_patients_for_the_folds_is_an_error(tmp_path, capsys):
    root = make_folder(tmp_path / "data", {"mild": 4, "severe": 4})
    groups = tmp_path / "patients.csv"
    groups.write_text(
        "path,group\n" + "".join(f"{g}/{g}_{i:03d}.jpg,p{i % 2}\n" for g in ("mild", "severe") for i in range(4))
    )
    code, lines = cli_error(
        ["--data", root, "--out", tmp_path / "out", "--groups", groups, "--folds", "3", *ONE_EPOCH], capsys
    )
    assert code == 2 and len(lines) == 1 and "needs at least 3 groups, but there are 2" in lines[0], lines
    code, lines = cli_error(
        ["--data", root, "--out", tmp_path / "out", "--groups", groups, *ONE_EPOCH], capsys
    )  # a hold-out split: 1 of 5
    assert code == 2 and lines == [
        "error: a split into 5 parts needs at least 5 groups, but there are 2; use a larger --val-split or add groups."
    ]
    code, lines = cli_error(
        ["--data", root, "--out", tmp_path / "out", "--folds", "6", *ONE_EPOCH], capsys
    )  # without groups
    assert code == 2 and lines == [
        "error: a split into 6 parts needs a grade with at least 6 images, but the largest has 4; use at most "
        "--folds 4, or add images."
    ]
    # a grade whose images all belong to one patient cannot be validated in every fold
    groups.write_text(
        "path,group\n"
        + "".join(
            f"{g}/{g}_{i:03d}.jpg,{'s' if g == 'severe' else f'p{i}'}\n" for g in ("mild", "severe") for i in range(4)
        )
    )
    code, lines = cli_error(
        ["--data", root, "--out", tmp_path / "out", "--groups", groups, "--folds", "2", *ONE_EPOCH], capsys
    )
    assert code == 2 and len(lines) == 1 and "class 'severe' has no" in lines[0] and "fewer --folds" in lines[0], lines
    assert not (tmp_path / "out").exists()  # checked before a run folder is made or a fold trains


@pytest.fixture(scope="module")
def cv_run(module_tmp):
    """python qq.py --folds 3 --groups ..., as a user runs it."""
    tmp = module_tmp / "cv"
    root = make_folder(tmp / "data", {"mild": 7, "moderate": 7, "severe": 7})
    groups = write_groups(root, tmp / "patients.csv")
    result = run_script(
        "qq.py",
        "--data",
        root,
        "--out",
        tmp / "out",
        "--folds",
        "3",
        "--groups",
        groups,
        "--remission-upto",
        "mild",
        "--balance",
        "sampler",
        *ONE_EPOCH,
        "--cam-examples",
        "1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp / "out" / "train", root, result.stdout


def test_predict_asks_which_fold_of_a_newest_cross_validation_run(cv_run):
    run, root, _ = cv_run
    result = run_script("predict.py", root / "mild" / "mild_000.jpg", "--out", run.parent)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr
        == f"error: the newest run '{run}' is a cross-validation run, whose folds each hold a model; choose one "
        f"with --weights, for example --weights {run / 'fold1' / 'best.pt'}.\n"
    )
    assert (
        run_script("predict.py", root / "mild" / "mild_000.jpg", "--weights", run / "fold1" / "best.pt").returncode == 0
    )


def test_cross_validation_validates_every_image_exactly_once(cv_run):
    run, root, _ = cv_run
    everything = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
    validated = []
    fold_of = {}
    for k in (1, 2, 3):
        fold = run / f"fold{k}"
        for name in (
            "best.pt",
            "last.pt",
            "metrics.json",
            "predictions.csv",
            "split.csv",
            "history.csv",
            "curves.png",
            "confusion_matrix.png",
            "confusion_matrix_normalized.png",
            "roc.png",
            "report.html",
        ):
            assert (fold / name).is_file(), f"fold{k}/{name}"
        split = read_csv(fold / "split.csv")
        assert {r["path"] for r in split} == everything  # every image is on one side of every fold
        assert_no_group_split(split)  # and no patient is on both
        val = [r["path"] for r in split if r["subset"] == "val"]
        assert sorted(r["path"] for r in read_csv(fold / "predictions.csv")) == sorted(val)
        validated += val
        fold_of.update({path: k for path in val})
    assert sorted(validated) == sorted(everything)  # each image validated exactly once

    pooled = read_csv(run / "predictions.csv")
    assert sorted(r["path"] for r in pooled) == sorted(everything)
    assert all(int(r["fold"]) == fold_of[r["path"]] for r in pooled)
    # a patient is validated in one fold only
    folds_of_group = {}
    for r in pooled:
        folds_of_group.setdefault(r["group"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of_group.values())


def test_cross_validation_scores_the_pooled_predictions(cv_run):
    run, _, stdout = cv_run
    names = ["mild", "moderate", "severe"]
    pooled = json.loads((run / "metrics.json").read_text())
    rows = read_csv(run / "predictions.csv")
    targets = np.array([names.index(r["true"]) for r in rows])
    preds = np.array([names.index(r["predicted"]) for r in rows])
    assert pooled["num_images"] == 21
    assert pooled["accuracy"] == pytest.approx(np.mean(targets == preds))
    matrix = np.array([[np.sum((targets == i) & (preds == j)) for j in range(3)] for i in range(3)])
    assert pooled["confusion_matrix"] == matrix.tolist()
    folds = [json.loads((run / f"fold{k}" / "metrics.json").read_text()) for k in (1, 2, 3)]
    assert (sum(np.array(f["confusion_matrix"]) for f in folds) == matrix).all()  # the folds add up to the pool
    assert "remission" in pooled and all("remission" in f for f in folds)

    summary = json.loads((run / "cv_summary.json").read_text())
    assert summary["folds"] == 3 and summary["grouped"] is True
    assert summary["pooled_out_of_fold"]["accuracy"] == pytest.approx(pooled["accuracy"])
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "mae_grades", "qwk", "roc_auc_ovr_macro"):
        values = [f[name] for f in folds if f[name] is not None]
        assert summary["mean_std"][name]["mean"] == pytest.approx(statistics.mean(values)), name
        assert summary["mean_std"][name]["std"] == pytest.approx(statistics.stdev(values)), name
    sensitivities = [f["remission"]["sensitivity"] for f in folds if f["remission"]["sensitivity"] is not None]
    assert summary["mean_std"]["remission_sensitivity"]["mean"] == pytest.approx(statistics.mean(sensitivities))

    table = {r["metric"]: r for r in read_csv(run / "cv_summary.csv")}
    assert set(table) >= {"accuracy", "qwk", "macro_f1", "remission_sensitivity", "remission_auroc"}
    assert float(table["accuracy"]["mean"]) == pytest.approx(statistics.mean(f["accuracy"] for f in folds), abs=1e-4)
    assert float(table["accuracy"]["fold2"]) == pytest.approx(folds[1]["accuracy"], abs=1e-4)
    assert float(table["accuracy"]["pooled"]) == pytest.approx(pooled["accuracy"], abs=1e-4)
    assert "cross-validation over 3 folds (mean ± std; pooled out-of-fold):" in stdout
    accuracy_line = next(line for line in stdout.splitlines() if line.strip().startswith("accuracy") and "±" in line)
    assert (
        f"{statistics.mean(f['accuracy'] for f in folds):.4f} ± {statistics.stdev(f['accuracy'] for f in folds):.4f}"
        in accuracy_line
    )


def test_cross_validation_report_embeds_everything(cv_run):
    run, _, _ = cv_run
    page = Page((run / "report.html").read_text())
    assert_self_contained(page)
    pngs = embedded_pngs(page)
    for name in (
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "roc.png",
        "fold1/curves.png",
        "fold2/curves.png",
        "fold3/curves.png",
    ):
        assert (run / name).read_bytes() in pngs, name
    if any(r["true"] != r["predicted"] for r in read_csv(run / "predictions.csv")):
        assert (run / "errors.png").read_bytes() in pngs
    assert any(
        (run / "fold1" / "cam" / r["file"]).read_bytes() in pngs for r in read_csv(run / "fold1" / "cam" / "index.csv")
    )
    text = " ".join(" ".join(page.text).split())
    assert "3-fold cross-validation" in text and "Checked: no group appears in more than one subset." in text
    assert (
        "Each fold's model is its best epoch, chosen by its accuracy on that fold's validation images, so these "
        "figures lean optimistic" in text
    )
    assert "image by image" not in text  # split by patient
    per_fold = [sum(r["fold"] == str(k) for r in read_csv(run / "predictions.csv")) for k in (1, 2, 3)]
    assert f"all grades {per_fold[0]} {per_fold[1]} {per_fold[2]} 21" in text  # images validated per fold
    timing = json.loads((run / "fold2" / "metrics.json").read_text())["inference_time"]
    assert f"fold2 cpu fp32 {timing['batch1_mean_ms']:.1f} {timing['batch1_median_ms']:.1f}" in text
    assert "Remission (mild) vs active disease (moderate, severe)" in text


# ----------------------------------------------------------------------------- class balance


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("imbalanced"), {"mild": 24, "moderate": 8, "severe": 4})
    image_set, _ = data.scan_folder(root)
    data.read_images(image_set, data.resize_size_for(64), keep=True)
    return root, image_set


def drawn_labels(image_set, balance, epochs=40):
    args = qq.get_args_parser().parse_args(
        ["--balance", balance, "--img-size", "64", "--batch-size", "8", "--workers", "0"]
    )
    train_idx, val_idx = data.split_holdout(image_set.labels, 0.2, seed=0)
    model = torch.nn.Module()  # make_loaders only needs a model for --freeze-backbone
    generator = torch.Generator().manual_seed(0)
    split = splits.Split(train_idx, val_idx, run_dir=None)
    train_loader, *_ = make_loaders(args, image_set, split, model, Runtime(torch.device("cpu")), generator)
    labels = torch.cat([targets for _ in range(epochs) for _, targets in train_loader]).numpy()
    return np.bincount(labels, minlength=3) / len(labels), np.bincount(
        np.asarray(image_set.labels)[train_idx], minlength=3
    )


def test_sampler_draws_every_grade_about_equally(imbalanced):
    _, image_set = imbalanced
    shares, train_counts = drawn_labels(image_set, "sampler")
    assert train_counts.tolist() == [19, 6, 3]  # 24, 8, 4 minus round(20 %) for validation
    assert shares == pytest.approx([1 / 3] * 3, abs=0.06)  # 40 epochs x 28 draws
    shares, _ = drawn_labels(image_set, "none", epochs=2)
    assert shares == pytest.approx(train_counts / train_counts.sum())  # plain shuffling keeps the imbalance


def test_weighted_loss_uses_balanced_class_weights():
    labels = np.array([0] * 19 + [1] * 6 + [2] * 3)
    criterion = engine.make_criterion("weights", labels, 3, torch.device("cpu"))
    # "balanced": n_samples / (n_classes * count) = 28 / (3 * count)
    assert criterion.weight.tolist() == pytest.approx([28 / 57, 28 / 18, 28 / 9])
    assert engine.make_criterion("none", labels, 3, torch.device("cpu")).weight is None
    assert (
        engine.make_criterion("sampler", labels, 3, torch.device("cpu")).weight is None
    )  # the sampler balances instead
    # a weighted loss puts the rare grade's mistakes first
    logits, targets = torch.zeros(2, 3), torch.tensor([0, 2])
    per_image = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    expected = (28 / 57 * per_image[0] + 28 / 9 * per_image[1]) / (28 / 57 + 28 / 9)
    assert criterion(logits, targets).item() == pytest.approx(expected.item())


def test_balance_changes_training(tmp_path, capsys):
    """Same seed, same split, same start: only --balance differs, and the training loss follows it."""
    root = make_folder(tmp_path / "data", {"mild": 8, "moderate": 3, "severe": 2})
    losses = {}
    for balance in ("none", "weights", "sampler"):
        argv = [
            "--data",
            root,
            "--out",
            tmp_path,
            "--name",
            balance,
            "--balance",
            balance,
            "--freeze-backbone",
            *ONE_EPOCH,
            "--cam-examples",
            "0",
        ]
        assert train(argv) == 0
        assert (
            "warning: --freeze-backbone without ImageNet weights trains only the last layer" in capsys.readouterr().out
        )  # --pretrained no
        losses[balance] = float(read_csv(tmp_path / balance / "history.csv")[0]["train_loss"])
        assert read_csv(tmp_path / balance / "split.csv") == read_csv(tmp_path / "none" / "split.csv")
    assert losses["weights"] != pytest.approx(losses["none"], rel=1e-4)
    assert losses["sampler"] != pytest.approx(losses["none"], rel=1e-4)
