"""Side outputs never cost a command its result: a stdout or stderr that is closed or on a full disk, and training
logs (--log_with tensorboard) that cannot be written, lose only what was meant for them.

The commands run as subprocesses, as users start them, with the real thing: /dev/full (ENOSPC on every write),
descriptors closed before the command starts (`>&-`), a file-size limit (RLIMIT_FSIZE) and, where this process may
mount one, a full tmpfs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_cached_dataset
from musubi_tuner.demo.tiny_dit import TINY_DIT, random_dit_state_dict, write_dit
from musubi_tuner.files import StateDictFile

ROOT = Path(__file__).resolve().parents[1]
DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="closes descriptors and limits files the POSIX way")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    dit = write_dit(root / "dit.pt", random_dit_state_dict(TINY_DIT), TINY_DIT, "pt")
    return dit, write_cached_dataset(root / "data", items=3, frames=5, size=(32, 32))


def train_argv(data, out: Path, *extra: str, steps: int = 3, dim: int = 4) -> list[str]:
    dit, toml = data
    return [str(ROOT / "src" / "musubi_tuner" / "hv_train_network.py"), "--dit", str(dit), "--dataset_config", str(toml),
            "--sdpa", "--network_module", "networks.lora", "--network_dim", str(dim), "--network_alpha", str(dim),
            "--learning_rate", "1e-3", "--optimizer_type", "adamw", "--seed", "7", "--dit_dtype", "float32",
            "--max_data_loader_n_workers", "0", "--max_train_steps", str(steps), "--output_dir", str(out), "--output_name", "tiny",
            *extra]


def run(argv: list[str], *, close: tuple[int, ...] = (), preexec=None, timeout: float = 600, **streams) -> subprocess.CompletedProcess:
    """`python argv` with the descriptors in `close` closed before it starts, as `cmd >&- 2>&-` does."""

    def before_exec():
        for fd in close:
            os.close(fd)
        if preexec is not None:
            preexec()

    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **streams}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, preexec_fn=before_exec, timeout=timeout, text=True, **streams)


def whole_lora(path: Path) -> None:
    weights = StateDictFile(path).load_all()
    assert any(k.endswith("lora_up.weight") for k in weights) and all(torch.isfinite(v).all() for v in weights.values())


def no_traceback(text: str | None) -> None:
    assert "Traceback" not in (text or "") and "Exception in thread" not in (text or ""), text[-3000:]


# -- stdout and stderr

STREAMS = {
    "stderr on a full disk": dict(stderr="full"),
    "stderr closed": dict(close=(2,)),
    "stdout closed": dict(close=(1,)),
    "stdout and stderr closed": dict(close=(1, 2)),
    "stdout on a full disk": dict(stdout="full"),
}


@pytest.mark.parametrize("situation", list(STREAMS))
def test_training_finishes_and_saves_with_stdout_or_stderr_closed_or_on_a_full_disk(data, tmp_path, situation):
    """Before: the first progress line on a full or closed stderr ended the run with status 1 and no word; a closed or
    full stdout turned a run that had saved its LoRA into a traceback and status 1 at its last line."""
    given = dict(STREAMS[situation])
    if "full" in given.values():
        if not DEV_FULL.exists():
            pytest.skip("needs /dev/full")
        given = {name: open(DEV_FULL, "w") if value == "full" else value for name, value in given.items()}
    done = run(train_argv(data, tmp_path / "out"), **given)
    for value in given.values():
        if hasattr(value, "close"):
            value.close()
    assert done.returncode == 0, (done.stdout, done.stderr)
    whole_lora(tmp_path / "out" / "tiny.safetensors")
    for text in (done.stdout, done.stderr):
        no_traceback(text)
    if situation == "stdout on a full disk":  # what was printed there is lost, and said so, once
        said = [line for line in done.stderr.splitlines() if "stdout:" in line]
        assert len(said) == 1 and re.search(r"stdout: cannot write \(No space left on device\)", said[0]), done.stderr
    if situation == "stderr closed":
        assert "saved " in done.stdout


@pytest.fixture(scope="module")
def lora(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    done = run(train_argv(data, out, steps=1))
    assert done.returncode == 0, done.stderr
    return out / "tiny.safetensors"


def test_a_report_on_a_closed_stdout_is_dropped_and_one_on_a_full_disk_is_the_commands_error(lora):
    """lora_info's report is its result: a closed stdout is the user's choice to drop it (status 0), a full disk under
    it is the command's error, in a line on stderr (status 2), not a traceback (status 1)."""
    info = [str(ROOT / "src" / "musubi_tuner" / "lora_info.py"), str(lora)]
    closed = run(info, close=(1,))
    assert closed.returncode == 0 and closed.stderr == "", closed.stderr
    if DEV_FULL.exists():
        with open(DEV_FULL, "w") as full:
            failed = run(info, stdout=full)
        assert failed.returncode == 2, failed.stderr
        assert failed.stderr.splitlines() == ["error: stdout: cannot write the report (No space left on device)"]
        with open(DEV_FULL, "w") as full:
            stderr_full = run(info, stderr=full)
        assert stderr_full.returncode == 0 and "tiny.safetensors" in stderr_full.stdout


def test_closed_stdout_and_stderr_descriptors_are_not_given_to_the_files_a_command_opens(tmp_path):
    """With fd 1 or 2 closed, the first file a command opened got that number, and what C code (or a print) wrote to
    stdout or stderr went into the file. run_cli points them at os.devnull first."""
    record = tmp_path / "fd.txt"
    script = ("import logging, sys; from musubi_tuner.errors import run_cli\n"
              "def main(argv):\n"
              f"    f = open({str(record)!r}, 'w'); f.write(str(f.fileno())); f.close()\n"
              "    print('to stdout'); print('to stderr', file=sys.stderr); logging.getLogger('x').warning('a warning')\n"
              "run_cli(main, [])\n")
    done = run(["-c", script], close=(1, 2), stdout=None, stderr=None)
    assert done.returncode == 0
    assert int(record.read_text()) > 2


