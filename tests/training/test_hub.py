"""The Hugging Face Hub flags: a run uploads its LoRAs and states, another machine resumes from them.

Against tests/hub_server.py, a local server speaking the endpoints huggingface_hub uses (HF_ENDPOINT points there).
The run trains a LoKr, so the same run shows networks.lokr trained by the loop and saved with musubi-tuner's names.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_cached_dataset
from hub_server import HubServer
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.errors import UserError
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.training.args import parse_args
from musubi_tuner.training.loop import train

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def run(hub, tmp_path_factory):
    """A LoKr run of 2 steps that saves and uploads every step, with its state, in the background."""
    root = tmp_path_factory.mktemp("hub")
    config = tiny_dit_config()
    dit = write_dit(root / "dit.safetensors", random_dit_state_dict(config, seed=0), config)
    toml = write_cached_dataset(root / "data", items=2, frames=1, size=(32, 32))
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_ENDPOINT", hub.url)
    patch.setenv("HF_HOME", str(root / "hf_home"))

    def argv(out, *extra):
        return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lokr", "--network_dim", "2",
                "--network_alpha", "1", "--network_args", "factor=4", "--learning_rate", "1e-2", "--optimizer_type", "adamw",
                "--seed", "7", "--dit_dtype", "float32", "--max_data_loader_n_workers", "0", "--output_dir", str(out),
                "--output_name", "tiny", "--max_train_steps", "2", "--huggingface_repo_id", "me/tiny-lokr", "--huggingface_token",
                TOKEN, *extra]

    out = root / "first"
    train(parse_args(argv(out, "--save_every_n_steps", "1", "--save_state", "--save_state_to_huggingface",
                          "--huggingface_path_in_repo", "runs", "--async_upload")))
    yield root, out, argv
    patch.undo()


def test_every_save_and_state_is_uploaded_to_a_private_repository(hub, run):
    root, out, _ = run
    files = hub.files("me/tiny-lokr")
    for stem in ("tiny-step00000001", "tiny-step00000002", "tiny"):
        for suffix in (".safetensors", ".comfyui.safetensors"):
            assert files[f"runs/{stem}{suffix}"] == (out / f"{stem}{suffix}").read_bytes()
        state = out / f"{stem}-state"
        assert {f"runs/{stem}-state/{p.name}" for p in state.iterdir()} <= set(files)
    assert hub.repos[("model", "me/tiny-lokr")].private and not hub.unknown


def test_the_lokr_file_has_musubi_tuners_names_and_metadata(run):
    root, out, _ = run
    weights = load_file(str(out / "tiny.safetensors"))
    # 64 = 4 x 16 with factor=4; qkv 192 = 4 x 48: w1 (4, 4), w2_a (48, 2), w2_b (2, 16)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert {k: tuple(v.shape) for k, v in weights.items() if k.startswith(qkv + ".")} == {
        f"{qkv}.lokr_w1": (4, 4), f"{qkv}.lokr_w2_a": (48, 2), f"{qkv}.lokr_w2_b": (2, 16), f"{qkv}.alpha": ()}
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lokr_w2_b"))  # it learned
    _, meta = read_safetensors_header(out / "tiny.safetensors")
    assert meta["ss_network_module"] == "networks.lokr" and json.loads(meta["ss_network_args"]) == {"factor": "4"}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("2", "1.0", "2")
    other = load_file(str(out / "tiny.comfyui.safetensors"))
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lokr_w2_a" in other and len(other) == len(weights)


def test_the_doctor_sends_each_consumer_to_the_file_it_reads(run):
    from musubi_tuner.networks.lora_doctor import diagnose

    root, out, _ = run
    verdicts = {v.consumer: v for v in diagnose(out / "tiny.safetensors", ("ours", "musubi", "comfyui", "kijai")).verdicts}
    assert verdicts["ours"].coverage.complete and verdicts["kijai"].coverage.complete
    assert verdicts["comfyui"].ok and verdicts["comfyui"].alternative[0].endswith("tiny.comfyui.safetensors")
    assert not verdicts["musubi"].ok and "--lycoris" in next(iter(verdicts["musubi"].coverage.dropped.values()))


def test_a_run_resumed_from_the_hub_ends_where_the_uninterrupted_one_did(hub, run, tmp_path, caplog):
    root, out, argv = run
    resumed = tmp_path / "second"
    with caplog.at_level(logging.INFO, logger="musubi_tuner"):
        train(parse_args(argv(resumed, "--resume", "me/tiny-lokr/runs/tiny-step00000001-state", "--resume_from_huggingface")))
    assert "tiny-step00000001-state at step 1 " in caplog.text  # resumed (training from scratch would end alike)
    assert any(r.startswith("GET /me/tiny-lokr/resolve/") and r.endswith("tiny-step00000001-state/network.safetensors")
               for r in hub.requests)
    want, got = load_file(str(out / "tiny.safetensors")), load_file(str(resumed / "tiny.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_hub_errors_are_one_line_before_training(run, tmp_path):
    root, out, argv = run
    with pytest.raises(UserError, match="me/tiny-lokr has no files under runs/nothing-state"):
        train(parse_args(argv(tmp_path / "a", "--resume", "me/tiny-lokr/runs/nothing-state", "--resume_from_huggingface")))
    bad_token = [a if a != TOKEN else "wrong" for a in argv(tmp_path / "b")]
    with pytest.raises(UserError, match="--huggingface_repo_id me/tiny-lokr: cannot create or reach the repository: .*401"):
        train(parse_args(bad_token))
    assert not (tmp_path / "b" / "tiny.safetensors").exists()
