"""hv_generate_video's work, stage by stage: check inputs, encode text, encode the V2V/I2V source, sample, decode, save.

Each model is loaded for its stage and freed before the next, so peak memory is that of the largest
stage, not the sum: text encoders, then the DiT, then the VAE.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from pathlib import Path

import torch

from musubi_tuner.cli import USUAL_SAMPLING, check_video_size, far_from_usual, resolve_device
from musubi_tuner.dtypes import str_to_dtype
from musubi_tuner.errors import SharedError, UserError, print_report
from musubi_tuner.files import files_within, require_file, require_present
from musubi_tuner.hunyuan.compile import CompileOptions, check_can_compile, check_compile_flags, compile_blocks, compile_errors, log_graph_breaks
from musubi_tuner.hunyuan.vae import VAEConfig
from musubi_tuner.inference.presets import PRESETS, detect_preset
from musubi_tuner.inference import step_cache
from musubi_tuner.inference.sampler import (V2V_STRENGTH, Guidance, denoise, initial_noise, same_noise_as, sigma_schedule,
                                            steps_that_run, v2v_start)
from musubi_tuner.progress import progress_bar

logger = logging.getLogger(__name__)

def _free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- checks


# what decoding saved latents reads, of generation's flags (--prompt and the text encoders: musubi-tuner requires them with
# --latent_path, so its command lines all have them)
READ_BY_LATENT_DECODING = {"dit", "vae", "vae_dtype", "text_encoder1", "text_encoder2", "prompt", "fps", "device",
                           "vae_chunk_size", "vae_spatial_tile_sample_min_size", "context_parallel"}


def unused_with_latent_path(args) -> list[str]:
    """The generation flags given (not at their defaults) that decoding saved latents does not read: the size, steps,
    guidance, LoRAs, memory options of a generation (only four of them were named: fuzz_ai 3)."""
    from musubi_tuner.hv_generate_video import build_parser

    parser = build_parser()
    groups = [g for g in parser._action_groups if g.title in ("models", "what to generate", "LoRA", "memory and speed")]
    return [a.option_strings[0] for g in groups for a in g._group_actions
            if a.dest not in READ_BY_LATENT_DECODING and a.option_strings and getattr(args, a.dest, a.default) != a.default]


def check_and_fill(args) -> None:
    """Validate everything that needs no model, and fill preset defaults into flags left unset."""
    for flag, what in (("dit", "DiT checkpoint"), ("vae", "VAE checkpoint")):
        require_present(getattr(args, flag), what, f"--{flag}")
    if args.latent_path:
        if args.output_type not in ("video", "images"):
            raise UserError("--latent_path decodes saved latents: use --output_type video or images")
        for p in args.latent_path:
            require_file(p, "latent file", "--latent_path")
        if args.save_merged_model:  # (it was never written, exit 0, without a word: fuzz_ai 3)
            raise UserError("--save_merged_model and --latent_path are two jobs (merge LoRAs into the DiT; decode saved "
                            "latents): run them as two commands")
        unused = unused_with_latent_path(args)
        if unused:
            logger.warning("%s: not used with --latent_path, which only decodes the saved latents (at their own size and "
                           "settings)", ", ".join(unused))
        return
    if args.prompt is None:
        raise UserError("--prompt is required")
    if not args.prompt.strip():  # ("" too: given, and empty, as an unset shell variable gives it)
        raise UserError("--prompt is blank: give the text of the video")
    for flag in ("text_encoder1", "text_encoder2"):
        if not getattr(args, flag):
            raise UserError(f"--{flag} is required")
        require_present(getattr(args, flag), "text encoder", f"--{flag}")
    if args.image_path:
        require_file(args.image_path, "image", "--image_path")
    if args.video_path:  # (a file, or a folder of frames)
        require_present(args.video_path, "video", "--video_path")
        if args.strength is None:
            args.strength = V2V_STRENGTH
    elif args.strength is not None:  # (its default is None, so a 0.8 the user gave is told from none given)
        logger.warning("--strength %g: used only with --video_path (V2V), and none is given: ignored", args.strength)
    if args.fp8_fast and not args.fp8:
        raise UserError("--fp8_fast needs --fp8")
    if args.lycoris:  # musubi-tuner needs the LyCORIS package for LoHa/LoKr; here the LoRA reader applies them itself
        logger.info("--lycoris: LoHa and LoKr files are read and applied natively (the LyCORIS package is not needed)")
    if args.save_merged_model and not args.lora_weight:
        raise UserError("--save_merged_model needs --lora_weight")
    if args.save_merged_model:
        from musubi_tuner.networks.merge import check_merged_model_output

        model_files = {f"--{flag}": files_within(getattr(args, flag)) for flag in ("vae", "text_encoder1", "text_encoder2")}
        check_merged_model_output(args.save_merged_model, args.dit, args.lora_weight, model_files)
    given = [f"--{flag}" for flag in ("lora_multiplier", "lora_blocks", "exclude_single_blocks") if getattr(args, flag)]
    if not args.lora_weight and given:
        logger.warning("%s act%s on the files of --lora_weight, and none is given: ignored", " and ".join(given),
                       "" if len(given) > 1 else "s")
    if args.lora_weight:
        from musubi_tuner.networks.merge import lora_jobs

        for p in args.lora_weight:
            require_file(p, "LoRA file", "--lora_weight")
        # counts and patterns checked, and what is odd said, before any model loads
        lora_jobs(args.lora_weight, args.lora_multiplier, args.lora_blocks, args.exclude_single_blocks, say=True)

    from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

    dit_file = open_dit_file(args.dit)
    config = read_dit_config(dit_file)
    args.model_in_channels = config.in_channels
    preset_name = args.preset or detect_preset(config.in_channels, args.dit, dit_file.metadata)
    if args.preset is None and preset_name != "hunyuan-t2v":
        logger.info("the DiT looks like %s: using its defaults for flags you did not give (--preset to choose)", preset_name)
    elif args.preset == "skyreels-i2v" and config.in_channels != 32:  # (run as T2V, recorded as I2V, unsaid: fuzz_ap 9)
        logger.warning("--preset skyreels-i2v is SkyReels' image-to-video preset, and %s is a text-to-video DiT (%d input "
                       "channels): its defaults apply to a text-to-video run", args.dit, config.in_channels)
    preset = PRESETS[preset_name]
    args.preset = preset_name
    for flag in ("guidance_scale", "embedded_cfg_scale", "infer_steps", "flow_shift", "video_length"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(preset, flag))
    if args.video_size is None:
        args.video_size = list(preset.video_size)
    if args.negative_prompt is None and args.guidance_scale != 1.0:
        args.negative_prompt = preset.negative_prompt or ""
    for flag, given in (("--split_uncond", args.split_uncond), (f"--cfg_end {args.cfg_end:g}", args.cfg_end != 1.0)):
        if given and args.guidance_scale == 1.0:  # (--cfg_end was dropped without a word: fuzz_ap 8)
            logger.warning("%s acts with real CFG (--guidance_scale other than 1.0), which this run has not: ignored", flag)
    if args.use_pinned_memory_for_block_swap and not args.blocks_to_swap:
        logger.warning("--use_pinned_memory_for_block_swap acts with --blocks_to_swap, and none is given: ignored")
    decoding = [f"--{flag}" for flag in ("vae_chunk_size", "vae_spatial_tile_sample_min_size") if getattr(args, flag) is not None]
    if decoding and args.output_type == "latent":
        logger.warning("%s: the VAE does not run with --output_type latent: ignored", ", ".join(decoding))
    runs = steps_that_run(args.infer_steps, args.video_path, args.strength)
    if args.video_path and not runs and args.strength > 0:  # (strength 0 asks for the input back; said by the dry run
        least = math.ceil(1e6 / args.infer_steps) / 1e6  # too, and at least a value that runs one: fuzz_ay 5)
        logger.warning("--strength %g of %d steps runs int(%g) = 0 of them: the input video comes back unchanged; "
                       "raise --strength to at least %g or --infer_steps", args.strength, args.infer_steps,
                       args.strength * args.infer_steps, least)
    if args.guidance_scale != 1.0 and args.cfg_end < 1.0 and round(runs * args.cfg_end) == 0:  # (fuzz_aj 10)
        logger.warning("--cfg_end %g of %d steps guides none of them: real CFG is off (the run is --guidance_scale 1.0's); "
                       "raise --cfg_end or --infer_steps", args.cfg_end, runs)
    # (already there in another spelling, " fps-24," or "FPS-24 a cat", it was added a second time: fuzz_aj 12)
    if preset.prompt_prefix and not args.prompt.lstrip().lower().startswith(preset.prompt_prefix.strip(" ,").lower()):
        args.prompt = preset.prompt_prefix + args.prompt

    if (args.video_length - 1) % 4:
        lower = (args.video_length - 1) // 4 * 4 + 1
        raise UserError(f"--video_length {args.video_length} is not 4N+1 (try {lower} or {lower + 4})")
    check_video_size(args.video_size)
    far = far_settings(args)
    if far:  # said before the work: a far value that does not overflow makes a video of noise without a word
        logger.warning(f"{far} of a NaN or noisy video")
    if args.image_path and config.in_channels != 32:
        raise UserError(f"--image_path needs a SkyReels I2V DiT (32 input channels); {args.dit} has {config.in_channels}")
    if config.in_channels == 32 and not args.image_path and not args.save_merged_model:
        raise UserError(f"{args.dit} is an image-to-video DiT (32 input channels): give the first frame with --image_path")
    if args.dit_in_channels is not None and args.dit_in_channels != config.in_channels:
        raise UserError(f"{args.dit}: --dit_in_channels {args.dit_in_channels} but the file's DiT takes {config.in_channels} input channels")
    from musubi_tuner.hunyuan.sequence_parallel import check_heads

    check_heads(config.heads_num, args.context_parallel)
    from musubi_tuner.planning.from_args import check_budget_flag

    check_budget_flag(args)
    check_speed_flags(args)
    check_files_used_late(args, dit_file.shapes())


def check_speed_flags(args) -> None:
    """--step_cache and --compile values, and whether this platform can compile, before any model loads."""
    step_cache.check_args(args)
    options = check_compile_flags(args)
    if options is not None and not args.dry_run:
        check_can_compile(options, resolve_device(args.device))


def check_files_used_late(args, dit_shapes: dict[str, tuple[int, ...]]) -> None:
    """Files read only after the text encoders (and for the VAE, the sampling) have run: a wrong one fails now.

    A --dry_run plans from the DiT's header: it checks the LoRA files against it too (small files, and what the plan
    is of), and that the output folder takes files, creating nothing; the encoders and the VAE may not be at hand."""
    from musubi_tuner.files import require_writable_folder
    from musubi_tuner.networks.merge import check_loras_fit

    if args.lora_weight and not (args.save_merged_model and not args.dry_run):  # (the merge checks them before it reads a
        check_loras_fit(args.lora_weight, dit_shapes, args.dit, getattr(args, "allow_partial_lora", False))  # weight: said twice)
    require_writable_folder(args.save_merged_model and Path(args.save_merged_model).parent or args.save_path,
                            "--save_merged_model" if args.save_merged_model else "--save_path", create=not args.dry_run)
    if args.dry_run:
        return
    from musubi_tuner.data.media import load_image
    from musubi_tuner.hunyuan.text_encoders import check_text_encoder1, check_text_encoder2
    from musubi_tuner.hunyuan.vae import check_vae_weights

    check_text_encoder1(args.text_encoder1)
    check_text_encoder2(args.text_encoder2)
    check_vae_weights(args.vae)
    if args.image_path:
        load_image(args.image_path)
    if args.video_path:  # its frames counted now, up to --video_length (a short video was refused once both text
        # encoders had run: fuzz_ag 2)
        from musubi_tuner.data.media import iter_video_frames

        try:
            found = sum(1 for _ in iter_video_frames(args.video_path, max_frames=args.video_length))
        except UserError as e:  # (named by the flag, as --image_path's errors are: fuzz_ag 8c)
            raise UserError(f"{e} (--video_path)" if "(--video_path)" not in str(e) else str(e)) from None
        _require_frames(args, found)


def _require_frames(args, found: int) -> None:
    if found < args.video_length:
        raise UserError(f"{args.video_path}: has {found} frame{'' if found == 1 else 's'}, fewer than --video_length "
                        f"{args.video_length}")


def require_finite(tensor: torch.Tensor, what: str, advice: str) -> None:
    """Refuse to go on with NaN/inf values, naming where they came from: a video of noise must not be written silently."""
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise UserError(f"{what} holds {bad} non-finite (NaN/inf) values of {tensor.numel()}; {advice}")


# ----------------------------------------------------------------------------------------------- stages


def encode_prompts(args, device) -> tuple[dict, dict | None]:
    """Positive (and with real CFG the negative) prompt through both text encoders, one encoder in memory at a time."""
    from musubi_tuner.hunyuan.text_encoders import load_text_encoder1, load_text_encoder2

    prompts = [args.prompt]
    use_cfg = args.guidance_scale != 1.0
    if use_cfg:
        prompts.append(args.negative_prompt or "")
    elif args.negative_prompt:
        logger.warning("--negative_prompt is ignored without real CFG (--guidance_scale 1.0)")
    te1 = load_text_encoder1(args.text_encoder1, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device, fp8=args.fp8_llm)
    with torch.no_grad():
        states, mask = te1.encode(prompts)
    _free(te1)
    te2 = load_text_encoder2(args.text_encoder2, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device)
    with torch.no_grad():
        pooled, _ = te2.encode(prompts)
    _free(te2)
    advice = "its file is damaged (a float16 overflow is the other cause); nothing was generated"
    for tensor, what in ((states[mask.bool()], f"the prompt's encoding by {args.text_encoder1} (--text_encoder1)"),
                         (pooled, f"the prompt's encoding by {args.text_encoder2} (--text_encoder2)")):
        require_finite(tensor, what, advice)
        # the encoders run in float16 on a GPU, where caching runs them too: an encoding past its range (finite in this
        # float32 run) is a damaged file's, which the DiT turned into NaN, blamed on the DiT or a LoRA (fuzz_ar 14)
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > torch.finfo(torch.float16).max:
            raise UserError(f"{what} reaches {largest:.3g}, past float16's range, in which a text encoder runs on a GPU: "
                            f"its file is damaged; nothing was generated")

    def pick(i):
        return {"text_states": states[i : i + 1], "text_mask": mask[i : i + 1], "text_states_2": pooled[i : i + 1]}

    return pick(0), (pick(1) if use_cfg else None)


def load_vae_for(args, device, layout=None):
    """The VAE as generation decodes: tiled; with several processes (`layout`) each decodes its share of the tiles."""
    from musubi_tuner.hunyuan.vae import load_vae

    vae = load_vae(args.vae, dtype=str_to_dtype(args.vae_dtype, torch.float16 if device.type == "cuda" else torch.float32, "--vae_dtype"), device=device)
    # musubi-tuner always tiles at inference (256 px tiles unless told otherwise); the result is the same within tolerance
    vae.set_memory_options(tiling=True, spatial_tile_sample_min_size=args.vae_spatial_tile_sample_min_size, chunk_size=args.vae_chunk_size)
    if layout is not None:
        from musubi_tuner.distributed import WorkShare

        vae.tile_share = WorkShare()
    return vae


def encode_condition(args, device, height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(V2V latents, I2V image latents), scaled, (1, 16, F, H/8, W/8) and (1, 16, 1, H/8, W/8); None where unused."""
    if not (args.video_path or args.image_path):
        return None, None
    from musubi_tuner.data.buckets import resize_to_bucket
    from musubi_tuner.data.media import load_image, load_video
    from musubi_tuner.hunyuan.vae import SCALING_FACTOR

    vae = load_vae_for(args, device)
    video_latents = image_latents = None
    with torch.no_grad():
        if args.video_path:
            frames = load_video(args.video_path, max_frames=args.video_length, resize=lambda f, _: resize_to_bucket(f, (width, height))).frames
            _require_frames(args, len(frames))
            pixels = torch.from_numpy(frames[: args.video_length])
            video_latents = _encode(vae, pixels, generator) * SCALING_FACTOR
        if args.image_path:
            image = torch.from_numpy(resize_to_bucket(load_image(args.image_path), (width, height)))
            image_latents = _encode(vae, image[None], generator) * SCALING_FACTOR
    _free(vae)
    return video_latents, image_latents


