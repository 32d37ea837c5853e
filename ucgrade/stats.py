"""Figures a clinician can cite: 95% confidence intervals, and grades per patient.

The proportions (accuracy, sensitivity, specificity, PPV, NPV and each grade's recall) get exact
Clopper-Pearson intervals: a percentile bootstrap collapses to "1.00-1.00" for 24 of 24 right, where
the exact interval is 0.86-1.00. With groups (patients), the images of one patient are not
independent evidence, so the interval is Clopper-Pearson on the effective number of images, n
divided by the design effect (Korn and Graubard, 1998): the design effect is the cluster-robust
variance of the proportion over its binomial variance, at least 1; at 0% or 100%, where the data
cannot measure it, it is that of patients whose images all agree (the sum of squared patient sizes
over n), so that each patient counts about once.

The other metrics (balanced accuracy, macro F1, QWK, MAE, the AUCs) get percentile bootstrap
intervals. The predictions are resampled with replacement 2,000 times (seeded), every metric is
computed on each resample, and the interval runs from the 2.5th to the 97.5th percentile of those
values. With groups, whole patients are resampled instead of images (a cluster bootstrap). When
every resample gives the same value (a model right on every image), the bootstrap has nothing to
say: the interval is marked "degenerate" and given as none, never as a zero-width interval (so too when
the 2.5th and 97.5th percentiles merely coincide).

The metrics are those of metrics.compute_metrics, defined as there (by scikit-learn). Calling
scikit-learn 2,000 times per metric is slow, so here every metric comes from one confusion matrix per
resample, with each image counted as often as the resample drew it, and the AUCs from one sort of the
scores; the tests check that both give the same numbers on the same resamples.

A metric defined on all the predictions can be undefined on a resample: QWK when it holds a single
grade, an AUC when it has no positive or no negative, PPV when it calls nothing active. Such
resamples are left out of that metric's interval; "resamples" says how many were used, and when
fewer than half were, no interval is given (low and high are None), because the rest would describe
an unusual subset of the resamples. A metric undefined on all the predictions is undefined on every
resample too, so its interval is None as well.
"""

import numpy as np
from scipy.stats import beta

from . import metrics

N_RESAMPLES = 2000
# The metrics that get intervals, as keyed in compute_metrics; the remission ones are prefixed, as in cv_summary.
INTERVAL_METRICS = [*metrics.SCALARS, *(f"remission_{name}" for name in metrics.REMISSION_SCALARS)]
AUC_METRICS = ("roc_auc_ovr_macro", "remission_auroc")
PATIENT_RULES = ("max", "mean-prob")
# The proportions, whose intervals are exact; each grade's recall is one too (recall_intervals).
PROPORTIONS = ("accuracy", "remission_sensitivity", "remission_specificity", "remission_ppv", "remission_npv")
EXACT = "Clopper-Pearson"
CLUSTERED = "Clopper-Pearson on the effective number of images (design effect of patients, Korn-Graubard)"
BOOTSTRAP = "percentile bootstrap"
DEGENERATE = "no interval: the resamples did not vary"
_BLOCK_CELLS = 1_000_000  # resamples x images per block of resamples: 8 MB of weights, a few times that in all


def confidence_intervals(
    targets, probs, class_names, remission_upto=None, groups=None, seed=0, n_resamples=N_RESAMPLES
):
    """95% intervals of every metric of compute_metrics: exact for the PROPORTIONS (see exact_interval), the
    percentile bootstrap for the others (see bootstrap_intervals). Each interval names its "method"; a bootstrap
    whose resamples all gave one value has no interval ("degenerate": True, low and high None)."""
    intervals = bootstrap_intervals(targets, probs, class_names, remission_upto, groups, seed, n_resamples)
    for name, interval in intervals.items():
        interval["method"] = BOOTSTRAP
        if interval["low"] is not None and interval["low"] == interval["high"]:
            interval |= {"low": None, "high": None, "degenerate": True}
    hits = proportion_hits(targets, np.asarray(probs).argmax(1), class_names, remission_upto)
    for name, (counted, hit) in hits.items():
        intervals[name] = exact_interval(hit[counted], None if groups is None else np.asarray(groups)[counted])
    return intervals


def bootstrap_intervals(targets, probs, class_names, remission_upto=None, groups=None, seed=0, n_resamples=N_RESAMPLES):
    """95% percentile-bootstrap intervals of every metric of compute_metrics.

    targets are the true class indices and probs the class probabilities (N x C). With groups (one
    id per image), whole groups are resampled. Returns {metric: {"low", "high", "resamples"}} for the
    keys of INTERVAL_METRICS (the remission ones only with remission_upto); see the module docstring
    for undefined values. The same seed gives the same intervals.
    """
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // len(targets))
    blocks = []
    for start in range(0, n_resamples, block):
        weights = resample_weights(rng, len(targets), groups, min(block, n_resamples - start))
        blocks.append(resample_metrics(targets, probs, class_names, weights, remission_upto))
    return {name: _interval(np.concatenate([b[name] for b in blocks]), n_resamples) for name in blocks[0]}


