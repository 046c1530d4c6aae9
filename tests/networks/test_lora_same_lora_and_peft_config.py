"""A LoRA that reaches a command twice is applied once, and PEFT's scales are PEFT's: a `.comfyui` companion given beside
its own file (a glob matches both) is left out with a warning by merging, generation and training's --base_weights; the
post-hoc EMA leaves out an earlier EMA result and the run's final LoRA beside its last checkpoint; a PEFT adapter with
`use_rslora` (and alpha_pattern / rank_pattern) merges to PEFT's own merge; a PEFT config with a value of the wrong type
is one error line naming the file and the key."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from musubi_tuner import convert_lora, lora_post_hoc_ema, merge_lora
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.networks.lora_files import lora_outputs
from musubi_tuner.networks.lora_metadata import LoRAFileInfo, with_naming
from musubi_tuner.networks.lora_naming import kohya_to_module_path, official_to_diffusers
from musubi_tuner.networks.merge import lora_jobs, merge_loras_into

from foreign_loras import diffusion_pipe_adapter
from helpers import run_main, tiny_dit_file_and_lora


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The tiny DiT, and a LoRA as the trainer writes it with --lora_format both: mine.safetensors and its companion
    mine.comfyui.safetensors, each naming the other in its metadata."""
    tmp = tmp_path_factory.mktemp("pair")
    dit, weights, _ = tiny_dit_file_and_lora(tmp, rank=4, alpha=2.0, generator=torch.Generator().manual_seed(0))
    modules = {kohya_to_module_path(k.removesuffix(".alpha")): (4, 2.0) for k in weights if k.endswith(".alpha")}
    ours = {"ss_network_module": "networks.lora", **LoRAFileInfo(version="1", modules=modules).to_metadata()}  # (as the trainer)
    for out in lora_outputs(weights, tmp / "mine.safetensors"):
        save_file(out.tensors, str(out.path), metadata=with_naming(ours, out.naming, out.companion))
    return tmp, dit, weights


def merged_update(tmp_path, dit, loras, capsys, *flags) -> tuple[dict[str, torch.Tensor], str]:
    out = tmp_path / "merged.safetensors"
    status, stdout, err = run_main(merge_lora.main, ["--dit", dit, "--device", "cpu", "--lora_weight", *loras,
                                                     "--save_merged_model", out, *flags], capsys)
    assert status == 0, err
    base, merged = load_file(str(dit)), load_file(str(out))
    return {k: merged[k].float() - base[k].float() for k in base}, stdout


def applied(delta: torch.Tensor, want: torch.Tensor) -> float:
    """The multiple of `want` that `delta` (a merged DiT minus its base, rounded to the DiT's dtype) is."""
    return ((delta * want).sum() / (want * want).sum()).item()


def lora_update(weights, key="double_blocks_0_img_attn_qkv") -> torch.Tensor:
    name = f"lora_unet_{key}"
    down, up = weights[f"{name}.lora_down.weight"].float(), weights[f"{name}.lora_up.weight"].float()
    return up @ down * (float(weights[f"{name}.alpha"]) / down.shape[0])


def test_merge_lora_applies_a_lora_given_with_its_companion_once(pair, tmp_path, capsys, caplog):
    folder, dit, weights = pair
    loras = sorted(folder.glob("mine*.safetensors"))  # what out/mine*.safetensors gives: the companion first
    assert [p.name for p in loras] == ["mine.comfyui.safetensors", "mine.safetensors"]
    with caplog.at_level(logging.WARNING):
        delta, stdout = merged_update(tmp_path, dit, loras, capsys)
    assert applied(delta["double_blocks.0.img_attn_qkv.weight"], lora_update(weights)) == pytest.approx(1, abs=0.01)
    assert "mine.comfyui.safetensors is the .comfyui companion of" in caplog.text and "applied once" in caplog.text
    assert "merged 1 LoRA file(s)" in stdout


