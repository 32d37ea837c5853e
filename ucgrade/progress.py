"""Progress of the long loops: a bar on a terminal, one plain line per long phase in a log, nothing when asked.

Redirected to a file (nohup, a cluster job, CI), every redraw of a bar would be a carriage-return frame:
thousands of them in a long run. So a bar is drawn only when stderr is a terminal; otherwise a phase
(reading the images, the backbone's features, a download) that took LONG_PHASE_S or more ends with one
line that says how long it took, and a training epoch says nothing here (qq.py prints its line).
TQDM_DISABLE=1, or qq.py --quiet, turns both off. tqdm is imported only for a terminal, and a terminal without
it (the grading-only install, requirements-predict.txt) gets what a log gets.
"""

import os
import sys
import time

LONG_PHASE_S = 5  # a phase that ends sooner needs no line in a log: the next line comes at once anyway


def quiet():
    """True when TQDM_DISABLE is set (to anything but 0, false or no), as tqdm reads it, or qq.py --quiet set it."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress(iterable=None, desc="", unit="it", total=None, log=True, disable=False):
    """iterable wrapped as tqdm would wrap it (set_postfix, update and close included), drawn as a bar on a
    terminal with tqdm installed; otherwise one line when it ends (log=False: none, for a loop whose caller prints
    its own)."""
    if disable or quiet():
        return Progress(iterable, desc, unit, total, log=False)
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            return Progress(iterable, desc, unit, total, log)
        return tqdm(iterable, desc, total=total, unit=unit, unit_scale=unit == "B", leave=False, dynamic_ncols=True)
    return Progress(iterable, desc, unit, total, log)


class Progress:
    """The plain stand-in for a bar: counts, and prints 'desc: N unit in S s' once at the end when log is True and
    the phase was long."""

    def __init__(self, iterable, desc, unit, total, log):
        self.iterable, self.desc, self.unit, self.total, self.log = iterable, desc, unit, total, log
        self.n, self.start, self.closed = 0, time.perf_counter(), False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *args, **kwargs):
        pass  # the caller prints the figures at the end of the phase

    def close(self):
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.start
        if self.log and seconds >= LONG_PHASE_S:
            amount = f"{self.n / 2**20:.1f} MB" if self.unit == "B" else f"{self.n} {self.unit}"
            print(f"{self.desc}: {amount} in {seconds:.1f} s", file=sys.stderr, flush=True)
