"""Optimizers and learning-rate schedules from `--optimizer_type` / `--lr_scheduler` and their `key=value` arguments."""

from __future__ import annotations

import ast
import importlib
import json
import logging
import math
import re
import warnings
from typing import Any, Sequence

import torch

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """`weight_decay=0.01 betas=0.9,0.999` -> {"weight_decay": 0.01, "betas": (0.9, 0.999)} (Python literals; bare words stay strings)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag}: {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
            finite = _finite(out[key.strip()])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[key.strip()] = value.strip()
            finite = _finite_words(value)
        if not finite:  # (eps=1e999 or min_lr_rate=nan made a learning rate of 0, and the run "saved" a LoRA that never
            # learned; weight_decay=1e999 a NaN blamed on --learning_rate: fuzz_ab 3)
            raise UserError(f"{flag} {item}: not a finite number")
    return out


_NON_FINITE = {"nan", "inf", "infinity"}


def _finite(value) -> bool:
    """Whether no number in a parsed value is NaN or infinite (a quoted string is text: a pattern '.*inf.*' is none)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return True


def _finite_words(text: str) -> bool:
    """Whether no word of a value literal_eval did not take is one a schedule or optimizer reads as NaN or infinite:
    min_lr_rate=nan, betas=(0.9,nan) (a pattern holding 'inf' among other characters is not such a word)."""
    return not any(word.lower().lstrip("+-") in _NON_FINITE for word in re.split(r"[\s(),\[\]]+", text))


def _as_typed(values: dict[str, Any]) -> str:
    """parse_key_values' result as the user typed it: `weight_decay=-1 betas=(0.9, 0.99)`."""
    return " ".join(f"{k}={v}" for k, v in values.items())


def _import_optional(module: str, package: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the package {package}: pip install {package}") from None


# The bitsandbytes whose 8-bit optimizers were tested on the CPU (they ran on CUDA only before 0.50); also the core
# dependency's floor in pyproject.toml, where a wheel for the platform exists.
BITSANDBYTES_MIN = "0.50.2"


def _import_bitsandbytes(name: str, on_cpu: bool):
    """bitsandbytes, or a UserError that says what to do where pip found no wheel for this platform."""
    fallback = ("where bitsandbytes publishes no wheel (e.g. Intel macOS) use --optimizer_type AdamW instead: the same "
                "update with float32 state (4x the optimizer memory, small for a LoRA)")
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"--optimizer_type {name} needs bitsandbytes, which is not installed: pip install "
                        f"'bitsandbytes>={BITSANDBYTES_MIN}' (wheels for Linux x86-64 / aarch64, Windows, Apple-silicon "
                        f"macOS); {fallback}") from None
    from packaging.version import Version  # transformers' and accelerate's dependency

    version = getattr(bitsandbytes, "__version__", "0")
    if on_cpu and Version(version) < Version(BITSANDBYTES_MIN):
        raise UserError(f"--optimizer_type {name}: bitsandbytes {version} runs its 8-bit optimizers on CUDA only: "
                        f"pip install -U 'bitsandbytes>={BITSANDBYTES_MIN}'; {fallback}")
    return bitsandbytes


