"""Reading TOML files users write (dataset configs, --config_file, prompt files) with errors that name the file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from musubi_tuner.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def load_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8")  # a BOM: what Windows' Notepad writes first
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def dumps(table: dict) -> str:
    """A TOML document for a table of plain values: scalars and lists at the top and in sub-tables (`[name]`), and
    lists of tables (`[[name]]`): the shape of a dataset config. Strings use JSON's escaping, which is valid TOML."""
    head, sections = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            sections.append(f"[{key}]\n" + _key_values(value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            sections.extend(f"[[{key}]]\n" + _key_values(v) for v in value)
        else:
            head.append(f"{key} = {_value(value, key)}")
    parts = (["\n".join(head) + "\n"] if head else []) + sections
    return "\n".join(parts)


def _key_values(table: dict) -> str:
    return "".join(f"{key} = {_value(value, key)}\n" for key, value in table.items() if value is not None)


def _value(value, key: str) -> str:
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and -2**63 <= value < 2**63:  # TOML's integers are 64-bit
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, key) for v in value) + "]"
    raise ValueError(f"{key} = {value!r}: cannot be written as TOML")
