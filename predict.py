"""Grade colonoscopy images with a model trained by qq.py, or exported from one by export.py.

    python predict.py image.jpg                         # uses best.pt of the newest run under outputs/
    python predict.py a.jpg b.png folder/ --weights outputs/train2/best.pt
    python predict.py folder/ --json > grades.json      # machine-readable output
    python predict.py image.jpg --cam heatmaps/         # also write a Grad-CAM overlay per image
    python predict.py image.jpg --weights outputs/train/model.onnx       # ONNX Runtime: no torch needed
    python predict.py image.jpg --weights outputs/train/model.int8.onnx  # int8, faster on a CPU
    python predict.py test_images/ --evaluate           # score a labelled test set: outputs/train/test/report.html
    python predict.py test_images/ --evaluate --weights outputs/train3 --groups test_patients.csv

Each image gets one line: `path: grade (p=0.87)  grade_a=0.05 grade_b=0.87 ...`. Images that
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

from ucgrade import files
from ucgrade.cli import PRECISIONS, ArgumentParser, UserError, main_entry
from ucgrade.images import IMAGE_EXTENSIONS, UnreadableImage, files_under, is_image_file

OOD_WARNING = "not like the training images: grade not reliable"  # ucgrade.ood.WARNING (torch-free here)


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
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 where supported, as in training; an .onnx runs as exported (default: %(default)s)",
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
        help="with --evaluate, also score remission (grades up to CLASS) vs active disease (default: off)",
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
        default="max",
        choices=("max", "mean-prob"),
        help="with --groups, a patient's predicted grade: the worst of their images' (Mayo), or that of their "
        "images' mean probabilities (default: %(default)s)",
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


def newest_checkpoint(out_dir):
    """best.pt of the run under out_dir whose best model was written last."""
    candidates = sorted(
        [*Path(out_dir).glob("*/best.pt"), *Path(out_dir).glob("*/fold*/best.pt")], key=lambda p: p.stat().st_mtime
    )
    if not candidates and (Path(out_dir) / "best.pt").is_file():
        raise UserError(
            f"'{out_dir}' is a run folder itself (--out is the folder that holds the runs); pass --weights "
            f"{Path(out_dir) / 'best.pt'}."
        )
    if not candidates:
        raise UserError(
            f"no trained model found under '{Path(out_dir).resolve()}/'; train one first with 'python qq.py' (from "
            "the project folder), pass --out with the folder that holds the runs, or pass --weights path/to/best.pt."
        )
    newest = candidates[-1]
    if newest.parent.parent != Path(out_dir):  # outputs/RUN/foldK/best.pt: a fold of a cross-validation run
        run = newest.parent.parent
        raise UserError(
            f"the newest run '{run}' is a cross-validation run, whose folds each hold a model; choose one with "
            f"--weights, for example --weights {run / 'fold1' / 'best.pt'}."
        )
    return newest


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


def resolve_weights(args):
    """The model file to grade with: --weights (a run folder stands for its best.pt), or the newest run's best.pt."""
    weights = Path(args.weights) if args.weights else newest_checkpoint(args.out)
    if weights.is_dir():  # a run folder: its best model
        if not (weights / "best.pt").is_file():
            fold = (
                f" (a cross-validation run keeps one per fold, such as {weights / 'fold1' / 'best.pt'})"
                if (weights / "fold1" / "best.pt").is_file()
                else ""
            )
            raise UserError(
                f"--weights '{weights}' is a folder without a best.pt; give a best.pt or last.pt written by "
                f"qq.py{fold}."
            )
        weights = weights / "best.pt"
    if not args.weights:
        print(f"using {weights} (the newest run under {args.out}/{run_summary(weights.parent)})", file=sys.stderr)
    return weights


def run_summary(run_dir):
    """', validation accuracy 0.91 after 25 of 25 epochs' from a run's metrics.json, so that a throwaway run used
    by default is noticed; '' when the file says nothing."""
    try:
        metrics = files.read_json(Path(run_dir) / "metrics.json")
        accuracy, done, epochs = metrics.get("accuracy"), metrics.get("epochs_completed"), metrics.get("epochs")
    except (OSError, ValueError, AttributeError):
        return ""
    parts = [f"validation accuracy {accuracy:.2f}" if isinstance(accuracy, (int, float)) else ""]
    parts.append(f"after {done} of {epochs} epochs" if done is not None and epochs is not None else "")
    status = metrics.get("status")
    parts.append(f"({status})" if status and status != "finished" else "")
    text = " ".join(part for part in parts if part)
    return f", {text}" if text else ""


