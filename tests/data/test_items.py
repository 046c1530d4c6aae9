"""Listing, decoding and batching items for the caching commands; bad items reported and skipped."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from musubi_tuner import files
from musubi_tuner.data import cache_files, items, media
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.frames import Clip
from musubi_tuner.demo.synthetic_data import make_synthetic_dataset
from musubi_tuner.errors import UserError


def config_for(folder, body, general='[general]\ncaption_extension = ".txt"\nresolution = [64, 64]\n'):
    path = folder / "dataset.toml"
    path.write_text(general + body)
    return load_dataset_config(path)


def video_config(folder, extra=""):
    (folder / "videos").mkdir(exist_ok=True)
    return config_for(folder, f'[[datasets]]\nvideo_directory = "{folder / "videos"}"\n'
                              f'cache_directory = "{folder / "cache"}"\n{extra}').datasets[0]


def image_config(folder, extra=""):
    (folder / "images").mkdir(exist_ok=True)
    return config_for(folder, f'[[datasets]]\nimage_directory = "{folder / "images"}"\n'
                              f'cache_directory = "{folder / "cache"}"\n{extra}').datasets[0]


def add_video(folder, name, frames=9, size=(64, 64), caption="a clip"):
    clip = np.zeros((frames, size[1], size[0], 3), np.uint8)
    clip[:, :, : size[0] // 2] = 200
    media.write_video(folder / "videos" / f"{name}.mp4", clip)
    (folder / "videos" / f"{name}.txt").write_text(caption)


def add_image(folder, name, size=(64, 64), caption="an image"):
    Image.new("RGB", size, (10, 200, 30)).save(folder / "images" / f"{name}.png")
    if caption is not None:
        (folder / "images" / f"{name}.txt").write_text(caption)


def cache_everything(dataset, report, **kwargs):
    """What cache_latents does, with a fake VAE: one latent per item, saved with its provenance."""
    batches = list(items.iter_latent_batches(dataset, report, **kwargs))
    for batch in batches:
        for item in batch.items:
            frames = item.pixels.shape[0]
            latent = torch.zeros(16, (frames - 1) // 4 + 1, item.bucket[1] // 8, item.bucket[0] // 8)
            cache_files.save_latent_cache(item.cache_path, latent, size=item.size, frame_count=item.frame_count,
                                          provenance=item.provenance)
            report.cached += 1
    return batches


# ------------------------------------------------------------------------------------------ 100 synthetic clips


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return load_dataset_config(make_synthetic_dataset(root, num_videos=100, num_images=6, width=64, height=32,
                                                      frames=9, vary_size=True, batch_size=4))


def test_100_synthetic_clips_batch_by_bucket_and_length(synthetic):
    videos = synthetic.video_datasets[0]
    report = items.CacheReport()
    batches = list(items.iter_latent_batches(videos, report, num_workers=2))
    sizes = {}
    for batch in batches:
        width, height, frames = batch.key
        assert all(item.pixels.shape == (frames, height, width, 3) for item in batch.items)
        sizes[batch.key] = sizes.get(batch.key, 0) + len(batch.items)
    # landscape and portrait clips go to two buckets of 64x32-ish area, 50 clips each
    assert sizes == {(64, 32, 9): 50, (32, 64, 9): 50}
    assert sorted(len(b.items) for b in batches) == [2, 2] + [4] * 24
    assert len({item.cache_path for b in batches for item in b.items}) == 100
    assert report.failed == [] and report.skipped == []


def test_batches_are_the_same_with_and_without_worker_threads(synthetic):
    videos = synthetic.video_datasets[0]

    def order(workers):
        return [[i.cache_path.name for i in b.items] for b in items.iter_latent_batches(videos, items.CacheReport(), num_workers=workers)]

    assert order(0) == order(3)


def test_a_file_is_taken_once_every_batch_holding_it_is_written(synthetic):
    """fuzz_au 8: a file counted as taken when it was read, and groups smaller than batch_size are encoded at the very
    end: the caching bar stood at 100% while the VAE did most of its work. It counts once its caches are written."""
    videos = synthetic.video_datasets[0]
    written, counted = [], []  # (the batches handed back, (each file taken, how many batches were handed back then))
    for batch in items.iter_latent_batches(videos, items.CacheReport(), num_workers=2,
                                           taken=lambda item: counted.append((item.path, len(written)))):
        written.append({item.source.path for item in batch.items})  # the caller encodes and writes the batch here
    assert len(counted) == len(dict(counted)) == 100
    for path, done in counted:
        assert max(i for i, paths in enumerate(written) if path in paths) < done, path


def test_a_batch_becomes_vae_input_in_minus_one_to_one(synthetic):
    batch = next(items.iter_latent_batches(synthetic.video_datasets[0], items.CacheReport()))
    pixels = batch.pixels(dtype=torch.float16)
    assert pixels.shape == (4, 3, 9, 32, 64) and pixels.dtype == torch.float16
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_captions_are_read_for_every_item(synthetic):
    captions = items.caption_items(synthetic.video_datasets[0], items.CacheReport())
    assert len(captions) == 100 and captions[0].cache_path.name == "clip_0000_hv_te.safetensors"
    assert " moving " in captions[0].caption and not captions[0].caption.endswith("\n")


def test_captions_read_by_worker_threads_keep_the_item_order(synthetic):
    videos = synthetic.video_datasets[0]
    assert items.caption_items(videos, items.CacheReport(), num_workers=3) == items.caption_items(videos, items.CacheReport())


# ------------------------------------------------------------------------------------------ bad and odd items


def test_the_worked_example_video_gets_musubi_tuners_cache_names(tmp_path):
    dataset = video_config(tmp_path, "target_frames = [1, 25, 45]\nresolution = [960, 544]\nenable_bucket = true\n")
    add_video(tmp_path, "walk", frames=50, size=(480, 270))  # 16:9, so the 960x544 bucket
    names = [i.cache_path.name for b in items.iter_latent_batches(dataset, items.CacheReport()) for i in b.items]
    assert sorted(names) == ["walk_00000-001_0960x0544_hv.safetensors", "walk_00000-025_0960x0544_hv.safetensors",
                             "walk_00000-045_0960x0544_hv.safetensors"]


def test_a_clip_shorter_than_every_target_is_reported_and_skipped(tmp_path):
    dataset = video_config(tmp_path, "target_frames = [25]\n")
    add_video(tmp_path, "short", frames=9)
    add_video(tmp_path, "long", frames=25)
    report = items.CacheReport()
    batches = list(items.iter_latent_batches(dataset, report))
    assert [i.source.stem for b in batches for i in b.items] == ["long"]
    assert report.skipped == [(str(tmp_path / "videos" / "short.mp4"), "only 9 frames, shorter than every target_frames [25]")]
    report = items.CacheReport()  # fuzz_ag 8a: the 25-frame file was "only 13 frames", which its user could not see
    list(items.iter_latent_batches(video_config(tmp_path, "target_frames = [25]\nsource_fps = 48.0\n"), report))
    assert (str(tmp_path / "videos" / "long.mp4"), "only 13 frames after source_fps = 48, shorter than every target_frames [25]") \
        in report.skipped


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100])
def test_an_unreadable_video_is_reported_by_name_and_the_run_goes_on(tmp_path, content):
    dataset = video_config(tmp_path)
    add_video(tmp_path, "good")
    (tmp_path / "videos" / "bad.mp4").write_bytes(content)
    (tmp_path / "videos" / "bad.txt").write_text("x")
    report = items.CacheReport()
    batches = list(items.iter_latent_batches(dataset, report, num_workers=2))
    assert [i.source.stem for b in batches for i in b.items] == ["good"]
    assert len(report.failed) == 1 and "bad.mp4" in report.failed[0][1]
    assert "1 failed" in report.summary() and "bad.mp4" in report.summary()
    with pytest.raises(UserError, match="bad.mp4"):
        list(items.iter_latent_batches(dataset, items.CacheReport(), strict=True))


def test_a_folder_named_like_a_video_is_its_frames_and_one_named_like_an_image_is_named_as_a_folder(tmp_path):
    """musubi-tuner's glob lists folders by their names: `clip.mp4/` of PNG frames is a video (its frames in name
    order), `f.png/` fails to open. Neither is dropped without a word."""
    dataset = video_config(tmp_path)
    frames = tmp_path / "videos" / "clip.mp4"
    frames.mkdir()
    for i in range(5):
        Image.new("RGB", (64, 64), (50 * i, 0, 0)).save(frames / f"{i:03d}.png")
    (tmp_path / "videos" / "clip.txt").write_text("a clip")
    (batch,) = items.iter_latent_batches(dataset, items.CacheReport())
    assert [i.cache_path.name for i in batch.items] == ["clip_00000-001_0064x0064_hv.safetensors"]
    assert batch.items[0].pixels.shape[0] == 1  # target_frames [1] of the 5 frames

    dataset = image_config(tmp_path)
    (tmp_path / "images" / "f.png").mkdir()
    (tmp_path / "images" / "f.txt").write_text("an image")
    report = items.CacheReport()
    assert list(items.iter_latent_batches(dataset, report)) == []
    assert report.failed == [(str(tmp_path / "images" / "f.png"), f"{tmp_path / 'images' / 'f.png'}: expected a file, found a folder")]


def test_a_video_without_its_caption_fails_latent_caching_as_it_fails_text_caching(tmp_path):
    """Its latents were cached without a word (the VAE's time spent) while text caching failed it: two verdicts on one
    item, and training then dropped it."""
    dataset = video_config(tmp_path)
    add_video(tmp_path, "good")
    add_video(tmp_path, "uncaptioned")
    (tmp_path / "videos" / "uncaptioned.txt").unlink()
    report = items.CacheReport()
    batches = list(items.iter_latent_batches(dataset, report))
    assert [i.source.stem for b in batches for i in b.items] == ["good"]
    caption = tmp_path / "videos" / "uncaptioned.txt"
    assert report.failed == [(str(tmp_path / "videos" / "uncaptioned.mp4"), f"{caption}: caption file not found (for uncaptioned.mp4)")]


def test_a_video_whose_caption_is_named_otherwise_fails_with_the_hint_an_image_gets(tmp_path):
    """fuzz_aa 14: an image beside a.TXT, b.png.txt or 'c.txt ' was told where its caption was; a video (which fails
    without it, as in musubi-tuner) was told only "caption file not found"."""
    dataset = video_config(tmp_path)
    folder = tmp_path / "videos"
    for name, caption in (("a", "a.TXT"), ("b", "b.mp4.txt"), ("c", "c.txt ")):
        add_video(tmp_path, name)
        (folder / f"{name}.txt").rename(folder / caption)
    report = items.CacheReport()
    assert list(items.iter_latent_batches(dataset, report)) == []
    assert sorted(reason for _, reason in report.failed) == [
        f"{folder / 'a.txt'}: caption file not found (for a.mp4) (a.TXT exists: caption_extension = '.TXT'?)",
        f"{folder / 'b.txt'}: caption file not found (for b.mp4) (b.mp4.txt exists: the caption of b.mp4 is named b.txt)",
        f"{folder / 'c.txt'}: caption file not found (for c.mp4) ('c.txt ' exists, its name with a blank or an invisible "
        "character in it: rename it c.txt)"]


def test_videos_follow_enable_bucket_false_unlike_musubi_tuner(tmp_path):
    dataset = video_config(tmp_path)  # resolution 64x64, enable_bucket false
    add_video(tmp_path, "wide", size=(96, 48))
    (batch,) = items.iter_latent_batches(dataset, items.CacheReport())
    assert batch.key == (64, 64, 1) and batch.items[0].cache_path.name == "wide_00000-001_0064x0064_hv.safetensors"


def test_images_without_caption_files_are_left_out_and_listed(tmp_path):
    dataset = image_config(tmp_path)
    add_image(tmp_path, "with")
    add_image(tmp_path, "without", caption=None)
    found, problems = items.list_items(dataset)
    assert [i.stem for i in found] == ["with"]
    assert problems == [(str(tmp_path / "images" / "without.png"), "no caption file without.txt")]


def test_a_caption_whose_name_only_looks_the_same_is_named_and_odd_names_stay_one_entry(tmp_path, caplog):
    """fuzz_aa 7: an image named in NFC (as typed on Linux or Windows) beside its caption in NFD (as macOS writes it)
    was told "no caption file café.txt" with café.txt right there; IMG_1.png beside img_1.txt had no hint; a name
    holding a newline made the summary read as two entries. musubi-tuner matches names exactly too: said, not read."""
    import unicodedata

    dataset = image_config(tmp_path)
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    add_image(tmp_path, nfc, caption=None)
    (tmp_path / "images" / f"{nfd}.txt").write_text("a cafe")
    add_image(tmp_path, "IMG_1", caption=None)
    (tmp_path / "images" / "img_1.txt").write_text("a photo")
    add_image(tmp_path, "two\nlines", caption=None)
    for image, caption in (("a", "a.txt "), ("b", "b .txt"), ("e", "e.txt\u200b")):  # (fuzz_aa 14: the hint proposed
        add_image(tmp_path, image, caption=None)                                    # caption_extension = '.txt ')
        (tmp_path / "images" / caption).write_text("a caption")
    found, problems = items.list_items(dataset)
    assert found == []
    assert sorted(reason for _, reason in problems) == [
        "no caption file IMG_1.txt ('img_1.txt' exists, its name in other letter case: rename it IMG_1.txt)",
        "no caption file a.txt ('a.txt ' exists, its name with a blank or an invisible character in it: rename it a.txt)",
        "no caption file b.txt ('b .txt' exists, its name with a blank or an invisible character in it: rename it b.txt)",
        f"no caption file {nfc}.txt ('{nfd}.txt' exists, its name in another Unicode form: rename it {nfc}.txt)",
        "no caption file e.txt ('e.txt\\u200b' exists, its name with a blank or an invisible character in it: rename it e.txt)",
        "no caption file two\nlines.txt"]
    report = items.CacheReport()
    report.skipped += problems
    entries = report.summary().splitlines()[1:]
    assert len(entries) == 6 and any(line.endswith("two\\nlines.png: no caption file two\\nlines.txt") for line in entries)
    with caplog.at_level(logging.INFO):  # (and the line logged as each item is skipped)
        items.CacheReport().skip(*next(p for p in problems if "two" in p[0]))
    assert "two\\nlines.png: no caption file two\\nlines.txt" in caplog.text and "two\nlines" not in caplog.text


def test_a_caption_extension_without_its_leading_dot_is_named_where_the_dotted_file_exists(tmp_path):
    (tmp_path / "images").mkdir()
    dataset = config_for(tmp_path, f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\ncache_directory = "{tmp_path / "cache"}"\n',
                         general='[general]\ncaption_extension = "caption.txt"\nresolution = [64, 64]\n').datasets[0]
    add_image(tmp_path, "cat", caption=None)
    (tmp_path / "images" / "cat.caption.txt").write_text("a cat")
    found, problems = items.list_items(dataset)
    assert found == [] and problems == [(str(tmp_path / "images" / "cat.png"),
                                         "no caption file catcaption.txt (caption_extension = 'caption.txt' does not start with "
                                         "a dot; cat.caption.txt exists: write '.caption.txt')")]


def test_captions_under_another_extension_are_named_and_a_folder_of_them_logs_a_few_lines(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    dataset = config_for(tmp_path, f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\ncache_directory = "{tmp_path / "cache"}"\n',
                         general='[general]\ncaption_extension = ".txt"\nresolution = [64, 64]\n').datasets[0]
    for i in range(30):
        add_image(tmp_path, f"cat{i:02d}")
        (tmp_path / "images" / f"cat{i:02d}.txt").rename(tmp_path / "images" / f"cat{i:02d}.caption")
    found, problems = items.list_items(dataset)
    assert found == [] and problems[0] == (str(tmp_path / "images" / "cat00.png"),
                                           "no caption file cat00.txt (cat00.caption exists: caption_extension = '.caption'?)")
    report = items.CacheReport()
    with caplog.at_level("INFO", logger="musubi_tuner.data.items"):
        for path, reason in problems:
            report.skip(path, reason)
    assert len(caplog.records) == items.LOGGED_SKIPS + 1 and len(report.skipped) == 30  # not a line per image
    assert "... and 10 more skipped" in report.summary()


def test_an_image_cache_is_named_by_the_original_size(tmp_path):
    dataset = image_config(tmp_path, "enable_bucket = true\n")
    add_image(tmp_path, "cat", size=(100, 60))
    (batch,) = items.iter_latent_batches(dataset, items.CacheReport())
    item = batch.items[0]
    assert item.cache_path.name == "cat_0100x0060_hv.safetensors" and batch.key == item.bucket
    assert item.pixels.shape == (1, item.bucket[1], item.bucket[0], 3)


def test_items_whose_cache_names_collide_keep_the_first(tmp_path):
    dataset = image_config(tmp_path)
    add_image(tmp_path, "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    found, problems = items.list_items(dataset)
    assert [i.path.name for i in found] == ["a.jpg"] and "same cache name 'a'" in problems[0][1]


def test_a_jsonl_that_lists_one_image_twice_says_so_and_keeps_the_caption_musubi_tuner_keeps(tmp_path):
    """musubi-tuner writes the image's text cache for each line, the last one's staying: with the first line's caption
    kept here, one JSONL trained on other text in the two tools, and the message named neither line (fuzz_aa 13)."""
    import json

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    lines = [{"image_path": str(tmp_path / "images" / "a.png"), "caption": caption} for caption in ("first", "second")]
    (tmp_path / "meta.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    dataset = config_for(tmp_path, f'[[datasets]]\nimage_jsonl_file = "{tmp_path / "meta.jsonl"}"\n'
                                   f'cache_directory = "{tmp_path / "cache"}"\n').datasets[0]
    found, problems = items.list_items(dataset)
    assert [i.read_caption() for i in found] == ["second"]
    assert problems == [(str(tmp_path / "images" / "a.png"), "listed on lines 1 and 2 of meta.jsonl with two captions; line 2's is "
                                                              "used, as musubi-tuner uses it (one item per file: give each caption "
                                                              "its own copy)")]


def test_one_image_listed_under_two_spellings_is_one_item_with_the_last_caption(tmp_path):
    """fuzz_ag 8f: a/../a/x.png or a linked folder beside a/x.png was "same cache name 'x'; rename one" (one file:
    nothing to rename), and kept the first line's caption where musubi-tuner keeps the last."""
    import json

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "link").symlink_to(tmp_path / "images")
    spellings = [tmp_path / "images" / "a.png", tmp_path / "images" / ".." / "images" / "a.png", tmp_path / "link" / "a.png"]
    lines = [{"image_path": str(path), "caption": f"caption {i}"} for i, path in enumerate(spellings)]
    (tmp_path / "meta.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    dataset = config_for(tmp_path, f'[[datasets]]\nimage_jsonl_file = "{tmp_path / "meta.jsonl"}"\n'
                                   f'cache_directory = "{tmp_path / "cache"}"\n').datasets[0]
    found, problems = items.list_items(dataset)
    assert [i.read_caption() for i in found] == ["caption 2"]
    assert [reason for _, reason in problems] == [
        f"listed on lines 1 and 2 of meta.jsonl (as {spellings[0]} and {spellings[1]}, one file) with two captions; line 2's is "
        "used, as musubi-tuner uses it (one item per file: give each caption its own copy)",
        f"listed on lines 2 and 3 of meta.jsonl (as {spellings[1]} and {spellings[2]}, one file) with two captions; line 3's is "
        "used, as musubi-tuner uses it (one item per file: give each caption its own copy)"]


