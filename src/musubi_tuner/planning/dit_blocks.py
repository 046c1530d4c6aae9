"""The tensors one DiT block creates, keeps for backward and frees, replayed at the real sizes.

Each function below follows the code of `hunyuan.blocks` line by line: every tensor an op returns is
allocated, Python temporaries are freed when the expression that made them ends, locals when the
forward returns, and what autograd saves (checked against `torch.autograd.graph.saved_tensors_hooks`
by the tests) stays until the block's backward has used it. The backward replays follow the order in
which autograd runs the nodes (the newest first) at the granularity of the large tensors.

Sizes: B batch, Li / Lt image / text tokens, L = Li + Lt, C hidden, M MLP hidden, H heads, r LoRA rank,
`act` bytes per activation element (2 under bf16/fp16 autocast, 4 in float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from musubi_tuner.planning.trace import MemoryTrace

SAVED = "activations saved for backward"
WORK = "block working tensors"
ATTN = "attention workspace"
WEIGHT_COPIES = "weight copies (fp8 dequantized / cast)"
LORA_GRADS = "LoRA grads"
EXCHANGE = "context parallel: all-to-all buffers"


@dataclass(frozen=True)
class BlockShapes:
    batch: int
    img_tokens: int
    txt_tokens: int
    hidden: int
    mlp_hidden: int
    heads: int
    act: int = 2  # bytes per activation element
    lora_rank: int = 0  # 0: no LoRA modules run in the blocks
    text_lengths: tuple[int, ...] | None = None  # valid text tokens per sample when they differ (masked / split attention)
    split_attn: bool = False
    fp8: bool = False  # block Linears stored in fp8, dequantized to `act` bytes per use
    fp8_scaled: bool = True  # per-row scales (weights quantized here, not read from a plain-cast fp8 file): one more copy
    weight_cast: bool = False  # weights stored in another dtype than compute (autocast casts every use)
    exchange: bool = False  # context parallel: attention trades the shards of q, k, v (and of its output) by all-to-all

    @property
    def tokens(self) -> int:
        return self.img_tokens + self.txt_tokens

    def valid_tokens(self) -> list[int]:
        """Tokens per sample that attention runs on with split_attn (the padding of shorter prompts is skipped)."""
        if self.text_lengths is None:
            return [self.tokens] * self.batch
        return [self.img_tokens + n for n in self.text_lengths]


@dataclass
class Saved:
    """What one block's forward left for its backward (handles into the trace)."""

    tensors: dict[str, int] = field(default_factory=dict)

    def __setitem__(self, key: str, handle: int) -> None:
        self.tensors[key] = handle

    def __getitem__(self, key: str) -> int | None:
        return self.tensors.get(key)


