"""Models, inputs and timing shared by the GPU tests."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from helpers import dit_inputs
from musubi_tuner.demo.tiny_dit import random_dit_state_dict
from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

CUDA = torch.device("cuda")


def no_cuda_reason() -> str | None:
    """Why nothing here can run on CUDA, or None where a CUDA device is usable."""
    if torch.version.cuda is None:
        return f"no CUDA device: this torch ({torch.__version__}) is a build without CUDA"
    if not torch.cuda.is_available():
        return f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


# Head size 128 as in the real model (the kernels' tuned case); sizes that fp8 matmuls take (multiples of 16).
MID = DiTConfig(hidden_size=512, heads_num=4, mlp_hidden_size=2048, mm_double_blocks_depth=3, mm_single_blocks_depth=4,
                refiner_depth=1, text_states_dim=256, text_states_dim_2=64)


def mid_dit(dtype: torch.dtype = torch.float32, device: torch.device | str = CUDA, seed: int = 0) -> HunyuanVideoDiT:
    """A frozen mid-size DiT with PyTorch's default initialisation (a model that behaves like a trained one)."""
    model = HunyuanVideoDiT(MID)
    model.load_state_dict(random_dit_state_dict(MID, seed=seed))
    return model.requires_grad_(False).to(device, dtype)


def mid_inputs(batch: int = 2, text_lens=(20, 50), frames: int = 5, size: int = 16) -> list[torch.Tensor]:
    """DiT inputs on the GPU: `frames` latent frames of size x size, right-padded prompts of `text_lens` tokens."""
    inputs = dit_inputs(MID, batch=batch, frames=frames, height=size, width=size, text_lens=text_lens[:batch], max_text=64)
    return [t.to(CUDA) for t in inputs]


def cuda_seconds(step: Callable[[], object], runs: int = 3, warmup: int = 1) -> float:
    """Median time of `step` measured with CUDA events (the GPU's clock, not the host's)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)
