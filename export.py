"""Export a model trained by qq.py to ONNX, to grade images on any CPU without torch.

    python export.py outputs/train                    # writes outputs/train/model.onnx
    python export.py outputs/train --int8             # also model.int8.onnx, calibrated on 200 training images
    python export.py outputs/cv --fold 2 --int8       # one fold of a cross-validation run
    python export.py outputs/train/best.pt --out grader.onnx
    python predict.py image.jpg --weights outputs/train/model.onnx   # then grade, torch not needed

The graph takes a batch of uint8 RGB images (batch, 3, size, size), resized and centre-cropped as in
validation, and returns the probability of each grade (the normalisation and the softmax are in the
graph). Its metadata names the grades in order, the input and resize sizes, the architecture and the
SHA-256 of the checkpoint it came from.

Before writing, the ONNX model (ONNX Runtime, fp32) and the torch model (fp32) grade the run's
validation images; the export is refused if a probability differs by more than 0.001. --int8 adds
ONNX Runtime's static quantisation (QDQ, per-channel weights), calibrated on up to 200 of the run's
training images, and reports its agreement with fp32 and the accuracy and QWK of both. The figures
go into export.json beside the model.
"""

import argparse
import sys
import time
from pathlib import Path

# torch-free imports only: torch loads in main, so that a grading-only install gets one sentence (cli.run_cli)
from ucgrade import files, interrupt, onnx_export, onnx_grade
from ucgrade.cli import ArgumentParser, UserError, main_entry
from ucgrade.locate import models_in

INT8_AGREEMENT_TARGET = 0.98  # issue 11: the int8 model agrees with fp32 on at least 98% of validation images


def get_args_parser():
    parser = ArgumentParser(
        description="Export a model trained by qq.py to ONNX (and int8), checked against the torch model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run", metavar="RUN_OR_CHECKPOINT", help="a run folder written by qq.py (its best.pt), or a .pt"
    )
    parser.add_argument(
        "--out", default=None, metavar="FILE", help="the .onnx to write (default: model.onnx beside the checkpoint)"
    )
    parser.add_argument(
        "--fold",
        type=int,
        default=None,
        metavar="K",
        help="the fold to export from a cross-validation run, which has one model per fold (default: none)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write an int8 model (<out>.int8.onnx), calibrated on the run's training images (default: off)",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        metavar="N",
        default=onnx_export.CALIBRATION_IMAGES,
        help="training images that calibrate the int8 model, at most (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="the run's image folder, if it moved (default: the one recorded in the run)",
    )
    return parser


def find_checkpoint(run, fold):
    """The checkpoint to export: a .pt, a run folder's best.pt, or one fold's best.pt of a cross-validation run."""
    path = Path(run)
    if not path.exists():
        raise UserError(f"'{path}' does not exist; give a run folder written by qq.py or its best.pt.")
    if path.suffix == ".onnx":
        raise UserError(f"'{path}' is an ONNX model already; give the run folder or the best.pt it came from.")
    return models_in(path, "refuse" if fold is None else fold, flag=None)[0]


def output_paths(checkpoint_path, out, int8=False):
    """(fp32 .onnx, int8 .onnx, export.json)."""
    path = Path(out) if out else checkpoint_path.parent / "model.onnx"
    if path.suffix != ".onnx":
        raise UserError(f"--out '{path}' must name an .onnx file, such as model.onnx.")
    if int8 and path.name.lower().endswith(".int8.onnx"):
        raise UserError(
            f"--out '{path}' names the fp32 model, and --int8 writes the int8 one beside it with .int8.onnx added; "
            f"give --out {path.with_name(path.name[: -len('.int8.onnx')] + '.onnx')}."
        )
    if path.is_dir():
        raise UserError(f"--out '{path}' is a folder; give the name of the .onnx file to write.")
    files.check_folder_path(path.parent, "--out")
    return path, path.with_suffix(".int8.onnx"), path.parent / "export.json"


def percent(share):
    return f"{share:.1%}"


