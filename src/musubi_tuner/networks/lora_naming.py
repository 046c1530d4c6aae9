"""The names a HunyuanVideo DiT layer goes by in the LoRA files of this ecosystem, and the official name of each.

- official (Tencent's code, our DiT, kijai's wrapper, diffusion-pipe): `double_blocks.0.img_attn_qkv`, `img_in.proj`
- ComfyUI's in-memory model (Flux-style, comfy/ldm/hunyuan_video + comfy/ldm/flux/layers.py): `double_blocks.0.img_attn.qkv`,
  `double_blocks.0.img_mlp.0`, `double_blocks.0.img_attn.norm.query_norm` (whose parameter is `scale`, not `weight`)
- kohya (sd-scripts, musubi-tuner): `lora_unet_` + either of the above with `.` replaced by `_`
- prefixed: `diffusion_model.`, `transformer.` or `model.diffusion_model.` + either of the above
- diffusers' transformer: `transformer_blocks.0.attn.to_q`; q, k, v (and the single blocks' MLP input) are separate
  Linears that the official model fuses (`diffusers_to_official` says which part of which layer each one is)

The official module list is read off the model itself (`module_templates`), so every layer with parameters has
its names here: Linears, the `img_in` Conv3d, the token refiner's LayerNorms and the q/k RMSNorms.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import torch

from musubi_tuner.errors import UserError

KOHYA_PREFIX = "lora_unet_"
OTHER_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.")
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.", "")

# the block index of a module path, in either separator (double_blocks.3. / double_blocks_3_)
_BLOCK_INDEX = re.compile(r"(blocks[._])(\d+)(?=[._]|$)")

# what only a LoRA file's keys hold (a LoRA pair, LoHa's or LoKr's first factor): a file given where a model belongs
_LORA_MARKERS = (".lora_down.", ".lora_A.", ".hada_w1_a", ".lokr_w1")


LORA_FLAGS = "a LoRA goes to --lora_weight in generation and merging, to --network_weights in training"  # for "not a DiT"


def looks_like_lora(keys) -> bool:
    """Whether these state-dict keys (a sample of a file's) are a LoRA's."""
    return any(marker in k for k in keys for marker in _LORA_MARKERS)


# ComfyUI keeps HunyuanVideo in memory under Flux's module names: official -> ComfyUI name, by the container.
_COMFY_LEAVES = {
    r"double_blocks\.\d+": {f"{s}_{official}": f"{s}_{comfy}" for s in ("img", "txt") for official, comfy in (
        ("attn_qkv", "attn.qkv"), ("attn_proj", "attn.proj"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"), ("mod.linear", "mod.lin"),
        ("attn_q_norm", "attn.norm.query_norm"), ("attn_k_norm", "attn.norm.key_norm"))},
    r"single_blocks\.\d+": {"modulation.linear": "modulation.lin", "q_norm": "norm.query_norm", "k_norm": "norm.key_norm"},
    r"txt_in\.individual_token_refiner\.blocks\.\d+": {
        "self_attn_qkv": "self_attn.qkv", "self_attn_proj": "self_attn.proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"},
    r"": {"time_in.mlp.0": "time_in.in_layer", "time_in.mlp.2": "time_in.out_layer",
          "guidance_in.mlp.0": "guidance_in.in_layer", "guidance_in.mlp.2": "guidance_in.out_layer",
          "txt_in.t_embedder.mlp.0": "txt_in.t_embedder.in_layer", "txt_in.t_embedder.mlp.2": "txt_in.t_embedder.out_layer",
          "txt_in.c_embedder.linear_1": "txt_in.c_embedder.in_layer", "txt_in.c_embedder.linear_2": "txt_in.c_embedder.out_layer"},
}


def _rename_leaf(path: str, to_comfy: bool) -> str:
    for container, leaves in _COMFY_LEAVES.items():
        m = re.fullmatch(rf"({container}\.)(.+)", path) if container else re.fullmatch(r"()(.+)", path)
        if m is None:
            continue
        prefix, leaf = m.groups()
        table = leaves if to_comfy else {comfy: official for official, comfy in leaves.items()}
        if leaf in table:
            return prefix + table[leaf]
    return path  # named alike on both sides (img_in.proj, vector_in.in_layer, final_layer.linear, ...)


def official_to_comfy(path: str) -> str:
    """`double_blocks.0.img_mlp.fc1` -> `double_blocks.0.img_mlp.0`: the module's path in ComfyUI's model."""
    return _rename_leaf(path, to_comfy=True)


def comfy_to_official(path: str) -> str:
    """`double_blocks.0.img_attn.qkv` -> `double_blocks.0.img_attn_qkv`; official paths come back unchanged."""
    return _rename_leaf(path, to_comfy=False)


def comfy_param(official_param: str) -> str:
    """An official parameter's name in ComfyUI's model: the RMSNorms' `weight` is Flux's `scale` there."""
    module, leaf = official_param.rsplit(".", 1)
    comfy = official_to_comfy(module)
    return f"{comfy}.{'scale' if comfy.endswith(('query_norm', 'key_norm')) else leaf}"


def comfy_param_to_official(name: str) -> str:
    """comfy_param's inverse: `double_blocks.0.img_attn.norm.query_norm.scale` -> `double_blocks.0.img_attn_q_norm.weight`;
    an official name comes back unchanged."""
    if "." not in name:
        return name
    module, leaf = name.rsplit(".", 1)
    official = comfy_to_official(module)
    return f"{official}.{'weight' if leaf == 'scale' and module.endswith(('query_norm', 'key_norm')) else leaf}"


def module_path_to_kohya(path: str) -> str:
    return KOHYA_PREFIX + path.replace(".", "_")


@dataclasses.dataclass(frozen=True)
class ModuleTemplate:
    """A module of the official DiT that holds parameters; `{i}` stands for a block index."""

    path: str
    params: tuple[str, ...]  # its parameter leaves: ("weight", "bias") or ("weight",)
    weight_ndim: int  # 2 Linear, 5 the img_in Conv3d, 1 a norm
    kernel: tuple[int, ...]  # a convolution's kernel size, () otherwise


@functools.lru_cache(maxsize=1)
def module_templates() -> dict[str, ModuleTemplate]:
    """Every module of the official DiT with parameters, read off the model (on the meta device)."""
    from musubi_tuner.hunyuan.config import HUNYUAN_T2V
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    with torch.device("meta"):
        model = HunyuanVideoDiT(dataclasses.replace(HUNYUAN_T2V, mm_double_blocks_depth=1, mm_single_blocks_depth=1))
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, p in model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        params.setdefault(_BLOCK_INDEX.sub(r"\1{i}", module, count=1), {})[leaf] = tuple(p.shape)
    return {path: ModuleTemplate(path, tuple(leaves), len(leaves["weight"]), leaves["weight"][2:] if len(leaves["weight"]) > 2 else ())
            for path, leaves in params.items()}


@functools.lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    """Every name a LoRA file may give a module (kohya, prefixed or bare; official or ComfyUI) -> official template."""
    aliases: dict[str, str] = {}
    for template in module_templates():
        comfy = _template_of(official_to_comfy(template.replace("{i}", "0")))[0] if "{i}" in template else official_to_comfy(template)
        forms = [template, comfy]
        if comfy.endswith(("query_norm", "key_norm")):
            forms.append(f"{comfy}.scale")  # ComfyUI's key for a parameter that is not called `weight`
        for form in forms:
            aliases[KOHYA_PREFIX + form.replace(".", "_")] = template
            for prefix in ("", *OTHER_PREFIXES):
                aliases[prefix + form] = template
    return aliases


def _template_of(name: str) -> tuple[str, str | None]:
    m = _BLOCK_INDEX.search(name)
    return (name[: m.start(2)] + "{i}" + name[m.end(2):], m.group(2)) if m else (name, None)


def official_module(name: str) -> str | None:
    """The official module a LoRA file's module name means, in any naming but diffusers'; None if it names none.

    `lora_unet_double_blocks_3_img_mlp_0`, `diffusion_model.double_blocks.3.img_mlp.fc1` -> `double_blocks.3.img_mlp.fc1`.
    """
    template, index = _template_of(name)
    official = _aliases().get(template)
    if official is None:
        return None
    return official.replace("{i}", index) if index is not None else official


def module_template(path: str) -> ModuleTemplate:
    """The template of an official module path (`double_blocks.3.img_attn_qkv` -> that of `double_blocks.{i}.img_attn_qkv`)."""
    return module_templates()[_template_of(path)[0]]


def kohya_to_module_path(name: str) -> str:
    """`lora_unet_double_blocks_0_img_mlp_fc1` (or ComfyUI's `..._img_mlp_0`) -> `double_blocks.0.img_mlp.fc1`."""
    path = official_module(name) if name.startswith(KOHYA_PREFIX) else None
    if path is None:
        raise UserError(f"LoRA module {name!r} names no layer of the HunyuanVideo DiT")
    return path


# diffusers module (relative to a block) -> (official module, which of its fused parts or None)
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1), "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp.fc1", None), "ff.net.2": ("img_mlp.fc2", None),
    "ff_context.net.0.proj": ("txt_mlp.fc1", None), "ff_context.net.2": ("txt_mlp.fc2", None),
    "norm1.linear": ("img_mod.linear", None), "norm1_context.linear": ("txt_mod.linear", None),
    "attn.norm_q": ("img_attn_q_norm", None), "attn.norm_k": ("img_attn_k_norm", None),
    "attn.norm_added_q": ("txt_attn_q_norm", None), "attn.norm_added_k": ("txt_attn_k_norm", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation.linear", None),
    "attn.norm_q": ("q_norm", None), "attn.norm_k": ("k_norm", None),
}
_DIFFUSERS_REFINER = {
    "attn.to_q": ("self_attn_qkv", 0), "attn.to_k": ("self_attn_qkv", 1), "attn.to_v": ("self_attn_qkv", 2),
    "attn.to_out.0": ("self_attn_proj", None), "ff.net.0.proj": ("mlp.fc1", None), "ff.net.2": ("mlp.fc2", None),
    "norm_out.linear": ("adaLN_modulation.1", None), "norm1": ("norm1", None), "norm2": ("norm2", None),
}


