"""networks.loha / networks.lokr: musubi-tuner's modules, file format and math, on the fly and merged.

The reference updates are musubi-tuner's documented formulas written out in tests/foreign_loras.py
(delta W = (W1a W1b) * (W2a W2b) * alpha / rank; delta W = W1 (Kronecker) W2 * scale), not the toolkit's own math.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from foreign_loras import lycoris_network_file, tiny_model
from musubi_tuner import convert_lora, merge_lora
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.config import HUNYUAN_T2V
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.networks import loha, lokr, lora
from musubi_tuner.networks.lora_files import load_network_weights
from musubi_tuner.networks.lora_inspect import inspect_lora, summary_lines
from musubi_tuner.networks.lora_reader import kohya_state_dict, read_lora
from musubi_tuner.networks.lycoris_math import factorization, loha_delta

MODULES = {"loha": loha, "lokr": lokr}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lycoris")
    config = tiny_dit_config()
    base = random_dit_state_dict(config, seed=3, scale=0.05)
    dit = tmp / "dit.safetensors"
    save_file(base, str(dit))  # float32: the merged file is compared to 1e-6
    model = tiny_model(config, base)
    made = {"loha": lycoris_network_file(model, tmp / "loha.safetensors", "loha", rank=4, alpha=2.0, seed=1),
            # rank 4 at width 64: w2 is whole in the 64x64 layers (4 >= 8/2), low-rank in the others
            "lokr": lycoris_network_file(model, tmp / "lokr.safetensors", "lokr", rank=4, alpha=2.0, seed=2),
            "lokr factor 4": lycoris_network_file(model, tmp / "lokr4.safetensors", "lokr", rank=2, alpha=1.0, seed=3, factor="4")}
    return tmp, config, base, dit, made


def test_lokr_factorization_is_musubi_tuners():
    # the examples of musubi-tuner's docs and docstring, and HunyuanVideo's sizes
    assert [factorization(n) for n in (128, 512, 1024)] == [(8, 16), (16, 32), (32, 32)]
    assert [factorization(n, 4) for n in (128, 512)] == [(4, 32), (4, 128)]
    assert [factorization(n) for n in (3072, 9216, 12288, 15360, 21504)] == [(48, 64), (96, 96), (96, 128), (120, 128), (128, 168)]
    assert factorization(97) == (1, 97) and factorization(21504, 100) == (96, 224)  # a prime; the largest divisor up to factor


@pytest.fixture(scope="module")
def full_model():
    """The released model's shapes, on the meta device (building a network does not change it)."""
    with torch.device("meta"):
        return HunyuanVideoDiT(HUNYUAN_T2V)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_full_model_gets_musubi_tuners_240_modules_keys_and_shapes(kind, full_model):
    # LoHa's factors are made on the CPU (random init on the meta device is slow the first time); LoKr's on meta
    rank = 2 if kind == "loha" else 32
    with torch.device("cpu" if kind == "loha" else "meta"):
        net = MODULES[kind].create_arch_network(1.0, rank, 16, None, None, full_model)
    sd = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert len(net.unet_loras) == 240 and not any("mod" in k for k in sd)
    qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_39_linear1"
    if kind == "loha":
        assert len(sd) == 240 * 5
        assert [sd[f"{qkv}.hada_w{i}_{ab}"] for i in (1, 2) for ab in "ab"] == [(9216, 2), (2, 3072)] * 2
        assert sd[f"{linear1}.hada_w1_a"] == (21504, 2) and sd[f"{linear1}.alpha"] == ()
    else:  # w1 (out1, in1), w2_a (out2, rank), w2_b (rank, in2): 9216 = 96 x 96, 3072 = 48 x 64, 21504 = 128 x 168
        assert (sd[f"{qkv}.lokr_w1"], sd[f"{qkv}.lokr_w2_a"], sd[f"{qkv}.lokr_w2_b"]) == ((96, 48), (96, 32), (32, 64))
        assert (sd[f"{linear1}.lokr_w1"], sd[f"{linear1}.lokr_w2_a"], sd[f"{linear1}.lokr_w2_b"]) == ((128, 48), (168, 32), (32, 64))
        # 3072 x 3072 (the attention projections): w2 is 64 x 64, and rank 32 is half of it: a whole w2, scale 1, alpha = rank
        proj = "lora_unet_double_blocks_0_img_attn_proj"
        assert (sd[f"{proj}.lokr_w1"], sd[f"{proj}.lokr_w2"]) == ((48, 48), (64, 64)) and f"{proj}.lokr_w2_a" not in sd
        assert net.get_submodule(proj).scale == 1.0 and net.get_submodule(qkv).scale == 16 / 32


