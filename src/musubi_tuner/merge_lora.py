"""Bake one or more LoRAs (each with its multiplier) into a HunyuanVideo DiT and save it as safetensors.

    python src/musubi_tuner/merge_lora.py --dit DIT --lora_weight A.safetensors [B ...] \
        --lora_multiplier 1.0 [0.5 ...] --save_merged_model merged.safetensors [--device cpu]
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import logging


from musubi_tuner.cli import Parser, count, path, real, resolve_device
from musubi_tuner.errors import run_cli

logger = logging.getLogger("merge_lora")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="merge_lora.py", description=__doc__)
    g = p.add_argument_group("inputs")
    g.add_argument("--dit", type=path, required=True, help="DiT checkpoint (.pt or .safetensors)")
    g.add_argument("--dit_in_channels", type=count(1), default=None, help="checked against the file: 16 T2V, 32 SkyReels I2V")
    g.add_argument("--lora_weight", type=path, nargs="+", required=True, help="LoRA files, merged in this order")
    g.add_argument("--lora_multiplier", type=real(), nargs="+", default=None, help="one per LoRA, in order (a file without one: 1.0, as in musubi-tuner)")
    g.add_argument("--exclude_single_blocks", action="store_true", help="merge only the double-block parts of the LoRAs")
    g.add_argument("--lora_blocks", nargs="+", default=None, metavar="BLOCKS",
                   help="blocks each LoRA is merged into, one per LoRA or one for all: all (default), double, single, or a regex")
    g.add_argument("--allow_partial_lora", action="store_true",
                   help="merge the parts of a LoRA file that can be, and list what is dropped, instead of refusing the file")
    g = p.add_argument_group("output")
    g.add_argument("--save_merged_model", type=path, required=True, help="output .safetensors (written whole or not at all)")
    g.add_argument("--device", default=None, help="where the merge arithmetic runs (default: cuda if available, else cpu)")
    return p


def main(argv=None) -> None:
    def run(argv):
        args = build_parser().parse_args(argv)
        from musubi_tuner.networks.merge import check_merged_model_output, lora_jobs, merge_file

        check_merged_model_output(args.save_merged_model, args.dit, args.lora_weight)
        lora_jobs(args.lora_weight, args.lora_multiplier, args.lora_blocks, args.exclude_single_blocks, say=True)
        device = resolve_device(args.device)
        info = merge_file(args.dit, args.lora_weight, args.lora_multiplier, args.save_merged_model, device=device,
                          exclude_single_blocks=args.exclude_single_blocks, in_channels=args.dit_in_channels,
                          lora_blocks=args.lora_blocks, allow_partial=args.allow_partial_lora)
        if info["fp8_input"]:
            logger.info("the DiT was fp8: the merged model is saved in bf16 (an fp8 round trip would erase most of the LoRA)")
        print(f"merged {info['files']} LoRA file(s) into {info['layers']} layers -> {args.save_merged_model}")

    run_cli(run, argv)


if __name__ == "__main__":
    main()
