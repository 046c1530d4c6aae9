"""Progress bars of every command: tqdm's bar on a terminal; in a log (no terminal), a line every 10 %.

Without a terminal tqdm still redraws its bar with a carriage return many times a second, and CI logs and log
files show each redraw as a line of its own (the demo's training alone made some 400). `progress_bar` keeps the
bar where someone watches it and otherwise prints one plain line per 10 % of the total (and at least one every 10
minutes; one a minute when the total is unknown), plus the final state.

For programs that watch a command (the studio, musubi_tuner.ui): with the environment variable MUSUBI_PROGRESS_FILE
set to a path, every bar also appends its state to that file as one JSON line, at most REPORT_SECONDS apart and when
it closes: {"desc", "n", "total", "elapsed", "remaining", "rate", "unit", "postfix", "closed", "time"} (seconds; remaining
and rate are null until known).

A bar is a side output: a stream it cannot write (a log on a full disk, stderr closed or None as under pythonw) turns
that bar's output off; the work it shows goes on (`LostQuietly`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from tqdm import tqdm
from tqdm.utils import ObjectWrapper

# The bars of these commands never coordinate across processes, and a forked process (a data-loader worker, a
# process of a group) starts with a lock of its own. tqdm's default lock adds a multiprocessing lock shared with every
# process forked after a bar exists, and a fork copies a thread lock as it is: held, if another thread (tqdm's monitor,
# a bar writing to a full pipe) held it at that moment. Every bar of the child then waited for ever (two
# context-parallel test groups hung so). No monitor thread either: it only re-draws bars that stalled.
tqdm.set_lock(threading.RLock())
tqdm.monitor_interval = 0
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: tqdm.set_lock(threading.RLock()))

LOG_PERCENT_STEP = 10        # a line each time the count crosses another 10 % of the total
LOG_SECONDS_WITHOUT_TOTAL = 60
LOG_SECONDS_WITH_TOTAL = 600  # at most this long without a line, whatever the share of the total done
PROGRESS_FILE_VARIABLE = "MUSUBI_PROGRESS_FILE"
REPORT_SECONDS = 0.5


def progress_bar(*, total: int | None = None, desc: str | None = None, **kwargs) -> tqdm:
    """tqdm(total=..., desc=..., **kwargs) on a terminal, a `LogLines` bar otherwise (same interface)."""
    stream = kwargs.get("file") or sys.stderr
    try:
        on_terminal = bool(getattr(stream, "isatty", lambda: False)())
    except (OSError, ValueError):  # a closed stream
        on_terminal = False
    bar = tqdm if on_terminal else LogLines
    if os.environ.get(PROGRESS_FILE_VARIABLE):
        bar = _REPORTING[bar]
    return bar(total=total, desc=desc, **{**kwargs, "file": LostQuietly(stream)})


class LostQuietly(ObjectWrapper):
    """A bar's stream whose first failed write turns it off (later lines are dropped) instead of failing the work
    the bar shows. Without it the first progress line on a full disk ended a training run with status 1 and no word
    (the traceback could not be written either). tqdm itself forgives only EIO and a closed file.

    A reader that stops early (BrokenPipeError: `2>&1 | head`) still ends the command, quietly with 141, as
    errors.run_cli documents for every command."""

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.wrapper_setattr("lost", wrapped is None)  # sys.stderr is None under pythonw, or when fd 2 was closed

    def write(self, text):
        return self._quietly("write", text)

    def flush(self):
        return self._quietly("flush")

    def _quietly(self, method: str, *args):
        call = None if self.wrapper_getattr("lost") else getattr(self._wrapped, method, None)
        if call is None:
            return None
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError):
            self.wrapper_setattr("lost", True)
            return None

    def __eq__(self, other):  # tqdm finds the bars of a stream by comparing their streams with it
        return self._wrapped == getattr(other, "_wrapped", other)

    __hash__ = None


class LogLines(tqdm):
    """A tqdm that writes whole lines: the start, each LOG_PERCENT_STEP % of `total` or LOG_SECONDS_WITH_TOTAL seconds
    (each LOG_SECONDS_WITHOUT_TOTAL seconds without one) and the end; set_postfix and refreshes in between print nothing."""

    def __init__(self, *args, **kwargs):
        self._printed_n: int | None = None
        self._printed_at = 0.0
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg is not None:  # a clear ('') or tqdm's own notice: nothing to clear in a log
            return False
        if self._due():
            self._emit()
        return True

    def close(self):
        if not self.disable and self.n != self._printed_n:
            self._emit()  # the final count, unless it is the last line printed
        self.leave = False  # tqdm's close would redraw and end the line: done above
        super().close()

    def _due(self) -> bool:
        if self._printed_n is None:
            return True
        if self.total and self.n * 100 // self.total // LOG_PERCENT_STEP > self._printed_n * 100 // self.total // LOG_PERCENT_STEP:
            return True
        # and a line at least every so often: 10 % of a 2**63-step run never came, and the log looked hung (fuzz_as 1)
        return time.monotonic() - self._printed_at >= (LOG_SECONDS_WITH_TOTAL if self.total else LOG_SECONDS_WITHOUT_TOTAL)

    def _emit(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._printed_n, self._printed_at = self.n, time.monotonic()


class _Reports:
    """Mixed into a bar class: appends the bar's state to $MUSUBI_PROGRESS_FILE as JSON lines (see the module doc)."""

    def __init__(self, *args, **kwargs):
        self._reported_at = 0.0
        super().__init__(*args, **kwargs)
        self._report(closed=False)

    def update(self, n=1):
        shown = super().update(n)
        if time.monotonic() - self._reported_at >= REPORT_SECONDS or (self.total and self.n >= self.total):
            self._report(closed=False)
        return shown

    def close(self):
        if not self.disable and not getattr(self, "_report_closed", False):
            self._report_closed = True
            self._report(closed=True)
        super().close()

    def _report(self, closed: bool) -> None:
        path = os.environ.get(PROGRESS_FILE_VARIABLE)
        if self.disable or not path:
            return
        state = self.format_dict
        done = state["n"] - (state.get("initial") or 0)  # a resumed run's bar starts at its step: those took no time here
        rate = state.get("rate") or (done / state["elapsed"] if done > 0 and state["elapsed"] else None)  # (they were "ETA 0:00": fuzz_ao 11)
        total = state.get("total")
        line = {"desc": state.get("prefix") or "", "n": state["n"], "total": total, "elapsed": round(state["elapsed"], 3),
                "remaining": (total - state["n"]) / rate if rate and total else None,
                "rate": rate, "unit": state.get("unit", "it"), "postfix": state.get("postfix") or "", "closed": closed,
                "time": time.time()}
        try:
            with open(path, "a", encoding="utf-8") as f:  # one short append per line: whole lines even with several writers
                f.write(json.dumps(line) + "\n")
        except OSError:
            pass  # a watcher's file must never stop the work it watches
        self._reported_at = time.monotonic()


_REPORTING = {kind: type(f"Reporting{kind.__name__}", (_Reports, kind), {}) for kind in (tqdm, LogLines)}
