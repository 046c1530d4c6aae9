"""The doctor's per-consumer predictions, checked against independent models of each consumer's loader.

ComfyUI and kijai's HunyuanVideoWrapper: models written here from the rules in tests/fixtures/lora_consumers/ (each
written down from that program's source; see the README there), over every state-dict key of their model and every
entry kind. musubi-tuner: its rule is short enough to state here. diffusers: diffusers itself, loading the file into
its transformer. The files are those other tools write (tests/foreign_loras.py) and our own outputs of them.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from conftest import DATA
from foreign_loras import (
    comfy_module_name, comfy_param_name, comfy_trainer_file, diffusion_pipe_adapter, entry_kinds_file, kohya_network_file,
    lycoris_network_file, prefixed_pairs_file, tiny_model,
)
from helpers import dit_inputs, rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.files import StateDictFile
from musubi_tuner.networks.lora_consumers import coverage
from musubi_tuner.networks.lora_coverage import Model, dit_linears
from musubi_tuner.networks.lora_naming import official_to_comfy
from musubi_tuner.networks.lora_reader import kohya_state_dict, other_state_dict, parse_lora, read_lora
from musubi_tuner.networks.merge import merge_patch


def rules(name):
    with open(os.path.join(DATA, "lora_consumers", name)) as f:
        return json.load(f)


COMFY = rules("comfyui_hunyuan_video.json")
KIJAI = rules("kijai_hunyuan_video_wrapper.json")
TINY_BLOCKS = {"double_blocks.{i}": 2, "single_blocks.{i}": 2, "txt_in.individual_token_refiner.blocks.{i}": 2}


# ----------------------------------------------------------------------------------------------- independent models


def _expand(table: dict, blocks: dict) -> list[str]:
    names = []
    for template, leaves in table.items():
        if template == "_about":
            continue
        containers = [""] if not template else [template.format(i=i) + "." for i in range(blocks[template])]
        names += [c + leaf for c in containers for leaf in leaves]
    return names


def comfy_modules(blocks=None) -> set[str]:
    """ComfyUI's Linear module names for a model with `blocks` ({template: count}; default the full model)."""
    return set(_expand(COMFY["linear_modules"], blocks or COMFY["full_model_blocks"]))


def comfy_state_dict_keys(blocks) -> list[str]:
    """Every state-dict key of ComfyUI's HunyuanVideo model: Linears, the Conv3d and the affine LayerNorms (weight and
    bias), and Flux's RMSNorm scales."""
    prefix, weighted = COMFY["state_dict_prefix"], _expand(COMFY["linear_modules"], blocks)
    for kind in ("conv3d", "layer_norm"):
        weighted += _expand(COMFY["other_weighted_modules"][kind], blocks)
    return [f"{prefix}{m}.{leaf}" for m in weighted for leaf in ("weight", "bias")] + [
        prefix + k for k in _expand(COMFY["rms_norm_scales"], blocks)]


def comfy_key_map(sd_keys, hunyuan_video=True) -> dict[str, str]:
    prefix, key_map = COMFY["state_dict_prefix"], {}
    for k in sd_keys:
        if not k.endswith(".weight"):
            key_map[COMFY["key_map"]["generic_non_weight"].format(key=k)] = k
            continue
        module = k[len(prefix):-len(".weight")]
        for form in COMFY["key_map"]["generic"]:
            key_map[form.format(module=module, underscored=module.replace(".", "_"))] = k
    if hunyuan_video:
        for k in sd_keys:
            if k.endswith(".weight"):
                renamed = k
                for old, new in COMFY["key_map"]["hunyuan_video_renames"]:
                    renamed = renamed.replace(old, new)
                for form in COMFY["key_map"]["hunyuan_video"]:
                    key_map[form.format(renamed=renamed[len(prefix):-len(".weight")])] = k
    return key_map


