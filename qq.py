"""Fine-tune an ImageNet ResNet50 to grade the endoscopic severity of ulcerative colitis.

Put the images in data/<grade>/<image> (one sub-folder per grade, in grade order), then:

    python qq.py                                       # train on data/ with the method's defaults
    python qq.py --epochs 3 --img-size 128             # a quick run on a CPU
    python qq.py --data /path/to/images --remission-upto mayo1
    python qq.py --data images --groups patients.csv --folds 5
    python qq.py --resume outputs/train2               # continue an interrupted run

Each run writes a new folder under outputs/ (train, train2, ...) with best.pt, last.pt,
history.csv, curves.png, confusion matrices, metrics.json, predictions.csv and report.html.
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from ucgrade import data, engine, files, metrics, report
from ucgrade.cam import write_cams
from ucgrade.cli import ArgumentParser, RunInterrupted, UserError, main_entry
from ucgrade.device import PRECISIONS, choose_device, choose_precision, make_grad_scaler, setup_backends
from ucgrade.interrupt import GracefulStop
from ucgrade.model import (
    build_model,
    get_imagenet_weights,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

DEFAULT_EPOCHS = 25
# Settings that define a run; --resume takes them from the run's config.json.
RUN_SETTINGS = (
    "data",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "step_size",
    "gamma",
    "val_split",
    "seed",
    "img_size",
    "precision",
    "pretrained",
    "weights",
    "class_order",
    "remission_upto",
    "groups",
    "folds",
    "balance",
    "freeze_backbone",
    "cache",
    "select",
)
# Settings that --resume may change, because the run goes on the same: the same images from
# elsewhere, or streamed instead of cached.
RESUME_MAY_CHANGE = ("data", "cache")


def get_args_parser():
    parser = ArgumentParser(
        description="Fine-tune an ImageNet ResNet50 to grade the endoscopic severity of ulcerative colitis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python qq.py\n  python qq.py --data images --remission-upto mayo1 --folds 5\n  python qq.py --resume outputs/train2",
    )
    add = parser.add_argument
    add("--data", default="data", help="folder with one sub-folder of images per grade (default: %(default)s)")
    add("--out", default="outputs", help="folder that receives a new run folder (default: %(default)s)")
    add("--name", default=None, help="run folder name; a number is added if it exists (default: train, train2, ...)")
    add("--epochs", type=int, default=None, help=f"training epochs (default: {DEFAULT_EPOCHS})")
    add("--batch-size", type=int, default=16, help="images per training step (default: %(default)s)")
    add("--lr", type=float, default=0.001, help="SGD learning rate (default: %(default)s)")
    add("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    add(
        "--step-size",
        type=int,
        default=7,
        help="StepLR: multiply the learning rate by --gamma every this many epochs (default: %(default)s)",
    )
    add("--gamma", type=float, default=0.1, help="StepLR decay factor (default: %(default)s)")
    add(
        "--val-split",
        type=float,
        default=0.2,
        help="fraction of each class held out for validation (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the initialisation and the augmentation (default: %(default)s)",
    )
    add("--img-size", type=int, default=224, help="input size in pixels, at least 64 (default: %(default)s)")
    add(
        "--workers",
        type=int,
        default=-1,
        help="data loading processes; -1 picks a number that suits the device (default: %(default)s)",
    )
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps; auto prefers a GPU (default: %(default)s)")
    add(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 where the GPU or CPU supports it, fp16 on older GPUs, else fp32 (default: %(default)s)",
    )
    add(
        "--pretrained",
        default="auto",
        choices=("auto", "yes", "no"),
        help="ImageNet weights: auto falls back to random weights if they cannot be had, yes insists, no skips them (default: %(default)s)",
    )
    add(
        "--weights",
        default=None,
        help="a local ImageNet ResNet50 state_dict to start from, for machines without internet (default: none)",
    )
    add(
        "--class-order",
        default=None,
        help="the grades from mildest to most severe, comma-separated (default: folder names in sorted order)",
    )
    add(
        "--remission-upto",
        default=None,
        metavar="CLASS",
        help="also report remission (grades up to CLASS) vs active disease, e.g. mayo1 (default: off)",
    )
    add(
        "--groups",
        default=None,
        metavar="CSV",
        help="CSV with columns path,group (e.g. patient id); a group never spans train and validation (default: none)",
    )
    add(
        "--folds",
        type=int,
        default=0,
        metavar="K",
        help="K-fold cross-validation with K >= 2; 0 is a single train/validation split (default: %(default)s)",
    )
    add(
        "--balance",
        default="none",
        choices=("none", "weights", "sampler"),
        help="class imbalance: none, class-weighted loss, or a class-balanced sampler (default: %(default)s)",
    )
    add(
        "--select",
        default="best",
        choices=("best", "last"),
        help="the epoch whose model becomes best.pt and is evaluated: best validation accuracy, or last, chosen without looking at the validation images, for figures that are not optimistic (default: %(default)s)",
    )
    add(
        "--freeze-backbone",
        action="store_true",
        help="train only the new fc layer on features computed once (fast; default: fine-tune all layers)",
    )
    add(
        "--cache",
        default="auto",
        choices=("auto", "ram", "off"),
        help="keep decoded images in memory; auto does so when they fit in half the free memory (default: %(default)s)",
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the model; on a CPU it compiles for about a minute and trains no faster (BENCHMARKS.md), so it is for GPUs (default: off)",
    )
    add(
        "--cam-examples",
        type=int,
        default=6,
        help="Grad-CAM overlays of validation images shown in the report (default: %(default)s)",
    )
    add(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last.pt, with its settings (default: none)",
    )
    return parser


def check_args(args):
    """Reject impossible settings before any work starts."""
    checks = [
        (args.epochs is None or args.epochs >= 1, f"--epochs must be at least 1 (got {args.epochs})"),
        (args.batch_size >= 1, f"--batch-size must be at least 1 (got {args.batch_size})"),
        (0 < args.val_split < 1, f"--val-split must be between 0 and 1, for example 0.2 (got {args.val_split})"),
        (
            args.img_size >= 64,
            f"--img-size must be at least 64 pixels, because ResNet50 shrinks its input 32-fold (got {args.img_size})",
        ),
        (math.isfinite(args.lr) and args.lr > 0, f"--lr must be a positive number (got {args.lr})"),
        (0 <= args.momentum < 1, f"--momentum must be in [0, 1) (got {args.momentum})"),
        (args.step_size >= 1, f"--step-size must be at least 1 (got {args.step_size})"),
        (0 < args.gamma <= 1, f"--gamma must be in (0, 1] (got {args.gamma})"),
        (args.workers >= -1, f"--workers must be -1 (automatic) or at least 0 (got {args.workers})"),
        (args.folds == 0 or args.folds >= 2, f"--folds must be 0 (a single split) or at least 2 (got {args.folds})"),
        (0 <= args.seed < 2**32, f"--seed must be a whole number from 0 to 4294967295 (got {args.seed})"),
        (args.cam_examples >= 0, f"--cam-examples must be 0 or more (got {args.cam_examples})"),
        (
            not (args.weights and args.pretrained == "no"),
            "--weights and --pretrained no contradict each other; drop one of them",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message + ".")
    if args.name is not None and (args.name in ("", ".", "..") or Path(args.name).name != args.name):
        raise UserError(
            f"--name '{args.name}' must be a plain folder name, without '/'; the run folder goes under --out."
        )
    files.check_folder_path(args.out, "--out")
    for flag, value in (("--weights", args.weights), ("--groups", args.groups)):
        if value and Path(value).is_dir():
            raise UserError(f"{flag} '{value}' is a folder; give the file itself.")
        if value and not Path(value).is_file():
            raise UserError(f"{flag} file '{value}' does not exist; check the path.")
    if isinstance(args.class_order, str):
        args.class_order = [name.strip() for name in args.class_order.split(",") if name.strip()]


def settings_for_resume(args, run_dir):
    """The run's config.json; the run's settings replace args. --epochs may extend a single run,
    --data may point to the same images moved elsewhere, and --cache, --device, --precision,
    --workers, --compile and --cam-examples may change."""
    config = read_run_config(run_dir)
    ignored = [flag for flag in ("name", "out") if flag in getattr(args, "given", ())]
    if ignored:
        raise UserError(
            f"{' and '.join('--' + flag for flag in ignored)} do not apply to --resume, which goes on in the run's own folder '{run_dir}'; leave them out."
        )
    if "fold" in config:
        raise UserError(
            f"'{run_dir}' is one fold of a cross-validation run; resume the whole run with: python qq.py --resume {run_dir.parent}"
        )
    epochs, precision = args.epochs, args.precision
    if config["folds"] and epochs is not None and epochs != config["epochs"]:
        raise UserError(
            f"--epochs cannot change when a cross-validation run is resumed, because every fold must train for the same {config['epochs']} epochs; leave --epochs out."
        )
    trained = 0
    for folder in [run_dir, *run_dir.glob("fold*")]:
        epochs_done = len(files.read_csv(folder / "history.csv")) if (folder / "history.csv").is_file() else 0
        trained = max(trained, epochs_done)
        continues = folder == run_dir or read_status(folder) != "finished"  # a finished fold is not trained again
        if epochs_done and continues and not (folder / "last.pt").is_file():
            raise UserError(
                f"'{folder}' has finished epochs but no last.pt, which holds the training state, so the run cannot continue; start a new run (its best.pt still grades images with predict.py)."
            )
    if epochs is not None and epochs < trained:
        raise UserError(
            f"--epochs {epochs} is fewer than the {trained} epochs the run has already trained; give --epochs {trained} or more, or leave it out."
        )
    if read_status(run_dir) == "finished" and (epochs or config["epochs"]) <= trained:
        more = (
            "there is nothing left to resume"
            if config["folds"]
            else f"to train it longer, pass --epochs with more than {trained}"
        )
        raise UserError(f"'{run_dir}' has already finished its {trained} epochs; {more}.")
    check_resume_flags(args, config)
    changes = {key: getattr(args, key) for key in RESUME_MAY_CHANGE if key in getattr(args, "given", ())}
    for key in RUN_SETTINGS:
        setattr(args, key, config[key])
    for key, value in changes.items():
        setattr(args, key, value)
    args.epochs = epochs or config["epochs"]
    args.precision = precision  # "auto": the precision the run last used (resume_precision)
    return config


def check_resume_flags(args, config):
    """A run's settings come from its config.json: a flag given with --resume that would change one is refused, not ignored."""

    def same(key, value):
        return value == config[key] or (
            key in ("weights", "groups")
            and value
            and config[key]
            and Path(value).resolve() == Path(config[key]).resolve()
        )

    fixed = [key for key in RUN_SETTINGS if key not in ("epochs", "precision", *RESUME_MAY_CHANGE)]
    changed = [key for key in fixed if key in getattr(args, "given", ()) and not same(key, getattr(args, key))]
    if changed:
        flags = ", ".join("--" + key.replace("_", "-") for key in changed)
        raise UserError(
            f"{flags} cannot change when a run is resumed, because the run goes on with the settings in its config.json; "
            "leave them out, or start a new run with them."
        )


