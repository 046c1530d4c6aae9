"""Frame extraction reproduces the diagrams of musubi-tuner's docs/dataset_config.md (a 40-frame video)."""

import numpy as np
import pytest

from musubi_tuner.data import items, media
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.frames import (Clip, decode_limit, extract_clips, latent_frames, normalize_target_frames,
                                      round_to_4n1)


def draw(clips, num_frames):
    """One row per clip: x = frame in the clip, o = not, as the doc draws them."""
    return ["".join("x" if c.start <= i < c.start + c.frames else "o" for i in range(num_frames)) for c in clips]


def rows(text):
    return [line.strip() for line in text.strip().splitlines()]


def test_head_takes_the_first_frames_for_each_target():
    assert draw(extract_clips(40, "head", (1, 13, 25)), 40) == rows("""
        xooooooooooooooooooooooooooooooooooooooo
        xxxxxxxxxxxxxooooooooooooooooooooooooooo
        xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo
    """)


def test_chunk_splits_into_non_overlapping_pieces():
    assert draw(extract_clips(40, "chunk", (13, 25)), 40) == rows("""
        xxxxxxxxxxxxxooooooooooooooooooooooooooo
        oooooooooooooxxxxxxxxxxxxxoooooooooooooo
        ooooooooooooooooooooooooooxxxxxxxxxxxxxo
        xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo
    """)


def test_chunk_with_a_target_of_one_makes_every_frame_a_clip():
    assert extract_clips(40, "chunk", (1,)) == [Clip(i, 1) for i in range(40)]


def test_slide_moves_by_frame_stride():
    assert draw(extract_clips(40, "slide", (1, 13, 25), frame_stride=10), 40) == rows("""
        xooooooooooooooooooooooooooooooooooooooo
        ooooooooooxooooooooooooooooooooooooooooo
        ooooooooooooooooooooxooooooooooooooooooo
        ooooooooooooooooooooooooooooooxooooooooo
        xxxxxxxxxxxxxooooooooooooooooooooooooooo
        ooooooooooxxxxxxxxxxxxxooooooooooooooooo
        ooooooooooooooooooooxxxxxxxxxxxxxooooooo
        xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo
        ooooooooooxxxxxxxxxxxxxxxxxxxxxxxxxooooo
    """)


def test_uniform_spreads_frame_sample_clips_evenly():
    # The doc draws the third 1-frame clip at frame 25; musubi-tuner's code (linspace(0, 39, 4) -> 0, 13, 26, 39)
    # puts it at 26, and we follow the code.
    assert draw(extract_clips(40, "uniform", (1, 13, 25), frame_sample=4), 40) == rows("""
        xooooooooooooooooooooooooooooooooooooooo
        oooooooooooooxoooooooooooooooooooooooooo
        ooooooooooooooooooooooooooxooooooooooooo
        ooooooooooooooooooooooooooooooooooooooox
        xxxxxxxxxxxxxooooooooooooooooooooooooooo
        oooooooooxxxxxxxxxxxxxoooooooooooooooooo
        ooooooooooooooooooxxxxxxxxxxxxxooooooooo
        oooooooooooooooooooooooooooxxxxxxxxxxxxx
        xxxxxxxxxxxxxxxxxxxxxxxxxooooooooooooooo
        oooooxxxxxxxxxxxxxxxxxxxxxxxxxoooooooooo
        ooooooooooxxxxxxxxxxxxxxxxxxxxxxxxxooooo
        oooooooooooooooxxxxxxxxxxxxxxxxxxxxxxxxx
    """)


# The doc's example (max_frames = 31) says the 35-frame video is "trimmed to 31 frames"; 31 is not 4N+1 and
# musubi-tuner's code rounds it down to 29, as we do.
@pytest.mark.parametrize("num_frames, kept", [(20, 17), (25, 25), (35, 29)])
def test_full_keeps_everything_up_to_max_frames_as_4n_plus_1(num_frames, kept):
    assert extract_clips(num_frames, "full", (1,), max_frames=31) == [Clip(0, kept)]


