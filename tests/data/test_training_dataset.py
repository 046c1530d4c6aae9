"""Training batches come from caches only: per bucket, deterministic per (seed, epoch), resumable mid-epoch."""

import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from musubi_tuner.data import cache_files
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.training_dataset import TrainingDataset, make_dataloader
from musubi_tuner.errors import UserError


def write_item(cache, stem, size=(64, 32), clip=None, text=True, llm_dtype=torch.float16):
    """A latent cache and (unless text=False) a text cache, as the caching commands would write them."""
    frames = 1 if clip is None else (clip[1] - 1) // 4 + 1
    latent = torch.full((16, frames, size[1] // 8, size[0] // 8), float(hash(stem) % 1000))
    cache_files.save_latent_cache(cache_files.latent_cache_path(cache, stem, size, clip), latent.half(), size=size,
                                  frame_count=None if clip is None else clip[1])
    if text:
        tensors = {**cache_files.text_encoder_tensors("llm", torch.randn(256, 8).to(llm_dtype), torch.ones(256, dtype=torch.int64)),
                   **cache_files.text_encoder_tensors("clipL", torch.randn(768).half(), torch.ones(77, dtype=torch.int64))}
        cache_files.save_text_cache(cache_files.text_cache_path(cache, stem), stem, tensors)


def dataset_config(tmp_path, image_extra="", video_extra=""):
    text = f"""
[general]
resolution = [64, 64]
caption_extension = ".txt"
enable_bucket = true
[[datasets]]
image_directory = "{tmp_path / 'images'}"
cache_directory = "{tmp_path / 'cache_i'}"
batch_size = 3
{image_extra}
[[datasets]]
video_directory = "{tmp_path / 'videos'}"
cache_directory = "{tmp_path / 'cache_v'}"
batch_size = 2
{video_extra}
"""
    (tmp_path / "dataset.toml").write_text(text)
    return load_dataset_config(tmp_path / "dataset.toml", check_sources=False)


@pytest.fixture
def cached(tmp_path):
    for i in range(7):
        write_item(tmp_path / "cache_i", f"img_{i}", size=(64, 32) if i % 2 else (32, 64))
    for i in range(5):
        write_item(tmp_path / "cache_v", f"vid_{i}", size=(64, 64), clip=(0, 5))
        write_item(tmp_path / "cache_v", f"vid_{i}", size=(64, 64), clip=(0, 1))
    return dataset_config(tmp_path)


def plan_files(plan):
    return [[item.latent_path.name for item in batch.items] for batch in plan]


def test_batches_have_musubi_tuners_keys_and_shapes(cached):
    dataset = TrainingDataset.from_config(cached, seed=1)
    shapes = set()
    for plan in dataset.epoch_plan(1):
        batch = dataset[plan]
        assert sorted(batch) == ["clipL", "clipL_mask", "item_names", "latents", "llm", "llm_mask", "sample_ids", "timesteps"]
        bsz = len(plan.items)
        assert batch["latents"].shape == (bsz, 16, *plan.shape) and batch["llm"].shape == (bsz, 256, 8)
        assert batch["llm_mask"].shape == (bsz, 256) and batch["clipL"].shape == (bsz, 768)
        assert batch["clipL_mask"].shape == (bsz, 77) and batch["timesteps"] is None
        shapes.add(plan.shape)
    assert shapes == {(1, 4, 8), (1, 8, 4), (2, 8, 8), (1, 8, 8)}


def test_a_batch_never_mixes_buckets_or_datasets(cached):
    dataset = TrainingDataset.from_config(cached, seed=1)
    plan = dataset.epoch_plan(1)
    # images: 4 portrait + 3 landscape in batches of 3; clips: 5 + 5 in batches of 2
    assert sorted(len(b.items) for b in plan if b.dataset == 0) == [1, 3, 3]
    assert sorted(len(b.items) for b in plan if b.dataset == 1) == [1, 1, 2, 2, 2, 2]
    for batch in plan:
        names = [i.latent_path.name for i in batch.items]
        assert len({n.startswith("img") for n in names}) == 1
    assert len(dataset) == 9 and dataset.num_items == 17


def test_the_order_depends_only_on_seed_and_epoch(cached):
    first, again = TrainingDataset.from_config(cached, seed=5), TrainingDataset.from_config(cached, seed=5)
    assert plan_files(first.epoch_plan(3)) == plan_files(again.epoch_plan(3))
    assert plan_files(first.epoch_plan(3)) != plan_files(first.epoch_plan(4))
    assert plan_files(first.epoch_plan(3)) != plan_files(TrainingDataset.from_config(cached, seed=6).epoch_plan(3))
    every_epoch = {tuple(sorted(n for b in plan_files(first.epoch_plan(e)) for n in b)) for e in (1, 2, 3)}
    assert len(every_epoch) == 1  # each epoch sees every item once


def test_sample_ids_follow_the_sample_whatever_the_batch_size_and_number_of_processes(cached):
    def ids_by_sample(dataset, world=1):
        from musubi_tuner.data.training_dataset import EpochSampler

        seen = {}
        for rank in range(world):
            sampler = EpochSampler(dataset, rank, world)
            sampler.set_epoch(2)
            for plan in sampler:
                for item, sample_id in zip(plan.items, plan.sample_ids):
                    seen.setdefault(item.latent_path.name, set()).add(sample_id)
        return seen

    dataset = TrainingDataset.from_config(cached, seed=3)
    ids = ids_by_sample(dataset)
    assert sorted(i for s in ids.values() for i in s) == list(range(dataset.num_items))  # one id per sample of the epoch
    one_by_one = TrainingDataset([type(d)(d.buckets, 1) for d in dataset.datasets], seed=3)
    assert ids_by_sample(one_by_one) == ids == ids_by_sample(one_by_one, world=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_continues_with_exactly_the_following_batches(cached, workers):
    dataset = TrainingDataset.from_config(cached, seed=11)
    loader, sampler = make_dataloader(dataset, num_workers=workers)
    sampler.set_epoch(2)
    full = [batch["latents"] for batch in loader]
    sampler.set_epoch(2, start=4)  # as if the run stopped after 4 batches of epoch 2
    resumed = [batch["latents"] for batch in loader]
    assert len(full) == 9 and len(resumed) == 5
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed))


def test_num_repeats_repeats_each_item_within_its_bucket(tmp_path):
    for i in range(2):
        write_item(tmp_path / "cache_i", f"img_{i}")
    config = dataset_config(tmp_path, image_extra="num_repeats = 3")
    dataset = TrainingDataset.from_config(config, seed=0)
    assert dataset.num_items == 6 and len(dataset) == 2  # batch_size 3


def test_items_without_a_text_cache_are_left_out_with_a_warning(tmp_path, caplog):
    write_item(tmp_path / "cache_i", "with")
    write_item(tmp_path / "cache_i", "without", text=False)
    with caplog.at_level(logging.WARNING):
        dataset = TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    assert dataset.num_items == 1
    assert "without_0064x0032_hv.safetensors: no text cache without_hv_te.safetensors" in caplog.text


def test_a_folder_named_like_a_cache_is_no_cached_item_and_another_file_is_named_an_image_cache_name(tmp_path, caplog):
    """fuzz_bc 12: a folder named like a latent cache was "left out", "trained on as cached" and "delete it" at once; and
    a file that is no cache name was "not a image cache name"."""
    write_item(tmp_path / "cache_i", "ok")
    (tmp_path / "cache_i" / "zzz_0080x0048_hv.safetensors").mkdir()
    (tmp_path / "cache_i" / "stray_hv.safetensors").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        assert TrainingDataset.from_config(dataset_config(tmp_path), seed=0).num_items == 1
    assert "zzz" not in caplog.text and "stray_hv.safetensors: not an image cache name" in caplog.text


def test_a_text_cache_from_an_interrupted_two_pass_run_is_left_out(tmp_path, caplog):
    write_item(tmp_path / "cache_i", "ok")
    write_item(tmp_path / "cache_i", "half", text=False)
    cache_files.save_text_cache(cache_files.text_cache_path(tmp_path / "cache_i", "half"), "c",
                                cache_files.text_encoder_tensors("llm", torch.zeros(256, 8).half(), None))
    with caplog.at_level(logging.WARNING):
        assert TrainingDataset.from_config(dataset_config(tmp_path), seed=0).num_items == 1
    assert "no clipL output" in caplog.text


def test_float8_text_outputs_load_and_keep_their_dtype(tmp_path):
    write_item(tmp_path / "cache_i", "a", llm_dtype=torch.float8_e4m3fn)
    dataset = TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    assert dataset[dataset.epoch_plan(1)[0]]["llm"].dtype == torch.float8_e4m3fn


def test_float64_caches_load_as_float32_and_fp8_beside_fp16_in_a_batch_stacks(tmp_path):
    """fuzz_ar 2: float64 text states met the bf16 DiT with a traceback at the first step; an fp8 cache batched with
    fp16 ones could not be stacked (in the loader's worker). musubi-tuner reads caches of any float dtype."""
    write_item(tmp_path / "cache_i", "a", llm_dtype=torch.float64)
    write_item(tmp_path / "cache_i", "b", llm_dtype=torch.float8_e4m3fn)
    write_item(tmp_path / "cache_i", "c")
    dataset = TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    (plan,) = dataset.epoch_plan(1)  # the three in one batch (batch_size 3)
    batch = dataset[plan]
    assert batch["llm"].dtype == torch.float32 and batch["llm"].shape == (3, 256, 8)
    write_item(tmp_path / "cache_i", "b", llm_dtype=torch.float64)
    write_item(tmp_path / "cache_i", "c", llm_dtype=torch.float64)
    assert dataset[plan]["llm"].dtype == torch.float32


def test_no_cached_items_tells_the_user_to_run_the_caching_commands(tmp_path):
    with pytest.raises(UserError) as info:
        TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    message = str(info.value)
    assert "no cached training items in" in message and str(tmp_path / "cache_i") in message
    assert "run cache_latents.py and cache_text_encoder_outputs.py" in message


def test_caches_of_another_size_go_to_their_own_bucket_with_a_warning(tmp_path, caplog):
    # made with another resolution: same name size rules, different latent shape
    write_item(tmp_path / "cache_i", "a", size=(64, 32))
    write_item(tmp_path / "cache_i", "b", size=(64, 32))
    save_file({"latents_1x8x8_float16": torch.zeros(16, 1, 8, 8).half()},
              str(tmp_path / "cache_i" / "b_0064x0032_hv.safetensors"), metadata={"architecture": "hunyuan_video"})
    with caplog.at_level(logging.WARNING):
        dataset = TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    assert sorted(b.shape for b in dataset.epoch_plan(1)) == [(1, 4, 8), (1, 8, 8)]
    assert "not the size this config gives" in caplog.text and "run cache_latents.py again" in caplog.text


def test_clips_of_a_length_target_frames_no_longer_gives_are_used_with_a_warning(tmp_path, caplog):
    write_item(tmp_path / "cache_v", "vid", size=(64, 64), clip=(0, 5))  # cached with target_frames = [5]
    write_item(tmp_path / "cache_i", "img")
    with caplog.at_level(logging.WARNING):
        TrainingDataset.from_config(dataset_config(tmp_path, video_extra="target_frames = [9]"), seed=0)
    assert "1 clip caches in" in caplog.text and "of a length target_frames [9] does not give" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        TrainingDataset.from_config(dataset_config(tmp_path, video_extra="target_frames = [1, 5]"), seed=0)
    assert "target_frames" not in caplog.text


def test_the_timestep_pool_draws_equally_from_each_interval(cached):
    dataset = TrainingDataset.from_config(cached, seed=2, num_timestep_buckets=4)
    plan = dataset.epoch_plan(1)
    for batch in plan:
        assert len(batch.timesteps) == len(batch.items)
    # the clips: 6 batches of 2 need 12 values, 3 from each quarter of [0, 1); 10 are used
    values = [t for b in plan if b.dataset == 1 for t in b.timesteps]
    counts = [sum(i / 4 <= t < (i + 1) / 4 for t in values) for i in range(4)]
    assert sum(counts) == 10 and max(counts) <= 3
    assert plan == TrainingDataset.from_config(cached, seed=2, num_timestep_buckets=4).epoch_plan(1)
    assert dataset[plan[0]]["timesteps"] == list(plan[0].timesteps)


def test_processes_share_an_epoch_without_overlap_and_with_equal_step_counts(tmp_path):
    from musubi_tuner.data.training_dataset import EpochSampler

    class Fake:
        def __len__(self):
            return 7

        def epoch_plan(self, epoch):
            return [f"b{i}" for i in range(7)]

    shards = [list(EpochSampler(Fake(), rank, 2)) for rank in (0, 1)]
    assert shards == [["b0", "b2", "b4", "b6"], ["b1", "b3", "b5", "b0"]]
    resumed = EpochSampler(Fake(), 1, 2)
    resumed.set_epoch(1, start=2)
    assert list(resumed) == ["b5", "b0"]


def _damage(path, change):
    """Rewrite a cache file with `change(tensors)` applied to its stored tensors, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(change(load_file(str(path))), str(path), metadata=metadata)


@pytest.mark.parametrize("stored, problem", [
    ({"latents_1x4x8_int32": torch.ones(16, 1, 4, 8, dtype=torch.int32)}, "latents_1x4x8_int32 is int32, not a floating-point tensor"),
    ({"latents_1x4x8_bool": torch.ones(16, 1, 4, 8, dtype=torch.bool)}, "latents_1x4x8_bool is bool, not a floating-point tensor"),
    ({"latents_0x4x8_float16": torch.ones(16, 0, 4, 8).half()}, r"latents_0x4x8_float16 has shape [16, 0, 4, 8], a dimension of 0"),
    ({"latents_1x0x0_float16": torch.ones(16, 1, 0, 0).half()}, r"latents_1x0x0_float16 has shape [16, 1, 0, 0], a dimension of 0"),
    ({"latents_1x3x7_float16": torch.ones(16, 1, 3, 7).half()},
     "latents_1x3x7_float16 has shape [16, 1, 3, 7]: frames, height and width must be multiples of the DiT's patch [1, 2, 2]"),
    ({"latents_4x8_float16": torch.ones(16, 4, 8).half()}, "not one (C, F, H, W) latents tensor"),
])
def test_a_latent_cache_training_cannot_use_is_left_out_naming_the_file_and_the_fault(tmp_path, caplog, stored, problem):
    """Integer, bool, empty or odd-sized latents crashed mid-run or trained on garbage (fuzz D5, D7)."""
    write_item(tmp_path / "cache_i", "good")
    write_item(tmp_path / "cache_i", "bad")
    save_file(stored, str(tmp_path / "cache_i" / "bad_0064x0032_hv.safetensors"), metadata={"architecture": "hunyuan_video"})
    with caplog.at_level(logging.WARNING):
        dataset = TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    assert dataset.num_items == 1
    assert [i.latent_path.name for b in dataset.epoch_plan(1) for i in b.items] == ["good_0064x0032_hv.safetensors"]
    assert f"[[datasets]][0]: 1 cached items left out: bad_0064x0032_hv.safetensors: {problem}; delete it and run " \
           f"cache_latents.py again" in caplog.text
    dataset[dataset.epoch_plan(1)[0]]  # what is left loads


@pytest.mark.parametrize("cache, command", [("bad_0064x0032_hv.safetensors", "cache_latents.py"),
                                            ("bad_hv_te.safetensors", "cache_text_encoder_outputs.py")])
def test_a_truncated_cache_is_left_out_with_the_caching_command_to_remake_it(tmp_path, caplog, cache, command):
    """fuzz_ak 5, fuzz_ar 7: a cut cache was left out with "download it again" (a text cache's with no advice at times):
    a cache is made again, by the caching command."""
    write_item(tmp_path / "cache_i", "good")
    write_item(tmp_path / "cache_i", "bad")
    bad = tmp_path / "cache_i" / cache
    bad.write_bytes(bad.read_bytes()[:60])
    with caplog.at_level(logging.WARNING):
        assert TrainingDataset.from_config(dataset_config(tmp_path), seed=0).num_items == 1
    assert "1 cached items left out: " in caplog.text and "download it again" not in caplog.text
    assert f"delete it and run {command} again" in caplog.text


def _text(llm=(256, 8), mask=(256,), clip=(768,), llm_dtype=torch.float16, mask_dtype=torch.int64, clip_mask=(77,)):
    def change(tensors):
        out = {f"llm_{str(llm_dtype).removeprefix('torch.')}": torch.ones(llm).to(llm_dtype),
               "clipL_float16": torch.ones(clip).half()}
        if mask is not None:
            out["llm_mask"] = torch.ones(mask).to(mask_dtype)
        if clip_mask is not None:
            out["clipL_mask"] = torch.ones(clip_mask, dtype=torch.int64)
        return out
    return change


@pytest.mark.parametrize("change, problem", [
    (_text(mask=None), "bad_hv_te.safetensors has no llm_mask (the LLM output's token mask)"),
    (_text(llm=(8,), mask=(8,)), "bad_hv_te.safetensors: llm_float16 has shape [8], expected [tokens, width] with no dimension 0"),
    (_text(llm=(1, 256, 8)), "bad_hv_te.safetensors: llm_float16 has shape [1, 256, 8], expected [tokens, width] with no dimension 0"),
    (_text(llm=(0, 8), mask=(0,)), "bad_hv_te.safetensors: llm_float16 has shape [0, 8], expected [tokens, width] with no dimension 0"),
    (_text(clip=(1, 768)), "bad_hv_te.safetensors: clipL_float16 has shape [1, 768], expected [width] with no dimension 0"),
    (_text(llm_dtype=torch.int32), "bad_hv_te.safetensors: llm_int32 is int32, not a floating-point tensor"),
    (_text(mask_dtype=torch.float32), "bad_hv_te.safetensors: llm_mask is float32, not an integer or bool tensor"),
    (_text(mask=(100,)), "bad_hv_te.safetensors: llm_float16 has 256 tokens but llm_mask 100; they must match"),
    (_text(llm=(300, 8)), "bad_hv_te.safetensors: llm_float16 has 300 tokens but llm_mask 256; they must match"),
    (_text(clip_mask=(1, 77)), "bad_hv_te.safetensors: clipL_mask has shape [1, 77], expected [tokens] with no dimension 0"),
])
def test_a_text_cache_training_cannot_use_is_left_out_naming_the_file_and_the_fault(tmp_path, caplog, change, problem):
    """A missing mask, a wrong rank or dtype, or a mask of another length crashed mid-run or trained silently (fuzz D6, D7, D14)."""
    write_item(tmp_path / "cache_i", "good")
    write_item(tmp_path / "cache_i", "bad")
    _damage(tmp_path / "cache_i" / "bad_hv_te.safetensors", change)
    with caplog.at_level(logging.WARNING):
        dataset = TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    assert dataset.num_items == 1
    assert f"1 cached items left out: bad_0064x0032_hv.safetensors: {problem}; delete it and run " \
           f"cache_text_encoder_outputs.py again" in caplog.text
    dataset[dataset.epoch_plan(1)[0]]


def test_text_caches_as_the_caching_command_writes_them_pass_bool_masks_and_no_clip_mask_included(tmp_path, caplog):
    write_item(tmp_path / "cache_i", "a")
    write_item(tmp_path / "cache_i", "b")
    _damage(tmp_path / "cache_i" / "b_hv_te.safetensors", _text(mask_dtype=torch.bool, clip_mask=None))
    with caplog.at_level(logging.WARNING):
        assert TrainingDataset.from_config(dataset_config(tmp_path), seed=0).num_items == 2
    assert "left out" not in caplog.text


def test_when_every_cache_is_unusable_training_stops_before_any_model_loads(tmp_path, caplog):
    write_item(tmp_path / "cache_i", "a")
    _damage(tmp_path / "cache_i" / "a_hv_te.safetensors", _text(llm_dtype=torch.int32))
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="no cached training items in"):
        TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    assert "a_hv_te.safetensors: llm_int32 is int32, not a floating-point tensor" in caplog.text


def test_a_cache_folder_that_cannot_be_listed_is_an_error_naming_it_not_a_dataset_without_caches():
    """fuzz_aq 3: Path.glob took a cache_directory the user may not list for an empty one: the dataset was left out with
    "no latent cache ... run cache_latents.py again", and the run trained without it (exit 0)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from helpers import write_cached_dataset

    if os.geteuid() != 0:
        pytest.skip("needs root, to run as another user (root lists any folder)")
    folder = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))  # (pytest's folders are root's alone: not passable)
    try:
        toml = write_cached_dataset(folder / "data", items=2)
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, 54321, 54321)
        os.chmod(folder / "data" / "cache", 0o000)
        code = ("from musubi_tuner.data.config import load_dataset_config\n"
                "from musubi_tuner.data.training_dataset import TrainingDataset\n"
                "from musubi_tuner.errors import UserError\n"
                f"try:\n    TrainingDataset.from_config(load_dataset_config({str(toml)!r}, check_sources=False), seed=0)\n"
                "except UserError as e:\n    print(e)\n")
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(root / "src")}, user=54321,
                              group=54321, extra_groups=[], capture_output=True, text=True, timeout=120, cwd=folder)
        assert done.stdout.strip() == (f"{folder / 'data' / 'cache'}: cannot list this cache folder (Permission denied) "
                                       f"({toml}: [[datasets]][0].cache_directory)"), done.stdout + done.stderr[-2000:]
    finally:
        shutil.rmtree(folder)


