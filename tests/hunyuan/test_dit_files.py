"""Every DiT file users own loads, to the same numbers; a wrong or broken file gets one line naming it."""

import os
import pickle
import shutil

import pytest
import torch

from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.errors import UserError
from musubi_tuner.files import StateDictFile, save_safetensors
from musubi_tuner.hunyuan.checkpoints import load_dit, save_dit
from helpers import dit_inputs as inputs


@pytest.fixture(scope="module")
def tiny():
    config = tiny_dit_config()
    return config, random_dit_state_dict(config, seed=11, scale=0.05)


def run(model, config, **kw):
    with torch.no_grad():
        return model(*inputs(config, **kw)).float()


def test_official_pt_and_bf16_safetensors_load_to_identical_outputs(tmp_path, tiny):
    config, sd = tiny
    pt = write_dit(tmp_path / "mp_rank_00_model_states.pt", sd, config, "pt")
    st = write_dit(tmp_path / "dit_bf16.safetensors", sd, config, "safetensors")
    a = load_dit(pt, dtype=torch.float32)
    b = load_dit(st, dtype=torch.float32)
    assert a.config == b.config == config
    assert torch.equal(run(a, config), run(b, config))
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_pt_file_holds_weights_under_module_like_the_official_one(tmp_path, tiny):
    config, sd = tiny
    pt = write_dit(tmp_path / "mp_rank_00_model_states.pt", sd, config, "pt")
    raw = torch.load(pt, weights_only=True)
    assert list(raw) == ["module"] and "double_blocks.0.img_attn_qkv.weight" in raw["module"]


def test_a_pt_file_whose_name_is_not_utf8_loads(tmp_path, tiny):
    """torch's zip reader takes a path as UTF-8: the file was called "not a readable PyTorch DiT checkpoint (truncated
    or a different format)", sending the user to download it again (fuzz_aa 3)."""
    config, sd = tiny
    pt = write_dit(tmp_path / "dit.pt", sd, config, "pt")
    latin1 = os.fsdecode(os.fsencode(tmp_path) + b"/dit\xff.pt")
    shutil.copy(pt, latin1)
    assert torch.equal(run(load_dit(latin1, dtype=torch.float32), config), run(load_dit(pt, dtype=torch.float32), config))


@pytest.mark.parametrize("fp8", [False, True])
def test_an_fp8_file_holding_a_nan_code_is_refused_naming_the_key(tmp_path, tiny, fp8):
    """e4m3fn has a NaN code (0x7F) and no isfinite: a damaged fp8 file was a NotImplementedError traceback (fuzz_y 12)."""
    config, sd = tiny
    path = write_dit(tmp_path / "dit_fp8.safetensors", sd, config, "fp8")
    f = StateDictFile(path)
    state = f.load_all()
    key = "double_blocks.0.img_attn_qkv.weight"
    raw = state[key].clone().view(torch.uint8)
    raw.view(-1)[0] = 0x7F
    state[key] = raw.view(state[key].dtype)
    save_safetensors(state, path, metadata=f.metadata)
    with pytest.raises(UserError, match=rf"dit_fp8\.safetensors: {key} holds NaN or infinite values: the file is damaged"):
        load_dit(path, dtype=torch.float32, fp8=fp8)


def test_fp16_and_fp8_files_load_close_to_the_bf16_file(tmp_path, tiny):
    config, sd = tiny
    ref = run(load_dit(write_dit(tmp_path / "a.safetensors", sd, config, "fp32"), dtype=torch.float32), config)
    fp16 = run(load_dit(write_dit(tmp_path / "b.safetensors", sd, config, "fp16"), dtype=torch.float32), config)
    fp8_model = load_dit(write_dit(tmp_path / "c.safetensors", sd, config, "fp8"), dtype=torch.float32)
    fp8 = run(fp8_model, config)
    assert ((fp16 - ref).norm() / ref.norm()) < 1e-3
    # a plain e4m3 cast of every tensor (the unofficial fp8 file) keeps ~2 significant digits
    assert ((fp8 - ref).norm() / ref.norm()) < 0.15


def test_skyreels_i2v_file_loads_with_32_channels_from_the_file_alone(tmp_path):
    config = tiny_dit_config(in_channels=32)
    path = write_dit(tmp_path / "skyreels_hunyuan_i2v_bf16.safetensors", random_dit_state_dict(config), config)
    model = load_dit(path, dtype=torch.float32)
    assert model.config.in_channels == 32
    assert load_dit(path, in_channels=32).config.in_channels == 32


