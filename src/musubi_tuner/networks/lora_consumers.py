"""Which entries of a LoRA file each program that loads HunyuanVideo LoRAs applies, and which it drops.

Each consumer's rules, as read in its source (docs/lora_formats.md has them in prose, with the sources), applied
to the file's keys against every parameter of the model the consumer builds (Linears, the img_in Conv3d, norms):

- ours: `networks.lora_reader` (every naming and entry kind it documents); a file with anything it cannot apply
  is refused, as merging and generation refuse it.
- musubi: musubi-tuner's hv_generate_video.py and merge_lora.py build the network from the file as is:
  `lora_unet_<module path with _>` with `.lora_down.weight`, `.lora_up.weight` and a required `.alpha`,
  for Linears inside the double and single blocks. Other keys are ignored without a word.
- comfyui: ComfyUI's native loader (`comfy.sd.load_lora_for_models`): a key map from its model's state dict
  (Flux-style names; `lora_unet_` + name with `_`, `diffusion_model.` + name, and for HunyuanVideo the official
  names under `transformer.` / `diffusion_model.`), then `comfy.lora.load_lora`: per mapped name its alpha, one
  adapter (LoRA pairs in several namings, LoHa, LoKr, GLoRA), `.w_norm`/`.b_norm`, `.diff`, `.diff_b`,
  `.set_weight`, one patch per model weight (a later entry for the same weight replaces an earlier one); every key
  not read is logged "lora key not loaded".
- kijai, kijai_blocks: kijai's ComfyUI-HunyuanVideoWrapper (`HyVideoModelLoader`): renames `transformer.` to
  `diffusion_model.` and `img_attn.qkv/.proj`, `txt_attn.qkv` to the official names; with its block-selection node
  (`HyVideoLoraBlockEdit`) keeps only `double_blocks.` / `single_blocks.` keys and splits each at
  `diffusion_model.`; then ComfyUI's loader on its model, whose names are the official ones (generic key map only).
- diffusers: networks.lora_diffusers_rules.
"""

from __future__ import annotations

import re

import torch

from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.networks.lora_coverage import Coverage, Model, numel, shape_of
from musubi_tuner.networks.lora_diffusers_rules import diffusers_coverage
from musubi_tuner.networks.lora_naming import (
    KOHYA_PREFIX, comfy_param, module_path_to_kohya, module_template, official_module, official_to_comfy,
)
from musubi_tuner.networks.lora_reader import diverged, first_non_finite, non_finite_words, parse_lora

CONSUMERS = ("ours", "musubi", "comfyui", "kijai", "kijai_blocks", "diffusers")
CONSUMER_TITLES = {"ours": "this toolkit", "musubi": "musubi-tuner", "comfyui": "ComfyUI", "kijai": "kijai wrapper",
                   "kijai_blocks": "kijai + blocks", "diffusers": "diffusers"}
CONSUMER_DETAILS = {"kijai": "kijai's ComfyUI-HunyuanVideoWrapper, HunyuanVideo Lora Select",
                    "kijai_blocks": "kijai's wrapper with its HunyuanVideo Lora Block Edit node"}


# ----------------------------------------------------------------------------------------------- consumers


def coverage(consumer: str, weights: dict[str, torch.Tensor], model: Model | DiTConfig | None = None) -> Coverage:
    """`consumer`'s treatment of a LoRA file's tensors (as stored), against `model` (default: the released model's
    blocks, shapes not checked; a DiTConfig checks shapes too)."""
    rules = {"ours": _ours, "musubi": _musubi, "comfyui": _comfyui, "kijai": _kijai, "kijai_blocks": _kijai_blocks,
             "diffusers": diffusers_coverage}
    if consumer not in rules:
        raise ValueError(f"unknown consumer {consumer!r}; one of {CONSUMERS}")
    if model is None:
        model = Model()
    elif isinstance(model, DiTConfig):
        model = Model(model, shapes_known=True)
    return rules[consumer](weights, model)


def _ours(weights, model: Model) -> Coverage:
    cov = Coverage("ours", len(weights))
    bad = first_non_finite(weights)
    if bad is not None:
        cov.fatal = f"{non_finite_words(bad, weights[bad])}: refused"
        return cov
    contents = parse_lora(weights, say=False)  # (the file's own reading said what is to say of it)
    too_large = diverged(contents.patches)
    if too_large is not None:
        cov.fatal = f"{too_large}: refused"
        return cov
    for p in contents.problems:
        for key in p.keys:
            cov.dropped[key] = p.message
    if not contents.patches:
        cov.fatal = contents.problems[0].message if contents.problems else "no LoRA entries"
        cov.dropped = {}
        return cov
    for patch in contents.patches:
        if patch.param not in model.params:
            cov.fatal = f"{patch.param} does not exist in this DiT: merging and generation refuse the file"
            return cov
        if not model.fits(patch.param, patch.shape):
            cov.fatal = f"{patch.module} is {list(patch.shape)} in the LoRA but {list(model.params[patch.param])} in the DiT"
            return cov
    if cov.dropped:
        cov.fatal = f"it refuses the file (--allow_partial_lora applies the rest): {next(iter(cov.dropped.items()))[1]}"
    used = {k for patch in contents.patches for k in patch.keys}
    cov.applied = [k for k in weights if k in used]
    cov.modules = sorted({p.param for p in contents.patches})
    return cov


