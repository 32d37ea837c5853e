"""Ctrl-C and SIGTERM ask a run to stop after the current batch, so that what finished is kept."""

import contextlib
import os
import signal
import sys
import threading


class GracefulStop:
    """A context manager and a callable: stop() is True once SIGINT or SIGTERM has arrived.

    A second Ctrl-C raises KeyboardInterrupt at once, for a user who really wants out.
    """

    def __init__(self):
        self.signal_name = None
        self.finishing = None  # what a run is finishing when nothing is left to stop for (the report), or None
        self._previous = {}

    def __enter__(self):
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a data loader process, forked with this handler, before it ignores signals
            return  # the run's own process, which got the signal too, stops the run
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        doing = self.finishing or "stopping after the current batch"
        print(f"\n{self.signal_name} received: {doing} (Ctrl-C again stops at once).", file=sys.stderr, flush=True)

    def __call__(self):
        return self.signal_name is not None


@contextlib.contextmanager
def stop_at_once():
    """SIGTERM stops at once, as Ctrl-C does, by an exception: for work that keeps nothing half-done (a test set's
    results, an export), whose clean-up must run. Python's default for SIGTERM ends the process without it,
    leaving its temporary files behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        # a KeyboardInterrupt, as Ctrl-C's: a library's `except Exception` (ONNX Runtime's quantisation has some)
        # cannot swallow it, as it could a RunInterrupted
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}; nothing half-written was kept.")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