def test_a_companion_renamed_is_found_by_its_metadata(pair, tmp_path, capsys, caplog):
    folder, dit, weights = pair
    kohya, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for src, dst, companion in ((folder / "mine.safetensors", kohya, other.name), (folder / "mine.comfyui.safetensors", other, kohya.name)):
        tensors, naming = load_file(str(src)), "other" if "comfyui" in src.name else "kohya"
        save_file(tensors, str(dst), metadata=with_naming({"musubi_tuner.version": "1"}, naming, companion))
    with caplog.at_level(logging.WARNING):
        delta, _ = merged_update(tmp_path, dit, [kohya, other], capsys)
    assert applied(delta["double_blocks.0.img_attn_qkv.weight"], lora_update(weights)) == pytest.approx(1, abs=0.01)
    assert f"{other} is the .comfyui companion of {kohya}" in caplog.text


def test_generation_and_base_weights_apply_a_lora_given_with_its_companion_once(pair, caplog):
    """merge_loras_into: what generation's --lora_weight and training's --base_weights merge with."""
    from musubi_tuner.demo.tiny_dit import tiny_dit_config

    folder, dit, weights = pair
    model = HunyuanVideoDiT(tiny_dit_config())
    model.load_state_dict(load_file(str(dit)))
    # (in both orders: a glob lists mine.comfyui.safetensors first, and the one value, given for the first file, is the
    # LoRA's, not 0.5 for one file and 1.0, as musubi-tuner reads a short list, for its copy)
    for files in (["mine.safetensors", "mine.comfyui.safetensors"], ["mine.comfyui.safetensors", "mine.safetensors"]):
        model.load_state_dict(load_file(str(dit)))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            merge_loras_into(model, [str(folder / name) for name in files], [0.5])
        delta = model.double_blocks[0].img_attn_qkv.weight.detach() - load_file(str(dit))["double_blocks.0.img_attn_qkv.weight"]
        assert applied(delta.float(), lora_update(weights)) == pytest.approx(0.5, abs=0.01)
        # said by the commands' checks before the work (lora_jobs(say=True)), not again by the merge (fuzz_ap 9)
        assert "left out" not in caplog.text
        lora_jobs([str(folder / name) for name in files], [0.5], say=True)
        assert "left out, so the LoRA is applied once" in caplog.text
    caplog.clear()  # given twice beside its companion: applied twice, and the companion's warning says so (fuzz_au 9)
    with caplog.at_level(logging.WARNING):
        lora_jobs([str(folder / name) for name in ("mine.safetensors", "mine.safetensors", "mine.comfyui.safetensors")], [0.5], say=True)
    assert "it is applied twice to the same blocks" in caplog.text
    assert f"left out, so the LoRA is applied as often as {folder / 'mine.safetensors'} is given (2 times)" in caplog.text


