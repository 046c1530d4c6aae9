"""Cache files are musubi-tuner's, both ways: names, keys, shapes, metadata, the two-pass text cache merge."""

import json
import logging
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import dead_pid

from musubi_tuner.data import cache_files as cf
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.training_dataset import TrainingDataset
from musubi_tuner.errors import UserError
from musubi_tuner.files import read_safetensors_header


def musubi_batch_key(key: str) -> str:
    """musubi-tuner's BucketBatchManager rule, written out independently of ours."""
    if key.endswith("_mask"):
        return key
    names = sorted({str(v).split(".")[-1] for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=len, reverse=True)
    for name in names:
        if key.endswith("_" + name):
            key = key[: -len(name) - 1]
            break
    return key.rsplit("_", 1)[0] if key.startswith("latents_") else key


def write_musubi_style(path, tensors, metadata):
    """A safetensors file the way musubi-tuner's memory-efficient writer lays it out (header padded to 256)."""
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    tags = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64",
            torch.float8_e4m3fn: "F8_E4M3"}
    for key, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": tags[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


# ------------------------------------------------------------------------------------------ names


def test_cache_names_match_musubi_tuners_worked_examples(tmp_path):
    assert cf.latent_cache_path("C", "cat", (1920, 1080)).name == "cat_1920x1080_hv.safetensors"
    assert cf.latent_cache_path("C", "walk", (960, 544), (0, 25)).name == "walk_00000-025_0960x0544_hv.safetensors"
    assert cf.text_cache_path("C", "walk").name == "walk_hv_te.safetensors"
    assert cf.item_stem("/data/clips/walk.mp4") == "walk" and cf.item_stem("/data/frames/take.2/") == "take"


def test_cache_names_parse_back_as_musubi_tuners_training_reads_them():
    assert cf.parse_latent_cache_name("my_cat_1920x1080_hv.safetensors", video=False) == \
        cf.LatentCacheName("my_cat", (1920, 1080), None, None)
    assert cf.parse_latent_cache_name("walk_fast_00012-025_0960x0544_hv.safetensors", video=True) == \
        cf.LatentCacheName("walk_fast", (960, 544), 12, 25)
    assert cf.parse_latent_cache_name("walk_00000-025-01_0960x0544_hv.safetensors", video=True).frames == 25
    assert cf.parse_latent_cache_name("walk_hv_te.safetensors", video=False) is None
    assert cf.parse_latent_cache_name("notes_hv.safetensors", video=False) is None


@pytest.mark.parametrize("key, logical", [
    ("latents_7x68x120_float16", "latents"), ("llm_bfloat16", "llm"), ("llm_float8_e4m3fn", "llm"),
    ("llm_mask", "llm_mask"), ("clipL_float32", "clipL"), ("clipL_mask", "clipL_mask"),
])
def test_logical_keys_strip_the_longest_dtype_name(key, logical):
    assert cf.logical_key(key) == logical == musubi_batch_key(key)


# ------------------------------------------------------------------------------------------ ours -> musubi


def test_a_latent_cache_written_here_reads_with_musubi_tuners_conventions(tmp_path):
    latent = torch.randn(16, 7, 68, 120).half()
    path = cf.save_latent_cache(cf.latent_cache_path(tmp_path, "walk", (960, 544), (0, 25)), latent, size=(960, 544),
                                frame_count=25, provenance={"vae": "pytorch_model.pt"})
    stored = load_file(str(path))
    assert list(stored) == ["latents_7x68x120_float16"] and torch.equal(stored["latents_7x68x120_float16"], latent)
    _, metadata = read_safetensors_header(path)
    assert {k: metadata[k] for k in ("architecture", "width", "height", "format_version", "frame_count")} == \
        {"architecture": "hunyuan_video", "width": "960", "height": "544", "format_version": "1.0.1", "frame_count": "25"}


def test_an_image_latent_cache_has_no_frame_count(tmp_path):
    path = cf.save_latent_cache(tmp_path / "cat_1920x1080_hv.safetensors", torch.zeros(16, 1, 68, 120), size=(1920, 1080))
    assert "frame_count" not in read_safetensors_header(path)[1]
    assert list(load_file(str(path))) == ["latents_1x68x120_float32"]


