"""Metric values on known predictions (issue 4), checked against hand calculations and definitions.

The expected numbers are worked out by hand from the confusion matrix (see the comments) or
computed here from the textbook definitions (pairwise AUC, the kappa formula), never by calling
the scikit-learn functions that ucgrade.metrics calls.
"""

import json
import statistics

import numpy as np
import pytest

from ucgrade import metrics
from ucgrade.files import read_csv
from ucgrade.sections import inference_html

# rows: true grade, columns: predicted grade
KNOWN = [[6, 2, 0], [1, 3, 1], [2, 0, 1]]
NAMES = ["mayo0", "mayo1", "mayo2"]


def from_matrix(matrix):
    """(targets, predictions) with exactly the given confusion matrix."""
    targets, preds = [], []
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            targets += [i] * count
            preds += [j] * count
    return np.array(targets), np.array(preds)


def probabilities_for(preds, num_classes, seed=0):
    """Random class probabilities whose largest entry is the given prediction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(preds), num_classes))
    logits[np.arange(len(preds)), preds] = logits.max(1) + rng.uniform(0.1, 1, len(preds))
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True)


def pairwise_auc(scores, positive):
    """AUC by its definition: the share of (positive, negative) pairs ranked right; ties count 1/2."""
    diff = _pair_differences(scores, positive)
    return (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size


def pairwise_auc_bounds(scores, positive, eps):
    """The AUC range when pairs closer than eps (rounding in a CSV file) may be ranked either way."""
    diff = _pair_differences(scores, positive)
    return np.sum(diff > eps) / diff.size, np.sum(diff >= -eps) / diff.size


def _pair_differences(scores, positive):
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    return scores[positive][:, None] - scores[~positive][None, :]


def kappa_by_definition(matrix):
    """Quadratic weighted kappa: 1 - sum(w * observed) / sum(w * expected), w = (i - j)^2."""
    matrix = np.asarray(matrix, dtype=float)
    k, n = len(matrix), matrix.sum()
    expected = np.outer(matrix.sum(1), matrix.sum(0)) / n
    weights = np.array([[(i - j) ** 2 for j in range(k)] for i in range(k)])
    return 1 - (weights * matrix).sum() / (weights * expected).sum()


def test_every_metric_on_a_known_confusion_matrix():
    targets, preds = from_matrix(KNOWN)
    probs = probabilities_for(preds, 3)
    result = metrics.compute_metrics(targets, probs, NAMES)

    assert result["confusion_matrix"] == KNOWN
    assert result["num_images"] == 16
    assert result["accuracy"] == pytest.approx(10 / 16)  # the diagonal
    # recalls 6/8, 3/5, 1/3 (row-wise); precisions 6/9, 3/5, 1/2 (column-wise)
    assert result["balanced_accuracy"] == pytest.approx((6 / 8 + 3 / 5 + 1 / 3) / 3)
    expected = {
        "mayo0": {"precision": 6 / 9, "recall": 6 / 8, "f1": 12 / 17, "support": 8},  # F1 = 2*6 / (9 + 8)
        "mayo1": {"precision": 3 / 5, "recall": 3 / 5, "f1": 3 / 5, "support": 5},
        "mayo2": {"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5, "support": 3},  # F1 = 2*1 / (2 + 3)
    }
    for name, row in expected.items():
        assert result["per_class"][name] == pytest.approx(row), name
    assert result["macro_f1"] == pytest.approx((12 / 17 + 3 / 5 + 2 / 5) / 3)
    # grade steps: 2 images off by one (0->1), 1 + 1 off by one (1->0, 1->2), 2 off by two (2->0): 8 / 16
    assert result["mae_grades"] == pytest.approx(0.5)
    # QWK with w = (i-j)^2 / 4: observed sum(w*O) = 2/4 + 1/4 + 1/4 + 2 = 3;
    # expected E = rows (8,5,3) x columns (9,5,2) / 16, sum(w*E) = 70.5 / 16; kappa = 1 - 3 / (70.5/16)
    assert result["qwk"] == pytest.approx(1 - 3 / (70.5 / 16))
    assert result["qwk"] == pytest.approx(kappa_by_definition(KNOWN))
    aucs = [pairwise_auc(probs[:, c], targets == c) for c in range(3)]
    assert result["roc_auc_ovr_macro"] == pytest.approx(np.mean(aucs))
    assert "remission" not in result  # no flag, no guess


def test_remission_block_on_known_predictions():
    targets, preds = from_matrix(KNOWN)
    probs = probabilities_for(preds, 3)

    # remission = mayo0; active = mayo1, mayo2. Active rows (1,3,1) and (2,0,1): called active 3+1+0+1 = 5 of 8.
    # Remission row (6,2,0): 6 called remission, 2 called active.
    block = metrics.compute_metrics(targets, probs, NAMES, remission_upto="mayo0")["remission"]
    assert block["remission_classes"] == ["mayo0"] and block["active_classes"] == ["mayo1", "mayo2"]
    assert block["confusion"] == {"tp": 5, "fn": 3, "tn": 6, "fp": 2}
    assert block["sensitivity"] == pytest.approx(5 / 8)
    assert block["specificity"] == pytest.approx(6 / 8)
    assert block["ppv"] == pytest.approx(5 / 7)
    assert block["npv"] == pytest.approx(6 / 9)
    assert block["auroc"] == pytest.approx(pairwise_auc(probs[:, 1] + probs[:, 2], targets > 0))

    # remission = mayo0, mayo1; active = mayo2 only: row (2,0,1) -> 1 of 3 called active;
    # remission rows call mayo2 once (1->2), so 12 of 13 are called remission.
    block = metrics.compute_metrics(targets, probs, NAMES, remission_upto="mayo1")["remission"]
    assert block["sensitivity"] == pytest.approx(1 / 3)
    assert block["specificity"] == pytest.approx(12 / 13)
    assert block["ppv"] == pytest.approx(1 / 2)
    assert block["npv"] == pytest.approx(12 / 14)
    assert block["auroc"] == pytest.approx(pairwise_auc(probs[:, 2], targets == 2))


def test_guessing_the_largest_grade_is_exposed():
    """The trap of the issue: always the largest grade gives a high accuracy and nothing else."""
    targets = np.array([0] * 6 + [1] * 3 + [2] * 1)
    probs = np.tile([0.6, 0.3, 0.1], (10, 1))
    result = metrics.compute_metrics(targets, probs, NAMES, remission_upto="mayo0")
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["balanced_accuracy"] == pytest.approx(1 / 3)
    assert result["macro_f1"] == pytest.approx((2 * 0.6 * 1 / 1.6) / 3)  # F1 of mayo0 only: P 0.6, R 1
    assert result["qwk"] == pytest.approx(0)  # no agreement beyond chance
    assert result["mae_grades"] == pytest.approx((3 * 1 + 1 * 2) / 10)
    assert result["roc_auc_ovr_macro"] == pytest.approx(0.5)  # constant scores rank nothing
    block = result["remission"]
    assert block["sensitivity"] == 0 and block["specificity"] == 1 and block["npv"] == pytest.approx(0.6)
    assert block["ppv"] is None  # nothing called active: undefined, not 0
    json.dumps(result, allow_nan=False)  # metrics.json never holds NaN


def test_class_order_changes_the_grade_aware_metrics_only():
    """Reordering the grades relabels the same predictions: QWK and MAE change, per-grade numbers do not."""
    truth = ["none", "none", "mild", "mild", "mild", "severe", "severe", "none", "severe", "mild"]
    guess = ["mild", "none", "mild", "severe", "none", "severe", "mild", "none", "none", "mild"]
    results, matrices = {}, {}
    for order in (("none", "mild", "severe"), ("mild", "none", "severe")):
        index = {name: i for i, name in enumerate(order)}
        targets = np.array([index[t] for t in truth])
        preds = np.array([index[g] for g in guess])
        matrices[order] = [[int(np.sum((targets == i) & (preds == j))) for j in range(3)] for i in range(3)]
        results[order] = metrics.compute_metrics(targets, np.eye(3)[preds], list(order))
        assert results[order]["qwk"] == pytest.approx(kappa_by_definition(matrices[order]))
        assert results[order]["mae_grades"] == pytest.approx(np.mean(np.abs(targets - preds)))
    right, wrong = results[("none", "mild", "severe")], results[("mild", "none", "severe")]
    # grade order: four one-step misses and "severe called none" (two steps) = 6 steps;
    # with none and mild swapped, "mild called severe" and "severe called mild" become two-step misses = 7 steps
    assert right["mae_grades"] == pytest.approx(6 / 10) and wrong["mae_grades"] == pytest.approx(7 / 10)
    assert right["qwk"] != pytest.approx(wrong["qwk"])
    assert right["per_class"] == wrong["per_class"] and right["accuracy"] == wrong["accuracy"]


def test_fold_summary_is_mean_and_sample_std():
    folds = [
        {
            "accuracy": 0.5,
            "balanced_accuracy": 0.4,
            "macro_f1": 0.3,
            "qwk": 0.2,
            "mae_grades": 0.9,
            "roc_auc_ovr_macro": None,
            "remission": {"sensitivity": 0.8, "specificity": 0.6, "ppv": None, "npv": 0.5, "auroc": 0.7},
        },
        {
            "accuracy": 0.7,
            "balanced_accuracy": 0.6,
            "macro_f1": 0.5,
            "qwk": 0.6,
            "mae_grades": 0.4,
            "roc_auc_ovr_macro": 0.8,
            "remission": {"sensitivity": 0.6, "specificity": 0.9, "ppv": 0.75, "npv": 0.5, "auroc": 0.9},
        },
        {
            "accuracy": 0.9,
            "balanced_accuracy": 0.8,
            "macro_f1": 0.4,
            "qwk": 0.7,
            "mae_grades": 0.2,
            "roc_auc_ovr_macro": 0.6,
            "remission": {"sensitivity": 1.0, "specificity": 0.6, "ppv": 0.25, "npv": 0.8, "auroc": 0.5},
        },
    ]
    summary = metrics.summarize_folds(folds)
    for name in metrics.SCALARS:
        values = [f[name] for f in folds if f[name] is not None]
        assert summary[name]["mean"] == pytest.approx(statistics.mean(values)), name
        assert summary[name]["std"] == pytest.approx(statistics.stdev(values)), name
        assert summary[name]["n"] == len(values)
    assert summary["roc_auc_ovr_macro"]["n"] == 2  # an undefined fold is left out, not counted as 0
    assert summary["remission_ppv"]["mean"] == pytest.approx(0.5) and summary["remission_ppv"]["n"] == 2
    assert summary["remission_sensitivity"]["std"] == pytest.approx(0.2)


def test_run_metrics_match_its_predictions_file(trained_run):
    """metrics.json of a real run agrees with its predictions.csv, recomputed from the definitions."""
    result = json.loads((trained_run / "metrics.json").read_text())
    names = result["class_names"]
    rows = read_csv(trained_run / "predictions.csv")
    val = [r for r in read_csv(trained_run / "split.csv") if r["subset"] == "val"]
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in val)  # every validation image, once
    targets = np.array([names.index(r["true"]) for r in rows])
    preds = np.array([names.index(r["predicted"]) for r in rows])
    probs = np.array([[float(r[f"prob:{n}"]) for n in names] for r in rows])
    assert np.all(probs.argmax(1) == preds) and np.allclose(probs.sum(1), 1, atol=1e-4)

    matrix = [[int(np.sum((targets == i) & (preds == j))) for j in range(3)] for i in range(3)]
    assert result["confusion_matrix"] == matrix
    assert result["accuracy"] == pytest.approx(np.mean(targets == preds))
    assert result["mae_grades"] == pytest.approx(np.mean(np.abs(targets - preds)))
    if len(set(targets) | set(preds)) > 1:
        assert result["qwk"] == pytest.approx(kappa_by_definition(matrix), abs=1e-9)
    recalls = [np.mean(preds[targets == c] == c) for c in range(3)]
    assert result["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    for c, name in enumerate(names):
        assert result["per_class"][name]["support"] == int(np.sum(targets == c))
        assert result["per_class"][name]["recall"] == pytest.approx(recalls[c])
    # the CSV rounds probabilities to 6 decimals, so near-ties may count either way
    bounds = np.mean([pairwise_auc_bounds(probs[:, c], targets == c, eps=2e-6) for c in range(3)], axis=0)
    assert bounds[0] - 1e-9 <= result["roc_auc_ovr_macro"] <= bounds[1] + 1e-9
    assert "remission" not in result  # no --remission-upto: no remission block
    assert "Remission" not in (trained_run / "report.html").read_text()


def test_widely_spread_inference_times_are_flagged_in_the_report():
    steady = {
        "device": "cpu",
        "precision": "bf16",
        "batch1_mean_ms": 23.0,
        "batch1_median_ms": 22.5,
        "batch1_p95_ms": 24.0,
        "throughput_images_per_s": 70.0,
        "throughput_batch_size": 32,
    }
    busy = steady | {"batch1_mean_ms": 214.6, "batch1_p95_ms": 1673.0}  # seen on a shared CPU
    assert "varied widely" not in inference_html(steady)
    assert (
        '<p class="warn">The times varied widely (p95 over twice the median), so another program was probably '
        "using the device; quote the median.</p>" in inference_html(busy)
    )
