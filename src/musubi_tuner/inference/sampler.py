"""HunyuanVideo's flow-matching Euler sampler: sigma from 1 to 0, shifted, with embedded and/or real CFG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from musubi_tuner.distributed import CfgBranches
from musubi_tuner.inference.step_cache import StepCache
from musubi_tuner.hunyuan.schedule import shift_sigma


def sigma_schedule(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float32: linspace(1, 0, steps + 1) shifted by s*sigma / (1 + (s - 1)*sigma); the model sees sigma * 1000."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, F, H, W) noise drawn frame by frame from one seeded generator, as musubi-tuner does:
    the first frames are the same for a seed whatever the video length."""
    B, C, F, H, W = shape
    g = torch.Generator(device).manual_seed(seed)
    frames = [torch.randn((B, C, 1, H, W), generator=g, device=device, dtype=torch.float32) for _ in range(F)]
    return torch.cat(frames, dim=2).to(dtype)


def same_noise_as(seed: int) -> int | None:
    """The seed below 2^32 whose noise `seed` draws, when it is past it (torch's CPU generator keeps a seed's low 32
    bits, in musubi-tuner as here: --seed 2^32+2 is --seed 2's video, under another name: fuzz_ap 3), else None."""
    return seed & 0xFFFFFFFF if seed >= 2**32 else None


@dataclass
class Guidance:
    """How the prediction is formed at each step.

    embedded: the distilled guidance scale fed to the DiT (x 1000); real CFG with `scale` != 1 runs the
    negative prompt too: v = v_neg + scale * (v_pos - v_neg), for the first `cfg_end` fraction of the steps.
    """

    embedded_scale: float = 6.0
    scale: float = 1.0
    split: bool = False  # negative and positive in two calls instead of one batch of two
    cfg_end: float = 1.0
    branches: CfgBranches | None = None  # CFG-parallel: this process runs one of the two prompts, its partner the other

    @property
    def uses_cfg(self) -> bool:
        return self.scale != 1.0


def denoise(model: Callable[..., torch.Tensor], latents: torch.Tensor, sigmas: torch.Tensor, *, cond: dict, uncond: dict | None,
            guidance: Guidance, image_latents: torch.Tensor | None = None, start_step: int = 0,
            callback: Callable[[int], None] | None = None, step_cache: StepCache | None = None) -> torch.Tensor:
    """Euler integration from sigmas[start_step] to 0.

    model(x, t, text_states, text_mask, text_states_2, guidance) -> velocity; cond/uncond hold
    `text_states`, `text_mask`, `text_states_2` for the positive and negative prompts (batch of 1 each).
    image_latents (I2V): concatenated to the noisy latents on channels at every step.
    step_cache: skips the DiT's blocks where it judges a step's result close to the last computed one;
    branches "cond", "uncond" (--split_uncond) or "cond+uncond" (CFG in one batch) keep their own state.
    Returns float32 latents.
    """
    x = latents.float()
    steps = len(sigmas) - 1
    # --cfg_end: a fraction of the steps that run (V2V runs the last ones only: counted from step 0, a cfg_end of at
    # most 1 - strength turned CFG off without a word: fuzz_ap 2)
    cfg_steps = start_step + round((steps - start_step) * guidance.cfg_end)
    device = x.device

    def run(branch: str, *inputs) -> torch.Tensor:
        if step_cache is None:
            return model(*inputs)
        with step_cache.call(model, i, start_step, steps - 1, branch):
            return model(*inputs)

    for i in range(start_step, steps):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        use_cfg = guidance.uses_cfg and uncond is not None and i < cfg_steps
        model_in = x if image_latents is None else torch.cat([x, image_latents.to(x)], dim=1)
        t = torch.full((1,), sigma * 1000.0, device=device)
        g = torch.full((1,), guidance.embedded_scale * 1000.0, device=device)
        if not use_cfg and guidance.branches is not None:  # (past --cfg_end: the positive replica's step, given to the
            # negative one, whose step cache held no state of the positive prompt: the two then sampled two latents, and
            # the video was tiled from both: fuzz_ap 1)
            v_mine = (torch.zeros_like(x) if guidance.branches.negative else
                      run("cond", model_in, t, cond["text_states"], cond["text_mask"], cond["text_states_2"], g).float())
            v = guidance.branches.exchange(v_mine)[1]
        elif not use_cfg:
            v = run("cond", model_in, t, cond["text_states"], cond["text_mask"], cond["text_states_2"], g)
        elif guidance.branches is not None:
            mine, branch = (uncond, "uncond") if guidance.branches.negative else (cond, "cond")
            v_mine = run(branch, model_in, t, mine["text_states"], mine["text_mask"], mine["text_states_2"], g)
            v_neg, v_pos = guidance.branches.exchange(v_mine.float())
            v = v_neg + guidance.scale * (v_pos - v_neg)
        elif guidance.split:
            v_neg = run("uncond", model_in, t, uncond["text_states"], uncond["text_mask"], uncond["text_states_2"], g)
            v_pos = run("cond", model_in, t, cond["text_states"], cond["text_mask"], cond["text_states_2"], g)
            v = v_neg.float() + guidance.scale * (v_pos.float() - v_neg.float())
        else:
            batch = {k: _stack(uncond[k], cond[k]) for k in ("text_states", "text_mask", "text_states_2")}
            both = run("cond+uncond", torch.cat([model_in, model_in]), t.repeat(2), batch["text_states"], batch["text_mask"],
                       batch["text_states_2"], g.repeat(2))
            v_neg, v_pos = both.float().chunk(2)
            v = v_neg + guidance.scale * (v_pos - v_neg)
        x = x + v.float() * (sigma_next - sigma)
        if callback is not None:
            callback(i)
    return x


def _stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate two batches, padding the sequence dim (text) to the longer one."""
    if a.ndim >= 2 and a.shape[1] != b.shape[1]:
        n = max(a.shape[1], b.shape[1])
        a, b = (torch.nn.functional.pad(x, (0, 0) * (x.ndim - 2) + (0, n - x.shape[1])) for x in (a, b))
    return torch.cat([a, b])


V2V_STRENGTH = 0.8  # --strength when --video_path is given without it (musubi-tuner's default)


def steps_that_run(infer_steps: int, video_path=None, strength: float | None = None) -> int:
    """The denoising steps a generation runs: all of --infer_steps, or V2V's last int(steps * strength) (v2v_start;
    strength None is V2V's default). What --cfg_end, the step cache's warm-up and the planner count (fuzz_ap 2, 4)."""
    if not video_path:
        return infer_steps
    return int(infer_steps * (V2V_STRENGTH if strength is None else strength))


def v2v_start(sigmas: torch.Tensor, strength: float) -> int:
    """The step V2V starts from: the last int(steps * strength) steps run (strength 0 returns the input unchanged)."""
    steps = len(sigmas) - 1
    return steps - steps_that_run(steps, video_path=True, strength=strength)
