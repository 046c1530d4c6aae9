"""Tiny DiTs with the real architecture, written in every file format users have.

They let every command and test run the real loading paths on a CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from musubi_tuner.files import save_safetensors, save_torch
from musubi_tuner.hunyuan.checkpoints import dit_metadata
from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

# Text widths match the tiny text encoders of `demo.tiny_text_encoders`.
TINY_DIT = DiTConfig(
    in_channels=16,
    out_channels=16,
    hidden_size=64,
    heads_num=2,
    mlp_hidden_size=256,
    mm_double_blocks_depth=2,
    mm_single_blocks_depth=2,
    refiner_depth=2,
    text_states_dim=64,
    text_states_dim_2=32,
)

DIT_FORMATS = ("pt", "safetensors", "fp16", "fp8")


def tiny_dit_config(in_channels: int = 16, **overrides) -> DiTConfig:
    overrides.setdefault("rope_dim_list", None)  # re-derive the rotary split when the head size changes
    return dataclasses.replace(TINY_DIT, in_channels=in_channels, **overrides)


def random_dit_state_dict(config: DiTConfig, seed: int = 0, scale: float | None = None) -> dict[str, torch.Tensor]:
    """float32 weights: PyTorch's default init, or N(0, scale) everywhere (norm weights included) when scale is given.

    The default init gives a model that trains like a real one; `scale` exercises every weight in equivalence tests.
    """
    torch.manual_seed(seed)
    model = HunyuanVideoDiT(config)
    if scale is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, scale)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_dit(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: DiTConfig, fmt: str = "safetensors") -> Path:
    """Write a DiT as users have it.

    pt: the official `mp_rank_00_model_states.pt` layout (a pickled dict with the weights under `module`);
    safetensors: bf16 (as ComfyUI/Kijai/SkyReels files and our merged models); fp16; fp8: a plain e4m3fn cast
    of every tensor (the unofficial `mp_rank_00_model_states_fp8.safetensors`).
    """
    path = Path(path)
    if fmt == "pt":
        save_torch({"module": {k: v.to(torch.bfloat16) for k, v in state_dict.items()}}, path)
    elif fmt in ("safetensors", "fp16", "fp8"):
        dtype = {"safetensors": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}[fmt]
        save_safetensors(state_dict, path, metadata=dit_metadata(config), cast=dtype)
    elif fmt == "fp32":
        save_safetensors(state_dict, path, metadata=dit_metadata(config))
    else:
        raise ValueError(f"unknown DiT format {fmt!r}; one of {DIT_FORMATS + ('fp32',)}")
    return path
