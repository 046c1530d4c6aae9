"""Which cached items validation_split holds out: a fixed set, whatever the seed, with a video's clips on one side."""

import pytest

from helpers import write_cached_dataset
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.training_dataset import TrainingDataset, find_cached_items, held_out_keys, validation_batches


def test_held_out_items_are_a_fixed_fraction_and_never_all():
    keys = [f"clip{i}" for i in range(20)]
    assert len(held_out_keys(keys, 0.1)) == 2 and len(held_out_keys(keys, 0.25)) == 5
    assert held_out_keys(keys, 0.1) == held_out_keys(list(reversed(keys)), 0.1)  # order does not matter
    assert len(held_out_keys(keys[:3], 0.01)) == 1  # a split asked for holds out at least one item
    assert len(held_out_keys(keys[:2], 0.9)) == 1  # and leaves at least one to train on
    assert held_out_keys(keys[:1], 0.5) == set() and held_out_keys(keys, 0.0) == set()


def test_adding_items_moves_few_held_out_ones_to_training():
    before = held_out_keys([f"clip{i}" for i in range(100)], 0.1)
    after = held_out_keys([f"clip{i}" for i in range(110)], 0.1)
    assert len(before - after) <= 2


@pytest.fixture
def split_dataset(tmp_path):
    toml = write_cached_dataset(tmp_path, items=8, frames=1, size=(32, 32))
    toml.write_text(toml.read_text().replace("[general]\n", "[general]\nvalidation_split = 0.25\nnum_repeats = 2\n"))
    return load_dataset_config(toml, check_sources=False)


def test_training_and_validation_take_disjoint_items_and_validation_takes_each_once(split_dataset):
    (ds,) = split_dataset.datasets
    trained = [i.latent_path.name for items in find_cached_items(ds).buckets.values() for i in items]
    held = [i.latent_path.name for items in find_cached_items(ds, held_out=True).buckets.values() for i in items]
    assert len(held) == 2 and len(set(held)) == 2  # 0.25 of 8, no repeats
    assert len(trained) == 12 and len(set(trained)) == 6  # the other 6, twice each (num_repeats = 2)
    assert not set(held) & set(trained)
    epoch = TrainingDataset.from_config(split_dataset, seed=0).epoch_plan(1)
    assert not {i.latent_path.name for plan in epoch for i in plan.items} & set(held)


def test_validation_batches_are_the_same_whatever_the_training_seed(split_dataset):
    first, second = validation_batches(split_dataset), validation_batches(split_dataset)
    assert first == second and [len(p.items) for p in first] == [1, 1]


def test_the_clips_of_one_video_stay_on_one_side(tmp_path):
    from musubi_tuner.data import cache_files
    import torch

    toml = write_cached_dataset(tmp_path, items=6, frames=5, size=(32, 32))
    cache = tmp_path / "cache"
    for i in range(6):  # a second clip of every video
        latent = torch.zeros(16, 2, 4, 4, dtype=torch.float16)
        cache_files.save_latent_cache(cache_files.latent_cache_path(cache, f"clip{i}", (32, 32), (5, 5)), latent, size=(32, 32), frame_count=5)
    toml.write_text(toml.read_text().replace("[general]\n", "[general]\nvalidation_split = 0.34\n"))
    (ds,) = load_dataset_config(toml, check_sources=False).datasets
    held = [i.latent_path.name for items in find_cached_items(ds, held_out=True).buckets.values() for i in items]
    videos = {name.split("_")[0] for name in held}
    assert len(videos) == 2 and len(held) == 4  # two whole videos, both clips each
