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


def test_toml_subsets_and_json(tmp_path):
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nwidth = 128\nsample_steps = 4\n[[prompt.subset]]\nprompt = "one"\n[[prompt.subset]]\nprompt = "two"\nwidth = 64\n')
    one, two = load_sample_prompts(t)
    assert (one.width, one.steps, two.width) == (128, 4, 64)
    j = tmp_path / "p.json"
    j.write_text('["a dog --f 5", {"prompt": "a cat", "seed": 3}]')
    dog, cat = load_sample_prompts(j)
    assert dog.frames == 5 and cat.seed == 3


def test_bad_option_names_the_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("ok\nbad --zz 3\n")
    with pytest.raises(UserError, match=r"p.txt: line 2: unknown option --zz"):
        load_sample_prompts(f)
    f.write_text("bad --w wide\n")
    with pytest.raises(UserError, match=r"--w 'wide' is not a int"):
        load_sample_prompts(f)