def test_a_caption_that_is_not_utf8_is_reported_naming_the_file(tmp_path):
    dataset = image_config(tmp_path)
    add_image(tmp_path, "ok")
    add_image(tmp_path, "latin1", caption=None)
    (tmp_path / "images" / "latin1.txt").write_bytes("café".encode("latin-1"))
    report = items.CacheReport()
    assert [c.caption for c in items.caption_items(dataset, report)] == ["an image"]
    assert "latin1.txt: caption is not UTF-8" in report.failed[0][1]
    with pytest.raises(UserError, match="latin1.txt"):
        items.caption_items(dataset, items.CacheReport(), strict=True)


@pytest.mark.parametrize("data, said", [
    ("a cat".encode("utf-16-le"), "caption holds NUL bytes (UTF-16 text, or not text); save it as UTF-8"),
    ("a cat".encode("utf-16"), "caption is UTF-16 text (it starts with a byte-order mark); save it as UTF-8"),
])
def test_a_utf16_caption_is_reported_naming_the_file(tmp_path, data, said):
    """Without a byte-order mark (PowerShell's Out-File) it decoded as 'a\\x00 \\x00c...' and was trained on without a
    word (fuzz_aa 9); with one it was "not UTF-8 text (byte 0)"."""
    dataset = image_config(tmp_path)
    add_image(tmp_path, "ok")
    add_image(tmp_path, "wide", caption=None)
    (tmp_path / "images" / "wide.txt").write_bytes(data)
    report = items.CacheReport()
    assert [c.caption for c in items.caption_items(dataset, report)] == ["an image"]
    assert report.failed[0][1].endswith(f"wide.txt: {said}")


