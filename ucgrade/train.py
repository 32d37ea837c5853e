"""Train: one model on one split, from ImageNet weights or from its last.pt.

train() writes only the model's checkpoints (best.pt, last.pt) and history.csv, after every epoch,
so that a run stopped at any moment keeps its last finished epoch. Evaluation and reports are
evaluate.py's.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data, distributed, engine, files, metrics, presets
from .cli import UserError
from .device import make_grad_scaler
from .distributed import shard
from .model import (
    backbone,
    build_model,
    get_imagenet_weights,
    head,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from .records import write_history


@dataclass
class Training:
    """What an epoch needs: the model, the part of it that learns, the loaders, the loss and the optimiser."""

    model: torch.nn.Module
    trainable: torch.nn.Module  # the model, or its head alone (--freeze-backbone): what validation runs
    step_model: torch.nn.Module  # what the training steps call: trainable, in DistributedDataParallel and compiled
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # every random draw of the loaders: shuffling and the augmentation seeds
    # the last epoch's validation pass (loss, probabilities, targets, features), and that of the kept model's
    # epoch, which evaluate_split then need not run again; None with a frozen backbone, whose validation runs
    # the head alone on features computed before
    validation: tuple = None
    kept_validation: tuple = None
    ema: torch.optim.swa_utils.AveragedModel = None  # --ema: the average of trainable, which is graded and saved
    tta: bool = False  # --tta: validation grades the mean of the flipped pictures' probabilities

    def graded(self):
        """The module that validation runs: the moving average of trainable's weights, or trainable."""
        return self.trainable if self.ema is None else self.ema.module


def initial_weights(args, resumed=None):
    """(ImageNet state_dict or None, where it came from) for the models that start afresh.

    A resumed run needs them only for a fold not begun yet, which starts as the run's first one did.
    """
    if resumed is None:
        state, source = get_imagenet_weights(args.pretrained, args.weights, args.arch)
        if args.freeze_backbone and state is None:
            print(
                "warning: --freeze-backbone without ImageNet weights trains only the last layer, on the features of "
                "an untrained network, which cannot grade well; use the ImageNet weights (see README) or leave out "
                "--freeze-backbone."
            )
        return state, source
    run_dir = Path(args.resume)
    model_dirs = [run_dir / f"fold{k}" for k in range(1, args.folds + 1)] if args.folds else [run_dir]
    afresh = any(not (d / "last.pt").is_file() and files.read_status(d) != "finished" for d in model_dirs)
    if not (afresh and resumed["pretrained_used"]):
        return None, resumed["weights_source"]
    return get_imagenet_weights("yes", args.weights, args.arch)[0], resumed["weights_source"]


def make_loaders(args, image_set, split, model, runtime, generator):
    """(train_loader, val_loader, the module to train). With --freeze-backbone the loaders yield features.

    --batch-size is the global batch: each of several processes loads its share of it, and
    validates on its share of the validation images.
    """
    sampler = balanced_sampler(image_set, split, generator) if args.balance == "sampler" else None
    if args.freeze_backbone:
        train_set, (val_features, val_labels) = frozen_features(args, image_set, split, model, runtime)
        val_set = torch.utils.data.TensorDataset(shard(val_features, runtime), shard(val_labels, runtime))
        workers, model = 0, head(model)
    else:
        resize = presets.resize_size_for(args.img_size)
        transform = presets.train_transform(args.img_size, args.augment)
        train_set = data.ImageDataset(image_set, split.train, transform, resize)
        val_set = data.ImageDataset(image_set, shard(split.val, runtime), presets.val_transform(args.img_size), resize)
        workers = loader_workers(args, image_set, runtime.device)
    batch_size = args.batch_size // runtime.world_size
    train_loader = data.make_loader(
        train_set, batch_size, workers, runtime, shuffle=True, generator=generator, sampler=sampler
    )
    return train_loader, data.make_loader(val_set, batch_size, workers, runtime), model


def loader_workers(args, image_set, device):
    return args.workers if args.workers >= 0 else data.default_workers(image_set.images is not None, device)


def balanced_sampler(image_set, split, generator):
    """Draws training images with replacement so that every grade is drawn about equally often."""
    labels = np.asarray(image_set.labels)[split.train]
    weights = 1.0 / np.bincount(labels, minlength=len(image_set.class_names))[labels]
    weights = torch.as_tensor(weights, dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, len(split.train), replacement=True, generator=generator)


