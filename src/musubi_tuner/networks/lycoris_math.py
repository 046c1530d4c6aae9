"""The weight updates of LyCORIS's LoHa and LoKr, as musubi-tuner's networks.loha / networks.lokr define them.

LoHa (FedPara, arXiv:2108.06098): delta W = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / rank, `*` element-wise.
LoKr (arXiv:2309.14859): delta W = kron(w1, w2) * scale, w2 = w2_a @ w2_b in low-rank mode (scale alpha / rank)
or a full matrix (scale 1). The layer's (out, in) is split into factor pairs (`factorization`).

One place for the math: the training modules, the LoRA reader (merging, generation, info) and the tests use it.
"""

from __future__ import annotations

import math

import torch


class _Hadamard(torch.autograd.Function):
    """((a1 @ b1) * (a2 @ b2)) * scale, keeping only the factors for the backward pass (the two (out, in) products are
    recomputed there), so a LoHa layer costs no more activation memory than its factors and its output."""

    @staticmethod
    def forward(ctx, a1, b1, a2, b2, scale: float):
        ctx.save_for_backward(a1, b1, a2, b2)
        ctx.scale = scale
        return (a1 @ b1) * (a2 @ b2) * scale

    @staticmethod
    def backward(ctx, grad):
        a1, b1, a2, b2 = ctx.saved_tensors
        grad = grad * ctx.scale
        through_1 = grad * (a2 @ b2)  # d/d(a1 @ b1)
        through_2 = grad * (a1 @ b1)  # d/d(a2 @ b2)
        return through_1 @ b1.T, a1.T @ through_1, through_2 @ b2.T, a2.T @ through_2, None


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float) -> torch.Tensor:
    """LoHa's (out, in) update: ((w1_a @ w1_b) * (w2_a @ w2_b)) * scale; w*_a (out, rank), w*_b (rank, in)."""
    return _Hadamard.apply(w1_a, w1_b, w2_a, w2_b, float(scale))


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """LoKr's update kron(w1, w2) * scale: w1 (out1, in1), w2 (out2, in2) -> (out1 * out2, in1 * in2)."""
    delta = torch.kron(w1, w2.contiguous())
    return delta * scale if scale != 1 else delta


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(small, large) with small * large = dimension, as LoKr splits a layer's size: `factor` itself when it divides
    the dimension; otherwise the largest divisor at most sqrt(dimension) (and at most `factor` when that is positive).

    128 -> (8, 16), 512 -> (16, 32), 1024 -> (32, 32); factor=4: 128 -> (4, 32), 512 -> (4, 128).
    """
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor < 0 else factor
    small = max((d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0 and d <= limit), default=1)
    return small, dimension // small
