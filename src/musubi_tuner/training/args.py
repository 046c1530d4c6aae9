"""The flags of hv_train_network.py: musubi-tuner's names, types and defaults, grouped by what they act on.

Where musubi-tuner has a quirk users may depend on, the default keeps it and a named flag fixes it
(see docs/training.md and docs/coming_from_musubi_tuner.md).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from pathlib import Path
from typing import Sequence

from musubi_tuner.errors import UserError
from musubi_tuner.inference.step_cache import add_step_cache_flags
from musubi_tuner.training.timesteps import SAMPLING_MODES, WEIGHTING_SCHEMES

logger = logging.getLogger(__name__)

# Flags musubi-tuner has that act on services out of this toolkit's reach; accepted and ignored with a note.
IGNORED_FLAGS = ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                 "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface", "async_upload",
                 "wandb_api_key", "disable_numpy_memmap")


def _int_or_float(value: str) -> float | int:
    """`100` steps, `0.1` of all steps, or `10%`."""
    if value.endswith("%"):
        return float(value[:-1]) / 100
    number = float(value)
    return int(number) if number >= 1 and number.is_integer() else number


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hv_train_network.py", description="Train a LoRA for HunyuanVideo / SkyReels V1 from cached latents and text.")
    p.add_argument("--config_file", help="TOML file with any of these options (the command line wins)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--dry_run", action="store_true",
                   help="print the planned GPU/host memory and time per step for the dataset's largest bucket, load nothing, exit")
    p.add_argument("--vram_budget", default=None, help="with --dry_run: also find the fastest option set that fits, e.g. 24G")

    g = p.add_argument_group("model")
    g.add_argument("--dit", help="DiT checkpoint: mp_rank_00_model_states.pt, an fp8/bf16 safetensors, a SkyReels file")
    g.add_argument("--dit_dtype", default=None, help="compute dtype of the DiT (default bfloat16)")
    g.add_argument("--dit_in_channels", type=int, default=None, help="16 for T2V, 32 for SkyReels I2V (read from the file when omitted)")
    g.add_argument("--vae", help="VAE checkpoint (only for sampling during training)")
    g.add_argument("--vae_dtype", default=None)
    g.add_argument("--vae_tiling", action="store_true")
    g.add_argument("--vae_chunk_size", type=int, default=None)
    g.add_argument("--vae_spatial_tile_sample_min_size", type=int, default=None)
    g.add_argument("--text_encoder1", help="LLM text encoder (only for sampling during training)")
    g.add_argument("--text_encoder2", help="CLIP-L text encoder (only for sampling during training)")
    g.add_argument("--text_encoder_dtype", default=None)
    g.add_argument("--fp8_llm", action="store_true")
    g.add_argument("--fp8_base", action="store_true", help="store the DiT's block Linears in fp8 e4m3fn")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_config", type=Path, help="dataset TOML (the one the caching commands used)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8)
    g.add_argument("--persistent_data_loader_workers", action="store_true")

    g = p.add_argument_group("attention")
    for flag, help_ in (("--sdpa", "PyTorch scaled_dot_product_attention"), ("--flash_attn", "FlashAttention 2"),
                        ("--sage_attn", "SageAttention (inference only)"), ("--xformers", "xformers"), ("--flash3", "FlashAttention 3")):
        g.add_argument(flag, action="store_true", help=help_)
    g.add_argument("--split_attn", action="store_true", help="attention one sample at a time over its valid tokens")

    g = p.add_argument_group("memory")
    g.add_argument("--blocks_to_swap", type=int, default=None, help="keep N blocks' weights in host memory (max 36)")
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true")
    g.add_argument("--block_swap_h2d_only", action="store_true", help="accepted: our block swap is always host-to-device only")
    g.add_argument("--block_swap_ring_size", type=int, default=2)
    g.add_argument("--img_in_txt_in_offloading", action="store_true")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--gradient_checkpointing_cpu_offload", action="store_true")

    g = p.add_argument_group("precision and schedule")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    g.add_argument("--save_precision", choices=("float", "fp32", "fp16", "bf16"), default=None)
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--full_fp16", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--full_bf16", action="store_true", help=argparse.SUPPRESS)

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer_type", default="", help="AdamW (default), AdamW8bit, Adafactor, Prodigy, AdamWScheduleFree, or module.Class")
    g.add_argument("--optimizer_args", nargs="*", default=None, help="key=value ...")
    g.add_argument("--learning_rate", type=float, default=2.0e-6)
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", type=_int_or_float, default=0)
    g.add_argument("--lr_decay_steps", type=_int_or_float, default=0)
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)
    g.add_argument("--lr_scheduler_timescale", type=int, default=None)
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None)
    g.add_argument("--lr_scheduler_type", default="")
    g.add_argument("--lr_scheduler_args", nargs="*", default=None)

    g = p.add_argument_group("flow matching")
    g.add_argument("--timestep_sampling", choices=SAMPLING_MODES, default="sigma")
    g.add_argument("--discrete_flow_shift", type=float, default=1.0)
    g.add_argument("--sigmoid_scale", type=float, default=1.0)
    g.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="none")
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument("--min_timestep", type=int, default=None)
    g.add_argument("--max_timestep", type=int, default=None)
    g.add_argument("--preserve_distribution_shape", action="store_true")
    g.add_argument("--num_timestep_buckets", type=int, default=None)
    g.add_argument("--show_timesteps", choices=("image", "console"), default=None)
    g.add_argument("--guidance_scale", type=float, default=1.0, help="embedded guidance fed to the DiT while training")
    g.add_argument("--guidance_scale_x1000", action="store_true",
                   help="feed guidance_scale x 1000 as inference does (musubi-tuner feeds the raw value)")
    g.add_argument("--sigma_uses_shift", action="store_true",
                   help="apply --discrete_flow_shift in the default 'sigma' sampling too (musubi-tuner ignores it there)")

    g = p.add_argument_group("network")
    g.add_argument("--network_module", default=None, help="e.g. networks.lora")
    g.add_argument("--network_dim", type=int, default=None)
    g.add_argument("--network_alpha", type=float, default=1)
    g.add_argument("--network_dropout", type=float, default=None)
    g.add_argument("--network_args", nargs="*", default=None, help="key=value ...")
    g.add_argument("--network_weights", default=None)
    g.add_argument("--dim_from_weights", action="store_true")
    g.add_argument("--scale_weight_norms", type=float, default=None)
    g.add_argument("--base_weights", nargs="*", default=None)
    g.add_argument("--base_weights_multiplier", type=float, nargs="*", default=None)
    g.add_argument("--training_comment", default=None)
    g.add_argument("--no_metadata", action="store_true")

    g = p.add_argument_group("saving")
    g.add_argument("--output_dir", default=None)
    g.add_argument("--output_name", default=None)
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_epochs", type=int, default=None)
    g.add_argument("--save_last_n_epochs_state", type=int, default=None)
    g.add_argument("--save_last_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_steps_state", type=int, default=None)
    g.add_argument("--save_state", action="store_true")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument("--resume", default=None, help="a state folder, or 'auto' for the newest complete one in --output_dir")
    g.add_argument("--lora_format", choices=("musubi", "comfyui", "both"), default="both",
                   help="both (default): NAME.safetensors in musubi-tuner's kohya naming plus NAME.comfyui.safetensors, which "
                        "ComfyUI and diffusers load completely; musubi or comfyui: only that one, as NAME.safetensors")
    for key in ("title", "author", "description", "license", "tags", "reso", "arch"):
        g.add_argument(f"--metadata_{key}", default=None)

    g = p.add_argument_group("sampling during training")
    g.add_argument("--sample_prompts", default=None)
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true")
    add_step_cache_flags(g)

    g = p.add_argument_group("validation (held-out data from the dataset config: validation_split or [[validation_datasets]])")
    g.add_argument("--validate_every_n_steps", type=int, default=None,
                   help="validation loss every N steps (it is also computed before the first step and at every save)")
    g.add_argument("--validate_every_n_epochs", type=int, default=None, help="validation loss at the end of every N-th epoch")
    g.add_argument("--validation_seed", type=int, default=0, help="seed of the validation noise (the same for every run by default)")
    g.add_argument("--validation_timesteps", type=int, default=10,
                   help="noise levels the validation loss is measured at: the midpoints of N equal intervals of [0, 1]")

    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", default=None)
    g.add_argument("--log_with", choices=("tensorboard", "wandb", "all"), default=None)
    g.add_argument("--log_prefix", default=None)
    g.add_argument("--log_tracker_name", default=None)
    g.add_argument("--wandb_run_name", default=None)
    g.add_argument("--log_tracker_config", default=None)
    g.add_argument("--log_config", action="store_true")

    g = p.add_argument_group("speed")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--compile_backend", default="inductor")
    g.add_argument("--compile_mode", default="default", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    g.add_argument("--compile_dynamic", choices=("true", "false", "auto"), default=None)
    g.add_argument("--compile_fullgraph", action="store_true")
    g.add_argument("--compile_cache_size_limit", type=int, default=None)
    g.add_argument("--cuda_allow_tf32", action="store_true")
    g.add_argument("--cuda_cudnn_benchmark", action="store_true")
    g.add_argument("--dynamo_backend", default="NO")
    g.add_argument("--dynamo_mode", default=None)
    g.add_argument("--dynamo_fullgraph", action="store_true")
    g.add_argument("--dynamo_dynamic", action="store_true")

    g = p.add_argument_group("distributed")
    g.add_argument("--ddp_timeout", type=int, default=None)
    g.add_argument("--ddp_gradient_as_bucket_view", action="store_true")
    g.add_argument("--ddp_static_graph", action="store_true")

    for name in IGNORED_FLAGS:
        p.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)
    return p


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    from musubi_tuner.tomlio import load_toml

    file = Path(path if Path(path).suffix else f"{path}.toml")
    raw = load_toml(file)
    flat: dict = {}

    def walk(table):  # section names are only for the reader; all keys land in one namespace
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value)
            else:
                flat[key] = value

    walk(raw)
    actions = {a.dest: a for a in parser._actions}
    for key in flat:
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{file}: unknown option {key!r}{hint}")
    return {key: _config_value(file, key, value, actions[key]) for key, value in flat.items()}


def _config_value(file: Path, key: str, value, action: argparse.Action):
    """A --config_file value as the flag would have parsed it: argparse converts only string defaults, so
    `sdpa = "false"` would switch sdpa on and `max_train_steps = [1, 2]` would fail deep inside training."""
    import json

    at = f"{file}: {key} = {json.dumps(value, default=str)}"
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise UserError(f"{at} must be true or false (without quotes)")
        return value
    many = action.nargs not in (None, "?")
    if isinstance(value, list) and not many:
        raise UserError(f"{at}: {key} takes one value, not a list")
    converted = [_config_item(at, key, v, action) for v in (value if isinstance(value, list) else [value])]
    return converted if many else converted[0]


def _config_item(at: str, key: str, value, action: argparse.Action):
    kind = {int: "an integer", float: "a number", _int_or_float: "a number"}.get(action.type, f"a valid value for --{key}")
    if isinstance(value, (bool, dict, list)) or (action.type is None and not isinstance(value, (str, int, float))):
        raise UserError(f"{at} is not {kind if action.type else 'a string'}")
    try:
        converted = str(value) if action.type is None else action.type(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise UserError(f"{at} is not {kind}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{at} is not one of {', '.join(map(str, action.choices))}")
    return converted


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config_file:
        parser.set_defaults(**_read_config_file(pre.config_file, parser))
    args = parser.parse_args(argv)
    for name in IGNORED_FLAGS:
        if getattr(args, name) is not None:
            logger.warning("--%s is not supported here (no model hub / no tracker login) and is ignored", name)
    return args


def attention_mode(args: argparse.Namespace) -> str:
    """The one attention mode the flags choose (musubi-tuner checks them in this order)."""
    if args.sdpa:
        return "sdpa"
    if args.flash_attn:
        return "flash"
    if args.sage_attn:
        raise UserError("--sage_attn is for inference only (SageAttention has no backward); use --sdpa or --flash_attn for training")
    if args.xformers:
        return "xformers"
    if args.flash3:
        return "flash3"
    raise UserError("choose an attention implementation: --sdpa (no extra package), --flash_attn or --xformers")
