"""Export a checkpoint to ONNX, check it against the torch model, and quantise it to int8.

The graph (GradingGraph) takes uint8 RGB crops of shape (batch, 3, img_size, img_size), as
images.preprocess makes them, and returns the probability of each grade. uint8 rather than float:
the crops are uint8 already (the training cache, the torch path), a batch is 4x smaller, and the
normalisation then lives in the graph with the constants of the checkpoint, where no caller can get
it wrong. The metadata carries what onnx_grade needs to name the outputs (onnx_grade.METADATA_KEYS).
"""

import contextlib
import io
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import files, grader, onnx_grade
from .cli import UserError
from .presets import IMAGENET_MEAN, IMAGENET_STD, resize_size_for

OPSET = 17
# fp32 ONNX Runtime against fp32 torch: the same arithmetic in another order (the export folds batch
# norm into the convolutions, and the kernels differ), which moves a probability by about 1e-6.
# predict.py prints probabilities to 3 decimals, so a difference below 0.001 changes a printed figure
# by at most one in its last digit, and can change a grade only where the two best grades are within
# 0.002 of each other; a mistake in the graph (normalisation, channel order, softmax) moves
# probabilities by 0.01 to 1.
FP32_TOLERANCE = 1e-3
CALIBRATION_IMAGES = 200
QUANTISATION = (
    "ONNX Runtime static quantisation: QDQ, per-channel int8 weights (7-bit range), uint8 activations, MinMax"
)
BATCH_SIZE = 16


# ----------------------------------------------------------------------------- the run's images


def split_images(checkpoint_path, checkpoint, data_dir=None):
    """(training, validation) lists of (image path, grade index) of the checkpoint's run, from its split.csv.

    A fold of a cross-validation run validated on the images of its fold and trained on the others.
    """
    checkpoint_path = Path(checkpoint_path)
    config = checkpoint.get("config") or {}
    fold = config.get("fold")
    split_path = (checkpoint_path.parent.parent if fold else checkpoint_path.parent) / "split.csv"
    if not split_path.is_file():
        raise UserError(
            f"there is no split.csv beside '{checkpoint_path}' (or its cross-validation run), so its validation "
            "images are unknown; export the best.pt inside the run folder that qq.py wrote."
        )
    root = data_dir or config.get("data")
    if not root or not Path(root).is_dir():
        raise UserError(
            f"the run's images are not in '{root}'; pass --data with the folder that holds them, so that the "
            "exported model can be checked on them."
        )
    root = Path(root)
    class_names = checkpoint["class_names"]
    train, val = [], []
    for row in files.read_csv(split_path):
        if row["class"] not in class_names:
            raise UserError(
                f"'{split_path}' names the grade '{row['class']}', which the checkpoint does not have; "
                "the run folder was changed, so export from an unchanged run."
            )
        is_val = int(row["fold"]) == fold if fold else row["subset"] == "val"
        (val if is_val else train).append((root / row["path"], class_names.index(row["class"])))
    return train, val


@dataclass
class Crops:
    """Images preprocessed once, for every model that grades them: uint8 (N, 3, S, S), grade indices, paths."""

    crops: np.ndarray
    labels: np.ndarray
    paths: list


def read_crops(items, img_size, resize_size):
    """(Crops of the readable images among (path, grade index) items, [(path, reason) of the unreadable ones])."""
    crops, kept, unreadable = grader.read_crops([path for path, _ in items], img_size, resize_size)
    labels = np.array([items[i][1] for i in kept], int)
    return Crops(crops, labels, [items[i][0] for i in kept]), unreadable


def calibration_sample(items, limit=CALIBRATION_IMAGES, seed=0):
    """Up to limit training images, drawn at random (seeded): each grade about as often as in training."""
    order = np.random.default_rng(seed).permutation(len(items))[:limit]
    return [items[i] for i in sorted(order)]


# ----------------------------------------------------------------------------- the graph


def metadata_for(checkpoint, checkpoint_sha256, precision, **extra):
    """The ONNX metadata: everything onnx_grade needs, as strings."""
    img_size = int(checkpoint["img_size"])
    metadata = {
        "format": onnx_grade.ONNX_FORMAT,
        "version": "1",
        "arch": str(checkpoint.get("arch")),
        "class_names": json.dumps(list(checkpoint["class_names"])),
        "img_size": str(img_size),
        "resize_size": str(int(checkpoint.get("resize_size") or resize_size_for(img_size))),
        "mean": json.dumps(list(checkpoint.get("mean", IMAGENET_MEAN))),
        "std": json.dumps(list(checkpoint.get("std", IMAGENET_STD))),
        "checkpoint_sha256": checkpoint_sha256,
        "precision": precision,
        "input": f"{onnx_grade.INPUT_NAME}: uint8 RGB (batch, 3, {img_size}, {img_size}), resized and centre-cropped",
        "output": f"{onnx_grade.OUTPUT_NAME}: float32 (batch, grades), softmax, in the order of class_names",
    }
    if checkpoint.get("ood"):  # the graph's second output, and the distance above which an image is flagged
        metadata["ood_threshold"] = repr(float(checkpoint["ood"]["threshold"]))
        metadata["output"] += (
            f"; {onnx_grade.OOD_OUTPUT_NAME}: float32 (batch,), the distance to the training images' features "
            "(above ood_threshold: not like the training images)"
        )
    return metadata | {key: str(value) for key, value in extra.items()}


