"""The seed's five commands, as typed there, on tiny models: every file they write is checked."""

import os
import subprocess
from pathlib import Path

import av
import pytest
import torch

from musubi_tuner.demo.__main__ import commands, write_assets
from musubi_tuner.files import read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cache_train_merge_generate(tmp_path):
    work = tmp_path / "demo"
    assets = write_assets(work, frames=9)
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    steps = commands(assets, work, epochs=2)
    for title, cmd in steps:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{title} failed:\n{result.stderr[-4000:]}"
        assert "\r" not in result.stderr, f"{title}: a progress bar redrawn in a log (no terminal) instead of whole lines"

    # caches: musubi-tuner's names and keys
    cache = work / "dataset" / "cache"
    videos = sorted((cache / "videos").glob("*_hv.safetensors"))
    images = sorted((cache / "images").glob("*_hv.safetensors"))
    assert [p.name for p in videos][0] == "clip_0000_00000-009_0064x0064_hv.safetensors" and len(videos) == 6
    assert [p.name for p in images][0] == "image_0000_0064x0064_hv.safetensors" and len(images) == 6
    entries, meta = read_safetensors_header(videos[0])
    assert list(entries) == ["latents_3x8x8_float16"] and entries["latents_3x8x8_float16"][1] == (16, 3, 8, 8)
    assert meta["architecture"] == "hunyuan_video" and meta["frame_count"] == "9"
    te, te_meta = read_safetensors_header(cache / "videos" / "clip_0000_hv_te.safetensors")
    assert set(te) == {"llm_float16", "llm_mask", "clipL_float16", "clipL_mask"}
    assert te["llm_float16"][1] == (256, 64) and te["llm_mask"][0] == torch.int64 and te["clipL_mask"][1] == (77,)
    assert te_meta["caption1"]

    # LoRA per epoch, kohya names, and the ComfyUI/diffusers copy
    out = work / "output"
    assert {p.name for p in out.glob("*.safetensors")} == {
        "demo-lora-000001.safetensors", "demo-lora.safetensors", "demo-lora-000001.comfyui.safetensors", "demo-lora.comfyui.safetensors"}
    lora, lora_meta = read_safetensors_header(out / "demo-lora.safetensors")
    assert len(lora) == 60 and lora["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"][1] == (32, 64)
    assert lora_meta["ss_network_dim"] == "32" and lora_meta["ss_optimizer"].endswith("AdamW8bit")
    assert (out / "demo-lora-loss.png").is_file()

    # merged model: the base's keys
    merged, _ = read_safetensors_header(work / "merged" / "merged_model.safetensors")
    base = torch.load(assets["dit"], weights_only=True)["module"]
    assert list(merged) == list(base)

    # video: video_length frames at video_size, and the latent beside it
    mp4 = next((work / "videos").glob("*.mp4"))
    with av.open(str(mp4)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (960, 544)
    latent_file = next((work / "videos").glob("*_latent.safetensors"))
    latent, _ = read_safetensors_header(latent_file)
    assert latent["latent"][1] == (16, 2, 68, 120)
