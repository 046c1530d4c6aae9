"""A synthetic captioned dataset: coloured shapes moving across a plain background, and still images of them.

Captions state the facts a model can learn ("a red circle moving left on a black background"), so a
tiny end-to-end run can be checked by eye. Writes real mp4 (H.264) clips and PNG images with .txt
captions, and a musubi-tuner dataset TOML with one image and one video dataset:

    python -m musubi_tuner.demo.synthetic_data out/ --videos 100 --images 20
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from musubi_tuner.data.frames import round_to_4n1
from musubi_tuner.data.media import write_video
from musubi_tuner.files import atomic_write

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
    "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30), "white": (240, 240, 240),
}
BACKGROUNDS = {"black": (10, 10, 10), "grey": (110, 110, 110), "navy": (20, 30, 80)}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class Scene:
    colour: str
    background: str
    shape: str
    direction: str

    def caption(self, moving: bool) -> str:
        motion = f" moving {self.direction}" if moving else ""
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}{motion} on a {self.background} background"


def random_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    return Scene(colour, rng.choice(list(BACKGROUNDS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)))


def draw(scene: Scene, width: int, height: int, progress: float) -> np.ndarray:
    """One frame (H, W, 3) uint8: the shape at `progress` (0..1) of its path across the frame."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:] = BACKGROUNDS[scene.background]
    radius = max(2, min(width, height) // 6)
    dx, dy = DIRECTIONS[scene.direction]
    # from one edge to the other along the direction, centred on the other axis
    cx = width / 2 + dx * (progress - 0.5) * (width - 2 * radius)
    cy = height / 2 + dy * (progress - 0.5) * (height - 2 * radius)
    yy, xx = np.mgrid[0:height, 0:width]
    if scene.shape == "circle":
        inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2
    else:
        inside = (np.abs(xx + 0.5 - cx) <= radius) & (np.abs(yy + 0.5 - cy) <= radius)
    frame[inside] = COLOURS[scene.colour]
    return frame


def make_synthetic_dataset(root: str | Path, *, num_videos: int = 8, num_images: int = 8, width: int = 64,
                           height: int = 64, frames: int = 17, fps: float = 24.0, seed: int = 0,
                           vary_size: bool = False, batch_size: int = 1) -> Path:
    """Write `root`/videos, `root`/images (with captions) and `root`/dataset.toml; returns the TOML path.

    The TOML has an image dataset and a video dataset (one left out when it has no items), each with
    its own cache folder under `root`/cache. Sizes must be multiples of 16 and `frames` 4N+1. With
    `vary_size`, every other item is portrait (height x width) so that bucketing has two buckets to
    fill. Deterministic for a given seed.
    """
    if width % 16 or height % 16:
        raise ValueError(f"width and height must be multiples of 16, got {width}x{height}")
    if frames != round_to_4n1(frames):
        raise ValueError(f"frames must be 4N+1 (like 17 or 25), got {frames}")
    if num_videos + num_images == 0:
        raise ValueError("nothing to write: num_videos and num_images are both 0")
    root = Path(root).resolve()
    rng = random.Random(seed)
    sizes = [(width, height), (height, width)] if vary_size else [(width, height)]
    for i in range(num_videos):
        scene, (w, h) = random_scene(rng), sizes[i % len(sizes)]
        clip = np.stack([draw(scene, w, h, t / max(1, frames - 1)) for t in range(frames)])
        write_video(root / "videos" / f"clip_{i:04d}.mp4", clip, fps=fps, bitrate=400_000)
        _write_text(root / "videos" / f"clip_{i:04d}.txt", scene.caption(moving=True))
    for i in range(num_images):
        scene, (w, h) = random_scene(rng), sizes[i % len(sizes)]
        image_path = root / "images" / f"image_{i:04d}.png"
        with atomic_write(image_path) as tmp:
            Image.fromarray(draw(scene, w, h, rng.random())).save(tmp, format="PNG")
        _write_text(root / "images" / f"image_{i:04d}.txt", scene.caption(moving=False))
    return _write_toml(root, width, height, frames, vary_size, batch_size, seed, num_images > 0, num_videos > 0)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _write_toml(root: Path, width: int, height: int, frames: int, vary_size: bool, batch_size: int, seed: int,
                with_images: bool, with_videos: bool) -> Path:
    def quoted(path: Path) -> str:
        return json.dumps(str(path))  # a TOML basic string: JSON's escaping is valid TOML

    toml = f"""# Synthetic dataset written by musubi_tuner.demo.synthetic_data (seed {seed})
[general]
resolution = [{width}, {height}]
caption_extension = ".txt"
batch_size = {batch_size}
enable_bucket = {str(vary_size).lower()}
"""
    if with_images:
        toml += f"""
[[datasets]]
image_directory = {quoted(root / "images")}
cache_directory = {quoted(root / "cache" / "images")}
"""
    if with_videos:
        toml += f"""
[[datasets]]
video_directory = {quoted(root / "videos")}
cache_directory = {quoted(root / "cache" / "videos")}
target_frames = [{frames}]
frame_extraction = "head"
"""
    path = root / "dataset.toml"
    with atomic_write(path) as tmp:
        tmp.write_text(toml, encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "\n").splitlines()[0] or None)  # (None under python -OO)
    parser.add_argument("output_dir")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 4N+1")
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vary_size", action="store_true", help="alternate landscape and portrait items")
    parser.add_argument("--batch_size", type=int, default=1)
    args = parser.parse_args(argv)
    toml = make_synthetic_dataset(args.output_dir, num_videos=args.videos, num_images=args.images, width=args.width,
                                  height=args.height, frames=args.frames, fps=args.fps, seed=args.seed,
                                  vary_size=args.vary_size, batch_size=args.batch_size)
    print(f"wrote {args.videos} clips and {args.images} images; dataset config: {toml}")


if __name__ == "__main__":
    main()