def test_dit_in_channels_that_contradicts_the_file_names_both(tmp_path, tiny):
    config, sd = tiny
    path = write_dit(tmp_path / "t2v.safetensors", sd, config)
    with pytest.raises(UserError, match=r"t2v.safetensors.*--dit_in_channels 32.*16 input channels"):
        load_dit(path, in_channels=32)


def test_saved_merged_file_round_trips(tmp_path, tiny):
    config, sd = tiny
    model = load_dit(write_dit(tmp_path / "a.pt", sd, config, "pt"), dtype=torch.float32)
    out = save_dit(model.state_dict(), config, tmp_path / "merged.safetensors", dtype=torch.bfloat16)
    again = load_dit(out, dtype=torch.float32)
    assert torch.equal(run(model, config), run(again, config))


def test_comfyui_prefixed_keys_load(tmp_path, tiny):
    config, sd = tiny
    path = tmp_path / "comfy.safetensors"
    save_safetensors({f"model.diffusion_model.{k}": v for k, v in sd.items()}, path)
    assert load_dit(path, dtype=torch.float32).config == config


@pytest.mark.parametrize("prefix", ["model.model.", "model.diffusion_model.", ""])
def test_a_dit_in_comfyuis_layout_loads_as_the_official_one(tmp_path, tiny, prefix):
    """fuzz_an 4: ComfyUI's module names (img_attn.qkv, img_mlp.0, modulation.lin, norm.query_norm.scale), which
    diffusion-pipe reads under model.model., were refused as "not a HunyuanVideo DiT in the official layout"."""
    from musubi_tuner.networks.lora_naming import comfy_param

    config, sd = tiny
    comfy = {prefix + comfy_param(k): v for k, v in sd.items()}
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in {k.removeprefix(prefix) for k in comfy}  # (ComfyUI's names)
    assert len({k for k in comfy if k.removeprefix(prefix) not in sd}) > len(sd) // 2
    path = tmp_path / "comfy_layout.safetensors"
    save_safetensors(comfy, path)
    model = load_dit(path, dtype=torch.float32)
    assert all(torch.equal(v, sd[k].float()) for k, v in model.state_dict().items())


def test_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"nope.safetensors: DiT checkpoint not found \(--dit\)$"):  # (plan, merge_lora: fuzz_y 8)
        load_dit(tmp_path / "nope.safetensors")


def test_truncated_safetensors_is_reported_as_truncated(tmp_path, tiny):
    config, sd = tiny
    path = write_dit(tmp_path / "dit.safetensors", sd, config)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="dit.safetensors: file is truncated"):
        load_dit(path)
    path.write_bytes(data[:100])  # (cut inside its header: it was "not a safetensors file (header length ... does not fit")
    with pytest.raises(UserError, match=r"dit\.safetensors: file is truncated \(its header alone is [\d,]+ bytes, the file 100\); "
                                        r"download it again"):
        load_dit(path)


def test_truncated_pt_is_reported(tmp_path, tiny):
    config, sd = tiny
    path = write_dit(tmp_path / "dit.pt", sd, config, "pt")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="dit.pt: not a readable PyTorch DiT checkpoint"):
        load_dit(path)


