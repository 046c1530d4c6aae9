"""`--sample_prompts` files (.txt / .toml / .json) as musubi-tuner reads them.

A .txt line is a prompt followed by options: `a cat --w 256 --h 256 --f 25 --d 42 --s 20 --g 6.0 --fs 14.5 --l 1.0 --n blurry --i first.png`
(width, height, frames, seed, steps, embedded guidance, flow shift, CFG scale, negative prompt, I2V image).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from musubi_tuner.cli import MAX_FRAMES, MAX_PIXELS, USUAL_SAMPLING, count, embedded_guidance, far_from_usual, real, seed
from musubi_tuner.errors import UserError, did_you_mean
from musubi_tuner.files import not_text, read_small_file, require_file, text_lines

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplePrompt:
    index: int
    prompt: str
    width: int = 256
    height: int = 256
    frames: int = 1
    seed: int | None = None
    steps: int = 20
    guidance: float = 6.0  # embedded guidance scale
    flow_shift: float = 14.5
    cfg_scale: float | None = None  # real CFG; None = off
    negative_prompt: str | None = None
    image_path: str | None = None

    def normalised(self, where: str) -> "SamplePrompt":
        """Sizes floored to multiples of 16 (musubi-tuner floors to 8, which the 2x2 patch then rejects), frames to
        4N+1, with a warning at `where` that gives what is sampled (the generation command refuses such values; a
        musubi-tuner prompt file keeps working). A prompt of blanks is refused, as the generation command does."""
        if not self.prompt.strip():
            raise UserError(f"{where}: no prompt text (the line starts with the prompt, then its --options)")
        for name, value in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            problem = not_text(value) if value else None
            if problem is not None:  # (the tokenizer failed on it with a TypeError, after the models had loaded)
                raise UserError(f"{where}: the {name} {problem}")
        far = far_from_usual([("--g", self.guidance, USUAL_SAMPLING["embedded_guidance"]), ("--fs", self.flow_shift, USUAL_SAMPLING["flow_shift"]),
                              ("--l", self.cfg_scale if self.negative_prompt else None, USUAL_SAMPLING["cfg_scale"])])
        if far:  # said when the file is read, as generation says its flags' (fuzz_ab 11: only a NaN sample, hours in)
            logger.warning("%s: %s of a NaN or noisy sample", where, far)
        if self.negative_prompt and (self.cfg_scale is None or self.cfg_scale == 1.0):  # (as the generation command says)
            logger.warning("%s: the negative prompt is ignored without real CFG (--l other than 1, 6.0 say), as in musubi-tuner",
                           where)
        if not self.negative_prompt and self.cfg_scale is not None and self.cfg_scale != 1.0:  # (CFG against "" ran: fuzz_ai 7)
            logger.warning("%s: --l %g is ignored without a negative prompt (--n), as in musubi-tuner: sampled without real CFG",
                           where, self.cfg_scale)
        done = replace(self, width=max(16, self.width // 16 * 16), height=max(16, self.height // 16 * 16),
                       frames=max(1, (self.frames - 1) // 4 * 4 + 1))
        if done != self:
            logger.warning("%s: sampled at %dx%d, %d frame%s (sizes are multiples of 16, frame counts 4N+1), not %dx%d, %d",
                           where, done.width, done.height, done.frames, "" if done.frames == 1 else "s",
                           self.width, self.height, self.frames)
        return done


def _text(value: str) -> str:
    return value


# each option's field and domain (the generation command's, as cli.py states them): a value outside is refused when
# the file is read, before the model loads, not when the first sample runs
_OPTIONS = {"w": ("width", count(1, MAX_PIXELS)), "h": ("height", count(1, MAX_PIXELS)), "f": ("frames", count(1, MAX_FRAMES)),
            "d": ("seed", seed(64)),
            "s": ("steps", count(1, 1000)), "g": ("guidance", embedded_guidance()), "fs": ("flow_shift", real(above=0)),
            "l": ("cfg_scale", real()), "n": ("negative_prompt", _text), "i": ("image_path", _text)}  # (any, as generation takes it)
_IGNORED = {"ei", "cn", "ci", "of"}  # options of other architectures


def _value(parse, value, name: str, where: str):
    """`value` (a string of a .txt line, or a TOML/JSON value) through the option's domain, or a UserError naming it."""
    if parse is _text:
        if not isinstance(value, str):
            raise UserError(f"{where}: {name} {value!r} is not text")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: {name} {value!r} is not a number")
    try:
        return parse(str(value).strip())
    except argparse.ArgumentTypeError as e:
        raise UserError(f"{where}: {name} {e}") from None


