"""LoRA key namings of HunyuanVideo and the exact conversions between them.

- kohya (ours, musubi-tuner, sd-scripts): `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`
- "other" (diffusion-pipe, diffusers' loader for original-format files): `diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight`,
  `.lora_B.weight`, no alpha: the scale alpha/rank is folded into A and B (sqrt each)
- diffusers / PEFT on diffusers' transformer: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`; q, k, v (and the
  single blocks' MLP input) are separate Linears that the official model fuses, so their LoRAs are fused exactly:
  down = [A_q; A_k; A_v], up = block-diagonal(B_q, B_k, B_v).
"""

from __future__ import annotations

import json
import logging
import re

import torch

from musubi_tuner.errors import UserError

logger = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
OTHER_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.")

# kohya names cannot be split back on "_" blindly; these are the module paths of the official DiT.
_KOHYA_PATTERNS = [
    (re.compile(r"double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj)"), r"double_blocks.\1.\2_\3"),
    (re.compile(r"double_blocks_(\d+)_(img|txt)_mlp_(fc1|fc2)"), r"double_blocks.\1.\2_mlp.\3"),
    (re.compile(r"double_blocks_(\d+)_(img|txt)_mod_linear"), r"double_blocks.\1.\2_mod.linear"),
    (re.compile(r"single_blocks_(\d+)_(linear1|linear2)"), r"single_blocks.\1.\2"),
    (re.compile(r"single_blocks_(\d+)_modulation_linear"), r"single_blocks.\1.modulation.linear"),
    (re.compile(r"txt_in_individual_token_refiner_blocks_(\d+)_(self_attn_qkv|self_attn_proj)"), r"txt_in.individual_token_refiner.blocks.\1.\2"),
    (re.compile(r"txt_in_individual_token_refiner_blocks_(\d+)_mlp_(fc1|fc2)"), r"txt_in.individual_token_refiner.blocks.\1.mlp.\2"),
    (re.compile(r"txt_in_individual_token_refiner_blocks_(\d+)_adaLN_modulation_1"), r"txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1"),
    (re.compile(r"final_layer_(linear)"), r"final_layer.\1"),
    (re.compile(r"(time_in|guidance_in)_mlp_(0|2)"), r"\1.mlp.\2"),
    (re.compile(r"vector_in_(in_layer|out_layer)"), r"vector_in.\1"),
    (re.compile(r"txt_in_input_embedder"), r"txt_in.input_embedder"),
    (re.compile(r"txt_in_t_embedder_mlp_(0|2)"), r"txt_in.t_embedder.mlp.\1"),
    (re.compile(r"txt_in_c_embedder_(linear_1|linear_2)"), r"txt_in.c_embedder.\1"),
    (re.compile(r"final_layer_adaLN_modulation_1"), r"final_layer.adaLN_modulation.1"),
]

