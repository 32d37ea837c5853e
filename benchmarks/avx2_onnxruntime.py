"""A copy of ONNX Runtime that runs its AVX2 kernels on a CPU with AVX-512: to measure the grading speed of most
hospital desktops (AVX2 only) on a machine that has more.

ONNX Runtime picks its kernels once, at import, from the CPU's instruction sets and from the register (XCR0) in
which the operating system says which vector registers it saves: AVX-512 kernels need the ZMM and mask
registers' bits (0xE0). This script copies the installed package into a folder and changes each `xgetbv` that
reads XCR0 into `push 7; pop rax` (x87, SSE and AVX state only), so the copy sees a CPU without AVX-512 and uses
the AVX2 kernels it would use there (including its int8 ones: vpmaddubsw instead of AVX-512 VNNI). Nothing else
changes: export.py's int8 models (7-bit weights) give the same outputs bit for bit, which --check checks. A model
with 8-bit weights does not: AVX2's vpmaddubsw sums pairs of products in 16 bits and saturates where AVX-512 VNNI
does not, as it would on an AVX2-only CPU (the test uses this to show that the copy runs the AVX2 kernels).

    python benchmarks/avx2_onnxruntime.py /tmp/ort-avx2 --check outputs/train/model.int8.onnx
    PYTHONPATH=/tmp/ort-avx2 python benchmarks/video.py --weights outputs/train

What it cannot show: the speed of an older core. An AVX2-only EPYC ran the int8 model at batch 1 in 32 ms
(issue 11) where this copy takes about 23 ms on a Zen 4 EPYC; the kernels are the same, the cores are not.
Needs objdump (binutils) to find the instructions; Linux x86-64 only.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

XGETBV = bytes.fromhex("0f01d0")
ZERO_EXTEND = bytes.fromhex("89c0")  # mov %eax,%eax, after an xgetbv whose edx is read too
AVX_ONLY = bytes.fromhex("6a0758")  # push $7; pop %rax: XCR0 = x87 | SSE | AVX
AVX_ONLY_HIGH_ZERO = AVX_ONLY + bytes.fromhex("31d2")  # ... and xor %edx,%edx


def xgetbv_offsets(library):
    """File offsets of the xgetbv instructions in library's code (objdump's addresses are offsets in a shared
    library whose first segment is loaded at 0, as ONNX Runtime's is; the bytes are checked before patching)."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return [int(line.split(":")[0], 16) for line in listing.splitlines() if line.strip().endswith("xgetbv")]


def patch(library):
    """Make every xgetbv in library report AVX state only; the number patched."""
    code = bytearray(library.read_bytes())
    offsets = xgetbv_offsets(library)
    for offset in offsets:
        if code[offset : offset + 3] != XGETBV:
            sys.exit(f"error: {library} at {offset:#x} is not an xgetbv; this ONNX Runtime build is not supported.")
        if code[offset + 3 : offset + 5] == ZERO_EXTEND:
            code[offset : offset + 5] = AVX_ONLY_HIGH_ZERO
        else:
            code[offset : offset + 3] = AVX_ONLY
    library.write_bytes(code)
    return len(offsets)


def batch1_ms(model, path_first):
    """The median ms of the int8 model at batch 1 through the ONNX Runtime found first on path_first, and its
    output for one fixed input, in a fresh process."""
    script = (
        "import sys, time, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(model)!r}, providers=['CPUExecutionProvider'])\n"
        "i = s.get_inputs()[0]\n"
        "x = np.random.default_rng(0).integers(0, 256, (1, 3, 224, 224)).astype(np.uint8 if 'uint8' in i.type "
        "else np.float32)\n"
        "out = s.run(None, {i.name: x})[0]\n"
        "times = []\n"
        "for _ in range(30):\n"
        "    t = time.perf_counter(); s.run(None, {i.name: x}); times.append(time.perf_counter() - t)\n"
        "print(sorted(times)[15] * 1000, ' '.join(repr(float(v)) for v in out.ravel()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path_first:
        env["PYTHONPATH"] = str(path_first)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    ms, *values = result.stdout.split()
    return float(ms), values


def main():
    parser = argparse.ArgumentParser(description="A copy of ONNX Runtime that uses its AVX2 kernels on an AVX-512 CPU.")
    parser.add_argument("folder", type=Path, help="where the copy goes (then PYTHONPATH=FOLDER)")
    parser.add_argument("--check", type=Path, metavar="MODEL", help="an .onnx: compare speed and outputs")
    args = parser.parse_args()
    import onnxruntime

    source = Path(onnxruntime.__file__).parent
    target = args.folder / "onnxruntime"
    if target.exists():
        sys.exit(f"error: {target} exists; give a new folder.")
    if shutil.which("objdump") is None:
        sys.exit("error: objdump is not installed, and it finds the instructions to change; install binutils.")
    args.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.folder) as unfinished:  # a failure leaves no half-made copy
        copy = Path(unfinished) / "onnxruntime"
        shutil.copytree(source, copy)
        libraries = sorted((copy / "capi").glob("onnxruntime_pybind11_state*.so"))
        if not libraries:
            sys.exit(f"error: no onnxruntime_pybind11_state*.so in {source / 'capi'}; this build is not supported.")
        for library in libraries:
            print(f"{library.name}: {patch(library)} xgetbv instructions now report AVX state only")
        copy.rename(target)
    print(f"use it with: PYTHONPATH={args.folder} python ...")
    if args.check:
        check(args.check, args.folder)


def check(model, folder):
    """Time the model at batch 1 as installed and through the copy, and compare their outputs."""
    start = time.perf_counter()
    (native, native_out), (avx2, avx2_out) = batch1_ms(model, None), batch1_ms(model, folder)
    differ = sum(a != b for a, b in zip(native_out, avx2_out))
    print(
        f"{model}: batch 1 median {native:.1f} ms as installed, {avx2:.1f} ms with the AVX2 kernels "
        f"({avx2 / native:.2f}x), {f'{differ} outputs differ' if differ else 'the same outputs'} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    if differ:
        print(
            "  int8 weights that use all 8 bits overflow AVX2's 16-bit sums (vpmaddubsw) where VNNI's do not, which "
            "is why export.py quantises weights to 7 bits; an fp32 model's last bits depend on the order of its sums"
        )


if __name__ == "__main__":
    main()
