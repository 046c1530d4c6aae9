"""convert_lora.py and the namings: lossless round trips, and the same outputs whichever naming a LoRA comes in."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import load_lora, save_lora
from musubi_tuner.networks.lora_reader import read_lora_file
from musubi_tuner.networks.lora_naming import kohya_to_module_path
from musubi_tuner.networks.lora_reader import kohya_state_dict, parse_lora

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def trained(tmp_path):
    config = tiny_dit_config()
    model = HunyuanVideoDiT(config)
    model.load_state_dict(random_dit_state_dict(config, seed=2, scale=0.05))
    model.eval().requires_grad_(False)
    net = lora.create_arch_network(1.0, 4, 3, None, None, model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, 0.05, generator=g)
    path = tmp_path / "kohya.safetensors"
    save_lora(net.state_dict_for_saving(), path, {"ss_network_dim": "4"})
    return model, config, path


def test_kohya_names_map_back_to_module_paths():
    assert kohya_to_module_path("lora_unet_double_blocks_0_img_attn_qkv") == "double_blocks.0.img_attn_qkv"
    assert kohya_to_module_path("lora_unet_double_blocks_5_txt_mlp_fc2") == "double_blocks.5.txt_mlp.fc2"
    assert kohya_to_module_path("lora_unet_single_blocks_3_linear1") == "single_blocks.3.linear1"
    assert kohya_to_module_path("lora_unet_double_blocks_1_img_mod_linear") == "double_blocks.1.img_mod.linear"
    # the same layers under ComfyUI's module names, as several trainers and ComfyUI tools write them
    assert kohya_to_module_path("lora_unet_double_blocks_5_txt_mlp_2") == "double_blocks.5.txt_mlp.fc2"
    assert kohya_to_module_path("lora_unet_double_blocks_1_img_mod_lin") == "double_blocks.1.img_mod.linear"
    assert kohya_to_module_path("lora_unet_single_blocks_3_modulation_lin") == "single_blocks.3.modulation.linear"
    assert kohya_to_module_path("lora_unet_txt_in_t_embedder_in_layer") == "txt_in.t_embedder.mlp.0"
    with pytest.raises(UserError, match="names no layer"):
        kohya_to_module_path("lora_unet_input_blocks_1_1_proj_in")


def round_trip(path, tmp_path):
    """convert_lora.py to the other naming and back, as a user types it: (the other file, the file back)."""
    other, back = tmp_path / "other.safetensors", tmp_path / "back.safetensors"
    for args in (["--input", str(path), "--output", str(other), "--target", "other"],
                 ["--input", str(other), "--output", str(back), "--target", "default"]):
        r = subprocess.run([sys.executable, "src/musubi_tuner/convert_lora.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return other, back


def test_round_trip_kohya_other_kohya_is_exact_in_effect(tmp_path, trained):
    model, config, path = trained
    other, back = round_trip(path, tmp_path)
    o, meta = read_lora_file(other)
    assert parse_lora(o).naming == "other" and meta["ss_network_dim"] == "4"
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight" in o and not any(k.endswith("alpha") for k in o)
    a, b = load_lora(path), load_lora(back)
    for key in a:
        if key.endswith("lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            delta_a = a[f"{name}.lora_up.weight"] @ a[key] * (a[f"{name}.alpha"] / a[key].shape[0])
            delta_b = b[f"{name}.lora_up.weight"] @ b[key] * (b[f"{name}.alpha"] / b[key].shape[0])
            assert torch.allclose(delta_a, delta_b, rtol=1e-5, atol=1e-8)


def test_round_trip_of_a_file_that_records_its_alphas_gives_back_the_file(tmp_path, trained):
    """fuzz_ad F5: back from the other naming, every .alpha was the rank and the factors rescaled, while the copied
    metadata (ss_network_alpha, musubi_tuner.lora_modules) still named the LoRA's alpha: a reader computing alpha / rank
    from it got another strength. A file that records its modules' alphas (as the trainer writes it) comes back as it was."""
    from musubi_tuner.networks.lora_metadata import LoRAFileInfo

    model, config, path = trained
    weights = load_lora(path)
    modules = {kohya_to_module_path(k.removesuffix(".alpha")): (4, 3.0) for k in weights if k.endswith(".alpha")}
    recorded = tmp_path / "recorded.safetensors"
    save_lora(weights, recorded, {"ss_network_dim": "4", "ss_network_alpha": "3", **LoRAFileInfo(version="1", modules=modules).to_metadata()})
    _, back = round_trip(recorded, tmp_path)
    returned, meta = read_lora_file(back)
    assert returned.keys() == weights.keys() and meta["ss_network_alpha"] == "3"
    for key, tensor in weights.items():
        torch.testing.assert_close(returned[key], tensor, rtol=1e-6, atol=1e-9, msg=key)


