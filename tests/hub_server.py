"""A local stand-in for the Hugging Face Hub: the few endpoints huggingface_hub calls to create a repository, commit
files to it (upload_file, upload_folder) and download them (snapshot_download), over plain HTTP, in memory.

    with HubServer() as hub:          # hub.url: give it as HF_ENDPOINT
        ...
        hub.files("me/my-lora")        # {path: bytes} of the repository's main branch

It answers every upload with "regular" mode (file contents inline in the commit), so no LFS or Xet storage is
involved. Requests it does not implement get 404 and are recorded in `hub.unknown`, so a test can say which one a
newer huggingface_hub started making.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=lambda: ["0" * 40])


class HubServer:
    def __init__(self, token: str | None = None):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.token = token  # when set, every request must carry it
        self.unknown: list[str] = []
        self.requests: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server._handle(self, "GET")

            def do_HEAD(self):
                server._handle(self, "HEAD")

            def do_POST(self):
                server._handle(self, "POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)].files)

    # ------------------------------------------------------------------------------------------- dispatch

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(h.path).path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        with self.lock:
            self.requests.append(f"{method} {path}")
        if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(h, 401, {"error": "Invalid credentials in Authorization header"}, method)
        routes = (
            ("POST", r"/api/repos/create", self._create),
            ("GET", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/([^/]+))?", self._info),
            ("POST", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/preupload/([^/]+)", self._preupload),
            ("POST", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/commit/([^/]+)", self._commit),
            ("GET", r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", self._tree),
            ("GET|HEAD", r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self._resolve),
        )
        for methods, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if method in methods.split("|") and match:
                with self.lock:
                    return handler(h, method, body, *match.groups())
        self.unknown.append(f"{method} {h.path}")
        self._json(h, 404, {"error": f"not implemented here: {method} {path}"}, method)

    def _json(self, h, status: int, payload, method: str = "GET", headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status == 404 and "RepoNotFound" in str(payload):
            h.send_header("X-Error-Code", "RepoNotFound")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)

    def _repo(self, h, kind: str, repo_id: str, method: str) -> Repo | None:
        repo = self.repos.get((TYPES.get(kind, kind or "model"), repo_id))
        if repo is None:
            self._json(h, 404, {"error": "RepoNotFound: Repository not found"}, method)
        return repo

    # ------------------------------------------------------------------------------------------- endpoints

    def _create(self, h, method, body):
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        key = (request.get("type") or "model", repo_id)
        prefix = "" if key[0] == "model" else f"{key[0]}s/"
        if key in self.repos:
            return self._json(h, 409, {"error": "You already created this repo", "url": f"{self.url}/{prefix}{repo_id}"})
        self.repos[key] = Repo(private=bool(request.get("private")) or request.get("visibility") == "private")  # older / newer clients
        self._json(h, 200, {"url": f"{self.url}/{prefix}{repo_id}", "name": repo_id})

    def _info(self, h, method, body, kind, repo_id, revision):
        repo = self._repo(h, kind, repo_id, method)
        if repo is not None:
            self._json(h, 200, {"id": repo_id, "sha": repo.commits[-1], "private": repo.private,
                                "siblings": [{"rfilename": p} for p in sorted(repo.files)]}, method)

    def _preupload(self, h, method, body, kind, repo_id, revision):
        if self._repo(h, kind, repo_id, method) is not None:
            files = json.loads(body)["files"]
            self._json(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})

    def _commit(self, h, method, body, kind, repo_id, revision):
        repo = self._repo(h, kind, repo_id, method)
        if repo is None:
            return
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                repo.files.pop(item["value"]["path"], None)
        sha = hashlib.sha1(repr(sorted(repo.files.items())).encode()).hexdigest()
        repo.commits.append(sha)
        self._json(h, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha})

    def _tree(self, h, method, body, kind, repo_id, revision, folder):
        repo = self._repo(h, kind, repo_id, method)
        if repo is None:
            return
        entries = [{"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                   for p, data in sorted(repo.files.items()) if not folder or p.startswith(folder.rstrip("/") + "/")]
        self._json(h, 200, entries, method)

    def _resolve(self, h, method, body, kind, repo_id, revision, filename):
        repo = self._repo(h, kind, repo_id, method)
        if repo is None:
            return
        data = repo.files.get(filename)
        if data is None:
            return self._json(h, 404, {"error": "EntryNotFound"}, method, {"X-Error-Code": "EntryNotFound"})
        h.send_response(200)
        for k, v in {"Content-Type": "application/octet-stream", "Content-Length": str(len(data)), "X-Repo-Commit": repo.commits[-1],
                     "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}.items():
            h.send_header(k, v)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)
