"""Live grading: `python predict.py --live /dev/video0` (a capture device, through PyAV's v4l2) or a stream URL.

A reader thread decodes the source as it plays and keeps only the newest sampled frame; the grader takes
it when it is free, so when grading falls behind, frames are dropped rather than the grade lagging, and the
latency (from a frame's arrival to its grade) is measured. The terminal shows the current smoothed grade
and the worst segment so far. When the source ends or on Ctrl-C, the footage so far gets the outputs of a
video file (ucgrade.videoout), from the same timeline. A file given as the source is read at its own
frame rate, as a camera would deliver it: that is how the tests run the live mode.
"""

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files, timeline, videoout
from .cli import UserError
from .interrupt import GracefulStop
from .video import Frame, Sampler, VideoError, open_video, timed_frames, to_picture
from .videograde import grade_batch, video_settings

STATUS_EVERY = 1.0  # s between two status lines on a terminal (10 s when the output is a file)


@dataclass
class Arrival:
    frame: Frame
    arrived: float  # time.perf_counter() when the reader had it


class Newest:
    """The newest sampled frame, handed from the reader thread to the grader; an unread one is dropped."""

    def __init__(self):
        self.condition = threading.Condition()
        self.item, self.done, self.error = None, False, None
        self.received = self.dropped = 0
        self.stop = threading.Event()

    def put(self, item):
        with self.condition:
            self.dropped += self.item is not None
            self.item = item
            self.received += 1
            self.condition.notify()

    def finish(self, error=None):
        with self.condition:
            self.done, self.error = True, error
            self.condition.notify()

    def take(self, timeout):
        """The newest frame, None after timeout seconds without one, or None once the source has ended."""
        with self.condition:
            self.condition.wait_for(lambda: self.item is not None or self.done, timeout)
            item, self.item = self.item, None
            return item


def read_source(video, fps, shorter, newest, paced):
    """The reader thread: decode the source, sample it, and hand on each sampled frame at once (a file, paced:
    when its time comes, as a camera would)."""
    sampler, started = Sampler(fps), time.perf_counter()
    try:
        for index, at, frame in timed_frames(video):
            if newest.stop.is_set():
                break
            if paced and (wait := started + at - time.perf_counter()) > 0:
                time.sleep(wait)
            if sampler.take(at):
                newest.put(
                    Arrival(Frame(index, round(at, 6), to_picture(frame, video.stream, shorter)), time.perf_counter())
                )
        newest.finish()
    except Exception as error:  # a source that fails mid-stream ends the footage; what was graded is kept
        newest.finish(error)


def open_source(source):
    """(Video, paced): a regular file is read at its frame rate; /dev/video* through v4l2; anything else (a URL)
    as FFmpeg opens it."""
    path = Path(source)
    if path.is_file():
        return open_video(path), True
    live_format = "v4l2" if source.startswith("/dev/video") else None
    return open_video(source, live_format=live_format), False


def status_line(run, latencies, newest):
    """The current smoothed grade (the last --smooth seconds), the worst segment so far, the latency."""
    line = run.timeline
    if not line.times:
        return "waiting for the first frame"
    now, gradable = line.times[-1], line.gradable
    recent = (np.asarray(line.times) >= now - run.settings.smooth) & gradable
    current = line.class_names[int(line.probs[recent].mean(0).argmax())] if recent.any() else "ungradable"
    copy = timeline.Timeline(line.class_names, line.interval, line.indices, line.times, line.parts, line.reasons,
                             line.max_gap)  # fmt: skip
    copy.finish(run.settings.smooth, run.settings.min_segment)
    worst = timeline.video_grade(copy.segments, line.class_names, run.settings.min_segment)
    worst_text = f"{line.class_names[worst.label]} {worst.start:.1f}-{worst.end:.1f} s" if worst else "none yet"
    return (
        f"{now:6.1f} s: {current} | worst so far: {worst_text} | latency {np.median(latencies[-25:]) * 1000:.0f} ms"
        f" | dropped {newest.dropped}"
    )


def grade_live(grader, source, args, weights):
    """Grade a live source until it ends or Ctrl-C, then write the outputs of a video file; the exit code."""
    settings = video_settings(args)
    try:
        video, paced = open_source(source)
    except VideoError as error:
        raise UserError(f"--live {source}: {error}.") from None
    name = Path(source).stem if paced else "live"
    run = videoout.VideoRun(files.new_run_dir(settings.video_out, name), grader, settings)
    run.source, run.weights, run.seekable = Path(source) if paced else source, weights, paced
    run.start(1 / min(settings.fps or video.rate, video.rate), live=True)
    newest, latencies = Newest(), []
    reader = threading.Thread(
        target=read_source, args=(video, settings.fps, grader.resize_size, newest, paced), daemon=True
    )
    terminal = sys.stderr.isatty()
    started = last_status = time.perf_counter()
    print(f"grading {source} live; Ctrl-C stops and writes the results", file=sys.stderr, flush=True)
    with GracefulStop() as stop:
        stop.finishing = "writing the results of the footage so far"
        reader.start()
        while not stop():
            arrival = newest.take(timeout=0.2)
            if arrival is None and newest.done:
                break
            if arrival is None:
                continue
            run.add([arrival.frame], *grade_batch(grader, [arrival.frame], settings.thresholds))
            latencies.append(time.perf_counter() - arrival.arrived)
            if time.perf_counter() - last_status >= (STATUS_EVERY if terminal else 10 * STATUS_EVERY):
                last_status = time.perf_counter()
                print(("\r" if terminal else "") + status_line(run, latencies, newest), end="" if terminal else "\n",
                      file=sys.stderr, flush=True)  # fmt: skip
        newest.stop.set()
        reader.join()
    if terminal:
        print(file=sys.stderr)
    return finish_live(run, video, newest, latencies, time.perf_counter() - started, stop, args)


def finish_live(run, video, newest, latencies, seconds, stop, args):
    video.close()
    run.seconds = seconds
    if stop():
        run.complete, run.stopped = False, f"stopped by {stop.signal_name}"
    elif newest.error is not None:
        run.complete, run.stopped = False, f"the source failed: {newest.error}"
    if not run.timeline.times:
        raise UserError(f"no frame arrived from the live source{f' ({newest.error})' if newest.error else ''}.")
    summary = run.finish(video)
    latency = np.asarray(latencies) * 1000
    summary["live"] = {
        "frames_received": newest.received,
        "frames_dropped": newest.dropped,
        "latency_ms": {
            "median": round(float(np.median(latency)), 1),
            "p95": round(float(np.percentile(latency, 95)), 1),
        },
    }
    files.write_json(Path(summary["out"]) / "video.json", summary)
    if args.json:
        print(json.dumps({"weights": summary["weights"], "videos": [summary]}, indent=2))
    else:
        print(videoout.summary_line(summary))
    return 0
