"""LoRA files made the way the other tools of the ecosystem make them, on the tiny DiT, each with the update it means.

Where the tool's own code is installed it writes the file (PEFT for diffusion-pipe's adapters, diffusers'
`save_lora_weights`); ComfyUI's trainer and naming are followed from the rules written down from its source in
tests/fixtures/lora_consumers/comfyui_hunyuan_video.json. Every builder returns the file and the expected change to
each official parameter at multiplier 1 (its "documented math"), computed here or by the tool itself, never by the
reader under test.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from conftest import DATA
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.networks import lora

COMFY = json.load(open(os.path.join(DATA, "lora_consumers", "comfyui_hunyuan_video.json")))


@dataclass
class Foreign:
    name: str
    path: Path
    expected: dict[str, torch.Tensor]  # official parameter -> float32 change at multiplier 1
    replaced: dict[str, torch.Tensor] | None = None  # official parameter -> its new value (set_weight)
    scales: dict[str, float] | None = None  # PEFT adapters: official module -> PEFT's own scale of its update

    def merged(self, base: dict[str, torch.Tensor], multiplier: float = 1.0) -> dict[str, torch.Tensor]:
        """The base weights with the documented math applied."""
        out = {k: v.float().clone() for k, v in base.items()}
        for k, v in (self.replaced or {}).items():
            out[k] = v.float().clone()
        for k, d in self.expected.items():
            out[k] += multiplier * d
        return out


def comfy_param_name(official: str) -> str:
    """An official parameter's name in ComfyUI's model, by the renames of naming_map.md section 6."""
    name = official
    for old, new in COMFY["official_to_comfy_renames"]["rules"]:
        name = name.replace(old, new)
    return name


def tiny_model(config, weights) -> HunyuanVideoDiT:
    model = HunyuanVideoDiT(config)
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)


def _randn(shape, g, scale=0.05, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------- kohya (ours, musubi-tuner)


def kohya_network_file(model, path: Path, rank=4, alpha=2.0, seed=0, include=None, rename: Callable[[str], str] | None = None) -> Foreign:
    """The trainer's LoRA (musubi-tuner's network and naming); `rename` maps official module paths to the names written."""
    kwargs = {"include_patterns": repr(include)} if include else {}
    net = lora.create_arch_network(1.0, rank, alpha, None, None, model, **kwargs)
    g = torch.Generator().manual_seed(seed)
    paths = {id(m): name for name, m in model.named_modules()}
    expected = {}
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, 0.05, generator=g)
            expected[paths[id(m.org_module[0])] + ".weight"] = m.lora_up.weight @ m.lora_down.weight * (alpha / rank)
    sd = net.state_dict_for_saving()
    if rename is not None:
        sd = {_rename_kohya(k, paths, net, rename): v for k, v in sd.items()}
    save_file(sd, str(path))
    return Foreign(path.stem, path, expected)


def loha_delta_reference(w1_a, w1_b, w2_a, w2_b, alpha, rank) -> torch.Tensor:
    """musubi-tuner's documented LoHa update (docs/loha_lokr.md): delta W = (W1a x W1b) * (W2a x W2b) * alpha / rank."""
    return (w1_a.double() @ w1_b.double()) * (w2_a.double() @ w2_b.double()) * (alpha / rank)


def lokr_delta_reference(w1, w2, scale) -> torch.Tensor:
    """musubi-tuner's documented LoKr update: delta W = W1 (Kronecker) W2 * scale, written out element by element:
    delta[i * out2 + a, j * in2 + b] = w1[i, j] * w2[a, b]."""
    (out1, in1), (out2, in2) = w1.shape, w2.shape
    return (w1.double()[:, None, :, None] * w2.double()[None, :, None, :]).reshape(out1 * out2, in1 * in2) * scale


