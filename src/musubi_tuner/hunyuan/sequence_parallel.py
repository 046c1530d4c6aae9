"""Ulysses sequence parallelism: the N processes of a group share one sample's tokens.

Each process holds 1/N of the image tokens and 1/N of the text tokens (both padded to a multiple of N;
the padding is masked). Every layer but attention acts token by token, so it runs on the local shard
as it is. Attention needs every token: one all-to-all trades the shards of q, k, v (all heads, 1/N of
the tokens) for head shards (1/N of the heads, all tokens), attention runs on those heads, and a second
all-to-all trades the output back. The conditioning vector, the text refiner and the rope tables are
computed whole on every process (they are small). At the end the final layer's output is gathered,
so the DiT's forward returns the whole prediction on every process, as without parallelism.

Gradients: a tensor computed whole on every process (the vector, the refined text) receives, on each
process, the gradient of that process's tokens only; the true gradient is the sum over the group. So
parameter gradients are summed over the group (`distributed.GradientReducer` does it), and the loss
must be computed alike on every process of a group (the gathered prediction against the same target).

Bytes each process sends per attention call, bf16: 4 x B x (L/N) x C x 2 x (N - 1)/N (q, k, v and the
output), the same again in backward (`exchange_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from musubi_tuner.errors import SharedError
from musubi_tuner.hunyuan.attention import attention


def check_heads(heads: int, size: int, flag: str = "--context_parallel") -> None:
    """Ulysses splits the heads over the processes: their count must divide."""
    if heads % size:
        fits = [n for n in range(1, heads + 1) if heads % n == 0]  # 1: no context parallel
        raise SharedError(f"{flag} {size}: the DiT's {heads} attention heads do not split over {size} processes; "
                        f"use one of {', '.join(map(str, fits))}")


class SequenceParallel:
    """A process group that shares the tokens of every sample; set as `dit.sequence_parallel`."""

    def __init__(self, group: dist.ProcessGroup | None, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank

    def shard(self, img_len: int, txt_len: int) -> "Shards":
        return Shards(self, img_len, txt_len)


@dataclass
class Shards:
    """How one forward's sequence is split: this process's image tokens [rank*S, (rank+1)*S) and text tokens
    [rank*T, (rank+1)*T) of the padded sequences (S = ceil(Li / N), T = ceil(Lt / N))."""

    sp: SequenceParallel
    img_len: int
    txt_len: int

    def __post_init__(self):
        n = self.sp.size
        self.img_local = -(-self.img_len // n)
        self.txt_local = -(-self.txt_len // n)

    # ---------------------------------------------------------------------------------- in and out
    def scatter(self, x: torch.Tensor, local: int) -> torch.Tensor:
        """(B, L, ...) whole -> (B, local, ...) this process's share, zero-padded at the end of the last ones."""
        start = self.sp.rank * local
        x = x[:, start : start + local]
        if x.shape[1] < local:
            return F.pad(x, (0, 0) * (x.ndim - 2) + (0, local - x.shape[1]))
        return x.clone()  # a copy, not a view: the whole sequence's storage is freed

    def image(self, img: torch.Tensor) -> torch.Tensor:
        return self.scatter(img, self.img_local)

    def text(self, txt: torch.Tensor) -> torch.Tensor:
        return self.scatter(txt, self.txt_local)

    def rotation(self, table: torch.Tensor) -> torch.Tensor:
        """The rope table (Li, D / 2) of the whole image -> this process's rows; padding rows do not rotate (1)."""
        start = self.sp.rank * self.img_local
        rows = table[start : start + self.img_local]
        if rows.shape[0] < self.img_local:
            rows = torch.cat([rows, rows.new_ones(self.img_local - rows.shape[0], table.shape[1])])
        return rows

    def lengths(self, text_lengths: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Valid tokens per sample of the attention sequence [image, text, padding] (see `_canonical`)."""
        if text_lengths is None:
            text_lengths = torch.full((batch,), self.txt_len, device=device)
        return self.img_len + text_lengths

    def gather_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) image shards -> (B, Li, ...) whole, on every process."""
        return _Gather.apply(x, self.sp)[:, : self.img_len]

    @property
    def valid_image_rows(self) -> int:
        """Rows of this process's image shard that are real tokens (the rest is padding)."""
        return max(0, min(self.img_local, self.img_len - self.sp.rank * self.img_local))

    def sum_image_rows(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """The float32 sum of each (B, S, ...) tensor over the real image tokens of every process (one all-reduce)."""
        n = self.valid_image_rows
        sums = torch.stack([v[:, :n].float().sum() for v in values])
        dist.all_reduce(sums, group=self.sp.group)
        return list(sums.unbind())

    # ---------------------------------------------------------------------------------- attention
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None, mode: str,
                  split: bool, host_lengths: tuple[int, ...] | None = None) -> torch.Tensor:
        """Attention of the local joint shard [image S, text T] against every token of the group.

        q, k, v (B, S + T, H, D) -> (B, S + T, H * D). `lengths` count valid tokens of [image, text] (see `lengths`)."""
        B, L, H, D = q.shape
        n = self.sp.size
        qkv = _AllToAll.apply(torch.stack([q, k, v]), 3, 2, self.sp)  # (3, B, n * L, H / n, D)
        q, k, v = self._canonical(qkv).unbind(0)
        out = attention(q, k, v, lengths, mode, split, host_lengths).view(B, -1, H // n, D)
        out = _AllToAll.apply(self._uncanonical(out), 1, 2, self.sp)  # (B, L, H, D)
        return out.reshape(B, L, H * D)

    def _canonical(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n * (S + T), h, D) in process order -> [image Li, text Lt, image padding, text padding] on dim -3."""
        n, S, T = self.sp.size, self.img_local, self.txt_local
        per_rank = x.unflatten(-3, (n, S + T))
        img = per_rank[..., :S, :, :].flatten(-4, -3)
        txt = per_rank[..., S:, :, :].flatten(-4, -3)
        li, lt = self.img_len, self.txt_len
        return torch.cat([img[..., :li, :, :], txt[..., :lt, :, :], img[..., li:, :, :], txt[..., lt:, :, :]], dim=-3)

    def _uncanonical(self, x: torch.Tensor) -> torch.Tensor:
        n, S, T = self.sp.size, self.img_local, self.txt_local
        li, lt = self.img_len, self.txt_len
        img, txt, img_pad, txt_pad = x.split([li, lt, n * S - li, n * T - lt], dim=-3)
        img = torch.cat([img, img_pad], dim=-3).unflatten(-3, (n, S))
        txt = torch.cat([txt, txt_pad], dim=-3).unflatten(-3, (n, T))
        return torch.cat([img, txt], dim=-3).flatten(-4, -3)


def exchange_bytes(batch: int, local_tokens: int, hidden: int, size: int, element_bytes: int) -> int:
    """Bytes one process sends in one attention call's two all-to-alls (q, k, v out; the output back)."""
    return 4 * batch * local_tokens * hidden * element_bytes * (size - 1) // size


# -------------------------------------------------------------------------------------- collectives


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, sp: SequenceParallel) -> torch.Tensor:
    """Split `scatter_dim` into N chunks, send chunk j to process j, concatenate what arrives along `gather_dim`."""
    n = sp.size
    send = x.unflatten(scatter_dim, (n, -1)).movedim(scatter_dim, 0).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=sp.group)
    del send  # sent: not held while the result is put in order (the attention's peak under context parallel)
    # received[j] is process j's chunk: put that axis just before gather_dim and merge the two (source-major order)
    return received.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, sp: SequenceParallel):
        ctx.dims, ctx.sp = (scatter_dim, gather_dim), sp
        return all_to_all(x, scatter_dim, gather_dim, sp)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all(grad, gather_dim, scatter_dim, ctx.sp), None, None, None


class _Gather(torch.autograd.Function):
    """All-gather along dim 1. Its output is replicated and so is its gradient (the same loss on every process):
    the backward keeps this process's slice."""

    @staticmethod
    def forward(ctx, x, sp: SequenceParallel):
        ctx.sp, ctx.local = sp, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.sp.rank * ctx.local
        return grad[:, start : start + ctx.local], None
