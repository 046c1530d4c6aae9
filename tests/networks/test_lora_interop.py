"""LoRAs across this toolkit and diffusers, checked with diffusers' own loader on its HunyuanVideo transformer.

diffusers' `load_lora_weights` on a HunyuanVideo pipeline runs `HunyuanVideoLoraLoaderMixin.lora_state_dict`
(the naming conversion) and `load_lora_into_transformer` (PEFT injection); the tests call those two directly
on a transformer built from the same tiny weights as ours (tests/diffusers_reference.py).
"""

import logging

import pytest
import torch
from safetensors.torch import load_file

from diffusers_reference import diffusers_dit, official_to_diffusers_dit, split_linear1_lora_for_diffusers
from helpers import dit_inputs, rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.files import StateDictFile, save_safetensors
from musubi_tuner.inference.pipeline import apply_loras_on_the_fly
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_consumers import coverage
from musubi_tuner.networks.lora_files import lora_outputs, save_lora
from musubi_tuner.networks.merge import merge_file, merge_loras_into

pytest.importorskip("peft")
from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny base weights, our model with a trained-looking LoRA saved as the trainer saves it (both files)."""
    tmp = tmp_path_factory.mktemp("interop")
    config = tiny_dit_config()
    weights = random_dit_state_dict(config, seed=2, scale=0.05)
    model = HunyuanVideoDiT(config)
    model.load_state_dict(weights)
    net = lora.create_arch_network(1.0, 4, 3, None, None, model.eval())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, 0.3, generator=g)
    outputs = lora_outputs(net.state_dict_for_saving(), tmp / "mine.safetensors")
    for out in outputs:
        save_lora(out.tensors, out.path, {})
    return config, weights, [out.path for out in outputs]


def ours_with(config, weights, lora_path, args):
    model = HunyuanVideoDiT(config)
    model.load_state_dict(weights)
    model.eval()
    if lora_path is not None:
        merge_loras_into(model, [str(lora_path)], [1.0])
    with torch.no_grad():
        return model(*args)


def run_diffusers(model, args):
    x, t, text, mask, pooled, guidance = args
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask,
                     pooled_projections=pooled, guidance=guidance, return_dict=False)[0]


def load_in_diffusers(model, state_dict):
    """What `load_lora_weights` does: diffusers' conversion, then PEFT injection into the transformer."""
    converted = HunyuanVideoLoraLoaderMixin.lora_state_dict(dict(state_dict))
    HunyuanVideoLoraLoaderMixin.load_lora_into_transformer(converted, transformer=model)


def test_comfyui_copy_loads_completely_in_diffusers_and_gives_our_output(base):
    """Issue 7's interoperability proof: the trainer's .comfyui.safetensors in diffusers == ours with the LoRA."""
    config, weights, (kohya_file, comfy_file) = base
    args = dit_inputs(config, text_lens=(7,))
    ours = ours_with(config, weights, kohya_file, args)
    assert rel_err(ours, ours_with(config, weights, None, args)) > 0.02  # the LoRA does something

    lora_sd = load_file(comfy_file)
    # diffusers' converter splits single-block linear1 at the released model's width (3072): the doctor, which uses the
    # file's own width (64 here), says it fails, and it does; split at the tiny width, the file loads completely
    assert "width of 3072, and this LoRA's width is 64" in coverage("diffusers", lora_sd).fatal
    with pytest.raises(Exception):
        load_in_diffusers(diffusers_dit(weights, config), lora_sd)
    split = split_linear1_lora_for_diffusers(lora_sd, config)
    assert coverage("diffusers", split).complete
    model = diffusers_dit(weights, config)
    load_in_diffusers(model, split)
    assert rel_err(run_diffusers(model, args), ours) < 1e-5


def test_kohya_file_fails_in_diffusers_as_the_doctor_says(base):
    config, weights, (kohya_file, _) = base
    lora_sd = load_file(kohya_file)
    assert coverage("diffusers", lora_sd).fatal is not None
    with pytest.raises(Exception):
        load_in_diffusers(diffusers_dit(weights, config), lora_sd)