def test_a_few_nan_values_are_stored_as_zero_but_a_mostly_nan_latent_is_refused_and_the_old_cache_kept(tmp_path, caplog):
    """musubi-tuner stores NaN as 0 with a warning (a few overflowed values); a latent that is more than half NaN comes
    from a broken encoder and would be a cache of nothing."""
    path = tmp_path / "cat_0032x0032_hv.safetensors"
    latent = torch.randn(16, 1, 4, 4)
    latent[0, 0, 0, :3] = float("nan")
    with caplog.at_level(logging.WARNING):
        cf.save_latent_cache(path, latent, size=(32, 32))
    stored = load_file(str(path))["latents_1x4x4_float32"]
    assert "holds NaN values; they are stored as 0" in caplog.text
    assert torch.equal(stored, torch.nan_to_num(latent, nan=0.0)) and torch.isnan(latent).sum() == 3
    before = path.read_bytes()
    broken = torch.full((16, 1, 4, 4), float("nan"))
    broken[0, 0, 0, 0] = 1.0
    with pytest.raises(UserError, match=r"came out NaN in 255 of its 256 values: .* nothing was written"):
        cf.save_latent_cache(path, broken, size=(32, 32))
    assert path.read_bytes() == before



def test_a_latent_past_float16s_range_is_refused_and_the_old_cache_kept(tmp_path):
    """An encoder output beyond 65504 is infinite once cast to float16: such a cache was written and called cached, and
    training met a loss of NaN at the step that reached it."""
    path = tmp_path / "cat_0032x0032_hv.safetensors"
    cf.save_latent_cache(path, torch.randn(16, 1, 4, 4).half(), size=(32, 32))
    before = path.read_bytes()
    overflowed = (torch.randn(16, 1, 4, 4) * 1e5).half()
    n = int(torch.isinf(overflowed).sum())
    assert n
    with pytest.raises(UserError, match=rf"latents_1x4x4_float16 came out infinite in {n:,} of its 256 values: .* nothing was written"):
        cf.save_latent_cache(path, overflowed, size=(32, 32))
    assert path.read_bytes() == before

def test_a_text_cache_written_in_two_passes_holds_both_encoders(tmp_path):
    path = cf.text_cache_path(tmp_path, "walk")
    llm, llm_mask = torch.randn(256, 4096).half(), torch.ones(256, dtype=torch.int64)
    clip, clip_mask = torch.randn(768).half(), torch.ones(77, dtype=torch.int64)
    cf.save_text_cache(path, "a man walks", cf.text_encoder_tensors("llm", llm, llm_mask))
    cf.save_text_cache(path, "a man walks", cf.text_encoder_tensors("clipL", clip, clip_mask))
    stored = load_file(str(path))
    assert sorted(stored) == ["clipL_float16", "clipL_mask", "llm_float16", "llm_mask"]
    batch = {musubi_batch_key(k): v for k, v in stored.items()}
    assert batch["llm"].shape == (256, 4096) and batch["clipL"].shape == (768,) and batch["clipL_mask"].shape == (77,)
    assert read_safetensors_header(path)[1]["caption1"] == "a man walks"


def test_rewriting_one_encoder_in_another_dtype_replaces_it(tmp_path):
    path = tmp_path / "x_hv_te.safetensors"
    cf.save_text_cache(path, "c", cf.text_encoder_tensors("llm", torch.zeros(256, 8).half(), torch.ones(256, dtype=torch.int64)))
    cf.save_text_cache(path, "c", cf.text_encoder_tensors("clipL", torch.zeros(768), None))
    cf.save_text_cache(path, "c", cf.text_encoder_tensors("llm", torch.zeros(256, 8).to(torch.float8_e4m3fn), None))
    assert sorted(load_file(str(path))) == ["clipL_float32", "llm_float8_e4m3fn", "llm_mask"]


