"""report.html of one graded video: a summary card and sections, in the report's page (ucgrade.htmlparts).

As an evaluation's page, it is read from the files of its folder (video.json, segments.csv, timeline.png,
strip.png), so it can be written again later, and a section whose data is missing is left out. Without
torch, matplotlib or scikit-learn, so the grading-only install writes it too.
"""

import html
from pathlib import Path

from . import files
from .htmlparts import embed_png, table, tiles, write_page

CONVENTION = (
    "The video's grade follows the clinical convention of central reading in trials: the worst grade held for at "
    "least {min_segment:g} s of gradable frames (--min-segment), after the frames' probabilities are averaged over "
    "{smooth:g} s (--smooth). The mean-probability grade, that of all gradable frames together, is given beside it."
)


def summary_card(summary):
    worst = summary["worst_segment"]
    grade = summary["grade"] if summary["gradable"] else "not gradable"
    items = [("video grade", grade, [] if summary["gradable"] else [summary["reason"]])]
    if worst is not None:
        items.append(("worst segment", f"{worst['start']:.1f}-{worst['end']:.1f} s", [f"{worst['grade']}"]))
    if summary["mean_probability_grade"]:
        items.append(("mean-probability grade", summary["mean_probability_grade"], []))
    items.append(
        (
            "gradable",
            f"{summary['gradable_share']:.0%}",
            [f"{summary['gradable_seconds']:.1f} of {summary['seconds']:.1f} s"],
        )
    )
    if summary.get("real_time_multiple"):
        speed = f"{summary['frames_per_second']:.1f} frames/s graded"
        items.append(("speed", f"{summary['real_time_multiple']:.1f}x real time", [speed]))
    lines = [f"<p>{html.escape(summary['video'])}, graded by {html.escape(summary['weights'])}.</p>", tiles(items)]
    if not summary["complete"]:
        lines.append(f'<p class="warn">Incomplete: {html.escape(summary["stopped"] or "stopped early")}.</p>')
    lines += [f'<p class="note">{html.escape(note)}.</p>' for note in summary["notes"]]
    lines.append(f'<p class="note">{html.escape(CONVENTION.format(**summary["settings"]))}</p>')
    return "".join(lines)


def timeline_section(folder, summary):
    if not (folder / "timeline.png").is_file():
        return None
    return (
        embed_png(folder / "timeline.png", "grade probabilities over time")
        + "<p class=note>Dots: each graded frame; lines: smoothed; grey: ungradable; dashed: the worst segment.</p>"
    )


def strip_section(folder, summary):
    if not (folder / "strip.png").is_file():
        return None
    worst = summary["worst_segment"]
    where = f"{worst['grade']}, {worst['start']:.1f}-{worst['end']:.1f} s"
    caption = f"The most confident frames of the worst segment ({where}), as the model saw them"
    cam = " with Grad-CAM of the grade" if summary["runtime"].startswith("torch") else ""
    return embed_png(folder / "strip.png", "worst segment") + f"<p class=note>{html.escape(caption + cam)}.</p>"


def segments_section(folder, summary):
    rows = files.read_csv(folder / "segments.csv")
    header = ["segment", "grade", "start (s)", "end (s)", "gradable (s)"]
    body = [
        [
            r["segment"],
            r["grade"] + (" (worst)" if r["worst"] == "1" else ""),
            r["start"],
            r["end"],
            r["gradable_seconds"],
        ]
        for r in rows
    ]
    return table(header, body)


def excluded_section(folder, summary):
    excluded, seconds = summary["excluded_seconds"], summary["seconds"]
    settings = summary["settings"]
    thresholds = (
        f"Thresholds: too dark below a mean brightness of {settings['dark']:g} (--dark), overexposed above "
        f"{settings['overexposed']:.0%} clipped pixels (--overexposed), blurred below a variance of the Laplacian of "
        f"{settings['blur']:g} (--blur), and the model's own check for pictures unlike its training images. "
        "frames.csv has each frame's values."
    )
    rows = [[reason, f"{value:.1f}", f"{value / seconds:.0%}" if seconds else ""] for reason, value in excluded.items()]
    content = table(["reason", "seconds", "share"], rows) if rows else "<p>Every graded frame was gradable.</p>"
    return content + f"<p class=note>{html.escape(thresholds)}</p>"


def settings_section(folder, summary):
    rows = [[key, value] for key, value in summary["settings"].items()]
    rows += [[f"input {key}", value] for key, value in summary["input"].items()]
    rows += [["model", summary["weights"]], ["runtime", f"{summary['runtime']} ({summary['precision']})"]]
    return table(["setting", "value"], rows, css_class="settings")


SECTIONS = [
    ("timeline", "Timeline", timeline_section),
    ("strip", "The worst segment", strip_section),
    ("segments", "Segments", segments_section),
    ("excluded", "Frames that could not be graded", excluded_section),
    ("settings", "Settings and input", settings_section),
]


def write_video_report(folder):
    """report.html of a video's results folder, from its files."""
    folder = Path(folder)
    summary = files.read_json(folder / "video.json")
    shown = [(heading, section(folder, summary)) for _, heading, section in SECTIONS]
    title = f"UC severity grading, video: {Path(summary['video']).name}"
    write_page(folder / "report.html", title, summary_card(summary), [(h, c) for h, c in shown if c is not None])