def create_optimizer(optimizer_type: str, params: list[dict], lr: float | None, optimizer_args: dict[str, Any]) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and its full name for metadata. An empty type means AdamW (as musubi-tuner's help says)."""
    name = (optimizer_type or "AdamW").strip()
    if "lr" in optimizer_args:  # the parameter groups carry --learning_rate, which wins over an optimizer's lr (musubi-tuner: a TypeError)
        raise UserError(f"--optimizer_args lr={optimizer_args['lr']}: set the learning rate with --learning_rate")
    lower = name.lower()
    kwargs = dict(optimizer_args)
    if lower == "adamw":
        cls = torch.optim.AdamW
    elif "." in name:  # a module.Class path, imported as written, as musubi-tuner does (bitsandbytes.optim.AdamW8bit was
        # looked up in the short names' table and refused: fuzz_ab 1)
        module, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except ModuleNotFoundError as e:
            raise UserError(f"--optimizer_type {name}: cannot import {module} ({e.name} is not installed: pip install "
                            f"{(e.name or module).split('.')[0]})") from None
        except (ImportError, AttributeError):
            raise UserError(f"--optimizer_type {name}: cannot import {cls_name} from {module}") from None
    elif lower.endswith("8bit"):
        bnb = _import_bitsandbytes(name, on_cpu=any(p.device.type == "cpu" for g in params for p in g["params"]))
        attr = {"adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "lion8bit": "Lion8bit", "sgdnesterov8bit": "SGD8bit",
                "pagedadamw8bit": "PagedAdamW8bit"}.get(lower)
        if attr is None or not hasattr(bnb.optim, attr):
            raise UserError(f"--optimizer_type {name}: bitsandbytes has no such optimizer")
        cls = getattr(bnb.optim, attr)
    elif lower == "adafactor":
        from transformers.optimization import Adafactor

        cls = Adafactor
        kwargs.setdefault("relative_step", True)
        kwargs.setdefault("scale_parameter", True)
        kwargs.setdefault("warmup_init", False)
        if kwargs["relative_step"]:
            kwargs.setdefault("lr", None)  # Adafactor computes its own step size
            for group in params:
                group.pop("lr", None)
            lr = None
    elif lower == "prodigy":
        cls = _import_optional("prodigyopt", "prodigyopt", "--optimizer_type prodigy").Prodigy
    elif lower.endswith("schedulefree"):
        sf = _import_optional("schedulefree", "schedulefree", f"--optimizer_type {name}")
        attr = {"adamwschedulefree": "AdamWScheduleFree", "sgdschedulefree": "SGDScheduleFree",
                "radamschedulefree": "RAdamScheduleFree"}.get(lower)
        if attr is None:
            raise UserError(f"--optimizer_type {name}: schedulefree has no such optimizer")
        cls = getattr(sf, attr)
    else:
        match = next((a for a in dir(torch.optim) if a.lower() == lower), None)
        if match is None:
            raise UserError(f"--optimizer_type {name} is unknown: use AdamW, AdamW8bit, Adafactor, Prodigy, AdamWScheduleFree, "
                            "a torch.optim class name, or module.Class")
        cls = getattr(torch.optim, match)
    if lr is not None:
        kwargs.setdefault("lr", lr)
    try:
        optimizer = cls(params, **kwargs)
    except Exception as e:  # an unknown key, a value of the wrong type, or one the optimizer rejects (torch raises a
        # RuntimeError for some: "fused and foreach cannot be True together" was a traceback)
        given = _as_typed(optimizer_args)
        raise UserError(f"--optimizer_args {given} for {cls.__name__}: {e}" if given else f"--optimizer_type {name}: {e}") from None
    full_name = f"{cls.__module__}.{cls.__name__}" + (f"({','.join(f'{k}={v}' for k, v in optimizer_args.items())})" if optimizer_args else "")
    return optimizer, full_name


def optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What the optimizer computes with, its defaults filled in (the learning rate aside: a resume keeps the saved one), as
    a state's marker records it: `--optimizer_args weight_decay=0.01`, AdamW's own default, is the same optimizer as none
    (it was refused on resume as another: fuzz_ax 9)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # (accelerate's wrapper)
    settings = {k: v for k, v in optimizer.defaults.items() if k not in ("lr", "initial_lr")}
    more = getattr(optimizer, "args", None)  # (bitsandbytes keeps optim_bits, min_8bit_size, is_paged there: an
    if more is not None and hasattr(more, "__dict__"):  # optim_bits=32 was taken for the same optimizer: fuzz_bf 2)
        settings.update({f"args.{k}": v for k, v in vars(more).items()})
    return json.loads(json.dumps(settings, default=repr))  # (tuples as lists, as read back from the marker)


def check_optimizer(optimizer_type: str, lr: float | None, optimizer_args: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer built on a stand-in parameter: --optimizer_type and --optimizer_args fail in a second, before the
    model loads (an optimizer takes its state at the first step, so this allocates nothing else)."""
    stand_in = torch.nn.Parameter(torch.zeros(16, device=device))
    optimizer = create_optimizer(optimizer_type, [{"params": [stand_in], "lr": lr}], lr, optimizer_args)[0]
    # and stepped once, as training steps it: LBFGS (whose step needs a closure) and SparseAdam (sparse gradients only)
    # were tracebacks at the first step, after the model had loaded (fuzz_ab 2)
    stand_in.grad = torch.zeros_like(stand_in)
    try:
        if hasattr(optimizer, "train"):  # (schedule-free optimizers step in train mode)
            optimizer.train()
        optimizer.step()
    except Exception as e:
        raise UserError(f"--optimizer_type {optimizer_type}: cannot step a LoRA's parameters as training steps them "
                        f"({type(e).__name__}: {str(e)[:160]}); choose another optimizer") from None
    return optimizer


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__.endswith("ScheduleFree")


def warmup_steps(value: int | float, total: int) -> int:
    """An int is steps; a float (training.args._int_or_float: at most 1) is a fraction of the total."""
    return int(value * total) if isinstance(value, float) else int(value)


# The schedules of --lr_scheduler and the scheduler flags each one reads (create_scheduler passes it these and no others;
# transformers' constant schedules drop --lr_scheduler_args). --lr_scheduler_type reads --lr_scheduler_args alone, and
# a schedule-free optimizer none of them. check_scheduler warns of each flag given that the schedule in effect ignores.
_WARMUP, _DECAY, _CYCLES, _POWER, _TIMESCALE, _MIN_LR, _ARGS = (
    "lr_warmup_steps", "lr_decay_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_timescale",
    "lr_scheduler_min_lr_ratio", "lr_scheduler_args")
SCHEDULE_FLAGS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear": (_WARMUP, _ARGS),
    "cosine": (_WARMUP, _ARGS),
    "cosine_with_restarts": (_WARMUP, _CYCLES, _ARGS),
    "polynomial": (_WARMUP, _POWER, _ARGS),
    "constant_with_warmup": (_WARMUP,),
    "inverse_sqrt": (_WARMUP, _TIMESCALE, _ARGS),
    "cosine_with_min_lr": (_WARMUP, _MIN_LR, _CYCLES, _ARGS),
    "cosine_warmup_with_min_lr": (_WARMUP, _MIN_LR, _CYCLES, _ARGS),
    "warmup_stable_decay": (_WARMUP, _DECAY, _MIN_LR, _CYCLES, _ARGS),
    "rex": (_WARMUP, _MIN_LR),
    "piecewise_constant": (_ARGS,),
    "adafactor": (),
}
SCHEDULERS = tuple(SCHEDULE_FLAGS)
NEEDS_A_METRIC = ("reduce_lr_on_plateau", "greedy")  # transformers' schedules that step on the loss


def scheduler_name(value: str) -> str:
    """--lr_scheduler, checked when the command line is read: a schedule create_scheduler builds."""
    import argparse

    from musubi_tuner.errors import did_you_mean

    if value in SCHEDULERS:
        return value
    if value.startswith("adafactor:"):  # (its initial rate: "adafactor:abc" was a traceback, "adafactor:nan" recorded)
        try:
            rate = float(value.split(":", 1)[1])
        except ValueError:
            rate = math.nan
        if not math.isfinite(rate) or rate < 0:
            raise argparse.ArgumentTypeError(f"{value}: adafactor:RATE takes a finite initial learning rate, at least 0")
        return value
    if value in NEEDS_A_METRIC:
        raise argparse.ArgumentTypeError(f"{value}: this schedule steps on the loss, which the trainer does not pass it "
                                         "(nor does musubi-tuner's); use another, or --lr_scheduler_type")
    raise argparse.ArgumentTypeError(f"{value}: not a schedule here; one of {', '.join(SCHEDULERS)}"
                                     f"{did_you_mean(value.lower(), SCHEDULERS)}")


scheduler_name.__name__ = "schedule"


def _schedule_in_effect(args, optimizer: torch.optim.Optimizer) -> str:
    """What create_scheduler builds: a schedule of SCHEDULE_FLAGS, "schedule-free" or "lr_scheduler_type"."""
    if is_schedule_free(optimizer):
        return "schedule-free"
    if args.lr_scheduler_type:
        return "lr_scheduler_type"
    if getattr(optimizer, "defaults", {}).get("relative_step"):  # Adafactor computing its own step size
        return "adafactor"
    return args.lr_scheduler.partition(":")[0]


def create_scheduler(args, optimizer: torch.optim.Optimizer, total_steps: int, announce: bool = True):
    """The LR schedule; total_steps are optimizer steps times processes, as musubi-tuner counts them. `announce`: log
    the schedule chosen in place of --lr_scheduler (not for the trainer's early check on a stand-in optimizer)."""
    schedule = _schedule_in_effect(args, optimizer)
    if schedule == "schedule-free":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    extra = parse_key_values(args.lr_scheduler_args, "--lr_scheduler_args")
    if schedule == "lr_scheduler_type":
        name = args.lr_scheduler_type
        module, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module or "torch.optim.lr_scheduler"), cls_name)
        except (ImportError, AttributeError):
            raise UserError(f"--lr_scheduler_type {name}: cannot import it") from None
        try:
            return cls(optimizer, **extra)
        except (TypeError, ValueError) as e:  # a missing or unknown key, a value of the wrong type
            raise UserError(f"--lr_scheduler_args {_as_typed(extra) or '(none given)'} for {cls_name}: {e}") from None

    name = args.lr_scheduler
    if schedule == "adafactor" and not name.startswith("adafactor"):
        # Adafactor with relative_step computes its own step size: the only schedule that fits it reports it (as
        # musubi-tuner switches to); any other would multiply a learning rate the optimizer does not have
        if announce:
            logger.info("--optimizer_type adafactor sets its own step size (relative_step): using the adafactor schedule "
                        "instead of --lr_scheduler %s, as musubi-tuner does", name)
        name = f"adafactor:{args.learning_rate}"
    warmup = warmup_steps(args.lr_warmup_steps, total_steps)
    decay = warmup_steps(args.lr_decay_steps, total_steps)
    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):  # the schedule reports the step size Adafactor computes
            raise UserError(f"--lr_scheduler {args.lr_scheduler}: works only with --optimizer_type adafactor (it reports the "
                            f"step size Adafactor computes), not {args.optimizer_type or 'adamw'}; choose another --lr_scheduler")
        if warmup:
            raise UserError("--lr_warmup_steps: the adafactor schedule takes no warmup (Adafactor with relative_step warms up "
                            "by itself); remove it or pass --optimizer_args relative_step=False")

        return AdafactorSchedule(optimizer, initial_lr=float(name.split(":")[1]) if ":" in name else 0.0)
    if name in ("constant",) and warmup:
        raise UserError("--lr_scheduler constant takes no warmup; use constant_with_warmup")
    if name == "rex":
        return _rex(optimizer, total_steps, warmup, args.lr_scheduler_min_lr_ratio)
    if name == "piecewise_constant":
        return _piecewise_constant(optimizer, extra)
    if name == "constant" and not extra:  # transformers' constant schedule, without importing it (and peft, bitsandbytes: seconds)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    from transformers import get_scheduler

    kwargs: dict[str, Any] = dict(extra)
    if name == "cosine_with_restarts":
        kwargs.setdefault("num_cycles", args.lr_scheduler_num_cycles)
    elif name == "polynomial":
        kwargs.setdefault("power", args.lr_scheduler_power)
    elif name == "inverse_sqrt" and args.lr_scheduler_timescale is not None:
        kwargs.setdefault("timescale", args.lr_scheduler_timescale)
    elif name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        kwargs.setdefault("min_lr_rate", args.lr_scheduler_min_lr_ratio or 0.0)
        kwargs.setdefault("num_cycles", args.lr_scheduler_num_cycles / 2)
    elif name == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", decay)  # stable: total - warmup - decay (transformers derives it, silently)
        kwargs.setdefault("min_lr_ratio", args.lr_scheduler_min_lr_ratio or 0.0)
        kwargs.setdefault("num_cycles", args.lr_scheduler_num_cycles / 2)
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--lr_scheduler {name}: {e}") from None


