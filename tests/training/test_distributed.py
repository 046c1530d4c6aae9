"""Data-parallel training: two processes of batch B train exactly as one process of batch 2B.

Each sample's noise and timestep come from (seed, epoch, sample id), not from the process's RNG, so
the comparison is exact up to float rounding. The dataset has world x B items in one bucket, so every
step of both runs sees all of them, whatever order each run shuffles them into.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port, write_cached_dataset
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.networks.lora_files import load_lora
from musubi_tuner.training.args import parse_args
from musubi_tuner.training.loop import draw_noise_and_timesteps, sample_seeds, train
from musubi_tuner.training.timesteps import TimestepConfig

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    config = tiny_dit_config()
    dit = write_dit(root / "dit.pt", random_dit_state_dict(config, seed=0), config, "pt")
    per_process = write_cached_dataset(root / "data", items=2, frames=5, size=(64, 48), batch_size=1)
    doubled = per_process.with_name("dataset_batch2.toml")
    doubled.write_text(per_process.read_text().replace("batch_size = 1", "batch_size = 2"))
    return dit, per_process, doubled


def train_args(dit, toml, out, *extra):
    return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "adamw",
            "--lr_scheduler", "linear", "--timestep_sampling", "shift", "--discrete_flow_shift", "7.0", "--seed", "42",
            "--dit_dtype", "float32", "--max_data_loader_n_workers", "0", "--max_train_steps", str(STEPS),
            "--output_dir", str(out), "--output_name", "tiny", *extra]


def losses(out: Path) -> list[tuple[int, float]]:
    with open(out / "tiny-loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_two_processes_train_as_one_process_with_twice_the_batch(assets, tmp_path):
    dit, per_process, doubled = assets
    two = tmp_path / "two"
    # `accelerate launch --cpu --num_processes 2` would quietly start one process; this starts two on gloo.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "src/musubi_tuner/hv_train_network.py", *train_args(dit, per_process, two, "--save_state_on_train_end")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "data parallel over 2 processes (gloo backend)" in run.stderr  # really two processes
    assert run.stdout.count("saved ") == 1 and run.stderr.count("LoRA: 20 modules") == 1  # one voice, not one per process

    one = tmp_path / "one"
    train(parse_args(train_args(dit, doubled, one)))

    a, b = load_lora(two / "tiny.safetensors"), load_lora(one / "tiny.safetensors")
    assert a.keys() == b.keys()
    moved = max(b[k].abs().max().item() for k in b if "lora_up" in k)  # lora_up starts at zero
    assert moved > 1e-3
    # Float rounding differs (a batch of 2 vs two of 1, gloo's sum); AdamW's division by sqrt(v) amplifies it on
    # near-zero gradients to ~3e-6. Unaveraged gradients or noise shared by the processes move weights by ~4e-3.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-5), (k, (a[k] - b[k]).abs().max().item())
    # the logged loss is the mean over both processes: the same curve as the single process
    assert [s for s, _ in losses(two)] == [s for s, _ in losses(one)] == list(range(1, STEPS + 1))
    assert [v for _, v in losses(two)] == pytest.approx([v for _, v in losses(one)], rel=1e-4)
    # the metadata counts batches per process, as musubi-tuner's (2 batches of 1 shared by 2 processes)
    meta_two, meta_one = read_safetensors_header(two / "tiny.safetensors")[1], read_safetensors_header(one / "tiny.safetensors")[1]
    assert (meta_two["ss_num_batches_per_epoch"], meta_two["ss_max_train_steps"]) == ("1", str(STEPS))
    assert (meta_one["ss_num_batches_per_epoch"], meta_one["ss_max_train_steps"]) == ("1", str(STEPS))
    # the main process alone wrote the files; the state holds each process's RNG
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()} | {"tiny-state"}
    assert sorted(p.name for p in (two / "tiny-state").iterdir()) == [
        "network.safetensors", "optimizer.pt", "rng_0.pt", "rng_1.pt", "train_state.json"]


def test_a_samples_noise_and_timestep_do_not_depend_on_its_batch():
    cfg = TimestepConfig("shift", discrete_flow_shift=7.0)
    latents = torch.zeros(3, 16, 2, 6, 8)
    together = draw_noise_and_timesteps(cfg, latents, sample_seeds(42, 1, [5, 0, 9]), None)
    alone = draw_noise_and_timesteps(cfg, latents[:1], sample_seeds(42, 1, [0]), None)
    for batched, single in zip(together, alone):
        assert torch.equal(batched[1:2], single)
    next_epoch = draw_noise_and_timesteps(cfg, latents, sample_seeds(42, 2, [5, 0, 9]), None)
    assert not torch.equal(next_epoch[0][0], together[0][0]) and len(set(together[1].tolist())) == 3
