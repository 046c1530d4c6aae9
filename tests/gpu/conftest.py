"""The GPU tests (`pytest -m gpu`; bench/gpu_check.py runs them and times the model on the same GPU).

They check what only a CUDA device runs: the attention kernels, fp8 matmuls, block swap's copy stream and
pinned memory, checkpoint offload, torch.compile with Triton, the allocator's peak against the planner and
NCCL. Where torch sees no CUDA device, each one is skipped and says why.
"""

from __future__ import annotations

import gc

import pytest
import torch

from gpu.support import no_cuda_reason


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    reason = no_cuda_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def fresh_allocator():
    """Each test starts with an empty cache and its own peak; tests that time things are not slowed by a neighbour's.
    A model held by a reference cycle (hooks, checkpointing closures) keeps its CUDA memory until the cycle is
    collected: collected here, so that a test's peak is not raised by the one before."""
    if no_cuda_reason():
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
