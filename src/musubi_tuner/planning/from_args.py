"""The planner driven by the commands' own flags: `python -m musubi_tuner.plan` and `--dry_run`.

`dry_run(args, mode, ...)` takes the argparse namespace of hv_train_network or hv_generate_video as
parsed, reads the flags that change memory (same names, same defaults), prints the plan and returns
it, without loading any model: the DiT's config comes from the file's header.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Callable

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.config import HUNYUAN_T2V, SKYREELS_I2V, DiTConfig
from musubi_tuner.hunyuan.sequence_parallel import check_heads
from musubi_tuner.inference.sampler import steps_that_run
from musubi_tuner.planning.options import MemoryOptions, Workload
from musubi_tuner.planning.planner import Plan, fit_budget, plan
from musubi_tuner.planning.report import format_plan, format_search
from musubi_tuner.planning.timing import GPU, default_gpu_for_budget, gpu

logger = logging.getLogger(__name__)

NAMED_MODELS = {"t2v-720p": HUNYUAN_T2V, "skyreels-t2v": HUNYUAN_T2V, "skyreels-i2v": SKYREELS_I2V}


def config_from_args(args) -> DiTConfig:
    """--dit FILE (its header only) or --model NAME."""
    path = getattr(args, "dit", None)
    if path:
        from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

        return read_dit_config(open_dit_file(path))
    name = getattr(args, "model", None) or "t2v-720p"
    try:
        return NAMED_MODELS[name]
    except KeyError:
        raise UserError(f"--model {name}: one of {', '.join(NAMED_MODELS)} (or give --dit FILE)") from None


def model_configs(args) -> dict:
    """Workload's configs of the VAE and text encoders given (--vae, --text_encoder1, --text_encoder2), read from their
    headers and config files as the commands read them; the reference models are planned for those not given (a tiny
    LLM was planned as llava-llama-3-8b: fuzz_af 15)."""
    from musubi_tuner.hunyuan import text_encoders as te
    from musubi_tuner.hunyuan.vae import open_vae_file

    def vae_config(path):
        vae_file, config = open_vae_file(path)
        vae_file.close()
        return config

    def text_config(path, which: int) -> str:  # the loader's config, after its checks: one it refuses was a traceback or
        return (te.check_text_encoder1 if which == 1 else te.check_text_encoder2)(path).to_json_string()  # a hang (fuzz_au 4)

    found = {}
    for flag, key, read in (("vae", "vae", vae_config), ("text_encoder1", "llm_config", lambda p: text_config(p, 1)),
                            ("text_encoder2", "clip_config", lambda p: text_config(p, 2))):
        if getattr(args, flag, None):
            try:  # (a dry run plans without the encoders and the VAE at hand: one that cannot be read is said, not fatal)
                found[key] = read(getattr(args, flag))
            except UserError as e:
                logger.warning("--%s: %s; the reference model is planned in its place", flag, e)
    return found


def options_from_args(args, mode: str) -> MemoryOptions:
    """MemoryOptions from a train or generate namespace; flags a command does not have take their defaults."""

    def get(name, default=None):
        value = getattr(args, name, None)
        return default if value is None else value

    train, generate = mode == "train", mode == "generate"
    guidance = float(get("guidance_scale", 1.0)) if generate else 1.0  # training's --guidance_scale is the DiT's embedded one
    fp8 = bool(get("fp8_base", False) if train else get("fp8", False))
    blocks_to_swap = int(get("blocks_to_swap", 0))
    step_cache = get("step_cache") if generate else None  # the trainer's applies to its samples only
    # LoRAs given to generation act beside fp8 weights; merged into bf16 ones they cost nothing
    lora_at_generation = generate and fp8 and (bool(get("lora_weight", None)) or bool(get("with_lora", False)))
    # what a mode does not read, or what another flag leaves without effect, takes its default: these options are
    # the plan, so a flag that leaves them unchanged changes nothing (plan.py warns of it)
    return MemoryOptions(
        fp8=fp8,
        blocks_to_swap=blocks_to_swap,
        use_pinned_memory_for_block_swap=bool(get("use_pinned_memory_for_block_swap", False)) and blocks_to_swap > 0,
        gradient_checkpointing=bool(get("gradient_checkpointing", False)) and train,
        gradient_checkpointing_cpu_offload=bool(get("gradient_checkpointing_cpu_offload", False)) and train,
        split_attn=bool(get("split_attn", False)),
        attn_mode=_attention_mode(args, mode),
        img_in_txt_in_offloading=bool(get("img_in_txt_in_offloading", False)),
        # (the trainer's --network_dim unset is rank 4, as the network is built: it was planned at 32)
        network_dim=_planned_rank(args, train, lora_at_generation),
        optimizer_type=_modelled_optimizer(get("optimizer_type", "") or "adamw") if train else "adamw",
        mixed_precision=get("mixed_precision", "bf16") if train else "bf16",
        dit_dtype=_short_dtype(get("dit_dtype", "bf16"), "--dit_dtype"),
        guidance_scale=guidance,
        split_uncond=guidance != 1.0 and (bool(get("split_uncond", False)) or bool(get("split_attn", False))),
        lora_at_generation=lora_at_generation,
        # (V2V's steps that run: it planned the whole --infer_steps, and skips the cache cannot make: fuzz_ap 4)
        infer_steps=steps_that_run(int(get("infer_steps", 50)), get("video_path", None), get("strength", None)) if generate else 50,
        step_cache=step_cache,
        step_cache_threshold=get("step_cache_threshold") if step_cache else None,
        step_cache_warmup=int(get("step_cache_warmup", 1)) if step_cache else 1,
        fp8_llm=bool(get("fp8_llm", False)),
        # (cache_latents' tiling: plan.py's --no_vae_tiling; the trainer's own --vae_tiling decodes its samples, and read
        # as the caching's it planned an untiled encode, 39.7 GB where plan said 15.5: fuzz_af 1)
        vae_tiling=bool(get("cache_vae_tiling", True)) or generate or get("vae_spatial_tile_sample_min_size") is not None,
        vae_spatial_tile_sample_min_size=int(get("vae_spatial_tile_sample_min_size", 256)),
        vae_chunk_size=get("vae_chunk_size", None) if generate else None,
        vae_dtype=_short_dtype(get("vae_dtype", "float16"), "--vae_dtype") if generate else "fp16",
        context_parallel=int(get("context_parallel", 1)),
        cfg_parallel=generate and guidance != 1.0 and (bool(get("cfg_parallel", False))
                                                       or _launched_processes() == 2 * int(get("context_parallel", 1))),
    )


def _planned_rank(args, train: bool, lora_at_generation: bool) -> int:
    """The LoRA rank planned: --network_dim (the trainer's unset is 4, as the network is built), or the files' where they
    decide it: --dim_from_weights' file, and generation's --lora_weight files beside fp8 weights, each adding its own
    factors (fuzz_af 4: a rank-64 file was planned at rank 4, two files at 32). A file's largest rank is planned for
    all its modules."""
    files = ([args.network_weights] if train and getattr(args, "dim_from_weights", False) and getattr(args, "network_weights", None)
             else list(getattr(args, "lora_weight", None) or []) if lora_at_generation else [])
    if files:
        from musubi_tuner.networks.lora_files import companion_copies
        from musubi_tuner.networks.lora_reader import read_lora_contents

        copies = companion_copies(files)  # (a LoRA and its .comfyui copy are applied once)
        ranks = [max((p.down.shape[0] for p in read_lora_contents(f).patches if p.down is not None), default=0)
                 for f in dict.fromkeys(map(Path, files)) if f not in copies]
        if sum(ranks):
            return sum(ranks)
    if train or lora_at_generation:
        return int(getattr(args, "network_dim", None) or (4 if train else 32))
    return 32


def _modelled_optimizer(name: str) -> str:
    """--optimizer_type as the planner models it: a module path by its class (bitsandbytes.optim.AdamW8bit is adamw8bit);
    one it does not model is planned with AdamW's state, and said (the dry run refused SGD, which the run trains with,
    and lost the rest of its checks: fuzz_af 11)."""
    from musubi_tuner.planning.options import OPTIMIZERS

    short = name.rsplit(".", 1)[-1].lower()
    if short in OPTIMIZERS:
        return short
    logger.warning("--optimizer_type %s is not one the planner models (%s): its state is planned as AdamW's, two float32 "
                   "values per LoRA parameter", name, ", ".join(OPTIMIZERS))
    return "adamw"


def _short_dtype(name, flag: str) -> str:
    """--dit_dtype / --vae_dtype as the planner names it: float32, fp32 and torch.float32 alike (float32 was a KeyError)."""
    import torch

    from musubi_tuner.dtypes import str_to_dtype

    dtype = str_to_dtype(name, torch.bfloat16, flag)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise UserError(f"{flag} {name}: the planner plans bf16, fp16 or fp32")
    return names[dtype]


def _attention_mode(args, mode: str) -> str:
    """hv_generate_video's --attn_mode; hv_train_network's --sdpa / --flash_attn / --xformers / --flash3 flags."""
    from musubi_tuner.hunyuan.attention import ALIASES

    if mode == "generate" or getattr(args, "attn_mode", None):
        name = getattr(args, "attn_mode", None) or "sdpa"
        return ALIASES.get(name, name)  # timed as the kernel it runs ('torch' was priced 1.55x slower than sdpa)
    for flag, name in (("flash_attn", "flash"), ("xformers", "xformers"), ("flash3", "flash3")):
        if getattr(args, flag, False) and not getattr(args, "sdpa", False):
            return name
    return "sdpa"


def _launched_processes() -> int:
    """WORLD_SIZE of a launcher (accelerate launch / torchrun): a --dry_run under one plans what that run would do."""
    from musubi_tuner.errors import launched

    return launched()[1]


GIB = 1.073741824  # GB per GiB


def parse_budget(text: str) -> float:
    """'24G', '24GB', '24GiB', '24' -> gigabytes (1e9 bytes) of a card sold as that many "GB": GPU makers count
    GiB (a "24 GB" RTX 4090 holds 24 GiB, 25.8e9 bytes), so every form reads as GiB. Anything else, 0 included,
    is a UserError naming the flag."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(g|gb|gib)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) == 0:
        raise UserError(f"--vram_budget {text!r}: give the card's memory, e.g. 12G, 16G, 24G or 80G (read as GiB)")
    return float(m.group(1)) * GIB


