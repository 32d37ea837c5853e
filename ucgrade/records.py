"""Records: the CSV files a run or a test set writes (history.csv, predictions.csv, cam/index.csv), and
reading them back, so that plots and pages can be drawn from the saved files."""

from pathlib import Path

import numpy as np

from . import files

HISTORY_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_qwk",
    "lr",
    "epoch_time_s",
    "train_images_per_s",
]


def write_history(path, history):
    files.write_csv(path, history, HISTORY_FIELDS)


def read_history(path):
    rows = files.read_csv(path)
    # a run begun before val_qwk was kept has no value for its earlier epochs
    return [{k: (int(v) if k == "epoch" else float(v or "nan")) for k, v in row.items()} for row in rows]


def prediction_rows(relpaths, targets, probs, class_names, extra=None):
    """One row per image: path, true and predicted class, its probability, and every class probability."""
    rows = []
    for i, (path, target, p) in enumerate(zip(relpaths, targets, probs)):
        predicted = int(np.argmax(p))
        row = {
            "path": path,
            "true": class_names[int(target)],
            "predicted": class_names[predicted],
            "p_predicted": f"{p[predicted]:.6f}",
            "correct": int(predicted == int(target)),
        }
        row.update({prob_column(name): f"{value:.6f}" for name, value in zip(class_names, p)})
        if extra:
            row.update({key: values[i] for key, values in extra.items()})
        rows.append(row)
    return rows


def prob_column(class_name):
    """The column of a grade's probability: 'prob:' cannot collide with a fixed column (a grade named 'predicted'
    would have overwritten p_predicted)."""
    return f"prob:{class_name}"


def write_predictions(path, rows):
    files.write_csv(path, rows, list(rows[0].keys()))


def read_predictions(path, class_names):
    """(rows, targets, probs) from a predictions.csv."""
    rows = files.read_csv(path)
    targets = np.array([class_names.index(r["true"]) for r in rows])
    probs = np.array([[float(r[prob_column(name)]) for name in class_names] for r in rows])
    return rows, targets, probs


def read_cams(run_dir):
    """The Grad-CAM overlays listed in run_dir/cam/index.csv: a list of (caption, PNG path)."""
    index = Path(run_dir) / "cam" / "index.csv"
    return [(row["caption"], index.parent / row["file"]) for row in files.read_csv(index)] if index.exists() else []
