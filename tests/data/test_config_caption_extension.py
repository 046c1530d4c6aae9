"""caption_extension is refused when the config is read if no caption file can be meant: without a dot ("txt" names
the caption of cat.png "cattxt", in musubi-tuner too), with spaces around it, or the extension of the dataset's own
images or videos (each item would be read as its own caption)."""

import pytest

from musubi_tuner.data.config import load_dataset_config

from helpers import config_error


@pytest.mark.parametrize("value, problem, fixed", [
    ("txt", "has no dot", ".txt"), ("", "has no dot", ".txt"), (" .txt", "has spaces around it", ".txt"),
    (".txt ", "has spaces around it", ".txt"),
])
def test_a_caption_extension_without_its_dot_or_with_spaces_is_refused_with_the_fix(folders, value, problem, fixed):
    text = f'[general]\ncaption_extension = "{value}"\n[[datasets]]\nimage_directory = "images"\n'
    assert config_error(folders, text) == (f'dataset.toml: [general].caption_extension = "{value}" {problem}: the caption '
                                        f'of cat.png is "cat" + caption_extension; write "{fixed}"')
    for accepted in (fixed, fixed.upper(), "_tags.txt"):  # a suffix with a dot inside names files too, as in musubi-tuner
        (folders / "dataset.toml").write_text(text.replace(f'"{value}"', f'"{accepted}"'))
        assert load_dataset_config("dataset.toml").datasets[0].caption_extension == accepted


@pytest.mark.parametrize("kind, extension", [("image", ".png"), ("image", ".JPG"), ("video", ".mp4")])
def test_a_caption_extension_of_the_datasets_own_media_is_refused(folders, kind, extension):
    text = f'[[datasets]]\n{kind}_directory = "{kind}s"\ncaption_extension = "{extension}"\n'
    assert config_error(folders, text) == (f'dataset.toml: [[datasets]][0]: caption_extension = "{extension}" is the '
                                        f"extension of the {kind}s in {kind}_directory, so each {kind} would be read "
                                        f'as its own caption; captions need files of their own, such as ".txt"')
