"""Damaged LoRA files (found by fuzzing) at every command that reads them: unreadable metadata is ignored with a
warning naming the file and key; a pair missing a half is reported by the doctor; a negative alpha converts with its
sign; integer / bool weights and alphas of several values are refused in one line by the reader, so by every command."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from musubi_tuner import convert_lora, lora_doctor, lora_info, lora_post_hoc_ema, merge_lora
from musubi_tuner.errors import UserError
from musubi_tuner.networks.lora_files import lora_outputs
from musubi_tuner.networks.lora_metadata import LoRAFileInfo, lora_module_info
from musubi_tuner.networks.lora_reader import check_entry_types, parse_lora, read_lora, read_lora_contents, read_lora_file

from helpers import run_main, tiny_dit_file_and_lora

MODULE = "lora_unet_double_blocks_0_img_attn_proj"
OFFICIAL = "double_blocks.0.img_attn_proj"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(folder, tiny DiT path, the trained LoRA's tensors, its metadata as the trainer writes it)."""
    tmp = tmp_path_factory.mktemp("damaged")
    dit, weights, net = tiny_dit_file_and_lora(tmp, generator=torch.Generator().manual_seed(0))
    info = LoRAFileInfo(version="0.1.0", base_model="hunyuan-video-t2v", in_channels=16, text_template="hunyuan-video",
                        modules=lora_module_info(net), resolutions=[(960, 544)], frames=[25, 45], naming="kohya")
    return tmp, dit, weights, info.to_metadata()


def write(path, weights, metadata=None):
    save_file(weights, str(path), metadata=metadata)
    return path


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ----------------------------------------------------------------------------------------------- D1: metadata


OURS_BAD = [("musubi_tuner.lora_modules", "{not json", "is not valid JSON"),
            ("musubi_tuner.frames", "{", "is not valid JSON"),
            ("musubi_tuner.resolutions", "[1]", "[width, height]"),
            ("musubi_tuner.resolutions", '{"a": 1}', "a JSON object, not a list"),
            ("musubi_tuner.in_channels", "banana", "not a whole number"),
            ("musubi_tuner.lora_modules", '{"double_blocks.0.img_attn_qkv": "x"}', "[rank, alpha]"),
            ("musubi_tuner.lora_modules", "[1, 2]", "a JSON list, not an object"),
            ("musubi_tuner.frames", '["a"]', "whole numbers"),
            ("musubi_tuner.companion", "../../elsewhere.safetensors", "a file name")]
SS_BAD = [("[1]", "not an object"), ('{"a": 1}', "a JSON object, not a list"), ('[{"resolution": "abc"}]', "resolution"),
          ('[{"target_frames": 5}]', "target_frames"), ('[{"resolution": [1, 2, 3]}]', "resolution")]


@pytest.mark.parametrize("key, value, why", OURS_BAD + [("ss_datasets", v, why) for v, why in SS_BAD],
                         ids=[f"{k}={v}" for k, v, _ in OURS_BAD] + [f"ss_datasets={v}" for v, _ in SS_BAD])
def test_info_and_doctor_ignore_unreadable_metadata_with_a_warning_naming_file_and_key(made, tmp_path, capsys, caplog, key, value, why):
    _, _, weights, meta = made
    if key.startswith("ss_"):  # a LoRA trained by musubi-tuner / sd-scripts: no keys of ours
        meta = {"ss_sd_model_name": "hunyuan_video_720_cfgdistill_bf16.safetensors", key: value}
    path = write(tmp_path / "bad_meta.safetensors", weights, {**meta, key: value})
    caplog.set_level(logging.WARNING)
    for main, argv in ((lora_info.main, [path]), (lora_info.main, [path, "--json"]), (lora_doctor.main, [path, "--for", "ours", "musubi"])):
        caplog.clear()
        status, out, err = run_main(main, argv, capsys)
        assert status == 0 and "Traceback" not in err and not error_lines(err), err
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(m.startswith(f"{path}: metadata {key} ") and why in m and m.endswith("ignored") for m in warned), warned
    status, out, _ = run_main(lora_info.main, [path], capsys)
    assert "modules    20 in 4 blocks, rank 4, alpha 2" in out  # the weights are read as ever