def comfy_applied(file_keys, sd_keys, key_map) -> set[str]:
    """The file keys whose patch ComfyUI's loader keeps (one patch per state-dict key: the last written)."""
    loader, keys, patches = COMFY["loader"], set(file_keys), {}
    for x, target in key_map.items():
        alpha = {x + ".alpha"} & keys
        for up, down in loader["lora_pairs_up_down"]:
            if x + up in keys:
                patches[target] = {x + up, x + down} | alpha | ({x + ".reshape_weight"} & keys)
                break
        for adapter in ("loha", "lokr"):
            rules_ = loader["lycoris_adapters"][adapter]
            if any(x + t in keys for t in rules_["trigger"]):
                patches[target] = {x + r for r in rules_["reads"]} & keys | alpha
        bias = target[: -len(".weight")] + ".bias"
        for entry in loader["entries"]["order"]:
            if x + entry not in keys or (entry == ".b_norm"):
                continue
            patches[bias if entry in loader["entries"]["bias"] else target] = {x + entry}
            if entry == ".w_norm" and x + ".b_norm" in keys:
                patches[bias] = {x + ".b_norm"}
    return {k for target, used in patches.items() if target in sd_keys for k in used}


def kijai_applied(file_keys, official_sd_keys, blocks_node: bool) -> set[str] | None:
    """The file keys kijai's wrapper applies; None when it fails on the file."""
    renamed = {}
    for k in file_keys:
        new = k.replace("transformer.", "diffusion_model.") if k.startswith("transformer.") else k
        for old, repl in KIJAI["standardize"]["rules"]:
            if old in new:
                new = new.replace(old, repl)
        renamed[new] = k
    if blocks_node:
        kept = {}
        for new, k in renamed.items():
            if "double_blocks." in new or "single_blocks." in new:
                parts = new.split("diffusion_model.")
                if len(parts) < 2:
                    return None  # IndexError
                kind, index = parts[1].split(".", 2)[:2]
                if int(index) < KIJAI["block_filter"][kind]:
                    kept[new] = k
        renamed = kept
    prefix, key_map = "diffusion_model.", {}
    for k in official_sd_keys:
        if k.endswith(".weight"):
            module = k[len(prefix):-len(".weight")]
            for form in KIJAI["key_map"]:
                key_map[form.format(module=module, underscored=module.replace(".", "_"))] = k
        else:
            key_map[k] = k
    return {renamed[k] for k in comfy_applied(renamed, set(official_sd_keys), key_map)}


def musubi_applied(file_keys, linears) -> set[str]:
    """musubi-tuner: lora_unet_<official path with _> of the Linears in the double and single blocks; down, up, and the
    alpha of a module it builds (one with a lora_down)."""
    names = {"lora_unet_" + p.replace(".", "_") for p in linears if re.match(r"(double|single)_blocks\.", p)}
    built = {k.split(".", 1)[0] for k in file_keys if k.endswith(".lora_down.weight")}
    return {k for k in file_keys if k.split(".", 1)[0] in names and (k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight")
                                                                      or k.split(".", 1)[1] == "alpha" and k.split(".", 1)[0] in built)}


