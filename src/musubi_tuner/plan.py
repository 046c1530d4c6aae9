"""Know before you run: GPU and host memory per stage, FLOPs and time per step, and what fits a budget.

    python -m musubi_tuner.plan --model t2v-720p --video_size 544 960 --video_length 129 \
        --gradient_checkpointing --fp8_base --network_dim 32
    python -m musubi_tuner.plan --mode generate --dit mp_rank_00_model_states.pt --video_size 720 1280 --vram_budget 24G
    python -m musubi_tuner.plan --mode generate --video_size 720 1280 --video_length 129 --gpu h100 --context_parallel 8

The flags are those of hv_train_network / hv_generate_video. No model is loaded: --dit reads the
file's header for the model's shapes. Exit status 1 when --vram_budget is given and nothing fits.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import logging

from musubi_tuner.cli import Parser, add_video_size, count, frames_4n1, network_dim, path, pixels, real
from musubi_tuner.errors import run_cli

logger = logging.getLogger("musubi_tuner.plan")
MEMORY_OPTIONS = "memory options (hv_train_network / hv_generate_video)"  # the flags options_from_args reads


def build_parser() -> argparse.ArgumentParser:
    from musubi_tuner.hunyuan.attention import ATTENTION_MODES
    from musubi_tuner.inference.step_cache import add_step_cache_flags
    from musubi_tuner.planning.from_args import NAMED_MODELS
    from musubi_tuner.planning.options import MAX_PLANNED_BATCH, OPTIMIZERS
    from musubi_tuner.planning.timing import GPUS

    p = Parser(prog="python -m musubi_tuner.plan", description=__doc__)
    g = p.add_argument_group("what to run")
    g.add_argument("--mode", choices=("train", "generate"), default="train", help="plan a training step or a generation")
    g.add_argument("--dit", type=path, default=None, help="DiT checkpoint: its shapes are read from the header (official .pt, safetensors)")
    g.add_argument("--model", choices=tuple(NAMED_MODELS), default=None, help="a named model instead of --dit (default t2v-720p)")
    add_video_size(g, "height then width (default 544 960; generation with a SkyReels DiT: its preset's)")
    g.add_argument("--video_length", type=frames_4n1, default=None, help="frames, 4N+1 (1 for images; default 129, or the preset's)")
    g.add_argument("--batch_size", type=count(1, MAX_PLANNED_BATCH), default=1, help="samples per step")
    g.add_argument("--text_tokens", type=count(1, 256), default=256, help="valid LLM tokens of the longest prompt (the DiT drops padding)")

    g = p.add_argument_group(MEMORY_OPTIONS)
    g.add_argument("--fp8_base", action="store_true", help="training: block Linears in fp8")
    g.add_argument("--fp8", action="store_true", help="generation: block Linears in fp8")
    g.add_argument("--blocks_to_swap", type=count(0, 38), default=0, help="blocks kept in host memory (training: max 36)")
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host buffers for --blocks_to_swap")
    g.add_argument("--gradient_checkpointing", action="store_true", help="training: recompute activations")
    g.add_argument("--gradient_checkpointing_cpu_offload", action="store_true", help="training: block inputs in host memory")
    g.add_argument("--split_attn", action="store_true", help="attention one sample at a time")
    g.add_argument("--attn_mode", choices=ATTENTION_MODES, default="sdpa",
                   help="attention kernel (its published speed enters the time: sageattn ~2.1x flash-attention 2)")
    g.add_argument("--img_in_txt_in_offloading", action="store_true", help="input embedders in host memory")
    g.add_argument("--network_dim", type=network_dim(), default=32, help="LoRA rank: training, or generation with --with_lora beside --fp8 weights")
    g.add_argument("--optimizer_type", default="adamw", type=str.lower, choices=OPTIMIZERS, help="training: optimizer (its state is memory)")
    g.add_argument("--mixed_precision", choices=("bf16", "fp16", "no"), default="bf16", help="training: activation precision")
    g.add_argument("--dit_dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="DiT weight dtype")
    g.add_argument("--guidance_scale", type=real(), default=None,
                   help="generation: real CFG scale: a batch of two (default 1.0, or the SkyReels preset's 6.0)")
    g.add_argument("--split_uncond", action="store_true", help="generation with --guidance_scale other than 1: negative prompt in a second call")
    g.add_argument("--with_lora", action="store_true", help="generation with LoRAs: beside --fp8 weights; merged into bf16 ones, at no cost")
    g.add_argument("--infer_steps", type=count(1, 1000), default=None, help="generation: sampling steps (default 50, or the preset's)")
    add_step_cache_flags(g)
    g.add_argument("--fp8_llm", action="store_true", help="LLM text encoder in fp8")
    g.add_argument("--no_vae_tiling", dest="cache_vae_tiling", action="store_false",
                   help="training: plan cache_latents without --vae_tiling, which the plan assumes; a tile size turns it "
                        "on, and generation always tiles")
    g.add_argument("--vae_spatial_tile_sample_min_size", type=pixels, default=None, help="VAE tile size in pixels")
    g.add_argument("--vae_chunk_size", type=count(1), default=None, help="generation: the VAE decode's causal convolution chunk")
    g.add_argument("--vae_dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="generation: the VAE decode's dtype")
    g.add_argument("--context_parallel", type=count(1), default=1, help="N processes share each sample's tokens: memory and time per GPU")
    g.add_argument("--cfg_parallel", action="store_true", help="generation with --guidance_scale other than 1 on 2N processes, one prompt each")

    g = p.add_argument_group("budget and speed")
    g.add_argument("--vram_budget", default=None, help="e.g. 12G, 16G, 24G, 80G: find the fastest option set that fits")
    g.add_argument("--gpu", type=str.lower, choices=tuple(GPUS), default=None, help="throughput figures for the time estimate "
                   "(default rtx4090, or h100 for budgets above 24G)")
    g.add_argument("--tflops", type=real(0.1, 1e5, what=" (a GPU's dense bf16 TFLOP/s)"), default=None,
                   help="override: dense bf16 TFLOP/s")
    g.add_argument("--utilisation", type=real(0.01, 1), default=None, help="share of peak FLOP/s reached "
                   "(default: calibrated per GPU and attention kernel from published times, docs/memory_planner.md)")
    g.add_argument("--pcie_gbps", type=real(0.1, 1e4, what=" (a host-to-device link's GB/s)"), default=None,
                   help="override: host-to-device GB/s from pinned memory")
    g.add_argument("--link_gbps", type=real(0.1, 1e4, what=" (a link's GB/s)"), default=None,
                   help="override: GPU-to-GPU GB/s in one direction (NVLink; PCIe ~25), for --context_parallel")
    return p


PLAN_DEFAULTS = {"video_size": [544, 960], "video_length": 129, "guidance_scale": 1.0, "infer_steps": 50}


def fill_defaults(args) -> None:
    """The flags not given: a generation with a SkyReels DiT (--model skyreels-*, or a --dit file hv_generate_video
    takes for one) gets its preset's size, length, steps and real CFG, as hv_generate_video gives them; the rest
    PLAN_DEFAULTS. (SkyReels was planned at 1 DiT call per step, 129 frames and 50 steps where the run makes 2, 97 and
    30: fuzz_aj 1.)"""
    preset = None
    if args.mode == "generate":
        from musubi_tuner.inference.presets import PRESETS, detect_preset

        if args.dit:
            from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

            dit_file = open_dit_file(args.dit)  # (once: its shapes and its metadata)
            try:
                name = detect_preset(read_dit_config(dit_file).in_channels, args.dit, dit_file.metadata)
            finally:
                dit_file.close()
        else:
            name = args.model if args.model in PRESETS else "hunyuan-t2v"
        if name != "hunyuan-t2v":
            preset = PRESETS[name]
    defaults = PLAN_DEFAULTS if preset is None else {"video_size": list(preset.video_size), "video_length": preset.video_length,
                                                     "guidance_scale": preset.guidance_scale, "infer_steps": preset.infer_steps}
    filled = [dest for dest in defaults if getattr(args, dest) is None]
    for dest in filled:
        setattr(args, dest, defaults[dest])
    if preset is not None and filled:
        shown = [f"--{dest} {' '.join(map(str, v)) if isinstance(v, list) else v}" for dest in filled for v in [defaults[dest]]]
        logger.info("a %s DiT: planned with its defaults for the flags not given, as hv_generate_video runs it (%s)",
                    preset.name, " ".join(shown))


def flags_that_change_nothing(parser: argparse.ArgumentParser, args) -> list[str]:
    """A warning for each memory option given that leaves the plan's options as they were without it: the options are
    what the plan reads (`options_from_args` gives a flag that its --mode does not read, or that another flag leaves
    without effect, its default), so every such flag is named; and one for --model beside --dit (the file's shapes win)."""
    from musubi_tuner.errors import UserError
    from musubi_tuner.planning.from_args import options_from_args

    def changes(action, mode) -> bool:
        unset = argparse.Namespace(**{**vars(args), action.dest: action.default})
        try:
            return options_from_args(unset, mode) != options_from_args(args, mode)
        except UserError:  # without it the set is refused (--gradient_checkpointing under its CPU offload): it acts
            return True

    mode, other = args.mode, {"train": "generate", "generate": "train"}[args.mode]
    what = {"train": "training", "generate": "generation"}
    group = next(g for g in parser._action_groups if g.title == MEMORY_OPTIONS)
    lines = []
    for action in group._group_actions:
        if getattr(args, action.dest) == action.default or changes(action, mode):
            continue
        flag = action.option_strings[0]
        if changes(action, other):
            lines.append(f"{flag} acts on {what[other]} (--mode {other}); this plan of {what[mode]} ignores it")
        else:
            lines.append(f"{flag} changes nothing in this plan of {what[mode]} with the other flags given ({action.help})")
    if args.dit and args.model:
        lines.append(f"--model {args.model} is ignored: the shapes come from --dit {args.dit}")
    return lines


def main(argv=None) -> None:
    def run(argv):
        from musubi_tuner.planning.from_args import dry_run, exit_if_nothing_fits

        parser = build_parser()
        args = parser.parse_args(argv)
        for line in flags_that_change_nothing(parser, args):  # (of the flags given: before the defaults are filled in)
            logger.warning(line)
        fill_defaults(args)
        result = dry_run(args, args.mode, video_size=tuple(args.video_size), frames=args.video_length, batch=args.batch_size,
                         text_tokens=args.text_tokens)
        exit_if_nothing_fits(args, result)

    run_cli(run, argv)


if __name__ == "__main__":
    main()
