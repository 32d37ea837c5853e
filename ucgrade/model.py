"""Model: the table of backbones, building one, its ImageNet weights, and self-describing checkpoints."""

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import pickle
import re
import threading
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from . import files
from .cli import ARCHITECTURE_NAMES, DEFAULT_ARCH, UserError
from .presets import IMAGENET_MEAN, IMAGENET_STD, resize_size_for
from .progress import progress

CHECKPOINT_FORMAT = "ucgrade-checkpoint"
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Architecture:
    """How to fine-tune one torchvision classifier.

    weights: its ImageNet weights, a torchvision weight enum (which gives the URL and the torch hub
    cache file name); head: the path of the Linear layer that is replaced by one for the grades;
    cam_layer: the module whose output Grad-CAM explains (the last convolutional stage).
    """

    weights: str
    head: str
    cam_layer: str


# Adding a torchvision classifier is one row. IMAGENET1K_V1 are the weights of the original recipe
# (torchvision's pretrained=True), made for a Resize(256) + CenterCrop(224) evaluation transform.
ARCHITECTURES = {
    "resnet18": Architecture("ResNet18_Weights.IMAGENET1K_V1", head="fc", cam_layer="layer4"),
    "resnet34": Architecture("ResNet34_Weights.IMAGENET1K_V1", head="fc", cam_layer="layer4"),
    "resnet50": Architecture("ResNet50_Weights.IMAGENET1K_V1", head="fc", cam_layer="layer4"),
    "resnet101": Architecture("ResNet101_Weights.IMAGENET1K_V1", head="fc", cam_layer="layer4"),
    "efficientnet_b0": Architecture("EfficientNet_B0_Weights.IMAGENET1K_V1", head="classifier.1", cam_layer="features"),
    "convnext_tiny": Architecture("ConvNeXt_Tiny_Weights.IMAGENET1K_V1", head="classifier.2", cam_layer="features"),
}
assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES, "qq.py's --arch choices (cli.py) must name these rows"


def _set_submodule(model, path, module):
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def build_model(num_classes, imagenet_state_dict=None, arch=DEFAULT_ARCH):
    """A torchvision classifier with its head replaced by a Linear layer for num_classes; every layer trains.

    The model carries its architecture's name (model.arch), so that Grad-CAM and the frozen backbone
    find their layers.
    """
    model = torchvision.models.get_model(arch)
    if imagenet_state_dict is not None:
        model.load_state_dict(imagenet_state_dict)
    head = ARCHITECTURES[arch].head
    _set_submodule(model, head, nn.Linear(model.get_submodule(head).in_features, num_classes))
    model.arch = arch
    return model


def head(model):
    """The Linear layer that grades: the only layer --freeze-backbone trains."""
    return model.get_submodule(ARCHITECTURES[model.arch].head)


def backbone(model):
    """A copy of the model without its head: it maps an image to the features the head reads."""
    features = copy.deepcopy(model)
    _set_submodule(features, ARCHITECTURES[model.arch].head, nn.Identity())
    return features


@contextlib.contextmanager
def head_inputs(model):
    """Collect, in a list, what the head reads (the pooled backbone features) in the forward passes inside the
    block: the features of the grading pass itself, so that the out-of-distribution check needs no second pass."""
    captured = []
    module = head(unwrap(getattr(model, "module", model)))  # a DistributedDataParallel's or a compiled model's
    handle = module.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0]))
    try:
        yield captured
    finally:
        handle.remove()


def cam_layer(model):
    """The layer whose activations Grad-CAM weighs: the last convolutional stage."""
    return model.get_submodule(ARCHITECTURES[model.arch].cam_layer)


def unwrap(model):
    """The plain module under a torch.compile wrapper, so saved keys have no '_orig_mod.' prefix."""
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------- ImageNet weights


def imagenet_url(arch=DEFAULT_ARCH):
    return torchvision.models.get_weight(ARCHITECTURES[arch].weights).url


def imagenet_weights_path(arch=DEFAULT_ARCH):
    """Where torch hub keeps (and looks for) the downloaded weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(imagenet_url(arch)).path)


def _fetch(url, destination, timeout, answered, result):
    """Download url into destination (via a temporary file), checking the hash in its name."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # the timeout also bounds every read
            answered.set()
            total = int(response.headers.get("Content-Length") or 0)
            digest = hashlib.sha256()
            partial = destination.with_name(destination.name + ".partial")
            with (
                open(partial, "wb") as f,
                progress(desc=f"downloading {destination.name}", unit="B", total=total or None) as bar,
            ):
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        expected = re.search(r"-([a-f0-9]{6,})\.", destination.name)
        if expected and not digest.hexdigest().startswith(expected.group(1)):
            partial.unlink(missing_ok=True)
            result["error"] = "the downloaded file is damaged (its SHA-256 does not match)"
            return
        partial.replace(destination)
    except Exception as error:  # DNS, refused, proxy, HTTP and timeout errors all mean: not available
        result["error"] = str(error) or type(error).__name__
    finally:
        answered.set()


