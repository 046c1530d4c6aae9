"""Weight files in and out: safe loading, lazy per-tensor reading, and atomic, streaming writes.

Every file users own passes through here, so the rules live here once:
- `.pt` files load with `weights_only=True`; a pickle that would run code is refused.
- safetensors are read lazily, one tensor at a time, so a 13B model never exists twice in memory.
- Writes go to a temporary file in the same folder and are renamed into place, so a killed run
  leaves either the old whole file or the new whole file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
import pickle
import re
import secrets
import shutil
import stat
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from musubi_tuner.errors import UserError, launched, limit_met, out_of_memory, stops_held

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch


# safetensors dtype tags <-> torch dtypes (the format's spec; the same tags musubi-tuner's writer uses). Built on first
# use: the atomic writes, locks and checks here serve processes that never load torch (the studio's job supervisor).
@functools.cache
def st_dtypes() -> dict[str, "torch.dtype"]:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
            "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}


@functools.cache
def st_tags() -> dict["torch.dtype", str]:
    return {dtype: tag for tag, dtype in st_dtypes().items()}


_MAX_HEADER_BYTES = 100 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on error it is removed.

    A failed write (full disk, read-only folder) becomes a UserError that names `path`; `path` is untouched. A `path`
    that is a symbolic link has its target written, as `cp` and `>` write it (replaced, the link would become a file
    beside it, and a models folder of links to a large disk would get the file on the small one).
    """
    path = output_target(path)
    check_locks_still_held(path)
    fd = tmp_path = folder_fd = None
    try:
        with stops_held():  # a Ctrl-C between the file's creation and this knowing its name would leave it behind
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX, dir=path.parent)
            tmp_path = Path(tmp)
            if os.name == "nt":  # (an open handle would stop the rename there)
                os.close(fd)
                fd = None
            _hold_while_writing(fd)
            folder_fd = _open_folder(path.parent)
        mode = _default_mode(path)
        yield tmp_path
        if fd is not None:
            os.fsync(fd)  # (the file's data, however it was written)
        else:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(fd if fd is not None else tmp_path, mode)  # mkstemp makes 0600 files; a normal write's, once written
        try:
            os.replace(tmp_path, path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) or folder_fd is None or (now := _folder_now(folder_fd)) is None:
                raise
            # the folder was moved (renamed) while the file was written: the finished file is named in it, where the
            # folder is now, and said; it stayed there as a hidden temporary file that the next run deleted (fuzz_aq 4)
            os.replace(tmp_path.name, path.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
            tmp_path = None
            raise UserError(f"{path}: its folder was moved to {now} while this was written; the file is saved there, as "
                            f"{now / path.name}") from None
    except BaseException as e:
        left = None
        if tmp_path is not None:
            with stops_held():
                try:
                    tmp_path.unlink(missing_ok=True)
                except OSError:  # the folder refuses it too (made read-only, replaced by a file): its error was raised
                    left = tmp_path if os.path.lexists(tmp_path) else None  # instead of the write's, which every
                    # caller's handling of a failed write then missed
        if isinstance(e, OSError):  # (the final LoRA was not rescued, a failed sample grid stopped the run: fuzz_aq 8)
            error = write_error(path, e)
            raise (UserError(f"{error}; its temporary file {left} could not be removed either") if left else error) from e
        raise
    finally:
        if fd is not None:
            os.close(fd)  # (and with it the lock)
        if folder_fd is not None:
            os.close(folder_fd)


def _open_folder(folder: Path) -> int | None:
    """A descriptor of `folder` that follows it if it is moved (POSIX; None elsewhere, or when it cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return None
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None


def _folder_now(folder_fd: int) -> Path | None:
    """Where the folder of `folder_fd` is now (Linux's /proc), or None: deleted, or not to be known here."""
    try:
        now = os.readlink(f"/proc/self/fd/{folder_fd}")
    except OSError:
        return None
    return None if now.endswith(" (deleted)") or not os.path.isdir(now) else Path(now)


def output_target(path: str | os.PathLike, folder: bool = False) -> Path:
    """Where an output named `path` is written: the target of a symbolic link (as `cp` and `>` write it), refused when
    that is no file to replace (a device, a FIFO or a socket: root replaced a link to /dev/null, and with it the
    system's /dev/null, by a regular file; a link loop was replaced by a file). With `folder`, the output is a folder:
    a file in its place is not replaced either (a user's file of that name was renamed away and later deleted)."""
    given = path = Path(path)
    if os.path.islink(path):  # (False where a folder on the way may not be entered: said where it is written)
        try:
            path = Path(os.path.realpath(path, strict=True))
        except FileNotFoundError:  # dangling: the file it names is made
            path = Path(os.path.realpath(path))
        except OSError:
            raise UserError(f"{given}: cannot write: a symbolic link loop; remove the link or choose another name") from None
        if not path.parent.is_dir():
            raise UserError(f"{given}: cannot write: it is a link to {path}, whose folder does not exist")
    try:
        st = os.stat(path)
    except OSError:
        return path
    kind = next((name for test, name in _SPECIAL_FILES if test(st.st_mode)), "a file" if folder and stat.S_ISREG(st.st_mode) else None)
    if kind is not None:
        linked = f" (through a link to {path})" if path != given else ""
        raise UserError(f"{given}: cannot write: it is {kind}{linked}, not {'a folder' if folder else 'a file'} to save in; "
                        "move it away or choose another name")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`, renamed to `path` (a new name) when the block succeeds and removed with
    all it holds when it fails: a folder of many files (a video's frames) appears whole or not at all. A killed run's
    is named like atomic_write's temporary files, and leftover_temp_files(..., folders=True) finds it."""
    path = Path(path)
    check_locks_still_held(path)
    fd = tmp = None
    try:
        with stops_held():  # (as atomic_write's)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX, dir=path.parent))
            fd = os.open(tmp, os.O_RDONLY) if os.name != "nt" else None
            _hold_while_writing(fd)
            umask = os.umask(0)
            os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; give the permissions a normal mkdir would
        yield tmp
        os.rename(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with stops_held():
                shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        if isinstance(e, UserError):  # a file inside that could not be written: named where the user will look for it
            raise UserError(str(e).replace(str(tmp), str(path))) from e
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _hold_while_writing(fd: int | None) -> None:
    """Lock a temporary file or folder (flock) for as long as it is written: the pid in its name means something only
    on this machine and in this PID namespace, while the lock is seen by a run in another container on the same
    machine, or (NFSv4) on another machine writing to the same folder. Not on Windows, whose locks would block the
    writes themselves."""
    if fd is not None and os.name != "nt":
        _try_lock(fd)


def _being_written(path: Path) -> bool:
    """Whether some process holds a temporary file's or folder's _hold_while_writing lock."""
    if os.name == "nt":
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _try_lock(fd) is False
    finally:
        os.close(fd)


TEMP_SUFFIX = ".tmp"
# atomic_write's and atomic_folder's: .{target}.{pid}-{8 of mkstemp's characters}.tmp
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>[1-9][0-9]{0,9})-[a-z0-9_]{8}\.tmp")


@functools.cache
def _pid_max() -> int:
    """The largest pid this machine gives: a larger number in a name is not a pid (a date, a version)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 2**32 if os.name == "nt" else 2**22  # (Linux's ceiling; macOS stays under 100,000)


def leftover_temp_files(folder: str | os.PathLike, target=lambda name: True, *, folders: bool = False) -> list[Path]:
    """atomic_write's temporary files in `folder` whose write was killed, for targets whose name `target` accepts.

    Only names this project makes count (a user's `.notes.2023-draft.tmp` is no temporary of ours), and no
    symbolic link (ours are files and folders). A temporary file names the pid that writes it: one whose process
    still runs on this machine is a live run's and is never listed; nor is one whose writer holds its lock (a run in
    another container, or on another machine sharing the folder, whose pid means nothing here). A name without a pid
    is never taken for one (`.x.safetensors.original.tmp` is a user's). `folders`: atomic_folder's temporary folders too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        match = _TEMP_NAME.fullmatch(path.name)
        if (not match or not target(match["target"]) or path.is_symlink() or not (path.is_file() or (folders and path.is_dir()))
                or int(match["pid"]) > _pid_max()):
            continue
        if not pid_alive(int(match["pid"])) and not _being_written(path):
            found.append(path)
    return found


def remove_folder(path: str | os.PathLike) -> None:
    """Remove a folder so that a kill part-way never leaves it half there under its own name: it is first renamed to
    an atomic_folder temporary name (which no reader takes for real and leftover_temp_files(..., folders=True) finds
    once this process is gone), then deleted."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    with stops_held():  # (a Ctrl-C would leave it half deleted, to the next run's clean-up)
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        except OSError as e:
            raise write_error(path, e) from e
        if doomed.is_symlink() or not doomed.is_dir():  # a link (not what it points to), or a file: rmtree takes neither
            doomed.unlink(missing_ok=True)
        else:
            shutil.rmtree(doomed, ignore_errors=True)


SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def content_digest(path: str | os.PathLike) -> str:
    """A short digest of what a model file (or every file of a model folder) holds, from its size and 16 blocks of
    64 KiB spread over it: two different weights of the same architecture differ in every block, and a read of 1 MiB
    costs nothing beside loading the model, while its name (every official VAE is pytorch_model.pt) or its
    modification time (changed by a copy) tell nothing. A file that cannot be read is a UserError naming it."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        parts = [path] if not path.is_dir() else sorted(  # not a download tool's hidden bookkeeping (.cache/, .lock)
            p for p in path.rglob("*") if p.is_file() and not any(n.startswith(".") for n in p.relative_to(path).parts))
        for part in parts:
            size = part.stat().st_size
            digest.update(f"{part.relative_to(path) if part != path else ''}:{size}".encode())
            with open(part, "rb") as f:
                if size <= SAMPLES * SAMPLE_BYTES:  # a config, a tokenizer, a tiny model: all of it
                    digest.update(f.read())
                    continue
                for i in range(SAMPLES):  # the first block, the last, and 14 between
                    f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                    digest.update(f.read(SAMPLE_BYTES))
    except OSError as e:
        raise UserError(f"{getattr(e, 'filename', None) or path}: cannot read ({e.strerror or e})") from None
    return digest.hexdigest()[:16]


def remove_leftover_temp_files(folder: str | os.PathLike, target=lambda name: True, *, folders: bool = False) -> list[Path]:
    """Delete what leftover_temp_files lists (the same arguments), each said; returns them. Every command calls it for
    each folder it writes into, before its first write there: a killed run's temporary files go with the next run."""
    found = leftover_temp_files(folder, target, folders=folders)
    for path in found:
        with stops_held():  # (a Ctrl-C inside rmtree surfaces as "Bad file descriptor", the Ctrl-C lost)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        logger.info("removed %s (left by an interrupted run)", path)
    return found


def save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically, with the real cause of a failed write (full disk, file-size limit) in a UserError.

    torch.save to a path reports a failed write as a RuntimeError ("unexpected pos ..."); writing through a Python
    file object keeps the OSError the operating system gave.
    """
    import torch

    path = Path(path)

    class Recorder:  # torch.save's writer calls write(); the first OSError is the cause
        def __init__(self, f):
            self.f, self.error = f, None

        def write(self, data):
            try:
                return self.f.write(data)
            except OSError as e:
                self.error = self.error or e
                raise

        def flush(self):
            self.f.flush()

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        out = Recorder(f)
        try:
            torch.save(obj, out)
        except RuntimeError as e:
            if out.error is not None:
                raise out.error from None  # atomic_write names the file
            raise UserError(f"{path}: cannot write ({str(e).strip()[:160]})") from None


def require_writable_folder(folder: str | os.PathLike, flag: str, create: bool = True) -> Path:
    """Create `folder` if needed and prove it takes new files, before any long work that would write there.

    Writes and removes a probe file: os.access says yes to root on a read-only mount or a full quota.
    create=False (a --dry_run): create nothing; probe the folder, or the nearest parent that exists.
    """
    folder = Path(folder)
    if create and launched()[0] != 0:
        # one of several processes: process 0 makes the folders (and removes them if the run fails); made by another,
        # they stayed behind when that process was the one killed
        create = False
    if not create:
        while not os.path.exists(folder) and folder.parent != folder:  # (one that may not be entered: refused below)
            folder = folder.parent
    blocked = not_a_folder(folder)  # a file where a folder must be: not a permissions problem
    if blocked is not None:
        raise UserError(f"{blocked}: is {_what_is(blocked)}, not a folder; choose another {flag}")
    try:
        if create:
            make_folders(folder)
        with tempfile.TemporaryFile(dir=folder):  # unnamed where the system can (O_TMPFILE): a kill leaves nothing
            pass
    except OSError as e:
        raise UserError(f"{folder}: cannot write to this folder ({e.strerror or e}); {what_to_check(e, folder)}, or choose another "
                        f"{flag}") from None
    return folder


_CREATED_FOLDERS: list[Path] = []  # made for outputs to come (make_folders)


def make_folders(folder: Path) -> None:
    """mkdir -p, remembering the folders made: a command that fails removes those still empty (remove_created_empty_folders)."""
    missing = [above for above in (folder, *folder.parents) if not above.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    _CREATED_FOLDERS.extend(missing)


def remove_created_empty_folders() -> None:
    """The folders a command made to check where its outputs go, when it fails: those still empty are removed, deepest
    first (a typo in an output path left a tree of empty folders behind a run that failed on an input)."""
    for folder in sorted(set(_CREATED_FOLDERS), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # (only an empty one: anything written there, by this run or another, keeps it)
        except OSError:
            pass
    _CREATED_FOLDERS.clear()


def temporary_name(name: str) -> str:
    """The longest name atomic_write gives the temporary file of `name` (pids have at most 7 digits)."""
    return f".{name}.{'9' * 7}-{'x' * 8}{TEMP_SUFFIX}"


def _name_limit(folder: Path) -> tuple[Path, int]:
    """The longest name, in bytes, `folder`'s file system takes (255 on most), and the folder it was asked of."""
    while not os.path.exists(folder) and folder.parent != folder:  # (not made yet: the file system it will be on; one
        # that may not be entered is refused where it is written, naming the flag: Path.exists raised)
        folder = folder.parent
    try:
        return folder, os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # (Windows has no pathconf)
        return folder, 255


def require_names_fit(folder: str | os.PathLike, flag: str, name: str, derived: Sequence[str]) -> None:
    """Before any work: the names a command derives from `name` (given with `flag`) fit `folder`'s file system, 255
    bytes a name on most: a name that fits alone fails at its temporary file's, after the work."""
    folder, limit = _name_limit(Path(folder))
    size = lambda text: len(os.fsencode(text))  # noqa: E731
    longest = max(derived, key=size)
    if size(longest) > limit:
        most = size(name) - (size(longest) - limit)
        raise UserError(f"{flag}: {size(name)} bytes, and the names of the files it names reach {size(longest)} (such as "
                        f"{longest[:40]}...), over the {limit} bytes a name may have in {folder}; use a name of at most "
                        f"{max(most, 1)} bytes")


def unwritable_name(path: str | os.PathLike) -> str | None:
    """Why no file can be written at `path`, whatever it holds, or None: a folder has its name, or its name (with its
    temporary file's) is too long for the file system. For files named after the user's (caches after their sources),
    checked item by item before the work on each."""
    path = Path(path)
    folder, limit = _name_limit(path.parent)
    excess = len(os.fsencode(temporary_name(path.name))) - limit
    if excess > 0:
        return (f"the name of its file {path.name[:40]}... is too long for {folder} (with its temporary file's, {excess} "
                f"bytes over the {limit} a name may have); shorten the name it comes from by {excess} bytes")
    if path.is_dir():
        return f"a folder stands where its file {path} goes; move it away"
    try:  # (a FIFO, a device, a broken link there stopped the whole caching run at that item: fuzz_aq 14)
        output_target(path)
    except UserError as e:
        return str(e).removeprefix(f"{path}: ")
    return None


TRAIN_LOCK = ".musubi-train.lock"  # the lock a training run held on its whole --output_dir, still honoured where found


def train_lock(output_dir: str | os.PathLike, output_name: str) -> Path:
    """The lock a training run holds in its --output_dir for its --output_name (training.loop.take_output_lock): one
    run per name. Runs of other names share the folder, as in musubi-tuner: a sweep writing lr1e-4, lr2e-4, ... side
    by side was refused (fuzz_at 4)."""
    return Path(output_dir) / f".musubi-train.{output_name}.lock"


def running_trainings(folder: str | os.PathLike) -> list[dict]:
    """Who holds the training locks of `folder` (train_lock, and TRAIN_LOCK): live processes other than this one."""
    try:
        locks = sorted(Path(folder).glob(".musubi-train*.lock"))
    except OSError:
        return []
    return [holder for holder in map(_live_holder, locks) if holder is not None]


def names_collide(name: str | None, other: str) -> bool:
    """Whether training runs of --output_name `name` and `other` would write a file of the same name: the same name,
    or one run's step or epoch LoRA (and its state) being the other's final one ("x-step00000004"). A holder that
    records no name takes the whole folder."""
    if not isinstance(name, str):
        return True
    return name == other or any(lora_file_names(a).fullmatch(f"{b}.safetensors") for a, b in ((name, other), (other, name)))


# what a run of --output_name NAME adds to NAME in the names of its checkpoints (LoRAs and states): -step00000004, the
# step in 8 digits or more, and -000002, the epoch in 6 or more (any digits: run "t" took run "t-2"'s final state for
# its own, and --resume auto finished t with t-2's weights: fuzz_ax 13)
CHECKPOINT_SUFFIX = r"(?:-step\d{8,}|-\d{6,})"


def lora_file_names(name: str) -> re.Pattern:
    """The names of the LoRA files a run of --output_name `name` saves: final, per epoch, per step, each with its
    .comfyui copy (and no other run's: "lora" is not "lora-big" or "lora-2")."""
    return re.compile(rf"{re.escape(name)}{CHECKPOINT_SUFFIX}?(?:\.comfyui)?\.safetensors")


def _refuse_a_running_training_s_name(out: Path, output_flag: str) -> None:
    """An output named as a LoRA file a training running in its folder writes (lora_file_names) is refused: the two
    runs replaced each other's files without a word (a checkpoint became a merged DiT, an average was replaced by the
    next save). Other names beside its files (NAME-ema.safetensors) are the user's to choose."""
    for holder in running_trainings(out.parent):
        stem = holder.get("writes")
        if isinstance(stem, str) and lora_file_names(stem).fullmatch(out.name):
            raise UserError(f"{output_flag} {out}: a name of the training run writing into {out.parent} ({describe_holder(holder)}), "
                            "which would replace it, or be replaced by it; choose another name, or wait for the run to end")


def output_file_lock(out: str | os.PathLike) -> Path:
    """The lock a command holds on one output file while it writes it (a merge: minutes of work into one name)."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


def refuse_a_writer_of(out: str | os.PathLike, output_flag: str) -> None:
    """An output that another running command is writing (it holds output_file_lock) is refused, naming it: a training
    started during a merge into its LoRA's name, or a conversion into a merge's output, each said it saved its file,
    and the merge's rename then replaced it (fuzz_aq 5)."""
    holder = _live_holder(output_file_lock(out))
    if holder is not None:
        raise UserError(f"{output_flag} {out}: another command is writing this file ({describe_holder(holder)}); wait for it to "
                        "end, or choose another name")


def _live_holder(lock: Path) -> dict | None:
    """Who holds the lock file `lock`, when a live process of another pid does (probed with a shared lock, released at
    once); None when no one does."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None  # no such lock
    try:
        locked = _try_lock(fd, shared=True)
        holder = _read_holder(fd)
    finally:
        os.close(fd)  # (releases what the probe took)
    running = locked is False or (locked is None and _alive_here(holder))
    return holder if running and holder.get("pid") != os.getpid() else None


def files_within(path: str | os.PathLike | None) -> list[Path]:
    """A model given as a file or a folder (a text encoder's): the file, or the files in the folder."""
    if not path:
        return []
    path = Path(path)
    try:
        return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    except OSError:
        return [path]


def check_output_file(output: str | os.PathLike, output_flag: str, inputs: Mapping[str, Sequence]) -> None:
    """Before any work: the output's folder takes new files (require_writable_folder), its name leaves room for its
    temporary file's, and the output is none of the command's own inputs (the same file under any name or link):
    writing it would replace what the run reads, and a base model or a checkpoint would be gone."""
    out = Path(output)
    require_writable_folder(out.parent, output_flag)
    require_names_fit(out.parent, output_flag, out.name, [temporary_name(out.name)])
    target = output_target(out)  # (a link to a device or a FIFO, a link loop: said now, not after the work)
    if target.is_dir():  # (found at the final rename, after a merge's minutes and a full-size temporary file: fuzz_aq 1)
        raise UserError(f"{output_flag} {output}: cannot write: a folder has this name; move it away")
    _refuse_a_running_training_s_name(out, output_flag)
    refuse_a_writer_of(out, output_flag)
    if not out.exists():
        return
    for flag, paths in inputs.items():
        for path in paths or ():
            try:
                same = os.path.samefile(out, path)
            except OSError:
                continue
            if same:
                raise UserError(f"{output_flag} {output}: is {path}, which this command reads ({flag}); write to another "
                                f"file (rename it afterwards if you mean to replace it)")


def _default_mode(path: Path) -> int:
    """The replaced file's permissions where they let its owner read and write it, else (a new file, or one rewritten
    because it could not be read: a cache made mode 000) what a new file gets under the current umask."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o600 == 0o600:
            return mode
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def denied_on_the_way(path: str | os.PathLike) -> Path | None:
    """The first folder on the way to `path` (itself included) this process may not enter, if one is: the error names the
    deepest path, often a folder that does not exist yet, beneath the one that refuses."""
    path = Path(path)
    if not path.is_absolute():  # (the current folder itself may be the one: a relative path blamed itself, fuzz_bd 6)
        try:
            os.stat(".")
        except PermissionError:
            return denied_on_the_way(os.path.abspath(path))
        except OSError:
            return None
    for folder in [*reversed(path.parents), path]:
        try:
            is_folder = stat.S_ISDIR(os.stat(folder).st_mode)
        except OSError:
            return None
        if is_folder and not os.access(folder, os.X_OK):
            return folder
    return None


def permission_advice(path: str | os.PathLike) -> str:
    """What to fix when `path` was refused for its permissions: the folder on the way that may not be entered, if one
    may not (the advice named a folder beneath it that did not exist: fuzz_aq 9), else `path`'s."""
    denied = denied_on_the_way(path)
    return f"this user may not enter {denied}: fix its permissions" if denied is not None else f"fix the permissions of {path}"


def what_to_check(err: OSError | str | None, folder: str | os.PathLike) -> str:
    """The advice for a write into `folder` that failed with `err` (or its strerror, as a message quoted it): what the
    error is about, not free space and permissions for every cause (a file-size limit, too many open files, a name
    too long, a missing folder)."""
    if isinstance(err, str):
        number = next((n for n in errno.errorcode if os.strerror(n) == err), None)
    else:
        number = getattr(err, "errno", None)
    return {errno.EFBIG: "the file is past this process's file-size limit (ulimit -f)",
            errno.EMFILE: "this process has as many files open as it may (ulimit -n)",
            errno.ENFILE: "the system has as many files open as it may",
            errno.ENOSPC: f"free some space on the disk of {folder}",
            getattr(errno, "EDQUOT", -1): f"free some of your disk quota, which {folder} counts against",  # (not on Windows)
            errno.EROFS: f"{folder} is on a read-only file system",
            errno.EACCES: permission_advice(folder),
            errno.EPERM: permission_advice(folder),
            errno.ENAMETOOLONG: "the name is too long for the file system (255 bytes a name on most)",
            errno.ENOENT: f"a folder on the way to {folder} does not exist",
            }.get(number, f"check free space and permissions of {folder}")


def write_error(path: Path, err: OSError) -> UserError:
    """Turn a failed write (full disk, read-only folder, a file where a folder must be) into a message that names the
    file."""
    path = Path(path)
    blocked = not_a_folder(path.parent)
    if blocked is not None:
        return UserError(f"{path}: cannot write: {blocked} is {_what_is(blocked)}, not a folder")
    if err.errno == errno.ENAMETOOLONG:  # (first: asking about such a name fails too)
        return UserError(f"{path}: cannot write: the name, or its temporary file's, is too long for the file system (255 "
                         "bytes a name on most); choose a shorter one")
    try:
        folder_there = path.is_dir() and not path.is_symlink()
    except OSError:
        folder_there = False
    if err.errno == errno.EISDIR or folder_there:
        return UserError(f"{path}: cannot write: a folder has this name; move it away")
    if err.errno == errno.ENOENT and not path.parent.is_dir():
        return UserError(f"{path}: cannot write: its folder is gone (deleted or moved while the command ran)")
    return UserError(f"{path}: cannot write ({err.strerror or err}); {what_to_check(err, path.parent)}")


class LazyTensors(Mapping):
    """A mapping whose tensors are computed when written: `specs` gives each name's (dtype, shape) up front.

    Lets a 13B model be transformed and written one tensor at a time (merging LoRAs into a file).
    """

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], compute):
        self.specs = specs
        self._compute = compute

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._compute(name)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def is_utf8(text: str) -> bool:
    """Whether `text` is Unicode text, which UTF-8 writes: a file name's bytes that are not UTF-8, as Python holds
    them (escaped to lone surrogates), and a lone surrogate from a JSON escape are not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_lines(text: str) -> list[str]:
    """`text`'s lines as Python's text-mode files (and so musubi-tuner) read them: split at \\n, \\r\\n and \\r only.
    str.splitlines also splits at U+2028, U+0085 and form feeds, which JSON writers leave unescaped inside a string
    and captions pasted from web pages carry: a valid JSONL line was refused, and a prompt line became two prompts."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def not_text(text: str) -> str | None:
    """Why `text` is not Unicode text, or None: a byte that is not UTF-8 (a command line or file saved in another
    encoding: Python holds it as a lone surrogate, U+DC80..U+DCFF), or half of a surrogate pair (JSON lets `\\ud800`
    stand alone). A tokenizer given either fails with a TypeError once the models have loaded."""
    if is_utf8(text):
        return None
    at, c = next((i, c) for i, c in enumerate(text, start=1) if "\ud800" <= c <= "\udfff")
    if "\udc80" <= c <= "\udcff":
        return f"is not UTF-8 text (byte 0x{ord(c) - 0xDC00:02x} at character {at})"
    return f"holds \\u{ord(c):04x} at character {at}, half of a surrogate pair and no character"


def utf8_text(text: str) -> str:
    """`text` as Unicode text every reader takes: a byte of a file name that is not UTF-8 (held by Python as a lone
    surrogate, U+DC80..U+DCFF) as \\xNN, another lone surrogate as \\uNNNN. The safetensors library (ComfyUI,
    musubi-tuner, diffusers) refuses a header whose JSON escapes a lone surrogate."""
    if is_utf8(text):
        return text
    return "".join(c if not "\ud800" <= c <= "\udfff" else f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff"
                   else f"\\u{ord(c):04x}" for c in text)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                     cast: torch.dtype | None = None, staged: bool = False) -> None:
    """Write a safetensors file atomically, streaming tensor by tensor (no second copy of the weights).

    Tensors are written in the mapping's order; floating-point ones are cast to `cast` one at a time if
    given. `metadata` values must be strings. `staged`: `path` is already the temporary file of the caller's
    atomic_write (files that must replace their previous versions together), written as it is.
    """
    import torch

    def stored_dtype(t: torch.Tensor) -> torch.dtype:
        return cast if cast is not None and t.is_floating_point() else t.dtype

    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str: {bad}")
        header["__metadata__"] = {utf8_text(k): utf8_text(v) for k, v in metadata.items()}
    specs = getattr(tensors, "specs", None) or {name: (stored_dtype(t), tuple(t.shape)) for name, t in tensors.items()}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in st_tags():
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": st_tags()[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # (UTF-8, as the safetensors library writes it: escaped, an emoji took 12 bytes, and a long --training_comment
    # passed the 100 MB header that library reads)
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_bytes += b" " * ((8 - len(header_bytes) % 8) % 8)
    with (contextlib.nullcontext(path) if staged else atomic_write(path)) as tmp, open(tmp, "wb") as f:  # (atomic_write
        # turns a failed write into a UserError naming the file)
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, (dtype, shape) in specs.items():
            t = tensors[name].detach().to("cpu", dtype)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: computed shape {list(t.shape)} differs from the announced {list(shape)}")
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


# ----------------------------------------------------------------------------------------------- one run at a time


class RunLock:
    """Only one run at a time writes into a folder (or an output file): `with RunLock(path, ...):` around the run.

    The lock is a file holding who took it (pid, host, start time, command). A second run is refused with
    that information. The lock is an OS file lock (flock / LockFileEx), released by the OS when its holder dies,
    so a lock left by a killed run is recognised as stale and taken over, with a message. Where the file system
    has no locks, a holder on this host whose pid is gone counts as stale too.
    """

    def __init__(self, path: str | os.PathLike, what: str, flag: str, writes: str | None = None):
        self.path = Path(path)
        self.what = what  # "training run", "latent caching run", ...: how the holder is named to a second run
        self.flag = flag  # the flag that chooses the locked place, for the message
        self.writes = writes  # the stem of the files the run writes there, for other commands' outputs (check_output_file)
        self._fd: int | None = None
        self._folder = os.path.abspath(self.path.parent)  # (the name it had when taken, whatever the working folder)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        _taken_whole_or_not(self._acquire, self.release)

    def _acquire(self) -> None:
        blocked = not_a_folder(self.path.parent)
        if blocked is not None:
            raise UserError(f"{blocked}: is {_what_is(blocked)}, not a folder; choose another {self.flag}")
        try:
            make_folders(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.path.parent}: cannot create the lock file {self.path.name} ({e.strerror or e}); "
                            f"{what_to_check(e, self.path.parent)}, or choose another {self.flag}") from None
        try:
            locked = _try_lock(fd)
            holder = _read_holder(fd)
            if locked is False or (locked is None and holder and _alive_here(holder)):
                raise UserError(f"{self.path.parent}: another {self.what} is using this ({describe_holder(holder)}); wait for it "
                                f"to finish or choose another {self.flag} (if that run is gone, delete {self.path})")
            if os.fstat(fd).st_ino != _inode(self.path):  # the holder finished and removed the file meanwhile: retry
                os.close(fd)
                return self._acquire()
            if holder:
                logger.warning("%s: taking over the lock of a %s that did not finish (%s)",
                                                    self.path.parent, self.what, describe_holder(holder))
            try:
                _write_holder(fd, self.writes)
            except OSError as e:  # a full disk or quota: the file goes as release() removes it, while still locked
                _remove_quietly(self.path)
                raise UserError(f"{self.path}: cannot write the lock file ({e.strerror or e}); check free space and "
                                f"permissions of {self.path.parent}, or choose another {self.flag}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _LOCK_FDS.add(fd)
        _HELD_LOCKS.append(self)

    def still_held(self) -> bool:
        """The file at the lock's name is still the one this run locked: its folder was not deleted, moved or replaced
        (the lock would have gone with it, and another run could have taken the name since)."""
        return self._fd is not None and _same_inode(self._fd, self.path)

    @stops_held()
    def release(self) -> None:
        if self._fd is None:
            return
        if self.still_held():  # (not another run's lock, taken in a folder put where ours was)
            _remove_quietly(self.path)  # while still locked: a waiting run then finds no file, or its own
        _LOCK_FDS.discard(self._fd)
        os.close(self._fd)  # closing releases the OS lock
        self._fd = None
        if self in _HELD_LOCKS:
            _HELD_LOCKS.remove(self)


_HELD_LOCKS: list[RunLock] = []  # taken by this process, not yet released
_LOCK_FDS: set[int] = set()  # the descriptors of every lock this process holds (RunLock, FolderUse)


def close_inherited_locks() -> None:
    """In a forked child (a data-loader worker): let go of the locks of the process that forked it. An OS file lock
    belongs to the open file, which fork shares: workers that outlived their killed training by seconds kept its
    folder locked, and a rerun was refused naming the dead process. (The child's copies forget them: it neither
    releases nor removes them.)"""
    for fd in _LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()
    for lock in _HELD_LOCKS:
        lock._fd = None
    _HELD_LOCKS.clear()


def check_locks_still_held(path: str | os.PathLike) -> None:
    """Before a write into a folder one of this process's RunLocks guards: its lock file is still there. A folder
    deleted or moved under a run took the lock with it; writing on would re-create the folder, or write beside a second
    run that took it since, and both would call their files saved."""
    target = os.path.abspath(path)
    for lock in _HELD_LOCKS:
        if (target + os.sep).startswith(lock._folder + os.sep) and not lock.still_held():
            raise UserError(f"{lock._folder}: deleted, moved or replaced while this {lock.what} was writing into it (its "
                            f"lock went with it); stopped, so as not to write beside a run that may have started there "
                            f"since. Nothing was written to {path}")


def _same_inode(fd: int, path: Path) -> bool:
    try:
        there, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def _taken_whole_or_not(acquire, release):
    """A lock file is taken with a Ctrl-C held off: one between opening the file and holding it would leave the file
    behind; one that came meanwhile is raised once the lock is released again."""
    try:
        with stops_held():
            return acquire()
    except BaseException:
        release()
        raise


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class FolderUse:
    """Commands that read a folder's files against one that rewrites them: training holds a shared lock on its cache
    folders, a caching run an exclusive one. `acquire` says False when the other kind holds it; where the folder
    cannot be locked (read-only, no locks on the file system, Windows) nothing is checked and it says True.

    The lock file goes with its last holder: on release, one that can take the lock exclusively (no one else holds
    it) removes the file. A run that opened the file before its removal finds, once locked, that the name is no longer
    its file, and starts again (as RunLock does)."""

    # a holder gives way within this: its release takes the lock exclusively for the moment it removes the file, and a
    # training starting then was refused as if a caching run were writing (fuzz_at 5)
    PATIENCE_SECONDS = 0.5

    def __init__(self, path: str | os.PathLike, exclusive: bool):
        self.path = Path(path)
        self.exclusive = exclusive
        self._fd: int | None = None

    def acquire(self) -> bool:
        return _taken_whole_or_not(self._acquire, self.release)

    def _acquire(self) -> bool:
        if os.name == "nt" or not self.path.parent.is_dir():
            return True
        patience = time.monotonic() + self.PATIENCE_SECONDS
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:  # a read-only cache folder: no caching run can write there either
                return True
            locked = _try_lock(fd, shared=not self.exclusive)
            if locked is False and time.monotonic() < patience:
                os.close(fd)
                time.sleep(0.02)
                continue
            if not locked:
                os.close(fd)
                return locked is None  # None: a file system without locks
            if os.fstat(fd).st_ino == _inode(self.path):
                self._fd = fd
                _LOCK_FDS.add(fd)
                return True
            os.close(fd)  # its last holder removed it meanwhile

    @stops_held()
    def release(self) -> None:
        if self._fd is None:
            return
        if _try_lock(self._fd):  # no one else holds it: the file goes
            _remove_quietly(self.path)
        _LOCK_FDS.discard(self._fd)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderUse":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def use_holders(path: str | os.PathLike) -> str:
    """Who holds a FolderUse file, in words: the processes /proc/locks lists for it (Linux), with their command lines.
    A shared use is held by several runs at once, so none writes a holder record as a RunLock's holder does."""
    try:
        st = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return "holder unknown"
    here = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  READ  4242 08:01:1234 0 EOF" ("1: -> ..." waits for one)
        fields = line.split()
        if len(fields) >= 6 and fields[1] != "->" and fields[5] == here and fields[4].isdigit():
            pid = int(fields[4])
            if pid != os.getpid() and pid not in pids:
                pids.append(pid)
    described = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [os.path.basename(command[0].decode(errors="replace"))] + [w.decode(errors="replace") for w in command[1:] if w]
        described.append(f"pid {pid}: {' '.join(words)[:300]}")
    return "; ".join(described) or "holder unknown"


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds a RunLock file, in words (for a run that meets it from another kind of command)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "holder unknown"
    try:
        return describe_holder(_read_holder(fd))
    finally:
        os.close(fd)


def _try_lock(fd: int, shared: bool = False) -> bool | None:
    """True: locked (exclusively, or with `shared` alongside other shared holders; POSIX only); False: another process
    holds it; None: this file system has no locks."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        return None  # ENOLCK, EOPNOTSUPP: a file system without locks


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        holder = json.loads(data) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _write_holder(fd: int, writes: str | None = None) -> None:
    import socket

    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:500]}
    if writes:
        holder["writes"] = writes
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())


def _alive_here(holder: dict) -> bool:
    import socket

    if holder.get("host") != socket.gethostname():
        return True  # cannot tell for another machine: assume it runs
    return pid_alive(holder.get("pid"))


def pid_alive(pid) -> bool:
    """Whether a process with this pid exists on this machine."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            ctypes.windll.kernel32.CloseHandle(handle)
        return bool(handle)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a number beyond pid_t is no process)
        return False
    except PermissionError:
        return True
    return True


def describe_holder(holder: dict) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command', '?')}")


# ----------------------------------------------------------------------------------------------- reading


def unnamable(value: str) -> str:
    """Why no file can have `value` as its name, or "": half of a surrogate pair (a JSON escape such as \\ud800) is no
    character and no byte. (U+DC80..U+DCFF are a name's bytes that are not UTF-8, as Python holds them: names.)"""
    try:
        os.fsencode(value)
    except UnicodeEncodeError as e:
        c = value[e.start]
        if "\ud800" <= c <= "\udfff":
            return f"holds \\u{ord(c):04x} at character {e.start + 1}, half of a surrogate pair, which no file name can"
        # a character this process's locale cannot write (LC_ALL=C without Python's UTF-8 mode: é was called half of a
        # surrogate pair, fuzz_ah 1)
        return (f"holds {c} (\\u{ord(c):04x}) at character {e.start + 1}, which this process's locale cannot write in a "
                f"file name (file-system encoding {sys.getfilesystemencoding()}); run with PYTHONUTF8=1 or LANG=C.UTF-8")
    return ""


def expanded_path(value: str, at: str) -> Path:
    """A path a user wrote in a file (a dataset config, a JSONL line) as a Path, `~` expanded, or a UserError naming
    `at`: a NUL character, which no path can hold (a traceback where the path was first used), or a `~` that cannot be
    expanded (HOME unset, or `~name` of no user)."""
    if "\0" in value:
        raise UserError(f"{at}: holds a NUL character (\\u0000), which no path can; remove it")
    why = unnamable(value)
    if why:
        raise UserError(f"{at}: {why}")
    try:
        return Path(value).expanduser()
    except RuntimeError:
        user = value[1:].split("/", 1)[0].split(os.sep, 1)[0]
        why = f"no user named {user!r}" if user else "no HOME"
        raise UserError(f"{at}: cannot expand ~ ({why}); write the full path") from None


def require_file(path: str | os.PathLike, what: str = "file", flag: str | None = None, max_bytes: int | None = None) -> Path:
    """`path` as a Path, or a UserError (naming `flag` when given) that says why it cannot be read as a `what`: missing,
    a broken or looping link, a folder, not a regular file, or larger than `max_bytes`.

    Links are followed. Only a regular file is an input: a FIFO blocks the first read until another program writes to
    it (a hang), a character device such as /dev/zero never ends (a read that fills the memory) and a socket cannot be
    opened at all; each is named here, before anything opens it. `max_bytes` bounds files read whole (a caption, a
    config), whose size is a mistake, not work, when it is gigabytes."""
    path = Path(path)
    _require_regular(_stat(path, what, flag), path, what, flag, max_bytes)
    return path


def require_present(path: str | os.PathLike, what: str = "file", flag: str | None = None) -> Path:
    """`path` as a Path when it names something, a file or a folder (links followed), or a UserError that says why not
    in the words require_file uses: not found, a broken or looping link, a file where a folder must be, permissions."""
    path = Path(path)
    _stat(path, what, flag)
    return path


def require_folder(path: str | os.PathLike, what: str = "folder", flag: str | None = None) -> Path:
    """`path` as a Path when it is a folder that can be listed, or a UserError that says why not."""
    path = Path(path)
    if not stat.S_ISDIR(_stat(path, what, flag).st_mode):
        raise UserError(f"{path}: is a file, expected {_a(what)}" + (f" ({flag})" if flag else ""))
    list_folder(path, what, flag)
    return path


def list_folder(path: str | os.PathLike, what: str = "folder", flag: str | None = None) -> list[Path]:
    """The entries of a folder, sorted by name, or a UserError naming it: a folder that cannot be listed is not one
    with nothing in it (Path.glob says nothing of the difference)."""
    path = Path(path)
    try:
        return sorted(path.iterdir())
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise UserError(f"{path}: is a file, expected {_a(what)}" + (f" ({flag})" if flag else "")) from None
        if e.errno in (errno.ENOENT, errno.ELOOP):
            raise _unreadable(path, what, flag, e) from None
        raise UserError(f"{path}: cannot list this {what} ({e.strerror or e})" + (f" ({flag})" if flag else "")) from None


def _stat(path: Path, what: str, flag: str | None) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise _unreadable(path, what, flag, e) from None
    except ValueError:  # a NUL in the name (from a config file): no such file can exist
        raise UserError(f"{path}: {what} not found" + (f" ({flag})" if flag else "")) from None


# A text file users write and that is read whole (a caption, a dataset config, a prompt file): at most this large
MAX_TEXT_BYTES = 64 * 2**20


def read_small_file(path: str | os.PathLike, what: str = "file", flag: str | None = None,
                    max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a small input file, checked as require_file checks it, or a UserError naming it.

    The check is made again on the descriptor that is read, which is opened without blocking: a FIFO put in the
    file's place after the check is refused, not waited on. At most `max_bytes` are read, even from a file that grows.
    """
    path = require_file(path, what, flag, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _unreadable(path, what, flag, e) from None
    with os.fdopen(fd, "rb") as f:
        _require_regular(os.fstat(fd), path, what, flag, max_bytes)
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise _unreadable(path, what, flag, e) from None
    if len(data) > max_bytes:  # (it grew since the check)
        raise UserError(f"{path}: more than {_size(max_bytes)}, too large for {_a(what)}" + (f" ({flag})" if flag else ""))
    return data


_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words: a folder, a file, a FIFO, a socket, ..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    return next((name for test, name in _SPECIAL_FILES if test(mode)), "a special file")


def _require_regular(st: os.stat_result, path: Path, what: str, flag: str | None, max_bytes: int | None) -> None:
    given = f" ({flag})" if flag else ""
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path}: expected {_a(what)}, found a folder{given}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file ({kind_of(st.st_mode)}); expected {_a(what)}{given}")
    if max_bytes is not None and st.st_size > max_bytes:
        size = _size(st.st_size) if _size(st.st_size) != _size(max_bytes) else f"{st.st_size:,} bytes"  # (not "1 MiB, at most 1 MiB")
        raise UserError(f"{path}: {size}, too large for {_a(what)} (at most {_size(max_bytes)}){given}")


def _unreadable(path: Path, what: str, flag: str | None, e: OSError) -> UserError:
    """Why os.stat or os.open of an input failed, in words: a missing file, a broken or looping link, permissions."""
    shown = repr(str(path)) if str(path) != str(path).strip() else path  # (a trailing space is invisible unquoted)
    return UserError(f"{shown}: {why_unreadable(path, what, e)}" + (f" ({flag})" if flag else ""))


def why_unreadable(path: str | os.PathLike, what: str, e: OSError) -> str:
    """Why os.stat or os.open of `path` failed, in words (without the path): not found, a broken or looping link, a
    file where one of its folders must be, permissions."""
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
        blocked = not_a_folder(Path(path).parent)
        if blocked is not None:
            return f"{what} not found: {blocked} is {_what_is(blocked)}, not a folder"
        if os.sep == "/" and "\\" in str(path) and os.path.exists(str(path).replace("\\", "/")):  # a path written on Windows
            return f"{what} not found (with / for \\ it exists: write the path with /)"
        alike = _named_alike(Path(path)) if what != "caption file" else None  # (a caption's hints are its own: items)
        if alike is not None:  # (the same look, another Unicode form or case: "not found" of what ls shows: fuzz_bc 9)
            return f"{what} not found ({alike!r} is there, a name that differs only in case or Unicode form)"
        return f"{what} not found"
    if e.errno in (errno.EACCES, errno.EPERM):  # (which folder refuses: the file's, or one on the way to it)
        return f"cannot read ({e.strerror or e}); {permission_advice(path)}"
    return f"cannot read ({e.strerror or e})"


MAX_LISTED_FOR_A_HINT = 100_000  # a folder this large is not listed for _named_alike's hint


def _named_alike(path: Path) -> str | None:
    """A name in `path`'s folder that is `path`'s own but for case or Unicode normalisation (a name typed in NFC of a file
    named in NFD by macOS, café.png of Café.png), if one is."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        stamp = os.stat(folder).st_mtime_ns
    except (OSError, ValueError):
        return None
    names = _loose_names(str(folder), stamp).get(_loose(path.name), ())
    return next((name for name in names if name != path.name), None)


def _loose(name: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", name).casefold()


@functools.lru_cache(maxsize=4)
def _loose_names(folder: str, stamp: int) -> dict[str, tuple[str, ...]]:
    """A folder's names by their loose form, listed once per version of the folder (`stamp`): listed for each missing
    file, 3,000 missing images of a 30,000-file folder took 73 s (fuzz_bg 2)."""
    found: dict[str, list[str]] = {}
    try:
        with os.scandir(folder) as entries:
            for i, entry in enumerate(entries):
                if i >= MAX_LISTED_FOR_A_HINT:
                    return {}
                found.setdefault(_loose(entry.name), []).append(entry.name)
    except (OSError, ValueError):
        return {}
    return {k: tuple(v) for k, v in found.items()}


def not_a_folder(folder: Path) -> Path | None:
    """The first of `folder` and its parents that is there but is not a folder (a file, or a broken link), if the
    nearest one there is not a folder: the reason a path under it cannot be made or found."""
    for above in (folder, *folder.parents):
        if os.path.lexists(above):
            return None if above.is_dir() else above
    return None


def _what_is(path: Path) -> str:
    """What stands at `path` where a folder must be, in words (a FIFO, a device, a /proc file were "a file", a link loop
    "a broken symbolic link": fuzz_as 3)."""
    try:
        return kind_of(os.stat(path).st_mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"a broken symbolic link (to {os.readlink(path)})" if path.is_symlink() else "a file"


def _a(what: str) -> str:
    """`what` with its article: "a file", "an image"."""
    return ("an " if what[:1].lower() in "aeiou" else "a ") + what


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """Keys with their dtype and shape, and the metadata, without reading any tensor data."""
    path = require_file(path, "safetensors file")
    with _open_input(path, "safetensors file") as f:
        entries, metadata, _ = _read_header(f, path)
    return entries, metadata


def _open_input(path: Path, what: str, buffering: int = -1):
    """open(path, "rb"), with a file that cannot be opened (permissions) a UserError naming it."""
    try:
        return open(path, "rb", buffering=buffering)
    except OSError as e:
        raise _unreadable(path, what, None, e) from None


# dtypes the safetensors format has that no file this toolkit reads holds: named as such, not as a malformed entry
_OTHER_ST_DTYPES = {"C64": "complex64", "F8_E8M0": "float8 e8m0 (MX scales)", "F4": "float4", "F6_E2M3": "float6 e2m3",
                    "F6_E3M2": "float6 e3m2"}


class _TwoMetadata(Exception):
    pass


def _one_metadata(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object hook: an object naming __metadata__ twice is refused, as the safetensors library refuses it
    (json keeps the last, which lost the first's training metadata)."""
    if sum(key == "__metadata__" for key, _ in pairs) > 1:
        raise _TwoMetadata
    return dict(pairs)


def _read_header(f, path: Path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str], dict[str, tuple[int, int]]]:
    """(entries, metadata, absolute (start, end) byte range of each tensor) of the safetensors file open as `f`, held to
    the format as the safetensors library holds it (what it refuses, no other tool loads): a UTF-8 JSON object; its
    metadata text to text; every tensor a known dtype, whole non-negative dimensions and a byte range as long as they
    say; the ranges one after another from the start of the data to its end, no gap, no overlap, nothing after."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    raw = f.read(8)
    if len(raw) < 8:
        raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, _MAX_HEADER_BYTES):
        if n <= _MAX_HEADER_BYTES and f.read(1) == b"{":  # a header that starts as one and is cut: a download cut short
            raise UserError(f"{path}: file is truncated (its header alone is {n:,} bytes, the file {size:,}); download it again")
        if n <= size - 8 and f.read(1) == b"{":  # (said not to fit the file, which it does: fuzz_aw 6)
            raise UserError(f"{path}: its header is {n:,} bytes, over the {_MAX_HEADER_BYTES // 2**20} MB that safetensors readers "
                            "accept (metadata far too large?); save it again with less metadata")
        raise UserError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
    try:  # (json.loads would take UTF-16 and UTF-32 bytes too)
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_one_metadata)
    except _TwoMetadata:
        raise UserError(f"{path}: not a safetensors file (its header names __metadata__ twice; the safetensors library, "
                        "and so every program that loads the file, refuses it)") from None
    except (ValueError, RecursionError) as e:  # (a UnicodeDecodeError or a JSONDecodeError is a ValueError; so is a huge integer)
        raise UserError(f"{path}: not a safetensors file (header is not UTF-8 JSON: {str(e)[:160]})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: not a safetensors file (its __metadata__ must map text to text; it is "
                        f"{type(metadata).__name__})")
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"{path}: not a safetensors file (its __metadata__ must map text to text; its value for {bad!r} is "
                        f"{type(metadata[bad]).__name__})")
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    offsets: dict[str, tuple[int, int]] = {}
    data_size = size - 8 - n

    def whole(values) -> bool:
        return isinstance(values, list) and all(type(v) is int and 0 <= v < 2**63 for v in values)

    for key, info in header.items():
        dtype = st_dtypes().get(info.get("dtype")) if isinstance(info, dict) and isinstance(info.get("dtype"), str) else None
        if dtype is None and isinstance(info, dict) and info.get("dtype") in _OTHER_ST_DTYPES:  # well formed, but not ours
            raise UserError(f"{path}: tensor {key!r} is {_OTHER_ST_DTYPES[info['dtype']]}, which no HunyuanVideo model or "
                            "LoRA holds (a foreign or damaged file)")
        shape, span = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if dtype is None or not whole(shape) or not whole(span) or len(span) != 2:
            raise UserError(f"{path}: tensor {key!r} has a malformed entry in the header ({str(info)[:120]})")
        begin, end = span
        if end > data_size:
            raise UserError(f"{path}: file is truncated (tensor {key!r} ends at byte {end} of {data_size})")
        if end - begin != math.prod(shape) * dtype.itemsize or math.prod(d for d in shape if d) >= 2**63:
            raise UserError(f"{path}: tensor {key!r} has a malformed entry in the header (bytes {begin}..{end} for "
                            f"{str(dtype).removeprefix('torch.')} {list(shape)})")
        entries[key] = (dtype, tuple(shape))
        offsets[key] = (8 + n + begin, 8 + n + end)
    reached = 8 + n
    for key, (begin, end) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if begin != reached:
            raise UserError(f"{path}: not a safetensors file (tensor {key!r} starts at byte {begin - 8 - n} of the data, where "
                            f"{'the previous tensor ends at' if begin > reached else 'another tensor overlaps it, up to'} "
                            f"byte {reached - 8 - n})")
        reached = end
    if reached != size:
        raise UserError(f"{path}: not a safetensors file ({size - reached} bytes after its last tensor)")
    return entries, metadata, offsets


class StateDictFile:
    """Read-only, lazy view of a weight file: keys, shapes and dtypes up front, tensors on demand.

    Works for safetensors (memory-mapped, one tensor at a time) and `.pt` pickles (loaded with
    `weights_only=True` and mmap where the file allows). `prefix_key` picks a sub-dict such as the
    official DiT's `module`; `strip_prefix` removes a key prefix such as `vae.`.
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "checkpoint", subdict_keys: tuple[str, ...] = (),
                 bare_key: str | None = None):
        """`bare_key`: a pickled file that holds one tensor, not a dict, is read as that tensor under this name."""
        self.path = require_file(path, what)
        self._bare_key = bare_key
        self.what = what
        self.metadata: dict[str, str] = {}
        self._safe = None
        self._pt_mapped = False
        self._offsets: dict[str, tuple[int, int]] = {}  # safetensors: absolute byte range per tensor, for read()
        self._tensors: dict[str, torch.Tensor] | None = None
        self._file = None
        try:
            self._read(what, subdict_keys)
        except OSError as e:  # a read failing past a good open: a failing disk, a dropped network mount (EIO)
            limit = limit_met(self.path, e)
            raise (limit or _unreadable(self.path, what, None, e)) from None
        self._rename: dict[str, str] = {k: k for k in self._entries}

    def _read(self, what: str, subdict_keys: tuple[str, ...]) -> None:
        if (self.path.suffix.lower() == ".safetensors" and not _is_zip(self.path)) or _looks_like_safetensors(self.path):
            # (a .pt renamed .safetensors is read as what it is, as a safetensors file under another name is)
            # the version of the file opened here is the one read to the end: a rename over it (another run saving
            # under this name) does not reach this descriptor, and a rewrite in place is seen (_check_unchanged)
            self._file = _open_input(self.path, what, buffering=0)
            self._opened = _version(os.fstat(self._file.fileno()))
            self._entries, self.metadata, self._offsets = _read_header(self._file, self.path)
            self._safe = True  # read tensor by tensor from this descriptor (read); large files are mapped (get)
            if self._opened[0] > MAPPED_FROM_BYTES:
                from safetensors import safe_open

                try:
                    self._safe = safe_open(_utf8_name(self.path, self._file), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own error types
                    raise UserError(f"{self.path}: unreadable safetensors file ({e})") from None
        else:
            if zipfile.is_zipfile(self.path):  # mapped by load_torch_file: a rewrite in place is seen through this descriptor
                self._file = _open_input(self.path, what, buffering=0)
                self._opened = _version(os.fstat(self._file.fileno()))
            obj = load_torch_file(self.path, what)
            import torch

            bare = self._bare_key is not None and isinstance(obj, torch.Tensor)
            self._tensors = {self._bare_key: obj} if bare else _find_state_dict(obj, subdict_keys, self.path, what)
            self._pt_mapped = zipfile.is_zipfile(self.path)  # (load_torch_file maps the zip format; the legacy one it reads)
            self._entries = {k: (v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}

    # -- key handling
    def strip_prefix(self, prefix: str) -> None:
        """Keep only keys starting with `prefix` (if any do) and drop the prefix from them."""
        if any(k.startswith(prefix) for k in self._rename):
            self._rename = {k[len(prefix):]: v for k, v in self._rename.items() if k.startswith(prefix)}

    def rename(self, new_name) -> None:
        """Name every key `new_name(key)` (another layout's names mapped to the ones the reader expects)."""
        self._rename = {new_name(k): v for k, v in self._rename.items()}

    def keys(self) -> list[str]:
        return list(self._rename)

    def __contains__(self, key: str) -> bool:
        return key in self._rename

    def __len__(self) -> int:
        return len(self._rename)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[self._rename[key]][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[self._rename[key]][0]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._rename}

    def finite(self, key: str, t: torch.Tensor, cast_advice: str) -> torch.Tensor:
        """`t`, this file's `key` as loaded, refused when it holds NaN or infinity: a damaged file, or one past the range
        of the dtype it was cast to (`cast_advice` then says what to compute in). Every model's weights are checked as
        they load: a damaged text encoder or VAE made caches with a zeroed channel, or failed after the whole sampling."""
        import torch

        def finite(x: torch.Tensor) -> bool:  # (float8 has no isfinite: its one NaN code is seen once widened)
            return bool(torch.isfinite(x.float() if x.element_size() == 1 else x).all())

        if t.is_floating_point() and not finite(t):
            if t.dtype != self.dtype(key) and finite(self.get(key)):  # finite as stored: past the cast
                raise UserError(f"{self.path}: {key} holds values past {str(t.dtype).removeprefix('torch.')}'s range (finite "
                                f"as stored, in {str(self.dtype(key)).removeprefix('torch.')}): {cast_advice}")
            raise UserError(f"{self.path}: {key} holds NaN or infinite values: the file is damaged, download it again")
        return t

    def get(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """One tensor, optionally cast and moved (cast happens after reading that tensor only)."""
        real = self._rename[key]
        if self._safe is not None and self._opened[0] <= MAPPED_FROM_BYTES:
            t, mapped = self.read(key), None  # a small file (a LoRA, a cache): no mapping, whose pages a rewrite would pull away (SIGBUS)
        elif self._safe is not None:
            self._check_unchanged()  # (a mapping's pages cut away by a truncation kill the process with SIGBUS when read)
            t = mapped = self._safe.get_tensor(real)
        else:
            t = self._tensors[real]
            mapped = t if self._pt_mapped else None
            if mapped is not None and self._file is not None:
                self._check_unchanged()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        if mapped is not None and t.data_ptr() == mapped.data_ptr() and t.numel():
            # still the file's pages (no cast, no move): a model built on them (load_state_dict(assign=True)) died of
            # SIGBUS, or trained on other weights, when the file was rewritten mid-run; memory of its own instead
            t = t.clone()
        if mapped is not None and self._file is not None:  # read from the pages (copied or cast): the file's version
            # opened, or another program's bytes (a .pt DiT rewritten during a merge gave a wrong model, the LoRA blamed:
            # fuzz_aq 11)
            self._check_unchanged()
        return t

    def read(self, key: str) -> torch.Tensor:
        """One tensor in memory of its own, read without mapping the file (safetensors).

        `get` returns views of the memory-mapped file, whose pages then count in this process's resident
        memory until the file is closed: streaming a whole model through `get` ends up holding a copy of it.
        Reading each tensor with a positioned read keeps only the tensors still referenced.
        """
        import torch

        if self._safe is None:
            return self.get(key)
        real = self._rename[key]
        dtype, shape = self._entries[real]
        start, end = self._offsets[real]
        t = torch.empty(shape, dtype=dtype)
        if end > start:
            buffer = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            self._file.seek(start)
            short = self._file.readinto(buffer) != end - start
            self._check_unchanged()
            if short:
                raise UserError(f"{self.path}: file is truncated (tensor {real!r})")
        return t

    def _check_unchanged(self) -> None:
        if _version(os.fstat(self._file.fileno())) != self._opened:
            raise UserError(f"{self.path}: changed while it was being read (another program writes it in place); run again "
                            f"once it is complete")

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def __del__(self):
        self.close()

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._rename:
            yield k, self.get(k, dtype)

    def load_all(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return dict(self.items(dtype))


MAPPED_FROM_BYTES = 512 * 2**20  # files this large are memory-mapped (a DiT, a VAE); smaller ones are read


def _utf8_name(path: Path, f) -> str:
    """A name of the file open as `f` that safetensors' reader takes: it refuses a path that is not UTF-8 (a name
    from a zip unpacked on Linux), for which Linux's /proc/self/fd gives the open file under a name of digits."""
    try:
        str(path).encode("utf-8")
        return str(path)
    except UnicodeEncodeError:
        by_fd = f"/proc/self/fd/{f.fileno()}"
        return by_fd if os.path.exists(by_fd) else str(path)


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _is_zip(path: Path) -> bool:
    """torch.save's format (a zip) by its first bytes."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors content saved under another extension: 8-byte length followed by '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> object:
    """torch.load with weights_only=True (mmap when possible) and errors that name the file."""
    import torch

    path = require_file(path, what)
    try:
        unlike = _not_a_torch_file(path)
    except OSError as e:
        raise (limit_met(path, e) or _unreadable(path, what, None, e)) from None
    if unlike:
        raise UserError(f"{path}: not a PyTorch {what}: {unlike}")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols is noise to users: the file loads or is refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # a file object, read whole: torch's zip reader takes a name as UTF-8, and reads a .safetensors name as safetensors
            if not is_utf8(str(path)) or path.suffix.lower() == ".safetensors":
                with open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        forbidden = r"Unsupported (global|operand|class)|GLOBAL|REDUCE|not an allowed global|allowlist"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["unknown object"]
        if not re.search(forbidden, str(e)):
            raise UserError(f"{path}: not a readable PyTorch {what} (a damaged pickle: {lines[0][:160]})") from None
        # (torch's message opens with a paragraph on its weights_only default; the line naming the object is the one)
        named = next((line for line in lines if re.search(forbidden, line) and "weights_only" not in line), lines[0])
        raise UserError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers "
            f"(it could run code when unpickled; {named[:160]})"
        ) from None
    except Exception as e:  # the weights-only unpickler meets a malformed stream with IndexError, KeyError, struct.error...
        if out_of_memory(e) is not None:  # the machine's, not the file's: said as such by the command (errors.run_cli)
            raise
        limit = limit_met(path, e)
        if limit is not None:  # (an open-file limit met while torch imports its own modules names one of those)
            raise limit from None
        if isinstance(e, OSError) and e.errno in (errno.EIO, getattr(errno, "ESTALE", -1)):  # a read that failed: the
            # disk's or the network mount's, not the format's (a truncated zip is an OSError too: EINVAL, from its mmap)
            raise _unreadable(path, what, None, e) from None
        raise UserError(f"{path}: not a readable PyTorch {what} (truncated or a different format: "
                        f"{type(e).__name__}: {str(e)[:160]})") from None


def _not_a_torch_file(path: Path) -> str:
    """Why a file cannot be a torch.save file (a zip since PyTorch 1.6; a pickle starting with its PROTO opcode before),
    in words a user acts on; empty when it may be one."""
    if zipfile.is_zipfile(path):
        return ""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":  # a pickle, or a zip (cut short: is_zipfile needs its end)
        return ""
    text = head.decode("utf-8", errors="replace")
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the file (the download fetched the pointer only: git lfs pull)"
    if "<html" in text.lower() or "<!doctype" in text.lower():
        return "an HTML page (a download that returned an error page?)"
    if not head:
        return "an empty file"
    if all(c.isprintable() or c in "\r\n\t" for c in text.replace("\ufffd", "")) and "\ufffd" not in text:
        return f"it is text ({text.splitlines()[0][:40]!r}...)"
    return "its bytes are neither a zip nor a pickle (a damaged file, or another format)"


def _find_state_dict(obj: object, subdict_keys: tuple[str, ...], path: Path, what: str) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, dict):
        for key in subdict_keys:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        nested = next((k for k, v in obj.items() if isinstance(v, dict) and any(isinstance(t, torch.Tensor) for t in v.values())), None)
        if nested is not None:  # e.g. the official DiT .pt (weights under `module`) passed as a VAE or a LoRA
            from musubi_tuner.hunyuan.model_kinds import what_weights_are  # (what they are: a VAE under `module` was
            # told to go to --dit, the place of the official DiT's weights)
            kind = what_weights_are([k for k in obj[nested] if isinstance(k, str)])
            where = " or ".join(["at the top level", *(f"under {k!r}" for k in subdict_keys)])
            raise UserError(f"{path}: not {_a(what)}: its tensors sit under {nested!r} (the tensors of {_a(what)} are read {where})"
                            + (f"; they look like {kind}" if kind else ""))
        hint = f" (looked under {', '.join(repr(k) for k in subdict_keys)})" if subdict_keys else ""
        raise UserError(f"{path}: holds no tensors{hint}; top-level keys: {sorted(map(str, obj))[:8]}")
    raise UserError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