# ----------------------------------------------------------------------------------------------- the files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> state dict: the files other tools write, our outputs of them, and awkward ones."""
    tmp = tmp_path_factory.mktemp("consumers")
    config = tiny_dit_config()
    model = tiny_model(config, random_dit_state_dict(config, seed=2, scale=0.05))
    made = {
        "musubi kohya": kohya_network_file(model, tmp / "kohya.safetensors"),
        "kohya with modulation": kohya_network_file(model, tmp / "kohya_mod.safetensors", include=[r".*mod.*"]),
        "kohya, ComfyUI names": kohya_network_file(model, tmp / "kohya_comfy.safetensors", include=[r".*mod.*"], rename=comfy_module_name),
        "transformer. pairs": prefixed_pairs_file(model, tmp / "prefixed.safetensors"),
        "diffusion-pipe": diffusion_pipe_adapter(model, tmp / "epoch1"),
        "ComfyUI trainer": comfy_trainer_file(model, tmp / "trainer.safetensors"),
        "ComfyUI trainer, blocks": comfy_trainer_file(model, tmp / "trainer_blocks.safetensors", blocks_only=True),
        "entry kinds": entry_kinds_file(model, tmp / "entries.safetensors"),
        "musubi loha": lycoris_network_file(model, tmp / "loha.safetensors", "loha"),
        "musubi lokr": lycoris_network_file(model, tmp / "lokr.safetensors", "lokr", factor="4"),
    }
    out = {}
    for name, f in made.items():
        out[name] = StateDictFile(f.path).load_all()
        patches = read_lora(f.path).patches
        out[name + " -> ours kohya"] = kohya_state_dict(patches)
        out[name + " -> ours other"] = other_state_dict(patches)
    kohya = out["musubi kohya"]
    out["both namings in one file"] = {**kohya, **out["musubi kohya -> ours other"]}
    out["a pair and a diff of one weight"] = {**kohya, "lora_unet_double_blocks_0_img_attn_qkv.diff": torch.zeros(192, 64)}
    out["no prefix"] = {k.removeprefix("diffusion_model."): v for k, v in out["musubi kohya -> ours other"].items()}
    out["double blocks, ours other"] = {k: v for k, v in out["musubi kohya -> ours other"].items() if ".double_blocks." in k}
    g = torch.Generator().manual_seed(5)
    refiner = "diffusion_model.txt_in.individual_token_refiner.blocks.0.self_attn_qkv"
    for rank in (4, 6):  # (fuzz_an 1: diffusers' converter cuts this layer's lora_A in three too, so no rank loads)
        qkv = {k: v for k, v in out["double blocks, ours other"].items() if "double_blocks.0.img_attn_qkv" in k}
        out[f"refiner qkv rank {rank}, other"] = {**qkv, f"{refiner}.lora_A.weight": torch.randn(rank, 64, generator=g) * 0.05,
                                                  f"{refiner}.lora_B.weight": torch.randn(192, rank, generator=g) * 0.05}
    return config, model, out


FILES = ["musubi kohya", "kohya with modulation", "kohya, ComfyUI names", "transformer. pairs", "diffusion-pipe", "ComfyUI trainer",
         "ComfyUI trainer, blocks", "entry kinds", "musubi loha", "musubi lokr"]
ALL_FILES = [f for name in FILES for f in (name, name + " -> ours kohya", name + " -> ours other")] + [
    "both namings in one file", "a pair and a diff of one weight", "no prefix", "double blocks, ours other",
    "refiner qkv rank 4, other", "refiner qkv rank 6, other"]


@pytest.mark.parametrize("name", ALL_FILES)
def test_comfyui_prediction_matches_its_loader(files, name):
    config, model, out = files
    weights = out[name]
    sd_keys = comfy_state_dict_keys(TINY_BLOCKS)
    want = comfy_applied(weights, set(sd_keys), comfy_key_map(sd_keys))
    cov = coverage("comfyui", weights, Model(config, shapes_known=True))
    assert set(cov.applied) == want
    assert set(cov.dropped) == set(weights) - want


@pytest.mark.parametrize("blocks_node", [False, True], ids=["kijai", "kijai with block selection"])
@pytest.mark.parametrize("name", ALL_FILES)
def test_kijai_prediction_matches_its_loader(files, name, blocks_node):
    config, model, out = files
    weights = out[name]
    want = kijai_applied(weights, ["diffusion_model." + k for k in model.state_dict()], blocks_node)
    cov = coverage("kijai_blocks" if blocks_node else "kijai", weights, Model(config, shapes_known=True))
    if want is None:
        assert cov.fatal and "IndexError" in cov.fatal
    else:
        assert cov.fatal is None and set(cov.applied) == want and set(cov.dropped) == set(weights) - want


@pytest.mark.parametrize("name", ALL_FILES)
def test_musubi_prediction_matches_its_rule(files, name):
    config, model, out = files
    weights = out[name]
    cov = coverage("musubi", weights, Model(config, shapes_known=True))
    assert set(cov.applied) == musubi_applied(weights, dit_linears(config))


