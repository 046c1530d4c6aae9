"""Run a command as its own process, quickly: forked from a server process that has imported every command once.

Each run is a real process with its own exit status, stdout, stderr, file-size limit and mount namespace, killed
by real signals; only the ~3 s of importing torch and the commands is shared (multiprocessing's forkserver).

    result = run_command("merge_lora", argv, cwd=tmp_path, file_size_limit=4096)
    assert result.code == 2 and result.error_lines == [...]
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import itertools
import multiprocessing
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("cache_latents", "cache_text_encoder_outputs", "hv_train_network", "merge_lora", "hv_generate_video",
            "convert_lora", "lora_info", "lora_doctor", "plan")
PRELOAD = ["torch", "musubi_tuner.training.loop", "musubi_tuner.inference.pipeline", "musubi_tuner.hunyuan.vae",
           "musubi_tuner.hunyuan.text_encoders", "musubi_tuner.networks.lora", "musubi_tuner.networks.merge",
           *(f"musubi_tuner.{c}" for c in COMMANDS)]
_context = None
_fifo_dir: Path | None = None
_numbers = itertools.count()


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error: ")]


class Started:
    """A command running in the background: `.process` (kill it), `.wait()` for its Result."""

    def __init__(self, process, out: "_Drain", err: "_Drain"):
        self.process, self._out, self._err = process, out, err

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 600) -> Result:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"the command ran over {timeout} s")
        return Result(self.process.exitcode, self._out.text(), self._err.text())

    def stderr_so_far(self) -> str:
        return self._err.text(wait=False)


class _Drain:
    """A named pipe the child writes its stdout or stderr into, read by a thread here: a pipe, unlike a file, is
    not subject to the child's file-size limit."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as f:  # blocks until the child opens the pipe for writing
            while chunk := f.read1(65536):
                self._chunks.append(chunk)
        self.path.unlink(missing_ok=True)

    def text(self, wait: bool = True) -> str:
        if wait:
            self._thread.join(60)
        return b"".join(self._chunks).decode(errors="replace")


def start_command(command: str, argv: list[str], cwd: Path, *, file_size_limit: int | None = None,
                  memory_headroom: int | None = None, read_only: Path | None = None, env: dict[str, str] | None = None,
                  small_disk: tuple[Path, int] | None = None, open_files: int | None = None) -> Started:
    """Start `python src/musubi_tuner/{command}.py argv` as a fresh process (see the module docstring). `small_disk`:
    (folder, bytes): a file system of that size mounted on the folder for the process only (a disk almost full).
    `open_files`: its limit on open files (RLIMIT_NOFILE, soft and hard: `ulimit -n`)."""
    cwd = Path(cwd)
    global _fifo_dir
    _fifo_dir = _fifo_dir or Path(tempfile.mkdtemp(prefix="musubi-commands-"))
    stem = _fifo_dir / f"{command}-{next(_numbers)}"
    out, err = _Drain(stem.with_suffix(".out")), _Drain(stem.with_suffix(".err"))
    process = _server().Process(target=_child, args=(command, [str(a) for a in argv], str(cwd), str(out.path), str(err.path),
                                                      file_size_limit, memory_headroom, str(read_only) if read_only else None,
                                                      env or {}, small_disk and (str(small_disk[0]), small_disk[1]), open_files))
    process.start()
    return Started(process, out, err)


def run_command(command: str, argv: list[str], cwd: Path, **kwargs) -> Result:
    return start_command(command, argv, cwd, **kwargs).wait()


def read_only_mounts_work() -> bool:
    """Whether a child can mount a folder read-only in its own mount namespace (root with CAP_SYS_ADMIN)."""
    if not sys.platform.startswith("linux"):
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"musubi-ro-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    pid = os.fork()
    if pid == 0:
        try:
            _mount_read_only(probe)
            (probe / "x").write_text("x")
        except OSError as e:
            os._exit(0 if e.errno == errno.EROFS else 1)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    os.rmdir(probe)
    return os.waitstatus_to_exitcode(status) == 0


def _mount_read_only(folder: Path) -> None:
    """Make `folder` read-only for this process only: a private mount namespace with a read-only bind mount."""
    libc = ctypes.CDLL(None, use_errno=True)
    ms_bind, ms_remount, ms_rdonly = 4096, 32, 1
    _private_mounts(libc, lambda: libc.mount(bytes(folder), bytes(folder), None, ms_bind, None),
                    lambda: libc.mount(bytes(folder), bytes(folder), None, ms_bind | ms_remount | ms_rdonly, None))


def _mount_small_disk(folder: Path, size: int) -> None:
    """A tmpfs of `size` bytes on `folder` for this process only: its files then meet ENOSPC as on a full disk."""
    libc = ctypes.CDLL(None, use_errno=True)
    folder.mkdir(parents=True, exist_ok=True)
    _private_mounts(libc, lambda: libc.mount(b"tmpfs", bytes(folder), b"tmpfs", 0, f"size={size}".encode()))


def _private_mounts(libc, *mounts) -> None:
    clone_newns, ms_rec, ms_private = 0x20000, 16384, 1 << 18
    for call in (lambda: libc.unshare(clone_newns), lambda: libc.mount(b"none", b"/", None, ms_rec | ms_private, None), *mounts):
        if call() != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))


def _child(command, argv, cwd, out, err, file_size_limit, memory_headroom, read_only, env, small_disk=None, open_files=None) -> None:
    """The command's process: its own stdout/stderr files, limits and mounts, then `main(argv)` as the script runs it.

    `memory_headroom`: bytes of address space the command may map beyond what the process holds when it starts
    (RLIMIT_AS): an allocation past it fails as it does on a machine out of memory."""
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(cwd)
    os.environ.update(env)
    sys.argv = [f"src/musubi_tuner/{command}.py", *argv]
    if read_only:
        _mount_read_only(Path(read_only))
    if small_disk:
        _mount_small_disk(Path(small_disk[0]), small_disk[1])
    if file_size_limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    if open_files is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    import torch

    torch.set_num_threads(1)
    main = importlib.import_module(f"musubi_tuner.{command}").main
    if memory_headroom is not None:
        import resource

        mapped = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_headroom, mapped + memory_headroom))
    try:
        main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def no_traceback(result: Result) -> None:
    assert "Traceback" not in result.err, result.err[-3000:]
    assert not re.search(r"^\w+(Error|Exception): ", result.err, flags=re.M), result.err[-3000:]
