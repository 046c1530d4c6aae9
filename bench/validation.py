"""What watching a run costs: one validation evaluation and one sample prompt, against one training step.

    python bench/validation.py [--items 1] [--levels 10] [--sample_steps 10] [--runs 3] [--threads 1]

Bench config (fixed): the DiT of bench/dit_step.py (hidden 1024, 8 heads of 128, 2 double + 4 single
blocks), a rank-16 LoRA on it, a 9-frame 256x256 latent (16 x 3 x 32 x 32, 768 image tokens) and a
cached caption. The training step is the trainer's own (loop.training_step, backward, AdamW step); the
evaluation is the trainer's Validator over --items held-out items at --levels noise levels, plus the
one extra forward per item that measures the LoRA's effect; a sample is the inference sampler's Euler
loop over --sample_steps steps for one prompt (the VAE decode is left out: its cost depends on the VAE,
not on this code). Times are medians of --runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import machine, table  # noqa: E402
from dit_step import CONFIG  # noqa: E402

SIZE, FRAMES = (256, 256), 9


def interleaved_medians(fns: dict, runs: int) -> dict[str, float]:
    """Median seconds of each function, timed in turns (a, b, c, a, b, c, ...) so a drifting machine load
    weighs on all of them alike; one untimed warm-up call each first."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=1, help="held-out items")
    parser.add_argument("--levels", type=int, default=10, help="validation noise levels (--validation_timesteps)")
    parser.add_argument("--sample_steps", type=int, default=10, help="steps per sample prompt (the overhead lines scale to 20)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator
    from helpers import write_cached_dataset

    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.data.training_dataset import TrainingDataset, load_batch, validation_batches
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.inference.sampler import Guidance, denoise, initial_noise, sigma_schedule
    from musubi_tuner.networks import lora
    from musubi_tuner.training.loop import training_step
    from musubi_tuner.training.timesteps import TimestepConfig
    from musubi_tuner.training.validation import Validator, evaluation_mode

    with tempfile.TemporaryDirectory() as tmp:
        toml = write_cached_dataset(Path(tmp), items=2 * args.items, frames=FRAMES, size=SIZE,
                                    llm_dim=CONFIG.text_states_dim, clip_dim=CONFIG.text_states_dim_2)
        toml.write_text(toml.read_text().replace("[general]\n", "[general]\nvalidation_split = 0.5\n"))
        config = load_dataset_config(toml, check_sources=False)
        train_batch = load_batch(TrainingDataset.from_config(config, seed=0).epoch_plan(1)[0])
        held_out = validation_batches(config)

        torch.manual_seed(0)
        with torch.device("meta"):
            dit = HunyuanVideoDiT(CONFIG)
        dit.load_state_dict(random_dit_state_dict(CONFIG, seed=0), assign=True)
        dit.requires_grad_(False)
        network = lora.create_arch_network(1.0, 16, 16, None, None, dit)
        network.apply_to(None, dit)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
        accelerator = Accelerator(cpu=True)
        ts_cfg = TimestepConfig("shift", 7.0)

        def train_step():
            loss = training_step(dit, train_batch, accelerator, ts_cfg, 1.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        validator = Validator(held_out, ts_cfg, 1.0, levels=args.levels)

        def evaluate():
            validator.evaluate(dit, network, accelerator, step=0)

        cond = {"text_states": train_batch["llm"][:1].float(), "text_mask": train_batch["llm_mask"][:1],
                "text_states_2": train_batch["clipL"][:1].float()}
        sigmas = sigma_schedule(args.sample_steps, 14.5)

        def sample():
            with evaluation_mode(network):
                denoise(dit, initial_noise((1, *train_batch["latents"].shape[1:]), 7), sigmas, cond=cond, uncond=None, guidance=Guidance())

        print(f"machine: {machine()}")
        print(f"bench DiT: hidden {CONFIG.hidden_size}, {CONFIG.mm_double_blocks_depth} double + {CONFIG.mm_single_blocks_depth} single "
              f"blocks, LoRA rank 16; latent {tuple(train_batch['latents'].shape[1:])}; median of {args.runs}")
        medians = interleaved_medians({"step": train_step, "eval": evaluate, "sample": sample}, args.runs)
        step_s, eval_s, sample_s = medians["step"], medians["eval"], medians["sample"]

    forwards = args.items * (args.levels + 1)
    rows = [
        {"work": "training step (forward + backward + AdamW)", "forwards": "1 + backward", "seconds": f"{step_s:.3f}", "training steps": "1.00"},
        {"work": f"validation: {args.items} item{'s' if args.items > 1 else ''} x {args.levels} levels + effect", "forwards": str(forwards), "seconds": f"{eval_s:.3f}",
         "training steps": f"{eval_s / step_s:.2f}"},
        {"work": f"sample: 1 prompt x {args.sample_steps} steps (no VAE decode)", "forwards": str(args.sample_steps),
         "seconds": f"{sample_s:.3f}", "training steps": f"{sample_s / step_s:.2f}"},
        {"work": "  first sample of a run (+ the multiplier-0 base for the effect)", "forwards": str(2 * args.sample_steps),
         "seconds": f"{2 * sample_s:.3f}", "training steps": f"{2 * sample_s / step_s:.2f}"},
    ]
    if args.items > 1:
        rows.insert(2, {"work": "  per item", "forwards": str(args.levels + 1), "seconds": f"{eval_s / args.items:.3f}",
                        "training steps": f"{eval_s / args.items / step_s:.2f}"})
    print(table(rows, list(rows[0])))
    per_item = eval_s / args.items / step_s
    print()
    for items, every in ((4, 100), (10, 500)):
        print(f"validating {items} items every {every} steps adds {items * per_item / every:.1%} to the training time")
    per_prompt = sample_s / args.sample_steps * 20 / step_s  # musubi-tuner's default of 20 sampling steps
    print(f"sampling 4 prompts of 20 steps every 500 steps adds {4 * per_prompt / 500:.1%} (plus the VAE decode)")

if __name__ == "__main__":
    main()