@pytest.mark.parametrize("name", ALL_FILES)
def test_diffusers_prediction_matches_diffusers(files, name):
    """The doctor says diffusers fails, loads nothing, or loads everything; diffusers does exactly that (tiny width 64,
    so a file with single-block linear1 LoRAs fails in its converter, which splits them at 3072)."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin

    from diffusers_reference import diffusers_dit

    config, model, out = files
    weights = out[name]
    cov = coverage("diffusers", weights, Model(config, shapes_known=True))
    transformer = diffusers_dit(model.state_dict(), config)
    args = dit_inputs(config, frames=2, height=4, width=4, text_lens=(5,))

    def run(m):
        x, t, text, mask, pooled, guidance = args
        with torch.no_grad():
            return m(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_attention_mask=mask, pooled_projections=pooled,
                     guidance=guidance, return_dict=False)[0]

    base = run(transformer)
    try:
        converted = HunyuanVideoLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in weights.items()})
        if not all("lora" in k for k in converted):  # what load_lora_weights checks before PEFT
            raise ValueError("Invalid LoRA checkpoint")
        HunyuanVideoLoraLoaderMixin.load_lora_into_transformer(converted, transformer=transformer)
    except Exception:
        assert cov.fatal is not None, "diffusers failed but the doctor says it loads"
        return
    assert cov.fatal is None, f"the doctor says diffusers fails ({cov.fatal}) but it loads"
    if name == "double blocks, ours other":
        assert cov.complete  # the case where diffusers takes every key at this width
    if cov.complete:  # and it gives what the LoRA merged here gives
        ours = tiny_model(config, model.state_dict())
        for patch in parse_lora(weights).require_whole().patches:
            merge_patch(ours, patch, 1.0)
        with torch.no_grad():
            assert rel_err(run(transformer), ours(*args)) < 1e-5
    elif not cov.applied:
        assert torch.equal(run(transformer), base)


def test_our_comfyui_names_are_the_module_names_of_comfyuis_model():
    assert {official_to_comfy(p) for p in dit_linears()} == comfy_modules()
    assert {comfy_param_name(p + ".weight").removesuffix(".weight") for p in dit_linears()} == comfy_modules()


def test_kohya_file_loses_exactly_the_double_block_mlps_in_comfyui(files):
    config, model, out = files
    cov = coverage("comfyui", out["musubi kohya"])
    mlp = {f"lora_unet_double_blocks_{i}_{stream}_mlp_{fc}.{t}" for i in range(2) for stream in ("img", "txt")
           for fc in ("fc1", "fc2") for t in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert set(cov.dropped) == mlp
    assert "ComfyUI's layer is double_blocks.0.img_mlp.0, kohya name lora_unet_double_blocks_0_img_mlp_0" in cov.dropped[
        "lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight"]
    assert len(cov.applied) == 60 - 24 and cov.fatal is None and not cov.complete


def comfy_lycoris_update(t: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """ComfyUI's LoHa / LoKr update of one module from its entries, by the rules in the data file (loader.lycoris_adapters)."""
    if "hada_w1_a" in t:
        scale = 1.0 if alpha is None else alpha / t["hada_w1_b"].shape[0]
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    scale = alpha / t["lokr_w2_b"].shape[0] if alpha is not None and "lokr_w2_b" in t else 1.0
    return torch.kron(t["lokr_w1"], w2) * scale


@pytest.mark.parametrize("name", ["musubi loha", "musubi lokr"])
def test_comfyui_places_every_key_of_our_lycoris_companion_with_our_update(files, name):
    """The .comfyui copy of a LoHa/LoKr loads whole in ComfyUI and changes each weight as merging here does; the kohya
    file loses the double-block MLPs there, as a LoRA does."""
    config, model, out = files
    sd_keys = comfy_state_dict_keys(TINY_BLOCKS)
    key_map = comfy_key_map(sd_keys)
    kohya, other = out[name], out[name + " -> ours other"]
    assert comfy_applied(other, set(sd_keys), key_map) == set(other)
    assert coverage("comfyui", other, Model(config, shapes_known=True)).complete
    lost = set(kohya) - comfy_applied(kohya, set(sd_keys), key_map)
    assert lost and all(re.search(r"_(img|txt)_mlp_fc[12]\.", k) for k in lost)
    ours = {p.module: p.delta(p.shape) for p in parse_lora(kohya).require_whole().patches}
    modules = {k.rsplit(".", 1)[0] for k in other}
    assert len(modules) == len(ours) == 20
    for module in modules:
        entries = {k.rsplit(".", 1)[1]: v.float() for k, v in other.items() if k.rsplit(".", 1)[0] == module}
        alpha = entries.pop("alpha").item() if "alpha" in entries else None
        assert rel_err(comfy_lycoris_update(entries, alpha), ours[module.removeprefix("diffusion_model.")]) < 1e-6


