"""Small shared pieces of the test suite."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dit_inputs(config, batch=1, frames=3, height=6, width=10, text_lens=(7,), max_text=20, seed=1):
    """Random DiT inputs (x, t, text_states, text_mask, pooled, guidance) with right-padded prompts of `text_lens`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, frames, height, width, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, max_text, config.text_states_dim, generator=g)
    mask = torch.zeros(batch, max_text, dtype=torch.long)
    for b, n in enumerate(text_lens):
        mask[b, :n] = 1
    pooled = torch.randn(batch, config.text_states_dim_2, generator=g)
    guidance = torch.full((batch,), 6000.0)
    return x, t, text, mask, pooled, guidance
