"""The planner's peak memory next to the measured one, on the CPU, for a medium-size DiT.

    python bench/plan_vs_measured.py [--only NAME ...]

Bench config (fixed): hidden 1024 (8 heads of 128, the real head size), MLP 4096, 2 double + 4 single
blocks, LLM width 1024; a 17-frame 384x384 clip (latent 5 x 48 x 48: 2,880 image tokens) and a 64-token
prompt; LoRA rank 16 on the 48 block Linears, AdamW; bf16 weights under bf16 autocast, as on a GPU.

Each option set runs in two fresh processes (tests/plan_runs.py builds the run as the trainer does):
- "tensors": the peak of live tensor storage during the second step (planning.measure.TensorBytes),
  i.e. what the allocator hands out;
- "RSS": the resident set's high-water mark during the second step above the resident set before the
  model was built, with glibc's mmap threshold fixed so freed tensors leave the resident set
  (bench/common.py).
The prediction is `planning.dit_trace.dit_peak` with on_cpu=True (the real modules traced on fake tensors): host
and device are one memory, so block swap's host-resident weights count once and its on-device copies add to them.
Both processes run their bfloat16 matrix products through `plan_runs.FastCpuGemm` (one operand transposed): on a CPU
without AVX-512 BF16 torch's own bfloat16 GEMM is ~40x slower otherwise (a plain step here took 813 s, not ~70 s).
The tensor count does not see its copy of one operand; the resident set does (at most one weight, 14 MiB here).

Predictions of the error, written before the first run of this script (from the small configs of
tests/test_plan.py, which agree within 6%):
- tensors: within +-4% for every training set, +-2% for sampling;
- RSS: 3-10% above the prediction (predicted/measured - 1 between -3% and -10%): glibc's heap for the
  many small tensors, oneDNN's bf16 reorder buffers and scratchpads, CPU flash attention's per-thread
  buffers and the autograd graph's own objects are resident but are not tensors a trace counts.
Predictions for the rerun with the traced planner (2026-12, before the run), from tests/test_plan.py's small
configs (0.995-1.028 of measured): tensors within +-3% for every set; the step's own memory within +-6%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import machine, peak_mib, reset_peak, rss_mib, table  # noqa: E402

from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402
from musubi_tuner.planning.options import MemoryOptions, Workload  # noqa: E402

CONFIG = DiTConfig(hidden_size=1024, heads_num=8, mlp_hidden_size=4096, mm_double_blocks_depth=2, mm_single_blocks_depth=4,
                   refiner_depth=2, text_states_dim=1024, text_states_dim_2=768)
BASE_WORK = dict(config=CONFIG, height=384, width=384, frames=17, text_tokens=64)

VARIANTS = {
    "plain": ({}, {}),
    "gradient checkpointing": ({}, dict(gradient_checkpointing=True)),
    "checkpointing + CPU offload": ({}, dict(gradient_checkpointing=True, gradient_checkpointing_cpu_offload=True)),
    "fp8 base": ({}, dict(fp8=True)),
    "fp8 base + checkpointing": ({}, dict(fp8=True, gradient_checkpointing=True)),
    "block swap 3 + checkpointing": ({}, dict(blocks_to_swap=3, gradient_checkpointing=True)),
    "block swap 3, no checkpointing": ({}, dict(blocks_to_swap=3)),
    "LoRA rank 4": ({}, dict(network_dim=4)),
    "LoRA rank 128": ({}, dict(network_dim=128)),
    "batch 2 (prompts 64 + 40)": (dict(batch=2, text_lengths=(64, 40)), {}),
    "batch 2 + split_attn": (dict(batch=2, text_lengths=(64, 40)), dict(split_attn=True)),
    "256 text tokens": (dict(text_tokens=256), {}),
    "Adafactor": ({}, dict(optimizer_type="adafactor")),
    "sampling, CFG batch 2": (dict(mode="generate"), dict(guidance_scale=6.0)),
    "sampling, fp8": (dict(mode="generate"), dict(fp8=True)),
}


def work_and_options(name: str) -> tuple[Workload, MemoryOptions]:
    work_changes, opts_changes = VARIANTS[name]
    return Workload(**{**BASE_WORK, **work_changes}), MemoryOptions(**{"network_dim": 16, **opts_changes})


def worker(name: str, what: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from plan_runs import FastCpuGemm, make_run, measured_tensor_bytes

    work, opts = work_and_options(name)
    if what == "tensors":
        peak, before = measured_tensor_bytes(work, opts)
        return {"tensors": peak, "before": before}
    import ctypes

    base = rss_mib()
    run = make_run(work, opts)
    with FastCpuGemm():
        run.step()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = rss_mib()
        reset_peak()
        t0 = time.perf_counter()
        run.step()
    return {"rss": (peak_mib() - base) * 2**20, "rss_before": (before - base) * 2**20, "step_s": time.perf_counter() - t0}


def measure(name: str) -> dict:
    result = {}
    for what in ("tensors", "rss"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        out = subprocess.run([sys.executable, __file__, "--worker", name, what], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"{name} ({what}) failed:\n{out.stderr[-3000:]}")
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def predict(name: str) -> int:
    from musubi_tuner.planning.dit_trace import dit_peak

    work, opts = work_and_options(name)
    return dit_peak(work, opts, on_cpu=True)[0].total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "WHAT"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    print(f"machine: {machine()}")
    rows = []
    for name in args.only or VARIANTS:
        m = measure(name)
        predicted, before = predict(name), m["before"]
        mib = 2**20
        rows.append({
            "option set": name,
            "predicted MiB": f"{predicted / mib:.0f}",
            "tensors MiB": f"{m['tensors'] / mib:.0f}",
            "error": f"{predicted / m['tensors'] - 1:+.1%}",
            "RSS MiB": f"{m['rss'] / mib:.0f}",
            "error vs RSS": f"{predicted / m['rss'] - 1:+.1%}",
            "step: tensors MiB": f"{(m['tensors'] - before) / mib:.0f}",
            "step error": f"{(predicted - before) / (m['tensors'] - before) - 1:+.1%}",
            "step: RSS MiB": f"{(m['rss'] - m['rss_before']) / mib:.0f}",
            "step error vs RSS": f"{(predicted - before) / (m['rss'] - m['rss_before']) - 1:+.1%}",
            "RSS - tensors before the step": f"{(m['rss_before'] - before) / mib:.0f}",
            "step s": f"{m['step_s']:.1f}",
        })
        print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
