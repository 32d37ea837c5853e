"""Presets: how a model is trained (a recipe, named as data) and the transforms that make its input.

A recipe is a row of RECIPES, and qq.py's flags default to the seed's. A recipe that trains
differently is one more row; a field that a later recipe needs (a loss, an EMA, test-time
augmentation) comes with a default that leaves the recipes before it as they were.

The recipes are read without torch, so that qq.py --help answers at once: the transforms import
torch only when they are made.
"""

import functools
from dataclasses import dataclass

from .images import preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """A training recipe: the augmentation, SGD with StepLR, and how long and in what batches to train."""

    epochs: int
    batch_size: int
    img_size: int  # the crop the model sees, in pixels
    lr: float  # SGD
    momentum: float
    step_size: int  # StepLR: the lr is multiplied by gamma every step_size epochs
    gamma: float
    crop_scale: tuple  # RandomResizedCrop: the crop's share of the image's area, from .. to
    hflip_prob: float  # how often a training image is mirrored


RECIPES = {
    # the PyTorch transfer-learning tutorial's recipe, which the project started from
    "seed": Recipe(
        epochs=25,
        batch_size=16,
        img_size=224,
        lr=0.001,
        momentum=0.9,
        step_size=7,
        gamma=0.1,
        crop_scale=(0.08, 1.0),
        hflip_prob=0.5,
    ),
}
DEFAULT_RECIPE = "seed"


def resize_size_for(img_size):
    """The shorter side to resize to before a centre crop of img_size (256 for 224, as for ImageNet)."""
    return int(round(img_size * 256 / 224))


def train_transform(img_size, recipe=RECIPES[DEFAULT_RECIPE]):
    """The recipe's random crop and flip of a cached uint8 tensor."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(img_size, scale=recipe.crop_scale, antialias=True)
    return v2.Compose([crop, v2.RandomHorizontalFlip(recipe.hflip_prob)])


def val_transform(img_size):
    """The centre crop of a cached, already resized uint8 tensor: the same pixels as eval_transform."""
    from torchvision.transforms import v2

    return v2.CenterCrop(img_size)


def eval_transform(img_size, resize_size=None):
    """The one evaluation preprocessing: PIL image -> resize -> centre crop -> uint8 tensor.

    It is images.preprocess, which the torch-free ONNX grader uses too. Validation takes the same
    centre crop of the cached, already resized tensor, which gives the same pixels; normalize() then
    maps either to the model's input. A checkpoint stores both sizes.
    """
    resize_size = resize_size or resize_size_for(img_size)
    return functools.partial(_preprocess_tensor, img_size=img_size, resize_size=resize_size)


def _preprocess_tensor(image, img_size, resize_size):
    import torch

    return torch.from_numpy(preprocess(image, img_size, resize_size))


@functools.lru_cache(maxsize=8)
def _mean_std(device, mean, std):
    # made once per device: a fresh tensor per batch would be a blocking host-to-GPU copy each step
    import torch

    return torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 (N, 3, H, W) on any device -> normalised float32 in channels_last."""
    import torch

    mean, std = _mean_std(images.device, tuple(mean), tuple(std))
    images = images.float().div_(255).sub_(mean).div_(std)
    return images.contiguous(memory_format=torch.channels_last)
