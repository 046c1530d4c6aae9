"""Tiny files the LoRA tests share."""

import pytest

from musubi_tuner.demo.tiny_text_encoders import write_tiny_clip_folder, write_tiny_llm_folder
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae


@pytest.fixture(scope="module")
def encoders_and_vae(tmp_path_factory):
    """What hv_generate_video needs besides a DiT: the tiny VAE and both text encoders, in the official layouts."""
    tmp = tmp_path_factory.mktemp("encoders")
    return {"vae": write_vae(tmp / "pytorch_model.pt", random_vae_state_dict(TINY_VAE, seed=0)),
            "te1": write_tiny_llm_folder(tmp / "text_encoder"), "te2": write_tiny_clip_folder(tmp / "text_encoder_2")}
