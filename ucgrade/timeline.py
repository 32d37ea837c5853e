"""A video's grade from its graded frames: smoothing over time, segments, and the clinical convention.

Clinical trials have the whole video read, and the reader scores the most severely affected segment; the
published systems (Gottlieb et al., Gastroenterology 2021; Byrne et al., J Crohns Colitis 2023) grade at that
level. Here a video's grade is the worst grade held for at least --min-segment seconds of gradable frames,
given with that segment's start and end, beside the grade of the gradable frames' mean probabilities. Pure
NumPy, without torch, so that the live mode and a grading-only install share it.
"""

from dataclasses import dataclass, field

import numpy as np

SMOOTH = 1.5  # s: several frames at 5 frames/s, and shorter than any stretch of mucosa a reader would score
MIN_SEGMENT = 2.0  # s: at least ten frames at 5 frames/s, longer than the smoothing window, so that a few
# misgraded frames (a flash, a blood clot passing) cannot set a video's grade
MIN_GRADABLE = 10.0  # s of gradable footage below which a video is not gradable
MIN_GRADABLE_SHARE = 0.10  # share of the footage below which a video is not gradable
UNGRADABLE = -1  # the label of a frame, a run or a segment that cannot be graded
EPSILON = 1e-6  # s: sums of frame durations are compared with a margin for their rounding


@dataclass
class Segment:
    first: int  # index of its first frame (among the sampled frames)
    last: int  # index of its last frame, inclusive
    label: int  # grade index, or UNGRADABLE
    start: float  # s
    end: float  # s: the end of its last frame
    gradable_seconds: float

    @property
    def seconds(self):
        return self.end - self.start


@dataclass
class Timeline:
    """The graded frames of one video, added batch by batch (NumPy rows, never pictures), and, after finish(),
    what is read from them: each frame's span of time, smoothed probabilities and label, and the segments."""

    class_names: list
    interval: float  # s between sampled frames, nominal
    indices: list = field(default_factory=list)
    times: list = field(default_factory=list)
    parts: list = field(default_factory=list)  # (probs, ood scores or None, brightness, clipped, sharpness)
    reasons: list = field(default_factory=list)  # '' for a gradable frame
    max_gap: float = None  # s a frame may stand for at most (None: up to the next frame, as live footage is seen)

    def add(self, frames, grades, measures, reasons):
        self.indices += [frame.index for frame in frames]
        self.times += [frame.time for frame in frames]
        self.parts.append((grades.probs, grades.ood_scores, *measures))
        self.reasons += reasons

    def column(self, k):
        if not self.parts or self.parts[0][k] is None:
            return None
        return np.concatenate([part[k] for part in self.parts])

    @property
    def probs(self):
        probs = self.column(0)
        return np.zeros((0, len(self.class_names))) if probs is None else probs

    @property
    def gradable(self):
        return np.array([not reason for reason in self.reasons], dtype=bool)

    def finish(self, window, min_segment, end=None):
        """Smooth, label and cut the timeline into segments; end: the video's duration, when known."""
        self.spans = durations(self.times, self.interval, end, self.max_gap)
        self.smoothed = smooth(self.times, self.probs, self.gradable, window)
        self.labels = labels_of(self.smoothed)
        self.segments = segments(self.times, self.spans, self.labels, self.gradable, min_segment)
        return self


def durations(times, interval, end=None, max_gap=None):
    """How long each sampled frame stands for: until the next one, but at most max_gap (a gap in a file is
    footage that was not decoded, not a long frame), and one interval for the last, up to the video's end."""
    times = np.asarray(times, dtype=np.float64)
    if len(times) == 0:
        return np.zeros(0)
    gaps = np.diff(times, append=times[-1] + interval)
    if end is not None and end > times[-1]:
        gaps[-1] = min(interval, end - times[-1])
    return np.clip(gaps, 0, np.inf if max_gap is None else max_gap)


def smooth(times, probs, gradable, window):
    """The mean probabilities of the gradable frames within window/2 seconds of each frame (centred), NaN for an
    ungradable frame: a stretch is read as a whole, and ungradable frames neither carry nor take a grade."""
    times, probs = np.asarray(times, np.float64), np.asarray(probs, np.float64)
    gradable = np.asarray(gradable, bool)
    out = np.full(probs.shape, np.nan)
    if len(times) == 0:
        return out
    sums = np.vstack([np.zeros(probs.shape[1]), np.cumsum(np.where(gradable[:, None], probs, 0), axis=0)])
    counts = np.concatenate([[0], np.cumsum(gradable)])
    lo = np.searchsorted(times, times - window / 2 - EPSILON, side="left")
    hi = np.searchsorted(times, times + window / 2 + EPSILON, side="right")
    n = counts[hi] - counts[lo]
    keep = gradable & (n > 0)
    out[keep] = (sums[hi] - sums[lo])[keep] / n[keep, None]
    return out


def labels_of(smoothed):
    """The smoothed grade of each frame, UNGRADABLE where it has none."""
    smoothed = np.asarray(smoothed)
    labels = np.full(len(smoothed), UNGRADABLE)
    known = ~np.isnan(smoothed).any(axis=1) if smoothed.ndim == 2 and len(smoothed) else np.zeros(0, bool)
    labels[known] = smoothed[known].argmax(axis=1)
    return labels


