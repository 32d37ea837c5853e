"""Images without torch: find image files, read them safely as 8-bit RGB, and preprocess them for grading.

Training, validation, predict.py with a .pt and predict.py with an .onnx all read and crop images
here, so that a grading-only install (onnxruntime, NumPy, Pillow) sees exactly the pixels that the
model was validated on.
"""

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class UnreadableImage(Exception):
    """An image file that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- finding image files


def files_under(folder, inside=None, left_out=None):
    """Every file below folder, nested sub-folders included, in a stable order. Hidden files and folders (names
    starting with '.': .DS_Store, macOS's ._ copies, .ipynb_checkpoints) are left out silently, as clutter of the
    operating system or of tools, not the user's images. Linked folders are followed, each real folder once,
    so a link back to a parent cannot loop.

    inside: a folder that linked folders must stay in (a link to / would otherwise walk the whole machine); a
    linked folder that leaves it is not followed, and goes into the list left_out."""
    found, seen = [], set()
    boundary = os.path.realpath(inside) if inside is not None else None
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        real = os.path.realpath(dirpath)
        if boundary is not None and os.path.commonpath([real, boundary]) != boundary:
            left_out.append((Path(dirpath), real))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(filenames) if not name.startswith("."))
    return found


NOT_REGULAR = "not a regular file (a pipe, socket or device), so it is not opened"
MAX_ASPECT = 20  # no endoscopy image is 20 times longer than wide; a 1 x 30000 strip would take 0.5 GB resized


def is_regular_file(path):
    """False for a pipe, a socket or a device (found by stat, because open() on a pipe waits for a writer);
    True for a regular file, and for a path that cannot be stat'ed, which load_image then names."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return True


def check_aspect(size):
    """Raise UnreadableImage for an image whose longer side is over MAX_ASPECT times its shorter side."""
    width, height = size
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1) or min(width, height) == 0:
        raise UnreadableImage(
            f"{width}x{height} px: the longer side is over {MAX_ASPECT} times the shorter, which no endoscopy "
            "image is (resized, such a strip would take a lot of memory)"
        )


def _is_utf8(path):
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_image_file(path):
    """An image by its extension, in upper or lower case (hidden files are left out by files_under)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------- reading images


def _to_rgb(image):
    """Convert any Pillow mode to 8-bit RGB: 16-bit scaled down, transparency over black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # convert("RGB") would clip 16-bit values at 255 and turn the picture white. I;16 is known
        # to be 16-bit; a 32-bit "I" image is taken as 16-bit only when its values need more than 8 bits.
        array = np.asarray(image).astype(np.float64)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.max(initial=0) <= 1.0:
            array = array * 255.0
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path):
    """Open an image as 8-bit RGB with its EXIF orientation applied; raise UnreadableImage if it cannot be."""
    path = Path(path)
    try:
        if not is_regular_file(path):
            raise UnreadableImage(NOT_REGULAR)
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings: the conversion handles them
            with Image.open(path) as image:
                check_aspect(image.size)  # from the header, before the pixels are decoded
                image.load()  # a full decode, so that truncated files fail here and not mid-epoch
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"too large for a safe decode ({error}); downscale it") from None
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a folder, not an image") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise UnreadableImage(f"truncated or corrupt image ({error})") from None


# ----------------------------------------------------------------------------- preprocessing


def resize_shorter_side(image, size):
    """A PIL image resized so that its shorter side is size, as torchvision's Resize(size) does for PIL
    images: the longer side is truncated to int(size * long / short), Pillow's bilinear filter
    (antialiased when shrinking), and an image already of that size is returned as it is."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=Image.Resampling.BILINEAR)


def center_crop(array, size):
    """The centre size x size square of an (H, W, ...) array, placed as torchvision's CenterCrop places it."""
    height, width = array.shape[:2]
    if size > height or size > width:
        raise ValueError(f"a {size} px crop does not fit a {width}x{height} image")  # resize_size >= img_size
    top = int(round((height - size) / 2.0))  # Python's round (half to even), as torchvision
    left = int(round((width - size) / 2.0))
    return array[top : top + size, left : left + size]


def to_chw(image):
    """A PIL RGB image as a contiguous uint8 array of shape (3, H, W)."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def preprocess(image, img_size, resize_size):
    """The one evaluation preprocessing of an RGB PIL image: resize its shorter side to resize_size,
    take the centre img_size square: a uint8 array of shape (3, img_size, img_size).

    The same pixels as torchvision's Resize(resize_size) + CenterCrop(img_size) + PILToTensor.
    Normalisation is the model's part (engine.to_input, or inside an exported ONNX graph).
    """
    resized = np.asarray(resize_shorter_side(image, resize_size), dtype=np.uint8)
    return np.ascontiguousarray(center_crop(resized, img_size).transpose(2, 0, 1))
