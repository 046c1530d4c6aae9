"""Each timestep sampler draws the distribution musubi-tuner documents (statistical tests, 20,000 draws)."""

import math

import pytest
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.schedule import shift_sigma
from musubi_tuner.training.timesteps import TimestepConfig, loss_weights, sample_timesteps, timestep_bucket_pool

N = 20_000


def draw(**kw):
    g = torch.Generator().manual_seed(0)
    latent_hw = kw.pop("latent_hw", (64, 64))
    return sample_timesteps(TimestepConfig(**kw), N, latent_hw, generator=g)


def median(t):
    return t.median().item()


def test_uniform_is_uniform_and_the_model_sees_1000t_plus_1():
    t, ts = draw(mode="uniform")
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.quantile(0.9).item() - 0.9) < 0.01
    assert torch.allclose(ts, t * 1000 + 1)


@pytest.mark.parametrize("shift,expected_median", [(7.0, 0.875), (3.0, 0.75), (1.0, 0.5)])
def test_shift_moves_the_median_to_s_over_1_plus_s(shift, expected_median):
    t, _ = draw(mode="shift", discrete_flow_shift=shift)
    assert abs(median(t) - expected_median) < 0.01


def test_sigmoid_scale_spreads_the_distribution():
    narrow, _ = draw(mode="sigmoid", sigmoid_scale=0.5)
    wide, _ = draw(mode="sigmoid", sigmoid_scale=2.0)
    assert abs(median(narrow) - 0.5) < 0.01 and narrow.std() < wide.std()


def test_flux_shift_uses_the_resolution_line():
    t, _ = draw(mode="flux_shift", latent_hw=(68, 120))
    tokens = 34 * 60
    mu = (1.15 - 0.5) / (4096 - 256) * (tokens - 256) + 0.5
    assert abs(median(t) - shift_sigma(torch.tensor(0.5), math.exp(mu)).item()) < 0.01


def test_logsnr_median_is_sigmoid_of_minus_mean_over_2():
    t, _ = draw(mode="logsnr", logit_mean=-6.0, logit_std=2.0)
    assert abs(median(t) - 1 / (1 + math.exp(-3.0))) < 0.01


def test_sigma_mode_draws_integer_timesteps_of_the_unshifted_schedule_and_ignores_the_shift():
    t, ts = draw(mode="sigma", discrete_flow_shift=7.0)
    assert torch.equal(ts, ts.round()) and ts.min() >= 1 and ts.max() <= 1000
    assert abs(ts.mean().item() - 500.5) < 6
    assert torch.allclose(t, ts / 1000)


def test_sigma_mode_can_use_the_shift_when_asked():
    t, _ = draw(mode="sigma", discrete_flow_shift=3.0, sigma_uses_shift=True)
    assert abs(median(t) - 0.75) < 0.01


def test_sigma_mode_logit_normal_centres_on_the_middle():
    _, ts = draw(mode="sigma", weighting_scheme="logit_normal")
    assert abs(ts.median().item() - 500) < 10 and ts.std() < 260  # narrower than uniform's 289


def test_timestep_range_rescales_non_sigma_modes_and_mirrors_in_sigma_mode():
    t, _ = draw(mode="uniform", min_timestep=200, max_timestep=400)
    assert t.min() >= 0.2 and t.max() <= 0.4
    _, ts = draw(mode="sigma", min_timestep=500, max_timestep=1000)
    assert ts.min() >= 1 and ts.max() <= 500  # musubi-tuner's quirk: the index range, mirrored


def test_preserve_distribution_shape_keeps_only_draws_in_range():
    t, _ = draw(mode="shift", discrete_flow_shift=3.0, min_timestep=500, max_timestep=900, preserve_distribution_shape=True)
    assert t.min() >= 0.5 and t.max() <= 0.9
    # rejection keeps the shape: P(t > 0.8 | 0.5 <= t <= 0.9) for shift 3 is 0.251 / 0.728 = 0.345
    # (a linear rescale of the whole range would put half the draws there)
    assert abs((t > 0.8).float().mean().item() - 0.345) < 0.015


def test_a_range_the_sampling_seldom_reaches_is_said_at_the_start_and_its_fallback_at_the_step(caplog, monkeypatch):
    """fuzz_ab 5: shift 1000 into sigma <= 0.005 with --preserve_distribution_shape: every draw missed the range and
    the run trained on unconstrained ones without a word (musubi-tuner warns at each such step)."""
    import logging

    from musubi_tuner.training import timesteps

    monkeypatch.setattr(timesteps, "_fallback_said", False)
    far = TimestepConfig(mode="shift", discrete_flow_shift=1000.0, min_timestep=0, max_timestep=5, preserve_distribution_shape=True)
    with caplog.at_level(logging.WARNING):
        timesteps.warn_of_a_range_seldom_drawn(far)
        timesteps.warn_of_a_range_seldom_drawn(TimestepConfig(mode="shift", discrete_flow_shift=3.0, min_timestep=500,
                                                              max_timestep=900, preserve_distribution_shape=True))
    assert caplog.messages == ["--preserve_distribution_shape: 0% of --timestep_sampling shift's draws fall within "
                               "--min_timestep 0 / --max_timestep 5; a step that finds too few in 1,000 rounds trains on "
                               "unconstrained draws, as musubi-tuner does. Widen the range, or leave the flag out to rescale "
                               "the draws into it"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            t, _ = sample_timesteps(far, 2, (64, 64), generator=torch.Generator().manual_seed(0))
    assert t.min() > 0.9  # musubi-tuner's fallback: the draws as they came
    assert caplog.messages == ["--preserve_distribution_shape: 1,000 rounds of draws found fewer than 2 timesteps within "
                               "--min_timestep 0 / --max_timestep 5: this step, and any other such, trains on unconstrained "
                               "draws, as musubi-tuner does"]  # once


def test_loss_weights():
    sigma = torch.tensor([0.5, 0.25])
    assert torch.allclose(loss_weights(TimestepConfig(weighting_scheme="sigma_sqrt"), sigma), torch.tensor([4.0, 16.0]))
    assert loss_weights(TimestepConfig(), sigma) is None


def test_bucket_pool_is_stratified():
    pool = timestep_bucket_pool(4, 100, torch.Generator().manual_seed(0))
    assert len(pool) == 100
    counts = torch.histc(pool, bins=4, min=0, max=1)
    assert counts.min() >= 24


def test_unknown_mode_and_bad_range_are_user_errors():
    with pytest.raises(UserError, match="--timestep_sampling"):
        TimestepConfig(mode="fancy")
    with pytest.raises(UserError, match="--min_timestep"):
        TimestepConfig(min_timestep=600, max_timestep=500)
