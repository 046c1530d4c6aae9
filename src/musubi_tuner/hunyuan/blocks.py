"""The parts of HunyuanVideo's DiT, one class per part, with the official parameter names.

Shapes: B batch, Li image tokens, Lt text tokens, C hidden size, H heads, D head dim.
The conditioning vector `vec` (B, C) is passed to blocks already through SiLU: every modulation
layer of the official model starts with SiLU on the same vector, so it is computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.hunyuan.attention import attention
from musubi_tuner.hunyuan.rope import rotate_

if TYPE_CHECKING:
    from musubi_tuner.hunyuan.sequence_parallel import Shards

LN_EPS = 1e-6


@dataclass
class AttentionContext:
    """What every attention call of one forward shares: kernel choice, valid lengths, rope tables."""

    mode: str = "sdpa"
    split: bool = False
    lengths: torch.Tensor | None = None  # valid tokens per sample in the joint [image, text] sequence
    host_lengths: tuple[int, ...] | None = None  # the same, as Python ints
    rotation: torch.Tensor | None = None  # (L, D / 2) complex rope table: image rows rotate, text rows are 1
    img_len: int = 0
    shards: "Shards | None" = None  # context parallel: this process holds a shard of the tokens (sequence_parallel.py)
    outside_graph: bool = False  # compiled blocks: the attention runs eagerly, between two compiled graphs (compile.py)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of the joint [image, text] sequence (B, L, H, D) -> (B, L, H * D), over the group's tokens when sharded."""
        return (_attend_eagerly if self.outside_graph else _attend)(self, q, k, v)


def _attend(ctx: AttentionContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if ctx.shards is None:
        return attention(q, k, v, ctx.lengths, ctx.mode, ctx.split, ctx.host_lengths)
    return ctx.shards.attention(q, k, v, ctx.lengths, ctx.mode, ctx.split, ctx.host_lengths)


_attend_eagerly = torch.compiler.disable(_attend)  # a graph break inside a compiled block; a plain call elsewhere


# ----------------------------------------------------------------------------------------- small helpers


def modulate_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) then x * (1 + scale) + shift; shift/scale (B, C)."""
    C = x.shape[-1]
    if x.shape[0] == 1:  # one fused kernel: the modulation acts as the norm's affine parameters
        return F.layer_norm(x, (C,), (1 + scale[0]).to(x.dtype), shift[0].to(x.dtype), LN_EPS)
    return torch.addcmul(shift.unsqueeze(1), F.layer_norm(x, (C,), eps=LN_EPS), 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with gate (B, C)."""
    return torch.addcmul(x, gate.unsqueeze(1), y)


class _NormRotate(torch.autograd.Function):
    """RMSNorm of q or k over the head dim, times its weight, then the rope rotation: float32 inside, one cast out.

    As one op it keeps for backward only its input (a view of the qkv projection, which stays alive anyway in
    the single-stream blocks) and one float32 scale per row, and runs a handful of kernels each way instead of
    the two dozen of the op-by-op version (casts, the norm's decomposition, the pair swap of the rotation).
    """

    @staticmethod
    def forward(ctx, x, weight, rotation, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        y = xf * rstd
        y.mul_(weight.to(y.dtype))
        if rotation is not None:
            y = rotate_(y, rotation)
        ctx.save_for_backward(x, weight, rotation, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rotation, rstd = ctx.saved_tensors
        g = grad.to(rstd.dtype)
        if g is grad:  # float32 already: work on a copy
            g = g.clone()
        if rotation is not None:
            g = rotate_(g, rotation, inverse=True)
        normed = x.to(rstd.dtype) * rstd  # the norm's output before the weight
        weight_grad = None
        if ctx.needs_input_grad[1]:
            weight_grad = (g * normed).flatten(0, -2).sum(0).to(weight.dtype)
        g.mul_(weight.to(g.dtype))
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed))
        dot = (g * normed).mean(-1, keepdim=True)
        g.sub_(normed.mul_(dot)).mul_(rstd)
        return g.to(x.dtype), weight_grad, None, None


