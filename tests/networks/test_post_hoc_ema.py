"""lora_post_hoc_ema.py: musubi-tuner's flags and math, checked against the documented formulas on synthetic checkpoints."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from musubi_tuner import lora_post_hoc_ema
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.networks.post_hoc_ema import sigma_rel_to_gamma
from musubi_tuner.networks.lora_metadata import sd_scripts_hashes

KEYS = ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")


@pytest.fixture
def checkpoints(tmp_path):
    """Four saves of one run, written newest first (so sorting by modification time has work to do)."""
    g = torch.Generator().manual_seed(0)
    saves = []
    for step in range(4):
        sd = {KEYS[0]: torch.randn(4, 16, generator=g), KEYS[1]: torch.randn(32, 4, generator=g).to(torch.bfloat16),
              "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0), "counter": torch.tensor([step], dtype=torch.int64)}
        saves.append(sd)
    paths = [tmp_path / f"run-step{(i + 1) * 10:08d}.safetensors" for i in range(4)]
    for i, (path, sd) in enumerate(zip(paths, saves)):
        save_file(sd, str(path), metadata={"ss_steps": str((i + 1) * 10), "ss_network_module": "networks.lora",
                                           "musubi_tuner.companion": path.name.replace(".safetensors", ".comfyui.safetensors")})
        os.utime(path, (1_000_000 + i * 100, 1_000_000 + i * 100))
    return paths, saves


def reference(saves, betas):
    """The documented EMA: start from the oldest, then avg = beta * avg + (1 - beta) * next, in float32."""
    avg = {k: v.double() for k, v in saves[0].items() if v.is_floating_point()}
    for sd, beta in zip(saves[1:], betas):
        for k in KEYS:
            avg[k] = beta * avg[k] + (1 - beta) * sd[k].double()
    return avg


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        lora_post_hoc_ema.main([str(a) for a in argv])
        sys.exit(0)
    return e.value.code or 0, capsys.readouterr()


def check(out, saves, betas):
    got = load_file(str(out))
    want = reference(saves, betas)
    for k in KEYS:
        assert got[k].dtype == saves[0][k].dtype  # each tensor keeps its dtype
        tol = 1e-6 if got[k].dtype == torch.float32 else 1e-2
        assert (got[k].double() - want[k]).abs().max() <= tol * want[k].abs().max()
    assert torch.equal(got["counter"], saves[0]["counter"]) and got["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 2.0


def test_constant_beta_averages_oldest_first_and_keeps_the_last_files_metadata(checkpoints, tmp_path, capsys):
    paths, saves = checkpoints
    out = tmp_path / "ema.safetensors"
    status, _ = run([*reversed(paths), "--beta", "0.9", "--output_file", out], capsys)  # order given: newest first
    assert status == 0
    check(out, saves, [0.9, 0.9, 0.9])
    _, meta = read_safetensors_header(out)
    assert meta["ss_steps"] == "40" and "musubi_tuner.companion" not in meta
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sd_scripts_hashes(load_file(str(out)), {
        k: v for k, v in meta.items() if k.startswith("ss_")})


def test_beta2_moves_beta_linearly_over_the_merges_and_no_sort_keeps_the_given_order(checkpoints, tmp_path, capsys):
    paths, saves = checkpoints
    out = tmp_path / "ema.safetensors"
    assert run([*paths, "--beta", "0.8", "--beta2", "0.95", "--output_file", out], capsys)[0] == 0
    check(out, saves, [0.8, 0.875, 0.95])
    order = [2, 0, 3, 1]
    assert run([*(paths[i] for i in order), "--no_sort", "--beta", "0.5", "--output_file", out], capsys)[0] == 0
    check(out, [saves[i] for i in order], [0.5, 0.5, 0.5])


def test_copied_checkpoints_are_averaged_in_the_order_of_the_steps_they_record(checkpoints, tmp_path, capsys, caplog):
    """Copies (or downloads) get modification times in any order: the steps the files record decide, when every file
    records one and they are of one run."""
    import logging

    paths, saves = checkpoints
    copies = tmp_path / "copied"
    copies.mkdir()
    for i, path in enumerate(reversed(paths)):  # copied newest first: the newest save has the oldest time
        data = load_file(str(path))
        save_file(data, str(copies / path.name), metadata={**read_safetensors_header(path)[1], "ss_session_id": "7"})
        os.utime(copies / path.name, (2_000_000 + i * 100, 2_000_000 + i * 100))
    out = tmp_path / "ema.safetensors"
    with caplog.at_level(logging.INFO):
        assert run([*sorted(copies.iterdir()), "--beta", "0.9", "--output_file", out], capsys)[0] == 0
    check(out, saves, [0.9, 0.9, 0.9])
    assert "ordered by the training step each file records (ss_steps), not by modification time" in caplog.text
    without_steps = tmp_path / "plain"
    without_steps.mkdir()
    for i, path in enumerate(paths):  # no step recorded: modification time, as musubi-tuner
        save_file(load_file(str(path)), str(without_steps / path.name), metadata={"ss_network_module": "networks.lora"})
        os.utime(without_steps / path.name, (3_000_000 - i * 100, 3_000_000 - i * 100))
    assert run([*sorted(without_steps.iterdir()), "--beta", "0.9", "--output_file", out], capsys)[0] == 0
    check(out, list(reversed(saves)), [0.9, 0.9, 0.9])
    assert "ordered by modification time" not in caplog.text  # (none records a step: musubi-tuner's order, unsaid)
    # one of the copies without its step: the whole order falls back to time, said, naming it (fuzz_ar 11)
    odd = copies / paths[0].name
    save_file(load_file(str(odd)), str(odd), metadata={k: v for k, v in read_safetensors_header(odd)[1].items() if k != "ss_steps"})
    assert run([*sorted(copies.iterdir()), "--beta", "0.9", "--output_file", out], capsys)[0] == 0
    assert (f"ordered by modification time, not by the training steps the files record: {paths[0].name} records no "
            "training step (ss_steps)") in caplog.text


def test_sigma_rel_is_the_power_function_ema_of_the_paper(checkpoints, tmp_path, capsys):
    paths, saves = checkpoints
    gamma = sigma_rel_to_gamma(0.2)
    # the width of the profile t^gamma (Karras et al. 2024, eq. 3): sigma_rel = sqrt((g + 1) / ((g + 2)^2 (g + 3)))
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.2, rel=1e-9)
    out = tmp_path / "ema.safetensors"
    status, io = run([*paths, "--sigma_rel", "0.2", "--beta", "0.1", "--output_file", out], capsys)  # sigma_rel overrides beta
    assert status == 0
    betas = [(1 - 1 / k) ** (gamma + 1) for k in (1, 2, 3)]
    assert betas[0] == 0.0 and f"{betas[1]:.4f}" in io.out
    check(out, saves, betas)


def test_companions_beside_their_kohya_files_are_left_out(checkpoints, tmp_path, capsys):
    paths, saves = checkpoints
    from musubi_tuner.networks.lora_reader import kohya_to_other

    for p in paths:  # what `out/run-step*.safetensors` matches after a --lora_format both run: each LoRA in the other naming
        sd = load_file(str(p))
        other = {**kohya_to_other({k: v for k, v in sd.items() if k.startswith("lora_unet_")}), "counter": sd["counter"]}
        save_file(other, str(p.with_name(p.name.replace(".safetensors", ".comfyui.safetensors"))))
    out = tmp_path / "ema.safetensors"
    assert run([*sorted(tmp_path.glob("run-step*.safetensors")), "--output_file", out], capsys)[0] == 0
    check(out, saves, [0.95] * 3)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}), "checkpoints of one run share their alphas"),
    (lambda sd: sd.pop(KEYS[0]), f"not a checkpoint of the same LoRA: run-step00000030.safetensors lacks {KEYS[0]}"),
])
def test_checkpoints_of_another_run_are_refused_in_one_line(checkpoints, tmp_path, capsys, change, message):
    paths, saves = checkpoints
    bad = dict(saves[2])
    change(bad)
    save_file(bad, str(paths[2]))
    status, io = run([*paths, "--output_file", tmp_path / "ema.safetensors"], capsys)
    assert status == 2 and message in io.err and "Traceback" not in io.err
    assert not (tmp_path / "ema.safetensors").exists()


def test_loras_of_two_base_models_are_not_averaged(checkpoints, tmp_path, capsys, caplog):
    """fuzz_aj 8: a SkyReels I2V run's LoRA and a T2V run's (the same keys and shapes) were averaged without a word, the
    result claiming the last file's base."""
    paths, saves = checkpoints

    def rewrite(path, sd, base, channels):
        meta = read_safetensors_header(path)[1]
        save_file(sd, str(path), metadata={**meta, "musubi_tuner.version": "1", "musubi_tuner.base_model": base,
                                           "musubi_tuner.in_channels": str(channels)})

    for path, sd in zip(paths, saves):
        rewrite(path, sd, "hunyuan-video-t2v", 16)
    rewrite(paths[2], saves[2], "skyreels-i2v", 32)
    out = tmp_path / "ema.safetensors"
    status, io = run([*paths, "--output_file", out, "--no_sort"], capsys)
    assert status == 2 and not out.exists()
    assert (f"{paths[2]}: trained on skyreels-i2v (32 input channels) but {paths[0].name} on hunyuan-video-t2v (16): LoRAs "
            "of two base models") in io.err
    rewrite(paths[2], saves[2], "skyreels-t2v", 16)  # the same layers: averaged, but said
    assert run([*paths, "--output_file", out, "--no_sort"], capsys)[0] == 0
    assert f"{paths[2]}: trained on skyreels-t2v but {paths[0].name} on hunyuan-video-t2v" in caplog.text


