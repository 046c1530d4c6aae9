"""Check that a HunyuanVideo LoRA loads whole in this toolkit, musubi-tuner, ComfyUI, kijai's wrapper and diffusers.

Says which file (or which of convert_lora.py's outputs) to give each of them.

    python -m musubi_tuner.lora_doctor my_lora.safetensors [--for ours|musubi|comfyui|kijai|kijai_blocks|diffusers|all] [--dit DIT] [--json]

Detects the file's naming and entry kinds, lists the modules it covers, and reports for each consumer how many
keys it applies and which it drops, from that consumer's own rules (kijai_blocks: kijai's wrapper with its
block-selection node). With --dit (only the file's header is read) it also warns when the LoRA was trained on
another base (I2V vs T2V) and checks every layer's shape. Exit status: 0 every consumer checked is served
completely (by the file or its companion), 1 something would be dropped or refused (the report says which of
convert_lora.py's outputs serves that consumer, if one does), or the file holds NaN/inf, or its metadata says it is a
LoRA for another model (Flux, SDXL, Wan, ...: networks.lora_metadata.OTHER_MODELS), 2 the file could not be read.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import json
import sys

from musubi_tuner.cli import Parser, path
from musubi_tuner.errors import print_report, run_cli

CHOICES = ("all", "ours", "musubi", "comfyui", "kijai", "kijai_blocks", "diffusers")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lora_doctor", description=__doc__)
    p.add_argument("file", type=path, nargs="?", help="LoRA file (.safetensors), in any naming")
    p.add_argument("--for", dest="consumers", nargs="+", metavar="{" + ",".join(CHOICES) + "}", default=["all"],
                   help="which consumers to check (default all)")
    p.add_argument("--dit", type=path, default=None, help="the DiT the LoRA is meant for: checks base model, input channels and layer shapes")
    p.add_argument("--json", action="store_true", help="print the full diagnosis as JSON (every dropped key)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, the file before or after `--for A B`: `--for comfyui FILE` (the order the usage shows) gave
    the file to --for, which takes one or more names."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.file is None and args.consumers and args.consumers[-1] not in CHOICES:
        args.file = args.consumers.pop()
    unknown = [c for c in args.consumers if c not in CHOICES]
    if unknown or not args.consumers:
        parser.error(f"argument --for: invalid choice: {unknown[0] if unknown else '(none)'!r} (choose from {', '.join(CHOICES)})")
    if args.file is None:
        parser.error("the following arguments are required: file")
    return args


def main(argv=None) -> None:
    def run(argv):
        args = parse_args(argv)
        from musubi_tuner.networks.lora_consumers import CONSUMERS
        from musubi_tuner.networks.lora_doctor import diagnose, diagnosis_json, diagnosis_text

        consumers = CONSUMERS if "all" in args.consumers else tuple(c for c in CONSUMERS if c in args.consumers)
        diagnosis = diagnose(args.file, consumers, dit=args.dit)
        print_report(json.dumps(diagnosis_json(diagnosis), indent=1) if args.json else diagnosis_text(diagnosis))
        if not diagnosis.ok:
            sys.exit(1)

    run_cli(run, argv)


if __name__ == "__main__":
    main()
