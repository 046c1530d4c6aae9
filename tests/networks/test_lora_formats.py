"""Every LoRA format of the ecosystem through the one reading path (networks.lora_reader), as merge_lora.py, generation,
--base_weights and convert_lora.py use it: each entry applied, the merged weights equal to each format's documented
math (computed by the tool that wrote it, or here), generation equal to the merged model, and round trips through
convert_lora.py that keep the effect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from foreign_loras import (
    comfy_module_name, comfy_trainer_file, diffusion_pipe_adapter, entry_kinds_file, kohya_network_file, prefixed_pairs_file,
    tiny_model,
)
from helpers import dit_inputs, rel_err
from musubi_tuner import convert_lora
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.files import StateDictFile, save_safetensors
from musubi_tuner.hunyuan.checkpoints import load_dit
from musubi_tuner.inference.pipeline import apply_loras_on_the_fly
from musubi_tuner.networks.lora_reader import read_lora
from musubi_tuner.networks.merge import merge_file, merge_loras_into

FORMATS = ["musubi-tuner kohya", "kohya with ComfyUI module names", "transformer. pairs with alpha", "diffusion-pipe adapter",
           "diffusion-pipe adapter, lora_alpha 2x rank", "ComfyUI trainer, whole model", "ComfyUI trainer, blocks only",
           "norm, diff, set_weight and conv entries"]
MULTIPLIER = 0.7


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny DiT's float32 weights, written as a float32 safetensors DiT (so a merge is not rounded)."""
    tmp = tmp_path_factory.mktemp("formats")
    config = tiny_dit_config()
    weights = random_dit_state_dict(config, seed=2, scale=0.05)
    dit = tmp / "dit_fp32.safetensors"
    save_safetensors(weights, dit)
    return tmp, config, weights, dit


@pytest.fixture(scope="module")
def foreign(base):
    tmp, config, weights, _ = base
    model = tiny_model(config, weights)
    build = {
        "musubi-tuner kohya": lambda: kohya_network_file(model, tmp / "kohya.safetensors"),
        "kohya with ComfyUI module names": lambda: kohya_network_file(model, tmp / "kohya_comfy.safetensors", include=[r".*mod.*"],
                                                                      rename=comfy_module_name, seed=1),
        "transformer. pairs with alpha": lambda: prefixed_pairs_file(model, tmp / "prefixed.safetensors"),
        "diffusion-pipe adapter": lambda: diffusion_pipe_adapter(model, tmp / "epoch1"),
        "diffusion-pipe adapter, lora_alpha 2x rank": lambda: diffusion_pipe_adapter(model, tmp / "epoch2", lora_alpha=8, seed=1),
        "ComfyUI trainer, whole model": lambda: comfy_trainer_file(model, tmp / "ComfyUI_trained_lora_16_steps_00001_.safetensors"),
        "ComfyUI trainer, blocks only": lambda: comfy_trainer_file(model, tmp / "blocks_only.safetensors", blocks_only=True, seed=1),
        "norm, diff, set_weight and conv entries": lambda: entry_kinds_file(model, tmp / "entries.safetensors"),
    }
    return {name: make() for name, make in build.items()}


def merged_weights(dit: Path, lora: Path, out: Path, multiplier=MULTIPLIER) -> dict[str, torch.Tensor]:
    merge_file(str(dit), [str(lora)], [multiplier], str(out))
    return StateDictFile(out).load_all()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_entry_of_the_file_is_applied(foreign, fmt):
    f = foreign[fmt]
    contents = read_lora(f.path)
    assert contents.problems == []
    assert {k for p in contents.patches for k in p.keys} == set(StateDictFile(f.path).keys())
    assert {p.param for p in contents.patches} == set(f.expected) | set(f.replaced or {})


@pytest.mark.parametrize("fmt", FORMATS)
def test_merged_weights_are_the_documented_math(base, foreign, fmt, tmp_path):
    _, _, weights, dit = base
    f = foreign[fmt]
    got = merged_weights(dit, f.path, tmp_path / "merged.safetensors")
    assert max_diff(got, f.merged(weights, MULTIPLIER)) < 1e-6
    assert max_diff(got, weights) > 1e-3  # the LoRA does something


