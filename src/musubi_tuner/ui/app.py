"""The studio's web app: four pages and the JSON endpoints their scripts call. Long work (inspecting a dataset,
planning, checking a LoRA) runs in worker threads and commands run as child processes; no request waits for them."""

from __future__ import annotations

import filecmp
import itertools
import json
import logging
import os
import secrets
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.responses import JSONResponse as StarletteJSON
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from musubi_tuner.errors import UserError
from musubi_tuner.files import TEMP_SUFFIX, atomic_write, remove_leftover_temp_files, require_present
from musubi_tuner.launch import child_environment, shown
from musubi_tuner.ui import commands, dataset_form, run_view
from musubi_tuner.ui.forms import form_schema
from musubi_tuner.ui.guard import Guard
from musubi_tuner.ui.jobs import Jobs, NoSuchJob
from musubi_tuner.ui.workspace import Workspace

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
PAGES = ("dataset", "plan", "train", "generate")
PLAN_TIMEOUT_SECONDS = 300


def body(raw: bytes) -> dict:
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise UserError("the request body is not JSON (or nests too deep)") from None
    if not isinstance(data, dict):
        raise UserError("the request body is not a JSON object")
    _require_text(data, "the request")
    return data


def _require_text(value, where: str) -> None:
    """Every string of a request is text a file or a command line can hold: JSON may carry a lone UTF-16 surrogate (half
    an emoji a page pasted), which no UTF-8 file takes; refused here, before a job folder or a file is made."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{where}: {value!r:.60} holds half of a character (a lone surrogate); paste it again") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _require_text(key, where)
            _require_text(item, f"{where}'s {key!r:.40}")
    elif isinstance(value, list):
        for item in value:
            _require_text(item, where)


def field(data: dict, key: str, kind: type, default=None):
    """`data[key]` (or `default`), which must be a `kind`: a request of another shape is a 400 naming the field, not a
    server error."""
    value = data.get(key, default)
    if not isinstance(value, kind):
        wanted = {str: "a string", dict: "an object"}[kind]
        raise UserError(f"the request's {key!r} must be {wanted}, not {json.dumps(value)[:40]}")
    return value


class Tasks:
    """In-process work in a small thread pool; the page asks for the result by id."""

    def __init__(self, workers: int = 2, name: str = "studio"):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self.futures: dict[str, Future] = {}
        self.ids = itertools.count(1)

    def submit(self, fn, *args) -> str:
        task_id = str(next(self.ids))
        self.futures[task_id] = self.pool.submit(fn, *args)
        return task_id

    def forget(self, task_id: str) -> None:
        """Drop a task's result (one not started yet is not run)."""
        future = self.futures.pop(task_id, None)
        if future is not None:
            future.cancel()

    def state(self, task_id: str) -> dict:
        future = self.futures.get(task_id)
        if future is None:
            return {"state": "unknown", "error": f"no task {task_id} (the studio was restarted?)"}
        if not future.done():
            return {"state": "running"}
        error = future.exception()
        if isinstance(error, UserError):
            return {"state": "failed", "error": str(error)}
        if error is not None:
            return {"state": "failed", "error": f"{type(error).__name__}: {error}"}
        return {"state": "done", "result": future.result()}


def _short(message: str, most: int = 2000) -> str:
    """A message as the page shows it: a value of megabytes that a request gave is not echoed whole (its start, and its
    end, where the cause is said)."""
    if len(message) <= most:
        return message
    return f"{message[:most // 2]} ...({len(message) - most:,} characters)... {message[-most // 2:]}"


