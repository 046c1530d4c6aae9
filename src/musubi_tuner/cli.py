"""What every command's flags share: one-line errors, the domain of each number, and the device.

Each flag states its domain where it is defined, `type=count()` or `type=seed(bits=32)`, so a value
outside it is refused before any work, in one line that names the flag, the value and what is allowed:

    error: --network_dim 0: must be at least 1
    error: --seed 18446744073709551616: must be between 0 and 2^64-1 (the RNGs take 64-bit seeds)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re

from musubi_tuner.errors import SharedError, UserError
from musubi_tuner.files import not_text


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a UserError: one `error:` line (no usage block), exit status 2.

    Help texts show each flag's default where it has one (the `%(default)s` of every argument with help). Every
    command takes --debug: the one-line errors end "(--debug shows where)" (errors.run_cli reads it from the argv).
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description"):  # a command module's docstring: its first paragraph, whose first line was cut mid-
            # sentence (fuzz_al 6) (python -OO strips it: None, no description)
            kwargs["description"] = " ".join(kwargs["description"].strip().split("\n\n")[0].split())
        super().__init__(*args, **kwargs)
        # a negative number with an exponent, or -inf, is a value (argparse reads "-1e-1" as an option: "--logit_mean:
        # expected one argument", for a flag given one: fuzz_as 4)
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-inf(?:inity)?$", re.IGNORECASE)
        for name in (None, "store"):  # (a flag without action= is registered as None; the groups share the registry)
            self.register("action", name, _StoreOnce)
        self.add_argument("--debug", action="store_true", help="show full tracebacks")

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:
            action.given = False
        parsed, rest = super().parse_known_args(args, namespace)
        for action in self._actions:  # rules over a flag's values and the other flags, once --help has had its turn
            check = getattr(action, "check", None)  # (checked as the flag was read, `--video_size 72 64 --help`
            if check is not None and action.given:  # printed the error and not the help: fuzz_au 10)
                check(getattr(parsed, action.dest), parsed)
        for action in self._actions:  # say so for each musubi-tuner flag given that does nothing here
            reason = getattr(action, "accepted_only", None)
            if reason and getattr(parsed, action.dest, None) != action.musubi_default and action.dest not in self._told:
                self._told.add(action.dest)
                logging.getLogger("musubi_tuner").warning("%s: accepted for musubi-tuner command lines, and ignored: %s",
                                                          action.option_strings[0], reason)
        return parsed, rest

    @property
    def _told(self) -> set:
        if not hasattr(self, "_told_flags"):
            self._told_flags = set()
        return self._told_flags

    def error(self, message: str):
        # argparse: "argument --x: invalid count value: '0'" or "argument --x: 0: must be ...": name the flag first
        match = re.fullmatch(r"argument (\S+?)(?:/\S+)?: (.*)", message, flags=re.S)
        if match:
            flag, detail = match.groups()
            own = re.match(r"(invalid|expected|ignored|not allowed|one of) ", detail)  # argparse's words, not a domain's
            message = f"{flag}: {detail}" if own else f"{flag} {detail}"
        raise SharedError(f"{message} (see {self.prog} --help)")  # every process has the same command line


class _StoreOnce(argparse._StoreAction):
    """argparse's store, except that a flag of several values given twice is refused: argparse keeps the last list
    (`--lora_weight A --lora_weight B` applied B alone), where a user who writes the flag once per value meant both."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.nargs in ("*", "+") and getattr(self, "given", False):
            parser.error(f"argument {option_string}: given twice; list all its values after one {option_string}")
        self.given = True
        super().__call__(parser, namespace, values, option_string)


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help when it has a default worth showing and does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if (help_ and "%(default)" not in help_ and "default" not in help_ and default not in (None, False, "", [], argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            help_ += " (default: %(default)s)"
        return help_


def accepted_only(group, flag: str, reason: str, **kwargs) -> argparse.Action:
    """A musubi-tuner flag that has nothing to act on here: parsed as there, so command lines keep working, with
    `reason` in its help and in a warning whenever it is given."""
    action = group.add_argument(flag, help=f"accepted for musubi-tuner command lines, no effect here: {reason}", **kwargs)
    action.accepted_only = reason
    action.musubi_default = action.default  # a --config_file value replaces action.default; it is given all the same
    return action


# ----------------------------------------------------------------------------------------------- domains


def _number(value: str, kind: type) -> int | float:
    try:
        number = kind(value) if kind is float else int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: not {'a number' if kind is float else 'a whole number'}") from None
    if kind is float and not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value}: not a finite number")
    return number


def count(minimum: int = 1, maximum: int | None = None, what: str = ""):
    """An integer in [minimum, maximum]: steps, epochs, ranks, batch sizes, workers (minimum 0)."""

    def parse(value: str) -> int:
        number = _number(value, int)
        if number < minimum or (maximum is not None and number > maximum):
            allowed = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value}: must be {allowed}{what}")
        return number

    parse.__name__ = "count"
    return parse


