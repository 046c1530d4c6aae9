"""--compile on the CPU: one denoising step (a DiT forward without CFG), eager vs blocks compiled by Inductor.

    PYTHONPATH=src python bench/compile.py [--runs 5] [--configs tiny,mid]

Configs as in bench/step_cache.py (fp32, a 60-token prompt): tiny = the test suite's DiT on 32 image tokens,
mid = the 46M-parameter DiT of bench/generate.py on 432 image tokens. The blocks are compiled one by one as
hv_generate_video --compile does (Inductor, mode default); the first compiled call includes the compilation
(C++ builds unless Inductor's on-disk cache already holds them). Then eager and compiled steps take turns,
--runs each; the table shows the medians and the compiled output's error against eager.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, measure_interleaved, table  # noqa: E402
from step_cache import CONFIGS, prompt  # noqa: E402

from musubi_tuner.demo.tiny_dit import random_dit_state_dict  # noqa: E402


def bench_config(name: str, runs: int) -> dict:
    from musubi_tuner.hunyuan.compile import CompileOptions, compile_blocks
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.inference.sampler import initial_noise

    config, latent, _, _ = CONFIGS[name]
    weights = random_dit_state_dict(config, seed=0)
    models = {}
    for variant in ("eager", "compiled"):
        with torch.device("meta"):
            models[variant] = HunyuanVideoDiT(config)
        models[variant].load_state_dict(weights, assign=True)
        models[variant].requires_grad_(False).eval()
    compile_blocks(models["compiled"], CompileOptions())
    cond, x = prompt(config), initial_noise((1, *latent), 1)
    inputs = (x, torch.full((1,), 900.0), cond["text_states"], cond["text_mask"], cond["text_states_2"], torch.full((1,), 6000.0))
    outputs = {}

    def step(variant):
        def run():
            with torch.no_grad():
                outputs[variant] = models[variant](*inputs)
        return run

    started = time.perf_counter()
    step("compiled")()
    first_call = time.perf_counter() - started
    timed = measure_interleaved({v: step(v) for v in models}, runs, warmup=1)
    error = ((outputs["compiled"] - outputs["eager"]).norm() / outputs["eager"].norm()).item()
    eager, compiled = timed["eager"]["median"], timed["compiled"]["median"]
    return {"config": name, "image tokens": latent[1] * latent[2] * latent[3] // 4, "eager s/step": f"{eager:.4f}",
            "compiled s/step": f"{compiled:.4f}", "speed-up": f"{eager / compiled:.2f}x", "first compiled call (s)": f"{first_call:.1f}",
            "output error vs eager": f"{error:.1e}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    rows = [bench_config(name, args.runs) for name in args.configs.split(",")]
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
