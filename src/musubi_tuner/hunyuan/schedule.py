"""HunyuanVideo's flow-matching noise levels, shared by training (which levels it draws) and generation (the
sampler's steps): t in [0, 1], 1 = pure noise, noisy = (1 - t) * x0 + t * noise."""

from __future__ import annotations

import torch


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow-matching time shift: t' = s t / (1 + (s - 1) t)."""
    return t * shift / (1 + (shift - 1) * t)
