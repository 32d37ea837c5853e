"""Speed benchmark: how close training and inference come to the device's limit (issue 5).

In one run, on the same images and on the device it runs on, this measures:
  - the ceiling: the device's bf16 and fp32 rate in a large matrix multiply and a large convolution
    (bf16 only where the device computes it natively: emulated, it would take minutes and mean nothing);
  - the project's own training (qq.py's cache, loaders and criterion, engine.train_one_epoch and
    engine.evaluate), over whole epochs with data loading and validation, and its steps alone;
  - the same for a plain baseline, the PyTorch transfer-learning tutorial's loop: fp32, eager,
    batch 4, 4 workers, torchvision ImageFolder decoding every JPEG every epoch;
  - inference at batch 1 (mean and median ms per image) and the throughput at a larger batch;
  - batch-1 inference on the CPU side by side, on the same validation crops, in interleaved rounds:
    torch eager fp32, torch in the precision --precision auto chooses on this CPU, and the model
    exported by export.py's code through ONNX Runtime in fp32 and in int8 (static, QDQ, per-channel),
    with their top-1 agreement and accuracy;
  - the CPU's instruction sets that decide these speeds (AVX2, AVX-512, AVX-512 BF16, AMX, VNNI);
  - peak memory of each part (RSS of this process, and CUDA memory where present);
  - the validation accuracy of bf16 and of fp32 training on the same split, from the same start;
  - --freeze-backbone: features once, then 25 epochs of the fc layer.

    python benchmarks/speed.py --json speed.json        # full: 800 generated images, ~7 min on a quiet 2-core CPU
    python benchmarks/speed.py --quick                  # ~1 minute: 96 images, 2 epochs
    python benchmarks/speed.py --data data --epochs 2   # your own ImageFolder
    python benchmarks/speed.py --quick --images 12 --img-size 64 --epochs 1 --threads 1   # seconds: the smoke test
    python benchmarks/speed.py --recipes --epochs 4      # only: an epoch of --recipe endoscopy against seed

Run it on a quiet machine: other processes that want the cores slow two spinning OpenMP threads
down far more than their share (the "others" column says how busy the CPUs were).

Without --data, endoscopy-like pictures are generated into a temporary folder (ucgrade.demo;
384 px squares, about the size of real colonoscopy frames such as LIMUC's 352x288). 20% of each
class is held out for validation, as in qq.py.

FLOPs: a ResNet50 forward pass at 224 px is 4.1 G multiply-adds = 8.2 GFLOP (two FLOP per
multiply-add, as the ceiling counts them), and a training step is 3x a forward pass, so a
training image costs 3 x 8.2 x (img_size / 224)^2 = 24.6 GFLOP at 224 px (torch.utils.flop_counter
counts 24.3). Whole-epoch img/s is training images / (training + validation seconds): validation
and data loading count as overhead. The first epoch also pays for warm-up and is reported apart.
"""

import argparse
import ctypes
import dataclasses
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before torch imports tqdm: one line per epoch, not bars among the results

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import grading  # noqa: E402

