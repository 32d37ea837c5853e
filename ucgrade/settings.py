"""Settings of a run: new from the command line, or resumed from the run's config.json, and the record of them.

A resumed run takes its settings from its config.json: they become the parser's defaults, and the
command line is parsed again over them. A setting that then differs from the record is refused,
unless it is one that RESUME_MAY_CHANGE lists, because the run would not go on the same.
"""

import json
import platform
import time
from pathlib import Path

import torch
import torchvision

from . import distributed, files, presets
from .cli import UserError
from .model import load_checkpoint

# Settings that define a run; config.json records them and --resume takes them from it.
RUN_SETTINGS = (
    "data", "arch", "epochs", "batch_size", "lr", "momentum", "step_size", "gamma", "val_split", "seed", "img_size",
    "precision", "pretrained", "weights", "class_order", "remission_upto", "groups", "folds", "balance",
    "freeze_backbone", "cache", "select", "sync_bn", "patient_grade", "recipe", "augment", "loss", "cdw_alpha",
    "label_smoothing", "optimizer", "weight_decay", "schedule", "warmup_epochs", "ema", "tta",
)  # fmt: skip
# What --resume may change, because the run goes on the same: the same images from elsewhere, more
# epochs, another precision, cache or batch norm across processes. (--device, --workers, --compile and
# --cam-examples are not run settings.) --patient-grade may not change: the folds already evaluated
# made their patients' grades by the rule the run started with, and the pooled report must use the same one.
RESUME_MAY_CHANGE = ("data", "epochs", "precision", "cache", "sync_bn")
# Defaults of settings that runs written by earlier versions did not record.
EARLIER_DEFAULTS = {"select": "best", "arch": "resnet50", "sync_bn": False, "patient_grade": "max", "recipe": "seed"}
EARLIER_DEFAULTS |= {
    name: getattr(presets.RECIPES["seed"], name) for name in presets.RECIPE_FIELDS if name in RUN_SETTINGS
}  # a run from before the recipes trained with the seed's
PATHS = ("data", "weights", "groups")  # recorded as absolute paths, so a run resumes from any folder


def resolve(args, parser):
    """(args, None) for a new run, --recipe filling the settings the command line leaves out; for --resume, (the
    run's settings with the command line over them, its config)."""
    if not args.resume:
        return presets.apply_recipe(args, given_on_command_line(parser, args.argv)), None
    run_dir = Path(args.resume)
    config = read_run_config(run_dir)
    defaults = {key: config[key] for key in RUN_SETTINGS if key != "precision"}  # auto: the precision last used
    parser.set_defaults(**defaults, name=None, out=None)
    resumed = parser.parse_args(args.argv)
    misplaced = [f"--{flag}" for flag in ("name", "out") if getattr(resumed, flag) is not None]
    if misplaced:
        raise UserError(
            f"{' and '.join(misplaced)} do not apply to --resume, which goes on in the run's own folder "
            f"'{run_dir}'; leave them out."
        )
    resumed.out, resumed.name = str(run_dir.parent), run_dir.name  # where the run is
    changed = [key for key in RUN_SETTINGS if key not in RESUME_MAY_CHANGE and not _same(key, resumed, config)]
    if changed:
        flags = ", ".join("--" + key.replace("_", "-") for key in changed)
        raise UserError(
            f"{flags} cannot change when a run is resumed, because the run goes on with the settings in its "
            "config.json; leave them out, or start a new run with them."
        )
    check_epochs(run_dir, config, resumed.epochs)
    return resumed, config


def given_on_command_line(parser, argv):
    """The names of the settings that argv gives: parsed again with a default that no flag can give. (The parser's
    defaults change; it is not used again.)"""
    not_given = object()
    parser.set_defaults(**{action.dest: not_given for action in parser._actions})
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not not_given} - {"argv"}


def _same(key, args, config):
    value, recorded = getattr(args, key), config[key]
    if key == "class_order" and isinstance(value, str):  # as given on the command line
        value = [name.strip() for name in value.split(",") if name.strip()]
    if key in PATHS and value and recorded:
        return Path(value).resolve() == Path(recorded).resolve()
    return value == recorded


def read_run_config(run_dir):
    """A run's config.json, with the settings that resuming needs."""
    if run_dir.is_file():
        raise UserError(f"--resume '{run_dir}' is a file; give its run folder, such as --resume {run_dir.parent}.")
    if not run_dir.is_dir():
        raise UserError(f"--resume '{run_dir}' does not exist; give a run folder under outputs/ written by qq.py.")
    if not (run_dir / "config.json").is_file():
        raise UserError(
            f"--resume '{run_dir}' is not a run folder (it has no config.json); give a folder under outputs/ "
            "written by qq.py."
        )
    try:
        config = files.read_json(run_dir / "config.json")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"the config.json of '{run_dir}' is unreadable ({error}), so the run cannot be resumed; start a new run."
        ) from None
    if "fold" in config:
        raise UserError(
            f"'{run_dir}' is one fold of a cross-validation run; resume the whole run with: "
            f"python qq.py --resume {run_dir.parent}"
        )
    config = EARLIER_DEFAULTS | config
    needed = RUN_SETTINGS + ("class_names", "class_counts", "precision_used", "pretrained_used", "weights_source")
    missing = [key for key in needed if key not in config]
    if missing:
        raise UserError(
            f"the config.json of '{run_dir}' lacks {', '.join(missing)}, so the run cannot be resumed; start a new run."
        )
    return config


