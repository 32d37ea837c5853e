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
from conftest import FAST, cli, copy_run, make_folder
from test_metrics import kappa_by_definition, pairwise_auc, pairwise_auc_bounds
from test_report_cam import Page, assert_self_contained, embedded_pngs

import qq
from ucgrade import data, engine, files, presets, splits
from ucgrade import train as training
from ucgrade.device import Runtime
from ucgrade.files import read_csv
from ucgrade.groups import read_groups
from ucgrade.model import build_model
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


def run_and_record(argv):
    """qq.main in this process: (its terminal output, what train.prepare built for each model it trained).

    Each record holds the model's folder, its training images in the order its dataset has them,
    and the loss and the sampler that the training epochs used.
    """
    made = []
    prepare = training.prepare

    def recording_prepare(args, image_set, split, *rest):
        built = prepare(args, image_set, split, *rest)
        made.append(
            {
                "run_dir": split.run_dir,
                "train": [image_set.relpath(i) for i in split.train],
                "criterion": built.criterion,
                "sampler": built.train_loader.sampler.sampler,  # inside the SeededSampler that adds the seeds
            }
        )
        return built

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "prepare", recording_prepare)
        torch.manual_seed(0)
        code, out, err = cli("qq.py", *argv)
    assert code == 0, err
    return out, made


def training_counts(rows, class_names):
    """Images per grade among the training rows of a split.csv."""
    return np.array([sum(r["subset"] == "train" and r["class"] == name for r in rows) for name in class_names])


@pytest.fixture(scope="module")
def holdout_run(graded_data, module_tmp):
    """qq.py with --groups, --class-order, --remission-upto and --balance weights, for three epochs
    with the learning rate halved every two."""
    out = module_tmp / "holdout"
    out.mkdir()
    groups = write_groups(graded_data, out / "patients.csv")
    schedule = ["--epochs", "3", "--step-size", "2", "--gamma", "0.5", "--lr", "0.001", "--precision", "fp32"]
    stdout, made = run_and_record(
        ["--data", graded_data, "--out", out, "--groups", groups, "--class-order", "normal,mild,severe"]
        + ["--remission-upto", "normal", "--balance", "weights", *FAST, *schedule]
    )
    return out / "train", stdout, made, groups


def test_holdout_keeps_every_patient_on_one_side(holdout_run, graded_data):
    run, stdout, _, groups_csv = holdout_run
    split = read_csv(run / "split.csv")
    assert len(split) == 24 and {r["path"] for r in split} == {
        p.relative_to(graded_data).as_posix() for p in graded_data.rglob("*.jpg")
    }
    given = {r["path"]: r["group"] for r in read_csv(groups_csv)}  # the --groups file this test wrote
    assert {r["path"]: r["group"] for r in split} == given
    assert_no_group_split(split)
    val = [r for r in split if r["subset"] == "val"]
    assert 0 < len(val) < len(split)
    assert {r["class"] for r in val} == {"normal", "mild", "severe"}  # as stratified as the patients allow
    # the predictions are those of the validation images, each with its own patient
    predictions = read_csv(run / "predictions.csv")
    assert sorted(r["path"] for r in predictions) == sorted(r["path"] for r in val)
    assert all(r["group"] == given[r["path"]] for r in predictions)
    # patients.csv: one row per validation patient, with their images and their worst true grade
    order = ["normal", "mild", "severe"]
    patients = {r["group"]: r for r in read_csv(run / "patients.csv")}
    assert set(patients) == {r["group"] for r in val}
    for group, row in patients.items():
        images = [r for r in val if r["group"] == group]
        assert int(row["images"]) == len(images), group
        assert row["true"] == max((r["class"] for r in images), key=order.index), group
    # the report says the check was made, and the run did not print the note for runs without --groups
    text = " ".join(" ".join(Page((run / "report.html").read_text()).text).split())
    assert "Checked: no group appears in more than one subset." in text and "appear in more than one" not in text
    assert "without --groups" not in stdout


def test_the_learning_rate_follows_step_lr(holdout_run):
    run, stdout, _, _ = holdout_run
    # --lr 0.001 --step-size 2 --gamma 0.5: halved after every second epoch
    assert [float(r["lr"]) for r in read_csv(run / "history.csv")] == pytest.approx([0.001, 0.001, 0.0005])
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split("  lr ")[1].split()[0] for line in epoch_lines] == ["0.001", "0.001", "0.0005"]


