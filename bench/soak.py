"""Soak test (not in CI): many training steps on a tiny model, stopped and resumed with --resume auto every cycle.

    PYTHONPATH=src:tests python bench/soak.py [--steps 2000] [--cycles 10] [--save_every 50] [--workdir DIR]

All cycles run in this one process (train() with --resume auto and a larger --max_train_steps each time;
the learning rate is constant, so the schedule is the same as one long run), which is what makes a leak
visible: the resident set at the start and end of each cycle should stay flat after the first. Each
cycle's final LoRA is compared with the uninterrupted run's LoRA saved at the same step, and the output
folder's file count and size are recorded (--save_last_n_steps keeps them bounded). Prints one table.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.write_cached_dataset

import torch

from common import rss_mib
from helpers import write_cached_dataset
from musubi_tuner.demo.tiny_dit import TINY_DIT, random_dit_state_dict, write_dit
from musubi_tuner.files import StateDictFile
from musubi_tuner.training.args import parse_args
from musubi_tuner.training.loop import train


def train_argv(dit: Path, toml: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "adamw", "--lr_scheduler", "constant",
            "--seed", "11", "--dit_dtype", "float32", "--max_data_loader_n_workers", "0", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--output_name", "soak", *extra]


def folder_usage(folder: Path) -> tuple[int, float]:
    paths = [p for p in folder.rglob("*") if p.is_file()]
    return len(paths), sum(p.stat().st_size for p in paths) / 2**20


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def resident_mib() -> float:
    gc.collect()
    return rss_mib()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--save_every", type=int, default=50, help="--save_every_n_steps (states too)")
    parser.add_argument("--keep", type=int, default=2, help="saves kept: --save_last_n_steps = keep * save_every")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.steps % args.cycles or (args.steps // args.cycles) % args.save_every:
        parser.error("--steps must split into --cycles equal parts, each a multiple of --save_every")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    torch.set_num_threads(min(2, torch.get_num_threads()))

    dit = write_dit(work / "dit.pt", random_dit_state_dict(TINY_DIT), TINY_DIT, "pt")
    toml = write_cached_dataset(work / "data", items=4, frames=5, size=(32, 32))
    saving = ["--save_every_n_steps", str(args.save_every), "--save_last_n_steps", str(args.keep * args.save_every)]
    per_cycle = args.steps // args.cycles

    rows, cycle_loras = [], {}
    out = work / "resumed"
    for cycle in range(1, args.cycles + 1):
        steps = cycle * per_cycle
        start_rss, started = resident_mib(), time.perf_counter()
        train(parse_args(train_argv(dit, toml, out, steps, *saving, "--save_state", "--resume", "auto")))
        seconds = time.perf_counter() - started
        cycle_loras[steps] = StateDictFile(out / "soak.safetensors").load_all()
        files, mib = folder_usage(out)
        rows.append([cycle, steps, start_rss, resident_mib(), files, mib, seconds])

    straight = work / "straight"  # one run; its step saves are kept where the cycles ended
    train(parse_args(train_argv(dit, toml, straight, args.steps, "--save_every_n_steps", str(per_cycle))))
    for row in rows:
        steps = row[1]
        name = "soak.safetensors" if steps == args.steps else f"soak-step{steps:08d}.safetensors"
        row.append(max_difference(cycle_loras[steps], StateDictFile(straight / name).load_all()))

    print(f"\nsoak: {args.steps} steps in {args.cycles} cycles (stop + --resume auto each), save every {args.save_every} "
          f"steps with state, --save_last_n_steps {args.keep * args.save_every}; tiny DiT, CPU, {torch.get_num_threads()} threads\n")
    header = ["cycle", "steps", "RSS start MiB", "RSS end MiB", "files", "folder MiB", "seconds", "max |LoRA - uninterrupted|"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for cycle, steps, rss0, rss1, files, mib, seconds, diff in rows:
        print(f"| {cycle} | {steps} | {rss0:.0f} | {rss1:.0f} | {files} | {mib:.2f} | {seconds:.0f} | {diff:.2e} |")
    growth = rows[-1][3] - rows[1][2] if len(rows) > 1 else float("nan")
    print(f"\nRSS from the start of cycle 2 to the end: {growth:+.0f} MiB; files {min(r[4] for r in rows)}..{max(r[4] for r in rows)}; "
          f"max |LoRA - uninterrupted| over all cycles {max(r[7] for r in rows):.2e}; workdir {work}")


if __name__ == "__main__":
    main()
