"""The sections of a report page, each written once, and the parts of its summary card.

A section is a function of the page that returns its HTML, or None where its data does not exist in that
folder or its metrics (a test set has no training curves, a single run no fold table), so it appears on
every page that has its data. SECTIONS is their order on every page; a page may name a section its own way
(pages.KINDS). SUMMARY lists the parts of the summary card the same way.
"""

import html
from pathlib import Path

from . import files, stats
from .htmlparts import embed_png, pair, table, tiles
from .metrics import LABELS, REMISSION_SCALARS, SCALARS, fmt, timing_note


def grades_html(class_names):
    return f"<p>Grades in order: <b>{html.escape(' < '.join(class_names))}</b>.</p>"


HEADLINE = ["accuracy", "balanced_accuracy", "qwk", "macro_f1"]


def headline(metrics, spread=None):
    """(label, value, details) of the figures a clinician looks at first.

    spread: metric key -> 'mean ± std' over the folds of a cross-validation run.
    """
    spread = spread or {}

    baseline = metrics.get("baseline") or {}

    def details(key):
        always = key in baseline and f"always {baseline['grade']}: {fmt(baseline[key])}"
        return [text for text in (spread.get(key) and f"folds: {spread[key]}", interval_text(metrics, key), always)
                if text]  # fmt: skip

    items = [(LABELS[name], fmt(metrics.get(name)), details(name)) for name in HEADLINE]
    remission = metrics.get("remission")
    if remission:
        last = remission["remission_classes"][-1]
        items += [
            (
                "sensitivity",
                fmt(remission["sensitivity"]),
                [f"active: above {last}", *details("remission_sensitivity")],
            ),
            (
                "specificity",
                fmt(remission["specificity"]),
                [f"remission: up to {last}", *details("remission_specificity")],
            ),
        ]
    return items


def interval_text(metrics, name):
    """'95% CI 0.76-0.86' for a key of stats.INTERVAL_METRICS, or '' when metrics has no interval for it."""
    text = ci_text(metrics, name)
    return {"n/a": "", "none": "95% CI: none, the resamples did not vary"}.get(text, "95% CI " + text)


def ci_text(metrics, name):
    """The 95% interval of a metric as a table shows it (stats.interval_text): '0.76-0.86', 'none' or 'n/a'."""
    return stats.interval_text((metrics.get("intervals") or {}).get(name))


def method_note(metrics, clustered=None):
    """How the table's intervals were made, under it (see stats.method_note)."""
    unit = (metrics.get("bootstrap") or {}).get("unit", "image")
    return (
        f'<p class="note">{html.escape(stats.method_note(unit, clustered))} The bootstrap is seeded'
        f"{', whole patients at a time' if unit == 'patient' else ''}; n/a where a metric is undefined on too many "
        "resamples, none where the resamples did not vary.</p>"
    )


def _key(name):
    return name.removeprefix("remission_")


def _label(name):
    return "remission " + LABELS[_key(name)] if name.startswith("remission_") else LABELS[name]


def metric_rows(metrics, names, meanings, baseline=False):
    """Rows of a metrics table: label, value, its 95% CI when metrics has intervals, with baseline the majority-grade
    baseline's value where it has one, and the meaning."""
    with_ci = "intervals" in metrics
    always = metrics.get("baseline") or {}
    return [
        [LABELS[_key(name)], fmt(stats.metric_value(metrics, name))]
        + ([ci_text(metrics, name)] if with_ci else [])
        + ([fmt(always.get(name), missing="")] if baseline else [])
        + [meanings[_key(name)]]
        for name in names
    ]