def frozen_features(args, image_set, split, model, runtime):
    """The backbone never changes, so its features are computed once per view (the centre crop and its
    mirror image; with --augment endoscopy every flip of TTA_FLIPS), and only the head trains on them:
    (training features, validation features; with --tta those of every view, N x V x D)."""
    for p in model.parameters():
        p.requires_grad_(False)
    head(model).requires_grad_(True)
    features = backbone(model)
    resize, workers = presets.resize_size_for(args.img_size), loader_workers(args, image_set, runtime.device)

    def loader(indices):  # this process's share: extract_features gathers the features of all
        dataset = data.ImageDataset(image_set, shard(indices, runtime), presets.val_transform(args.img_size), resize)
        return data.make_loader(dataset, args.batch_size, workers, runtime)

    start = time.perf_counter()
    flips = presets.TTA_FLIPS if presets.AUGMENTS[args.augment].vflip_prob else ((), (3,))
    views = [engine.extract_features(features, loader(split.train), runtime, flip=dims)[0] for dims in flips]
    val_flips = presets.TTA_FLIPS if args.tta else ((),)
    val_views = [engine.extract_features(features, loader(split.val), runtime, flip=dims) for dims in val_flips]
    val_labels = val_views[0][1]
    val_features = torch.stack([v[0] for v in val_views], 1) if args.tta else val_views[0][0]
    seconds, count = time.perf_counter() - start, len(flips) * len(split.train) + len(val_flips) * len(split.val)
    print(f"backbone features computed once in {seconds:.1f} s ({count} image views)")
    labels = torch.as_tensor(np.asarray(image_set.labels)[split.train])
    return data.FeatureViews(torch.stack(views), labels), (val_features, val_labels)


def prepare(args, image_set, split, model, runtime, generator):
    """The Training of a model: its loaders, loss, optimiser, schedule and loss scaling."""
    train_loader, val_loader, trainable = make_loaders(args, image_set, split, model, runtime, generator)
    if args.sync_bn and runtime.world_size > 1:  # before the optimiser is made, so that it holds these layers
        trainable = distributed.sync_batch_norm(trainable, runtime)
    train_labels = np.asarray(image_set.labels)[split.train]
    criterion = engine.make_criterion(
        args.balance, train_labels, len(image_set.class_names), runtime.device, args.loss, args.cdw_alpha,
        args.label_smoothing,
    )  # fmt: skip
    optimizer, lr_scheduler = engine.make_optimizer(trainable.parameters(), args)
    scaler = make_grad_scaler(runtime.device, runtime.precision)
    ema = engine.make_ema(trainable, args.ema)
    step_model = distributed.wrap(trainable, runtime)
    step_model = torch.compile(step_model) if args.compile else step_model
    loaders = (train_loader, val_loader)
    return Training(
        model,
        trainable,
        step_model,
        *loaders,
        criterion,
        optimizer,
        lr_scheduler,
        scaler,
        generator,
        ema=ema,
        tta=args.tta,
    )


def run_epoch(training, epoch, runtime):
    """Train one epoch and validate; the epoch's row of history.csv."""
    start = time.perf_counter()
    optimizer = training.optimizer
    ema = (training.ema, training.trainable) if training.ema is not None else None
    stats = engine.train_one_epoch(
        training.step_model, training.criterion, optimizer, training.train_loader, runtime, epoch, training.scaler, ema
    )
    whole = training.trainable is training.model  # --freeze-backbone validates the head alone, on features
    val_loss, val_acc, *validation = engine.evaluate(
        training.graded(), training.val_loader, runtime, features=whole, tta=training.tta
    )
    training.validation = (val_loss, *validation) if whole else None
    probs, targets = validation[:2]
    if not math.isfinite(val_loss):
        lower = optimizer.param_groups[0]["initial_lr"] / 10
        raise UserError(
            f"the validation loss became {val_loss} in epoch {epoch}, so the run stopped instead of keeping a "
            f"broken model; lower the learning rate (for example --lr {lower:g})."
        )
    lr = optimizer.param_groups[0]["lr"]
    training.lr_scheduler.step()
    return {
        "epoch": epoch,
        "train_loss": stats["loss"],
        "train_acc": stats["acc"],
        "val_loss": val_loss,
        "val_acc": val_acc,
        "val_qwk": metrics.qwk(targets, probs.argmax(1), np.arange(probs.shape[1])),
        "lr": lr,
        "epoch_time_s": time.perf_counter() - start,
        "train_images_per_s": stats["images_per_s"],
    }


