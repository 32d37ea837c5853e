"""Run folders and atomic writes: a kill at any moment never leaves a half-written file behind."""

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .cli import UserError, disk_full


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give; mkstemp alone gives 0600


def _atomic_write(path, write):
    """Write through write(file) into a temporary file beside path, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(error) and not error.filename:  # a write() names no file; the message should
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise


def write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data))


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def spreadsheet_safe(value):
    """A cell that a spreadsheet shows as text, not runs as a formula (OWASP's CSV injection advice): text that
    starts with = + - @, a tab or a carriage return, and is not a number, gets a leading '. So does text that
    starts with ' itself, so that read_csv gives every value back unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START + ("'",)) and not is_number(value):
        return "'" + value
    return value


def write_csv(path, rows, fieldnames):
    """rows: a list of dicts with the keys in fieldnames; text cells are made spreadsheet_safe."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[spreadsheet_safe(name) for name in fieldnames], lineterminator="\n")
    writer.writeheader()
    writer.writerows({spreadsheet_safe(k): spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    write_text(path, buffer.getvalue())


def read_csv(path):
    """The rows of a CSV written by write_csv, with every value (and column name) as it was before writing."""

    def unescape(text):
        return text[1:] if isinstance(text, str) and text.startswith("'") else text

    with open(path, newline="", encoding="utf-8") as f:
        return [{unescape(k): unescape(v) for k, v in row.items()} for row in csv.DictReader(f)]


def sha256_of(path):
    """The SHA-256 of a file's bytes, read in blocks: a checkpoint's, or an image's for a run's fingerprint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_status(run_dir):
    """The status in a run folder's metrics.json: finished, interrupted, or None if it has none yet."""
    try:
        return read_json(Path(run_dir) / "metrics.json").get("status")
    except (OSError, ValueError):
        return None


def save_torch(path, obj):
    import torch  # here, not at the top: the torch-free grader (predict.py with an .onnx) uses this module

    try:
        _atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as error:  # torch's zip writer wraps the OSError of a full disk in a RuntimeError
        if disk_full(error.__context__):
            raise OSError(error.__context__.errno, error.__context__.strerror, str(path)) from None
        raise


def save_figure(path, fig):
    """Save a matplotlib figure as PNG atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def check_folder_path(path, flag):
    """Before any work: a folder can be made at path unless a file stands where a folder must be."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())  # '.' and '/' always exist
    if not existing.is_dir():
        raise UserError(f"{flag} '{path}' cannot be a folder, because '{existing}' is a file; give a folder.")


def check_writable(path, flag):
    """Before any work: files can be created in the folder at path, or in the nearest folder above it that exists
    (where it will be made). Tried with a real file, because permissions alone miss read-only disks (and root)."""
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".ucgrade-write-test."):
            pass
    except OSError as error:
        raise UserError(
            f"{flag} '{path}' cannot be written ('{existing}': {error.strerror or error}); give a folder you can "
            "write to, or fix its permissions, before the images are read."
        ) from None


def check_image_folder(path):
    """The --data folder exists and is a folder; one sentence otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(
            f"the data folder '{folder}' does not exist; pass --data with a folder that has one sub-folder per grade."
        )
    if not folder.is_dir():
        raise UserError(
            f"--data '{folder}' is a file, not a folder; pass the folder that holds one sub-folder per grade."
        )
    return folder


def check_data_folder(data_dir, out_dir):
    """Before any work: --data is a folder, and not the project folder, whose 'grades' would be data, docs and
    outputs, the tool's own plots. Refused when it holds the --out folder or a run folder one level down."""
    data = check_image_folder(data_dir)
    root, out = data.resolve(), Path(out_dir).resolve()
    runs = sorted(config.parent for config in root.glob("*/*/config.json"))
    if root == out or root in out.parents:
        holds = f"the --out folder '{out_dir}'"
    elif runs:
        holds = f"run folders ({runs[0].relative_to(root).as_posix()})"
    else:
        return
    meant = f", probably --data {data / 'data'}" if (root / "data").is_dir() and root / "data" != out else ""
    raise UserError(
        f"--data '{data}' holds {holds}, so its 'grades' would include the tool's own outputs; pass the folder that "
        f"has one sub-folder of images per grade{meant}."
    )


LOCK_NAME = "run.lock"


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process: alive; a pid out of range: not ours to judge, so alive
    return True


@contextlib.contextmanager
def run_lock(run_dir):
    """Hold run_dir/run.lock (created with O_EXCL, holding the pid and the host) while a run is resumed, so
    that a second --resume of the same run is refused instead of training the same epochs into the same folder.
    A lock whose process on this host is gone is stale and taken over. run_dir None: no lock."""
    if run_dir is None:
        yield
        return
    path, host = Path(run_dir) / LOCK_NAME, socket.gethostname()
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid_text, _, lock_host = path.read_text().partition("\n")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, lock_host = None, host  # half-written or emptied: stale
            if attempt == 0 and lock_host.strip() == host and (pid is None or not _process_alive(pid)):
                print(f"note: removed a stale {path} (its process {pid} is gone).")
                path.unlink(missing_ok=True)
                continue
            raise UserError(
                f"'{run_dir}' is already being resumed by process {pid} on {lock_host.strip() or 'this machine'}; "
                f"wait for it to finish (if that process is gone, delete {path})."
            ) from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n{host}\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def new_run_dir(out_dir, name=None):
    """Create and return a fresh folder under out_dir: name, name2, name3, ... (default name: train;
    a name ending in a digit gets name-2, name-3, ...).

    os.mkdir fails if the folder exists, so two runs started at once never share a folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = name or "train"
    joint = "-" if base[-1].isdigit() else ""  # visit2, visit2-2, visit2-3: not visit22
    for i in range(1, 100_000):
        run_dir = out_dir / (base if i == 1 else f"{base}{joint}{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"too many runs named {base!r} under {out_dir}")


@contextlib.contextmanager
def written_whole(folder):
    """Yield a hidden folder that stands in for the new, empty folder (made by new_run_dir, so that its name is
    known and taken), and move it into place once the block has written every file. A stop, a full disk or any
    error removes both, so a folder of results is whole or absent; after a kill -9, what is left is the empty
    folder and a hidden '.NAME.partial-*' beside it."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    inside = staging / folder.name  # its own name, so that what is written inside may name it
    try:
        inside.mkdir()
        yield inside
        try:
            os.replace(inside, folder)  # POSIX replaces an empty folder in one step
        except OSError:  # Windows does not
            folder.rmdir()
            os.rename(inside, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json(path):
    """The object in a JSON file (metrics.json, config.json); a damaged file raises ValueError."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
