"""Commands started from the studio, as child processes that outlive the page (and the server) that started them.

Each job is a folder under <workspace>/jobs/<id>: job.json (the commands, state, exit status), log.txt (what the
commands print) and progress.jsonl (their progress bars, see musubi_tuner.progress). A small supervisor process
(`python -m musubi_tuner.ui.jobs <folder>`, in a session of its own) runs the commands one after another and is the
only writer of job.json while it lives, so a server that is killed or restarted loses nothing: the next commands
still run, and the exit status is still recorded. A reloaded page, or a restarted server, reads the job from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from musubi_tuner.errors import UserError
from musubi_tuner.files import atomic_write, names_collide, pid_alive, remove_leftover_temp_files
from musubi_tuner.launch import child_environment, shown
from musubi_tuner.progress import PROGRESS_FILE_VARIABLE

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 20  # after Ctrl-C (SIGINT), this long to finish the file being written, then SIGKILL
LOG_TAIL_BYTES = 12_000
SUPERVISOR_START_SECONDS = 60  # a job that names no supervisor this long after it was written never got one
STOP_MARKER = "stop-requested"  # written by the server before it interrupts the command: the supervisor runs no more
ENDED = "ended.json"  # room the supervisor reserves at the start for how the job ended, written in place on a full disk
ENDED_BYTES = 256


class NoSuchJob(KeyError):
    """A run id the studio does not know (a KeyError elsewhere is a defect, not a 404: fuzz_ac 9)."""


@dataclass
class Job:
    id: str
    kind: str  # train, generate, cache
    title: str
    commands: list[list[str]]
    outputs: dict[str, str] = field(default_factory=dict)  # where it writes: output_dir + output_name, or save_path
    state: str = "starting"  # running, finished, failed, stopped, lost
    returncode: int | None = None
    pid: int | None = None  # the command running
    current: int = 0  # index of the command running
    started: float = field(default_factory=time.time)
    ended: float | None = None
    resumed_from: str | None = None
    cwd: str = ""  # the folder the commands run in (relative paths in them are relative to it)
    supervisor: int | None = None  # the process that runs the commands and writes job.json
    # which processes the pids were (boot and start time, _identity): after a reboot or a wrap-around, a pid may be another
    # program's, which must be neither taken for the job nor signalled
    pid_identity: str | None = None
    supervisor_identity: str | None = None

    @property
    def shown(self) -> list[str]:
        return [shown(c) for c in self.commands]


@dataclass
class _ProgressRead:
    """How far a job's progress.jsonl has been read, and the newest record of each bar in what was."""

    file: tuple[int, int]  # (device, inode): a file written anew starts again from its beginning
    offset: int = 0
    latest: dict[str, dict] = field(default_factory=dict)


