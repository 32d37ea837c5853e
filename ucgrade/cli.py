"""The scripts' command line: an argument parser, one exception type for mistakes a user can fix,
and one wrapper that turns it into a clean exit."""

import argparse
import os
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: a mistake on the command line is one line, without the usage block,
    and args.argv keeps the command line, so that --resume can parse it again over a run's settings."""

    def error(self, message):
        self.exit(2, f"error: {message}; see python {self.prog} --help.\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        parsed.argv = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        return parsed, extras


class UserError(Exception):
    """A problem with the user's input: printed as one sentence, never as a traceback."""


class RunInterrupted(Exception):
    """Training stopped early on Ctrl-C or SIGTERM; what finished is kept."""


def run_cli(main, args):
    """Call main(args); turn a UserError, Ctrl-C or a failed file operation into a one-line message and an exit code."""
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
    except KeyboardInterrupt:
        print("interrupted: stopped by Ctrl-C.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # main_entry ends quietly
    except OSError as error:  # a full disk, a folder without write permission: the machine's, not the input's
        where = f" '{error.filename}'" if error.filename else ""
        print(
            f"error: could not write or read{where}: {error.strerror or error}; free disk space or check the "
            "folder's permissions, then run again.",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as error:
        if not lost_a_peer(error):
            raise
        rank = os.environ.get("RANK", "?")
        print(
            f"error: process {rank} stopped because another process of this torchrun run stopped first; its "
            "message above says why.",
            file=sys.stderr,
        )
        return 1


def lost_a_peer(error):
    """True for the error a collective raises in a torchrun process when another process of the run has ended."""
    peer_gone = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")
    return "WORLD_SIZE" in os.environ and any(text in str(error) for text in peer_gone)


def main_entry(main, parser):
    """The scripts' entry point: parse the command line, run main through run_cli, and exit.

    Output piped into a reader that stops early (`predict.py folder/ | head`) ends quietly, as
    other command-line tools do, instead of with a BrokenPipeError traceback.
    """
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