def test_a_changed_caption_wins_with_a_warning_and_drops_what_the_old_caption_made(tmp_path, caplog):
    """A caching run stopped between the LLM and the CLIP pass of a new caption must not leave the old caption's
    CLIP output beside the new LLM output, under the new caption: --skip_existing would then never redo it."""
    from musubi_tuner.data.items import CaptionItem, text_encoding_todo

    path = tmp_path / "x_hv_te.safetensors"
    cf.save_text_cache(path, "old", {"llm_float16": torch.zeros(2).half(), "clipL_float16": torch.zeros(2).half()})
    with caplog.at_level(logging.WARNING):
        cf.save_text_cache(path, "new", {"llm_float16": torch.ones(2).half()})  # the LLM pass; then the run is killed
    assert "caption changed" in caplog.text
    assert read_safetensors_header(path)[1]["caption1"] == "new" and sorted(load_file(str(path))) == ["llm_float16"]
    item = CaptionItem(source=None, caption="new", cache_path=path)
    assert text_encoding_todo([item], "clipL", skip_existing=True) == [item]  # the rerun encodes CLIP again
    assert text_encoding_todo([item], "llm", skip_existing=True) == []


def test_a_cache_saying_it_is_of_another_architecture_is_written_anew_with_a_warning(tmp_path, caplog):
    """fuzz_ar 17: one damaged byte of its header ('hunyuan_videO') stopped the text caching half-way through its LLM pass,
    some caches rewritten and others not. A cache of this name is this dataset's (other architectures name theirs
    otherwise): it is written anew, nothing of it merged."""
    path = tmp_path / "x_hv_te.safetensors"
    save_file({"clipL_float16": torch.zeros(2).half()}, str(path), metadata={"architecture": "hunyuan_videO", "caption1": "c"})
    with caplog.at_level(logging.WARNING):
        cf.save_text_cache(path, "c", {"llm_float16": torch.ones(2).half()})
    assert "x_hv_te.safetensors: says it is a cache of architecture 'hunyuan_videO', not hunyuan_video (damaged); writing it " \
           "anew" in caplog.text
    assert sorted(load_file(str(path))) == ["llm_float16"] and read_safetensors_header(path)[1]["architecture"] == "hunyuan_video"


def test_nan_is_stored_as_zero_with_a_warning_and_the_input_is_untouched(tmp_path, caplog):
    latent = torch.ones(16, 1, 2, 2)
    latent[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING):
        path = cf.save_latent_cache(tmp_path / "n_0016x0016_hv.safetensors", latent, size=(16, 16))
    assert "NaN" in caplog.text and torch.isnan(latent).any()
    stored = load_file(str(path))["latents_1x2x2_float32"]
    assert stored[0, 0, 0, 0] == 0 and not torch.isnan(stored).any()


# ------------------------------------------------------------------------------------------ musubi -> ours


def test_musubi_tuners_caches_load_here_including_float8_text_outputs(tmp_path):
    latent = torch.randn(16, 7, 4, 6).half()
    write_musubi_style(tmp_path / "walk_00000-025_0048x0032_hv.safetensors", {"latents_7x4x6_float16": latent},
                       {"architecture": "hunyuan_video", "width": "48", "height": "32", "format_version": "1.0.1",
                        "frame_count": "25"})
    llm = torch.randn(256, 16).to(torch.float8_e4m3fn)
    write_musubi_style(tmp_path / "walk_hv_te.safetensors",
                       {"llm_float8_e4m3fn": llm, "llm_mask": torch.ones(256, dtype=torch.int64),
                        "clipL_float16": torch.randn(768).half(), "clipL_mask": torch.ones(77, dtype=torch.int64)},
                       {"architecture": "hunyuan_video", "caption1": "a man walks", "format_version": "1.0.1"})
    latents = cf.load_cache(tmp_path / "walk_00000-025_0048x0032_hv.safetensors")
    text = cf.load_cache(tmp_path / "walk_hv_te.safetensors")
    assert torch.equal(latents["latents"], latent)
    assert sorted(text) == ["clipL", "clipL_mask", "llm", "llm_mask"] and text["llm"].dtype == torch.float8_e4m3fn
    # their file has no provenance: it is current for --skip_existing, whatever we expect
    assert cf.cache_status(tmp_path / "walk_hv_te.safetensors", {"caption1": "a man walks", "llm_model": "x"},
                           required_prefixes=("llm_", "clipL_")) is None