def metrics_html(metrics):
    header = ["metric", "value"] + (["95% CI"] if "intervals" in metrics else []) + ["meaning"]
    always = metrics.get("baseline")
    with_baseline = [*header[:-1], f"always {always['grade']}", "meaning"] if always else header
    parts = [table(with_baseline, metric_rows(metrics, SCALARS, SCALARS, baseline=bool(always)))]
    if "intervals" in metrics:
        parts.append(method_note(metrics))
    recall_ci = metrics.get("recall_intervals") or {}
    per_class = [
        [name, fmt(r["precision"]), fmt(r["recall"])]
        + ([stats.interval_text(recall_ci.get(name))] if recall_ci else [])
        + [fmt(r["f1"]), r["support"]]
        for name, r in metrics["per_class"].items()
    ]
    recall_header = ["recall", "95% CI"] if recall_ci else ["recall"]
    parts.append(table(["grade", "precision", *recall_header, "F1", "support"], per_class))
    remission = metrics.get("remission")
    if remission:
        parts.append(
            f"<h3>Remission ({html.escape(', '.join(remission['remission_classes']))}) "
            f"vs active disease ({html.escape(', '.join(remission['active_classes']))})</h3>"
        )
        names = [f"remission_{name}" for name in REMISSION_SCALARS]
        parts.append(table(header, metric_rows(metrics, names, REMISSION_SCALARS)))
        if "intervals" in metrics:
            parts.append(method_note(metrics))
        c = remission["confusion"]
        parts.append(
            '<p class="note">An image is called active when its predicted grade is above '
            f"{html.escape(remission['remission_classes'][-1])}. "
            f"Active images: {c['tp']} called active, {c['fn']} called remission; "
            f"remission images: {c['tn']} called remission, {c['fp']} called active.</p>"
        )
    return "\n".join(parts)


def patient_rule_text(rule):
    """How a patient's grades are made from their images' grades."""
    if rule == "max":
        return "the worst grade among their images, true and predicted (the Mayo convention)"
    return "the worst true grade among their images; predicted: the grade of their images' mean probabilities"


def patients_html(run_dir, metrics):
    """The patient-level section: how grades are made, the confusion matrix and the metrics with their CIs."""
    level = metrics["patient_level"]
    patients = level["metrics"] | {"intervals": level["intervals"], "bootstrap": {"unit": "patient"}}
    names = ["accuracy", "qwk", "balanced_accuracy", "macro_f1", "mae_grades"]
    if level["rule"] == "mean-prob":
        names.append("roc_auc_ovr_macro")
    if "remission" in patients:
        names += [f"remission_{name}" for name in REMISSION_SCALARS if name != "auroc" or level["rule"] != "max"]
    meanings = SCALARS | REMISSION_SCALARS
    rows = [
        [_label(name), fmt(stats.metric_value(patients, name)), ci_text(patients, name), meanings[_key(name)]]
        for name in names
    ]
    png = Path(run_dir) / "patients_confusion_matrix.png"
    return (
        f"<p>{patients['num_patients']} patients ({metrics['num_images']} images). A patient's grade is "
        f"{html.escape(patient_rule_text(level['rule']))} (--patient-grade {html.escape(level['rule'])}); "
        "one row per patient in patients.csv.</p>"
        + (embed_png(png, "patient-level confusion matrix") if png.exists() else "")
        + table(["metric", "value", "95% CI", "meaning"], rows)
        + method_note(patients, clustered=False)
        + '<p class="note">Patient-level intervals are wider than image-level ones: there are fewer patients than '
        "images, and each patient counts once.</p>"
    )


def patient_summary(metrics):
    """One line of the summary card with the patient-level accuracy and QWK, or '' without groups."""
    level = metrics.get("patient_level")
    if not level:
        return ""
    patients = level["metrics"] | {"intervals": level["intervals"]}
    figures = ", ".join(
        f"{LABELS[name]} {fmt(patients[name], 2)} ({ci_text(patients, name)})" for name in ("accuracy", "qwk")
    )
    return (
        f"<p>Per patient ({patients['num_patients']} patients, --patient-grade {html.escape(level['rule'])}): "
        f"{html.escape(figures)}. The intervals count each patient once.</p>"
    )


def ood_html(metrics, images="validation images"):
    """One sentence on the images flagged as unlike the training images, or '' without the check."""
    flags = metrics.get("out_of_distribution")
    if not flags:
        return ""
    css = "warn" if flags["rate"] > 0.05 else "note"
    return (
        f'<p class="{css}">Unlike the training images (out-of-distribution check): {flags["flagged"]} of '
        f"{flags['images']} {images} ({100 * flags['rate']:.1f}%) flagged; the check is calibrated at training to "
        "flag about 1% of the validation images, and a flagged image's grade is not reliable.</p>"
    )