def test_round_trip_of_a_lora_trained_elsewhere_gives_back_its_alphas(tmp_path, trained):
    """fuzz_aw 9: a LoRA not trained here (musubi-tuner's, sd-scripts', its metadata ss_* alone) came back from the other
    naming at alpha = rank, every factor rescaled, its ss_network_alpha then naming another alpha. The conversion records
    each module's rank and alpha in the copy, and the way back gives them back."""
    model, config, path = trained
    weights = load_lora(path)
    _, back = round_trip(path, tmp_path)
    returned = load_lora(back)
    assert returned.keys() == weights.keys()
    for key, tensor in weights.items():
        torch.testing.assert_close(returned[key], tensor, rtol=1e-6, atol=1e-9, msg=key)


def update_of(weights: dict) -> dict:
    """Each module's W update of a file read as every reader reads it."""
    return {p.param: p.delta(p.shape) for p in parse_lora(weights).patches}


@pytest.mark.parametrize("alpha", [4e4, 1e-7])
def test_an_fp16_lora_of_an_alpha_far_from_its_rank_converts_to_the_same_finite_update(tmp_path, trained, alpha):
    """fuzz_aw 2: folded into fp16 factors, alpha / rank of 1e4 made inf (a file every reader refuses), and of 2.5e-8 fp16
    subnormals, the update 1 % off."""
    from musubi_tuner.networks.lora_files import save_lora

    weights = {k: (torch.full_like(v, alpha) if k.endswith(".alpha") else v.half()) for k, v in load_lora(trained[2]).items()}
    source = tmp_path / "fp16.safetensors"
    save_lora(weights, source, {"ss_network_dim": "4"})
    other, _ = round_trip(source, tmp_path)
    converted, _ = read_lora_file(other)
    assert all(torch.isfinite(t).all() for t in converted.values())
    expected, got = update_of(weights), update_of(converted)
    for param, delta in expected.items():
        torch.testing.assert_close(got[param], delta, rtol=2e-3, atol=delta.abs().max().item() * 2e-3, msg=param)


