"""Model presets: what HunyuanVideo and SkyReels V1 each need at inference, so users stop getting it wrong.

A preset only fills in flags the user did not type; explicit flags always win.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The official negative prompt of HunyuanVideo and SkyReels V1 (hyvideo/constants.py NEGATIVE_PROMPT).
DEFAULT_NEGATIVE_PROMPT = (
    "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, bad eyes, bad limbs, distortion"
)
SKYREELS_PROMPT_PREFIX = "FPS-24, "


@dataclass(frozen=True)
class Preset:
    name: str
    guidance_scale: float
    embedded_cfg_scale: float
    negative_prompt: str | None
    prompt_prefix: str
    video_size: tuple[int, int]
    video_length: int
    infer_steps: int
    flow_shift: float = 7.0


PRESETS = {
    # The seed's/musubi-tuner's defaults for the distilled HunyuanVideo T2V.
    "hunyuan-t2v": Preset("hunyuan-t2v", 1.0, 6.0, None, "", (256, 256), 129, 50),
    # SkyReels V1: real CFG 6.0 with embedded guidance 1.0, the official negative prompt, "FPS-24, " prefix, 544x960x97, 30 steps.
    "skyreels-t2v": Preset("skyreels-t2v", 6.0, 1.0, DEFAULT_NEGATIVE_PROMPT, SKYREELS_PROMPT_PREFIX, (544, 960), 97, 30),
    "skyreels-i2v": Preset("skyreels-i2v", 6.0, 1.0, DEFAULT_NEGATIVE_PROMPT, SKYREELS_PROMPT_PREFIX, (544, 960), 97, 30),
}


PRESET_METADATA_KEY = "musubi_tuner.preset"  # in a DiT file we write (a merge): the preset of the model it came from


def detect_preset(in_channels: int, dit_path: str, metadata: dict[str, str] | None = None) -> str:
    """32 input channels is SkyReels I2V; a file whose metadata names its preset (a merge of a SkyReels model) or whose
    name holds "skyreels" with 16 is SkyReels T2V; else HunyuanVideo. (The whole path was searched: a HunyuanVideo file
    in a folder named skyreels... ran with SkyReels' defaults, and a merged SkyReels model with HunyuanVideo's: fuzz_aj 2.)"""
    if in_channels == 32:
        return "skyreels-i2v"
    recorded = (metadata or {}).get(PRESET_METADATA_KEY)
    if recorded in PRESETS:
        return recorded
    if "skyreels" in os.path.basename(os.fspath(dit_path)).lower():
        return "skyreels-t2v"
    return "hunyuan-t2v"
