"""The scripts' command line: an argument parser, one exception type for mistakes a user can fix,
and one wrapper that turns it into a clean exit."""

import argparse
import errno
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: a mistake on the command line is one line, without the usage block,
    and args.argv keeps the command line, so that --resume can parse it again over a run's settings.
    No abbreviations: a run is a record, and --epoch 3 silently meaning --epochs 3 is a surprise in it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False} | kwargs)

    def error(self, message):
        self.exit(2, f"error: {message}; see python {self.prog} --help.{self.dash_hint()}\n")

    def dash_hint(self):
        """A file name that starts with '-' reads as an unknown flag: say how to pass it."""

        def looks_like_a_file(arg):  # -dash.jpg, not a mistyped --flag or a negative number
            if not arg.startswith("-") or arg.startswith("--") or not ("." in arg or os.path.exists(arg)):
                return False
            try:
                float(arg)
                return False
            except ValueError:
                return True

        dashed = [arg for arg in getattr(self, "_argv", []) if looks_like_a_file(arg)]
        if not dashed or "--" in getattr(self, "_argv", []):
            return ""
        return (
            f" If '{dashed[0]}' is a file name, put -- before the file names that start with '-': "
            f"python {self.prog} -- {dashed[0]}"
        )

    def parse_known_args(self, args=None, namespace=None):
        self._argv = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        parsed, extras = super().parse_known_args(args, namespace)
        parsed.argv = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        return parsed, extras


# Here, not in device.py and model.py, so that --help and a mistyped flag need no torch: choices of the flags.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ARCHITECTURE_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "convnext_tiny")
DEFAULT_ARCH = "resnet50"  # the method of the project


class UserError(Exception):
    """A problem with the user's input: printed as one sentence, never as a traceback."""


class RunInterrupted(Exception):
    """Training stopped early on Ctrl-C or SIGTERM; what finished is kept."""


def run_cli(main, args):
    """Call main(args); turn a UserError, Ctrl-C or a failed file operation into a one-line message and an exit code."""
    never_fail_on_a_name()
    try:
        code = main(args) or 0
        sys.stdout.flush()  # inside the try: output still buffered may meet a closed pipe here
        return code
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM where interrupt.stop_at_once says why
        print(f"interrupted: {error or 'stopped by Ctrl-C.'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # main_entry ends quietly
    except ModuleNotFoundError as error:
        if error.name is None or error.name.partition(".")[0] not in FULL_INSTALL:
            raise
        print(f"error: {missing_package_message(error.name.partition('.')[0])}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a folder without write permission: the machine's, not the input's
        if disk_full(error):
            print(f"error: {disk_full_message(error)}", file=sys.stderr)
            return 1
        where = f" '{error.filename}'" if error.filename else ""
        print(
            f"error: could not write or read{where}: {error.strerror or error}; free disk space or check the "
            "folder's permissions, then run again.",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as error:
        if disk_full(error.__context__):  # torch's zip writer wraps the OSError in a RuntimeError
            print(f"error: {disk_full_message(error.__context__)}", file=sys.stderr)
            return 1
        if not lost_a_peer(error):
            raise
        rank = os.environ.get("RANK", "?")
        print(
            f"error: process {rank} stopped because another process of this torchrun run stopped first; its "
            "message above says why, and if it printed none, it was killed (out of memory: see dmesg, or by its "
            "scheduler).",
            file=sys.stderr,
        )
        return 1


def disk_full(error):
    """True for the OSError of a full disk, a full quota or a file-size limit (ulimit -f)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_full_message(error):
    """The advice for a full disk, for the command that met it (the script's name in sys.argv[0])."""
    where = f" while writing '{error.filename}'" if error.filename else ""
    command = os.path.basename(sys.argv[0]) if sys.argv else ""
    if command == "predict.py":
        return (
            f"no space left{where} ({error.strerror or error}): a test set's results folder needs a few MB (its "
            "plots and report.html) and nothing half-written was kept; free disk space, then run predict.py again."
        )
    if command == "export.py":
        return (
            f"no space left{where} ({error.strerror or error}): an export needs about the size of best.pt for "
            "model.onnx, a quarter of it for model.int8.onnx and three times the model in the temporary folder "
            "while quantising (TMPDIR); free disk space, then run export.py again."
        )
    return (
        f"no space left{where} ({error.strerror or error}): a run of ResNet50 needs about 300 MB free (best.pt 111 MB, "
        "last.pt 188 MB, the plots and the report; K times that with --folds K; less for smaller --arch); free disk "
        "space or raise the quota, then continue the run with python qq.py --resume RUN_DIR, which keeps its last "
        "finished epoch."
    )


def lost_a_peer(error):
    """True for the error a collective raises in a torchrun process when another process of the run has ended."""
    peer_gone = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
    return "WORLD_SIZE" in os.environ and any(text in str(error) for text in peer_gone)


# What requirements.txt installs beyond a grading-only install (requirements-predict.txt), by import name.
FULL_INSTALL = {
    "torch": "torch",
    "torchvision": "torchvision",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "onnx": "onnx",
}


def missing_package_message(name):
    command = os.path.basename(sys.argv[0]) if sys.argv else "this command"
    return (
        f"{command} needs {FULL_INSTALL[name]}, which is not installed here (a grading-only install from "
        "requirements-predict.txt grades with an .onnx, and nothing more); install the full set with "
        "pip install -r requirements.txt."
    )


def never_fail_on_a_name():
    """Print a name the terminal's encoding cannot show (modéré on an ASCII console, a Windows console redirected
    to a file) as an escape (mod\\xe9r\\xe9), instead of ending the command with a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or detached stream: nothing will be printed on it anyway
                pass


def main_entry(main, parser):
    """The scripts' entry point: parse the command line, run main through run_cli, and exit.

    Output piped into a reader that stops early (`predict.py folder/ | head`) ends quietly, as
    other command-line tools do, instead of with a BrokenPipeError traceback.
    """
    never_fail_on_a_name()  # argparse's own messages name the arguments too
    try:
        code = run_cli(main, parser.parse_args())
    except BrokenPipeError:
        code = 141  # what a shell reports for a process ended by SIGPIPE
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = 141
    if code == 141:
        os.dup2(
            os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno()
        )  # so that Python's own final flush cannot fail again
    sys.exit(code)