def caveats(config, model, selection, remedy=""):
    """What makes the metrics of a report lean optimistic: the choice of the best epoch (not with
    --select last) and, without --groups, the split."""
    if config.get("select") == "last":
        notes = (
            f'<p class="note">{model} is that of the last epoch (--select last), chosen without looking at the '
            "validation images, so the choice of epoch does not flatter these figures.</p>"
        )
    else:
        notes = (
            f'<p class="note">{selection}, so these figures lean optimistic (--select last avoids this); '
            "for an estimate to publish, grade a separate test set with predict.py"
            f"{', ' + remedy if remedy else ''}.</p>"
        )
    if not config.get("groups"):
        notes += (
            '<p class="warn">The split was made image by image (no --groups file): if a patient contributed several '
            "images, some may be in training and others in validation, which flatters every metric here.</p>"
        )
    return notes


def failed_html(failed, trained=True):
    """The optional parts of a finished evaluation that could not be made, (part, reason) each, for the summary
    card; trained: after a training (not a test set graded later)."""
    if not failed:
        return ""
    items = "".join(f"<li>{html.escape(part)}: {html.escape(reason)}</li>" for part, reason in failed)
    done = "Training finished and the" if trained else "The"
    return (
        f'<h3 class="warn">What failed</h3><p class="warn">{done} metrics and predictions are complete, but these '
        f"parts could not be made:</p><ul>{items}</ul>"
    )


def timing_cells(timing):
    """A row of the inference-time table: device, precision, batch-1 mean, median and p95 ms, throughput."""
    keys = ("batch1_mean_ms", "batch1_median_ms", "batch1_p95_ms", "throughput_images_per_s")
    return [timing["device"], timing["precision"], *(fmt(timing[key], 1) for key in keys)]


TIMING_HEADER = ["device", "precision", "batch 1 mean (ms)", "median (ms)", "p95 (ms)"]


def inference_html(timing):
    if not timing:
        return "<p>not measured</p>"
    note = timing_note(timing)
    header = [*TIMING_HEADER, f"throughput at batch {timing['throughput_batch_size']} (img/s)"]
    warning = f'<p class="warn">{note[0].upper() + note[1:]}.</p>' if note else ""
    return table(header, [timing_cells(timing)]) + warning


def validation_above_training(history):
    """Validation accuracy above training accuracy in more than half of the epochs."""
    return 2 * sum(row["val_acc"] > row["train_acc"] for row in history) > len(history)


def curves_html(curves):
    """The training curves, (heading, curves.png, history) each, and one sentence under them when validation
    accuracy runs above training accuracy."""
    parts = [
        (f"<h3>{html.escape(heading)}</h3>" if heading else "") + embed_png(png, f"{heading} loss and accuracy curves")
        for heading, png, _ in curves
    ]
    if any(validation_above_training(history) for *_, history in curves):
        parts.append(
            '<p class="note">Validation accuracy runs above training accuracy: training images are augmented '
            "and validation images are not, so the training figures come from harder images.</p>"
        )
    return "\n".join(parts)


def cams_html(cams):
    figures = "".join(
        f"<figure>{embed_png(p, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, p in cams
    )
    return (
        '<p class="note">Red marks the regions that raised the score of the predicted grade most.</p>'
        f'<div class="gallery">{figures}</div>'
    )


def confusion_pair(folder):
    """The two confusion matrices of an evaluation folder, side by side: counts and normalised by true grade."""
    return pair(
        embed_png(Path(folder) / "confusion_matrix.png", "confusion matrix"),
        embed_png(Path(folder) / "confusion_matrix_normalized.png", "normalised confusion matrix"),
    )


def setting_text(value):
    """A setting as a reader wants it: '–' for none, yes/no, lists and records spelled out, not JSON."""
    if value is None or value == "" or value == []:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {setting_text(v)}" for key, v in value.items())
    if isinstance(value, list):
        return ("\n" if any(isinstance(v, dict) for v in value) else ", ").join(setting_text(v) for v in value)
    return str(value)


def settings_html(config):
    """The resolved settings: each value left-aligned next to its name."""
    return table(["setting", "value"], [[key, setting_text(value)] for key, value in config.items()], False, "settings")


