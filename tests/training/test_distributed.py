"""Multi-process training: processes sharing each sample's tokens (context parallel) and processes taking their own
batches (data parallel) train exactly as one process with the whole batch.

Each sample's noise and timestep come from (seed, epoch, sample id), not from the process's RNG, so the
comparisons are exact up to float rounding. The dataset has 2 items in one bucket, so every step of every run
sees both, whatever order each run shuffles them into. Every run checkpoints, swaps a block and validates
every 2 steps, so those are checked under context parallel too. The processes are forked from the test with the
variables a launcher sets (helpers.run_group) and run the command's own main().
"""

import csv
from pathlib import Path

import pytest
import torch

from helpers import run_group, write_cached_dataset
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.demo.tiny_text_encoders import write_tiny_clip_folder, write_tiny_llm_folder
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.networks.lora_files import load_lora
from musubi_tuner.training.args import parse_args
from musubi_tuner.training.loop import draw_noise_and_timesteps, sample_seeds, train
from musubi_tuner.training.timesteps import TimestepConfig

STEPS = 3
MEMORY_FLAGS = ("--fp8_base", "--gradient_checkpointing", "--blocks_to_swap", "1", "--validate_every_n_steps", "2")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    config = tiny_dit_config()
    dit = write_dit(root / "dit.pt", random_dit_state_dict(config, seed=0), config, "pt")
    per_replica = write_cached_dataset(root / "data", items=2, frames=5, size=(64, 48), batch_size=1)
    write_cached_dataset(root / "held", items=1, frames=5, size=(64, 48), seed=1)
    per_replica.write_text(per_replica.read_text() + f'\n[[validation_datasets]]\nvideo_directory = "{(root / "held" / "videos").as_posix()}"\n'
                           f'cache_directory = "{(root / "held" / "cache").as_posix()}"\ntarget_frames = [5]\n')
    doubled = per_replica.with_name("dataset_batch2.toml")
    doubled.write_text(per_replica.read_text().replace("batch_size = 1", "batch_size = 2"))
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube on grass --w 32 --h 32 --f 5 --d 7 --s 2\n")
    sampling = ("--sample_prompts", str(prompts), "--sample_every_n_steps", str(STEPS),
                "--vae", str(write_vae(root / "vae.pt", random_vae_state_dict(TINY_VAE))),
                "--text_encoder1", str(write_tiny_llm_folder(root / "te1")), "--text_encoder2", str(write_tiny_clip_folder(root / "te2")))
    return dit, per_replica, doubled, sampling


def train_args(dit, toml, out, *extra):
    return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "adamw",
            "--lr_scheduler", "linear", "--timestep_sampling", "shift", "--discrete_flow_shift", "7.0", "--seed", "42",
            "--dit_dtype", "float32", "--max_data_loader_n_workers", "0", "--max_train_steps", str(STEPS),
            "--output_dir", str(out), "--output_name", "tiny", *MEMORY_FLAGS, *extra]


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    dit, _, doubled, _ = assets
    out = tmp_path_factory.mktemp("one")
    train(parse_args(train_args(dit, doubled, out)))
    return out


def losses(out: Path, kind: str = "train") -> list[tuple[int, float]]:
    with open(out / "tiny-loss.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["kind"] == kind]


def assert_same_training(run: Path, reference: Path, name: str = "tiny.safetensors") -> None:
    a, b = load_lora(run / name), load_lora(reference / "tiny.safetensors")
    assert a.keys() == b.keys()
    moved = max(b[k].abs().max().item() for k in b if "lora_up" in k)  # lora_up starts at zero
    assert moved > 1e-3
    # Float rounding differs (a batch of 2 vs shards, gloo's sums); AdamW's division by sqrt(v) amplifies it on
    # near-zero gradients to ~3e-6. Unaveraged or unsummed gradients, or noise differing within a group, move weights by ~4e-3.
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-5), (k, (a[k] - b[k]).abs().max().item())
    # the logged loss is the mean over the replicas: the same curve as the single process; validation too
    for kind in ("train", "validation"):
        assert [s for s, _ in losses(run, kind)] == [s for s, _ in losses(reference, kind)]
        assert [v for _, v in losses(run, kind)] == pytest.approx([v for _, v in losses(reference, kind)], rel=1e-4)
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))


def _command_in_group(rank, world, argv) -> str:
    """hv_train_network's main() as a launched process runs it; returns what it printed and logged."""
    import contextlib
    import io
    import logging

    from musubi_tuner.hv_train_network import main

    out = io.StringIO()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=out, force=True)
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


