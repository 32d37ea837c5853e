"""Grade colonoscopy images with a model trained by qq.py, or exported from one by export.py.

    python predict.py image.jpg                         # uses best.pt of the newest run under outputs/
    python predict.py a.jpg b.png folder/ --weights outputs/train2/best.pt
    python predict.py folder/ --json > grades.json      # machine-readable output
    python predict.py image.jpg --cam heatmaps/         # also write a Grad-CAM overlay per image
    python predict.py image.jpg --weights outputs/train/model.onnx       # ONNX Runtime: no torch needed
    python predict.py image.jpg --weights outputs/train/model.int8.onnx  # int8, faster on a CPU
    python predict.py test_images/ --evaluate           # score a labelled test set: outputs/train/test/report.html
    python predict.py test_images/ --evaluate --weights outputs/train3 --groups test_patients.csv

Each image gets one line: `path: grade (p=0.87)  grade_a=0.05 grade_b=0.87 ...`, the grades named without
the start their names share (said once, on stderr). Images that
cannot be read are reported and skipped; the exit code is 1 if any failed. With a .pt, an image unlike
the training images gets "not like the training images: grade not reliable" beside its grade.

With --evaluate, the one input is a test folder with one sub-folder per grade: it is graded and
scored like a validation split (95% intervals, and per patient with --groups), into a new folder
test, test2, ... of the run (or --eval-out). A cross-validation run folder grades with every fold's
model and scores their mean probabilities.

With an .onnx, nothing imports torch: a grading workstation needs only requirements-predict.txt
(onnxruntime, NumPy, Pillow). torch is imported only to grade with a .pt.
"""

import argparse
import json
import sys
from pathlib import Path

from ucgrade.cli import FULL_INSTALL, PRECISIONS, ArgumentParser, UserError, main_entry
from ucgrade.files import check_folder_path
from ucgrade.grader import BATCH_SIZE, GRADING_PRECISION, OOD_WARNING, grade_files, grade_labels, load_grader
from ucgrade.images import IMAGE_EXTENSIONS, UnreadableImage, files_under, is_image_file
from ucgrade.locate import find_models

EXAMPLES = """examples:
  python predict.py image.jpg                         # best.pt of the newest run under outputs/
  python predict.py folder/ --weights outputs/train2/best.pt
  python predict.py folder/ --json > grades.json
  python predict.py image.jpg --cam heatmaps/         # also a Grad-CAM overlay per image
  python predict.py image.jpg --weights outputs/train/model.onnx   # ONNX Runtime, no torch
  python predict.py -- -scan.jpg                      # a file name that starts with '-'"""


def get_args_parser():
    parser = ArgumentParser(
        description="Grade colonoscopy images with a model trained by qq.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files and/or folders of images")
    parser.add_argument(
        "--weights",
        default=None,
        help="a best.pt or last.pt written by qq.py, a run folder, or an .onnx written by export.py "
        "(default: best.pt of the newest run under --out)",
    )
    parser.add_argument(
        "--out",
        default="outputs",
        help="where to look for the newest run when --weights is not given (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps; an .onnx runs on the CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="a .pt grades in fp32, as its .onnx does, on any CPU; bf16 is faster where the CPU supports it but can "
        "change a grade near a tie; auto: bf16 where supported, as in training; an .onnx runs as exported "
        f"(default: {GRADING_PRECISION})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        metavar="N",
        help="images graded in one forward pass; the next batch is decoded meanwhile (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads of a forward pass, at most one per core this process may use; on a CPU that other jobs "
        "keep busy, 1 or 2 grade faster (default: one per available core)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    parser.add_argument(
        "--cam",
        default=None,
        metavar="DIR",
        help="write a Grad-CAM overlay of the predicted grade for each image into DIR (needs a .pt)",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="the input is a labelled test folder (one sub-folder per grade): score the model on it (default: off)",
    )
    parser.add_argument(
        "--eval-out",
        default=None,
        metavar="DIR",
        help="with --evaluate, the results folder (a number is added if it exists) (default: test, test2, ... "
        "in the run's folder)",
    )
    parser.add_argument(
        "--remission-upto",
        default=None,
        metavar="CLASS",
        help="with --evaluate, also score remission (grades up to CLASS) vs active disease (default: as the run "
        "was trained, from its config.json; else off)",
    )
    parser.add_argument(
        "--groups",
        default=None,
        metavar="CSV",
        help="with --evaluate, a path,group CSV (paths relative to the test folder): intervals over patients and "
        "the patient-level section (default: none)",
    )
    parser.add_argument(
        "--patient-grade",
        default=None,
        choices=("max", "mean-prob"),
        help="with --groups, a patient's predicted grade: the worst of their images' (Mayo), or that of their "
        "images' mean probabilities (default: as the run was trained, from its config.json; else max)",
    )
    return parser


