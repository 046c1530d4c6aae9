"""Train a LoRA for HunyuanVideo / SkyReels V1 on cached latents and text-encoder outputs.

    accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/hv_train_network.py \
        --dit DIT --dataset_config dataset.toml --sdpa --mixed_precision bf16 --fp8_base --optimizer_type adamw8bit \
        --learning_rate 2e-4 --gradient_checkpointing --network_module networks.lora --network_dim 32 \
        --timestep_sampling shift --discrete_flow_shift 7.0 --max_train_epochs 16 --save_every_n_epochs 1 \
        --seed 42 --output_dir out --output_name my-lora
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

from pathlib import Path

from musubi_tuner.errors import run_cli


def main(argv=None) -> None:
    def run(argv):
        from musubi_tuner.training.args import parse_args

        args = parse_args(argv)
        if args.show_timesteps:
            from musubi_tuner.training.show_timesteps import console_histogram, image_histogram
            from musubi_tuner.training.loop import timestep_config
            from musubi_tuner.training.timesteps import warn_of_unread_flags

            cfg = timestep_config(args)
            warn_of_unread_flags(cfg)
            if args.show_timesteps == "console":
                print(console_histogram(cfg))
            else:
                out = Path(args.output_dir or ".") / "timesteps.png"
                print(f"wrote {image_histogram(cfg, out)}")
            return
        if args.dry_run:
            from musubi_tuner.planning.from_args import exit_if_nothing_fits
            from musubi_tuner.training.loop import plan_training

            exit_if_nothing_fits(args, plan_training(args))
            return
        from musubi_tuner.training.loop import train

        final = train(args)
        from accelerate import PartialState

        if PartialState().is_main_process and final is not None:
            print(f"saved {final}")

    run_cli(run, argv, memory_advice="a smaller resolution, frame count or batch_size in the dataset config needs less, as do "
                                      "--gradient_checkpointing, --fp8_base, --blocks_to_swap N and a lower --network_dim; --dry_run "
                                      "--vram_budget 24G finds the options that fit a 24 GB GPU")


if __name__ == "__main__":
    main()
