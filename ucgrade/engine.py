"""Engine: one training epoch, one evaluation pass, prediction, features and timing."""

import itertools
import math
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

from . import distributed
from .cli import RunInterrupted, UserError
from .device import autocast, make_grad_scaler, synchronize
from .model import head_inputs
from .presets import IMAGENET_MEAN, IMAGENET_STD, normalize
from .progress import progress


def to_input(batch, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 images are moved and normalised on the device; float tensors (features) are only moved."""
    batch = batch.to(device, non_blocking=True)
    return normalize(batch, mean, std) if batch.dtype == torch.uint8 else batch


def _check_stop(runtime, collective=False):
    """Stop on Ctrl-C or SIGTERM. Several processes agree first (collective), at a point every one reaches."""
    if collective or runtime.world_size == 1:
        if runtime.should_stop():
            raise RunInterrupted("stop requested")


def _check_finite(loss, epoch, step):
    if not math.isfinite(loss):
        raise UserError(
            f"the training loss became {loss} in epoch {epoch}, batch {step}, so the run stopped instead of "
            "training on garbage; "
            "lower the learning rate (for example --lr 0.0001) or check the images for extreme values."
        )


def make_criterion(balance, train_labels, num_classes, device):
    """Cross-entropy; with balance="weights", weighted by scikit-learn's "balanced" class weights."""
    if balance != "weights":
        return torch.nn.CrossEntropyLoss()
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(train_labels))
    return torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))


def make_optimizer(parameters, lr, momentum, step_size, gamma):
    """The method's optimiser and schedule: SGD with momentum, and StepLR stepped once per epoch."""
    optimizer = torch.optim.SGD([p for p in parameters if p.requires_grad], lr=lr, momentum=momentum)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


def rng_state(generator, device):
    """Every random state that training draws from, for an exact --resume."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, generator, device):
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def best_epoch(history, select="best"):
    """The history row of the epoch whose model is kept: the highest validation accuracy, ties to
    the lower loss; or, with select="last", the last epoch, chosen without the validation results."""
    if select == "last":
        return history[-1] if history else None
    return max(history, key=lambda row: (row["val_acc"], -row["val_loss"]), default=None)


def train_one_epoch(model, criterion, optimizer, data_loader, runtime, epoch=0, scaler=None):
    """Train for one pass over data_loader; return the mean loss, the accuracy and images/s.

    scaler: the GradScaler of fp16 training (None: no loss scaling, as bf16 and fp32 need none).
    """
    device = runtime.device
    scaler = scaler or make_grad_scaler(device, "fp32")
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    # no line of its own in a log: train.py prints one per epoch
    bar = progress(data_loader, f"epoch {epoch} train", "batches", log=False, disable=not runtime.is_main)
    for step, (images, targets) in enumerate(bar, 1):
        images, targets = to_input(images, device), targets.to(device, non_blocking=True)
        with autocast(device, runtime.precision):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # one device-to-host copy per step (and with several processes one all_reduce, so that every
        # process sees the global batch's loss and every stop), for the progress bar and the checks; a
        # diverged step changes only the weights in memory, never a checkpoint, because the run stops here
        n = torch.tensor(float(targets.size(0)), device=device)
        stop = torch.tensor(float(runtime.stop()), device=device)
        values = torch.stack([loss.detach().float() * n, (logits.argmax(1) == targets).sum().float(), n, stop])
        if runtime.world_size > 1:
            distributed.dist.all_reduce(values)
        loss_sum, batch_correct, n, stop = values.tolist()
        _check_finite(loss_sum / n, epoch, step)
        if stop:
            raise RunInterrupted("stop requested")
        total_loss += loss_sum
        correct += int(batch_correct)
        seen += int(n)
        bar.set_postfix(
            loss=f"{total_loss / seen:.4f}",
            acc=f"{correct / seen:.3f}",
            img_s=f"{seen / (time.perf_counter() - start):.1f}",
        )
    bar.close()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "acc": correct / max(seen, 1),
        "images_per_s": seen / seconds,
        "seconds": seconds,
    }


@torch.inference_mode()
def evaluate(model, data_loader, runtime, desc="val", features=False):
    """Run the model over data_loader; return (loss, accuracy, probabilities N x C, targets N), and with
    features=True also the features its head read in the same pass (N x D), for the out-of-distribution check.

    The loss is the plain (unweighted) cross-entropy, whatever loss training used.

    The metrics come from all predictions of the whole set, never from averages of batch averages.
    With several processes, each runs over its share of the set, and the shares are gathered in order.
    """
    model.eval()
    all_logits, all_targets, all_features = [], [], []
    bar = progress(data_loader, desc, "batches", log=False, disable=not runtime.is_main)
    for images, targets in bar:
        _check_stop(runtime)
        # the head's input is collected only when asked for: a frozen backbone's loop evaluates the head alone
        with (
            autocast(runtime.device, runtime.precision),
            head_inputs(model) if features else nullcontext() as head_read,
        ):
            logits = model(to_input(images, runtime.device))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
        if features:
            all_features.append(head_read[0].float().cpu())
    logits = distributed.gather(torch.cat(all_logits) if all_logits else torch.empty(0), runtime)
    targets = distributed.gather(torch.cat(all_targets) if all_targets else torch.empty(0, dtype=torch.long), runtime)
    _check_stop(runtime, collective=True)
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    probs = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    targets = targets.numpy()
    accuracy = float((probs.argmax(1) == targets).mean())
    if not features:
        return loss, accuracy, probs, targets
    features = distributed.gather(torch.cat(all_features) if all_features else torch.empty(0), runtime)
    return loss, accuracy, probs, targets, features.numpy()


@torch.inference_mode()
def extract_features(backbone, data_loader, runtime, flip=False):
    """The backbone's features (N x D) of every image in data_loader, optionally mirrored (gathered in
    order from every process's share, as evaluate() gathers)."""
    backbone.eval()
    features, targets = [], []
    desc = "features" + (" (mirrored)" if flip else "")
    for images, labels in progress(data_loader, desc, "batches", disable=not runtime.is_main):
        _check_stop(runtime)
        images = to_input(images, runtime.device)
        if flip:
            images = images.flip(3)
        with autocast(runtime.device, runtime.precision):
            features.append(backbone(images).float().cpu())
        targets.append(labels)
    features = distributed.gather(torch.cat(features) if features else torch.empty(0), runtime)
    targets = distributed.gather(torch.cat(targets) if targets else torch.empty(0, dtype=torch.long), runtime)
    _check_stop(runtime, collective=True)
    return features, targets


