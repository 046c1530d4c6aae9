"""Forms made from the commands' own argparse parsers, so the studio offers every flag with the command's help text,
and turns a filled form back into the command line that the parser then checks, as the command itself would."""

from __future__ import annotations

import argparse
import os
import shlex

from musubi_tuner.errors import UserError, did_you_mean


def _kind(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return "choice"
    if action.nargs in ("*", "+"):
        return "list"  # one value per line (paths may hold spaces)
    return "text"  # nargs=N: the N values separated by spaces


def _default(action: argparse.Action) -> object:
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.nargs == 0:
        return ""
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default)
    return str(default)


def form_schema(parser: argparse.ArgumentParser) -> list[dict]:
    """The parser's flags by group: [{"title", "fields": [{"name", "flag", "kind", "help", "default", "choices"}]}]."""
    groups = []
    for group in parser._action_groups:  # argparse keeps no public list of its groups
        fields = []
        for action in group._group_actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flag = max(action.option_strings, key=len)
            fields.append({"name": action.dest, "flag": flag, "kind": _kind(action), "help": action.help or "",
                           "default": _default(action), "choices": [str(c) for c in action.choices or ()],
                           "nargs": action.nargs if isinstance(action.nargs, int) else None})
        if fields:
            groups.append({"title": group.title or "", "fields": fields})
    return groups


MAX_ARGUMENT_BYTES = 128 * 1024  # Linux's most for one argument of a command line (MAX_ARG_STRLEN)


def command_flags(parser: argparse.ArgumentParser, values: dict[str, object]) -> list[str]:
    """The flags for `values` ({dest: str | bool}), in the parser's order, leaving out what equals the default;
    checked by the parser itself (its one-line error as a UserError)."""
    flags: list[str] = []
    schema = form_schema(parser)
    known = [field["name"] for group in schema for field in group["fields"]]
    for name in values:  # a misspelt key would run with the flag's default, unsaid
        if name not in known:
            raise UserError(f"unknown option {name!r:.60}{did_you_mean(name, known)}")
    for group in schema:
        for field in group["fields"]:
            value = form_value(field, values.get(field["name"]))
            if field["kind"] == "flag":
                if value is True or value in ("true", "on", "1"):
                    flags.append(field["flag"])
                continue
            if value is None or not str(value).strip():
                continue
            if field["kind"] == "list":
                items = [line.strip() for line in str(value).splitlines() if line.strip()]
            elif field["nargs"]:
                items = str(value).split()
            else:
                items = [str(value).strip()]
            if field["kind"] != "list" and " ".join(items) == field["default"]:
                continue
            if any(len(os.fsencode(item)) > MAX_ARGUMENT_BYTES for item in items):  # the job would fail to start
                raise UserError(f"{field['flag']}: over {MAX_ARGUMENT_BYTES // 1024} KB, more than a command line takes in one "
                                "argument; shorten it")
            if len(items) == 1 and not field["nargs"] and field["kind"] != "list" and items[0].startswith("-"):
                flags.append(f"{field['flag']}={items[0]}")  # (one word, whatever it starts with: a prompt "-- cinematic")
                continue
            for item in items:  # a word of several that starts with a dash is read as an option: "64 64 --save_path=/x"
                if item.startswith("-") and not _is_number(item):  # wrote outside the workspace (fuzz_ac 1)
                    raise UserError(f"{field['flag']}: {item!r:.60} starts with a dash, which the command reads as an option, "
                                    f"not a value" + ("; write a path that starts with - as ./-name" if field["kind"] == "list" else ""))
            flags += [field["flag"], *items]
    parser.parse_args(flags)  # the command's own checks: raises UserError (cli.Parser) with its one line
    return flags


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


FLAG_WORDS = (True, False, None, "", "true", "false", "on", "off", "1", "0")


def form_value(field: dict, value: object) -> object:
    """A form's value as the page sends it: a flag is true or false, anything else a string (or a number typed into
    it); another JSON type, or a NUL character (no path or argument can hold one), is a UserError naming the flag."""
    flag = field["flag"]
    if field["kind"] == "flag":
        if not any(value is w or (isinstance(w, str) and value == w) for w in FLAG_WORDS):
            raise UserError(f"{flag}: on or off (true or false), not {value!r:.40}")
        return value
    if isinstance(value, bool) or not (value is None or isinstance(value, (str, int, float))):
        raise UserError(f"{flag}: a value typed as text, not {type(value).__name__} {value!r:.40}")
    if isinstance(value, str) and "\0" in value:
        raise UserError(f"{flag}: holds a NUL character, which no path or argument can")
    return value


def form_values(parser: argparse.ArgumentParser, flags: list[str]) -> dict[str, object]:
    """The inverse: a command line's flags as form values, as typed (to fill a form from a command)."""
    parser.parse_args(flags)  # a bad command line is a UserError here, not a half-filled form
    actions = parser._option_string_actions
    values: dict[str, object] = {}
    at = 0
    while at < len(flags):
        flag, joined, value = flags[at].partition("=")  # (--prompt=text, as command_flags writes one word)
        action = actions[flag if joined and flag in actions else flags[at]]
        following = [value] if joined and flag in actions else []
        at += 1
        while at < len(flags) and not (flags[at].startswith("--") and flags[at].partition("=")[0] in actions):
            following.append(flags[at])
            at += 1
        if action.nargs == 0:
            values[action.dest] = True
        else:
            values[action.dest] = ("\n" if _kind(action) == "list" else " ").join(following)
    return values


def split_flags(text: str) -> list[str]:
    """A command line typed or pasted by the user, split as a POSIX shell would."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UserError(f"cannot read the command line ({e})") from None