def test_a_file_named_as_the_companion_that_is_another_lora_is_applied_too_and_not_recommended(pair, tmp_path, capsys, caplog):
    """The name alone made a pair: another LoRA saved as mine.comfyui.safetensors was left out of a merge ("applied once")
    though the user gave it, and the doctor recommended it to ComfyUI users as this LoRA's copy; one holding NaN too."""
    from musubi_tuner import lora_doctor

    folder, dit, weights = pair
    ours = {"musubi_tuner.version": "1"}  # (the metadata our trainer writes: the doctor reads the companion's name there)
    save_file(weights, str(tmp_path / "mine.safetensors"), metadata=with_naming(ours, "kohya", "mine.comfyui.safetensors"))
    companion = tmp_path / "mine.comfyui.safetensors"
    tensors = load_file(str(folder / "mine.comfyui.safetensors"))
    save_file(tensors, str(companion), metadata=with_naming(ours, "other", "mine.safetensors"))
    status, out, _ = run_main(lora_doctor.main, [tmp_path / "mine.safetensors", "--for", "comfyui"], capsys)
    assert "mine.comfyui.safetensors  (" in out, out  # the real pair: recommended
    other = {k: v.flip(0) if k.endswith("lora_B.weight") else v for k, v in tensors.items()}  # another update, same shapes
    save_file(other, str(companion), metadata=with_naming(ours, "other", "mine.safetensors"))
    with caplog.at_level(logging.WARNING):
        delta, stdout = merged_update(tmp_path, dit, [tmp_path / "mine.safetensors", companion], capsys)
    assert "merged 2 LoRA file(s)" in stdout and "but change the DiT differently: both are used" in caplog.text
    assert applied(delta["double_blocks.0.img_attn_qkv.weight"], lora_update(weights)) != pytest.approx(1, abs=0.01)
    status, out, _ = run_main(lora_doctor.main, [tmp_path / "mine.safetensors", "--for", "comfyui"], capsys)
    assert "mine.comfyui.safetensors  (" not in out and "changes the DiT differently from mine.safetensors" in out, out
    b_key = next(k for k in tensors if k.endswith("lora_B.weight"))
    save_file({**tensors, b_key: torch.full_like(tensors[b_key], float("nan"))}, str(companion),
              metadata=with_naming(ours, "other", "mine.safetensors"))
    status, out, _ = run_main(lora_doctor.main, [tmp_path / "mine.safetensors", "--for", "comfyui"], capsys)
    assert "mine.comfyui.safetensors  (" not in out and "holds NaN or infinite values" in out, out


def test_a_companion_given_another_multiplier_is_refused(pair, tmp_path, capsys):
    folder, dit, _ = pair
    status, _, err = run_main(merge_lora.main, ["--dit", dit, "--device", "cpu", "--lora_weight", folder / "mine.safetensors",
                                                folder / "mine.comfyui.safetensors", "--lora_multiplier", "1", "0.5",
                                                "--save_merged_model", tmp_path / "m.safetensors"], capsys)
    assert status == 2
    assert "mine.comfyui.safetensors is the .comfyui companion of" in err and "give one of the two files" in err
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------------------------- post-hoc EMA


KEY = "lora_unet_double_blocks_0_img_attn_qkv"


def save_checkpoint(path, step: int, seed: int, session="7", **extra) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"{KEY}.lora_down.weight": torch.randn(4, 16, generator=g), f"{KEY}.lora_up.weight": torch.randn(32, 4, generator=g),
          f"{KEY}.alpha": torch.tensor(2.0)}
    save_file(sd, str(path), metadata={"ss_session_id": session, "ss_steps": str(step), **extra})
    os.utime(path, (1_000_000 + step, 1_000_000 + step))
    return sd


def test_post_hoc_ema_leaves_out_an_earlier_result_and_the_final_lora(tmp_path, capsys, caplog):
    a = save_checkpoint(tmp_path / "run-step00000010.safetensors", 10, 0)
    b = save_checkpoint(tmp_path / "run-step00000020.safetensors", 20, 1)
    final = tmp_path / "run.safetensors"  # the run's final LoRA, saved after the last step's checkpoint: the same weights
    save_file(load_file(str(tmp_path / "run-step00000020.safetensors")), str(final), metadata={"ss_session_id": "7", "ss_steps": "20"})
    os.utime(final, (1_000_021, 1_000_021))
    first = tmp_path / "run-step-ema.safetensors"
    assert run_main(lora_post_hoc_ema.main, [*sorted(tmp_path.glob("run-step*.safetensors")), "--beta", "0.5",
                                             "--output_file", first], capsys)[0] == 0
    os.utime(first, (1_000_100, 1_000_100))  # newer than every checkpoint
    out = tmp_path / "ema2.safetensors"
    with caplog.at_level(logging.WARNING):
        status, stdout, err = run_main(lora_post_hoc_ema.main, [*sorted(tmp_path.glob("run*.safetensors")), "--beta", "0.9",
                                                                "--output_file", out], capsys)
    assert status == 0, err
    got = load_file(str(out))
    for k in (f"{KEY}.lora_down.weight", f"{KEY}.lora_up.weight"):
        assert torch.allclose(got[k], 0.9 * a[k] + 0.1 * b[k], atol=1e-6)
    assert "2 checkpoints" in stdout
    assert f"{first} is itself a post-hoc EMA result" in caplog.text
    assert f"{final} was saved at step 20 of the same run as run-step00000020.safetensors" in caplog.text


