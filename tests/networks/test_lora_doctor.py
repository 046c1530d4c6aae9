"""lora_doctor and lora_info: what they say about the files users have, and their exit status."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musubi_tuner import lora_doctor, lora_info
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import lora_outputs, save_lora
from musubi_tuner.networks.lora_metadata import LoRAFileInfo, lora_module_info
from musubi_tuner.training.metadata import finish_metadata

ROOT = Path(__file__).resolve().parents[2]


def trained_network(seed=0):
    model = HunyuanVideoDiT(tiny_dit_config())
    net = lora.create_arch_network(1.0, 4, 2, None, None, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, 0.1, generator=g)
    return net


def save_like_the_trainer(net, path, lora_format="both", in_channels=16, base="hunyuan-video-t2v"):
    """The files CheckpointSaver writes, with our metadata (what the trainer knows about its run)."""
    info = LoRAFileInfo(version="0.1.0", base_model=base, in_channels=in_channels, text_template="hunyuan-video",
                        modules=lora_module_info(net), resolutions=[(960, 544)], frames=[25, 45])
    for out in lora_outputs(net.state_dict_for_saving(), path, lora_format):
        meta = finish_metadata(info.to_metadata(), out.tensors, steps=10, epoch=1, spec={}, naming=out.naming, companion=out.companion)
        save_lora(out.tensors, out.path, meta)
    return Path(path)


def doctor(capsys, *argv):
    """(exit status, stdout) of `python -m musubi_tuner.lora_doctor ARGV`, run in this process."""
    with pytest.raises(SystemExit) as exit_:
        lora_doctor.main([str(a) for a in argv])
        sys.exit(0)
    return exit_.value.code or 0, capsys.readouterr().out


def test_metadata_round_trips_and_names_the_companion(tmp_path):
    net = trained_network()
    path = save_like_the_trainer(net, tmp_path / "mine.safetensors")
    _, meta = read_safetensors_header(path)
    info = LoRAFileInfo.from_metadata(meta)
    assert info == LoRAFileInfo(version="0.1.0", base_model="hunyuan-video-t2v", in_channels=16, text_template="hunyuan-video",
                                modules=lora_module_info(net), resolutions=[(960, 544)], frames=[25, 45], naming="kohya",
                                companion="mine.comfyui.safetensors", written_here=True)
    assert info.modules["double_blocks.1.txt_mlp.fc2"] == (4, 2.0)
    assert info.target_blocks == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    assert json.loads(meta["musubi_tuner.target_blocks"]) == info.target_blocks
    _, copy_meta = read_safetensors_header(tmp_path / "mine.comfyui.safetensors")
    copy = LoRAFileInfo.from_metadata(copy_meta)
    assert (copy.naming, copy.companion, copy.modules) == ("other", "mine.safetensors", info.modules)


def test_files_trained_elsewhere_tell_what_their_ss_keys_say():
    meta = {"ss_sd_model_name": "skyreels_hunyuan_i2v_bf16.safetensors",
            "ss_datasets": json.dumps([{"resolution": [544, 960], "target_frames": [1, 25]}, {"resolution": [512, 512], "image_directory": "x"}])}
    info = LoRAFileInfo.from_metadata(meta)
    assert (info.base_model, info.resolutions, info.frames, info.written_here) == ("skyreels-i2v", [(544, 960), (512, 512)], [1, 25], False)


def test_trainers_pair_loads_completely_in_every_consumer(tmp_path, capsys):
    path = save_like_the_trainer(trained_network(), tmp_path / "mine.safetensors")
    copy = tmp_path / "mine.comfyui.safetensors"
    for given, use in ((path, {"ours": path, "musubi": path, "comfyui": copy, "kijai": path, "kijai_blocks": copy}),
                       (copy, {"ours": copy, "musubi": path, "comfyui": copy, "kijai": copy, "kijai_blocks": copy})):
        status, out = doctor(capsys, given, "--json", "--for", *use)
        report = json.loads(out)
        assert status == 0 and report["ok"]
        for consumer, entry in report["consumers"].items():
            best = entry if entry["complete"] else entry["alternative"]
            assert best["complete"] and best["fraction"] == 1.0 and best["file"] == str(use[consumer]), consumer
            assert entry["use"] == use[consumer].name
    status, out = doctor(capsys, path, "--for", "comfyui", "kijai_blocks", "musubi")
    assert status == 0 and "ok: every consumer checked applies every weight" in out
    assert doctor(capsys, "--for", "comfyui", "kijai_blocks", "musubi", path) == (status, out)  # the usage's order
    assert re.search(r"ComfyUI +36/60 +60% +mine.comfyui.safetensors +\(40/40 keys applied there\)", out)
    assert "trained    on hunyuan-video-t2v (16 input channels), 960x544, frames 25, 45" in out  # the metadata, shown


def test_a_consumer_that_is_not_one_is_named(tmp_path, capsys):
    path = save_like_the_trainer(trained_network(), tmp_path / "mine.safetensors")
    for argv in ((path, "--for", "comfy"), ("--for", "comfy", "ours", path), ("--for", "ours")):
        with pytest.raises(SystemExit) as exit_:
            lora_doctor.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and ("--for: invalid choice: 'comfy'" in err if "comfy" in argv else "required: file" in err), err


def test_diffusers_is_told_by_the_files_real_width_and_a_demo_sized_lora_is_not_failed_for_it(tmp_path, capsys):
    """diffusers' converter splits single-block linear1 at 3072: at the tiny width (64) neither file loads, and the
    doctor says so (it once predicted a load from the released model's width). That is no fault of the file: every
    LoRA of the demo got the red "would not apply every weight of any of our outputs" (fuzz_ac 12); diffusers is "not
    checked" for it, and a released-size LoRA is checked (test_lora_consumers)."""
    path = save_like_the_trainer(trained_network(), tmp_path / "mine.safetensors")
    status, out = doctor(capsys, path, "--for", "diffusers")
    assert status == 0 and "ok: every consumer checked applies every weight" in out, out
    assert re.search(r"diffusers +refuses +not checked: another model size", out)
    assert ("diffusers is not checked: its HunyuanVideo converter is written for the released DiT's width of 3,072, and "
            "this LoRA is 64 wide (a test or demo model), with mine.comfyui.safetensors; a LoRA of the released model's size "
            "is") in out
    status, out = doctor(capsys, path, "--json")
    verdict = json.loads(out)["consumers"]["diffusers"]
    assert verdict["ok"] and verdict["other_size"].endswith("with mine.comfyui.safetensors") and verdict["fatal"]


def test_musubi_file_shows_the_double_block_mlp_weights_comfyui_drops(tmp_path, capsys):
    path = tmp_path / "from_musubi.safetensors"
    save_lora(trained_network().state_dict_for_saving(), path, {"ss_network_module": "networks.lora"})
    status, out = doctor(capsys, path, "--for", "comfyui")
    assert status == 1
    assert "ComfyUI drops 24 of 60 keys of from_musubi.safetensors" in out
    assert "lora_unet_double_blocks_1_txt_mlp_fc2 (.alpha .lora_down.weight .lora_up.weight): lora key not loaded" in out
    assert re.search(r"ComfyUI +36/60 +60% +convert_lora.py --target other +\(40/40 keys applied there\)", out)
    status, out = doctor(capsys, path, "--for", "musubi", "ours")
    assert status == 0 and "ComfyUI" not in out


def test_dit_of_another_kind_warns_and_another_size_fails(tmp_path, capsys):
    i2v_lora = save_like_the_trainer(trained_network(), tmp_path / "i2v.safetensors", "musubi", in_channels=32, base="skyreels-i2v")
    t2v = tiny_dit_config()
    dit = write_dit(tmp_path / "t2v.safetensors", random_dit_state_dict(t2v), t2v)
    status, out = doctor(capsys, i2v_lora, "--for", "ours", "musubi", "--dit", dit)
    assert status == 0  # everything applies; the warning is for the user to judge
    assert "warning: trained on skyreels-i2v (32 input channels) but t2v.safetensors is hunyuan-video-t2v (16)" in out
    wide = tiny_dit_config(hidden_size=128, heads_num=4, mlp_hidden_size=512)
    big = write_dit(tmp_path / "wide.safetensors", random_dit_state_dict(wide), wide)
    status, out = doctor(capsys, i2v_lora, "--for", "ours", "--dit", big)
    assert status == 1 and "20 layers do not fit wide.safetensors" in out


def test_unreadable_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    r = subprocess.run([sys.executable, "-m", "musubi_tuner.lora_doctor", str(bad)], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_lora_info_shows_naming_ranks_modules_norms_and_settings(tmp_path, capsys):
    path = save_like_the_trainer(trained_network(), tmp_path / "mine.safetensors")
    lora_info.main([str(tmp_path / "mine.comfyui.safetensors")])
    out = capsys.readouterr().out
    assert "naming     diffusion_model.* lora_A/lora_B" in out
    assert "modules    20 in 4 blocks, rank 4, alpha 2 (folded into the weights)" in out
    assert "double_blocks 0-1: img_attn_proj img_attn_qkv img_mlp.fc1 img_mlp.fc2 txt_attn_proj txt_attn_qkv txt_mlp.fc1 txt_mlp.fc2" in out
    assert "single_blocks.1" in out and "ss_steps" in out
    lora_info.main([str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    kohya_norms = report["block_norms"]
    lora_info.main([str(tmp_path / "mine.comfyui.safetensors"), "--json"])
    assert json.loads(capsys.readouterr().out)["block_norms"] == pytest.approx(kohya_norms)  # same update in either naming
    assert report["info"]["resolutions"] == [[960, 544]] and report["ranks"] == [4]
    # the same file carrying a PEFT lora_alpha: that alpha is applied (scale 8 / 4), not the metadata's folded 2
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    companion = tmp_path / "mine.comfyui.safetensors"
    with safe_open(str(companion), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(companion)), str(tmp_path / "peft.safetensors"), metadata={**meta, "lora_adapter_metadata": '{"lora_alpha": 8}'})
    lora_info.main([str(tmp_path / "peft.safetensors")])
    assert "modules    20 in 4 blocks, rank 4, alpha 8\n" in capsys.readouterr().out