@pytest.mark.parametrize("fmt", FORMATS)
def test_generation_with_the_lora_equals_the_merged_model(base, foreign, fmt, tmp_path):
    """Both ways generation applies a LoRA (merged into the loaded DiT; beside fp8 weights, on the fly) give the output of
    the model merge_lora.py writes."""
    _, config, _, dit = base
    f = foreign[fmt]
    merge_file(str(dit), [str(f.path)], [MULTIPLIER], str(tmp_path / "merged.safetensors"))
    args = dit_inputs(config, frames=2, height=4, width=6, text_lens=(5,))
    outputs = {}
    for way in ("merged file", "merged in memory", "on the fly"):
        model = load_dit(tmp_path / "merged.safetensors" if way == "merged file" else dit, dtype=torch.float32)
        if way == "merged in memory":
            merge_loras_into(model, [str(f.path)], [MULTIPLIER])
        elif way == "on the fly":
            apply_loras_on_the_fly(model, [str(f.path)], [MULTIPLIER], exclude_single_blocks=False)
        with torch.no_grad():
            outputs[way] = model(*args)
    with torch.no_grad():
        plain = load_dit(dit, dtype=torch.float32)(*args)
    assert rel_err(outputs["merged in memory"], outputs["merged file"]) < 1e-5
    assert rel_err(outputs["on the fly"], outputs["merged file"]) < 1e-5
    assert rel_err(plain, outputs["merged file"]) > 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_round_trips_keep_the_effect(base, foreign, fmt, tmp_path):
    """any format -> kohya -> other -> kohya with convert_lora.py: every file merges to the same weights."""
    _, _, weights, dit = base
    f = foreign[fmt]
    want = f.merged(weights, MULTIPLIER)
    steps = [("default", "kohya1"), ("other", "other"), ("default", "kohya2")]
    source = f.path
    for target, name in steps:
        out = tmp_path / f"{name}.safetensors"
        convert_lora.main(["--input", str(source), "--output", str(out), "--target", target])
        assert max_diff(merged_weights(dit, out, tmp_path / f"merged_{name}.safetensors"), want) < 1e-6, name
        source = out


def test_hv_generate_video_with_a_comfyui_trainer_lora_equals_generating_with_the_merged_model(base, foreign, encoders_and_vae, tmp_path):
    """The whole command, with the hardest format (conv LoRA on img_in, norm and bias diffs): --lora_weight on the base
    DiT gives the latents of the model merge_lora.py writes (the on-the-fly path is checked above, at the DiT)."""
    from musubi_tuner.hv_generate_video import build_parser
    from musubi_tuner.inference import pipeline

    _, _, _, dit = base
    f = foreign["ComfyUI trainer, whole model"]
    merged = tmp_path / "merged.safetensors"
    merge_file(str(dit), [str(f.path)], [MULTIPLIER], str(merged))
    e = encoders_and_vae

    def latents(dit_path, *flags):
        args = build_parser().parse_args(["--dit", str(dit_path), "--vae", str(e["vae"]), "--text_encoder1", str(e["te1"]),
                                          "--text_encoder2", str(e["te2"]), "--prompt", "a cat", "--video_size", "32", "32",
                                          "--video_length", "5", "--infer_steps", "2", "--seed", "1", "--output_type", "latent",
                                          "--save_path", str(tmp_path / f"out{len(flags)}"), *flags])
        (path,) = pipeline.generate(args)
        return StateDictFile(path, what="latent").get("latent")

    with_lora = latents(dit, "--lora_weight", str(f.path), "--lora_multiplier", str(MULTIPLIER))
    assert rel_err(with_lora, latents(merged)) < 1e-5
    assert rel_err(latents(dit, "--lora_weight", str(f.path), "--lora_multiplier", "0"), with_lora) > 1e-3


def test_a_linear_pair_stored_as_1x1_convolutions_runs_beside_fp8_weights_and_loads_into_a_network(base, tmp_path):
    """fuzz_aw 13: some LoCon converters write a Linear's pair as 1x1 convolutions (down (rank, in, 1, 1)); merging
    applied it, but generation with --fp8 (the pair run beside the weights) and --network_weights stopped with a
    size-mismatch traceback. Both now give the documented math W + m * up @ down * alpha / rank."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from musubi_tuner.networks import lora
    from musubi_tuner.networks.lora_files import load_network_weights

    _, config, weights, dit = base
    g = torch.Generator().manual_seed(5)
    name, param = "lora_unet_double_blocks_0_img_attn_proj", "double_blocks.0.img_attn_proj.weight"
    down, up = torch.randn(4, 64, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1
    path = tmp_path / "linear_as_conv.safetensors"
    save_file({f"{name}.lora_down.weight": down.reshape(4, 64, 1, 1), f"{name}.lora_up.weight": up.reshape(64, 4, 1, 1),
               f"{name}.alpha": torch.tensor(2.0)}, str(path))
    delta = up @ down * (2.0 / 4)
    model = load_dit(dit, dtype=torch.float32, fp8=True)
    apply_loras_on_the_fly(model, [str(path)], [MULTIPLIER], exclude_single_blocks=False)
    linear = model.get_submodule(param.removesuffix(".weight"))
    x = torch.randn(2, 5, 64, generator=g)
    with torch.no_grad():
        got = linear(x).double()
    want = F.linear(x.double(), linear.dequantized_weight(torch.float64) + MULTIPLIER * delta.double(), linear.bias.double())
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    network = lora.create_arch_network_from_weights(1.0, load_network_weights(path), unet=tiny_model(config, weights))
    module = network.get_submodule(name)
    assert torch.equal(module.lora_down.weight, down) and torch.equal(module.lora_up.weight, up) and module.scale == 0.5
