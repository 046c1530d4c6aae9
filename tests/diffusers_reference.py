"""Build diffusers' implementations from our official-layout weights, through diffusers' own key conversion.

diffusers is a test-only dependency: it is the reference our model code must equal.
"""

from __future__ import annotations

import re

import torch

from musubi_tuner.hunyuan.config import DiTConfig


def official_to_diffusers_dit(state_dict: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """diffusers' converter, except that single-block linear1 is split at the model's own hidden size.

    (The converter hard-codes 3072, the full model's width; everything else is its own mapping.)
    """
    from diffusers.loaders.single_file_utils import convert_hunyuan_video_transformer_to_diffusers

    sd = {k: v.clone() for k, v in state_dict.items()}
    h = config.hidden_size
    for key in [k for k in sd if ".linear1." in k]:
        w = sd.pop(key)
        q, k_, v, mlp = torch.split(w, (h, h, h, w.shape[0] - 3 * h))
        block, suffix = key.replace("single_blocks", "single_transformer_blocks").rsplit(".linear1.", 1)
        sd[f"{block}.attn.to_q.{suffix}"] = q
        sd[f"{block}.attn.to_k.{suffix}"] = k_
        sd[f"{block}.attn.to_v.{suffix}"] = v
        sd[f"{block}.proj_mlp.{suffix}"] = mlp
    return convert_hunyuan_video_transformer_to_diffusers(sd)


def diffusers_dit(state_dict: dict[str, torch.Tensor], config: DiTConfig):
    from diffusers import HunyuanVideoTransformer3DModel

    pt, ph, pw = config.patch_size
    assert ph == pw
    model = HunyuanVideoTransformer3DModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_attention_heads=config.heads_num,
        attention_head_dim=config.head_dim,
        num_layers=config.mm_double_blocks_depth,
        num_single_layers=config.mm_single_blocks_depth,
        num_refiner_layers=config.refiner_depth,
        mlp_ratio=config.mlp_hidden_size / config.hidden_size,
        patch_size=ph,
        patch_size_t=pt,
        guidance_embeds=config.guidance_embed,
        text_embed_dim=config.text_states_dim,
        pooled_projection_dim=config.text_states_dim_2,
        rope_theta=config.rope_theta,
        rope_axes_dim=config.rope_dim_list,
    )
    model.load_state_dict(official_to_diffusers_dit(state_dict, config), strict=True)
    return model.eval()


def diffusers_vae(state_dict: dict[str, torch.Tensor], config):
    """diffusers' AutoencoderKLHunyuanVideo with our weights: the official VAE keys are diffusers' keys."""
    from diffusers import AutoencoderKLHunyuanVideo

    model = AutoencoderKLHunyuanVideo(
        in_channels=config.in_channels, out_channels=config.in_channels, latent_channels=config.latent_channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups, spatial_compression_ratio=config.spatial_compression,
        temporal_compression_ratio=config.temporal_compression,
    )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def split_linear1_lora_for_diffusers(lora: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """An original-naming LoRA with its single-block linear1 pairs already split the way diffusers' LoRA converter
    (`_convert_hunyuan_video_lora_to_diffusers`) splits them, but at the model's own hidden size.

    That converter, like the checkpoint converter above, hard-codes the full model's 3072; every other key is
    left for it to convert. A tiny model needs this; the released model (width 3072) does not.
    """
    h = config.hidden_size
    out = {}
    for key, t in lora.items():
        m = re.fullmatch(r"(?:diffusion_model\.|transformer\.)?single_blocks\.(\d+)\.linear1\.(lora_A|lora_B)\.weight", key)
        if m is None:
            out[key] = t
            continue
        block, part = m.groups()
        pieces = [t] * 4 if part == "lora_A" else torch.split(t, (h, h, h, t.shape[0] - 3 * h))
        for name, piece in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), pieces):
            out[f"single_transformer_blocks.{block}.{name}.{part}.weight"] = piece
    return out
