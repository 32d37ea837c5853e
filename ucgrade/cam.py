"""Grad-CAM (Selvaraju et al., 2017): which regions drove the predicted grade.

A small hook-based implementation on the last convolutional stage (the architecture table's
cam_layer, layer4 of a ResNet): the class score's gradient, averaged over space, weights the
activation maps; their positive sum is the heatmap.
"""

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from . import files
from .data import load_image
from .engine import to_input
from .model import cam_layer, unwrap
from .presets import IMAGENET_MEAN, IMAGENET_STD, eval_transform, resize_size_for


def grad_cam(model, images, target_class=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Heatmaps for a batch of uint8 images (N, 3, S, S): (N, S, S) in [0, 1], and the classes used.

    target_class None explains the predicted class. Runs in fp32 with gradients, whatever the
    training precision was, because the maps are small and the gradients need the precision.
    """
    model = unwrap(model).eval()
    device = next(model.parameters()).device
    captured = {}
    handle = cam_layer(model).register_forward_hook(lambda module, inputs, output: captured.update(activations=output))
    try:
        with torch.enable_grad():
            # an input that needs gradients makes the layer's output need them even with every weight
            # frozen (--freeze-backbone); its own gradient is never computed
            logits = model(to_input(images, device, mean, std).requires_grad_())
            classes = (
                logits.argmax(1)
                if target_class is None
                else torch.full((len(images),), int(target_class), device=device)
            )
            score = logits.gather(1, classes[:, None]).sum()
            activations = captured["activations"]
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * activations).sum(1, keepdim=True))
    cams = torch.nn.functional.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cams / peak).detach().cpu().numpy(), classes.cpu().tolist()


def cam_on_original(cam, original_size, img_size, resize_size=None):
    """Place a heatmap of the centre crop back onto the original image's pixel grid.

    The crop covers the middle of the image; the margins that the model never saw get no heat.
    Returns an array of shape (height, width) of the original image.
    """
    width, height = original_size
    scale = min(width, height) / (resize_size or resize_size_for(img_size))  # original pixels per resized pixel
    side = int(round(img_size * scale))
    left, top = int(round((width - side) / 2)), int(round((height - side) / 2))
    patch = (
        np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR), dtype=np.float32)
        / 255
    )
    full = np.zeros((height, width), dtype=np.float32)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    full[y0:y1, x0:x1] = patch[y0 - top : y1 - top, x0 - left : x1 - left]
    return full


def overlay(image, heatmap, alpha=0.45):
    """Blend a [0, 1] heatmap (jet colours) over a PIL image of the same size."""
    colours = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    weight = alpha * np.clip(heatmap, 0, 1)[..., None] ** 0.5  # cold regions stay close to the image
    return Image.fromarray(np.clip(base * (1 - weight) + colours * weight, 0, 255).astype(np.uint8))


def cam_overlay(model, image_path, checkpoint, target_class=None):
    """(overlay PIL image at the original size, heatmap array, explained class name) for one file.

    The image is preprocessed as the checkpoint (or a dict with its class_names and img_size, and
    optionally resize_size, mean and std) records. target_class None explains the predicted class.
    """
    img_size, resize_size = checkpoint["img_size"], checkpoint.get("resize_size")
    mean, std = checkpoint.get("mean", IMAGENET_MEAN), checkpoint.get("std", IMAGENET_STD)
    image = load_image(image_path)
    cams, classes = grad_cam(model, eval_transform(img_size, resize_size)(image).unsqueeze(0), target_class, mean, std)
    heatmap = cam_on_original(cams[0], image.size, img_size, resize_size)
    return overlay(image, heatmap), heatmap, checkpoint["class_names"][classes[0]]


def save_png(image, path):
    """Save a PIL image as PNG atomically, so an interrupted run never leaves half a file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    files.write_bytes(path, buffer.getvalue())


def write_cams(model, image_set, evaluation, run_dir, img_size, count):
    """Grad-CAM overlays of the predicted grade for a few validation images, listed in cam/index.csv.

    evaluation: the validation images' indices (val), targets and probabilities (probs). The most
    confident right image of each grade comes first, then the most confident errors.
    Returns a list of (caption, PNG path); a caption names the file, not its folders, which the grade already says.
    """
    if count == 0:
        return []
    val, targets, probs = evaluation.val, evaluation.targets, evaluation.probs
    preprocessing = {"class_names": image_set.class_names, "img_size": img_size}
    preds = probs.argmax(1)
    chosen = []
    for c in range(len(image_set.class_names)):
        right = np.flatnonzero((targets == c) & (preds == c))
        if len(right):
            chosen.append(right[np.argmax(probs[right, c])])
    wrong = np.flatnonzero(preds != targets)
    chosen += list(wrong[np.argsort(-probs[wrong].max(1))])
    cam_dir = Path(run_dir) / "cam"
    cam_dir.mkdir(exist_ok=True)
    cams = []
    for k in chosen[:count]:
        path = image_set.paths[val[k]]
        predicted = image_set.class_names[preds[k]]
        image, _, _ = cam_overlay(model, path, preprocessing, target_class=preds[k])
        image.thumbnail((512, 512))
        out = cam_dir / f"{len(cams) + 1:02d}_{path.stem}.png"
        save_png(image, out)
        cams.append(
            (
                f"{path.name}: true {image_set.class_names[targets[k]]}, predicted {predicted} "
                f"(p={probs[k].max():.2f})",
                out,
            )
        )
    files.write_csv(
        cam_dir / "index.csv", [{"file": out.name, "caption": caption} for caption, out in cams], ["file", "caption"]
    )
    return cams