def dataset_html(folder, split, class_names):
    """Images per grade and subset, the groups, and the skipped files.

    split: rows with the keys class, subset (and group), such as a run's split.csv.
    """
    counts = {name: {} for name in class_names}  # grade order, not the order of the rows
    for row in split:
        counts.setdefault(row["class"], {}).setdefault(row["subset"], 0)
        counts[row["class"]][row["subset"]] += 1
    subsets = sorted(
        {row["subset"] for row in split}, key=lambda s: (s != "train", len(s), s)
    )  # train, val; fold2 before fold10
    rows = [[name] + [c.get(s, 0) for s in subsets] + [sum(c.values())] for name, c in counts.items()]
    rows.append(["all grades"] + [sum(r[k] for r in rows) for k in range(1, len(subsets) + 2)])
    parts = [table(["grade"] + subsets + ["total"], rows)]
    if split and "group" in split[0]:
        parts += groups_html(split, subsets)
    parts.append(skipped_html(folder))
    return "\n".join(parts)


def groups_html(split, subsets):
    """How many groups each subset has, and whether a group appears in more than one."""
    groups = {s: len({r["group"] for r in split if r["subset"] == s}) for s in subsets}
    parts = [
        "<p>Split by group (for example patient): "
        + ", ".join(f"{n} groups in {s}" for s, n in groups.items())
        + ".</p>"
    ]
    subsets_of = {}
    for r in split:
        subsets_of.setdefault(r["group"], set()).add(r["subset"])
    leaks = sorted(g for g, found in subsets_of.items() if len(found) > 1)
    if leaks:
        parts.append(
            f'<p class="warn">{len(leaks)} group(s) appear in more than one subset: '
            f"{html.escape(', '.join(leaks[:10]))}.</p>"
        )
    else:
        parts.append("<p>Checked: no group appears in more than one subset.</p>")
    return parts


def skipped_html(folder):
    """The files of the folder's skipped.csv, or one sentence that none were skipped."""
    path = Path(folder) / "skipped.csv"
    skipped = files.read_csv(path) if path.exists() else []
    if not skipped:
        return "<p>No files were skipped.</p>"
    return f'<p class="warn">{len(skipped)} file(s) were skipped:</p>' + table(
        ["file", "reason"], [[r["path"], r["reason"]] for r in skipped]
    )


# ----------------------------------------------------------------------------- the summary card


def cv_intro(page):
    if not page.fold_dirs:
        return ""
    groups = page.config.get("groups")
    grouped = f" grouped by {html.escape(str(groups))}" if groups else ""
    return (
        f"<p>{len(page.fold_dirs)}-fold cross-validation{grouped}. Each image is validated exactly once, by the model "
        "that did not train on it; the pooled out-of-fold predictions of all "
        f"{page.metrics['num_images']} images are scored here.</p>"
    )


def test_intro(page):
    metrics = page.metrics
    if "test_dir" not in metrics:
        return ""
    weights = metrics["weights"]
    models = (
        f"the mean probabilities of {len(weights)} fold models (an ensemble)"
        if metrics.get("ensemble")
        else html.escape(weights[0])
    )
    return (
        f"<p>Test set <b>{html.escape(metrics['test_dir'])}</b>: {metrics['num_images']} "
        f"{'images' if page.kind.pictures else 'videos'} graded by {models}.</p>"
    )


def headline_tiles(page):
    spread = {row["metric"]: f"{row['mean']} ± {row['std']}" for row in page.fold_table if row["mean"]}
    return grades_html(page.metrics["class_names"]) + tiles(headline(page.metrics, spread))


def training_line(page):
    """The chosen epoch of a single run, and whether the training started from ImageNet weights."""
    if page.config is None:
        return ""
    imagenet = f"ImageNet weights: {'yes' if page.config.get('pretrained_used') else 'no'}. {recipe_text(page.config)}"
    metrics = page.metrics
    if "epochs_completed" not in metrics:
        return f"<p>{imagenet}</p>"
    chosen = {"last": "Last", "qwk": "Best-QWK"}.get(page.config.get("select"), "Best")
    return (
        f"<p>{chosen} epoch {metrics.get('best_epoch')} of {metrics.get('epochs_completed')} "
        f"({html.escape(metrics.get('status', 'finished'))}), scored on {metrics['num_images']} validation images. "
        f"{imagenet}</p>"
    )


