"""networks.lora: the modules musubi-tuner targets, its file naming, and the math of merging."""

import pytest
import torch

from helpers import dit_inputs, rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.config import HUNYUAN_T2V
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import load_lora


def tiny_model(seed=0):
    config = tiny_dit_config()
    model = HunyuanVideoDiT(config)
    model.load_state_dict(random_dit_state_dict(config, seed=seed, scale=0.05))
    return model.eval().requires_grad_(False), config


def randomize(network, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.unet_loras:
            m.lora_up.weight.normal_(0, 0.05, generator=g)


def test_full_model_gets_musubi_tuners_240_modules_with_its_names_and_shapes():
    with torch.device("meta"):
        model = HunyuanVideoDiT(HUNYUAN_T2V)
        net = lora.create_arch_network(1.0, 32, 16, None, None, model)
    assert len(net.unet_loras) == 240
    sd = {k: v.shape for k, v in net.state_dict().items()}
    assert len(sd) == 720
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"] == (21504, 32)
    assert sd["lora_unet_single_blocks_39_linear2.lora_down.weight"] == (32, 15360)
    assert sd["lora_unet_double_blocks_7_txt_mlp_fc1.lora_up.weight"] == (12288, 32)
    assert sd["lora_unet_double_blocks_19_img_attn_qkv.lora_down.weight"] == (32, 3072)
    assert not any("mod" in k for k in sd)


def test_include_patterns_only_rescue_excluded_modules():
    model, _ = tiny_model()
    only_single = lora.create_arch_network(1.0, 4, 1, None, None, model, exclude_patterns="[r'.*']", include_patterns="[r'single_blocks\\..*']")
    assert {m.lora_name.split("_")[2] for m in only_single.unet_loras} == {"single"}
    with_mod = lora.create_arch_network(1.0, 4, 1, None, None, model, include_patterns="[r'.*img_mod.*']")
    names = [m.lora_name for m in with_mod.unet_loras]
    assert "lora_unet_double_blocks_0_img_mod_linear" in names and "lora_unet_double_blocks_0_txt_mod_linear" not in names
    with pytest.raises(UserError, match="not a valid regular expression"):
        lora.create_arch_network(1.0, 4, 1, None, None, model, exclude_patterns="['(']")


def test_new_lora_leaves_the_model_unchanged_and_merging_equals_applying():
    model, config = tiny_model()
    args = dit_inputs(config, batch=2, text_lens=(4, 9))
    with torch.no_grad():
        base = model(*args)
    net = lora.create_arch_network(1.0, 4, 2, None, None, model)
    net.apply_to(None, model)
    with torch.no_grad():
        assert torch.equal(model(*args), base)  # lora_up starts at zero
        randomize(net)
        applied = model(*args)
        net.set_multiplier(0.0)
        assert torch.equal(model(*args), base)
        net.set_multiplier(0.7)
        applied_07 = model(*args)
        net.restore()
        assert torch.equal(model(*args), base)
        net.merge_to(None, model)  # multiplier 0.7
    merged = model(*args).detach()
    assert rel_err(applied, base) > 1e-3
    assert rel_err(merged, applied_07) < 1e-5


def test_saved_file_uses_kohya_names_and_reloads_to_the_same_network(tmp_path):
    model, config = tiny_model()
    net = lora.create_arch_network(1.0, 4, 2, None, None, model)
    randomize(net)
    path = tmp_path / "my.safetensors"
    net.save_weights(str(path), torch.bfloat16, {"ss_network_dim": "4"})
    weights = load_lora(path)
    assert weights["lora_unet_double_blocks_1_img_attn_proj.alpha"].item() == 2.0
    assert weights["lora_unet_double_blocks_1_img_attn_proj.lora_down.weight"].dtype == torch.bfloat16
    again = lora.create_arch_network_from_weights(1.0, weights, model)
    assert [m.lora_name for m in again.unet_loras] == [m.lora_name for m in net.unet_loras]
    assert all(m.scale == 0.5 for m in again.unet_loras)
    for a, b in zip(net.unet_loras, again.unet_loras):
        assert torch.equal(a.lora_up.weight.to(torch.bfloat16).float(), b.lora_up.weight.float())


def test_max_norm_regularization_caps_the_update_norm():
    model, _ = tiny_model()
    net = lora.create_arch_network(1.0, 4, 4, None, None, model)
    randomize(net)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.mul_(50)
    scaled, mean_norm, max_norm = net.apply_max_norm_regularization(1.0, "cpu")
    assert scaled > 0 and max_norm <= 1.0 + 1e-5
    assert max(m.delta_weight().norm().item() for m in net.unet_loras) <= 1.0 + 1e-4


def test_loraplus_puts_up_weights_in_their_own_group():
    model, _ = tiny_model()
    net = lora.create_arch_network(1.0, 4, 4, None, None, model, loraplus_lr_ratio="4")
    groups, names = net.prepare_optimizer_params(unet_lr=1e-4)
    assert names == ["unet", "unet plus"] and groups[1]["lr"] == 4e-4
    assert len(groups[0]["params"]) == len(groups[1]["params"]) == len(net.unet_loras)
