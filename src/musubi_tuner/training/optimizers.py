"""Optimizers and learning-rate schedules from `--optimizer_type` / `--lr_scheduler` and their `key=value` arguments."""

from __future__ import annotations

import ast
import importlib
import logging
import math
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
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            out[key.strip()] = value.strip()
    return out


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
    lower = name.lower()
    kwargs = dict(optimizer_args)
    if lower == "adamw":
        cls = torch.optim.AdamW
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
    elif "." in name:
        module, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            raise UserError(f"--optimizer_type {name}: cannot import {cls_name} from {module}") from None
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
    except (TypeError, ValueError) as e:  # an unknown key, a value of the wrong type, or one the optimizer rejects
        given = _as_typed(optimizer_args)
        raise UserError(f"--optimizer_args {given} for {cls.__name__}: {e}" if given else f"--optimizer_type {name}: {e}") from None
    full_name = f"{cls.__module__}.{cls.__name__}" + (f"({','.join(f'{k}={v}' for k, v in optimizer_args.items())})" if optimizer_args else "")
    return optimizer, full_name


def check_optimizer(optimizer_type: str, lr: float | None, optimizer_args: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer built on a stand-in parameter: --optimizer_type and --optimizer_args fail in a second, before the
    model loads (an optimizer takes its state at the first step, so this allocates nothing else)."""
    stand_in = torch.nn.Parameter(torch.zeros(16, device=device))
    return create_optimizer(optimizer_type, [{"params": [stand_in], "lr": lr}], lr, optimizer_args)[0]


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__.endswith("ScheduleFree")


def warmup_steps(value: int | float, total: int) -> int:
    """An int is steps; a float (training.args._int_or_float: at most 1) is a fraction of the total."""
    return int(value * total) if isinstance(value, float) else int(value)


SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup", "inverse_sqrt",
              "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "rex", "adafactor")
NEEDS_A_METRIC = ("reduce_lr_on_plateau", "greedy")  # transformers' schedules that step on the loss


def scheduler_name(value: str) -> str:
    """--lr_scheduler, checked when the command line is read: a schedule create_scheduler builds."""
    import argparse

    from musubi_tuner.errors import did_you_mean

    if value in SCHEDULERS or value.startswith("adafactor:"):
        return value
    if value in NEEDS_A_METRIC:
        raise argparse.ArgumentTypeError(f"{value}: this schedule steps on the loss, which the trainer does not pass it "
                                         "(nor does musubi-tuner's); use another, or --lr_scheduler_type")
    raise argparse.ArgumentTypeError(f"{value}: not a schedule here; one of {', '.join(SCHEDULERS)}"
                                     f"{did_you_mean(value.lower(), SCHEDULERS)}")


scheduler_name.__name__ = "schedule"


def create_scheduler(args, optimizer: torch.optim.Optimizer, total_steps: int, announce: bool = True):
    """The LR schedule; total_steps are optimizer steps times processes, as musubi-tuner counts them. `announce`: log
    the schedule chosen in place of --lr_scheduler (not for the trainer's early check on a stand-in optimizer)."""
    if is_schedule_free(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    extra = parse_key_values(args.lr_scheduler_args, "--lr_scheduler_args")
    if args.lr_scheduler_type:
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
    if not name.startswith("adafactor") and getattr(optimizer, "defaults", {}).get("relative_step"):
        # Adafactor with relative_step computes its own step size: the only schedule that fits it reports it (as
        # musubi-tuner switches to); any other would multiply a learning rate the optimizer does not have
        if announce:
            logger.info("--optimizer_type adafactor sets its own step size (relative_step): using the adafactor schedule "
                        "instead of --lr_scheduler %s, as musubi-tuner does", name)
        name = f"adafactor:{args.learning_rate}"
    warmup = warmup_steps(args.lr_warmup_steps, total_steps)
    decay = warmup_steps(args.lr_decay_steps, total_steps)
    if name.startswith("adafactor"):
        from transformers.optimization import AdafactorSchedule

        if warmup:
            raise UserError("--lr_warmup_steps: the adafactor schedule takes no warmup (Adafactor with relative_step warms up "
                            "by itself); remove it or pass --optimizer_args relative_step=False")

        return AdafactorSchedule(optimizer, initial_lr=float(name.split(":")[1]) if ":" in name else 0.0)
    if name in ("constant",) and warmup:
        raise UserError("--lr_scheduler constant takes no warmup; use constant_with_warmup")
    if name == "rex":
        return _rex(optimizer, total_steps, warmup, args.lr_scheduler_min_lr_ratio)
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


def check_scheduler(args, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
    """The schedule built on `optimizer` (check_optimizer's stand-in) and stepped once: --lr_scheduler_args that a
    scheduler takes but cannot use (StepLR's step_size=abc) fail before the model loads, not at the first step."""
    scheduler = create_scheduler(args, optimizer, total_steps, announce=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": there is no training step here
        try:
            scheduler.step()
        except (TypeError, ValueError, ZeroDivisionError) as e:
            given = " ".join(args.lr_scheduler_args or ()) or "(none given)"
            raise UserError(f"--lr_scheduler_args {given}: the schedule fails at its first step: {e}") from None


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
