"""What a trained LoRA file says about itself: musubi-tuner's `ss_*` keys, the SAI model spec, and our own keys
that tell any tool what base model, blocks, ranks and data the file is for (`networks.lora_metadata`, which reads back)."""

from __future__ import annotations

import datetime
import json
import os
import time

import torch

from musubi_tuner import __version__
from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.networks.lora_metadata import LoRAFileInfo, base_model_kind, data_shapes, sd_scripts_hashes, with_naming

BASE_MODEL_VERSION = "hunyuan_video"
TEXT_TEMPLATE = "hunyuan-video (dit-llm-encode-video, crop 95, hidden_states[-3])"


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
    if args.dim_from_weights and network_info:  # (the file's modules, not the flags it ignored: ss_network_dim 4 was
        # written for modules of rank 2 and 6, fuzz_ad F4): the largest rank, and the alpha most modules have
        alphas = [alpha for _, alpha in network_info.values()]
        base["ss_network_dim"] = max(rank for rank, _ in network_info.values())
        base["ss_network_alpha"] = max(set(alphas), key=alphas.count)
    network_args = dict(a.split("=", 1) for a in args.network_args or [])
    if args.dim_from_weights:  # (which modules it trains is the file's: the patterns were said to be ignored)
        network_args = {k: v for k, v in network_args.items() if k not in ("include_patterns", "exclude_patterns")}
    if network_args:
        base["ss_network_args"] = json.dumps(network_args)
    resolutions, frames = data_shapes(datasets)
    if args.no_metadata:  # (what the training data was is left out, as musubi-tuner leaves it out: fuzz_ad F10)
        resolutions, frames = [], []
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
