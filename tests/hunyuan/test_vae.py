"""The causal 3D VAE equals diffusers' AutoencoderKLHunyuanVideo, has the official layout, and loads the official files."""

import os
import pickle

import pytest
import torch

from diffusers_reference import diffusers_vae
from helpers import rel_err
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.vae import CausalVideoVAE, VAEConfig, group_norm_affine, latent_frames, load_vae
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


def flat_clip(frames=9, height=64, width=96, seed=0):
    """One flat colour with a small textured square moving across it: most GroupNorm groups see a variance far below
    their mean's square."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(1, 3, 1, 1, 1, generator=g) * 2 - 1).repeat(1, 1, frames, height, width)
    for f in range(frames):
        x[:, :, f, 20:28, 10 + 4 * f : 22 + 4 * f] = torch.rand(1, 3, 8, 12, generator=g) * 2 - 1
    return x


def high_dynamic_range_clip(frames=9, height=64, width=96, seed=0):
    """A near-black clip (1% noise) with one saturated white highlight: a few values dominate the second moment."""
    x = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 0.01 - 1
    x[:, :, :, 30:34, 40:44] = 1.0
    return x


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


@pytest.mark.parametrize("clip", [flat_clip, high_dynamic_range_clip])
def test_flat_and_high_dynamic_range_clips_encode_as_exactly_as_diffusers(weights, pair, clip):
    """Judged against diffusers in float64: ours in float32 stays as close to it as diffusers in float32 does (2e-6 on
    both clips). GroupNorm statistics that lose precision put the flat clip's latents 2e-5 away."""
    ours, ref = pair
    exact = diffusers_vae(weights, TINY_VAE).double()
    x = clip()
    with torch.no_grad():
        want = exact.encode(x.double()).latent_dist.mean
        assert rel_err(ref.encode(x).latent_dist.mean, want) < 3e-6  # the reference's own float32 error
        assert rel_err(ours.encode(x).mean, want) < 5e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("content", ["random", "flat", "offset", "high_dynamic_range"])
