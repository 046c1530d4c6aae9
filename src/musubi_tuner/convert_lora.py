"""Convert a HunyuanVideo LoRA in any naming to our kohya naming ("default") or the "other" naming of ComfyUI/diffusers/diffusion-pipe.

    python src/musubi_tuner/convert_lora.py --input my.safetensors --output my_other.safetensors --target other
    python src/musubi_tuner/convert_lora.py --input other.safetensors --output my.safetensors --target default

The input may be in any naming the toolkit reads (networks.lora_reader): kohya with official or ComfyUI module
names, `diffusion_model.` / `transformer.` files, diffusers/PEFT LoRAs (q, k, v fused exactly, with their
`lora_alpha`), ComfyUI's trainer output with its diff / diff_b / conv entries. Every entry is converted with its
scale, or the file is refused naming the entry (`--allow_partial_lora` converts the rest and lists what it drops),
and a file whose metadata names another model (a Flux LoRA) is refused. The "other" output folds alpha / rank into
its LoRA factors, which fp8 cannot hold: an fp8 input's factors are written in bf16 there (the "default" output
keeps every tensor as stored). The input's metadata is copied (with `musubi_tuner.lora_naming` set to the output's naming).
"""

from __future__ import annotations

import json

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import logging

from musubi_tuner.cli import Parser, path
from musubi_tuner.errors import UserError, run_cli
from musubi_tuner.files import RunLock, check_output_file, output_file_lock

logger = logging.getLogger("convert_lora")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="convert_lora.py", description=__doc__)
    p.add_argument("--input", type=path, required=True, help="input LoRA (.safetensors), in any naming")
    p.add_argument("--output", type=path, required=True, help="output LoRA (.safetensors)")
    p.add_argument("--target", required=True, choices=("other", "default"), help="other: ComfyUI/diffusers/diffusion-pipe naming; default: ours")
    p.add_argument("--diffusers_prefix", default=None, help="key prefix of the 'other' output (default diffusion_model)")
    p.add_argument("--allow_partial_lora", action="store_true", help="convert what can be, list what is dropped, instead of refusing")
    return p


def diffusers_prefix(value: str | None) -> str:
    """--diffusers_prefix: diffusion_model when not given; `transformer.` means `transformer` (keys are PREFIX.module);
    a prefix that neither ComfyUI nor diffusers nor this tool reads back is written as asked, with a warning."""
    from musubi_tuner.networks.lora_naming import OTHER_PREFIXES

    if value is None:
        return "diffusion_model"
    prefix = value.rstrip(".")
    if not prefix or prefix.strip() != prefix:
        raise UserError(f"--diffusers_prefix {value!r}: a key prefix such as diffusion_model or transformer")
    if prefix + "." not in OTHER_PREFIXES:
        logger.warning("--diffusers_prefix %s: LoRA readers know %s; a file with this prefix may load "
                                            "nowhere (this tool cannot read it back)", prefix,
                                            ", ".join(p.rstrip(".") for p in OTHER_PREFIXES))
    return prefix


def main(argv=None) -> None:
    def run(argv):
        args = build_parser().parse_args(argv)
        check_output_file(args.output, "--output", {"--input": [args.input]})
        with RunLock(output_file_lock(args.output), "conversion into this file", "--output"):  # (seen by a training's save
            convert(args)                                                                   # and a merge: fuzz_at 1)

    run_cli(run, argv)


def convert(args) -> None:
    """--input in the naming --target asks for, written to --output."""
    from musubi_tuner.networks.lora_files import save_lora, unfolded
    from musubi_tuner.networks.lora_metadata import OURS, with_naming
    from musubi_tuner.networks.lora_reader import folded_dtype, kohya_state_dict, other_state_dict, read_lora

    prefix = diffusers_prefix(args.diffusers_prefix)
    contents = read_lora(args.input, args.allow_partial_lora)
    if args.target == "other":
        out = other_state_dict(contents.patches, prefix)
        widened = sorted({str(t.dtype).removeprefix("torch.") for p in contents.patches if p.kind == "lora"
                          for t in (p.up, p.down) if folded_dtype(t.dtype) != t.dtype})
        if widened:
            logger.info("%s: its %s LoRA factors are written in bf16 with alpha / rank folded in (fp8 would round the "
                        "folded values, the small ones to 0)", args.input, " and ".join(widened))
    else:
        if args.diffusers_prefix is not None:
            logger.warning("--diffusers_prefix %s is ignored: it names the keys of --target other; --target default "
                           "writes kohya names (lora_unet_*)", args.diffusers_prefix)
        # (a copy in the other naming that this toolkit wrote holds alpha / rank in its factors and each module's
        # alpha in its metadata: given back, the round trip is the file it came from, and the metadata true: F5)
        out = kohya_state_dict(unfolded(contents))
    # PEFT's lora_alpha is now in the weights (folded) or in .alpha keys: kept, it would scale them twice
    metadata = {k: v for k, v in contents.metadata.items() if k != "lora_adapter_metadata"}
    if args.target == "other" and OURS + "lora_modules" not in metadata:  # (each module's rank and alpha, folded into
        # the copy, for --target default to give back: a LoRA not trained here came back at alpha = rank, its factors
        # rescaled and its ss_network_alpha then false: fuzz_aw 9)
        alphas = {p.module: [p.rank, p.alpha] for p in contents.patches if p.kind == "lora" and p.alpha is not None}
        if alphas:
            metadata[OURS + "lora_modules"] = json.dumps(alphas)
    save_lora(out, args.output, with_naming(metadata, "other" if args.target == "other" else "kohya"))
    modules = len({p.module for p in contents.patches})
    print(f"{args.input} -> {args.output}: {modules} modules in the {args.target} naming")


if __name__ == "__main__":
    main()