def test_the_second_pass_merges_into_a_musubi_tuner_file(tmp_path):
    path = tmp_path / "walk_hv_te.safetensors"
    write_musubi_style(path, {"llm_float16": torch.zeros(256, 4).half(), "llm_mask": torch.ones(256, dtype=torch.int64)},
                       {"architecture": "hunyuan_video", "caption1": "a man walks", "format_version": "1.0.1"})
    cf.save_text_cache(path, "a man walks", cf.text_encoder_tensors("clipL", torch.zeros(768).half(), torch.ones(77, dtype=torch.int64)))
    assert sorted(cf.load_cache(path)) == ["clipL", "clipL_mask", "llm", "llm_mask"]


def test_a_cache_folder_written_by_musubi_tuner_trains_here(tmp_path):
    """Image and video caches as musubi-tuner writes them (its names, keys, metadata, header padding; no
    provenance): the training dataset finds every item and batches them with musubi-tuner's keys."""
    meta = {"architecture": "hunyuan_video", "format_version": "1.0.1"}
    for i, (size, latent_hw) in enumerate([((1920, 1080), (68, 120)), ((1080, 1920), (120, 68))]):
        # an image cache is named by the image's own size; the latent has the bucket's (960x544 / 544x960)
        write_musubi_style(tmp_path / "images" / f"photo{i}_{size[0]:04d}x{size[1]:04d}_hv.safetensors",
                           {f"latents_1x{latent_hw[0]}x{latent_hw[1]}_float16": torch.randn(16, 1, *latent_hw).half()},
                           {**meta, "width": str(size[0]), "height": str(size[1])})
    for stem, clip in [("walk", (0, 25)), ("walk", (0, 1)), ("run", (0, 25))]:
        frames = (clip[1] - 1) // 4 + 1
        write_musubi_style(tmp_path / "videos" / f"{stem}_{clip[0]:05d}-{clip[1]:03d}_0960x0544_hv.safetensors",
                           {f"latents_{frames}x68x120_float16": torch.randn(16, frames, 68, 120).half()},
                           {**meta, "width": "960", "height": "544", "frame_count": str(clip[1])})
    for folder, stems in (("images", ["photo0", "photo1"]), ("videos", ["walk", "run"])):
        for stem in stems:
            write_musubi_style(tmp_path / folder / f"{stem}_hv_te.safetensors",
                               {"llm_float16": torch.randn(256, 4096).half(), "llm_mask": torch.ones(256, dtype=torch.int64),
                                "clipL_float16": torch.randn(768).half(), "clipL_mask": torch.ones(77, dtype=torch.int64)},
                               {**meta, "caption1": f"a caption of {stem}"})
    (tmp_path / "dataset.toml").write_text(
        '[general]\nresolution = [960, 544]\ncaption_extension = ".txt"\nenable_bucket = true\n'
        f'[[datasets]]\nimage_directory = "{(tmp_path / "images").as_posix()}"\n'
        f'[[datasets]]\nvideo_directory = "{(tmp_path / "videos").as_posix()}"\ntarget_frames = [1, 25]\n')
    dataset = TrainingDataset.from_config(load_dataset_config(tmp_path / "dataset.toml", check_sources=False), seed=0)
    assert dataset.num_items == 5
    shapes = {}
    for plan in dataset.epoch_plan(1):
        batch = dataset[plan]
        assert batch["llm"].shape[1:] == (256, 4096) and batch["clipL"].shape[1:] == (768,)
        assert batch["llm_mask"].shape[1:] == (256,) and batch["clipL_mask"].shape[1:] == (77,)
        for name, latent in zip(batch["item_names"], batch["latents"]):
            shapes[name] = tuple(latent.shape)
    assert shapes == {"photo0_1920x1080_hv.safetensors": (16, 1, 68, 120), "photo1_1080x1920_hv.safetensors": (16, 1, 120, 68),
                      "walk_00000-025_0960x0544_hv.safetensors": (16, 7, 68, 120),
                      "walk_00000-001_0960x0544_hv.safetensors": (16, 1, 68, 120),
                      "run_00000-025_0960x0544_hv.safetensors": (16, 7, 68, 120)}


