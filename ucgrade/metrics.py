"""Metrics from all validation predictions, computed by scikit-learn.

The classes are ordered grades (class index = grade step), so grade-aware metrics are reported
next to the usual ones: quadratic weighted kappa and the mean absolute error in grade steps.
"""

import math

import numpy as np
from sklearn import metrics as skm

from .cli import UserError

# The scalar metrics, in the order tables show them, with a one-line meaning for clinicians.
SCALARS = {
    "accuracy": "share of images graded exactly right",
    "balanced_accuracy": (
        "mean of the per-grade recalls, so that a large grade cannot inflate it (always guessing one grade "
        "scores 1/number of grades)"
    ),
    "macro_f1": (
        "F1 (the balance of precision and recall) averaged over grades with equal weight, so rare grades count "
        "as much as common ones"
    ),
    "qwk": (
        "quadratic weighted kappa: agreement with the reference grade beyond chance, where a miss by two "
        "grades costs four times a miss by one (1 = perfect, 0 = chance)"
    ),
    "mae_grades": "mean absolute error in grade steps (0 = always right, 0.3 = off by 0.3 grades on average)",
    "roc_auc_ovr_macro": (
        "how well the probabilities rank each grade above the others, averaged over grades (0.5 = chance, 1 = perfect)"
    ),
}
REMISSION_SCALARS = {
    "sensitivity": "share of active-disease images called active",
    "specificity": "share of remission images called remission",
    "ppv": "share of images called active that are active",
    "npv": "share of images called remission that are in remission",
    "auroc": (
        "how well the summed probability of the active grades separates active from remission images (0.5 = "
        "chance, 1 = perfect)"
    ),
}

# How reports name the metrics; metrics.json and the terminal use the keys.
LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "qwk": "QWK",
    "mae_grades": "MAE (grade steps)",
    "roc_auc_ovr_macro": "ROC AUC (one-vs-rest, macro)",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "auroc": "AUROC",
}


