"""The flags of hv_train_network.py: musubi-tuner's names, types and defaults, grouped by what they act on.

Where musubi-tuner has a quirk users may depend on, the default keeps it and a named flag fixes it
(see docs/training.md and docs/coming_from_musubi_tuner.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from musubi_tuner.cli import Parser, accepted_only, add_ddp_timeout, compute_dtype, count, network_dim, path, pixels, real, seed, text
from musubi_tuner.errors import UserError, did_you_mean
from musubi_tuner.hunyuan.compile import add_compile_flags
from musubi_tuner.hunyuan.offload import MAX_BLOCKS_TO_SWAP_TRAINING
from musubi_tuner.inference.step_cache import add_step_cache_flags
from musubi_tuner.training.optimizers import SCHEDULERS, scheduler_name
from musubi_tuner.training.timesteps import NUM_TRAIN_TIMESTEPS, SAMPLING_MODES, WEIGHTING_SCHEMES

logger = logging.getLogger(__name__)


def _int_or_float(value: str) -> float | int:
    """`100` steps (an int), `0.1` of all steps, or `10%` (a float: a fraction of all steps, `100%` all of them), as
    musubi-tuner and kohya's scripts read them."""
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: not a number of steps, a fraction or a percentage") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    if value.endswith("%") or number < 1:
        if number > 1:
            raise argparse.ArgumentTypeError(f"{value}: a share of the steps is at most 100%")
        return number
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{value}: a whole number of steps, or a fraction below 1 (0.5) or a percentage (50%)")
    return int(number)


