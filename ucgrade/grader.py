"""One grader for every input: a model file that grades batches of decoded pictures.

Whatever the source (an image file, a folder, a labelled test set, export.py's check, a benchmark),
the pictures are decoded first and handed to Grader.grade, which crops them as validation did and
runs one forward pass per batch. That pass returns each picture's grade probabilities and its
out-of-distribution score (the Mahalanobis distance of the features the head reads), so an unusual
picture is flagged without a second pass through the backbone. The model's runtime hides behind
Grader.forward: torch for a .pt (ucgrade.torch_grader, on --device in --precision) or ONNX Runtime
for an .onnx (ucgrade.onnx_grade, no torch). This module itself needs only NumPy and Pillow.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .cli import UserError
from .images import UnreadableImage, load_image, preprocess

BATCH_SIZE = 16
SEPARATORS = "-_ ./"  # where a grade name may be cut into its shared start and the rest
# A grade must match the .onnx and be the same on any CPU: bf16 (where the CPU runs it natively) is faster but
# changed 2 of 127 test grades of a real run, so it is a choice (--precision bf16), never a default.
GRADING_PRECISION = "fp32"
OOD_WARNING = "not like the training images: grade not reliable"


@dataclass
class Grades:
    """What one forward pass says of a batch: probabilities (N x C) and out-of-distribution scores (N, or None
    for a model saved without the training statistics)."""

    probs: np.ndarray
    ood_scores: np.ndarray = None


@dataclass
class Grader:
    """A model ready to grade: its grades, its preprocessing and forward(uint8 N x 3 x S x S) -> Grades."""

    path: Path
    class_names: list
    img_size: int
    resize_size: int
    precision: str
    forward: object
    ood_threshold: float = None  # the distance above which a picture is flagged; None: no check in this model
    runtime: str = "torch"
    extra: dict = field(default_factory=dict)  # the torch model and checkpoint, for Grad-CAM

    def crop(self, picture):
        """The evaluation crop (uint8 3 x S x S) of a decoded RGB picture: a PIL image or an H x W x 3 array."""
        if isinstance(picture, np.ndarray):
            picture = Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8), "RGB")
        return preprocess(picture, self.img_size, self.resize_size)

    def grade_crops(self, crops):
        """Grades of crops already made by crop() (N x 3 x S x S uint8), in batches of BATCH_SIZE."""
        crops = np.ascontiguousarray(crops, dtype=np.uint8)
        parts = [self.forward(crops[i : i + BATCH_SIZE]) for i in range(0, len(crops), BATCH_SIZE)]
        if not parts:
            return Grades(np.zeros((0, len(self.class_names))), None if self.ood_threshold is None else np.zeros(0))
        scores = None if parts[0].ood_scores is None else np.concatenate([p.ood_scores for p in parts])
        probs = np.concatenate([p.probs for p in parts]).astype(np.float64)
        if not np.isfinite(probs).all() or (scores is not None and not np.isfinite(scores).all()):
            what = "probabilities" if not np.isfinite(probs).all() else "out-of-distribution scores"
            raise UserError(
                f"the model '{self.path}' gave {what} that are not numbers (NaN or infinite), so its weights are "
                "damaged; train it again, or export it again from a best.pt that grades well."
            )
        return Grades(probs, scores)

    def grade(self, pictures):
        """Grades of decoded pictures of any size (PIL images or H x W x 3 uint8 arrays), in one call."""
        return self.grade_crops(np.stack([self.crop(p) for p in pictures]))

    def flagged(self, scores):
        """Which scores lie above the model's out-of-distribution threshold (None without one)."""
        return None if scores is None or self.ood_threshold is None else np.asarray(scores) > self.ood_threshold

    @property
    def has_ood(self):
        return self.ood_threshold is not None


def available_cores():
    """The cores this process may run on: its CPU affinity (taskset, a cluster job's share), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def load_grader(path, device="auto", precision=None, threads=None):
    """The Grader of a .pt (torch, on device in precision, GRADING_PRECISION when None) or an .onnx (ONNX Runtime
    on the CPU in the precision it was exported in, no torch).

    threads: the CPU threads of one forward pass (None: one per available core). A runtime that starts one thread
    per core of the machine, on a CPU another job keeps busy, waits for the slowest of them at every layer."""
    path = Path(path)
    threads = min(threads or available_cores(), available_cores())
    if path.suffix.lower() == ".onnx":
        from .onnx_grade import onnx_grader

        return onnx_grader(path, threads)
    try:
        from .torch_grader import torch_grader
    except ImportError as error:  # a grading-only install (requirements-predict.txt) has no torch
        raise UserError(
            f"grading with '{path.name}' needs torch, and {error.name or 'a package'} is not installed here; "
            "install requirements.txt, or grade with an .onnx that 'python export.py RUN_FOLDER' writes."
        ) from None
    return torch_grader(path, device, precision or GRADING_PRECISION, threads)


# Here, without matplotlib, because predict.py's lines name grades as the plots do.
def grade_labels(class_names):
    """(prefix, labels): the start that all grade names share, up to a separator, and the rest of each name.

    ['ulcerative-colitis-grade-0-1', 'ulcerative-colitis-grade-1'] gives ('ulcerative-colitis-grade-', ['0-1', '1']);
    names with no such start in common come back whole, with the prefix ''.
    """
    names = [str(name) for name in class_names]
    prefix = os.path.commonprefix(names)
    prefix = prefix[: max(prefix.rfind(s) for s in SEPARATORS) + 1]
    if len(names) < 2 or prefix in names:
        return "", names
    return prefix, [name[len(prefix) :] for name in names]


# ----------------------------------------------------------------------------- files in batches


def read_crops(paths, img_size, resize_size):
    """(crops of the readable image files (N x 3 x S x S uint8), their positions in paths, [(path, reason)])."""
    crops, kept, unreadable = [], [], []
    for i, path in enumerate(paths):
        try:
            crops.append(preprocess(load_image(path), img_size, resize_size))
        except UnreadableImage as error:
            unreadable.append((path, str(error)))
            continue
        kept.append(i)
    crops = np.stack(crops) if crops else np.zeros((0, 3, img_size, img_size), np.uint8)
    return crops, kept, unreadable


@dataclass
class Batch:
    """One batch of files: the readable ones' grades (one Grades per grader), and the others' reasons."""

    paths: list
    kept: list  # positions in paths of the graded files, in order
    grades: list
    unreadable: list  # (path, reason)


def grade_files(graders, paths, batch_size=BATCH_SIZE):
    """Yield a Batch for each batch_size files of paths, in order, graded by every grader (which share one
    preprocessing). The next batch is decoded in a thread while this one is graded: Pillow's decoding and
    resizing release the GIL, so the two overlap on a CPU with a spare core."""
    first = graders[0]
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as decoder:
        pending = decoder.submit(read_crops, chunks[0], first.img_size, first.resize_size)
        for k, chunk in enumerate(chunks):
            crops, kept, unreadable = pending.result()
            if k + 1 < len(chunks):
                pending = decoder.submit(read_crops, chunks[k + 1], first.img_size, first.resize_size)
            yield Batch(chunk, kept, [grader.grade_crops(crops) for grader in graders], unreadable)
