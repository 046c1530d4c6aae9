"""Convert a HunyuanVideo LoRA between our kohya naming ("default") and the "other" naming of diffusers/diffusion-pipe.

    python src/musubi_tuner/convert_lora.py --input my.safetensors --output my_other.safetensors --target other
    python src/musubi_tuner/convert_lora.py --input other.safetensors --output my.safetensors --target default

`--target default` also reads diffusers/PEFT LoRAs of diffusers' HunyuanVideo transformer (q, k, v fused exactly).
The input's metadata is copied (with `musubi_tuner.lora_naming` set to the output's naming).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse

from musubi_tuner.cli import Parser
from musubi_tuner.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="convert_lora.py", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="input LoRA (.safetensors)")
    p.add_argument("--output", required=True, help="output LoRA (.safetensors)")
    p.add_argument("--target", required=True, choices=("other", "default"), help="other: diffusers/diffusion-pipe naming; default: ours")
    p.add_argument("--diffusers_prefix", default=None, help="key prefix of the 'other' output (default diffusion_model)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(argv=None) -> None:
    def run(argv):
        args = build_parser().parse_args(argv)
        from musubi_tuner.networks.lora_files import read_lora_file, save_lora
        from musubi_tuner.networks.lora_naming import kohya_to_other, require_hunyuan_modules, to_kohya
        from musubi_tuner.training.metadata import with_naming

        weights, metadata = read_lora_file(args.input)
        kohya = require_hunyuan_modules(to_kohya(weights, source=args.input), args.input)
        out = kohya_to_other(kohya, args.diffusers_prefix or "diffusion_model") if args.target == "other" else kohya
        save_lora(out, args.output, with_naming(metadata, "other" if args.target == "other" else "kohya"))
        modules = sum(k.endswith(("lora_down.weight", "lora_A.weight")) for k in out)
        print(f"{args.input} -> {args.output}: {modules} modules in the {args.target} naming")

    run_cli(run, argv)


if __name__ == "__main__":
    main()
