"""Choose the device and the numeric precision once, and pass them on in one Runtime."""

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed
from .cli import UserError


def choose_device(name="auto"):
    """auto: CUDA, then Apple MPS, then the CPU. An explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} was asked for, but this machine has no CUDA GPU that PyTorch can use; use "
                "--device cpu or auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s); use cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}."
            )
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(
            "--device mps was asked for, but Apple's MPS backend is not available here; use --device cpu or auto."
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return device


def cpu_has_fast_bf16():
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX), so bf16 autocast pays."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def cuda_has_fast_bf16(device):
    """True from Ampere (compute capability 8.0) on; older GPUs only emulate bf16, slowly."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def choose_precision(device, name="auto", resumed_from=None):
    """auto: bf16 on GPUs and CPUs that support it, fp16 on older GPUs, fp32 otherwise.

    A resumed run (resumed_from: the precision it last used) goes on in that precision under auto,
    unless the device has no fast support for it (fp16 from a GPU resumed on a CPU, bf16 on a CPU
    or GPU without native bf16): then in the device's own choice, with a note.
    """
    if name == "auto" and resumed_from is not None:
        own = choose_precision(device)
        if resumed_from in ("fp32", own) or (resumed_from == "fp16" and device.type == "cuda"):
            return resumed_from
        print(f"note: the run trained in {resumed_from}, which {device} does not run fast; it goes on in {own}.")
        return own
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_fast_bf16(device) else "fp16"
        if device.type == "cpu" and cpu_has_fast_bf16():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is for GPUs; on the CPU use bf16 or fp32.")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 is not supported by this GPU; use fp16 or fp32.")
    return name


@dataclass
class Runtime:
    """Where and how a run computes, passed as one object instead of loose arguments: the device,
    the precision, the stop signal (Ctrl-C, SIGTERM), and this process's rank among world_size
    processes (0 of 1 without torchrun)."""

    device: torch.device
    precision: str = "fp32"
    stop: Callable[[], bool] = lambda: False
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        """The process that writes the run's files."""
        return self.rank == 0

    def should_stop(self):
        """True on every process once any of them was asked to stop."""
        return distributed.any_process(self.stop(), self)


def make_runtime(device_name="auto", precision="auto", resumed_from=None):
    """The Runtime of this process: the device and the precision, chosen once, with its backends set up.

    Under torchrun, each process takes its own GPU (cuda:LOCAL_RANK), or the CPU, and joins the others.
    """
    env = distributed.torchrun_env()
    rank, _, world_size = env or (0, 0, 1)
    if rank != 0:  # one process speaks for the run; errors still reach stderr from every one
        sys.stdout = open(os.devnull, "w")
    device = choose_device(device_name)
    if env and device.type == "cuda":
        device = torch.device("cuda", env[1])
        torch.cuda.set_device(device)
    if env:
        distributed.init(device)
    elif device.type == "cuda" and torch.cuda.device_count() > 1:
        count = torch.cuda.device_count()
        print(
            f"note: this machine has {count} GPUs and python qq.py uses one; to train on all of them, run "
            f"torchrun --nproc-per-node {count} qq.py ... (or python -m torch.distributed.run --nproc-per-node "
            f"{count} qq.py ...)."
        )
    precision = choose_precision(device, precision, resumed_from)
    setup_backends(device, precision)
    return Runtime(device, precision, rank=rank, world_size=world_size)


@contextlib.contextmanager
def explain_out_of_memory(batch_size):
    """Running out of GPU or host memory is one sentence that suggests a smaller batch."""
    smaller = max(1, batch_size // 2)
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(
            f"ran out of GPU memory with --batch-size {batch_size}; try a smaller --batch-size, for example {smaller}."
        ) from None
    except (RuntimeError, MemoryError) as error:  # MemoryError: Python or NumPy could not allocate
        if isinstance(error, MemoryError) or ("allocate" in str(error) and "memory" in str(error)):
            raise UserError(
                f"ran out of memory with --batch-size {batch_size}; try a smaller --batch-size, for example "
                f"{smaller}, or a smaller --img-size."
            ) from None
        raise


def autocast(device, precision):
    """The autocast context for a precision, or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device, precision):
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def setup_backends(device, precision):
    if device.type == "cuda":
        # fixed input sizes: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
        # TF32 speeds up what autocast leaves in float32; a run that asked for fp32 gets true fp32
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