def test_group_norm_statistics_are_exact_to_float32(content, dtype):
    """x * scale + shift from group_norm_affine is as close to a float64 GroupNorm as PyTorch's float32 kernel is, and
    its scale (1 / std) is within float32 rounding, whatever the spread of the values."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 64, 9, 32, 48)
    x = {
        "random": lambda: torch.randn(shape, generator=g),
        "flat": lambda: torch.full(shape, -0.3).index_fill_(3, torch.tensor([8, 9]), 1.0),
        "offset": lambda: 0.7 + 1e-3 * torch.randn(shape, generator=g),
        "high_dynamic_range": lambda: torch.randn(shape, generator=g) * torch.where(torch.rand(shape, generator=g) < 0.01, 100.0, 0.01),
    }[content]().to(dtype)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.05, generator=g)
        norm.bias.normal_(0.0, 0.05, generator=g)
        scale, shift = group_norm_affine(norm, x)
        x64 = x.double()
        want = torch.nn.functional.group_norm(x64, 32, norm.weight.double(), norm.bias.double(), norm.eps)
        var = x64.view(1, 32, -1).var(dim=2, correction=0).repeat_interleave(2, dim=1)
        want_scale = norm.weight.double() / (var + norm.eps).sqrt()
        assert rel_err(scale.flatten(), want_scale.flatten()) < 1e-6
        assert rel_err(x.float() * scale + shift, want) <= 1.5 * rel_err(norm(x.float()), want)


def test_posterior_sample_is_mean_plus_std_noise_and_seeded(pair):
    ours, _ = pair
    with torch.no_grad():
        post = ours.encode(pixels(1, 16, 16))
    a = post.sample(torch.Generator().manual_seed(3))
    b = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    assert post.logvar.max() <= 20 and post.logvar.min() >= -30


def test_chunked_convolutions_equal_unchunked_to_float_rounding(pair):
    ours, _ = pair
    x = pixels(5, 32, 96)
    z = torch.randn(1, 16, 2, 4, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_enc, base_dec = ours.encode(x).mean, ours.decode(z)
        ours.set_memory_options(chunk_size=8)  # every convolution wider than 12 columns runs in pieces
        try:
            enc, dec = ours.encode(x).mean, ours.decode(z)
        finally:
            ours.set_memory_options()
    # Not bit-equal: the convolution sums in another order. A wrong overlap between chunks would be off by O(1).
    assert rel_err(enc, base_enc) < 1e-5 and rel_err(dec, base_dec) < 1e-5


@pytest.mark.parametrize("chunk_size", [None, 32])
def test_spatial_tiling_equals_the_reference_tiling(weights, chunk_size):
    ours = CausalVideoVAE(TINY_VAE)
    ours.load_state_dict(weights)
    ours.eval().set_memory_options(tiling=True, spatial_tile_sample_min_size=64, chunk_size=chunk_size)
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
    ref = diffusers_vae(weights, TINY_VAE).double()  # diffusers tiles in time above 16 frames, 12 apart
    x = pixels(25, 16, 16)
    with torch.no_grad():
        enc = ours.encode(x).mean
        assert enc.shape[2] == 7 and rel_err(enc, ref.encode(x.double()).latent_dist.mean) < 1e-5
        # Against float64: the decoder amplifies float32 rounding, and ours sums its convolutions in oneDNN's order
        # (1.1e-5 from float64 here, diffusers' float32 4e-6; both vary with the thread count). Tiles placed or
        # blended wrongly are 1e-2 off.
        assert rel_err(ours.decode(enc), ref.decode(enc.double()).sample) < 3e-5


def test_tiling_leaves_inputs_that_fit_one_tile_untouched(pair):
    ours, _ = pair
    x = pixels(5, 32, 48)
    z = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))  # 64 x 64 px: exactly one tile
    with torch.no_grad():
        base_enc, base_dec = ours.encode(x).mean, ours.decode(z)
        ours.set_memory_options(tiling=True, spatial_tile_sample_min_size=64)
        try:
            assert torch.equal(ours.encode(x).mean, base_enc) and torch.equal(ours.decode(z), base_dec)
        finally:
            ours.set_memory_options()


def test_tiles_of_a_clip_flat_in_space_blend_back_to_the_untiled_result(weights):
    """Tiling changes nothing where the content has no spatial detail: each tile of a flat clip computes what the whole
    clip does (same replicated borders, same statistics), so blend weights that do not sum to 1, or tiles treated
    differently from the whole, would show here. Tile positions are checked against diffusers above.

    In float64: this random tiny VAE amplifies any spatial pattern about 1e6-fold from the first layer to the last, so
    in float32 the rounding noise of the convolutions at the borders (1e-7) comes out at 1e-5..3e-3, depending on the
    thread count and on the last bit of the GroupNorm statistics. In float64 it stays below 1e-9."""
    ours = CausalVideoVAE(TINY_VAE)
    ours.load_state_dict(weights)
    ours = ours.double().eval()
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(1, 3, 5, 1, 1, generator=g, dtype=torch.float64) * 2 - 1).expand(1, 3, 5, 40, 40).contiguous()
    z = torch.randn(1, 16, 2, 1, 1, generator=g, dtype=torch.float64).expand(1, 16, 2, 5, 5).contiguous()
    with torch.no_grad():
        base_enc, base_dec = ours.encode(x).mean, ours.decode(z)
        ours.set_memory_options(tiling=True, spatial_tile_sample_min_size=32)  # 2 x 2 tiles
        enc, dec = ours.encode(x).mean, ours.decode(z)
    # Wrong blend weights give O(0.5); detailed content differs by 0.4-1 between tiled and untiled on these weights.
    assert rel_err(enc, base_enc) < 1e-6 and rel_err(dec, base_dec) < 1e-6


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_vae_stays_close_to_float32(weights, pair, dtype, tolerance):
    ours, _ = pair
    half = CausalVideoVAE(TINY_VAE)
    half.load_state_dict(weights)
    half = half.to(dtype).eval()
    x = pixels(9, 24, 40)  # 9 frames: the half-precision norm statistics are merged over frame ranges
    z = torch.randn(1, 16, 3, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(half.encode(x).mean, ours.encode(x).mean) < tolerance  # diffusers in the same dtype: the same size
        assert rel_err(half.decode(z), ours.decode(z)) < tolerance


@pytest.mark.parametrize("fp16_kernel", [True, False])
def test_cpu_convolutions_match_pytorch_on_small_inputs(monkeypatch, fp16_kernel):
    """conv3d() sends small float32 inputs to oneDNN and, on CPUs without a float16 kernel (where PyTorch's own runs
    60-140x slower), float16 through float32: the result is a float32 convolution, rounded once (within a float16 step
    of PyTorch's own, which sums in another order)."""
    from musubi_tuner.hunyuan import vae

    monkeypatch.setattr(vae, "cpu_lacks_fast_float16", lambda: not fp16_kernel)
    torch.manual_seed(0)  # (the weights: not whatever the worker's earlier tests left the generator at)
    conv = torch.nn.Conv3d(8, 4, 3, padding=(0, 1, 1), stride=(1, 2, 2)).eval()
    x = torch.randn(1, 8, 3, 6, 10, generator=torch.Generator().manual_seed(0))  # N x C x T x H = 144: PyTorch's im2col path
    with torch.no_grad():
        assert rel_err(vae.conv3d(conv, x), conv(x)) < 1e-6
        half = conv.half()
        want = torch.nn.functional.conv3d(x.half().float(), half.weight.float(), half.bias.float(), (1, 2, 2), (0, 1, 1))
        got = vae.conv3d(half, x.half())
        assert got.dtype == torch.float16
        if fp16_kernel:  # PyTorch's own float16 kernel: float16 rounding inside
            assert rel_err(got.float(), want) < 2e-3
        else:  # float32 summed in oneDNN's order, not im2col's: the rounding to float16 may land one step apart
            assert rel_err(got.float(), want) < 2**-11
            assert ((got.float() - want.half().float()).abs() <= (want.half().float().abs() * 2**-10).clamp_min(2**-24)).all()


@pytest.mark.parametrize("op", ["encode", "decode"])
def test_peak_tensor_memory_is_well_below_the_reference(weights, pair, op):
    """Live tensor storage (not timing): the streamed convolutions keep about two full-resolution tensors alive."""
    from musubi_tuner.planning.measure import TensorBytes

    ours, _ = pair
    ref = diffusers_vae(weights, TINY_VAE)
    ref.use_framewise_encoding = ref.use_framewise_decoding = False  # both untiled
    x = pixels(33, 32, 32) if op == "encode" else torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(1))
    run = {"encode": (lambda m: m.encode(x).mean, lambda m: m.encode(x).latent_dist.mean),
           "decode": (lambda m: m.decode(x), lambda m: m.decode(x).sample)}[op]
    peaks = []
    for model, call in zip((ours, ref), run):
        counter = TensorBytes()
        counter.track([*model.parameters(), *model.buffers(), x])
        start = counter.current
        with torch.no_grad(), counter:
            call(model)
        peaks.append(counter.peak - start)
    assert peaks[0] < {"encode": 0.65, "decode": 0.55}[op] * peaks[1]


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


