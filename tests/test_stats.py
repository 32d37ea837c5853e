"""95% confidence intervals (issues 12 and 23) and patient-level grades (issue 12).

The vectorised metrics are checked against metrics.compute_metrics (scikit-learn) on the very same
resamples; the intervals against cases whose answer is known without the code under test: exact
intervals against scipy's binomtest and values computed by hand.
"""

import collections

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn import metrics as skm

from ucgrade import metrics, stats

NAMES = ["mild", "moderate", "severe"]


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def predictions(n, num_classes, seed, skill=1.5):
    """Targets and probabilities of a fair model; probabilities rounded to 2 decimals so that scores tie."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, num_classes, n)
    probs = np.round(softmax(rng.normal(size=(n, num_classes)) + skill * np.eye(num_classes)[targets]), 2)
    return targets, probs / probs.sum(1, keepdims=True)


def assert_same_as_compute_metrics(targets, probs, class_names, weights, remission_upto):
    values = stats.resample_metrics(targets, probs, class_names, weights, remission_upto)
    assert set(values) == set(stats.INTERVAL_METRICS if remission_upto else metrics.SCALARS)
    undefined = collections.Counter()  # metric name: resamples on which it is undefined
    for b, row in enumerate(weights.astype(int)):
        drawn = np.repeat(np.arange(len(targets)), row)  # the resample as a list of images
        expected = metrics.compute_metrics(targets[drawn], probs[drawn], class_names, remission_upto)
        for name, per_resample in values.items():
            reference = stats.metric_value(expected, name)
            if reference is None:
                assert np.isnan(per_resample[b]), (name, b)
                undefined[name] += 1
            else:
                assert per_resample[b] == pytest.approx(reference, abs=1e-12), (name, b)
    return undefined


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn, on resamples with a missing grade
@pytest.mark.parametrize(
    "n, num_classes, remission_upto, grouped",
    [
        (60, 3, "moderate", False),
        (60, 3, "mild", True),
        (80, 4, "g1", False),
        (40, 2, "g0", False),  # two grades: the AUC of the second
    ],
)
def test_vectorised_metrics_equal_compute_metrics_on_the_same_resamples(n, num_classes, remission_upto, grouped):
    targets, probs = predictions(n, num_classes, seed=n + num_classes)
    class_names = NAMES if num_classes == 3 else [f"g{i}" for i in range(num_classes)]
    groups = [f"p{i // 4}" for i in range(n)] if grouped else None
    weights = stats.resample_weights(np.random.default_rng(0), n, groups, n_resamples=40)
    assert weights.sum(1).tolist() == [n] * 40  # groups of 4: as many images as there are, too
    assert_same_as_compute_metrics(targets, probs, class_names, weights, remission_upto)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_metrics_undefined_on_a_resample_are_nan_where_compute_metrics_gives_none():
    # eight images: one severe, one called severe; many resamples lack a grade, miss the severe
    # image or call nothing active
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    probs = softmax(np.eye(3)[[0, 0, 1, 1, 1, 0, 2, 1]] * 2.0)
    weights = stats.resample_weights(np.random.default_rng(2), 8, n_resamples=100)
    undefined = assert_same_as_compute_metrics(targets, probs, NAMES, weights, "moderate")
    # a resample with one grade only has no AUC; one without the severe image no sensitivity and AUROC;
    # one that calls nothing active no PPV
    assert set(undefined) == {"roc_auc_ovr_macro", "remission_sensitivity", "remission_auroc", "remission_ppv"}
    assert sum(undefined.values()) > 50


def test_every_resample_counts_images_as_drawn():
    weights = stats.resample_weights(np.random.default_rng(5), 4, ["b", "a", "b", "c"], n_resamples=3)
    draws = np.random.default_rng(5).integers(0, 3, size=(3, 3))  # the groups drawn: a=0, b=1, c=2
    per_group = np.stack([np.bincount(row, minlength=3) for row in draws])
    assert weights.tolist() == per_group[:, [1, 0, 1, 2]].tolist()  # an image counts as often as its group


def test_right_every_time_gives_a_degenerate_bootstrap():
    targets = np.repeat([0, 1, 2], 10)
    probs = np.eye(3)[targets] * 0.8 + 0.2 / 3
    intervals = stats.bootstrap_intervals(targets, probs, NAMES, remission_upto="mild")
    for name, value in [("accuracy", 1.0), ("mae_grades", 0.0), ("qwk", 1.0), ("remission_sensitivity", 1.0)]:
        assert intervals[name] == {"low": value, "high": value, "resamples": 2000}, name


def test_24_of_24_right_is_an_exact_interval_not_1_00_to_1_00():
    # the demo report's 24 validation images, all right: the percentile bootstrap said "1.00-1.00"
    targets = np.repeat([0, 1, 2], 8)
    probs = np.eye(3)[targets] * 0.8 + 0.2 / 3
    intervals = stats.confidence_intervals(targets, probs, NAMES, remission_upto="mild")
    accuracy = intervals["accuracy"]
    # Clopper-Pearson for k = n: the lower bound solves p^n = 0.025
    assert accuracy["low"] == pytest.approx(0.025 ** (1 / 24)) == pytest.approx(0.8575, abs=1e-4)
    assert accuracy["high"] == 1.0 and accuracy["method"] == "Clopper-Pearson"
    assert stats.format_ci(1.0, accuracy) == "1.00 (0.86-1.00)"
    assert intervals["remission_sensitivity"]["low"] == pytest.approx(0.025 ** (1 / 16))  # the 16 active images
    assert intervals["remission_specificity"]["low"] == pytest.approx(0.025 ** (1 / 8))
    # the bootstrap metrics: every resample is perfect, which says nothing; no zero-width interval is given
    for name in ("qwk", "mae_grades", "balanced_accuracy", "macro_f1", "roc_auc_ovr_macro"):
        assert intervals[name]["degenerate"] and intervals[name]["low"] is None, name
        assert intervals[name]["method"] == "percentile bootstrap"
    assert stats.format_ci(1.0, intervals["qwk"]) == "1.00 (no interval: the resamples did not vary)"
    assert all(stats.format_ci(0.5, i) != "0.50 (0.50-0.50)" for i in intervals.values())
    for interval in stats.recall_intervals(targets, probs, NAMES).values():  # 8 of 8 per grade
        assert interval["low"] == pytest.approx(0.025 ** (1 / 8)) == pytest.approx(0.6306, abs=1e-4)


@pytest.mark.parametrize("k, n", [(0, 10), (0, 24), (1, 10), (7, 10), (12, 24), (23, 24), (50, 127), (35, 127)])
def test_exact_intervals_are_scipys_clopper_pearson(k, n):
    interval = stats.exact_interval(np.arange(n) < k)
    reference = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert (interval["low"], interval["high"]) == pytest.approx((reference.low, reference.high), abs=1e-9)
    assert interval["hits"] == k and interval["n"] == n


def test_none_right_by_hand():
    # Clopper-Pearson for k = 0: the upper bound solves (1 - p)^n = 0.025
    interval = stats.exact_interval(np.zeros(10, bool))
    assert interval["low"] == 0.0 and interval["high"] == pytest.approx(1 - 0.025 ** (1 / 10))
    assert interval["high"] == pytest.approx(0.3085, abs=1e-4)
    assert stats.exact_interval(np.zeros(0, bool))["low"] is None  # no images: no interval


def test_grouped_exact_intervals_count_a_patient_about_once():
    # 10 patients with 4 images each, all right: the data cannot say how alike a patient's images are, so they
    # count as alike (design effect 4), and the interval is that of 10 images
    hits, groups = np.ones(40, bool), [f"p{i // 4}" for i in range(40)]
    interval = stats.exact_interval(hits, groups)
    assert interval["design_effect"] == 4.0 and interval["effective_n"] == 10.0
    assert interval["low"] == pytest.approx(0.025 ** (1 / 10)) == pytest.approx(0.6915, abs=1e-4)
    assert "Korn-Graubard" in interval["method"]
    # half the patients right on all 4 images: the cluster-robust variance by hand is G/(G-1) * 16 G p(1-p) / n^2,
    # the binomial one p(1-p) / n, so the design effect is 10/9 * 16 * 10 / 40 = 4.44
    hits = np.arange(40) < 20
    interval = stats.exact_interval(hits, groups)
    assert interval["design_effect"] == pytest.approx(40 / 9, abs=1e-3)
    reference = binomtest(20, 40).proportion_ci(0.95, method="exact")
    assert interval["low"] < reference.low and interval["high"] > reference.high
    # each patient's images half right: no patient is alike in its images, so no wider than the binomial interval
    interval = stats.exact_interval(np.arange(40) % 2 == 0, groups)
    assert interval["design_effect"] == 1.0
    assert (interval["low"], interval["high"]) == pytest.approx((reference.low, reference.high))


def test_patients_half_right_give_a_degenerate_cluster_interval():
    # every patient has one image graded right and one wrong: any resample of patients is half right,
    # while resamples of images are not
    targets = np.repeat([0, 1, 2], 8)
    preds = np.where(np.arange(24) % 2 == 0, targets, (targets + 1) % 3)
    probs = np.eye(3)[preds]
    groups = [f"p{i // 2}" for i in range(24)]
    clustered = stats.bootstrap_intervals(targets, probs, NAMES, groups=groups)["accuracy"]
    assert clustered == {"low": 0.5, "high": 0.5, "resamples": 2000}
    by_image = stats.bootstrap_intervals(targets, probs, NAMES)["accuracy"]
    assert by_image["low"] < 0.4 and by_image["high"] > 0.6


def test_a_cluster_bootstrap_is_wider_when_patients_images_are_identical():
    # 40 patients with 4 identical images each: resampling patients is resampling 40 images, each
    # counted 4 times; resampling images pretends there are 160 independent ones
    targets, probs = predictions(40, 3, seed=7, skill=1.0)
    copies = np.repeat(np.arange(40), 4)
    groups = [f"p{i:02d}" for i in copies]
    clustered = stats.bootstrap_intervals(targets[copies], probs[copies], NAMES, "mild", groups=groups)
    one_each = stats.bootstrap_intervals(targets, probs, NAMES, "mild")
    by_image = stats.bootstrap_intervals(targets[copies], probs[copies], NAMES, "mild")
    for name in stats.INTERVAL_METRICS:
        # the same draws (the same seed draws 40 of 40 either way), so the same interval
        assert clustered[name] == pytest.approx(one_each[name]), name
        if name != "qwk":  # 40 images of QWK's worth: about twice as wide is what sqrt(4) predicts
            width = clustered[name]["high"] - clustered[name]["low"]
            assert width > 1.5 * (by_image[name]["high"] - by_image[name]["low"]), name
    assert clustered["qwk"]["high"] - clustered["qwk"]["low"] > by_image["qwk"]["high"] - by_image["qwk"]["low"]


def test_an_interval_counts_only_the_resamples_where_the_metric_is_defined():
    # one active (severe) image among 20: sensitivity is defined only in resamples that draw it
    targets = np.array([0] * 10 + [1] * 9 + [2])
    probs = np.eye(3)[targets]
    intervals = stats.bootstrap_intervals(targets, probs, NAMES, "moderate", seed=3)
    drawn = stats.resample_weights(np.random.default_rng(3), 20, n_resamples=2000)[:, 19] > 0
    assert intervals["remission_sensitivity"] == {"low": 1.0, "high": 1.0, "resamples": int(drawn.sum())}
    assert 0.5 < drawn.mean() < 0.75  # about 1 - (19/20)^20 = 64%
    # a single grade anywhere: QWK and the AUC are undefined on every resample
    intervals = stats.bootstrap_intervals([1] * 10, np.eye(3)[[1] * 10], NAMES)
    assert intervals["qwk"] == intervals["roc_auc_ovr_macro"] == {"low": None, "high": None, "resamples": 0}


def test_intervals_depend_on_the_seed_only(monkeypatch):
    targets, probs = predictions(100, 3, seed=1)
    first = stats.confidence_intervals(targets, probs, NAMES, seed=4)
    assert stats.confidence_intervals(targets, probs, NAMES, seed=4) == first
    monkeypatch.setattr(stats, "_BLOCK_CELLS", 100 * 300)  # in blocks of 300 resamples (the last one of 200)
    assert stats.confidence_intervals(targets, probs, NAMES, seed=4) == first
    assert stats.confidence_intervals(targets, probs, NAMES, seed=5) != first
    assert (
        first["accuracy"]["low"]
        < metrics.compute_metrics(targets, probs, NAMES)["accuracy"]
        < first["accuracy"]["high"]
    )


def test_format_ci():
    assert stats.format_ci(0.8123, {"low": 0.7561, "high": 0.8649}) == "0.81 (0.76-0.86)"
    assert stats.format_ci(-0.1, {"low": -0.3234, "high": 0.1449}) == "-0.10 (-0.32 to 0.14)"
    assert stats.format_ci(0.25, {"low": 0.1, "high": 0.4}, digits=3) == "0.250 (0.100-0.400)"
    assert stats.format_ci(None, {"low": None, "high": None}) == "n/a"
    assert stats.format_ci(0.5, {"low": None, "high": None}) == "0.50 (n/a)"
    result = metrics.compute_metrics([0, 1, 2, 2], np.eye(3)[[0, 1, 2, 1]], NAMES, "mild")
    table = stats.format_metrics_with_intervals(result, {"accuracy": {"low": 0.5, "high": 1.0}, "remission_ppv": None})
    assert table.splitlines()[1:] == [f"{'accuracy':<32}0.75 (0.50-1.00)", f"{'PPV':<32}1.00 (n/a)"]


# ----------------------------------------------------------------------------- patients

# Five patients, by hand. Image grades (true -> argmax of the probabilities):
#   A: mild -> mild, moderate -> moderate, moderate -> severe    worst: moderate -> severe   mean: moderate
#   B: severe -> moderate, mild -> mild                          worst: severe -> moderate   mean: mild
#   C: mild -> mild, mild -> mild                                worst: mild -> mild         mean: mild
#   D: severe -> severe                                          worst: severe -> severe     mean: severe
#   E: moderate -> mild, moderate -> moderate                    worst: moderate -> moderate mean: moderate
PATIENT_IMAGES = [
    ("A", 0, [0.6, 0.3, 0.1]),
    ("A", 1, [0.2, 0.7, 0.1]),
    ("A", 1, [0.2, 0.35, 0.45]),
    ("B", 2, [0.2, 0.7, 0.1]),
    ("B", 0, [0.8, 0.1, 0.1]),
    ("C", 0, [0.9, 0.05, 0.05]),
    ("C", 0, [0.7, 0.2, 0.1]),
    ("D", 2, [0.1, 0.2, 0.7]),
    ("E", 1, [0.5, 0.4, 0.1]),
    ("E", 1, [0.3, 0.6, 0.1]),
]

PATIENT_TRUE = np.array([1, 2, 0, 2, 1])  # the worst true grade of A to E
PATIENT_MEANS = np.array(  # the mean probabilities of their images
    [
        [(0.6 + 0.2 + 0.2) / 3, (0.3 + 0.7 + 0.35) / 3, (0.1 + 0.1 + 0.45) / 3],
        [0.5, 0.4, 0.1],
        [0.8, 0.125, 0.075],
        [0.1, 0.2, 0.7],
        [0.4, 0.5, 0.1],
    ]
)


def patient_level(rule, remission_upto="moderate"):
    groups, targets, probs = zip(*PATIENT_IMAGES)
    order = [4, 0, 8, 2, 6, 9, 1, 3, 7, 5]  # the images of a patient need not be together
    return stats.patient_level(
        np.array(targets)[order], np.array(probs)[order], np.array(groups)[order], NAMES, rule, remission_upto
    )


def test_patient_grades_by_the_worst_image():
    result = patient_level("max")
    assert result["rule"] == "max"
    assert result["patients"] == [
        {"group": "A", "images": 3, "true": "moderate", "predicted": "severe"},
        {"group": "B", "images": 2, "true": "severe", "predicted": "moderate"},
        {"group": "C", "images": 2, "true": "mild", "predicted": "mild"},
        {"group": "D", "images": 1, "true": "severe", "predicted": "severe"},
        {"group": "E", "images": 2, "true": "moderate", "predicted": "moderate"},
    ]
    m = result["metrics"]
    assert m["num_patients"] == m["num_images"] == 5
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["mae_grades"] == pytest.approx(2 / 5)
    # QWK: observed weighted disagreement 1 + 1 = 2; expected (row and column totals 1, 2, 2) 28/5
    assert m["qwk"] == pytest.approx(1 - 2 / (28 / 5))
    # remission = mild or moderate; active = severe: TP D, FN B, FP A, TN C and E
    r = m["remission"]
    assert r["confusion"] == {"tp": 1, "fn": 1, "fp": 1, "tn": 2}
    assert (r["sensitivity"], r["specificity"], r["ppv"], r["npv"]) == pytest.approx((1 / 2, 2 / 3, 1 / 2, 2 / 3))
    # the worst predicted grade is a grade, not a probability: no AUC
    assert m["roc_auc_ovr_macro"] is None and r["auroc"] is None
    assert result["intervals"]["roc_auc_ovr_macro"]["low"] is None
    assert result["intervals"]["remission_auroc"]["low"] is None


def test_patient_grades_by_the_mean_probability():
    result = patient_level("mean-prob")
    assert [(p["group"], p["true"], p["predicted"]) for p in result["patients"]] == [
        ("A", "moderate", "moderate"),
        ("B", "severe", "mild"),
        ("C", "mild", "mild"),
        ("D", "severe", "severe"),
        ("E", "moderate", "moderate"),
    ]
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(4 / 5) and m["mae_grades"] == pytest.approx(2 / 5)
    auc = np.mean([skm.roc_auc_score(PATIENT_TRUE == c, PATIENT_MEANS[:, c]) for c in range(3)])
    assert m["roc_auc_ovr_macro"] == pytest.approx(auc)
    assert m["remission"]["auroc"] == pytest.approx(skm.roc_auc_score(PATIENT_TRUE == 2, PATIENT_MEANS[:, 2]))


@pytest.mark.parametrize("rule", stats.PATIENT_RULES)
def test_patient_intervals_resample_patients(rule):
    result = patient_level(rule)
    probs = np.eye(3)[[2, 1, 0, 2, 1]] if rule == "max" else PATIENT_MEANS  # one row per patient
    expected = stats.confidence_intervals(PATIENT_TRUE, probs, NAMES, "moderate")
    for name in ("accuracy", "qwk", "remission_sensitivity", "remission_npv"):
        assert result["intervals"][name] == expected[name], name


def test_an_unknown_patient_rule_is_a_bug():
    with pytest.raises(ValueError, match="rule must be one of"):
        stats.patient_grades([0], [[1.0, 0.0, 0.0]], ["A"], "min")
