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

This file is the run, part by part; the parts live beside it: machine.py (device, CPU, memory, load), ceiling.py,
project.py (the project's training and inference), tutorial.py (the baseline), grading.py and speedtable.py.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Run as a script: one line per epoch, not bars among the results. Set before torch imports tqdm, which reads it
# then; importing this module (the tests do) sets nothing.
if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import grading  # noqa: E402
from ceiling import (  # noqa: E402
    FORWARD_GFLOP_224,
    TRAIN_STEP_FACTOR,
    measure_ceilings,
    throughput,
    train_gflop_per_image,
    whole_epochs,
)
from machine import (  # noqa: E402
    Part,
    cpu_features,
    cpu_snapshot,
    describe_cpu_features,
    device_name,
    onnxruntime_version,
    others_cpu_share,
)
from project import (  # noqa: E402
    RECIPE,
    project_args,
    the_benchmarks,
    time_project_inference,
    time_project_steps,
    time_recipes,
    train_project,
)
from speedtable import print_recipes, print_table  # noqa: E402
from tutorial import (  # noqa: E402
    time_tutorial_inference,
    time_tutorial_steps,
    train_tutorial,
    tutorial_loaders,
    tutorial_model,
)

from ucgrade import data, onnx_export, presets  # noqa: E402
from ucgrade.cli import run_cli  # noqa: E402
from ucgrade.demo import make_dataset  # noqa: E402
from ucgrade.device import choose_device, choose_precision, setup_backends  # noqa: E402
from ucgrade.grader import GRADING_PRECISION  # noqa: E402
from ucgrade.model import make_checkpoint, save_checkpoint  # noqa: E402
from ucgrade.splits import Split, split_holdout  # noqa: E402


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


# ----------------------------------------------------------------------------- the run, part by part


@dataclasses.dataclass
class Bench:
    """What the parts of a run share: its flags, the images' folder, the device and the precision --precision auto
    chose there, the training steps timed alone, and the ceiling once it is measured."""

    args: argparse.Namespace
    data_dir: Path
    device: torch.device
    precision: str
    steps: int  # timed training steps, after one warm-up step
    ceiling: dict = None

    def epochs(self, history, split):
        """A training's whole epochs on split, against the ceiling."""
        n_images = len(split.train) + len(split.val)
        return whole_epochs(history, len(split.train), n_images, self.args.img_size, self.ceiling)


def run_benchmark(args, data_dir, device, precision):
    """Every part in turn, the project's on one decoding of the images.

    What the later parts' peak RSS counts is kept as it has always been: `trained` (the parts trained last, whose
    validation set reads the cache, so the baseline runs with the cache in memory) and `tutorial` stay referenced
    until the end, though nothing reads them after their own part.
    """
    bench = Bench(args, data_dir, device, precision, steps=args.steps or (4 if args.quick else 12))
    results = {}
    bench.ceiling, results["ceiling"] = time_ceiling(bench)
    run_args = project_args(data_dir, args.img_size, **the_benchmarks(args))
    image_set, split, results["data"] = read_images(bench, run_args)
    history, parts, results["project"] = time_training(bench, run_args, image_set, split)
    results["inference"] = {"project": time_inference(bench, parts, image_set.class_names)}
    crops = [parts["val_set"][i][0] for i in range(len(parts["val_set"]))]
    results["inference"]["side_by_side"] = time_side_by_side(bench, parts["model"], image_set, split, crops)
    del parts
    trained, results["frozen_backbone"] = time_frozen_backbone(bench, image_set, split)
    fp32_history = history
    if precision != "fp32":
        fp32_history, trained, results["project_fp32"] = time_fp32_training(bench, run_args, image_set, split)
    results["accuracy"] = compare_accuracy(bench, split, history[-1], fp32_history[-1])
    num_classes, paths = len(image_set.class_names), image_set.paths  # the baseline decodes from disk
    tutorial, results["baseline"] = time_baseline(bench, paths, num_classes, split)
    results["inference"]["baseline"] = time_baseline_inference(bench, tutorial["model"], crops)
    results["after_training"] = time_after_training(bench)
    results["speedup"] = speedups(results)
    return results


def time_ceiling(bench):
    """(the ceiling of each precision, the same with its part's numbers)."""
    print("ceiling: matrix multiply and convolution ...", flush=True)
    with Part(bench.device) as part:
        ceiling = measure_ceilings(bench.device, bench.args.quick)
    return ceiling, ceiling | {"part": part.numbers}


def read_images(bench, run_args):
    """(the images decoded into the cache, the hold-out split, their numbers)."""
    print("the project's data: decode once into the cache ...", flush=True)
    with Part(bench.device) as part:
        image_set = data.read_data(run_args)
    train, val = split_holdout(image_set.labels, run_args.val_split, run_args.seed)
    cached = image_set.images is not None
    numbers = {
        "images": len(train) + len(val),
        "train": len(train),
        "val": len(val),
        "classes": len(image_set.class_names),
        "cached": cached,
        "cache_mb": sum(t.numel() for t in image_set.images) / 2**20 if cached else 0.0,
        "part": part.numbers,
    }
    return image_set, Split(train, val, run_dir=None), numbers


def time_training(bench, run_args, image_set, split):
    """(history, the trained parts, the numbers) of the project's training: whole epochs, then steps alone."""
    args, steps = bench.args, bench.steps
    print(
        f"the project's training ({bench.precision}, batch {run_args.batch_size}): {args.epochs} whole epochs, then "
        f"{steps} steps alone ...",
        flush=True,
    )
    with Part(bench.device) as part:
        history, _, parts = train_project(run_args, image_set, split, bench.device, bench.precision, args.epochs)
        steps_per_s, batch = time_project_steps(parts, steps)
    numbers = {
        "precision": bench.precision,
        "batch_size": run_args.batch_size,
        "workers": parts["training"].train_loader.num_workers,
        "whole_epochs": bench.epochs(history, split),
        "steps_alone": throughput(steps_per_s, args.img_size, bench.ceiling) | {"steps": steps, "batch_size": batch},
        "part": part.numbers,
    }
    return history, parts, numbers


def time_inference(bench, parts, class_names):
    """The trained model as predict.py loads it: batch 1, and the throughput at --infer-batch."""
    args = bench.args
    print(
        f"the project's inference (the model as predict.py loads it; throughput at batch {args.infer_batch}) ...",
        flush=True,
    )
    with Part(bench.device) as part, tempfile.TemporaryDirectory() as folder:
        inference = time_project_inference(
            parts["model"],
            class_names,
            args.img_size,
            parts["val_set"],
            bench.device,
            bench.precision,
            args.infer_batch,
            folder,
        )
    return inference | {"part": part.numbers}


def time_side_by_side(bench, model, image_set, split, crops):
    """Batch-1 inference on the CPU, the four ways to grade side by side, and predict.py on a folder."""
    args = bench.args
    rounds = 1 if args.quick else 3
    print(
        f"batch-1 inference side by side on the CPU ({min(len(crops), 50)} validation images, {rounds} round(s)): "
        "torch eager fp32 and in auto's precision, ONNX Runtime fp32 and int8 ...",
        flush=True,
    )
    train, val = split.train, split.val
    calibration_items = onnx_export.calibration_sample([(image_set.paths[i], image_set.labels[i]) for i in train])
    with Part(bench.device) as part, tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "best.pt"
        config = {"class_names": image_set.class_names, "img_size": args.img_size}
        save_checkpoint(path, make_checkpoint(model, config, 1, {}))
        calibration, _ = onnx_export.read_crops(
            calibration_items, args.img_size, presets.resize_size_for(args.img_size)
        )
        onnx_paths, export_times = grading.export_models(path, calibration.crops, folder)
        threads = torch.get_num_threads()
        val_crops, val_labels = [crop.numpy() for crop in crops[:50]], np.asarray(image_set.labels)[val][:50]
        side_by_side = grading.side_by_side(path, onnx_paths, val_crops, val_labels, threads, rounds)
        side_by_side |= export_times | {"calibration_images": len(calibration.crops)}
        side_by_side["folders"] = time_folders(args, bench.data_dir, folder, path, onnx_paths["int8"], side_by_side)
    return side_by_side | {"part": part.numbers}


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


def time_frozen_backbone(bench, image_set, split):
    """(the trained parts, the numbers) of --freeze-backbone: features once per view, then the fc layer."""
    args = bench.args
    print(
        f"--freeze-backbone: features once per view, then {args.frozen_epochs} epochs of the fc layer ...", flush=True
    )
    with Part(bench.device) as part:
        frozen_args = project_args(bench.data_dir, args.img_size, freeze_backbone=True, **the_benchmarks(args))
        frozen_history, features_s, parts = train_project(
            frozen_args, image_set, split, bench.device, bench.precision, args.frozen_epochs
        )
    n_images = len(split.train) + len(split.val)
    numbers = {
        "epochs": args.frozen_epochs,
        "features_s": features_s,
        "total_s": part.numbers["seconds"],
        "total_s_per_800_images": part.numbers["seconds"] * 800 / n_images,
        "val_acc": frozen_history[-1]["val_acc"],
        "part": part.numbers,
    }
    return parts, numbers


def time_fp32_training(bench, run_args, image_set, split):
    """(history, the trained parts, the numbers) of the project's training in fp32, from the same start."""
    print(
        f"the project's training in fp32, from the same start on the same split: {bench.args.epochs} whole epochs ...",
        flush=True,
    )
    with Part(bench.device) as part:
        history, _, parts = train_project(run_args, image_set, split, bench.device, "fp32", bench.args.epochs)
    numbers = {
        "precision": "fp32",
        "batch_size": run_args.batch_size,
        "whole_epochs": bench.epochs(history, split),
        "part": part.numbers,
    }
    return history, parts, numbers


def compare_accuracy(bench, split, last, last_fp32):
    """The last epoch's validation in the chosen precision against fp32's, on the same images."""
    return {
        "epochs": bench.args.epochs,
        "val_images": len(split.val),
        "precision": bench.precision,
        "one_image": 1 / len(split.val),
        "val_acc": last["val_acc"],
        "fp32_val_acc": last_fp32["val_acc"],
        "difference": last["val_acc"] - last_fp32["val_acc"],
        "val_loss": last["val_loss"],
        "fp32_val_loss": last_fp32["val_loss"],
    }


def time_baseline(bench, paths, num_classes, split):
    """(the trained baseline: its model, loaders, loss and optimiser; its numbers): the tutorial's loop over whole
    epochs, then its steps alone."""
    args, device, steps = bench.args, bench.device, bench.steps
    print(
        f"the tutorial baseline (fp32, eager, batch 4, decoding every epoch): {args.baseline_epochs} whole "
        f"epoch(s), then {steps} steps alone ...",
        flush=True,
    )
    with Part(device) as part:
        train_loader, val_loader = tutorial_loaders(bench.data_dir, paths, split.train, split.val, args.img_size)
        model = tutorial_model(num_classes, device, args.seed)
        history, criterion, optimizer = train_tutorial(model, train_loader, val_loader, device, args.baseline_epochs)
        steps_per_s = time_tutorial_steps(model, criterion, optimizer, train_loader, device, steps)
    numbers = {
        "precision": "fp32",
        "batch_size": 4,
        "workers": 4,
        "whole_epochs": bench.epochs(history, split),
        "steps_alone": throughput(steps_per_s, args.img_size, bench.ceiling) | {"steps": steps, "batch_size": 4},
        "part": part.numbers,
    }
    tutorial = {"model": model, "loaders": (train_loader, val_loader), "criterion": criterion, "optimizer": optimizer}
    return tutorial, numbers


def time_baseline_inference(bench, model, crops):
    """The baseline's batch-1 inference on the same validation crops."""
    with Part(bench.device) as part:
        inference = time_tutorial_inference(model, crops, bench.device)
    return inference | {"part": part.numbers}


def time_after_training(bench):
    """A one-epoch qq.py run as a whole process: the seconds after its epoch."""
    print("a one-epoch qq.py run as a whole process: the time after its epoch ...", flush=True)
    with Part(bench.device) as part, tempfile.TemporaryDirectory() as folder:
        after = grading.time_after_training(
            bench.data_dir, bench.args.img_size, bench.device, folder, torch.get_num_threads()
        )
    return after | {"part": part.numbers}


def speedups(results):
    """The project over the baseline, and each way to grade over torch eager fp32 at batch 1."""
    project, baseline, inference = results["project"], results["baseline"], results["inference"]
    speedup = {
        "whole_epochs": baseline["whole_epochs"]["epoch_s"] / project["whole_epochs"]["epoch_s"],
        "steps_alone": project["steps_alone"]["images_per_s"] / baseline["steps_alone"]["images_per_s"],
        "inference_batch1": inference["baseline"]["batch1_median_ms"] / inference["project"]["batch1_median_ms"],
    }
    timings = inference["side_by_side"]["timings"]
    for name in timings:
        if name != "torch eager fp32":
            key = "inference_batch1_" + name.lower().replace(" ", "_") + "_over_torch_eager_fp32"
            speedup[key] = timings["torch eager fp32"]["batch1_median_ms"] / timings[name]["batch1_median_ms"]
    return speedup


# ----------------------------------------------------------------------------- the command


def describe_setup(args, device, precision):
    """The machine, the software and the command, as the JSON's "setup" and the table's first lines give them."""
    return {
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


def fill_defaults(args):
    """The defaults that depend on --quick."""
    if args.folder_images is None:
        args.folder_images = 100 if args.quick else grading.FOLDER_IMAGES
    if args.quick:
        args.images = args.images or 96
        args.epochs = args.epochs or 2
    args.images, args.epochs = args.images or 800, args.epochs or 3


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    fill_defaults(args)
    device = choose_device(args.device)
    precision = choose_precision(device, "auto")
    setup_backends(device, precision)
    setup = describe_setup(args, device, precision)
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
        print_recipes(results, setup)
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