def resume_precision(device, requested, config):
    """A resumed run goes on in the precision it last used, unless --precision asks for another or
    the device it now runs on has no fast support for it (fp16 from a GPU resumed on a CPU, bf16 on
    a CPU or GPU without native bf16): then in the device's own choice, with a note."""
    if requested != "auto":
        return choose_precision(device, requested)
    used = (config.get("resumed") or [config])[-1]["precision_used"]
    own = choose_precision(device, "auto")
    if used in ("fp32", own) or (used == "fp16" and device.type == "cuda"):
        return used
    print(f"note: the run trained in {used}, which {device} does not run fast; it goes on in {own}.")
    return own


def read_run_config(run_dir):
    """A run's config.json, with the settings that resuming needs."""
    if run_dir.is_file():
        raise UserError(f"--resume '{run_dir}' is a file; give its run folder, such as --resume {run_dir.parent}.")
    if not run_dir.is_dir():
        raise UserError(f"--resume '{run_dir}' does not exist; give a run folder under outputs/ written by qq.py.")
    if not (run_dir / "config.json").is_file():
        raise UserError(
            f"--resume '{run_dir}' is not a run folder (it has no config.json); give a folder under outputs/ written by qq.py."
        )
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"the config.json of '{run_dir}' is unreadable ({error}), so the run cannot be resumed; start a new run."
        ) from None
    config = {"select": "best"} | config  # runs written before --select kept the best epoch
    missing = [
        key
        for key in RUN_SETTINGS + ("class_names", "class_counts", "precision_used", "pretrained_used", "weights_source")
        if key not in config
    ]
    if missing:
        raise UserError(
            f"the config.json of '{run_dir}' lacks {', '.join(missing)}, so the run cannot be resumed; start a new run."
        )
    return config