def lycoris_network_file(model, path: Path, kind: str, rank=4, alpha=2.0, seed=0, **network_args) -> Foreign:
    """musubi-tuner's LoHa or LoKr network (kind "loha" / "lokr") with random factors, saved as the trainer saves it;
    `expected` from the documented formulas above (not from the toolkit's own math)."""
    from musubi_tuner.networks import loha, lokr

    net = {"loha": loha, "lokr": lokr}[kind].create_arch_network(1.0, rank, alpha, None, None, model, **network_args)
    g = torch.Generator().manual_seed(seed)
    paths = {id(m): name for name, m in model.named_modules()}
    expected = {}
    with torch.no_grad():
        for m in net.unet_loras:
            for p in m.parameters():
                p.copy_(_randn(p.shape, g, 0.3))
            t = {k: v.float() for k, v in m.tensors().items()}
            if kind == "loha":
                delta = loha_delta_reference(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha, rank)
            elif "lokr_w2" in t:  # a whole w2: scale 1
                delta = lokr_delta_reference(t["lokr_w1"], t["lokr_w2"], 1.0)
            else:
                delta = lokr_delta_reference(t["lokr_w1"], t["lokr_w2_a"].double() @ t["lokr_w2_b"].double(), alpha / rank)
            expected[paths[id(m.org_module[0])] + ".weight"] = delta.float()
    save_file(net.state_dict_for_saving(), str(path))
    return Foreign(path.stem, path, expected)


def _rename_kohya(key: str, paths, net, rename) -> str:
    name, rest = key.split(".", 1)
    module = next(paths[id(m.org_module[0])] for m in net.unet_loras if m.lora_name == name)
    return "lora_unet_" + rename(module).replace(".", "_") + "." + rest


def comfy_module_name(official_module: str) -> str:
    return comfy_param_name(official_module + ".weight").removesuffix(".weight").removesuffix(".scale")


# ----------------------------------------------------------------------------------------------- ComfyUI's TrainLoraNode


def comfy_trainer_file(model: HunyuanVideoDiT, path: Path, rank=4, blocks_only=False, seed=0, dtype=torch.bfloat16) -> Foreign:
    """What TrainLoraNode + SaveLoRA write for ComfyUI's HunyuanVideo model: per comfy.ops module with a weight, a LoRA
    (lora_up (out, rank), lora_down (rank, prod(other dims)), alpha 1) or a .diff for a 1-D weight, and a .diff_b per bias,
    under ComfyUI's module names with the `diffusion_model.` prefix. The trained values are random here (not zero)."""
    rules, trainer = COMFY, COMFY["trainer"]
    g = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    params = dict(model.named_parameters())
    for module in dict.fromkeys(name.rsplit(".", 1)[0] for name in params):
        comfy = comfy_param_name(module + ".weight")
        if not comfy.endswith(".weight"):  # Flux's RMSNorm (`scale`): not a comfy.ops module, not trained
            continue
        comfy = comfy.removesuffix(".weight")
        if blocks_only and not comfy.startswith(("double_blocks.", "single_blocks.")):
            continue
        n = rules["state_dict_prefix"] + comfy
        w = params[module + ".weight"]
        if w.ndim >= 2:
            up, down = _randn((w.shape[0], rank), g, dtype=dtype), _randn((rank, math.prod(w.shape[1:])), g, dtype=dtype)
            sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"] = up, down
            sd[f"{n}.alpha"] = torch.tensor(trainer["alpha"], dtype=dtype)
            expected[module + ".weight"] = (up.float() @ down.float()).reshape(w.shape) * (trainer["alpha"] / rank)
        else:
            sd[f"{n}.diff"] = _randn(w.shape, g, dtype=dtype)
            expected[module + ".weight"] = sd[f"{n}.diff"].float()
        if module + ".bias" in params:
            sd[f"{n}.diff_b"] = _randn(params[module + ".bias"].shape, g, dtype=dtype)
            expected[module + ".bias"] = sd[f"{n}.diff_b"].float()
    save_file(sd, str(path))
    return Foreign(path.stem, path, expected)


# ----------------------------------------------------------------------------------------------- diffusion-pipe (PEFT)


def diffusion_pipe_adapter(model: HunyuanVideoDiT, folder: Path, rank=4, lora_alpha=None, seed=0, targets=None,
                           **peft_options) -> Foreign:
    """diffusion-pipe's HunyuanVideo LoRA: PEFT on the official model's Linears inside the double and single blocks (or
    on `targets`), lora_alpha = rank (it forces that), saved as folder/adapter_model.safetensors with `diffusion_model.`
    + the parameter names without `.default`, and PEFT's adapter_config.json beside; `peft_options` (use_rslora,
    rank_pattern, alpha_pattern) go to PEFT's LoraConfig. The expected change is PEFT's own merge, and `scales` PEFT's
    scale of each module."""
    import peft

    targets = targets or sorted(name for name, m in model.named_modules()
                                if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")))
    config = peft.LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha, lora_dropout=0.0, bias="none",
                             target_modules=targets, **peft_options)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    target = copy.deepcopy(model)
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(target, config)
    scales = {t: target.get_submodule(t).scaling["default"] for t in targets}
    with torch.no_grad():
        for name, p in target.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = {"diffusion_model." + name.replace(".default", ""): p.detach().clone().contiguous()
             for name, p in target.named_parameters() if p.requires_grad}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    merged = wrapped.merge_and_unload().state_dict()
    expected = {k: merged[k].float() - base[k].float() for k in base if not torch.equal(merged[k], base[k])}
    return Foreign(folder.name, folder / "adapter_model.safetensors", expected, scales=scales)