def _encode(vae, frames_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> unscaled latent sample (1, 16, f, h, w) float32."""
    x = frames_uint8.permute(3, 0, 1, 2)[None].to(vae.device, vae.dtype) / 127.5 - 1.0
    return vae.encode(x).sample(generator).float()


def load_generation_dit(args, device):
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.networks.merge import merge_loras_into

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    on_the_fly = args.fp8 and args.lora_weight
    load_device = "cpu" if args.blocks_to_swap else device
    dit = load_dit(args.dit, device=load_device, dtype=dtype, fp8=args.fp8, attn_mode=args.attn_mode, split_attn=args.split_attn)
    if args.lora_weight:
        if on_the_fly:  # fp8 weights: a merge would be rounded away; run the LoRAs beside the weights instead
            apply_loras_on_the_fly(dit, args.lora_weight, args.lora_multiplier, args.exclude_single_blocks, args.lora_blocks,
                                   getattr(args, "allow_partial_lora", False))
        else:
            merge_loras_into(dit, args.lora_weight, args.lora_multiplier, device=device, exclude_single_blocks=args.exclude_single_blocks,
                             lora_blocks=args.lora_blocks, allow_partial=getattr(args, "allow_partial_lora", False))
    if args.fp8_fast:
        from musubi_tuner.hunyuan.fp8 import enable_fp8_fast

        enable_fp8_fast(dit)
    if args.img_in_txt_in_offloading:
        dit.offload_embedders = True
    if args.blocks_to_swap:
        from musubi_tuner.hunyuan.offload import BlockSwap

        BlockSwap(dit, args.blocks_to_swap, device, args.use_pinned_memory_for_block_swap)
    else:
        dit.to(device)
    options = CompileOptions.from_args(args)
    if options is not None:
        compile_blocks(dit, options)
    return dit


def apply_loras_on_the_fly(dit, paths, multipliers, exclude_single_blocks: bool, lora_blocks=None, allow_partial: bool = False) -> list:
    """Run each file's LoRA, LoHa and LoKr modules of Linear layers beside the weights (which fp8 would round a merge
    away on): y = W x + b + m * update(x), each module's update as in training. The file's other patches (bias and
    norm diffs, the img_in conv LoRA, set_weight) are merged into their parameters, none of which is fp8 (a diff or
    set of an fp8 weight is merged in float32 and requantized)."""
    import torch.nn as nn

    from musubi_tuner.hunyuan.fp8 import Fp8Linear
    from musubi_tuner.networks import loha, lokr, lora
    from musubi_tuner.networks.lora_reader import ADAPTERS, kohya_state_dict
    from musubi_tuner.networks.merge import lora_jobs, lora_patches, merge_patch, patch_target

    modules = {"lora": lora, "loha": loha, "lokr": lokr}
    networks = []
    for path, m, keep in lora_jobs(paths, multipliers, lora_blocks, exclude_single_blocks):
        patches = lora_patches(path, keep, allow_partial, multiplier=m)
        beside = [p for p in patches if p.kind in ADAPTERS and isinstance(patch_target(dit, p, str(path))[0], nn.Linear)]
        rounded = 0
        for patch in patches:
            if not any(patch is p for p in beside):
                target = patch_target(dit, patch, str(path))[0]
                rounded += isinstance(target, Fp8Linear) and patch.param.endswith(".weight")
                merge_patch(dit, patch, m, source=str(path))
        if rounded:  # (a 5 % diff reached the model as 54 % fp8 rounding, without a word: fuzz_aw 12)
            logger.warning("%s: its whole-weight differences (.diff, set_weight) of %d fp8 weights are merged and requantized "
                           "to fp8, which rounds most of a small difference away; generate without --fp8, or merge the file "
                           "into the DiT with merge_lora.py first", path, rounded)
        for kind in ADAPTERS:
            of_kind = [p for p in beside if p.kind == kind]
            if of_kind:
                net = modules[kind].create_arch_network_from_weights(m, kohya_state_dict(of_kind), dit, for_inference=True)
                net.to(dit.device).eval()
                net.apply_to(None, dit)
                networks.append(net)
    return networks


# ----------------------------------------------------------------------------------------------- the whole job


def plan_generation(args):
    """--dry_run: check the flags and files as a real run would, then print the memory/time plan; loads no model."""
    check_and_fill(args)
    from musubi_tuner.errors import launched
    from musubi_tuner.planning.from_args import dry_run

    rank, world = launched()  # under a launcher: the layout checked as the run would, the plan printed once
    if world > 1:  # (one process plans a run of several: a laptop planning a cluster's)
        check_generation_processes(args, world)
    return dry_run(args, "generate", video_size=tuple(args.video_size), frames=args.video_length,
                   out=print_report if rank == 0 else lambda text: None)


def generate(args) -> list[Path]:
    device = resolve_device(args.device)
    check_and_fill(args)
    from musubi_tuner import distributed

    device = distributed.join_launched_group(device, args.ddp_timeout)
    try:
        if distributed.rank() != 0:  # one voice: the main process's
            logging.getLogger("musubi_tuner").setLevel(logging.ERROR)  # (its warnings too: every process meets them alike)
        layout = processes_layout(args)
        distributed.check_same_inputs({"--dit": args.dit, "--vae": args.vae, "--image_path": args.image_path,
                                       "--video_path": args.video_path,  # (V2V's and saved latents: each process read its
                                       **{f"--latent_path {path}": path for path in args.latent_path or []},  # own: fuzz_ae 1)
                                       **{f"--lora_weight {path}": path for path in args.lora_weight or []}})
        saved = _generate(args, device, layout)
        return saved if layout is None or layout.is_main else []
    finally:
        distributed.leave_group()


def processes_layout(args):
    """With several processes (accelerate launch / torchrun): their groups, checked against --context_parallel; else None."""
    from musubi_tuner import distributed

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 and args.context_parallel == 1:
        return None
    check_generation_processes(args, world)
    layout = distributed.make_layout(args.context_parallel)
    logger.info(distributed.describe(layout, training=False))
    return layout


def check_generation_processes(args, world: int) -> None:
    """The processes started fit --context_parallel (and the two CFG prompts side by side); a --dry_run checks it from
    WORLD_SIZE, without joining."""
    n = args.context_parallel
    cfg = args.guidance_scale != 1.0
    if world not in (n, 2 * n if cfg else n):
        started = f"{world} processes were started" if world > 1 else "one process was started"
        from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

        heads = read_dit_config(open_dit_file(args.dit)).heads_num  # (a count that does not divide them was offered, then
        fits = [m for m in (world, world // 2 if cfg and world % 2 == 0 else 0)  # refused: fuzz_al 7)
                if m > 1 and heads % m == 0]  # what these processes could run
        give = f"; or give --context_parallel {' or '.join(map(str, fits))} for {world} processes" if fits else ""
        start = ("run it as one process, without a launcher" if n == 1 else  # (accelerate refuses --multi_gpu with 1: fuzz_ae 7)
                 f"start {n} (accelerate launch --multi_gpu --num_processes {n}, or torchrun --nproc_per_node {n})")
        raise SharedError(f"--context_parallel {n}: {started}; {start}" + (f", or {2 * n} to run the negative and positive "
                                                                          "prompt side by side" if cfg else "") + give)


def _from_main(layout, device, compute) -> dict:
    """compute() -> dict of tensors (or None) on the main process only, then broadcast: the encoders run once."""
    if layout is None:
        return compute()
    from musubi_tuner.distributed import broadcast_tensors

    return broadcast_tensors(compute() if layout.is_main else None, device)


def _generate(args, device, layout) -> list[Path]:
    save_path = Path(args.save_path)
    main = layout is None or layout.is_main
    if main:
        save_path.mkdir(parents=True, exist_ok=True)
    from musubi_tuner.files import remove_leftover_temp_files
    from musubi_tuner.inference import outputs

    if main:  # of killed runs only (others may write here now), and of names generation gives: a user's folder
        remove_leftover_temp_files(save_path, outputs.OUTPUT_NAME.fullmatch, folders=True)
    if args.latent_path:
        latents = [outputs.load_latent(p) for p in args.latent_path]
        from musubi_tuner.hunyuan.vae import LATENT_FAR

        for path, (latent, meta) in zip(args.latent_path, latents):
            require_finite(latent, f"{path}: the saved latent", "it cannot be decoded into a video; generate it again")
            if latent.numel() and float(latent.abs().max()) > LATENT_FAR:  # (its NaN pixels were blamed on the VAE: fuzz_ab 9)
                guidance = f" (its metadata records --guidance_scale {meta['guidance_scale']})" if "guidance_scale" in meta else ""
                raise UserError(f"{path}: the saved latent reaches {float(latent.abs().max()):.3g}, where a VAE's latents stay "
                                f"within a few units: a diverged sampling's{guidance}; it cannot be decoded into a video")
            if meta.get("fps", str(args.fps)) != str(args.fps) and args.output_type != "images":
                logger.warning("%s: generated for --fps %s; its video is written at --fps %d (give --fps %s for its speed)",
                               path, meta["fps"], args.fps, meta["fps"])
        vae = load_vae_for(args, device, layout)
        return [p for lat, meta in latents for p in decode_and_save(vae, lat, meta, args, save_path, main)]
    if args.save_merged_model:  # save and exit: no text encoder or sampling is needed for that
        from musubi_tuner.networks.merge import merge_file

        if main:
            merge_file(args.dit, args.lora_weight, args.lora_multiplier, args.save_merged_model, device=device,
                       exclude_single_blocks=args.exclude_single_blocks, lora_blocks=args.lora_blocks,
                       allow_partial=getattr(args, "allow_partial_lora", False))
        return [Path(args.save_merged_model)]

    seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)
    if (same := same_noise_as(seed)) is not None:
        logger.warning("--seed %d: the noise generator takes its low 32 bits, as musubi-tuner's does: the same noise, and "
                       "video, as --seed %d", seed, same)
    if layout is not None:
        from musubi_tuner.distributed import broadcast_value

        seed = broadcast_value(seed)
    height, width = args.video_size
    shape = VAEConfig().latent_shape(args.video_length, height, width)
    generator = torch.Generator("cpu").manual_seed(seed)

    # V2V at a --strength that runs no step gives its input back through the VAE: neither the text encoders nor the DiT
    # have anything to do, and are not loaded (they were, for nothing: fuzz_ap 9)
    runs = steps_that_run(args.infer_steps, args.video_path, args.strength)

    def encode():
        cond, uncond = encode_prompts(args, device) if runs else ({}, None)
        video, image = encode_condition(args, device, height, width, generator)
        return {**{f"cond.{k}": v for k, v in cond.items()}, **{f"uncond.{k}": v for k, v in (uncond or {}).items()},
                "video": video, "image": image}

    encoded = _from_main(layout, device, encode)
    if runs:
        cond = {k.split(".", 1)[1]: v.to(device) for k, v in encoded.items() if k.startswith("cond.")}
        neg = {k.split(".", 1)[1]: v.to(device) for k, v in encoded.items() if k.startswith("uncond.")} or None
        dit = load_generation_dit(args, device)
        dit.sequence_parallel = layout.sequence if layout is not None else None
        latents, start, cache = _sample(args, dit, device, layout, shape, seed, cond, neg, encoded["video"], encoded["image"])
    else:
        logger.info("no denoising step runs: the input video is decoded as it was encoded (no DiT or text encoder loaded)")
        latents, start, cache = encoded["video"].to(device, torch.float32), args.infer_steps, None

    meta = outputs.generation_metadata(args, seed, steps_run=args.infer_steps - start) | step_cache.describe(cache)
    saved, stamp = [], outputs.free_stamp(save_path, seed)  # one name for the latent and its video
    if args.output_type in ("latent", "both") and main:
        saved.append(outputs.save_latent(latents[0].cpu(), meta, save_path, seed, args.no_metadata, stamp))
    if args.output_type in ("video", "images", "both"):
        try:
            vae = load_vae_for(args, device, layout)
            saved += decode_and_save(vae, latents[0].cpu(), meta, args, save_path, main, stamp)
        except UserError as e:  # the sampling is not lost: say where it is (a full disk at the mp4 left it unsaid: fuzz_ah 7)
            if not saved:
                raise
            raise UserError(f"{e}; the latent is saved as {saved[0]}: decode it later with --latent_path {saved[0]}") from None
    return saved


def _sample(args, dit, device, layout, shape, seed, cond, neg, video_latents, image_latents):
    """Denoise from the seed's noise (or the V2V start); returns (latents (1, 16, F, H, W) float32, first step, step cache)."""
    sigmas = sigma_schedule(args.infer_steps, args.flow_shift)
    noise = initial_noise((1, *shape), seed, device="cpu").to(device)
    start = 0
    latents = noise
    if video_latents is not None:
        start = v2v_start(sigmas, args.strength)  # (< --infer_steps: generate decodes the input itself when no step runs)
        s = sigmas[start].item()
        latents = noise * s + video_latents.to(device) * (1 - s)
    if image_latents is not None:
        padded = torch.zeros((1, *shape), device=device)
        padded[:, :, :1] = image_latents.to(device)
        image_latents = padded
    branches = None
    if layout is not None and layout.replicas == 2:  # the negative prompt on one group, the positive on the other
        from musubi_tuner.distributed import CfgBranches

        branches = CfgBranches.of(layout)
    guidance = Guidance(embedded_scale=args.embedded_cfg_scale, scale=args.guidance_scale,
                        split=args.split_uncond or (args.split_attn and args.guidance_scale != 1.0), cfg_end=args.cfg_end, branches=branches)

    bar = progress_bar(total=args.infer_steps - start, desc="denoising", disable=layout is not None and not layout.is_main)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    cache = step_cache.from_args(args)
    with torch.no_grad(), autocast, compile_errors():
        latents = denoise(dit, latents, sigmas, cond=cond, uncond=neg, guidance=guidance, image_latents=image_latents,
                          start_step=start, callback=lambda i: bar.update(1), step_cache=cache)
    bar.close()
    _free(dit)
    if cache is not None and branches is not None:  # (each replica ran one prompt: the summary and the metadata counted
        counts = torch.tensor([cache.evaluations, cache.skipped], dtype=torch.float64, device=device)  # one: fuzz_ap 1)
        partner = branches.exchange(counts)[0 if not branches.negative else 1]
        cache.count_also(int(partner[0]), int(partner[1]))
    if cache is not None:
        logger.info(cache.summary())
    if args.compile:
        log_graph_breaks(args.debug)
    loras = f" with {', '.join(args.lora_weight)}" if args.lora_weight else ""
    require_finite(latents, f"the sampled latent of {args.dit}{loras}",
                   f"nothing was written; {_else(far_settings(args))}a LoRA or DiT file holding NaN/inf weights, or fp16 overflow, "
                   "are the usual causes (check the files with musubi-lora-info)")
    from musubi_tuner.hunyuan.vae import LATENT_FAR

    largest = float(latents.abs().max()) if latents.numel() else 0.0
    if largest > LATENT_FAR:  # (decoded and written, exit 0, where --latent_path refuses the same latent: fuzz_ar 8)
        raise UserError(f"the sampled latent of {args.dit}{loras} reaches {largest:.3g}, where a VAE's latents stay within a "
                        f"few units: it cannot be decoded into a video, and nothing was written; {_else(far_settings(args))}a "
                        "damaged DiT or LoRA file (huge weights) does that (check the LoRAs with musubi-lora-info)")
    return latents, start, cache


