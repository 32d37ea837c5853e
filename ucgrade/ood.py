"""Know when not to grade: flag images unlike the training images.

An image's score is the Mahalanobis distance of its pooled backbone features (the model without its
head, model.backbone; their signed square root) to the features of the training images, with the
covariance shrunk by scikit-learn's LedoitWolf (a backbone has far more features than a study has
images). The threshold is calibrated on the validation images at training time, so that about
FLAG_RATE of them are flagged (calibrated_threshold), and stored in best.pt as plain tensors and
floats, so that the checkpoint still loads with weights_only=True. A plot, a screenshot or a flat
colour lands far outside the training features; the grade of such an image is not reliable,
whatever its probability says.
"""

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from . import data, presets
from .device import autocast
from .engine import to_input
from .model import backbone, load_checkpoint, save_checkpoint, unwrap

FLAG_RATE = 0.01  # of the validation images
MAX_TRAIN_IMAGES = 2000  # the features of a seeded sample of this many training images are enough for a covariance
WARNING = "not like the training images: grade not reliable"


@dataclass
class OodScorer:
    """The backbone and the training statistics of one checkpoint: scores(uint8 N x 3 x S x S) -> N distances."""

    features: torch.nn.Module
    mean: np.ndarray
    precision_matrix: np.ndarray
    threshold: float
    device: torch.device
    precision: str = "fp32"
    norm: tuple = (presets.IMAGENET_MEAN, presets.IMAGENET_STD)

    @torch.inference_mode()
    def scores(self, batch):
        batch = torch.as_tensor(batch)
        with autocast(self.device, self.precision):
            features = self.features(to_input(batch, self.device, *self.norm)).float().cpu().numpy()
        return mahalanobis(features, self.mean, self.precision_matrix)


def mahalanobis(features, mean, precision_matrix):
    """The distance of each row of features (straight from the backbone) to the training features."""
    centred = root(features) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, precision_matrix, centred), 0))


def root(features):
    """Pooled activations are mostly non-negative and skewed to the right; their signed square root is closer
    to the Gaussian that a Mahalanobis distance assumes, and it separates plots and flat colours from
    endoscopy-like images far better (tests/test_evidence.py)."""
    features = np.asarray(features, dtype=np.float64)
    return np.sign(features) * np.sqrt(np.abs(features))


def fit(train_features, val_features, flag_rate=FLAG_RATE):
    """The statistics stored in a checkpoint: the training features' mean and shrunk precision matrix, and the
    distance above which flag_rate of the validation images lie."""
    estimate = LedoitWolf().fit(root(train_features))
    val_scores = mahalanobis(val_features, estimate.location_, estimate.precision_)
    threshold = calibrated_threshold(val_scores, flag_rate)
    stats = {
        "mean": torch.from_numpy(estimate.location_.astype(np.float32)),
        "precision": torch.from_numpy(estimate.precision_.astype(np.float32)),
        "threshold": threshold,
        "flag_rate": flag_rate,
        "train_images": len(train_features),
        "val_images": len(val_features),
    }
    return stats, val_scores


def calibrated_threshold(val_scores, flag_rate=FLAG_RATE):
    """The distance that about flag_rate of images like the validation ones exceed.

    A validation split of a small study has tens of images, too few to read a 1% tail off them (the
    99th percentile of 20 images is their largest), so the tail comes from a log-normal fitted to
    their distances, which are positive and skewed to the right.
    """
    logs = np.log(np.maximum(val_scores, 1e-12))
    spread = logs.std(ddof=1) if len(logs) > 1 else 0.0
    return float(np.exp(logs.mean() + NormalDist().inv_cdf(1 - flag_rate) * spread))


@torch.inference_mode()
def split_features(features, image_set, indices, img_size, batch_size, runtime):
    """Pooled backbone features (N x D numpy) of the images at indices, centre-cropped as in validation.
    Only this process's loop: it runs on the main process alone, after the others are done."""
    dataset = data.ImageDataset(image_set, indices, presets.val_transform(img_size), presets.resize_size_for(img_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    out = []
    for images, _ in loader:
        with autocast(runtime.device, runtime.precision):
            out.append(features(to_input(images, runtime.device)).float().cpu().numpy())
    return np.concatenate(out)


def calibrate(model, image_set, split, args, runtime):
    """Fit the statistics on the split's training images, set the threshold on its validation images, and write
    them into best.pt (model holds its weights). Returns the flagged rate of the validation images."""
    features = backbone(unwrap(getattr(model, "module", model))).eval()  # not a DistributedDataParallel
    train = np.asarray(split.train)
    if len(train) > MAX_TRAIN_IMAGES:
        train = np.sort(np.random.default_rng(args.seed).choice(train, MAX_TRAIN_IMAGES, replace=False))
    train_features = split_features(features, image_set, train, args.img_size, args.batch_size, runtime)
    val_features = split_features(features, image_set, split.val, args.img_size, args.batch_size, runtime)
    stats, val_scores = fit(train_features, val_features)
    checkpoint = load_checkpoint(split.run_dir / "best.pt")
    checkpoint["ood"] = stats
    save_checkpoint(split.run_dir / "best.pt", checkpoint)
    flagged = val_scores > stats["threshold"]
    return {"flagged": int(flagged.sum()), "images": len(flagged), "rate": float(flagged.mean())}


def scorer(model, checkpoint, device, precision="fp32"):
    """The OodScorer of a loaded checkpoint, or None for a checkpoint written before the calibration existed."""
    stats = checkpoint.get("ood")
    if not stats:
        return None
    norm = (tuple(checkpoint.get("mean", presets.IMAGENET_MEAN)), tuple(checkpoint.get("std", presets.IMAGENET_STD)))
    return OodScorer(
        backbone(unwrap(model)).eval(),
        stats["mean"].double().numpy(),
        stats["precision"].double().numpy(),
        float(stats["threshold"]),
        device,
        precision,
        norm,
    )