def recipe_text(config):
    """The recipe and its parts in one sentence; a run from before the recipes trained with the seed's."""
    get = config.get
    parts = [f"augmentation {get('augment', 'seed')}", "CDW-CE loss (alpha " + f"{get('cdw_alpha')})"
             if get("loss") == "cdw-ce" else f"cross-entropy (label smoothing {get('label_smoothing', 0)})",
             f"{'AdamW' if get('optimizer') == 'adamw' else 'SGD'} (weight decay {get('weight_decay', 0)})",
             f"{get('schedule', 'step')} schedule" + (f" after {get('warmup_epochs')} warmup epoch(s)"
                                                      if get("warmup_epochs") else "")]  # fmt: skip
    if get("ema"):
        parts.append(f"the weights' moving average (EMA {get('ema')}), which is what was evaluated and saved")
    if get("tta"):
        parts.append("test-time flips averaged (TTA), here and in predict.py")
    return html.escape(f"Recipe {get('recipe', 'seed')}: " + ", ".join(parts) + ".")


def warnings_line(page):
    """What a reader must know before the figures (metrics.warnings), in the card's warning colour."""
    return "".join(f'<p class="warn">Warning: {html.escape(w)}.</p>' for w in page.metrics.get("warnings", []))


def precision_line(page):
    """The precision the figures were graded in, and for a test set where its analysis settings came from."""
    metrics = page.metrics
    precision = metrics.get("precision") or next((m.get("precision") for m in page.fold_metrics), None)
    if not precision:
        return ""
    runtime = f" ({html.escape(metrics['runtime'])})" if metrics.get("runtime") else ""
    settings = metrics.get("analysis_settings") or {}
    sources = "; ".join(
        f"--{key.replace('_', '-')} {html.escape(str(s['value'] or 'none'))} from {html.escape(s['from'])}"
        for key, s in settings.items()
        if key != "class_order"
    )
    return f"<p>Graded in {html.escape(precision)}{runtime}.{' Settings: ' + sources + '.' if sources else ''}</p>"


def patients_line(page):
    return patient_summary(page.metrics)


def ood_line(page):
    return ood_html(page.metrics, page.kind.images)


def caveats_notes(page):
    kind = page.kind
    return caveats(page.config, kind.model, kind.selection, kind.remedy) if page.config and kind.model else ""


def test_notes(page):
    """The test set's grades without images, and whether its images were checked for leakage."""
    metrics = page.metrics
    if "test_dir" not in metrics:
        return ""
    notes = []
    if metrics.get("missing_grades"):
        notes.append(
            f"<p class=note>The test set has no images of {html.escape(', '.join(metrics['missing_grades']))}; "
            "those grades are absent from the figures.</p>"
        )
    leaked = metrics.get("images_in_training")
    if not page.kind.pictures:  # videos: no check of their bytes against the training images
        return "".join(notes)
    if leaked:
        notes.append(
            f'<p class="warn">{leaked} test image(s) have the same bytes as images the model trained on: that is '
            "leakage, and it flatters every figure here; remove them from the test set.</p>"
        )
    elif leaked is None:
        notes.append(
            '<p class="note">Not checked for images the model trained on: the run\'s split.csv or its data folder '
            "is not at hand.</p>"
        )
    else:
        notes.append("<p>Checked: no test image has the bytes of an image the model trained on.</p>")
    return "".join(notes)


def failed_lines(page):
    return failed_html(page.failed, trained=page.config is not None)


SUMMARY = [
    cv_intro,
    test_intro,
    warnings_line,
    headline_tiles,
    training_line,
    precision_line,
    patients_line,
    ood_line,
    caveats_notes,
    test_notes,
    failed_lines,
]

# ----------------------------------------------------------------------------- the sections


def confusion_section(page):
    return confusion_pair(page.folder)


def metrics_section(page):
    return metrics_html(page.metrics)


def patients_section(page):
    return patients_html(page.folder, page.metrics) if page.metrics.get("patient_level") else None