def check_budget_flag(args) -> None:
    """hv_train_network's and hv_generate_video's --vram_budget, before any model loads: its value is checked either
    way, and without --dry_run (which plans; a run does not fit itself to it) a warning says it is ignored."""
    text = getattr(args, "vram_budget", None)
    if text is None:
        return
    parse_budget(text)
    if not getattr(args, "dry_run", False):
        logger.warning("--vram_budget %s acts only with --dry_run (it plans the options that fit; it does not limit a run): "
                       "ignored", text)


def device_from_args(args, budget_gb: float | None) -> GPU:
    """--gpu, or the card a budget suggests (said in its name); --tflops / --pcie_gbps override its figures."""
    name = getattr(args, "gpu", None)
    device = gpu(name or (default_gpu_for_budget(budget_gb / GIB) if budget_gb else "rtx4090"))
    changes = {}
    if not name:
        why = f"for a {budget_gb / GIB:g} GiB budget" if budget_gb else "the default"
        changes["name"] = f"{device.name} (assumed, {why}: give --gpu)"
    if getattr(args, "tflops", None):
        changes["bf16_tflops"] = float(args.tflops)
        changes["name"] = (f"{device.name} at {args.tflops:g} TFLOP/s" if name else
                           f"a GPU of {args.tflops:g} TFLOP/s (memory and PCIe figures of an {device.name}: give --gpu)")
        if not name:  # no card's published times calibrate it: the default share, not the assumed card's (fuzz_af 8)
            changes["key"] = ""
    if getattr(args, "pcie_gbps", None):
        changes["pcie_pinned_gbps"] = float(args.pcie_gbps)
        changes["pcie_pageable_gbps"] = float(args.pcie_gbps) / 2
    if getattr(args, "link_gbps", None):
        changes["link_gbps"] = float(args.link_gbps)
    if changes:
        import dataclasses

        device = dataclasses.replace(device, **changes)
    return device


