"""Show what is in a HunyuanVideo LoRA file: naming, ranks, alpha, modules covered, update norm per block, metadata.

    python -m musubi_tuner.lora_info my_lora.safetensors [--json]

(`python -m musubi_tuner.lora_doctor` also checks where the file loads completely.)
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import json

from musubi_tuner.cli import Parser, path
from musubi_tuner.errors import print_report, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lora_info", description=__doc__)
    p.add_argument("file", type=path, help="LoRA file (.safetensors), in any naming")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    return p


def main(argv=None) -> None:
    def run(argv):
        args = build_parser().parse_args(argv)
        from musubi_tuner.networks.lora_doctor import inspection_json
        from musubi_tuner.networks.lora_inspect import inspect_lora, inspection_text

        inspection = inspect_lora(args.file)
        print_report(json.dumps(inspection_json(inspection), indent=1) if args.json else inspection_text(inspection))

    run_cli(run, argv)


if __name__ == "__main__":
    main()
