"""The seed's commands as child processes: the command file, the `accelerate launch` line of training, and the
command as the seed types it (`python src/musubi_tuner/X.py ...`), for the demo and the studio to run and show."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import musubi_tuner

SCRIPTS = Path(musubi_tuner.__file__).resolve().parent


def script(name: str) -> str:
    """The command file as the seed types it: src/musubi_tuner/X.py when run from the repository, else its full path."""
    path = SCRIPTS / name
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def python_command(name: str, flags: list[str]) -> list[str]:
    """`python src/musubi_tuner/<name> flags...` with this interpreter."""
    return [sys.executable, script(name), *flags]


def training_command(flags: list[str], mixed_precision: str = "bf16", quiet: bool = False) -> list[str]:
    """The seed's `accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 hv_train_network.py ...`;
    `quiet`: with accelerate's -q, so that a failed run ends with the trainer's one-line error, not with accelerate's
    traceback of the launch repeating it."""
    return [sys.executable, "-m", "accelerate.commands.launch", *(["-q"] if quiet else []), "--num_cpu_threads_per_process",
            "1", "--mixed_precision", mixed_precision, script("hv_train_network.py"), *flags]


def shown(cmd: list[str], one_line: bool = False) -> str:
    """The command as a user types it: `python` for this interpreter, `accelerate launch` for its module form.
    `one_line`: a word with a line break in bash's $'...' form (for a log, read line by line)."""
    parts = ["python" if c == sys.executable else c for c in cmd]
    if parts[1:3] == ["-m", "accelerate.commands.launch"]:
        parts = ["accelerate", "launch"] + parts[3:]
    return " ".join(_quoted(p) if one_line else shlex.quote(p) for p in parts)


def _quoted(word: str) -> str:
    """shlex.quote, but one line whatever the word holds: a word with a line break or another control character in bash's
    $'...' form (a multi-line prompt spread a job log's command over lines, where a prompt line "saved x.mp4" then read
    as the job's output: fuzz_ac 10)."""
    if not any(ord(c) < 32 or ord(c) == 127 for c in word):
        return shlex.quote(word)
    named = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "$'" + "".join(named.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in word) + "'"


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ for a child command: accelerate on the CPU where there is no GPU (unless the user chose)."""
    env = dict(os.environ, **(extra or {}))
    if "ACCELERATE_USE_CPU" not in env:  # (asking torch costs its import: not in a child that inherits the answer)
        env["ACCELERATE_USE_CPU"] = "" if _has_gpu() else "1"
    return env


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
