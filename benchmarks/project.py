"""The project's own training and inference, timed for benchmarks/speed.py: qq.py's cache, loaders, criterion,
engine.train_one_epoch and engine.evaluate over whole epochs, its steps alone, the model as predict.py loads it,
and an epoch of each recipe in turns. benchmarks/ablations.py starts from the same settings (project_args).
"""

import argparse
import dataclasses
import itertools
import statistics
import time
from pathlib import Path

import torch

from ucgrade import data, engine, presets, train
from ucgrade.device import Runtime, setup_backends
from ucgrade.model import build_model, load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from ucgrade.splits import VAL_SPLIT_DEFAULT, Split, split_holdout

RECIPE = presets.RECIPES[presets.DEFAULT_RECIPE]  # the recipe that qq.py trains with by default


def project_args(data_dir, img_size, **overrides):
    """The method's settings, as qq.py trains by default (the recipe, and its other options off), for the images
    in data_dir at img_size; overrides change them."""
    settings = dataclasses.asdict(RECIPE) | {"data": str(data_dir), "img_size": img_size, "seed": 0, "workers": -1}
    settings |= {"val_split": VAL_SPLIT_DEFAULT, "cache": "auto", "balance": "none", "resume": None}
    settings |= dict.fromkeys(("class_order", "remission_upto", "groups"))
    settings |= dict.fromkeys(("freeze_backbone", "sync_bn", "compile"), False)
    return argparse.Namespace(**settings | overrides)


def the_benchmarks(args):
    """The settings of the project's training that the benchmark's own flags set."""
    return {"seed": args.seed, "workers": args.workers, "batch_size": args.batch_size or RECIPE.batch_size}


def train_project(run_args, image_set, split, device, precision, epochs):
    """The project's training without its files: train.prepare and train.run_epoch, as qq.py runs them."""
    runtime = Runtime(device, precision)
    setup_backends(device, precision)
    torch.manual_seed(run_args.seed)
    generator = torch.Generator().manual_seed(run_args.seed)
    model = build_model(len(image_set.class_names)).to(device, memory_format=torch.channels_last)
    start = time.perf_counter()
    training = train.prepare(run_args, image_set, split, model, runtime, generator)
    setup_s = time.perf_counter() - start  # with --freeze-backbone: computing the features
    history = []
    for epoch in range(1, epochs + 1):
        row = train.run_epoch(training, epoch, runtime)
        train_s = len(split.train) / row["train_images_per_s"]
        epoch_s, val_s = row["epoch_time_s"], row["epoch_time_s"] - train_s
        history.append({"epoch": epoch, "train_s": train_s, "val_s": val_s, "epoch_s": epoch_s} | row)
        print(
            f"  epoch {epoch}/{epochs}: {epoch_s:.1f} s (train {train_s:.1f} s, val {val_s:.1f} s), "
            f"val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.3f}",
            flush=True,
        )
    resize = presets.resize_size_for(run_args.img_size)
    val_set = data.ImageDataset(image_set, split.val, presets.val_transform(run_args.img_size), resize)
    parts = {"model": model, "training": training, "runtime": runtime, "val_set": val_set}
    return history, setup_s, parts


def time_recipes(args, data_dir, device, precision):
    """Whole epochs of --recipe endoscopy (its augmentation, loss, schedule and EMA) against seed: the two trained
    in turn, epoch by epoch, on the same split, so that a machine whose speed drifts slows both alike. The first
    epoch pays for warm-up; the median of the others is compared (issue 21: at most +10%)."""
    runtime, image_set, trainings = Runtime(device, precision), None, {}
    for name in ("seed", "endoscopy"):
        recipe = dataclasses.asdict(presets.RECIPES[name]) | {"recipe": name, "epochs": args.epochs}
        recipe.pop("img_size")
        run_args = project_args(data_dir, args.img_size, **recipe | the_benchmarks(args))
        image_set = image_set or data.read_data(run_args)
        split = Split(*split_holdout(image_set.labels, run_args.val_split, run_args.seed), run_dir=None)
        torch.manual_seed(run_args.seed)
        model = build_model(len(image_set.class_names)).to(device, memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(run_args.seed)
        trainings[name] = train.prepare(run_args, image_set, split, model, runtime, generator)
    seconds = {name: [] for name in trainings}
    for epoch in range(1, args.epochs + 1):
        for name, training in trainings.items():
            seconds[name].append(train.run_epoch(training, epoch, runtime)["epoch_time_s"])
            print(f"  {name} epoch {epoch}/{args.epochs}: {seconds[name][-1]:.1f} s", flush=True)
    median = {name: statistics.median(times[1:] or times) for name, times in seconds.items()}
    extra = median["endoscopy"] / median["seed"] - 1
    return {"epoch_s": median, "epochs": seconds, "extra": extra, "images": len(image_set.paths)}


def time_project_steps(parts, steps):
    """engine.train_one_epoch over batches already in memory: the training steps without data loading."""
    training = parts["training"]
    batches = list(itertools.islice(itertools.cycle(training.train_loader), steps + 1))

    def run(batches):
        return engine.train_one_epoch(
            training.trainable, training.criterion, training.optimizer, batches, parts["runtime"], 0, training.scaler
        )

    run(batches[:1])  # warm-up
    return run(batches[1:])["images_per_s"], len(batches[0][0])


def time_project_inference(model, class_names, img_size, val_set, device, precision, batch_size, folder):
    """The model as predict.py loads it (save, load_checkpoint, model_from_checkpoint), timed by
    engine.measure_inference_time."""
    path = Path(folder) / "best.pt"
    start = time.perf_counter()
    config = {"class_names": class_names, "img_size": img_size}
    save_checkpoint(path, make_checkpoint(model, config, 1, {}))
    save_s = time.perf_counter() - start
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path).to(device).eval()
    crops = (val_set[i][0] for i in range(len(val_set)))
    timing = engine.measure_inference_time(model, crops, device, precision, batch_size)
    return timing | {"checkpoint_save_s": save_s, "checkpoint_mb": path.stat().st_size / 2**20}