def test_lora_info_shows_a_downloaded_files_text_as_text_on_one_line_and_errors_stay_one_line(made, tmp_path, capsys):
    """fuzz_aa 5: a file's metadata reached the terminal as it was: an escape sequence set the window's title and cleared
    the screen, a carriage return hid the value, a newline forged the line after it, and a 2,000-line comment was
    printed whole. A file name holding a newline made the one-line error two lines."""
    _, _, weights, meta = made
    forged = "nice\x1b]0;TITLE\x07\x1b[2J\n    ss_network_dim               128"
    path = write(tmp_path / "evil.safetensors", weights, {**meta, "ss_training_comment": forged, "ss_output_name": "evil\rinnocent",
                                                           "ss_seed": "\u202e" + "x" * 500, "ss_network_dim": "4"})
    status, out, _ = run_main(lora_info.main, [path], capsys)
    assert status == 0 and not any(c in out for c in "\x1b\r\x07\u202e"), out
    shown = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ss_")}
    assert shown["ss_training_comment"].endswith("nice\\x1b]0;TITLE\\x07\\x1b[2J\\n    ss_network_dim               128")
    assert shown["ss_output_name"].endswith("evil\\rinnocent") and shown["ss_network_dim"].endswith(" 4")
    assert shown["ss_seed"].endswith("... (506 characters; --json shows all)")
    status, _, err = run_main(lora_info.main, [tmp_path / "two\nlines.safetensors"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "two\\nlines.safetensors" in err, err


def test_metadata_keys_are_read_one_by_one_so_a_bad_one_leaves_the_others(made, caplog):
    _, _, _, meta = made
    info = LoRAFileInfo.from_metadata({**meta, "musubi_tuner.frames": "{", "musubi_tuner.in_channels": "-3"}, "x.safetensors")
    assert (info.frames, info.in_channels) == ([], None)
    assert (info.resolutions, info.base_model, info.written_here) == ([(960, 544)], "hunyuan-video-t2v", True)
    assert info.modules[OFFICIAL] == (4, 2.0)
    assert "x.safetensors: metadata musubi_tuner.frames is not valid JSON; ignored" in caplog.text
    good = {"ss_datasets": json.dumps([{"resolution": [544, 960], "target_frames": [1, 25]}, {"resolution": 512, "image_directory": "x"}])}
    assert LoRAFileInfo.from_metadata(good).resolutions == [(544, 960), (512, 512)]


# ----------------------------------------------------------------------------------------------- D2: half a pair


@pytest.mark.parametrize("missing", ["lora_down", "lora_up"])
def test_doctor_reports_a_pair_missing_a_half_for_every_consumer(made, tmp_path, capsys, missing):
    _, dit, weights, meta = made
    damaged = {k: v for k, v in weights.items() if k != f"{MODULE}.{missing}.weight"}
    path = write(tmp_path / "half.safetensors", damaged, meta)
    for extra in ([], ["--dit", dit]):
        status, out, err = run_main(lora_doctor.main, [path, "--json", *extra], capsys)
        assert status == 1 and "Traceback" not in err and not error_lines(err), err
        consumers = json.loads(out)["consumers"]
        have = "up" if missing == "lora_down" else "down"
        assert f"a LoRA {have} weight without its {missing.removeprefix('lora_')} weight" in consumers["ours"]["dropped"][f"{MODULE}.lora_{have}.weight"]
        if missing == "lora_down":  # ComfyUI's loader reads lora[down] beside each lora_up it finds: a KeyError
            assert consumers["comfyui"]["fatal"].startswith(f"its loader stops with a KeyError: {MODULE}.lora_up.weight has no ")
            assert consumers["kijai"]["fatal"].startswith("its loader stops with a KeyError")
    status, out, err = run_main(lora_doctor.main, [path], capsys)
    assert status == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- D3: negative alpha


@pytest.mark.parametrize("alpha", [-4.0, -0.5, 0.0, 3.0])
def test_other_naming_keeps_the_sign_and_size_of_every_alpha(made, tmp_path, capsys, alpha):
    """musubi-tuner and kohya scale by alpha / rank, a plain number: a negative alpha flips the update (0 means the rank)."""
    _, _, weights, meta = made
    path = write(tmp_path / "neg.safetensors", {**weights, f"{MODULE}.alpha": torch.tensor(alpha)}, meta)
    want = {p.module: p.delta(p.shape) for p in read_lora(path).patches}
    scale = (alpha or 4.0) / 4
    up, down = weights[f"{MODULE}.lora_up.weight"], weights[f"{MODULE}.lora_down.weight"]
    assert torch.allclose(want[OFFICIAL], up @ down * scale)
    out = tmp_path / "other.safetensors"
    status, _, err = run_main(convert_lora.main, ["--input", path, "--output", out, "--target", "other"], capsys)
    assert status == 0 and "complex" not in err, err
    converted = load_file(str(out))
    assert converted[f"diffusion_model.{OFFICIAL}.lora_A.weight"].abs().max() > 0
    got = {p.module: p.delta(p.shape) for p in read_lora(out).patches}
    assert got.keys() == want.keys()
    for module in want:
        assert torch.allclose(got[module], want[module], atol=1e-7), module
    # the trainer's .comfyui companion is written by the same function
    kohya, companion = lora_outputs(load_file(str(path)), tmp_path / "run.safetensors", "both")
    got = {p.module: p.delta(p.shape) for p in parse_lora(companion.tensors).patches}
    assert torch.allclose(got[OFFICIAL], want[OFFICIAL], atol=1e-7)


# ----------------------------------------------------------------------------------------------- D4, D13: types and alphas


def _commands(path, dit, tmp):
    good = tmp / "good.safetensors"
    return {"merge_lora": (merge_lora.main, ["--dit", dit, "--lora_weight", path, "--save_merged_model", tmp / "m.safetensors", "--device", "cpu"]),
            "convert_lora": (convert_lora.main, ["--input", path, "--output", tmp / "c.safetensors", "--target", "other"]),
            "post_hoc_ema first": (lora_post_hoc_ema.main, [path, good, "--no_sort", "--output_file", tmp / "e.safetensors"]),
            "post_hoc_ema later": (lora_post_hoc_ema.main, [good, path, "--no_sort", "--output_file", tmp / "e.safetensors"]),
            "lora_info": (lora_info.main, [path]),
            "lora_doctor": (lora_doctor.main, [path])}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64])
