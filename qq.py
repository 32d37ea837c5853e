"""Fine-tune an ImageNet classifier (ResNet50 by default) to grade the endoscopic severity of ulcerative colitis.

Put the images in data/<grade>/<image> (one sub-folder per grade, in grade order), then:

    python qq.py                                       # train on data/ with the method's defaults
    python qq.py --epochs 3 --img-size 128             # a quick run on a CPU
    python qq.py --data /path/to/images --remission-upto mayo1
    python qq.py --data images --groups patients.csv --folds 5
    python qq.py --arch efficientnet_b0                # another backbone
    python qq.py --resume outputs/train2               # continue an interrupted run
    torchrun --nproc-per-node 4 qq.py --data images    # one model on 4 GPUs (--batch-size stays the global batch)

Each run writes a new folder under outputs/ (train, train2, ...) with best.pt, last.pt,
history.csv, curves.png, confusion matrices, metrics.json, predictions.csv and report.html.
"""

import argparse
import math
import os
import sys
from pathlib import Path

# Only what parsing needs: torch and the modules that use it load in main, so --help answers at once.
from ucgrade import files
from ucgrade.cli import ARCHITECTURE_NAMES, DEFAULT_ARCH, PRECISIONS, ArgumentParser, UserError, main_entry
from ucgrade.presets import DEFAULT_RECIPE, RECIPES
from ucgrade.splits import VAL_SPLIT_DEFAULT

EXAMPLES = """examples:
  python qq.py
  python qq.py --data images --remission-upto mayo1 --folds 5
  python qq.py --resume outputs/train2"""


