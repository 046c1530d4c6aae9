"""On two CUDA GPUs: data-parallel training over NCCL trains as one GPU with twice the batch (the CPU suite
checks the same over gloo: tests/training/test_distributed.py, whose assets and arguments this reuses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port
from musubi_tuner.networks.lora_files import load_lora
from training.test_distributed import assets, train_args  # noqa: F401 (assets is a fixture)

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.gpu


def launch(processes: int, args: list[str]) -> subprocess.CompletedProcess:
    # TF32 off in cuBLAS and cuDNN for both runs: the comparison is of float32 sums, not of TF32 rounding
    env = {**os.environ, "NVIDIA_TF32_OVERRIDE": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
           "--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "src/musubi_tuner/hv_train_network.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_gpus_over_nccl_train_as_one_gpu_with_twice_the_batch(assets, tmp_path):  # noqa: F811
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA GPUs; this machine has {torch.cuda.device_count()}")
    if not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dit, per_process, doubled, _ = assets
    two, one = tmp_path / "two", tmp_path / "one"
    run = launch(2, train_args(dit, per_process, two))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "data parallel over 2 processes (nccl backend)" in run.stderr
    run = launch(1, train_args(dit, doubled, one))
    assert run.returncode == 0, run.stderr[-3000:]

    a, b = load_lora(two / "tiny.safetensors"), load_lora(one / "tiny.safetensors")
    assert a.keys() == b.keys()
    assert max(b[k].abs().max().item() for k in b if "lora_up" in k) > 1e-3  # lora_up starts at zero
    # unaveraged gradients or noise shared by the processes move the weights by ~4e-3 (see the CPU test)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), (k, (a[k] - b[k]).abs().max().item())
