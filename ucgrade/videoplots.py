"""The pictures of a graded video: timeline.png, drawn from its saved files, and strip.png, the worst segment's
most confident frames (with Grad-CAM when the grader is a .pt).

timeline.png needs matplotlib and the Grad-CAM overlays need torch: on the grading-only install they are
left out, and video.json's notes say so. The strip decodes its frames again from the file, so that no
picture is kept while the video is graded.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import files, timeline
from .video import VideoError, pictures_at

STRIP_FRAMES = 6  # frames of the worst segment in strip.png
STRIP_GAP = 0.5  # s between two frames of the strip at least, so that it shows six views, not one
TILE = 224  # px of a frame in the strip


def draw_outputs(run, video, summary):
    """timeline.png, strip.png and report.html in run.out_dir; returns the notes of what was left out."""
    notes = []
    try:
        draw_timeline(run.out_dir)
    except ImportError:
        notes.append(
            "timeline.png was not drawn, because matplotlib is not installed here (the grading-only install); "
            "frames.csv and segments.csv hold its data"
        )
    notes += write_strip(run, summary)
    return notes


# ----------------------------------------------------------------------------- the timeline


def grade_colours(n):
    """One colour per grade, green (the mildest) to red (the most severe)."""
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn_r"]
    return [cmap(0.1 + 0.8 * k / max(n - 1, 1)) for k in range(n)]


def read_timeline(out_dir):
    """(summary, times, probabilities N x C, gradable, segments rows) from a video's results folder."""
    out_dir = Path(out_dir)
    summary = files.read_json(out_dir / "video.json")
    rows = files.read_csv(out_dir / "frames.csv")
    names = summary["class_names"]
    times = np.array([float(r["time"]) for r in rows])
    probs = np.array([[float(r[f"p_{name}"]) for name in names] for r in rows]).reshape(len(rows), len(names))
    gradable = np.array([r["gradable"] == "1" for r in rows], dtype=bool)
    return summary, times, probs, gradable, files.read_csv(out_dir / "segments.csv")


def draw_timeline(out_dir):
    """timeline.png: each grade's smoothed probability over time, ungradable stretches shaded, the segments as
    a band below, and the worst segment marked."""
    import matplotlib

    matplotlib.use("Agg")  # no screen on a hospital server or in CI
    from matplotlib.figure import Figure

    summary, times, probs, gradable, segments = read_timeline(out_dir)
    names = summary["class_names"]
    smoothed = timeline.smooth(times, probs, gradable, summary["settings"]["smooth"])
    colours = grade_colours(len(names))
    fig = Figure(figsize=(10, 3.6))
    top, band = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [5, 1], "hspace": 0.08})
    for c, name in enumerate(names):
        top.plot(times[gradable], probs[gradable, c], ".", color=colours[c], alpha=0.5, markersize=3)
        top.plot(times, smoothed[:, c], "-", color=colours[c], linewidth=1.6, label=name)
    for row in segments:
        start, end = float(row["start"]), float(row["end"])
        if row["grade"] == "ungradable":
            top.axvspan(start, end, color="0.6", alpha=0.3, linewidth=0)
            band.axvspan(start, end, color="0.75", linewidth=0)
        else:
            band.axvspan(start, end, color=colours[names.index(row["grade"])], linewidth=0)
        if row["worst"] == "1":
            for axis in (top, band):
                axis.axvspan(start, end, fill=False, edgecolor="black", linewidth=1.5, linestyle="--")
    top.set_ylim(0, 1.02)
    top.set_ylabel("probability")
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    band.set_yticks([])
    band.set_xlabel("time (s)")
    band.set_xlim(0, max(float(summary["seconds"]), float(times[-1]) if len(times) else 1.0))
    top.set_title(title_of(summary), fontsize=10, loc="left")
    files.save_figure(Path(out_dir) / "timeline.png", fig)


def title_of(summary):
    name = Path(summary["video"]).name
    if not summary["gradable"]:
        return f"{name}: not gradable (grey: ungradable)"
    worst = summary["worst_segment"]
    return (
        f"{name}: {summary['grade']}, worst segment {worst['start']:.1f}-{worst['end']:.1f} s (dashed); "
        f"grey: ungradable ({1 - summary['gradable_share']:.0%})"
    )


# ----------------------------------------------------------------------------- the strip


def strip_times(line, segment, label):
    """The times of the most confident gradable frames of a segment, at least STRIP_GAP seconds apart."""
    rows = np.arange(segment.first, segment.last + 1)
    rows = rows[line.gradable[rows]]
    chosen = []
    for i in rows[np.argsort(-line.probs[rows, label], kind="stable")]:
        if all(abs(line.times[i] - line.times[j]) >= STRIP_GAP for j in chosen):
            chosen.append(i)
        if len(chosen) == STRIP_FRAMES:
            break
    return sorted(chosen)


def write_strip(run, summary):
    """strip.png: the worst segment's most confident frames, as the model saw them (its crop), each with its time
    and probability, and with a Grad-CAM overlay of the grade when the grader holds a torch model."""
    line, worst = run.timeline, summary["worst_segment"]
    if worst is None:
        return []
    if run.reopen is None:
        return ["strip.png was not made: a live source cannot be decoded again"]
    segment = next(s for s in line.segments if round(s.start, 3) == worst["start"])
    label = run.class_names.index(worst["grade"])
    chosen = strip_times(line, segment, label)
    try:
        pictures = pictures_at(run.reopen, [line.times[i] for i in chosen], run.grader.resize_size)
    except VideoError as error:
        return [f"strip.png was not made: the video could not be decoded again ({error})"]
    chosen = [i for i in chosen if line.times[i] in pictures]
    crops = np.stack([run.grader.crop(pictures[line.times[i]]) for i in chosen]) if chosen else None
    if crops is None:
        return ["strip.png was not made: the worst segment's frames could not be decoded again"]
    tiles, notes = [Image.fromarray(crop.transpose(1, 2, 0)) for crop in crops], []
    if "model" in run.grader.extra:
        tiles = cam_tiles(run.grader, crops, label, tiles)
    captions = [f"{line.times[i]:.1f} s  p={line.probs[i, label]:.2f}" for i in chosen]
    save_strip(run.out_dir / "strip.png", tiles, captions)
    return notes


def cam_tiles(grader, crops, label, tiles):
    """The tiles with the Grad-CAM heatmap of the grade over each crop, by the grader's torch model."""
    import torch

    from .cam import grad_cam, overlay

    checkpoint = grader.extra["checkpoint"]
    mean, std = checkpoint.get("mean"), checkpoint.get("std")
    kwargs = {"mean": mean, "std": std} if mean is not None and std is not None else {}
    heatmaps, _ = grad_cam(grader.extra["model"], torch.from_numpy(crops), label, **kwargs)
    return [overlay(tile, heatmap) for tile, heatmap in zip(tiles, heatmaps)]


def save_strip(path, tiles, captions):
    """The tiles side by side, each TILE px wide, with its caption below."""
    caption_height = 18
    strip = Image.new("RGB", (TILE * len(tiles), TILE + caption_height), "white")
    draw = ImageDraw.Draw(strip)
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        strip.paste(tile.resize((TILE, TILE), Image.Resampling.BILINEAR), (k * TILE, 0))
        draw.text((k * TILE + 4, TILE + 3), caption, fill="black")
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    files.write_bytes(path, buffer.getvalue())