def check_resume_data(config, image_set):
    """Resuming needs the images the run started with: the same classes with the same counts."""
    before = ", ".join(f"{n} {c}" for n, c in zip(config["class_names"], config["class_counts"]))
    now = ", ".join(f"{n} {c}" for n, c in zip(image_set.class_names, image_set.class_counts()))
    if before != now:
        raise UserError(
            f"the usable images in '{image_set.root}' changed since the run started (then: {before}; now: {now}); resuming needs the same data, so start a new run instead."
        )


def read_data(args, stop):
    """Scan the data folder, decode every image once, and report what was skipped."""
    image_set, empty = data.scan_folder(args.data, args.class_order)
    for name in empty:
        print(f"warning: class folder '{name}' holds no images and is ignored.")
    if args.remission_upto is not None:  # checked before the slow decode: the grades are known from the folders
        if args.remission_upto not in image_set.class_names:
            raise UserError(
                f"--remission-upto {args.remission_upto!r} is not one of the grades ({', '.join(image_set.class_names)}); name the last grade that counts as remission."
            )
        if args.remission_upto == image_set.class_names[-1]:
            raise UserError(
                f"--remission-upto {args.remission_upto!r} is the most severe grade, which leaves no active grades; name a milder grade."
            )
    resize = data.resize_size_for(args.img_size)
    need = data.estimate_cache_bytes(image_set.paths, resize)
    keep = args.cache == "ram" or (args.cache == "auto" and need < data.available_memory_bytes() / 2)
    print(f"reading {len(image_set.paths)} images from {args.data} ...")
    data.read_images(image_set, resize, keep=keep, stop=stop)
    if stop():
        raise RunInterrupted("stopped while reading the images; nothing was trained, so run qq.py again")
    if keep:
        print(f"decoded images cached in memory: {need / 2**20:.0f} MB")
    else:
        print(f"streaming images from disk (cache {args.cache}; decoded they would need {need / 2**30:.1f} GB)")
    if image_set.skipped:
        print(
            f"warning: skipped {len(image_set.skipped)} file(s) that cannot be used (listed in skipped.csv of the run):"
        )
        for path, reason in image_set.skipped:
            print(f"  {path}: {reason}")
    data.check_class_sizes(image_set)
    print(
        "classes (grade order): "
        + ", ".join(f"{n} ({c})" for n, c in zip(image_set.class_names, image_set.class_counts()))
    )
    return image_set


