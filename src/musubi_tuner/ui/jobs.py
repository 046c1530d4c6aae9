"""Commands started from the studio, as child processes that outlive the page (and the server) that started them.

Each job is a folder under <workspace>/jobs/<id>: job.json (the commands, state, exit status), log.txt (what the
commands print) and progress.jsonl (their progress bars, see musubi_tuner.progress). A reloaded page, or a
restarted server, reads the job back from there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from musubi_tuner.files import atomic_write, pid_alive
from musubi_tuner.launch import child_environment, shown
from musubi_tuner.progress import PROGRESS_FILE_VARIABLE

STOP_GRACE_SECONDS = 20  # after Ctrl-C (SIGINT), this long to finish the file being written, then SIGKILL
LOG_TAIL_BYTES = 12_000


@dataclass
class Job:
    id: str
    kind: str  # train, generate, cache
    title: str
    commands: list[list[str]]
    outputs: dict[str, str] = field(default_factory=dict)  # where it writes: output_dir + output_name, or save_path
    state: str = "starting"  # running, finished, failed, stopped, lost
    returncode: int | None = None
    pid: int | None = None
    current: int = 0  # index of the command running
    started: float = field(default_factory=time.time)
    ended: float | None = None
    resumed_from: str | None = None

    @property
    def shown(self) -> list[str]:
        return [shown(c) for c in self.commands]


class Jobs:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, Job] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._stopping: set[str] = set()
        self._lock = threading.Lock()
        for path in sorted(self.folder.glob("*/job.json")):
            job = _load_job(path)
            if job is not None:
                self._jobs[job.id] = job

    # ------------------------------------------------------------------ starting and stopping

    def start(self, kind: str, title: str, commands: list[list[str]], outputs: dict[str, str] | None = None,
              resumed_from: str | None = None) -> Job:
        with self._lock:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            number = 1 + sum(1 for j in self._jobs if j.startswith(stamp))
            job = Job(f"{stamp}-{number}-{kind}", kind, title, commands, dict(outputs or {}), resumed_from=resumed_from)
            self._jobs[job.id] = job
            self.path(job).mkdir(parents=True, exist_ok=True)
            self._save(job)
        threading.Thread(target=self._run, args=(job,), name=f"job {job.id}", daemon=True).start()
        return job

    def stop(self, job_id: str) -> Job:
        """Ctrl-C to the job's process group, as in a terminal (the commands stop cleanly); SIGKILL if it lingers."""
        job = self.get(job_id)
        if job.state != "running" or job.pid is None:
            return job
        self._stopping.add(job.id)
        _signal_group(job.pid, interrupt=True)

        def kill_if_alive():
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            while time.monotonic() < deadline:
                if not _group_alive(job.pid):
                    return
                time.sleep(0.2)
            _signal_group(job.pid, interrupt=False)

        threading.Thread(target=kill_if_alive, daemon=True).start()
        return job

    def _run(self, job: Job) -> None:
        env = child_environment({PROGRESS_FILE_VARIABLE: str(self.path(job) / "progress.jsonl"), "PYTHONUNBUFFERED": "1"})
        log_path = self.path(job) / "log.txt"
        for index, cmd in enumerate(job.commands):
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"$ {shown(cmd)}\n")
                log.flush()
                try:
                    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                               **_new_process_group())
                except OSError as e:
                    log.write(f"error: cannot start {cmd[0]}: {e}\n")
                    self._finish(job, 127)
                    return
            self._processes[job.id] = process
            job.pid, job.current, job.state = process.pid, index, "running"
            self._save(job)
            returncode = process.wait()  # the process stays listed until the next one or _finish: never "lost" meanwhile
            if returncode != 0 or job.id in self._stopping:
                self._finish(job, returncode)
                return
        self._finish(job, 0)

    def _finish(self, job: Job, returncode: int) -> None:
        state = "stopped" if job.id in self._stopping else ("finished" if returncode == 0 else "failed")
        ended = replace(job, returncode=returncode, ended=time.time(), state=state)
        self._save(ended)  # on disk first: whoever sees the job end here (a page, another server) finds it there too
        job.returncode, job.ended, job.state = ended.returncode, ended.ended, ended.state
        self._processes.pop(job.id, None)

    # ------------------------------------------------------------------ reading

    def path(self, job: Job) -> Path:
        return self.folder / job.id

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state == "running" and job.id not in self._processes and job.pid and not pid_alive(job.pid):
            job = self._jobs[job_id] = _load_job(self.path(job) / "job.json") or job  # its server may have just written its end
            if job.state == "running":
                job.state, job.ended = "lost", time.time()  # started by an earlier server, ended while nobody watched
                self._save(job)
        return job

    def all(self) -> list[Job]:
        return [self.get(j) for j in sorted(self._jobs, reverse=True)]

    def log_tail(self, job: Job) -> str:
        path = self.path(job) / "log.txt"
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")

    def progress(self, job: Job) -> list[dict]:
        """The latest state of each progress bar of the job's current command, open ones last."""
        path = self.path(job) / "progress.jsonl"
        latest: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line being written
                latest[record.get("desc", "")] = record
        return sorted(latest.values(), key=lambda r: (not r.get("closed"), r.get("time", 0)))

    def summary(self, job: Job) -> dict:
        return {**asdict(job), "shown": job.shown}

    def _save(self, job: Job) -> None:
        with atomic_write(self.path(job) / "job.json") as tmp:
            tmp.write_text(json.dumps(asdict(job), indent=1), encoding="utf-8")


def _load_job(path: Path) -> Job | None:
    """A job.json read back; None where it is unreadable (a job folder another version left, or half gone)."""
    try:
        return Job(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _new_process_group() -> dict:
    """The child leads its own process group (its own session on POSIX): a stop reaches `accelerate launch` and the
    trainer it starts, and closing the server's terminal does not end the run."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


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


def _signal_group(pid: int, interrupt: bool) -> None:
    try:
        if os.name == "nt":
            os.kill(pid, signal.CTRL_BREAK_EVENT if interrupt else signal.SIGTERM)
        else:
            os.killpg(pid, signal.SIGINT if interrupt else signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