class Jobs:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.folder}: cannot make the jobs folder ({e.strerror or e}); start the studio with a "
                            f"--workspace it can write to") from None
        self._jobs: dict[str, Job] = {}
        self._skipped: set[Path] = set()  # job.json files left out (said once)
        self._lock = threading.Lock()
        self._progress: dict[str, _ProgressRead] = {}
        self._progress_lock = threading.Lock()
        self._stopping: set[str] = set()  # the jobs a Stop signalled (see stop)
        self._stop_lock = threading.Lock()
        for path in self.folder.glob("*/job.json"):
            remove_leftover_temp_files(path.parent, lambda name: name == "job.json")  # of a supervisor killed mid-write
        self._scan()

    def _scan(self) -> None:
        """Take in the jobs folder's jobs this studio does not know: all at the start, then those another studio on the
        same workspace started (before, each saw only its own until it restarted)."""
        for path in sorted(self.folder.glob("*/job.json")):
            if path.parent.name not in self._jobs:
                job = _load_job(path)
                if job is not None and job.id == path.parent.name:
                    self._jobs.setdefault(job.id, job)
                elif path not in self._skipped:
                    self._skipped.add(path)
                    logger.warning("%s: not a job this studio can read (damaged, or another version's): left out of the runs", path)
        for gone in [j for j, job in self._jobs.items() if job.state not in ("starting", "running")
                     and not (self.folder / j / "job.json").exists()]:  # (a run folder deleted: it stayed listed)
            del self._jobs[gone]

    # ------------------------------------------------------------------ starting and stopping

    def start(self, kind: str, title: str, commands: list[list[str]], outputs: dict[str, str] | None = None,
              resumed_from: str | None = None, cwd: str | None = None) -> Job:
        """Write the job's folder, then start its supervisor; a job folder that cannot be written is a UserError, and
        no job is listed."""
        with self._lock:
            self._refuse_a_second_job_on(kind, outputs, commands)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            number = 1 + sum(1 for j in self._jobs if j.startswith(stamp))
            while (self.folder / f"{stamp}-{number}-{kind}").exists():  # another studio on this workspace took it
                number += 1
            job = Job(f"{stamp}-{number}-{kind}", kind, title, commands, dict(outputs or {}), resumed_from=resumed_from,
                      cwd=cwd or os.getcwd())
            if not Path(job.cwd).is_dir():  # (its commands name files relative to it)
                raise UserError(f"{job.cwd}: the folder this run was started from is gone; its commands name files "
                                f"relative to it: make it again, or start the run anew")
            try:
                self.path(job).mkdir(parents=True)
            except OSError as e:
                raise UserError(f"{self.path(job)}: cannot start the job ({e.strerror or e})") from None
            try:
                self._save(job)
                supervisor = subprocess.Popen([sys.executable, "-m", "musubi_tuner.ui.jobs", str(self.path(job))],
                                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              env=child_environment(), cwd=job.cwd, **_new_process_group())
            except (OSError, UserError) as e:
                shutil.rmtree(self.path(job), ignore_errors=True)  # listed by no studio, now or after a restart
                raise UserError(f"{self.path(job)}: cannot start the job ({getattr(e, 'strerror', None) or e})") from None
            job.supervisor = supervisor.pid  # in memory only: from here on the supervisor alone writes job.json
            self._jobs[job.id] = job
        threading.Thread(target=supervisor.wait, name=f"job {job.id}", daemon=True).start()  # reaped when it ends
        return job

    def stop(self, job_id: str) -> Job:
        """Ctrl-C to the running command's process group, as in a terminal (the commands stop cleanly); SIGKILL if it
        lingers. The supervisor records the job as stopped and starts no further command."""
        job = self.get(job_id)
        if job.state not in ("starting", "running"):
            return job
        with self._stop_lock:  # the first Stop signals; another while its command cleans up sent Ctrl-C into that
            # clean-up: a traceback in the log, and the lock and a temporary file left behind (fuzz_be 1)
            if job_id in self._stopping:  # (the marker's word, where it cannot be written: fuzz_bf 3)
                return job
            self._stopping.add(job_id)
        try:
            os.close(os.open(self.path(job) / STOP_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:  # (another studio on this workspace stops it)
            return job
        except OSError:  # the job's folder deleted or moved while it ran: stopped all the same (it ran on: fuzz_be 2)
            pass
        if job.pid is None or not _command_alive(job):
            return job  # the supervisor sees the marker before it starts the first command (or the command is gone)
        _signal_group(job.pid, interrupt=True)

        def kill_if_alive():
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            while time.monotonic() < deadline:
                if not _group_alive(job.pid):
                    return
                time.sleep(0.2)
            if _command_alive(job):  # (its pid not yet another program's)
                _signal_group(job.pid, interrupt=False)

        threading.Thread(target=kill_if_alive, daemon=True).start()
        return job

    # what one job of a kind holds alone, as its command's lock has it: (the output that names it, what the job does)
    EXCLUSIVE = {"train": ("output_dir", "training into it"), "cache": ("dataset_config", "caching it")}

    def _refuse_a_second_job_on(self, kind: str, outputs: dict[str, str] | None, commands: list[list[str]] = ()) -> None:
        """One training at a time into an output folder, one caching of a dataset config, one run of the same
        generation, said before a job starts: Resume pressed twice started two jobs, the second of which failed on the
        lock; Cache pressed twice, the first (fuzz_ac 12); Generate pressed twice, two of the same video (fuzz_ao 2)."""
        key, doing = self.EXCLUSIVE.get(kind, (None, None))
        target = (outputs or {}).get(key) if key else None
        if not target and kind != "generate":
            return
        self._scan()
        for job in list(self._jobs.values()):
            if job.kind != kind or job.state not in ("starting", "running"):
                continue
            same = job.outputs.get(key) == target if target else job.commands == list(commands)
            if same and kind == "train":  # (other names share a folder, as the command itself allows: fuzz_at 4)
                same = names_collide(job.outputs.get("output_name"), (outputs or {}).get("output_name", ""))
            if same and self.get(job.id).state in ("starting", "running"):
                if target:
                    raise UserError(f"{target}: job {job.id} is {doing}; wait for it to end, or stop it first")
                raise UserError(f"job {job.id} runs this same generation (the same command: the same video); wait for it "
                                "to end, or change a value (the seed) to make another")

    # ------------------------------------------------------------------ reading

    def path(self, job: Job) -> Path:
        return self.folder / job.id

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None and "/" not in job_id and (self.folder / job_id / "job.json").is_file():
            self._scan()  # (started by another studio on this workspace)
            job = self._jobs.get(job_id)
        if job is None:
            raise NoSuchJob(job_id)
        if job.state in ("starting", "running"):
            on_disk = _load_job(self.path(job) / "job.json")  # the supervisor's latest word
            if on_disk is not None:
                on_disk.supervisor = on_disk.supervisor or job.supervisor  # (written before the supervisor knew its pid)
                job.__dict__.update(on_disk.__dict__)
            unknown = job.supervisor is None and time.time() - job.started < SUPERVISOR_START_SECONDS  # being started
            if (job.state in ("starting", "running") and not unknown and not _alive(job.supervisor, job.supervisor_identity)
                    and not _command_alive(job)):
                outcome = _read_ended(self.path(job) / ENDED)
                if outcome is not None:  # the supervisor's last word, where the disk had no room for job.json
                    job.state, job.returncode, job.ended = outcome
                elif (self.path(job) / STOP_MARKER).exists():  # stopped on request, its supervisor gone meanwhile
                    job.state, job.ended = "stopped", time.time()
                else:
                    job.state, job.ended = "lost", time.time()  # its supervisor was killed: nobody saw how it ended
                    self._log(job, "the studio's supervisor of this job stopped before the job ended; how it ended is unknown")
                try:
                    self._save(job)
                except UserError:  # a full disk: known here, and read again from ENDED by a restarted studio
                    pass
        return job

    def all(self) -> list[Job]:
        """Newest first (by start, then by the number a second's jobs get: "-10-" after "-9-")."""
        self._scan()
        order = sorted(list(self._jobs.values()), key=lambda j: (j.started, int(j.id.split("-")[2]) if j.id.count("-") >= 3 else 0))
        return [self.get(j.id) for j in reversed(order)]

    def log_tail(self, job: Job) -> str:
        return self.log_end(job)[1]

    def log_end(self, job: Job) -> tuple[int, str]:
        """The bytes of the job's log not shown, and its last LOG_TAIL_BYTES from the start of a line (a cut mid-line, or
        inside a character of a progress bar, was shown as the whole log: fuzz_ao 3)."""
        path = self.path(job) / "log.txt"
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = max(0, size - LOG_TAIL_BYTES)
                f.seek(start)
                data = f.read(size - start)
        except FileNotFoundError:
            return 0, ""
        if start and b"\n" in data[:-1]:
            cut = data.index(b"\n") + 1
            start, data = start + cut, data[cut:]
        return start, data.decode("utf-8", "replace")

    def progress(self, job: Job) -> list[dict]:
        """The latest state of each progress bar of the job's current command, open ones last.

        Each poll reads what was appended since the last one: re-read whole, a ten-hour run's 72,000 records (11 MB)
        cost 0.22 s of CPU per poll and open page."""
        path = self.path(job) / "progress.jsonl"
        with self._progress_lock:
            try:
                with open(path, "rb") as f:
                    seen = os.fstat(f.fileno())
                    read = self._progress.get(job.id)
                    if read is None or read.file != (seen.st_dev, seen.st_ino) or seen.st_size < read.offset:
                        read = self._progress[job.id] = _ProgressRead((seen.st_dev, seen.st_ino))  # new, or rewritten
                    f.seek(read.offset)
                    data = f.read()
            except OSError:
                return []
            complete = data.rfind(b"\n") + 1  # (a line being written is read whole by a later poll)
            read.offset += complete
            for line in data[:complete].decode("utf-8", "replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # (a line cut by a killed command)
                if isinstance(record, dict):
                    read.latest[record.get("desc", "")] = record
            return sorted(read.latest.values(), key=lambda r: (not r.get("closed"), r.get("time", 0)))

    def summary(self, job: Job) -> dict:
        return {**asdict(job), "shown": job.shown}

    def _save(self, job: Job) -> None:
        save_job(self.path(job), job)

    def _log(self, job: Job, line: str) -> None:
        _append_log(self.path(job), line)


def save_job(folder: Path, job: Job) -> None:
    with atomic_write(folder / "job.json") as tmp:
        tmp.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")


def _append_log(folder: Path, line: str) -> None:
    try:
        with open(folder / "log.txt", "a", encoding="utf-8") as log:
            log.write(f"[studio] {line}\n")
    except OSError:
        pass  # a full disk: job.json still says how the job ended


def supervise(folder: Path) -> int:
    """Run the job's commands one after another, each in a process group of its own, recording in job.json which
    runs and how each ended; stop at the first that fails or after a stop request."""
    job = _load_job(folder / "job.json")
    if job is None:
        return 2
    job.supervisor, job.supervisor_identity = os.getpid(), _identity(os.getpid())
    save_job(folder, job)
    _reserve(folder / ENDED)
    env = child_environment({PROGRESS_FILE_VARIABLE: str(folder / "progress.jsonl"), "PYTHONUNBUFFERED": "1"})

    def finish(returncode: int, why: str, ran_through: bool = False) -> int:
        # a stop that came once the last command had done its work (while it exited) stopped nothing
        stopped = (folder / STOP_MARKER).exists() and not ran_through
        state = "stopped" if stopped else ("finished" if returncode == 0 else "failed")
        ended = replace(job, returncode=returncode, ended=time.time(), state=state)
        if state != "finished":
            _append_log(folder, "stopped on request" if stopped else why)
        try:
            save_job(folder, ended)
        except UserError:  # a full disk: the room reserved at the start takes it (before, the job was "lost")
            _write_in_place(folder / ENDED, {"state": state, "returncode": returncode, "ended": ended.ended})
            return 0
        (folder / ENDED).unlink(missing_ok=True)
        return 0

    for index, cmd in enumerate(job.commands):
        if (folder / STOP_MARKER).exists():
            return finish(130, "")
        try:
            with open(folder / "log.txt", "a", encoding="utf-8") as log:
                log.write(f"$ {shown(cmd, one_line=True)}\n")
                log.flush()
                process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                           **_new_process_group())
        except OSError as e:
            return finish(127, f"cannot start {cmd[0]}: {e.strerror or e}")
        job.pid, job.pid_identity, job.current, job.state = process.pid, _identity(process.pid), index, "running"
        save_job(folder, job)
        if (folder / STOP_MARKER).exists():  # a stop asked for while this command started: the server knew no pid yet
            _signal_group(process.pid, interrupt=True)
        returncode = process.wait()
        if returncode != 0:
            left = len(job.commands) - index - 1
            return finish(returncode, f"the command exited with status {returncode}"
                                      + (f"; {left} later command(s) not run" if left else ""))
    return finish(0, "", ran_through=True)


def _reserve(path: Path) -> None:
    try:
        with open(path, "wb") as f:
            f.write(b" " * ENDED_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # (a disk full already: job.json was written just before, and a later write may find room)
        pass


def _write_in_place(path: Path, outcome: dict) -> None:
    """Overwrite the reserved bytes: a file system needs no new block for that (copy-on-write ones excepted)."""
    data = json.dumps(outcome).encode()
    try:
        with open(path, "r+b") as f:
            f.write(data.ljust(ENDED_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass


def _read_ended(path: Path) -> tuple[str, int | None, float] | None:
    try:
        outcome = json.loads(path.read_bytes() or b"null")
        return (str(outcome["state"]), outcome.get("returncode"), float(outcome["ended"])) if outcome else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


_TEXT, _NUMBER, _WHOLE = (str,), (int, float), (int,)
_FIELD_TYPES = {"id": _TEXT, "kind": _TEXT, "title": _TEXT, "state": _TEXT, "cwd": _TEXT, "current": _WHOLE, "started": _NUMBER,
                "returncode": _WHOLE + (type(None),), "pid": _WHOLE + (type(None),), "supervisor": _WHOLE + (type(None),),
                "ended": _NUMBER + (type(None),), "resumed_from": _TEXT + (type(None),),
                "pid_identity": _TEXT + (type(None),), "supervisor_identity": _TEXT + (type(None),)}


def _load_job(path: Path) -> Job | None:
    """A job.json read back; None where it is unreadable (a job folder another version left, or half gone) or does not
    hold what a job holds (a "started": null, hand-edited or damaged, made every page's run list a 500: fuzz_ac 9)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        job = Job(**data)
    except (OSError, ValueError, TypeError):
        return None
    wrong = [name for name, kinds in _FIELD_TYPES.items()
             if isinstance(getattr(job, name), bool) or not isinstance(getattr(job, name), kinds)]
    if not (isinstance(job.commands, list) and all(isinstance(c, list) and all(isinstance(w, str) for w in c) for c in job.commands)):
        wrong.append("commands")
    if not (isinstance(job.outputs, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in job.outputs.items())):
        wrong.append("outputs")
    # and what the endpoints read of it: finite times (NaN broke the runs list: JSON has none) and a command (Resume was
    # a 500: fuzz_be 5)
    wrong += [name for name in ("started", "ended") if isinstance(getattr(job, name), float) and not math.isfinite(getattr(job, name))]
    if not job.commands:
        wrong.append("commands")
    return None if wrong else job


def _new_process_group() -> dict:
    """The child leads its own process group (its own session on POSIX): a stop reaches `accelerate launch` and the
    trainer it starts, and closing the server's terminal does not end the run."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _alive(pid: int | None, identity: str | None = None) -> bool:
    """Whether `pid` runs, and is still the process of that `identity` (where one was recorded)."""
    return pid is not None and pid_alive(pid) and (identity is None or _identity(pid) == identity)


def _command_alive(job: Job) -> bool:
    """Whether the job's command runs. Its pid is recorded with its identity where this system tells one (Linux): a pid
    without one there names no process the studio can vouch for (a job.json of another system, or one written before a
    reboot had Stop send Ctrl-C, then SIGKILL, to whatever process group had that pid now, and the job ran for good:
    fuzz_be 3)."""
    if job.pid is not None and job.pid_identity is None and _identity(job.pid) is not None:
        return False
    return _alive(job.pid, job.pid_identity)


def _identity(pid: int) -> str | None:
    """This boot's id and the process's start time (Linux's /proc; None elsewhere): a pid names the same process only
    while both are the same."""
    started = _start_ticks(pid)
    try:
        return None if started is None else f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/{started}"
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of Linux's /proc/PID/stat; None elsewhere)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _group_alive(pid: int) -> bool:
    if os.name == "nt":
        return pid_alive(pid)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


STARTING_SECONDS = 5.0  # a command this young is still importing (Python, accelerate, torch): see _signal_group


def _signal_group(pid: int, interrupt: bool) -> None:
    """`interrupt`: Ctrl-C, which the commands stop on cleanly; but a command still starting is killed: a signal that
    Python turns into an exception, landing in the import of a compiled module (numpy's, torch's), left a traceback of
    that import in the job's log, and a command that young has written nothing a kill could damage (every write is
    atomic, its locks are the system's). Else SIGKILL."""
    try:
        if os.name == "nt":
            os.kill(pid, signal.CTRL_BREAK_EVENT if interrupt else signal.SIGTERM)
        elif interrupt:
            age = _seconds_running(pid)
            os.killpg(pid, signal.SIGKILL if age is not None and age < STARTING_SECONDS else signal.SIGINT)
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _seconds_running(pid: int) -> float | None:
    """How long the process has run (Linux's /proc; None elsewhere)."""
    started = _start_ticks(pid)
    try:
        return None if started is None else float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1])))