def train(args, image_set, split, runtime, imagenet_state, config):
    """Train one model on split.train, validating on split.val after every epoch: (history, model, the kept
    model's validation pass or None when it was not run here: a frozen backbone, or an epoch before a resume).

    A model whose folder holds a last.pt goes on from it, with every random state restored.
    """
    if split.fold:
        print(
            f"\n=== fold {split.fold}/{args.folds}: {len(split.train)} training, {len(split.val)} validation images ==="
        )
    last_path = split.run_dir / "last.pt"
    last = read_last_checkpoint(last_path, image_set.class_names) if last_path.is_file() else None
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if last:
        model = model_from_checkpoint(last, last_path)
        if "raw_model" in last:  # with --ema, "model" holds the average, and training goes on from its own weights
            model.load_state_dict(last["raw_model"])
    else:
        model = build_model(len(image_set.class_names), imagenet_state, args.arch)
    model = model.to(runtime.device, memory_format=torch.channels_last)
    training = prepare(args, image_set, split, model, runtime, generator)
    history = list(last["history"]) if last else []
    if last:
        restore(training, last, runtime)
        print(f"resuming {split.run_dir} after epoch {last['epoch']} of {args.epochs}")
    for epoch in range(len(history) + 1, args.epochs + 1):
        history.append(run_epoch(training, epoch, runtime))
        kept = save(training, history, split.run_dir, config, runtime)
        row = history[-1]
        print(
            f"epoch {epoch}/{args.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}  lr {row['lr']:.2g}  "
            f"{row['epoch_time_s']:.1f} s ({row['train_images_per_s']:.1f} img/s)"
            + (("  saved" if args.select == "last" else "  best") if kept else ""),
            flush=True,
        )
    return history, model, training.kept_validation


def save(training, history, run_dir, config, runtime):
    """Write last.pt (with the training state), best.pt when this epoch's model is kept (by config's
    --select), and history.csv; only the main process writes. True when this epoch's model is kept."""
    row = history[-1]
    val_metrics = {"val_acc": row["val_acc"], "val_loss": row["val_loss"]}
    kept = engine.best_epoch(history, config["select"])["epoch"] == row["epoch"]
    if kept:
        training.kept_validation = training.validation
    graded = graded_weights(training)
    if kept and runtime.is_main:
        save_checkpoint(
            run_dir / "best.pt", make_checkpoint(training.model, config, row["epoch"], val_metrics) | graded
        )
    if not runtime.is_main:
        return kept
    state = {
        "history": history,
        "rng": engine.rng_state(training.generator, runtime.device),
        "optimizer": training.optimizer.state_dict(),
        "lr_scheduler": training.lr_scheduler.state_dict(),
        "scaler": training.scaler.state_dict(),
    }
    if training.ema is not None:
        state |= {"raw_model": cpu_state(training.model), "ema_updates": int(training.ema.n_averaged)}
    last = make_checkpoint(training.model, config, row["epoch"], val_metrics, **state) | graded
    save_checkpoint(run_dir / "last.pt", last)
    write_history(run_dir / "history.csv", history)
    return kept


def graded_weights(training):
    """{"model": the weights that grade} when they are the moving average's (--ema), else {} (the model's own)."""
    if training.ema is None:
        return {}
    prefix = trainable_prefix(training)
    averaged = {prefix + k: v for k, v in cpu_state(training.ema.module).items()}
    return {"model": cpu_state(training.model) | averaged}


def trainable_prefix(training):
    """Where trainable sits in the model: '' for the model itself, 'fc.' for a ResNet's head alone."""
    name = next(name for name, module in training.model.named_modules() if module is training.trainable)
    return name + "." if name else ""


def cpu_state(module):
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def restore(training, last, runtime):
    """The optimiser, schedule, loss scaling, moving average and random states of a last.pt."""
    if training.ema is not None:
        prefix = trainable_prefix(training)
        averaged = {k.removeprefix(prefix): v for k, v in last["model"].items() if k.startswith(prefix)}
        training.ema.module.load_state_dict(averaged)
        training.ema.n_averaged.fill_(last["ema_updates"])
    training.optimizer.load_state_dict(last["optimizer"])
    training.lr_scheduler.load_state_dict(last["lr_scheduler"])
    if last["scaler"] and training.scaler.is_enabled():  # fp16 state; empty after a bf16 or fp32 epoch
        training.scaler.load_state_dict(last["scaler"])
    engine.set_rng_state(last["rng"], training.generator, runtime.device)


def read_last_checkpoint(path, class_names):
    """The last.pt of a run being resumed: it must hold the training state and the run's classes."""
    last = load_checkpoint(path)
    missing = [key for key in ("optimizer", "lr_scheduler", "scaler", "history", "rng") if key not in last]
    if missing:
        raise UserError(
            f"'{path}' holds no training state ({', '.join(missing)} missing), so the run cannot continue from it; "
            "start a new run instead of resuming."
        )
    if last["class_names"] != list(class_names):
        raise UserError(
            f"'{path}' was trained on the classes {', '.join(last['class_names'])}, but the data folder now has "
            f"{', '.join(class_names)}; the data changed, so start a new run instead of resuming."
        )
    return last