def test_targets_longer_than_the_video_give_no_clip():
    assert extract_clips(10, "head", (1, 13, 25)) == [Clip(0, 1)]
    assert extract_clips(10, "slide", (13, 25)) == []
    assert extract_clips(0, "full", (1,)) == []


def test_uniform_on_a_short_video_may_repeat_a_start():
    assert extract_clips(14, "uniform", (13,), frame_sample=4) == [Clip(0, 13), Clip(0, 13), Clip(0, 13), Clip(1, 13)]


def test_target_frames_round_down_to_4n_plus_1_sorted_and_unique():
    assert [round_to_4n1(f) for f in (1, 4, 5, 24, 25, 129, 130)] == [1, 1, 5, 21, 25, 129, 129]
    assert normalize_target_frames([45, 24, 1, 21, 25]) == (1, 21, 25, 45)


def test_latent_frames_follow_the_causal_vae():
    assert [latent_frames(f) for f in (1, 5, 25, 45, 129)] == [1, 2, 7, 12, 33]


def test_head_and_full_limit_decoding_to_the_frames_they_use():
    assert decode_limit("head", (1, 25, 45), 129) == 45
    assert decode_limit("full", (1,), 33) == 33  # (fuzz_ag 1b: a whole video was decoded and held for its first 33)
    assert all(max(c.start + c.frames for c in extract_clips(n, "full", (1,), max_frames=33)) <= 33 for n in range(1, 100))
    assert decode_limit("chunk", (25,), 129) is None


# ------------------------------------------------------------------------------------------ through a real video


def encoded_clips(tmp_path, num_frames, dataset_keys):
    """Clips that caching would encode from an mp4 whose frame i is flat grey 6*i: [(Clip, frame greys)]."""
    videos = tmp_path / "videos"
    videos.mkdir()
    frames = np.stack([np.full((32, 32, 3), 6 * i, np.uint8) for i in range(num_frames)])
    media.write_video(videos / "walk.mp4", frames, bitrate=2_000_000)
    (videos / "walk.txt").write_text("a grey ramp")
    (tmp_path / "dataset.toml").write_text(
        f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n[[datasets]]\n'
        f'video_directory = "{videos.as_posix()}"\ncache_directory = "{(tmp_path / "cache").as_posix()}"\n{dataset_keys}')
    dataset = load_dataset_config(tmp_path / "dataset.toml").datasets[0]
    return [(item.clip, [round(float(frame.mean()) / 6) for frame in item.pixels])
            for batch in items.iter_latent_batches(dataset, items.CacheReport()) for item in batch.items]


@pytest.mark.parametrize("num_frames, dataset_keys, expected", [
    (40, 'target_frames = [1, 13, 25]\nframe_extraction = "head"', extract_clips(40, "head", (1, 13, 25))),
    (40, 'target_frames = [13, 25]\nframe_extraction = "chunk"', extract_clips(40, "chunk", (13, 25))),
    (40, 'target_frames = [1, 13, 25]\nframe_extraction = "slide"\nframe_stride = 10',
     extract_clips(40, "slide", (1, 13, 25), frame_stride=10)),
    (40, 'target_frames = [1, 13, 25]\nframe_extraction = "uniform"\nframe_sample = 4',
     extract_clips(40, "uniform", (1, 13, 25), frame_sample=4)),
    (35, 'frame_extraction = "full"\nmax_frames = 31', [Clip(0, 29)]),
], ids=["head", "chunk", "slide", "uniform", "full"])
def test_the_clips_cached_from_a_video_hold_exactly_the_drawn_frames(tmp_path, num_frames, dataset_keys, expected):
    clips = encoded_clips(tmp_path, num_frames, dataset_keys)
    assert sorted(clip for clip, _ in clips) == sorted(expected)
    for clip, frame_numbers in clips:
        assert frame_numbers == list(range(clip.start, clip.start + clip.frames))