def get_args_parser():
    parser = ArgumentParser(
        description="Fine-tune an ImageNet classifier to grade the endoscopic severity of ulcerative colitis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    add = parser.add_argument
    recipe = RECIPES[DEFAULT_RECIPE]
    add("--data", default="data", help="folder with one sub-folder of images per grade (default: %(default)s)")
    add("--out", default="outputs", help="folder that receives a new run folder (default: %(default)s)")
    add("--name", default=None, help="run folder name; a number is added if it exists (default: train, train2, ...)")
    add("--arch", default=DEFAULT_ARCH, choices=ARCHITECTURE_NAMES, help="the backbone (default: %(default)s)")
    add("--epochs", type=int, default=recipe.epochs, help="training epochs (default: %(default)s)")
    add("--batch-size", type=int, default=recipe.batch_size, help="images per training step (default: %(default)s)")
    add("--lr", type=float, default=recipe.lr, help="SGD learning rate (default: %(default)s)")
    add("--momentum", type=float, default=recipe.momentum, help="SGD momentum (default: %(default)s)")
    add(
        "--step-size",
        type=int,
        default=recipe.step_size,
        help="StepLR: multiply the lr by --gamma every this many epochs (default: %(default)s)",
    )
    add("--gamma", type=float, default=recipe.gamma, help="StepLR decay factor (default: %(default)s)")
    add(
        "--val-split",
        type=float,
        default=VAL_SPLIT_DEFAULT,
        help="fraction of each class held out for validation (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="seed of the split, the initialisation and the augmentation (default: 0)")
    add(
        "--img-size", type=int, default=recipe.img_size, help="input size in pixels, at least 64 (default: %(default)s)"
    )
    add("--workers", type=int, default=-1, help="data loading processes; -1 suits them to the device (default: -1)")
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
        help="ImageNet weights: auto falls back to random weights if they cannot be had, yes insists, no skips them "
        "(default: %(default)s)",
    )
    add(
        "--weights",
        default=None,
        help="a local ImageNet state_dict of --arch, for machines without internet (default: none)",
    )
    add(
        "--class-order",
        default=None,
        help="the grades from mildest to most severe, comma-separated (default: folder names, sorted)",
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
        "--patient-grade",
        default="max",
        choices=("max", "mean-prob"),
        help="with --groups, a patient's predicted grade: the worst of their images' (Mayo), or that of their "
        "images' mean probabilities (default: %(default)s)",
    )
    add(
        "--folds", type=int, default=0, metavar="K", help="K-fold cross-validation, K >= 2; 0 is one split (default: 0)"
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
        help="the epoch whose model becomes best.pt and is evaluated: best validation accuracy, or last, chosen "
        "without looking at the validation images, for figures that are not optimistic (default: %(default)s)",
    )
    add(
        "--sync-bn",
        action="store_true",
        help="under torchrun, batch norm over the global batch instead of each process's share (default: off)",
    )
    add(
        "--freeze-backbone",
        action="store_true",
        help="train only the new head on features computed once (default: off)",
    )
    add(
        "--cache",
        default="auto",
        choices=("auto", "ram", "off"),
        help="keep decoded images in memory; auto does so when they fit in half the free memory (default: auto)",
    )
    add("--compile", action="store_true", help="torch.compile the model; on a CPU it trains no faster (default: off)")
    add("--cam-examples", type=int, default=6, help="Grad-CAM overlays of validation images in the report (default: 6)")
    add(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its last.pt, with its settings (default: none)",
    )
    add(
        "--quiet",
        action="store_true",
        help="no progress bars, nor a line per phase in a log; the epoch lines and the results stay (the same as "
        "TQDM_DISABLE=1) (default: off)",
    )
    return parser


def check_args(args):
    """Reject impossible settings before any work starts."""
    from ucgrade import distributed, groups

    checks = [
        (args.epochs >= 1, f"--epochs must be at least 1 (got {args.epochs})"),
        (args.batch_size >= 1, f"--batch-size must be at least 1 (got {args.batch_size})"),
        (0 < args.val_split < 1, f"--val-split must be between 0 and 1, for example 0.2 (got {args.val_split})"),
        (
            args.img_size >= 64,
            f"--img-size must be at least 64 pixels, because {args.arch} shrinks its input 32-fold "
            f"(got {args.img_size})",
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
    processes = distributed.env_world_size()
    checks.append(
        (
            args.batch_size % processes == 0,
            f"--batch-size {args.batch_size} does not divide among the {processes} processes that torchrun "
            f"starts, and it is the global batch; give a multiple of {processes}, such as "
            f"{processes * max(1, args.batch_size // processes)}",
        )
    )
    for ok, message in checks:
        if not ok:
            raise UserError(message + ".")
    if args.name is not None and (args.name in ("", ".", "..") or Path(args.name).name != args.name):
        raise UserError(
            f"--name '{args.name}' must be a plain folder name, without '/'; the run folder goes under --out."
        )
    files.check_folder_path(args.out, "--out")
    files.check_writable(args.resume or args.out, "--resume" if args.resume else "--out")
    files.check_data_folder(args.data, args.out)
    # a resumed run needs neither file (groups come from its split.csv, weights only for a fold not begun)
    for flag, value in (("--weights", args.weights), ("--groups", args.groups)) if not args.resume else ():
        if value and Path(value).is_dir():
            raise UserError(f"{flag} '{value}' is a folder; give the file itself.")
        if value and not Path(value).is_file():
            raise UserError(f"{flag} file '{value}' does not exist; check the path.")
    if args.groups and not args.resume:
        groups.read_group_file(args.groups)  # its format, before any image is read
    if isinstance(args.class_order, str):
        args.class_order = [name.strip() for name in args.class_order.split(",") if name.strip()]


def main(args):
    from ucgrade import data, evaluate, metrics, settings, splits, train
    from ucgrade.device import explain_out_of_memory, make_runtime
    from ucgrade.interrupt import GracefulStop

    args, resumed = settings.resolve(args, get_args_parser())
    check_args(args)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # progress.quiet() reads it, in every loop of the run
    scanned = data.scan_data(args)  # the layout and the grade names: before the banner and any download
    runtime = make_runtime(args.device, args.precision, settings.precision_used(resumed))
    settings.print_settings(args, runtime)

    with GracefulStop() as stop, files.run_lock(args.resume if runtime.is_main else None):
        runtime.stop = stop
        imagenet_state, source = train.initial_weights(args, resumed)  # a bad --weights file before the images
        image_set = data.read_data(args, stop, scanned)
        if resumed:
            settings.check_same_data(resumed, image_set)
        plan = splits.plan(args, image_set, resumed)  # before check_same_files, so that a missing image is named
        if resumed:
            settings.check_same_files(resumed, image_set)
        run_dir = settings.run_folder(args, runtime)
        config = settings.write_config(args, run_dir, image_set, runtime, (imagenet_state is not None, source), resumed)
        print(f"ImageNet weights: {source}\nrun folder: {run_dir}")
        if not config["pretrained_used"]:
            print(f"warning: {metrics.RANDOM_WEIGHTS}.")

        evaluations = []
        with explain_out_of_memory(args.batch_size):
            for split in splits.open_folders(args, run_dir, image_set, plan, config, runtime):
                if split.finished:
                    evaluations.append(evaluate.read_finished(split, image_set, args.folds))
                    continue
                with evaluate.keep_when_interrupted(args, split, runtime):
                    history, model, validation = train.train(args, image_set, split, runtime, imagenet_state, config)
                    evaluation = evaluate.evaluate_split(args, image_set, split, model, history, runtime, validation)
                    evaluations.append(evaluation)
            if args.folds and runtime.is_main:
                evaluations.append(evaluate.cross_validation(args, image_set, run_dir, plan[0], evaluations))
    print(f"\nresults in {run_dir}  (open {run_dir / 'report.html'} in a browser)")
    if failed := evaluate.failures_line(evaluations):
        print(f"warning: {failed}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    main_entry(main, get_args_parser())
