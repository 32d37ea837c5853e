"""Grade images with a model exported by export.py, through ONNX Runtime: no torch needed.

This module and everything it imports need only onnxruntime, NumPy and Pillow
(requirements-predict.txt), so that a hospital desktop can grade images without a 6 GB torch install.

The ONNX graph takes a batch of uint8 RGB images of shape (batch, 3, img_size, img_size), already
resized and centre-cropped by images.preprocess (the preprocessing of validation and of a .pt), and
returns the probability of each grade: the normalisation and the softmax are inside the graph. The
graph's metadata describes it (see METADATA_KEYS), as a checkpoint describes itself.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cli import UserError
from .grader import Grader, Grades

ONNX_FORMAT = "ucgrade-onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
OOD_OUTPUT_NAME = "ood_score"  # the out-of-distribution score, in a model exported from a calibrated best.pt
# what export.py writes into the ONNX metadata, all as strings (lists as JSON); onnx_export.metadata_for adds
# mean, std and a description of the input and the output
METADATA_KEYS = ("format", "version", "arch", "class_names", "img_size", "resize_size", "checkpoint_sha256")


@dataclass
class OnnxModel:
    """An ONNX Runtime session and the description export.py stored with the graph."""

    path: Path
    session: object  # onnxruntime.InferenceSession
    class_names: list
    img_size: int
    resize_size: int
    metadata: dict = field(default_factory=dict)

    @property
    def precision(self):
        return self.metadata.get("precision", "fp32")


def make_session(model, threads=None):
    """An ONNX Runtime CPU session of a file name or the bytes of a model; threads=None lets it use every core."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its optimiser's notes are not for users
    if threads:
        options.intra_op_num_threads = threads
    model = str(model) if isinstance(model, Path) else model
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def load_onnx_model(path, threads=None):
    """Open an .onnx written by export.py; a file that is not one is one clear sentence."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"ONNX model '{path}' {problem}; write one with 'python export.py RUN_FOLDER'.")
    try:
        session = make_session(path, threads)
    except Exception as error:  # onnxruntime raises its own types for bad protobuf, bad graphs, unknown ops
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserError(
            f"'{path}' is not a readable ONNX model ({reason}); it may be truncated or corrupt, "
            "so copy it again or write it again with 'python export.py RUN_FOLDER'."
        ) from None
    return describe(path, session)


def describe(path, session):
    """The OnnxModel of a session, from the metadata export.py wrote; refuse a graph without it."""
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.get("format") != ONNX_FORMAT:
        raise UserError(
            f"'{path}' is an ONNX model without ucgrade's description (grade names, input size), so its outputs "
            "cannot be named; export the run's best.pt with 'python export.py RUN_FOLDER' and grade with that file."
        )
    try:
        class_names, img_size, resize_size = check_description(metadata, session.get_inputs(), session.get_outputs())
    except (KeyError, ValueError, TypeError) as error:
        problem = f"no {error}" if isinstance(error, KeyError) else str(error)
        raise UserError(
            f"the ucgrade description inside '{path}' is damaged ({problem}); export the model again with "
            "'python export.py RUN_FOLDER'."
        ) from None
    return OnnxModel(Path(path), session, class_names, img_size, resize_size, metadata)


def check_description(metadata, inputs, outputs):
    """(class_names, img_size, resize_size) of the metadata, checked as load_checkpoint checks a .pt's fields and
    against the graph's input and output shapes; a ValueError (or KeyError) names what is wrong. The sizes bound
    the memory of a crop: a crafted img_size of 100000 would ask for gigabytes per image."""
    class_names = json.loads(metadata["class_names"])
    img_size, resize_size = int(metadata["img_size"]), int(metadata["resize_size"])
    if not isinstance(class_names, list) or not all(isinstance(name, str) and name.strip() for name in class_names):
        raise ValueError("class_names is not a list of grade names")
    if len(class_names) < 2 or len(set(class_names)) != len(class_names):
        raise ValueError("class_names must name at least two grades, each once")
    if not 64 <= img_size <= 4096 or not img_size <= resize_size <= 8192:
        raise ValueError(f"img_size {img_size} and resize_size {resize_size} are not from 64 to 4096 px, crop first")
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].type != "tensor(uint8)":
        raise ValueError(f"the graph's input is not one uint8 tensor named '{INPUT_NAME}'")
    if not fits(inputs[0].shape, [None, 3, img_size, img_size]):
        raise ValueError(f"the graph's input {inputs[0].shape} is not (batch, 3, {img_size}, {img_size})")
    names = [o.name for o in outputs]
    per_grade = fits(outputs[0].shape, [None, len(class_names)])
    if names not in ([OUTPUT_NAME], [OUTPUT_NAME, OOD_OUTPUT_NAME]) or not per_grade:
        raise ValueError(f"the graph's output is not '{OUTPUT_NAME}' (batch, {len(class_names)}), one column per grade")
    if len(outputs) > 1 and not fits(outputs[1].shape, [None]):
        raise ValueError(f"the graph's '{OOD_OUTPUT_NAME}' is not one score per image")
    if (OOD_OUTPUT_NAME in names) != ("ood_threshold" in metadata):
        raise ValueError(f"the graph's '{OOD_OUTPUT_NAME}' output and its threshold do not come together")
    if not math.isfinite(float(metadata.get("ood_threshold", 0))):
        raise ValueError(f"ood_threshold {metadata['ood_threshold']} is not a number")
    return class_names, img_size, resize_size


def fits(shape, expected):
    """A graph's shape fits expected where both are known: a named (dynamic) axis or None fits any size."""
    return len(shape) == len(expected) and all(
        not isinstance(have, int) or want is None or have == want for have, want in zip(shape, expected)
    )


def onnx_grader(path, threads=None, session=None):
    """The Grader of an .onnx written by export.py (or of a session of its bytes), run by ONNX Runtime on the CPU."""
    model = describe(path, session) if session is not None else load_onnx_model(path, threads)
    outputs = [o.name for o in model.session.get_outputs()]

    def forward(crops):
        results = model.session.run(outputs, {INPUT_NAME: np.ascontiguousarray(crops, dtype=np.uint8)})
        return Grades(results[0], results[1].astype(np.float64) if len(results) > 1 else None)

    threshold = model.metadata.get("ood_threshold")
    return Grader(
        Path(path),
        model.class_names,
        model.img_size,
        model.resize_size,
        model.precision,
        forward,
        ood_threshold=None if threshold is None else float(threshold),
        runtime="ONNX Runtime on the CPU",
    )
