"""Make the README's screenshots of report.html (docs/report_*.png) by rendering it in headless Chromium.

    python tools/render_report.py                          # train a demo run first (a few minutes on a CPU)
    python tools/render_report.py --epochs 5               # a shorter demo run
    python tools/render_report.py --run outputs/train      # from a finished run
    python tools/render_report.py --run outputs/train --out /tmp/shots --page   # elsewhere, with the whole page

The demo run is `python qq.py --remission-upto mild` (the README's command) in a temporary folder. The run's
plots and report.html are drawn again from its files (in a copy) with the current code, so the pictures
show the report as it is now. Needs Chromium (Debian and Ubuntu: `apt-get install chromium`) and Pillow.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from ucgrade import figures, files, pages, records, report  # noqa: E402
from ucgrade.cli import UserError, run_cli  # noqa: E402

WIDTH = 1280  # CSS pixels: a laptop's browser window
# picture -> the sections it shows, by the start of their headings ("" is the page's title and summary card)
PICTURES = {
    "report_summary.png": ["", "Summary"],
    "report_confusion.png": ["Confusion matrices", "Metrics"],
    "report_curves.png": ["Training curves", "ROC curves"],
    "report_gradcam.png": ["Grad-CAM"],
}
# run after the page has loaded: where every section lies, written into the page for --dump-dom to read
MEASURE = """<script>
addEventListener("load", () => {
  const top = (element) => element.getBoundingClientRect().top + scrollY;
  const boxes = [["", 0, top(document.querySelector("section"))]];
  for (const section of document.querySelectorAll("section")) {
    const box = section.getBoundingClientRect();
    boxes.push([section.querySelector("h2").textContent, box.top + scrollY, box.bottom + scrollY,
                box.left, box.right]);
  }
  document.documentElement.dataset.boxes = JSON.stringify(
    {height: document.documentElement.scrollHeight, boxes: boxes});
});
</script>"""


def get_args_parser():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (default: train a demo run first)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of the demo run (default: qq.py's, 25)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the pictures (default: docs)")
    parser.add_argument("--page", action="store_true", help="also save the whole page as report_page.png")
    parser.add_argument("--chromium", default="chromium", help="the Chromium program (default: chromium)")
    return parser


def chromium(program, url, height, *flags):
    """Run headless Chromium on url in a window WIDTH x height; returns what it printed."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            program,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{height}",
            "--virtual-time-budget=10000",  # let the page load and its script run before the picture
            *flags,
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise UserError(f"Chromium failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    return result.stdout


def demo_run(epochs, folder):
    """python qq.py --remission-upto mild in folder; returns the run folder."""
    command = [sys.executable, str(ROOT / "qq.py"), "--remission-upto", "mild", "--out", str(folder)]
    command += ["--epochs", str(epochs)] if epochs else []
    print("training the demo run:", " ".join(command[1:]))
    subprocess.run(command, cwd=ROOT, check=True)
    return folder / "train"


def redraw_report(run):
    """Draw the run's plots and report.html again from its files, with the report code as it is now."""
    config = files.read_json(run / "config.json")
    metrics = files.read_json(run / "metrics.json")
    report.redraw(run)
    rows = records.read_predictions(run / "predictions.csv", metrics["class_names"])[0]
    names = metrics["class_names"]
    figures.plot_errors(rows, config["data"], config["img_size"], run / "errors.png", class_names=names)
    pages.write_report(run, "run")


def render(run, out, program, whole_page):
    page = (run / "report.html").read_text()
    with tempfile.TemporaryDirectory() as folder:
        measured = Path(folder) / "page.html"
        measured.write_text(page.replace("</body>", MEASURE + "</body>"))
        dom = chromium(program, measured.as_uri(), 2000, "--dump-dom")
        layout = json.loads(re.search(r'data-boxes="([^"]*)"', dom).group(1).replace("&quot;", '"'))
        shot = Path(folder) / "page.png"
        chromium(program, measured.as_uri(), int(layout["height"]), f"--screenshot={shot}")
        with Image.open(shot) as image:
            screenshot = image.convert("RGB")
    out.mkdir(parents=True, exist_ok=True)
    if whole_page:
        screenshot.save(out / "report_page.png", optimize=True)
    left = min(box[3] for box in layout["boxes"][1:]) - 16
    right = max(box[4] for box in layout["boxes"][1:]) + 16
    for name, headings in PICTURES.items():
        boxes = [box for box in layout["boxes"] if any(box[0].startswith(h) if h else box[0] == "" for h in headings)]
        if not boxes:
            print(f"{name}: the report has no section {', '.join(headings)}; not written")
            continue
        top, bottom = min(box[1] for box in boxes) - 8, max(box[2] for box in boxes) + 8
        screenshot.crop((int(left), int(max(top, 0)), int(right), int(bottom))).save(out / name, optimize=True)
        print(f"wrote {out / name}")


def main(args):
    if shutil.which(args.chromium) is None:
        raise UserError(
            f"'{args.chromium}' was not found; install Chromium (apt-get install chromium) or pass --chromium."
        )
    if args.run and not (args.run / "metrics.json").is_file():
        raise UserError(f"'{args.run}' is not a finished run folder; give a folder under outputs/.")
    with tempfile.TemporaryDirectory() as folder:
        run = demo_run(args.epochs, Path(folder)) if args.run is None else args.run
        # the report is drawn again in a copy, so that a run of one's own keeps the report it was given
        copy = shutil.copytree(run, Path(folder) / "copy" / run.name, ignore=shutil.ignore_patterns("*.pt"))
        redraw_report(copy)
        render(copy, args.out, args.chromium, args.page)


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
