"""The torch-free preprocessing (ucgrade.images, used by the ONNX grader) gives exactly the pixels of
torchvision's Resize + CenterCrop + PILToTensor, which validation and predict.py used before (issue 11)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ucgrade import images, presets
from ucgrade.grader import Grader

# Landscape, portrait, square, odd sizes (the centre crop's half-pixel rounding), tiny (upscaled), long strips.
SIZES = [(150, 110), (110, 150), (352, 288), (293, 300), (73, 73), (64, 64), (1000, 37), (37, 1000), (257, 999)]


@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("img_size", [64, 97, 224])
def test_preprocess_matches_torchvision_pixel_for_pixel(width, height, img_size):
    rng = np.random.default_rng(width * height + img_size)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    resize_size = presets.resize_size_for(img_size)
    torchvision_pixels = v2.Compose([v2.Resize(resize_size), v2.CenterCrop(img_size), v2.PILToTensor()])(image)

    pixels = images.preprocess(image, img_size, resize_size)
    assert pixels.dtype == np.uint8 and pixels.shape == (3, img_size, img_size) and pixels.flags["C_CONTIGUOUS"]
    assert torch.equal(torch.from_numpy(pixels), torchvision_pixels)
    assert torch.equal(presets.eval_transform(img_size)(image), torchvision_pixels)  # predict.py's .pt path
    # the training cache: resized the same way, then the same centre crop in validation
    cached = torch.from_numpy(images.to_chw(images.resize_shorter_side(image, resize_size)))
    assert torch.equal(cached, F.pil_to_tensor(F.resize(image, resize_size)))
    assert torch.equal(presets.val_transform(img_size)(cached), torchvision_pixels)


def test_prediction_input_is_the_shared_preprocessing(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(path)
    grader = Grader(path, ["mild", "severe"], 64, 80, "fp32", forward=None)  # every runtime's preprocessing
    picture = images.load_image(path)
    crop = grader.crop(picture)
    assert crop.shape == (3, 64, 64) and crop.dtype == np.uint8
    assert np.array_equal(crop, images.preprocess(picture, 64, 80))
    assert np.array_equal(grader.crop(np.asarray(picture)), crop)  # a decoded video frame: an H x W x 3 array


def test_a_crop_larger_than_the_resized_image_is_a_bug_not_a_silent_pad():
    with pytest.raises(ValueError, match="does not fit"):
        images.preprocess(Image.new("RGB", (50, 40)), 64, 60)
