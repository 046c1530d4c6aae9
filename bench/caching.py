"""Caching throughput: items per second of cache_latents and cache_text_encoder_outputs, with and without
--num_workers, on tiny models and a synthetic dataset.

    PYTHONPATH=src python bench/caching.py [--clips 16] [--source_size 256] [--size 64] [--frames 9] [--rounds 3]

Each variant is the whole command, called in this process as a user's run would go (dataset listing,
model load, decode, encode, atomic writes, stale-cache check), without --skip_existing so every run
encodes everything. The clips are written at --source_size and cached at --size, so decoding and
resizing cost something next to the VAE, as with real videos. The variants take turns inside each
round (one warm-up round first) so that other work on the machine slows them alike; the table shows
the median of the rounds. On a shared machine the figures move by tens of percent from run to run.

--num_workers sizes the thread pool that decodes and resizes media (latents) or reads caption files
(text) while the main thread runs the model; 0 does that work in the main thread, between encodes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, table  # noqa: E402

from musubi_tuner.cache_latents import main as cache_latents  # noqa: E402
from musubi_tuner.cache_text_encoder_outputs import main as cache_text  # noqa: E402
from musubi_tuner.demo.synthetic_data import make_synthetic_dataset  # noqa: E402
from musubi_tuner.demo.tiny_text_encoders import write_tiny_clip_folder, write_tiny_llm_folder  # noqa: E402
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae  # noqa: E402


def write_assets(root: Path, args) -> dict[str, Path]:
    videos = make_synthetic_dataset(root / "videos", num_videos=args.clips, num_images=0, width=args.source_size,
                                    height=args.source_size, frames=args.frames, batch_size=args.batch_size)
    # cache at --size: every frame is decoded at the source size and reduced, as real clips are
    videos.write_text(videos.read_text().replace(f"resolution = [{args.source_size}, {args.source_size}]",
                                                 f"resolution = [{args.size}, {args.size}]"))
    # the text command reads captions only, and they are cheap: give it more of them (as 1-frame clips)
    captions = make_synthetic_dataset(root / "captions", num_videos=args.captions, num_images=0, width=16, height=16,
                                      frames=1, batch_size=args.text_batch_size)
    return {"videos": videos, "captions": captions, "vae": write_vae(root / "vae.pt", random_vae_state_dict(TINY_VAE)),
            "te1": write_tiny_llm_folder(root / "text_encoder"), "te2": write_tiny_clip_folder(root / "text_encoder_2")}


def variants(assets: dict[str, Path], args) -> list[tuple[str, str, int, object, list[str]]]:
    """(command, --num_workers shown, items, main, argv) for each measured run."""
    latents = ["--dataset_config", str(assets["videos"]), "--vae", str(assets["vae"])]
    text = ["--dataset_config", str(assets["captions"]), "--text_encoder1", str(assets["te1"]),
            "--text_encoder2", str(assets["te2"])]
    default = f"default ({max(1, (os.cpu_count() or 2) - 1)})"
    return [("cache_latents", "0", args.clips, cache_latents, latents + ["--num_workers", "0"]),
            ("cache_latents", "1", args.clips, cache_latents, latents + ["--num_workers", "1"]),
            ("cache_latents", "2", args.clips, cache_latents, latents + ["--num_workers", "2"]),
            ("cache_latents", default, args.clips, cache_latents, latents),
            ("cache_text_encoder_outputs", "0", args.captions, cache_text, text + ["--num_workers", "0"]),
            ("cache_text_encoder_outputs", default, args.captions, cache_text, text)]


def run_quietly(main, argv: list[str]) -> float:
    """Seconds one command takes; its progress bars and summary are swallowed."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        start = time.perf_counter()
        main(argv)
        seconds = time.perf_counter() - start
    if "0 failed" not in sink.getvalue():
        raise RuntimeError(f"a run failed:\n{sink.getvalue()[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--source_size", type=int, default=256, help="size the clips are written at")
    parser.add_argument("--size", type=int, default=32, help="resolution they are cached at")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--batch_size", type=int, default=4, help="the video dataset's batch_size")
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--text_batch_size", type=int, default=16, help="the caption dataset's batch_size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # the commands' INFO lines would swamp the table
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        runs = variants(write_assets(Path(tmp), args), args)
        times: list[list[float]] = [[] for _ in runs]
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for i, (_, _, _, command, argv) in enumerate(runs):
                seconds = run_quietly(command, argv)
                if round_index:
                    times[i].append(seconds)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for (name, workers, items, _, _), seconds in zip(runs, times):
        median = statistics.median(seconds)
        rows.append({"command": name, "--num_workers": workers, "items": items, "median s": f"{median:.2f}",
                     "items/s": f"{items / median:.1f}", "spread": f"{min(seconds):.2f}-{max(seconds):.2f} s"})
    print(f"{machine()}; load average {load_before:.1f} before the runs, {load_after:.1f} after")
    print(f"latents: {args.clips} synthetic clips written at {args.source_size}x{args.source_size}, cached at "
          f"{args.size}x{args.size}x{args.frames} (dataset batch_size {args.batch_size}); text: {args.captions} "
          f"captions (batch_size {args.text_batch_size}); tiny VAE and text encoders; whole commands, model "
          f"loading included; median of {args.rounds} rounds after one warm-up")
    print(table(rows, ["command", "--num_workers", "items", "median s", "items/s", "spread"]))


if __name__ == "__main__":
    main()
