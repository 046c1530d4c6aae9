import logging

import pytest

from musubi_tuner.errors import UserError
from musubi_tuner.training.sample_prompts import load_sample_prompts


def test_txt_lines_with_options(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\n\nA red ball rolls --w 200 --h 120 --f 10 --d 42 --s 8 --g 1.0 --fs 7 --l 6.0 --n blurry, dark\nplain prompt\n")
    a, b = load_sample_prompts(f)
    assert (a.prompt, a.width, a.height, a.frames, a.seed, a.steps) == ("A red ball rolls", 192, 112, 9, 42, 8)
    assert (a.guidance, a.flow_shift, a.cfg_scale, a.negative_prompt) == (1.0, 7.0, 6.0, "blurry, dark")
    assert (b.prompt, b.width, b.frames, b.seed, b.cfg_scale, b.index) == ("plain prompt", 256, 1, None, None, 1)


def test_a_negative_cfg_scale_is_taken_as_generation_takes_it(tmp_path):
    """fuzz_bb 8: hv_generate_video takes a negative --guidance_scale (as musubi-tuner does), and the planner and a sample
    prompt's --l refused the same value: "must be at least 0"."""
    from musubi_tuner.plan import build_parser

    f = tmp_path / "prompts.txt"
    f.write_text("a cat --l -3 --n ugly\n")
    (cat,) = load_sample_prompts(f)
    assert (cat.cfg_scale, cat.negative_prompt) == (-3.0, "ugly")
    assert build_parser().parse_args(["--guidance_scale", "-3"]).guidance_scale == -3.0


def test_toml_subsets_and_json(tmp_path):
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nwidth = 128\nsample_steps = 4\n[[prompt.subset]]\nprompt = "one"\n[[prompt.subset]]\nprompt = "two"\nwidth = 64\n')
    one, two = load_sample_prompts(t)
    assert (one.width, one.steps, two.width) == (128, 4, 64)
    j = tmp_path / "p.json"
    j.write_text('["a dog --f 5", {"prompt": "a cat", "seed": 3}]')
    dog, cat = load_sample_prompts(j)
    assert dog.frames == 5 and cat.seed == 3


def test_a_prompt_line_ends_only_where_musubi_tuner_ends_it(tmp_path):
    """At \\n, \\r\\n or \\r: a U+2028 or NEL pasted inside a prompt made two prompts, the options on the second half
    and the first sampled at the default size (fuzz_aa 6)."""
    f = tmp_path / "p.txt"
    f.write_bytes("a cat\u2028sitting --w 64 --h 64\r\nsecond\x85prompt --w 32\rthird --w 48\n".encode())
    assert [(p.prompt, p.width) for p in load_sample_prompts(f)] == [("a cat\u2028sitting", 64), ("second\x85prompt", 32), ("third", 48)]


def test_bad_option_names_the_line(tmp_path, caplog):
    """What matches no option is said and dropped, as musubi-tuner drops it: "a cat -- very cute" stopped the training
    at its start, where musubi-tuner samples "a cat" (fuzz_aa 10)."""
    f = tmp_path / "p.txt"
    f.write_text("ok\nbad --zz 3\na cat -- very cute --w 64\n")
    with caplog.at_level(logging.WARNING):
        prompts = load_sample_prompts(f)
    assert [(p.prompt, p.width) for p in prompts] == [("ok", 256), ("bad", 256), ("a cat", 64)]
    assert "p.txt: line 2: '--zz 3' is not an option (--w, --h," in caplog.text
    assert "p.txt: line 3: '-- very cute' is not an option (--w," in caplog.text and "ignored, as musubi-tuner ignores it" in caplog.text
    f.write_text("bad --w wide\n")
    with pytest.raises(UserError, match=r"p.txt: line 1: --w wide: not a whole number"):
        load_sample_prompts(f)


def test_a_line_is_named_by_its_number_in_the_file_a_byte_order_mark_is_no_prompt_and_a_misspelt_key_is_said(tmp_path, caplog):
    """Comment and blank lines were not counted ("line 2" was the fifth), Notepad's byte-order mark was kept in the first
    prompt (or made a comment a prompt), and a misspelt `widht` in a TOML prompt table sampled at the default width
    without a word."""
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na cat --w 64\n\nbad --w x\n")
    with pytest.raises(UserError, match=r"p.txt: line 5: --w x: not a whole number"):
        load_sample_prompts(f)
    f.write_bytes(b"\xef\xbb\xbf# comment\na cat --w 64\n")
    (cat,) = load_sample_prompts(f)
    assert cat.prompt == "a cat"
    j = tmp_path / "p.json"
    j.write_bytes(b'\xef\xbb\xbf["a dog"]')
    assert [p.prompt for p in load_sample_prompts(j)] == ["a dog"]
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a cat"\nwidht = 128\n')
    (cat,) = load_sample_prompts(t)
    assert cat.width == 64 and "p.toml: entry 1: 'widht' is not a sample prompt setting, ignored (did you mean width?)" in caplog.text


@pytest.mark.parametrize("content, message", [
    ("a cat --d 99999999999999999999999", r"line 1: --d 99999999999999999999999: must be between 0 and 18446744073709551615, 2\^64-1"),
    ("a cat --s -5", r"line 1: --s -5: must be between 1 and 1000"),
    ("a cat --g 1e38", r"line 1: --g 1e38: must be between 0 and 3.40282e\+35"),
    ("a cat --g nan", r"line 1: --g nan: not a finite number"),
    ("a cat --fs 0", r"line 1: --fs 0: must be greater than 0"),
    ("a cat --w 0", r"line 1: --w 0: must be between 1 and 8192"),
    ("a cat --f 100001", r"line 1: --f 100001: must be between 1 and 1025"),
])
def test_a_value_outside_its_domain_is_refused_when_the_file_is_read(tmp_path, content, message):
    """As the generation command's flags are: not when the first sample runs, after training has started."""
    f = tmp_path / "p.txt"
    f.write_text(content + "\n")
    with pytest.raises(UserError, match=message):
        load_sample_prompts(f)


@pytest.mark.parametrize("name, content, message", [
    ("p.toml", "[[prompt]]\nprompt = 'x'\n", r"p.toml: write the prompts as \[prompt\] .* \[\[prompt.subset\]\]"),
    ("p.toml", "[prompt]\nwidth = 'a'\n[[prompt.subset]]\nprompt = 'x'\n", r"p.toml: entry 1: width 'a' is not a number|width a: not"),
    ("p.json", '{"prompt": "x"}', r"p.json: a JSON list of prompts"),
    ("p.json", '[{"prompt": 5}]', r"p.json: entry 1: prompt 5 is not text"),
    ("p.json", '[{"prompt": "x", "seed": -1}]', r"p.json: entry 1: seed -1: must be between 0"),
    ("p.json", '[["x"]]', r"p.json: entry 1 is list"),
    # (JSON lets half a surrogate pair stand alone; the tokenizer failed on it at the first sample, hours in)
    ("p.json", '["a \\ud800 cat --w 64"]', r"p.json: line 1: the prompt holds \\ud800 at character 3, half of a surrogate pair"),
    ("p.json", '[{"prompt": "x", "negative_prompt": "\\udfff"}]', r"p.json: entry 1: the negative prompt holds \\udfff at character 1"),
])
def test_toml_and_json_prompt_files_of_another_shape_name_the_entry(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        load_sample_prompts(f)


@pytest.mark.parametrize("name, content, message", [
    ("p.txt", "ok\n--w 32 --h 32\n", r"p.txt: line 2: no prompt text"),
    ("p.txt", "a cat --w 32 --n\n", r"p.txt: line 1: --n needs a value"),
    ("p.txt", "a cat --i \n", r"p.txt: line 1: --i needs a value"),
    ("p.json", '[{"prompt": "  "}]', r"p.json: entry 1: no prompt text"),
])
def test_a_line_without_its_text_is_refused(tmp_path, name, content, message):
    """As the generation command refuses a blank --prompt: a sample of nothing is not what the line meant."""
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        load_sample_prompts(f)


def test_a_size_the_model_cannot_take_is_sampled_at_the_nearest_below_and_said(tmp_path, caplog):
    f = tmp_path / "p.txt"
    f.write_text("a cat --w 33 --h 40 --f 6\na dog --w 32 --h 48 --f 5\n")
    with caplog.at_level("WARNING"):
        cat, dog = load_sample_prompts(f)
    assert (cat.width, cat.height, cat.frames, dog.width, dog.height, dog.frames) == (32, 32, 5, 32, 48, 5)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ["p.txt: line 1: sampled at 32x32, 5 frames (sizes are multiples of 16, frame counts 4N+1), not 33x40, 6"
                    .replace("p.txt", str(f))]


def test_a_negative_prompt_without_real_cfg_is_said_to_be_ignored(tmp_path, caplog):
    """musubi-tuner samples with the negative prompt only under real CFG (--l other than 1): in sd-scripts, where many
    prompt files come from, --n acts alone, and here it was dropped without a word (fuzz_aa 17)."""
    f = tmp_path / "p.txt"
    f.write_text("a cat --n ugly\na dog --n ugly --l 6\n")
    with caplog.at_level(logging.WARNING):
        load_sample_prompts(f)
    said = [r.getMessage() for r in caplog.records if "negative prompt" in r.getMessage()]
    assert said == [f"{f}: line 1: the negative prompt is ignored without real CFG (--l other than 1, 6.0 say), as in musubi-tuner"]


@pytest.mark.parametrize("image, message", [
    ("folder", "expected an image, found a folder"),
    ("truncated.png", "not a readable image"),
    ("missing.png", "not found"),
])
def test_an_i2v_prompts_first_frame_is_read_with_the_file_and_tied_to_its_prompt(tmp_path, image, message):
    """fuzz_aj 5: a truncated --i image was named without its prompt file (after the models had loaded), a folder was
    "not found"."""
    import numpy as np
    from PIL import Image

    from musubi_tuner.training.sampling import sample_prompts_for

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    (tmp_path / "folder").mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat --i {tmp_path / 'good.png'}\na dog --i {tmp_path / image}\n")
    with pytest.raises(UserError) as e:
        sample_prompts_for(prompts, in_channels=32)
    assert str(e.value).startswith(f"{prompts}: prompt 2 (--i): {tmp_path / image}: ") and message in str(e.value)
    prompts.write_text(f"a cat --i {tmp_path / 'good.png'}\n")
    assert [p.image_path for p in sample_prompts_for(prompts, in_channels=32)] == [str(tmp_path / "good.png")]
