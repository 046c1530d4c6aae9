"""How fast the data side runs on this machine: decoding for caching, resizing, training batches.

    PYTHONPATH=src python bench/data_loading.py [--clips 60] [--size 256] [--frames 33]

Prints one table. The VAE and text encoders are not involved (bench/caching.py times those); this is
the part the worker threads of `--num_workers` run while the VAE encodes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from musubi_tuner.data import cache_files
from musubi_tuner.data.buckets import area_resize
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.items import CacheReport, caption_items, iter_latent_batches
from musubi_tuner.data.training_dataset import TrainingDataset, make_dataloader
from musubi_tuner.demo.synthetic_data import make_synthetic_dataset


def timed(function, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - start) / repeat


def bench_resize(rows: list[tuple[str, str]]) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    ours = timed(lambda: area_resize(frame, (966, 544)), 5)
    pillow = timed(lambda: Image.fromarray(frame).resize((966, 544), Image.BOX), 5)
    rows.append(("area resize 1920x1080 -> 966x544", f"{ours * 1000:.1f} ms (Pillow BOX, inexact: {pillow * 1000:.1f} ms)"))


def bench_decoding(config, clips: int, rows: list[tuple[str, str]]) -> None:
    videos = config.video_datasets[0]
    for workers in sorted({0, 1, 2, os.cpu_count() or 1}):
        seconds = timed(lambda: list(iter_latent_batches(videos, CacheReport(), num_workers=workers)))
        rows.append((f"decode + resize clips, num_workers={workers}", f"{clips / seconds:.1f} clips/s"))
    seconds = timed(lambda: caption_items(videos, CacheReport()))
    rows.append(("read captions", f"{clips / seconds:.0f} captions/s"))


def bench_training(config, rows: list[tuple[str, str]]) -> None:
    """Fake caches of the video dataset's shapes, then batches through the DataLoader."""
    videos = config.video_datasets[0]
    for batch in iter_latent_batches(videos, CacheReport()):
        for item in batch.items:
            frames, height, width = item.pixels.shape[:3]
            latent = torch.randn(16, (frames - 1) // 4 + 1, height // 8, width // 8).half()
            cache_files.save_latent_cache(item.cache_path, latent, size=item.size, frame_count=item.frame_count)
            text = {**cache_files.text_encoder_tensors("llm", torch.randn(256, 4096).half(), torch.ones(256, dtype=torch.int64)),
                    **cache_files.text_encoder_tensors("clipL", torch.randn(768).half(), torch.ones(77, dtype=torch.int64))}
            cache_files.save_text_cache(cache_files.text_cache_path(videos.cache_directory, item.source.stem), "c", text)
    dataset = TrainingDataset.from_config(config, seed=0)
    for workers in (0, 2):
        loader, sampler = make_dataloader(dataset, num_workers=workers)
        sampler.set_epoch(1)
        seconds = timed(lambda: list(loader))
        rows.append((f"training batches, num_workers={workers}", f"{len(dataset) / seconds:.1f} batches/s "
                     f"(batch {videos.batch_size})"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=60)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=33)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[tuple[str, str]] = [("machine", f"{os.cpu_count()} CPU cores")]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        toml = make_synthetic_dataset(Path(tmp), num_videos=args.clips, num_images=0, width=args.size, height=args.size,
                                      frames=args.frames, batch_size=4)
        rows.append((f"write {args.clips} synthetic clips {args.size}x{args.size}x{args.frames}",
                     f"{time.perf_counter() - start:.2f} s"))
        config = load_dataset_config(toml)
        bench_resize(rows)
        bench_decoding(config, args.clips, rows)
        bench_training(config, rows)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