def test_a_bf16_safetensors_like_comfyuis_loads_in_the_requested_dtype(tmp_path, weights):
    """ComfyUI's hunyuan_video_vae_bf16.safetensors: the official names, stored in bfloat16."""
    path = write_vae(tmp_path / "hunyuan_video_vae_bf16.safetensors", {k: v.bfloat16() for k, v in weights.items()}, "safetensors")
    loaded = load_vae(path, dtype=torch.float16)
    assert loaded.config == TINY_VAE and loaded.dtype == torch.float16
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v.bfloat16().half()) for k, v in weights.items())


def test_wrong_files_are_named(tmp_path, weights):
    with pytest.raises(UserError, match=r"nope.pt: VAE checkpoint not found \(--vae\)$"):  # (the flag named in every command: fuzz_y 8)
        load_vae(tmp_path / "nope.pt")
    path = write_vae(tmp_path / "vae.pt", weights)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(UserError, match="vae.pt: not a readable PyTorch VAE checkpoint"):
        load_vae(path)
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit

    dit = write_dit(tmp_path / "dit.safetensors", random_dit_state_dict(tiny_dit_config()), tiny_dit_config())
    with pytest.raises(UserError, match=r"dit.safetensors: not a VAE: this is a HunyuanVideo DiT \(pass it with --dit\)"):
        load_vae(dit)
    partial = write_vae(tmp_path / "partial.safetensors", {k: v for k, v in weights.items() if "decoder.conv_out" not in k}, "safetensors")
    with pytest.raises(UserError, match="partial.safetensors: not a complete HunyuanVideo VAE: keys 2 missing"):
        load_vae(partial)


