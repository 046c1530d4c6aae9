"""Weight files in and out: safe loading, lazy per-tensor reading, and atomic, streaming writes.

Every file users own passes through here, so the rules live here once:
- `.pt` files load with `weights_only=True`; a pickle that would run code is refused.
- safetensors are read lazily, one tensor at a time, so a 13B model never exists twice in memory.
- Writes go to a temporary file in the same folder and are renamed into place, so a killed run
  leaves either the old whole file or the new whole file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from musubi_tuner.errors import UserError

# safetensors dtype tags <-> torch dtypes (the format's spec; the same tags musubi-tuner's writer uses).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
ST_TAGS = {dtype: tag for tag, dtype in ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on error it is removed.

    A failed write (full disk, read-only folder) becomes a UserError that names `path`; `path` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, _default_mode(path))  # mkstemp makes 0600 files; give the permissions a normal write would
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise


def require_writable_folder(folder: str | os.PathLike, flag: str, create: bool = True) -> Path:
    """Create `folder` if needed and prove it takes new files, before any long work that would write there.

    Writes and removes a probe file: os.access says yes to root on a read-only mount or a full quota.
    create=False (a --dry_run): create nothing; probe the folder, or the nearest parent that exists.
    """
    folder = Path(folder)
    if not create:
        while not folder.exists() and folder.parent != folder:
            folder = folder.parent
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{folder}: cannot write to this folder ({e.strerror or e}); fix its permissions or choose another {flag}") from None
    return folder


def _default_mode(path: Path) -> int:
    """The replaced file's permissions, or what a new file gets under the current umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_error(path: Path, err: OSError) -> UserError:
    """Turn a failed write (full disk, read-only folder) into a message that names the file."""
    return UserError(f"{path}: cannot write ({err.strerror or err}); check free space and permissions of {path.parent}")


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


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                     cast: torch.dtype | None = None) -> None:
    """Write a safetensors file atomically, streaming tensor by tensor (no second copy of the weights).

    Tensors are written in the mapping's order; floating-point ones are cast to `cast` one at a time if
    given. `metadata` values must be strings.
    """

    def stored_dtype(t: torch.Tensor) -> torch.dtype:
        return cast if cast is not None and t.is_floating_point() else t.dtype

    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str: {bad}")
        header["__metadata__"] = dict(metadata)
    specs = getattr(tensors, "specs", None) or {name: (stored_dtype(t), tuple(t.shape)) for name, t in tensors.items()}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in ST_TAGS:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * ((8 - len(header_bytes) % 8) % 8)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # atomic_write turns a failed write into a UserError
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, (dtype, shape) in specs.items():
            t = tensors[name].detach().to("cpu", dtype)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: computed shape {list(t.shape)} differs from the announced {list(shape)}")
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


# ----------------------------------------------------------------------------------------------- reading


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if path.is_dir():
        raise UserError(f"{path}: expected a {what}, found a folder")
    return path


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """Keys with their dtype and shape, and the metadata, without reading any tensor data."""
    path = require_file(path, "safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise UserError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    data_size = size - 8 - n
    for key, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            end = int(info["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise UserError(f"{path}: tensor {key!r} has a malformed entry in the header") from None
        if end > data_size:
            raise UserError(f"{path}: file is truncated (tensor {key!r} ends at byte {end} of {data_size})")
        entries[key] = (dtype, shape)
    return entries, metadata


class StateDictFile:
    """Read-only, lazy view of a weight file: keys, shapes and dtypes up front, tensors on demand.

    Works for safetensors (memory-mapped, one tensor at a time) and `.pt` pickles (loaded with
    `weights_only=True` and mmap where the file allows). `prefix_key` picks a sub-dict such as the
    official DiT's `module`; `strip_prefix` removes a key prefix such as `vae.`.
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "checkpoint", subdict_keys: tuple[str, ...] = ()):
        self.path = require_file(path, what)
        self.what = what
        self.metadata: dict[str, str] = {}
        self._safe = None
        self._offsets: dict[str, tuple[int, int]] | None = None  # safetensors: absolute byte range per tensor, for read()
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.path.suffix.lower() == ".safetensors" or _looks_like_safetensors(self.path):
            entries, self.metadata = read_safetensors_header(self.path)
            self._entries = entries
            from safetensors import safe_open

            try:
                self._safe = safe_open(str(self.path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise UserError(f"{self.path}: unreadable safetensors file ({e})") from None
        else:
            obj = load_torch_file(self.path, what)
            self._tensors = _find_state_dict(obj, subdict_keys, self.path, what)
            self._entries = {k: (v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}
        self._rename: dict[str, str] = {k: k for k in self._entries}

    # -- key handling
    def strip_prefix(self, prefix: str) -> None:
        """Keep only keys starting with `prefix` (if any do) and drop the prefix from them."""
        if any(k.startswith(prefix) for k in self._rename):
            self._rename = {k[len(prefix):]: v for k, v in self._rename.items() if k.startswith(prefix)}

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

    def get(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """One tensor, optionally cast and moved (cast happens after reading that tensor only)."""
        real = self._rename[key]
        if self._safe is not None:
            t = self._safe.get_tensor(real)
        else:
            t = self._tensors[real]
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        return t

    def read(self, key: str) -> torch.Tensor:
        """One tensor in memory of its own, read without mapping the file (safetensors).

        `get` returns views of the memory-mapped file, whose pages then count in this process's resident
        memory until the file is closed: streaming a whole model through `get` ends up holding a copy of it.
        Reading each tensor with a positioned read keeps only the tensors still referenced.
        """
        if self._safe is None:
            return self.get(key)
        real = self._rename[key]
        dtype, shape = self._entries[real]
        if self._offsets is None:
            self._offsets = _safetensors_offsets(self.path)
        start, end = self._offsets[real]
        t = torch.empty(shape, dtype=dtype)
        if end > start:
            buffer = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(start)
                if f.readinto(buffer) != end - start:
                    raise UserError(f"{self.path}: file is truncated (tensor {real!r})")
        return t

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._rename:
            yield k, self.get(k, dtype)

    def load_all(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return dict(self.items(dtype))


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute (start, end) byte offsets of every tensor's data in a safetensors file (header already validated)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()}


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors content saved under another extension: 8-byte length followed by '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> object:
    """torch.load with weights_only=True (mmap when possible) and errors that name the file."""
    path = require_file(path, what)
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols is noise to users: the file loads or is refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unknown object"
        raise UserError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers "
            f"(it could run code when unpickled; {first[:160]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable PyTorch {what} (truncated or a different format: {str(e)[:160]})") from None


def _find_state_dict(obj: object, subdict_keys: tuple[str, ...], path: Path, what: str) -> dict[str, torch.Tensor]:
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
            dit = " (the layout of HunyuanVideo's DiT mp_rank_00_model_states.pt; pass it with --dit)" if nested == "module" else ""
            raise UserError(f"{path}: not a {what}: its tensors sit under {nested!r}{dit}")
        hint = f" (looked under {', '.join(repr(k) for k in subdict_keys)})" if subdict_keys else ""
        raise UserError(f"{path}: holds no tensors{hint}; top-level keys: {sorted(map(str, obj))[:8]}")
    raise UserError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
