"""What a DiT forward costs, from the model's shapes: token counts and FLOPs.

One multiply-add counts as 2 FLOPs. Attention counts QK^T and PV (4 * L^2 * C per layer).
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


def forward_flops(config: DiTConfig, latent_shape: tuple[int, int, int], text_tokens: int, batch: int = 1) -> ForwardFlops:
    """FLOPs of one forward for `batch` samples with `text_tokens` valid LLM tokens each."""
    c, m = config.hidden_size, config.mlp_hidden_size
    li, lt = image_tokens(config, latent_shape), text_tokens
    L = li + lt
    per_token_stream = 2 * (3 * c * c + c * c + 2 * c * m)  # qkv, proj, fc1, fc2
    per_token_single = 2 * (c * (3 * c + m) + (c + m) * c)  # linear1, linear2
    attn = 4 * L * L * c
    linear = (
        2 * li * config.in_channels * config.patch_volume * c  # img_in
        + 2 * lt * config.text_states_dim * c  # txt_in.input_embedder
        + config.refiner_depth * lt * per_token_stream
        + config.mm_double_blocks_depth * L * per_token_stream
        + config.mm_single_blocks_depth * L * per_token_single
        + 2 * li * c * config.patch_volume * config.out_channels  # final layer
    )
    attention = config.num_blocks * attn + config.refiner_depth * 4 * lt * lt * c
    return ForwardFlops(linear=batch * linear, attention=batch * attention)
