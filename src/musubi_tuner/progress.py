"""Progress bars of every command: tqdm's bar on a terminal; in a log (no terminal), a line every 10 %.

Without a terminal tqdm still redraws its bar with a carriage return many times a second, and CI logs and log
files show each redraw as a line of its own (the demo's training alone made some 400). `progress_bar` keeps the
bar where someone watches it and otherwise prints one plain line per 10 % of the total (or per minute when the
total is unknown), plus the final state.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_PERCENT_STEP = 10        # a line each time the count crosses another 10 % of the total
LOG_SECONDS_WITHOUT_TOTAL = 60


def progress_bar(*, total: int | None = None, desc: str | None = None, **kwargs) -> tqdm:
    """tqdm(total=..., desc=..., **kwargs) on a terminal, a `LogLines` bar otherwise (same interface)."""
    stream = kwargs.get("file") or sys.stderr
    on_terminal = getattr(stream, "isatty", lambda: False)()
    return (tqdm if on_terminal else LogLines)(total=total, desc=desc, **kwargs)


class LogLines(tqdm):
    """A tqdm that writes whole lines: the start, each LOG_PERCENT_STEP % of `total` (each LOG_SECONDS_WITHOUT_TOTAL
    seconds without one) and the end; set_postfix and refreshes in between print nothing."""

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
        if self.total:
            return self.n * 100 // self.total // LOG_PERCENT_STEP > self._printed_n * 100 // self.total // LOG_PERCENT_STEP
        return time.monotonic() - self._printed_at >= LOG_SECONDS_WITHOUT_TOTAL

    def _emit(self) -> None:
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._printed_n, self._printed_at = self.n, time.monotonic()
