"""The torch runtime of the grader: a .pt checkpoint as a Grader, and GradingModel, what export.py writes to ONNX.

GradingModel is the whole grading computation of a checkpoint: uint8 crops -> normalised as in training ->
the model -> softmax, and, from the features the head read in that same pass, the out-of-distribution score.
The torch grader runs it on --device in --precision; export.py traces it into the ONNX graph, so that both
runtimes grade with one definition.
"""

import numpy as np
import torch
from torch import nn

from .device import autocast, choose_device, choose_precision
from .grader import Grader, Grades
from .model import head_inputs, load_checkpoint, model_from_checkpoint
from .ood import OodHead
from .presets import IMAGENET_MEAN, IMAGENET_STD, resize_size_for


class GradingModel(nn.Module):
    """uint8 RGB crops (N, 3, S, S) -> grade probabilities (N, C), and with the checkpoint's training statistics
    also the out-of-distribution scores (N,) of the same forward pass."""

    def __init__(self, model, checkpoint):
        super().__init__()
        self.model = model
        mean, std = checkpoint.get("mean", IMAGENET_MEAN), checkpoint.get("std", IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.ood = OodHead(checkpoint["ood"]) if checkpoint.get("ood") else None

    def forward(self, images):
        x = (images.float() / 255 - self.mean) / self.std  # the arithmetic of presets.normalize, in its order
        with head_inputs(self.model) as features:
            logits = self.model(x)
        probs = torch.softmax(logits.float(), dim=1)
        if self.ood is None:
            return probs
        return probs, self.ood(features[0])


def torch_grader(path, device="auto", precision="fp32", threads=None):
    """The Grader of a checkpoint written by qq.py, on device in precision (auto: as training chooses); threads:
    torch's CPU threads, at most (None: as they are)."""
    if threads:
        torch.set_num_threads(min(threads, torch.get_num_threads()))
    device = choose_device(device)
    precision = choose_precision(device, precision)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path).to(device).eval()
    grading = GradingModel(model, checkpoint).to(device).eval()

    @torch.inference_mode()
    def forward(crops):
        with autocast(device, precision):
            outputs = grading(torch.from_numpy(np.ascontiguousarray(crops)).to(device))
        probs, scores = outputs if isinstance(outputs, tuple) else (outputs, None)
        scores = None if scores is None else scores.double().cpu().numpy()
        return Grades(probs.float().cpu().numpy(), scores)

    stats = checkpoint.get("ood")
    return Grader(
        path,
        list(checkpoint["class_names"]),
        int(checkpoint["img_size"]),
        int(checkpoint.get("resize_size") or resize_size_for(checkpoint["img_size"])),
        precision,
        forward,
        ood_threshold=float(stats["threshold"]) if stats else None,
        runtime=f"torch on {device}",
        extra={"model": model, "checkpoint": checkpoint, "device": device},
    )
