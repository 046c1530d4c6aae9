"""The whole job on built-in tiny models: cache latents -> cache text -> train a LoRA -> merge -> generate an mp4.

    python -m musubi_tuner.demo [--workdir demo_output] [--epochs 16]

Writes tiny models in the real file formats (the official DiT .pt, the VAE .pt, HF text-encoder folders)
and a synthetic captioned dataset, then runs the seed's five commands as subprocesses, exactly as a user
types them with only the paths changed, printing each before it runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from musubi_tuner.launch import child_environment, python_command, shown, training_command


def write_models(work: Path) -> dict[str, Path]:
    """The tiny models where the official download puts the real ones: `ckpts/hunyuan-video-t2v-720p/transformers/
    mp_rank_00_model_states.pt`, `.../vae/pytorch_model.pt`, `ckpts/text_encoder`, `ckpts/text_encoder_2`."""
    from musubi_tuner.demo.tiny_dit import TINY_DIT, random_dit_state_dict, write_dit
    from musubi_tuner.demo.tiny_text_encoders import write_tiny_clip_folder, write_tiny_llm_folder
    from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae

    models = work / "ckpts"
    dit = write_dit(models / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt", random_dit_state_dict(TINY_DIT), TINY_DIT, "pt")
    vae = write_vae(models / "hunyuan-video-t2v-720p" / "vae" / "pytorch_model.pt", random_vae_state_dict(TINY_VAE))
    te1 = write_tiny_llm_folder(models / "text_encoder")
    te2 = write_tiny_clip_folder(models / "text_encoder_2")
    return {"dit": dit, "vae": vae, "te1": te1, "te2": te2}


def write_assets(work: Path, frames: int, items: int = 6) -> dict[str, Path]:
    """write_models, and a synthetic captioned dataset (`dataset/dataset.toml`) of `items` clips and `items` images."""
    from musubi_tuner.demo.synthetic_data import make_synthetic_dataset

    toml = make_synthetic_dataset(work / "dataset", num_videos=items, num_images=items, width=64, height=64, frames=frames)
    return {**write_models(work), "toml": toml}


def commands(a: dict[str, Path], work: Path, epochs: int) -> list[tuple[str, list[str]]]:
    out = work / "output"
    lora = out / "demo-lora.safetensors"
    merged = work / "merged" / "merged_model.safetensors"
    return [
        ("cache latents", python_command("cache_latents.py", ["--dataset_config", str(a["toml"]), "--vae", str(a["vae"]),
                                                             "--vae_chunk_size", "32", "--vae_tiling"])),
        ("cache text encoder outputs", python_command("cache_text_encoder_outputs.py", [
            "--dataset_config", str(a["toml"]), "--text_encoder1", str(a["te1"]), "--text_encoder2", str(a["te2"]), "--batch_size", "16"])),
        ("train a LoRA", training_command(training_flags(a, out, epochs))),
        ("merge the LoRA into the DiT", python_command("merge_lora.py", [
            "--dit", str(a["dit"]), "--lora_weight", str(lora), "--save_merged_model", str(merged), "--device", "cpu",
            "--lora_multiplier", "1.0"])),
        ("generate a video", python_command("hv_generate_video.py", [
            "--fp8", "--video_size", "544", "960", "--video_length", "5", "--infer_steps", "30",
            "--prompt", "A cat walks on the grass, realistic style.", "--save_path", str(work / "videos"), "--output_type", "both",
            "--dit", str(a["dit"]), "--attn_mode", "sdpa", "--split_attn", "--vae", str(a["vae"]), "--vae_chunk_size", "32",
            "--vae_spatial_tile_sample_min_size", "128", "--text_encoder1", str(a["te1"]), "--text_encoder2", str(a["te2"]),
            "--seed", "1234", "--lora_multiplier", "1.0", "--lora_weight", str(lora)])),
    ]


def training_flags(a: dict[str, Path], out: Path, epochs: int) -> list[str]:
    """hv_train_network's flags of the seed's training command, on the demo's files."""
    return ["--dit", str(a["dit"]), "--dataset_config", str(a["toml"]), "--sdpa", "--mixed_precision", "bf16", "--fp8_base",
            "--optimizer_type", "adamw8bit", "--learning_rate", "2e-4", "--gradient_checkpointing",
            "--max_data_loader_n_workers", "2", "--persistent_data_loader_workers", "--network_module", "networks.lora",
            "--network_dim", "32", "--timestep_sampling", "shift", "--discrete_flow_shift", "7.0",
            "--max_train_epochs", str(epochs), "--save_every_n_epochs", "1", "--seed", "42", "--output_dir", str(out),
            "--output_name", "demo-lora"]


def main(argv=None) -> None:
    """As the commands run: a file it cannot write (a full disk) is one `error:` line; a step that fails ends the demo
    with that step's exit status."""
    from musubi_tuner.errors import run_cli

    def run(argv) -> None:
        status = demo(argv)
        if status:
            sys.exit(status)

    run_cli(run, argv)


def demo(argv=None) -> int:
    from musubi_tuner.cli import Parser, count, frames_4n1

    parser = Parser(prog="python -m musubi_tuner.demo", description=__doc__)
    parser.add_argument("--workdir", default="demo_output", help="folder for the models, the dataset and the outputs")
    parser.add_argument("--epochs", type=count(1), default=16, help="training epochs")
    parser.add_argument("--frames", type=frames_4n1, default=9, help="frames per synthetic clip (4N+1)")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    started = time.time()
    print(f"writing tiny models and a synthetic dataset to {work}", flush=True)
    assets = write_assets(work, args.frames)
    env = child_environment()
    for title, cmd in commands(assets, work, args.epochs):
        print(f"\n== {title}\n$ {shown(cmd)}", flush=True)
        t0 = time.time()
        returncode = run_child(cmd, env)
        if returncode != 0:
            print(f"\n{title} failed (exit {returncode})", file=sys.stderr)
            return returncode
        print(f"-- {title}: {time.time() - t0:.0f} s", flush=True)
    summary(work, time.time() - started)
    return 0


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """`cmd` in a process group of its own: a signal that stops the demo (Ctrl-C, SIGTERM, SIGHUP) is passed to the
    whole group, `accelerate launch` and the trainer it started, and the demo ends once they have. (subprocess.run killed
    the launcher alone, and the trainer ran on, orphaned, holding its output folder's lock.)"""
    import os
    import signal

    process = subprocess.Popen(cmd, env=env, start_new_session=os.name != "nt")
    try:
        return process.wait()
    except BaseException as e:
        if os.name == "nt":
            process.terminate()
        else:
            os.killpg(process.pid, getattr(e, "signum", signal.SIGINT))
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill() if os.name == "nt" else os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise


def summary(work: Path, seconds: float) -> None:
    from musubi_tuner.training.loss_curve import write_loss_curve_from_logs

    out = work / "output"
    videos = sorted((work / "videos").glob("*.mp4"))
    curve = write_loss_curve_from_logs(out)
    print(f"\nDone in {seconds:.0f} s.")
    print(f"  LoRA:          {out / 'demo-lora.safetensors'} (one per epoch beside it; ComfyUI/diffusers copy: demo-lora.comfyui.safetensors)")
    print(f"  merged model:  {work / 'merged' / 'merged_model.safetensors'}")
    print(f"  video:         {videos[-1] if videos else 'none'}")
    print(f"  loss curve:    {curve if curve else 'none'}")


if __name__ == "__main__":
    main()