# ComfyUI keeps HunyuanVideo in memory under Flux's module names (comfy/ldm/hunyuan_video/model.py builds it from
# comfy/ldm/flux/layers.py): official -> ComfyUI names of the Linear layers, by the container they sit in.
_COMFY_LEAVES = {
    r"double_blocks\.\d+": {f"{s}_{official}": f"{s}_{comfy}" for s in ("img", "txt") for official, comfy in (
        ("attn_qkv", "attn.qkv"), ("attn_proj", "attn.proj"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2"), ("mod.linear", "mod.lin"))},
    r"single_blocks\.\d+": {"modulation.linear": "modulation.lin"},
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


def kohya_to_module_path(name: str) -> str:
    """`lora_unet_double_blocks_0_img_mlp_fc1` -> `double_blocks.0.img_mlp.fc1`."""
    body = name.removeprefix(KOHYA_PREFIX)
    for rx, repl in _KOHYA_PATTERNS:
        if rx.fullmatch(body):
            return rx.sub(repl, body)
    raise UserError(f"LoRA module {name!r} names no layer of the HunyuanVideo DiT")


def require_hunyuan_modules(kohya: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Refuse a kohya-named LoRA whose modules are not HunyuanVideo layers (SDXL, Flux and Wan LoRAs share the prefix)."""
    for key in kohya:
        name = key.split(".", 1)[0]
        try:
            kohya_to_module_path(name)
        except UserError:
            raise UserError(f"{source}: a LoRA for another model: its module {name!r} names no layer of the HunyuanVideo DiT") from None
    return kohya


def module_path_to_kohya(path: str) -> str:
    return KOHYA_PREFIX + path.replace(".", "_")


def detect_naming(keys) -> str:
    keys = list(keys)
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(".transformer_blocks." in k or ".single_transformer_blocks." in k or k.startswith(("transformer_blocks.", "single_transformer_blocks."))
           for k in keys):
        return "diffusers"
    if any(("double_blocks." in k or "single_blocks." in k) and (".lora_A." in k or ".lora_B." in k or ".lora_down." in k) for k in keys):
        return "other"
    return "unknown"


def to_kohya(weights: dict[str, torch.Tensor], source: str = "LoRA", mlp_hidden: int | None = None,
             ignored: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Any understood naming -> kohya naming, exactly (same product up @ down * alpha / rank per module).

    Keys that feed no module are left out, and appended to `ignored` when a list is given.
    """
    ignored = [] if ignored is None else ignored
    naming = detect_naming(weights)
    if naming == "kohya":
        ignored += [k for k in weights if not k.startswith(KOHYA_PREFIX)]
        return {k: v for k, v in weights.items() if k.startswith(KOHYA_PREFIX)}
    if naming == "other":
        return _other_to_kohya(weights, ignored)
    if naming == "diffusers":
        return _diffusers_to_kohya(weights, mlp_hidden, ignored)
    sample = ", ".join(list(weights)[:4])
    raise UserError(f"{source}: not a HunyuanVideo LoRA in any naming we know (kohya lora_unet_*, "
                    f"diffusion_model.*.lora_A/B, diffusers transformer.*); first keys: {sample}")


def kohya_to_other(weights: dict[str, torch.Tensor], prefix: str = "diffusion_model") -> dict[str, torch.Tensor]:
    """kohya -> "other": A = down * sqrt(alpha/rank), B = up * sqrt(alpha/rank), no alpha keys."""
    out = {}
    for name, down, up, alpha in _kohya_modules(weights):
        path = kohya_to_module_path(name)
        factor = (alpha / down.shape[0]) ** 0.5
        out[f"{prefix}.{path}.lora_A.weight"] = (down.float() * factor).to(down.dtype)
        out[f"{prefix}.{path}.lora_B.weight"] = (up.float() * factor).to(up.dtype)
    return out


def _kohya_modules(weights):
    for key, down in weights.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up = weights[f"{name}.lora_up.weight"]
            alpha = float(weights[f"{name}.alpha"]) if f"{name}.alpha" in weights else float(down.shape[0])
            yield name, down, up, alpha


def _strip_other_prefix(key: str) -> str:
    for prefix in OTHER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _other_to_kohya(weights: dict[str, torch.Tensor], ignored: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        body = _strip_other_prefix(key)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight", body)
        if not m:
            if not body.endswith(".alpha"):  # alphas are read with their A weight below
                logger.warning("LoRA key %s ignored (not a LoRA A/B weight)", key)
                ignored.append(key)
            continue
        path, part = m.groups()
        name = module_path_to_kohya(comfy_to_official(path))
        out[f"{name}.{'lora_down' if part in ('lora_A', 'lora_down') else 'lora_up'}.weight"] = t
        alpha_key = next((k for k in (f"{key.rsplit('.lora_', 1)[0]}.alpha",) if k in weights), None)
        if part in ("lora_A", "lora_down"):
            out[f"{name}.alpha"] = weights[alpha_key].float() if alpha_key else torch.tensor(float(t.shape[0]))
    return out


# diffusers module (relative to a block) -> (official module, part index, number of parts)
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1), "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp.fc1", None), "ff.net.2": ("img_mlp.fc2", None),
    "ff_context.net.0.proj": ("txt_mlp.fc1", None), "ff_context.net.2": ("txt_mlp.fc2", None),
    "norm1.linear": ("img_mod.linear", None), "norm1_context.linear": ("txt_mod.linear", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation.linear", None),
}
_DIFFUSERS_REFINER = {
    "attn.to_q": ("self_attn_qkv", 0), "attn.to_k": ("self_attn_qkv", 1), "attn.to_v": ("self_attn_qkv", 2),
    "attn.to_out.0": ("self_attn_proj", None), "ff.net.0.proj": ("mlp.fc1", None), "ff.net.2": ("mlp.fc2", None),
    "norm_out.linear": ("adaLN_modulation.1", None),
}


# (diffusers block list, its table, the official block list)
_DIFFUSERS_CONTAINERS = (
    ("transformer_blocks", _DIFFUSERS_DOUBLE, "double_blocks"),
    ("single_transformer_blocks", _DIFFUSERS_SINGLE, "single_blocks"),
    ("context_embedder.token_refiner.refiner_blocks", _DIFFUSERS_REFINER, "txt_in.individual_token_refiner.blocks"),
)
_DIFFUSERS_TOP = {
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


def _diffusers_to_kohya(weights: dict[str, torch.Tensor], mlp_hidden: int | None, ignored: list[str]) -> dict[str, torch.Tensor]:
    # Collect (A, B, scale) per diffusers module, grouped by the official module they belong to.
    groups: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in weights:  # B weights and alphas are read with their A weight below
        if not re.fullmatch(r".+\.(lora_A|lora_B)(?:\.default)?\.weight|.+\.alpha", key):
            ignored.append(key)
    for key, a in weights.items():
        m = re.fullmatch(r"(.+)\.lora_A(?:\.default)?\.weight", _strip_other_prefix(key))
        if not m:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        alpha_key = _alpha_key(key)
        if b_key not in weights:
            raise UserError(f"LoRA key {key} has no matching lora_B weight")
        target = diffusers_to_official(m.group(1))
        if target is None:
            logger.warning("LoRA module %s has no counterpart in the official DiT; ignored", m.group(1))
            ignored += [k for k in (key, b_key, alpha_key) if k in weights]
            continue
        module, part = target
        b = weights[b_key]
        if module == "final_layer.adaLN_modulation.1":  # diffusers orders this output (scale, shift); official (shift, scale)
            b = torch.cat(b.chunk(2, dim=0)[::-1])
        scale = float(weights[alpha_key]) / a.shape[0] if alpha_key in weights else 1.0
        groups.setdefault(module, {})[part] = (a.float(), b.float() * scale)

    out: dict[str, torch.Tensor] = {}
    for module, parts in groups.items():
        if None in parts:
            down, up = parts[None]
        else:
            down, up = _fuse(parts, 4 if module.endswith("linear1") else 3, mlp_hidden)
        name = module_path_to_kohya(module)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # scales are folded into up
    return out


def _alpha_key(a_key: str) -> str:
    """`x.lora_A.weight` / `x.lora_A.default.weight` -> `x.alpha`."""
    return re.sub(r"\.lora_A(\.default)?\.weight$", ".alpha", a_key)


def peft_alphas(weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """`.alpha` tensors for a diffusers/PEFT file whose scale lives in diffusers' `lora_adapter_metadata`.

    PEFT files carry no alpha tensors; diffusers saves the LoraConfig (lora_alpha, alpha_pattern) in the
    safetensors metadata instead, prefixed `transformer.` by the pipelines' savers. Without it the scale is 1.
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw or detect_naming(weights) != "diffusers":
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    lora_alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
    patterns = config.get("transformer.alpha_pattern", config.get("alpha_pattern")) or {}
    alphas = {}
    for key in weights:
        m = re.fullmatch(r"(?:transformer\.)?(.+)\.lora_A(?:\.default)?\.weight", key)
        alpha_key = _alpha_key(key)
        if not m or alpha_key in weights:
            continue
        # PEFT matches a pattern against the end of the module path
        alpha = next((a for p, a in patterns.items() if re.fullmatch(rf"(.*\.)?{p}", m.group(1))), lora_alpha)
        if alpha is not None:
            alphas[alpha_key] = torch.tensor(float(alpha))
    return alphas


def _fuse(parts: dict[int, tuple[torch.Tensor, torch.Tensor]], n_parts: int, mlp_hidden: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LoRA of a Linear whose output rows are its parts' outputs stacked (q, k, v[, mlp]); missing parts are zero."""
    in_features = next(iter(parts.values()))[0].shape[1]
    hidden = in_features  # q, k and v each map the hidden size to itself
    sizes = [hidden] * 3
    if n_parts == 4:
        sizes.append(parts[3][1].shape[0] if 3 in parts else (mlp_hidden or 4 * hidden))
    rank = sum(a.shape[0] for a, _ in parts.values())
    down = torch.zeros(rank, in_features)
    up = torch.zeros(sum(sizes), rank)
    r = 0
    for p in range(n_parts):
        if p in parts:
            a, b = parts[p]
            row = sum(sizes[:p])
            down[r : r + a.shape[0]] = a
            up[row : row + sizes[p], r : r + a.shape[0]] = b
            r += a.shape[0]
    return down, up
