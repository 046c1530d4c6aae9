"""Step caching (--step_cache): time per video and DiT evaluations, ours vs diffusers' pipeline with its cache hook.

    PYTHONPATH=src python bench/step_cache.py [--runs 3] [--configs tiny,mid]

Configs (fp32 on the CPU, embedded guidance 6.0, flow shift 7.0, a 60-token prompt padded to 256, the same
weights, text states and noise for both impls):
- tiny: the test suite's tiny DiT (hidden 64, 2 + 2 blocks) on a 16 x 2 x 8 x 8 latent (32 image tokens), 16 steps;
- mid: bench/generate.py's 46M-parameter DiT (hidden 512 = 4 heads of the real head size 128, 2 + 4 blocks)
  on a 16 x 3 x 24 x 24 latent (432 image tokens), 12 steps.
"ours" is `inference.sampler.denoise` with `inference.step_cache.StepCache`, what hv_generate_video runs;
"diffusers" is `HunyuanVideoPipeline(..., output_type="latent")` whose transformer has
`enable_cache(FirstBlockCacheConfig(threshold))`, its state reset before each video.

Rows per config: no cache; First-Block-Cache at two thresholds (both impls, the same threshold); TeaCache at
the published 0.1 and 0.15 (ours only: diffusers has no TeaCache hook for HunyuanVideo). Random weights change
far more from step to step than the released model's, so First-Block-Cache needs thresholds of 0.3-0.5 here to
skip at all; the skip rate at a threshold on the released model is not measured here (docs/generate.md). The
thresholds are ones at which diffusers also computes the last step (it has no last-step rule; at others the counts
differ by that one step).

Columns: seconds per video (median of --runs, every variant of a config taking its turn in each round, so
that other work on the machine slows them alike), DiT evaluations run of those asked for, the latent error
against the same impl without a cache, and diffusers' time over ours (the median over the rounds of the ratio
within a round: on a shared machine the load moves between rounds more than within one). One intra-op thread
by default (--threads): on a shared 2-core machine two threads wait for each other whenever a neighbour runs.
The first (warm-up) round also checks that both impls skip the same steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import machine, measure_interleaved, table  # noqa: E402

from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config  # noqa: E402
from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402

MID = DiTConfig(hidden_size=512, heads_num=4, mlp_hidden_size=2048, mm_double_blocks_depth=2, mm_single_blocks_depth=4,
                text_states_dim=1024, text_states_dim_2=768)
CONFIGS = {
    # name: (config, latent (C, F, H, W), steps, First-Block-Cache thresholds)
    "tiny": (tiny_dit_config(), (16, 2, 8, 8), 16, (0.3, 0.35)),
    "mid": (MID, (16, 3, 24, 24), 12, (0.42, 0.5)),
}
TEACACHE_THRESHOLDS = (0.1, 0.15)
MAX_TEXT, PROMPT_TOKENS, SHIFT, EMBEDDED = 256, 60, 7.0, 6.0


def prompt(config: DiTConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, MAX_TEXT, dtype=torch.long)
    mask[:, :PROMPT_TOKENS] = 1
    return {"text_states": torch.randn(1, MAX_TEXT, config.text_states_dim, generator=g) * mask[..., None], "text_mask": mask,
            "text_states_2": torch.randn(1, config.text_states_dim_2, generator=g)}


class Ours:
    def __init__(self, config: DiTConfig, weights: dict, steps: int, cond: dict, noise: torch.Tensor):
        from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
        from musubi_tuner.inference.sampler import sigma_schedule

        with torch.device("meta"):
            self.dit = HunyuanVideoDiT(config)
        self.dit.load_state_dict(weights, assign=True)
        self.dit.requires_grad_(False).eval()
        self.sigmas, self.cond, self.noise = sigma_schedule(steps, SHIFT), cond, noise
        self.latents: dict = {}
        self.computed: dict = {}

    def loop(self, method: str | None, threshold: float | None):
        from musubi_tuner.inference.sampler import Guidance, denoise
        from musubi_tuner.inference.step_cache import StepCache

        def run():
            cache = StepCache(method, threshold) if method else None
            with torch.no_grad():
                latents = denoise(self.dit, self.noise, self.sigmas, cond=self.cond, uncond=None, guidance=Guidance(EMBEDDED),
                                  step_cache=cache)
            self.latents[(method, threshold)] = latents
            steps = len(self.sigmas) - 1
            self.computed[(method, threshold)] = ("".join("s" if d.skipped else "C" for d in cache.decisions) if cache else "C" * steps)

        return run


class Diffusers:
    """HunyuanVideoPipeline around a transformer with our weights (diffusers' key conversion), one per threshold."""

    def __init__(self, config: DiTConfig, weights: dict, steps: int, cond: dict, noise: torch.Tensor):
        self.config, self.weights, self.steps, self.cond, self.noise = config, weights, steps, cond, noise
        self.latents: dict = {}
        self.computed: dict = {}

    def loop(self, threshold: float | None):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
        from diffusers.hooks import FirstBlockCacheConfig
        from diffusers.utils import logging as diffusers_logging
        from diffusers_reference import diffusers_dit

        diffusers_logging.disable_progress_bar()
        transformer = diffusers_dit(self.weights, self.config)
        if threshold is not None:
            transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None, tokenizer_2=None)
        pipe.set_progress_bar_config(disable=True)
        trace: list[str] = []
        # the tail block's own layers run only when the blocks are computed; the output norm runs at every call
        transformer.norm_out.register_forward_hook(lambda *_: trace.append("s"))
        transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(lambda *_: trace.append("C"))
        _, _, frames, height, width = self.noise.shape

        def run():
            if threshold is not None:
                transformer._reset_stateful_cache()
            trace.clear()
            with torch.no_grad():
                latents = pipe(prompt_embeds=self.cond["text_states"], pooled_prompt_embeds=self.cond["text_states_2"],
                               prompt_attention_mask=self.cond["text_mask"], guidance_scale=EMBEDDED, height=height * 8, width=width * 8,
                               num_frames=(frames - 1) * 4 + 1, num_inference_steps=self.steps,
                               sigmas=np.linspace(1.0, 0.0, self.steps + 1)[:-1], latents=self.noise.clone(), output_type="latent",
                               return_dict=False)[0]
            self.latents[threshold] = latents.float()
            self.computed[threshold] = "".join(trace).replace("Cs", "C")  # a computed call logs C then s

        return run


