"""--optimizer_type: the seed's AdamW8bit runs on the CPU after a plain install, and says what to do where it cannot."""

import sys
import types

import pytest
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.training.optimizers import BITSANDBYTES_MIN, create_optimizer


def lora_like_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 128, generator=g) * 0.1), torch.nn.Parameter(torch.randn(128, 64, generator=g) * 0.1)]


def run(optimizer_type, params, steps=30):
    optimizer, name = create_optimizer(optimizer_type, [{"params": params}], 1e-2, {})
    target = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((params[0] @ params[1] - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return optimizer, name, losses


def test_adamw8bit_runs_on_the_cpu_with_8bit_state_and_follows_adamw():
    pytest.importorskip("bitsandbytes")
    params8, params32 = lora_like_params(), lora_like_params()
    optimizer, name, losses8 = run("AdamW8bit", params8)
    _, _, losses32 = run("AdamW", params32)
    assert name == "bitsandbytes.optim.adamw.AdamW8bit"
    state = optimizer.state[params8[0]]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert losses8[-1] < 0.9 * losses8[0]  # it trains
    assert abs(losses8[-1] - losses32[-1]) < 0.02 * losses32[-1]  # as AdamW does, to the rounding of its state
    for a, b in zip(params8, params32):
        assert ((a - b).norm() / b.norm()).item() < 0.05


def test_missing_bitsandbytes_says_how_to_install_it_and_what_else_to_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError) as err:
        create_optimizer("adamw8bit", [{"params": lora_like_params()}], 1e-3, {})
    message = str(err.value)
    assert f"pip install 'bitsandbytes>={BITSANDBYTES_MIN}'" in message and "--optimizer_type AdamW" in message


def test_a_bitsandbytes_without_cpu_optimizers_is_refused_on_the_cpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.42.0"))  # Intel macOS' fallback
    with pytest.raises(UserError, match="bitsandbytes 0.42.0 runs its 8-bit optimizers on CUDA only"):
        create_optimizer("AdamW8bit", [{"params": lora_like_params()}], 1e-3, {})


@pytest.mark.parametrize("typed, warmup", [("10", 10), ("0.25", 5), ("25%", 5), ("100%", 20), ("1", 1), ("0", 0)])
def test_warmup_as_steps_fraction_or_percentage_as_musubi_tuner_reads_it(typed, warmup):
    """A percentage is a share of the 20 steps (100%: all of them, not 1 step); a number of 1 or more is steps."""
    from musubi_tuner.training.args import build_parser
    from musubi_tuner.training.optimizers import warmup_steps

    args = build_parser().parse_args(["--lr_warmup_steps", typed])
    assert warmup_steps(args.lr_warmup_steps, 20) == warmup


@pytest.mark.parametrize("typed, message", [("150%", "a share of the steps is at most 100%"), ("1.5", "a whole number of steps")])
def test_warmup_that_is_neither_steps_nor_a_share_is_refused(typed, message):
    from musubi_tuner.training.args import build_parser

    with pytest.raises(UserError, match=message):
        build_parser().parse_args(["--lr_warmup_steps", typed])


@pytest.mark.parametrize("typed, message", [
    ("Cosine", "Cosine: not a schedule here; one of constant, .*rex, piecewise_constant, adafactor \\(did you mean cosine\\?\\)"),
    ("reduce_lr_on_plateau", "reduce_lr_on_plateau: this schedule steps on the loss, which the trainer does not pass it"),
])
def test_a_schedule_the_trainer_cannot_build_is_refused_with_the_schedules_it_can(typed, message):
    """Not transformers' list (which lacks rex and adafactor and offers schedules stepped on the loss) after loading."""
    from musubi_tuner.training.args import build_parser
    from musubi_tuner.training.optimizers import SCHEDULERS

    with pytest.raises(UserError, match=message):
        build_parser().parse_args(["--lr_scheduler", typed])
    from musubi_tuner.training.optimizers import check_scheduler

    from transformers.optimization import Adafactor

    for name in SCHEDULERS:  # each one the trainer accepts, it builds and steps (adafactor's, with its optimizer)
        args = build_parser().parse_args(["--lr_scheduler", name, *(["--optimizer_type", "adafactor"] if name == "adafactor" else []),
                                          *(["--lr_scheduler_args", 'step_rules="1:10,0.1"'] if name == "piecewise_constant" else [])])
        params = [torch.nn.Parameter(torch.zeros(2))]
        check_scheduler(args, Adafactor(params) if name == "adafactor" else torch.optim.AdamW(params, lr=1e-3), 100)


def test_the_piecewise_constant_schedule_is_diffusers_as_musubi_tuner_builds_it():
    """fuzz_bb 2 (fuzz_ab 1): musubi-tuner builds diffusers' piecewise_constant schedule from --lr_scheduler_args; it was
    refused as "not a schedule here". The same multiples at every step as diffusers' own; a malformed rule is one line."""
    from diffusers.optimization import get_piecewise_constant_schedule

    from musubi_tuner.training.args import build_parser
    from musubi_tuner.training.optimizers import create_scheduler

    rules = "1:3,0.5:7,0.1:9,0.02"
    args = build_parser().parse_args(["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", f'step_rules="{rules}"'])
    ours = create_scheduler(args, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3), 100)
    theirs = get_piecewise_constant_schedule(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3), rules)
    rates = []
    for _ in range(12):
        rates.append((ours.get_last_lr()[0], theirs.get_last_lr()[0]))
        for schedule in (ours, theirs):
            schedule.optimizer.step()
            schedule.step()
    assert [a for a, _ in rates] == [b for _, b in rates] and len({a for a, _ in rates}) == 4
    for given in ('step_rules="1:x,0.1"', "gamma=0.5"):
        args = build_parser().parse_args(["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", given])
        with pytest.raises(UserError, match=r"--lr_scheduler piecewise_constant takes --lr_scheduler_args step_rules="):
            create_scheduler(args, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3), 100)


def test_optimizer_settings_hold_what_bitsandbytes_keeps_outside_its_defaults():
    """fuzz_bf 2: a resume compares the optimizers' settings; bitsandbytes keeps min_8bit_size, optim_bits and the like in
    its own `args`, not in `defaults`: another value there is another optimizer. (AdamW8bit takes optim_bits and runs in
    8 bits whatever it says: the same optimizer, as its settings show.)"""
    bnb = pytest.importorskip("bitsandbytes")
    from musubi_tuner.training.optimizers import optimizer_settings

    def settings(**kwargs):
        return optimizer_settings(bnb.optim.AdamW8bit([torch.nn.Parameter(torch.zeros(4))], lr=1e-3, **kwargs))

    assert settings(min_8bit_size=1) != settings() == settings(optim_bits=32)
