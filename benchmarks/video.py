"""Video grading speed (issue 20): `python predict.py video.mp4` as a whole process, as a multiple of real time.

It writes a 1080p, 25 frames/s H.264 video of demo pictures (ucgrade.demo) with the camera moving over them,
so that the codec has work to do, and times predict.py on it in four configurations: the int8 .onnx and the
.pt, each at the default --fps and at --fps all. Each is one process, start-up and decoding included; its
peak memory (RSS) is read from the kernel. Then the parts alone, in this process, say what limits the speed:
decoding every frame, scaling the sampled ones in the decoder, and the model on their crops. Peak memory of
a short and of the long video shows that frames are never all held.

    python benchmarks/video.py                                  # trains a throwaway ResNet50 run (weights do not
                                                                # change the speed), ~10 min on a quiet 2-core CPU
    python benchmarks/video.py --weights outputs/train --json video.json
    python benchmarks/video.py --seconds 10 --size 640x360 --arch resnet18   # a quick look, ~2 min

Targets on a 2-core CPU (issue 20): the int8 .onnx at least 5x real time at the default --fps, and at least
1x (25 frames/s) with --fps all. Run it on a quiet machine: the load average is printed first, and figures
taken while it is above 1 do not count.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ucgrade import demo  # noqa: E402
from ucgrade.grader import load_grader  # noqa: E402
from ucgrade.locate import find_models  # noqa: E402
from ucgrade.video import decoded_frames, open_video, sample_frames  # noqa: E402
from ucgrade.videograde import FPS  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "avx_vnni", "avx512_vnni")
SHORT_SECONDS = 20  # the short video of the memory comparison


def get_args_parser():
    parser = argparse.ArgumentParser(description="Video grading speed: predict.py on a generated 1080p video.")
    parser.add_argument("--seconds", type=float, default=120, help="length of the video (default: %(default)s)")
    parser.add_argument("--size", default="1920x1080", help="frame size WxH (default: %(default)s)")
    parser.add_argument("--rate", type=int, default=25, help="frames per second (default: %(default)s)")
    parser.add_argument(
        "--weights", default=None, help="a run folder or best.pt with its model.int8.onnx beside it (default: a "
        "throwaway one-epoch run of --arch on generated pictures)",
    )  # fmt: skip
    parser.add_argument("--arch", default="resnet50", help="of the throwaway run (default: %(default)s)")
    parser.add_argument("--work", default=None, help="folder for the video and the run (default: a temporary one)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE")
    parser.add_argument(
        "--int8-only", action="store_true", help="leave out the .pt runs (with benchmarks/avx2_onnxruntime.py's copy "
        "of ONNX Runtime, which changes only the .onnx's speed)",
    )  # fmt: skip
    return parser


def cpu_name():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return model, sorted(flag for flag in CPU_FLAGS if flag in flags), len(os.sched_getaffinity(0))


def write_benchmark_video(path, seconds, width, height, rate):
    """H.264 (libx264, veryfast, yuv420p) of twelve demo pictures, ten seconds each in turn, the view drifting a
    few pixels a frame across each, with the black margins of an endoscopy monitor."""
    import av

    rng = np.random.default_rng(0)
    side = (height * 9 // 8 + 3) // 4 * 4  # room for the view to move; make_image wants a multiple of 4
    pictures = [np.asarray(demo.make_image(demo.GRADES[k % 3], rng, side)) for k in range(12)]
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=rate, options={"preset": "veryfast"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    canvas = np.zeros((height, width, 3), np.uint8)
    left, room = (width - height) // 2, side - height
    for i in range(round(seconds * rate)):
        picture = pictures[(i // (10 * rate)) % len(pictures)]
        angle = 2 * np.pi * i / (4 * rate)  # a circle every 4 s
        x, y = (int(room / 2 * (1 + np.cos(angle))), int(room / 2 * (1 + np.sin(angle))))
        canvas[:, left : left + height] = picture[y : y + height, x : x + height]
        container.mux(stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")))
    container.mux(stream.encode())
    container.close()
    return Path(path)


def throwaway_run(work, arch):
    """A one-epoch run on 24 generated pictures and its int8 export: the speed does not depend on the weights."""
    data = demo.make_dataset(work / "data", per_class=8, size=256)
    for command in (
        ["qq.py", "--data", data, "--out", work / "out", "--epochs", "1", "--arch", arch, "--pretrained", "no",
         "--device", "cpu", "--cam-examples", "0"],
        ["export.py", work / "out" / "train", "--int8"],
    ):  # fmt: skip
        subprocess.run(
            [sys.executable, str(ROOT / command[0]), *map(str, command[1:])], check=True, capture_output=True
        )
    return work / "out" / "train" / "best.pt"


def time_predict(video, weights, fps, work):
    """predict.py on the video as one process: its wall seconds, peak RSS (MB, from the kernel) and video.json."""
    command = [sys.executable, str(ROOT / "predict.py"), str(video), "--weights", str(weights), "--json"]
    command += ["--fps", fps, "--video-out", str(work / "videos")]
    command += ["--device", "cpu"] if Path(weights).suffix == ".pt" else []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not the largest child's so far
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"predict.py failed: {stderr[-1500:]}")
    summary = json.loads(stdout)["videos"][0]
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "summary": summary}


def time_parts(video, int8, fps):
    """What limits the speed, in this process: decoding every frame, scaling the sampled frames in the decoder,
    and the int8 model on their crops (frames per second each)."""
    clip = open_video(video)
    start = time.perf_counter()
    decoded = sum(1 for _ in decoded_frames(clip))
    decode_s = time.perf_counter() - start
    clip.close()
    grader = load_grader(int8)
    clip = open_video(video)
    start = time.perf_counter()
    crops = [grader.crop(frame.picture) for frame in sample_frames(clip, fps, grader.resize_size)]
    sample_s = time.perf_counter() - start
    clip.close()
    batch = np.stack(crops[:64])
    grader.grade_crops(batch[:16])  # warm-up
    start = time.perf_counter()
    grader.grade_crops(batch)
    model_s = time.perf_counter() - start
    return {
        "decode_fps": decoded / decode_s,
        "decode_and_scale_fps": decoded / sample_s,
        "sampled": len(crops),
        "model_int8_fps": len(batch) / model_s,
    }


def main(args):
    width, height = (int(v) for v in args.size.lower().split("x"))
    model, flags, cores = cpu_name()
    load = os.getloadavg()[0]
    print(f"CPU: {model}, {cores} cores, {' '.join(flags) or 'no AVX2'}; load average {load:.2f}", flush=True)
    print(f"ONNX Runtime {onnxruntime.__version__} from {Path(onnxruntime.__file__).parent}")
    if load > 1:
        print("warning: the machine is busy (load above 1): these figures must be measured again on a quiet one.")
    work = Path(args.work or tempfile.mkdtemp(prefix="ucgrade-video-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    pt = find_models(args.weights)[0] if args.weights else throwaway_run(work, args.arch)
    int8 = pt.parent / "model.int8.onnx"
    print(f"writing a {args.seconds:g} s {width}x{height} {args.rate} frames/s H.264 video ...", flush=True)
    video = write_benchmark_video(work / "bench.mp4", args.seconds, width, height, args.rate)
    short = write_benchmark_video(work / "short.mp4", min(SHORT_SECONDS, args.seconds), width, height, args.rate)
    rows = []
    for weights, fps in itertools.product(
        (int8,) if args.int8_only else (int8, pt), (str(FPS).removesuffix(".0"), "all")
    ):
        result = time_predict(video, weights, fps, work)
        rows.append({"model": weights.name, "fps": fps, "real_time_x": args.seconds / result["wall_s"]} | result)
        print(f"{weights.name:16} --fps {fps:4}  {rows[-1]['real_time_x']:6.2f}x real time  "
              f"({result['wall_s']:.1f} s, {result['summary']['frames_graded']} frames graded, "
              f"peak {result['peak_rss_mb']:.0f} MB)", flush=True)  # fmt: skip
    memory, short_s = time_predict(short, int8, str(FPS).removesuffix(".0"), work), min(SHORT_SECONDS, args.seconds)
    print(f"peak memory, int8 at the default --fps: {memory['peak_rss_mb']:.0f} MB for {short_s:g} s, "
          f"{rows[0]['peak_rss_mb']:.0f} MB for {args.seconds:g} s")  # fmt: skip
    parts = {fps: time_parts(video, int8, None if fps == "all" else FPS) for fps in ("default", "all")}
    print(f"alone: decoding {parts['all']['decode_fps']:.0f} frames/s; decoding and scaling every frame "
          f"{parts['all']['decode_and_scale_fps']:.0f} frames/s; the int8 model {parts['all']['model_int8_fps']:.0f} "
          "crops/s")  # fmt: skip
    if args.json:
        figures = {"cpu": model, "cpu_flags": flags, "cores": cores, "load_average": load, "seconds": args.seconds,
                   "size": args.size, "rate": args.rate, "onnxruntime": str(Path(onnxruntime.__file__).parent),
                   "runs": [{k: v for k, v in r.items() if k != "summary"} for r in rows],
                   "short_video_peak_rss_mb": memory["peak_rss_mb"], "parts": parts}  # fmt: skip
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