from ucgrade import data, engine, onnx_export, presets, train  # noqa: E402
from ucgrade.cli import run_cli  # noqa: E402
from ucgrade.demo import make_dataset  # noqa: E402
from ucgrade.device import (  # noqa: E402
    Runtime,
    choose_device,
    choose_precision,
    cpu_has_fast_bf16,
    cuda_has_fast_bf16,
    setup_backends,
    synchronize,
)
from ucgrade.grader import GRADING_PRECISION  # noqa: E402
from ucgrade.model import (  # noqa: E402
    build_model,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from ucgrade.splits import VAL_SPLIT_DEFAULT, Split, split_holdout  # noqa: E402

FORWARD_GFLOP_224 = 8.2  # ResNet50 forward pass at 224 px: 4.1 G multiply-adds
TRAIN_STEP_FACTOR = 3  # forward + backward (gradients of the activations and of the weights)
RECIPE = presets.RECIPES[presets.DEFAULT_RECIPE]  # the recipe that qq.py trains with by default


def get_args_parser():
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Benchmark training and inference speed against the device's ceiling.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--data",
        default=None,
        help="an ImageFolder to use (default: generate --images endoscopy-like images in a temporary folder)",
    )
    add("--images", type=int, default=None, help="images to generate without --data (default: 800; 96 with --quick)")
    add("--image-px", type=int, default=384, help="side of the generated images in pixels (default: %(default)s)")
    add("--img-size", type=int, default=RECIPE.img_size, help="input size of the model (default: %(default)s)")
    add("--batch-size", type=int, default=None, help="the project's training batch size (default: the recipe's)")
    add(
        "--workers",
        type=int,
        default=-1,
        help="the project's data loading processes; -1 lets qq.py choose (default: %(default)s)",
    )
    add(
        "--epochs",
        type=int,
        default=None,
        help="whole epochs timed for each precision of the project's training (default: 3; 2 with --quick)",
    )
    add("--baseline-epochs", type=int, default=1, help="whole epochs of the tutorial baseline (default: %(default)s)")
    add(
        "--frozen-epochs",
        type=int,
        default=RECIPE.epochs,
        help="epochs of --freeze-backbone training (default: %(default)s)",
    )
    add(
        "--steps",
        type=int,
        default=None,
        help="training steps timed alone, after one warm-up step (default: 12; 4 with --quick)",
    )
    add("--infer-batch", type=int, default=32, help="batch size of the inference throughput (default: %(default)s)")
    add(
        "--folder-images",
        type=int,
        default=None,
        help="images of the folder that predict.py grades as a whole process; 0 skips it (default: 1000; 100 with "
        "--quick)",
    )
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    add("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one per core)")
    add(
        "--seed",
        type=int,
        default=0,
        help="seed of the images, the split and the initialisation (default: %(default)s)",
    )
    add("--quick", action="store_true", help="fewer images, epochs and timed steps: under ~2 minutes on a 2-core CPU")
    add(
        "--recipes",
        action="store_true",
        help="only the cost of a whole epoch of --recipe endoscopy against seed, in turns (default: off)",
    )
    add("--json", default=None, metavar="FILE", help="also write every number to FILE as JSON")
    return parser


# ----------------------------------------------------------------------------- helpers


def train_gflop_per_image(img_size):
    return TRAIN_STEP_FACTOR * FORWARD_GFLOP_224 * (img_size / 224) ** 2


def reset_peak_memory(device):
    """Start a part's peak memory from what it inherits: return freed memory to the OS, then reset the peak."""
    gc.collect()
    try:  # glibc keeps freed memory in the process, where the next part's peak RSS would count it
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: writing 5 to clear_refs resets this process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """Peak RSS of this process (DataLoader workers not included) since the last reset, in MB."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        import resource  # the peak of the whole process: not reset between parts

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    memory = {"peak_rss_mb": rss}
    if device.type == "cuda":
        memory["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        memory["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return memory


def cpu_snapshot():
    """(busy CPU seconds of the machine, CPU seconds of this process and its finished children, clock); Linux only."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    return busy, own.user + own.system + own.children_user + own.children_system, time.perf_counter()


def others_cpu_share(start, end):
    """The share of the machine's CPUs that other processes used between two snapshots: 0 on a quiet machine."""
    if start is None or end is None:
        return None
    others = (end[0] - start[0]) - (end[1] - start[1])
    return min(1.0, max(0.0, others / ((end[2] - start[2]) * os.cpu_count())))


class Part:
    """One part of the benchmark: its seconds, its peak memory, and how busy other processes kept the CPUs."""

    def __init__(self, device):
        self.device, self.numbers = device, {}

    def __enter__(self):
        reset_peak_memory(self.device)
        self.start = cpu_snapshot()
        self.clock = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.numbers = {
            "seconds": time.perf_counter() - self.clock,
            "others_cpu_share": others_cpu_share(self.start, cpu_snapshot()),
        }
        self.numbers |= peak_memory(self.device)
        return False


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide CPU inference speed, as /proc/cpuinfo names them: AVX2 everywhere
# since 2013; AVX-512 BF16 and AMX for native bf16 (what --precision auto needs for bf16); VNNI for int8
# dot products (ONNX Runtime's int8 kernels: without it, 8-bit weights are reduced to 7 bits).
CPU_FLAGS = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "AVX-512 BF16": ("avx512_bf16",),
    "AMX": ("amx_tile",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
}


def onnxruntime_version():
    import onnxruntime

    return onnxruntime.__version__