def test_text_is_split_into_lines_only_where_musubi_tuners_text_mode_files_split_it(tmp_path):
    """At \\n, \\r\\n and \\r: str.splitlines also split at U+2028 and U+0085, which JSON writers leave inside a string,
    so a valid JSONL line was refused as "Unterminated string" (fuzz_aa 6)."""
    caption = "first line\u2028second\x85line\x0cthird"
    dataset = jsonl_config(tmp_path, [json.dumps({"video_path": "a.mp4", "caption": caption}, ensure_ascii=False)])
    (item,), _ = items.list_items(dataset)
    assert item.read_caption() == caption


def test_a_missing_video_caption_fails_that_video_only(tmp_path):
    dataset = video_config(tmp_path)
    add_video(tmp_path, "a")
    media.write_video(tmp_path / "videos" / "b.mp4", np.zeros((1, 16, 16, 3), np.uint8))
    report = items.CacheReport()
    assert [c.source.stem for c in items.caption_items(dataset, report)] == ["a"]
    assert "b.txt: caption file not found" in report.failed[0][1]


# ------------------------------------------------------------------------------------------ JSONL


def jsonl_config(folder, lines, kind="video"):
    (folder / "meta.jsonl").write_text("\n".join(lines) + "\n")
    return config_for(folder, f'[[datasets]]\n{kind}_jsonl_file = "{folder / "meta.jsonl"}"\n'
                              f'cache_directory = "{folder / "cache"}"\n').datasets[0]