def test_a_vae_weight_holding_nan_is_refused_as_it_loads_and_a_pt_named_safetensors_loads(tmp_path, weights):
    """A NaN in a decoder weight was found after the whole sampling ("decoded NaN/inf pixels"), and caching with a NaN
    in the encoder blamed float16 (fuzz_y 1). A torch.save file named .safetensors was "not a safetensors file (header
    length 578712552184433488...)", where a safetensors file named .pt loaded (fuzz_y 7)."""
    damaged = dict(weights)
    damaged["decoder.conv_out.conv.weight"] = weights["decoder.conv_out.conv.weight"].clone().fill_(float("nan"))
    path = write_vae(tmp_path / "vae.safetensors", damaged, "safetensors")
    with pytest.raises(UserError, match=r"vae\.safetensors: decoder\.conv_out\.conv\.weight holds NaN or infinite values: the file is "
                                        r"damaged, download it again"):
        load_vae(path, dtype=torch.float32)
    big = {**weights, "decoder.conv_out.conv.bias": weights["decoder.conv_out.conv.bias"].clone().fill_(1e6)}
    with pytest.raises(UserError, match=r"decoder\.conv_out\.conv\.bias holds values past float16's range \(finite as stored, in "
                                        r"float32\): compute in float32 \(--vae_dtype float32\)"):
        load_vae(write_vae(tmp_path / "big.safetensors", big, "safetensors"), dtype=torch.float16)
    renamed = write_vae(tmp_path / "vae.pt", weights)
    renamed = renamed.rename(tmp_path / "pytorch_model.safetensors")
    assert torch.equal(load_vae(renamed, dtype=torch.float32).state_dict()["decoder.conv_out.conv.weight"],
                       weights["decoder.conv_out.conv.weight"])


def test_a_model_file_that_opens_but_cannot_be_read_is_named():
    """A read that fails past a good open (a failing disk, a dropped network mount: EIO; /proc/self/mem gives it) was a
    traceback from the first read of every model loader (fuzz_y 3)."""
    with pytest.raises(UserError, match=r"^/proc/self/mem: cannot read \(Input/output error\)"):
        load_vae("/proc/self/mem")


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


# ----------------------------------------------------------------------------------------- damaged files (D17)


@pytest.mark.parametrize("key,damage,shape", [
    ("encoder.conv_in.conv.weight", lambda t: t.reshape(-1), None),
    ("decoder.conv_in.conv.weight", lambda t: torch.zeros(3), "[3]"),
    ("encoder.down_blocks.0.resnets.0.conv1.conv.weight", lambda t: torch.zeros(0), "[0]"),
    ("encoder.down_blocks.1.resnets.0.conv1.conv.weight", lambda t: t[:, :, 0], None),
    ("encoder.conv_in.conv.weight", lambda t: t[:, :0], "expected no dimension of size 0"),
])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_tensor_of_another_rank_where_the_config_is_read_is_named(tmp_path, weights, key, damage, shape, fmt):
    state = dict(weights)
    state[key] = damage(state[key]).contiguous()
    path = write_vae(tmp_path / f"vae.{fmt}", state, "safetensors" if fmt == "safetensors" else "pt")
    with pytest.raises(UserError) as e:
        load_vae(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not a HunyuanVideo VAE: {key} has shape {list(state[key].shape)}") and "\n" not in message
    assert ("expected a 5-D convolution weight" in message) if shape != "expected no dimension of size 0" else shape in message


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_a_vae_whose_weights_are_not_floating_point_is_refused_naming_file_and_key(tmp_path, weights, dtype):
    path = write_vae(tmp_path / "vae.pt", {k: v.to(dtype) for k, v in weights.items()})
    with pytest.raises(UserError) as e:
        load_vae(path)
    name = str(dtype).removeprefix("torch.")
    assert str(e.value).startswith(f"{path}: tensor ") and f" is {name}; a VAE's weights are floating point" in str(e.value)
    one = dict(weights, **{"decoder.conv_out.conv.bias": weights["decoder.conv_out.conv.bias"].to(dtype)})
    path = write_vae(tmp_path / "one.safetensors", one, "safetensors")
    with pytest.raises(UserError, match=rf"one\.safetensors: tensor decoder\.conv_out\.conv\.bias is {name}; "):
        load_vae(path)


def test_an_fp8_vae_is_floating_point_and_loads(tmp_path, weights):
    path = write_vae(tmp_path / "vae.safetensors", {k: v.to(torch.float8_e4m3fn) for k, v in weights.items()}, "safetensors")
    assert load_vae(path, dtype=torch.float32).config == TINY_VAE