def dry_run(args, mode: str, *, video_size: tuple[int, int] | None = None, frames: int | None = None, batch: int | None = None,
            text_tokens: int = 256, out: Callable[[str], object] | None = None) -> Plan:
    """Print what the command would need and return the plan; loads no model.

    Training: pass the largest bucket of the dataset (video_size, frames, batch); generation reads
    --video_size, --video_length from args. --vram_budget, when the namespace has it, adds the search.
    """
    if mode not in ("train", "generate"):
        raise ValueError("mode is train or generate")
    if out is None:  # the plan is the result: one that cannot be written is the command's error (it ended 0: fuzz_ah 8)
        from musubi_tuner.errors import print_report as out
    size = video_size or tuple(getattr(args, "video_size", None) or (256, 256))
    length = frames or getattr(args, "video_length", None) or (129 if mode == "generate" else 1)
    work = Workload(config_from_args(args), int(size[0]), int(size[1]), int(length), batch or int(getattr(args, "batch_size", 1) or 1),
                    text_tokens=text_tokens, mode=mode, video_input=mode == "generate" and bool(getattr(args, "video_path", None)),
                    **model_configs(args))
    opts = options_from_args(args, mode)
    check_heads(work.config.heads_num, opts.context_parallel)  # the commands check it too; plan.py has only this
    budget_text = getattr(args, "vram_budget", None)
    budget = parse_budget(budget_text) if budget_text is not None else None
    device = device_from_args(args, budget)
    utilisation = getattr(args, "utilisation", None)  # None: calibrated for the GPU and the attention kernel
    if budget:
        search = fit_budget(work, opts, budget, device, utilisation)
        out(format_search(search, budget_text))
        return search.best.plan if search.best else plan(work, opts, device, utilisation)
    result = plan(work, opts, device, utilisation)
    out(format_plan(result))
    return result



def exit_if_nothing_fits(args, result: Plan) -> None:
    """Exit status 1 when --vram_budget was given and the plan does not fit it: plan.py's, and both commands' --dry_run
    (they ended 0 after "nothing fits", so a script went on to the run: fuzz_af 2)."""
    budget = getattr(args, "vram_budget", None)
    if budget is not None and not result.fits(parse_budget(budget) * 1e9):
        sys.exit(1)


__all__ = ["check_budget_flag", "config_from_args", "dry_run", "exit_if_nothing_fits", "options_from_args", "parse_budget", "NAMED_MODELS"]