def cpu_features():
    """{instruction set: True/False} from /proc/cpuinfo (Linux), or None where it cannot be read; and torch's own
    reading of the CPU (its kernels' capability: DEFAULT, AVX2, AVX512, ...)."""
    try:
        flags = next(
            set(line.split(":", 1)[1].split())
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
        features = {name: any(flag in flags for flag in names) for name, names in CPU_FLAGS.items()}
    except (OSError, StopIteration):
        features = None
    return {"instruction_sets": features, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def describe_cpu_features(features):
    sets = features["instruction_sets"]
    if sets is None:
        return f"instruction sets unknown (no /proc/cpuinfo); torch's CPU capability {features['torch_cpu_capability']}"
    return ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in sets.items())


def peak_rate(device, run, flop, trials, seconds_per_trial):
    """GFLOP/s of run(): the best of a few timed trials (the ceiling is a peak), and their median."""
    run()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    reps = max(1, round(seconds_per_trial / (time.perf_counter() - start)))
    rates = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            run()
        synchronize(device)
        rates.append(flop * reps / (time.perf_counter() - start) / 1e9)
    return max(rates), statistics.median(rates)


def ceiling_rate(device, dtype, trials, seconds_per_trial):
    """The device's peak in one precision: a large square matmul, and a large 3x3 convolution.

    The convolution runs on the kernels the model itself uses (oneDNN on a CPU, cuDNN on a GPU); the
    matmul on BLAS (MKL on a CPU, whose fp32 path can be slower on AMD). The ceiling is the higher.
    On a GPU, fp32 is true fp32 (no TF32), as in training with --precision fp32.
    """
    setup_backends(device, "fp32" if dtype == torch.float32 else "bf16")
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul, matmul_median = peak_rate(device, lambda: a @ b, 2 * n**3, trials, seconds_per_trial)
    batch, channels, side = 16, 256, 56  # a ResNet50-like layer, large enough to keep every core busy
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv, conv_median = peak_rate(
            device,
            lambda: torch.nn.functional.conv2d(x, w, padding=1),
            2 * batch * channels**2 * 9 * side**2,
            trials,
            seconds_per_trial,
        )
    return {
        "gflop_s": max(matmul, conv),
        "matmul_gflop_s": matmul,
        "matmul_median_gflop_s": matmul_median,
        "matmul_n": n,
        "conv_gflop_s": conv,
        "conv_median_gflop_s": conv_median,
    }


def unmeasured_precisions(device):
    """{precision: why its ceiling is not measured}. Without native bf16 (an AVX2-only CPU, a GPU
    before Ampere) bf16 is emulated: one 2048² bf16 matmul takes about a minute on such a CPU, and
    its rate says nothing about what the project runs there (fp32)."""
    if device.type == "cpu" and not cpu_has_fast_bf16():
        return {
            "bf16": "this CPU has no native bf16 (no AVX-512 BF16 or AMX), so bf16 is emulated and qq.py trains in fp32"
        }
    if device.type == "cuda" and not cuda_has_fast_bf16(device):
        return {"bf16": "this GPU has no native bf16 (before Ampere), so qq.py trains in fp16"}
    return {}


def measure_ceilings(device, quick):
    """The ceiling of each precision the device runs natively; the others are named with the reason."""
    skipped = unmeasured_precisions(device)
    ceiling = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if name in skipped:
            print(f"  {name} not measured: {skipped[name]}", flush=True)
            ceiling[name] = {"skipped": skipped[name]}
        else:
            ceiling[name] = ceiling_rate(
                device, dtype, trials=3 if quick else 5, seconds_per_trial=0.15 if quick else 0.3
            )
    return ceiling


def throughput(images_per_s, img_size, ceiling):
    """img/s -> GFLOP/s and the fraction of each measured precision's ceiling (None where it was not measured)."""
    gflop_s = images_per_s * train_gflop_per_image(img_size)
    shares = {
        f"of_{name}_ceiling": gflop_s / c["gflop_s"] if "gflop_s" in c else None
        for name, c in ceiling.items()
        if name != "part"
    }
    return {"images_per_s": images_per_s, "gflop_s": gflop_s} | shares


def whole_epochs(epochs, n_train, n_images, img_size, ceiling):
    """Summary of timed epochs. The first epoch also pays for warm-up (kernel choice, worker start), so
    the steady-state number is the median of the later ones."""
    steady = epochs[1:] or epochs
    epoch_s = statistics.median(e["epoch_s"] for e in steady)
    summary = throughput(n_train / epoch_s, img_size, ceiling)
    summary.update(
        {
            "epoch_s": epoch_s,
            "first_epoch_s": epochs[0]["epoch_s"],
            "epoch_s_per_800_images": epoch_s * 800 / n_images,
            "val_acc": epochs[-1]["val_acc"],
            "epochs": epochs,
        }
    )
    return summary


# ----------------------------------------------------------------------------- the project's own training


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


# ----------------------------------------------------------------------------- the baseline: the tutorial's loop


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


# ----------------------------------------------------------------------------- the run


def time_folders(args, data_dir, folder, checkpoint_path, int8_path, side):
    """predict.py on a folder of --folder-images images, with the int8 .onnx and with the .pt, each against its own
    batch-1 time (the side-by-side timings)."""
    if not args.folder_images:
        return {}
    print(f"predict.py on a folder of {args.folder_images} images, int8 .onnx and .pt ...", flush=True)
    images = grading.folder_of_images(data_dir, Path(folder) / "folder", args.folder_images)
    timings, threads = side["timings"], side["threads"]
    pt_timing = timings[f"torch eager {GRADING_PRECISION}"]["batch1_median_ms"]  # predict.py's precision for a .pt
    return {
        "int8 .onnx": grading.time_folder(int8_path, images, timings["ONNX Runtime int8"]["batch1_median_ms"], threads),
        "best.pt": grading.time_folder(checkpoint_path, images, pt_timing, threads),
    }


def run_benchmark(args, data_dir, device, precision):
    results = {}
    steps = args.steps or (4 if args.quick else 12)  # timed training steps, after one warm-up step

    print("ceiling: matrix multiply and convolution ...", flush=True)
    with Part(device) as part:
        ceiling = measure_ceilings(device, args.quick)
    results["ceiling"] = ceiling | {"part": part.numbers}

    print("the project's data: decode once into the cache ...", flush=True)
    run_args = project_args(data_dir, args.img_size, **the_benchmarks(args))
    with Part(device) as part:
        image_set = data.read_data(run_args)
    train, val = split_holdout(image_set.labels, run_args.val_split, run_args.seed)
    split = Split(train, val, run_dir=None)
    n_images, cached = len(train) + len(val), image_set.images is not None
    results["data"] = {
        "images": n_images,
        "train": len(train),
        "val": len(val),
        "classes": len(image_set.class_names),
        "cached": cached,
        "cache_mb": sum(t.numel() for t in image_set.images) / 2**20 if cached else 0.0,
        "part": part.numbers,
    }

    print(
        f"the project's training ({precision}, batch {run_args.batch_size}): {args.epochs} whole epochs, then "
        f"{steps} steps alone ...",
        flush=True,
    )
    with Part(device) as part:
        history, _, parts = train_project(run_args, image_set, split, device, precision, args.epochs)
        steps_per_s, batch = time_project_steps(parts, steps)
    results["project"] = {
        "precision": precision,
        "batch_size": run_args.batch_size,
        "workers": parts["training"].train_loader.num_workers,
        "whole_epochs": whole_epochs(history, len(train), n_images, args.img_size, ceiling),
        "steps_alone": throughput(steps_per_s, args.img_size, ceiling) | {"steps": steps, "batch_size": batch},
        "part": part.numbers,
    }

    print(
        f"the project's inference (the model as predict.py loads it; throughput at batch {args.infer_batch}) ...",
        flush=True,
    )
    with Part(device) as part, tempfile.TemporaryDirectory() as folder:
        inference = time_project_inference(
            parts["model"],
            image_set.class_names,
            args.img_size,
            parts["val_set"],
            device,
            precision,
            args.infer_batch,
            folder,
        )
    results["inference"] = {"project": inference | {"part": part.numbers}}
    crops = [parts["val_set"][i][0] for i in range(len(parts["val_set"]))]

    rounds = 1 if args.quick else 3
    print(
        f"batch-1 inference side by side on the CPU ({min(len(crops), 50)} validation images, {rounds} round(s)): "
        "torch eager fp32 and in auto's precision, ONNX Runtime fp32 and int8 ...",
        flush=True,
    )
    calibration_items = onnx_export.calibration_sample([(image_set.paths[i], image_set.labels[i]) for i in train])
    with Part(device) as part, tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "best.pt"
        config = {"class_names": image_set.class_names, "img_size": args.img_size}
        save_checkpoint(path, make_checkpoint(parts["model"], config, 1, {}))
        calibration, _ = onnx_export.read_crops(
            calibration_items, args.img_size, presets.resize_size_for(args.img_size)
        )
        onnx_paths, export_times = grading.export_models(path, calibration.crops, folder)
        threads = torch.get_num_threads()
        val_crops, val_labels = [crop.numpy() for crop in crops[:50]], np.asarray(image_set.labels)[val][:50]
        side_by_side = grading.side_by_side(path, onnx_paths, val_crops, val_labels, threads, rounds)
        side_by_side |= export_times | {"calibration_images": len(calibration.crops)}
        side_by_side["folders"] = time_folders(args, data_dir, folder, path, onnx_paths["int8"], side_by_side)
    results["inference"]["side_by_side"] = side_by_side | {"part": part.numbers}
    del parts

    print(
        f"--freeze-backbone: features once per view, then {args.frozen_epochs} epochs of the fc layer ...", flush=True
    )
    with Part(device) as part:
        frozen_args = project_args(data_dir, args.img_size, freeze_backbone=True, **the_benchmarks(args))
        frozen_history, features_s, _ = train_project(
            frozen_args, image_set, split, device, precision, args.frozen_epochs
        )
    results["frozen_backbone"] = {
        "epochs": args.frozen_epochs,
        "features_s": features_s,
        "total_s": part.numbers["seconds"],
        "total_s_per_800_images": part.numbers["seconds"] * 800 / n_images,
        "val_acc": frozen_history[-1]["val_acc"],
        "part": part.numbers,
    }

    if precision != "fp32":
        print(
            f"the project's training in fp32, from the same start on the same split: {args.epochs} whole epochs ...",
            flush=True,
        )
        with Part(device) as part:
            fp32_history, _, _ = train_project(run_args, image_set, split, device, "fp32", args.epochs)
        results["project_fp32"] = {
            "precision": "fp32",
            "batch_size": run_args.batch_size,
            "whole_epochs": whole_epochs(fp32_history, len(train), n_images, args.img_size, ceiling),
            "part": part.numbers,
        }
    last, last_fp32 = history[-1], (fp32_history if precision != "fp32" else history)[-1]
    results["accuracy"] = {
        "epochs": args.epochs,
        "val_images": len(val),
        "precision": precision,
        "one_image": 1 / len(val),
        "val_acc": last["val_acc"],
        "fp32_val_acc": last_fp32["val_acc"],
        "difference": last["val_acc"] - last_fp32["val_acc"],
        "val_loss": last["val_loss"],
        "fp32_val_loss": last_fp32["val_loss"],
    }
    num_classes, paths = len(image_set.class_names), image_set.paths
    del image_set  # the baseline decodes from disk: free the cache

    print(
        f"the tutorial baseline (fp32, eager, batch 4, decoding every epoch): {args.baseline_epochs} whole "
        f"epoch(s), then {steps} steps alone ...",
        flush=True,
    )
    with Part(device) as part:
        train_loader, val_loader = tutorial_loaders(data_dir, paths, train, val, args.img_size)
        model = tutorial_model(num_classes, device, args.seed)
        baseline_history, criterion, optimizer = train_tutorial(
            model, train_loader, val_loader, device, args.baseline_epochs
        )
        steps_per_s = time_tutorial_steps(model, criterion, optimizer, train_loader, device, steps)
    results["baseline"] = {
        "precision": "fp32",
        "batch_size": 4,
        "workers": 4,
        "whole_epochs": whole_epochs(baseline_history, len(train), n_images, args.img_size, ceiling),
        "steps_alone": throughput(steps_per_s, args.img_size, ceiling) | {"steps": steps, "batch_size": 4},
        "part": part.numbers,
    }
    with Part(device) as part:
        baseline_inference = time_tutorial_inference(model, crops, device)
    results["inference"]["baseline"] = baseline_inference | {"part": part.numbers}

    print("a one-epoch qq.py run as a whole process: the time after its epoch ...", flush=True)
    with Part(device) as part, tempfile.TemporaryDirectory() as folder:
        after = grading.time_after_training(data_dir, args.img_size, device, folder, torch.get_num_threads())
    results["after_training"] = after | {"part": part.numbers}

    project, baseline, inference = results["project"], results["baseline"], results["inference"]
    results["speedup"] = {
        "whole_epochs": baseline["whole_epochs"]["epoch_s"] / project["whole_epochs"]["epoch_s"],
        "steps_alone": project["steps_alone"]["images_per_s"] / baseline["steps_alone"]["images_per_s"],
        "inference_batch1": inference["baseline"]["batch1_median_ms"] / inference["project"]["batch1_median_ms"],
    }
    timings = inference["side_by_side"]["timings"]
    for name in timings:
        if name != "torch eager fp32":
            key = "inference_batch1_" + name.lower().replace(" ", "_") + "_over_torch_eager_fp32"
            results["speedup"][key] = (
                timings["torch eager fp32"]["batch1_median_ms"] / timings[name]["batch1_median_ms"]
            )
    return results


def percent(share):
    return "n/a" if share is None else f"{share:.0%}"


def print_table(results, setup):
    """The headline numbers."""
    ceiling, project, baseline = results["ceiling"], results["project"], results["baseline"]
    data_info, frozen, accuracy, speedup = (
        results["data"],
        results["frozen_backbone"],
        results["accuracy"],
        results["speedup"],
    )
    infer, infer_base = results["inference"]["project"], results["inference"]["baseline"]
    gflop = setup["train_gflop_per_image"]
    print(
        f"\n{setup['device_name']} ({setup['device']}, {setup['threads']} threads), torch {setup['torch']}, "
        f"onnxruntime {setup['onnxruntime']}, {setup['date']}"
    )
    print(
        f"CPU instruction sets: {describe_cpu_features(setup['cpu_features'])}; --precision auto chose "
        f"{setup['precision']} on {setup['device']}"
    )
    print(
        f"{data_info['images']} images ({data_info['train']} train, {data_info['val']} val) at {setup['img_size']} px; "
        f"a training image costs {gflop:.1f} GFLOP ({setup['flop_constant']})"
    )
    for name in ("bf16", "fp32"):
        c = ceiling[name]
        if "skipped" in c:
            print(f"ceiling {name}: not measured, because {c['skipped']}")
            continue
        print(
            f"ceiling {name}: {c['gflop_s']:.0f} GFLOP/s = {c['gflop_s'] / gflop:.1f} training img/s "
            f"(matmul {c['matmul_gflop_s']:.0f}, 3x3 convolution {c['conv_gflop_s']:.0f} GFLOP/s)"
        )
    print(
        f"\n{'training':<34}{'img/s':>7}{'GFLOP/s':>9}{'of bf16':>9}{'of fp32':>9}{'epoch s':>9}"
        f"{'s/800 img':>10}{'val acc':>9}{'peak RSS':>10}{'others':>8}"
    )
    rows = [(f"project {project['precision']} b{project['batch_size']} w{project['workers']}", project)]
    if "project_fp32" in results:
        rows.append((f"project fp32 b{results['project_fp32']['batch_size']}", results["project_fp32"]))
    rows.append(("baseline fp32 b4 w4", baseline))
    for name, part in rows:
        w = part["whole_epochs"]
        print(
            f"{name + ', epochs':<34}{w['images_per_s']:>7.1f}{w['gflop_s']:>9.0f}"
            f"{percent(w['of_bf16_ceiling']):>9}{percent(w['of_fp32_ceiling']):>9}"
            f"{w['epoch_s']:>9.1f}{w['epoch_s_per_800_images']:>10.1f}{w['val_acc']:>9.3f}{part['part']['peak_rss_mb']:>8.0f}MB"
            f"{percent(part['part']['others_cpu_share']):>8}"
        )
        if "steps_alone" in part:
            s = part["steps_alone"]
            print(
                f"{name + ', steps alone':<34}{s['images_per_s']:>7.1f}{s['gflop_s']:>9.0f}"
                f"{percent(s['of_bf16_ceiling']):>9}{percent(s['of_fp32_ceiling']):>9}"
            )
    print(
        "(epochs: training images / (training + validation s), steady state; baseline: the PyTorch tutorial's "
        "loop, ImageFolder decoding every epoch;\n"
        " others: the share of the CPUs other processes used meanwhile; 0% on a quiet machine)"
    )
    print(
        f"\nspeed-up over the baseline: whole epochs {speedup['whole_epochs']:.2f}x, steps alone "
        f"{speedup['steps_alone']:.2f}x, "
        f"batch-1 inference {speedup['inference_batch1']:.2f}x"
    )
    print(
        f"first epoch (warm-up included): project {project['whole_epochs']['first_epoch_s']:.1f} s, baseline "
        f"{baseline['whole_epochs']['first_epoch_s']:.1f} s; "
        f"decoding into the cache: {data_info['part']['seconds']:.1f} s, {data_info['cache_mb']:.0f} MB"
    )
    print(
        f"inference, batch 1: project ({infer['precision']}) mean {infer['batch1_mean_ms']:.1f} ms, median "
        f"{infer['batch1_median_ms']:.1f} ms per image; "
        f"baseline (fp32) mean {infer_base['batch1_mean_ms']:.1f} ms, median {infer_base['batch1_median_ms']:.1f} ms"
    )
    print(
        f"inference throughput: project at batch {infer['throughput_batch_size']}: "
        f"{infer['throughput_images_per_s']:.1f} img/s"
    )
    grading.print_side_by_side(results["inference"]["side_by_side"])
    grading.print_after_training(results["after_training"])
    print(
        f"accuracy after {accuracy['epochs']} epoch(s) on the same {accuracy['val_images']} validation images: "
        f"{accuracy['precision']} {accuracy['val_acc']:.3f} (val loss {accuracy['val_loss']:.4f}), "
        f"fp32 {accuracy['fp32_val_acc']:.3f} (val loss {accuracy['fp32_val_loss']:.4f}); one image = "
        f"{accuracy['one_image']:.3f}"
    )
    print(
        f"--freeze-backbone: {frozen['epochs']} epochs in {frozen['total_s']:.1f} s, {frozen['features_s']:.1f} s "
        "of it computing the features "
        f"({frozen['total_s_per_800_images']:.1f} s per 800 images); val acc {frozen['val_acc']:.3f}"
    )
    cuda = [
        f"{name} {part['part']['cuda_peak_allocated_mb']:.0f} MB"
        for name, part in (("project", project), ("baseline", baseline))
        if "cuda_peak_allocated_mb" in part["part"]
    ]
    if cuda:
        print("peak CUDA memory allocated: " + ", ".join(cuda))
    print(f"other processes used {percent(setup['others_cpu_share'])} of the CPUs during the benchmark")


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.folder_images is None:
        args.folder_images = 100 if args.quick else grading.FOLDER_IMAGES
    if args.quick:
        args.images = args.images or 96
        args.epochs = args.epochs or 2
    args.images, args.epochs = args.images or 800, args.epochs or 3
    device = choose_device(args.device)
    precision = choose_precision(device, "auto")
    setup_backends(device, precision)
    setup = {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "onnxruntime": onnxruntime_version(),
        "cpu_features": cpu_features(),
        "python": platform.python_version(),
        "img_size": args.img_size,
        "train_gflop_per_image": train_gflop_per_image(args.img_size),
        "flop_constant": f"{TRAIN_STEP_FACTOR} x {FORWARD_GFLOP_224} GFLOP x (img_size/224)^2",
        "command": " ".join(["python"] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
    }
    print("settings: " + ", ".join(f"{k} {v}" for k, v in vars(args).items()), flush=True)
    print(
        f"{setup['device_name']}: {describe_cpu_features(setup['cpu_features'])}; --precision auto chose {precision}",
        flush=True,
    )
    start, cpu_start = time.perf_counter(), cpu_snapshot()
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(args.data) if args.data else Path(folder) / "images"
        if not args.data:
            print(f"generating {args.images} endoscopy-like images of {args.image_px} px in {data_dir} ...", flush=True)
            make_dataset(data_dir, per_class=max(2, round(args.images / 3)), size=args.image_px, seed=args.seed)
        if args.recipes:
            results = {"recipes": time_recipes(args, data_dir, device, precision)}
        else:
            results = run_benchmark(args, data_dir, device, precision)
    setup["total_s"] = time.perf_counter() - start
    setup["others_cpu_share"] = others_cpu_share(cpu_start, cpu_snapshot())
    results = {"setup": setup} | results
    if args.recipes:
        cost = results["recipes"]
        print(
            f"\n{setup['device_name']}, {describe_cpu_features(setup['cpu_features'])}, {precision}, "
            f"{cost['images']} images at {args.img_size} px: an epoch takes {cost['epoch_s']['seed']:.1f} s with "
            f"--recipe seed and {cost['epoch_s']['endoscopy']:.1f} s with endoscopy ({cost['extra']:+.1%}); others "
            f"used {percent(setup['others_cpu_share'])} of the CPUs"
        )
    else:
        print_table(results, setup)
    print(f"benchmark time: {setup['total_s']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
