"""The sampler: diffusers' schedule, CFG identities, seeded noise."""

import numpy as np
import pytest
import torch

from musubi_tuner.inference.sampler import Guidance, denoise, initial_noise, sigma_schedule, v2v_start


@pytest.mark.parametrize("steps,shift", [(50, 7.0), (30, 7.0), (12, 17.0), (5, 1.0)])
def test_schedule_equals_diffusers_flow_match_euler_with_the_same_shift(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    ours = sigma_schedule(steps, shift)
    assert torch.allclose(ours, ref.sigmas.float(), atol=1e-6)
    assert torch.allclose(ours[:-1] * 1000, ref.timesteps.float(), atol=1e-3)


def test_musubi_worked_example():
    s = sigma_schedule(50, 7.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and abs(s[1].item() - 0.99709) < 1e-5


def test_noise_is_seeded_per_frame_so_prefixes_agree():
    a = initial_noise((1, 16, 5, 8, 8), seed=7)
    b = initial_noise((1, 16, 9, 8, 8), seed=7)
    assert torch.equal(a, b[:, :, :5]) and not torch.equal(a, initial_noise((1, 16, 5, 8, 8), seed=8))


def _toy_model(calls):
    def model(x, t, text, mask, pooled, g):
        calls.append(x.shape[0])
        # a velocity that depends on the prompt (through `pooled`) and on t
        return x * 0.1 + pooled.mean(dim=1).view(-1, 1, 1, 1, 1) * (t.view(-1, 1, 1, 1, 1) / 1000)
    return model


def _prompt(value, length):
    return {"text_states": torch.full((1, length, 4), value), "text_mask": torch.ones(1, length, dtype=torch.long),
            "text_states_2": torch.full((1, 3), value)}


def test_cfg_scale_1_equals_no_cfg_and_split_equals_batched():
    x = initial_noise((1, 2, 1, 4, 4), seed=0)
    sig = sigma_schedule(6, 7.0)
    cond, uncond = _prompt(1.0, 5), _prompt(-2.0, 3)
    calls = []
    plain = denoise(_toy_model(calls), x, sig, cond=cond, uncond=None, guidance=Guidance())
    scale1 = denoise(_toy_model(calls), x, sig, cond=cond, uncond=uncond, guidance=Guidance(scale=1.0))
    assert torch.equal(plain, scale1)
    calls.clear()
    batched = denoise(_toy_model(calls), x, sig, cond=cond, uncond=uncond, guidance=Guidance(scale=6.0))
    assert calls == [2] * 6
    calls.clear()
    split = denoise(_toy_model(calls), x, sig, cond=cond, uncond=uncond, guidance=Guidance(scale=6.0, split=True))
    assert calls == [1] * 12
    assert torch.allclose(batched, split, atol=1e-6) and not torch.allclose(batched, plain)


def test_cfg_end_stops_real_guidance_after_that_fraction_of_steps():
    calls = []
    x = initial_noise((1, 2, 1, 4, 4), seed=0)
    denoise(_toy_model(calls), x, sigma_schedule(10, 7.0), cond=_prompt(1.0, 5), uncond=_prompt(0.0, 5),
            guidance=Guidance(scale=6.0, cfg_end=0.5))
    assert calls == [2] * 5 + [1] * 5


def test_v2v_strength():
    sig = sigma_schedule(30, 7.0)
    assert v2v_start(sig, 1.0) == 0 and v2v_start(sig, 0.8) == 6 and v2v_start(sig, 0.0) == 30


def test_denoising_loop_equals_diffusers_flow_match_euler_steps():
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, shift = 8, 7.0
    x = initial_noise((1, 2, 1, 4, 4), seed=3)
    cond = _prompt(0.5, 4)
    seen = []

    def model(x, t, text, mask, pooled, g):
        seen.append(t.item())
        return _toy_model([])(x, t, text, mask, pooled, g)

    ours = denoise(model, x, sigma_schedule(steps, shift), cond=cond, uncond=None, guidance=Guidance())
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    latents = x.clone()
    for t in ref.timesteps:
        v = _toy_model([])(latents, t.reshape(1), cond["text_states"], cond["text_mask"], cond["text_states_2"], None)
        latents = ref.step(v, t, latents, return_dict=False)[0]
    assert torch.allclose(torch.tensor(seen), ref.timesteps.float(), atol=1e-3)
    assert torch.allclose(ours, latents, atol=1e-5)