def make_loaders(args, image_set, train, val, model, device, precision, generator, stop):
    """(train_loader, val_loader, module to train). With --freeze-backbone they yield features."""
    resize = data.resize_size_for(args.img_size)
    workers = args.workers if args.workers >= 0 else data.default_workers(image_set.images is not None, device)
    train_set = data.ImageDataset(image_set, train, data.train_transform(args.img_size), resize)
    val_set = data.ImageDataset(image_set, val, data.val_transform(args.img_size), resize)
    val_loader = data.make_loader(val_set, args.batch_size, workers, device)
    sampler = None
    if args.balance == "sampler":
        labels = np.asarray(image_set.labels)[train]
        weights = 1.0 / np.bincount(labels, minlength=len(image_set.class_names))[labels]
        sampler = torch.utils.data.WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double), len(train), replacement=True, generator=generator
        )
    if not args.freeze_backbone:
        train_loader = data.make_loader(
            train_set, args.batch_size, workers, device, shuffle=True, generator=generator, sampler=sampler
        )
        return train_loader, val_loader, val_set, model
    # Frozen backbone: its features never change, so compute them once per view (the centre crop
    # and its mirror image) and train only the fc layer on them.
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    backbone = torch.nn.Sequential(*list(model.children())[:-1], torch.nn.Flatten())
    train_plain = data.make_loader(
        data.ImageDataset(image_set, train, data.val_transform(args.img_size), resize), args.batch_size, workers, device
    )
    start = time.perf_counter()
    views = [
        engine.extract_features(backbone, train_plain, device, precision, flip=flip, should_stop=stop)[0]
        for flip in (False, True)
    ]
    val_features, val_labels = engine.extract_features(backbone, val_loader, device, precision, should_stop=stop)
    print(
        f"backbone features computed once in {time.perf_counter() - start:.1f} s ({2 * len(train) + len(val)} image views)"
    )
    labels = torch.as_tensor(np.asarray(image_set.labels)[train])
    train_features = data.FeatureViews(torch.stack(views), labels)
    train_loader = data.make_loader(
        train_features, args.batch_size, 0, device, shuffle=True, generator=generator, sampler=sampler
    )
    val_loader = data.make_loader(torch.utils.data.TensorDataset(val_features, val_labels), args.batch_size, 0, device)
    return train_loader, val_loader, val_set, model.fc


