"""The tiny models, dataset and LoRAs every reliability case starts from (built once per session by conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from helpers import write_cached_dataset

from musubi_tuner import files
from musubi_tuner.demo.synthetic_data import make_synthetic_dataset
from musubi_tuner.demo.tiny_dit import (
    TINY_DIT,
    random_dit_state_dict,
    tiny_dit_config,
    write_dit,
)
from musubi_tuner.demo.tiny_text_encoders import (
    write_tiny_clip_folder,
    write_tiny_llm_folder,
)
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae


@dataclass
class Assets:
    root: Path
    dit: Path  # the official .pt layout
    dit_st: Path  # the same DiT as bf16 safetensors
    vae: Path
    te1: Path
    te2: Path
    dataset: Path  # synthetic: 2 clips + 2 images, 32x32, 5 frames, cached once (latents and text)
    cached: Path  # TOML of a cache-only dataset for training (4 clips)
    lora: Path  # rank 4 on the tiny DiT
    lora_big: Path  # rank 4 on a wider DiT (another model size)
    lora_sdxl: Path  # kohya naming, SDXL modules
    lora_nan: Path  # the tiny DiT's LoRA with a NaN in one lora_up
    lora_ranks: Path  # the tiny DiT's LoRA whose up and down ranks disagree in one module


def make_lora(dit_model, path: Path, rank: int = 4, seed: int = 1) -> Path:
    from musubi_tuner.networks import lora

    net = lora.create_arch_network(1.0, rank, rank, None, None, dit_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, 0.05, generator=g)
    net.save_weights(str(path), torch.float32, {})
    return path


def build_assets(root: Path) -> Assets:
    from musubi_tuner import cache_latents, cache_text_encoder_outputs
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    state = random_dit_state_dict(TINY_DIT)
    dit = write_dit(root / "dit.pt", state, TINY_DIT, "pt")
    dit_st = write_dit(root / "dit.safetensors", state, TINY_DIT)
    vae = write_vae(root / "vae.pt", random_vae_state_dict(TINY_VAE))
    te1, te2 = write_tiny_llm_folder(root / "te1"), write_tiny_clip_folder(root / "te2")
    dataset = make_synthetic_dataset(root / "ds", num_videos=2, num_images=2, width=32, height=32, frames=5)
    for main, extra in ((cache_latents.main, ["--vae", str(vae), "--num_workers", "0"]),
                        (cache_text_encoder_outputs.main, ["--text_encoder1", str(te1), "--text_encoder2", str(te2)])):
        main(["--dataset_config", str(dataset), *extra])
    cached = write_cached_dataset(root / "cached", items=4, frames=5, size=(32, 32))
    lora = make_lora(load_dit(dit, dtype=torch.float32), root / "lora.safetensors")
    big = tiny_dit_config(hidden_size=128, heads_num=4, mlp_hidden_size=512)
    lora_big = make_lora(HunyuanVideoDiT(big), root / "lora_big.safetensors")
    lora_sdxl = root / "lora_sdxl.safetensors"
    name = "lora_unet_input_blocks_1_1_proj_in"
    files.save_safetensors({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
                            f"{name}.alpha": torch.tensor(4.0)}, lora_sdxl)
    weights = files.StateDictFile(lora).load_all()
    up = sorted(k for k in weights if k.endswith("lora_up.weight"))[3]
    weights[up] = weights[up].clone()
    weights[up][0, 0] = float("nan")
    lora_nan = root / "lora_nan.safetensors"
    files.save_safetensors(weights, lora_nan)
    weights = files.StateDictFile(lora).load_all()
    weights[up] = weights[up][:, :3].clone()  # rank 3 up, rank 4 down
    lora_ranks = root / "lora_ranks.safetensors"
    files.save_safetensors(weights, lora_ranks)
    return Assets(root, dit, dit_st, vae, te1, te2, dataset, cached, lora, lora_big, lora_sdxl, lora_nan, lora_ranks)
