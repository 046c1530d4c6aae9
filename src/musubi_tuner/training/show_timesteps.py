"""`--show_timesteps console|image`: the noise levels a run would train on, as a text or PNG histogram (then exit).

Draws 100,000 samples for a 1x128x128 latent (a 1024x1024 image), as musubi-tuner does, with the loss
weighting next to them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from musubi_tuner.training.timesteps import TimestepConfig, loss_weights, sample_timesteps

SAMPLES = 100_000
BINS = 20


def timestep_histogram(cfg: TimestepConfig, samples: int = SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts per 1/BINS of sigma, mean loss weight per bin)."""
    sigma, _ = sample_timesteps(cfg, samples, (128, 128), generator=torch.Generator().manual_seed(seed))
    bins = (sigma * BINS).long().clamp(0, BINS - 1)  # (sigma 1.0 falls in the last bin: 1 - 1e-9 is 1.0 in float32, and
    # the sigma mode's draws of exactly 1.0 indexed past the bins: fuzz_ab 4)
    counts = torch.bincount(bins, minlength=BINS)
    weights = loss_weights(cfg, sigma)
    w = torch.ones_like(sigma) if weights is None else weights
    mean_w = torch.zeros(BINS).index_add_(0, bins, w) / counts.clamp(min=1)
    return counts, mean_w


def console_histogram(cfg: TimestepConfig, width: int = 60) -> str:
    counts, mean_w = timestep_histogram(cfg)
    top = counts.max().item()
    lines = [f"timestep sampling {cfg.mode} (shift {cfg.discrete_flow_shift}, weighting {cfg.weighting_scheme}); {SAMPLES} draws"]
    for i, (c, w) in enumerate(zip(counts.tolist(), mean_w.tolist())):
        bar = "#" * round(width * c / top)
        lines.append(f"sigma {i / BINS:.2f}-{(i + 1) / BINS:.2f} {c / SAMPLES:6.1%} weight {w:6.3f} {bar}")
    return "\n".join(lines)


def image_histogram(cfg: TimestepConfig, path: Path, size: tuple[int, int] = (800, 400)) -> Path:
    from PIL import Image, ImageDraw

    counts, _ = timestep_histogram(cfg)
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    top = counts.max().item()
    margin = 30
    bar_w = (w - 2 * margin) / BINS
    for i, c in enumerate(counts.tolist()):
        bh = (h - 2 * margin) * c / top
        x0 = margin + i * bar_w
        draw.rectangle([x0 + 1, h - margin - bh, x0 + bar_w - 1, h - margin], fill=(70, 110, 200))
    draw.line([margin, h - margin, w - margin, h - margin], fill="black")
    draw.text((margin, 8), f"{cfg.mode}, shift {cfg.discrete_flow_shift}: sigma 0 (left) .. 1 (right), {SAMPLES} draws", fill="black")
    from musubi_tuner.files import atomic_write

    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
    return path
