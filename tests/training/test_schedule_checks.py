"""The learning-rate schedule and timestep flags are checked before anything loads: a flag the chosen schedule or
sampling ignores is said, a warmup longer than the run says what the learning rate reaches, --optimizer_args lr= and
a --num_timestep_buckets past the schedule's 1000 timesteps are refused."""

import dataclasses
import itertools
import logging
import warnings

import pytest
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.training.args import parse_args
from musubi_tuner.training.optimizers import SCHEDULERS, check_optimizer, check_scheduler, create_scheduler, parse_key_values
from musubi_tuner.training.timesteps import SAMPLING_MODES, WEIGHTING_SCHEMES, TimestepConfig, loss_weights, sample_timesteps


def stand_in(optimizer_class=torch.optim.AdamW, lr=1e-3):
    return optimizer_class([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def warnings_of(caplog, check):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musubi_tuner"):
        check()
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("musubi_tuner")]


def learning_rates(args, steps):
    """The learning rate of each step of a run of `steps` steps."""
    optimizer = stand_in(lr=args.learning_rate)
    scheduler = create_scheduler(args, optimizer, steps, announce=False)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lr_scheduler.step() before optimizer.step()
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            scheduler.step()
    return rates


def test_optimizer_args_lr_is_refused_for_learning_rate():
    """The LoRA's parameter groups carry --learning_rate, so lr=5 was dropped silently (musubi-tuner: a TypeError)."""
    with pytest.raises(UserError, match="^--optimizer_args lr=5: set the learning rate with --learning_rate$"):
        check_optimizer("AdamW", 1e-3, parse_key_values(["weight_decay=0.1", "lr=5"], "--optimizer_args"), torch.device("cpu"))


def test_num_timestep_buckets_past_the_schedules_timesteps_is_refused_when_read():
    """10^9 buckets were found after the DiT loaded, by the kernel's out-of-memory killer."""
    with pytest.raises(UserError, match="^--num_timestep_buckets 1000000000: must be between 2 and 1000 .*1000 training timesteps"):
        parse_args(["--num_timestep_buckets", "1000000000"])
    assert parse_args(["--num_timestep_buckets", "1000"]).num_timestep_buckets == 1000


def test_a_warmup_longer_than_the_run_says_the_learning_rate_it_reaches(caplog):
    args = parse_args(["--lr_scheduler", "cosine", "--lr_warmup_steps", "100", "--learning_rate", "1e-3"])
    said = warnings_of(caplog, lambda: check_scheduler(args, stand_in(), 3))
    assert said == ["--lr_warmup_steps 100 is longer than the run (3 steps of the schedule): the learning rate reaches 2e-05 at "
                    "most, not --learning_rate 0.001"]
    assert max(learning_rates(args, 3)) == pytest.approx(2e-5)  # what the run's steps use

    args = parse_args(["--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--learning_rate", "1e-3"])
    assert warnings_of(caplog, lambda: check_scheduler(args, stand_in(), 3)) == []  # reaches 1e-3 at step 2


def test_a_decay_that_leaves_no_stable_phase_says_the_learning_rate_it_reaches(caplog):
    args = parse_args(["--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "100", "--learning_rate", "1e-3"])
    said = warnings_of(caplog, lambda: check_scheduler(args, stand_in(), 3))
    peak = max(learning_rates(args, 3))
    assert peak < 1e-5  # the run starts 97 steps into the decay
    assert said == ["--lr_decay_steps 100 is longer than the run (3 steps of the schedule): warmup_stable_decay has no stable "
                    f"phase; the learning rate reaches {peak:.3g} at most, not --learning_rate 0.001"]


CHANGED = {"lr_warmup_steps": "5", "lr_decay_steps": "5", "lr_scheduler_num_cycles": "3", "lr_scheduler_power": "2",
           "lr_scheduler_timescale": "7", "lr_scheduler_min_lr_ratio": "0.3", "lr_scheduler_args": "foo=1"}


def test_each_scheduler_flag_a_schedule_ignores_is_said_and_only_those(caplog):
    """For every schedule and flag: the flag is said to be ignored exactly when giving it neither is refused nor
    changes any step's learning rate (warmup_stable_decay with a decay, so that its decay flags can act)."""
    wrong = []
    for name, flag in itertools.product(SCHEDULERS, CHANGED):
        base = ["--lr_scheduler", name, "--learning_rate", "1e-3"]
        if name == "warmup_stable_decay" and flag != "lr_decay_steps":
            base += ["--lr_decay_steps", "5"]
        args = parse_args(base + [f"--{flag}", CHANGED[flag]])
        try:
            said = warnings_of(caplog, lambda: check_scheduler(args, stand_in(), 20))
            ignored = learning_rates(args, 20) == learning_rates(parse_args(base), 20)
        except UserError:  # refused (a warmup for constant, an unknown --lr_scheduler_args key): not ignored
            said, ignored = [], False
        warned = any(s.startswith(f"--{flag} ") and "ignored with --lr_scheduler " in s for s in said)
        if warned != ignored:
            wrong.append(f"{name} --{flag}: {'said' if warned else 'not said'}, {'ignored' if ignored else 'acts'}")
    assert wrong == []


def test_lr_scheduler_type_and_a_schedule_free_optimizer_say_the_flags_they_ignore(caplog):
    args = parse_args(["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=2", "--lr_scheduler", "cosine",
                       "--lr_warmup_steps", "5"])
    said = warnings_of(caplog, lambda: check_scheduler(args, stand_in(), 20))
    assert said == ["--lr_scheduler cosine is ignored with --lr_scheduler_type StepLR, which is built from --lr_scheduler_args alone",
                    "--lr_warmup_steps 5 is read only by every --lr_scheduler but constant, piecewise_constant, adafactor; ignored with "
                    "--lr_scheduler_type StepLR, which is built from --lr_scheduler_args alone"]

    class SGDScheduleFree(torch.optim.SGD):  # the naming schedulefree's optimizers share (the package is optional)
        pass

    args = parse_args(["--optimizer_type", "SGDScheduleFree", "--lr_scheduler", "linear", "--lr_scheduler_args", "foo=1"])
    said = warnings_of(caplog, lambda: check_scheduler(args, stand_in(SGDScheduleFree), 20))
    free = "ignored with --optimizer_type SGDScheduleFree, a schedule-free optimizer that sets its own learning rate"
    assert said == [f"--lr_scheduler linear is {free}",
                    "--lr_scheduler_args foo=1 is read only by --lr_scheduler_type and every --lr_scheduler but constant, "
                    f"constant_with_warmup, rex, adafactor; {free}"]


def test_the_fuzzers_timestep_flags_that_the_sampling_ignores_are_said(caplog):
    from musubi_tuner.training.timesteps import warn_of_unread_flags

    said = warnings_of(caplog, lambda: warn_of_unread_flags(TimestepConfig("sigma", discrete_flow_shift=5.0, sigmoid_scale=5.0,
                                                                           logit_mean=2.0)))
    assert said == ["--discrete_flow_shift 5.0 is read only by --timestep_sampling shift, and sigma with --sigma_uses_shift; "
                    "ignored with --timestep_sampling sigma",
                    "--sigmoid_scale 5.0 is read only by --timestep_sampling sigmoid, shift, flux_shift, flux2_shift, qwen_shift, "
                    "krea2_shift, qinglong_flux, qinglong_qwen; ignored with --timestep_sampling sigma",
                    "--logit_mean 2.0 is read only by --timestep_sampling logsnr, qinglong_flux, and sigma with --weighting_scheme "
                    "logit_normal; ignored with --timestep_sampling sigma"]


TIMESTEP_CHANGED = {"discrete_flow_shift": 3.0, "sigmoid_scale": 2.0, "logit_mean": 1.0, "logit_std": 2.0, "mode_scale": 0.5,
                    "sigma_uses_shift": True, "preserve_distribution_shape": True}


def test_each_timestep_flag_a_sampling_ignores_is_said_and_only_those(caplog):
    """For every sampling and weighting scheme, with and without the settings other flags act with (--sigma_uses_shift
    and a shift, a timestep range): a flag is said to be ignored exactly when giving it changes no draw and no loss weight."""
    from musubi_tuner.training.timesteps import warn_of_unread_flags

    def outcome(cfg):
        sigma, timesteps = sample_timesteps(cfg, 256, (64, 64), generator=torch.Generator().manual_seed(0))
        weights = loss_weights(cfg, sigma)
        return sigma, timesteps, weights

    def same(a, b):
        return all(x is None and y is None or x is not None and y is not None and torch.equal(x, y) for x, y in zip(a, b))

    defaults = TimestepConfig()
    context = ({}, {"sigma_uses_shift": True, "discrete_flow_shift": 3.0, "min_timestep": 100, "max_timestep": 900})
    wrong = []
    for mode, weighting, extra in itertools.product(SAMPLING_MODES, WEIGHTING_SCHEMES, context):
        base = TimestepConfig(mode, weighting_scheme=weighting, **extra)
        flags = dict(TIMESTEP_CHANGED, **({"weighting_scheme": weighting} if weighting != "none" else {}))
        for flag, value in flags.items():
            given = dataclasses.replace(base, **{flag: extra.get(flag, value)})
            left_out = dataclasses.replace(base, **{flag: getattr(defaults, flag)})
            warned = any(s.startswith(f"--{flag}") for s in warnings_of(caplog, lambda: warn_of_unread_flags(given)))
            ignored = same(outcome(given), outcome(left_out))
            if warned != ignored:
                wrong.append(f"{mode}/{weighting}/{extra} --{flag}: {'said' if warned else 'not said'}, {'ignored' if ignored else 'acts'}")
    assert wrong == []