def fit(args, image_set, train, val, groups, run_dir, device, precision, imagenet_state, config, stop):
    """Train one model on `train`, validate on `val`, and write every output file into run_dir."""
    class_names = image_set.class_names
    files.write_json(run_dir / "config.json", config)
    subset_of = {int(i): "train" for i in train} | {int(i): "val" for i in val}
    files.write_csv(
        run_dir / "split.csv",
        data.split_rows(image_set, subset_of, groups),
        ["path", "class", "subset"] + (["group"] if groups is not None else []),
    )
    last_path = run_dir / "last.pt"
    last = read_last_checkpoint(last_path, class_names) if last_path.is_file() else None

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = model_from_checkpoint(last, last_path) if last else build_model(len(class_names), imagenet_state)
    model = model.to(device, memory_format=torch.channels_last)

    def checkpoint(epoch, val_metrics, **extra):
        return make_checkpoint(
            model, class_names, args.img_size, epoch, val_metrics, config["pretrained_used"], config, **extra
        )

    history = list(last["history"]) if last else []
    try:  # from here on, a stop keeps what finished and says how to resume
        train_loader, val_loader, val_set, trainable = make_loaders(
            args, image_set, train, val, model, device, precision, generator, stop
        )
        criterion = engine.make_criterion(args.balance, np.asarray(image_set.labels)[train], len(class_names), device)
        optimizer, lr_scheduler = engine.make_optimizer(
            trainable.parameters(), args.lr, args.momentum, args.step_size, args.gamma
        )
        scaler = make_grad_scaler(device, precision)
        step_model = torch.compile(trainable) if args.compile else trainable

        if last:
            optimizer.load_state_dict(last["optimizer"])
            lr_scheduler.load_state_dict(last["lr_scheduler"])
            if last["scaler"] and scaler.is_enabled():  # fp16 state; empty after a bf16 or fp32 epoch
                scaler.load_state_dict(last["scaler"])
            engine.set_rng_state(last["rng"], generator, device)
            print(f"resuming {run_dir} after epoch {last['epoch']} of {args.epochs}")

        for epoch in range(len(history) + 1, args.epochs + 1):
            start = time.perf_counter()
            train_stats = engine.train_one_epoch(
                step_model, criterion, optimizer, train_loader, device, precision, scaler, epoch, args.epochs, stop
            )
            val_loss, val_acc, _, _ = engine.evaluate(step_model, val_loader, device, precision, stop)
            if not math.isfinite(val_loss):
                raise UserError(
                    f"the validation loss became {val_loss} in epoch {epoch}, so the run stopped instead of keeping a broken model; lower the learning rate (for example --lr {args.lr / 10:g})."
                )
            lr = optimizer.param_groups[0]["lr"]
            lr_scheduler.step()
            seconds = time.perf_counter() - start
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_stats["loss"],
                    "train_acc": train_stats["acc"],
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr": lr,
                    "epoch_time_s": seconds,
                    "train_images_per_s": train_stats["images_per_s"],
                }
            )
            improved = engine.best_epoch(history, args.select)["epoch"] == epoch
            if improved:
                save_checkpoint(run_dir / "best.pt", checkpoint(epoch, {"val_acc": val_acc, "val_loss": val_loss}))
            save_checkpoint(
                last_path,
                checkpoint(
                    epoch,
                    {"val_acc": val_acc, "val_loss": val_loss},
                    history=history,
                    rng=engine.rng_state(generator, device),
                    optimizer=optimizer.state_dict(),
                    lr_scheduler=lr_scheduler.state_dict(),
                    scaler=scaler.state_dict(),
                ),
            )
            report.write_history(run_dir / "history.csv", history)
            print(
                f"epoch {epoch}/{args.epochs}  train loss {train_stats['loss']:.4f} acc {train_stats['acc']:.3f}  "
                f"val loss {val_loss:.4f} acc {val_acc:.3f}  lr {lr:.2g}  {seconds:.1f} s "
                f"({train_stats['images_per_s']:.1f} img/s){('  best' if args.select == 'best' else '  saved') if improved else ''}",
                flush=True,
            )
        outputs = evaluate_best(args, image_set, val, groups, run_dir, model, val_set, device, precision, stop, history)
    except (
        RunInterrupted,
        KeyboardInterrupt,
        BrokenPipeError,
    ):  # a second Ctrl-C stops at once; so does output piped into a reader that stopped
        resume_dir = run_dir.parent if "fold" in config else run_dir  # a fold resumes with its whole run
        write_interrupted(run_dir, history, args, resume_dir)
        if history:
            done = f"after epoch {len(history)} of {args.epochs}; {run_dir} keeps best.pt, last.pt, history.csv and curves.png of the finished epochs"
        else:
            done = f"before the first of {args.epochs} epochs finished, so {run_dir} has no checkpoint yet and resuming starts the training from the beginning"
        raise RunInterrupted(f"training stopped {done}. Resume with: python qq.py --resume {resume_dir}") from None
    return outputs