def test_two_processes_sharing_each_samples_tokens_train_as_one_process(assets, one_process, tmp_path):
    dit, _, doubled, sampling = assets
    two = tmp_path / "two"
    # As under `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` (the variables it sets, in processes
    # forked from this one: a launcher's interpreters would add half a minute of imports on a 2-core machine).
    first, second = run_group(2, _command_in_group, train_args(dit, doubled, two, "--context_parallel", "2", "--save_state_on_train_end",
                                                                          *sampling),
                              launcher_env=True)
    assert "2 processes (gloo backend): 1 data parallel x 2 context parallel" in first  # really two processes, one group
    assert "gradients: 40 tensors (0.1 MiB) reduced in 1 all-reduce per step" in first
    assert first.count("\nsaved ") == 1 and first.count("LoRA: 20 modules") == 1 and second == ""  # one voice, not one per process
    assert_same_training(two, one_process)
    # the metadata counts batches per replica, as musubi-tuner's (1 batch of 2)
    meta_two, meta_one = read_safetensors_header(two / "tiny.safetensors")[1], read_safetensors_header(one_process / "tiny.safetensors")[1]
    assert (meta_two["ss_num_batches_per_epoch"], meta_two["ss_max_train_steps"]) == ("1", str(STEPS))
    assert (meta_one["ss_num_batches_per_epoch"], meta_one["ss_max_train_steps"]) == ("1", str(STEPS))
    # the main process alone wrote the files; the state holds each process's RNG; the samples (the group ran the DiT
    # together) left the training as it was
    assert {p.name for p in two.iterdir()} == {p.name for p in one_process.iterdir()} | {"tiny-state", "sample"}
    assert sorted(p.suffix for p in (two / "sample").iterdir()) == [".mp4", ".png"]
    assert sorted(p.name for p in (two / "tiny-state").iterdir()) == [
        "network.safetensors", "optimizer.pt", "rng_0.pt", "rng_1.pt", "train_state.json"]