def test_post_hoc_ema_of_nothing_but_earlier_results_is_one_error(tmp_path, capsys):
    save_checkpoint(tmp_path / "s1.safetensors", 1, 0)
    save_checkpoint(tmp_path / "s2.safetensors", 2, 1)
    ema = tmp_path / "ema.safetensors"
    assert run_main(lora_post_hoc_ema.main, [tmp_path / "s1.safetensors", tmp_path / "s2.safetensors", "--output_file", ema], capsys)[0] == 0
    status, _, err = run_main(lora_post_hoc_ema.main, [ema, "--output_file", tmp_path / "again.safetensors"], capsys)
    assert status == 2 and err.startswith("error: ") and "no checkpoint to average" in err


# ----------------------------------------------------------------------------------------------- PEFT's scales


TARGETS = ["double_blocks.0.img_attn_qkv", "double_blocks.0.img_attn_proj", "double_blocks.1.txt_mlp.fc1", "single_blocks.0.linear2"]


def peft_adapter(dit_file, folder, r, lora_alpha, **options):
    """A PEFT LoRA on some of the tiny DiT's official Linears (TARGETS), saved as diffusion-pipe saves it, with PEFT's
    merge and its own scale of each module (tests/foreign_loras.diffusion_pipe_adapter)."""
    from musubi_tuner.demo.tiny_dit import tiny_dit_config

    model = HunyuanVideoDiT(tiny_dit_config())
    model.load_state_dict(load_file(str(dit_file)))
    return diffusion_pipe_adapter(model, folder, rank=r, lora_alpha=lora_alpha, targets=TARGETS, **options)


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, use_rslora=True),
    dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"linear2": 2}, alpha_pattern={"img_attn_proj": 3}),
])
def test_rslora_adapter_merges_at_pefts_scale(pair, tmp_path, capsys, config):
    """The merged update of each module is PEFT's scale (lora_alpha / sqrt(r), per module with the patterns) times B @ A."""
    _, dit, _ = pair
    adapter = peft_adapter(dit, tmp_path / "adapter", **config)
    delta, _ = merged_update(tmp_path, dit, [adapter.path], capsys)
    for module, scale in adapter.scales.items():
        r = config.get("rank_pattern", {}).get(module.rsplit(".", 1)[1], config["r"])
        alpha = next((a for k, a in config.get("alpha_pattern", {}).items() if module.endswith(k)), config["lora_alpha"])
        assert scale == pytest.approx(alpha / math.sqrt(r))  # PEFT's formula, by PEFT
        ba = adapter.expected[f"{module}.weight"] / scale  # B @ A: PEFT's merge adds scale * B @ A
        assert applied(delta[f"{module}.weight"], ba) == pytest.approx(scale, rel=0.01), module


