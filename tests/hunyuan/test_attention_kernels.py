"""The flash / flash3 / sage / xformers paths of `attention`, on the CPU, with stand-in kernels.

The kernels themselves need a GPU (tests/gpu/test_kernels.py compares them with float32 SDPA there). What is
ours is around them: packing the valid tokens of a padded batch, the cumulative lengths, the layouts each
entry point takes, unpacking into a zero-padded output. The stand-ins compute exact softmax attention with
the real entry points' signatures and check their input contracts, so these tests pin that logic down.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from helpers import dit_inputs, rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.hunyuan.attention import attention
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

MODES = ("flash", "flash3", "sageattn", "xformers")


def _dense(q, k, v):
    """(1, L, H, D) each -> (1, L, H, D)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _varlen(q, k, v, cu_q, cu_k, max_q, max_k, **_):
    """A varlen entry point: (total, H, D) packed tokens, int32 cumulative lengths (B + 1,)."""
    assert q.dim() == 3 and q.stride(-1) == 1, "packed (total, H, D) with a contiguous last dim"
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and cu_q[0] == 0 and cu_q[-1] == q.shape[0]
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert isinstance(max_q, int) and max_q == max(lengths) and max_k == max((cu_k[1:] - cu_k[:-1]).tolist())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[a:b] = _dense(q[None, a:b], k[None, a:b], v[None, a:b])[0]
    return out


def _batched(q, k, v, **_):
    assert q.dim() == 4, "(B, L, H, D)"
    return _dense(q, k, v)


class _BlockDiagonalMask:
    def __init__(self, lengths):
        self.lengths = lengths

    @classmethod
    def from_seqlens(cls, lengths):
        assert all(isinstance(n, int) for n in lengths)
        return cls(lengths)


def _xformers_attention(q, k, v, attn_bias=None):
    if attn_bias is None:
        return _dense(q, k, v)
    assert q.shape[0] == 1 and sum(attn_bias.lengths) == q.shape[1], "all samples packed into one row"
    cu = torch.tensor([0, *attn_bias.lengths]).cumsum(0, dtype=torch.int32)
    return _varlen(q[0], k[0], v[0], cu, cu, max(attn_bias.lengths), max(attn_bias.lengths))[None]


def _sageattn(q, k, v, tensor_layout="HND", **_):
    assert tensor_layout == "NHD"
    return _dense(q, k, v)


def stand_in_kernels() -> dict[str, types.ModuleType]:
    """Stand-in packages under the real names (flash3 returns (out, lse) as some builds do)."""
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func, flash.flash_attn_varlen_func = _batched, _varlen
    flash3 = types.ModuleType("flash_attn_interface")
    flash3.flash_attn_func = lambda *a, **kw: (_batched(*a, **kw), None)
    flash3.flash_attn_varlen_func = lambda *a, **kw: (_varlen(*a, **kw), None)
    sage = types.ModuleType("sageattention")
    sage.sageattn, sage.sageattn_varlen = _sageattn, _varlen
    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _xformers_attention
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_BlockDiagonalMask)
    xformers.ops = ops
    return {"flash_attn": flash, "flash_attn_interface": flash3, "sageattention": sage, "xformers": xformers, "xformers.ops": ops}


@pytest.fixture
def kernels(monkeypatch):
    for name, module in stand_in_kernels().items():
        monkeypatch.setitem(sys.modules, name, module)


def qkv(batch=3, length=12, heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, heads, head_dim, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", [False, True])
def test_packed_kernels_attend_over_each_samples_valid_tokens_only(kernels, mode, split):
    q, k, v = qkv()
    lengths = torch.tensor([12, 7, 3])
    valid = torch.arange(12)[None, :] < lengths[:, None]
    want = attention(q, k, v, lengths, "sdpa")
    got = attention(q, k, v, lengths, mode, split)
    assert got.shape == want.shape == (3, 12, 16)
    assert rel_err(got[valid], want[valid]) < 1e-6
    assert got[~valid].abs().max() == 0  # padding rows come back as zeros
    # gradients flow back through the packing to the same places
    grads_want = torch.autograd.grad(want[valid].square().sum(), (q, k, v))
    grads_got = torch.autograd.grad(got[valid].square().sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_unpadded_batches_go_to_the_batched_entry_points(kernels, mode):
    q, k, v = qkv(batch=2)
    assert rel_err(attention(q, k, v, None, mode), attention(q, k, v, None, "sdpa")) < 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_the_dit_gives_the_sdpa_output_with_each_kernel(kernels, mode):
    config = tiny_dit_config()
    model = HunyuanVideoDiT(config)
    model.load_state_dict(random_dit_state_dict(config, seed=5, scale=0.05))
    inputs = dit_inputs(config, batch=2, text_lens=(4, 9))
    with torch.no_grad():
        want = model(*inputs)
        model.set_attention(mode)
        got = model(*inputs)
    assert rel_err(got, want) < 1e-5
