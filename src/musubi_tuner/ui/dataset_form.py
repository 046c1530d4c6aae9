"""The dataset page's form: every key of the dataset config (from data/config.py's own key tables), the file as
TOML, and saving it only once the caching commands' own loader accepts it."""

from __future__ import annotations

from pathlib import Path

from musubi_tuner.data import config as schema
from musubi_tuner.data.frames import FRAME_EXTRACTIONS
from musubi_tuner.errors import UserError
from musubi_tuner.files import atomic_write
from musubi_tuner.tomlio import dumps

_KINDS = {schema._resolution: "ints", schema._int_list: "ints", schema._bool: "bool", schema._str: "text",
          schema._path: "path", schema._fps: "number", schema._fraction: "number", schema._extraction: "choice"}


def _kind(check) -> str:
    if check in _KINDS:
        return _KINDS[check]
    if check.__qualname__.startswith("_positive_int"):
        return "integer"
    raise AssertionError(f"no form field for the dataset key check {check.__qualname__}")  # a new kind of key in config.py


def _fields(keys: dict) -> list[dict]:
    return [{"key": key, "kind": _kind(check), "default": _shown_default(key),
             "choices": list(FRAME_EXTRACTIONS) if check is schema._extraction else []} for key, check in keys.items()]


def _shown_default(key: str) -> object:
    value = schema.DEFAULTS.get(key)
    return list(value) if isinstance(value, tuple) else value


def form_schema() -> dict:
    """Keys of [general], of image and of video datasets. Keys musubi-tuner accepts for other architectures (ignored
    here) are kept as they are in the file but not offered."""
    return {"general": _fields(schema.SHARED_KEYS), "image": _fields({**schema.SHARED_KEYS, **schema.IMAGE_KEYS}),
            "video": _fields({**schema.SHARED_KEYS, **schema.VIDEO_KEYS})}


def load(path: str) -> dict:
    """The config as a table for the form (a new one when the file does not exist yet), with its TOML text."""
    if "\0" in path:
        raise UserError(f"{path!r}: a path cannot hold a NUL character")
    target = Path(path)
    config = _dataset_table(target) if target.exists() else {"general": {}, "datasets": []}
    return {"path": str(target), "config": config, "schema": form_schema(), "text": to_toml(config),
            "exists": target.exists(), "comments": _comments(target)}


def _comments(target: Path) -> int:
    """The comments of the TOML file at `target` (0 for none, another kind or no file): the form writes the file from
    its values, and they are not kept (they were dropped without a word: fuzz_av 2). A `#` in a one-line string is
    not one."""
    if target.suffix.lower() != ".toml" or not target.is_file():
        return 0
    count = 0
    for line in target.read_text(encoding="utf-8", errors="replace").splitlines():
        quote, escaped = None, False
        for char in line:
            if quote == '"' and escaped:
                escaped = False
            elif quote == '"' and char == "\\":
                escaped = True
            elif quote and char == quote:
                quote = None
            elif not quote and char in "\"'":
                quote = char
            elif not quote and char == "#":
                count += 1
                break
    return count


def _dataset_table(target: Path) -> dict:
    """The raw table of a file that is a dataset config (the keys of one at its top); any other .toml or .json (a tool's
    settings, a credentials file) is refused, not shown."""
    config = schema.read_config_file(target)
    others = set(config) - {"general", "datasets", "validation_datasets"}
    if others or not config:
        raise UserError(f"{target}: not a dataset config (it holds {', '.join(sorted(others))[:80] or 'nothing'}, where one "
                        "holds [general] and [[datasets]])")
    return config


def to_toml(config: dict) -> str:
    try:
        return dumps(_clean(config))
    except ValueError as e:
        raise UserError(f"dataset config: {e}") from None


_NUMBER_KEYS = {key for keys in (schema.SHARED_KEYS, schema.IMAGE_KEYS, schema.VIDEO_KEYS) for key, check in keys.items()
                if _KINDS.get(check) == "number"}


def _as_typed(table: dict) -> dict:
    """A table's values as the file must hold them: a browser sends 24.0 as 24, and musubi-tuner refuses an integer
    source_fps (it was written so, and the config no longer loaded there: fuzz_av 2)."""
    return {k: _as_float(v) if k in _NUMBER_KEYS and type(v) is int else v for k, v in table.items() if v not in (None, "")}


def _as_float(value: int) -> float | int:
    try:
        return float(value)
    except OverflowError:  # (past any float: the loader's check refuses it, naming the key; it was a 500: fuzz_az 8)
        return value


def _clean(config: dict) -> dict:
    """Empty form fields are unset keys; an empty [general] or array is left out; numbers are written as floats."""
    if not isinstance(config, dict):
        raise UserError("dataset config: expected a table")
    out = {}
    for name, value in config.items():
        if isinstance(value, dict):
            value = _as_typed(value)
        elif isinstance(value, list):
            for i, table in enumerate(value):
                if not isinstance(table, dict):
                    raise UserError(f"dataset config: {name}[{i}] is not a table of keys, but {table!r:.40}")
            value = [_as_typed(t) for t in value]
        if value:
            out[name] = value
    return out


def save(target: Path, config: dict) -> dict:
    """Write `config` to `target` if the loader accepts it (the text checked as that file, before it is written:
    relative paths resolve against its folder); a UserError with the loader's message otherwise, and nothing written."""
    text = to_toml(config)
    if target.suffix.lower() != ".toml":
        raise UserError(f"{target}: the studio saves dataset configs as TOML; give a name ending in .toml")
    if target.exists() and not target.is_file():
        raise UserError(f"{target}: not a file; give the path of a dataset config")
    if target.exists():
        _dataset_table(target)  # only a dataset config is replaced, never a model, a LoRA or a job's record
    schema.load_dataset_config(target, text=text)
    dropped = _comments(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return {"path": str(target), "text": text, "saved": True, "comments_dropped": dropped}
