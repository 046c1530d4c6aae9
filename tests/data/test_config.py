"""The dataset TOML: musubi-tuner's keys and resolution order, typed results, one-line errors naming file/table/key."""

import argparse
import json
import logging
import os
import re
from pathlib import Path

import pytest

from musubi_tuner.data.config import ImageDatasetConfig, VideoDatasetConfig, load_dataset_config
from musubi_tuner.errors import UserError

from helpers import config_error, write_config

DOCS = Path(__file__).resolve().parents[2] / "docs" / "dataset_config.md"


IMAGES = '[[datasets]]\nimage_directory = "images"\ncaption_extension = ".txt"\n'
VIDEOS = '[[datasets]]\nvideo_directory = "videos"\ncaption_extension = ".txt"\n'


def test_defaults_are_musubi_tuners(folders):
    (image,) = load_dataset_config(write_config(folders, IMAGES)).datasets
    assert isinstance(image, ImageDatasetConfig)
    assert (image.resolution, image.batch_size, image.num_repeats, image.enable_bucket, image.bucket_no_upscale) == \
        ((960, 544), 1, 1, False, False)
    assert image.cache_directory == Path("images").absolute()  # defaults to the image folder
    (video,) = load_dataset_config(write_config(folders, VIDEOS)).datasets
    assert isinstance(video, VideoDatasetConfig)
    assert (video.target_frames, video.frame_extraction, video.frame_stride, video.frame_sample, video.max_frames,
            video.source_fps) == ((1,), "head", 1, 1, 129, None)


def test_a_dataset_overrides_general_which_overrides_the_command_line_which_overrides_defaults(folders):
    config = write_config(folders, """
[general]
resolution = 512
batch_size = 2
[[datasets]]
image_directory = "images"
cache_directory = "cache_a"
batch_size = 4
caption_extension = ".caption"
[[datasets]]
video_directory = "videos"
cache_directory = "cache_b"
""")
    args = argparse.Namespace(batch_size=8, num_repeats=3, caption_extension=".txt", num_workers=None, vae="x")
    first, second = load_dataset_config(config, args).datasets
    assert first.resolution == second.resolution == (512, 512)
    assert (first.batch_size, second.batch_size) == (4, 2)
    assert (first.num_repeats, second.num_repeats) == (3, 3)  # only the command line sets it
    assert (first.caption_extension, second.caption_extension) == (".caption", ".txt")


def test_source_fps_accepts_an_integer_unlike_musubi_tuner(folders):
    (video,) = load_dataset_config(write_config(folders, VIDEOS + "source_fps = 30\n")).datasets
    assert video.source_fps == 30.0 and isinstance(video.source_fps, float)


def test_target_frames_are_rounded_down_to_4n_plus_1_with_a_warning(folders, caplog):
    with caplog.at_level(logging.WARNING):
        (video,) = load_dataset_config(write_config(folders, VIDEOS + "target_frames = [24, 1, 45]\n")).datasets
    assert video.target_frames == (1, 21, 45)
    assert "[[datasets]][0].target_frames: 24 -> 21" in caplog.text.replace("is not 4N+1, rounded down (", "")


@pytest.mark.parametrize("max_frames,said", [
    (4, "max_frames: 4 is not 4N+1: a video's clip is at most 1 frame (the next 4N+1, 5, keeps one more latent frame)"),
    (12, "max_frames: 12 is not 4N+1: a video's clip is at most 9 frames (the next 4N+1, 13, keeps one more latent frame)"),
    (13, None),
])
def test_a_max_frames_full_extraction_rounds_down_is_said_as_target_frames_is(folders, caplog, max_frames, said):
    """fuzz_av 5: max_frames = 4 cached one-frame clips, still images, without a word."""
    with caplog.at_level(logging.WARNING):
        load_dataset_config(write_config(folders, VIDEOS + f'frame_extraction = "full"\nmax_frames = {max_frames}\n'))
    assert (f"[[datasets]][0].{said}" in caplog.text) if said else "max_frames" not in caplog.text, caplog.text


def test_uniform_with_one_sample_becomes_head(folders, caplog):
    with caplog.at_level(logging.WARNING):
        (video,) = load_dataset_config(write_config(folders, VIDEOS + 'frame_extraction = "uniform"\n')).datasets
    assert video.frame_extraction == "head" and "same as \"head\"" in caplog.text


