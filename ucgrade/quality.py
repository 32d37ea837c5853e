"""Which video frames can be graded: too dark, overexposed, blurred, or unlike the training images.

About a third of the frames of a trial colonoscopy cannot be graded (blur, stool, bubbles, water, the camera
outside the body), and every published pipeline removes them before scoring. The measures are taken on the
crop the model grades (uint8 3 x S x S), so blur that vanishes at the model's resolution does not count,
and each frame's values are written to frames.csv, so that the thresholds can be tuned on one's own footage.
Without torch.
"""

from dataclasses import dataclass

import numpy as np

# The defaults, measured on the demo frames (python tools/make_demo_data.py) at the model's 224 px crop: the
# mean luma of the darkest grade (severe, dark red mucosa) is 46-69, and of a switched-off or covered light 0-10;
# a normal frame has a few percent of specular highlights at 250+; the variance of the Laplacian of a sharp
# frame is 15-400, and 1-7 when blurred by a Gaussian of 2-4 px at the model's scale.
DARK = 25.0  # mean luma (0-255) below which a frame shows nothing but the lumen, or the light is off
OVEREXPOSED = 0.25  # share of clipped pixels (luma 250+) above which a frame is a white-out (light on the wall)
BLUR = 8.0  # variance of the Laplacian of the luma below which a frame is blurred
REASONS = ("too dark", "overexposed", "blurred", "not like the training images")


@dataclass
class Thresholds:
    dark: float = DARK
    overexposed: float = OVEREXPOSED
    blur: float = BLUR


def measure(crops):
    """(brightness, clipped share, sharpness) of each crop of a batch (N x 3 x S x S uint8), as N-arrays."""
    x = np.asarray(crops, dtype=np.float32)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # ITU-R BT.601, as JPEG and most video
    laplacian = (
        luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4 * luma[:, 1:-1, 1:-1]
    )
    brightness = luma.mean(axis=(1, 2))
    clipped = (luma >= 250).mean(axis=(1, 2))
    return brightness, clipped, laplacian.reshape(len(x), -1).var(axis=1)


def reasons(brightness, clipped, sharpness, flagged, thresholds):
    """The first reason each frame cannot be graded ('' when it can), in the order of REASONS: a black frame is
    'too dark' rather than also 'blurred', so that the counts of the reasons add up to the ungradable frames."""
    checks = (
        np.asarray(brightness) < thresholds.dark,
        np.asarray(clipped) > thresholds.overexposed,
        np.asarray(sharpness) < thresholds.blur,
        np.zeros(len(brightness), bool) if flagged is None else np.asarray(flagged, bool),
    )
    out = np.full(len(brightness), "", dtype=object)
    for reason, failed in zip(reversed(REASONS), reversed(checks)):
        out[failed] = reason
    return out.tolist()
