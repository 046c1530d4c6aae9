"""Publishing a run to the Hugging Face Hub and resuming one from it (musubi-tuner's `--huggingface_*` flags),
on `huggingface_hub`. `HF_ENDPOINT` points it at another server that speaks the Hub's API.

Every saved LoRA (and its `.comfyui` companion) is uploaded to `--huggingface_repo_id` under
`--huggingface_path_in_repo` (the repository's root without it); with `--save_state_to_huggingface` each state
folder too, as `<path>/<name>-state`. The repository is created (private unless
`--huggingface_repo_visibility public`) when the run starts, so a wrong token or repository fails before
training does. During the run a failed upload is logged and training goes on (the files are on disk); the
last save uploads synchronously, waits for the background ones (`--async_upload`) and names every one that failed.

`--resume_from_huggingface --resume REPO_ID/PATH[:REVISION[:REPO_TYPE]]` downloads the state folder PATH (into
the Hugging Face cache) and resumes from it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)


def _api(token: str | None):
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("the --huggingface_* flags need the huggingface_hub package: pip install huggingface_hub") from None
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)  # HF_ENDPOINT read now, not at import


def _short(error: Exception) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def check_hub_args(args) -> None:
    """What the Hub flags need of each other, before anything runs: a combination that does nothing (as in
    musubi-tuner) is said so; a location that cannot be read is an error."""
    for flag in ("save_state_to_huggingface", "async_upload", "huggingface_path_in_repo", "huggingface_repo_type"):
        if getattr(args, flag) and not args.huggingface_repo_id:
            logger.warning("--%s does nothing without --huggingface_repo_id (the repository to upload to)", flag)
    if args.huggingface_repo_id and args.save_state_to_huggingface and not (args.save_state or args.save_state_on_train_end):
        logger.warning("--save_state_to_huggingface uploads the training states, and none is saved: add --save_state or "
                       "--save_state_on_train_end")
    if args.resume_from_huggingface and not args.resume:
        logger.warning("--resume_from_huggingface does nothing without --resume REPO_ID/PATH[:REVISION[:REPO_TYPE]]")
    if args.resume_from_huggingface and args.resume:
        parse_hub_location(args.resume)
    if (args.huggingface_repo_visibility or "private").lower() not in ("public", "private"):
        raise UserError(f"--huggingface_repo_visibility {args.huggingface_repo_visibility}: public or private")


class HubUploader:
    """Uploads the files a run saves to one repository; failures are collected, not raised, while training runs."""

    def __init__(self, repo_id: str, repo_type: str | None = None, path_in_repo: str | None = None, token: str | None = None,
                 private: bool = True, asynchronous: bool = False):
        self.repo_id, self.repo_type, self.token = repo_id, repo_type, token
        self.folder = (path_in_repo or "").strip("/")
        self.private, self.asynchronous = private, asynchronous
        self.pending: dict[Path, threading.Thread] = {}
        self.failed: list[str] = []
        self.api = _api(token)

    @classmethod
    def from_args(cls, args) -> "HubUploader | None":
        if not args.huggingface_repo_id:
            return None
        return cls(args.huggingface_repo_id, args.huggingface_repo_type, args.huggingface_path_in_repo, args.huggingface_token,
                   private=(args.huggingface_repo_visibility or "").lower() != "public", asynchronous=args.async_upload)

    def create_repo(self) -> None:
        """The repository, created if missing; an error the user must fix (token, name, no server) stops the run here."""
        try:
            self.api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
        except Exception as e:  # huggingface_hub raises its HTTP errors, httpx connection errors, ValueError for bad ids
            raise UserError(f"--huggingface_repo_id {self.repo_id}: cannot create or reach the repository: {_short(e)}") from None

    def path_in_repo(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name

    def upload(self, path: Path, sync: bool = False) -> None:
        """Upload a file or a folder as `<path_in_repo>/<its name>`; in the background with --async_upload unless `sync`."""
        path = Path(path)
        self.wait_for(path)
        if self.asynchronous and not sync:
            thread = threading.Thread(target=self._upload, args=(path,), name=f"upload {path.name}")
            thread.start()
            self.pending[path] = thread
        else:
            self._upload(path)

    def wait_for(self, path: Path) -> None:
        """Let a background upload of `path` finish (before the file is removed or written again)."""
        thread = self.pending.pop(Path(path), None)
        if thread is not None:
            thread.join()

    def _upload(self, path: Path) -> None:
        dest = self.path_in_repo(path.name)
        try:
            if path.is_dir():
                self.api.upload_folder(repo_id=self.repo_id, repo_type=self.repo_type, folder_path=path, path_in_repo=dest,
                                       commit_message=f"upload {path.name}")
            else:
                self.api.upload_file(repo_id=self.repo_id, repo_type=self.repo_type, path_or_fileobj=path, path_in_repo=dest,
                                     commit_message=f"upload {path.name}")
            logger.info("uploaded %s to %s/%s", path.name, self.repo_id, dest)
        except Exception as e:  # the run goes on: the file is on disk, and finish() names what failed
            self.failed.append(f"{path.name}: {_short(e)}")
            logger.error("upload of %s to %s failed (training goes on; the file is on disk): %s", path, self.repo_id, _short(e))

    def finish(self) -> None:
        """Wait for background uploads; name every upload that failed."""
        for path in list(self.pending):
            self.wait_for(path)
        if self.failed:
            logger.error("%d uploads to %s failed; upload these files by hand:\n  %s", len(self.failed), self.repo_id,
                         "\n  ".join(self.failed))


@dataclass
class HubLocation:
    repo_id: str
    path: str
    revision: str | None
    repo_type: str | None


def parse_hub_location(value: str) -> HubLocation:
    """musubi-tuner's `REPO_ID/PATH[:REVISION[:REPO_TYPE]]` (REPO_ID is owner/name); a revision alone means a model repo."""
    parts = value.split("/")
    if len(parts) < 3 or not all(parts[:2]):
        raise UserError(f"--resume {value}: with --resume_from_huggingface, give OWNER/REPO/PATH[:REVISION[:REPO_TYPE]], "
                        "PATH being the state folder in the repository")
    path, revision, repo_type = "/".join(parts[2:]), None, None
    if ":" in path:
        pieces = path.split(":")
        if len(pieces) == 2:
            (path, revision), repo_type = pieces, "model"
        elif len(pieces) == 3:
            path, revision, repo_type = pieces
        else:
            raise UserError(f"--resume {value}: at most PATH:REVISION:REPO_TYPE after the repository")
    return HubLocation(f"{parts[0]}/{parts[1]}", path.strip("/"), revision or None, repo_type or None)


def download_state(value: str, token: str | None = None) -> Path:
    """The local copy of the state folder `--resume` names in a repository (downloaded into the Hugging Face cache)."""
    where = parse_hub_location(value)
    api = _api(token)
    # the cache huggingface_hub uses, as the environment says now (it reads HF_HUB_CACHE / HF_HOME when imported)
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    try:
        root = api.snapshot_download(repo_id=where.repo_id, repo_type=where.repo_type, revision=where.revision, cache_dir=cache,
                                     allow_patterns=[f"{where.path}/*", f"{where.path}/**"])
    except Exception as e:
        raise UserError(f"--resume {value}: cannot download the state: {_short(e)}") from None
    folder = Path(root) / where.path
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(f"--resume {value}: {where.repo_id} has no files under {where.path}"
                        + (f" at revision {where.revision}" if where.revision else ""))
    logger.info("downloaded the state %s of %s to %s", where.path, where.repo_id, folder)
    return folder
