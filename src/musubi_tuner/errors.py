"""User-facing errors: one line that names the culprit and the fix, no traceback unless asked for."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem with something the user gave us (a file, a flag, a dataset entry).

    The message is printed as a single line without a traceback; it should name the file or flag,
    say what is wrong and, where there is one, the fix.
    """


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("MUSUBI_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a command's main(); turn UserError into `error: ...` on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except UserError as e:
        if debug_requested(argv):
            raise
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def print_report(text: str) -> None:
    """Print a command's report to stdout. A reader that stops early (`| head`) ends the command quietly with the status
    of a process stopped by SIGPIPE (141), as `cat` does, instead of a BrokenPipeError traceback."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush then has nowhere to fail
        sys.exit(141)


def _close_progress_bars() -> None:
    """Close bars the failure left open, so the message starts its own line instead of trailing a bar."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
