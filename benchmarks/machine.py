"""What the speed benchmark reads from the machine: the device's name, the CPU's instruction sets, and for each
part of a benchmark its seconds, its peak memory and how busy other processes kept the CPUs meanwhile.

For benchmarks/speed.py and benchmarks/ablations.py; Linux gives every number (/proc), other systems most.
"""

import ctypes
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ucgrade.device import synchronize


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
