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

from statistics import NormalDist

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

from . import data, presets
from .device import autocast
from .engine import to_input
from .model import backbone, load_checkpoint, save_checkpoint, unwrap

FLAG_RATE = 0.01  # of the validation images
# The training side of the statistics comes from a seeded sample of at most this many training images: their
# features cost a forward pass each after the last epoch (which every fold pays again), and LedoitWolf's shrunk
# covariance needs no more to put plots and screenshots far outside; the threshold is set on the validation
# images' features, which the evaluation's own pass gives at no cost.
MAX_TRAIN_IMAGES = 256


class OodHead(nn.Module):
    """The distance of pooled features (N x D, straight from the backbone) to the training features, as a module:
    the torch grader runs it on the features of its grading pass, and export.py puts it into the ONNX graph,
    so that the two compute one score. Always in fp32, whatever the autocast around it."""

    def __init__(self, stats):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(stats["mean"], dtype=torch.float32))
        self.register_buffer("precision", torch.as_tensor(stats["precision"], dtype=torch.float32))

    def forward(self, features):
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            centred = torch.sign(features) * torch.sqrt(torch.abs(features)) - self.mean  # see root()
            return torch.sqrt(torch.clamp(((centred @ self.precision) * centred).sum(1), min=0))


def root(features):
    """Pooled activations are mostly non-negative and skewed to the right; their signed square root is closer
    to the Gaussian that a Mahalanobis distance assumes, and it separates plots and flat colours from
    endoscopy-like images far better (tests/test_evidence.py)."""
    features = np.asarray(features, dtype=np.float64)
    return np.sign(features) * np.sqrt(np.abs(features))


def fit(train_features, val_features, flag_rate=FLAG_RATE):
    """The statistics stored in a checkpoint: the training features' mean and shrunk precision matrix, and the
    distance above which flag_rate of the validation images lie."""
    # the shrunk covariance is well conditioned, so a plain inverse serves; scikit-learn's own precision_ (a
    # pseudo-inverse by eigendecomposition) took 4 s of a ResNet50's 2048 features on a 2-core CPU, ten times longer
    estimate = LedoitWolf(store_precision=False).fit(root(train_features))
    stats = {
        "mean": torch.from_numpy(estimate.location_.astype(np.float32)),
        "precision": torch.from_numpy(np.linalg.inv(estimate.covariance_).astype(np.float32)),
    }
    with torch.inference_mode():  # the scores of the grader's own arithmetic, from the stored fp32 statistics
        val_scores = OodHead(stats)(torch.as_tensor(np.asarray(val_features), dtype=torch.float32)).double().numpy()
    threshold = calibrated_threshold(val_scores, flag_rate)
    stats |= {
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


def training_sample(train, seed, limit=MAX_TRAIN_IMAGES):
    """A seeded sample of at most limit training images (their indices, in order): enough for the covariance."""
    train = np.asarray(train)
    if len(train) <= limit:
        return train
    return np.sort(np.random.default_rng(seed).choice(train, limit, replace=False))


def calibrate(model, image_set, split, args, runtime, val_features):
    """Fit the statistics on a sample of the split's training images, set the threshold on its validation images'
    features (val_features: those of the evaluation's own forward pass), and write them into best.pt (model
    holds its weights). Returns the flagged rate of the validation images."""
    features = backbone(unwrap(getattr(model, "module", model))).eval()  # not a DistributedDataParallel
    train = training_sample(split.train, args.seed)
    train_features = split_features(features, image_set, train, args.img_size, args.batch_size, runtime)
    stats, val_scores = fit(train_features, np.asarray(val_features))
    checkpoint = load_checkpoint(split.run_dir / "best.pt")
    checkpoint["ood"] = stats
    save_checkpoint(split.run_dir / "best.pt", checkpoint)
    flagged = val_scores > stats["threshold"]
    return {"flagged": int(flagged.sum()), "images": len(flagged), "rate": float(flagged.mean())}
