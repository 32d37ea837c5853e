"""The device's ceiling, and where a training rate stands against it, for benchmarks/speed.py.

The ceiling is the device's bf16 and fp32 rate in a large matrix multiply and a large convolution (bf16 only
where the device computes it natively). A training image costs TRAIN_STEP_FACTOR forward passes of
FORWARD_GFLOP_224 at 224 px, so an img/s is a GFLOP/s and a share of each ceiling.
"""

import statistics
import time

import torch

from ucgrade.device import cpu_has_fast_bf16, cuda_has_fast_bf16, setup_backends, synchronize

FORWARD_GFLOP_224 = 8.2  # ResNet50 forward pass at 224 px: 4.1 G multiply-adds
TRAIN_STEP_FACTOR = 3  # forward + backward (gradients of the activations and of the weights)


def train_gflop_per_image(img_size):
    return TRAIN_STEP_FACTOR * FORWARD_GFLOP_224 * (img_size / 224) ** 2


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
