"""What `--fp8_base` costs in accuracy: the DiT's output against float32, and a short LoRA training against bf16.

    PYTHONPATH=src python bench/fp8_base_error.py [--configs tiny,small] [--steps 60]

Variants (weights stored as, computed in bf16 under autocast like hv_train_network):
- bf16: every weight in bf16.
- fp8: --fp8_base, every Linear of the double and single blocks in e4m3 with one scale per output row
  (the modulation Linears included), the rest in bf16.
- fp8, modulation bf16: the same with the modulation Linears left in bf16 (what --fp8_base stored before).
- plain e4m3 cast: every tensor cast to e4m3 with no scale, as musubi-tuner's --fp8_base and the unofficial fp8
  file do (output error only).

Output error: relative L2 error of the DiT's output against the same weights in float32 (random weights with
PyTorch's default initialisation, which trains like a real model; batch 1, 3 x 6 x 10 latents, 20 text tokens).
Training: the same run (seed, data, timesteps and noise are drawn alike) on a cached dataset of random latents and
text states (8 items), rank 8, AdamW lr 3e-3; the table compares each run's per-step losses with the bf16 run's and
gives the relative distance of the learned LoRA updates from the bf16 run's (sum of |up @ down| differences over all
modules); the float32 row shows how far bf16 itself is from float32 on the same measures.

Configs: tiny = the demo's DiT (hidden 64, 2 + 2 blocks); small = hidden 256 (2 heads of 128, the real head
size), MLP 1024, 2 double + 4 single blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the cached-dataset writer and DiT inputs the tests use

from helpers import dit_inputs, write_cached_dataset  # noqa: E402
from musubi_tuner.demo.tiny_dit import TINY_DIT, random_dit_state_dict, write_dit  # noqa: E402
from musubi_tuner.hunyuan import checkpoints  # noqa: E402
from musubi_tuner.hunyuan.fp8 import is_fp8_weight  # noqa: E402

CONFIGS = {
    "tiny": TINY_DIT,
    "small": dataclasses.replace(TINY_DIT, hidden_size=256, heads_num=2, mlp_hidden_size=1024, mm_double_blocks_depth=2,
                                 mm_single_blocks_depth=4, rope_dim_list=None),
}
MODULATION = ("_mod.linear.weight", "modulation.linear.weight")


@contextlib.contextmanager
def modulation_in_bf16():
    """--fp8_base as it was: the modulation Linears left out of fp8."""
    original = checkpoints.is_fp8_weight
    checkpoints.is_fp8_weight = lambda key: is_fp8_weight(key) and not key.endswith(MODULATION)
    try:
        yield
    finally:
        checkpoints.is_fp8_weight = original


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def output_errors(config, work: Path) -> dict[str, float]:
    sd = random_dit_state_dict(config, seed=0)
    fp32_file = write_dit(work / "dit.safetensors", sd, config, "fp32")
    plain_file = write_dit(work / "dit_fp8.safetensors", sd, config, "fp8")
    args = dit_inputs(config, batch=1)
    load = checkpoints.load_dit

    def run(path, dtype, fp8=False):
        model = load(path, dtype=dtype, fp8=fp8)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype != torch.float32):
            return model(*args).float()

    ref = run(fp32_file, torch.float32)
    out = {"bf16": run(fp32_file, torch.bfloat16), "fp8": run(fp32_file, torch.bfloat16, fp8=True)}
    with modulation_in_bf16():
        out["fp8, modulation bf16"] = run(fp32_file, torch.bfloat16, fp8=True)
    out["plain e4m3 cast"] = run(plain_file, torch.bfloat16)
    return {name: rel(o, ref) for name, o in out.items()}


def train_run(config, work: Path, steps: int, extra: list[str], name: str, patch=None) -> tuple[list[float], dict]:
    from musubi_tuner.networks.lora_files import load_lora
    from musubi_tuner.training.args import parse_args
    from musubi_tuner.training.loop import train

    dit = work / "train_dit.pt"
    if not dit.exists():
        write_dit(dit, random_dit_state_dict(config, seed=0), config, "pt")
        write_cached_dataset(work / "data", items=8, frames=5, size=(64, 48), llm_dim=config.text_states_dim,
                             clip_dim=config.text_states_dim_2)
    out = work / name
    argv = ["--dit", str(dit), "--dataset_config", str(work / "data" / "dataset.toml"), "--sdpa",
            "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8", "--learning_rate", "3e-3",
            "--optimizer_type", "adamw", "--timestep_sampling", "shift", "--discrete_flow_shift", "7.0", "--seed", "42",
            "--max_data_loader_n_workers", "0",
            "--max_train_steps", str(steps), "--output_dir", str(out), "--output_name", "run", *extra]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each run sets its own mixed precision
    with patch() if patch else contextlib.nullcontext():
        train(parse_args(argv))
    with open(out / "run-loss.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f) if row["kind"] != "validation"]
    return losses, load_lora(out / "run.safetensors")


def lora_updates(lora: dict) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".lora_up.weight"): lora[k].float() @ lora[k.replace("lora_up", "lora_down")].float()
            for k in lora if k.endswith(".lora_up.weight")}


def training_rows(config, work: Path, steps: int) -> list[tuple[str, float, float, float, float]]:
    bf16 = ["--dit_dtype", "bfloat16", "--mixed_precision", "bf16"]
    base, base_lora = train_run(config, work, steps, bf16, "bf16")
    runs = {"float32": train_run(config, work, steps, ["--dit_dtype", "float32", "--mixed_precision", "no"], "fp32"),
            "fp8": train_run(config, work, steps, [*bf16, "--fp8_base"], "fp8"),
            "fp8, modulation bf16": train_run(config, work, steps, [*bf16, "--fp8_base"], "fp8_old", modulation_in_bf16)}
    rows = [("bf16", 0.0, 0.0, sum(base[-10:]) / 10, 0.0)]
    ref = lora_updates(base_lora)
    for name, (losses, lora) in runs.items():
        step_diff = [abs(a - b) / b for a, b in zip(losses, base)]
        got = lora_updates(lora)
        lora_dist = sum((got[k] - ref[k]).norm().item() for k in ref) / sum(ref[k].norm().item() for k in ref)
        rows.append((name, sum(step_diff) / len(step_diff), max(step_diff), sum(losses[-10:]) / 10, lora_dist))
    return rows, base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(2)
    for name in args.configs.split(","):
        config = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            errors = output_errors(config, work)
            print(f"\n{name}: output error against float32 (relative L2)")
            print("| weights | error |\n| --- | --- |")
            for variant, err in errors.items():
                print(f"| {variant} | {err:.4f} |")
            rows, base = training_rows(config, work, args.steps)
            print(f"\n{name}: {args.steps}-step LoRA training against the bf16 run "
                  f"(bf16 loss: first {base[0]:.4f}, mean of the last 10 {sum(base[-10:]) / 10:.4f})")
            print("| weights | mean per-step loss difference | largest | mean loss, last 10 steps | LoRA update distance |")
            print("| --- | --- | --- | --- | --- |")
            for variant, mean_d, max_d, last, dist in rows:
                print(f"| {variant} | {mean_d:.2%} | {max_d:.2%} | {last:.4f} | {dist:.2%} |")


if __name__ == "__main__":
    main()
