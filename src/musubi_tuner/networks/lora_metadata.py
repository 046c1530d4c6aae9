"""LoRA file metadata: our `musubi_tuner.*` keys (what a LoRA was trained on and for, how it is named), read back
from files trained here or, as far as they say, from musubi-tuner's `ss_*` keys. The trainer writes them
(training.metadata); the LoRA tools (info, doctor, convert) read them. Also sd-scripts' hashes of a file, which
the trainer and the post-hoc EMA merge both write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import torch

from musubi_tuner.hunyuan.config import DiTConfig

BASE_MODELS = ("hunyuan-video-t2v", "skyreels-t2v", "skyreels-i2v")
OURS = "musubi_tuner."  # prefix of our own keys


@dataclasses.dataclass
class LoRAFileInfo:
    """Our `musubi_tuner.*` metadata of a LoRA file: what it was trained on and for, and how it is named.

    `from_metadata` also fills what it can from musubi-tuner's `ss_*` keys for files trained elsewhere
    (`written_here` tells which).
    """

    version: str | None = None  # of this toolkit
    base_model: str | None = None  # one of BASE_MODELS
    in_channels: int | None = None  # of the DiT trained on: 16 T2V, 32 SkyReels I2V
    text_template: str | None = None
    modules: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)  # official module path -> (rank, alpha)
    resolutions: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # training (width, height) per dataset
    frames: list[int] = dataclasses.field(default_factory=list)  # training frame counts (1 for images)
    naming: str | None = None  # "kohya" or "other" (networks.lora_naming)
    companion: str | None = None  # file name of the same LoRA in the other naming, written beside this one
    written_here: bool = False

    @property
    def target_blocks(self) -> list[str]:
        """`double_blocks.0`, ... in model order: the blocks the LoRA changes."""
        blocks = {m.group(0) for p in self.modules if (m := re.match(r"(double|single)_blocks\.\d+", p))}
        return sorted(blocks, key=lambda b: (not b.startswith("double"), int(b.rsplit(".", 1)[1])))

    def to_metadata(self) -> dict[str, str]:
        values = {
            "version": self.version, "base_model": self.base_model, "in_channels": self.in_channels,
            "text_template": self.text_template,
            "lora_modules": json.dumps({path: [rank, alpha] for path, (rank, alpha) in self.modules.items()}),
            "target_blocks": json.dumps(self.target_blocks),
            "resolutions": json.dumps([list(r) for r in self.resolutions]), "frames": json.dumps(self.frames),
            "lora_naming": self.naming, "companion": self.companion,
        }
        return {OURS + k: str(v) for k, v in values.items() if v is not None}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "LoRAFileInfo":
        def get(key: str) -> str | None:
            return meta.get(OURS + key)

        if get("version") is not None:
            return cls(
                version=get("version"), base_model=get("base_model"),
                in_channels=int(get("in_channels")) if get("in_channels") else None, text_template=get("text_template"),
                modules={p: (int(r), float(a)) for p, (r, a) in json.loads(get("lora_modules") or "{}").items()},
                resolutions=[tuple(r) for r in json.loads(get("resolutions") or "[]")],
                frames=json.loads(get("frames") or "[]"), naming=get("lora_naming"), companion=get("companion"), written_here=True)
        # trained elsewhere: musubi-tuner's keys say the data, and the DiT file's name hints at the base
        datasets = _json_or(meta.get("ss_datasets"), [])
        resolutions, frames = data_shapes(datasets)
        base = None
        model_name = meta.get("ss_sd_model_name", "").lower()
        if model_name:
            base = "skyreels-i2v" if "i2v" in model_name else "skyreels-t2v" if "skyreels" in model_name else "hunyuan-video-t2v"
        return cls(base_model=base, resolutions=resolutions, frames=frames)


def _json_or(text: str | None, default):
    try:
        return json.loads(text) if text else default
    except json.JSONDecodeError:
        return default


def data_shapes(datasets: list[dict]) -> tuple[list[tuple[int, int]], list[int]]:
    """Training resolutions (width, height) and frame counts from the `ss_datasets` entries."""
    resolutions, frames = [], set()
    for d in datasets:
        res = d.get("resolution")
        if res:
            res = tuple(res) if isinstance(res, (list, tuple)) else (int(res), int(res))
            if res not in resolutions:
                resolutions.append(res)
        if d.get("target_frames"):
            frames.update(d["target_frames"])
        elif "image_directory" in d or "image_jsonl_file" in d:
            frames.add(1)
    return resolutions, sorted(frames)


def lora_module_info(network) -> dict[str, tuple[int, float]]:
    """Official module path -> (rank, alpha) of every module of a LoRA network (for the file's metadata)."""
    from musubi_tuner.networks.lora_naming import kohya_to_module_path

    return {kohya_to_module_path(m.lora_name): (int(m.rank), float(m.alpha)) for m in getattr(network, "unet_loras", [])}


def base_model_kind(config: DiTConfig, dit_path: str | None) -> str:
    """T2V, SkyReels T2V or SkyReels I2V: 32 input channels is I2V; the file name tells SkyReels T2V from HunyuanVideo."""
    if config.in_channels == 32:
        return "skyreels-i2v"
    if dit_path and "skyreels" in os.path.basename(dit_path).lower():
        return "skyreels-t2v"
    return "hunyuan-video-t2v"


def with_naming(metadata: dict[str, str], naming: str, companion: str | None = None) -> dict[str, str]:
    """The metadata for a file in `naming` ("kohya" / "other"), naming its companion file if there is one."""
    meta = {k: v for k, v in metadata.items() if k not in (OURS + "lora_naming", OURS + "companion")}
    meta[OURS + "lora_naming"] = naming
    if companion:
        meta[OURS + "companion"] = companion
    return meta


def sd_scripts_hashes(state_dict: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> tuple[str, str]:
    """SHA-256 of the data section of a safetensors serialisation, and the legacy 8-hex-digit hash (sd-scripts' definitions)."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in state_dict.items()}, metadata=ss_metadata)
    n = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + n :]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy
