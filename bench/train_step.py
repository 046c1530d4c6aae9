"""One LoRA training step: ours (hv_train_network's training_step) vs the same step written with diffusers'
HunyuanVideoTransformer3DModel + a PEFT LoRA, on the same weights and inputs, for each memory option.

    PYTHONPATH=src python bench/train_step.py [--runs 5] [--variants plain,checkpointing,fp8_base,block_swap,split_attn]
                                              [--double 1 --single 2 --frames 5 --size 16 --text 60,120]

Bench config (defaults): DiT hidden 1024 (8 heads of 128, the real head size), MLP 4096, 1 double + 2 single
blocks, 2 refiner blocks, LLM width 1024, CLIP width 768 (110M parameters); weights bf16 in a safetensors
file, bf16 autocast; batch 2: latents 16 x 5 x 16 x 16 each (320 image tokens), LLM states padded to 256
tokens with 60 and 120 valid (--text; ours computes the longest valid prompt, diffusers all 256). LoRA rank 32, alpha 32, on the same layers both sides: every Linear of the double and single blocks
except modulation (ours fuses q/k/v into one LoRA, diffusers has separate to_q/to_k/to_v as its LoRA
scripts train them). A step = noise and timestep draw, forward, MSE loss to noise - x0, backward,
clip_grad_norm_(1.0), AdamW step, zero_grad. Both sides draw the same noise and timesteps, and their first
losses are printed (the LoRAs start at zero, so the two models compute the same function). Denormal floats
are flushed to zero on both sides, as a GPU does.

The variants, ours / diffusers:
- plain: no option / none.
- checkpointing: --gradient_checkpointing / enable_gradient_checkpointing().
- fp8_base: --fp8_base (e4m3 block Linears, per-row scale) / enable_layerwise_casting(float8_e4m3fn, bf16).
- block_swap: --blocks_to_swap 1 / enable_group_offload(block_level, 1 block per group). On a CPU there is
  nowhere to swap to: these rows measure the bookkeeping and copies, which a GPU would overlap with compute.
- split_attn: --split_attn (attention per sample over its valid tokens) / diffusers has none: its plain step.

Timing: one process per variant holds both models and alternates their steps (ours, diffusers, ours, ...;
--runs each after a warm-up), so a busy machine slows both alike; the table gives the median and the
fastest step. Memory: one fresh process per variant and side; "peak MiB" is its resident high-water mark
during a step above its resident set before the model was loaded (weights, LoRA, optimizer state and the
step's working set), after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import MEMORY_MODE_ENV, _trim_heap, machine, matmul_rate, measure, rss_mib, table  # noqa: E402

from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402

VARIANTS = ("plain", "checkpointing", "fp8_base", "block_swap", "split_attn")
RANK = 32
MAX_TEXT = 256
TEXT_LENGTHS = (60, 120)
DIFFUSERS_LORA_TARGETS = (  # the layers of ours, in diffusers' names (PEFT fullmatches the string)
    r".*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|proj_mlp|proj_out)"
)


def bench_config(double: int, single: int) -> DiTConfig:
    return DiTConfig(hidden_size=1024, heads_num=8, mlp_hidden_size=4096, mm_double_blocks_depth=double,
                     mm_single_blocks_depth=single, text_states_dim=1024, text_states_dim_2=768)


def write_dit_file(path: Path, config: DiTConfig) -> Path:
    """bf16 weights (PyTorch's default init, as a real model's scale), written tensor by tensor."""
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, write_dit

    return write_dit(path, random_dit_state_dict(config, seed=0), config, "safetensors")


def make_batch(config: DiTConfig, frames: int, size: int, text_lengths: tuple[int, ...] = TEXT_LENGTHS) -> dict:
    g = torch.Generator().manual_seed(1)
    B = len(text_lengths)
    mask = torch.zeros(B, MAX_TEXT, dtype=torch.long)
    for b, n in enumerate(text_lengths):
        mask[b, :n] = 1
    return {
        "latents": torch.randn(B, 16, frames, size, size, generator=g),
        "llm": torch.randn(B, MAX_TEXT, config.text_states_dim, generator=g) * mask[..., None],
        "llm_mask": mask,
        "clipL": torch.randn(B, config.text_states_dim_2, generator=g),
        "sample_ids": list(range(B)),
    }


# ------------------------------------------------------------------------------------------------ the two steps


def ours(dit_path: str, variant: str, batch: dict):
    from accelerate import Accelerator

    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.hunyuan.offload import MAX_BLOCKS_TO_SWAP_TRAINING, BlockSwap
    from musubi_tuner.networks import lora
    from musubi_tuner.training.loop import sample_seeds, training_step
    from musubi_tuner.training.timesteps import TimestepConfig

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    dit = load_dit(dit_path, dtype=torch.bfloat16, fp8=variant == "fp8_base", split_attn=variant == "split_attn")
    if variant == "checkpointing":
        dit.enable_gradient_checkpointing()
    if variant == "block_swap":
        BlockSwap(dit, 1, "cpu", max_blocks=MAX_BLOCKS_TO_SWAP_TRAINING)
    dit.train(variant == "checkpointing")
    network = lora.create_arch_network(1.0, RANK, RANK, None, None, dit)
    network.apply_to(None, dit)
    network.prepare_grad_etc(None, dit)
    network.train()
    params = [p for g in network.prepare_optimizer_params(unet_lr=1e-4)[0] for p in g["params"]]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ts_cfg = TimestepConfig("shift", discrete_flow_shift=7.0)
    seeds = sample_seeds(42, 1, batch["sample_ids"])

    def step() -> float:
        loss = training_step(dit, batch, accelerator, ts_cfg, 1.0, None, seeds)
        accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def diffusers(dit_path: str, variant: str, batch: dict):
    from diffusers_reference import diffusers_dit
    from peft import LoraConfig

    from musubi_tuner.files import StateDictFile
    from musubi_tuner.hunyuan.checkpoints import read_dit_config
    from musubi_tuner.hunyuan.vae import SCALING_FACTOR
    from musubi_tuner.training.loop import draw_noise_and_timesteps, sample_seeds
    from musubi_tuner.training.timesteps import TimestepConfig

    source = StateDictFile(dit_path)
    config = read_dit_config(source)
    model = diffusers_dit(source.load_all(), config).to(torch.bfloat16)
    del source
    model.requires_grad_(False)
    if variant == "fp8_base":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True, target_modules=DIFFUSERS_LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in float32, as ours
    if variant == "checkpointing":
        model.enable_gradient_checkpointing()
    if variant == "block_swap":
        model.enable_group_offload(torch.device("cpu"), torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ts_cfg = TimestepConfig("shift", discrete_flow_shift=7.0)
    seeds = sample_seeds(42, 1, batch["sample_ids"])

    def step() -> float:
        latents = batch["latents"].float() * SCALING_FACTOR
        noise, sigma, timesteps = draw_noise_and_timesteps(ts_cfg, latents, seeds, None)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        guidance = torch.full((latents.shape[0],), 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(noisy, timesteps, batch["llm"], batch["llm_mask"], batch["clipL"], guidance, return_dict=False)[0]
        loss = (pred.float() - (noise - latents)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def worker(impl: str, variant: str, dit_path: str, frames: int, size: int, runs: int, text: str) -> dict:
    """impl "ours" / "diffusers": peak memory (memory mode). impl "both": alternating timed steps of the two."""
    import time

    # AdamW's second moments of the zero-initialised lora_up start out as denormal floats, which x86 CPUs
    # compute ~100x slower (the optimizer step then takes most of a step); GPUs flush them to zero.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    rss_before_model = rss_mib()
    batch = make_batch(bench_config(1, 1), frames, size, tuple(int(n) for n in text.split(",")))  # the config: text widths
    if os.environ.get(MEMORY_MODE_ENV):
        step = (ours if impl == "ours" else diffusers)(dit_path, variant, batch)
        step()  # warm-up; allocates the optimizer state
        _trim_heap()
        resident = rss_mib() - rss_before_model
        return {"peak_mib": resident + measure(step, runs)["peak_mib"]}
    steps = {"ours": ours(dit_path, variant, batch), "diffusers": diffusers(dit_path, variant, batch)}
    result = {name: {"first_loss": step(), "times": []} for name, step in steps.items()}  # warm-up
    for _ in range(runs):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            result[name]["times"].append(time.perf_counter() - t0)
    return result


def run_variant(variant: str, dit: Path, frames: int, size: int, runs: int, text: str) -> dict:
    import statistics
    import subprocess

    common = [variant, str(dit), str(frames), str(size), str(runs), text]
    out = subprocess.run([sys.executable, __file__, "--worker", "both", *common], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    timed = json.loads(out.stdout.strip().splitlines()[-1])
    result = {}
    for impl in ("diffusers", "ours"):
        env = {**os.environ, MEMORY_MODE_ENV: "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # as common.run_worker
        out = subprocess.run([sys.executable, __file__, "--worker", impl, *common], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{variant} {impl} (memory) failed:\n{out.stderr[-3000:]}")
        memory = json.loads(out.stdout.strip().splitlines()[-1])
        result[impl] = {**timed[impl], "median": statistics.median(timed[impl]["times"]), "peak_mib": memory["peak_mib"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--text", default=",".join(map(str, TEXT_LENGTHS)), help="valid LLM tokens of each sample (of 256)")
    parser.add_argument("--worker", nargs=7, metavar=("IMPL", "VARIANT", "DIT", "FRAMES", "SIZE", "RUNS", "TEXT"))
    args = parser.parse_args()
    if args.worker:
        impl, variant, dit, frames, size, runs, text = args.worker
        print(json.dumps(worker(impl, variant, dit, int(frames), int(size), int(runs), text)))
        return

    from musubi_tuner.hunyuan.cost import forward_flops

    config = bench_config(args.double, args.single)
    print(f"machine: {machine()}")
    rate = matmul_rate(torch.bfloat16)
    print(f"measured 2048^3 bf16 matmul: {rate:.0f} GFLOP/s")
    latent = (args.frames, args.size, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dit = write_dit_file(Path(tmp) / "dit.safetensors", config)
        for variant in args.variants.split(","):
            res = run_variant(variant, dit, args.frames, args.size, args.runs, args.text)
            for impl in ("diffusers", "ours"):
                r = res[impl]
                # forward FLOPs x 2 (input gradients), for the text tokens each side computes: all 256, or the longest valid prompt
                lengths = [int(n) for n in args.text.split(",")]
                flops = len(lengths) * 2 * forward_flops(config, latent, MAX_TEXT if impl == "diffusers" else max(lengths)).total
                rows.append({
                    "variant": variant, "impl": impl,
                    "step s (median)": f"{r['median']:.3f}",
                    "min..max": f"{min(r['times']):.3f}..{max(r['times']):.3f}",
                    "peak MiB": f"{r['peak_mib']:.0f}",
                    "of bf16 matmul peak": f"{flops / r['median'] / 1e9 / rate:.0%}",
                    "first loss": f"{r['first_loss']:.5f}",
                    "speedup": f"{res['diffusers']['median'] / r['median']:.2f}x",
                    "memory": f"{r['peak_mib'] / res['diffusers']['peak_mib']:.2f}x",
                })
            print(table(rows[-2:], list(rows[0])), flush=True)  # progress on a long run
    print()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
