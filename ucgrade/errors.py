"""One exception type for mistakes a user can fix, and one wrapper that turns it into a clean exit."""

import os
import sys


class UserError(Exception):
    """A problem with the user's input: printed as one sentence, never as a traceback."""


class RunInterrupted(Exception):
    """Training stopped early on Ctrl-C or SIGTERM; what finished is kept."""


def run_cli(main, args):
    """Call main(args); turn a UserError or Ctrl-C into a one-line message and an exit code."""
    try:
        return main(args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunInterrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: stopped by Ctrl-C before anything was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to a reader that stopped, as in `predict.py folder/ | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's final flush cannot fail again
        return 141  # what a shell reports for a process ended by SIGPIPE
