"""LoRAs for another model: a Flux.1 LoRA has HunyuanVideo's layer names and widths, so only its metadata tells. Every
command that applies or converts a LoRA refuses one whose metadata names another model family (one `error:` line
naming the file, the key and its value, exit 2, nothing written, before any model loads); HunyuanVideo's own values
(and free --metadata_arch names) are applied as ever; info and the doctor say what model the file is for. A LoRA
trained on a SkyReels I2V DiT (32 input channels) applied to a T2V DiT is applied with the doctor's warning."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import save_file

from musubi_tuner import convert_lora, hv_generate_video, hv_train_network, lora_doctor, lora_info, merge_lora
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.files import StateDictFile

from helpers import run_main, tiny_dit_file_and_lora

# (metadata, the key=value the error names, the model): what sd-scripts, musubi-tuner and ai-toolkit write
FOREIGN = [
    ({"ss_base_model_version": "flux1", "ss_sd_model_name": "flux1-dev.safetensors"}, "ss_base_model_version=flux1", "Flux"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "modelspec.architecture=flux-1-dev/lora", "Flux"),
    ({"ss_network_module": "networks.lora_flux"}, "ss_network_module=networks.lora_flux", "Flux"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "ss_base_model_version=sdxl_base_v1-0", "SDXL"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "modelspec.architecture=stable-diffusion-v1/lora", "Stable Diffusion 1/2"),
    ({"ss_network_module": "networks.lora_sd3"}, "ss_network_module=networks.lora_sd3", "Stable Diffusion 3"),
    ({"ss_base_model_version": "wan", "ss_network_module": "networks.lora_wan"}, "ss_base_model_version=wan", "Wan"),
]
# HunyuanVideo's own values (musubi-tuner's and this trainer's, a --metadata_arch of the user's choosing), and none
OURS = [{"ss_base_model_version": "hunyuan_video", "modelspec.architecture": "hunyuan-video/lora", "ss_network_module": "networks.lora",
         "ss_sd_model_name": "mp_rank_00_model_states.pt"},
        {"modelspec.architecture": "skyreels-v1-hunyuan-t2v/lora", "ss_network_module": "networks.lokr"},
        {"modelspec.architecture": "my-style/lora", "ss_network_module": "lycoris.kohya"}, {}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("foreign_models")
    dit, weights, _ = tiny_dit_file_and_lora(tmp)
    paths = {}
    for i, (meta, _, _) in enumerate(FOREIGN):
        paths[f"foreign{i}"] = tmp / f"foreign{i}.safetensors"
        save_file(weights, str(paths[f"foreign{i}"]), metadata=meta)
    for i, meta in enumerate(OURS):
        paths[f"ours{i}"] = tmp / f"ours{i}.safetensors"
        save_file(weights, str(paths[f"ours{i}"]), metadata=meta or None)
    paths["i2v"] = tmp / "i2v.safetensors"  # trained here on a SkyReels I2V DiT
    save_file(weights, str(paths["i2v"]), metadata={"musubi_tuner.version": "0.1", "musubi_tuner.base_model": "skyreels-i2v",
                                                    "musubi_tuner.in_channels": "32"})
    return tmp, dit, paths


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def expected_error(path, named: str, model: str) -> str:
    return f"error: {path}: a LoRA for {model} ({named}), not for HunyuanVideo"


@pytest.mark.parametrize("i", range(len(FOREIGN)))
def test_merge_refuses_another_models_lora_naming_the_file_and_key(files, capsys, tmp_path, i):
    _, dit, paths = files
    _, named, model = FOREIGN[i]
    out = tmp_path / "merged.safetensors"
    status, _, err = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", paths[f"foreign{i}"], "--save_merged_model", out,
                                                "--device", "cpu"], capsys)
    assert status == 2 and error_line(err).startswith(expected_error(paths[f"foreign{i}"], named, model))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("i", range(len(OURS)))
def test_hunyuan_video_metadata_and_free_arch_names_still_merge(files, capsys, tmp_path, i):
    _, dit, paths = files
    out = tmp_path / "merged.safetensors"
    status, stdout, err = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", paths[f"ours{i}"], "--save_merged_model", out,
                                                     "--device", "cpu"], capsys)
    assert status == 0 and "into 20 layers" in stdout and out.is_file(), err


@pytest.mark.parametrize("target", ["other", "default"])
def test_convert_refuses_another_models_lora(files, capsys, tmp_path, target):
    _, _, paths = files
    out = tmp_path / "o.safetensors"
    status, _, err = run_main(convert_lora.main, ["--input", paths["foreign0"], "--output", out, "--target", target], capsys)
    assert status == 2 and error_line(err).startswith(expected_error(paths["foreign0"], "ss_base_model_version=flux1", "Flux"))
    assert not out.exists()


@pytest.fixture(scope="module")
def generation_files(files, encoders_and_vae):
    tmp, _, _ = files
    config = tiny_dit_config()
    return {"dit": write_dit(tmp / "mp_rank_00_model_states.pt", random_dit_state_dict(config, seed=3, scale=0.05), config, "pt"),
            **encoders_and_vae}


def generation_argv(g, out, *flags):
    return ["--dit", g["dit"], "--vae", g["vae"], "--text_encoder1", g["te1"], "--text_encoder2", g["te2"], "--prompt", "a cat",
            "--video_size", "32", "32", "--video_length", "1", "--infer_steps", "1", "--seed", "1", "--output_type", "latent",
            "--save_path", out, *flags]


@pytest.mark.parametrize("fp8", [False, True])
def test_generation_refuses_another_models_lora_before_the_text_encoders_run(files, generation_files, capsys, tmp_path, monkeypatch, fp8):
    from musubi_tuner.hunyuan import text_encoders

    monkeypatch.setattr(text_encoders, "load_text_encoder1", lambda *a, **k: pytest.fail("a text encoder was loaded"))
    _, _, paths = files
    argv = generation_argv(generation_files, tmp_path / "out", "--lora_weight", paths["ours0"], paths["foreign1"],
                           *(["--fp8"] if fp8 else []))
    status, _, err = run_main(hv_generate_video.main, argv, capsys)
    assert status == 2 and error_line(err).startswith(expected_error(paths["foreign1"], "modelspec.architecture=flux-1-dev/lora", "Flux"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flag", ["--network_weights", "--base_weights"])
def test_training_refuses_another_models_lora_before_loading_anything(files, capsys, tmp_path, flag):
    _, dit, paths = files
    toml = tmp_path / "dataset.toml"
    toml.write_text("[general]\nresolution = [64, 64]\n")
    argv = ["--dit", dit, "--dataset_config", toml, "--sdpa", "--network_module", "networks.lora", "--output_dir", tmp_path / "out",
            "--output_name", "x", flag, paths["foreign2"]]
    status, _, err = run_main(hv_train_network.main, argv, capsys)
    assert status == 2 and error_line(err).startswith(expected_error(paths["foreign2"], "ss_network_module=networks.lora_flux", "Flux"))


def test_info_and_doctor_say_what_model_the_file_is_for(files, capsys):
    """Not "base guessed from ss_sd_model_name: hunyuan-video-t2v" from flux1-dev.safetensors."""
    _, dit, paths = files
    status, out, _ = run_main(lora_info.main, [paths["foreign0"]], capsys)
    assert status == 0 and "Flux (ss_base_model_version=flux1): a LoRA of another model, not HunyuanVideo" in out
    assert "hunyuan-video-t2v" not in out
    status, out, _ = run_main(lora_doctor.main, [paths["foreign0"], "--dit", dit], capsys)
    assert status == 1 and "hunyuan-video-t2v (guessed" not in out
    assert "this toolkit refuses foreign0.safetensors: a LoRA for Flux (ss_base_model_version=flux1)" in out
    assert "it is a LoRA for Flux (ss_base_model_version=flux1), not for HunyuanVideo" in out
    assert "convert_lora.py" not in out  # no conversion makes a Flux LoRA a HunyuanVideo one
    status, out, _ = run_main(lora_doctor.main, [paths["ours0"], "--for", "ours"], capsys)
    assert status == 0 and "base guessed from ss_sd_model_name: hunyuan-video-t2v" in out


I2V_WARNING = "i2v.safetensors: trained on skyreels-i2v (32 input channels) but {} is hunyuan-video-t2v (16): the layers fit"


def test_merge_warns_about_an_i2v_lora_on_a_t2v_dit_as_the_doctor_does(files, capsys, tmp_path, caplog):
    _, dit, paths = files
    status, out, _ = run_main(lora_doctor.main, [paths["i2v"], "--dit", dit], capsys)
    doctor = next(line.removeprefix("  warning: ") for line in out.splitlines() if "warning: trained on" in line)
    out = tmp_path / "merged.safetensors"
    with caplog.at_level(logging.WARNING):
        status, _, _ = run_main(merge_lora.main, ["--dit", dit, "--lora_weight", paths["i2v"], "--save_merged_model", out,
                                                  "--device", "cpu"], capsys)
    assert status == 0 and out.is_file()
    assert f"{paths['i2v']}: {doctor}" in caplog.text and I2V_WARNING.format("dit.safetensors") in caplog.text
    caplog.clear()
    run_main(merge_lora.main, ["--dit", dit, "--lora_weight", paths["ours0"], "--save_merged_model", tmp_path / "m2.safetensors",
                               "--device", "cpu"], capsys)
    assert "trained on" not in caplog.text


def test_generation_warns_about_an_i2v_lora_on_a_t2v_dit(files, generation_files, capsys, tmp_path, caplog):
    _, _, paths = files
    with caplog.at_level(logging.WARNING):
        status, _, err = run_main(hv_generate_video.main, generation_argv(generation_files, tmp_path / "out", "--lora_weight", paths["i2v"]),
                                  capsys)
    assert status == 0, err
    assert caplog.text.count(I2V_WARNING.format("mp_rank_00_model_states.pt")) == 1
    assert StateDictFile(next((tmp_path / "out").iterdir()), what="latent").keys()


def test_a_t2v_img_in_lora_on_an_i2v_dit_is_named_for_what_it_is(files, capsys, tmp_path, caplog):
    """fuzz_aj 3: a T2V LoRA holding a convolution LoRA of img_in, given to the I2V DiT, was said to "fit" by the warning
    and then refused as "[64, 64] in the LoRA" (its flattened shape) from "another model size"."""
    import json

    import torch

    config = tiny_dit_config(in_channels=32)
    i2v = write_dit(tmp_path / "i2v_dit.safetensors", random_dit_state_dict(config), config)
    hidden, _, *kernel = random_dit_state_dict(config)["img_in.proj.weight"].shape
    lora = tmp_path / "t2v_img_in.safetensors"
    save_file({"lora_unet_img_in_proj.lora_down.weight": torch.randn(4, 16, *kernel) * 0.01,
               "lora_unet_img_in_proj.lora_up.weight": torch.randn(hidden, 4, 1, 1, 1) * 0.01,
               "lora_unet_img_in_proj.alpha": torch.tensor(4.0)}, str(lora),
              metadata={"musubi_tuner.version": "0.1", "musubi_tuner.base_model": "hunyuan-video-t2v", "musubi_tuner.in_channels": "16",
                        "musubi_tuner.lora_modules": json.dumps({"img_in.proj": [4, 4.0]})})
    misfit = (f"img_in.proj is {[hidden, 16, *kernel]} in the LoRA but {[hidden, 32, *kernel]} in i2v_dit.safetensors (an img_in "
              "LoRA of a text-to-video DiT (16 input channels) cannot apply to an image-to-video DiT (32))")
    with caplog.at_level(logging.WARNING):
        status, _, err = run_main(merge_lora.main, ["--dit", i2v, "--lora_weight", lora, "--save_merged_model",
                                                    tmp_path / "m.safetensors", "--device", "cpu"], capsys)
    assert status == 2 and error_line(err) == f"error: {lora}: {misfit.replace('i2v_dit.safetensors', str(i2v))}"
    assert "(32): its img_in layer cannot apply, and the LoRA learned another task" in caplog.text
    assert "the layers fit" not in caplog.text
    status, out, _ = run_main(lora_doctor.main, [lora, "--dit", i2v], capsys)
    assert status == 1 and misfit in out


def test_an_i2v_img_in_diff_on_a_t2v_dit_is_named_as_image_to_video(tmp_path, capsys):
    """fuzz_aw 4: a `.diff` of SkyReels I2V's img_in (32 channels) was blamed on "a 8-channel DiT (8 input channels)"
    (its shape divided by the kernel, as an adapter's is), "an text-to-video" DiT."""
    import torch

    config = tiny_dit_config()
    t2v = write_dit(tmp_path / "t2v_dit.safetensors", random_dit_state_dict(config), config)
    hidden, _, *kernel = random_dit_state_dict(config)["img_in.proj.weight"].shape
    lora = tmp_path / "i2v_img_in_diff.safetensors"
    save_file({"diffusion_model.img_in.proj.diff": torch.randn(hidden, 32, *kernel) * 0.01}, str(lora))
    status, _, err = run_main(merge_lora.main, ["--dit", t2v, "--lora_weight", lora, "--save_merged_model",
                                                tmp_path / "m.safetensors", "--device", "cpu"], capsys)
    assert status == 2 and error_line(err) == (
        f"error: {lora}: img_in.proj is {[hidden, 32, *kernel]} in the LoRA but {[hidden, 16, *kernel]} in {t2v} (an img_in "
        "LoRA of an image-to-video DiT (32 input channels) cannot apply to a text-to-video DiT (16))")