def runs_of(labels):
    """[first, last, label] of each run of equal labels."""
    runs = []
    for i, label in enumerate(labels):
        if runs and runs[-1][2] == label:
            runs[-1][1] = i
        else:
            runs.append([i, i, int(label)])
    return runs


def segments(times, spans, labels, gradable, min_segment):
    """The runs of one smoothed grade that last at least min_segment seconds, and the ungradable stretches. A
    shorter graded run joins its longer neighbour, shortest first; a short ungradable stretch between two runs of
    one grade (a blurred moment) joins them, and any other stays a segment of its own, so that the grade of a
    stretch never spreads over footage that could not be graded. The segments tile the video."""
    times, spans = np.asarray(times, np.float64), np.asarray(spans, np.float64)
    ends = times + spans

    def length(run):
        return ends[run[1]] - times[run[0]]

    def mergeable(k):
        if length(runs[k]) >= min_segment - EPSILON:
            return False
        if runs[k][2] != UNGRADABLE:
            return True
        return 0 < k < len(runs) - 1 and runs[k - 1][2] == runs[k + 1][2]  # a gap inside one grade's stretch

    runs = runs_of(labels)
    while len(runs) > 1 and (short := [k for k in range(len(runs)) if mergeable(k)]):
        k = min(short, key=lambda j: (length(runs[j]), j))
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < len(runs)]
        into = max(neighbours, key=lambda j: (length(runs[j]), -j))
        runs[into][0], runs[into][1] = min(runs[into][0], runs[k][0]), max(runs[into][1], runs[k][1])
        del runs[k]
        merged = [runs[0]]
        for run in runs[1:]:  # two neighbours of one grade become one run
            if run[2] == merged[-1][2]:
                merged[-1][1] = run[1]
            else:
                merged.append(run)
        runs = merged
    gradable = np.asarray(gradable, bool)
    return [
        Segment(a, b, label, float(times[a]), float(ends[b]), float(spans[a : b + 1][gradable[a : b + 1]].sum()))
        for a, b, label in runs
    ]


def video_grade(segments_, class_names, min_segment):
    """The worst segment: the one of the highest grade among those with at least min_segment seconds of gradable
    frames (the longest of them on a tie), or None."""
    held = [s for s in segments_ if s.label != UNGRADABLE and s.gradable_seconds >= min_segment - EPSILON]
    return max(held, key=lambda s: (s.label, s.gradable_seconds), default=None)


def summarize(timeline, class_names, settings):
    """The video's verdict as a plain dict (video.json's core): its grade by the clinical convention and the
    worst segment, the mean-probability grade, the gradable share, and why it is not gradable when it is not."""
    spans, gradable = timeline.spans, timeline.gradable
    seconds, gradable_seconds = float(spans.sum()), float(spans[gradable].sum())
    share = gradable_seconds / seconds if seconds > 0 else 0.0
    excluded = {}
    for reason, span in zip(timeline.reasons, spans):
        if reason:
            excluded[reason] = excluded.get(reason, 0.0) + float(span)
    mean = timeline.probs[gradable].mean(axis=0) if gradable.any() else None
    worst = video_grade(timeline.segments, class_names, settings.min_segment)
    reason = not_gradable_reason(seconds, gradable_seconds, share, excluded, worst, settings)
    summary = {
        "grade": class_names[worst.label] if worst is not None and reason is None else None,
        "gradable": reason is None,
        "reason": reason,
        "worst_segment": None if worst is None else segment_dict(worst, class_names),
        "mean_probability_grade": None if mean is None else class_names[int(mean.argmax())],
        "mean_probabilities": None if mean is None else dict(zip(class_names, np.round(mean, 4).tolist())),
        "seconds": round(seconds, 3),
        "gradable_seconds": round(gradable_seconds, 3),
        "gradable_share": round(share, 4),
        "excluded_seconds": {k: round(v, 3) for k, v in excluded.items()},
    }
    if reason is not None:
        summary["worst_segment"] = None
    return summary


def segment_dict(segment, class_names):
    grade = "ungradable" if segment.label == UNGRADABLE else class_names[segment.label]
    return {
        "grade": grade,
        "start": round(segment.start, 3),
        "end": round(segment.end, 3),
        "seconds": round(segment.seconds, 3),
        "gradable_seconds": round(segment.gradable_seconds, 3),
    }


def not_gradable_reason(seconds, gradable_seconds, share, excluded, worst, settings):
    """Why a video gets no grade (None when it gets one): too little gradable footage, or no grade held long
    enough. A guess from a few frames would read as a finding."""
    if seconds <= 0:
        return "no frames were decoded"
    why = ", ".join(f"{reason} {v / seconds:.0%}" for reason, v in sorted(excluded.items(), key=lambda kv: -kv[1]))
    why = f" (excluded: {why})" if why else ""
    if gradable_seconds < settings.min_gradable - EPSILON or share < MIN_GRADABLE_SHARE:
        return (
            f"only {gradable_seconds:.1f} s of {seconds:.1f} s ({share:.0%}) could be graded{why}; at least "
            f"{settings.min_gradable:g} s and {MIN_GRADABLE_SHARE:.0%} are needed"
        )
    if worst is None:
        return f"no grade is held for {settings.min_segment:g} s of gradable frames (--min-segment)"
    return None