def test_rslora_in_diffusers_metadata_and_convert_keep_pefts_scale(pair, tmp_path, capsys):
    """The same scale from diffusers' lora_adapter_metadata; convert_lora writes it into the kohya .alpha."""
    _, dit, _ = pair
    path = peft_adapter(dit, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True).path
    meta = {f"transformer.{k}": v for k, v in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()).items()}
    alone = tmp_path / "rslora.safetensors"
    save_file(load_file(str(path)), str(alone), metadata={"lora_adapter_metadata": json.dumps(meta)})
    kohya = tmp_path / "kohya.safetensors"
    assert run_main(convert_lora.main, ["--input", alone, "--output", kohya, "--target", "default"], capsys)[0] == 0
    assert float(load_file(str(kohya))["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == pytest.approx(8 * math.sqrt(4))
    assert torch.allclose(merged_update(tmp_path, dit, [alone], capsys)[0]["double_blocks.0.img_attn_proj.weight"],
                          merged_update(tmp_path, dit, [path], capsys)[0]["double_blocks.0.img_attn_proj.weight"])


def test_a_renamed_peft_adapter_reads_the_config_beside_it_and_one_without_is_said(pair, tmp_path, capsys, caplog):
    """fuzz_an 6: an adapter in PEFT's own layout (base_model.model.*, its lora_alpha only in adapter_config.json),
    renamed, was applied at alpha = rank without a word, its config beside it or not (every update 0.83 off)."""
    import shutil

    _, dit, _ = pair
    adapter = peft_adapter(dit, tmp_path / "adapter", r=4, lora_alpha=6, use_rslora=True)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    one_name = {m: official_to_diffusers(m)[0] for m in adapter.scales if len(official_to_diffusers(m)) == 1}  # (not q/k/v)
    layout = {}  # as PEFT saves an adapter of diffusers' transformer: base_model.model.<diffusers' name>.lora_A.weight
    for key, value in load_file(str(adapter.path)).items():
        module, tail = key.removeprefix("diffusion_model.").rsplit(".lora_", 1)
        if module in one_name:
            layout[f"base_model.model.{one_name[module]}.lora_{tail}"] = value
    save_file(layout, str(renamed / "my_lora.safetensors"))
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", renamed)
    delta, _ = merged_update(tmp_path, dit, [renamed / "my_lora.safetensors"], capsys)
    for module in one_name:
        scale = adapter.scales[module]
        ba = adapter.expected[f"{module}.weight"] / scale
        assert applied(delta[f"{module}.weight"], ba) == pytest.approx(scale, rel=0.01), module  # PEFT's 6 / sqrt(4)
    from musubi_tuner import lora_doctor

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_main(lora_doctor.main, [renamed / "my_lora.safetensors"], capsys)
    assert "there is none beside it" not in caplog.text  # (said of its tensors alone by the doctor: fuzz_aw 11)
    (renamed / "adapter_config.json").unlink()
    delta, _ = merged_update(tmp_path, dit, [renamed / "my_lora.safetensors"], capsys)
    module = next(iter(one_name))
    assert applied(delta[f"{module}.weight"], adapter.expected[f"{module}.weight"] / adapter.scales[module]) == pytest.approx(1, rel=0.01)
    assert (f"{renamed / 'my_lora.safetensors'}: PEFT's layout (base_model.model....), whose lora_alpha is kept in "
            "adapter_config.json, and there is none beside it: applied at alpha = rank (scale 1)") in caplog.text


# PEFT LoHa / LoKr adapters of diffusers' transformer, as save_pretrained writes them: base_model.model.<diffusers module>
# .<factor> (no alpha in the file) + adapter_config.json; diffusers module -> (official parameter, (out, in))
PEFT_LYCORIS_MODULES = {"transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn_proj.weight", (64, 64)),
                        "transformer_blocks.0.ff.net.2": ("double_blocks.0.img_mlp.fc2.weight", (64, 256)),
                        "norm_out.linear": ("final_layer.adaLN_modulation.1.weight", (128, 64))}
PEFT_LYCORIS = {
    "loha": {"peft_type": "LOHA", "r": 4, "alpha": 8, "alpha_pattern": {"net.2": 3}},
    "loha, rank_pattern": {"peft_type": "LOHA", "r": 4, "alpha": 8, "rank_pattern": {"to_out.0": 2}},
    "lokr, low-rank w2": {"peft_type": "LOKR", "r": 4, "alpha": 8, "rank_pattern": {"to_out.0": 2}, "alpha_pattern": {"net.2": 3}},
    "lokr, whole w2": {"peft_type": "LOKR", "r": 64, "alpha": 8, "rank_pattern": {"net.2": 16}},
    "lokr, w1_a/w1_b and whole w2": {"peft_type": "LOKR", "r": 2, "alpha": 6},
}


def peft_lycoris_adapter(folder, config) -> dict[str, torch.Tensor]:
    """The adapter folder, and PEFT's merge written out (LoHaLayer / LoKrLayer.get_delta_weight): scaling = alpha / r,
    alpha = alpha_pattern's else `alpha`, r = rank_pattern's else `r` (get_pattern_key: the pattern matches the end of
    the module's path); LoHa (w1_a @ w1_b) * (w2_a @ w2_b) * scaling, LoKr kron(w1, w2) * scaling; norm_out's update
    with its diffusers (scale, shift) halves put in the official (shift, scale) order."""
    import re

    g = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(shape, generator=g) * 0.3  # noqa: E731
    tensors, expected = {}, {}
    for module, (param, (out, inp)) in PEFT_LYCORIS_MODULES.items():
        pattern = lambda key, default: next((v for k, v in config.get(key, {}).items()  # noqa: E731
                                             if re.match(rf"(.*\.)?({k})$", module)), default)
        r, alpha = pattern("rank_pattern", config["r"]), pattern("alpha_pattern", config["alpha"])
        name = f"base_model.model.{module}"
        if config["peft_type"] == "LOHA":
            f = {"hada_w1_a": rand(out, r), "hada_w1_b": rand(r, inp), "hada_w2_a": rand(out, r), "hada_w2_b": rand(r, inp)}
            delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (alpha / r)
        else:
            f = {"lokr_w1_a": rand(4, r), "lokr_w1_b": rand(r, 8)} if config["r"] == 2 else {"lokr_w1": rand(4, 8)}
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            if r < 16 and "lokr_w1" in f:
                f.update(lokr_w2_a=rand(out // 4, r), lokr_w2_b=rand(r, inp // 8))
                w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
            else:
                w2 = f["lokr_w2"] = rand(out // 4, inp // 8)
            delta = torch.kron(w1, w2) * (alpha / r)
        tensors.update({f"{name}.{k}": v for k, v in f.items()})
        expected[param] = torch.cat(delta.chunk(2)[::-1]) if module == "norm_out.linear" else delta
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("kind", list(PEFT_LYCORIS))
def test_a_peft_loha_or_lokr_adapter_merges_to_pefts_own_merge(pair, tmp_path, capsys, caplog, kind):
    """fuzz_aw 7: PEFT's LoHa / LoKr keep their alpha as adapter_config.json's `alpha`, which was not read (0.5x, and 8x
    for a LoKr with a whole w2), and norm_out's halves were not exchanged for LoHa / LoKr (shift and scale swapped)."""
    _, dit, _ = pair
    expected = peft_lycoris_adapter(tmp_path / "adapter", PEFT_LYCORIS[kind])
    delta, _ = merged_update(tmp_path, dit, [tmp_path / "adapter" / "adapter_model.safetensors"], capsys)
    for param, want in expected.items():
        assert (delta[param] - want).norm() <= 0.01 * want.norm(), param  # (the merged DiT is bf16: 0.5 or more apart before)
    assert "applied at alpha = rank" not in caplog.text


def test_a_peft_lokr_without_its_config_is_said_to_be_applied_at_alpha_rank(pair, tmp_path, capsys, caplog):
    _, dit, _ = pair
    peft_lycoris_adapter(tmp_path / "adapter", PEFT_LYCORIS["lokr, low-rank w2"])
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    merged_update(tmp_path, dit, [tmp_path / "adapter" / "adapter_model.safetensors"], capsys)
    assert (f"{tmp_path / 'adapter' / 'adapter_model.safetensors'}: PEFT's layout (base_model.model....), whose alpha is kept "
            "in adapter_config.json, and there is none beside it: applied at alpha = rank (scale 1)") in caplog.text


def test_files_we_write_beside_a_peft_config_keep_the_adapters_scale(pair, tmp_path, capsys):
    """fuzz_aw 3: an adapter folder (diffusion-pipe's layout, lora_alpha 16 at r 4: scale 4). convert_lora's output
    written beside the adapter_config.json (scale folded into its factors) was scaled by it again (4x), and the post-hoc
    EMA of two epochs wrote the averaged factors without the scale (1/4)."""
    import shutil

    _, dit, _ = pair
    adapter = peft_adapter(dit, tmp_path / "epoch1", r=4, lora_alpha=16)
    shutil.copytree(tmp_path / "epoch1", tmp_path / "epoch2")
    converted = tmp_path / "epoch1" / "adapter_model.comfyui.safetensors"
    assert run_main(convert_lora.main, ["--input", adapter.path, "--output", converted, "--target", "other"], capsys)[0] == 0
    ema = tmp_path / "epoch2" / "adapter_model_ema.safetensors"
    status, _, err = run_main(lora_post_hoc_ema.main, [adapter.path, tmp_path / "epoch2" / "adapter_model.safetensors", "--no_sort",
                                                       "--output_file", ema], capsys)
    assert status == 0, err
    for lora in (adapter.path, converted, ema):
        delta, _ = merged_update(tmp_path, dit, [lora], capsys)
        for param, want in adapter.expected.items():
            assert applied(delta[param], want) == pytest.approx(1, rel=0.01), (lora.name, param)


BAD_CONFIGS = [
    ({"r": 4, "lora_alpha": "eight"}, 'lora_alpha = "eight" is not a number'),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": ["to_out.0"]}, "alpha_pattern is a JSON list, not an object"),
    ([1, 2], "a JSON list, not an object of PEFT's LoRA settings"),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"img_attn_proj(": 16}}, "alpha_pattern 'img_attn_proj(' is not a regular expression"),
    ({"r": 4, "lora_alpha": float("nan")}, "lora_alpha = nan is not a finite number"),
    ({"r": 4, "lora_alpha": float("inf")}, "lora_alpha = inf is not a finite number"),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"linear2": "x"}}, "alpha_pattern 'linear2' = \"x\" is not a number"),
    ({"r": 4, "lora_alpha": 8, "use_rslora": "yes"}, 'use_rslora = "yes" is not true or false'),
    # PEFT's scale 0 (the modules change nothing), where kohya's alpha 0 is the rank: it was applied at full strength
    ({"r": 4, "lora_alpha": 0}, "lora_alpha = 0: PEFT and diffusers apply these modules at scale 0"),
    ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"img_attn.proj": 0}}, "alpha_pattern 'img_attn.proj' = 0: PEFT and diffusers"),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS)
