"""Did a recipe help on your images? Each recipe (or set of flags) trained on the same K folds, compared with seed.

Every candidate is a qq.py run with --folds K and the same --seed (and --groups), so that all of them validate
every image once, on the same folds. The out-of-fold predictions give each candidate's accuracy, QWK, macro F1
and MAE with 95% bootstrap intervals (whole patients resampled with --groups), and the paired difference to the
seed recipe: both graded on the same images, each bootstrap resample drawing the same images for the two, so an
interval that excludes 0 says the difference is more than the luck of the split.

    python benchmarks/recipes.py data --img-size 64 --epochs 3 --arch resnet18     # the demo data: minutes on a CPU
    python benchmarks/recipes.py images --groups patients.csv --folds 5            # your data, the real settings
    python benchmarks/recipes.py data --candidates seed endoscopy "seed --loss cdw-ce" "endoscopy --tta"

A candidate is a recipe name, optionally followed by flags over it ("endoscopy --ema 0"). Any other flag, after
DATA, is qq.py's and goes to every candidate's run (--epochs, --img-size, --arch, --device ...). It writes, in a new
folder under --out: recipes.csv, recipes.html (one plot of the paired differences) and each candidate's run.
"""

import argparse
import base64
import io
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import numpy as np  # noqa: E402

import qq  # noqa: E402
from ucgrade import files, metrics, records, stats  # noqa: E402
from ucgrade.cli import UserError, main_entry, run_cli  # noqa: E402
from ucgrade.presets import RECIPES  # noqa: E402

METRICS = ("accuracy", "qwk", "macro_f1", "mae_grades")  # MAE: lower is better
REFERENCE = "seed"


class PassingOn(argparse.ArgumentParser):
    """The flags it does not know are qq.py's: args.qq_flags, for every candidate's run."""

    def parse_args(self, args=None, namespace=None):
        parsed, rest = self.parse_known_args(args, namespace)
        parsed.qq_flags = rest
        return parsed


