"""The doctor's mapping rules per consumer, checked against each consumer's rules as its source states them.

ComfyUI: tests/fixtures/lora_consumers/comfyui_hunyuan_video.json (its module names, key map and loader,
written down from its source) drives an independent model of its loader here. diffusers is checked with
diffusers itself in test_lora_interop.py.
"""

import json
import os

import pytest
import torch

from conftest import DATA
from musubi_tuner.demo.tiny_dit import tiny_dit_config
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_consumers import coverage, dit_linears
from musubi_tuner.networks.lora_naming import kohya_to_other, official_to_comfy, official_to_diffusers


@pytest.fixture(scope="module")
def comfy_rules():
    with open(os.path.join(DATA, "lora_consumers", "comfyui_hunyuan_video.json")) as f:
        return json.load(f)


def comfy_modules(rules, blocks=None) -> set[str]:
    """ComfyUI's Linear module names for a model with `blocks` ({template: count}; default the full model)."""
    blocks = blocks or rules["full_model_blocks"]
    names = set()
    for template, leaves in rules["linear_modules"].items():
        if template == "_about":
            continue
        containers = [""] if not template else [template.format(i=i) + "." for i in range(blocks[template])]
        names |= {c + leaf for c in containers for leaf in leaves}
    return names


def comfy_loaded_keys(rules, file_keys, modules) -> set[str]:
    """The file keys ComfyUI's loader reads, by the rules in the fixture."""
    prefix, key_map = rules["state_dict_prefix"], {}
    for module in modules:
        weight = f"{prefix}{module}.weight"
        renamed = weight
        for old, new in rules["key_map"]["hunyuan_video_renames"]:
            renamed = renamed.replace(old, new)
        fields = {"module": module, "underscored": module.replace(".", "_"), "renamed": renamed[len(prefix):-len(".weight")]}
        for form in rules["key_map"]["generic"] + rules["key_map"]["hunyuan_video"]:
            key_map[form.format(**fields)] = weight
    loader, read = rules["loader"], set()
    for x in key_map:
        read |= {x + s for s in loader["always"]}
        for i, (up, down) in enumerate(loader["lora_pairs_up_down"]):
            if x + up in file_keys:
                read |= {x + up, x + down} | {x + s for s in loader["with_a_pair"]}
                read |= {x + s for s in loader["with_the_first_pair"]} if i == 0 else set()
                break
    return read & set(file_keys)


def tiny_lora(include=None, rank=4) -> dict[str, torch.Tensor]:
    model = HunyuanVideoDiT(tiny_dit_config())
    kwargs = {"include_patterns": str(include)} if include else {}
    return lora.create_arch_network(1.0, rank, rank / 2, None, None, model, **kwargs).state_dict_for_saving()


TINY_BLOCKS = {"double_blocks.{i}": 2, "single_blocks.{i}": 2, "txt_in.individual_token_refiner.blocks.{i}": 2}


def test_our_comfyui_names_are_the_module_names_of_comfyuis_model(comfy_rules):
    assert {official_to_comfy(p) for p in dit_linears()} == comfy_modules(comfy_rules)


@pytest.mark.parametrize("naming", ["kohya", "kohya with modulation", "other", "transformer. prefix", "comfy names", "no prefix",
                                    "diffusers"])
def test_doctor_predicts_what_comfyuis_loader_reads(comfy_rules, naming):
    kohya = tiny_lora(include=[".*mod.*"] if naming == "kohya with modulation" else None)
    files = {
        "kohya": kohya, "kohya with modulation": kohya, "other": kohya_to_other(kohya),
        "transformer. prefix": kohya_to_other(kohya, prefix="transformer"),
        "comfy names": {k.replace("img_attn_qkv", "img_attn.qkv").replace("mlp.fc1", "mlp.0"): v for k, v in kohya_to_other(kohya).items()},
        "no prefix": {k.removeprefix("diffusion_model."): v for k, v in kohya_to_other(kohya).items()},
        "diffusers": {f"transformer.{official_to_diffusers('double_blocks.0.img_attn_qkv')[0]}.lora_A.weight": torch.zeros(4, 64),
                      f"transformer.{official_to_diffusers('double_blocks.0.img_attn_qkv')[0]}.lora_B.weight": torch.zeros(64, 4)},
    }
    weights = files[naming]
    cov = coverage("comfyui", weights)
    want = comfy_loaded_keys(comfy_rules, weights, comfy_modules(comfy_rules))
    assert set(cov.applied) == want
    assert set(cov.dropped) == set(weights) - want
    # on the tiny model's own layers too
    assert set(coverage("comfyui", weights, tiny_dit_config()).applied) == comfy_loaded_keys(
        comfy_rules, weights, comfy_modules(comfy_rules, TINY_BLOCKS))


def test_kohya_file_loses_exactly_the_double_block_mlps_in_comfyui():
    cov = coverage("comfyui", tiny_lora())
    mlp = {f"lora_unet_double_blocks_{i}_{stream}_mlp_{fc}.{t}" for i in range(2) for stream in ("img", "txt")
           for fc in ("fc1", "fc2") for t in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(cov.dropped) == mlp
    assert "ComfyUI's layer is double_blocks.0.img_mlp.0, kohya name lora_unet_double_blocks_0_img_mlp_0" in cov.dropped[
        "lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight"]
    assert len(cov.applied) == 60 - 24 and cov.fatal is None and not cov.complete


def test_other_naming_loads_completely_in_comfyui_diffusers_and_here_but_not_in_musubi():
    other = kohya_to_other(tiny_lora())
    for consumer in ("comfyui", "diffusers", "ours"):
        assert coverage(consumer, other).complete, consumer
    musubi = coverage("musubi", other)
    assert musubi.applied == [] and "convert_lora.py --target default" in next(iter(musubi.dropped.values()))


def test_musubi_reads_kohya_block_linears_and_needs_every_alpha():
    kohya = tiny_lora(include=[".*mod.*"])
    assert coverage("musubi", kohya).complete  # modulation Linears are inside the blocks: musubi-tuner reads them too
    no_alpha = {k: v for k, v in kohya.items() if k != "lora_unet_single_blocks_0_linear2.alpha"}
    assert "KeyError" in coverage("musubi", no_alpha).fatal
    outside = {**kohya, "lora_unet_final_layer_linear.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(64, 4), "lora_unet_final_layer_linear.alpha": torch.tensor(4.0)}
    cov = coverage("musubi", outside)
    assert set(cov.dropped) == {k for k in outside if "final_layer" in k}
    assert coverage("ours", outside).complete  # merging here applies every Linear the file names


def test_ours_drops_stray_keys_and_refuses_layers_the_dit_lacks():
    kohya = tiny_lora()
    cov = coverage("ours", {**kohya, "some_counter": torch.tensor(1)})
    assert list(cov.dropped) == ["some_counter"] and len(cov.applied) == len(kohya)
    beyond = {k.replace("single_blocks_1_", "single_blocks_7_"): v for k, v in kohya.items()}
    assert coverage("ours", beyond).complete  # the full model has 40 single blocks
    assert "single_blocks.7.linear1 does not exist" in coverage("ours", beyond, tiny_dit_config()).fatal