def read_last_checkpoint(path, class_names):
    """The last.pt of a run being resumed: it must hold the training state and the run's classes."""
    last = load_checkpoint(path)
    missing = [key for key in ("optimizer", "lr_scheduler", "scaler", "history", "rng") if key not in last]
    if missing:
        raise UserError(
            f"'{path}' holds no training state ({', '.join(missing)} missing), so the run cannot continue from it; start a new run instead of resuming."
        )
    if last["class_names"] != list(class_names):
        raise UserError(
            f"'{path}' was trained on the classes {', '.join(last['class_names'])}, but the data folder now has {', '.join(class_names)}; the data changed, so start a new run instead of resuming."
        )
    return last


def write_interrupted(run_dir, history, args, resume_dir):
    if history:
        report.plot_curves(history, run_dir / "curves.png")
    best = engine.best_epoch(history, args.select) or {}
    files.write_json(
        run_dir / "metrics.json",
        {
            "status": "interrupted",
            "epochs_completed": len(history),
            "epochs": args.epochs,
            "best_epoch": best.get("epoch"),
            "best_val_acc": best.get("val_acc"),
            "resume": f"python qq.py --resume {resume_dir}",
        },
    )


def evaluate_best(args, image_set, val, groups, run_dir, model, val_set, device, precision, stop, history):
    """Evaluate best.pt on the validation images and write metrics, predictions, plots and the report."""
    class_names = image_set.class_names
    model.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
    val_loader = data.make_loader(val_set, args.batch_size, 0, device)
    val_loss, _, probs, targets = engine.evaluate(model, val_loader, device, precision, stop, desc="best model")
    result = metrics.compute_metrics(targets, probs, class_names, args.remission_upto)
    timing = engine.measure_inference_time(
        model, (val_set[i][0] for i in range(len(val_set))), device, precision, args.batch_size
    )
    result.update(
        {
            "status": "finished",
            "epochs_completed": len(history),
            "epochs": args.epochs,
            "best_epoch": engine.best_epoch(history, args.select)["epoch"],
            "val_loss": val_loss,
            "device": str(device),
            "precision": precision,
            "inference_time": timing,
        }
    )
    extra = {"group": [groups[i] for i in val]} if groups is not None else None
    rows = report.prediction_rows([image_set.relpath(i) for i in val], targets, probs, class_names, extra)
    report.plot_curves(history, run_dir / "curves.png")
    report.write_evaluation(run_dir, result, rows, targets, probs, image_set.root, args.img_size, args.remission_upto)
    cams = write_cams(model, image_set, val, targets, probs, run_dir, args.img_size, args.cam_examples)
    files.write_json(run_dir / "metrics.json", result)
    report.run_report(run_dir, cams)
    print(metrics.format_metrics(result))
    print(
        f"inference on {device} ({precision}): batch 1 mean {timing['batch1_mean_ms']:.1f} ms, median {timing['batch1_median_ms']:.1f} ms, "
        f"p95 {timing['batch1_p95_ms']:.1f} ms per image; {timing['throughput_images_per_s']:.1f} img/s at batch {timing['throughput_batch_size']}"
    )
    if note := metrics.timing_note(timing):
        print(f"note: {note}.")
    return result, probs, targets