# -- progress bars

def test_a_progress_bar_whose_stream_fails_turns_off_and_the_work_goes_on(monkeypatch):
    from musubi_tuner.progress import progress_bar

    streams = [open(os.devnull, "w")]
    if DEV_FULL.exists():
        streams.append(open(DEV_FULL, "w"))  # ENOSPC on every write, as a log on a full disk
    monkeypatch.setattr(sys, "stderr", None)  # as under pythonw, or with fd 2 closed at start
    for file in [None, *streams]:
        bar = progress_bar(total=20, desc="steps", file=file, mininterval=0)
        for _ in range(20):
            bar.update(1)
            bar.set_postfix(loss=0.5)
        bar.close()
        assert bar.n == 20
    for stream in streams:
        try:
            stream.close()
        except OSError:  # /dev/full: what the text layer still holds
            pass


def test_a_reader_that_stops_early_still_ends_a_progress_bar_with_a_broken_pipe():
    """`cmd 2>&1 | head`: as errors.run_cli documents, a closed pipe ends the command (quietly, with 141). In a process
    of its own: tqdm keeps its lock when a line fails inside it, which the process then ends with."""
    script = ("import os, sys\nfrom musubi_tuner.progress import progress_bar\n"
              "read, write = os.pipe()\npipe = open(write, 'w', buffering=1)\n"
              "bar = progress_bar(total=10, desc='steps', file=pipe, mininterval=0)\n"  # its first line, read
              "os.close(read)\n"  # the reader stops
              "try:\n    bar.update(10)\nexcept BrokenPipeError:\n    os._exit(41)\nos._exit(0)\n")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 41


def test_a_process_forked_while_another_thread_writes_a_bar_has_bars_of_its_own():
    """A fork copies a lock as it is: held, when another thread was inside a bar at that moment (tqdm's lock; a line to
    a full pipe). Every bar of the child then waited for ever: two context-parallel test groups hung so."""
    script = ("import os, threading\nfrom musubi_tuner.progress import progress_bar\nfrom tqdm import tqdm\n"
              "held, done = threading.Event(), threading.Event()\n"
              "def writer():\n    with tqdm.get_lock():\n        held.set()\n        done.wait()\n"
              "threading.Thread(target=writer, daemon=True).start()\nheld.wait()\n"
              "pid = os.fork()\n"
              "if pid == 0:\n    progress_bar(total=1, desc='child', file=open(os.devnull, 'w')).close()\n    os._exit(0)\n"
              "status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\ndone.set()\nos._exit(status)\n")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60).returncode == 0


# -- training logs (--log_with tensorboard)

def file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: a write past it gets EFBIG

    return apply


def private_full_tmpfs(folder: Path):
    """A preexec_fn: the command's process sees a full 64 KiB tmpfs at `folder` (its own mount namespace)."""

    def apply():
        libc = ctypes.CDLL(None, use_errno=True)
        clone_newns, ms_rec, ms_private = 0x20000, 16384, 1 << 18
        if (libc.unshare(clone_newns) != 0 or libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0
                or libc.mount(b"tmpfs", bytes(folder), b"tmpfs", 0, b"size=64k") != 0):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        with open(folder / ".filler", "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC

    return apply


def tmpfs_mounts_work(tmp_path: Path) -> bool:
    folder = tmp_path / "probe"
    folder.mkdir()
    try:
        done = subprocess.run(["true"], preexec_fn=private_full_tmpfs(folder), timeout=60)
    except (subprocess.SubprocessError, OSError):
        return False
    return done.returncode == 0


@pytest.mark.parametrize("where", ["file-size limit met mid-run", "full disk from the start"])
def test_training_logs_that_cannot_be_written_are_said_once_and_the_run_trains_on_and_saves(data, tmp_path, where):
    """Before: TensorBoard's full disk killed the run mid-way (the writer thread's traceback, then the training's),
    and the steps done were lost; a disk full from the start failed in SummaryWriter before step 1."""
    logs = tmp_path / "logs"
    logs.mkdir()
    if where == "file-size limit met mid-run":
        # the event file grows ~160 bytes a step: past 32 KiB near step 200, which the LoRA (rank 1, fp16) fits in
        argv = train_argv(data, tmp_path / "out", "--save_precision", "fp16", "--log_with", "tensorboard", "--logging_dir",
                          str(logs), steps=240, dim=1)
        done = run(argv, preexec=file_size_limit(32 * 1024))
    else:
        if not tmpfs_mounts_work(tmp_path):
            pytest.skip("needs to mount a tmpfs in a private mount namespace (root with CAP_SYS_ADMIN)")
        argv = train_argv(data, tmp_path / "out", "--log_with", "tensorboard", "--logging_dir", str(logs), steps=3)
        done = run(argv, preexec=private_full_tmpfs(logs))
    assert done.returncode == 0, done.stderr[-3000:]
    no_traceback(done.stderr)
    said = [line for line in done.stderr.splitlines() if "cannot write the training logs" in line]
    assert len(said) == 1, done.stderr[-3000:]
    assert re.search(rf"--logging_dir {re.escape(str(logs))}\S*: cannot write the training logs \((File too large|No space left "
                     r"on device)\); logging is off for the rest of the run", said[0]), said
    whole_lora(tmp_path / "out" / "tiny.safetensors")
    if where == "file-size limit met mid-run":  # it logged until the limit
        (events,) = logs.rglob("events.out.tfevents.*")
        assert events.stat().st_size > 16 * 1024