def _musubi(weights, model: Model) -> Coverage:
    cov = Coverage("musubi", len(weights))
    targets = {module_path_to_kohya(p.removesuffix(".weight")): p.removesuffix(".weight") for p in model.params
               if p.endswith(".weight") and re.match(r"(double|single)_blocks\.\d+\.", p)
               and module_template(p.removesuffix(".weight")).weight_ndim == 2}
    modules = set()
    for key in weights:
        name, _, suffix = key.partition(".")
        lora_module = f"{name}.lora_down.weight" in weights or f"{name}.lora_up.weight" in weights
        if name in targets and (suffix in ("lora_down.weight", "lora_up.weight") or suffix == "alpha" and lora_module):
            cov.applied.append(key)
            modules.add(targets[name])
        elif not key.startswith(KOHYA_PREFIX):
            cov.dropped[key] = "musubi-tuner reads only kohya names (lora_unet_*); convert_lora.py --target default converts"
        elif name in targets and (suffix.startswith(("hada_", "lokr_")) or suffix == "alpha"):
            cov.dropped[key] = ("musubi-tuner's merge_lora.py and hv_generate_video.py read LoRA modules only: LoHa/LoKr need its "
                                "hv_generate_video.py --lycoris with the LyCORIS package installed")
        elif name in targets:
            cov.dropped[key] = f"musubi-tuner reads only .lora_down.weight, .lora_up.weight and .alpha, not .{suffix}"
        elif module_path_to_kohya(official_module(name) or "-") in targets:
            cov.dropped[key] = f"musubi-tuner matches official names only: this layer is {module_path_to_kohya(official_module(name))}"
        else:
            cov.dropped[key] = "musubi-tuner applies LoRAs only to Linears inside the double and single blocks"
    built = {k.partition(".")[0] for k in cov.applied if k.endswith(".lora_down.weight")}
    no_alpha = sorted(n for n in built if f"{n}.alpha" not in weights)
    if no_alpha:
        cov.fatal = f"it needs an .alpha for every module and stops with a KeyError (none for {no_alpha[0]})"
    cov.modules = sorted(modules)
    return cov


# ComfyUI's adapters (comfy/weight_adapter): for a mapped name x, the LoRA pairs (up, down) in the order it tries
# them (the first present wins; lora_mid only beside lora_up/lora_down), then LoHa, LoKr and GLoRA tensors.
COMFY_LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"), (".lora_B", ".lora_A"),
                    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                    (".lora_B.default.weight", ".lora_A.default.weight"))
