"""LoRA files: reading (any naming we understand, returned in our kohya naming) and atomic writing."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.files import StateDictFile, save_safetensors
from musubi_tuner.networks.lora import LORA_PREFIX


def save_lora(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: LoRA files are written as .safetensors")
    save_safetensors(state_dict, path, metadata={k: str(v) for k, v in metadata.items()})
    return path


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata exactly as stored."""
    f = StateDictFile(path, what="LoRA file")
    return f.load_all(), dict(f.metadata)


def load_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA file's weights in our naming (`lora_unet_*.lora_down/up.weight`, `.alpha`)."""
    from musubi_tuner.networks.lora_naming import to_kohya

    weights, _ = read_lora_file(path)
    return to_kohya(weights, source=str(path))


def is_kohya(keys) -> bool:
    return any(k.startswith(LORA_PREFIX) for k in keys)
