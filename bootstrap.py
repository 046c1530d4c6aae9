#!/usr/bin/env python3
"""One command for each of the things a new user does first, on Linux, macOS and Windows alike.

    python bootstrap.py demo    # venv + install + the whole job on tiny built-in models (cache -> train -> merge -> mp4)
    python bootstrap.py test    # venv + install + the whole test suite
    python bootstrap.py ui      # venv + install + the studio, a local web app over the same commands (127.0.0.1:7860)

Each creates `.venv` beside this file on first use and reuse it afterwards (it is reinstalled when
pyproject.toml changes). Extra arguments after the command go to the demo or to pytest.

PyTorch: on a machine without an NVIDIA GPU the CPU build `torch==2.13.0` is installed first, so pip
never downloads a multi-GB CUDA build. Override with the environment variables
MUSUBI_TORCH_SPEC (e.g. "torch==2.7.1") and MUSUBI_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
# The demo needs only a plain install (what the seed's five commands use is a core dependency); the tests add theirs.
EXTRAS = {"demo": None, "test": "test", "ui": "ui"}
# The studio's browser tests drive Debian's chromium package (never a browser download); `test` installs it with
# apt-get where it is missing and apt can run (CI runs as root on Debian). Elsewhere those tests skip and say why.
CHROMIUM_PACKAGE = "chromium"


def venv_python(venv_dir: Path = VENV) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def find_chromium() -> str | None:
    """A chromium to drive: $MUSUBI_CHROMIUM, Debian's /usr/bin/chromium, or one on PATH."""
    for candidate in (os.environ.get("MUSUBI_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_chromium() -> None:
    if find_chromium() is not None:
        return
    apt = shutil.which("apt-get")
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    prefix = [] if as_root else (["sudo", "-n"] if shutil.which("sudo") else None)
    if apt is None or prefix is None:
        print("note: no chromium found and apt-get cannot install it here; the studio's browser tests will be skipped "
              "(install a chromium and set MUSUBI_CHROMIUM to run them)", flush=True)
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([*prefix, apt, "update"], [*prefix, apt, "install", "-y", "--no-install-recommends", CHROMIUM_PACKAGE]):
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, env=env).returncode != 0:
            print("note: installing chromium failed; the studio's browser tests will be skipped", flush=True)
            return


def run(cmd: list[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def install(python: Path, extra: str | None) -> None:
    """PyTorch first (a CPU build where there is no NVIDIA GPU), then this package: `pip install -e .[extra]`."""
    torch_spec = os.environ.get("MUSUBI_TORCH_SPEC") or ("torch>=2.5" if has_nvidia_gpu() else "torch==2.13.0")
    torch_cmd = [python, "-m", "pip", "install", torch_spec]
    if os.environ.get("MUSUBI_TORCH_INDEX"):
        torch_cmd += ["--index-url", os.environ["MUSUBI_TORCH_INDEX"]]
    run(torch_cmd)
    run([python, "-m", "pip", "install", "-e", f".[{extra}]" if extra else "."])


def ensure_environment(extra: str | None) -> Path:
    if sys.version_info < (3, 10):
        sys.exit(f"Python 3.10 or newer is needed (this is {sys.version.split()[0]}).")
    python = venv_python()
    if not python.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    # Reinstall only when what we would install changed.
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + str(extra).encode()).hexdigest()[:16]
    stamp = VENV / f".installed-{extra or 'plain'}"
    if stamp.exists() and stamp.read_text() == digest:
        return python
    install(python, extra)
    stamp.write_text(digest)
    return python


def test_workers(rest: list[str]) -> list[str]:
    """Run the tests on every core (at most 4 workers: each loads PyTorch), unless the arguments choose."""
    workers = min(os.cpu_count() or 1, 4)
    if workers < 2 or any(a.startswith(("-n", "--numprocesses", "-p")) for a in rest):
        return []
    return ["-n", str(workers), "--dist", "worksteal"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_environment(EXTRAS[command])
    if command == "demo":
        cmd = [python, "-m", "musubi_tuner.demo", *rest]
    elif command == "ui":
        cmd = [python, "-m", "musubi_tuner.ui", *rest]
    else:
        ensure_chromium()
        cmd = [python, "-m", "pytest", "-q", *test_workers(rest), *rest]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