class BlockTracer:
    """Replays blocks into a MemoryTrace. `grad`: autograd records (training); otherwise no_grad (sampling)."""

    def __init__(self, trace: MemoryTrace, shapes: BlockShapes, grad: bool):
        self.t = trace
        self.s = shapes
        self.grad = grad

    # ------------------------------------------------------------------------------ small helpers
    def new(self, elements: int, bytes_per: int | None = None, part: str = WORK) -> int:
        return self.t.alloc(elements * (self.s.act if bytes_per is None else bytes_per), part)

    def keep(self, saved: Saved, key: str, handle: int | None, part: str = SAVED) -> None:
        """Autograd saves `handle` (when recording)."""
        if self.grad and handle is not None:
            self.t.save(handle, part=part)
            saved[key] = handle

    def keep_new(self, saved: Saved, key: str, elements: int, bytes_per: int | None = None, part: str = SAVED) -> None:
        """A tensor only autograd holds (norm statistics, logsumexp, autocast's weight copies); none without recording."""
        if self.grad:
            handle = self.new(elements, bytes_per, part)
            self.keep(saved, key, handle, part)
            self.t.drop(handle)

    # ------------------------------------------------------------------------------ ops
    def linear(self, saved: Saved, key: str, x: int, tokens: int, n_in: int, n_out: int, lora: bool, strided: bool = False) -> int:
        """nn.Linear (fp8 / cast weights dequantized per use) plus the LoRA module wrapped around it.

        LoRA (networks.lora): out = W x + b; then h = down(x), up(h) * scale, out + that: three output-sized
        tensors are alive at the add. `strided`: x is a slice of a longer sequence (a split along the
        tokens with batch > 1), which each matmul first copies into rows.
        """
        s = self.s
        weight = None
        if s.fp8 or s.weight_cast:
            weight = self._weight_copy(n_in, n_out)
            if not s.fp8:  # autocast's cast copy is what the input grad uses; fp8 weights are dequantized again then
                self.keep(saved, key + ".weight", weight, part=WEIGHT_COPIES)
        rows = self.new(s.batch * tokens * n_in) if strided else None
        out = self.new(s.batch * tokens * n_out)
        self.t.drop(weight, rows)
        if not lora:
            return out
        r = s.lora_rank
        if strided:  # lora_down's own copy of the rows, which it saves
            x = self.new(s.batch * tokens * n_in)
        h = self.new(s.batch * tokens * r)
        self.keep(saved, key + ".lora_in", x)  # lora_down saves its input
        self.keep(saved, key + ".lora_h", h)  # lora_up saves its input
        if s.act == 2:  # autocast keeps bf16 copies of the float32 LoRA weights for the forward
            self.keep_new(saved, key + ".lora_w", r * (n_in + n_out))
        up = self.new(s.batch * tokens * n_out)
        scaled_up = self.new(s.batch * tokens * n_out)
        self.t.drop(up)
        total = self.new(s.batch * tokens * n_out)
        self.t.drop(out, scaled_up, h)
        if strided:
            self.t.drop(x)
        return total

    def _weight_copy(self, n_in: int, n_out: int) -> int:
        """A Linear's weight in the compute dtype: cast (autocast), or dequantized from fp8 (`hunyuan.fp8._dequantize`)."""
        weight = self.new(n_out * n_in, part=WEIGHT_COPIES)  # w.to(compute dtype)
        if self.s.fp8 and self.s.fp8_scaled:
            scaled = self.new(n_out * n_in, part=WEIGHT_COPIES)  # w * row scales
            self.t.drop(weight)
            weight = scaled
        return weight

    def modulate_norm(self, saved: Saved, key: str, x: int, tokens: int, input_needs_grad: bool) -> int:
        s = self.s
        out = self.new(s.batch * tokens * s.hidden)
        if input_needs_grad:
            self.keep(saved, key + ".in", x)
            self.keep_new(saved, key + ".stats", 2 * s.batch * tokens, 4)  # mean, rstd
        return out

    def qk_norm(self, saved: Saved, key: str, tokens: int, src: int) -> int:
        """`blocks.qk_norm` of q or k (`src`: the tensor q or k is a view of, which it saves): float32 inside, rotated in place."""
        s = self.s
        n = s.batch * tokens * s.hidden
        as_float = self.new(n, 4) if s.act != 4 else None
        self.t.drop(self.new(n, 4))  # the square, for the mean
        self.keep(saved, key + ".src", src)
        self.keep_new(saved, key + ".rstd", s.batch * tokens * s.heads, 4)
        normed = self.new(n, 4)
        if s.act == 4:
            return normed
        out = self.new(n)
        self.t.drop(as_float, normed)
        return out

    def attention(self, saved: Saved, key: str, q: int, k: int, v: int) -> int:
        """SDPA (flash / memory-efficient kernels: no L x L matrix) over the joint sequence; returns (B, L, C)."""
        s = self.s
        L, C = s.tokens, s.hidden
        if s.exchange:  # the stacked q, k, v and what arrives for them (the heads of every token: as many elements)
            self.t.drop(self.new(2 * 3 * s.batch * L * C, part=EXCHANGE))
        if s.split_attn and (s.batch > 1 or s.text_lengths is not None):
            outs = []
            for i, n in enumerate(s.valid_tokens()):
                o = self.new(n * C)
                self.keep(saved, f"{key}.out{i}", o)
                self.keep_new(saved, f"{key}.lse{i}", s.heads * n, 4, part=ATTN)
                padded = self.new(L * C)  # zero-padded back to L
                self.t.drop(o)
                outs.append(padded)
            out = self.new(s.batch * L * C)  # torch.cat of the samples
            self.t.drop(*outs)
        else:
            out = self.new(s.batch * L * C)  # (B, L, H, D) memory; the (B, L, C) reshape is a view
            self.keep(saved, key + ".out", out)
            self.keep_new(saved, key + ".lse", s.batch * s.heads * L, 4, part=ATTN)
        for name, h in (("q", q), ("k", k), ("v", v)):
            self.keep(saved, f"{key}.{name}", h)
        return out

    def modulation(self, factor: int) -> int:
        """`*_mod.linear(silu(vec))`: (B, factor * C); its input needs no grad, so nothing is saved."""
        s = self.s
        if s.weight_cast:
            self.t.drop(self.new(factor * s.hidden * s.hidden, part=WEIGHT_COPIES))
        return self.new(s.batch * factor * s.hidden)

    def gated_residual(self, x_tokens: int) -> int:
        return self.new(self.s.batch * x_tokens * self.s.hidden)

    # ------------------------------------------------------------------------------ blocks
    def double_block(self, img: int, txt: int, inputs_need_grad: bool) -> tuple[int, int, Saved]:
        """MMDoubleStreamBlock.forward: returns (img, txt, saved). The inputs stay held by the caller."""
        s = self.s
        C, M = s.hidden, s.mlp_hidden
        lora = s.lora_rank > 0
        saved = Saved()
        streams = {"img": (img, s.img_tokens), "txt": (txt, s.txt_tokens)}
        mods, qs, ks, qkvs = {}, {}, {}, {}
        for name in streams:
            mods[name] = self.modulation(6)
            self.keep(saved, name + ".mod", mods[name])
        for name, (x, n) in streams.items():  # _qkv
            normed = self.modulate_norm(saved, name + ".norm1", x, n, inputs_need_grad and self.grad)
            qkvs[name] = self.linear(saved, name + ".qkv", normed, n, C, 3 * C, lora)
            self.t.drop(normed)
            for key, outs in ((".q", qs), (".k", ks)):  # qk_norm of a contiguous copy: the qkv output is not kept
                copy = self.new(s.batch * n * C)
                outs[name] = self.qk_norm(saved, name + key, n, copy)
                self.t.drop(copy)
        q, k, v = (self.new(s.batch * s.tokens * C) for _ in "qkv")  # torch.cat of the streams' q, k, v
        attn = self.attention(saved, "attn", q, k, v)
        outs = {}
        for name, (x, n) in streams.items():
            proj = self.linear(saved, name + ".proj", attn, n, C, C, lora, strided=s.batch > 1)
            mid = self.gated_residual(n)
            self.t.drop(proj)
            normed = self.modulate_norm(saved, name + ".norm2", mid, n, self.grad)
            fc1 = self.linear(saved, name + ".fc1", normed, n, C, M, lora)
            act = self.new(s.batch * n * M)  # gelu(tanh)
            self.keep(saved, name + ".fc1_out", fc1)
            self.t.drop(fc1)
            fc2 = self.linear(saved, name + ".fc2", act, n, M, C, lora)
            self.t.drop(act, normed)  # MLP.forward returns: its argument and locals go
            outs[name] = self.gated_residual(n)
            self.t.drop(fc2, mid)
        # the forward returns: its locals go (q, k, v of both streams, the qkv outputs they view, attention)
        self.t.drop(*qs.values(), *ks.values(), *qkvs.values(), *mods.values(), q, k, v, attn)
        return outs["img"], outs["txt"], saved

    def single_block(self, x: int, inputs_need_grad: bool = True) -> tuple[int, Saved]:
        """MMSingleStreamBlock.forward over the joint sequence: returns (x, saved)."""
        s = self.s
        C, M, L = s.hidden, s.mlp_hidden, s.tokens
        lora = s.lora_rank > 0
        saved = Saved()
        mod = self.modulation(3)
        self.keep(saved, "mod", mod)
        normed = self.modulate_norm(saved, "norm", x, L, inputs_need_grad and self.grad)
        lin1 = self.linear(saved, "linear1", normed, L, C, 3 * C + M, lora)
        self.t.drop(normed)
        q, k = (self.qk_norm(saved, name, L, lin1) for name in ("q", "k"))
        attn = self.attention(saved, "attn", q, k, lin1)  # v is a view of linear1's output: the whole output stays
        act = self.new(s.batch * L * M)  # gelu of the MLP half of linear1
        self.keep(saved, "mlp_in", lin1)
        joined = self.new(s.batch * L * (C + M))  # torch.cat([attn, gelu])
        self.t.drop(act)
        out2 = self.linear(saved, "linear2", joined, L, C + M, C, lora)
        self.t.drop(joined)
        out = self.gated_residual(L)
        self.t.drop(out2, q, k, attn, lin1, mod)
        return out, saved

    # ------------------------------------------------------------------------------ backward
    # Autograd runs a block's nodes newest first. Each node frees what it saved once it has run, and the
    # gradients of a tensor used twice are summed in place into the first one that arrives.

    def linear_backward(self, saved: Saved, key: str, grad: int, tokens: int, n_in: int, n_out: int, lora: bool,
                        needs_input_grad: bool = True) -> int | None:
        """Backward of linear(): LoRA's nodes (newer) first, then the frozen Linear. Returns the input's grad."""
        s = self.s
        rows = s.batch * tokens
        lora_input_grad = None
        if lora:
            r = s.lora_rank
            scaled = self.new(rows * n_out)  # grad * scale
            h_grad = self.new(rows * r)
            self.t.alloc(4 * r * n_out, LORA_GRADS)  # lora_up.weight.grad (float32)
            self.t.drop(scaled)
            self.t.unsave(saved[key + ".lora_h"])
            if needs_input_grad:
                lora_input_grad = self.new(rows * n_in)
            self.t.alloc(4 * r * n_in, LORA_GRADS)  # lora_down.weight.grad
            self.t.drop(h_grad)
            self.t.unsave(saved[key + ".lora_in"], saved[key + ".lora_w"])
        weight = self._weight_copy(n_in, n_out) if s.fp8 and needs_input_grad else None  # fp8: dequantized again
        input_grad = self.new(rows * n_in) if needs_input_grad else None  # grad @ W
        self.t.drop(weight)
        self.t.unsave(saved[key + ".weight"])
        if lora_input_grad is None:
            return input_grad
        total = self.new(rows * n_in)  # autograd sums the two gradients out of place
        self.t.drop(lora_input_grad, input_grad)
        return total

    def qk_norm_backward(self, saved: Saved, key: str, tokens: int) -> int:
        """Backward of qk_norm: returns the grad of its (q or k) input."""
        s = self.s
        n = s.batch * tokens * s.hidden
        grad32 = self.new(n, 4)  # the incoming grad cast to float32 (or copied), rotated back in place
        as_float = self.new(n, 4) if s.act != 4 else None
        normed = self.new(n, 4)
        self.t.drop(as_float)
        self.t.drop(self.new(n, 4))  # grad * normed, for the mean
        self.t.unsave(saved[key + ".src"], saved[key + ".rstd"])
        if s.act == 4:
            self.t.drop(normed)
            return grad32
        out = self.new(n)
        self.t.drop(grad32, normed)
        return out

    def attention_backward(self, saved: Saved, key: str, grad: int, dq_accumulator: bool) -> tuple[int, int, int]:
        s = self.s
        n = s.batch * s.tokens * s.hidden
        grads = tuple(self.new(n) for _ in range(3))
        if dq_accumulator:  # flash-attention 2 accumulates dq in float32
            self.t.drop(self.new(n, 4, part=ATTN))
        self.t.unsave(*(saved[f"{key}.{name}"] for name in ("q", "k", "v", "out", "lse")))
        for i in range(s.batch):
            self.t.unsave(saved[f"{key}.out{i}"], saved[f"{key}.lse{i}"])
        return grads

    def single_block_backward(self, saved: Saved, grad: int, inputs_need_grad: bool = True, dq_accumulator: bool = True) -> None:
        """Backward of single_block(); `grad` (the output's grad) becomes the input's grad in place."""
        s = self.s
        C, M, L = s.hidden, s.mlp_hidden, s.tokens
        lora = s.lora_rank > 0
        gated = self.new(s.batch * L * C)  # addcmul backward: grad * gate
        joined = self.linear_backward(saved, "linear2", gated, L, C + M, C, lora)
        self.t.drop(gated)
        mlp = self.new(s.batch * L * M)  # gelu backward (the newer node)
        self.t.unsave(saved["mlp_in"])
        q, k, v = self.attention_backward(saved, "attn", joined, dq_accumulator)
        self.t.drop(joined)
        normed = []
        for name, g in (("k", k), ("q", q)):
            normed.append(self.qk_norm_backward(saved, name, L))
            self.t.drop(g)
        qkv = self.new(s.batch * L * 3 * C)  # unbind backward: stack
        self.t.drop(*normed, v)
        lin1 = self.new(s.batch * L * (3 * C + M))  # split backward: cat
        self.t.drop(qkv, mlp)
        normed_grad = self.linear_backward(saved, "linear1", lin1, L, C, 3 * C + M, lora, inputs_need_grad)
        self.t.drop(lin1)
        self._norm_backward(saved, "norm", normed_grad, L, inputs_need_grad)
        self.t.unsave(saved["mod"])

    def double_block_backward(self, saved: Saved, img_grad: int, txt_grad: int, inputs_need_grad: bool = True,
                              dq_accumulator: bool = True) -> None:
        """Backward of double_block(); the outputs' grads become the inputs' grads in place."""
        s = self.s
        C, M = s.hidden, s.mlp_hidden
        lora = s.lora_rank > 0
        attn_parts = []
        for name, n in (("txt", s.txt_tokens), ("img", s.img_tokens)):  # the text stream ran last
            gated = self.new(s.batch * n * C)
            act = self.linear_backward(saved, name + ".fc2", gated, n, M, C, lora)
            self.t.drop(gated)
            fc1 = self.new(s.batch * n * M)  # gelu backward
            self.t.drop(act)
            self.t.unsave(saved[name + ".fc1_out"])
            normed = self.linear_backward(saved, name + ".fc1", fc1, n, C, M, lora)
            self.t.drop(fc1)
            self._norm_backward(saved, name + ".norm2", normed, n, True)
            gated = self.new(s.batch * n * C)
            attn_parts.append(self.linear_backward(saved, name + ".proj", gated, n, C, C, lora))
            self.t.drop(gated)
        attn = self.new(s.batch * s.tokens * C)  # split backward: cat
        self.t.drop(*attn_parts)
        q, k, v = self.attention_backward(saved, "attn", attn, dq_accumulator)
        self.t.drop(attn)
        for name, n in (("txt", s.txt_tokens), ("img", s.img_tokens)):  # each reads its rows of the cat's grads
            k_in = self.qk_norm_backward(saved, name + ".k", n)
            q_in = self.qk_norm_backward(saved, name + ".q", n)
            qkv = self.new(s.batch * n * 3 * C)  # stack of the q, k, v grads
            self.t.drop(k_in, q_in)
            normed = self.linear_backward(saved, name + ".qkv", qkv, n, C, 3 * C, lora, inputs_need_grad)
            self.t.drop(qkv)
            self._norm_backward(saved, name + ".norm1", normed, n, inputs_need_grad)
            self.t.unsave(saved[name + ".mod"])
        self.t.drop(q, k, v)

    def _norm_backward(self, saved: Saved, key: str, grad: int | None, tokens: int, needs_input_grad: bool) -> None:
        """layer_norm backward; its grad is summed into the residual's grad, which the caller holds."""
        if needs_input_grad and grad is not None:  # the norm's grad, then its out-of-place sum with the residual's
            n = self.s.batch * tokens * self.s.hidden
            norm_grad = self.new(n)
            self.t.drop(grad)
            self.t.drop(self.new(n), norm_grad)  # the sum replaces the residual's grad the caller holds
        self.t.drop(grad)
        self.t.unsave(saved[key + ".in"], saved[key + ".stats"])