def parse_line(line: str, index: int, source: str = "prompt file", line_number: int | None = None) -> SamplePrompt:
    """The prompt of `line`, the `index`-th of its file; errors name the file's `line_number` (comment and blank lines
    counted), else the prompt's number."""
    where = f"{source}: line {line_number or index + 1}"
    parts = f" {line}".split(" --")  # (a line that starts with an option has no prompt text)
    fields: dict = {"index": index, "prompt": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        key = key.lower()
        if key in _IGNORED:
            continue
        if key not in _OPTIONS:  # (prose with " --" in it: musubi-tuner drops what matches no option, and samples the line)
            logger.warning("%s: %r is not an option (%s): ignored, as musubi-tuner ignores it", where, f"--{part}".rstrip()[:60],
                           ", ".join("--" + k for k in _OPTIONS))
            continue
        if not value.strip():  # a `--n` with nothing after it, say: not taken as no negative prompt
            raise UserError(f"{where}: --{key} needs a value")
        name, parse = _OPTIONS[key]
        fields[name] = _value(parse, value.strip(), f"--{key}", where)
    return SamplePrompt(**fields).normalised(where)


_UNREAD_KEYS = ("enum",)  # what musubi-tuner adds to each prompt's table (its index): not warned about


def _from_dict(d: dict, index: int, source: str) -> SamplePrompt:
    aliases = {"sample_steps": "steps", "guidance_scale": "guidance", "discrete_flow_shift": "flow_shift", "cfg_scale": "cfg_scale",
               "negative_prompt": "negative_prompt", "image_path": "image_path", "seed": "seed", "width": "width", "height": "height",
               "frame_count": "frames", "frames": "frames", "prompt": "prompt", "steps": "steps", "guidance": "guidance", "flow_shift": "flow_shift"}
    domains = {name: parse for name, parse in _OPTIONS.values()}
    if not isinstance(d, dict):
        raise UserError(f"{source}: entry {index + 1} is {type(d).__name__}, not a prompt line or a table of its settings")
    fields = {"index": index}
    for key, value in d.items():
        if key in aliases:
            name = aliases[key]
            fields[name] = _value(domains.get(name, _text), value, key, f"{source}: entry {index + 1}")
        elif key not in _UNREAD_KEYS:  # (a misspelt `widht` sampled at the default width without a word)
            logger.warning("%s: entry %d: %r is not a sample prompt setting, ignored%s", source, index + 1, key,
                           did_you_mean(key, aliases))
    if "prompt" not in fields:
        raise UserError(f"{source}: entry {index + 1} has no prompt")
    return SamplePrompt(**fields).normalised(f"{source}: entry {index + 1}")


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    what, flag = "sample prompt file", "--sample_prompts"
    path = require_file(path, what, flag)  # (not a FIFO, /dev/zero or a socket: named as what they are)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        from musubi_tuner.tomlio import load_toml

        table = load_toml(path, what, flag).get("prompt", {})
        if not isinstance(table, dict) or not isinstance(table.get("subset", []), list):
            raise UserError(f"{path}: write the prompts as [prompt] (shared settings) and [[prompt.subset]] tables, one per prompt")
        base = {k: v for k, v in table.items() if k != "subset"}
        prompts = [_from_dict({**base, **sub} if isinstance(sub, dict) else sub, i, str(path)) for i, sub in enumerate(table.get("subset", []))]
    elif suffix == ".json":
        from musubi_tuner.tomlio import loads_json

        try:
            entries = loads_json(read_small_file(path, what, flag).decode("utf-8-sig"))  # (a byte-order mark: Notepad)
        except ValueError as e:  # (a UnicodeDecodeError is one): syntax, a key given twice, a huge integer, deep nesting
            raise UserError(f"{path}: not valid JSON ({str(e)[:160]})") from None
        if not isinstance(entries, list):
            raise UserError(f"{path}: a JSON list of prompts (lines or tables of their settings), not {type(entries).__name__}")
        prompts = [parse_line(e, i, str(path)) if isinstance(e, str) else _from_dict(e, i, str(path)) for i, e in enumerate(entries)]
    else:
        try:
            lines = text_lines(read_small_file(path, what, flag).decode("utf-8-sig"))  # (a byte-order mark: Notepad)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        numbered = [(n, ln.strip()) for n, ln in enumerate(lines, start=1) if ln.strip() and not ln.strip().startswith("#")]
        prompts = [parse_line(ln, i, str(path), line_number=n) for i, (n, ln) in enumerate(numbered)]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts
