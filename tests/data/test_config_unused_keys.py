"""Dataset keys that the dataset's settings do not read (a frame key of another frame_extraction, bucket_no_upscale
without buckets, num_repeats of a validation dataset, caption_extension of a JSONL dataset) are accepted, as
musubi-tuner accepts them, with one warning each that names the key and says what is used instead."""

import pytest

from musubi_tuner.data.config import load_dataset_config


@pytest.fixture
def folder(folders):
    """The config tests' folder, with an (empty) items.jsonl for the JSONL datasets."""
    (folders / "items.jsonl").write_text("")
    return folders


def warnings_of(folder, text, caplog):
    (folder / "dataset.toml").write_text(text)
    with caplog.at_level("WARNING", logger="musubi_tuner.data.config"):
        config = load_dataset_config("dataset.toml")
    return config, [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


VIDEO = '[[datasets]]\nvideo_directory = "videos"\ncaption_extension = ".txt"\n'


@pytest.mark.parametrize("extraction, key, value, used", [
    ("head", "frame_stride", "3", '"slide"'),
    ("chunk", "frame_stride", "3", '"slide"'),
    ("head", "frame_sample", "3", '"uniform"'),
    ("slide", "frame_sample", "3", '"uniform"'),
    ("head", "max_frames", "5", '"full"'),
    ("uniform", "max_frames", "5", '"full"'),
    ("full", "target_frames", "[5]", '"head", "chunk", "slide" or "uniform"'),
])
def test_a_frame_key_of_another_frame_extraction_is_warned_about_once(folder, caplog, extraction, key, value, used):
    extra = 'frame_sample = 2\n' if extraction == "uniform" else ""
    config, warnings = warnings_of(folder, f'{VIDEO}frame_extraction = "{extraction}"\n{extra}{key} = {value}\n', caplog)
    assert warnings == [f'dataset.toml: [[datasets]][0].{key} = {value} is used with frame_extraction = {used} only; '
                        f'ignored here: frame_extraction = "{extraction}" takes ' + warnings[0].split(" takes ", 1)[1]]
    assert config.datasets[0].frame_extraction == extraction  # accepted, as musubi-tuner does


def test_the_warning_says_what_the_mode_takes_instead_and_keys_read_or_at_their_default_are_quiet(folder, caplog):
    text = (f'{VIDEO}cache_directory = "c1"\nframe_extraction = "slide"\nframe_stride = 4\ntarget_frames = [1, 5]\n'
            f'{VIDEO}cache_directory = "c2"\nframe_extraction = "uniform"\nframe_sample = 3\n'
            f'{VIDEO}cache_directory = "c3"\nframe_extraction = "head"\nframe_stride = 1\nframe_sample = 1\n'
            f'max_frames = 129\n'  # a template that writes every key with its default value
            f'{VIDEO}cache_directory = "c4"\nframe_extraction = "full"\nmax_frames = 45\ntarget_frames = [25]\n')
    _, warnings = warnings_of(folder, text, caplog)
    assert warnings == ['dataset.toml: [[datasets]][3].target_frames = [25] is used with frame_extraction = "head", '
                        '"chunk", "slide" or "uniform" only; ignored here: frame_extraction = "full" takes the whole '
                        'video, at most max_frames = 45 frames']


@pytest.mark.parametrize("text, warning", [
    ('[general]\nresolution = [64, 64]\n[[datasets]]\nimage_directory = "images"\ncaption_extension = ".txt"\nbucket_no_upscale = true\n',
     "dataset.toml: [[datasets]][0].bucket_no_upscale = true is used with enable_bucket = true only; "
     "ignored here: without buckets every item is scaled and cropped to resolution = [64, 64]"),
    ('[[datasets]]\nimage_jsonl_file = "items.jsonl"\ncache_directory = "cache"\ncaption_extension = ".txt"\n',
     'dataset.toml: [[datasets]][0].caption_extension = ".txt" is used with image_directory or '
     'video_directory only; ignored here: each line of image_jsonl_file holds its "caption"'),
], ids=["bucket_no_upscale without buckets", "caption_extension of a JSONL dataset"])
def test_a_key_the_datasets_kind_does_not_read_is_warned_about(folder, caplog, text, warning):
    _, warnings = warnings_of(folder, text, caplog)
    assert warnings == [warning]


def test_num_repeats_of_a_validation_dataset_is_warned_about(folder, caplog):
    text = ('[[datasets]]\nimage_directory = "images"\ncaption_extension = ".txt"\n'
            '[[validation_datasets]]\nvideo_directory = "videos"\ncaption_extension = ".txt"\nnum_repeats = 5\n')
    config, warnings = warnings_of(folder, text, caplog)
    assert warnings == ["dataset.toml: [[validation_datasets]][0].num_repeats = 5 is used by [[datasets]] only; "
                        "ignored here: a validation dataset uses each item once"]
    assert config.validation_datasets[0].num_repeats == 1


def test_a_general_key_is_warned_about_only_when_no_dataset_that_inherits_it_reads_it(folder, caplog):
    shared = ('[general]\ncaption_extension = ".txt"\nbucket_no_upscale = true\nenable_bucket = true\n'
              '[[datasets]]\nimage_directory = "images"\n'
              '[[datasets]]\nimage_jsonl_file = "items.jsonl"\ncache_directory = "cache"\n'
              '[[validation_datasets]]\nvideo_directory = "videos"\n')
    assert warnings_of(folder, shared, caplog)[1] == []  # one [general] for datasets of every kind: normal

    caplog.clear()
    unread = ('[general]\ncaption_extension = ".txt"\nbucket_no_upscale = true\n'
              '[[datasets]]\nimage_jsonl_file = "items.jsonl"\ncache_directory = "cache"\n'
              '[[datasets]]\nimage_jsonl_file = "items.jsonl"\ncache_directory = "cache2"\n')
    assert warnings_of(folder, unread, caplog)[1] == [
        "dataset.toml: [general].bucket_no_upscale = true is used with enable_bucket = true only; no dataset that takes "
        "it from [general] uses it",
        'dataset.toml: [general].caption_extension = ".txt" is used with image_directory or video_directory only; no '
        "dataset that takes it from [general] uses it"]