def test_two_dtype_versions_of_one_key_are_refused_on_load(tmp_path):
    path = tmp_path / "x_hv_te.safetensors"
    save_file({"llm_float16": torch.zeros(2).half(), "llm_bfloat16": torch.zeros(2).bfloat16()}, str(path))
    with pytest.raises(UserError, match="two versions of 'llm'"):
        cf.load_cache(path)


@pytest.mark.parametrize("value", [2, -1, 2**32])
def test_a_token_mask_of_values_no_mask_holds_is_refused_on_load(tmp_path, value):
    """fuzz_ar 5: a flipped bit (2**32), 2 or -1 in llm_mask trained silently on other token counts."""
    path = tmp_path / "x_hv_te.safetensors"
    mask = torch.ones(256, dtype=torch.int64)
    mask[3] = value
    save_file({"llm_float16": torch.zeros(256, 4).half(), "llm_mask": mask, "clipL_float16": torch.zeros(768).half()}, str(path))
    with pytest.raises(UserError, match=r"llm_mask holds values other than 0 and 1, as no token mask does: a damaged cache"):
        cf.load_cache(path)
    mask[3] = 0  # (and bool masks, as the caching command writes them, pass)
    save_file({"llm_float16": torch.zeros(256, 4).half(), "llm_mask": mask.bool(), "clipL_float16": torch.zeros(768).half()}, str(path))
    assert cf.load_cache(path)["llm_mask"].sum() == 255