def test_a_resumed_split_with_a_patient_on_both_sides_is_flagged_in_the_report(holdout_run, tmp_path):
    """The only way a patient gets onto both sides: a split.csv edited by hand, which --resume takes as it is.
    The resumed run also goes on with the learning-rate schedule where it stopped."""
    run, _, _, _ = holdout_run
    copy = copy_run(run, tmp_path / "run")
    rows = read_csv(copy / "split.csv")
    val = [r for r in rows if r["subset"] == "val"]
    # one image of a validation patient with several, of a grade that keeps other validation images
    edited = next(
        r
        for r in val
        if sum(v["group"] == r["group"] for v in val) > 1 and sum(v["class"] == r["class"] for v in val) > 1
    )
    moved = edited["group"]
    edited["subset"] = "train"
    files.write_csv(copy / "split.csv", rows, list(rows[0]))
    code, out, err = cli("qq.py", "--resume", copy, "--epochs", "4", "--device", "cpu")
    assert code == 0, err
    assert "without --groups" not in out  # the groups came with the split
    assert read_csv(copy / "split.csv") == rows  # the run kept the split it was given
    text = " ".join(" ".join(Page((copy / "report.html").read_text()).text).split())
    assert f"1 group(s) appear in more than one subset: {moved}." in text
    assert "no group appears in more than one subset" not in text
    assert edited["path"] not in {r["path"] for r in read_csv(copy / "predictions.csv")}  # it trained instead
    lrs = [float(r["lr"]) for r in read_csv(copy / "history.csv")]
    assert lrs == pytest.approx([0.001, 0.001, 0.0005, 0.0005])


