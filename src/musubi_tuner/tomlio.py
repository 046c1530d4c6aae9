"""Reading TOML files users write (dataset configs, --config_file, prompt files) with errors that name the file, and
JSON that users write (JSON dataset configs, JSONL lines) read as strictly as TOML."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from musubi_tuner.errors import UserError
from musubi_tuner.files import read_small_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def load_toml(path: str | os.PathLike, what: str = "file", flag: str | None = None) -> dict:
    """The table of a TOML file; what is wrong with the file (missing, not a regular file, too large, not TOML) is a
    UserError that names it as `what` (and `flag`)."""
    path = Path(path)
    data = read_small_file(path, what, flag)
    try:
        text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")  # a BOM: what Windows' Notepad writes first
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    return loads_toml(text, path)


def loads_toml(text: str, path: str | os.PathLike) -> dict:
    """The table of TOML `text` that is (or is to be) the file `path`, which a syntax error names."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:  # (arrays or inline tables some hundreds deep: the parser recurses)
        raise UserError(f"{path}: not valid TOML (nested too deeply)") from None


def loads_json(text: str) -> Any:
    """`text` as JSON, with every problem a ValueError that says what: bad syntax (a json.JSONDecodeError, which says
    where), a key given twice in one object (refused as TOML refuses one; Python's json keeps the last), an integer
    Python will not read (over 4300 digits) or nesting too deep."""
    try:
        return json.loads(text, object_pairs_hook=_without_duplicates, parse_int=_json_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except _Duplicate as e:  # (said without a place, in a config of many objects: fuzz_al 4)
        raise ValueError(f"{e}{_object_holding_it(text)}") from None


class _Duplicate(ValueError):
    pass


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _Duplicate(f"key {json.dumps(key)} given twice")
        seen.add(key)
    return dict(pairs)


def _object_holding_it(text: str) -> str:
    """" in the object at line L column C": the object with a key given twice, found by parsing `text` again with
    json's Python scanner, whose object parser is told where each object starts (the C one, and the hook, are not)."""
    import json.decoder
    import json.scanner

    decoder = json.JSONDecoder(object_pairs_hook=_without_duplicates, parse_int=_json_int)

    def parse_object(s_and_end, *args):
        try:
            return json.decoder.JSONObject(s_and_end, *args)
        except _Duplicate as e:
            if getattr(e, "at", None) is None:
                e.at = s_and_end[1] - 1  # (the index just past its "{")
            raise

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        decoder.decode(text)
    except _Duplicate as e:
        at = getattr(e, "at", None)
        if at is not None:
            line = text.count("\n", 0, at) + 1
            return f" in the object at line {line} column {at - (text.rfind(chr(10), 0, at) + 1) + 1}"
    except (ValueError, RecursionError):
        pass
    return ""


def _json_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # Python's limit on converting long digit strings
        raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits, too long to read") from None


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
    if isinstance(value, str):  # (json leaves DEL as it is, which TOML refuses in a string: fuzz_av 2)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, key) for v in value) + "]"
    raise ValueError(f"{key} = {value!r}: cannot be written as TOML")