def test_comfyui_trainer_files_load_completely_in_comfyui_and_here(files):
    """What the doctor once got wrong (147 of 208 keys): ComfyUI's own trainer output loads whole in ComfyUI."""
    config, model, out = files
    for name in ("ComfyUI trainer", "ComfyUI trainer, blocks"):
        for consumer in ("comfyui", "ours"):
            assert coverage(consumer, out[name], Model(config, shapes_known=True)).complete, (name, consumer)


def test_kijai_block_selection_drops_every_kohya_key_and_fails_on_unprefixed_block_keys(files):
    config, model, out = files
    assert coverage("kijai", out["musubi kohya"]).complete
    assert coverage("kijai_blocks", out["musubi kohya"]).applied == []
    assert coverage("kijai_blocks", out["musubi kohya -> ours other"]).complete
    assert "IndexError" in coverage("kijai_blocks", out["no prefix"]).fatal


def test_musubi_reads_kohya_block_linears_and_needs_every_alpha(files):
    config, model, out = files
    kohya = out["kohya with modulation"]
    assert coverage("musubi", kohya).complete  # modulation Linears are inside the blocks: musubi-tuner reads them too
    no_alpha = {k: v for k, v in kohya.items() if k != "lora_unet_single_blocks_0_linear2.alpha"}
    assert "KeyError" in coverage("musubi", no_alpha).fatal
    outside = {**kohya, "lora_unet_final_layer_linear.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(64, 4), "lora_unet_final_layer_linear.alpha": torch.tensor(4.0)}
    cov = coverage("musubi", outside)
    assert set(cov.dropped) == {k for k in outside if "final_layer" in k}
    assert coverage("ours", outside).complete  # merging here applies every Linear the file names
    assert "matches official names only" in next(iter(coverage("musubi", out["kohya, ComfyUI names"]).dropped.values()))


def test_ours_refuses_what_it_cannot_apply_and_layers_the_dit_lacks(files):
    config, model, out = files
    kohya = out["musubi kohya"]
    cov = coverage("ours", {**kohya, "some_counter": torch.tensor(1)})
    assert list(cov.dropped) == ["some_counter"] and "refuses the file" in cov.fatal
    beyond = {k.replace("single_blocks_1_", "single_blocks_7_"): v for k, v in kohya.items()}
    assert coverage("ours", beyond).complete  # the full model has 40 single blocks
    assert "single_blocks.7.linear1.weight does not exist" in coverage("ours", beyond, Model(config)).fatal
    assert "names that layer twice" in coverage("ours", out["both namings in one file"]).fatal
    nan = {**kohya, "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.full((448, 4), float("nan"))}
    assert "NaN" in coverage("ours", nan).fatal


def test_a_peft_dora_file_is_named_as_dora_and_diffusers_loads_it_as_the_doctor_says(files):
    """fuzz_an 2: PEFT's DoRA magnitudes (lora_magnitude_vector, as diffusers saves a use_dora adapter) were "not a LoRA
    entry" here (kohya's .dora_scale is named as DoRA), and the doctor said diffusers drops them; diffusers loads them."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusers_reference import diffusers_dit

    config, model, _ = files
    source = diffusers_dit(model.state_dict(), config)
    source.add_adapter(LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["to_q", "to_k", "to_v"]))
    weights = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(source).items()}
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    assert magnitudes and len(weights) == 3 * len(magnitudes)
    cov = coverage("diffusers", weights, Model(config, shapes_known=True))
    assert cov.complete, cov.dropped or cov.fatal
    transformer = diffusers_dit(model.state_dict(), config)
    HunyuanVideoLoraLoaderMixin.load_lora_into_transformer(HunyuanVideoLoraLoaderMixin.lora_state_dict(dict(weights)),
                                                           transformer=transformer)
    loaded = [n for n, _ in transformer.named_parameters() if "lora_magnitude_vector" in n]
    assert len(loaded) == len(magnitudes)  # every magnitude in the model: diffusers applies DoRA
    problems = parse_lora(weights).problems
    assert {p.message for p in problems} == {"a DoRA magnitude (PEFT's use_dora), which this toolkit does not apply"}
    assert sorted(k for p in problems for k in p.keys) == sorted(magnitudes)