def test_a_cache_directory_that_is_a_file_is_named_not_taken_for_one_without_caches(tmp_path):
    """fuzz_au 3: a file (or a broken link) at the cache_directory's name left the dataset out with "run cache_latents.py
    again", where cache_latents itself says what it is."""
    from helpers import write_cached_dataset

    from musubi_tuner.data.config import load_dataset_config

    toml = write_cached_dataset(tmp_path / "data", items=2)
    shutil.rmtree(tmp_path / "data" / "cache")
    (tmp_path / "data" / "cache").write_text("a file")
    with pytest.raises(UserError, match=r"cache: is a file, expected a cache folder \(.*\[\[datasets\]\]\[0\]\.cache_directory\)"):
        TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=0)


def test_a_loader_worker_that_cannot_start_its_signal_thread_leaves_sigterm_to_end_it():
    """fuzz_bd 1: at a process limit (ulimit -u) a data-loader worker held SIGTERM for a thread it could not start: the
    training's own SIGTERM, by which its exit ends the workers, never reached it, and that exit waited for ever."""
    import os
    import subprocess
    import sys

    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("needs root (to run as a user a process limit binds) and Linux's signal masks")
    code = ("import resource, signal\nfrom musubi_tuner.data.training_dataset import _leave_stops_to_the_training\n"
            "resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))\n"
            "_leave_stops_to_the_training(0)\n"
            "print(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])), signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"}, user=54321, group=54321,
                          extra_groups=[], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0 and done.stdout.split() == ["[]", "True"], done.stdout + done.stderr[-2000:]


def test_a_cache_left_out_is_not_also_said_to_be_trained_on_as_cached(tmp_path, caplog):
    """fuzz_bg 5: a latent cache of an item no longer in the dataset, without its text cache, was said to be "left out"
    and "older than the dataset and trained on as cached (source deleted)" at once."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "images" / "kept.png")
    (tmp_path / "images" / "kept.txt").write_text("kept")
    write_item(tmp_path / "cache_i", "kept", text=False)
    cache_files.save_text_cache(cache_files.text_cache_path(tmp_path / "cache_i", "kept"), "kept",
                                {**cache_files.text_encoder_tensors("llm", torch.randn(256, 8).half(), torch.ones(256, dtype=torch.int64)),
                                 **cache_files.text_encoder_tensors("clipL", torch.randn(768).half(), torch.ones(77, dtype=torch.int64))})
    write_item(tmp_path / "cache_i", "gone", text=False)  # (its source deleted, and no text cache: left out)
    with caplog.at_level(logging.WARNING):
        TrainingDataset.from_config(dataset_config(tmp_path), seed=0)
    assert "gone_0064x0032_hv.safetensors: no text cache" in caplog.text and "gone: source deleted" not in caplog.text
