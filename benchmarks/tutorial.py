"""The baseline of benchmarks/speed.py: the PyTorch transfer-learning tutorial's loop, on the same split.

fp32, eager, batch 4, 4 workers, torchvision ImageFolder decoding every JPEG every epoch; its whole epochs,
its steps alone, and its batch-1 inference.
"""

import itertools
import statistics
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torchvision import datasets, transforms

from ucgrade import engine, presets
from ucgrade.device import setup_backends, synchronize


def tutorial_loaders(root, paths, train, val, img_size, batch_size=4, workers=4):
    """The tutorial's ImageFolder datasets and loaders (decoding every JPEG every epoch), on the same split."""
    # 4 workers on a 2-core machine are part of what the baseline measures; torch's warning says so too
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    mean_std = transforms.Normalize(presets.IMAGENET_MEAN, presets.IMAGENET_STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(img_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), mean_std]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(presets.resize_size_for(img_size)),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            mean_std,
        ]
    )
    loaders = []
    for indices, tf, shuffle in ((train, train_tf, True), (val, val_tf, False)):
        folder = datasets.ImageFolder(root, tf)
        position = {Path(path): i for i, (path, _) in enumerate(folder.samples)}
        subset = torch.utils.data.Subset(folder, [position[paths[i]] for i in indices])
        loaders.append(torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=shuffle, num_workers=workers))
    return loaders


def tutorial_model(num_classes, device, seed):
    setup_backends(device, "fp32")  # true fp32 on a GPU (no TF32), as the project's fp32
    torch.manual_seed(seed)
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model.to(device)


def tutorial_step(model, criterion, optimizer, inputs, labels, device):
    inputs, labels = inputs.to(device), labels.to(device)
    optimizer.zero_grad()
    outputs = model(inputs)
    loss = criterion(outputs, labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_tutorial(model, train_loader, val_loader, device, epochs):
    """The tutorial's train_model loop: a train phase and a val phase per epoch."""
    criterion = torch.nn.CrossEntropyLoss()
    # the tutorial's own values (the seed recipe took them): the baseline stays the tutorial if the recipe changes
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        for inputs, labels in train_loader:
            tutorial_step(model, criterion, optimizer, inputs, labels, device)
        lr_scheduler.step()
        synchronize(device)
        val_start = time.perf_counter()
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for inputs, labels in val_loader:
                preds = model(inputs.to(device)).argmax(1).cpu()
                correct += int((preds == labels).sum())
                seen += len(labels)
        end = time.perf_counter()
        history.append(
            {
                "epoch": epoch,
                "train_s": val_start - start,
                "val_s": end - val_start,
                "epoch_s": end - start,
                "val_acc": correct / seen,
            }
        )
        print(
            f"  epoch {epoch}/{epochs}: {end - start:.1f} s (train {val_start - start:.1f} s, val "
            f"{end - val_start:.1f} s), val acc {correct / seen:.3f}",
            flush=True,
        )
    return history, criterion, optimizer


def time_tutorial_steps(model, criterion, optimizer, train_loader, device, steps):
    batches = list(itertools.islice(itertools.cycle(train_loader), steps + 1))
    model.train()
    tutorial_step(model, criterion, optimizer, *batches[0], device)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for inputs, labels in batches[1:]:
        tutorial_step(model, criterion, optimizer, inputs, labels, device)
    synchronize(device)
    return sum(len(labels) for _, labels in batches[1:]) / (time.perf_counter() - start)


@torch.no_grad()
def time_tutorial_inference(model, crops, device, warmup=5, max_images=50):
    """fp32, eager, contiguous: batch 1 from a uint8 crop to a prediction, timed as
    engine.measure_inference_time does."""
    model.eval()
    mean = torch.tensor(presets.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(presets.IMAGENET_STD).view(3, 1, 1)

    def run(crop):
        x = ((crop.float() / 255 - mean) / std).unsqueeze(0).to(device)
        model(x).argmax(1)
        synchronize(device)

    times = engine.time_each(run, crops[:max_images], warmup)
    return {
        "batch1_mean_ms": statistics.fmean(times),
        "batch1_median_ms": statistics.median(times),
        "images_timed": len(times),
    }