def test_a_companion_whose_metadata_gives_an_alpha_past_float32_is_read_folded_with_a_warning(tmp_path, trained, caplog):
    """fuzz_aw 8: the alphas of musubi_tuner.lora_modules unfolded a .comfyui file's good factors unchecked: an alpha of
    1e300 wrote a file of inf (convert --target default), and --network_weights trained from NaN."""
    import json
    import logging

    from safetensors.torch import save_file

    from musubi_tuner.networks.lora_metadata import LoRAFileInfo

    weights = load_lora(trained[2])  # as the trainer writes it: its modules' [rank, alpha] recorded
    modules = {kohya_to_module_path(k.removesuffix(".alpha")): (4, 3.0) for k in weights if k.endswith(".alpha")}
    recorded = tmp_path / "recorded.safetensors"
    save_lora(weights, recorded, {"ss_network_dim": "4", **LoRAFileInfo(version="1", modules=modules).to_metadata()})
    other, _ = round_trip(recorded, tmp_path)
    tensors, meta = read_lora_file(other)
    modules = json.loads(meta["musubi_tuner.lora_modules"])
    lying = tmp_path / "lying.comfyui.safetensors"
    save_file(tensors, str(lying), metadata={**meta, "musubi_tuner.lora_modules": json.dumps({k: [r, 1e300] for k, (r, _) in modules.items()})})
    back = tmp_path / "back_default.safetensors"
    with caplog.at_level(logging.WARNING):
        r = subprocess.run([sys.executable, "src/musubi_tuner/convert_lora.py", "--input", str(lying), "--output", str(back),
                            "--target", "default"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "musubi_tuner.lora_modules gives" in r.stderr and "read as folded, at alpha = rank" in r.stderr
    returned = load_lora(back)
    assert all(torch.isfinite(t).all() for t in returned.values())
    expected, got = update_of(tensors), update_of(returned)
    for param, delta in expected.items():
        torch.testing.assert_close(got[param], delta, rtol=1e-5, atol=1e-8, msg=param)


def test_diffusers_peft_naming_loads_to_the_same_update(trained):
    """q/k/v LoRAs on diffusers' split Linears fuse exactly onto the official qkv and linear1."""
    model, config, path = trained
    C = config.hidden_size
    g = torch.Generator().manual_seed(3)
    peft = {}
    parts = {}
    for part in ("to_q", "to_k", "to_v"):
        a, b = torch.randn(2, C, generator=g), torch.randn(C, 2, generator=g)
        peft[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"] = a
        peft[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"] = b
        parts[part] = b @ a
    a, b = torch.randn(3, C, generator=g), torch.randn(config.mlp_hidden_size, 3, generator=g)
    peft["transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight"] = a
    peft["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"] = b
    converted = kohya_state_dict(parse_lora(peft, mlp_hidden=config.mlp_hidden_size).require_whole().patches)
    d = converted["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] @ converted["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert torch.allclose(d, torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]]), atol=1e-6)
    s = converted["lora_unet_single_blocks_1_linear1.lora_up.weight"] @ converted["lora_unet_single_blocks_1_linear1.lora_down.weight"]
    assert s.shape == (3 * C + config.mlp_hidden_size, C)
    assert torch.count_nonzero(s[: 3 * C]) == 0 and torch.allclose(s[3 * C :], b @ a, atol=1e-6)


def test_unknown_naming_lists_keys(tmp_path):
    with pytest.raises(UserError, match="x.safetensors: nothing in it can be applied: .*not a HunyuanVideo LoRA in any naming we know.*"
                                        "first keys: foo.weight"):
        parse_lora({"foo.weight": torch.zeros(1)}, source="x.safetensors").require_whole()


def test_a_cache_file_given_as_a_lora_is_named_as_the_cache_it_is(tmp_path):
    """fuzz_ar 13: lora_info and the doctor analysed cache files as LoRAs of an unknown naming (and advised converting)."""
    from musubi_tuner.data import cache_files
    from musubi_tuner.networks.lora_reader import read_lora

    latent = cache_files.save_latent_cache(tmp_path / "a_0016x0016_hv.safetensors", torch.zeros(16, 1, 2, 2), size=(16, 16))
    text = tmp_path / "a_hv_te.safetensors"
    cache_files.save_text_cache(text, "a cat", {**cache_files.text_encoder_tensors("llm", torch.zeros(256, 8).half(), torch.ones(256)),
                                                **cache_files.text_encoder_tensors("clipL", torch.zeros(768).half(), None)})
    for path, kind in ((latent, "a latent cache of cache_latents.py"), (text, "a text-encoder cache of cache_text_encoder_outputs.py")):
        with pytest.raises(UserError, match=f"this is {kind} \\(training reads it through --dataset_config\\)"):
            read_lora(path)


def test_diffusers_prefix_with_a_trailing_dot_is_the_prefix_and_an_empty_one_is_refused(trained, tmp_path, caplog):
    """`--diffusers_prefix transformer.` wrote `transformer..double_blocks...`, which no reader loads (exit 0)."""
    from musubi_tuner import convert_lora

    _, _, path = trained
    out = tmp_path / "other.safetensors"
    convert_lora.main(["--input", str(path), "--output", str(out), "--target", "other", "--diffusers_prefix", "transformer."])
    keys = read_lora_file(out)[0]
    assert all(k.startswith("transformer.double_blocks.") or k.startswith("transformer.single_blocks.") for k in keys), list(keys)[:3]
    assert parse_lora(keys, {}, str(out)).patches  # and it reads back
    with pytest.raises(SystemExit) as e:
        convert_lora.main(["--input", str(path), "--output", str(tmp_path / "x.safetensors"), "--target", "other", "--diffusers_prefix", ""])
    assert e.value.code == 2 and not (tmp_path / "x.safetensors").exists()
    with caplog.at_level("WARNING"):
        convert_lora.main(["--input", str(path), "--output", str(tmp_path / "y.safetensors"), "--target", "other", "--diffusers_prefix", "foo"])
    assert "--diffusers_prefix foo: LoRA readers know diffusion_model, transformer, model.diffusion_model" in caplog.text