def check_evaluate_args(args):
    """The --evaluate flags go together: one test folder, and the options that only it reads."""
    if not args.evaluate:
        used = [flag for flag in ("eval_out", "remission_upto", "groups") if getattr(args, flag)]
        if used:
            flags = ", ".join("--" + flag.replace("_", "-") for flag in used)
            raise UserError(f"{flags} only apply to --evaluate; add --evaluate with a labelled test folder.")
        return
    if len(args.inputs) != 1:
        raise UserError("--evaluate takes one test folder (with one sub-folder per grade), not several inputs.")
    if args.json or args.cam:
        raise UserError("--evaluate writes its own results folder; leave out --json and --cam.")
    if args.groups and not Path(args.groups).is_file():
        raise UserError(f"--groups file '{args.groups}' does not exist; check the path.")


def collect_images(inputs):
    """(image paths, errors): folders are searched for images; files need an image extension, as in training."""
    images, errors = [], []
    for name in inputs:
        path = Path(name)
        if path.is_dir() and (path / "config.json").is_file() and (path / "metrics.json").is_file():
            errors.append(
                (
                    name,
                    "a run folder written by qq.py, not a folder of images; to grade with its model, pass it as "
                    "--weights",
                )
            )
        elif path.is_dir():
            found = [p for p in files_under(path) if is_image_file(p)]  # hidden folders skipped, as in training
            if not found:
                errors.append((name, f"folder has no images ({', '.join(IMAGE_EXTENSIONS)})"))
            images.extend(found)
        elif path.exists() and not is_image_file(path):
            errors.append(
                (
                    name,
                    f"not an image file by its extension ({', '.join(IMAGE_EXTENSIONS)}), so it is skipped, as in "
                    "training",
                )
            )
        elif path.exists():
            images.append(path)
        else:
            errors.append((name, "no such file or folder"))
    return images, errors


def unique_path(folder, stem):
    path = folder / f"{stem}_cam.png"
    k = 2
    while path.exists():  # never overwrite an earlier overlay
        path = folder / f"{stem}_cam{k}.png"
        k += 1
    return path


def open_grader(weights, args):
    """The Grader of the model file, after the checks of the flags that only a .pt can follow."""
    onnx = weights.suffix.lower() == ".onnx"
    if onnx and args.cam:
        raise UserError(
            f"--cam needs the .pt checkpoint, because Grad-CAM reads the model's gradients and '{weights.name}' keeps "
            "none; pass --weights with the best.pt it was exported from."
        )
    if onnx and args.device not in ("auto", "cpu"):
        raise UserError(
            f"--device {args.device} is for a .pt checkpoint; an .onnx model runs on the CPU, so leave it out."
        )
    if args.cam:
        check_folder_path(args.cam, "--cam")
    grader = load_grader(weights, args.device, args.precision, args.threads)
    if onnx and args.precision not in (None, "auto", grader.precision):
        raise UserError(
            f"--precision {args.precision} is for a .pt checkpoint; '{weights.name}' runs in the precision it was "
            f"exported in ({grader.precision}), so leave --precision out."
        )
    if not grader.has_ood:
        how = "export it again from its best.pt" if onnx else "train it again with this version of qq.py"
        print(
            f"note: '{weights.name}' has no check for images unlike the training images ({how} to get one); "
            "its grades are given without it.",
            file=sys.stderr,
        )
    return grader


def write_cam(grader, path, grade, cam_path):
    """A Grad-CAM overlay of the grade on the image, by the model the torch grader holds."""
    from ucgrade.cam import cam_overlay, save_png

    model, checkpoint = grader.extra["model"], grader.extra["checkpoint"]
    # the preprocessing the model was trained with, as its checkpoint records it
    overlay, _, _ = cam_overlay(model, path, checkpoint, target_class=grader.class_names.index(grade))
    save_png(overlay, cam_path)


