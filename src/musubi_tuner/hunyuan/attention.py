"""Attention over sequences whose tail may be padding, with the kernels users choose.

Every call gets q, k, v as (B, L, H, D) and, optionally, the number of valid tokens per sample
(`lengths`; the rest of each row is padding). Padding never takes part: keys past a sample's length
are masked out, or, with `split`, each sample runs alone on its valid tokens only. Rows of padding
tokens in the output carry no meaning (they are zeros when split).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from musubi_tuner.errors import UserError

ATTENTION_MODES = ("sdpa", "torch", "flash", "flash3", "sageattn", "xformers")
ALIASES = {"torch": "sdpa"}  # names that run another mode's kernel
INFERENCE_ONLY = ("sageattn",)  # kernels with no backward: training refuses them
_PACKAGES = {"flash": "flash_attn", "flash3": "flash_attn_interface", "sageattn": "sageattention", "xformers": "xformers.ops"}


def check_attention_mode(mode: str) -> str:
    """Normalise the mode name ('torch' is an alias of 'sdpa') and import its package, or say which to install."""
    if mode not in ATTENTION_MODES:
        raise UserError(f"attention mode {mode!r} is unknown; choose one of {', '.join(ATTENTION_MODES)}")
    mode = ALIASES.get(mode, mode)
    if mode in _PACKAGES:
        try:
            importlib.import_module(_PACKAGES[mode])
        except ImportError:
            pip_name = {"flash": "flash-attn", "flash3": "flash-attn 3 (hopper build)", "sageattn": "sageattention", "xformers": "xformers"}[mode]
            raise UserError(f"attention mode {mode!r} needs the package {pip_name}, which is not installed; install it or use sdpa") from None
    return mode


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None,
              mode: str = "sdpa", split: bool = False, host_lengths: tuple[int, ...] | None = None) -> torch.Tensor:
    """Softmax attention; q, k, v (B, L, H, D), lengths (B,) valid tokens or None (all valid). Returns (B, L, H*D).

    `host_lengths`: the same lengths as Python ints, when the caller has them: decisions on them read no device
    memory (and work on fake tensors, which the memory planner traces)."""
    B, L, H, D = q.shape
    if lengths is not None and not torch.compiler.is_compiling():
        # (a compiled block keeps the mask: a test on values would break its graph; all-true changes nothing)
        if all(n >= L for n in host_lengths) if host_lengths is not None else bool((lengths >= L).all()):
            lengths = host_lengths = None
    if lengths is not None and host_lengths is None and (split or mode != "sdpa"):  # the sdpa mask needs no values
        host_lengths = tuple(int(n) for n in lengths.tolist())
    if split and (B > 1 or lengths is not None):
        return _split_attention(q, k, v, host_lengths, mode)
    if mode == "sdpa":
        mask = None
        if lengths is not None:
            mask = (torch.arange(L, device=q.device)[None, :] < lengths.to(q.device)[:, None]).view(B, 1, 1, L)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2).reshape(B, L, H * D)
    if mode in ("flash", "flash3", "sageattn"):
        return _varlen_attention(q, k, v, lengths, host_lengths, mode)
    if mode == "xformers":
        return _xformers_attention(q, k, v, lengths, host_lengths)
    raise UserError(f"attention mode {mode!r} is unknown")


def _single(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> torch.Tensor:
    """Unmasked attention of one sample: (1, l, H, D) -> (1, l, H*D)."""
    _, l, H, D = q.shape
    if mode == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    elif mode == "flash":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q, k, v)
    elif mode == "flash3":
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
    elif mode == "sageattn":
        from sageattention import sageattn

        out = sageattn(q, k, v, tensor_layout="NHD")
    elif mode == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q, k, v)
    else:
        raise UserError(f"attention mode {mode!r} is unknown")
    return out.reshape(1, l, H * D)


def _split_attention(q, k, v, host_lengths, mode) -> torch.Tensor:
    B, L, H, D = q.shape
    outs = []
    for b in range(B):
        n = L if host_lengths is None else host_lengths[b]
        o = _single(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], mode)
        if n < L:
            o = torch.cat([o, o.new_zeros(1, L - n, H * D)], dim=1)
        outs.append(o)
    return torch.cat(outs, dim=0) if B > 1 else outs[0]


def _varlen_attention(q, k, v, lengths, host_lengths, mode) -> torch.Tensor:
    """Pack the valid tokens of all samples and run the kernel's variable-length entry point."""
    B, L, H, D = q.shape
    if lengths is None:
        return torch.cat([_single(q[b : b + 1], k[b : b + 1], v[b : b + 1], mode) for b in range(B)], dim=0) if B > 1 \
            else _single(q, k, v, mode)
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    valid = torch.arange(L, device=q.device)[None, :] < lengths[:, None]  # (B, L)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = max(host_lengths)
    qp, kp, vp = q[valid], k[valid], v[valid]  # (total, H, D)
    if mode == "flash":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(qp, kp, vp, cu, cu, max_len, max_len)
    elif mode == "flash3":
        from flash_attn_interface import flash_attn_varlen_func

        out = flash_attn_varlen_func(qp, kp, vp, cu, cu, max_len, max_len)
        out = out[0] if isinstance(out, tuple) else out
    else:
        from sageattention import sageattn_varlen

        out = sageattn_varlen(qp, kp, vp, cu, cu, max_len, max_len)
    full = out.new_zeros(B, L, H, D)
    full[valid] = out
    return full.reshape(B, L, H * D)


def _xformers_attention(q, k, v, lengths, host_lengths) -> torch.Tensor:
    import xformers.ops as xops

    B, L, H, D = q.shape
    if lengths is None:
        return xops.memory_efficient_attention(q, k, v).reshape(B, L, H * D)
    lens = list(host_lengths)
    valid = torch.arange(L, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    bias = xops.fmha.BlockDiagonalMask.from_seqlens(lens)
    out = xops.memory_efficient_attention(q[valid][None], k[valid][None], v[valid][None], attn_bias=bias)[0]
    full = out.new_zeros(B, L, H, D)
    full[valid] = out
    return full.reshape(B, L, H * D)
