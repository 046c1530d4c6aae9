"""The DiT equals diffusers' HunyuanVideoTransformer3DModel, has the official layout, and loads every file format."""

import pytest
import torch

from diffusers_reference import diffusers_dit
from helpers import dit_inputs as inputs, rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.hunyuan.config import HUNYUAN_T2V, SKYREELS_I2V, DiTConfig
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT


def ours(config, sd):
    model = HunyuanVideoDiT(config)
    model.load_state_dict(sd)
    return model.eval()


# --------------------------------------------------------------------------------------- official layout


@pytest.mark.parametrize("config,manifest_name,params", [
    (HUNYUAN_T2V, "dit_t2v_720p.json", 12_821_012_544),
    (SKYREELS_I2V, "dit_skyreels_i2v.json", 12_821_209_152),
])
def test_full_size_model_has_the_official_keys_shapes_and_parameter_count(manifest, config, manifest_name, params):
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    ref = manifest(manifest_name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == ref["keys"]
    assert sum(p.numel() for p in model.parameters()) == params == ref["params"]


def test_config_is_read_off_the_official_shapes(manifest):
    shapes = manifest("dit_skyreels_i2v.json")["keys"]
    assert DiTConfig.from_shapes(shapes) == SKYREELS_I2V
    assert DiTConfig.from_shapes(manifest("dit_t2v_720p.json")["keys"]) == HUNYUAN_T2V


# --------------------------------------------------------------------------------------- equals diffusers


@pytest.mark.parametrize("case", [
    dict(batch=1, frames=3, height=6, width=10, text_lens=(7,)),          # video latent, padded prompt
    dict(batch=2, frames=2, height=6, width=4, text_lens=(5, 13)),        # batch with different text lengths
    dict(batch=1, frames=1, height=8, width=8, text_lens=(20,)),          # single image, no padding
    dict(batch=2, frames=1, height=10, width=6, text_lens=(1, 20)),       # extreme lengths
])
@pytest.mark.parametrize("split_attn", [False, True])
def test_forward_equals_diffusers(case, split_attn):
    config = tiny_dit_config()
    sd = random_dit_state_dict(config, seed=3, scale=0.08)
    model = ours(config, sd)
    model.set_attention("sdpa", split=split_attn)
    reference = diffusers_dit(sd, config)
    args = inputs(config, **case)
    with torch.no_grad():
        got = model(*args)
        want = reference(*args, return_dict=False)[0]
    assert got.shape == want.shape == args[0].shape
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("split_attn", [False, True])
def test_gradients_equal_diffusers(split_attn):
    """What training uses: the gradients of a loss w.r.t. the latents and the LLM states, not only the output."""
    config = tiny_dit_config()
    sd = random_dit_state_dict(config, seed=6, scale=0.08)
    model = ours(config, sd)
    model.set_attention("sdpa", split=split_attn)
    reference = diffusers_dit(sd, config)
    x, t, text, mask, pooled, g = inputs(config, batch=2, frames=2, height=6, width=4, text_lens=(5, 13))
    grads = []
    for run in (lambda *a: model(*a), lambda *a: reference(*a, return_dict=False)[0]):
        xi, texti = x.clone().requires_grad_(True), text.clone().requires_grad_(True)
        (run(xi, t, texti, mask, pooled, g) * torch.linspace(-1, 1, x.shape[-1])).square().sum().backward()
        grads.append((xi.grad, texti.grad * mask[..., None]))  # padding rows of the text get no meaningful grad
    (x_ours, text_ours), (x_ref, text_ref) = grads
    assert rel_err(x_ours, x_ref) < 1e-5
    assert rel_err(text_ours, text_ref) < 1e-5


def _official_qk_norm_rope(x, weight, angles, eps=1e-6):
    """The official model's op-by-op formula: RMSNorm in float32, rounded, times weight, rotated pairwise in float32."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    cos = angles.cos().repeat_interleave(2, -1)[:, None]  # (L, 1, D)
    sin = angles.sin().repeat_interleave(2, -1)[:, None]
    nf = normed.float()
    swapped = torch.stack([-nf[..., 1::2], nf[..., 0::2]], dim=-1).flatten(-2)  # (-x_2k+1, x_2k)
    return (nf * cos + swapped * sin).type_as(x)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_qk_norm_with_rotation_equals_the_official_formula_and_its_gradients(dtype, tol):
    from musubi_tuner.hunyuan.blocks import qk_norm

    L, H, D = 12, 3, 16
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(2, L, 3, H, D, generator=g) * 3).to(dtype)
    weight = (torch.rand(D, generator=g) + 0.5).to(dtype)
    angles = torch.rand(L, D // 2, generator=g) * 20
    rotation = torch.polar(torch.ones_like(angles), angles)
    probe = torch.randn(2, L, H, D, generator=g)
    results = []
    for fn in (lambda q, w: qk_norm(q, w, rotation), lambda q, w: _official_qk_norm_rope(q, w, angles)):
        src, w = qkv.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fn(src[:, :, 1], w)  # k: a strided view of the projection, as in the blocks
        (out.float() * probe).sum().backward()
        results.append((out.float(), src.grad.float(), w.grad.float()))
    for got, want in zip(*results):
        assert rel_err(got, want) < tol


def test_qk_norm_gradients_pass_gradcheck():
    from musubi_tuner.hunyuan.blocks import qk_norm

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    rotation = torch.polar(torch.ones(5, 4, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64, generator=g) * 6)
    assert torch.autograd.gradcheck(lambda a, b: qk_norm(a, b, rotation), (x, w))
    assert torch.autograd.gradcheck(lambda a, b: qk_norm(a, b), (x, w))


def test_skyreels_i2v_variant_equals_diffusers():
    config = tiny_dit_config(in_channels=32)
    sd = random_dit_state_dict(config, seed=4, scale=0.08)
    args = inputs(config, batch=1, text_lens=(9,))
    with torch.no_grad():
        got = ours(config, sd)(*args)
        want = diffusers_dit(sd, config)(*args, return_dict=False)[0]
    assert got.shape[1] == 16
    assert rel_err(got, want) < 1e-5


def test_padding_beyond_the_prompt_does_not_change_the_output():
    config = tiny_dit_config()
    model = ours(config, random_dit_state_dict(config, seed=5, scale=0.08))
    x, t, text, mask, pooled, g = inputs(config, text_lens=(6,), max_text=20)
    with torch.no_grad():
        a = model(x, t, text, mask, pooled, g)
        garbage = text.clone()
        garbage[:, 6:] = 1e3
        b = model(x, t, garbage[:, :11], mask[:, :11], pooled, g)
    assert torch.equal(a, b)