def get_args_parser():
    parser = PassingOn(
        description="Train each recipe on the same folds and compare it with the seed recipe, with paired 95% CIs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("data", help="folder with one sub-folder of images per grade")
    add(
        "--candidates",
        nargs="+",
        default=[REFERENCE, "endoscopy"],
        help="recipes, each optionally with flags over it, quoted: 'endoscopy --ema 0'; seed is added first if "
        "missing (default: seed endoscopy)",
    )
    add("--folds", type=int, default=5, help="K of the cross-validation every candidate runs (default: %(default)s)")
    add("--groups", default=None, help="CSV path,group (patients): grouped folds and a cluster bootstrap")
    add("--seed", type=int, default=0, help="the folds' and the training's seed, the same for all (default: 0)")
    add("--resamples", type=int, default=stats.N_RESAMPLES, help="bootstrap resamples (default: %(default)s)")
    add("--out", default="outputs", help="folder that receives a new folder recipes, recipes2, ... (default: outputs)")
    return parser


def candidate_argv(candidate):
    """(label, qq.py flags) of a candidate: 'endoscopy --ema 0' -> --recipe endoscopy --ema 0."""
    words = shlex.split(candidate)
    if not words or words[0] not in RECIPES:
        raise UserError(
            f"the candidate '{candidate}' does not start with a recipe name ({', '.join(RECIPES)}); give a recipe, "
            "optionally followed by flags, such as 'endoscopy --ema 0'."
        )
    return " ".join(words), ["--recipe", words[0], *words[1:]]


def run_candidates(args, shared, out):
    """Train every candidate with --folds on the same folds: {label: its run folder}."""
    candidates = [REFERENCE] + [c for c in args.candidates if c != REFERENCE]
    common = ["--data", args.data, "--out", out, "--folds", args.folds, "--seed", args.seed, *shared]
    common += ["--groups", args.groups] if args.groups else []
    runs = {}
    for k, candidate in enumerate(candidates, 1):
        label, argv = candidate_argv(candidate)
        print(f"\n##### candidate {k}/{len(candidates)}: {label}", flush=True)
        parsed = qq.get_args_parser().parse_args([str(a) for a in [*common, "--name", f"candidate{k}", *argv]])
        if run_cli(qq.main, parsed) != 0:
            raise UserError(f"the run of candidate '{label}' failed (its message is above); fix it or leave it out.")
        runs[label] = out / f"candidate{k}"
    return runs


def out_of_fold(run_dir, class_names=None):
    """(paths, folds, targets, probs, groups or None, class names) of a run's pooled predictions, sorted by path."""
    class_names = class_names or json.loads((run_dir / "config.json").read_text())["class_names"]
    rows, targets, probs = records.read_predictions(run_dir / "predictions.csv", class_names)
    order = np.argsort([row["path"] for row in rows], kind="stable")
    rows = [rows[i] for i in order]
    groups = [row["group"] for row in rows] if rows and "group" in rows[0] else None
    folds = [row["fold"] for row in rows]
    return (
        [row["path"] for row in rows],
        folds,
        np.asarray(targets)[order],
        np.asarray(probs)[order],
        groups,
        class_names,
    )


def compare(runs, resamples=stats.N_RESAMPLES, seed=0):
    """One row per candidate and metric: its value and 95% CI, and the paired difference to seed with its CI."""
    reference = out_of_fold(runs[REFERENCE])
    paths, folds, targets, base, groups, class_names = reference
    base_metrics = metrics.compute_metrics(targets, base, class_names)
    rows = []
    for label, run_dir in runs.items():
        other_paths, other_folds, other_targets, probs, _, _ = out_of_fold(run_dir, class_names)
        if other_paths != paths or other_folds != folds or not np.array_equal(other_targets, targets):
            raise UserError(f"the candidate '{label}' did not validate the same images on the same folds as seed.")
        result = metrics.compute_metrics(targets, probs, class_names)
        own, difference = stats.paired_intervals(targets, probs, base, class_names, groups, seed, resamples)
        for name in METRICS:
            delta, ci = result[name] - base_metrics[name], difference[name]
            rows.append(
                {
                    "candidate": label,
                    "metric": name,
                    "value": result[name],
                    "low": own[name]["low"],
                    "high": own[name]["high"],
                    "difference_to_seed": delta,
                    "difference_low": ci["low"],
                    "difference_high": ci["high"],
                    "excludes_0": ci["low"] is not None and (ci["low"] > 0 or ci["high"] < 0),
                    "images": len(targets),
                    "groups": len(set(groups)) if groups else "",
                }
            )
    return rows


def print_table(rows):
    width = max(len("candidate"), *(len(row["candidate"]) for row in rows)) + 2
    print(f"\n{'candidate':<{width}}{'metric':<12}{'value (95% CI)':<22}{'minus seed (paired 95% CI)':<30}excludes 0")
    for row in rows:
        value = stats.format_ci(row["value"], row, 3)
        interval = {"low": row["difference_low"], "high": row["difference_high"]}
        delta = stats.format_ci(row["difference_to_seed"], interval, 3)
        same = row["candidate"] == REFERENCE
        print(f"{row['candidate']:<{width}}{row['metric']:<12}{value:<22}{'' if same else delta:<30}"
              f"{'' if same else ('yes' if row['excludes_0'] else 'no')}")  # fmt: skip


def difference_plot(rows):
    """One plot: each candidate's paired difference to seed, per metric, with its 95% CI (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = list(dict.fromkeys(r["candidate"] for r in rows if r["candidate"] != REFERENCE))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / max(1, len(others))
    for k, label in enumerate(others):
        mine = [next(r for r in rows if r["candidate"] == label and r["metric"] == m) for m in METRICS]
        x = np.arange(len(METRICS)) + (k - (len(others) - 1) / 2) * width
        y = np.array([r["difference_to_seed"] for r in mine])
        low = np.array([np.nan if r["difference_low"] is None else r["difference_low"] for r in mine])
        high = np.array([np.nan if r["difference_high"] is None else r["difference_high"] for r in mine])
        ax.errorbar(x, y, yerr=[y - low, high - y], fmt="o", capsize=4, label=label)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(METRICS)), [metrics.LABELS[m] + (" (lower is better)" if m == "mae_grades" else "")
                                        for m in METRICS], fontsize=8)  # fmt: skip
    ax.set_ylabel("minus seed (paired 95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_html(path, rows, shared):
    import html

    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(str(v if not isinstance(v, float) else f'{v:.3f}'))}</td>" for v in row.values())
        + "</tr>"
        for row in rows
    )
    image = base64.b64encode(difference_plot(rows)).decode()
    files.write_text(
        path,
        "<!doctype html><meta charset='utf-8'><title>Recipes compared</title>"
        "<style>body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px;text-align:right}</style>"
        f"<h1>Recipes compared on the same folds</h1><p>qq.py flags of every run: "
        f"<code>{html.escape(' '.join(map(str, shared)) or '(none)')}</code>. Each difference is the candidate "
        "minus seed on the same out-of-fold images, with a paired bootstrap 95% CI; one that excludes 0 is more "
        f"than the luck of the split.</p><img alt='paired differences to seed' src='data:image/png;base64,{image}'>"
        "<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in rows[0]) + f"</tr>{body}</table>",
    )


def main(args):
    shared = args.qq_flags
    for flag in ("--folds", "--seed", "--groups", "--data", "--out", "--name", "--recipe", "--resume"):
        if flag in shared:
            raise UserError(f"{flag} is set by recipes.py for every candidate; give it to recipes.py, or leave it out.")
    if args.folds < 2:
        raise UserError(f"--folds must be at least 2, so that every image is validated once (got {args.folds}).")
    out = files.new_run_dir(args.out, "recipes")
    runs = run_candidates(args, list(shared), out)
    rows = compare(runs, args.resamples, args.seed)
    files.write_csv(out / "recipes.csv", rows, list(rows[0]))
    write_html(out / "recipes.html", rows, shared)
    print_table(rows)
    print(f"\nwritten: {out / 'recipes.csv'} and {out / 'recipes.html'}")
    return 0


if __name__ == "__main__":
    main_entry(main, get_args_parser())
