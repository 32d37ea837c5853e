"""Grade whole videos with the one grader: `python predict.py video.mp4`, or folders that hold videos.

Each sampled frame is decoded (ucgrade.video), cropped by grader.crop and graded by grader.grade_crops in
batches, like an image file; its quality is measured on the same crop (ucgrade.quality). The rows, never
the pictures, are kept: a one-hour video takes the memory of a one-minute one. The next batch is decoded
in a thread while this one is graded. Then the timeline gives the video's grade (ucgrade.timeline), and
ucgrade.videoout writes the results folder. Without torch (a .pt grader brings its own).
"""

import functools
import itertools
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import files, quality, timeline, videoout
from .cli import RunInterrupted, UserError
from .interrupt import GracefulStop
from .progress import progress
from .video import VideoError, frame_batches, open_video, sample_frames

FPS = 5.0  # frames/s graded: consecutive frames at 25 frames/s are nearly the same picture (the scope moves
# about 4 mm/s on withdrawal), five frames fill a 1 s smoothing window, and the int8 model keeps 5x real time


@dataclass
class VideoSettings:
    fps: float  # None: every frame
    smooth: float
    min_segment: float
    min_gradable: float
    thresholds: quality.Thresholds
    batch_size: int
    video_out: Path

    def as_dict(self):
        return {
            "fps": "all" if self.fps is None else self.fps,
            "smooth": self.smooth,
            "min_segment": self.min_segment,
            "min_gradable": self.min_gradable,
            "dark": self.thresholds.dark,
            "overexposed": self.thresholds.overexposed,
            "blur": self.thresholds.blur,
        }


def add_video_arguments(parser):
    """predict.py's flags for videos, in their own group of its --help."""
    group = parser.add_argument_group("videos (mp4, mov, avi, mkv, ...)")
    group.add_argument(
        "--fps",
        default=str(FPS).removesuffix(".0"),
        metavar="N",
        help="frames graded per second of video, or 'all' (default: %(default)s)",
    )
    group.add_argument(
        "--smooth",
        type=float,
        default=timeline.SMOOTH,
        metavar="S",
        help="seconds over which the frames' probabilities are averaged (default: %(default)s)",
    )
    group.add_argument(
        "--min-segment",
        type=float,
        default=timeline.MIN_SEGMENT,
        metavar="S",
        help="seconds of gradable frames a grade must hold to count as a segment (default: %(default)s)",
    )
    group.add_argument(
        "--min-gradable",
        type=float,
        default=timeline.MIN_GRADABLE,
        metavar="S",
        help="seconds of gradable footage below which a video is not gradable (also below "
        f"{timeline.MIN_GRADABLE_SHARE:.0%}% of it) (default: %(default)s)",
    )
    group.add_argument(
        "--dark",
        type=float,
        default=quality.DARK,
        metavar="LUMA",
        help="a frame whose mean brightness (0-255) is below this is too dark (default: %(default)s)",
    )
    group.add_argument(
        "--overexposed",
        type=float,
        default=quality.OVEREXPOSED,
        metavar="SHARE",
        help="a frame with more than this share of clipped pixels is overexposed (default: %(default)s)",
    )
    group.add_argument(
        "--blur",
        type=float,
        default=quality.BLUR,
        metavar="VAR",
        help="a frame whose variance of the Laplacian is below this is blurred; frames.csv shows each frame's "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--video-out",
        default=None,
        metavar="DIR",
        help="the folder that gets one results folder per video, named after it, never overwritten "
        "(default: videos under --out)",
    )
    group.add_argument(
        "--labels",
        default=None,
        metavar="CSV",
        help="with --evaluate, the input is a folder of videos and CSV (path,grade[,patient]) labels them: a "
        "video-level evaluation (default: none)",
    )
    group.add_argument(
        "--live",
        action="store_true",
        help="the one input is a capture device (/dev/video0) or a stream URL, graded as it plays until it ends or "
        "Ctrl-C; a file is read at its frame rate (default: off)",
    )


