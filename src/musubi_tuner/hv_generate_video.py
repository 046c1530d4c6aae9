"""Generate videos with HunyuanVideo or SkyReels V1: T2V, V2V, SkyReels T2V (real CFG) and SkyReels I2V, with LoRAs.

    python src/musubi_tuner/hv_generate_video.py --video_size 544 960 --video_length 5 --infer_steps 30 \
        --prompt "A cat walks on the grass, realistic style." --save_path out --dit DIT --vae VAE \
        --text_encoder1 TE1 --text_encoder2 TE2 --seed 1234 [--lora_weight L --lora_multiplier 1.0]

On N GPUs: torchrun --nproc_per_node N src/musubi_tuner/hv_generate_video.py ... --context_parallel N
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse

from musubi_tuner.cli import Parser, add_ddp_timeout, add_video_size, compute_dtype, count, embedded_guidance, frames_4n1, path, pixels, real, seed, text
from musubi_tuner.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    # (imported here, under run_cli: these import torch, and a Ctrl-C or SIGTERM during that second is then the
    # command's one line, not a traceback of the import)
    from musubi_tuner.hunyuan.attention import ATTENTION_MODES
    from musubi_tuner.hunyuan.compile import add_compile_flags
    from musubi_tuner.hunyuan.offload import MAX_BLOCKS_TO_SWAP_INFERENCE
    from musubi_tuner.inference.sampler import V2V_STRENGTH
    from musubi_tuner.inference.step_cache import add_step_cache_flags

    p = Parser(prog="hv_generate_video.py", description=__doc__)
    g = p.add_argument_group("models")
    g.add_argument("--dit", type=path, required=True, help="DiT checkpoint (.pt or .safetensors)")
    g.add_argument("--dit_in_channels", type=count(1), default=None, help="checked against the file (32 = SkyReels I2V)")
    g.add_argument("--vae", type=path, required=True, help="VAE checkpoint (vae/pytorch_model.pt)")
    g.add_argument("--vae_dtype", type=compute_dtype, default=None, help="VAE dtype (default float16 on GPUs, float32 on the CPU)")
    g.add_argument("--text_encoder1", type=path, help="LLM: HF folder or ComfyUI llava_llama3_fp16.safetensors (not needed with --latent_path)")
    g.add_argument("--text_encoder2", type=path, help="CLIP-L: HF folder or ComfyUI clip_l.safetensors (not needed with --latent_path)")
    g.add_argument("--preset", choices=("hunyuan-t2v", "skyreels-t2v", "skyreels-i2v"), default=None,
                   help="defaults for a model family; chosen from the DiT file when omitted (explicit flags win)")

    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", type=text, help="the prompt (required unless --latent_path)")
    g.add_argument("--negative_prompt", type=text, default=None, help="with real CFG (--guidance_scale > 1): what to steer away from")
    add_video_size(g, "height then width (default 256 256)")
    g.add_argument("--video_length", type=frames_4n1, default=None, help="frames, 4N+1 (default 129)")
    g.add_argument("--fps", type=count(1, 240), default=24, help="frame rate of the written video")
    g.add_argument("--infer_steps", type=count(1, 1000), default=None, help="sampling steps (default 50)")
    g.add_argument("--seed", type=seed(64), default=None, help="seed of the initial noise (default: random, printed and saved)")
    g.add_argument("--guidance_scale", type=real(), default=None,
                   help="real CFG scale (SkyReels 6.0); 1.0 = off; below 1 steers toward the negative prompt, as in musubi-tuner")
    g.add_argument("--embedded_cfg_scale", type=embedded_guidance(), default=None, help="distilled guidance (HunyuanVideo 6.0, SkyReels 1.0)")
    g.add_argument("--cfg_end", type=real(0, 1), default=1.0, help="fraction of steps that use real CFG (0.5 halves SkyReels' cost)")
    g.add_argument("--flow_shift", type=real(above=0), default=None, help="default 7.0 (17.0 suits fewer than 20 steps)")
    g.add_argument("--split_uncond", action="store_true", help="negative and positive prompt in two passes (less memory)")
    g.add_argument("--video_path", type=path, default=None, help="V2V: a video file or a folder of frames")
    g.add_argument("--strength", type=real(0, 1), default=None,
                   help=f"V2V: how much of the schedule runs (0 = input unchanged; default {V2V_STRENGTH} with --video_path)")
    g.add_argument("--image_path", type=path, default=None, help="SkyReels I2V: the first frame")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora_weight", type=path, nargs="+", default=None, help="LoRA files applied to the DiT")
    g.add_argument("--lora_multiplier", type=real(), nargs="*", default=None, help="one per LoRA, in order (a file without one: 1.0, as in musubi-tuner)")
    g.add_argument("--exclude_single_blocks", action="store_true", help="apply only the double-block parts of the LoRAs")
    g.add_argument("--lora_blocks", nargs="*", default=None, metavar="BLOCKS",
                   help="blocks each LoRA is applied to, one per LoRA or one for all: all (default), double, single, "
                        "or a regular expression searched in module paths such as 'double_blocks\\.1[0-9]\\.'")
    g.add_argument("--allow_partial_lora", action="store_true",
                   help="apply the parts of a LoRA file that can be, and list what is dropped, instead of refusing the file")
    g.add_argument("--save_merged_model", type=path, default=None, help="save the DiT with the LoRAs merged, then exit")
    g.add_argument("--lycoris", action="store_true",
                   help="accepted for musubi-tuner command lines: LoHa and LoKr files are applied natively, with or without it")

    g = p.add_argument_group("memory and speed")
    g.add_argument("--fp8", action="store_true", help="DiT block Linears in fp8 e4m3fn")
    g.add_argument("--fp8_fast", action="store_true", help="fp8 matmuls on GPUs that have them (needs --fp8)")
    g.add_argument("--fp8_llm", action="store_true", help="LLM Linear weights in fp8 while encoding the prompt")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available, else cpu)")
    g.add_argument("--attn_mode", choices=ATTENTION_MODES, default="torch", help="attention kernel")
    g.add_argument("--split_attn", action="store_true", help="attention one sample at a time over its valid tokens")
    g.add_argument("--vae_chunk_size", type=count(1), default=None, help="decode the causal convolutions in chunks (less memory)")
    g.add_argument("--vae_spatial_tile_sample_min_size", type=pixels, default=None, help="VAE tile size in pixels (default 256)")
    g.add_argument("--blocks_to_swap", type=count(0, MAX_BLOCKS_TO_SWAP_INFERENCE), default=None,
                   help=f"keep N blocks' weights in host memory, moving each in when it runs (max {MAX_BLOCKS_TO_SWAP_INFERENCE}; 0: none, as musubi-tuner reads it)")
    g.add_argument("--use_pinned_memory_for_block_swap", action="store_true", help="pinned host buffers for faster block swap")
    g.add_argument("--img_in_txt_in_offloading", action="store_true", help="keep the input embedders in host memory between steps")
    g.add_argument("--context_parallel", type=count(1), default=1,
                   help="split the DiT's tokens over N processes started by accelerate launch or torchrun (N divides the 24 "
                        "heads); with real CFG, 2N processes run the negative and positive prompt side by side")
    add_ddp_timeout(g, "in a denoising step")
    add_compile_flags(g)
    g.add_argument("--compile_args", nargs=4, default=None, help=argparse.SUPPRESS)
    add_step_cache_flags(g)

    g = p.add_argument_group("output")
    g.add_argument("--save_path", type=path, required=True, help="output folder")
    g.add_argument("--output_type", choices=("video", "images", "latent", "both"), default="video",
                   help="video: mp4; images: a folder of PNGs; latent: safetensors; both: mp4 and latent")
    g.add_argument("--latent_path", type=path, nargs="+", default=None, help="decode saved latents only")
    g.add_argument("--no_metadata", action="store_true", help="write no prompt or settings into the outputs")
    g.add_argument("--dry_run", action="store_true", help="print the planned GPU/host memory and time per stage, load nothing, exit")
    g.add_argument("--vram_budget", default=None, help="with --dry_run: also find the fastest option set that fits, e.g. 24G")
    return p


def main(argv=None) -> None:
    def run(argv):
        args = build_parser().parse_args(argv)
        if args.dry_run:
            from musubi_tuner.inference.pipeline import plan_generation
            from musubi_tuner.planning.from_args import exit_if_nothing_fits

            exit_if_nothing_fits(args, plan_generation(args))
            return
        from musubi_tuner.inference.pipeline import generate

        for saved in generate(args):
            print(f"saved {saved}")

    run_cli(run, argv, memory_advice="a smaller --video_size or --video_length needs less, as do --blocks_to_swap N, --fp8, "
                                      "--split_uncond and --vae_chunk_size 16; --dry_run --vram_budget 24G finds the options that fit a 24 GB GPU")


if __name__ == "__main__":
    main()
