"""The results folder of one graded video: frames.csv (written as the frames are graded, so that an interrupted
video keeps its rows), segments.csv, video.json, timeline.png, the worst segment's strip and report.html.

The plots are drawn from the saved files (ucgrade.videoplots), so they can be drawn again; they need
matplotlib, which the grading-only install does not have: there they are skipped, with a note.
"""

import csv
import math
import shutil
from pathlib import Path

import numpy as np

from . import files, timeline
from .timeline import UNGRADABLE, Timeline
from .videoreport import write_video_report


class VideoRun:
    """One video being graded into out_dir: its Timeline, and frames.csv as it grows."""

    def __init__(self, out_dir, grader, settings):
        self.out_dir, self.grader, self.settings = Path(out_dir), grader, settings
        self.weights = self.source = None
        self.class_names = list(grader.class_names)
        self.timeline = None
        self.complete, self.stopped, self.seconds = True, None, 0.0
        self.reopen = None  # opens the video again, to decode the strip's frames: a file can be, a live stream not
        self._file = open(self.out_dir / "frames.csv", "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow([files.spreadsheet_safe(name) for name in self.frame_columns()])

    def frame_columns(self):
        probabilities = [f"p_{name}" for name in self.class_names]
        measures = ["brightness", "clipped", "sharpness", "ood_score"]
        return ["frame", "time", *probabilities, "grade", "smoothed_grade", "gradable", "reason", *measures]

    def start(self, interval, live=False):
        """Begin the timeline; a file's frames stand for two intervals at most (a gap is footage not decoded), a
        live source's until the next graded frame (the frames dropped in between were seen, not graded)."""
        self.timeline = Timeline(self.class_names, interval, max_gap=None if live else 2 * interval)

    def add(self, frames, grades, measures, reasons):
        """Keep a graded batch: its rows in the timeline and in frames.csv, flushed, so Ctrl-C loses nothing."""
        self.timeline.add(frames, grades, measures, reasons)
        scores = grades.ood_scores if grades.ood_scores is not None else [None] * len(frames)
        for k, frame in enumerate(frames):
            self._writer.writerow(
                frame_row(frame.index, frame.time, grades.probs[k], self.class_names, "", reasons[k])
                + [f"{measures[0][k]:.1f}", f"{measures[1][k]:.4f}", f"{measures[2][k]:.1f}", number(scores[k])]
            )
        self._file.flush()

    def discard(self):
        """Remove the results folder of a video that gave no frame: it would hold only frames.csv's header."""
        self._file.close()
        shutil.rmtree(self.out_dir)

    def finish(self, video):
        """Read the timeline, and write every output; returns the summary written to video.json."""
        self._file.close()
        end = video.duration if self.complete and not video.stopped else None
        self.timeline.finish(self.settings.smooth, self.settings.min_segment, end)
        summary = self.summarize(video)
        write_frames(self.out_dir / "frames.csv", self.timeline, self.frame_columns())
        write_segments(self.out_dir / "segments.csv", self.timeline, summary)
        files.write_json(self.out_dir / "video.json", summary)
        from .videoplots import draw_outputs

        summary["notes"] += draw_outputs(self, video, summary)
        files.write_json(self.out_dir / "video.json", summary)
        write_video_report(self.out_dir)
        return summary

    def summarize(self, video):
        line = self.timeline
        verdict = timeline.summarize(line, self.class_names, self.settings)
        stopped = self.stopped or video.stopped
        if not self.complete and verdict["reason"] is None:
            verdict["note"] = "graded on the footage up to the interruption only"
        n = len(line.times)
        return {
            "video": str(self.source),
            "out": str(self.out_dir),
            **verdict,
            "complete": self.complete and video.stopped is None,
            "stopped": stopped,
            "frames_graded": n,
            "frames_per_second": round(n / self.seconds, 2) if self.seconds > 0 else None,
            "real_time_multiple": round(verdict["seconds"] / self.seconds, 2) if self.seconds > 0 else None,
            "wall_seconds": round(self.seconds, 2),
            "weights": str(self.weights),
            "runtime": self.grader.runtime,
            "precision": self.grader.precision,
            "class_names": self.class_names,
            "input": {
                "codec": video.codec,
                "width": video.width,
                "height": video.height,
                "frame_rate": round(video.rate, 3),
                "duration": None if video.duration is None else round(video.duration, 3),
                "damaged_packets": video.damaged,
            },
            "settings": self.settings.as_dict(),
            "notes": list(video.notes),
        }


def number(value, digits=4):
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def frame_row(index, time, probs, class_names, smoothed, reason):
    grade = class_names[int(np.argmax(probs))]
    return [index, f"{time:.3f}", *(f"{p:.4f}" for p in probs), grade, smoothed, 0 if reason else 1, reason]


def write_frames(path, line, columns):
    """frames.csv again, whole, with each frame's smoothed grade (the timeline's), atomically."""
    probs = line.probs
    scores = line.column(1)
    measures = [line.column(k) for k in (2, 3, 4)]
    rows = []
    for i, index in enumerate(line.indices):
        smoothed = "" if line.labels[i] == UNGRADABLE else line.class_names[line.labels[i]]
        row = frame_row(index, line.times[i], probs[i], line.class_names, smoothed, line.reasons[i])
        row += [f"{measures[0][i]:.1f}", f"{measures[1][i]:.4f}", f"{measures[2][i]:.1f}"]
        row.append(number(None if scores is None else float(scores[i])))
        rows.append(dict(zip(columns, row)))
    files.write_csv(path, rows, columns)


def write_segments(path, line, summary):
    """segments.csv: each segment's grade (or 'ungradable'), its time, its gradable seconds and mean probabilities,
    and which one is the video's worst."""
    worst = summary["worst_segment"]
    columns = ["segment", "grade", "start", "end", "seconds", "gradable_seconds"]
    columns += [f"p_{name}" for name in line.class_names] + ["worst"]
    rows = []
    for k, segment in enumerate(line.segments, 1):
        row = {"segment": k, **timeline.segment_dict(segment, line.class_names)}
        keep = line.gradable[segment.first : segment.last + 1]
        mean = line.probs[segment.first : segment.last + 1][keep].mean(axis=0) if keep.any() else None
        for c, name in enumerate(line.class_names):
            row[f"p_{name}"] = "" if mean is None else f"{mean[c]:.4f}"
        row["worst"] = int(worst is not None and (worst["start"], worst["end"]) == (row["start"], row["end"]))
        rows.append(row)
    files.write_csv(path, rows, columns)


def summary_line(summary):
    """The one line a video gets on stdout."""
    name = summary["video"]
    if summary["gradable"]:
        worst = summary["worst_segment"]
        text = (
            f"{name}: {summary['grade']} (worst segment {worst['start']:.1f}-{worst['end']:.1f} s; mean-probability "
            f"grade {summary['mean_probability_grade']}; {summary['gradable_share']:.0%} of "
            f"{summary['seconds']:.1f} s gradable)"
        )
    else:
        text = f"{name}: not gradable ({summary['reason']})"
    if not summary["complete"]:
        text += f" [incomplete: {summary['stopped']}]"
    return f"{text} -> {summary['out']}/"
