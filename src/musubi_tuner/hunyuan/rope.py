"""3D rotary position embeddings of HunyuanVideo's image tokens.

Each head's dims are split into (t, h, w) groups (16/56/56 for head dim 128, theta 256). A token at
grid position (f, y, x) rotates each adjacent pair (x_2k, x_2k+1) of its group by pos * theta^(-2k/d).
Read as a complex number x_2k + i x_2k+1, the rotation is one multiplication by exp(i angle), which
is how the tables below are kept: one complex64 (tokens, head_dim / 2) table per latent grid.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _rotation_table(grid: tuple[int, int, int], axes: tuple[int, int, int], theta: float, device: str) -> torch.Tensor:
    parts = []
    positions = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    for pos, dim in zip(positions, axes):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        parts.append(pos.reshape(-1, 1) * inv_freq)  # (S, dim/2) angles
    angles = torch.cat(parts, dim=1)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device)


def rope_rotations(latent_shape: tuple[int, int, int], patch_size: tuple[int, int, int], axes: tuple[int, int, int], theta: float,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """exp(i angle) per token and dim pair: complex64 (T*H*W tokens, head_dim / 2) for a latent of (frames, height, width).

    The token order is (t, h, w) row-major, the order `img_in` flattens patches in. Cached per grid and device.
    """
    grid = []
    for size, p, name in zip(latent_shape, patch_size, ("frames", "height", "width")):
        if size % p:
            raise ValueError(f"latent {name} {size} is not divisible by the patch size {p}")
        grid.append(size // p)
    return _rotation_table(tuple(grid), tuple(axes), float(theta), str(torch.device(device)))


def as_complex(x: torch.Tensor) -> torch.Tensor:
    """A float32 (..., D) tensor viewed as complex (..., D / 2) pairs (copied first if its layout can't be viewed)."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(s % 2 for s in pairs.stride()[:-1]) or pairs.storage_offset() % 2:
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def rotate_(x: torch.Tensor, rotation: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate x (..., S, H, D) float32 by a (S, D / 2) complex table, in place where x's layout allows; returns the result.

    x must be a tensor the caller owns. `inverse` rotates back (the backward of a rotation).
    """
    if torch.compiler.is_compiling():  # --compile: Inductor has no complex kernels; the same product in real arithmetic
        cos_sin = torch.view_as_real(rotation).unsqueeze(-3)  # (S, 1, D / 2, 2)
        cos, sin = cos_sin[..., 0], (-cos_sin[..., 1] if inverse else cos_sin[..., 1])
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    pairs = as_complex(x)
    pairs.mul_((rotation.conj() if inverse else rotation).unsqueeze(-2))
    return torch.view_as_real(pairs).flatten(-2)