def video_settings(args):
    """The VideoSettings of predict.py's arguments, each checked: a mistake is one sentence."""
    if str(args.fps).lower() == "all":
        fps = None
    else:
        try:
            fps = float(args.fps)
        except ValueError:
            fps = math.nan
        if not 0 < fps <= 240:
            raise UserError(
                f"--fps must be a number of frames per second from above 0 to 240, or 'all', not {args.fps}."
            )
    for flag in ("smooth", "min_segment", "min_gradable", "dark", "blur"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be a number of 0 or more, not {value}.")
    if not 0 <= args.overexposed <= 1:
        raise UserError(f"--overexposed is a share of the pixels, from 0 to 1, not {args.overexposed}.")
    video_out = Path(args.video_out) if args.video_out else Path(args.out) / "videos"
    files.check_folder_path(video_out, "--video-out")
    thresholds = quality.Thresholds(args.dark, args.overexposed, args.blur)
    return VideoSettings(fps, args.smooth, args.min_segment, args.min_gradable, thresholds, args.batch_size, video_out)


# ----------------------------------------------------------------------------- one video


def prefetched(iterator):
    """The items of iterator, each produced in a worker thread while the caller works on the one before: PyAV
    decodes and scales without the GIL, so decoding overlaps the model on a CPU with a spare core."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = worker.submit(next, iterator, None)
        while (item := pending.result()) is not None:
            pending = worker.submit(next, iterator, None)
            yield item


def grade_batch(grader, frames, thresholds):
    """(Grades, (brightness, clipped, sharpness), reasons) of a batch of sampled frames, by the one grader."""
    crops = [grader.crop(frame.picture) for frame in frames]
    grades = grader.grade_crops(crops)
    measures = quality.measure(crops)
    return grades, measures, quality.reasons(*measures, grader.flagged(grades.ood_scores), thresholds)


def progress_bar(video, settings):
    """A bar of the sampled frames (frames/s and the time left) on a terminal, as ucgrade.progress draws them;
    nothing in a log, where the video's own line says how fast it went."""
    rate = video.rate if settings.fps is None else min(settings.fps, video.rate)
    total = round(video.duration * rate) if video.duration else None
    return progress(desc=Path(video.name).name, unit="frame", total=total, log=False)


def first_batch(video, settings, shorter):
    """(the first batch of sampled frames, an iterator of the others); VideoError for a video without frames,
    before any results folder is made for it."""
    batches = frame_batches(sample_frames(video, settings.fps, shorter), settings.batch_size)
    first = next(batches, None)
    if first is None:
        why = f": {video.stopped}" if video.stopped else ""
        raise VideoError(f"has no frames that can be decoded{why}")
    return first, batches


def grade_stream(grader, video, batches, run, stop):
    """Grade the batches of sampled frames of an open video into run (its Timeline and frames.csv) until the
    stream ends or stop() says so; run.complete is False when it stopped early."""
    bar = progress_bar(video, run.settings)
    try:
        for batch in batches:
            grades, measures, reasons = grade_batch(grader, batch, run.settings.thresholds)
            run.add(batch, grades, measures, reasons)
            bar.update(len(batch))
            if stop():
                run.complete = False
                run.stopped = f"stopped by {stop.signal_name} at {batch[-1].time:.1f} s"
                return
        video.check_end()
    finally:
        bar.close()


def grade_video(grader, path, settings, stop, weights):
    """Grade one video file into a new results folder; returns its summary (video.json). VideoError if it cannot
    be graded at all (then no folder is made)."""
    video = open_video(path)
    started = time.perf_counter()
    try:
        first, batches = first_batch(video, settings, grader.resize_size)
        run = videoout.VideoRun(files.new_run_dir(settings.video_out, Path(path).stem or "video"), grader, settings)
        run.source, run.weights, run.reopen = Path(path), weights, functools.partial(open_video, path)
        run.start(1 / min(settings.fps or video.rate, video.rate))
        batches = prefetched(itertools.chain([first], batches))
        try:
            grade_stream(grader, video, batches, run, stop)
        finally:
            batches.close()  # waits for the batch being decoded, before the container is closed
            run.seconds = time.perf_counter() - started
    finally:
        video.close()
    return run.finish(video)


def grade_videos(grader, paths, args, weights, errors):
    """Grade each video, print one line for each (unless --json), and return their summaries. A video that cannot
    be graded is an error line, and the others go on; Ctrl-C writes the results so far and stops."""
    settings = video_settings(args)
    summaries = []
    with GracefulStop() as stop:
        stop.finishing = "writing the results of the video so far"
        for path in paths:
            try:
                summary = grade_video(grader, path, settings, stop, weights)
            except VideoError as error:
                errors.append((str(path), str(error)))
                print(f"error: {path}: {error}", file=sys.stderr)
                continue
            summaries.append(summary)
            for note in summary["notes"]:
                print(f"note: {path}: {note}", file=sys.stderr)
            if not args.json:
                print(videoout.summary_line(summary), flush=True)
            if stop():
                seconds, out = summary["seconds"], summary["out"]
                raise RunInterrupted(f"{path} was graded up to {seconds:.1f} s; its results are in {out}/")
    return summaries
