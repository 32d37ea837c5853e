"""Evidence a clinician can cite, added to every evaluation (validation, pooled folds, test set).

add_evidence() puts 95% intervals of every metric into metrics.json ("intervals", and "recall_intervals" of
each grade; how they were made under "interval_method"), and
with groups (patients) the patient-level section ("patient_level", patients.csv and its confusion
matrix). The intervals come from ucgrade.stats; this module only wires them into the outputs, so
that a validation split, a cross-validation run and a test set report them alike.
"""

from pathlib import Path

from . import figures, files, sections, stats

BOOTSTRAP_SEED = 0  # the same intervals for the same predictions, whatever the run's --seed
PATIENT_FIELDS = ["group", "images", "true", "predicted"]
PATIENT_CONFUSION = "patients_confusion_matrix.png"


def add_evidence(result, targets, probs, out_dir, groups=None, patient_grade="max", remission_upto=None):
    """Add the 95% intervals (over patients with groups, else over images) and, with groups, the
    patient-level metrics to result (a compute_metrics dict); write patients.csv and its confusion
    matrix into out_dir. Returns result."""
    class_names = result["class_names"]
    result["intervals"] = stats.confidence_intervals(
        targets, probs, class_names, remission_upto, groups=groups, seed=BOOTSTRAP_SEED
    )
    result["recall_intervals"] = stats.recall_intervals(targets, probs, class_names, groups)
    unit = "patient" if groups is not None else "image"
    result["bootstrap"] = {
        "resamples": stats.N_RESAMPLES,
        "seed": BOOTSTRAP_SEED,
        "unit": unit,
        "method": "percentile, 95%",
    }
    result["interval_method"] = stats.method_note(unit)
    if groups is None:
        return result
    level = stats.patient_level(targets, probs, groups, class_names, patient_grade, remission_upto, seed=BOOTSTRAP_SEED)
    files.write_csv(Path(out_dir) / "patients.csv", level["patients"], PATIENT_FIELDS)
    figures.plot_confusion(
        level["metrics"]["confusion_matrix"],
        class_names,
        Path(out_dir) / PATIENT_CONFUSION,
        title="Patient-level confusion matrix\n(counts)",
    )
    result["patient_level"] = {"rule": patient_grade, "metrics": level["metrics"], "intervals": level["intervals"]}
    return result


def groups_of(groups, indices):
    """The groups of the images at indices, or None without groups."""
    return None if groups is None else [groups[i] for i in indices]


def format_evidence(result):
    """The terminal table of the metrics with their 95% intervals, and the patient-level one with groups."""
    unit = result.get("bootstrap", {}).get("unit", "image")
    lines = [
        "\n95% confidence intervals:",
        stats.format_metrics_with_intervals(result, result["intervals"]),
        *(
            f"{'recall of ' + name:<32}{stats.format_ci(result['per_class'][name]['recall'], interval)}"
            for name, interval in result.get("recall_intervals", {}).items()
        ),
        stats.method_note(unit),
    ]
    level = result.get("patient_level")
    if level:
        patients = level["metrics"]
        lines += [
            f"\npatient level ({patients['num_patients']} patients; a patient's grade is "
            f"{sections.patient_rule_text(level['rule'])}):",
            stats.format_metrics_with_intervals(patients, level["intervals"]),
            stats.method_note("patient", clustered=False),
        ]
    return "\n".join(lines)


def pooled_flagged(results):
    """The out-of-distribution flags of the folds' validation images, pooled; None if a fold has none."""
    flags = [r.get("out_of_distribution") for r in results]
    if not flags or None in flags:
        return None
    flagged, images = sum(f["flagged"] for f in flags), sum(f["images"] for f in flags)
    return {"flagged": flagged, "images": images, "rate": flagged / max(images, 1)}