def test_a_peft_config_of_the_wrong_type_is_one_error_naming_file_and_key(pair, tmp_path, capsys, config, message):
    _, dit, weights = pair
    folder = tmp_path / "adapter"
    folder.mkdir()
    tensors = {"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(4, 64),
               "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(64, 4)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    status, _, err = run_main(merge_lora.main, ["--dit", dit, "--device", "cpu", "--lora_weight", folder / "adapter_model.safetensors",
                                                "--save_merged_model", tmp_path / "m.safetensors"], capsys)
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {folder / 'adapter_config.json'}: {message}"), err
    # the same config in diffusers' metadata: convert_lora writes nothing (a NaN .alpha once)
    meta = {f"transformer.{k}": v for k, v in config.items()} if isinstance(config, dict) else config
    alone, out = tmp_path / "meta.safetensors", tmp_path / "converted.safetensors"
    save_file(tensors, str(alone), metadata={"lora_adapter_metadata": json.dumps(meta)})
    status, _, err = run_main(convert_lora.main, ["--input", alone, "--output", out, "--target", "default"], capsys)
    assert status == 2 and err.startswith(f"error: {alone}: metadata lora_adapter_metadata: "), err
    assert (message.split()[0] in err) and not out.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_pair_is_one_lora_though_its_folded_copy_rounds_again(tmp_path, dtype):
    """fuzz_ad F3: a LoRA saved with --save_precision bf16 and its .comfyui copy (alpha folded into the factors, rounded
    again) were "named as one LoRA in two namings, but change the DiT differently": a layer's one random probe met a
    cancellation, 1.08 % apart for updates 0.2 % apart, and the documented glob out/NAME*.safetensors merged it twice."""
    from musubi_tuner.networks.lora_files import companion_copies

    for seed in range(3):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        _, weights, _ = tiny_dit_file_and_lora(folder, rank=4, alpha=0.37, generator=torch.Generator().manual_seed(seed))
        for key in [k for k in weights if k.endswith("lora_down.weight")]:  # (a direction of the input the update nearly
            down = weights[key].double()                                    # ignores, as a trained LoRA's may: a probe
            v = torch.randn(down.shape[1], generator=torch.Generator().manual_seed(down.shape[1]), dtype=torch.float64)  # along
            v /= v.norm()                                                   # it sees mostly rounding)
            weights[key] = (down - 0.999 * torch.outer(down @ v, v)).float()
        for out in lora_outputs({k: v.to(dtype) for k, v in weights.items()}, folder / "mine.safetensors"):
            save_file(out.tensors, str(out.path), metadata=with_naming({"ss_network_module": "networks.lora"}, out.naming, out.companion))
        files = [folder / "mine.comfyui.safetensors", folder / "mine.safetensors"]
        assert companion_copies(files) == {folder / "mine.comfyui.safetensors": folder / "mine.safetensors"}, seed
    # and another LoRA copied over a companion is still told apart (both used, as before)
    _, weights, _ = tiny_dit_file_and_lora(tmp_path, rank=4, alpha=0.37, generator=torch.Generator().manual_seed(99))
    (another,) = [out for out in lora_outputs({k: v.to(dtype) for k, v in weights.items()}, tmp_path / "x.safetensors")
                  if out.path.name.endswith(".comfyui.safetensors")]
    save_file(another.tensors, str(tmp_path / "seed0" / "mine.comfyui.safetensors"),
              metadata=with_naming({"ss_network_module": "networks.lora"}, another.naming, "mine.safetensors"))
    assert companion_copies([tmp_path / "seed0" / "mine.safetensors", tmp_path / "seed0" / "mine.comfyui.safetensors"]) == {}


def test_a_training_continued_from_the_comfyui_copy_is_the_one_continued_from_the_lora(pair, caplog):
    """fuzz_ad F11: the .comfyui copy holds alpha / rank folded into its factors; --network_weights took it at scale 1 and
    said "trained with alpha 4" (its rank) for a LoRA of alpha 2, and every step moved it otherwise. The copy's metadata
    keeps each module's [rank, alpha]: the network gets back the LoRA's factors and alpha."""
    from musubi_tuner.demo.tiny_dit import tiny_dit_config
    from musubi_tuner.networks import lora

    folder, _, weights = pair
    networks = {}
    for name in ("mine.safetensors", "mine.comfyui.safetensors"):
        network = lora.create_arch_network(1.0, 4, 2.0, None, None, HunyuanVideoDiT(tiny_dit_config()))
        with caplog.at_level(logging.WARNING):
            assert network.load_weights(str(folder / name))["alpha"] == 2.0
        networks[name] = network.state_dict()
    assert "trained with alpha" not in caplog.text
    kohya, copy = networks.values()
    assert kohya.keys() == copy.keys()
    for key in kohya:
        torch.testing.assert_close(copy[key].float(), kohya[key].float(), rtol=1e-5, atol=1e-7, msg=key)