def test_data_parallel_2_x_context_parallel_2_trains_as_one_process_and_resumes_exactly(assets, one_process, tmp_path):
    dit, per_replica, _, _ = assets
    out = tmp_path / "2x2"
    argv = train_args(dit, per_replica, out, "--context_parallel", "2", "--save_every_n_steps", "2", "--save_state")
    logged = run_group(4, _command_in_group, argv, launcher_env=True)[0]
    assert "4 processes (gloo backend): 2 data parallel x 2 context parallel" in logged
    assert_same_training(out, one_process)

    # from the state saved at step 2, the last step again: the same LoRA as the uninterrupted run
    resumed = tmp_path / "resumed"
    run_group(4, _command_in_group, train_args(dit, per_replica, resumed, "--context_parallel", "2", "--resume",
                                             str(out / "tiny-step00000002-state")), launcher_env=True)
    a, b = load_lora(resumed / "tiny.safetensors"), load_lora(out / "tiny.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-7), (k, (a[k] - b[k]).abs().max().item())


def test_a_samples_noise_and_timestep_do_not_depend_on_its_batch():
    cfg = TimestepConfig("shift", discrete_flow_shift=7.0)
    latents = torch.zeros(3, 16, 2, 6, 8)
    together = draw_noise_and_timesteps(cfg, latents, sample_seeds(42, 1, [5, 0, 9]), None)
    alone = draw_noise_and_timesteps(cfg, latents[:1], sample_seeds(42, 1, [0]), None)
    for batched, single in zip(together, alone):
        assert torch.equal(batched[1:2], single)
    next_epoch = draw_noise_and_timesteps(cfg, latents, sample_seeds(42, 2, [5, 0, 9]), None)
    assert not torch.equal(next_epoch[0][0], together[0][0]) and len(set(together[1].tolist())) == 3


def _two_machines(assets, tmp_path) -> list[Path]:
    """Two folders, each with its own copy of the DiT (dit.pt) and of the cached dataset (data/), as two machines hold."""
    import shutil

    dit, per_replica, _, _ = assets
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for machine in machines:
        shutil.copytree(per_replica.parent, machine / "data")
        toml = machine / "data" / per_replica.name
        toml.write_text(toml.read_text().replace(per_replica.parent.as_posix(), (machine / "data").as_posix()))
        shutil.copy(dit, machine / "dit.pt")
    return machines


def _train_from_own_copy(rank, world, machines, argv) -> str:
    """The command run in machines[rank]: the same command line on every process, each reading its own copy of the
    files it names (as processes on several machines do)."""
    import os

    from musubi_tuner.errors import SharedError

    os.chdir(machines[rank])
    try:
        train(parse_args(argv))
    except SharedError as e:
        return str(e)
    return "trained"


@pytest.mark.parametrize("copy_differs", ["dataset", "dit", "sample_prompts", "config_file"])
def test_processes_reading_copies_that_differ_stop_before_training_naming_the_difference(assets, tmp_path, copy_differs):
    """A copy of the dataset with a cache missing on one machine: each process sharded its own item list (items
    trained twice or not at all, rc 0), or the process with fewer batches finished first and saved the final LoRA of a
    run that failed. A DiT that differs on one machine was mixed into every step."""
    import shutil

    _, per_replica, _, sampling = assets
    machines = _two_machines(assets, tmp_path)
    for machine in machines:
        shutil.copy(sampling[1], machine / "prompts.txt")
    gone = sorted((machines[1] / "data" / "cache").glob("*_hv.safetensors"))[0]
    extra = ()
    if copy_differs == "sample_prompts":  # (fuzz_ae 1: a context-parallel run hung in silence at its first sample)
        (machines[1] / "prompts.txt").write_text("a blue cube on grass --w 32 --h 32 --f 5 --d 7 --s 3\n")
        extra = ("--sample_prompts", "prompts.txt", *sampling[2:])
        expected = ("--sample_prompts differs between process 0 and process 1 (each reads its own machine's copy); give every "
                    "process the same files")
    elif copy_differs == "config_file":  # (fuzz_bd 7: network_alpha 1 and 64 trained together without a word)
        for machine, alpha in zip(machines, (1, 64)):
            (machine / "run.toml").write_text(f"network_alpha = {alpha}\n")
        extra = ("--config_file", "run.toml")
        expected = ("--config_file differs between process 0 and process 1 (each reads its own machine's copy); give every "
                    "process the same files")
    elif copy_differs == "dataset":
        gone.unlink()
        expected = (f"the dataset differs between process 0 and process 1 (each reads its own machine's copy; process 1 has 1 "
                    f"cached items, process 0 2; not on process 1: {gone.name}); give every process the same files")
    else:
        config = tiny_dit_config()
        write_dit(machines[1] / "dit.pt", random_dit_state_dict(config, seed=1), config, "pt")
        expected = ("--dit differs between process 0 and process 1 (each reads its own machine's copy); give every process "
                    "the same files")
    argv = train_args("dit.pt", Path("data") / per_replica.name, "out", *extra)
    assert run_group(2, _train_from_own_copy, machines, argv, launcher_env=True) == [expected, expected]
    assert not [p for machine in machines for p in (machine / "out").glob("*.safetensors")]


def test_a_warning_every_process_meets_is_printed_once(assets, tmp_path):
    """Each process printed the warnings computed from what they all share (the dataset, the flags, the state): the
    same line once per process."""
    import shutil

    dit, per_replica, _, _ = assets
    data = tmp_path / "data"
    shutil.copytree(per_replica.parent, data)
    toml = data / per_replica.name
    toml.write_text(toml.read_text().replace(per_replica.parent.as_posix(), data.as_posix()))
    next((data / "cache").glob("*_hv_te.safetensors")).unlink()  # an item left out, on every process alike
    first, second = run_group(2, _command_in_group, train_args(dit, toml, tmp_path / "out", "--max_train_steps", "1"),
                              launcher_env=True)
    assert "WARNING" in first and "1 cached items left out" in first, first[-2000:]
    assert second == "", second[-2000:]


def test_every_process_s_rng_state_is_in_the_state_process_0_saves(assets, tmp_path):
    """fuzz_bd 4: each process wrote its rng_N.pt to its own path: one in another current folder (a relative --output_dir,
    or another machine's disk) left it in an .incomplete folder there, one per save, and process 0's state was complete
    without it."""
    _, per_replica, _, _ = assets
    machines = _two_machines(assets, tmp_path)
    argv = train_args("dit.pt", Path("data") / per_replica.name, "out", "--save_state")
    assert run_group(2, _train_from_own_copy, machines, argv, launcher_env=True) == ["trained", "trained"]
    assert sorted(p.name for p in (machines[0] / "out" / "tiny-state").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    assert not (machines[1] / "out").exists() or not list((machines[1] / "out").iterdir())