COMFY_LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")
COMFY_LOKR = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
COMFY_GLORA = (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")
# For HunyuanVideo it also maps diffusion-pipe names: its own names turned back into the official ones by these.
COMFY_LORA_OFFICIAL = (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                       ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear."))


def comfy_state_dict_keys(model: Model, comfy_names: bool = True) -> dict[str, str]:
    """The state-dict keys of the model ComfyUI patches (`diffusion_model.` + its names) -> official parameter."""
    return {f"diffusion_model.{comfy_param(p) if comfy_names else p}": p for p in model.params}


def comfy_key_map(sd_keys, hunyuan_video: bool = True) -> dict[str, str]:
    """`model_lora_keys_unet` for a HunyuanVideo model: LoRA module key -> the state-dict key it patches, in ComfyUI's order."""
    key_map = {}
    for k in sd_keys:
        if k.endswith(".weight"):
            key_map[KOHYA_PREFIX + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    if hunyuan_video:  # comfy.model_base.HunyuanVideo: the diffusion-pipe format
        for k in sd_keys:
            if k.endswith(".weight"):
                renamed = k
                for comfy_part, official_part in COMFY_LORA_OFFICIAL:
                    renamed = renamed.replace(comfy_part, official_part)
                body = renamed[len("diffusion_model."):-len(".weight")]
                key_map[f"transformer.{body}"] = k
                key_map[f"diffusion_model.{body}"] = k
    return key_map


class LoaderKeyError(Exception):
    """ComfyUI's loader indexing the file with a key it lacks (`lora[B_name]` for the down half of a pair whose up it
    found, a LoHa factor beside hada_w1_a): the load stops with a KeyError."""

    def __init__(self, present: str, missing: str):
        super().__init__(missing)
        self.present, self.missing = present, missing


def comfy_load(keys, key_map: dict[str, str]) -> tuple[set[str], dict[str, tuple[str, list[str]]]]:
    """`comfy.lora.load_lora`: (keys read, patch per state-dict key: (kind, the keys it came from)); later entries win.
    Raises LoaderKeyError where ComfyUI stops with a KeyError (an up weight without its down weight, a LoHa without one
    of its factors)."""
    keys = set(keys)
    loaded: set[str] = set()
    patches: dict[str, tuple[str, list[str]]] = {}
    for x, target in key_map.items():
        alpha = [x + ".alpha"] if x + ".alpha" in keys else []
        loaded |= set(alpha) | ({x + ".dora_scale"} & keys)
        for up, down in COMFY_LORA_PAIRS:
            if x + up in keys:
                if x + down not in keys:
                    raise LoaderKeyError(x + up, x + down)
                used = [x + up, x + down] + [x + s for s in (".reshape_weight",) if x + s in keys]
                if up == ".lora_up.weight" and x + ".lora_mid.weight" in keys:
                    used.append(x + ".lora_mid.weight")
                patches[target] = ("lora", used + alpha)
                loaded |= set(used)
                break
        for kind, names, trigger in (("loha", COMFY_LOHA, COMFY_LOHA[:1]), ("lokr", COMFY_LOKR, (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a")),
                                     ("glora", COMFY_GLORA, COMFY_GLORA[:1])):
            if any(x + t in keys for t in trigger):
                if kind == "loha":  # LoHaAdapter.load reads all four factors (and hada_t2 beside a hada_t1)
                    needed = COMFY_LOHA[:4] + ((".hada_t2",) if x + ".hada_t1" in keys else ())
                    if missing := [x + s for s in needed if x + s not in keys]:
                        raise LoaderKeyError(x + COMFY_LOHA[0], missing[0])
                used = [x + s for s in names if x + s in keys]
                patches[target] = (kind, used + alpha)
                loaded |= set(used)
        bias = target[: -len(".weight")] + ".bias"
        if x + ".w_norm" in keys:
            patches[target] = ("diff", [x + ".w_norm"])
            loaded.add(x + ".w_norm")
            if x + ".b_norm" in keys:
                patches[bias] = ("diff", [x + ".b_norm"])
                loaded.add(x + ".b_norm")
        for suffix, to, kind in ((".diff", target, "diff"), (".diff_b", bias, "diff"), (".set_weight", target, "set")):
            if x + suffix in keys:
                patches[to] = (kind, [x + suffix])
                loaded.add(x + suffix)
    return loaded, patches


def _comfy_coverage(consumer: str, weights, model: Model, key_map: dict[str, str], sd_to_official: dict[str, str],
                    renamed: dict[str, str] | None = None, reasons: dict[str, str] | None = None) -> Coverage:
    """ComfyUI's loader on `weights` (keys after the consumer's renames `renamed`: new -> original key)."""
    cov = Coverage(consumer, len(weights))
    cov.dropped.update(reasons or {})
    renamed = renamed if renamed is not None else {k: k for k in weights}
    try:
        loaded, patches = comfy_load(renamed, key_map)
    except LoaderKeyError as e:
        cov.fatal = (f"its loader stops with a KeyError: {renamed[e.present]} has no {e.missing} beside it (it reads every "
                     "factor of each LoRA pair or LoHa it finds)")
        cov.dropped = {}
        return cov
    applied: set[str] = set()
    for target, (kind, keys) in patches.items():
        official = sd_to_official.get(target)
        original = [renamed[k] for k in keys if k in renamed]
        if official is None:  # add_patches: "NOT LOADED" for a weight the model lacks (a bias diff of a layer without bias)
            for k in original:
                cov.dropped[k] = f"{target} does not exist in the model (logged NOT LOADED)"
            continue
        if kind in ("loha", "lokr"):
            shape = _lycoris_shape(kind, {k[len(k.rsplit(".", 1)[0]) + 1:]: weights[o] for k, o in zip(keys, original)})
        elif kind == "glora":
            shape = None
        elif kind == "lora":
            up, down = (weights[k] for k in original[:2])
            shape = (up.shape[0], numel(down.shape[1:])) if up.ndim >= 2 and down.ndim >= 2 else None
        else:
            shape = shape_of(weights[original[0]])
        if not model.fits(official, shape):
            for k in original:
                cov.dropped[k] = f"shape {list(shape)} does not fit {target} {list(model.params[official])} (logged, not merged)"
            continue
        applied |= set(original)
        cov.modules.append(target.removeprefix("diffusion_model."))
    for new, original in renamed.items():
        if original in cov.dropped or original in applied:
            continue
        if new in loaded:
            cov.dropped[original] = ("read, but no patch uses it: an alpha without a pair, or an entry whose weight a later "
                                     "entry patches instead (ComfyUI keeps one patch per weight)")
        else:
            cov.dropped[original] = "lora key not loaded" + _comfy_hint(original)  # ComfyUI's own warning
    cov.applied = [k for k in weights if k in applied]
    cov.modules = sorted(set(cov.modules))
    return cov


def _lycoris_shape(kind: str, t: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(out, in) of the update ComfyUI forms from a LoHa's or LoKr's factors (by entry name), None if it cannot tell."""
    def half(name):  # LoKr's w1 / w2: whole, or as the product _a @ _b
        if name in t:
            return t[name].shape[0], numel(t[name].shape[1:])
        if f"{name}_a" in t and f"{name}_b" in t:
            return t[f"{name}_a"].shape[0], numel(t[f"{name}_b"].shape[1:])
        return None

    if kind == "loha":
        return (t["hada_w1_a"].shape[0], numel(t["hada_w1_b"].shape[1:])) if "hada_w1_b" in t and "hada_w1_a" in t else None
    w1, w2 = half("lokr_w1"), half("lokr_w2")
    return (w1[0] * w2[0], w1[1] * w2[1]) if w1 and w2 else None


def _comfy_hint(key: str) -> str:
    """Why a kohya key misses ComfyUI's model: its layer has another name there."""
    name = key.partition(".")[0]
    if not name.startswith(KOHYA_PREFIX):
        return ""
    official = official_module(name)
    if official is None:
        return ""
    comfy = official_to_comfy(official)
    if comfy == official:
        return ""
    return f": ComfyUI's layer is {comfy}, kohya name {KOHYA_PREFIX}{comfy.replace('.', '_')}"


def _comfyui(weights, model: Model) -> Coverage:
    sd = comfy_state_dict_keys(model)
    return _comfy_coverage("comfyui", weights, model, comfy_key_map(sd), sd)


# kijai's standardize_lora_key_format: (substring, replacement); its txt_attn.proj rule has a trailing space and never matches
KIJAI_RENAMES = (("img_attn.proj", "img_attn_proj"), ("img_attn.qkv", "img_attn_qkv"), ("txt_attn.qkv", "txt_attn_qkv"))


def kijai_renamed(keys) -> tuple[dict[str, str], dict[str, str]]:
    """(renamed key -> original key, dropped original -> why) after kijai's key standardisation."""
    renamed, dropped = {}, {}
    for k in keys:
        new = k.replace("transformer.", "diffusion_model.") if k.startswith("transformer.") else k
        for old, repl in KIJAI_RENAMES:
            new = new.replace(old, repl)
        if new in renamed:
            dropped[renamed[new]] = f"renamed to {new}, as is {k}, which replaces it"
        renamed[new] = k
    return renamed, dropped


def _kijai(weights, model: Model, blocks: bool = False) -> Coverage:
    consumer = "kijai_blocks" if blocks else "kijai"
    renamed, dropped = kijai_renamed(weights)
    if blocks:  # filter_state_dict_by_blocks with every block selected
        kept = {}
        for new, original in renamed.items():
            if "double_blocks." not in new and "single_blocks." not in new:
                dropped[original] = "the block-selection node keeps only keys of double_blocks. and single_blocks."
                continue
            if "diffusion_model." not in new:
                cov = Coverage(consumer, len(weights))
                cov.fatal = f"its block filter splits {original} at 'diffusion_model.', which it lacks (IndexError)"
                return cov
            block = ".".join(new.split("diffusion_model.")[1].split(".", 2)[:2]) + "."
            if not re.fullmatch(r"(double_blocks\.(1?\d)|single_blocks\.([0-3]?\d))\.", block):
                dropped[original] = f"the block-selection node offers no {block}"
                continue
            kept[new] = original
        renamed = kept
    sd = comfy_state_dict_keys(model, comfy_names=False)
    return _comfy_coverage(consumer, weights, model, comfy_key_map(sd, hunyuan_video=False), sd, renamed, dropped)


def _kijai_blocks(weights, model: Model) -> Coverage:
    return _kijai(weights, model, blocks=True)


def model_for(config: DiTConfig | None) -> Model:
    """The model to check against: a DiT's config (shapes checked), or the released model's blocks (names only)."""
    return Model(config, shapes_known=True) if config is not None else Model()

