"""Ablations (issue 5): each way to speed up, timed side by side with the project's choice, in one run.

The candidates of each question run in interleaved rounds on the same inputs, so that a machine
whose speed drifts (other work, clocks) affects them alike; each is reported as its best and median
rate over the rounds and as a ratio to the project's current choice (the first row, marked *).

    python benchmarks/ablations.py --json ablations.json   # every question, ~5 min on a quiet 2-core CPU
    python benchmarks/ablations.py --only inference threads --rounds 3
    python benchmarks/ablations.py --img-size 64 --rounds 1 --only batch   # seconds: a smoke run

Questions: threads; omp_wait (OpenMP threads that spin or sleep while they wait); malloc (glibc
keeping freed memory instead of returning large blocks to the OS); batch (training
batch size); layout (channels_last or not, in training and at batch-1 inference); normalize (its
cost next to a step); workers (DataLoader processes over a cached epoch); compile_train
(torch.compile for training: compile time and break-even); inference (batch 1: eager, as predict.py
loads the model, torch.compile with freezing, TorchScript freezing); feature_batch (inference
throughput by batch size, as --freeze-backbone computes its features).
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script, and before torch imports tqdm, which reads it then
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from machine import cpu_snapshot, others_cpu_share  # noqa: E402  (benchmarks/machine.py)
from project import RECIPE, project_args  # noqa: E402  (benchmarks/project.py)

from ucgrade import data, engine, presets  # noqa: E402
from ucgrade.cli import run_cli  # noqa: E402
from ucgrade.demo import make_dataset  # noqa: E402
from ucgrade.device import (  # noqa: E402
    Runtime,
    autocast,
    choose_device,
    choose_precision,
    make_grad_scaler,
    setup_backends,
    synchronize,
)
from ucgrade.model import build_model  # noqa: E402

QUESTIONS = (
    "threads",
    "omp_wait",
    "malloc",
    "batch",
    "layout",
    "normalize",
    "workers",
    "compile_train",
    "inference",
    "feature_batch",
)


def get_args_parser():
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Time each way to speed up training and inference side by side with the project's choice.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--only",
        nargs="+",
        choices=QUESTIONS + ("child",),
        default=list(QUESTIONS),
        help="questions to answer (default: all)",
    )
    add("--rounds", type=int, default=3, help="interleaved rounds per question (default: %(default)s)")
    add("--img-size", type=int, default=224, help="input size of the model (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    add("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one per core)")
    add("--json", default=None, metavar="FILE", help="also write the numbers to FILE as JSON")
    return parser


# ----------------------------------------------------------------------------- timing


def compare(candidates, rounds, device):
    """candidates: name -> fn() returning the images it processed. Interleaved rounds after one warm-up
    call each; returns name -> {best, median} in images/s and their ratio to the first candidate."""
    for fn in candidates.values():
        fn()
    rates = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            images = fn()
            synchronize(device)
            rates[name].append(images / (time.perf_counter() - start))
    return summarize(rates)


def summarize(rates):
    first = next(iter(rates))
    return {
        name: {
            "best_images_per_s": max(r),
            "median_images_per_s": statistics.median(r),
            "rounds": r,
            "ratio_best": max(r) / max(rates[first]),
            "ratio_median": statistics.median(r) / statistics.median(rates[first]),
        }
        for name, r in rates.items()
    }


def uint8_batch(batch_size, img_size, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 3, (batch_size,), generator=generator)


def trainer(device, precision, batch, channels_last=True, compiled=False, steps=2, seed=0, prenormalize=False):
    """A fresh model and optimizer; the returned fn runs `steps` training steps through engine.train_one_epoch.

    With prenormalize (or a contiguous model), the batch is normalised once beforehand, in the model's layout.
    """
    torch.manual_seed(seed)
    model = build_model(3).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum)
    criterion = torch.nn.CrossEntropyLoss()
    scaler = make_grad_scaler(device, precision)
    step_model = torch.compile(model) if compiled else model
    images, targets = batch
    if prenormalize or not channels_last:  # engine.to_input leaves float tensors as they are
        images = engine.to_input(images, device)
        images = images if channels_last else images.contiguous()
    batches = [(images, targets)] * steps

    def run():
        engine.train_one_epoch(step_model, criterion, optimizer, batches, Runtime(device, precision), 0, scaler)
        return steps * len(targets)

    return run


# ----------------------------------------------------------------------------- the questions


def ask_threads(args, device, precision):
    if device.type != "cpu":
        return None
    threads = torch.get_num_threads()
    fn = trainer(device, precision, uint8_batch(16, args.img_size, device))

    def with_threads(n):
        def run():
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)

        return run

    options = {f"{threads} threads*": with_threads(threads)}
    options |= {f"{n} thread(s)": with_threads(n) for n in sorted({1, max(1, threads // 2)} - {threads})}
    return compare(options, args.rounds, device)


def ask_omp_wait(args, device, precision):
    """By default idle OpenMP threads spin for a while before they sleep: fastest on an idle machine,
    but when other processes want the cores, spinning and preempted threads slow every parallel
    region down. PASSIVE threads sleep at once. OpenMP reads this when torch starts: child processes."""
    if device.type != "cpu":
        return None
    return in_children(args, {"default*": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}})


def ask_malloc(args, device, precision):
    """glibc serves blocks over 32 MB (the largest activations of a batch) with fresh pages from the OS
    and returns them at free, so each step faults them in again; the alternative keeps freed memory in
    the process. glibc reads these settings at start-up: child processes."""
    if device.type != "cpu":
        return None
    keep = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    return in_children(args, {"default*": {}, "MALLOC_MMAP_MAX_=0, no trim": keep})


def in_children(args, environments):
    """Time the `child` tasks in a fresh process per environment (name -> variables to set), in interleaved rounds."""
    rates = {}
    for _ in range(args.rounds):
        for name, variables in environments.items():
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("OMP_WAIT_POLICY", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
            } | variables
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "child.json"
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--only",
                        "child",
                        "--rounds",
                        "1",
                        "--img-size",
                        str(args.img_size),
                        "--json",
                        str(out),
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                child = json.loads(out.read_text())["child"]
            for task, r in child.items():
                if isinstance(r, dict):
                    rates.setdefault(task, {}).setdefault(f"{task}, {name}", []).append(r["best_images_per_s"])
    return {name: r for task in rates.values() for name, r in summarize(task).items()}


def ask_child(args, device, precision):
    """The work that in_children times in each child process."""
    singles = [uint8_batch(1, args.img_size, device, seed) for seed in range(8)]
    model = build_model(3).to(device, memory_format=torch.channels_last).eval()
    return compare(
        {
            "train bs16": trainer(device, precision, uint8_batch(16, args.img_size, device), steps=4),
            "train bs64": trainer(device, precision, uint8_batch(64, args.img_size, device), steps=1),
            "inference bs16": inference_loop(model, 16, 64, args.img_size, device, precision),
            "batch 1 inference": predict_loop(model, singles, device, precision),
        },
        args.rounds,
        device,
    )


def ask_batch(args, device, precision):
    sizes = (16, 8, 32, 64)
    options = {
        f"batch {b}" + ("*" if b == RECIPE.batch_size else ""): trainer(
            device, precision, uint8_batch(b, args.img_size, device), steps=max(1, 32 // b)
        )
        for b in sizes
    }
    return compare(options, args.rounds, device)


def ask_layout(args, device, precision):
    batch = uint8_batch(16, args.img_size, device)
    training = compare(
        {
            "train, channels_last*": trainer(device, precision, batch, prenormalize=True),
            "train, contiguous": trainer(device, precision, batch, channels_last=False),
        },
        args.rounds,
        device,
    )
    singles = [uint8_batch(1, args.img_size, device, seed) for seed in range(8)]
    model = build_model(3).to(device).eval()
    model_cl = build_model(3).to(device, memory_format=torch.channels_last).eval()
    inference = compare(
        {
            "batch 1, channels_last model (model_from_checkpoint)*": predict_loop(model_cl, singles, device, precision),
            "batch 1, contiguous model": predict_loop(model, singles, device, precision),
        },
        args.rounds,
        device,
    )
    return training | inference


def predict_loop(model, singles, device, precision):
    @torch.inference_mode()
    def run():
        for images, _ in singles:
            with autocast(device, precision):
                model(engine.to_input(images, device)).argmax(1)
            synchronize(device)
        return len(singles)

    return run


def ask_normalize(args, device, precision):
    """The cost of moving, normalising and reordering a uint8 batch, next to a whole training step."""
    images, targets = uint8_batch(16, args.img_size, device)
    step = trainer(device, precision, (images, targets), steps=1)
    options = {
        "training step (bs16), normalize included*": step,
        "normalize alone (uint8 -> float, channels_last)": lambda: (
            [engine.to_input(images, device) for _ in range(10)] and 10 * len(images)
        ),
        "normalize without the channels_last copy": lambda: (
            [images.to(device).float().div_(255) for _ in range(10)] and 10 * len(images)
        ),
    }
    result = compare(options, args.rounds, device)
    step_ms = 1000 / result["training step (bs16), normalize included*"]["best_images_per_s"]
    for name, r in result.items():
        r["ms_per_image"] = 1000 / r["best_images_per_s"]
        r["share_of_step"] = r["ms_per_image"] / step_ms
    return result


def ask_workers(args, device, precision, folder):
    """train_one_epoch over the cached images with 0, 1 and 2 DataLoader workers (each a fresh loader per round)."""
    make_dataset(folder, per_class=32, size=384, seed=0)
    image_set = data.read_data(project_args(folder, args.img_size))
    indices = list(range(len(image_set.paths)))
    dataset = data.ImageDataset(
        image_set, indices, presets.train_transform(args.img_size), presets.resize_size_for(args.img_size)
    )
    torch.manual_seed(0)
    model = build_model(3).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=RECIPE.lr, momentum=RECIPE.momentum)
    criterion, scaler = torch.nn.CrossEntropyLoss(), make_grad_scaler(device, precision)

    def epoch(workers):
        def run():
            loader = data.make_loader(
                dataset, 16, workers, Runtime(device), shuffle=True, generator=torch.Generator().manual_seed(0)
            )
            engine.train_one_epoch(model, criterion, optimizer, loader, Runtime(device, precision), 0, scaler)
            return len(dataset)

        return run

    chosen = 0 if device.type == "cpu" else 2
    options = {f"{chosen} workers*": epoch(chosen)} | {f"{w} workers": epoch(w) for w in (0, 1, 2) if w != chosen}
    return compare(options, args.rounds, device)


def ask_compile_train(args, device, precision):
    batch = uint8_batch(16, args.img_size, device)
    eager = trainer(device, precision, batch)
    compiled = trainer(device, precision, batch, compiled=True)
    start = time.perf_counter()
    compiled()  # compiles
    compile_s = time.perf_counter() - start
    result = compare({"eager*": eager, "torch.compile": compiled}, args.rounds, device)
    return result | {
        "compile_s": compile_s,
        "break_even": break_even(compile_s, result["eager*"], result["torch.compile"]),
    }


def break_even(prepare_s, before, after):
    """Images after which the faster option has paid back its preparation time (None if it is not faster)."""
    saved = 1 / before["median_images_per_s"] - 1 / after["median_images_per_s"]
    return {"images": prepare_s / saved if saved > 0 else None, "prepare_s": prepare_s}


def ask_inference(args, device, precision):
    """Batch 1, uint8 crop to prediction: the model as predict.py loads it, and faster ways to run it."""
    singles = [uint8_batch(1, args.img_size, device, seed) for seed in range(8)]
    plain = build_model(3).to(device).eval()
    state = plain.state_dict()

    def fresh():
        model = build_model(3)
        model.load_state_dict(state)
        return model.to(device, memory_format=torch.channels_last).eval()

    options = {
        "eager, channels_last model (model_from_checkpoint)*": predict_loop(fresh(), singles, device, precision),
        "eager, contiguous model": predict_loop(plain, singles, device, precision),
    }
    prepare = {}
    start = time.perf_counter()
    compiled = torch.compile(fresh(), options={"freezing": True})
    predict_loop(compiled, singles[:1], device, precision)()
    prepare["torch.compile, freezing"] = time.perf_counter() - start
    options["torch.compile, freezing"] = predict_loop(compiled, singles, device, precision)
    if device.type == "cpu":
        start = time.perf_counter()
        # without autocast's weight cache, so that the traced graph casts the weights itself
        trace_precision = (
            contextlib.nullcontext()
            if precision == "fp32"
            else torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
        )
        with torch.inference_mode(), trace_precision:
            frozen = torch.jit.freeze(torch.jit.trace(fresh(), engine.to_input(singles[0][0], device)))
        jit_loop = predict_loop(frozen, singles, device, precision)
        jit_loop()
        prepare["TorchScript trace + freeze"] = time.perf_counter() - start
        options["TorchScript trace + freeze"] = jit_loop
    result = compare(options, args.rounds, device)
    for name, r in result.items():
        r["batch1_ms_best"] = 1000 / r["best_images_per_s"]
        r["batch1_ms_median"] = 1000 / r["median_images_per_s"]
    eager = result["eager, channels_last model (model_from_checkpoint)*"]
    return result | {"break_even_by_option": {name: break_even(s, eager, result[name]) for name, s in prepare.items()}}


def inference_loop(model, batch_size, images_per_call, img_size, device, precision):
    images, _ = uint8_batch(batch_size, img_size, device)
    reps = max(1, images_per_call // batch_size)

    @torch.inference_mode()
    def run():
        for _ in range(reps):
            with autocast(device, precision):
                model(engine.to_input(images, device))
        return reps * batch_size

    return run


def ask_feature_batch(args, device, precision):
    model = build_model(3).to(device, memory_format=torch.channels_last).eval()
    options = {
        f"batch {b}" + ("*" if b == RECIPE.batch_size else ""): inference_loop(
            model, b, 64, args.img_size, device, precision
        )
        for b in (16, 32, 64)
    }
    return compare(options, args.rounds, device)


# ----------------------------------------------------------------------------- the run


def print_result(question, result):
    print(f"\n{question}")
    for name, r in result.items():
        if not isinstance(r, dict) or "best_images_per_s" not in r:
            continue
        extra = f"  {r['ms_per_image']:.2f} ms/img ({r['share_of_step']:.0%} of a step)" if "ms_per_image" in r else ""
        extra += (
            f"  batch 1: {r['batch1_ms_median']:.1f} ms median, {r['batch1_ms_best']:.1f} ms best"
            if "batch1_ms_best" in r
            else ""
        )
        print(
            f"  {name:<52}{r['best_images_per_s']:>8.1f} img/s best {r['median_images_per_s']:>8.1f} median"
            f"   x{r['ratio_best']:.2f} best x{r['ratio_median']:.2f} median{extra}"
        )
    if "compile_s" in result:
        be = result["break_even"]["images"]
        print(
            f"  compile: {result['compile_s']:.0f} s; pays for itself after "
            + (f"{be:.0f} training images" if be else "never (not faster)")
        )
    for name, be in result.get("break_even_by_option", {}).items():
        print(
            f"  {name}: {be['prepare_s']:.1f} s to prepare; pays for itself after "
            + (f"{be['images']:.0f} images" if be["images"] else "never (not faster)")
        )


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = choose_device(args.device)
    precision = choose_precision(device, "auto")
    setup_backends(device, precision)
    print(
        f"device {device}, precision {precision}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.rounds} rounds, {args.img_size} px",
        flush=True,
    )
    results = {
        "device": str(device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "img_size": args.img_size,
        "torch": str(torch.__version__),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with tempfile.TemporaryDirectory() as folder:
        for question in args.only:
            start, cpu_start = time.perf_counter(), cpu_snapshot()
            extra = (Path(folder) / "images",) if question == "workers" else ()
            result = globals()[f"ask_{question}"](args, device, precision, *extra)
            if result is None:
                continue
            share = others_cpu_share(cpu_start, cpu_snapshot())
            results[question] = result | {"seconds": time.perf_counter() - start, "others_cpu_share": share}
            busy = "n/a" if share is None else f"{share:.0%}"
            print_result(
                f"{question} ({time.perf_counter() - start:.0f} s; other processes used {busy} of the CPUs meanwhile)",
                result,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nnumbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