def test_class_order_sets_the_grades(holdout_run):
    run, stdout, _, _ = holdout_run
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
    run, stdout, _, _ = holdout_run
    block = json.loads((run / "metrics.json").read_text())["remission"]
    rows = read_csv(run / "predictions.csv")
    active = np.array([r["true"] != "normal" for r in rows])
    called = np.array([r["predicted"] != "normal" for r in rows])
    tp, fn = int(np.sum(active & called)), int(np.sum(active & ~called))
    tn, fp = int(np.sum(~active & ~called)), int(np.sum(~active & called))
    assert block["confusion"] == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}

    def ratio(a, b):
        return None if a + b == 0 else a / (a + b)

    expected = {"sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}
    for name, value in expected.items():
        assert block[name] == (None if value is None else pytest.approx(value)), name
    # the AUROC by its definition: the share of (active, remission) pairs in which the active image has the
    # higher P(active) = P(mild) + P(severe), ties counting half; predictions.csv rounds the probabilities to
    # 6 decimals, so pairs closer than that may count either way
    assert 0 < active.sum() < len(rows)  # both kinds are validated, so the AUROC is defined
    scores = [float(r["prob:mild"]) + float(r["prob:severe"]) for r in rows]
    low, high = pairwise_auc_bounds(scores, active, eps=3e-6)
    assert low - 1e-9 <= block["auroc"] <= high + 1e-9
    if low == high:  # no pair that close: the definition gives one number
        assert block["auroc"] == pytest.approx(pairwise_auc(scores, active))
    # the terminal shows the stored values, one per line under the block's title
    lines = stdout.splitlines()
    start = lines.index("remission (normal) vs active (mild, severe):")
    printed = dict(line.split() for line in lines[start + 1 : start + 6])
    expected["auroc"] = block["auroc"]
    assert printed == {name: "n/a" if v is None else f"{v:.3f}" for name, v in expected.items()}
    report = (run / "report.html").read_text()
    assert (
        "Remission (normal) vs active disease (mild, severe)" in report and "notes.txt" in report
    )  # skipped file listed
    assert "lean optimistic" in report and "image by image" not in report  # split by patient


def test_bad_remission_class_is_one_clear_sentence(graded_data, tmp_path):
    code, _, lines = cli(
        "qq.py", "--data", graded_data, "--out", tmp_path, "--remission-upto", "mayo1", *ONE_EPOCH
    ).lines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --remission-upto 'mayo1' is not one of the grades (mild, normal, severe)")
    assert not any(tmp_path.iterdir())  # nothing written
    code, _, lines = cli(
        "qq.py", "--data", graded_data, "--out", tmp_path, "--remission-upto", "severe", *ONE_EPOCH
    ).lines()
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
def test_class_order_is_validated(graded_data, tmp_path, order, message):
    code, _, lines = cli("qq.py", "--data", graded_data, "--out", tmp_path, "--class-order", order, *ONE_EPOCH).lines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_groups_file_missing_images_is_an_error(graded_data, tmp_path):
    groups = write_groups(
        graded_data, tmp_path / "patients.csv", leave_out={"mild/mild_003.jpg", "severe/severe_005.jpg"}
    )
    code, _, lines = cli(
        "qq.py", "--data", graded_data, "--out", tmp_path / "out", "--groups", groups, *ONE_EPOCH
    ).lines()
    assert code == 2 and len(lines) == 1, lines
    assert "has no group for 2 image(s): mild/mild_003.jpg, severe/severe_005.jpg" in lines[0]
    assert not (tmp_path / "out").exists()


def test_groups_file_giving_an_image_two_patients_is_an_error(graded_data, tmp_path):
    groups = write_groups(graded_data, tmp_path / "patients.csv")
    rows = groups.read_text().splitlines()
    groups.write_text(
        "\n".join([*rows, "mild/mild_001.jpg,mild-0", "mild/mild_002.jpg", "mild/mild_003.jpg,p99"]) + "\n"
    )
    code, _, lines = cli(
        "qq.py", "--data", graded_data, "--out", tmp_path / "out", "--groups", groups, *ONE_EPOCH
    ).lines()
    # a repeated row that agrees is fine, a row without a group adds nothing, and a second patient is refused
    assert code == 2 and len(lines) == 1, lines
    assert "gives 'mild/mild_003.jpg' two groups ('mild-1' and, in row 28, 'p99'); keep one row per image" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("val_split, note", [(0.2, False), (0.3, True), (0.6, True)])
def test_a_grouped_validation_share_that_differs_from_val_split_is_pointed_out(
    graded_data, tmp_path, capsys, val_split, note
):
    image_set, _ = data.scan_folder(graded_data)
    groups = read_groups(write_groups(graded_data, tmp_path / "patients.csv"), image_set)
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
    assert read_groups(windows, image_set) == read_groups(posix, image_set)
    out = capsys.readouterr().out
    assert (
        f"note: --groups file '{windows}' names 2 path(s) that are not usable images under --data, which are left "
        "out: mild/ghost.jpg, normal/notes.txt." in out
    )


def test_too_few_patients_for_the_folds_is_an_error(tmp_path):
    root = make_folder(tmp_path / "data", {"mild": 4, "severe": 4})
    groups = tmp_path / "patients.csv"
    groups.write_text(
        "path,group\n" + "".join(f"{g}/{g}_{i:03d}.jpg,p{i % 2}\n" for g in ("mild", "severe") for i in range(4))
    )
    code, _, lines = cli(
        "qq.py", "--data", root, "--out", tmp_path / "out", "--groups", groups, "--folds", "3", *ONE_EPOCH
    ).lines()
    assert code == 2 and len(lines) == 1 and "needs at least 3 groups, but there are 2" in lines[0], lines
    code, _, lines = cli(
        "qq.py", "--data", root, "--out", tmp_path / "out", "--groups", groups, *ONE_EPOCH
    ).lines()  # a hold-out split: 1 of 5
    assert code == 2 and lines == [
        "error: a split into 5 parts needs at least 5 groups, but there are 2; use a larger --val-split or add groups."
    ]
    code, _, lines = cli(
        "qq.py", "--data", root, "--out", tmp_path / "out", "--folds", "6", *ONE_EPOCH
    ).lines()  # without groups
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
    code, _, lines = cli(
        "qq.py", "--data", root, "--out", tmp_path / "out", "--groups", groups, "--folds", "2", *ONE_EPOCH
    ).lines()
    assert code == 2 and len(lines) == 1 and "class 'severe' has no" in lines[0] and "fewer --folds" in lines[0], lines
    assert not (tmp_path / "out").exists()  # checked before a run folder is made or a fold trains


@pytest.fixture(scope="module")
def cv_run(module_tmp):
    """qq.py --folds 3 --groups ... --balance sampler."""
    tmp = module_tmp / "cv"
    root = make_folder(tmp / "data", {"mild": 7, "moderate": 7, "severe": 7})
    groups = write_groups(root, tmp / "patients.csv")
    stdout, made = run_and_record(
        ["--data", root, "--out", tmp / "out", "--folds", "3", "--groups", groups, "--remission-upto", "mild"]
        + ["--balance", "sampler", *ONE_EPOCH, "--cam-examples", "1"]
    )
    return tmp / "out" / "train", root, stdout, made


def test_predict_asks_which_fold_of_a_newest_cross_validation_run(cv_run):
    run, root, _, _ = cv_run
    image = root / "mild" / "mild_000.jpg"
    code, out, err = cli("predict.py", image, "--out", run.parent, "--device", "cpu")
    assert code == 2 and out == ""
    assert (
        err == f"error: the newest run '{run}' is a cross-validation run, whose folds each hold a model; choose one "
        f"with --weights, for example --weights {run / 'fold1' / 'best.pt'}.\n"
    )
    code, out, _ = cli("predict.py", image, "--weights", run / "fold1" / "best.pt", "--device", "cpu")
    assert code == 0
    assert "mild_000.jpg" in out  # the fold's model grades it


def test_cross_validation_validates_every_image_exactly_once(cv_run):
    run, root, _, _ = cv_run
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
    run, _, stdout, _ = cv_run
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
    run, _, _, _ = cv_run
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
    data.read_images(image_set, presets.resize_size_for(64), keep=True)
    return root, image_set


def drawn_labels(image_set, balance, epochs=40):
    args = qq.get_args_parser().parse_args(
        ["--balance", balance, "--img-size", "64", "--batch-size", "8", "--workers", "0"]
    )
    train_idx, val_idx = splits.split_holdout(image_set.labels, 0.2, seed=0)
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


def built_for(image_set, balance):
    """What train.prepare builds for a ResNet18 on the first 20 % hold-out split of image_set:
    (the training images' labels, the loss, the sampler inside the loader's SeededSampler)."""
    args = qq.get_args_parser().parse_args(
        ["--balance", balance, "--img-size", "64", "--batch-size", "8", "--workers", "0", "--arch", "resnet18"]
    )
    train_idx, val_idx = splits.split_holdout(image_set.labels, 0.2, seed=0)
    model = build_model(3, None, "resnet18")
    generator = torch.Generator().manual_seed(0)
    built = training.prepare(args, image_set, splits.Split(train_idx, val_idx, run_dir=None), model,
                             Runtime(torch.device("cpu")), generator)  # fmt: skip
    return np.asarray(image_set.labels)[train_idx], built.criterion, built.train_loader.sampler.sampler


def test_balance_builds_the_loss_and_the_sampler_from_the_training_images(imbalanced):
    _, image_set = imbalanced
    labels, criterion, sampler = built_for(image_set, "weights")
    counts = np.bincount(labels, minlength=3)
    assert counts.tolist() == [19, 6, 3]  # 24, 8, 4 minus the validation images
    # n / (k * count) over the 28 training images, not over all 36 (which would give 36 / (3 * [24, 8, 4]))
    assert criterion.weight.tolist() == pytest.approx([28 / (3 * 19), 28 / (3 * 6), 28 / (3 * 3)])
    assert isinstance(sampler, torch.utils.data.RandomSampler)  # weights or sampler, not both
    labels, criterion, sampler = built_for(image_set, "sampler")
    assert criterion.weight is None
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler)
    assert sampler.replacement and sampler.num_samples == 28  # an epoch draws as many images as there are
    # one weight per training image, in the dataset's order: 1 / (its grade's training images)
    assert sampler.weights.tolist() == pytest.approx([1 / counts[label] for label in labels])
    _, criterion, sampler = built_for(image_set, "none")
    assert criterion.weight is None and isinstance(sampler, torch.utils.data.RandomSampler)