def test_diffusers_files_read_at_other_scales_are_refused(tmp_path, capsys):
    """fuzz_an 3: files whose scale is in their metadata (diffusers' lora_adapter_metadata: lora_alpha, use_rslora) and
    differs were averaged without a word, the result applied at the last file's scale; differing kohya .alpha entries
    are refused."""
    import json

    g = torch.Generator().manual_seed(0)
    module = "transformer.transformer_blocks.0.attn.to_out.0"
    paths = []
    for i, meta in enumerate(({"transformer.lora_alpha": 8, "transformer.r": 4},
                              {"transformer.lora_alpha": 8, "transformer.r": 4},
                              {"transformer.lora_alpha": 8, "transformer.r": 4, "transformer.use_rslora": True})):
        path = tmp_path / f"d{i}.safetensors"
        save_file({f"{module}.lora_A.weight": torch.randn(4, 3072, generator=g),
                   f"{module}.lora_B.weight": torch.randn(3072, 4, generator=g) * 0.01}, str(path),
                  metadata={"lora_adapter_metadata": json.dumps(meta)})
        paths.append(path)
    assert run([paths[0], paths[1], "--no_sort", "--output_file", tmp_path / "ok.safetensors"], capsys)[0] == 0
    status, io = run([paths[0], paths[2], "--no_sort", "--output_file", tmp_path / "ema.safetensors"], capsys)
    assert status == 2 and not (tmp_path / "ema.safetensors").exists()
    assert (f"{paths[2]}: double_blocks.0.img_attn_proj is applied at the scale 4 (alpha / rank), d0.safetensors at 2: "
            "checkpoints of one run share their scales") in io.err