def cross_validate(args, image_set, folds, groups, run_dir, device, precision, imagenet_state, config, stop):
    """K-fold cross-validation: K models in fold1..foldK, then the pooled out-of-fold predictions."""
    class_names = image_set.class_names
    fold_of = {int(i): k for k, (_, val) in enumerate(folds, 1) for i in val}
    files.write_csv(
        run_dir / "split.csv",
        data.split_rows(image_set, fold_of, groups, column="fold"),
        ["path", "class", "fold"] + (["group"] if groups is not None else []),
    )
    fold_metrics, pooled_probs, pooled_targets, pooled_index = [], [], [], []
    for k, (train, val) in enumerate(folds, 1):
        fold_dir = run_dir / f"fold{k}"
        fold_dir.mkdir(exist_ok=True)
        if read_status(fold_dir) == "finished":
            result, probs, targets = read_finished_fold(fold_dir, image_set, val)
            print(f"fold {k}/{args.folds} already finished")
        else:
            print(f"\n=== fold {k}/{args.folds}: {len(train)} training, {len(val)} validation images ===")
            try:
                result, probs, targets = fit(
                    args,
                    image_set,
                    train,
                    val,
                    groups,
                    fold_dir,
                    device,
                    precision,
                    imagenet_state,
                    config | {"fold": k},
                    stop,
                )
            except (RunInterrupted, KeyboardInterrupt):
                files.write_json(
                    run_dir / "metrics.json",
                    {
                        "status": "interrupted",
                        "folds": args.folds,
                        "folds_finished": k - 1,
                        "resume": f"python qq.py --resume {run_dir}",
                    },
                )
                raise
        fold_metrics.append(result)
        pooled_probs.append(probs)
        pooled_targets.append(targets)
        pooled_index.extend(int(i) for i in val)
    probs, targets = np.concatenate(pooled_probs), np.concatenate(pooled_targets)
    pooled = metrics.compute_metrics(targets, probs, class_names, args.remission_upto)
    summary = metrics.summarize_folds(fold_metrics)
    files.write_json(
        run_dir / "cv_summary.json",
        {
            "folds": args.folds,
            "grouped": groups is not None,
            "mean_std": summary,
            "pooled_out_of_fold": pooled,
            "per_fold": [
                {
                    name: m[name]
                    for name in list(metrics.SCALARS)
                    + ["num_images", "best_epoch"]
                    + (["remission"] if "remission" in m else [])
                }
                for m in fold_metrics
            ],
        },
    )
    table = metrics.fold_table(summary, fold_metrics, pooled)
    files.write_csv(run_dir / "cv_summary.csv", table, list(table[0].keys()))
    extra = {"fold": [fold_of[i] for i in pooled_index]} | (
        {"group": [groups[i] for i in pooled_index]} if groups is not None else {}
    )
    rows = report.prediction_rows([image_set.relpath(i) for i in pooled_index], targets, probs, class_names, extra)
    report.write_evaluation(
        run_dir, pooled, rows, targets, probs, image_set.root, args.img_size, args.remission_upto, pooled=True
    )
    files.write_json(run_dir / "metrics.json", pooled | {"status": "finished", "folds": args.folds})
    report.cv_report(run_dir, table, pooled)
    print(f"\ncross-validation over {args.folds} folds (mean ± std; pooled out-of-fold):")
    for row in table:
        print(
            f"  {row['metric']:<24}{row['mean'] or 'n/a':>7} ± {row['std'] or 'n/a':<7} pooled {row['pooled'] or 'n/a'}"
        )
    return pooled


def read_status(run_dir):
    """The status in a run folder's metrics.json: finished, interrupted, or None if it has none yet."""
    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def read_finished_fold(fold_dir, image_set, val):
    """The metrics and out-of-fold predictions of a fold that finished before the run was interrupted."""
    rows, targets, probs = report.read_predictions(fold_dir / "predictions.csv", image_set.class_names)
    if [r["path"] for r in rows] != [image_set.relpath(i) for i in val]:
        raise UserError(
            f"the predictions.csv of '{fold_dir}' are not for the images of its fold in split.csv; the run folder changed, so start a new run instead of resuming."
        )
    return json.loads((fold_dir / "metrics.json").read_text()), probs, targets


def plan_split(args, image_set, groups, split=None):
    """[(train, val)]: one hold-out split, or args.folds folds. A resumed run keeps its split.csv (split)."""
    if split is not None:
        column = "fold" if args.folds else "subset"
        subset_of = {i: row[column] for i, row in split.items()}
        names = [str(k) for k in range(1, args.folds + 1)] if args.folds else ["val"]
        return [
            (
                np.array(sorted(i for i, s in subset_of.items() if s != name)),
                np.array(sorted(i for i, s in subset_of.items() if s == name)),
            )
            for name in names
        ]
    if args.folds:
        if "val_split" in getattr(args, "given", ()):
            print(
                f"note: --val-split is not used with --folds {args.folds}: each fold validates on 1/{args.folds} of the images."
            )
        return data.split_folds(image_set.labels, args.folds, args.seed, groups)
    n_splits = data.grouped_holdout_folds(args.val_split)
    if groups is not None and abs(1 / n_splits - args.val_split) > 0.01:
        print(
            f"note: with --groups, the validation side is 1 of {n_splits} groupings of the patients, about {1 / n_splits:.0%} of the images "
            f"rather than the {args.val_split:.0%} of --val-split; pick 0.5, 0.33, 0.25, 0.2 ... to get what you ask."
        )
    return [data.split_holdout(image_set.labels, args.val_split, args.seed, groups)]