def torch_grader(weights, args, cam_dir):
    """(class names, grade(path), write_cam(path, grade, file) or None) of a .pt checkpoint, on --device."""
    try:
        from ucgrade.device import choose_device, choose_precision
        from ucgrade.engine import load_for_prediction, predict_crop
        from ucgrade.model import load_checkpoint, model_from_checkpoint
    except ImportError as error:  # a grading-only install (requirements-predict.txt) has no torch
        raise UserError(
            f"grading with '{weights.name}' needs torch, and {error.name or 'a package'} is not installed here; "
            "install requirements.txt, or grade with an .onnx that 'python export.py RUN_FOLDER' writes."
        ) from None
    from ucgrade.files import check_folder_path

    device = choose_device(args.device)
    precision = choose_precision(device, args.precision)
    checkpoint = load_checkpoint(weights)
    model = model_from_checkpoint(checkpoint, weights).to(device).eval()
    class_names = checkpoint["class_names"]
    if cam_dir is not None:
        check_folder_path(cam_dir, "--cam")

    from ucgrade import ood

    scorer = ood.scorer(model, checkpoint, device, precision)

    def grade(path):  # the image decoded once, for the grade and for its out-of-distribution score
        image = load_for_prediction(path, checkpoint["img_size"], checkpoint.get("resize_size"))
        grade, probabilities = predict_crop(image, model, checkpoint, device, precision)
        if scorer is None:
            return grade, probabilities, None
        score = float(scorer.scores(image)[0])
        return grade, probabilities, {"out_of_distribution": score > scorer.threshold, "ood_score": score}

    def write_cam(path, grade, cam_path):
        from ucgrade.cam import cam_overlay, save_png

        # the preprocessing the model was trained with, as its checkpoint records it
        overlay, _, _ = cam_overlay(model, path, checkpoint, target_class=class_names.index(grade))
        save_png(overlay, cam_path)

    return class_names, grade, write_cam if cam_dir is not None else None


def onnx_grader(weights, args):
    """(class names, grade(path), None) of an .onnx written by export.py, through ONNX Runtime on the CPU."""
    if args.cam:
        raise UserError(
            f"--cam needs the .pt checkpoint, because Grad-CAM reads the model's gradients and '{weights.name}' keeps "
            "none; pass --weights with the best.pt it was exported from."
        )
    if args.device not in ("auto", "cpu"):
        raise UserError(
            f"--device {args.device} is for a .pt checkpoint; an .onnx model runs on the CPU, so leave it out."
        )
    from ucgrade.onnx_grade import load_onnx_model, predict_image

    model = load_onnx_model(weights)
    if args.precision not in ("auto", model.precision):
        raise UserError(
            f"--precision {args.precision} is for a .pt checkpoint; '{weights.name}' runs in the precision it was "
            f"exported in ({model.precision}), so leave --precision out."
        )
    print(
        "note: the check for images unlike the training images needs the .pt the model was exported from; "
        f"'{weights.name}' grades without it.",
        file=sys.stderr,
    )
    return model.class_names, lambda path: (*predict_image(path, model), None), None


def main(args):
    check_evaluate_args(args)
    if args.evaluate:
        from ucgrade.testset import evaluate_test_set

        return evaluate_test_set(args, args.inputs[0])
    weights = resolve_weights(args)
    cam_dir = Path(args.cam) if args.cam else None
    if weights.suffix.lower() == ".onnx":
        class_names, grade_image, write_cam = onnx_grader(weights, args)
    else:
        class_names, grade_image, write_cam = torch_grader(weights, args, cam_dir)
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)

    images, errors = collect_images(args.inputs)
    for name, reason in errors:
        print(f"error: {name}: {reason}", file=sys.stderr)
    results = []
    for path in images:
        try:
            grade, probabilities, unusual = grade_image(path)
            result = {
                "path": str(path),
                "grade": grade,
                "probability": probabilities[grade],
                "probabilities": probabilities,
            } | (unusual or {})
            if write_cam is not None:
                result["cam"] = str(unique_path(cam_dir, path.stem))
                write_cam(path, grade, result["cam"])
        except UnreadableImage as error:
            errors.append((str(path), str(error)))
            print(f"error: {path}: {error}", file=sys.stderr)
            continue
        results.append(result)
        if not args.json:
            others = "  ".join(f"{name}={p:.3f}" for name, p in probabilities.items())
            warning = f"  [{OOD_WARNING}]" if result.get("out_of_distribution") else ""
            print(f"{path}: {grade} (p={probabilities[grade]:.2f}){warning}  {others}", flush=True)

    if args.json:
        print(
            json.dumps(
                {
                    "weights": str(weights),
                    "class_names": class_names,
                    "predictions": results,
                    "errors": [{"path": n, "error": r} for n, r in errors],
                },
                indent=2,
            )
        )
    if cam_dir is not None:
        print(f"Grad-CAM overlays of {len(results)} image(s) written to {cam_dir}/", file=sys.stderr)
    if errors:
        print(
            f"{len(errors)} input(s) failed and {len(results)} image(s) were graded; see the errors above.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    main_entry(main, get_args_parser())
