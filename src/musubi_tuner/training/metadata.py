"""What a trained LoRA file says about itself: musubi-tuner's `ss_*` keys, the SAI model spec, and our own keys
that tell any tool what base model, blocks, ranks and data the file is for (`LoRAFileInfo`, which reads back)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import time

import torch

from musubi_tuner import __version__
from musubi_tuner.hunyuan.config import DiTConfig

BASE_MODEL_VERSION = "hunyuan_video"
TEXT_TEMPLATE = "hunyuan-video (dit-llm-encode-video, crop 95, hidden_states[-3])"
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


def modelspec(args, training_started: float) -> dict[str, str]:
    title = args.metadata_title or args.output_name or f"LoRA@{datetime.datetime.fromtimestamp(training_started).strftime('%Y%m%d%H%M%S')}"
    reso = args.metadata_reso or "1280,720"
    reso = reso if "," in str(reso) else f"{reso},{reso}"
    w, h = (int(v) for v in str(reso).split(","))
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{args.metadata_arch or 'hunyuan-video'}/lora",
        "modelspec.implementation": "https://github.com/Tencent/HunyuanVideo",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.fromtimestamp(training_started).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{w}x{h}",
    }
    for key, value in (("author", args.metadata_author), ("description", args.metadata_description), ("license", args.metadata_license),
                       ("tags", args.metadata_tags)):
        if value:
            spec[f"modelspec.{key}"] = value
    if args.min_timestep is not None or args.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{args.min_timestep or 0},{1000 if args.max_timestep is None else args.max_timestep}"
    return spec


def training_metadata(args, *, config: DiTConfig, network_info: dict[str, tuple[int, float]], datasets: list[dict], num_items: int,
                      batches_per_epoch: int, max_train_steps: int, num_epochs: int, optimizer_name: str, training_started: float,
                      session_id: int) -> dict[str, str]:
    """Everything except the per-save keys (`ss_steps`, `ss_epoch`, `ss_training_finished_at`) and the hashes."""
    base = {
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim or 4,
        "ss_network_alpha": args.network_alpha,
    }
    if args.network_args:
        base["ss_network_args"] = json.dumps(dict(a.split("=", 1) for a in args.network_args))
    resolutions, frames = data_shapes(datasets)
    ours = LoRAFileInfo(version=__version__, base_model=base_model_kind(config, args.dit), in_channels=config.in_channels,
                        text_template=TEXT_TEMPLATE, modules=network_info, resolutions=resolutions, frames=frames).to_metadata()
    if args.no_metadata:
        return {k: str(v) for k, v in {**base, **ours}.items()}
    full = {
        **base,
        "ss_session_id": session_id,
        "ss_training_started_at": training_started,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_num_train_items": num_items,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_checkpointing_cpu_offload": args.gradient_checkpointing_cpu_offload,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_seed": args.seed,
        "ss_training_comment": args.training_comment,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_fp8_base": bool(args.fp8_base),
        "ss_full_fp16": False,
        "ss_full_bf16": False,
        "ss_weighting_scheme": args.weighting_scheme,
        "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std,
        "ss_mode_scale": args.mode_scale,
        "ss_guidance_scale": args.guidance_scale,
        "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale,
        "ss_discrete_flow_shift": args.discrete_flow_shift,
        "ss_datasets": json.dumps(datasets),
        "ss_sd_model_name": os.path.basename(args.dit or ""),
        **({"ss_vae_name": os.path.basename(args.vae)} if args.vae else {}),
        **ours,
    }
    return {k: str(v) for k, v in full.items()}


def finish_metadata(metadata: dict[str, str], state_dict: dict[str, torch.Tensor], *, steps: int, epoch: int, spec: dict[str, str],
                    naming: str = "kohya", companion: str | None = None) -> dict[str, str]:
    """Add the per-save keys, the file's naming, the model spec and sd-scripts' hashes (over the tensors and ss_* keys only)."""
    meta = with_naming(metadata, naming, companion)
    meta.update({"ss_training_finished_at": str(time.time()), "ss_steps": str(steps), "ss_epoch": str(epoch)})
    model_hash, legacy_hash = sd_scripts_hashes(state_dict, {k: v for k, v in meta.items() if k.startswith("ss_")})
    meta.update(spec)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    return meta


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