def bench_config(name: str, runs: int) -> list[dict]:
    config, latent, steps, fbc_thresholds = CONFIGS[name]
    from musubi_tuner.inference.sampler import initial_noise

    weights = random_dit_state_dict(config, seed=0)
    cond, noise = prompt(config), initial_noise((1, *latent), 1)
    ours, theirs = Ours(config, weights, steps, cond, noise), Diffusers(config, weights, steps, cond, noise)
    variants = {("none", None): None, **{("fbcache", t): t for t in fbc_thresholds}}
    loops = {}
    for (method, threshold) in variants:
        loops[("ours", method, threshold)] = ours.loop(None if method == "none" else method, threshold)
        loops[("diffusers", method, threshold)] = theirs.loop(threshold)
    for threshold in TEACACHE_THRESHOLDS:
        loops[("ours", "teacache", threshold)] = ours.loop("teacache", threshold)
    timed = measure_interleaved(loops, runs, warmup=1)

    rows = []
    plain = {"ours": ours.latents[(None, None)], "diffusers": theirs.latents[None]}
    for (impl, method, threshold), result in timed.items():
        computed = ours.computed[(None if method == "none" else method, threshold)] if impl == "ours" else theirs.computed[threshold]
        latents = ours.latents[(None if method == "none" else method, threshold)] if impl == "ours" else theirs.latents[threshold]
        error = ((latents - plain[impl]).norm() / plain[impl].norm()).item()
        theirs_timed = timed.get(("diffusers", method, threshold))
        ratio = statistics.median(d / o for d, o in zip(theirs_timed["times"], result["times"])) if impl == "ours" and theirs_timed else None
        rows.append({
            "config": name, "method": method, "threshold": "-" if threshold is None else f"{threshold:g}", "impl": impl,
            "s/video (median)": f"{result['median']:.3f}", "min..max": f"{min(result['times']):.3f}..{max(result['times']):.3f}",
            "DiT evaluations": f"{computed.count('C')} of {len(computed)}", "steps (C computed, s skipped)": computed,
            "latent error vs uncached": f"{error:.2e}",
            "diffusers / ours": f"{ratio:.2f}x" if ratio else "",
        })
    same = all(ours.computed[("fbcache", t)] == theirs.computed[t] for t in fbc_thresholds)
    ours_vs_diffusers = ((plain["ours"] - plain["diffusers"]).norm() / plain["diffusers"].norm()).item()
    print(f"{name}: the same steps skipped by both impls at every threshold: {same}; uncached latents ours vs diffusers: "
          f"{ours_vs_diffusers:.1e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    rows = []
    for name in args.configs.split(","):
        rows += bench_config(name, args.runs)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