# ----------------------------------------------------------------------------- timing


def time_each(run, inputs, warmup=5):
    """Milliseconds of run(x) for each x of inputs, after warmup calls; run synchronises the device itself."""
    for x in (inputs * warmup)[:warmup]:
        run(x)
    times = []
    for x in inputs:
        start = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - start) * 1000)
    return times


@torch.inference_mode()
def measure_inference_time(model, images, device, precision, batch_size, max_images=50, warmup=5):
    """Honest inference timing on already decoded, cropped uint8 images (list of 3 x H x W tensors).

    Batch size 1: warm up, then time each image from host tensor to prediction, synchronising the
    device before the clock is read. Also the throughput at batch_size.
    """
    model.eval()
    images = list(itertools.islice(images, max_images))  # a generator is only decoded this far

    def run(batch):
        with autocast(device, precision):
            logits = model(to_input(batch, device))
        logits.argmax(1)
        synchronize(device)

    times = time_each(run, [image.unsqueeze(0) for image in images], warmup)

    reps = max(1, math.ceil(2 * batch_size / len(images)))  # at least two full batches
    full = torch.stack(images).repeat(reps, 1, 1, 1)
    batches = list(full.split(batch_size))
    batches = [b for b in batches if len(b) == batch_size] or [batches[0]]
    run(batches[0])
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    seconds = time.perf_counter() - start
    return {
        "device": str(device),
        "precision": precision,
        "images_timed": len(times),
        "batch1_mean_ms": statistics.fmean(times),
        "batch1_median_ms": statistics.median(times),
        "batch1_p95_ms": float(np.percentile(times, 95)),
        "throughput_batch_size": len(batches[0]),
        "throughput_images_per_s": sum(len(b) for b in batches) / seconds,
    }