def test_jsonl_lines_give_paths_and_captions_and_a_folder_can_be_a_video(tmp_path):
    frames = tmp_path / "frames_of_walk"
    frames.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(frames / f"{i:02d}.png")
    dataset = jsonl_config(tmp_path, [json.dumps({"video_path": "frames_of_walk", "caption": " a walk "}), ""])
    (item,), _ = items.list_items(dataset)
    assert item.path == tmp_path / "frames_of_walk" and item.read_caption() == "a walk"  # relative to the JSONL
    (batch,) = items.iter_latent_batches(dataset, items.CacheReport())
    assert batch.items[0].cache_path.name == "frames_of_walk_00000-001_0064x0064_hv.safetensors"


@pytest.mark.parametrize("line, problem", [
    ('{"caption": "x"}', 'meta.jsonl:2: no "video_path"'),
    ('{"video_path": "a.mp4"}', 'meta.jsonl:2: no "caption" string'),
    ('{"video_path": "a.mp4", caption}', "meta.jsonl:2: not a JSON object"),
    ('["a.mp4", "x"]', "meta.jsonl:2: not a JSON object"),
    # (the tokenizer failed on it with a TypeError once the text encoder had loaded: fuzz_aa 1)
    ('{"video_path": "a.mp4", "caption": "lone \\ud800 half"}',
     "meta.jsonl:2: the caption holds \\ud800 at character 6, half of a surrogate pair and no character"),
])
def test_a_bad_jsonl_line_names_the_file_line_dataset_and_key(tmp_path, line, problem):
    dataset = jsonl_config(tmp_path, ['{"video_path": "a.mp4", "caption": "ok"}', line])
    with pytest.raises(UserError) as info:
        items.list_items(dataset)
    assert problem in str(info.value) and "[[datasets]][0].video_jsonl_file" in str(info.value)


