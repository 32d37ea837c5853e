"""Presets: how a model is trained (a recipe, named as data) and the transforms that make its input.

A recipe is a row of RECIPES, and qq.py's flags default to the seed's; --recipe NAME fills every
flag that the command line leaves out from its row (apply_recipe). A recipe that trains
differently is one more row; a field that a later recipe needs comes with a default that leaves
the recipes before it as they were. An augmentation is a row of AUGMENTS.

The recipes are read without torch, so that qq.py --help answers at once: the transforms import
torch only when they are made.
"""

import dataclasses
import functools
from dataclasses import dataclass

from .images import preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augment:
    """How a training image is varied: on the cached uint8 tensor, drawing only from torch's generator."""

    crop_scale: tuple  # RandomResizedCrop: the crop's share of the image's area, from .. to
    hflip_prob: float  # how often a training image is mirrored left to right
    vflip_prob: float = 0.0  # .. and upside down
    rot90: bool = False  # a quarter turn, k = 0..3 at random
    # ColorJitter's brightness, contrast and saturation; no hue, whose HSV round trip costs more than the rest
    jitter: tuple = None
    trivial_augment: bool = False  # TrivialAugmentWide: one random operation of random strength


AUGMENTS = {
    "seed": Augment(crop_scale=(0.08, 1.0), hflip_prob=0.5),
    # endoscopy has no up or down, and its colours move with the processor and the light source
    "endoscopy": Augment(
        crop_scale=(0.25, 1.0), hflip_prob=0.5, vflip_prob=0.5, rot90=True, jitter=(0.2, 0.2, 0.1),
        trivial_augment=True,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """A training recipe: what qq.py trains with unless a flag says otherwise. The field names are the flags'."""

    epochs: int
    batch_size: int
    img_size: int  # the crop the model sees, in pixels
    lr: float
    momentum: float  # SGD
    step_size: int  # StepLR: the lr is multiplied by gamma every step_size epochs
    gamma: float
    augment: str = "seed"  # a row of AUGMENTS
    loss: str = "ce"  # ce (cross-entropy) or cdw-ce (class-distance-weighted, Polat et al. 2022)
    cdw_alpha: float = 5.0  # CDW-CE's power of the distance between grades
    label_smoothing: float = 0.0  # cross-entropy's
    optimizer: str = "sgd"  # sgd or adamw
    weight_decay: float = 0.0
    schedule: str = "step"  # step (StepLR) or cosine, both stepped once per epoch
    warmup_epochs: int = 0  # epochs whose lr rises linearly before the schedule
    ema: float = 0.0  # the decay of an exponential moving average of the weights; 0 is off
    tta: bool = False  # grade the mean probabilities of the image and its flips


RECIPES = {
    # the PyTorch transfer-learning tutorial's recipe, which the project started from
    "seed": Recipe(epochs=25, batch_size=16, img_size=224, lr=0.001, momentum=0.9, step_size=7, gamma=0.1),
    # the seed's optimiser, with what timm's and torchvision's recipes add, for endoscopy (README: Recipes)
    "endoscopy": Recipe(
        epochs=25, batch_size=16, img_size=224, lr=0.001, momentum=0.9, step_size=7, gamma=0.1, augment="endoscopy",
        label_smoothing=0.1, weight_decay=1e-4, schedule="cosine", warmup_epochs=2, ema=0.999,
    ),
}  # fmt: skip
DEFAULT_RECIPE = "seed"
RECIPE_FIELDS = tuple(field.name for field in dataclasses.fields(Recipe))


def apply_recipe(args, given):
    """Fill every setting of args.recipe that the command line did not give (given: the names it gave).

    Label smoothing belongs to cross-entropy: a recipe's is left out with --loss cdw-ce, and one given with it is
    refused by qq.check_args."""
    recipe = RECIPES[args.recipe]
    for name in RECIPE_FIELDS:
        if name not in given:
            setattr(args, name, getattr(recipe, name))
    if args.loss == "cdw-ce" and "label_smoothing" not in given:
        args.label_smoothing = 0.0
    return args


def resize_size_for(img_size):
    """The shorter side to resize to before a centre crop of img_size (256 for 224, as for ImageNet)."""
    return int(round(img_size * 256 / 224))


def train_transform(img_size, augment="seed"):
    """The random variation of a cached uint8 tensor that AUGMENTS[augment] names, cropped to img_size first, so
    that the other operations work on the small picture."""
    from torchvision.transforms import v2

    spec = AUGMENTS[augment]
    steps = [
        v2.RandomResizedCrop(img_size, scale=spec.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(spec.hflip_prob),
    ]
    if spec.vflip_prob:
        steps.append(v2.RandomVerticalFlip(spec.vflip_prob))
    if spec.rot90:
        steps.append(QuarterTurn())
    if spec.jitter:
        steps.append(v2.ColorJitter(*spec.jitter))
    if spec.trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    return v2.Compose(steps)


class QuarterTurn:
    """Turn a square (C, S, S) picture by 0, 90, 180 or 270 degrees, k drawn from torch's generator."""

    def __call__(self, image):
        import torch

        return torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))


# Test-time augmentation: the picture and its mirror images, left-right, upside-down and both (a half turn);
# endoscopy pictures have no up or down, so each is a picture the model could have been shown.
TTA_FLIPS = ((), (3,), (2,), (2, 3))


def flip_views(images):
    """(N, 3, H, W) -> (len(TTA_FLIPS) * N, 3, H, W): every view of the batch, one after another."""
    import torch

    return torch.cat([images.flip(dims) if dims else images for dims in TTA_FLIPS])


def mean_of_views(probs, views=len(TTA_FLIPS)):
    """(views * N, C) probabilities of flip_views' batch -> (N, C), the mean over the views of each picture."""
    return probs.unflatten(0, (views, -1)).mean(0)


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