def test_a_truncated_cache_is_named_on_load(tmp_path):
    path = cf.save_latent_cache(tmp_path / "t_0016x0016_hv.safetensors", torch.zeros(16, 1, 2, 2), size=(16, 16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="t_0016x0016_hv.safetensors: unreadable cache file"):
        cf.load_cache(path)


# ------------------------------------------------------------------------------------------ staleness


def test_cache_status_says_why_a_cache_cannot_be_reused(tmp_path):
    path = tmp_path / "c_0016x0016_hv.safetensors"
    assert cf.cache_status(path) == "missing"
    cf.save_latent_cache(path, torch.zeros(16, 1, 2, 2), size=(16, 16), provenance={"vae": "a.pt", "bucket": "16x16"})
    assert cf.cache_status(path, {"vae": "a.pt", "bucket": "16x16"}) is None
    assert cf.cache_status(path, {"vae": "b.pt"}) == "vae changed (a.pt -> b.pt)"
    assert cf.cache_status(path, {"source_mtime_ns": "5"}) is None  # not recorded: not stale
    path.write_bytes(b"\x01")
    assert cf.cache_status(path).startswith("unreadable")


def test_latent_provenance_follows_the_source_file(tmp_path):
    source = tmp_path / "cat.png"
    source.write_bytes(b"12345")
    vae = tmp_path / "models" / "vae" / "pytorch_model.pt"
    vae.parent.mkdir(parents=True)
    vae.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: sampled, not read whole
    first = cf.latent_provenance(source, (40, 30), (32, 32), vae=cf.vae_provenance(vae, torch.float16))
    assert first["vae"] == "pytorch_model.pt" and first["source_bytes"] == "5" and first["bucket"] == "32x32"
    assert first["vae_dtype"] == "float16"
    copy = tmp_path / "copy" / "pytorch_model.pt"
    copy.parent.mkdir()
    copy.write_bytes(vae.read_bytes())
    assert cf.vae_provenance(copy, torch.float16) == cf.vae_provenance(vae, torch.float16)  # a copy is the same VAE
    assert cf.vae_provenance(copy, torch.bfloat16)["vae_dtype"] == "bfloat16"
    copy.write_bytes(bytes(range(255, -1, -1)) * 8192)  # another VAE of the same size and name: other weights throughout
    assert cf.vae_provenance(copy, torch.float16)["vae_digest"] != first["vae_digest"]
    source.write_bytes(b"123456")
    os.utime(source, ns=(1, 1))
    assert cf.latent_provenance(source, (40, 30), (32, 32))["source_mtime_ns"] == "1"


def test_stale_caches_are_those_no_item_produces(tmp_path):
    names = ["a_0016x0016_hv.safetensors", "b_0016x0016_hv.safetensors", "a_hv_te.safetensors",
             ".b_0016x0016_hv.safetensors.x1y2z3w4.tmp", "readme.txt"]
    for name in names:
        (tmp_path / name).touch()
    current = {tmp_path / "a_0016x0016_hv.safetensors"}
    assert [p.name for p in cf.stale_caches(tmp_path, current)] == ["b_0016x0016_hv.safetensors"]
    assert [p.name for p in cf.stale_caches(tmp_path, {tmp_path / "a_hv_te.safetensors"}, text=True)] == []
    assert cf.stale_caches(tmp_path / "missing", set()) == []


def test_an_unreadable_item_keeps_its_own_caches_not_those_of_names_it_begins(tmp_path):
    """A skipped cat.png (its caption being edited) kept the caches of a deleted cat_2.png, and training trained on them."""
    names = ["cat_0064x0064_hv.safetensors", "cat_2_0064x0064_hv.safetensors", "cat_00000-005_0064x0064_hv.safetensors",
             "cat_2_00000-005_0064x0064_hv.safetensors", "cat_hv_te.safetensors", "cat_2_hv_te.safetensors"]
    for name in names:
        if name.endswith("_hv_te.safetensors"):  # (text caches that read as such: any name is a text cache's, and an
            # unreadable file of one is kept: 5a61f21)
            cf.save_text_cache(tmp_path / name, "a cat", {"llm_float16": torch.zeros(1).half()})
        else:  # (a latent cache's name tells it, even empty)
            (tmp_path / name).write_bytes(b"")
    assert [p.name for p in cf.stale_caches(tmp_path, set(), keep_stems=["cat"])] == [
        "cat_2_00000-005_0064x0064_hv.safetensors", "cat_2_0064x0064_hv.safetensors"]
    assert [p.name for p in cf.stale_caches(tmp_path, set(), text=True, keep_stems=["cat"])] == ["cat_2_hv_te.safetensors"]
    assert cf.stale_caches(tmp_path, set(), keep_stems=["cat", "cat_2"]) == []


def test_temporary_files_of_killed_writes_are_found_by_cache_kind(tmp_path):
    pid = dead_pid()
    names = [f".b_0016x0016_hv.safetensors.{pid}-x1y2z3w4.tmp", f".b_hv_te.safetensors.{pid}-k9_z0a1b.tmp",
             f".notes.txt.{pid}-ab12cd34.tmp", ".b_0016x0016_hv.safetensors.original.tmp",  # (a user's: no pid)
             "b_0016x0016_hv.safetensors"]
    for name in names:
        (tmp_path / name).touch()
    assert [p.name for p in cf.leftover_temp_files(tmp_path)] == [f".b_0016x0016_hv.safetensors.{pid}-x1y2z3w4.tmp"]
    assert [p.name for p in cf.leftover_temp_files(tmp_path, text=True)] == [f".b_hv_te.safetensors.{pid}-k9_z0a1b.tmp"]
    assert cf.leftover_temp_files(tmp_path / "missing") == []


def test_a_half_written_text_cache_is_written_anew(tmp_path, caplog):
    path = tmp_path / "x_hv_te.safetensors"
    cf.save_text_cache(path, "c", {"llm_float16": torch.zeros(64).half()})
    path.write_bytes(path.read_bytes()[:-20])  # killed mid-write by a non-atomic writer
    with caplog.at_level(logging.WARNING):
        cf.save_text_cache(path, "c", {"clipL_float16": torch.zeros(2).half()})
    assert "writing it anew" in caplog.text and list(load_file(str(path))) == ["clipL_float16"]