def check_epochs(run_dir, config, epochs):
    """A run goes on for more epochs than it has trained, from the last.pt of every model that continues."""
    if config["folds"] and epochs != config["epochs"]:
        raise UserError(
            "--epochs cannot change when a cross-validation run is resumed, because every fold must train for "
            f"the same {config['epochs']} epochs; leave --epochs out."
        )
    trained = 0
    for folder in [run_dir, *sorted(run_dir.glob("fold*"))]:
        history = folder / "history.csv"
        epochs_done = len(files.read_csv(history)) if history.is_file() else 0
        trained = max(trained, epochs_done)
        continues = folder == run_dir or files.read_status(folder) != "finished"  # a finished fold is not trained again
        if epochs_done and continues and not (folder / "last.pt").is_file():
            raise UserError(
                f"'{folder}' has finished epochs but no last.pt, which holds the training state, so the run cannot "
                "continue; start a new run (its best.pt still grades images with predict.py)."
            )
        if continues and (folder / "last.pt").is_file():
            check_last_checkpoint(folder / "last.pt")
    if epochs < trained:
        raise UserError(
            f"--epochs {epochs} is fewer than the {trained} epochs the run has already trained; give --epochs "
            f"{trained} or more, or leave it out."
        )
    if files.read_status(run_dir) == "finished" and epochs <= trained:
        more = (
            "there is nothing left to resume"
            if config["folds"]
            else f"to train it longer, pass --epochs with more than {trained}"
        )
        raise UserError(f"'{run_dir}' has already finished its {trained} epochs; {more}.")


def check_last_checkpoint(path):
    """Before anything is written (config.json records every resumption): a last.pt that the run would go on
    from must load, with the fields, shapes and training state that resuming needs."""
    missing = [key for key in ("optimizer", "lr_scheduler", "history", "rng") if key not in load_checkpoint(path)]
    if missing:
        raise UserError(
            f"'{path}' holds no training state ({', '.join(missing)} missing), so the run cannot continue from it; "
            "start a new run instead of resuming."
        )


def precision_used(config):
    """The precision a resumed run last trained in (None for a new run)."""
    return (config.get("resumed") or [config])[-1]["precision_used"] if config else None


def check_same_data(config, image_set):
    """Resuming needs the images the run started with: the same classes with the same counts (then the split
    names a missing image; check_same_files finds the rest)."""
    before = ", ".join(f"{n} {c}" for n, c in zip(config["class_names"], config["class_counts"]))
    now = ", ".join(f"{n} {c}" for n, c in zip(image_set.class_names, image_set.class_counts()))
    if before != now:
        raise UserError(
            f"the usable images in '{image_set.root}' changed since the run started (then: {before}; now: {now}); "
            "resuming needs the same data, so start a new run instead."
        )


def check_same_files(config, image_set):
    """The same files by path and content, which their fingerprint says (a run made before the fingerprint was
    kept is checked by its counts and split only)."""
    kept = config.get("images_sha256")
    if kept is not None and kept != image_set.fingerprint():
        raise UserError(
            f"the usable images in '{image_set.root}' changed since the run started: the same files by name, but "
            "the content of some differs; resuming needs the same data, so start a new run instead."
        )


def write_config(args, run_dir, image_set, runtime, weights, resumed=None):
    """Write config.json (and skipped.csv): a new run's settings, or a resumption added to the record.

    weights: (whether ImageNet weights were used, where they came from).
    """
    now = {
        "command": "python qq.py " + " ".join(args.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(runtime.device),
        "precision_used": runtime.precision,
        "processes": runtime.world_size,
    }
    data = str(Path(args.data).resolve())
    if resumed:  # the record of how the run started stays; each resumption is added to it
        before = (resumed.get("resumed") or [resumed])[-1].get("processes", 1)
        if before != runtime.world_size:
            print(
                f"note: the run trained in {before} process(es) and goes on in {runtime.world_size}, so each epoch's "
                "images are dealt out differently and the augmentation order changes: the run goes on correctly, "
                "but will not repeat exactly a run that kept one number of processes."
            )
        config = resumed | {"epochs": args.epochs, "data": data, "resumed": resumed.get("resumed", []) + [now]}
    else:
        paths = {key: str(Path(getattr(args, key)).resolve()) for key in PATHS if getattr(args, key)}
        config = {key: getattr(args, key) for key in RUN_SETTINGS} | paths | {"run_dir": str(run_dir)} | now
        config |= {
            "pretrained_used": weights[0],
            "weights_source": weights[1],
            "class_names": image_set.class_names,
            "class_counts": image_set.class_counts(),
            "images_sha256": image_set.fingerprint(),  # every usable image's path and content: see check_same_files
            "skipped_files": len(image_set.skipped),
            "cached_in_memory": image_set.images is not None,
            "versions": {
                "python": platform.python_version(),
                "torch": str(torch.__version__),
                "torchvision": str(torchvision.__version__),
            },
        }
    if runtime.is_main:
        files.write_json(run_dir / "config.json", config)
        skipped = [{"path": str(p), "reason": r} for p, r in image_set.skipped]
        files.write_csv(run_dir / "skipped.csv", skipped, ["path", "reason"])
    return config


def run_folder(args, runtime):
    """The run's folder: the resumed one, or a new one that the main process makes and names for all."""
    if args.resume:
        return Path(args.resume)
    return distributed.broadcast(files.new_run_dir(args.out, args.name) if runtime.is_main else None, runtime)


def print_settings(args, runtime):
    print("settings:")
    for key in RUN_SETTINGS:
        print(f"  {key:<16} {getattr(args, key)}")
    print(f"  {'device':<16} {runtime.device}\n  {'precision used':<16} {runtime.precision}")
