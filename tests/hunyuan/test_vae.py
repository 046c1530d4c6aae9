"""The causal 3D VAE equals diffusers' AutoencoderKLHunyuanVideo, has the official layout, and loads the official files."""

import os
import pickle

import pytest
import torch

from diffusers_reference import diffusers_vae
from helpers import rel_err
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.vae import CausalVideoVAE, VAEConfig, latent_frames, load_vae
from musubi_tuner.hunyuan.vae_tiling import TilingOptions


@pytest.fixture(scope="module")
def weights():
    return random_vae_state_dict(TINY_VAE, seed=1, scale=0.05)


@pytest.fixture(scope="module")
def pair(weights):
    ours = CausalVideoVAE(TINY_VAE)
    ours.load_state_dict(weights)
    return ours.eval(), diffusers_vae(weights, TINY_VAE)


def pixels(frames, height, width, seed=0):
    return torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_full_size_vae_has_the_official_keys_shapes_and_parameter_count(manifest):
    with torch.device("meta"):
        model = CausalVideoVAE(VAEConfig())
    ref = manifest("vae_884_16c.json")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["keys"]
    assert sum(p.numel() for p in model.parameters()) == 246_478_803 == ref["params"]
    assert VAEConfig.from_shapes(ref["keys"]) == VAEConfig()


@pytest.mark.parametrize("frames,height,width", [(1, 32, 48), (5, 24, 40), (9, 16, 32)])
def test_encode_and_decode_equal_diffusers(pair, frames, height, width):
    ours, ref = pair
    x = pixels(frames, height, width)
    with torch.no_grad():
        got, want = ours.encode(x), ref.encode(x).latent_dist
        assert got.mean.shape == (1, 16, latent_frames(frames), height // 8, width // 8)
        assert rel_err(got.mean, want.mean) < 1e-5 and rel_err(got.logvar, want.logvar) < 1e-5
        z = torch.randn_like(got.mean)
        decoded = ours.decode(z)
        assert decoded.shape == x.shape
        assert rel_err(decoded, ref.decode(z).sample) < 1e-5


def test_posterior_sample_is_mean_plus_std_noise_and_seeded(pair):
    ours, _ = pair
    with torch.no_grad():
        post = ours.encode(pixels(1, 16, 16))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    assert post.logvar.max() <= 20 and post.logvar.min() >= -30


def test_chunked_causal_convolutions_equal_unchunked(pair):
    # Same arithmetic per output element; only the convolution algorithm oneDNN picks for the smaller
    # inputs may change the summation order, so equality is to float32 rounding, not bit for bit.
    # (A constant latent is no test input: its GroupNorm groups have zero variance and amplify rounding.)
    ours, _ = pair
    x = pixels(5, 32, 96)
    z = torch.randn(1, 16, 2, 4, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_enc, base_dec = ours.encode(x).mean, ours.decode(z)
        ours.set_memory_options(chunk_size=8)
        try:
            assert rel_err(ours.encode(x).mean, base_enc) < 1e-5
            assert rel_err(ours.decode(z), base_dec) < 1e-5
        finally:
            ours.set_memory_options()


def test_spatial_tiling_equals_the_reference_tiling(weights):
    ours = CausalVideoVAE(TINY_VAE)
    ours.load_state_dict(weights)
    ours.eval().set_memory_options(tiling=True, spatial_tile_sample_min_size=64)
    ref = diffusers_vae(weights, TINY_VAE)
    ref.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=48, tile_sample_stride_width=48)
    x = pixels(5, 80, 112)  # 2 x 2 tiles of 64 px, 48 apart
    with torch.no_grad():
        enc = ours.encode(x).mean
        assert rel_err(enc, ref.encode(x).latent_dist.mean) < 1e-5
        z = torch.randn(1, 16, 2, 10, 14, generator=torch.Generator().manual_seed(1))
        assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-5


def test_temporal_tiling_equals_the_reference_tiling(weights):
    ours = CausalVideoVAE(TINY_VAE)
    ours.load_state_dict(weights)
    ours.eval()
    ours.tiling = TilingOptions(spatial=False, temporal=True, tile_sample_frames=16)
    ref = diffusers_vae(weights, TINY_VAE)  # diffusers tiles in time above 16 frames, 12 apart
    x = pixels(25, 16, 16)
    with torch.no_grad():
        enc = ours.encode(x).mean
        assert enc.shape[2] == 7 and rel_err(enc, ref.encode(x).latent_dist.mean) < 1e-5
        assert rel_err(ours.decode(enc), ref.decode(enc).sample) < 1e-5


def test_tiling_leaves_inputs_that_fit_one_tile_untouched(pair):
    ours, _ = pair
    x = pixels(5, 32, 48)
    with torch.no_grad():
        base = ours.encode(x).mean
        ours.set_memory_options(tiling=True, spatial_tile_sample_min_size=64)
        try:
            assert torch.equal(ours.encode(x).mean, base)
        finally:
            ours.set_memory_options()


def test_tile_size_must_be_a_multiple_of_32(pair):
    ours, _ = pair
    with pytest.raises(UserError, match="multiple of 32"):
        ours.set_memory_options(spatial_tile_sample_min_size=100)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "pt_wrapped", "pt_prefixed"])
def test_every_vae_layout_loads_to_the_same_model(tmp_path, weights, pair, fmt):
    ours, _ = pair
    path = write_vae(tmp_path / f"vae.{'safetensors' if fmt == 'safetensors' else 'pt'}", weights, fmt)
    loaded = load_vae(path, dtype=torch.float32)
    assert loaded.config == TINY_VAE and not loaded.training
    x = pixels(1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, ours.encode(x).mean)


def test_wrong_files_are_named(tmp_path, weights):
    with pytest.raises(UserError, match="nope.pt: VAE checkpoint not found"):
        load_vae(tmp_path / "nope.pt")
    path = write_vae(tmp_path / "vae.pt", weights)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(UserError, match="vae.pt: not a readable PyTorch VAE checkpoint"):
        load_vae(path)
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit

    dit = write_dit(tmp_path / "dit.safetensors", random_dit_state_dict(tiny_dit_config()), tiny_dit_config())
    with pytest.raises(UserError, match="DiT checkpoint, not a VAE"):
        load_vae(dit)
    partial = write_vae(tmp_path / "partial.safetensors", {k: v for k, v in weights.items() if "decoder.conv_out" not in k}, "safetensors")
    with pytest.raises(UserError, match="partial.safetensors: not a complete HunyuanVideo VAE: keys 2 missing"):
        load_vae(partial)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_vae",))


def test_vae_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"encoder.conv_in.conv.weight": _RunsCode()}))
    with pytest.raises(UserError, match="evil.pt: refused to load"):
        load_vae(evil)
    assert not (tmp_path / "pwned_by_vae").exists()