def _number(value):
    """A float for JSON, or None where the metric is undefined (NaN)."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def compute_metrics(targets, probs, class_names, remission_upto=None):
    """All metrics for true class indices `targets` and class probabilities `probs` (N x C)."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    preds = probs.argmax(1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    result = {
        "num_images": int(len(targets)),
        "class_names": list(class_names),
        "accuracy": _number(skm.accuracy_score(targets, preds)),
        "balanced_accuracy": _number(_balanced_accuracy(targets, preds)),
        "macro_f1": _number(skm.f1_score(targets, preds, labels=labels, average="macro", zero_division=0)),
        "qwk": _number(_qwk(targets, preds, labels)),
        "mae_grades": _number(skm.mean_absolute_error(targets, preds)),
        "roc_auc_ovr_macro": _number(_auc_ovr(targets, probs, labels)),
        "per_class": {
            name: {"precision": _number(p), "recall": _number(r), "f1": _number(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": skm.confusion_matrix(targets, preds, labels=labels).tolist(),
    }
    if remission_upto is not None:
        result["remission"] = remission_metrics(targets, probs, class_names, remission_upto)
    if len(targets):
        result["baseline"] = majority_baseline(targets, class_names)
    return result


BASELINE_METRICS = ("accuracy", "balanced_accuracy", "qwk")
RANDOM_WEIGHTS = (
    "the model started from random weights, not from ImageNet's, which is the main reason a model trained on a few "
    "hundred images grades poorly; to give the weights offline, pass --weights FILE to qq.py or copy the file into "
    "the torch hub cache (README: Pretrained weights and machines without internet)"
)


def majority_baseline(targets, class_names):
    """What always answering the most frequent grade of these images scores, for the figures that a large grade can
    flatter: its share as accuracy, 1 / the grades present as balanced accuracy, and QWK 0 (no agreement beyond
    chance, by definition)."""
    counts = np.bincount(np.asarray(targets), minlength=len(class_names))
    grade = int(counts.argmax())
    return {
        "grade": class_names[grade],
        "accuracy": float(counts[grade] / counts.sum()),
        "balanced_accuracy": float(1 / np.count_nonzero(counts)),
        "qwk": 0.0,
    }


def not_beaten(result):
    """The BASELINE_METRICS on which the model does no better than the majority-grade baseline."""
    baseline = result.get("baseline") or {}
    return [name for name in BASELINE_METRICS if name in baseline and (result[name] or 0.0) <= baseline[name] + 1e-9]


def warnings(result):
    """What a reader must know before the figures: a model no better than always answering one grade, and a model
    trained from random weights (result["pretrained_used"] False)."""
    found = []
    if missed := not_beaten(result):
        baseline = result["baseline"]
        figures = ", ".join(f"{LABELS[n]} {fmt(result[n], 3)} against {fmt(baseline[n], 3)}" for n in missed)
        found.append(
            f"the model does not beat always answering the largest grade, {baseline['grade']} ({figures}); "
            "its grades carry no more information than that guess"
        )
    if result.get("pretrained_used") is False:
        found.append(RANDOM_WEIGHTS)
    return found


def _balanced_accuracy(targets, preds):
    # the mean recall over the grades present in the data, without sklearn's warning for absent ones
    recalls = skm.recall_score(targets, preds, labels=sorted(set(targets.tolist())), average=None, zero_division=0)
    return float(np.mean(recalls)) if len(recalls) else float("nan")


def _qwk(targets, preds, labels):
    if len(set(targets.tolist()) | set(preds.tolist())) < 2:
        return float("nan")  # kappa is undefined when a single grade appears at all
    return skm.cohen_kappa_score(targets, preds, labels=labels, weights="quadratic")


def _auc_ovr(targets, probs, labels):
    present = sorted(set(targets.tolist()))
    if len(present) < 2:
        return float("nan")
    if len(present) < len(labels):
        # one-vs-rest AUC over the grades that occur; the others have no positives to rank
        return float(np.mean([skm.roc_auc_score(targets == c, probs[:, c]) for c in present]))
    if len(labels) == 2:
        return skm.roc_auc_score(targets, probs[:, 1])
    return skm.roc_auc_score(targets, probs, multi_class="ovr", average="macro", labels=labels)


def check_remission_grade(remission_upto, class_names):
    if remission_upto is None:
        return
    if remission_upto not in class_names:
        raise UserError(
            f"--remission-upto {remission_upto!r} is not one of the grades ({', '.join(class_names)}); name the last "
            "grade that counts as remission."
        )
    if remission_upto == class_names[-1]:
        raise UserError(
            f"--remission-upto {remission_upto!r} is the most severe grade, which leaves no active grades; name a "
            "milder grade."
        )


def remission_metrics(targets, probs, class_names, remission_upto):
    """Remission (grades up to and including remission_upto) versus active disease (the grades above).

    An image is called active when its predicted grade is above remission_upto; the AUROC ranks
    images by the summed probability of the active grades.
    """
    cut = class_names.index(remission_upto)
    active = np.asarray(targets) > cut
    called_active = probs.argmax(1) > cut
    score = probs[:, cut + 1 :].sum(1)
    tn, fp, fn, tp = skm.confusion_matrix(active, called_active, labels=[False, True]).ravel()
    return {
        "remission_classes": class_names[: cut + 1],
        "active_classes": class_names[cut + 1 :],
        "sensitivity": _number(skm.recall_score(active, called_active, pos_label=True, zero_division=np.nan)),
        "specificity": _number(skm.recall_score(active, called_active, pos_label=False, zero_division=np.nan)),
        "ppv": _number(skm.precision_score(active, called_active, pos_label=True, zero_division=np.nan)),
        "npv": _number(skm.precision_score(active, called_active, pos_label=False, zero_division=np.nan)),
        "auroc": _number(skm.roc_auc_score(active, score)) if 0 < active.sum() < len(active) else None,
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def fmt(value, digits=3, missing="n/a"):
    """A value for a table: a float with fixed decimals, `missing` for an undefined metric."""
    if value is None:
        return missing
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_metrics(metrics):
    """The metrics as a plain-text table for the terminal, with the majority-grade baseline beside the figures it
    can flatter."""
    baseline = metrics.get("baseline") or {}
    lines = [f"{'metric':<20}{'value':>8}{'baseline':>10}" + (f"  (always {baseline['grade']})" if baseline else "")]
    lines += [
        f"{name:<20}{fmt(metrics[name]):>8}{fmt(baseline.get(name), missing=''):>10}".rstrip() for name in SCALARS
    ]
    lines.append("")
    lines.append(f"{'class':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<20}{fmt(row['precision']):>10}{fmt(row['recall']):>10}{fmt(row['f1']):>10}{row['support']:>10}"
        )
    remission = metrics.get("remission")
    if remission:
        lines.append("")
        lines.append(
            f"remission ({', '.join(remission['remission_classes'])}) vs active "
            f"({', '.join(remission['active_classes'])}):"
        )
        lines += [f"  {name:<18}{fmt(remission[name]):>8}" for name in REMISSION_SCALARS]
    return "\n".join(lines)


def summarize_folds(fold_metrics):
    """Mean and standard deviation over folds of every scalar metric (remission ones included)."""
    summary = {}
    for name in SCALARS:
        summary[name] = _mean_std([m[name] for m in fold_metrics])
    if all("remission" in m for m in fold_metrics) and fold_metrics:
        for name in REMISSION_SCALARS:
            summary[f"remission_{name}"] = _mean_std([m["remission"][name] for m in fold_metrics])
    return summary


def fold_table(summary, fold_metrics, pooled):
    """Rows of cv_summary.csv: per metric its mean and std over the folds (summary, from
    summarize_folds), each fold's value and the pooled one."""

    def value(result, name):
        return result["remission"][name.removeprefix("remission_")] if name.startswith("remission_") else result[name]

    return [
        {
            "metric": name,
            "mean": fmt(s["mean"], 4, ""),
            "std": fmt(s["std"], 4, ""),
            **{f"fold{k}": fmt(value(m, name), 4, "") for k, m in enumerate(fold_metrics, 1)},
            "pooled": fmt(value(pooled, name), 4, ""),
        }
        for name, s in summary.items()
    ]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def timing_note(timing):
    """A warning when batch-1 times spread widely: then something else was using the device."""
    if timing["batch1_p95_ms"] <= 2 * timing["batch1_median_ms"]:
        return ""
    return (
        "the times varied widely (p95 over twice the median), so another program was probably using the device; "
        "quote the median"
    )