def main(args):
    check_args(args)
    resume_dir = Path(args.resume) if args.resume else None
    original = settings_for_resume(args, resume_dir) if resume_dir else None
    args.epochs = args.epochs or DEFAULT_EPOCHS
    device = choose_device(args.device)
    precision = (
        resume_precision(device, args.precision, original) if original else choose_precision(device, args.precision)
    )
    setup_backends(device, precision)

    print_settings(args, device, precision)

    with GracefulStop() as stop:
        image_set = read_data(args, stop)
        if original is not None:
            check_resume_data(original, image_set)
        split = (
            data.read_split(resume_dir / "split.csv", image_set)
            if original is not None and (resume_dir / "split.csv").is_file()
            else None
        )
        if args.groups and split is not None:  # the groups of the split: the groups CSV may have moved with the images
            groups = [split[i]["group"] for i in range(len(image_set.paths))]
        else:
            groups = data.read_groups(args.groups, image_set) if args.groups else None
        if groups is None and original is None:
            print(
                "note: without --groups, images are split one by one; if a patient has several images, some may land in training and others in validation, which flatters the validation metrics. Give --groups patients.csv to keep each patient on one side."
            )
        folds = plan_split(args, image_set, groups, split)
        for train, val in folds:  # every fold, before a run folder exists or a fold trains for nothing
            data.check_split(
                image_set,
                train,
                val,
                groups,
                remedy="use fewer --folds" if args.folds else "use a different --val-split",
            )
        if original is None:
            imagenet_state, source = get_imagenet_weights(args.pretrained, args.weights)
            if args.freeze_backbone and imagenet_state is None:
                print(
                    "warning: --freeze-backbone without ImageNet weights trains only the last layer, on the features of an untrained "
                    "network, which cannot grade well; use the ImageNet weights (see README) or leave out --freeze-backbone."
                )
        else:  # a model that starts afresh (a fold not begun yet) starts as the run's first one did
            model_dirs = [resume_dir / f"fold{k}" for k in range(1, args.folds + 1)] if args.folds else [resume_dir]
            needs_weights = any(not (d / "last.pt").is_file() and read_status(d) != "finished" for d in model_dirs)
            pretrained = "yes" if original["pretrained_used"] and needs_weights else "no"
            imagenet_state, source = (
                get_imagenet_weights(pretrained, args.weights if pretrained == "yes" else None)[0],
                original["weights_source"],
            )
        run_dir = resume_dir or files.new_run_dir(args.out, args.name)
        now = {
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "device": str(device),
            "precision_used": precision,
        }
        if original is None:
            paths = {
                key: str(Path(getattr(args, key)).resolve())
                for key in ("data", "weights", "groups")
                if getattr(args, key)
            }  # for --resume from anywhere
            config = (
                {key: getattr(args, key) for key in RUN_SETTINGS}
                | paths
                | {"run_dir": str(run_dir)}
                | now
                | {
                    "pretrained_used": imagenet_state is not None,
                    "weights_source": source,
                    "class_names": image_set.class_names,
                    "class_counts": image_set.class_counts(),
                    "skipped_files": len(image_set.skipped),
                    "cached_in_memory": image_set.images is not None,
                    "versions": {
                        "python": platform.python_version(),
                        "torch": str(torch.__version__),
                        "torchvision": str(torchvision.__version__),
                    },
                }
            )
        else:  # the record of how the run started stays; each resumption is added to it
            config = original | {
                "epochs": args.epochs,
                "data": str(Path(args.data).resolve()),
                "resumed": original.get("resumed", []) + [now],
            }
        files.write_json(run_dir / "config.json", config)
        files.write_csv(
            run_dir / "skipped.csv", [{"path": str(p), "reason": r} for p, r in image_set.skipped], ["path", "reason"]
        )
        print(f"ImageNet weights: {source}\nrun folder: {run_dir}")
        try:
            if args.folds:
                cross_validate(args, image_set, folds, groups, run_dir, device, precision, imagenet_state, config, stop)
            else:
                fit(args, image_set, *folds[0], groups, run_dir, device, precision, imagenet_state, config, stop)
        except torch.OutOfMemoryError:
            raise UserError(
                f"ran out of GPU memory with --batch-size {args.batch_size}; try a smaller --batch-size, for example {max(1, args.batch_size // 2)}."
            ) from None
        except (RuntimeError, MemoryError) as error:  # MemoryError: Python or NumPy could not allocate
            if isinstance(error, MemoryError) or ("allocate" in str(error) and "memory" in str(error)):
                raise UserError(
                    f"ran out of memory with --batch-size {args.batch_size}; try a smaller --batch-size, for example {max(1, args.batch_size // 2)}, or a smaller --img-size."
                ) from None
            raise
    print(f"\nresults in {run_dir}  (open {run_dir / 'report.html'} in a browser)")
    return 0


def print_settings(args, device, precision):
    print("settings:")
    for key in RUN_SETTINGS:
        print(f"  {key:<16} {getattr(args, key)}")
    print(f"  {'device':<16} {device}\n  {'precision used':<16} {precision}")


if __name__ == "__main__":
    main_entry(main, get_args_parser())