FLOAT32_MAX = 3.4028234663852886e38  # every float flag ends up in a float32 tensor or a kernel's float argument


def real(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None, what: str = ""):
    """A finite float with optional bounds: `minimum` <= x <= `maximum`, or x > `above`; within float32's range always
    (past it, the value was a traceback where torch took it: 'cannot be converted to type float without overflow')."""

    def parse(value: str) -> float:
        number = _number(value, float)
        if abs(number) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"{value}: past the range of float32 numbers (±3.4e+38){what}")
        if above is not None and not number > above:
            raise argparse.ArgumentTypeError(f"{value}: must be greater than {above:g}{what}")
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            if minimum is not None and maximum is not None:
                allowed = f"between {minimum:g} and {maximum:g}"
            else:
                allowed = f"at least {minimum:g}" if minimum is not None else f"at most {maximum:g}"
            raise argparse.ArgumentTypeError(f"{value}: must be {allowed}{what}")
        return number

    parse.__name__ = "number"
    return parse


# the sampling settings' usual ranges: real CFG, the embedded guidance, the flow shift (generation's flags and a sample
# prompt's --l, --g, --fs); past them a value that does not overflow makes noise, or NaN
def add_ddp_timeout(group, what: str) -> None:
    """--ddp_timeout, as training and generation read it (training through accelerate, generation in distributed.join_launched_group)."""
    group.add_argument("--ddp_timeout", type=count(1, 525_600, " minutes (a year)"), default=None,
                       help=f"minutes the processes wait for each other {what} (default: PyTorch's, 30 with gloo, 10 with NCCL)")


USUAL_SAMPLING = {"cfg_scale": (-100, 100), "embedded_guidance": (0, 100), "flow_shift": (1e-3, 1e3)}


def far_from_usual(settings) -> str | None:
    """The flags of `settings` ((flag, value, (lowest usual, highest usual)), value None when not given) set far beyond
    their usual range, as the likely cause of a NaN/inf result, in words; None when none is. A value such as
    --network_alpha 1e30 passes its flag's check and then overflows: the items and files are not to blame."""
    far = [f"{flag} {value:g}" for flag, value, (low, high) in settings if value is not None and not low <= value <= high]
    return f"{' and '.join(far)}, far from the usual, may be the cause" if far else None


def embedded_guidance():
    """--embedded_cfg_scale (and a sample prompt's --g): the DiT embeds it times 1000 in float32, so at most 3.4e35."""
    return real(0, FLOAT32_MAX / 1000, what=" (the DiT embeds it times 1000, a float32)")


def network_dim():
    """--network_dim: a rank the DiT's layers can hold (the trainer's and the planner's flag)."""
    return count(1, 2**20, " (HunyuanVideo's layers are 3,072 wide at the narrowest side: a higher rank adds nothing but memory)")


def seed(bits: int = 64):
    """A seed the RNGs take: torch's generators take 64 bits (its CPU one keeps the low 32: sampler.same_noise_as),
    numpy's global RNG (seeded by training) 32."""
    return count(0, 2**bits - 1, what=f", 2^{bits}-1")


# Bounds beyond which no run can finish (the memory grows with their product): a dataset's resolution and a training
# sample's size are refused when read, instead of by the kernel's out-of-memory killer or a sample that never ends
MAX_PIXELS = 8192
MAX_FRAMES = 1025


def frames_4n1(value: str) -> int:
    """A frame count of the form 4N+1 (the VAE compresses 4 frames into one after the first)."""
    number = _number(value, int)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1 (4N+1: 1, 5, 9, ...)")
    if number > MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"{value}: at most {MAX_FRAMES} frames (HunyuanVideo is made for 129)")
    if (number - 1) % 4:
        low = (number - 1) // 4 * 4 + 1
        raise argparse.ArgumentTypeError(f"{value} is not 4N+1 (try {low} or {low + 4})")
    return number