def paired_intervals(targets, probs, reference, class_names, groups=None, seed=0, n_resamples=N_RESAMPLES):
    """95% intervals of every metric of probs, and of its difference to reference's (probs minus reference), both
    graded on the same images: each resample draws the same images (or groups) for the two, so that the images'
    own difficulty cancels out of the difference (a paired bootstrap). Returns ({metric: interval}, {metric:
    interval of the difference}), as confidence_intervals gives them."""
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_CELLS // len(targets))
    own, differences = [], []
    for start in range(0, n_resamples, block):
        weights = resample_weights(rng, len(targets), groups, min(block, n_resamples - start))
        base = resample_metrics(targets, reference, class_names, weights)
        other = resample_metrics(targets, probs, class_names, weights)
        own.append(other)
        differences.append({name: other[name] - base[name] for name in other})
    return tuple(
        {name: _interval(np.concatenate([b[name] for b in blocks]), n_resamples) for name in blocks[0]}
        for blocks in (own, differences)
    )


def resample_weights(rng, n_images, groups=None, n_resamples=N_RESAMPLES):
    """How often each image is drawn in each resample (n_resamples x n_images): n_images draws of
    single images, or, with groups, as many draws of whole groups as there are groups. Calls that
    share rng continue one stream: two calls of 1,000 resamples draw what one call of 2,000 draws."""
    if groups is None:
        return _draw_counts(rng, n_images, n_resamples)
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return _draw_counts(rng, codes.max() + 1, n_resamples)[:, codes]