def test_other_architectures_keys_are_accepted_and_ignored_with_a_note(folders, caplog):
    with caplog.at_level(logging.INFO):
        (image,) = load_dataset_config(write_config(folders, IMAGES + 'control_directory = "c"\nfp_latent_window_size = 9\n')).datasets
    assert image.ignored_keys == ("control_directory", "fp_latent_window_size")
    assert "ignored for HunyuanVideo" in caplog.text


def test_a_misspelt_key_names_file_table_and_the_closest_key(folders):
    message = config_error(folders, VIDEOS + "target_frame = [25]\n")
    assert message == "dataset.toml: [[datasets]][0].target_frame is not a video dataset key (did you mean target_frames?)"
    message = config_error(folders, IMAGES + "num_repeat = 2\n")
    assert message == "dataset.toml: [[datasets]][0].num_repeat is not an image dataset key (did you mean num_repeats?)"


def test_a_key_with_a_look_alike_letter_names_the_letter(folders):
    """"сaption_extension is not a dataset key (did you mean caption_extension?)" read as a contradiction: its first letter
    is Cyrillic (fuzz_aa 18)."""
    message = config_error(folders, '[general]\n"\u0441aption_extension" = ".txt"\n' + IMAGES)
    assert message.endswith("(did you mean caption_extension? its \u0441 is U+0441 CYRILLIC SMALL LETTER ES)")


def test_a_misspelt_key_in_general_suggests_a_general_key(folders):
    message = config_error(folders, "[general]\nbatchsize = 2\n" + IMAGES)
    assert message == "dataset.toml: [general].batchsize is not a dataset key (did you mean batch_size?)"


def test_a_video_key_in_an_image_dataset_says_so(folders):
    assert "target_frames applies to video datasets only" in config_error(folders, IMAGES + "target_frames = [1]\n")


def test_per_dataset_keys_are_refused_in_general(folders):
    message = config_error(folders, '[general]\ncache_directory = "c"\n' + IMAGES)
    assert message == "dataset.toml: [general].cache_directory must be set in each [[datasets]] table, not in [general]"


@pytest.mark.parametrize("line, expected", [
    ('batch_size = "4"', 'dataset.toml: [[datasets]][0].batch_size = "4" is not an integer'),
    ("batch_size = 0", "dataset.toml: [[datasets]][0].batch_size = 0 must be at least 1"),
    ("enable_bucket = 1", "dataset.toml: [[datasets]][0].enable_bucket = 1 is not true or false"),
    ("resolution = [960]", "dataset.toml: [[datasets]][0].resolution = [960] is not [width, height] or a single number"),
    ("target_frames = [0]", "dataset.toml: [[datasets]][0].target_frames = [0] must be at least 1"),
    ('source_fps = "30"', 'dataset.toml: [[datasets]][0].source_fps = "30" is not a number'),
    ("resolution = [100000, 100000]", "dataset.toml: [[datasets]][0].resolution = [100000, 100000]: each side at most 8192 pixels "
                                      "(HunyuanVideo trains at 544x960 to 720x1280)"),
    ("source_fps = inf", "dataset.toml: [[datasets]][0].source_fps = inf must be a finite number greater than 0"),
    ('frame_extraction = "uniform"\nframe_sample = 1000000000',  # (numpy's linspace of a billion starts: 11 GB, minutes)
     "dataset.toml: [[datasets]][0].frame_sample = 1000000000 is too large: at most 10,000 (clips per video and length, each a "
     "latent cache)"),
    ('frame_extraction = "heads"',
     'dataset.toml: [[datasets]][0].frame_extraction = "heads" is not one of head, chunk, slide, uniform, full '
     '(did you mean head?)'),
])
def test_wrong_types_and_values_name_the_key_and_value(folders, line, expected):
    assert config_error(folders, VIDEOS + line + "\n") == expected


def test_a_missing_folder_is_named_with_its_key(folders):
    message = config_error(folders, '[[datasets]]\nvideo_directory = "clips"\ncaption_extension = ".txt"\n')
    assert message == ('dataset.toml: [[datasets]][0].video_directory = "clips": folder not found (a relative path: looked for '
                       f"in the folder this command runs from, {os.getcwd()}, and beside the config, {folders.absolute()})")