@pytest.mark.parametrize("name", ["loha", "lokr", "lokr factor 4"])
@pytest.mark.parametrize("fp8", [False, True], ids=["float32 weights", "fp8 weights"])
def test_on_the_fly_forward_equals_the_documented_math(files, name, fp8):
    """What generation runs beside the weights (always with --fp8): each Linear gives x (W + m delta W)^T + b."""
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.inference.pipeline import apply_loras_on_the_fly

    tmp, config, base, dit, made = files
    model = load_dit(dit, dtype=torch.float32, fp8=fp8)
    apply_loras_on_the_fly(model, [made[name].path], [0.7], exclude_single_blocks=False)
    g = torch.Generator().manual_seed(0)
    for param, delta in made[name].expected.items():
        linear = model.get_submodule(param.removesuffix(".weight"))
        w = linear.dequantized_weight(torch.float64) if fp8 else linear.weight.double()
        x = torch.randn(2, 5, w.shape[1], generator=g)
        with torch.no_grad():
            got = linear(x).double()
        want = F.linear(x.double(), w + 0.7 * delta.double(), linear.bias.double())
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), param


def test_merge_lora_gives_the_base_plus_the_documented_updates(files, capsys):
    tmp, config, base, dit, made = files
    out = tmp / "merged.safetensors"
    loha_file, lokr_file = made["loha"], made["lokr factor 4"]
    with pytest.raises(SystemExit) as e:
        merge_lora.main(["--dit", str(dit), "--lora_weight", str(loha_file.path), str(lokr_file.path), "--lora_multiplier", "0.7", "-0.4",
                         "--save_merged_model", str(out), "--device", "cpu"])
        sys.exit(0)
    assert (e.value.code or 0) == 0
    merged = load_file(str(out))
    for param in base:
        want = base[param].double() + 0.7 * loha_file.expected.get(param, torch.zeros(())).double() \
            - 0.4 * lokr_file.expected.get(param, torch.zeros(())).double()
        assert merged[param].dtype == torch.float32 and (merged[param].double() - want).abs().max() < 1e-6, param
    assert "into 20 layers" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["loha", "lokr", "lokr factor 4"])
def test_files_round_trip_in_musubi_tuners_names_through_every_path(files, tmp_path, name, capsys):
    tmp, config, base, dit, made = files
    path = made[name].path
    stored = load_file(str(path))
    read_back = kohya_state_dict(read_lora(path).patches)
    assert set(read_back) == set(stored) and all(torch.equal(read_back[k], stored[k]) for k in stored)
    # convert_lora.py to the other naming (factors kept, alpha copied: musubi-tuner's own conversion) and back
    for target, out in (("other", tmp_path / "other.safetensors"), ("default", tmp_path / "back.safetensors")):
        convert_lora.main(["--input", str(path if target == "other" else tmp_path / "other.safetensors"), "--output", str(out),
                           "--target", target])
    other = load_file(str(tmp_path / "other.safetensors"))
    assert all(k.startswith("diffusion_model.double_blocks.") or k.startswith("diffusion_model.single_blocks.") for k in other)
    assert other[next(k for k in other if k.endswith(".alpha"))].item() in (1.0, 2.0, 4.0)
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(stored) and all(torch.equal(back[k].float(), stored[k].float()) for k in stored)
    # the network musubi-tuner's trainer would build from the file (--network_weights), without repeating factor=4
    model = tiny_model(config, base)
    net = MODULES[name[:4]].create_arch_network_from_weights(1.0, load_network_weights(path), model)
    assert all(torch.equal(v, stored[k]) for k, v in net.state_dict_for_saving().items())