# (diffusers block list, its table, the official block list)
_DIFFUSERS_CONTAINERS = (
    ("transformer_blocks", _DIFFUSERS_DOUBLE, "double_blocks"),
    ("single_transformer_blocks", _DIFFUSERS_SINGLE, "single_blocks"),
    ("context_embedder.token_refiner.refiner_blocks", _DIFFUSERS_REFINER, "txt_in.individual_token_refiner.blocks"),
)
_DIFFUSERS_TOP = {
    "x_embedder.proj": "img_in.proj",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0", "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer", "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder.proj_in": "txt_in.input_embedder",
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
}


def diffusers_to_official(path: str) -> tuple[str, int | None] | None:
    """diffusers module -> (official module, which of its fused parts or None); None if it has no counterpart."""
    for blocks, table, official_blocks in _DIFFUSERS_CONTAINERS:
        m = re.fullmatch(rf"{re.escape(blocks)}\.(\d+)\.(.+)", path)
        if m and m.group(2) in table:
            module, part = table[m.group(2)]
            return f"{official_blocks}.{m.group(1)}.{module}", part
    if path in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[path], None
    return None


def official_to_diffusers(path: str) -> list[str]:
    """Official module -> the diffusers modules it is split into (q, k, v[, mlp] for fused ones, in order); [] if none."""
    for blocks, table, official_blocks in _DIFFUSERS_CONTAINERS:
        m = re.fullmatch(rf"{re.escape(official_blocks)}\.(\d+)\.(.+)", path)
        if m:
            parts = sorted((part or 0, name) for name, (module, part) in table.items() if module == m.group(2))
            return [f"{blocks}.{m.group(1)}.{name}" for _, name in parts]
    return [d for d, official in _DIFFUSERS_TOP.items() if official == path]