def test_training_from_caches_does_not_need_the_source_folders(folders):
    text = '[[datasets]]\nvideo_directory = "gone"\ncache_directory = "cache"\ncaption_extension = ".txt"\n'
    (video,) = load_dataset_config(write_config(folders, text), check_sources=False).datasets
    assert video.cache_directory == Path("cache").absolute()


def test_a_directory_dataset_needs_a_caption_extension(folders):
    assert "caption_extension is required with image_directory" in config_error(folders, '[[datasets]]\nimage_directory = "images"\n')


def test_a_jsonl_dataset_needs_a_cache_directory(folders):
    (folders / "meta.jsonl").write_text("")
    message = config_error(folders, '[[datasets]]\nimage_jsonl_file = "meta.jsonl"\n')
    assert message == "dataset.toml: [[datasets]][0]: cache_directory is required with image_jsonl_file"


def test_datasets_must_not_share_a_cache_folder(folders):
    message = config_error(folders, IMAGES + IMAGES)  # both default to images/
    assert message.startswith(f"dataset.toml: [[datasets]][0] and [[datasets]][1] share the cache folder {folders / 'images'}")


def test_datasets_must_not_share_a_cache_folder_through_a_link(folders):
    """Otherwise caching the second blamed "another run" (its own) for the first's lock, and training took every cache
    twice."""
    (folders / "cache").mkdir()
    (folders / "linked").symlink_to(folders / "cache")
    message = config_error(folders, IMAGES + 'cache_directory = "cache"\n' + IMAGES + 'cache_directory = "linked"\n')
    assert message.startswith(f"dataset.toml: [[datasets]][0] and [[datasets]][1] share the cache folder {folders / 'linked'}, which is "
                              f"{(folders / 'cache').resolve()}; give each dataset its own cache_directory")


def test_a_dataset_of_neither_kind_or_both_kinds_is_refused(folders):
    assert "needs one of image_directory" in config_error(folders, '[[datasets]]\nbatch_size = 1\n')
    assert "has both image_directory and video_directory" in config_error(folders, IMAGES + 'video_directory = "videos"\n')


def test_resolution_without_bucketing_must_be_a_multiple_of_16(folders):
    assert "(try [992, 496])" in config_error(folders, IMAGES + "resolution = [1000, 500]\n")
    (image,) = load_dataset_config(write_config(folders, IMAGES + "resolution = [1000, 500]\nenable_bucket = true\n")).datasets
    assert image.resolution == (1000, 500)


def test_syntax_errors_and_unknown_files_name_the_file(folders):
    assert config_error(folders, "[general\n").startswith("dataset.toml: not valid TOML")
    # arrays 500 deep: the parser recursed past Python's limit, a RecursionError traceback
    assert config_error(folders, "x = " + "[" * 500 + "]" * 500 + "\n") == "dataset.toml: not valid TOML (nested too deeply)"
    with pytest.raises(UserError, match="dataset config not found"):
        load_dataset_config(folders / "nope.toml")
    with pytest.raises(UserError, match="must end in .toml or .json"):
        load_dataset_config(write_config(folders, IMAGES, "dataset.yaml"))


def test_json_configs_have_the_same_structure(folders):
    config = {"general": {"resolution": [640, 384], "caption_extension": ".txt"},
              "datasets": [{"video_directory": "videos", "target_frames": [1, 25], "frame_extraction": "chunk"}]}
    (video,) = load_dataset_config(write_config(folders, json.dumps(config), "dataset.json")).datasets
    assert (video.resolution, video.target_frames, video.frame_extraction) == ((640, 384), (1, 25), "chunk")


def test_relative_paths_fall_back_to_the_config_files_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "images").mkdir(parents=True)
    config = write_config(tmp_path / "project", IMAGES)
    monkeypatch.chdir(tmp_path)  # "images" does not exist here, but beside the config
    (image,) = load_dataset_config(config).datasets
    assert image.image_directory == tmp_path / "project" / "images"