def test_integer_or_bool_weights_are_refused_by_every_command_naming_file_and_key(made, tmp_path, capsys, dtype):
    _, dit, weights, meta = made
    write(tmp_path / "good.safetensors", weights, meta)
    path = write(tmp_path / "ints.safetensors", {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in weights.items()}, meta)
    name = str(dtype).removeprefix("torch.")
    line = rf"error: {re.escape(str(path))}: lora_unet_\w+\.lora_(up|down)\.weight: {name} weights; a LoRA holds floating-point tensors \("
    for command, (main, argv) in _commands(path, dit, tmp_path).items():
        status, _, err = run_main(main, argv, capsys)
        lines = error_lines(err)
        assert status == 2 and len(lines) == 1 and "Traceback" not in err, (command, err)
        assert re.match(line, lines[0]), (command, lines[0])
        assert not list(tmp_path.glob("[mce].safetensors")), command
    with pytest.raises(UserError, match=f"{name} weights"):
        read_lora_file(path)
    # LoHa / LoKr factors and diffs are LoRA entries too; an entry named as none is parse_lora's to report
    for key in (f"{MODULE}.hada_w1_a", f"{MODULE}.lokr_w1", f"{MODULE}.diff", f"{MODULE}.diff_b", f"{MODULE}.set_weight"):
        with pytest.raises(UserError, match=rf"^x\.safetensors: {re.escape(key)}: {name} weights"):
            check_entry_types("x.safetensors", {key: torch.zeros(2, 2, dtype=dtype)})
    check_entry_types("x.safetensors", {"step": torch.tensor(3), f"{MODULE}.alpha": torch.tensor(4)})