def image_results(grader, batch):
    """(path, result dict or None, reason or None) of each file of a graded Batch, in the input order."""
    grades = batch.grades[0]
    flags = grader.flagged(grades.ood_scores)
    unreadable, row = iter(batch.unreadable), dict(zip(batch.kept, range(len(batch.kept))))
    for position, path in enumerate(batch.paths):
        if position not in row:
            yield path, None, next(unreadable)[1]
            continue
        j = row[position]
        probabilities = dict(zip(grader.class_names, grades.probs[j].tolist()))
        grade = grader.class_names[int(grades.probs[j].argmax())]
        result = {"path": str(path), "grade": grade, "probability": probabilities[grade]}
        result["probabilities"] = probabilities
        if flags is not None:
            result |= {"out_of_distribution": bool(flags[j]), "ood_score": float(grades.ood_scores[j])}
        yield path, result, None


def grade_images(grader, images, args, errors):
    """Grade the image files in batches, print a line for each (unless --json) and return the results."""
    cam_dir = Path(args.cam) if args.cam else None
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    results = []
    prefix, labels = grade_labels(grader.class_names)
    short = dict(zip(grader.class_names, labels))
    if prefix and not args.json:
        print(f"note: grades are named without their shared start '{prefix}' (--json gives the whole names)",
              file=sys.stderr)  # fmt: skip
    for batch in grade_files([grader], images, args.batch_size):
        for path, result, reason in image_results(grader, batch):
            if cam_dir is not None and result is not None:
                result["cam"] = str(unique_path(cam_dir, path.stem))
                try:
                    write_cam(grader, path, result["grade"], result["cam"])
                except UnreadableImage as error:
                    result, reason = None, str(error)
            if result is None:
                errors.append((str(path), reason))
                print(f"error: {path}: {reason}", file=sys.stderr)
                continue
            results.append(result)
            if not args.json:
                print(result_line(result, short), flush=True)
    if cam_dir is not None:
        print(f"Grad-CAM overlays of {len(results)} image(s) written to {cam_dir}/", file=sys.stderr)
    return results


def result_line(result, short):
    """path: grade (p=0.87)  grade_a=0.050  grade_b=0.870 ..., with the grades named by short (name -> the part that
    differs), so that six long names still fit a line."""
    probabilities, grade = result["probabilities"], result["grade"]
    others = "  ".join(f"{short[name]}={p:.3f}" for name, p in probabilities.items())
    warning = f"  [{OOD_WARNING}]" if result.get("out_of_distribution") else ""
    return f"{result['path']}: {short[grade]} (p={probabilities[grade]:.2f}){warning}  {others}"


def main(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}.")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, not {args.threads}.")
    check_evaluate_args(args)
    if args.evaluate:
        try:
            from ucgrade.testset import evaluate_test_set
        except ModuleNotFoundError as error:  # a grading-only install (requirements-predict.txt)
            package = FULL_INSTALL.get((error.name or "").partition(".")[0])
            if package is None:
                raise
            raise UserError(
                f"--evaluate scores and plots with scikit-learn and matplotlib, and {package} is not installed "
                "here; install them with pip install scikit-learn matplotlib (an .onnx still needs no torch)."
            ) from None
        return evaluate_test_set(args, args.inputs[0])
    weights = find_models(args.weights, args.out)[0]
    grader = open_grader(weights, args)
    images, errors = collect_images(args.inputs)
    for name, reason in errors:
        print(f"error: {name}: {reason}", file=sys.stderr)
    results = grade_images(grader, images, args, errors)
    if args.json:
        print(
            json.dumps(
                {
                    "weights": str(weights),
                    "precision": grader.precision,
                    "class_names": grader.class_names,
                    "predictions": results,
                    "errors": [{"path": n, "error": r} for n, r in errors],
                },
                indent=2,
                allow_nan=False,  # strict JSON: the grader refuses a model whose outputs are not numbers
            )
        )
    if errors:
        print(
            f"{len(errors)} input(s) failed and {len(results)} image(s) were graded; see the errors above.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    main_entry(main, get_args_parser())