def qk_norm(x: torch.Tensor, weight: torch.Tensor, rotation: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of q or k (B, L, H, D) over D, times `weight`, then rotated by a (L, D / 2) rope table when given.

    Computed in float32 as the official model does (it rounds once more, between the norm and the rotation).
    """
    return _NormRotate.apply(x, weight, rotation, eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ----------------------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = patch: (B, C_in, T, H, W) -> (B, T*H/2*W/2, C) in (t, h, w) order."""

    def __init__(self, patch_size, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoid of a scalar per sample, then Linear-SiLU-Linear (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class MLPEmbedder(nn.Module):
    """CLIP pooled vector -> hidden: `in_layer`, SiLU, `out_layer`."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """Pooled LLM state -> hidden: `linear_1`, SiLU, `linear_2`."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.act_1 = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


class MLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.silu(h) if self.activation == "silu" else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class Modulation(nn.Module):
    """`linear` applied to SiLU(vec) (the caller passes SiLU(vec)); returns `factor` chunks of (B, C)."""

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(hidden_size, factor * hidden_size)

    def forward(self, silu_vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(silu_vec).chunk(self.factor, dim=-1)


# ----------------------------------------------------------------------------------------- text refiner


class IndividualTokenRefinerBlock(nn.Module):
    """Self-attention + SiLU MLP over the LLM tokens, gated by the (timestep + pooled text) vector."""

    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.self_attn_q_norm = nn.Identity()
        self.self_attn_k_norm = nn.Identity()
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LN_EPS)
        self.mlp = MLP(hidden_size, mlp_hidden, "silu")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, lengths: torch.Tensor | None, split: bool,
                host_lengths: tuple[int, ...] | None = None) -> torch.Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)
        B, L, C = x.shape
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(B, L, 3, self.heads, C // self.heads).unbind(2)
        a = attention(q, k, v, lengths, "sdpa", split, host_lengths)  # at most a few hundred tokens: SDPA is always fine
        x = gated_residual(x, gate_msa, self.self_attn_proj(a))
        return gated_residual(x, gate_mlp, self.mlp(self.norm2(x)))


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList([IndividualTokenRefinerBlock(hidden_size, heads, mlp_hidden) for _ in range(depth)])


class SingleTokenRefiner(nn.Module):
    """`txt_in`: projects LLM states (B, Lt, 4096) to the hidden size and refines them (official `single_refiner`)."""

    def __init__(self, text_dim: int, hidden_size: int, heads: int, mlp_hidden: int, depth: int, freq_dim: int):
        super().__init__()
        self.input_embedder = nn.Linear(text_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim)
        self.c_embedder = TextProjection(text_dim, hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(hidden_size, heads, mlp_hidden, depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor | None, split: bool = False,
                host_lengths: tuple[int, ...] | None = None) -> torch.Tensor:
        if lengths is None:
            pooled = x.float().mean(dim=1)
        else:
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
            pooled = (x.float() * valid.unsqueeze(-1)).sum(dim=1) / valid.sum(dim=1, keepdim=True)
        c = self.t_embedder(t) + self.c_embedder(pooled.to(x.dtype))
        x = self.input_embedder(x)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, lengths, split, host_lengths)
        return x


# ----------------------------------------------------------------------------------------- stream blocks


class MMDoubleStreamBlock(nn.Module):
    """Image and text tokens keep their own weights and attend jointly ([image, text] order)."""

    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        head_dim = hidden_size // heads
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(hidden_size, 6))
            self.add_module(f"{stream}_attn_qkv", nn.Linear(hidden_size, 3 * hidden_size))
            self.add_module(f"{stream}_attn_q_norm", RMSNormWeight(head_dim))
            self.add_module(f"{stream}_attn_k_norm", RMSNormWeight(head_dim))
            self.add_module(f"{stream}_attn_proj", nn.Linear(hidden_size, hidden_size))
            self.add_module(f"{stream}_mlp", MLP(hidden_size, mlp_hidden, "gelu_tanh"))

    def _qkv(self, x: torch.Tensor, stream: str, mod: tuple[torch.Tensor, ...], rotation: torch.Tensor | None):
        B, L, C = x.shape
        qkv = getattr(self, f"{stream}_attn_qkv")(modulate_norm(x, mod[0], mod[1]))
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).unbind(2)
        # qk_norm keeps its input for backward: copies of q and k let the whole qkv output (v is concatenated
        # into a new tensor anyway) be freed when the block returns
        q = qk_norm(q.contiguous(), getattr(self, f"{stream}_attn_q_norm").weight, rotation)
        k = qk_norm(k.contiguous(), getattr(self, f"{stream}_attn_k_norm").weight, rotation)
        return q, k, v

    def forward(self, img: torch.Tensor, txt: torch.Tensor, silu_vec: torch.Tensor, ctx: AttentionContext):
        img_mod = self.img_mod(silu_vec)
        txt_mod = self.txt_mod(silu_vec)
        img_q, img_k, img_v = self._qkv(img, "img", img_mod, ctx.rotation[: img.shape[1]])
        txt_q, txt_k, txt_v = self._qkv(txt, "txt", txt_mod, None)  # text tokens are not rotated
        # without autograd nothing else holds the per-stream q, k, v (nor the qkv output under v) once joined, nor the
        # joined ones once attention ran: dropped as they are done with, not held through the MLPs
        q = torch.cat([img_q, txt_q], dim=1)
        del img_q, txt_q
        k = torch.cat([img_k, txt_k], dim=1)
        del img_k, txt_k
        v = torch.cat([img_v, txt_v], dim=1)
        del img_v, txt_v
        attn = ctx.attend(q, k, v)
        del q, k, v
        # split (not slicing): its backward concatenates instead of scattering into zero-filled tensors
        img_attn, txt_attn = attn.split([img.shape[1], txt.shape[1]], dim=1)
        img = gated_residual(img, img_mod[2], self.img_attn_proj(img_attn))
        img = gated_residual(img, img_mod[5], self.img_mlp(modulate_norm(img, img_mod[3], img_mod[4])))
        txt = gated_residual(txt, txt_mod[2], self.txt_attn_proj(txt_attn))
        txt = gated_residual(txt, txt_mod[5], self.txt_mlp(modulate_norm(txt, txt_mod[3], txt_mod[4])))
        return img, txt