def far_settings(args) -> str | None:
    """The sampling flags given far beyond their usual range, as the likely cause of a NaN/inf latent or video
    (cli.far_from_usual)."""
    return far_from_usual([("--guidance_scale", args.guidance_scale, USUAL_SAMPLING["cfg_scale"]),
                           ("--embedded_cfg_scale", args.embedded_cfg_scale, USUAL_SAMPLING["embedded_guidance"]),
                           ("--flow_shift", args.flow_shift, USUAL_SAMPLING["flow_shift"]),
                           *(("--lora_multiplier", m, (-100, 100)) for m in getattr(args, "lora_multiplier", None) or ())])


def _else(far: str | None) -> str:
    """A far setting leading the list of the usual causes ("" when none is)."""
    return f"{far}; else " if far else ""


def decode_and_save(vae, latent, meta, args, save_path: Path, main: bool, stamp: str | None = None) -> list[Path]:
    """Decode (every process its share of the tiles), then the main process writes."""
    from musubi_tuner.inference import outputs

    try:
        if not main:
            outputs.decode_to_frames(vae, latent)
            return []
        return outputs.decode_and_save(vae, latent, meta, args, save_path, stamp)
    except outputs.NonFinitePixels as e:
        raise outputs.NonFinitePixels(str(e).replace(": the VAE file", f": {_else(far_settings(args))}the VAE file", 1)) from None