def _download(url, destination, timeout):
    """Download the weights into the hub cache; return None, or why they are not available.

    The server must answer within timeout seconds. The request runs in a thread, because a DNS
    lookup or a silent proxy can hang far longer than any socket timeout; once the server has
    answered, a large file may take as long as it needs, but a stalled read still fails.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    answered, result = threading.Event(), {}
    thread = threading.Thread(target=_fetch, args=(url, destination, timeout, answered, result), daemon=True)
    thread.start()
    if not answered.wait(timeout + 1):  # usually the socket timeout inside fires first; this catches DNS hangs
        return f"no answer from {urlparse(url).hostname} within {timeout:.0f} s"
    thread.join()
    return f"download from {url} failed ({result['error']})" if "error" in result else None


def offline_hint(arch):
    return (
        f"to use them offline, download {imagenet_url(arch)} on a machine with internet and copy it to "
        f"{imagenet_weights_path(arch)} (or set TORCH_HOME), or pass --weights FILE"
    )


def load_imagenet_file(path, arch=DEFAULT_ARCH):
    """Load an ImageNet state_dict of the architecture from a local file, checking that it is one."""
    path, wanted = Path(path), f"an ImageNet {arch} state_dict"
    if not path.is_file():
        raise UserError(f"--weights file '{path}' does not exist; give the path of {wanted} (.pth).")
    state = load_weights_only(path, what="--weights file", arch=arch)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        raise UserError(
            f"--weights '{path}' is a checkpoint of this tool, not ImageNet weights; grade images with it "
            "using predict.py --weights, or continue its run with --resume."
        )
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(
            f"--weights '{path}' does not hold a state_dict of tensors; give {wanted} such as torchvision's "
            f"{imagenet_weights_path(arch).name}."
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        torchvision.models.get_model(arch).load_state_dict(state)
    except RuntimeError as error:
        raise UserError(
            f"--weights '{path}' is not {wanted} ({short_error(error)}); give torchvision's "
            f"{imagenet_weights_path(arch).name} or an equivalent file, or the --arch it was made for."
        ) from None
    return state


def get_imagenet_weights(pretrained="auto", weights_file=None, arch=DEFAULT_ARCH, timeout=CONNECT_TIMEOUT_S):
    """Return (state_dict or None, source). pretrained: auto | yes | no.

    A local --weights file wins. Otherwise the torch hub cache is used, downloading into it when
    needed. With auto, weights that cannot be had give a warning and None (random initialisation);
    with yes they stop the run.
    """
    if weights_file:
        return load_imagenet_file(weights_file, arch), str(weights_file)
    if pretrained == "no":
        return None, "none (random initialisation, --pretrained no)"
    url, path = imagenet_url(arch), imagenet_weights_path(arch)
    error = None if path.is_file() else _download(url, path, timeout)
    if error is None:
        try:
            return load_imagenet_file(path, arch), str(path)
        except UserError as bad_file:
            error = f"the cached file is unusable: {bad_file}"
    message = f"the ImageNet weights for {arch} are not available: {error}; {offline_hint(arch)}"
    if pretrained == "yes":
        raise UserError(message[0].upper() + message[1:] + ".")
    print(
        f"warning: {message}.\nwarning: training continues from random weights, which needs far more data and "
        "epochs to do well.",
        flush=True,
    )
    return None, "none (ImageNet weights unavailable, random initialisation)"


# ----------------------------------------------------------------------------- checkpoints


def make_checkpoint(model, config, epoch, val_metrics, **extra):
    """A self-describing checkpoint of the model, for a run with config (its config.json).

    Plain tensors and simple types only, so that torch.load(weights_only=True) reads it.
    """
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "arch": unwrap(model).arch,
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "class_names": list(config["class_names"]),
        "num_classes": len(config["class_names"]),
        "img_size": int(config["img_size"]),
        "resize_size": resize_size_for(config["img_size"]),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "epoch": int(epoch),
        "val_metrics": _plain(val_metrics),
        "pretrained": bool(config.get("pretrained_used")),
        "config": _plain(config),
    }
    checkpoint.update(extra)
    return checkpoint


def _plain(obj):
    """Only JSON types (a str subclass such as torch.__version__ would need pickle's trust)."""
    return json.loads(json.dumps(obj))


def save_checkpoint(path, checkpoint):
    files.save_torch(path, checkpoint)


# What torch.save writes into its zip archive, under one folder named after the file: never compressed.
TORCH_ENTRY = re.compile(
    r"[^/]+/(data\.pkl|byteorder|version|\.format_version|\.storage_alignment|\.data/version|"
    r"\.data/serialization_id|data/\d+)"
)


@functools.cache
def state_bytes(arch):
    """Bytes of the weights and buffers of an ImageNet model of arch, counted without allocating them."""
    with torch.device("meta"):
        model = torchvision.models.get_model(arch)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def archive_limit(arch=None):
    """The most a file of arch may unpack to: 4 times a last.pt (weights, the optimiser's momentum of the same size,
    small records); for an unknown architecture, that of the largest in the table."""
    return 4 * 2 * max(state_bytes(a) for a in ([arch] if arch in ARCHITECTURES else ARCHITECTURES))


def check_archive(path, what, arch=None):
    """Refuse a zip bomb from the zip directory alone, before torch.load inflates anything: a PyTorch file that
    unpacks to more than archive_limit(arch), or holds entries that torch.save does not write (compressed ones)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (an old PyTorch format, a text file): torch.load names the problem
    total, limit = sum(entry.file_size for entry in entries), archive_limit(arch)
    if total > limit:
        raise UserError(
            f"{what} '{path}' would unpack to {total / 1e9:.1f} GB, more than the {limit / 1e9:.1f} GB that a "
            f"checkpoint of {arch or 'any architecture this tool knows'} can need, so it was not loaded (a zip "
            "bomb, or not a model of this tool); use a file written by this tool or by torch.save."
        )
    odd = [
        e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED or not TORCH_ENTRY.fullmatch(e.filename)
    ]
    if odd:
        raise UserError(
            f"{what} '{path}' holds entries that torch.save does not write ({', '.join(odd[:3])}"
            f"{', ...' if len(odd) > 3 else ''}: compressed, or unexpected names), so it was not loaded; use a "
            "file written by this tool or by torch.save."
        )


def load_weights_only(path, what="checkpoint", arch=None):
    """torch.load with weights_only=True, so a crafted file cannot run code; clear errors otherwise.
    arch, where known, bounds the size the file may unpack to (check_archive)."""
    check_archive(path, what, arch)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the class or function a file asks to import ("Unsupported global", "not an
        # allowed global"); any other unpickling error means the bytes are not a PyTorch file.
        if "global" in str(error).lower():
            raise UserError(
                f"{what} '{path}' holds Python objects other than tensors and plain values, so it was not loaded "
                "(it could run code); use a file written by this tool or by torch.save of a state_dict."
            ) from None
        problem = "its bytes are not what torch.save writes"
    except Exception as error:  # a truncated zip, an empty or a text file: torch.load raises many types
        problem = (
            short_error(error, 100) if isinstance(error, RuntimeError) else "its bytes are not what torch.save writes"
        )
    raise UserError(
        f"{what} '{path}' is not a readable PyTorch file; it may be truncated or corrupt ({problem}), so copy it "
        "again or use another file."
    )


def short_error(error, limit=160):
    """The telling line of an exception message (the second for load_state_dict), cut to one short line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return ""
    text = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict") else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(path):
    """Read a checkpoint written by qq.py (best.pt or last.pt) and check that it is one."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise UserError(
            f"checkpoint '{path}' {problem}; pass --weights with a best.pt from a run folder under outputs/."
        )
    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        if isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            raise UserError(
                f"'{path}' holds a bare state_dict without class names or preprocessing; use best.pt or last.pt "
                "from a run folder written by qq.py."
            )
        raise UserError(f"'{path}' is not a checkpoint written by qq.py; use best.pt or last.pt from a run folder.")
    if checkpoint.get("arch") not in ARCHITECTURES:
        raise UserError(
            f"checkpoint '{path}' is for the architecture {checkpoint.get('arch')!r}, which this tool does not "
            f"know ({', '.join(ARCHITECTURES)}); use a checkpoint written by qq.py."
        )
    missing = [key for key in ("model", "class_names", "num_classes", "img_size") if key not in checkpoint]
    if (
        missing
        or not isinstance(checkpoint["class_names"], list)
        or len(checkpoint["class_names"]) != checkpoint["num_classes"]
    ):
        raise UserError(
            f"checkpoint '{path}' is incomplete "
            f"({'no ' + ', '.join(missing) if missing else 'its class names do not match its class count'}); the "
            "file is damaged or was edited, so use another best.pt or last.pt."
        )
    problems = checkpoint_problems(checkpoint)
    if problems:
        raise UserError(
            f"checkpoint '{path}' was damaged or edited: " + "; ".join(problems) + ". Use another best.pt or last.pt."
        )
    return checkpoint


def _whole(value, low, high=None):
    """An int (not a bool) from low to high."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def _numbers(value, count):
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def checkpoint_problems(checkpoint):
    """What is wrong with the fields of a checkpoint, one phrase each: their types, ranges and shapes."""
    names, problems = checkpoint["class_names"], []
    if not all(isinstance(name, str) and name for name in names):
        problems.append("class_names must be a list of non-empty texts")
    elif len(set(names)) != len(names):
        problems.append("class_names lists a class twice")
    if not _whole(checkpoint["num_classes"], 2):
        problems.append(f"num_classes must be a whole number of at least 2 (it is {checkpoint['num_classes']!r})")
    if not _whole(checkpoint["img_size"], 64, 4096):
        problems.append(f"img_size must be a whole number from 64 to 4096 pixels (it is {checkpoint['img_size']!r})")
    resize = checkpoint.get("resize_size")
    img_size = checkpoint["img_size"] if _whole(checkpoint["img_size"], 64, 4096) else 64  # named above if wrong
    if resize is not None and not _whole(resize, img_size, 8192):
        problems.append(f"resize_size must be a whole number of pixels, at least img_size (it is {resize!r})")
    for key in ("mean", "std"):
        if key in checkpoint and not _numbers(checkpoint[key], 3):
            problems.append(f"{key} must be a list of three numbers (it is {checkpoint[key]!r})")
    if _numbers(checkpoint.get("std"), 3) and min(checkpoint["std"]) <= 0:
        problems.append(f"std must be positive (it is {checkpoint['std']!r})")
    model = checkpoint["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        problems.append("model must map layer names to tensors")
    elif "optimizer" in checkpoint and not problems:
        problems += optimizer_problems(checkpoint["optimizer"], checkpoint["arch"], checkpoint["num_classes"])
    if checkpoint.get("ood") is not None and not problems:
        problems += ood_problems(checkpoint["ood"], checkpoint["arch"])
    return problems


def ood_problems(stats, arch):
    """The out-of-distribution statistics of a best.pt (ood.fit) must be finite tensors that fit the features the
    arch's head reads, with a finite positive threshold: a NaN threshold would turn the check off without a word."""
    if not isinstance(stats, dict):
        return ["its ood block must map names to values"]
    mean, precision, threshold = stats.get("mean"), stats.get("precision"), stats.get("threshold")
    with torch.device("meta"):
        features = head(build_model(2, arch=arch)).in_features
    if not torch.is_tensor(mean) or mean.dim() != 1 or len(mean) != features:
        return [f"its ood mean must be a tensor of {features} feature values"]
    if not torch.is_tensor(precision) or tuple(precision.shape) != (len(mean), len(mean)):
        return [f"its ood precision must be a {len(mean)} x {len(mean)} tensor"]
    if not (torch.isfinite(mean).all() and torch.isfinite(precision).all()):
        return ["its ood statistics hold values that are not numbers (NaN or infinite)"]
    if not _numbers([threshold], 1) or threshold <= 0:
        return [f"its ood threshold must be a positive number (it is {threshold!r})"]
    return []


def optimizer_problems(state, arch, num_classes):
    """The optimiser state of a last.pt must fit the model's parameters (all of them, or the head's alone with
    --freeze-backbone): a wrong shape would fail only at the first step of the resumed run."""
    try:
        with torch.device("meta"):
            shapes = [tuple(p.shape) for p in build_model(num_classes, arch=arch).parameters()]
        indices = [i for group in state["param_groups"] for i in group["params"]]
        expected = dict(zip(indices, shapes if len(indices) == len(shapes) else shapes[-len(indices) :]))
        wrong = [
            i
            for i, entry in state["state"].items()
            if i not in expected
            or any(torch.is_tensor(v) and v.dim() and tuple(v.shape) != expected[i] for v in entry.values())
        ]
    except (KeyError, TypeError, AttributeError, ValueError):
        return ["its optimizer state is not that of torch.optim"]
    if wrong:
        return [f"its optimizer state does not fit the {arch} model (parameter {wrong[0]} has another shape)"]
    return []


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """Rebuild the fine-tuned model of the checkpoint's architecture; its weights must fit it and its classes."""
    arch, num_classes = checkpoint["arch"], checkpoint["num_classes"]
    model = build_model(num_classes, arch=arch)
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        raise UserError(
            f"the weights in '{path}' do not fit a {arch} with {num_classes} classes ({short_error(error)}); "
            "the file is damaged or was edited."
        ) from None
    # channels_last, as in training: the inputs are channels_last, and a model in the default layout
    # has its weights converted at every call (about 1.1x slower at batch 1 on a CPU: BENCHMARKS.md)
    return model.to(memory_format=torch.channels_last)