def fold_table_section(page):
    """Each metric's mean and spread over the folds, each fold's value and the pooled one."""
    if not page.fold_table:
        return None
    folds = [f"fold{k}" for k in range(1, len(page.fold_dirs) + 1)]
    rows = [
        [_label(row["metric"]), f"{row['mean']} ± {row['std']}" if row["mean"] else "n/a"]
        + [row[fold] or "n/a" for fold in folds]
        + [row["pooled"] or "n/a"]
        for row in page.fold_table
    ]
    return table(["metric", "mean ± std"] + folds + ["pooled"], rows)


def per_model_section(page):
    """Each fold model's own figures on a test set, beside those of their ensemble."""
    per_model = page.metrics.get("per_model")
    if not per_model:
        return None
    header = ["model"] + [LABELS[name] for name in SCALARS]
    rows = [[Path(m["weights"]).parent.name] + [fmt(m.get(name)) for name in SCALARS] for m in per_model]
    rows.append(["ensemble (mean probabilities)"] + [fmt(page.metrics.get(name)) for name in SCALARS])
    return table(header, rows)


def curves_section(page):
    return curves_html(page.curves) if page.curves else None


def roc_section(page):
    return embed_png(page.folder / "roc.png", "ROC curves")


def errors_section(page):
    if not page.kind.pictures:
        return None
    png = page.folder / "errors.png"
    if png.exists():
        return embed_png(png, "errors")
    return f"<p>No {page.kind.images.removesuffix('s')} was misclassified.</p>"


def cams_section(page):
    return cams_html(page.cams) if page.cams else None


def timing_section(page):
    """The inference time of the model, or of each fold's model; None where it was not part of the evaluation."""
    if page.fold_metrics:
        timings = [m.get("inference_time") for m in page.fold_metrics]
        rows = [[f"fold{k}", *timing_cells(t)] for k, t in enumerate(timings, 1) if t]
        header = ["fold", *TIMING_HEADER, "throughput (img/s)"]
        return table(header, rows) if rows else "<p>not measured</p>"
    if "inference_time" not in page.metrics:
        return None
    return inference_html(page.metrics["inference_time"])


def videos_section(page):
    """Each video of a video-level evaluation: its grade, its worst segment, and a link to its own report."""
    path = page.folder / "videos.csv"
    if not path.exists():
        return None
    rows = files.read_csv(path)
    body = [
        [r["path"], r["true"], r["grade"], f"{float(r['worst_start']):.1f}-{float(r['worst_end']):.1f} s",
         r["mean_probability_grade"], f"{float(r['gradable_share']):.0%}"]
        for r in rows
    ]  # fmt: skip
    header = ["video", "true", "grade", "worst segment", "mean-probability grade", "gradable"]
    links = ", ".join(f'<a href="{html.escape(r["report"])}">{html.escape(r["path"])}</a>' for r in rows)
    return table(header, body) + f"<p>Each video's own report (timeline, worst segment): {links}.</p>"


def dataset_section(page):
    return page.kind.dataset_note + dataset_html(page.folder, page.split, page.metrics["class_names"])


def settings_section(page):
    return settings_html(page.config) if page.config is not None else None


def folds_section(page):
    if not page.fold_dirs:
        return None
    return (
        "<p>Each fold folder also holds its own report.html, checkpoints, predictions and Grad-CAM overlays: "
        + ", ".join(f"{d.name}/report.html" for d in page.fold_dirs)
        + ".</p>"
    )


# (key, heading, section): the order of the sections on every page; pages.KINDS may rename a heading by its key
SECTIONS = [
    ("confusion", "Confusion matrices", confusion_section),
    ("metrics", "Metrics", metrics_section),
    ("patients", "Patient level", patients_section),
    ("per_fold", "Metrics per fold (mean ± standard deviation over the folds)", fold_table_section),
    ("per_model", "Each fold's model", per_model_section),
    ("curves", "Training curves", curves_section),
    ("roc", "ROC curves", roc_section),
    ("errors", "Most confidently wrong images", errors_section),
    ("videos", "Each video", videos_section),
    ("cams", "Grad-CAM: where the model looked", cams_section),
    ("timing", "Inference time", timing_section),
    ("dataset", "Dataset and split", dataset_section),
    ("settings", "Settings", settings_section),
    ("folds", "Folds", folds_section),
]
