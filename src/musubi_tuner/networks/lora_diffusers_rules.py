"""diffusers' treatment of a HunyuanVideo LoRA file (the doctor's "diffusers" consumer), from diffusers 0.42.1's source.

`HunyuanVideoLoraLoaderMixin.lora_state_dict` converts files in the original naming (any key containing
`img_attn_qkv`) to its own names with `_convert_hunyuan_video_lora_to_diffusers` (substring renames, q/k/v splits,
single-block linear1 split at a fixed width of 3072), `load_lora_weights` refuses any key without `lora`, and
PEFT then loads `transformer.`-prefixed lora_A/lora_B pairs onto the transformer's modules.
"""

from __future__ import annotations

import re

from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.networks.lora_coverage import Coverage, Model, numel, shape_of
from musubi_tuner.networks.lora_naming import official_to_diffusers

DIFFUSERS_SPLIT_WIDTH = 3072  # _convert_hunyuan_video_lora_to_diffusers splits single-block linear1 at this width
# its renames, applied as substring replacements in this order
DIFFUSERS_RENAMES = (
    ("img_in", "x_embedder"), ("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"), ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"), ("double_blocks", "transformer_blocks"),
    ("img_attn_q_norm", "attn.norm_q"), ("img_attn_k_norm", "attn.norm_k"), ("img_attn_proj", "attn.to_out.0"),
    ("txt_attn_q_norm", "attn.norm_added_q"), ("txt_attn_k_norm", "attn.norm_added_k"), ("txt_attn_proj", "attn.to_add_out"),
    ("img_mod.linear", "norm1.linear"), ("img_norm1", "norm1.norm"), ("img_norm2", "norm2"), ("img_mlp", "ff"),
    ("txt_mod.linear", "norm1_context.linear"), ("txt_norm1", "norm1.norm"), ("txt_norm2", "norm2_context"), ("txt_mlp", "ff_context"),
    ("self_attn_proj", "attn.to_out.0"), ("modulation.linear", "norm.linear"), ("pre_norm", "norm.norm"),
    ("final_layer.norm_final", "norm_out.norm"), ("final_layer.linear", "proj_out"), ("fc1", "net.0.proj"), ("fc2", "net.2"),
    ("input_embedder", "proj_in"),
)
_DIFFUSERS_TXT_IN = (("individual_token_refiner.blocks", "token_refiner.refiner_blocks"), ("adaLN_modulation.1", "norm_out.linear"),
                     ("txt_in", "context_embedder"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                     ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("c_embedder", "time_text_embed.text_embedder"),
                     ("mlp", "ff"))


def _diffusers_modules(model: Model) -> dict[str, tuple[int, ...] | None]:
    """diffusers' transformer modules that PEFT can put a LoRA on -> their (out, in) (None when unknown)."""
    out = {}
    for param, shape in model.params.items():
        if not param.endswith(".weight"):
            continue
        module = param.removesuffix(".weight")
        names = official_to_diffusers(module)
        for i, name in enumerate(names):
            if shape is None or len(names) == 1:
                out[name] = None if shape is None else (shape[0], numel(shape[1:]))
            else:
                rows = _split_rows(module, shape[0], model.config)
                out[name] = (rows[i], shape[1])
    return out


def _split_rows(module: str, out: int, config: DiTConfig) -> list[int]:
    h = config.hidden_size
    return [h, h, h, out - 3 * h] if module.endswith("linear1") else [out // 3] * 3


def diffusers_coverage(weights, model: Model) -> Coverage:
    cov = Coverage("diffusers", len(weights))
    keys = {k: k for k in weights if "dora_scale" not in k}
    for k in weights:
        if "dora_scale" in k:
            cov.dropped[k] = "diffusers filters out DoRA scales"
    shapes = {k: shape_of(weights[k]) for k in keys}
    if any("img_attn_qkv" in k for k in keys):
        converted = _diffusers_convert(keys, shapes, weights, cov)
        if cov.fatal:
            return cov
    else:
        converted = {k: (k, shapes[k]) for k in keys}
    no_lora = [orig for new, (orig, _) in converted.items() if "lora" not in new]
    if no_lora:
        cov.fatal = f"'Invalid LoRA checkpoint': {no_lora[0]} becomes a key without 'lora' in its name"
        cov.dropped = {}
        return cov
    modules = _diffusers_modules(model)
    applied = set()
    for new, (orig, shape) in converted.items():
        if not new.startswith("transformer."):
            cov.dropped[orig] = "diffusers keeps only keys starting with 'transformer.' (the original naming is converted " \
                                "only when some key contains 'img_attn_qkv')"
            continue
        m = re.fullmatch(r"transformer\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", new)
        if m is None or m.group(1) not in modules:
            cov.dropped[orig] = "not a lora_A/lora_B weight of a module of diffusers' HunyuanVideo transformer"
            continue
        if m.group(2).startswith("lora_magnitude_vector"):  # PEFT's DoRA magnitude: PEFT infers use_dora from it and loads
            applied.add(orig)                                # it (fuzz_an 2: said to be dropped)
            continue
        want = modules[m.group(1)]
        lora_a = m.group(2) == "lora_A.weight"
        if want is not None and len(shape) >= 2 and (want[1] if lora_a else want[0]) != (numel(shape[1:]) if lora_a else shape[0]):
            cov.fatal = f"PEFT stops on a size mismatch: {orig} becomes {new} {list(shape)} for a layer of {list(want)}"
            cov.dropped = {}
            return cov
        applied.add(orig)
        cov.modules.append(m.group(1))
    for orig in list(applied):
        if orig in cov.dropped:
            applied.discard(orig)
    cov.applied = [k for k in weights if k in applied]
    cov.modules = sorted(set(cov.modules))
    return cov


def _diffusers_convert(keys: dict[str, str], shapes, weights, cov: Coverage) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`_convert_hunyuan_video_lora_to_diffusers` on key names and shapes: new key -> (original key, shape)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for orig in keys:
        key = orig
        for prefix in ("transformer.", "diffusion_model."):
            key = key.removeprefix(prefix)
        for old, new in DIFFUSERS_RENAMES:
            key = key.replace(old, new)
        shape = shapes[orig]
        results = [(key, shape)]
        if "txt_in" in key:
            results = _diffusers_txt_in(key, shape, orig, cov)
        elif "img_attn_qkv" in key or "txt_attn_qkv" in key:
            stream = "img_attn_qkv" if "img_attn_qkv" in key else "txt_attn_qkv"
            names = ("attn.to_q", "attn.to_k", "attn.to_v") if stream == "img_attn_qkv" else ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
            if "lora_A" in key:
                results = [(key.replace(stream, n), shape) for n in names]
            else:
                if not shape:
                    cov.fatal = f"its converter cuts {orig} in three as a q/k/v lora_B, and it is a scalar (RuntimeError)"
                    return {}
                results = [(key.replace(stream, n), (shape[0] // 3, *shape[1:])) for n in names]
        elif "single_blocks" in key:
            results = _diffusers_single(key, shape, orig, weights, cov)
        elif "final_layer.adaLN_modulation.1" in key:
            results = [(key.replace("final_layer.adaLN_modulation.1", "norm_out.linear"), shape)]
            cov.dropped[orig] = "diffusers' converter swaps the halves of lora_A as well as lora_B here, which changes the update"
        if cov.fatal:
            return {}
        for new, s in results:
            out[f"transformer.{new}"] = (orig, s)
    return out


def _diffusers_txt_in(key: str, shape, orig: str, cov: Coverage):
    def rename(k):
        for old, new in _DIFFUSERS_TXT_IN:
            k = k.replace(old, new)
        return k

    if "self_attn_qkv" not in key:
        return [(rename(key), shape)]
    if not shape:
        cov.fatal = f"its converter cuts {orig} in three as a q/k/v weight, and it is a scalar (RuntimeError)"
        return []
    if "lora_A" in key:  # (unlike the double blocks' q/k/v, whose lora_A it shares: the doctor said 100%: fuzz_an 1)
        cov.fatal = (f"its converter cuts {orig} in three as well as its lora_B, which leaves each part's rank a third of its "
                     "lora_B's (a ValueError, or PEFT's size mismatch): no LoRA of the token refiner's self_attn_qkv loads")
        return []
    return [(rename(key.replace("self_attn_qkv", n)), (shape[0] // 3, *shape[1:])) for n in ("attn.to_q", "attn.to_k", "attn.to_v")]


def _diffusers_single(key: str, shape, orig: str, weights, cov: Coverage):
    base = key.replace("single_blocks", "single_transformer_blocks")
    if "linear1.lora_A.weight" in key:
        stem = base.removesuffix(".linear1.lora_A.weight")
        return [(f"{stem}.{n}.lora_A.weight", shape) for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    if "linear1.lora_B.weight" in key:
        a_key = orig.replace("lora_B", "lora_A")
        width = weights[a_key].shape[1] if a_key in weights else None
        if shape[0] < 3 * DIFFUSERS_SPLIT_WIDTH or width not in (None, DIFFUSERS_SPLIT_WIDTH):
            cov.fatal = (f"its converter splits {orig} at a width of {DIFFUSERS_SPLIT_WIDTH}, and this LoRA's width is {width} "
                         f"({list(shape)}): it stops with an error")
            if width is not None and width < DIFFUSERS_SPLIT_WIDTH:
                cov.other_size = (f"its HunyuanVideo converter is written for the released DiT's width of {DIFFUSERS_SPLIT_WIDTH:,}, "
                                  f"and this LoRA is {width} wide (a test or demo model)")
            return []
        stem = base.removesuffix(".linear1.lora_B.weight")
        w = DIFFUSERS_SPLIT_WIDTH
        sizes = (w, w, w, shape[0] - 3 * w)
        return [(f"{stem}.{n}.lora_B.weight", (s, *shape[1:])) for n, s in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), sizes)]
    return [(base.replace("linear2", "proj_out").replace("q_norm", "attn.norm_q").replace("k_norm", "attn.norm_k"), shape)]
