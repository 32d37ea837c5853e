"""Messy training data (issue 3): bad files are skipped and listed, odd images are converted and used.

A real export mixes images with system files, broken downloads, odd colour modes, rotated photos,
huge scans, non-ASCII names and sub-folders per patient. One training run over such a folder
checks what the user sees and what the run folder records.
"""

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import FAST, cli, grade_with_library, make_folder, run_scripts, user_lines
from PIL import Image

from ucgrade import data, files, images, presets
from ucgrade.demo import make_image

EXTENSIONS = {  # every extension the README names, some in upper or mixed case as cameras and Windows write them
    "mild/photo.jpeg": "JPEG",
    "mild/scan.bmp": "BMP",
    "moderate/scan.tif": "TIFF",
    "moderate/scan.tiff": "TIFF",
    "severe/scan.webp": "WEBP",
    "severe/CAMERA.JPG": "JPEG",
    "mild/SCREEN.PNG": "PNG",
    "moderate/Scan.Tif": "TIFF",
    "severe/SCAN.WEBP": "WEBP",
}

RED, BLUE = (220, 40, 40), (40, 40, 220)


def png16(path, array):
    """Write a 16-bit RGB or RGBA PNG (Pillow reads these but cannot write them)."""
    height, width, channels = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def rotated_jpeg(path):
    """A photo taken with the camera on its side: stored landscape, EXIF orientation 6 says turn it upright.

    Upright it is 60 x 90 (portrait), red on top and blue below.
    """
    upright = np.zeros((90, 60, 3), np.uint8)
    upright[:45], upright[45:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """(data folder, files that must be skipped with a word of their reason, relative paths that must be used,
    hidden files that must be neither used nor listed)."""
    root = make_folder(tmp_path_factory.mktemp("messy"), {"mild": 6, "moderate": 6, "severe": 6})
    mild, moderate, severe = root / "mild", root / "moderate", root / "severe"
    jpeg = (mild / "mild_000.jpg").read_bytes()
    rng = np.random.default_rng(1)

    # usable, though unusual: colour modes, EXIF rotation, names, nested folders
    picture = make_image("moderate", rng, 72)
    picture.convert("L").save(moderate / "grayscale.png")
    rgba = picture.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # from transparent to opaque
    rgba.save(moderate / "rgba.png")
    picture.convert("P", palette=Image.Palette.ADAPTIVE).save(moderate / "palette.png", transparency=0)
    picture.convert("CMYK").save(moderate / "cmyk.jpg")
    Image.fromarray((np.asarray(picture.convert("L")).astype(np.uint16) * 257)).save(moderate / "gray16.png")
    png16(moderate / "rgb16.png", np.asarray(picture).astype(np.uint16) * 257)
    rotated_jpeg(mild / "rotated.jpg")
    make_image("mild", rng, 72).save(mild / "Ärztlicher Befund 1.jpg")
    nested = severe / "patient 7" / "visit 2"
    nested.mkdir(parents=True)
    make_image("severe", rng, 72).save(nested / "ulcère près du côlon.jpg")
    make_image("severe", rng, 72).save(nested / "内镜 图像.png")
    for relative, image_format in EXTENSIONS.items():
        make_image(relative.split("/")[0], rng, 72).save(root / relative, format=image_format)
    (root / "unused").mkdir()  # an empty class folder: reported and ignored

    # hidden files and folders: clutter of the operating system or of tools, left out without a word
    notebook = severe / ".ipynb_checkpoints"
    notebook.mkdir()
    make_image("severe", rng, 72).save(notebook / "copy.jpg")
    make_image("moderate", rng, 72).save(moderate / ".hidden.png")  # a good image, yet hidden
    (mild / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (mild / "._mild_000.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(64))  # AppleDouble
    (nested / ".Spotlight-V100").write_bytes(b"")
    hidden = [notebook / "copy.jpg", moderate / ".hidden.png", mild / ".DS_Store", mild / "._mild_000.jpg"]
    hidden.append(nested / ".Spotlight-V100")

    # not usable: each must be skipped, with its reason
    bad = {
        mild / "Thumbs.db": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64), "not an image"),
        mild / "notes.txt": (b"patient 12: second look in March", "not an image"),
        mild / "empty.jpg": (b"", "0 bytes"),
        moderate / "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        moderate / "x.jpg": (b"this is a text file with a .jpg name", "not an image"),
        severe / "corrupt.jpg": (jpeg[:200] + bytes(500) + jpeg[700:], "corrupt"),
        nested / "report.pdf": (b"%PDF-1.4", "not an image"),
    }
    for path, (content, _) in bad.items():
        path.write_bytes(content)
    reasons = {str(path): reason for path, (_, reason) in bad.items()}
    Image.new("1", (13400, 13400)).save(severe / "huge scan.png")  # 180 Mpixel, yet small on disk
    reasons[str(severe / "huge scan.png")] = "too large"
    try:  # a Latin-1 name from an old Windows export: not valid UTF-8
        (mild / os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg)
        reasons[str(mild / "caf\ufffd.jpg")] = "not valid UTF-8"
    except (OSError, UnicodeError):  # file systems that insist on UTF-8 names
        pass

    used = {f"{c}/{c}_{i:03d}.jpg" for c in ("mild", "moderate", "severe") for i in range(6)}
    used |= {
        f"moderate/{name}"
        for name in ("grayscale.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png", "rgb16.png")
    }
    used |= {
        "mild/rotated.jpg",
        "mild/Ärztlicher Befund 1.jpg",
        "severe/patient 7/visit 2/ulcère près du côlon.jpg",
        "severe/patient 7/visit 2/内镜 图像.png",
        *EXTENSIONS,
    }
    return root, reasons, used, hidden


@pytest.fixture(scope="module")
def messy_run(messy, module_tmp):
    """(exit code, stdout, stderr, run folder) of one training run over the messy folder, in this process: the
    user's terminal is the redirected output (a subprocess would only add seconds of torch import)."""
    root = messy[0]
    out = module_tmp / "out"
    code, stdout, stderr = cli("qq.py", "--data", root, "--out", out, "--epochs", "1", *FAST)
    return code, stdout, stderr, out / "train"


def test_bad_files_are_skipped_listed_and_recorded_before_training(messy, messy_run):
    _, reasons, _, hidden = messy
    code, stdout, stderr, run = messy_run
    assert code == 0, stderr
    recorded = {row["path"]: row["reason"] for row in files.read_csv(run / "skipped.csv")}
    assert set(recorded) == set(reasons)
    for path, word in reasons.items():
        assert word in recorded[path], (path, recorded[path])

    lines = user_lines(stdout)
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/"))
    assert (
        f"warning: skipped {len(reasons)} file(s) that cannot be used (listed in skipped.csv of the run):"
        in lines[:first_epoch]
    )
    for path, reason in recorded.items():  # each one named in the warning, before training starts
        assert f"{path}: {reason}" in lines[:first_epoch]
    assert json.loads((run / "config.json").read_text())["skipped_files"] == len(reasons)
    # hidden files are left out without a word: not in skipped.csv (above), nor anywhere in the output
    for path in hidden:
        assert path.name not in stdout + stderr, path


def test_unusual_images_names_and_sub_folders_are_used(messy, messy_run):
    _, _, used, hidden = messy
    code, stdout, stderr, run = messy_run
    assert code == 0, stderr
    split = files.read_csv(run / "split.csv")
    # nested folders and every extension in any case included; hidden files and folders not, good images or not
    assert {row["path"] for row in split} == used
    assert not {path.name for path in hidden} & {row["path"].rsplit("/", 1)[-1] for row in split}
    assert all(row["class"] == row["path"].split("/")[0] for row in split)
    config = json.loads((run / "config.json").read_text())
    assert config["class_names"] == ["mild", "moderate", "severe"]  # the empty folder is left out ...
    assert "warning: class folder 'unused' holds no images and is ignored." in user_lines(stdout)  # ... and said so
    assert config["class_counts"] == [sum(p.startswith(c + "/") for p in used) for c in config["class_names"]]


def assert_graded_as_the_library(predictions, expected):
    """predict.py's --json predictions: the files expected, in order, each with the library's grade and
    probabilities, and `probability` the largest of them."""
    assert [p["path"] for p in predictions] == list(expected)
    for predicted in predictions:
        grade, probabilities = expected[predicted["path"]]
        assert predicted["grade"] == grade
        assert predicted["probabilities"] == pytest.approx(probabilities, rel=1e-5, abs=1e-30)
        assert predicted["probability"] == max(predicted["probabilities"].values())
        assert predicted["probability"] == predicted["probabilities"][grade]


def test_predict_reads_the_same_unusual_images(messy, messy_run):
    root = messy[0]
    run = messy_run[-1]
    images = [
        root / "severe/patient 7/visit 2/内镜 图像.png",
        root / "mild/Ärztlicher Befund 1.jpg",
        root / "moderate/gray16.png",
        root / "moderate/cmyk.jpg",
        *(root / relative for relative in EXTENSIONS),
    ]
    code, out, _ = cli("predict.py", *images, "--weights", run / "best.pt", "--json", "--device", "cpu")
    assert code == 0
    output = json.loads(out)
    assert output["errors"] == []
    assert_graded_as_the_library(output["predictions"], grade_with_library(images, run / "best.pt"))


def test_predict_leaves_hidden_files_out_of_a_folder_without_a_word(messy, messy_run, tmp_path):
    root = messy[0]
    run = messy_run[-1]
    folder = tmp_path / "visit"
    (folder / ".cache").mkdir(parents=True)
    for name in ("a.jpg", ".hidden.jpg", ".cache/b.jpg"):  # good images, two of them hidden
        (folder / name).write_bytes((root / "mild" / "mild_000.jpg").read_bytes())
    (folder / "sub").mkdir()
    (folder / "sub" / "B.JPG").write_bytes((root / "severe" / "CAMERA.JPG").read_bytes())
    for name in (".DS_Store", "._a.jpg", "sub/._B.JPG"):  # clutter that no decoder reads
        (folder / name).write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    code, out, err = cli("predict.py", folder, "--weights", run / "best.pt", "--json", "--device", "cpu")
    assert code == 0
    output = json.loads(out)
    assert output["errors"] == [] and "error" not in err and "._" not in err
    graded = [folder / "a.jpg", folder / "sub" / "B.JPG"]
    assert_graded_as_the_library(output["predictions"], grade_with_library(graded, run / "best.pt"))


def test_image_modes_become_the_right_rgb_pixels(tmp_path):
    def pixels(name, image, **save):
        image.save(tmp_path / name, **save)
        return np.asarray(data.load_image(tmp_path / name))

    colour = np.zeros((8, 10, 3), np.uint8)
    colour[:] = (200, 100, 50)
    rgb = Image.fromarray(colour)
    assert (pixels("gray.png", Image.new("L", (10, 8), 100)) == 100).all()

    gray16 = np.full((8, 10), 100 * 257, np.uint16)
    gray16[0, 0], gray16[0, 1] = 65535, 200  # white, and a value that is nearly black in 16 bits
    out = pixels("gray16.png", Image.fromarray(gray16))
    assert out.shape == (8, 10, 3) and (out[1:] == 100).all()  # mid-grey, not white
    assert (out[0, 0] == 255).all() and (out[0, 1] == 1).all()
    png16(tmp_path / "rgb16.png", colour.astype(np.uint16) * 257)
    assert (np.asarray(data.load_image(tmp_path / "rgb16.png")) == (200, 100, 50)).all()

    assert (pixels("cmyk.tif", rgb.convert("CMYK")) == (200, 100, 50)).all()
    assert np.abs(pixels("cmyk.jpg", rgb.convert("CMYK"), quality=100).astype(int) - (200, 100, 50)).max() <= 3

    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (255, 255, 255, 0))  # fully transparent: becomes black, like the endoscope's border
    out = pixels("rgba.png", rgba)
    assert (out[0, 0] == 0).all() and (out.reshape(-1, 3)[1:] == (200, 100, 50)).all()

    palette = Image.new("P", (10, 8), 0)
    palette.putpalette([200, 100, 50, 255, 255, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    out = pixels("palette.png", palette, transparency=1)
    assert (out[0, 0] == 0).all() and (out.reshape(-1, 3)[1:] == (200, 100, 50)).all()

    tensor = data.read_resized(tmp_path / "gray16.png", 16)  # what training caches
    assert tensor.dtype == torch.uint8 and tensor.shape[0] == 3


def test_exif_orientation_is_applied_in_training_and_prediction_alike(tmp_path):
    path = tmp_path / "rotated.jpg"
    rotated_jpeg(path)
    with Image.open(path) as raw:
        assert raw.size == (90, 60)  # stored on its side

    upright = np.asarray(data.load_image(path)).astype(int)
    assert upright.shape == (90, 60, 3)
    assert np.abs(upright[5:40].mean((0, 1)) - RED).max() < 10 and np.abs(upright[50:85].mean((0, 1)) - BLUE).max() < 10

    cached = data.read_resized(path, presets.resize_size_for(64))  # training and validation start from this
    assert cached.shape[1] > cached.shape[2]  # portrait
    assert cached[0, :10].float().mean() > 180 and cached[2, -10:].float().mean() > 180  # red top, blue bottom
    predicted = torch.from_numpy(images.preprocess(data.load_image(path), 64, presets.resize_size_for(64)))
    assert torch.equal(presets.val_transform(64)(cached), predicted)  # what predict.py feeds the model


def test_unusable_data_folders_stop_with_one_clear_line(tmp_path):
    (tmp_path / "a_file.txt").write_text("not a folder")
    flat = make_folder(tmp_path / "flat", {"mild": 3})
    for image in list((flat / "mild").iterdir()):
        image.rename(flat / image.name)
    (flat / "mild").rmdir()
    one_class = make_folder(tmp_path / "one_class", {"mild": 4})
    (one_class / "severe").mkdir()
    too_few = make_folder(tmp_path / "too_few", {"mild": 4, "severe": 1})
    gap = make_folder(tmp_path / "gap", {"mayo1": 4, "mayo3": 4})
    (gap / "mayo2").mkdir()
    (gap / "mayo2" / "Thumbs.db").write_bytes(b"")  # a folder with no image is empty
    (too_few / "severe" / "broken.jpg").write_bytes(b"not a jpeg")  # found, but not usable: 1 image left

    cases = [
        (tmp_path / "missing", ["'{data}' does not exist", "pass --data"]),
        (tmp_path / "a_file.txt", ["--data '{data}' is a file, not a folder"]),
        (flat, ["'{data}' has no class sub-folders", "'{data}/<grade>/<image>'"]),
        (one_class, ["'{data}' has images for only 1 class (empty: severe)"]),
        (too_few, ["class 'severe' has only 1 usable image(s)", "at least 2", "Add images"]),
        (
            gap,
            [
                "the class folder 'mayo2' in '{data}' holds no images",
                "between 'mayo1' and 'mayo3'",
                "QWK and MAE",
                "add its images, or remove the folder",
            ],
        ),
    ]
    for i, (folder, expected) in enumerate(cases):
        code, _, lines = cli("qq.py", "--data", folder, "--out", tmp_path / f"out{i}", "--epochs", "1", *FAST).lines()
        assert code == 2, folder
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        for fragment in expected:
            assert fragment.format(data=folder) in lines[0], (fragment, lines[0])
        assert not (tmp_path / f"out{i}").exists()  # no run folder for a run that never started

    # as a user sees it: the progress bar of the scan, then the one line, and no traceback
    (result,) = run_scripts(("qq.py", "--data", too_few, "--out", tmp_path / "out", "--epochs", "1", *FAST))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert user_lines(result.stderr) == [
        "error: class 'severe' has only 1 usable image(s); it needs at least 2 so that training and validation "
        "each get one. Add images or remove the folder."
    ]
    assert f"{too_few / 'severe' / 'broken.jpg'}: not an image Pillow can read" in user_lines(result.stdout)
