"""HunyuanVideo's diffusion transformer (and SkyReels V1, the same model with 32 input channels).

State-dict keys are the official ones (`double_blocks.N.img_attn_qkv.weight`, ...), so every DiT file
users own loads without renaming. Text padding costs nothing: the LLM states are cut to the longest
valid prompt of the batch and padded keys are masked (or, with `split_attn`, each sample attends
over its own valid tokens only).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from musubi_tuner.hunyuan.attention import check_attention_mode
from musubi_tuner.hunyuan.blocks import (
    AttentionContext,
    FinalLayer,
    MLPEmbedder,
    MMDoubleStreamBlock,
    MMSingleStreamBlock,
    PatchEmbed,
    SingleTokenRefiner,
    TimestepEmbedder,
)
from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.hunyuan.rope import rope_rotations
from musubi_tuner.hunyuan.sequence_parallel import SequenceParallel


class HunyuanVideoDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.img_in = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.txt_in = SingleTokenRefiner(c.text_states_dim, c.hidden_size, c.heads_num, c.mlp_hidden_size, c.refiner_depth, c.timestep_freq_dim)
        self.time_in = TimestepEmbedder(c.hidden_size, c.timestep_freq_dim)
        self.vector_in = MLPEmbedder(c.text_states_dim_2, c.hidden_size)
        self.guidance_in = TimestepEmbedder(c.hidden_size, c.timestep_freq_dim) if c.guidance_embed else None
        self.double_blocks = nn.ModuleList([MMDoubleStreamBlock(c.hidden_size, c.heads_num, c.mlp_hidden_size) for _ in range(c.mm_double_blocks_depth)])
        self.single_blocks = nn.ModuleList([MMSingleStreamBlock(c.hidden_size, c.heads_num, c.mlp_hidden_size) for _ in range(c.mm_single_blocks_depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_volume * c.out_channels)

        # Run-time options; none of them changes the numbers (beyond float rounding).
        self.attn_mode = "sdpa"
        self.split_attn = False
        self.gradient_checkpointing = False
        self.checkpoint_cpu_offload = False
        self.block_hooks: BlockHooks | None = None  # block swap installs itself here
        self.offload_embedders = False  # --img_in_txt_in_offloading: img_in/txt_in visit the device only while used
        self.step_cache = None  # generation's step cache (inference/step_cache.py) sets itself here for each call
        self.sequence_parallel: SequenceParallel | None = None  # context parallel: the group sharing each sample's tokens
        self.attention_outside_graph = False  # compiled blocks for training on CUDA (compile.compile_blocks)

    # ------------------------------------------------------------------------------------------ options

    def set_attention(self, mode: str = "sdpa", split: bool = False) -> None:
        self.attn_mode = check_attention_mode(mode)
        self.split_attn = split

    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        """Recompute each block in backward; with cpu_offload the block inputs kept for that wait in host memory."""
        self.gradient_checkpointing = True
        self.checkpoint_cpu_offload = cpu_offload

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.checkpoint_cpu_offload = False

    @property
    def device(self) -> torch.device:
        return self.final_layer.linear.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the high-precision weights (fp8 block weights are upcast to it layer by layer)."""
        return self.final_layer.linear.weight.dtype

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        text_states_2: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow (noise - data) for latents.

        x (B, C_in, T, H, W); t (B,) timesteps on the 0..1000 scale; text_states (B, Lt, 4096) LLM states with
        text_mask (B, Lt) 1 for valid tokens (right-padded); text_states_2 (B, 768) CLIP pooled output;
        guidance (B,) embedded guidance scale x 1000. Returns (B, C_out, T, H, W).
        """
        c = self.config
        B, _, T, H, W = x.shape
        if c.guidance_embed and guidance is None:
            raise ValueError("this DiT embeds a guidance scale: pass guidance (B,) (embedded_cfg_scale x 1000)")
        t = _per_sample(t, B, x.device)
        if not torch.is_autocast_enabled(x.device.type):  # without autocast, compute in the weights' dtype
            dtype = self.compute_dtype
            x, text_states, text_states_2 = x.to(dtype), text_states.to(dtype), text_states_2.to(dtype)

        # Cut the text to the longest valid prompt; mask or split handles shorter ones.
        text_lengths = host_lengths = None
        if text_mask is not None:
            valid = [int(sum(row)) for row in text_mask.tolist()]  # one read of the mask, as Python ints
            longest = max(*valid, 1)
            text_states = text_states[:, :longest]
            if any(n != longest for n in valid):
                host_lengths = tuple(max(n, 1) for n in valid)
                text_lengths = torch.tensor(host_lengths, device=x.device)

        vec = self.time_in(t) + self.vector_in(text_states_2)
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(_per_sample(guidance, B, x.device))
        if self.offload_embedders:
            self.img_in.to(x.device)
            self.txt_in.to(x.device)
        img = self.img_in(x)
        txt = self.txt_in(text_states, t, text_lengths, self.split_attn, host_lengths)
        if self.offload_embedders:
            self.img_in.to("cpu")
            self.txt_in.to("cpu")
        img_len, txt_len = img.shape[1], txt.shape[1]

        rotation = rope_rotations((T, H, W), c.patch_size, c.rope_dim_list, c.rope_theta, img.device)
        attn_lengths = None if text_lengths is None else img_len + text_lengths
        attn_host_lengths = None if host_lengths is None else tuple(img_len + n for n in host_lengths)
        shards = None
        if self.sequence_parallel is not None:  # from here on this process holds 1/N of the tokens
            shards = self.sequence_parallel.shard(img_len, txt_len)
            img, txt, rotation = shards.image(img), shards.text(txt), shards.rotation(rotation)
            attn_lengths = shards.lengths(text_lengths, B, img.device)
            attn_host_lengths = tuple(img_len + n for n in host_lengths or (txt_len,) * B)  # the group's, as `lengths`
        ctx = AttentionContext(
            mode=self.attn_mode,
            split=self.split_attn,
            lengths=attn_lengths,
            host_lengths=attn_host_lengths,
            rotation=torch.cat([rotation, rotation.new_ones(txt.shape[1], rotation.shape[1])]),  # text tokens: no rotation
            img_len=img.shape[1],
            shards=shards,
            outside_graph=self.attention_outside_graph,
        )
        silu_vec = F.silu(vec)

        if self.block_hooks is not None:
            self.block_hooks.start_forward()
        if self.step_cache is None:
            tokens = [img, txt]
            del img, txt  # run_blocks takes them out of the list: not held here through the blocks
            img = self.run_blocks(tokens, silu_vec, ctx)
        else:  # it runs the blocks, or part of them, or none (a skipped step)
            img = self.step_cache.run_blocks(self, img, txt, silu_vec, ctx)
        if self.block_hooks is not None:
            self.block_hooks.end_forward()
        if img.device != x.device:
            img = img.to(x.device)

        out = self.final_layer(img, silu_vec)
        if shards is not None:
            out = shards.gather_image(out)
        return self.unpatchify(out, T, H, W)

    def run_blocks(self, tokens: list[torch.Tensor], silu_vec: torch.Tensor, ctx: AttentionContext, first: int = 0) -> torch.Tensor:
        """The double blocks from index `first` on, then every single block; returns the image tokens (B, Li, C).

        `tokens` is [img, txt], emptied here: a caller that keeps no other reference does not hold the blocks'
        inputs while they run (the embedders' outputs: an image-sized tensor through all 60 blocks in inference)."""
        img, txt = tokens
        tokens.clear()
        for i in range(first, len(self.double_blocks)):
            img, txt = self.run_double_block(i, img, txt, silu_vec, ctx)
        img_len = img.shape[1]
        x_joint = torch.cat([img, txt], dim=1)
        del img, txt  # the joint sequence replaces them: not held through the single blocks
        for i, block in enumerate(self.single_blocks):
            x_joint = self._run_block(block, ("single", i), x_joint, silu_vec, ctx)
        return x_joint[:, :img_len]

    def run_double_block(self, i: int, img: torch.Tensor, txt: torch.Tensor, silu_vec: torch.Tensor,
                         ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run_block(self.double_blocks[i], ("double", i), img, txt, silu_vec, ctx)

    def unpatchify(self, x: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
        """(B, tokens, pt*ph*pw*C) -> (B, C, T, H, W)."""
        pt, ph, pw = self.config.patch_size
        B = x.shape[0]
        x = x.reshape(B, T // pt, H // ph, W // pw, self.config.out_channels, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(B, self.config.out_channels, T, H, W)

    def _run_block(self, block: nn.Module, key: tuple[str, int], *args):
        fn = block if self.block_hooks is None else _hooked(block, key, self.block_hooks)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if self.checkpoint_cpu_offload:
                fn = _offloading(fn, self.device)
            return checkpoint(fn, *args, use_reentrant=False)  # backward re-runs fn, hooks included
        return fn(*args)


class BlockHooks:
    """Called around every run of a block's forward (recomputations in backward included); block swap implements it.

    `key` is ("double" | "single", index). start/end_forward bracket the blocks of one model forward.
    """

    def start_forward(self) -> None:
        pass

    def end_forward(self) -> None:
        pass

    def before(self, key: tuple[str, int]) -> None:
        pass

    def after(self, key: tuple[str, int]) -> None:
        pass


def _hooked(block: nn.Module, key: tuple[str, int], hooks: BlockHooks) -> Callable:
    def run(*args):
        hooks.before(key)
        try:
            return block(*args)
        finally:
            hooks.after(key)

    return run


def _per_sample(v: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    v = torch.as_tensor(v, device=device)
    if v.ndim == 0 or v.numel() == 1:
        v = v.reshape(1).expand(batch)
    return v


def _offloading(block: Callable, device: torch.device) -> Callable:
    """Run `block` on `device` and hand its outputs back in host memory.

    Under checkpointing the tensors kept for backward are a block's inputs, so with this wrapper the
    activations between blocks live on the CPU and only one block's working set is on the GPU. The copies
    to the host are synchronous: the host reads them right away (the joint sequence of the single blocks is
    concatenated there), and an asynchronous copy from the GPU is not there yet when the host reads it.
    """

    def run(*args):
        moved = [a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args]
        out = block(*moved)
        if isinstance(out, tuple):
            return tuple(o.to("cpu") for o in out)
        return out.to("cpu")

    return run