def test_a_url_in_a_jsonl_is_named_as_one(tmp_path):
    """fuzz_ag 7: "https://example.com/y.png" was read as the path https:/example.com/y.png, "file not found"."""
    dataset = jsonl_config(tmp_path, ['{"image_path": "https://example.com/y.png", "caption": "c"}'], kind="image")
    with pytest.raises(UserError) as info:
        items.list_items(dataset)
    assert ('meta.jsonl:1: "https://example.com/y.png": a URL; give the path of a file on this machine (download it first)'
            in str(info.value))


def test_image_jsonl_accepts_image_path_0(tmp_path):
    dataset = jsonl_config(tmp_path, ['{"image_path_0": "x.png", "caption": "c"}'], kind="image")
    assert [i.stem for i in items.list_items(dataset)[0]] == ["x"]


# ------------------------------------------------------------------------------------------ --skip_existing


def test_skip_existing_reuses_current_image_caches_and_redoes_changed_ones(tmp_path):
    dataset = image_config(tmp_path)
    for name in ("a", "b"):
        add_image(tmp_path, name)
    vae, other = {"vae": "vae.pt", "vae_digest": "1"}, {"vae": "vae.pt", "vae_digest": "2"}
    cache_everything(dataset, items.CacheReport(), vae=vae)
    report = items.CacheReport()
    assert list(items.iter_latent_batches(dataset, report, skip_existing=True, vae=vae)) == []
    assert report.already_cached == 2
    add_image(tmp_path, "b", caption="an image")  # rewritten source
    os.utime(tmp_path / "images" / "b.png", ns=(1, 1))
    redo = [i.source.stem for b in items.iter_latent_batches(dataset, items.CacheReport(), skip_existing=True, vae=vae)
            for i in b.items]
    assert redo == ["b"]
    other_vae = list(items.iter_latent_batches(dataset, items.CacheReport(), skip_existing=True, vae=other))
    assert sum(len(b.items) for b in other_vae) == 2