def test_a_file_of_another_kind_is_named(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_safetensors({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64)}, lora)
    with pytest.raises(UserError, match=r"lora.safetensors: not a DiT: this is a LoRA file \(a LoRA goes to --lora_weight"):
        load_dit(lora)
    other = tmp_path / "other.safetensors"
    save_safetensors({"encoder.conv_in.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match=r"other.safetensors: not a DiT: this is a VAE \(pass it with --vae\)"):
        load_dit(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(UserError, match="junk.safetensors: not a safetensors file"):
        load_dit(junk)
    # (fuzz_y 8: a VAE under the `vae.` prefix --vae reads was "missing 'img_in.proj.weight'"; a text encoder had no hint)
    prefixed = tmp_path / "prefixed.safetensors"
    save_safetensors({"vae.decoder.up_blocks.0.conv.weight": torch.zeros(1)}, prefixed)
    with pytest.raises(UserError, match=r"prefixed.safetensors: not a DiT: this is a VAE \(pass it with --vae\)"):
        load_dit(prefixed)
    clip = tmp_path / "clip.safetensors"
    save_safetensors({"text_model.embeddings.token_embedding.weight": torch.zeros(1),
                      "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(1)}, clip)
    with pytest.raises(UserError, match=r"clip.safetensors: not a DiT: this is the CLIP-L text encoder \(pass it with --text_encoder2\)"):
        load_dit(clip)
    from musubi_tuner.hunyuan.vae import load_vae
    with pytest.raises(UserError, match=r"clip.safetensors: not a VAE: this is the CLIP-L text encoder \(pass it with --text_encoder2\)"):
        load_vae(clip)
    vae_pt = tmp_path / "vae_module.pt"
    torch.save({"module": {"encoder.conv_in.weight": torch.zeros(1)}}, vae_pt)  # (it was told to go to --dit)
    with pytest.raises(UserError, match=r"vae_module.pt: not a VAE checkpoint: its tensors sit under 'module' \(the tensors of a VAE "
                                        r"checkpoint are read at the top level or under 'state_dict'\); they look like a VAE"):
        load_vae(vae_pt)


def test_a_scaled_fp8_dit_is_named_as_one(tmp_path, tiny):
    """ComfyUI's scaled-fp8 layout (a scale_weight beside each fp8 weight) was "not a complete HunyuanVideo DiT: keys 36
    unexpected"; musubi-tuner does not read it either."""
    config, sd = tiny
    scaled = {k: v.to(torch.float8_e4m3fn) if k.startswith("double_blocks.") and k.endswith("qkv.weight") else v for k, v in sd.items()}
    scaled.update({k.removesuffix("weight") + "scale_weight": torch.ones(()) for k in sd if k.startswith("double_blocks.") and k.endswith("qkv.weight")})
    path = tmp_path / "dit_fp8_scaled.safetensors"
    save_safetensors({**scaled, "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(UserError, match=r"dit_fp8_scaled.safetensors: a scaled-fp8 DiT \(ComfyUI's layout: .*scale_weight, ...\), which is "
                                        r"not read, as in musubi-tuner: give the bf16 or plain fp8 file"):
        load_dit(path)


def tencent_fp8(folder, sd, with_map=True):
    """Tencent's FP8 release as its loader reads it: the block Linears' weights stored divided by a per-layer scale
    (max |W| / 448) in e4m3fn, under `module`; the scales, by module name, in NAME_map.pt beside it."""
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    with torch.device("meta"):
        linears = {name for name, m in HunyuanVideoDiT(tiny_dit_config()).named_modules()
                   if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))}
    stored, scales = dict(sd), {}
    for name in linears:
        weight = sd[f"{name}.weight"].float()
        scales[name] = weight.abs().max() / 448
        stored[f"{name}.weight"] = (weight / scales[name]).to(torch.float8_e4m3fn)
    path = folder / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": stored}, path)
    if with_map:
        torch.save(scales, folder / "mp_rank_00_model_states_fp8_map.pt")
    return path, stored, scales


def test_tencents_fp8_checkpoint_is_read_with_its_scales(tmp_path, tiny):
    """fuzz_an 5: mp_rank_00_model_states_fp8.pt was read as a plain fp8 cast, its _map.pt of per-layer scales never
    read: every block Linear at weight / scale, silently (100-1000x off at full size)."""
    config, sd = tiny
    path, stored, scales = tencent_fp8(tmp_path, sd)
    model = load_dit(path, dtype=torch.float32)
    for name, scale in scales.items():
        got = model.get_submodule(name).weight
        assert torch.equal(got, stored[f"{name}.weight"].float() * scale)  # as the official loader computes it
        assert (got - sd[f"{name}.weight"].float()).abs().max() <= 0.07 * sd[f"{name}.weight"].abs().max()  # fp8's rounding
    reference = load_dit(write_dit(tmp_path / "bf16.safetensors", sd, config), dtype=torch.float32)
    out, ref = run(model, config), run(reference, config)
    assert (out - ref).norm() / ref.norm() < 0.1
    fp8 = load_dit(path, dtype=torch.bfloat16, fp8=True)  # --fp8: requantized from the scaled weights
    assert (run(fp8, config) - ref).norm() / ref.norm() < 0.1
    (tmp_path / "mp_rank_00_model_states_fp8_map.pt").unlink()
    with pytest.raises(UserError, match=r"mp_rank_00_model_states_fp8\.pt: Tencent's FP8 checkpoint, whose weights are stored divided "
                                        r"by the per-layer scales of mp_rank_00_model_states_fp8_map\.pt, which is not beside it"):
        load_dit(path)
    torch.save({"double_blocks.9.img_attn_qkv": torch.tensor(1.0)}, tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    with pytest.raises(UserError, match=r"_fp8_map\.pt: scale of double_blocks\.9\.img_attn_qkv, a layer mp_rank_00_model_states_fp8"
                                        r"\.pt does not have"):
        load_dit(path)


def test_tencents_fp8_checkpoint_renamed_or_with_a_damaged_map_is_refused_and_merges_in_bf16(tmp_path, tiny):
    """fuzz_ba 3: renamed without its map (as hubs and download managers name files), it loaded as a plain fp8 cast, 100-1000x
    off without a word; a map that is a folder was "not beside it", a truncated one an OSError's words; and a merge wrote
    its block Linears in float32, twice a bf16 merge's size."""
    from safetensors import safe_open

    from helpers import tiny_dit_file_and_lora
    from musubi_tuner.networks.merge import merge_file

    config, sd = tiny
    path, stored, scales = tencent_fp8(tmp_path, sd)
    renamed = tmp_path / "hunyuan_video_720_e4m3fn.pt"
    shutil.copy(path, renamed)
    with pytest.raises(UserError, match=r"hunyuan_video_720_e4m3fn\.pt: Tencent's FP8 checkpoint, whose weights are stored "
                                        r"divided by the per-layer scales of hunyuan_video_720_e4m3fn_map\.pt, which is not beside it"):
        load_dit(renamed)
    plain = tmp_path / "plain_e4m3fn.pt"  # (a plain cast, of the weights' own few units, loads as it is)
    torch.save({"module": {k: v.to(torch.float8_e4m3fn) if k in stored and stored[k].dtype == torch.float8_e4m3fn else v
                           for k, v in sd.items()}}, plain)
    load_dit(plain, dtype=torch.float32)

    (tmp_path / "hunyuan_video_720_e4m3fn_map.pt").mkdir()
    with pytest.raises(UserError, match=r"hunyuan_video_720_e4m3fn_map\.pt: not a file, where hunyuan_video_720_e4m3fn\.pt's "
                                        r"FP8 scale map goes"):
        load_dit(renamed)
    (tmp_path / "hunyuan_video_720_e4m3fn_map.pt").rmdir()
    whole = (tmp_path / "mp_rank_00_model_states_fp8_map.pt").read_bytes()
    (tmp_path / "hunyuan_video_720_e4m3fn_map.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"hunyuan_video_720_e4m3fn_map\.pt: not a readable PyTorch FP8 scale map of "
                                        r"hunyuan_video_720_e4m3fn\.pt \(truncated"):
        load_dit(renamed)

    _, weights, _ = tiny_dit_file_and_lora(tmp_path / "lora")
    save_safetensors(weights, tmp_path / "lora.safetensors")
    merge_file(str(path), [str(tmp_path / "lora.safetensors")], [1.0], str(tmp_path / "merged.safetensors"))
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as merged:
        dtypes = {k: merged.get_slice(k).get_dtype() for k in merged.keys()}
    assert all(dtypes[f"{name}.weight"] == "BF16" for name in scales), {d for k, d in dtypes.items()}


def test_incomplete_dit_lists_missing_keys(tmp_path, tiny):
    config, sd = tiny
    partial = {k: v for k, v in sd.items() if k != "single_blocks.1.linear2.weight"}
    path = tmp_path / "partial.safetensors"
    save_safetensors(partial, path)
    with pytest.raises(UserError, match=r"partial.safetensors: not a complete HunyuanVideo DiT: keys 1 missing \(e.g. single_blocks.1.linear2.weight"):
        load_dit(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"module": _RunsCode()}, f)
    with pytest.raises(UserError, match="evil.pt: refused to load"):
        load_dit(path)
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_a_file_replaced_while_it_is_read_gives_the_version_opened_and_one_rewritten_in_place_is_refused(tmp_path):
    """Another run saving under the same name (a rename over the file) must not mix its tensors into what is being
    read (a merge streams its --dit tensor by tensor); a program rewriting the file in place is named, not read."""
    from musubi_tuner.files import StateDictFile

    path, other = tmp_path / "dit.safetensors", tmp_path / "new.safetensors"
    old = {"a": torch.zeros(64), "b": torch.zeros(64)}
    save_safetensors(old, path)
    save_safetensors({k: v + 1 for k, v in old.items()}, other)
    reader = StateDictFile(path)
    assert torch.equal(reader.read("a"), old["a"])
    os.replace(other, path)  # what an atomic save under this name does
    assert torch.equal(reader.read("b"), old["b"]) and torch.equal(reader.get("b"), old["b"])

    os.utime(path, (1e9, 1e9))  # (the clock's tick is coarser than this test: the rewrite must show in the mtime)
    reader = StateDictFile(path)
    reader.read("a")
    with open(path, "r+b") as f:  # rewritten in place, as cp or a non-atomic writer does
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(UserError, match=r"dit\.safetensors: changed while it was being read"):
        reader.read("b")


@pytest.mark.parametrize("rewrite", ["in-place", "truncated"])
def test_a_mapped_pt_file_rewritten_while_it_is_read_is_refused_not_read(tmp_path, rewrite):
    """fuzz_aq 11: a .pt DiT (the official format, memory-mapped) rewritten in place during a merge gave a wrong merged
    model whose LoRA was blamed, and one truncated killed the merge with SIGBUS and no message."""
    from musubi_tuner.files import StateDictFile

    path = tmp_path / "dit.pt"
    torch.save({"a": torch.zeros(4096), "b": torch.zeros(4096)}, path)
    os.utime(path, (1e9, 1e9))  # (the clock's tick is coarser than this test: the rewrite must show in the mtime)
    reader = StateDictFile(path)
    assert torch.equal(reader.get("a"), torch.zeros(4096))
    with open(path, "r+b") as f:
        if rewrite == "truncated":  # (as cp of a new download over it begins)
            f.truncate(0)
        else:  # other bytes in the tensors' place, the same size
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\x7f" * 4096)
    with pytest.raises(UserError, match=r"dit\.pt: changed while it was being read"):
        reader.get("b")


@pytest.mark.parametrize("damage, said", [
    ("final-8", "final_layer.linear gives 8 output channels"),
    ("final-32", "final_layer.linear gives 32 output channels"),
    ("patch-1", "img_in.proj has a patch of [1, 1, 1]"),
])
def test_a_dit_of_other_output_channels_or_patch_is_refused_before_any_work(tmp_path, damage, said):
    """fuzz_ba 1: a final layer or patch embedding of other shapes (a damaged tensor pair) made a model every header check
    passed: the plan, merge and the doctor went on, generation was a traceback at its first step, training blamed the
    caches."""
    from musubi_tuner.files import save_safetensors
    from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

    state = random_dit_state_dict(tiny_dit_config(), seed=1)
    if damage.startswith("final"):
        rows = int(damage.split("-")[1]) * 4  # (channels times the patch's 4 values)
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            state[key] = state[key][:rows].clone() if rows <= state[key].shape[0] else torch.cat([state[key]] * 2)
    else:
        state["img_in.proj.weight"] = state["img_in.proj.weight"][:, :, :, :1, :1].clone()
    path = tmp_path / "dit.safetensors"
    save_safetensors(state, path)
    with pytest.raises(UserError) as info:
        read_dit_config(open_dit_file(path))
    assert str(info.value) == (f"{path}: {said}; a HunyuanVideo DiT takes and gives the VAE's 16 latent channels, in patches "
                               "of [1, 2, 2] (a damaged file, or another model's)")


def test_a_dit_of_another_input_width_is_refused_naming_what_runs(tmp_path):
    """fuzz_aj 11: a DiT of 33 input channels (Tencent's HunyuanVideo-I2V) was read everywhere and ended in a
    convolution's traceback at the first step, after the text encoders had run."""
    from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

    config = tiny_dit_config(in_channels=33)
    path = write_dit(tmp_path / "hunyuan_video_i2v.safetensors", random_dit_state_dict(config, seed=1), config)
    with pytest.raises(UserError) as info:
        read_dit_config(open_dit_file(path))
    assert str(info.value) == (f"{path}: a DiT of 33 input channels: this toolkit runs HunyuanVideo T2V (16) and SkyReels V1 I2V "
                               "(32) (Tencent's HunyuanVideo-I2V, with 33, is another model)")
