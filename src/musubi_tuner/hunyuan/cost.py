"""What a DiT step costs, from the model's shapes: token counts and FLOPs.

One multiply-add counts as 2 FLOPs. Attention counts QK^T and PV (4 * L^2 * C per layer). Backward
counts the model FLOPs of a LoRA step: the base weights are frozen, so their matmuls only propagate
input gradients (1x forward); attention's backward is 4 matmuls of the forward's size (2x forward;
flash attention also recomputes QK^T, which is not counted as model FLOPs); LoRA's own matmuls get
their input and weight gradients (2x forward).
"""

from __future__ import annotations

from dataclasses import dataclass

from musubi_tuner.hunyuan.config import DiTConfig


def image_tokens(config: DiTConfig, latent_shape: tuple[int, int, int]) -> int:
    """Tokens of a latent (frames, height, width) after patching."""
    (t, h, w), (pt, ph, pw) = latent_shape, config.patch_size
    return (t // pt) * (h // ph) * (w // pw)


@dataclass(frozen=True)
class ForwardFlops:
    linear: int
    attention: int

    @property
    def total(self) -> int:
        return self.linear + self.attention


def block_flops(config: DiTConfig, img_tokens: int, text_tokens: int) -> tuple[ForwardFlops, ForwardFlops]:
    """Forward FLOPs of one double and one single stream block, for one sample."""
    c, m = config.hidden_size, config.mlp_hidden_size
    L = img_tokens + text_tokens
    per_token_stream = 2 * (3 * c * c + c * c + 2 * c * m)  # qkv, proj, fc1, fc2
    per_token_single = 2 * (c * (3 * c + m) + (c + m) * c)  # linear1, linear2
    attn = 4 * L * L * c
    return ForwardFlops(L * per_token_stream, attn), ForwardFlops(L * per_token_single, attn)


def forward_flops(config: DiTConfig, latent_shape: tuple[int, int, int], text_tokens: int, batch: int = 1) -> ForwardFlops:
    """FLOPs of one forward for `batch` samples with `text_tokens` valid LLM tokens each."""
    c, m = config.hidden_size, config.mlp_hidden_size
    li, lt = image_tokens(config, latent_shape), text_tokens
    double, single = block_flops(config, li, lt)
    per_token_stream = 2 * (3 * c * c + c * c + 2 * c * m)
    linear = (
        2 * li * config.in_channels * config.patch_volume * c  # img_in
        + 2 * lt * config.text_states_dim * c  # txt_in.input_embedder
        + config.refiner_depth * lt * per_token_stream
        + config.mm_double_blocks_depth * double.linear
        + config.mm_single_blocks_depth * single.linear
        + 2 * li * c * config.patch_volume * config.out_channels  # final layer
    )
    attention = config.mm_double_blocks_depth * double.attention + config.mm_single_blocks_depth * single.attention
    attention += config.refiner_depth * 4 * lt * lt * c
    return ForwardFlops(linear=batch * linear, attention=batch * attention)


def lora_forward_flops(config: DiTConfig, img_tokens: int, text_tokens: int, rank: int, batch: int = 1) -> int:
    """FLOPs of the default LoRA modules (every block Linear but the modulations) in one forward."""
    c, m = config.hidden_size, config.mlp_hidden_size
    L = img_tokens + text_tokens
    per_token_stream = 2 * rank * ((c + 3 * c) + (c + c) + (c + m) + (m + c))
    per_token_single = 2 * rank * ((c + 3 * c + m) + (c + m + c))
    return batch * (config.mm_double_blocks_depth * L * per_token_stream + config.mm_single_blocks_depth * L * per_token_single)


@dataclass(frozen=True)
class TrainStepFlops:
    forward: int
    backward: int
    recompute: int  # gradient checkpointing runs every block's forward again in backward
    lora: int  # LoRA's own matmuls, forward and backward (and recomputed)

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute + self.lora


def train_step_flops(config: DiTConfig, latent_shape: tuple[int, int, int], text_tokens: int, batch: int = 1,
                     lora_rank: int = 32, checkpointing: bool = False) -> TrainStepFlops:
    """Model FLOPs of one LoRA training step (frozen DiT)."""
    fwd = forward_flops(config, latent_shape, text_tokens, batch)
    li = image_tokens(config, latent_shape)
    double, single = block_flops(config, li, text_tokens)
    blocks_linear = config.mm_double_blocks_depth * double.linear + config.mm_single_blocks_depth * single.linear
    final = 2 * li * config.hidden_size * config.patch_volume * config.out_channels
    blocks_attention = config.mm_double_blocks_depth * double.attention + config.mm_single_blocks_depth * single.attention
    backward = batch * (blocks_linear + final + 2 * blocks_attention)
    lora = lora_forward_flops(config, li, text_tokens, lora_rank, batch)
    recompute = batch * (blocks_linear + blocks_attention) if checkpointing else 0
    return TrainStepFlops(forward=fwd.total, backward=backward, recompute=recompute, lora=lora * (4 if checkpointing else 3))