def test_lora_metadata_uses_musubi_tuners_keys(folders):
    (video,) = load_dataset_config(write_config(folders, VIDEOS + "target_frames = [1, 25]\n")).datasets
    meta = video.metadata()
    assert meta["video_directory"] == "videos" and meta["target_frames"] == [1, 25]
    assert meta["batch_size_per_device"] == 1 and meta["has_control"] is False


def doc_examples():
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, "docs/dataset_config.md has no toml examples"
    return blocks


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_every_example_in_the_docs_loads(tmp_path, monkeypatch, index):
    text = doc_examples()[index]
    monkeypatch.chdir(tmp_path)
    for key, value in re.findall(r'^\s*(\w+)\s*=\s*"([^"]+)"', text, flags=re.M):
        if key.endswith("_directory") and key != "cache_directory":
            (tmp_path / value).mkdir(parents=True, exist_ok=True)
        elif key.endswith("_file"):
            (tmp_path / value).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / value).touch()
    config = load_dataset_config(write_config(tmp_path, text))
    assert config.datasets


# ------------------------------------------------------------------------------------------ validation data


def test_validation_split_in_general_holds_out_part_of_every_dataset_unless_one_sets_its_own(folders):
    text = "[general]\nvalidation_split = 0.1\n\n" + IMAGES + "\n" + VIDEOS + "validation_split = 0.25\n"
    images, videos = load_dataset_config(write_config(folders, text)).datasets
    assert (images.validation_split, videos.validation_split) == (0.1, 0.25)
    assert load_dataset_config(write_config(folders, text)).has_validation
    (plain,) = load_dataset_config(write_config(folders, IMAGES)).datasets
    assert plain.validation_split == 0.0 and not load_dataset_config(write_config(folders, IMAGES)).has_validation


@pytest.mark.parametrize("value", ["1.0", "-0.1", '"10%"'])
def test_validation_split_must_be_a_fraction_below_one(folders, value):
    message = config_error(folders, IMAGES + f"validation_split = {value}\n")
    assert message.startswith("dataset.toml: [[datasets]][0].validation_split = ")
    assert "less than 1" in message or "not a number" in message


def test_validation_datasets_are_read_like_datasets_but_kept_apart(folders):
    (folders / "held").mkdir()
    text = ("[general]\nresolution = [512, 512]\ncaption_extension = \".txt\"\nvalidation_split = 0.1\nnum_repeats = 3\n\n"
            + IMAGES + '\n[[validation_datasets]]\nimage_directory = "held"\n')
    config = load_dataset_config(write_config(folders, text))
    (train,), (held,) = config.datasets, config.validation_datasets
    assert train.role == "train" and train.num_repeats == 3 and train.validation_split == 0.1
    assert held.role == "validation" and held.resolution == (512, 512)  # [general] applies to it too
    assert held.num_repeats == 1 and held.validation_split == 0.0  # each held-out item counts once
    assert held.where == "dataset.toml: [[validation_datasets]][0]"
    assert config.all_datasets == (train, held)  # what the caching commands encode


def test_a_validation_dataset_cannot_split_itself_or_share_a_cache_folder(folders):
    held = '\n[[validation_datasets]]\nimage_directory = "images"\ncaption_extension = ".txt"\n'
    assert config_error(folders, IMAGES + held).startswith(
        f"dataset.toml: [[datasets]][0] and [[validation_datasets]][0] share the cache folder {folders / 'images'}")
    assert "a validation dataset is held out whole" in config_error(folders, IMAGES + held.replace('"images"', '"videos"') + "validation_split = 0.5\n")


def test_a_validation_dataset_over_a_training_datasets_items_is_said(folders, caplog):
    """fuzz_ak 3: a [[validation_datasets]] table of the training folder (its own cache folder) was accepted without a
    word: its "held-out" items were all trained on."""
    held = '\n[[validation_datasets]]\nimage_directory = "images"\ncache_directory = "val_cache"\ncaption_extension = ".txt"\n'
    config = load_dataset_config(write_config(folders, IMAGES + held))
    assert len(config.validation_datasets) == 1
    assert ("dataset.toml: [[validation_datasets]][0]'s image_directory images is also [[datasets]][0]'s: its "
            "items are trained on") in caplog.text
    caplog.clear()
    load_dataset_config(write_config(folders, IMAGES + held.replace('"images"', '"videos"').replace("image_dir", "video_dir")))
    assert "trained on" not in caplog.text


