"""3D rotary position embeddings of HunyuanVideo's image tokens.

Each head's dims are split into (t, h, w) groups (16/56/56 for head dim 128, theta 256). A token at
grid position (f, y, x) rotates each adjacent pair (x_2k, x_2k+1) of its group by pos * theta^(-2k/d).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _rope_tables(grid: tuple[int, int, int], axes: tuple[int, int, int], theta: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    cos_parts, sin_parts = [], []
    positions = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    for pos, dim in zip(positions, axes):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        angles = pos.reshape(-1, 1) * inv_freq  # (S, dim/2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    cos = torch.cat(cos_parts, dim=1).float()
    sin = torch.cat(sin_parts, dim=1).float()
    return cos.to(device), sin.to(device)


def rope_frequencies(latent_shape: tuple[int, int, int], patch_size: tuple[int, int, int], axes: tuple[int, int, int], theta: float,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (T*H*W tokens, head_dim) float32, for a latent of (frames, height, width).

    The token order is (t, h, w) row-major, the order `img_in` flattens patches in.
    """
    grid = []
    for size, p, name in zip(latent_shape, patch_size, ("frames", "height", "width")):
        if size % p:
            raise ValueError(f"latent {name} {size} is not divisible by the patch size {p}")
        grid.append(size // p)
    return _rope_tables(tuple(grid), tuple(axes), float(theta), str(torch.device(device)))


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) so that rope(x) = x * cos + swap_pairs(x) * signed_sin, swap_pairs(x)_2k = x_2k+1."""
    signed_sin = sin.clone()
    signed_sin[:, 0::2] = -signed_sin[:, 0::2]
    return cos, signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., S, D) by tables (S, D); computed in float32 and returned in x's dtype."""
    dtype = x.dtype
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(xf * cos, swapped, signed_sin).to(dtype)