def test_original_naming_without_img_attn_qkv_loads_nothing_in_diffusers(base, caplog):
    """diffusers converts the original naming only when some key contains img_attn_qkv; otherwise nothing loads."""
    config, weights, (_, comfy_file) = base
    only_single = {k: v for k, v in load_file(comfy_file).items() if ".single_blocks." in k}
    cov = coverage("diffusers", only_single)
    assert cov.applied == [] and len(cov.dropped) == len(only_single)
    args = dit_inputs(config, text_lens=(7,))
    model = diffusers_dit(weights, config)
    with caplog.at_level(logging.WARNING):
        load_in_diffusers(model, only_single)
    assert torch.equal(run_diffusers(model, args), run_diffusers(diffusers_dit(weights, config), args))


@pytest.fixture(scope="module")
def peft_file(base, tmp_path_factory):
    """A LoRA made with PEFT on diffusers' transformer (q, k, v split; lora_alpha != r with an alpha_pattern; refiner and
    final layer too), saved by diffusers' save_lora_weights; and the weights of that transformer with PEFT's own merge."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    config, weights, _ = base
    tmp = tmp_path_factory.mktemp("peft")
    model = diffusers_dit(weights, config)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
               "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, alpha_pattern={"proj_mlp": 2})
    torch.manual_seed(0)
    model.add_adapter(peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    args = dit_inputs(config, text_lens=(7,))
    want = run_diffusers(model, args)
    HunyuanVideoLoraLoaderMixin.save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(model),
                                                  transformer_lora_adapter_metadata=peft_config.to_dict(),
                                                  weight_name="peft.safetensors")
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    merged = {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    return tmp / "peft.safetensors", want, args, merged


def test_peft_lora_trained_on_diffusers_loads_here_with_the_same_output(base, peft_file):
    config, weights, _ = base
    path, want, args, _ = peft_file
    file_sd = load_file(path)
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.lora_A") for k in file_sd)
    assert coverage("ours", file_sd).complete
    got = ours_with(config, weights, path, args)
    assert rel_err(want, run_diffusers(diffusers_dit(weights, config), args)) > 0.02
    assert rel_err(got, want) < 1e-5
    # and on the fly, as generation runs LoRAs beside fp8 weights
    ours = HunyuanVideoDiT(config)
    ours.load_state_dict(weights)
    apply_loras_on_the_fly(ours.eval(), [str(path)], [1.0], exclude_single_blocks=False)
    with torch.no_grad():
        assert rel_err(ours(*args), want) < 1e-5


def test_merged_peft_lora_equals_peft_merging_it_in_diffusers(base, peft_file, tmp_path):
    """merge_lora.py's weights, in diffusers' names (diffusers' own checkpoint converter), equal PEFT's merge to 1e-6."""
    config, weights, _ = base
    path, _, _, peft_merged = peft_file
    dit = tmp_path / "dit.safetensors"
    save_safetensors(weights, dit)
    merge_file(str(dit), [str(path)], [1.0], str(tmp_path / "merged.safetensors"))
    ours = official_to_diffusers_dit(StateDictFile(tmp_path / "merged.safetensors").load_all(), config)
    assert ours.keys() == peft_merged.keys()
    assert max((ours[k] - peft_merged[k]).abs().max().item() for k in ours) < 1e-6


@pytest.mark.parametrize("target", ["default", "other"])
def test_convert_lora_keeps_peft_lora_alpha(base, peft_file, tmp_path, target):
    """convert_lora.py once dropped PEFT's lora_alpha (about half the effect): either output now gives diffusers' output."""
    from musubi_tuner import convert_lora

    config, weights, _ = base
    path, want, args, _ = peft_file
    out = tmp_path / f"{target}.safetensors"
    convert_lora.main(["--input", str(path), "--output", str(out), "--target", target])
    assert "lora_adapter_metadata" not in StateDictFile(out).metadata  # the scale is in the weights (or .alpha) now
    assert rel_err(ours_with(config, weights, out, args), want) < 1e-5
