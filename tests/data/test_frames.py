"""Frame extraction reproduces the diagrams of musubi-tuner's docs/dataset_config.md (a 40-frame video)."""

import pytest

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


def test_only_head_limits_decoding():
    assert decode_limit("head", (1, 25, 45)) == 45
    assert decode_limit("chunk", (25,)) is None