frames_4n1.__name__ = "frame count"


def pixels(value: str) -> int:
    """A height or width in pixels: a positive multiple of 16 (8x VAE, 2x2 patches) is checked by the caller."""
    number = _number(value, int)
    if number < 16:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 16 pixels")
    if number > MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"{value}: at most {MAX_PIXELS} pixels a side (HunyuanVideo is made for 720x1280)")
    return number


pixels.__name__ = "size"


def add_video_size(group, help: str) -> argparse.Action:
    """--video_size HEIGHT WIDTH, both multiples of 16, checked as the command line is read: the studio's command box
    showed a size the command refused seconds after its start (fuzz_ao 5). Not with --latent_path, which ignores the
    size (fuzz_au 10)."""
    action = group.add_argument("--video_size", type=pixels, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"), help=help)
    action.check = lambda size, args: None if getattr(args, "latent_path", None) else check_video_size(size)
    return action


def check_video_size(size) -> None:
    """--video_size (height, width): multiples of 16 (8x VAE, then the DiT's 2x2 patches), or a UserError naming the flag
    and the nearest sizes that are (plan's said only "video size 540x960": fuzz_af 13)."""
    from musubi_tuner.errors import UserError

    h, w = size
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        nh, nw = (max(16, int(v / 16 + 0.5) * 16) for v in (h, w))
        raise UserError(f"--video_size {h} {w}: height and width must be multiples of 16 (try {nh} {nw})")


def text(value: str) -> str:
    """Text given on the command line: bytes that are not UTF-8 (which Python keeps as lone surrogates) are refused
    here, not by the tokenizer once the models have loaded."""
    problem = not_text(value)
    if problem is not None:
        try:  # UTF-8 bytes read under a locale that is not (LC_ALL=C without Python's UTF-8 mode): the text they are
            return os.fsencode(value).decode("utf-8")  # ("un chat très" was "not UTF-8 text": fuzz_ah 1)
        except UnicodeError:
            raise argparse.ArgumentTypeError(f"{problem}; check the terminal's or the script's encoding") from None
    return value


text.__name__ = "text"


def path(value: str) -> str:
    """A file or folder given on the command line. An empty value, which an unset shell variable gives (`--dit $DIT`),
    is refused here: read as Path("") it was the current folder, so a command read "." as a model or wrote its
    output into whatever folder it ran from."""
    if not value:
        raise argparse.ArgumentTypeError("is empty: give a file or folder (an unset shell variable gives an empty value)")
    return value


path.__name__ = "path"


def compute_dtype(value: str) -> str:
    """A dtype a model computes in (bf16, fp16, fp32 and their spellings), checked when the command line is read, not
    when the model loads after the work; fp8 holds weights only (--fp8, --fp8_base, --fp8_llm), no kernel computes in it."""
    from musubi_tuner.dtypes import FP8_DTYPES, str_to_dtype
    from musubi_tuner.errors import UserError

    try:
        dtype = str_to_dtype(value)
    except UserError:
        dtype = None
    if dtype is None or dtype in FP8_DTYPES:
        raise argparse.ArgumentTypeError(f"{value}: not a dtype to compute in; use bf16, fp16 or fp32"
                                         + (" (fp8 weights: --fp8, --fp8_base or --fp8_llm)" if dtype is not None else ""))
    return value


compute_dtype.__name__ = "dtype"


# ----------------------------------------------------------------------------------------------- device


def resolve_device(value: str | None, flag: str = "--device"):
    """The torch.device a command runs on: `value`, or cuda when there is one, else cpu.

    A device this machine does not have is a UserError, before any model is loaded.
    """
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {value}: not a device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise UserError(f"{flag} {value}: {why} (torch {torch.__version__}); use {flag} cpu or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{flag} {value}: no Apple GPU (MPS) here; use {flag} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag} {value}: unsupported device type (use cpu, cuda, cuda:N or mps)")
    if device.type != "cuda" and device.index not in (None, 0):  # torch takes cpu:1 for the CPU without a word
        raise UserError(f"{flag} {value}: there is one {device.type} device here; use {flag} {device.type}")
    return device