def test_an_integer_alpha_is_a_number_like_any_other(made, tmp_path, capsys):
    _, dit, weights, meta = made
    path = write(tmp_path / "int_alpha.safetensors", {k: v.to(torch.int64) if k.endswith(".alpha") else v for k, v in weights.items()}, meta)
    assert {p.alpha for p in read_lora(path).patches} == {2.0}
    status, _, err = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", path, "--save_merged_model", tmp_path / "m.safetensors",
                                           "--device", "cpu"], capsys)
    assert status == 0, err


@pytest.mark.parametrize("alpha, why", [(torch.ones(32, 32), "its alpha holds 1024 values, not one"),
                                        (torch.full((4,), 4.0), "its alpha holds 4 values, not one"),
                                        (torch.zeros(0), "its alpha holds 0 values, not one"),
                                        (torch.tensor(True), "a bool alpha")])
def test_an_alpha_that_is_not_one_real_number_is_refused_by_every_command(made, tmp_path, capsys, alpha, why):
    _, dit, weights, meta = made
    write(tmp_path / "good.safetensors", weights, meta)
    path = write(tmp_path / "alpha.safetensors", {**weights, f"{MODULE}.alpha": alpha}, meta)
    for command, (main, argv) in _commands(path, dit, tmp_path).items():
        status, _, err = run_main(main, argv, capsys)
        lines = error_lines(err)
        assert status == 2 and len(lines) == 1 and "Traceback" not in err, (command, err)
        assert lines[0].startswith(f"error: {path}: {MODULE}.alpha: {why}"), (command, lines[0])
        assert not list(tmp_path.glob("[mce].safetensors")), command
    with pytest.raises(UserError, match=f"{MODULE}.alpha: "):
        read_lora_contents(path)


def test_a_complex_alpha_is_refused_by_the_reader(tmp_path):
    """safetensors files cannot hold complex tensors here (the header check refuses them); a .pt file can."""
    path = tmp_path / "complex.pt"
    torch.save({f"{MODULE}.lora_down.weight": torch.zeros(4, 64), f"{MODULE}.lora_up.weight": torch.zeros(64, 4),
                f"{MODULE}.alpha": torch.tensor(2.0 + 0j)}, path)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: {MODULE}\.alpha: a complex64 alpha; an alpha is one real number"):
        read_lora(path)


def test_post_hoc_ema_compares_alphas_as_numbers(made, tmp_path, capsys):
    """A [1]-shaped alpha is the same number as a 0-d one; an integer alpha too; a different one is refused in one line."""
    _, _, weights, meta = made
    first = write(tmp_path / "a.safetensors", weights, meta)
    same = write(tmp_path / "b.safetensors", {**weights, f"{MODULE}.alpha": torch.tensor([2], dtype=torch.int64)}, meta)
    out = tmp_path / "e.safetensors"
    status, _, err = run_main(lora_post_hoc_ema.main, [first, same, "--no_sort", "--output_file", out], capsys)
    assert status == 0, err
    other = write(tmp_path / "c.safetensors", {**weights, f"{MODULE}.alpha": torch.tensor([3.0])}, meta)
    status, _, err = run_main(lora_post_hoc_ema.main, [first, other, "--no_sort", "--output_file", tmp_path / "f.safetensors"], capsys)
    assert status == 2 and "Traceback" not in err
    assert error_lines(err) == [f"error: {other}: {MODULE}.alpha = 3, but a.safetensors has 2: checkpoints of one run share their alphas"]