def _piecewise_constant(optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' piecewise_constant schedule, which musubi-tuner builds from --lr_scheduler_args alone: `step_rules`
    "1:10,0.1:20,0.01" multiplies the rate by 1 before step 10, by 0.1 before step 20, and by 0.01 from there."""
    extra = dict(extra)
    rules, last_epoch = extra.pop("step_rules", None), extra.pop("last_epoch", -1)
    usage = ('--lr_scheduler piecewise_constant takes --lr_scheduler_args step_rules="MULTIPLE:STEP,...,MULTIPLE" '
             '(as "1:10,0.1:20,0.01": times 1 before step 10, 0.1 before step 20, then 0.01)')
    if extra:
        raise UserError(f"{usage}, not {', '.join(sorted(extra))}")
    try:
        *pairs, last = str(rules).split(",") if rules is not None else []
        until = {int(step): float(multiple) for multiple, step in (pair.split(":") for pair in pairs)}
        final = float(last)
    except ValueError:
        raise UserError(f"{usage}; step_rules={rules!r} is not that" if rules is not None else usage) from None
    if not all(math.isfinite(v) for v in [*until.values(), final]):
        raise UserError(f"{usage}; step_rules={rules!r} holds a multiple that is not a finite number")
    steps = sorted(until)

    def multiple(step: int) -> float:
        return next((until[s] for s in steps if step < s), final)

    try:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiple, last_epoch=last_epoch)
    except (KeyError, TypeError) as e:  # (a last_epoch of a run this optimizer did not start)
        raise UserError(f"--lr_scheduler_args last_epoch={last_epoch!r} for piecewise_constant: {e}; leave it out") from None


def check_scheduler(args, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
    """The schedule built on `optimizer` (check_optimizer's stand-in) and stepped once: --lr_scheduler_args that a
    scheduler takes but cannot use (StepLR's step_size=abc) fail before the model loads, not at the first step.
    Warns of each scheduler flag given that the schedule ignores, and of a warmup (or decay) longer than the run."""
    scheduler = create_scheduler(args, optimizer, total_steps, announce=False)
    schedule = _schedule_in_effect(args, optimizer)
    _warn_of_ignored_flags(args, schedule)
    if schedule in SCHEDULE_FLAGS:
        _warn_of_a_run_too_short(args, schedule, scheduler, total_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": there is no training step here
        try:
            scheduler.step()
        except (TypeError, ValueError, ZeroDivisionError) as e:
            given = " ".join(args.lr_scheduler_args or ()) or "(none given)"
            raise UserError(f"--lr_scheduler_args {given}: the schedule fails at its first step: {e}") from None


def _warn_of_ignored_flags(args, schedule: str) -> None:
    from musubi_tuner.training.args import build_parser

    parser = build_parser()  # its defaults: a flag at its default was not given
    if schedule == "schedule-free":
        read, why = (), f"--optimizer_type {args.optimizer_type}, a schedule-free optimizer that sets its own learning rate"
    elif schedule == "lr_scheduler_type":
        read, why = (_ARGS,), f"--lr_scheduler_type {args.lr_scheduler_type}, which is built from --lr_scheduler_args alone"
    else:
        read = SCHEDULE_FLAGS[schedule]
        why = f"--lr_scheduler {args.lr_scheduler}" if schedule == args.lr_scheduler.partition(":")[0] else \
            "the adafactor schedule (Adafactor's relative_step sets the step size)"
    if schedule in ("schedule-free", "lr_scheduler_type") and args.lr_scheduler != parser.get_default("lr_scheduler"):
        logger.warning("--lr_scheduler %s is ignored with %s", args.lr_scheduler, why)
    for flag in (_WARMUP, _DECAY, _CYCLES, _POWER, _TIMESCALE, _MIN_LR, _ARGS):
        value = getattr(args, flag)
        if flag in read or value == parser.get_default(flag) or (flag == _ARGS and not value):
            continue
        readers = [name for name, flags in SCHEDULE_FLAGS.items() if flag in flags]
        others = [name for name in SCHEDULE_FLAGS if name not in readers]
        readers_said = f"every --lr_scheduler but {', '.join(others)}" if len(others) < len(readers) else f"--lr_scheduler {', '.join(readers)}"
        logger.warning("--%s %s is read only by %s%s; ignored with %s", flag, " ".join(value) if flag == _ARGS else value,
                       "--lr_scheduler_type and " if flag == _ARGS else "", readers_said, why)


def _warn_of_a_run_too_short(args, schedule: str, scheduler, total_steps: int) -> None:
    """A warmup longer than the run (or warmup_stable_decay's warmup and decay together): the learning rate never
    reaches --learning_rate, or the stable phase is gone; says the highest learning rate the run reaches."""
    warmup = warmup_steps(args.lr_warmup_steps, total_steps) if _WARMUP in SCHEDULE_FLAGS[schedule] else 0
    decay = warmup_steps(args.lr_decay_steps, total_steps) if _DECAY in SCHEDULE_FLAGS[schedule] else 0
    if warmup + decay <= total_steps:
        return
    factor, base = scheduler.lr_lambdas[0], scheduler.base_lrs[0]
    last = total_steps - 1  # the run's steps use the factors of steps 0 .. total - 1
    top = min(warmup, last)  # the decay's start, and the warmup's top one step before
    peak = max(factor(step) for step in {top, max(top - 1, 0), last, *range(0, total_steps, max(1, total_steps // 10_000))})
    reaches = f"the learning rate reaches {peak * base:.3g} at most, not --learning_rate {base:g}" if peak < 1 - 1e-6 else ""
    if warmup > total_steps:
        logger.warning("--lr_warmup_steps %d is longer than the run (%d steps of the schedule): %s", warmup, total_steps, reaches)
    else:
        longer = f"--lr_decay_steps {decay} and --lr_warmup_steps {warmup} together are" if warmup else f"--lr_decay_steps {decay} is"
        logger.warning("%s longer than the run (%d steps of the schedule): warmup_stable_decay has no stable phase%s",
                       longer, total_steps, f"; {reaches}" if reaches else "")


def _rex(optimizer, total: int, warmup: int, min_ratio: float | None):
    """REX: linear warmup from min to max, then factor m + (1 - m) z / (0.1 + 0.9 z), z the remaining fraction."""
    m = 0.01 if min_ratio is None else min_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return m + (1 - m) * step / max(1, warmup)
        z = max(0.0, 1 - (step - warmup) / max(1, total - warmup))
        return m + (1 - m) * z / (0.1 + 0.9 * z)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_training_steps(num_batches: int, epochs: int | None, max_steps: int, num_processes: int, accumulation: int) -> int:
    """--max_train_epochs overrides --max_train_steps: epochs * ceil(batches / processes / accumulation)."""
    if epochs is None:
        return max_steps
    return epochs * math.ceil(num_batches / num_processes / accumulation)