def with_metadata(model_bytes, metadata):
    """The model with its metadata set, checked by onnx.checker: its bytes."""
    import onnx

    proto = onnx.load_from_string(model_bytes)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def export_onnx(model, checkpoint, metadata):
    """The bytes of an fp32 ONNX model of GradingModel(model), the torch grader's computation, with a dynamic batch
    axis, checked by onnx.checker."""
    import torch  # here, so that export.py on a grading-only install is one sentence (cli.run_cli), not a traceback

    from .torch_grader import GradingModel

    graph = GradingModel(model, checkpoint).eval()
    outputs = output_names(checkpoint)
    img_size = int(checkpoint["img_size"])
    example = torch.zeros(1, 3, img_size, img_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) is deprecated, but it needs no extra package
        # (the dynamo exporter needs onnxscript) and exports a ResNet50 in ~2 s instead of ~8 s.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            buffer,
            dynamo=False,
            input_names=[onnx_grade.INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [onnx_grade.INPUT_NAME, *outputs]},
            opset_version=OPSET,
        )
    return with_metadata(buffer.getvalue(), metadata)


def output_names(checkpoint):
    """The graph's outputs: the probabilities, and the out-of-distribution score of a calibrated checkpoint."""
    return [onnx_grade.OUTPUT_NAME] + ([onnx_grade.OOD_OUTPUT_NAME] if checkpoint.get("ood") else [])


# ----------------------------------------------------------------------------- int8


def quantize_int8(model_bytes, calibration_crops, metadata):
    """ONNX Runtime's static quantisation of an fp32 model: its bytes.

    QDQ format, per-channel int8 weights and uint8 activations, with ranges (MinMax) calibrated on
    calibration_crops. reduce_range (7-bit weights) because the model must run on AVX2 CPUs without
    VNNI, where 8-bit weights can saturate the int16 sums of the int8 kernels (ONNX Runtime's advice
    for such CPUs); per-channel weights win back most of the lost precision. The last layer (Gemm, a
    thousandth of the work) and the softmax stay fp32, so that the logits and the probabilities are not
    rounded to 256 steps; so does the out-of-distribution head (GradingModel.ood), whose distances are
    compared with a threshold calibrated in fp32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = batches(calibration_crops)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {onnx_grade.INPUT_NAME: batch}

    # ONNX Runtime's own temporary files (pre.quant.*, ort.quant.*) go into this folder too, so that an export
    # stopped by SIGTERM (export.py turns it into an exception) leaves nothing in TMPDIR
    with tempfile.TemporaryDirectory(prefix="ucgrade-int8-") as folder, temporary_files_in(folder):
        fp32, prepared, int8 = (Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(model_bytes)
        quant_pre_process(str(fp32), str(prepared))  # shape inference and graph optimisation (batch norm folded)
        fp32_nodes = [
            node.name
            for node in onnx.load(str(prepared)).graph.node
            if node.op_type in ("Gemm", "Softmax") or node.name.startswith("/ood/")
        ]
        quantize_static(
            str(prepared),
            str(int8),
            Calibration(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=fp32_nodes,
        )
        return with_metadata(int8.read_bytes(), metadata)


@contextlib.contextmanager
def temporary_files_in(folder):
    """Every tempfile made meanwhile (by this process) lands in folder."""
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


# ----------------------------------------------------------------------------- checking


def batches(crops, batch_size=BATCH_SIZE):
    """A non-empty (N, 3, S, S) array in consecutive batches of at most batch_size."""
    return iter([crops[i : i + batch_size] for i in range(0, len(crops), batch_size)])


def agreement(reference, other, paths, threshold=None):
    """How far two Grades of the same images (paths) agree: top-1, the largest probability difference and, where
    both have out-of-distribution scores, how many images both flag alike (at threshold) and the largest relative
    difference of the scores."""
    same = int((reference.probs.argmax(1) == other.probs.argmax(1)).sum())
    differences = np.abs(reference.probs - other.probs).max(1)
    figures = {
        "images": int(len(reference.probs)),
        "top1_same": same,
        "top1_agreement": same / len(reference.probs),
        "max_probability_difference": float(differences.max()),
        "largest_difference_image": str(paths[int(differences.argmax())]),
    }
    if threshold is None or reference.ood_scores is None or other.ood_scores is None:
        return figures
    relative = np.abs(reference.ood_scores - other.ood_scores) / np.maximum(np.abs(reference.ood_scores), 1e-12)
    flags_same = int(((reference.ood_scores > threshold) == (other.ood_scores > threshold)).sum())
    return figures | {"ood_flags_same": flags_same, "max_ood_score_relative_difference": float(relative.max())}


def grade_metrics(labels, probs, class_names):
    """Accuracy and QWK, as metrics.json computes them."""
    from .metrics import compute_metrics

    result = compute_metrics(labels, probs, class_names)
    return {"accuracy": result["accuracy"], "qwk": result["qwk"]}
