"""Which frames of a video become training clips: 4N+1 rounding and the five extraction modes.

The rules are musubi-tuner's (its docs/dataset_config.md draws them for a 40-frame video; our tests
redraw those diagrams). The causal VAE compresses time 4x after the first frame, so a clip must hold
4N+1 frames to map onto whole latent frames.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")
VAE_TEMPORAL_STRIDE = 4


class Clip(NamedTuple):
    """`frames` consecutive frames starting at `start` (indices after any source_fps decimation)."""

    start: int
    frames: int


def round_to_4n1(frames: int) -> int:
    """Round down to the nearest 4N+1: 24 -> 21, 25 -> 25, 1 -> 1."""
    return (frames - 1) // VAE_TEMPORAL_STRIDE * VAE_TEMPORAL_STRIDE + 1


def latent_frames(frames: int) -> int:
    """Latent frames the VAE makes from `frames` (4N+1) pixel frames: 1 -> 1, 25 -> 7, 129 -> 33."""
    return (frames - 1) // VAE_TEMPORAL_STRIDE + 1


def normalize_target_frames(target_frames: Sequence[int]) -> tuple[int, ...]:
    """De-duplicated, sorted, each rounded down to 4N+1 (what musubi-tuner trains on)."""
    return tuple(sorted({round_to_4n1(f) for f in target_frames}))


def decode_limit(extraction: str, target_frames: Sequence[int], max_frames: int) -> int | None:
    """How many frames need decoding at most: `head` only ever uses the first max(target) frames, `full` the first
    max_frames (a 10-minute video was decoded whole, and held, for its first 129 frames: fuzz_ag 1b); the others
    need the video's length."""
    return max(target_frames) if extraction == "head" else max_frames if extraction == "full" else None


def extract_clips(num_frames: int, extraction: str, target_frames: Sequence[int], *, frame_stride: int = 1,
                  frame_sample: int = 1, max_frames: int = 129) -> list[Clip]:
    """The clips of a video of `num_frames` frames, in musubi-tuner's order (by target, then by start).

    `target_frames` must already be 4N+1 (see normalize_target_frames). Targets longer than the video
    give no clip; an empty list means the video is too short for every target.
    """
    if num_frames < 1:
        return []
    if extraction == "full":
        return [Clip(0, round_to_4n1(min(num_frames, max_frames)))]
    clips: list[Clip] = []
    for target in target_frames:
        if target > num_frames:
            continue
        clips.extend(Clip(start, target) for start in _starts(num_frames, extraction, target, frame_stride, frame_sample))
    return clips


def _starts(num_frames: int, extraction: str, target: int, frame_stride: int, frame_sample: int) -> list[int]:
    last_start = num_frames - target
    if extraction == "head":
        return [0]
    if extraction == "chunk":  # non-overlapping
        return list(range(0, last_start + 1, target))
    if extraction == "slide":
        return list(range(0, last_start + 1, frame_stride))
    if extraction == "uniform":
        # numpy's linspace cast to int, exactly as musubi-tuner (repeats are possible for short videos)
        return [int(s) for s in np.linspace(0, last_start, frame_sample, dtype=int)]
    raise ValueError(f"unknown frame_extraction {extraction!r}; expected one of {', '.join(FRAME_EXTRACTIONS)}")