def test_a_misspelt_key_is_named_before_the_errors_of_other_tables(tmp_path):
    toml = tmp_path / "dataset.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n\n'
                    '[[datasets]]\nvideo_directory = "videos"\nnum_repeats = 0\n\n'  # a bad value in the first table
                    '[[datasets]]\nimage_directroy = "images"\n')  # and a misspelt key in the second
    with pytest.raises(UserError, match=r"\[\[datasets\]\]\[1\]\.image_directroy is not a dataset key \(did you mean image_directory\?\)"):
        load_dataset_config(toml, check_sources=False)


@pytest.mark.parametrize("name", ["dataset.toml", "dataset.json"])  # (a .json one was "not valid JSON (Unexpected UTF-8 BOM)")
def test_a_dataset_config_saved_with_a_byte_order_mark_reads_as_without(folders, name):
    """Windows' Notepad writes a UTF-8 BOM first; tomllib calls that an invalid statement at line 1."""
    path = write_config(folders, VIDEOS)
    if name.endswith(".json"):
        path = path.with_name(name)
        path.write_text(json.dumps({"general": {"caption_extension": ".txt"}, "datasets": [{"video_directory": "videos"}]}))
    want = load_dataset_config(path).datasets
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_dataset_config(path).datasets == want


@pytest.mark.parametrize("value", ["../../etc/passwd", "/x", "sub/.txt", "..\\\\caps.txt", "a\\u0000.txt"])
@pytest.mark.parametrize("table", ["general", "datasets"])
def test_a_caption_extension_holding_a_path_separator_is_refused_naming_the_key(folders, value, table):
    """It is appended to each item's file name: a separator would read a caption from another folder (D15)."""
    line = f'caption_extension = "{value}"\n'
    text = "[general]\n" + line + '[[datasets]]\nimage_directory = "images"\n' if table == "general" else \
        '[[datasets]]\nimage_directory = "images"\n' + line
    message = config_error(folders, text)
    where = "[general]" if table == "general" else "[[datasets]][0]"
    assert message.startswith(f"dataset.toml: {where}.caption_extension = ")
    assert message.endswith('must be a file extension such as ".txt" (no /, \\ or NUL): the caption sits beside its image or video')
    assert "\n" not in message


def test_a_caption_extension_from_the_command_line_is_checked_too(folders):
    with pytest.raises(UserError, match=r"command line --caption_extension = '/x' must be a file extension"):
        load_dataset_config(write_config(folders, '[[datasets]]\nimage_directory = "images"\n'), {"caption_extension": "/x"})


@pytest.mark.parametrize("value", ["100000000000000000", "10001"])
def test_an_absurd_num_repeats_is_refused_naming_the_key_and_the_flags_for_longer_training(folders, value):
    """Every repeat is a sample the epoch's plan holds in memory; 10**17 ran training out of host memory (D16)."""
    message = config_error(folders, VIDEOS + f"num_repeats = {value}\n")
    assert message == (f"dataset.toml: [[datasets]][0].num_repeats = {value} is too large: at most 10,000 (every repeat is "
                       "held in memory for the epoch's plan); to train longer, set --max_train_steps or --max_train_epochs")


def test_num_repeats_up_to_the_bound_is_accepted(folders):
    (video,) = load_dataset_config(write_config(folders, "[general]\nnum_repeats = 10000\n" + VIDEOS)).datasets
    assert video.num_repeats == 10000


def test_a_dataset_folder_that_is_a_fifo_or_a_file_is_named_as_what_it_is(tmp_path):
    """fuzz_ag 8b: a video_directory naming a FIFO was "is a file, expected a folder"."""
    from helpers import config_error

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "notes.txt").write_text("x")
    for name, kind in (("pipe", "a FIFO"), ("notes.txt", "a file")):
        message = config_error(tmp_path, f'[[datasets]]\nvideo_directory = "{(tmp_path / name).as_posix()}"\n')
        assert message.endswith(f'.video_directory = "{(tmp_path / name).as_posix()}": is {kind}, expected a folder'), message
