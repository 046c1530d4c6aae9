"""Denoising step of hv_generate_video: ours vs diffusers' HunyuanVideoPipeline, same weights, same inputs.

    python bench/generate.py [--runs 3] [--steps 3] [--rows t2v,cfg]

Bench config (fixed): a DiT of hidden 512 (4 heads of 128, the real head size), MLP 2048, 2 double +
4 single blocks, 2 refiner blocks, LLM width 1024, CLIP width 768 (46M parameters: matmuls dominate, a
step takes seconds on 2 CPU cores) on a latent of 16 x 5 x 32 x 32 (a 17-frame 256x256 video: 1280 image
tokens), fp32 on the CPU, flow shift 7.0. The prompt is padded to 256 LLM tokens with 60 valid (a typical
caption); the negative prompt has 40.
Rows:
- t2v: HunyuanVideo's distilled guidance (embedded 6.0, one model call per step);
- cfg: SkyReels' real CFG 6.0 with a negative prompt (ours: one batch of two; diffusers: `true_cfg_scale`,
  two calls);
- cfg_split (not run by default): the same with ours given `--split_uncond` (two calls, as diffusers).
"ours" is `inference.sampler.denoise` (what `hv_generate_video.py` runs per step) on our DiT, frozen and in
eval mode as `load_dit` returns it; "diffusers" is `HunyuanVideoPipeline(...)(output_type="latent")`
with `HunyuanVideoTransformer3DModel` built from the same weights (diffusers' own key conversion) and its
`FlowMatchEulerDiscreteScheduler`; both get the same text states and the same initial noise. Text
encoding and VAE decoding are not timed (the pipeline is given prompt embeddings and returns latents).

Each row runs in two processes (time, then memory; see bench/common.py) that hold both impls. A run is a
whole `--steps`-step loop; after one warm-up loop each, the impls take turns, so that other work on the
machine slows them alike; the table shows the median over `--runs` runs divided by the steps. Peak MiB is
the resident-set growth during one loop (the weights, the same for both, are loaded before). The last
column compares the final latents of the two impls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import MEMORY_MODE_ENV, machine, matmul_rate, measure, measure_interleaved, run_worker, table  # noqa: E402

from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402
from musubi_tuner.hunyuan.cost import forward_flops  # noqa: E402

CONFIG = DiTConfig(hidden_size=512, heads_num=4, mlp_hidden_size=2048, mm_double_blocks_depth=2, mm_single_blocks_depth=4,
                   text_states_dim=1024, text_states_dim_2=768)
LATENT = (16, 5, 32, 32)
MAX_TEXT, PROMPT_TOKENS, NEGATIVE_TOKENS = 256, 60, 40
SHIFT = 7.0
ROWS = {"t2v": dict(embedded=6.0, cfg=1.0), "cfg": dict(embedded=1.0, cfg=6.0), "cfg_split": dict(embedded=1.0, cfg=6.0, split=True)}


def inputs(seed: int = 1) -> dict:
    """Prompt and negative prompt states (right-padded to 256, zeros past the valid tokens) and the initial noise."""
    from musubi_tuner.inference.sampler import initial_noise

    g = torch.Generator().manual_seed(seed)

    def prompt(valid):
        mask = torch.zeros(1, MAX_TEXT, dtype=torch.long)
        mask[:, :valid] = 1
        states = torch.randn(1, MAX_TEXT, CONFIG.text_states_dim, generator=g) * mask[..., None]
        return {"text_states": states, "text_mask": mask, "text_states_2": torch.randn(1, CONFIG.text_states_dim_2, generator=g)}

    return {"cond": prompt(PROMPT_TOKENS), "uncond": prompt(NEGATIVE_TOKENS), "noise": initial_noise((1, *LATENT), seed)}


def ours(row: dict, steps: int, data: dict):
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.inference.sampler import Guidance, denoise, sigma_schedule

    # built in memory rather than through load_dit: a float32 file would stay memory-mapped and page its
    # weights in during the first step, which the memory column would count as step memory
    with torch.device("meta"):
        dit = HunyuanVideoDiT(CONFIG)
    dit.load_state_dict(random_dit_state_dict(CONFIG, seed=0), assign=True)
    dit.requires_grad_(False).eval()
    sigmas = sigma_schedule(steps, SHIFT)
    guidance = Guidance(embedded_scale=row["embedded"], scale=row["cfg"], split=row.get("split", False))
    uncond = data["uncond"] if row["cfg"] != 1.0 else None

    def run():
        with torch.no_grad():
            return denoise(dit, data["noise"], sigmas, cond=data["cond"], uncond=uncond, guidance=guidance)

    return run


def diffusers(row: dict, steps: int, data: dict):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from diffusers.utils import logging as diffusers_logging
    from diffusers_reference import diffusers_dit

    from musubi_tuner.demo.tiny_dit import random_dit_state_dict

    diffusers_logging.disable_progress_bar()
    transformer = diffusers_dit(random_dit_state_dict(CONFIG, seed=0), CONFIG)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = data["cond"], data["uncond"]
    negative = {}
    if row["cfg"] != 1.0:
        negative = dict(true_cfg_scale=row["cfg"], negative_prompt_embeds=uncond["text_states"],
                        negative_pooled_prompt_embeds=uncond["text_states_2"], negative_prompt_attention_mask=uncond["text_mask"])
    _, _, frames, height, width = data["noise"].shape

    def run():
        with torch.no_grad():
            return pipe(prompt_embeds=cond["text_states"], pooled_prompt_embeds=cond["text_states_2"], prompt_attention_mask=cond["text_mask"],
                        **negative, guidance_scale=row["embedded"], height=height * 8, width=width * 8, num_frames=(frames - 1) * 4 + 1,
                        num_inference_steps=steps, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], latents=data["noise"].clone(),
                        output_type="latent", return_dict=False)[0]

    return run


IMPLS = ("diffusers", "ours")


def worker(row_name: str, steps: int, runs: int, latents_path: str) -> dict:
    """{"memory": {impl: {"peak_mib"}}} in a memory process; otherwise {"time": {impl: {"times", "median"}}}
    (seconds per step), and the final latents of each impl saved to `latents_path`."""
    torch.manual_seed(0)
    data = inputs()
    loops = {impl: {"ours": ours, "diffusers": diffusers}[impl](ROWS[row_name], steps, data) for impl in IMPLS}
    if os.environ.get(MEMORY_MODE_ENV):
        return {"memory": {impl: measure(loop, 1) for impl, loop in loops.items()}}
    torch.save({impl: loop().float() for impl, loop in loops.items()}, latents_path)  # the warm-up loops
    timed = measure_interleaved(loops, runs, warmup=0)
    per_step = {impl: [t / steps for t in timed[impl]["times"]] for impl in IMPLS}
    return {"time": {impl: {"times": t, "median": statistics.median(t)} for impl, t in per_step.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", default="t2v,cfg")
    parser.add_argument("--worker", nargs=4, metavar=("ROW", "STEPS", "RUNS", "LATENTS"))
    args = parser.parse_args()
    if args.worker:
        row, steps, runs, path = args.worker
        print(json.dumps(worker(row, int(steps), int(runs), path)))
        return

    print(f"machine: {machine()}")
    rate = matmul_rate(torch.float32)
    print(f"measured 2048^3 fp32 matmul: {rate:.0f} GFLOP/s")
    print(f"bench config: hidden {CONFIG.hidden_size}, {CONFIG.mm_double_blocks_depth}+{CONFIG.mm_single_blocks_depth} blocks, "
          f"latent {'x'.join(map(str, LATENT))}, text {PROMPT_TOKENS}/{MAX_TEXT} valid (negative {NEGATIVE_TOKENS}), "
          f"fp32, {args.steps} steps per run, median of {args.runs} runs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows.split(","):
            path = os.path.join(tmp, f"{name}.pt")
            out = run_worker(__file__, [name, str(args.steps), str(args.runs), path])
            res = {impl: {**out["time"][impl], **out["memory"][impl]} for impl in IMPLS}
            final = torch.load(path)
            diff = ((final["ours"] - final["diffusers"]).norm() / final["diffusers"].norm()).item()
            for impl in IMPLS:
                r = res[impl]
                calls = 2 if ROWS[name]["cfg"] != 1.0 else 1
                # diffusers computes all 256 text tokens; we compute the valid ones (the longest prompt of the batch)
                tokens = MAX_TEXT if impl == "diffusers" else PROMPT_TOKENS
                flops = calls * forward_flops(CONFIG, LATENT[1:], tokens).total
                rows.append({
                    "row": name, "impl": impl, "s/step (median)": f"{r['median']:.3f}",
                    "min..max": f"{min(r['times']):.3f}..{max(r['times']):.3f}", "peak MiB": f"{r['peak_mib']:.0f}",
                    "GFLOP/s": f"{flops / r['median'] / 1e9:.0f}", "of matmul peak": f"{flops / r['median'] / 1e9 / rate:.0%}",
                    "speedup": f"{res['diffusers']['median'] / r['median']:.2f}x",
                    "memory": f"{r['peak_mib'] / max(res['diffusers']['peak_mib'], 1e-9):.2f}x",
                    "latents vs diffusers": "-" if impl == "diffusers" else f"{diff:.1e}",
                })
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