def _draw_counts(rng, n, n_resamples):
    draws = rng.integers(0, n, size=(n_resamples, n)) + n * np.arange(n_resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def resample_metrics(targets, probs, class_names, weights, remission_upto=None):
    """Every metric of compute_metrics on each resample, given as weights (resamples x images, how often
    each image is drawn): {metric: array of one value per resample, NaN where undefined}."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    preds = probs.argmax(1)
    cells = np.eye(num_classes * num_classes)[targets * num_classes + preds]  # images x (true, predicted)
    confusion = (weights @ cells).reshape(-1, num_classes, num_classes)  # whole counts, so exact
    total = confusion.sum((1, 2))
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    true, called = confusion.sum(2), confusion.sum(1)
    grades = np.arange(num_classes)
    distance = np.abs(grades[:, None] - grades[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = hits / true  # NaN for a grade the resample lacks: balanced accuracy averages the others
        f1 = np.where(true + called > 0, 2 * hits / (true + called), 0.0)  # 0 for a grade never seen nor called
        expected = true[:, :, None] * called[:, None, :] / total[:, None, None]
        # 0/0 = NaN exactly when a single grade appears at all, where kappa is undefined
        qwk = 1 - (confusion * distance**2).sum((1, 2)) / (expected * distance**2).sum((1, 2))
    result = {
        "accuracy": hits.sum(1) / total,
        "balanced_accuracy": np.nanmean(recall, axis=1),
        "macro_f1": f1.mean(1),
        "qwk": qwk,
        "mae_grades": (confusion * distance).sum((1, 2)) / total,
        "roc_auc_ovr_macro": _auc_ovr(targets, probs, weights),
    }
    if remission_upto is not None:
        result.update(_remission(confusion, targets, probs, weights, class_names.index(remission_upto)))
    return result


def _auc_ovr(targets, probs, weights):
    """compute_metrics' one-vs-rest macro AUC: the mean over the grades present of each grade's AUC
    (with two grades, that of the second), undefined with fewer than two grades present."""
    if probs.shape[1] == 2:
        return _weighted_auc(probs[:, 1], targets == 1, weights)
    per_grade = np.stack([_weighted_auc(probs[:, c], targets == c, weights) for c in range(probs.shape[1])])
    # a grade has an AUC when it is present and another one is too: then every present grade has one
    defined = (~np.isnan(per_grade)).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(defined > 0, np.nansum(per_grade, axis=0) / defined, np.nan)


def _weighted_auc(scores, positive, weights):
    """ROC AUC per resample, as the Mann-Whitney statistic that scikit-learn's trapezoids equal: the
    share of (positive, negative) pairs ranked right, ties counting half; NaN without both kinds."""
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first image of each distinct score
    drawn = weights[:, order]
    pos = np.add.reduceat(drawn * positive[order], starts, axis=1)
    neg = np.add.reduceat(drawn * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored lower than each distinct score
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _remission(confusion, targets, probs, weights, cut):
    """remission_metrics per resample: grades up to cut are remission, an image is called active when
    its predicted grade is above cut, and the AUROC ranks the summed probability of the active grades."""
    tp = confusion[:, cut + 1 :, cut + 1 :].sum((1, 2))
    fn = confusion[:, cut + 1 :, : cut + 1].sum((1, 2))
    fp = confusion[:, : cut + 1, cut + 1 :].sum((1, 2))
    tn = confusion[:, : cut + 1, : cut + 1].sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "remission_sensitivity": tp / (tp + fn),
            "remission_specificity": tn / (tn + fp),
            "remission_ppv": tp / (tp + fp),
            "remission_npv": tn / (tn + fn),
            "remission_auroc": _weighted_auc(probs[:, cut + 1 :].sum(1), targets > cut, weights),
        }


def proportion_hits(targets, preds, class_names, remission_upto=None):
    """{name: (which images the proportion counts, whether each image is a hit)} for the PROPORTIONS."""
    targets, preds = np.asarray(targets), np.asarray(preds)
    result = {"accuracy": (np.ones(len(targets), bool), preds == targets)}
    if remission_upto is not None:
        cut = class_names.index(remission_upto)
        active, called = targets > cut, preds > cut
        result |= {
            "remission_sensitivity": (active, called),
            "remission_specificity": (~active, ~called),
            "remission_ppv": (called, active),
            "remission_npv": (~called, ~active),
        }
    return result


def recall_intervals(targets, probs, class_names, groups=None):
    """{grade: exact 95% interval of its recall}, the share of its images graded as it."""
    targets, preds = np.asarray(targets), np.asarray(probs).argmax(1)
    groups = None if groups is None else np.asarray(groups)
    return {
        name: exact_interval(preds[targets == c] == c, None if groups is None else groups[targets == c])
        for c, name in enumerate(class_names)
    }


def exact_interval(hits, groups=None, confidence=0.95):
    """The Clopper-Pearson interval of the share of hits (a bool per image); with groups (one per image), on the
    effective number of images n / design_effect (see the module docstring). low and high are None without images."""
    hits = np.asarray(hits, dtype=bool)
    n, k = len(hits), int(hits.sum())
    interval = {"low": None, "high": None, "method": EXACT if groups is None else CLUSTERED, "hits": k, "n": n}
    if n == 0:
        return interval
    n_eff = n
    if groups is not None:
        effect = design_effect(hits, groups)
        n_eff = n / effect
        interval |= {"design_effect": round(effect, 3), "effective_n": round(n_eff, 1)}
    x = k / n * n_eff  # Korn-Graubard: the same share of the effective number
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, x, n_eff - x + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, x + 1, n_eff - x))
    return interval | {"low": low, "high": high}


def design_effect(hits, groups):
    """The cluster-robust (ratio estimator) variance of the share of hits over its binomial variance, at least 1;
    where the share is 0 or 1 (no variance to measure), that of patients whose images all agree: sum(m^2) / n."""
    hits = np.asarray(hits, dtype=np.float64)
    n, share = len(hits), hits.mean()
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sizes, totals = np.bincount(codes), np.bincount(codes, weights=hits)
    if share in (0.0, 1.0) or len(sizes) < 2:
        return max(1.0, float((sizes**2).sum() / n))
    clustered = len(sizes) / (len(sizes) - 1) * ((totals - share * sizes) ** 2).sum() / n**2
    return max(1.0, float(clustered / (share * (1 - share) / n)))


def _interval(values, n_resamples):
    defined = values[~np.isnan(values)]
    if len(defined) < n_resamples / 2:
        return {"low": None, "high": None, "resamples": int(len(defined))}
    low, high = np.percentile(defined, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "resamples": int(len(defined))}


def format_ci(value, interval, digits=2):
    """A metric with its interval, as papers print it: '0.81 (0.76-0.86)'; with a negative bound
    (QWK can be), '-0.10 (-0.32 to 0.14)'; 'n/a' for an undefined metric, '0.81 (n/a)' without an interval,
    '1.00 (no interval: the resamples did not vary)' for a degenerate bootstrap."""
    if value is None:
        return "n/a"
    if interval is not None and interval.get("degenerate"):
        return f"{value:.{digits}f} ({DEGENERATE})"
    if interval is None or interval["low"] is None:
        return f"{value:.{digits}f} (n/a)"
    low, high = interval["low"], interval["high"]
    separator = " to " if low < 0 or high < 0 else "-"
    return f"{value:.{digits}f} ({low:.{digits}f}{separator}{high:.{digits}f})"


def interval_text(interval):
    """An interval alone, as a table cell shows it: '0.76-0.86' ('-0.32 to 0.14'), 'none' for a bootstrap whose
    resamples did not vary, 'n/a' without an interval."""
    if interval and interval.get("degenerate"):
        return "none"
    if not interval or interval["low"] is None:
        return "n/a"
    return format_ci(0.0, interval).split("(", 1)[1].rstrip(")")


def metric_value(result, name):
    """The value of an INTERVAL_METRICS key in a compute_metrics result (remission_x: its remission block's x)."""
    if name.startswith("remission_"):
        return result.get("remission", {}).get(name.removeprefix("remission_"))
    return result[name]


def method_note(unit="image", clustered=None):
    """How the intervals were made, in one sentence for the terminal and under each table. unit: what the bootstrap
    resamples; clustered: the exact intervals count images of one patient as less evidence (default: with patients)."""
    clustered = unit == "patient" if clustered is None else clustered
    exact = f"{EXACT} on the effective number of images, as images of one patient are alike" if clustered else EXACT
    return (
        f"95% CI: accuracy, sensitivity, specificity, PPV, NPV and per-grade recall: exact ({exact}); the other "
        f"metrics: {BOOTSTRAP} of {N_RESAMPLES} resamples of {unit}s."
    )


def format_metrics_with_intervals(result, intervals):
    """The scalar metrics of a compute_metrics result with their 95% intervals, for the terminal."""
    lines = [f"{'metric':<32}{'value (95% CI)'}"]
    for name, interval in intervals.items():
        lines.append(
            f"{metrics.LABELS[name.removeprefix('remission_')]:<32}{format_ci(metric_value(result, name), interval)}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- patients


def patient_grades(targets, probs, groups, rule="max"):
    """Grades per patient (group) from grades per image.

    A patient's true grade is the worst (highest) grade among their images, as the Mayo score is.
    With rule "max", the predicted grade is the worst predicted grade of their images, and the
    patient's probabilities are one-hot at that grade: a grade, not a probability. With "mean-prob",
    the probabilities are the mean of their images' probabilities, and the grade is their argmax.
    Returns (group ids in sorted order, images per patient, true grades, probabilities P x C), so that
    compute_metrics(true, probabilities, ...) scores the patients with the rule's predicted grades.
    """
    if rule not in PATIENT_RULES:
        raise ValueError(f"rule must be one of {PATIENT_RULES}, not {rule!r}")
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    ids, codes, images = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
    true = np.full(len(ids), -1)
    np.maximum.at(true, codes, targets)
    if rule == "max":
        worst = np.full(len(ids), -1)
        np.maximum.at(worst, codes, probs.argmax(1))
        patient_probs = np.eye(probs.shape[1])[worst]
    else:
        patient_probs = np.zeros((len(ids), probs.shape[1]))
        np.add.at(patient_probs, codes, probs)
        patient_probs /= images[:, None]
    return ids.tolist(), images, true, patient_probs


def patient_level(
    targets, probs, groups, class_names, rule="max", remission_upto=None, seed=0, n_resamples=N_RESAMPLES
):
    """The patient-level section of a report: grades per patient (see patient_grades), their metrics and
    95% intervals over patients (as confidence_intervals: patients are independent).

    Returns {"rule", "patients": [{"group", "images", "true", "predicted"}] (the rows of patients.csv),
    "metrics": compute_metrics of the patients (its num_images counts patients; num_patients too),
    "intervals": as confidence_intervals}. With rule "max", the AUCs are None: a patient's worst
    predicted grade is a grade, with no probability to rank patients by (an AUC of one-hot grades would
    only restate sensitivity and specificity); "mean-prob" has them.
    """
    ids, images, true, patient_probs = patient_grades(targets, probs, groups, rule)
    predicted = patient_probs.argmax(1)
    result = metrics.compute_metrics(true, patient_probs, class_names, remission_upto)
    result["num_patients"] = len(ids)
    intervals = confidence_intervals(
        true, patient_probs, class_names, remission_upto, seed=seed, n_resamples=n_resamples
    )
    if rule == "max":
        result["roc_auc_ovr_macro"] = None
        if "remission" in result:
            result["remission"]["auroc"] = None
        for name in AUC_METRICS:
            if name in intervals:
                intervals[name] = {"low": None, "high": None, "resamples": 0, "method": BOOTSTRAP}
    rows = [
        {"group": g, "images": int(n), "true": class_names[t], "predicted": class_names[p]}
        for g, n, t, p in zip(ids, images, true, predicted)
    ]
    return {"rule": rule, "patients": rows, "metrics": result, "intervals": intervals}
