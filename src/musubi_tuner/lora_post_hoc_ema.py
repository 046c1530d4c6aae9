"""Average a run's saved LoRA checkpoints with a post-hoc EMA into one LoRA (musubi-tuner's lora_post_hoc_ema.py).

    python src/musubi_tuner/lora_post_hoc_ema.py out/my-lora-0000*.safetensors --output_file my-lora-ema.safetensors --beta 0.9
    python src/musubi_tuner/lora_post_hoc_ema.py out/my-lora-0000*.safetensors --output_file my-lora-ema.safetensors --sigma_rel 0.2

The math is in networks/post_hoc_ema.py; docs/post_hoc_ema.md says how to choose beta or sigma_rel.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse

from musubi_tuner.cli import Parser, path, real
from musubi_tuner.errors import run_cli
from musubi_tuner.files import RunLock, check_output_file, output_file_lock


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lora_post_hoc_ema.py", description=__doc__)
    p.add_argument("path", type=path, nargs="+", help="the LoRA checkpoints of one run (kohya or .comfyui files, not both)")
    p.add_argument("--no_sort", action="store_true", help="merge in the order given instead of by the training step the files record (by modification time where they do not)")
    p.add_argument("--beta", type=real(0, 1), default=0.95, help="decay: the weight the running average keeps at each merge")
    p.add_argument("--beta2", type=real(0, 1), default=None, help="move beta linearly from --beta to this over the merges")
    p.add_argument("--sigma_rel", type=real(above=0), default=None,
                   help="power-function EMA of this relative width (e.g. 0.2) instead of --beta / --beta2")
    p.add_argument("--output_file", type=path, required=True, help="the averaged LoRA (.safetensors)")
    return p


def main(argv=None) -> None:
    def run(argv):
        args = build_parser().parse_args(argv)
        from musubi_tuner.networks.lora_files import save_lora
        from musubi_tuner.networks.post_hoc_ema import ema_betas, order_files, post_hoc_ema

        check_output_file(args.output_file, "--output_file", {"the checkpoints to average": args.path})
        paths = order_files(args.path, sort=not args.no_sort)
        betas = ema_betas(len(paths) - 1, args.beta, args.beta2, args.sigma_rel)
        # (held while it works: a training's save and a merge into this name see it: fuzz_at 1)
        with RunLock(output_file_lock(args.output_file), "post-hoc EMA into this file", "--output_file"):
            weights, metadata = post_hoc_ema(paths, betas)
            save_lora(weights, args.output_file, metadata)
        shown = ", ".join(f"{b:.4f}" for b in betas) or "none (one file)"
        print(f"{len(paths)} checkpoints, oldest first {paths[0].name} .. {paths[-1].name}, beta per merge: {shown} -> {args.output_file}")

    run_cli(run, argv)


if __name__ == "__main__":
    main()