def test_skip_existing_redoes_the_caches_training_would_leave_out(tmp_path):
    """fuzz_ar 4: --skip_existing judged a cache by its metadata alone: a latent cache of integers, or a text cache whose
    mask is of floats, was "already cached", and every training then left it out."""
    from safetensors.torch import load_file, save_file

    dataset = image_config(tmp_path)
    for name in ("a", "b"):
        add_image(tmp_path, name)
    cache_everything(dataset, items.CacheReport())
    captions = items.caption_items(dataset, items.CacheReport())
    for caption in captions:
        cache_files.save_text_cache(caption.cache_path, caption.caption, {
            **cache_files.text_encoder_tensors("llm", torch.zeros(256, 4).half(), torch.ones(256, dtype=torch.int64)),
            **cache_files.text_encoder_tensors("clipL", torch.zeros(8).half(), None)})
    assert items.text_encoding_todo(captions, "llm", skip_existing=True) == []

    def damaged(path, change):
        metadata = files.read_safetensors_header(path)[1]
        save_file({k: change(k, v) for k, v in load_file(str(path)).items()}, str(path), metadata=metadata)

    (latent,) = tmp_path.joinpath("cache").glob("a_*_hv.safetensors")
    damaged(latent, lambda k, v: v.to(torch.int32))
    videos = video_config(tmp_path, "target_frames = [1, 5]\n")  # a video's clip too, whose caches are all there (fuzz_az 7)
    add_video(tmp_path, "v", frames=9)
    cache_everything(videos, items.CacheReport())
    clip = sorted(tmp_path.joinpath("cache").glob("v_00000-005_*_hv.safetensors"))[0]
    damaged(clip, lambda k, v: v.to(torch.int32))
    assert [i.cache_path for b in items.iter_latent_batches(videos, items.CacheReport(), skip_existing=True) for i in b.items] == [clip]
    damaged(captions[1].cache_path, lambda k, v: v.half() if k.startswith("llm_mask") else v)
    redo = [i.source.stem for b in items.iter_latent_batches(dataset, items.CacheReport(), skip_existing=True) for i in b.items]
    assert redo == ["a"]
    assert [c.source.stem for c in items.text_encoding_todo(captions, "llm", skip_existing=True)] == ["b"]
    assert [c.source.stem for c in items.text_encoding_todo(captions, "clipL", skip_existing=True)] == ["b"]


def test_skip_existing_redoes_a_frame_folder_whose_frames_were_renamed_but_not_for_a_stray_file(tmp_path):
    """fuzz_ag 1: frames 1..12.png (read 1, 10, 11, 12, 2, ...) renamed 01..09 with mv, every file's size and time
    kept: the folder's sizes and newest time were unchanged and the cache of the old order was reused."""
    frames = tmp_path / "jump"
    frames.mkdir()
    for i in range(1, 13):
        Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(frames / f"{i}.png")
    dataset = jsonl_config(tmp_path, [json.dumps({"video_path": "jump", "caption": "a jump"})])
    cache_everything(dataset, items.CacheReport())

    def redone():
        return [i.source.stem for b in items.iter_latent_batches(dataset, items.CacheReport(), skip_existing=True) for i in b.items]

    (frames / "notes.txt").write_text("shot on a phone")  # not a frame: changes nothing
    assert redone() == []
    for i in range(1, 10):
        os.rename(frames / f"{i}.png", frames / f"0{i}.png")
    assert redone() == ["jump"]


def test_a_full_extraction_decodes_no_more_than_max_frames_and_caches_the_same_clip(tmp_path, monkeypatch):
    """fuzz_ag 1b: frame_extraction = "full" decoded the whole video (1.1 GB more for a 2-minute 256x256 one) to keep its
    first max_frames."""
    dataset = video_config(tmp_path, 'frame_extraction = "full"\nmax_frames = 9\n')
    add_video(tmp_path, "v", frames=40)
    whole = media.load_video(tmp_path / "videos" / "v.mp4")
    decoded = []
    real = media.iter_video_frames

    def counted(*args, **kwargs):
        for frame in real(*args, **kwargs):
            decoded.append(1)
            yield frame
    monkeypatch.setattr(media, "iter_video_frames", counted)
    (batch,) = items.iter_latent_batches(dataset, items.CacheReport())
    (item,) = batch.items
    assert len(decoded) == 9 and item.clip == Clip(0, 9)
    assert np.array_equal(item.pixels, whole.frames[:9])


def test_skip_existing_redoes_a_video_cached_at_another_source_fps(tmp_path):
    """fuzz_ag 1a: source_fps = 48 keeps frames 0, 2, 4, ... where none kept 0, 1, 2, ...: the same clip name and frame
    count, and --skip_existing kept the clip of the other frames."""
    add_video(tmp_path, "v", frames=12)
    cache_everything(video_config(tmp_path, "target_frames = [5]\n"), items.CacheReport())

    def redone(extra):
        dataset = video_config(tmp_path, "target_frames = [5]\n" + extra)
        return [i.clip for b in items.iter_latent_batches(dataset, items.CacheReport(), skip_existing=True) for i in b.items]

    assert redone("") == []
    assert redone("source_fps = 48.0\n") == [Clip(0, 5)]


