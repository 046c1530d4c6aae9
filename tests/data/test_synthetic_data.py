"""The synthetic dataset: real files, captions that state the colours and motion, deterministic by seed."""

import time

import numpy as np
import pytest

from musubi_tuner.data import media
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.demo.synthetic_data import COLOURS, main, make_synthetic_dataset


def test_it_writes_clips_images_captions_and_a_config_that_loads(tmp_path):
    toml = make_synthetic_dataset(tmp_path, num_videos=3, num_images=2, width=48, height=32, frames=9)
    config = load_dataset_config(toml)
    images, videos = config.datasets
    assert (images.is_video, videos.is_video, videos.target_frames) == (False, True, (9,))
    assert images.cache_directory != videos.cache_directory
    assert len(media.list_videos(tmp_path / "videos")) == 3 and len(media.list_images(tmp_path / "images")) == 2
    assert media.load_video(tmp_path / "videos" / "clip_0000.mp4").frames.shape == (9, 32, 48, 3)


def test_the_caption_states_the_colour_the_clip_shows(tmp_path):
    make_synthetic_dataset(tmp_path, num_videos=4, num_images=0, width=64, height=64, frames=5)
    for i in range(4):
        caption = (tmp_path / "videos" / f"clip_{i:04d}.txt").read_text()
        colour = next(name for name in COLOURS if f" {name} " in caption)
        frames = media.load_video(tmp_path / "videos" / f"clip_{i:04d}.mp4").frames.reshape(-1, 3).astype(int)
        distance = np.abs(frames - np.array(COLOURS[colour])).sum(axis=1)
        assert (distance < 60).mean() > 0.05, caption  # a good share of pixels are that colour


def test_the_shape_moves_the_way_the_caption_says(tmp_path):
    make_synthetic_dataset(tmp_path, num_videos=6, num_images=0, width=64, height=64, frames=9, seed=3)
    for i in range(6):
        caption = (tmp_path / "videos" / f"clip_{i:04d}.txt").read_text()
        frames = media.load_video(tmp_path / "videos" / f"clip_{i:04d}.mp4").frames.astype(int)
        background = frames[0, 0, 0]
        centres = []
        for frame in (frames[0], frames[-1]):
            ys, xs = np.nonzero(np.abs(frame - background).sum(axis=2) > 80)
            centres.append((xs.mean(), ys.mean()))
        dx, dy = centres[1][0] - centres[0][0], centres[1][1] - centres[0][1]
        direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert f"moving {direction}" in caption


def test_the_same_seed_gives_the_same_dataset(tmp_path):
    for name in ("a", "b"):
        make_synthetic_dataset(tmp_path / name, num_videos=2, num_images=2, seed=7)
    for relative in ("videos/clip_0001.txt", "images/image_0001.txt", "images/image_0001.png", "videos/clip_0001.mp4"):
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()


def test_a_hundred_tiny_clips_take_seconds(tmp_path):
    start = time.perf_counter()
    toml = make_synthetic_dataset(tmp_path, num_videos=100, num_images=0, width=32, height=32, frames=9)
    assert time.perf_counter() - start < 15  # about one second on two cores
    assert [d.is_video for d in load_dataset_config(toml).datasets] == [True]  # no empty image dataset


def test_sizes_and_frames_the_model_cannot_use_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiples of 16"):
        make_synthetic_dataset(tmp_path, width=50)
    with pytest.raises(ValueError, match="4N\\+1"):
        make_synthetic_dataset(tmp_path, frames=8)


def test_the_command_line_writes_the_dataset(tmp_path, capsys):
    main([str(tmp_path), "--videos", "1", "--images", "1", "--frames", "5"])
    assert "dataset.toml" in capsys.readouterr().out and (tmp_path / "dataset.toml").exists()