def read_validation_images(val_items, img_size, resize_size):
    val, unreadable = onnx_export.read_crops(val_items, img_size, resize_size)
    for path, reason in unreadable:
        print(f"note: validation image {path} left out: {reason}", file=sys.stderr)
    if not len(val.crops):
        raise UserError(
            f"none of the run's {len(val_items)} validation images could be read, so the export cannot be checked; "
            "pass --data with the folder that holds the run's images."
        )
    return val


def export_fp32(reference, metadata, val, out):
    """Export, grade the validation images with ONNX Runtime and with the torch grader (reference, fp32 on the
    CPU), and write the model if they agree. Returns (model bytes, ONNX Grades, figures)."""
    start = time.perf_counter()
    checkpoint = reference.extra["checkpoint"]
    model_bytes = onnx_export.export_onnx(reference.extra["model"], checkpoint, metadata)
    grades = onnx_grade.onnx_grader(out, session=onnx_grade.make_session(model_bytes)).grade_crops(val.crops)
    check = onnx_export.agreement(reference.grade_crops(val.crops), grades, val.paths, reference.ood_threshold)
    probs = grades.probs
    print(
        f"ONNX Runtime fp32 against torch fp32 on {check['images']} validation images: top-1 agreement "
        f"{percent(check['top1_agreement'])} ({check['top1_same']}/{check['images']}), largest probability "
        f"difference {check['max_probability_difference']:.2g} (tolerance {onnx_export.FP32_TOLERANCE:g})",
        flush=True,
    )
    if check["max_probability_difference"] > onnx_export.FP32_TOLERANCE:
        raise UserError(
            f"the ONNX model's probabilities differ from the torch model's by "
            f"{check['max_probability_difference']:.3g} on {check['largest_difference_image']}, more than the "
            f"tolerance of {onnx_export.FP32_TOLERANCE:g}, so {out} was not written; this is a bug in the export, "
            "so please report it with your torch and onnxruntime versions."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(out, model_bytes)
    print(
        f"wrote {out} ({len(model_bytes) / 2**20:.1f} MB, opset {onnx_export.OPSET}, checked by onnx.checker) in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    figures = {"path": str(out), "mb": round(len(model_bytes) / 2**20, 1), "against_torch_fp32": check}
    figures |= {"tolerance": onnx_export.FP32_TOLERANCE}
    return model_bytes, grades, figures | onnx_export.grade_metrics(val.labels, probs, checkpoint["class_names"])


def export_int8(model_bytes, fp32, metadata, train_items, val, out, limit, class_names):
    """Quantise on up to limit training images, compare with fp32 on the validation images, and write it."""
    sample = onnx_export.calibration_sample(train_items, limit)
    calibration, unreadable = onnx_export.read_crops(sample, int(metadata["img_size"]), int(metadata["resize_size"]))
    if unreadable:
        print(f"note: {len(unreadable)} training image(s) could not be read for the calibration", file=sys.stderr)
    if not len(calibration.crops):
        raise UserError("none of the run's training images could be read to calibrate the int8 model; pass --data.")
    print(f"int8: calibrating on {len(calibration.crops)} training images ...", flush=True)
    start = time.perf_counter()
    metadata = metadata | {"precision": "int8", "calibration_images": str(len(calibration.crops))}
    int8_bytes = onnx_export.quantize_int8(model_bytes, calibration.crops, metadata)
    int8 = onnx_grade.onnx_grader(out, session=onnx_grade.make_session(int8_bytes))
    grades = int8.grade_crops(val.crops)
    check = onnx_export.agreement(fp32, grades, val.paths, int8.ood_threshold)
    probs = grades.probs
    files.write_bytes(out, int8_bytes)
    print(f"wrote {out} ({len(int8_bytes) / 2**20:.1f} MB) in {time.perf_counter() - start:.1f} s", flush=True)
    print(
        f"int8 against fp32 on {check['images']} validation images: top-1 agreement {percent(check['top1_agreement'])} "
        f"({check['top1_same']}/{check['images']}), largest probability difference "
        f"{check['max_probability_difference']:.2g}",
        flush=True,
    )
    if check["top1_agreement"] < INT8_AGREEMENT_TARGET:
        print(
            f"warning: the int8 model grades {percent(1 - check['top1_agreement'])} of the validation images "
            f"differently from fp32 (the target is at most {percent(1 - INT8_AGREEMENT_TARGET)}); grade with the "
            "fp32 model where that matters.",
            file=sys.stderr,
        )
    figures = {
        "path": str(out),
        "mb": round(len(int8_bytes) / 2**20, 1),
        "calibration_images": len(calibration.crops),
        "quantisation": onnx_export.QUANTISATION,
        "against_fp32": check,
    }
    return figures | onnx_export.grade_metrics(val.labels, probs, class_names)


def earlier_int8(out, out_int8, out_json, sha256):
    """Without --int8, an int8 model already beside the new one: {"int8": its figures} when export.json says it came
    from this same checkpoint, so that export.json describes every model in the folder; otherwise it would not match
    the new fp32 model, so it is removed, and said."""
    if not out_int8.exists():
        return {}
    try:
        earlier = files.read_json(out_json) if out_json.is_file() else {}
    except (OSError, ValueError):
        earlier = {}
    if earlier.get("checkpoint_sha256") == sha256 and "int8" in earlier:
        print(f"kept {out_int8} and its figures: it was exported from this same checkpoint", flush=True)
        return {"int8": earlier["int8"]}
    out_int8.unlink()
    print(
        f"note: removed {out_int8}, which was not exported from this checkpoint, so it would not match the new "
        f"{out.name}; pass --int8 for an int8 model of this one.",
        file=sys.stderr,
    )
    return {}


def main(args):
    if args.calibration_images < 1:
        raise UserError("--calibration-images must be at least 1.")
    checkpoint_path = find_checkpoint(args.run, args.fold)
    out, out_int8, out_json = output_paths(checkpoint_path, args.out, args.int8)
    from ucgrade.torch_grader import torch_grader  # torch first: what a grading-only install lacks first

    reference = torch_grader(checkpoint_path, "cpu", "fp32")  # what the export must agree with
    from ucgrade.metrics import fmt

    checkpoint = reference.extra["checkpoint"]
    sha256 = files.sha256_of(checkpoint_path)
    metadata = onnx_export.metadata_for(checkpoint, sha256, "fp32", checkpoint_file=checkpoint_path.name)
    class_names, img_size, resize_size = checkpoint["class_names"], checkpoint["img_size"], int(metadata["resize_size"])
    print(
        f"checkpoint: {checkpoint_path} ({metadata['arch']}; grades {', '.join(class_names)}; {img_size} px crops of "
        f"{resize_size} px; sha256 {sha256[:16]}...)",
        flush=True,
    )
    train_items, val_items = onnx_export.split_images(checkpoint_path, checkpoint, args.data)
    val = read_validation_images(val_items, img_size, resize_size)

    model_bytes, fp32_grades, fp32 = export_fp32(reference, metadata, val, out)
    record = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": sha256,
        "class_names": class_names,
        "img_size": img_size,
        "resize_size": resize_size,
        "input": metadata["input"],
        "output": metadata["output"],
        "validation_images": len(val.crops),
        "validation_images_unreadable": len(val_items) - len(val.crops),
        "fp32": fp32,
    }
    if args.int8:
        record["int8"] = export_int8(
            model_bytes, fp32_grades, metadata, train_items, val, out_int8, args.calibration_images, class_names
        )
    else:
        record |= earlier_int8(out, out_int8, out_json, sha256)
    models = [("fp32", fp32)] + ([("int8", record["int8"])] if "int8" in record else [])
    print(
        f"validation ({len(val.crops)} images): accuracy "
        + ", ".join(f"{name} {fmt(figures['accuracy'])}" for name, figures in models)
        + "; QWK "
        + ", ".join(f"{name} {fmt(figures['qwk'])}" for name, figures in models)
    )
    files.write_json(out_json, record)
    print(f"figures written to {out_json}")
    return 0


if __name__ == "__main__":
    with interrupt.stop_at_once():  # SIGTERM as Ctrl-C: the export's temporary files are removed, not left in TMPDIR
        main_entry(main, get_args_parser())
