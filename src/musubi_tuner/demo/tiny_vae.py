"""Tiny causal VAEs with the real block structure (4x temporal, 8x spatial, 16 latent channels), in the real file layouts."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.files import save_safetensors, save_torch
from musubi_tuner.hunyuan.vae import CausalVideoVAE, VAEConfig

# Widths are multiples of 32 because the VAE's GroupNorms have 32 groups (not stored in the file).
TINY_VAE = VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
VAE_FORMATS = ("pt", "safetensors", "pt_wrapped", "pt_prefixed")


def random_vae_state_dict(config: VAEConfig = TINY_VAE, seed: int = 0, scale: float | None = None) -> dict[str, torch.Tensor]:
    """float32 weights: PyTorch's default init, or N(0, scale) for every weight (norm affine included) when scale is given."""
    torch.manual_seed(seed)
    model = CausalVideoVAE(config)
    if scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.normal_(1.0, scale)
                else:
                    p.normal_(0.0, scale)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_vae(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], fmt: str = "pt") -> Path:
    """pt: a plain state dict like vae/pytorch_model.pt; safetensors; pt_wrapped: under `state_dict`; pt_prefixed: `vae.` keys."""
    path = Path(path)
    if fmt == "safetensors":
        save_safetensors(state_dict, path)
        return path
    payload = {"pt": state_dict, "pt_wrapped": {"state_dict": state_dict},
               "pt_prefixed": {f"vae.{k}": v for k, v in state_dict.items()}}.get(fmt)
    if payload is None:
        raise ValueError(f"unknown VAE format {fmt!r}; one of {VAE_FORMATS}")
    save_torch(payload, path)
    return path