def test_loha_backward_is_the_gradient_of_its_update():
    """The LoHa update keeps only its factors for the backward pass; its gradients are those of the plain formula."""
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((6, 3), (3, 5), (6, 3), (3, 5))]
    assert torch.autograd.gradcheck(lambda *f: loha_delta(*f, 0.75), factors)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_training_modules_learn_and_max_norm_bounds_their_update(files, kind):
    tmp, config, base, dit, made = files
    model = tiny_model(config, base)
    net = MODULES[kind].create_arch_network(1.0, 4, 2.0, None, None, model)
    net.apply_to(None, model)
    linear = model.get_submodule("double_blocks.0.img_attn_proj")
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))  # zero update at the start, as musubi-tuner's init
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    target = torch.randn(2, 5, 64)
    losses = []
    for _ in range(3):
        loss = (linear(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    module = next(m for m in net.unet_loras if m.lora_name == "lora_unet_double_blocks_0_img_attn_proj")
    norm = module.delta_weight().norm().item()
    scaled, _, largest = net.apply_max_norm_regularization(norm / 2, "cpu")  # musubi-tuner skips LoHa/LoKr here
    assert scaled >= 1 and module.delta_weight().norm().item() == pytest.approx(norm / 2, rel=1e-4) and largest <= norm / 2 * 1.0001


def test_a_file_of_another_kind_names_the_network_module_to_use(files):
    tmp, config, base, dit, made = files
    model = tiny_model(config, base)
    with pytest.raises(UserError, match="its modules are loha modules .*use --network_module networks.loha"):
        lora.create_arch_network(1.0, 4, 1, None, None, model).load_weights(str(made["loha"].path))
    with pytest.raises(UserError, match="use --network_module networks.lokr"):
        loha.create_arch_network_from_weights(1.0, load_network_weights(made["lokr"].path), model)
    with pytest.raises(UserError, match="factor=0: must be -1"):
        lokr.create_arch_network(1.0, 4, 1, None, None, model, factor="0")


def test_info_says_what_the_modules_are(files):
    tmp, config, base, dit, made = files
    ins = inspect_lora(made["lokr"].path)
    text = "\n".join(summary_lines(ins))
    assert "20 LoKr modules" in text and "rank 4, alpha 2" in text and not ins.problems
    norms = {m.path: m.norm for m in ins.modules}
    for param, delta in made["lokr"].expected.items():
        assert norms[param.removesuffix(".weight")] == pytest.approx(delta.double().norm().item(), rel=1e-5)


def test_a_lokr_file_of_another_factor_is_named_as_such_when_loaded_into_a_network(files):
    """--network_weights without --dim_from_weights builds the network from --network_dim and factor: a file of
    another factor has a low-rank w2 where the network has a whole one (or the reverse)."""
    tmp, config, base, dit, made = files
    network = lokr.create_arch_network(1.0, 4, 1.0, None, None, tiny_model(config, base))  # whole w2s; the file's are low-rank
    with pytest.raises(UserError, match=r"lokr4\.safetensors: its LoKr modules are of another factor or rank than this "
                                        r"network's \(\S+\.lokr_w2\S*\): give the --network_args factor and --network_dim"):
        network.load_weights(str(made["lokr factor 4"].path))


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "lokr_full", "diff"])
@pytest.mark.parametrize("size", [1e-2, 1e4])
def test_the_largest_update_is_the_update_s_largest_entry_once_it_matters(kind, size):
    """What every reader refuses as a diverged training's (lora_reader.DIVERGED_UPDATE): below the limit a cheap bound
    from the factors' norms, never under the true largest change; above it, that change exactly."""
    from musubi_tuner.networks.lora_reader import DIVERGED_UPDATE, Patch, largest_update

    g = torch.Generator().manual_seed(0)

    def r(*shape, share=0.5):  # factors whose products reach about `size`
        return torch.randn(*shape, generator=g) * size ** share

    if kind == "lora":
        patch = Patch("m", "lora", (), up=r(12, 4), down=r(4, 10), alpha=-2.0)
    elif kind == "loha":
        patch = Patch("m", "loha", (), alpha=3.0, factors={k: r(*shape, share=0.25) for k, shape in
                                                          (("hada_w1_a", (12, 4)), ("hada_w1_b", (4, 10)), ("hada_w2_a", (12, 4)), ("hada_w2_b", (4, 10)))})
    elif kind == "lokr":
        patch = Patch("m", "lokr", (), alpha=2.0, factors={"lokr_w1": r(3, 2), "lokr_w2_a": r(4, 2, share=0.25), "lokr_w2_b": r(2, 5, share=0.25)})
    elif kind == "lokr_full":
        patch = Patch("m", "lokr", (), factors={"lokr_w1": r(3, 2), "lokr_w2": r(4, 5)})
    else:
        patch = Patch("m", "diff", (), tensor=r(12, 10, share=1.0))
    exact = patch.delta(patch.shape).abs().max().item()
    found = largest_update(patch)
    if found > DIVERGED_UPDATE:
        assert found == pytest.approx(exact, rel=1e-6)
    else:
        assert exact <= found * (1 + 1e-6)
    assert (found > DIVERGED_UPDATE) == (exact > DIVERGED_UPDATE) == (size > 1)  # (both sides of the limit are tried)