def metadata_resolution(value: str) -> str:
    """--metadata_reso: "W,H", "WxH" (as the LoRA's modelspec.resolution shows it) or one number for both, as "W,H". It
    was read when the first LoRA was saved: "64x64" was a ValueError traceback once the DiT had loaded, "-5" stored."""
    parts = [v.strip() for v in value.lower().replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    try:
        w, h = (int(v) for v in parts) if len(parts) == 2 else (0, 0)
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{value}: write the width and height as W,H (or WxH, or one number for both), such as 1280,720")
    return f"{w},{h}"


metadata_resolution.__name__ = "resolution"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="hv_train_network.py", description="Train a LoRA for HunyuanVideo / SkyReels V1 from cached latents and text.")
    p.add_argument("--config_file", type=path, help="TOML file with any of these options (the command line wins)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the planned GPU/host memory and time per step for the dataset's largest bucket, load nothing, exit")
    p.add_argument("--vram_budget", default=None, help="with --dry_run: also find the fastest option set that fits, e.g. 24G")

    g = p.add_argument_group("model")
    g.add_argument("--dit", type=path, help="DiT checkpoint: mp_rank_00_model_states.pt, an fp8/bf16 safetensors, a SkyReels file")
    g.add_argument("--dit_dtype", type=compute_dtype, default=None, help="compute dtype of the DiT (default bfloat16)")
    g.add_argument("--dit_in_channels", type=count(1), default=None,
                   help="16 for T2V, 32 for SkyReels I2V (read from the file when omitted)")
    g.add_argument("--vae", type=path, help="VAE checkpoint (only for sampling during training)")
    g.add_argument("--vae_dtype", type=compute_dtype, default=None, help="VAE dtype for sampling (default float16)")
    g.add_argument("--vae_tiling", action="store_true", help="decode samples in spatial tiles")
    g.add_argument("--vae_chunk_size", type=count(1), default=None, help="decode samples' causal convolutions in chunks")
    g.add_argument("--vae_spatial_tile_sample_min_size", type=pixels, default=None, help="tile size in pixels for sample decoding")
    g.add_argument("--text_encoder1", type=path, help="LLM text encoder (only for sampling during training)")
    g.add_argument("--text_encoder2", type=path, help="CLIP-L text encoder (only for sampling during training)")
    g.add_argument("--text_encoder_dtype", type=compute_dtype, default=None, help="text encoders' dtype for sample prompts (default float16)")
    g.add_argument("--fp8_llm", action="store_true", help="LLM Linear weights in fp8 while encoding sample prompts")
    g.add_argument("--fp8_base", action="store_true", help="store the DiT's block Linears in fp8 e4m3fn")
    accepted_only(g, "--disable_numpy_memmap", "musubi-tuner only logs it for HunyuanVideo too", action="store_true")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_config", type=path, help="dataset TOML (the one the caching commands used)")
    g.add_argument("--max_data_loader_n_workers", type=count(0), default=8,
                   help="processes reading caches (at most the CPU count; 0 reads in the training process)")
    g.add_argument("--persistent_data_loader_workers", action="store_true", help="keep the reading processes between epochs")

    g = p.add_argument_group("attention")
    for flag, help_ in (("--sdpa", "PyTorch scaled_dot_product_attention"), ("--flash_attn", "FlashAttention 2"),
                        ("--sage_attn", "SageAttention (inference only)"), ("--xformers", "xformers"), ("--flash3", "FlashAttention 3")):
        g.add_argument(flag, action="store_true", help=help_)
    g.add_argument("--split_attn", action="store_true", help="attention one sample at a time over its valid tokens")

    g = p.add_argument_group("memory")
    g.add_argument("--blocks_to_swap", type=count(0, MAX_BLOCKS_TO_SWAP_TRAINING), default=None,
                   help=f"keep N blocks' weights in host memory, moving each in when it runs (max {MAX_BLOCKS_TO_SWAP_TRAINING})")
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host buffers for faster block swap")
    accepted_only(g, "--block_swap_h2d_only", "block swap here always copies host to device only", action="store_true")
    accepted_only(g, "--block_swap_ring_size", "the size of musubi-tuner's H2D-only ring; block swap here needs no setting",
                  type=count(1), default=2)
    g.add_argument("--img_in_txt_in_offloading", action="store_true",
                   help="keep the image and text input embedders in host memory between steps")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute each block's activations in the backward pass")
    g.add_argument("--gradient_checkpointing_cpu_offload", action="store_true",
                   help="with --gradient_checkpointing: keep block inputs in host memory")

    g = p.add_argument_group("precision and schedule")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="autocast dtype (default: accelerate's config, else no)")
    g.add_argument("--save_precision", choices=("float", "fp32", "fp16", "bf16"), default=None,
                   help="dtype of the saved LoRA (default fp32)")
    g.add_argument("--max_train_steps", type=count(1), default=1600, help="optimizer steps to train")
    g.add_argument("--max_train_epochs", type=count(1), default=None, help="epochs to train (overrides --max_train_steps)")
    g.add_argument("--gradient_accumulation_steps", type=count(1), default=1, help="batches per optimizer step")
    g.add_argument("--max_grad_norm", type=real(0), default=1.0, help="clip the gradient norm to this; 0 disables clipping")
    g.add_argument("--seed", type=seed(32), default=None,
                   help="seed of noise, timesteps, shuffling and initial weights (default: random, recorded in the LoRA)")
    g.add_argument("--full_fp16", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--full_bf16", action="store_true", help=argparse.SUPPRESS)

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer_type", default="",
                   help="AdamW (default), AdamW8bit, Adafactor, Prodigy, AdamWScheduleFree, a torch.optim class, or module.Class")
    g.add_argument("--optimizer_args", nargs="*", default=None, help="optimizer keyword arguments: key=value ...")
    g.add_argument("--learning_rate", type=real(above=0), default=2.0e-6, help="base learning rate (LoRA training: about 2e-4)")
    g.add_argument("--lr_scheduler", type=scheduler_name, default="constant", help=", ".join(SCHEDULERS))
    g.add_argument("--lr_warmup_steps", type=_int_or_float, default=0, help="warmup steps, or a fraction of all steps (0.1 or 10%%)")
    g.add_argument("--lr_decay_steps", type=_int_or_float, default=0,
                   help="decay steps of warmup_stable_decay, or a fraction of all steps")
    g.add_argument("--lr_scheduler_num_cycles", type=count(1), default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_scheduler_power", type=real(above=0), default=1.0, help="power of the polynomial schedule")
    g.add_argument("--lr_scheduler_timescale", type=count(1), default=None, help="timescale of inverse_sqrt")
    g.add_argument("--lr_scheduler_min_lr_ratio", type=real(0, 1), default=None,
                   help="lowest learning rate as a fraction of the base (cosine_with_min_lr, warmup_stable_decay, rex)")
    g.add_argument("--lr_scheduler_type", default="", help="any scheduler class (torch.optim.lr_scheduler.X or module.Class)")
    g.add_argument("--lr_scheduler_args", nargs="*", default=None, help="scheduler keyword arguments: key=value ...")

    g = p.add_argument_group("flow matching")
    g.add_argument("--timestep_sampling", choices=SAMPLING_MODES, default="sigma", help="how training noise levels are drawn")
    g.add_argument("--discrete_flow_shift", type=real(above=0), default=1.0,
                   help="shift of the 'shift' sampling (the project's docs suggest 7.0)")
    g.add_argument("--sigmoid_scale", type=real(above=0), default=1.0, help="scale of the normal draw before the sigmoid")
    g.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="none", help="timestep density or loss weighting")
    g.add_argument("--logit_mean", type=real(), default=0.0, help="mean of logit_normal (and logsnr)")
    g.add_argument("--logit_std", type=real(above=0), default=1.0, help="standard deviation of logit_normal (and logsnr)")
    g.add_argument("--mode_scale", type=real(), default=1.29, help="scale of the 'mode' density")
    g.add_argument("--min_timestep", type=count(0, 999), default=None, help="lowest timestep on the 0-1000 scale (default 0)")
    g.add_argument("--max_timestep", type=count(1, 1000), default=None, help="highest timestep on the 0-1000 scale (default 1000)")
    g.add_argument("--preserve_distribution_shape", action="store_true",
                   help="keep [min, max] by rejection sampling instead of rescaling")
    g.add_argument("--num_timestep_buckets", default=None,
                   type=count(2, NUM_TRAIN_TIMESTEPS, what=" (a bucket narrower than one of the 1000 training timesteps stratifies nothing)"),
                   help="stratify each epoch's timesteps into N equal intervals of the noise levels (at most 1000)")
    g.add_argument("--show_timesteps", choices=("image", "console"), default=None, help="show the timestep distribution and exit")
    g.add_argument("--guidance_scale", type=real(0), default=1.0, help="embedded guidance fed to the DiT while training")
    g.add_argument("--guidance_scale_x1000", action="store_true",
                   help="feed guidance_scale x 1000 as inference does (musubi-tuner feeds the raw value)")
    g.add_argument("--sigma_uses_shift", action="store_true",
                   help="apply --discrete_flow_shift in the default 'sigma' sampling too (musubi-tuner ignores it there)")

    g = p.add_argument_group("network")
    g.add_argument("--network_module", default=None, help="the network to train: networks.lora, networks.loha or networks.lokr")
    g.add_argument("--network_dim", type=network_dim(), default=None, help="LoRA rank (default 4)")
    g.add_argument("--network_alpha", type=real(0), default=1,
                   help="LoRA alpha: updates are scaled by alpha / rank; 0 means alpha = rank (as musubi-tuner)")
    g.add_argument("--network_dropout", type=real(0, 0.99), default=None, help="dropout on the rank activations")
    g.add_argument("--network_args", nargs="*", default=None,
                   help="key=value ...: include_patterns, exclude_patterns, rank_dropout, module_dropout, loraplus_lr_ratio, "
                        "verbose; LoKr: factor")
    g.add_argument("--network_weights", type=path, default=None, help="LoRA file to start from")
    g.add_argument("--dim_from_weights", action="store_true", help="take the rank from --network_weights")
    g.add_argument("--scale_weight_norms", type=real(above=0), default=None, help="max-norm regularisation of each LoRA update")
    g.add_argument("--base_weights", type=path, nargs="+", default=None, help="LoRA files merged into the DiT before training")
    g.add_argument("--base_weights_multiplier", type=real(), nargs="*", default=None,
                   help="one multiplier per --base_weights file, in order (a file without one: 1.0)")
    g.add_argument("--allow_partial_lora", action="store_true",
                   help="apply the parts of --network_weights / --base_weights files that can be, and list what is dropped, "
                        "instead of refusing a file with entries this toolkit cannot apply")
    g.add_argument("--training_comment", type=text, default=None, help="stored in the LoRA's metadata (ss_training_comment)")
    g.add_argument("--no_metadata", action="store_true", help="save only the minimal metadata")

    g = p.add_argument_group("saving")
    g.add_argument("--output_dir", type=path, default=None, help="folder of the LoRA files, states, loss curve and samples (one run at a time)")
    g.add_argument("--output_name", type=text, default=None, help="file name stem of the LoRA files")
    g.add_argument("--save_every_n_epochs", type=count(1), default=None, help="save NAME-EEEEEE.safetensors every N epochs")
    g.add_argument("--save_every_n_steps", type=count(1), default=None, help="save NAME-stepSSSSSSSS.safetensors every N steps")
    g.add_argument("--save_last_n_epochs", type=count(1), default=None, help="keep only the last N epoch saves")
    g.add_argument("--save_last_n_epochs_state", type=count(1), default=None, help="keep only the last N epoch states")
    g.add_argument("--save_last_n_steps", type=count(1), default=None, help="keep only the step saves of the last N steps")
    g.add_argument("--save_last_n_steps_state", type=count(1), default=None, help="keep only the step states of the last N steps")
    g.add_argument("--save_state", action="store_true", help="save the training state with every LoRA save (for --resume)")
    g.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    g.add_argument("--resume", type=path, default=None, help="a state folder, or 'auto' for the newest complete one in --output_dir")
    g.add_argument("--lora_format", choices=("musubi", "comfyui", "both"), default="both",
                   help="both (default): NAME.safetensors in musubi-tuner's kohya naming plus NAME.comfyui.safetensors, which "
                        "ComfyUI and diffusers load completely; musubi or comfyui: only that one, as NAME.safetensors")
    for key, help_ in (("title", "model title (default: --output_name)"), ("author", "author"), ("description", "description"),
                       ("license", "license"), ("tags", "comma-separated tags"), ("reso", "resolution 'W,H' (default 1280,720)"),
                       ("arch", "architecture string override")):
        g.add_argument(f"--metadata_{key}", type=metadata_resolution if key == "reso" else text, default=None,
                       help=f"modelspec metadata: {help_}")

    g = p.add_argument_group("sampling during training")
    g.add_argument("--sample_prompts", type=path, default=None, help="prompt file (.txt, .toml or .json) for sample videos")
    g.add_argument("--sample_every_n_steps", type=count(1), default=None, help="sample every N steps")
    g.add_argument("--sample_every_n_epochs", type=count(1), default=None, help="sample every N epochs")
    g.add_argument("--sample_at_first", action="store_true", help="sample before the first step")
    add_step_cache_flags(g)

    g = p.add_argument_group("validation (held-out data from the dataset config: validation_split or [[validation_datasets]])")
    g.add_argument("--validate_every_n_steps", type=count(1), default=None,
                   help="validation loss every N steps (it is also computed before the first step and at every save)")
    g.add_argument("--validate_every_n_epochs", type=count(1), default=None, help="validation loss at the end of every N-th epoch")
    g.add_argument("--validation_seed", type=seed(64), default=0, help="seed of the validation noise (the same for every run by default)")
    g.add_argument("--validation_timesteps", type=count(1, 1000, " (the schedule has 1,000 noise levels: more measure nothing new)"), default=10,
                   help="noise levels the validation loss is measured at: the midpoints of N equal intervals of [0, 1]")

    g = p.add_argument_group("logging")
    g.add_argument("--logging_dir", type=path, default=None, help="TensorBoard logs go to a timestamped folder here")
    g.add_argument("--log_with", choices=("tensorboard", "wandb", "all"), default=None, help="tracker (default tensorboard)")
    g.add_argument("--log_prefix", type=text, default=None, help="prefix of the timestamped log folder")
    g.add_argument("--log_tracker_name", type=text, default=None, help="tracker project name (default network_train)")
    g.add_argument("--wandb_run_name", type=text, default=None, help="wandb run name")
    g.add_argument("--log_tracker_config", type=path, default=None, help="TOML file of tracker init arguments")
    g.add_argument("--wandb_api_key", default=None, help="with --log_with wandb or all: log in to wandb with this key first")
    g.add_argument("--log_config", action="store_true", help="log the options (without paths and keys) as the tracker config")

    g = p.add_argument_group("Hugging Face Hub (HF_ENDPOINT chooses another server speaking its API)")
    g.add_argument("--huggingface_repo_id", default=None, help="upload every saved LoRA to this repository (created if missing)")
    g.add_argument("--huggingface_repo_type", default=None, help="model (default), dataset or space")
    g.add_argument("--huggingface_path_in_repo", default=None, help="folder in the repository for the uploads (default: its root)")
    g.add_argument("--huggingface_token", default=None, help="access token (default: HF_TOKEN or the login of `hf auth login`)")
    g.add_argument("--huggingface_repo_visibility", default=None, help="public, or private (the default) for a repository it creates")
    g.add_argument("--save_state_to_huggingface", action="store_true", help="upload the training states too")
    g.add_argument("--resume_from_huggingface", action="store_true",
                   help="--resume names a state in a repository: REPO_ID/PATH[:REVISION[:REPO_TYPE]]")
    g.add_argument("--async_upload", action="store_true", help="upload in the background while training goes on (the last one waits)")

    g = p.add_argument_group("speed")
    add_compile_flags(g)
    g.add_argument("--cuda_allow_tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    g.add_argument("--cuda_cudnn_benchmark", action="store_true", help="cuDNN benchmark mode")
    dynamo = "accelerate's dynamo plugin compiles the models given to accelerator.prepare, and the frozen DiT is not one: use --compile"
    from accelerate.utils import DynamoBackend

    accepted_only(g, "--dynamo_backend", dynamo, default="NO", choices=[b.value for b in DynamoBackend])
    accepted_only(g, "--dynamo_mode", dynamo, default=None)
    accepted_only(g, "--dynamo_fullgraph", dynamo, action="store_true")
    accepted_only(g, "--dynamo_dynamic", dynamo, action="store_true")

    g = p.add_argument_group("distributed")
    add_ddp_timeout(g, "in a step")
    g.add_argument("--context_parallel", type=count(1), default=1,
                   help="split each sample's tokens over groups of N processes (Ulysses; N divides the 24 heads); "
                        "processes / N groups train in data parallel")
    ddp = "the network is not wrapped in DistributedDataParallel here; the loop averages its gradients itself"
    accepted_only(g, "--ddp_gradient_as_bucket_view", ddp, action="store_true")
    accepted_only(g, "--ddp_static_graph", ddp, action="store_true")
    return p


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    from musubi_tuner.tomlio import load_toml

    file = Path(path)  # sd-scripts' convention: a name without a suffix means NAME.toml, unless NAME itself is there
    if not file.suffix and not file.exists() and not file.is_symlink():
        file = Path(f"{path}.toml")
    raw = load_toml(file, "config file", "--config_file")
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
            raise UserError(f"{file}: unknown option {key!r}{did_you_mean(key, actions)}")
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
    kind = {"int": "an integer", "count": "an integer", "float": "a number", "number": "a number",
            "_int_or_float": "a number"}.get(getattr(action.type, "__name__", ""), f"a valid value for --{key}")
    if isinstance(value, (bool, dict, list)) or (action.type is None and not isinstance(value, (str, int, float))):
        raise UserError(f"{at} is not {kind if action.type else 'a string'}")
    try:
        converted = str(value) if action.type is None else action.type(value if isinstance(value, str) else str(value))
    except argparse.ArgumentTypeError as e:  # the flag's domain: "0: must be at least 1"
        raise UserError(f"{at}: {str(e).split(': ', 1)[-1]}") from None
    except (TypeError, ValueError):
        raise UserError(f"{at} is not {kind}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{at} is not one of {', '.join(map(str, action.choices))}")
    return converted


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    from_file = _read_config_file(pre.config_file, parser) if pre.config_file else {}
    parser.set_defaults(**from_file)
    args = parser.parse_args(argv)
    given = {a.dest for a in parser._actions if getattr(a, "given", False)} | from_file.keys()
    if args.max_train_epochs and "max_train_steps" in given:  # (its default, 1600, may be given too)
        logging.getLogger(__name__).warning("--max_train_epochs %d sets the run's length; --max_train_steps %d is ignored",
                                            args.max_train_epochs, args.max_train_steps)
    return args


def output_stem(output_dir: str, output_name: str) -> Path:
    """Where the LoRA files go, without their suffix: the two flags joined as musubi-tuner joins them (a name may hold
    folders, or be absolute). The loop, pruning, --resume auto and the studio's workspace check all read it."""
    if Path(output_name).name in ("", ".", "..") or output_name.endswith(("/", os.sep)):
        raise UserError(f"--output_name {output_name}: a file name stem, not a folder")
    if ".." in Path(output_name).parts:  # (the run's lock and checks are on --output_dir: the files would land elsewhere)
        raise UserError(f"--output_name {output_name}: leads out of --output_dir with '..'; give the folder as --output_dir")
    return Path(output_dir) / output_name


def log_folder(args: argparse.Namespace) -> str | None:
    """The run's TensorBoard folder: --logging_dir / (--log_prefix + the start time), or None without --logging_dir."""
    if not args.logging_dir:
        return None
    prefix = args.log_prefix or ""
    if os.path.isabs(prefix) or ".." in Path(prefix).parts:  # (a sub-folder, "run1/", is musubi-tuner's as well)
        raise UserError(f"--log_prefix {prefix}: leads out of --logging_dir; give the folder as --logging_dir")
    return os.path.join(args.logging_dir, prefix + time.strftime("%Y%m%d%H%M%S"))


ATTENTION_FLAGS = ("sdpa", "flash_attn", "sage_attn", "xformers", "flash3")  # musubi-tuner's order: the first given wins


def check_attention_flags(args: argparse.Namespace) -> None:
    """Said once, before the work: of several attention flags the first in musubi-tuner's order is used, the others were
    dropped without a word (fuzz_ai 6)."""
    given = [f"--{flag}" for flag in ATTENTION_FLAGS if getattr(args, flag)]
    if len(given) > 1:
        logger.warning("%s: one attention is used, %s (the first of %s); %s ignored", " ".join(given), given[0],
                       ", ".join(f"--{f}" for f in ATTENTION_FLAGS), ", ".join(given[1:]))


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
