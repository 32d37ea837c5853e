"""Generate the built-in demo dataset: synthetic, endoscopy-like pictures in three grades.

The pictures are NOT real colonoscopy images. They only let a new user run the whole pipeline
in a few minutes. The grades loosely follow the Mayo endoscopic subscore:

    mild      pink mucosa with a visible branching vascular pattern
    moderate  redder mucosa, no vascular pattern, a granular surface and small erosions
    severe    dark red mucosa with ulcers (yellow-white fibrin) and spontaneous bleeding

Examples:
    python tools/make_demo_data.py                 # rewrite data/mild, data/moderate, data/severe
    python tools/make_demo_data.py --out /tmp/demo --per-class 10 --size 128
    python tools/make_demo_data.py --out /tmp/mayo --mayo 400    # harder: Mayo 0-3, imbalanced, patients.csv
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GRADES = ("mild", "moderate", "severe")
# mucosa colour (RGB) of each grade before jitter
MUCOSA = {"mild": (226, 150, 140), "moderate": (214, 96, 82), "severe": (160, 38, 36)}


def _base(rng, size, colour):
    """Mucosa with lighting that falls off towards a dark lumen, inside a round field of view."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    lumen = rng.uniform(0.3, 0.7, 2)
    distance = np.hypot(xx - lumen[0], yy - lumen[1])
    light = np.clip(0.25 + 1.1 * distance, 0, 1.15)[..., None]
    folds = 0.08 * np.sin(distance * rng.uniform(18, 30) + rng.uniform(0, 6.3))[..., None]  # haustral folds
    colour = np.array(colour, dtype=float) * rng.uniform(0.9, 1.1, 3)
    image = colour * (light + folds)
    image += rng.normal(0, 4, image.shape)
    return image


def _vessels(draw, rng, size, count):
    """Thin branching vessels: the visible vascular pattern of normal or mildly inflamed mucosa."""
    for _ in range(count):
        x, y = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        width = max(1, int(size / 160))
        for _ in range(rng.integers(6, 14)):
            angle += rng.normal(0, 0.5)
            step = rng.uniform(size / 40, size / 15)
            nx, ny = x + step * np.cos(angle), y + step * np.sin(angle)
            draw.line([(x, y), (nx, ny)], fill=(150, 40, 50), width=width)
            if rng.random() < 0.3:
                bx, by = nx + step * np.cos(angle + 1), ny + step * np.sin(angle + 1)
                draw.line([(nx, ny), (bx, by)], fill=(160, 50, 60), width=max(1, width - 1))
            x, y = nx, ny


def _spots(draw, rng, size, count, radius, fill, rim=None):
    for _ in range(count):
        x, y = rng.uniform(0.1, 0.9, 2) * size
        r = rng.uniform(*radius) * size
        rx, ry = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        if rim is not None:
            draw.ellipse([x - rx * 1.4, y - ry * 1.4, x + rx * 1.4, y + ry * 1.4], fill=rim)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=fill)