# ----------------------------------------------------------------------------------------------- hand-made entry kinds


def entry_kinds_file(model: HunyuanVideoDiT, path: Path, seed=0) -> Foreign:
    """LoRA entries other than pairs, in the namings ComfyUI maps: LyCORIS norm entries (.w_norm/.b_norm), a full weight
    .diff, a bias .diff_b, a .set_weight of an RMSNorm scale (under ComfyUI's name for it), and a conv LoRA on img_in in
    kohya LoCon's layout (lora_down (rank, C, kt, kh, kw), lora_up (out, rank, 1, 1, 1))."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    sd, expected, replaced = {}, {}, {}
    norm = "txt_in.individual_token_refiner.blocks.0.norm1"
    kohya_norm = "lora_unet_" + norm.replace(".", "_")
    sd[f"{kohya_norm}.w_norm"], sd[f"{kohya_norm}.b_norm"] = _randn(params[norm + ".weight"].shape, g), _randn(params[norm + ".bias"].shape, g)
    expected[norm + ".weight"], expected[norm + ".bias"] = sd[f"{kohya_norm}.w_norm"], sd[f"{kohya_norm}.b_norm"]
    sd["diffusion_model.single_blocks.0.linear2.diff"] = _randn(params["single_blocks.0.linear2.weight"].shape, g)
    expected["single_blocks.0.linear2.weight"] = sd["diffusion_model.single_blocks.0.linear2.diff"]
    sd["diffusion_model.double_blocks.0.img_attn.proj.diff_b"] = _randn(params["double_blocks.0.img_attn_proj.bias"].shape, g)
    expected["double_blocks.0.img_attn_proj.bias"] = sd["diffusion_model.double_blocks.0.img_attn.proj.diff_b"]
    scale = comfy_param_name("double_blocks.1.img_attn_q_norm.weight")
    sd[f"diffusion_model.{scale}.set_weight"] = 1 + _randn(params["double_blocks.1.img_attn_q_norm.weight"].shape, g)
    replaced["double_blocks.1.img_attn_q_norm.weight"] = sd[f"diffusion_model.{scale}.set_weight"]
    w = params["img_in.proj.weight"]
    rank = 3
    down, up = _randn((rank, *w.shape[1:]), g), _randn((w.shape[0], rank, 1, 1, 1), g)
    sd["lora_unet_img_in_proj.lora_down.weight"], sd["lora_unet_img_in_proj.lora_up.weight"] = down, up
    sd["lora_unet_img_in_proj.alpha"] = torch.tensor(6.0)
    expected["img_in.proj.weight"] = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (6.0 / rank)
    save_file(sd, str(path))
    return Foreign(path.stem, path, expected, replaced)


def prefixed_pairs_file(model: HunyuanVideoDiT, path: Path, prefix="transformer", seed=0) -> Foreign:
    """`transformer.` + official names with lora_A/lora_B and an .alpha per module (another trainer's layout)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    sd, expected = {}, {}
    for module in ("double_blocks.0.img_attn_qkv", "double_blocks.1.txt_mlp.fc2", "single_blocks.1.linear1", "final_layer.linear",
                   "txt_in.individual_token_refiner.blocks.1.mlp.fc1", "time_in.mlp.0"):
        w = params[module + ".weight"]
        a, b = _randn((2, w.shape[1]), g, 0.3), _randn((w.shape[0], 2), g, 0.3)
        sd[f"{prefix}.{module}.lora_A.weight"], sd[f"{prefix}.{module}.lora_B.weight"] = a, b
        sd[f"{prefix}.{module}.alpha"] = torch.tensor(5.0)
        expected[module + ".weight"] = b @ a * (5.0 / 2)
    save_file(sd, str(path))
    return Foreign(path.stem, path, expected)
