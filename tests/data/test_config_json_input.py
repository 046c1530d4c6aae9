"""JSON that users write (a JSON dataset config, the lines of a JSONL file): every problem json can have is the one-line
error of a malformed file, never a traceback, and a key given twice is refused as TOML refuses one."""

import json

import pytest

from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.items import list_items
from musubi_tuner.errors import UserError

from helpers import config_error

BIG = "1" + "0" * 5000  # more digits than Python converts
DEEP = "[" * 100000 + "1" + "]" * 100000


@pytest.mark.parametrize("batch_size, reason", [
    (BIG, "an integer of 5001 digits, too long to read)"),
    (DEEP, "nested too deeply"),
])
def test_a_json_config_that_python_cannot_read_is_not_valid_json(folders, batch_size, reason):
    text = ('{"general": {"caption_extension": ".txt"},\n "datasets": [\n'
            f'  {{"image_directory": "images", "batch_size": {batch_size}}}]}}\n')
    assert config_error(folders, text, name="dataset.json").startswith(f"dataset.json: not valid JSON ({reason}")


def test_a_json_config_with_a_key_given_twice_in_one_table_is_refused_naming_the_key(folders):
    (folders / "dataset.json").write_text(json.dumps({"general": {"caption_extension": ".txt", "resolution": [32, 32]},
                                                     "datasets": [{"image_directory": "images", "resolution": [64, 64]}]}))
    assert load_dataset_config("dataset.json").datasets[0].resolution == (64, 64)  # one key in two tables: fine
    text = ('{"general": {"caption_extension": ".txt", "resolution": [32, 32]},\n "datasets": [\n'
            '  {"image_directory": "images", "resolution": [32, 32],\n   "resolution": [64, 64]}]}\n')
    assert config_error(folders, text, name="dataset.json") == (
        'dataset.json: not valid JSON (key "resolution" given twice in the object at line 3 column 3)')  # (where: fuzz_al 4)


@pytest.mark.parametrize("line, reason", [
    ('{"image_path": "a.png", "caption": "a", "n": %s}' % BIG, "an integer of 5001 digits, too long to read"),
    ('{"image_path": "a.png", "caption": "a", "n": %s}' % DEEP, "nested too deeply"),
    ('{"image_path": "a.png", "caption": "a", "caption": "b"}', 'key "caption" given twice in the object at line 1 column 1'),
])
def test_a_jsonl_line_that_python_cannot_read_or_that_gives_a_key_twice_is_named(folders, line, reason):
    (folders / "items.jsonl").write_text('{"image_path": "a.png", "caption": "fine"}\n' + line + "\n")
    (folders / "dataset.toml").write_text('[[datasets]]\nimage_jsonl_file = "items.jsonl"\ncache_directory = "cache"\n')
    dataset = load_dataset_config("dataset.toml").datasets[0]
    with pytest.raises(UserError) as info:
        list_items(dataset)
    assert str(info.value) == (f"items.jsonl:2: not a JSON object ({reason}) "
                               f"(dataset.toml: [[datasets]][0].image_jsonl_file)")


@pytest.mark.parametrize("line, reason", [
    ('{"image_path": "a.png\\u0000", "caption": "a"}', '"a.png\\u0000": holds a NUL character (\\u0000), which no path can; '
                                                        'remove it'),  # (a traceback when latent caching recorded it)
    ('{"image_path": 5, "caption": "a"}', 'no "image_path" (image_path is 5, not a path)'),  # (it was there: not a string)
    ('{"image_path": "~nouser_of_this_machine/a.png", "caption": "a"}',
     '"~nouser_of_this_machine/a.png": cannot expand ~ (no user named \'nouser_of_this_machine\'); write the full path'),
    # (JSON lets half a surrogate pair stand alone: a UnicodeEncodeError traceback where latent caching stat'ed it)
    ('{"image_path": "a\\ud800.png", "caption": "a"}',
     '"a\\ud800.png": holds \\ud800 at character 2, half of a surrogate pair, which no file name can'),
])
def test_a_jsonl_path_no_file_can_have_is_named_with_its_line(folders, line, reason):
    (folders / "items.jsonl").write_text(line + "\n")
    (folders / "dataset.toml").write_text('[[datasets]]\nimage_jsonl_file = "items.jsonl"\ncache_directory = "cache"\n')
    with pytest.raises(UserError) as info:
        list_items(load_dataset_config("dataset.toml").datasets[0])
    assert str(info.value) == f"items.jsonl:1: {reason} (dataset.toml: [[datasets]][0].image_jsonl_file)"


def test_a_config_path_with_a_nul_character_is_named_not_a_traceback(folders):
    """cache_directory = "c\u0000x" was a ValueError traceback (embedded null byte) where the folder was first used."""
    text = '[general]\ncaption_extension = ".txt"\n[[datasets]]\nimage_directory = "images"\ncache_directory = "c\\u0000x"\n'
    assert config_error(folders, text) == ('dataset.toml: [[datasets]][0].cache_directory = "c\\u0000x": holds a NUL character '
                                           '(\\u0000), which no path can; remove it')


@pytest.mark.parametrize("general, table, reason", [
    ('"caption_extension": ".t\\ud800"', '"image_directory": "images"',
     '[general].caption_extension = ".t\\ud800" holds \\ud800 at character 3, half of a surrogate pair, which no file name can'),
    ('"caption_extension": ".txt"', '"image_directory": "images", "cache_directory": "c\\ud800"',
     '[[datasets]][0].cache_directory = "c\\ud800": holds \\ud800 at character 2, half of a surrogate pair, which no file name can'),
])
def test_a_json_config_name_no_file_can_have_is_named(folders, general, table, reason):
    """fuzz_aa 1: a UnicodeEncodeError traceback in latent caching (a path's realpath, a caption name's bytes)."""
    text = f'{{"general": {{{general}}}, "datasets": [{{{table}}}]}}'
    assert config_error(folders, text, name="dataset.json") == f"dataset.json: {reason}"
