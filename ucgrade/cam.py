"""Grad-CAM (Selvaraju et al., 2017) for the ResNet50: which regions drove the predicted grade.

A small hook-based implementation on the last convolutional stage (layer4): the class score's
gradient, averaged over space, weights the activation maps; their positive sum is the heatmap.
"""

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from .data import eval_transform, load_image, resize_size_for
from .engine import to_input
from .model import unwrap


def grad_cam(model, images, target_class=None):
    """Heatmaps for a batch of uint8 images (N, 3, S, S): (N, S, S) in [0, 1], and the classes used.

    target_class None explains the predicted class. Runs in fp32 with gradients, whatever the
    training precision was, because the maps are small and the gradients need the precision.
    """
    model = unwrap(model).eval()
    device = next(model.parameters()).device
    captured = {}
    handle = model.layer4.register_forward_hook(lambda module, inputs, output: captured.update(activations=output))
    try:
        with torch.enable_grad():
            logits = model(to_input(images, device))
            classes = logits.argmax(1) if target_class is None else torch.full((len(images),), int(target_class), device=device)
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


def cam_on_original(cam, original_size, img_size):
    """Place a heatmap of the centre crop back onto the original image's pixel grid.

    The crop covers the middle of the image; the margins that the model never saw get no heat.
    Returns an array of shape (height, width) of the original image.
    """
    width, height = original_size
    scale = min(width, height) / resize_size_for(img_size)  # original pixels per resized pixel
    side = int(round(img_size * scale))
    left, top = int(round((width - side) / 2)), int(round((height - side) / 2))
    patch = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
    full = np.zeros((height, width), dtype=np.float32)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    full[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
    return full


def overlay(image, heatmap, alpha=0.45):
    """Blend a [0, 1] heatmap (jet colours) over a PIL image of the same size."""
    colours = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    weight = alpha * np.clip(heatmap, 0, 1)[..., None] ** 0.5  # cold regions stay close to the image
    return Image.fromarray(np.clip(base * (1 - weight) + colours * weight, 0, 255).astype(np.uint8))


def cam_overlay(model, image_path, img_size, class_names):
    """(overlay PIL image at the original size, heatmap array, predicted class name) for one file."""
    image = load_image(image_path)
    cams, classes = grad_cam(model, eval_transform(img_size)(image).unsqueeze(0))
    heatmap = cam_on_original(cams[0], image.size, img_size)
    return overlay(image, heatmap), heatmap, class_names[classes[0]]