class JSONResponse(StarletteJSON):
    """JSON in ASCII, its other characters escaped: a file name that is not UTF-8 (a Latin-1 `caf\xe9.png` from an old
    archive) is held as Python's surrogate escape, which Starlette's UTF-8 JSON could not encode: the whole Inspect of
    its dataset was a 500 on every poll (fuzz_bc 3). Escaped, it reaches the page and comes back in a request as the
    same name."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _take_name(written: Path, name: Path) -> None:
    """`written` under `name` too, or FileExistsError when a file has that name: a hard link, which no other writer can
    take from under it; where the file system has none, an empty file claims the name and the written one replaces it."""
    try:
        os.link(written, name)
    except FileExistsError:
        raise
    except OSError:  # (no hard links here: FAT, exFAT, some network shares)
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(written, name)


def api(handler, streamed: bool = False):
    """A JSON endpoint: handler(request, body) runs in a worker thread (the page never waits on another request);
    a UserError is its one line as {"error": ...} (status 400), as the commands print it. `streamed`: the body is
    handed on as an iterator of its chunks as they arrive, not read whole first."""
    async def endpoint(request: Request):
        try:
            raw = _Chunks(request) if streamed else await _small_body(request) if request.method == "POST" else b""
        except UserError as e:
            return JSONResponse({"error": _short(str(e))}, status_code=413)
        try:
            if streamed:  # (its own workers: see UPLOADS_AT_ONCE)
                import anyio.to_thread

                return JSONResponse(await anyio.to_thread.run_sync(handler, request, raw, limiter=_uploads_limiter()))
            return JSONResponse(await run_in_threadpool(handler, request, raw))
        except UserError as e:
            return JSONResponse({"error": _short(str(e))}, status_code=400)
        except NoSuchJob as e:
            return JSONResponse({"error": _short(f"no run {e.args[0]!r} in this workspace")}, status_code=404)
        except Exception as e:  # a defect of the studio's: the page still gets one line, and the log the traceback
            if isinstance(e, OSError) and e.filename is not None:  # a path the request gave that the system refuses
                return JSONResponse({"error": _short(f"{e.filename}: {e.strerror or e}")}, status_code=400)
            logger.exception("%s %s", request.method, request.url.path)
            return JSONResponse({"error": f"internal error ({type(e).__name__}: {e}); the studio's log has the details"},
                                status_code=500)
    return endpoint


MAX_BODY_BYTES = 16 * 2**20  # a form's values or a dataset config: each argument is at most 128 KB (forms.MAX_ARGUMENT_BYTES)


async def _small_body(request: Request) -> bytes:
    """A JSON request's body, refused past MAX_BODY_BYTES before it is read whole (a 200 MB body took the studio from
    350 MB to 936 MB, and it stayed at 740 MB: fuzz_ac 8)."""
    declared = request.headers.get("content-length", "")
    too_large = UserError(f"the request is over {MAX_BODY_BYTES // 2**20} MiB, more than any form sends; nothing was read")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class _Chunks:
    """A request's body as an iterator of the chunks the client sends, for a handler in a worker thread: an upload is
    written as it arrives. Read whole first, a 300 MB upload took the studio from 333 MB to 919 MB (fuzz_l F20)."""

    def __init__(self, request: Request):
        self.stream = request.stream().__aiter__()

    def __iter__(self):
        import anyio.from_thread

        from starlette.requests import ClientDisconnect

        async def next_chunk():
            with anyio.fail_after(UPLOAD_IDLE_SECONDS):
                return await self.stream.__anext__()

        while True:
            try:
                yield anyio.from_thread.run(next_chunk)
            except StopAsyncIteration:
                return
            except ClientDisconnect:
                raise UserError("the page went away before the whole file had arrived; nothing was written") from None
            except TimeoutError:
                raise UserError(f"the upload stalled: nothing arrived for {UPLOAD_IDLE_SECONDS} s; nothing was written") from None


UPLOAD_SUFFIX_BYTES = 16  # a longer "suffix" is no file type's
UPLOAD_NAME_BYTES = 240  # an upload's name is shortened to this (its suffix kept): room for "-N" and any file system's 255
UPLOAD_IDLE_SECONDS = 120  # an upload that sends nothing this long is dropped: it held a worker as long as its client wished
UPLOADS_AT_ONCE = 8  # uploads read in their own workers: forty stalled ones held every worker, and every endpoint, Stop too,
# waited (fuzz_be 4)
_upload_workers = None


def _uploads_limiter():
    import anyio

    global _upload_workers
    if _upload_workers is None:  # (made in the event loop, as anyio requires)
        _upload_workers = anyio.CapacityLimiter(UPLOADS_AT_ONCE)
    return _upload_workers


class Studio:
    """The endpoints, over one workspace: its jobs (child processes), in-process tasks and run views."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.jobs = Jobs(workspace.root / "jobs")
        self.tasks = Tasks()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.views = run_view.RunViews(workspace, self.jobs)
        if (workspace.root / "uploads").is_dir():  # (an upload the studio was killed in left its temporary file: fuzz_ac 2)
            remove_leftover_temp_files(workspace.root / "uploads")

    def page(self, name: str):
        async def render(request: Request):
            return self.templates.TemplateResponse(request, f"{name}.html", {"page": name, "pages": PAGES,
                                                                             "workspace": str(self.workspace.root)})
        return render

    # ---------------------------------------------------------------- files, tasks

    async def files(self, request: Request):
        try:
            path = self.workspace.readable(request.query_params.get("path", ""))
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=403)
        try:
            found = path.is_file()
        except OSError as e:  # a name too long, say
            return JSONResponse({"error": f"{str(path)[:200]}: {e.strerror or e}"}, status_code=400)
        if not found:  # (a folder was "no such file": fuzz_ac 12)
            what = "a folder; the studio serves files" if path.is_dir() else "no such file"
            return JSONResponse({"error": f"{str(path)[:200]}: {what}"}, status_code=404)
        # a workspace's .html or .svg (a downloaded dataset's, say) is shown as a file, never run as a page of the studio:
        # a script there could call the API from the studio's own origin
        return FileResponse(path, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                           "Content-Security-Policy": "sandbox; default-src 'none'; img-src 'self'; media-src 'self'"})

    def task_state(self, request: Request, raw: bytes):
        return self.tasks.state(request.path_params["task"])

    def upload(self, request: Request, raw: bytes):
        name = Path(request.query_params.get("name", "")).name
        if not name.strip() or name in (".", ".."):  # (" " was taken as a file of that name: fuzz_be 11)
            raise UserError("upload: no file name")
        stem, suffix = os.path.splitext(name)
        if len(os.fsencode(suffix)) > UPLOAD_SUFFIX_BYTES:  # (no type's suffix: shortened as part of the name; kept, it
            stem, suffix = name, ""  # left nothing of the name, or none that fits: fuzz_bf 4)
        while len(os.fsencode(stem + suffix)) > UPLOAD_NAME_BYTES and stem:  # (a browser's name the page cannot change, of
            stem = stem[:-1]  # 240 bytes, was refused for its temporary file's length: shortened, its suffix kept)
        name = stem + suffix
        target = self.workspace.writable(Path("uploads") / name, "upload")
        target.parent.mkdir(parents=True, exist_ok=True)
        # under a name no earlier upload has: x.png, x-1.png, ... (a second "image.png" replaced the first without a word,
        # and a finished generation's command then named another image: fuzz_ac 3); the same bytes again are the same file.
        # Written whole first, then linked to the first free name, which no other upload can then take: two of one name at
        # once both took uploads/image.png, and it held one of them (fuzz_bc 11)
        stem, suffix = target.stem, target.suffix
        incoming = target.with_name(f".upload.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")  # (a temporary file's
        # name: left by a kill, it goes at the next start)
        with atomic_write(incoming) as tmp, open(tmp, "wb") as f:
            for chunk in raw:
                f.write(chunk)
        if incoming.stat().st_size == 0:  # (stored, it failed later as --image_path: fuzz_be 11)
            incoming.unlink()
            raise UserError(f"upload {name}: the file is empty; nothing was written")
        try:
            for number in itertools.count():
                target = target.with_name(f"{stem}-{number}{suffix}" if number else name)
                try:
                    _take_name(incoming, target)
                    break
                except FileExistsError:
                    continue
        finally:
            incoming.unlink(missing_ok=True)
        earlier_names = [name, *(f"{stem}-{i}{suffix}" for i in range(1, number))] if number else []
        for earlier in (target.with_name(n) for n in earlier_names):
            if earlier.is_file() and filecmp.cmp(earlier, target, shallow=False):
                target.unlink()
                return {"path": str(earlier)}
        return {"path": str(target)}

    # ---------------------------------------------------------------- dataset

    def dataset_get(self, request: Request, raw: bytes):
        path = self.workspace.resolve(request.query_params.get("path") or str(self.workspace.demo_assets()["toml"]))
        return {**dataset_form.load(path), "cache": commands.cache_values(self.workspace)}

    def dataset_toml(self, request: Request, raw: bytes):
        return {"text": dataset_form.to_toml(field(body(raw), "config", dict, {}))}

    def dataset_save(self, request: Request, raw: bytes):
        data = body(raw)
        target = self.workspace.writable(field(data, "path", str, ""), "dataset config")
        return dataset_form.save(target, field(data, "config", dict, {}))

    def dataset_inspect(self, request: Request, raw: bytes):
        from musubi_tuner.ui.dataset_view import inspect_dataset

        given = field(body(raw), "path", str, "")
        if not given.strip():  # (it was read as the workspace: ".: expected a dataset config, found a folder")
            raise UserError("give the path of a dataset config (.toml) to inspect")
        path = self.workspace.resolve(given)
        return {"task": self.tasks.submit(inspect_dataset, path, self.workspace.root / "previews")}

    def dataset_cache(self, request: Request, raw: bytes):
        data = body(raw)
        toml = self.workspace.resolve(field(data, "toml", str, ""))  # (relative: the workspace's, as Save wrote it)
        # the models too are the workspace's, as the config beside them, and there before a job starts (a relative path
        # was the studio's folder's, and "not found" in a job already started: fuzz_ba 6)
        vae, te1, te2 = (self.workspace.resolve(field(data, key, str, "")) for key in ("vae", "te1", "te2"))
        problems = []
        for value, what, flag in ((vae, "VAE checkpoint", "--vae"), (te1, "text encoder", "--text_encoder1"),
                                  (te2, "text encoder", "--text_encoder2")):
            try:
                if not value.strip():
                    raise UserError(f"{flag}: empty; give the {what}'s path")
                require_present(value, what, flag)
            except UserError as e:
                problems.append(str(e))
        if problems:
            raise UserError("; ".join(problems))
        cmds = commands.caching_commands(toml, vae, te1, te2, self.workspace)
        return self.jobs.summary(self.jobs.start("cache", f"cache {Path(toml).name}", cmds, {"dataset_config": str(toml)}))

    # ---------------------------------------------------------------- commands

    def form(self, request: Request, raw: bytes):
        command = request.path_params["command"]
        return {"groups": form_schema(commands.parser_for(command)), "values": commands.demo_values(command, self.workspace),
                "writes": list(commands.WRITES[command])}

    def command_line(self, request: Request, raw: bytes):
        cmd, missing = commands.build(request.path_params["command"], field(body(raw), "values", dict, {}), self.workspace)
        return {"shown": shown(cmd), "missing": missing}

    def plan(self, request: Request, raw: bytes):
        cmd, missing = commands.build("plan", field(body(raw), "values", dict, {}), self.workspace)
        if missing:
            raise UserError("; ".join(missing))

        def run():
            done = subprocess.run(cmd, capture_output=True, text=True, env=child_environment(), timeout=PLAN_TIMEOUT_SECONDS)
            return {"shown": shown(cmd), "output": done.stdout + done.stderr, "returncode": done.returncode}
        return {"task": self.tasks.submit(run), "shown": shown(cmd)}

    # ---------------------------------------------------------------- jobs

    def job_start(self, request: Request, raw: bytes):
        data = body(raw)
        command, values = data.get("command"), field(data, "values", dict, {})
        if command not in ("train", "generate"):
            raise UserError(f"unknown command {command!r}: jobs are train or generate")
        cmd, outputs = commands.job(command, values, self.workspace)
        title = outputs.get("output_name") or str(values.get("prompt") or "")[:60]
        return self.jobs.summary(self.jobs.start(command, title, [cmd], outputs))

    def job_list(self, request: Request, raw: bytes):
        """The jobs, newest first: of one kind (`kind`), and of one dataset config (`dataset_config`, resolved as the
        caching resolves it: the Dataset page showed another config's caching: fuzz_ao 4)."""
        kind, config = request.query_params.get("kind"), request.query_params.get("dataset_config")
        config = str(self.workspace.resolve(config)) if config else None
        return {"jobs": [self.jobs.summary(j) for j in self.jobs.all() if kind in (None, j.kind)
                         and config in (None, j.outputs.get("dataset_config"))]}

    def job_detail(self, request: Request, raw: bytes):
        return self.views.detail(self.jobs.get(request.path_params["job"]))

    def job_stop(self, request: Request, raw: bytes):
        return self.jobs.summary(self.jobs.stop(request.path_params["job"]))

    def job_resume(self, request: Request, raw: bytes):
        old = self.jobs.get(request.path_params["job"])
        if old.kind != "train":
            raise UserError("only training runs resume; start a generation again instead")
        if old.state in ("starting", "running"):
            raise UserError(f"{old.id} is still running")
        if not self.views.resumable(old):  # (--resume auto found no state of it and started afresh over the folder's run of
            # that name, one the job had been refused beside: fuzz_at 2)
            raise UserError(f"{old.id} ended before its first training step, and its folder holds no state of its run: there is "
                            f"nothing of it to resume; start it again from the Train page")
        command = commands.with_resume(old.commands[-1], old.outputs, old.started)
        return self.jobs.summary(self.jobs.start("train", old.title, [command], old.outputs, resumed_from=old.id, cwd=old.cwd or None))

    def loras(self, request: Request, raw: bytes):
        found = []
        for job in self.jobs.all():  # (one without its name, of a job.json hand-made or damaged, has none: it was a 500,
            # fuzz_be 5)
            if job.kind == "train" and job.outputs.get("output_dir") and job.outputs.get("output_name"):
                found += [str(p) for p in run_view.RunViews.lora_files(Path(job.outputs["output_dir"]), job.outputs["output_name"])]
        return {"files": sorted(set(found))}

    def routes(self) -> list:
        return [
            Route("/", lambda request: RedirectResponse("/dataset")),
            Route("/favicon.ico", lambda request: Response(status_code=204)),
            *[Route(f"/{name}", self.page(name)) for name in PAGES],
            Route("/files", self.files),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
            Route("/api/tasks/{task}", api(self.task_state)),
            Route("/api/upload", api(self.upload, streamed=True), methods=["POST"]),
            Route("/api/dataset", api(self.dataset_get)),
            Route("/api/dataset/toml", api(self.dataset_toml), methods=["POST"]),
            Route("/api/dataset/save", api(self.dataset_save), methods=["POST"]),
            Route("/api/dataset/inspect", api(self.dataset_inspect), methods=["POST"]),
            Route("/api/dataset/cache", api(self.dataset_cache), methods=["POST"]),
            Route("/api/form/{command}", api(self.form)),
            Route("/api/command/{command}", api(self.command_line), methods=["POST"]),
            Route("/api/plan", api(self.plan), methods=["POST"]),
            Route("/api/loras", api(self.loras)),
            Route("/api/jobs", api(self.job_list)),
            Route("/api/jobs", api(self.job_start), methods=["POST"]),
            Route("/api/jobs/{job}", api(self.job_detail)),
            Route("/api/jobs/{job}/stop", api(self.job_stop), methods=["POST"]),
            Route("/api/jobs/{job}/resume", api(self.job_resume), methods=["POST"]),
        ]


def create_app(workspace: Workspace, *, token: str | None = None, loopback_only: bool = True):
    studio = Studio(workspace)
    app = Starlette(routes=studio.routes())
    app.state.jobs, app.state.workspace = studio.jobs, workspace
    return Guard(app, token=token, loopback_only=loopback_only)