@pytest.mark.parametrize("before,after,new,clips", [
    ("target_frames = [1, 9]", "target_frames = [1, 9, 17]", [Clip(0, 17)], 3),
    ("target_frames = [9]", 'target_frames = [9]\nframe_extraction = "slide"\nframe_stride = 4', [Clip(4, 9), Clip(8, 9), Clip(12, 9)], 4),
    ('frame_extraction = "full"\nmax_frames = 9', 'frame_extraction = "full"\nmax_frames = 21', [Clip(0, 21)], 1),
])
def test_skip_existing_makes_the_clips_a_config_that_decodes_further_asks_for(tmp_path, before, after, new, clips):
    """fuzz_av 1: `head` and `full` decode only the frames they need, and --skip_existing took that count, recorded in
    the caches, for the video's length: a longer target, another frame_extraction or a larger max_frames was "already
    cached", and training trained on the old clips alone."""
    add_video(tmp_path, "v", frames=24)
    cache_everything(video_config(tmp_path, before + "\n"), items.CacheReport())
    dataset = video_config(tmp_path, after + "\n")
    assert set(new) <= {i.clip for b in cache_everything(dataset, items.CacheReport(), skip_existing=True) for i in b.items}
    report = items.CacheReport()
    assert list(items.iter_latent_batches(dataset, report, skip_existing=True)) == []
    assert report.already_cached == clips


def test_skip_existing_does_not_decode_a_fully_cached_video(tmp_path, monkeypatch):
    dataset = video_config(tmp_path, 'target_frames = [1, 5]\nframe_extraction = "chunk"\n')
    add_video(tmp_path, "v", frames=12)
    cache_everything(dataset, items.CacheReport())
    monkeypatch.setattr(media, "load_video", lambda *a, **k: pytest.fail("decoded a cached video"))
    report = items.CacheReport()
    assert list(items.iter_latent_batches(dataset, report, skip_existing=True)) == []
    assert report.already_cached == 12 + 2 and report.failed == [] and report.unrecorded == 0


def test_skip_existing_does_not_decode_a_video_for_a_config_that_needs_fewer_frames_than_its_caches_saw(tmp_path, monkeypatch):
    """The other side of fuzz_av 1: a `head` decode that stopped at 17 frames knows the video has 17, all a shorter
    target needs."""
    add_video(tmp_path, "v", frames=24)
    cache_everything(video_config(tmp_path, "target_frames = [1, 9, 17]\n"), items.CacheReport())
    monkeypatch.setattr(media, "load_video", lambda *a, **k: pytest.fail("decoded a cached video"))
    report = items.CacheReport()
    assert list(items.iter_latent_batches(video_config(tmp_path, "target_frames = [1, 9]\n"), report, skip_existing=True)) == []
    assert report.already_cached == 2


def test_skip_existing_learns_the_length_of_a_video_whose_caches_were_made_before_it_was_recorded(tmp_path, monkeypatch):
    """fuzz_ay 4: caches made before source_frames_whole was recorded had every later --skip_existing run decode their
    video whole again: the key was never added."""
    from safetensors.torch import load_file, save_file

    dataset = video_config(tmp_path, 'target_frames = [5]\nframe_extraction = "slide"\nframe_stride = 4\n')
    add_video(tmp_path, "v", frames=12)
    cache_everything(dataset, items.CacheReport())
    for path in (tmp_path / "cache").glob("*_hv.safetensors"):  # as an earlier version wrote them
        metadata = files.read_safetensors_header(path)[1]
        del metadata[cache_files.WHOLE_VIDEO_KEY]
        save_file(load_file(str(path)), str(path), metadata=metadata)
    assert list(items.iter_latent_batches(dataset, items.CacheReport(), skip_existing=True)) == []  # decoded, once
    monkeypatch.setattr(media, "load_video", lambda *a, **k: pytest.fail("decoded a cached video again"))
    report = items.CacheReport()
    assert list(items.iter_latent_batches(dataset, report, skip_existing=True)) == [] and report.already_cached == 2