def make_image(grade, rng, size=256):
    image = _base(rng, size, MUCOSA[grade])
    if grade != "mild":  # granular, friable surface
        grain = rng.normal(0, 14 if grade == "moderate" else 20, (size // 4, size // 4, 1))
        image += np.kron(grain, np.ones((4, 4, 1)))
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    if grade == "mild":
        _vessels(draw, rng, size, rng.integers(6, 11))
    elif grade == "moderate":
        _vessels(draw, rng, size, rng.integers(0, 2))
        _spots(draw, rng, size, rng.integers(4, 10), (0.008, 0.02), (236, 220, 170), rim=(200, 50, 45))
    else:
        _spots(draw, rng, size, rng.integers(2, 5), (0.05, 0.11), (232, 214, 150), rim=(120, 20, 20))
        _spots(draw, rng, size, rng.integers(3, 7), (0.02, 0.06), (95, 5, 10))  # blood
    picture = picture.filter(ImageFilter.GaussianBlur(radius=size / 300))
    highlights = ImageDraw.Draw(picture)  # specular reflections of the endoscope's light
    _spots(highlights, rng, size, rng.integers(2, 6), (0.004, 0.015), (255, 255, 250))
    # the round field of view of an endoscope, black outside
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([size * 0.02, size * 0.02, size * 0.98, size * 0.98], fill=255)
    black = Image.new("RGB", (size, size))
    picture = Image.composite(picture, black, mask.filter(ImageFilter.GaussianBlur(size / 100)))
    return picture.rotate(rng.uniform(0, 360), resample=Image.BILINEAR) if rng.random() < 0.5 else picture


def make_dataset(out, per_class=40, size=256, seed=0):
    out = Path(out)
    rng = np.random.default_rng(seed)
    for grade in GRADES:
        folder = out / grade
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(grade, rng, size).save(folder / f"{grade}_{i:03d}.jpg", quality=88)
    return out


# ----------------------------------------------------------------------------- a harder set, to tell recipes apart

MAYO = ("mayo0", "mayo1", "mayo2", "mayo3")
MAYO_SHARES = (0.54, 0.27, 0.11, 0.08)  # roughly the grades of real UC image sets (LIMUC: 54/27/11/8%)
MAYO_COLOURS = np.array([(226, 150, 140), (220, 122, 108), (206, 86, 74), (160, 38, 36)], dtype=float)


def make_mayo_image(severity, rng, size=256, cast=(1.0, 1.0, 1.0)):
    """A picture whose findings follow a continuous severity (0 normal .. 3 severe), so that pictures of
    neighbouring grades overlap; cast: the colour gains of a patient's processor and light source."""
    s = float(np.clip(severity, 0, 3))
    low = min(int(s), 2)
    image = _base(rng, size, MAYO_COLOURS[low] + (s - low) * (MAYO_COLOURS[low + 1] - MAYO_COLOURS[low]))
    grain = rng.normal(0, 7 * s, (size // 4, size // 4, 1))
    image += np.kron(grain, np.ones((4, 4, 1)))
    picture = Image.fromarray(np.clip(image * np.asarray(cast), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    _vessels(draw, rng, size, rng.poisson(10 * max(0.0, 1 - s / 1.6)))  # the vascular pattern fades
    _spots(draw, rng, size, rng.poisson(6 * max(0.0, 1 - abs(s - 1.8))), (0.008, 0.02), (236, 220, 170), (200, 50, 45))
    _spots(draw, rng, size, rng.poisson(2.5 * max(0.0, s - 2.1)), (0.05, 0.1), (232, 214, 150), rim=(120, 20, 20))
    _spots(draw, rng, size, rng.poisson(3 * max(0.0, s - 2.4)), (0.02, 0.05), (95, 5, 10))  # bleeding
    picture = picture.filter(ImageFilter.GaussianBlur(radius=size / 300))
    _spots(ImageDraw.Draw(picture), rng, size, rng.integers(2, 6), (0.004, 0.015), (255, 255, 250))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([size * 0.02, size * 0.02, size * 0.98, size * 0.98], fill=255)
    picture = Image.composite(
        picture, Image.new("RGB", (size, size)), mask.filter(ImageFilter.GaussianBlur(size / 100))
    )
    picture = picture.rotate(rng.uniform(0, 360), resample=Image.BILINEAR)  # no up or down in the colon
    return picture.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else picture


def make_mayo_dataset(out, images=400, size=256, seed=0, overlap=0.45):
    """Mayo 0-3 in the shares of MAYO_SHARES, 2 to 6 pictures per patient with the patient's colour cast, each
    drawn at a severity of its grade plus normal noise of sd overlap; writes out/patients.csv for --groups."""
    out, rng = Path(out), np.random.default_rng(seed)
    counts = np.floor(np.asarray(MAYO_SHARES) * images).astype(int)
    counts[0] += images - counts.sum()  # exactly images in all
    rows, patient = [], 0
    for grade, (name, count) in enumerate(zip(MAYO, counts)):
        (out / name).mkdir(parents=True, exist_ok=True)
        made = 0
        while made < count:
            patient += 1
            cast = rng.normal(1, 0.08, 3) * rng.uniform(0.8, 1.15)  # white balance and brightness
            for _ in range(min(int(rng.integers(2, 7)), count - made)):
                path = f"{name}/{name}_{made:04d}.jpg"
                make_mayo_image(grade + rng.normal(0, overlap), rng, size, cast).save(out / path, quality=88)
                rows.append(f"{path},p{patient:04d}\n")
                made += 1
    (out / "patients.csv").write_text("path,group\n" + "".join(rows))
    return out


def get_args_parser():  # used by tools/make_demo_data.py
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Generate synthetic endoscopy-like demo images in three grades."
    )
    parser.add_argument("--out", default="data", help="output folder (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=40, help="images per grade (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--mayo",
        type=int,
        default=0,
        metavar="IMAGES",
        help="instead: IMAGES pictures in mayo0..mayo3 (54/27/11/8%%), neighbouring grades overlapping, any "
        "orientation, a colour cast per patient, and patients.csv for --groups; to tell recipes apart (default: off)",
    )
    return parser


def write_video(path, parts, size, rate=25, hold=5, codec="libx264", options=None):
    """A video of demo pictures, for the tests and the benchmark: parts is a list of (pictures, seconds), each
    part showing its pictures in turn, each for hold frames, as size x size frames (width, height) at rate."""
    import av  # here: the demo images need no video library

    width, height = (size, size) if isinstance(size, int) else size
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    stream.options = {"preset": "veryfast"} | (options or {}) if codec == "libx264" else options or {}
    for pictures, seconds in parts:
        frames = [
            np.asarray(Image.fromarray(np.asarray(p, dtype=np.uint8)).convert("RGB").resize((width, height)))
            for p in pictures
        ]
        for i in range(round(seconds * rate)):
            frame = av.VideoFrame.from_ndarray(frames[(i // hold) % len(frames)], format="rgb24")
            container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    return Path(path)