def test_a_run_trains_with_the_balance_it_was_given(holdout_run, cv_run):
    """The loss and the sampler that qq.py's runs trained with, checked against their split.csv."""
    names = ["normal", "mild", "severe"]
    run, _, [made], _ = holdout_run  # --balance weights
    assert made["run_dir"] == run
    counts = training_counts(read_csv(run / "split.csv"), names)
    assert made["criterion"].weight.tolist() == pytest.approx(counts.sum() / (3 * counts))
    assert isinstance(made["sampler"], torch.utils.data.RandomSampler)
    run, _, _, made = cv_run  # --balance sampler, in each of the 3 folds
    names = ["mild", "moderate", "severe"]
    assert [m["run_dir"] for m in made] == [run / f"fold{k}" for k in (1, 2, 3)]
    for m in made:
        rows = read_csv(m["run_dir"] / "split.csv")
        class_of = {r["path"]: r["class"] for r in rows}
        assert sorted(m["train"]) == sorted(r["path"] for r in rows if r["subset"] == "train")
        counts = dict(zip(names, training_counts(rows, names)))
        assert m["criterion"].weight is None
        assert isinstance(m["sampler"], torch.utils.data.WeightedRandomSampler) and m["sampler"].num_samples == len(
            m["train"]
        )
        assert m["sampler"].weights.tolist() == pytest.approx([1 / counts[class_of[path]] for path in m["train"]])


def test_freeze_backbone_without_imagenet_weights_is_warned_about(capsys):
    args = qq.get_args_parser().parse_args(["--pretrained", "no", "--freeze-backbone"])
    assert training.initial_weights(args) == (None, "none (random initialisation, --pretrained no)")
    assert "warning: --freeze-backbone without ImageNet weights trains only the last layer" in capsys.readouterr().out
