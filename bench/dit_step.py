"""DiT forward+backward: ours vs diffusers' HunyuanVideoTransformer3DModel on the same weights, same inputs.

    python bench/dit_step.py [--runs 5] [--dtypes fp32,bf16] [--text 60,256]

Bench config (fixed): hidden 1024 (8 heads of 128, as the real model's head size), MLP 4096, 2 double +
4 single blocks, 2 refiner blocks, LLM width 1024; latent 16 x 3 x 32 x 32 (a 9-frame 256x256 clip:
768 image tokens); text padded to 256 tokens with 60 valid (a typical caption) or all 256 valid.
The weights are frozen and the gradient flows to the input latents, as in LoRA training. bf16 rows run
bf16 weights under bf16 autocast. Times: both models in one process, one step of each in turn, the median of
--runs steps each (so that the machine's drift falls on both alike); peak memory: each model in its own process.
FLOP/s counts 2 x the forward FLOPs (forward + input gradients; see musubi_tuner.hunyuan.cost).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import machine, matmul_rate, measure, measure_interleaved, run_process, table  # noqa: E402

from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402
from musubi_tuner.hunyuan.cost import forward_flops  # noqa: E402

CONFIG = DiTConfig(hidden_size=1024, heads_num=8, mlp_hidden_size=4096, mm_double_blocks_depth=2, mm_single_blocks_depth=4,
                   text_states_dim=1024, text_states_dim_2=768)
LATENT = (16, 3, 32, 32)
MAX_TEXT = 256


def build_step(impl: str, dtype_name: str, text_len: int):
    """One forward+backward of `impl` ("ours" / "diffusers") on the bench weights and inputs."""
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    sd = {k: v.to(dtype) for k, v in random_dit_state_dict(CONFIG, seed=0).items()}
    if impl == "ours":
        with torch.device("meta"):
            model = HunyuanVideoDiT(CONFIG)
        model.load_state_dict(sd, assign=True)
    else:
        from diffusers_reference import diffusers_dit

        model = diffusers_dit(sd, CONFIG).to(dtype)
    del sd
    model.requires_grad_(False)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *LATENT, generator=g)
    t = torch.tensor([600.0])
    text = torch.randn(1, MAX_TEXT, CONFIG.text_states_dim, generator=g)
    mask = torch.zeros(1, MAX_TEXT, dtype=torch.long)
    mask[:, :text_len] = 1
    pooled = torch.randn(1, CONFIG.text_states_dim_2, generator=g)
    guidance = torch.tensor([1000.0])

    def step():
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if impl == "ours":
                out = model(xi, t, text, mask, pooled, guidance)
            else:
                out = model(xi, t, text, mask, pooled, guidance, return_dict=False)[0]
        out.float().square().mean().backward()

    return step


IMPLS = ("diffusers", "ours")


def worker(impl: str, dtype_name: str, text_len: int, runs: int) -> dict:
    """impl "both": alternating timed steps of the two; "ours" / "diffusers": that one's peak memory (memory process)."""
    if impl == "both":
        return measure_interleaved({name: build_step(name, dtype_name, text_len) for name in IMPLS}, runs)
    return measure(build_step(impl, dtype_name, text_len), runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--text", default="60,256")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "DTYPE", "TEXT", "RUNS"))
    args = parser.parse_args()
    if args.worker:
        impl, dtype, text, runs = args.worker
        print(json.dumps(worker(impl, dtype, int(text), int(runs))))
        return

    print(f"machine: {machine()}")
    rates = {d: matmul_rate({"fp32": torch.float32, "bf16": torch.bfloat16}[d]) for d in args.dtypes.split(",")}
    print("measured 2048^3 matmul: " + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in rates.items()))
    rows = []
    for dtype in args.dtypes.split(","):
        for text in (int(v) for v in args.text.split(",")):
            timed = run_process(__file__, ["both", dtype, str(text), str(args.runs)], memory=False)
            res = {impl: {**timed[impl], **run_process(__file__, [impl, dtype, str(text), str(args.runs)], memory=True)} for impl in IMPLS}
            for impl in IMPLS:
                r = res[impl]
                # diffusers computes all 256 text tokens; we compute the valid ones
                tokens = MAX_TEXT if impl == "diffusers" else text
                flops = 2 * forward_flops(CONFIG, LATENT[1:], tokens).total
                rows.append({
                    "dtype": dtype, "valid text": f"{text}/{MAX_TEXT}", "impl": impl,
                    "step s (median)": f"{r['median']:.3f}",
                    "min..max": f"{min(r['times']):.3f}..{max(r['times']):.3f}",
                    "peak MiB": f"{r['peak_mib']:.0f}",
                    "GFLOP/s": f"{flops / r['median'] / 1e9:.0f}",
                    "of matmul peak": f"{flops / r['median'] / 1e9 / rates[dtype]:.0%}",
                    "speedup": f"{res['diffusers']['median'] / r['median']:.2f}x",
                    "memory": f"{r['peak_mib'] / res['diffusers']['peak_mib']:.2f}x",
                })
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