class MMSingleStreamBlock(nn.Module):
    """One weight set over the joint sequence: linear1 -> (qkv | mlp), attention, linear2 over (attn | GELU(mlp))."""

    def __init__(self, hidden_size: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.hidden_size = hidden_size
        head_dim = hidden_size // heads
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + mlp_hidden, hidden_size)
        self.q_norm = RMSNormWeight(head_dim)
        self.k_norm = RMSNormWeight(head_dim)
        self.modulation = Modulation(hidden_size, 3)

    def forward(self, x: torch.Tensor, silu_vec: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        shift, scale, gate = self.modulation(silu_vec)
        B, L, C = x.shape
        qkv, mlp = self.linear1(modulate_norm(x, shift, scale)).split([3 * C, self.linear1.out_features - 3 * C], dim=-1)
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).unbind(2)
        del qkv
        q = qk_norm(q, self.q_norm.weight, ctx.rotation)
        k = qk_norm(k, self.k_norm.weight, ctx.rotation)
        attn = ctx.attend(q, k, v)
        # without autograd nothing else holds q, k or linear1's output: the latter goes with the GELU's input
        del q, k, v
        mlp = F.gelu(mlp, approximate="tanh")
        return gated_residual(x, gate, self.linear2(torch.cat([attn, mlp], dim=-1)))


class RMSNormWeight(nn.Module):
    """Holds the learnable per-dim weight of a q/k RMSNorm (`*_norm.weight`); the norm itself is `qk_norm`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class FinalLayer(nn.Module):
    """Modulated LayerNorm then linear to patch pixels; `adaLN_modulation` gives (shift, scale) in that order."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, silu_vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation[1](silu_vec).chunk(2, dim=-1)
        return self.linear(modulate_norm(x, shift, scale))