def test_skip_existing_with_musubi_tuner_caches_decodes_then_skips_each_clip(tmp_path):
    dataset = video_config(tmp_path, "target_frames = [1, 5]\n")
    add_video(tmp_path, "v", frames=9)
    for clip in [(0, 1), (0, 5)]:  # their caches: no provenance
        latent = torch.zeros(16, (clip[1] - 1) // 4 + 1, 8, 8)
        cache_files.save_latent_cache(cache_files.latent_cache_path(tmp_path / "cache", "v", (64, 64), clip), latent,
                                      size=(64, 64), frame_count=clip[1])
    report = items.CacheReport()
    assert list(items.iter_latent_batches(dataset, report, skip_existing=True)) == []
    assert report.already_cached == 2 and report.unrecorded == 2  # kept, and the summary says they were not compared
    assert "2 of those already cached do not record what made them" in report.summary("latent caches")


def test_text_encoding_todo_is_planned_per_encoder_before_either_pass(tmp_path):
    dataset = image_config(tmp_path)
    for name in ("a", "b"):
        add_image(tmp_path, name)
    captions = items.caption_items(dataset, items.CacheReport())
    llm = cache_files.text_encoder_tensors("llm", torch.zeros(256, 4).half(), torch.ones(256, dtype=torch.int64))
    cache_files.save_text_cache(captions[0].cache_path, captions[0].caption, llm)  # a run stopped after the LLM pass
    todo_llm = items.text_encoding_todo(captions, "llm", skip_existing=True)
    todo_clip = items.text_encoding_todo(captions, "clipL", skip_existing=True)
    assert [c.source.stem for c in todo_llm] == ["b"] and [c.source.stem for c in todo_clip] == ["a", "b"]
    unrecorded = set()  # that cache records its caption, not the LLM that made it (as musubi-tuner's): kept, and said
    model = cache_files.text_provenance("llm", str(tmp_path / "images"), torch.float16)
    assert items.text_encoding_todo(captions, "llm", skip_existing=True, model=model, unrecorded=unrecorded) == captions[1:]
    assert unrecorded == {captions[0].cache_path}
    changed = [items.CaptionItem(captions[0].source, "a new caption", captions[0].cache_path)]
    assert items.text_encoding_todo(changed, "llm", skip_existing=True) == changed
    assert items.text_encoding_todo(captions, "llm", skip_existing=False) == captions


def test_chunks_split_batches_for_the_encoder():
    assert list(items.chunks(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(items.chunks(range(3), None)) == [[0, 1, 2]]


# ------------------------------------------------------------------------------------------ stale caches


def test_stale_caches_are_those_of_items_gone_or_changed_but_not_of_items_that_failed(tmp_path):
    dataset = video_config(tmp_path, "target_frames = [1, 5]\n")
    for name in ("kept", "removed", "broken"):
        add_video(tmp_path, name)
    cache_everything(dataset, items.CacheReport())
    (tmp_path / "videos" / "removed.mp4").unlink()
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"")  # unreadable today
    report = items.CacheReport()
    cache_everything(dataset, report, skip_existing=True)
    stale = [p.name for p in items.stale_latent_caches(dataset, report)]
    assert stale == ["removed_00000-001_0064x0064_hv.safetensors", "removed_00000-005_0064x0064_hv.safetensors"]
    assert report.already_cached == 2 and "broken" in report.kept_stems


def test_stale_text_caches_are_those_no_caption_item_has(tmp_path):
    dataset = image_config(tmp_path)
    add_image(tmp_path, "a")
    for stem in ("a", "gone"):
        cache_files.save_text_cache(cache_files.text_cache_path(tmp_path / "cache", stem), "c", {"llm_float16": torch.zeros(1).half()})
    report = items.CacheReport()
    captions = items.caption_items(dataset, report)
    assert [p.name for p in items.stale_text_caches(dataset, captions, report)] == ["gone_hv_te.safetensors"]


def test_files_named_like_caches_that_are_not_are_never_deleted_as_stale(tmp_path):
    """fuzz_bc 1, 2: the cache folder is the image folder unless set, and a LoRA named `my_style_lora_hv.safetensors` there
    was deleted as the cache of an item gone from the dataset; a folder of a cache's name stopped the caching run."""
    from musubi_tuner.files import save_safetensors

    dataset = image_config(tmp_path)
    add_image(tmp_path, "a")
    cache_everything(dataset, items.CacheReport())
    cache = tmp_path / "cache"
    lora = {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)}
    for name in ("my_style_lora_hv.safetensors", "style_0512x0512_hv.safetensors", "notes_hv_te.safetensors"):
        save_safetensors(lora, cache / name)
    (cache / "b_0064x0064_hv.safetensors").mkdir()
    gone_latent = cache_files.save_latent_cache(cache / "gone_0064x0064_hv.safetensors", torch.zeros(16, 1, 8, 8), size=(64, 64))
    gone_text = cache_files.save_text_cache(cache_files.text_cache_path(cache, "gone"), "c", {"llm_float16": torch.zeros(1).half()})
    cut = cache / "cut_0064x0064_hv.safetensors"
    cut.write_bytes(b"\x10")  # (a cache whose write was cut short: its name is a cache's)
    (cache / "notes_cut_hv_te.safetensors").write_bytes(b"\x10")  # (any name is a text cache's: kept, fuzz_bf 5)
    report = items.CacheReport()
    cache_everything(dataset, report, skip_existing=True)
    stale = items.stale_latent_caches(dataset, report)
    assert [p.name for p in stale] == ["cut_0064x0064_hv.safetensors", "gone_0064x0064_hv.safetensors"]
    assert [p.name for p in items.stale_text_caches(dataset, items.caption_items(dataset, report), report)] == [gone_text.name]
    items.tidy_cache_directory(cache, stale, keep_cache=False)
    assert not gone_latent.exists() and not cut.exists()
    assert all((cache / name).is_file() for name in ("my_style_lora_hv.safetensors", "style_0512x0512_hv.safetensors",
                                                      "notes_hv_te.safetensors", "notes_cut_hv_te.safetensors"))
    assert (cache / "b_0064x0064_hv.safetensors").is_dir()


@pytest.mark.parametrize("written", [b"a cat\r\non grass\r\n", b"a cat\ron grass", b"\xef\xbb\xbfa cat\non grass\n"])
def test_caption_line_breaks_read_as_musubi_tuner_reads_them(tmp_path, written):
    """musubi-tuner opens captions in text mode (universal newlines): a Windows caption's \\r\\n is \\n there, and the
    \\r kept here was one token more per line break for the LLM: other embeddings than musubi-tuner's."""
    dataset = image_config(tmp_path)
    add_image(tmp_path, "a")
    (tmp_path / "images" / "a.txt").write_bytes(written)
    (item,), _ = items.list_items(dataset)
    with open(tmp_path / "images" / "a.txt", encoding="utf-8-sig") as f:  # what a text-mode open reads
        assert item.read_caption() == f.read().strip() == "a cat\non grass"
