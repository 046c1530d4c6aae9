"""Which weights of a LoRA file each program that loads HunyuanVideo LoRAs applies, and which it drops.

Each consumer's mapping rules, as read in its source (docs/lora_formats.md has them in prose, with the
sources), applied to the file's key names:

- ours: every naming `networks.lora_naming` reads (kohya, "other", diffusers/PEFT); a module that is not
  in the DiT makes merging refuse the whole file.
- musubi: musubi-tuner's hv_generate_video.py and merge_lora.py build the network from the file as is:
  `lora_unet_<module path with _>` with `.lora_down.weight`, `.lora_up.weight` and a required `.alpha`,
  for Linears inside the double and single blocks. Other keys are ignored without a word.
- comfyui: ComfyUI's native LoRA loader builds a key map from its own module names (Flux-style names,
  see `official_to_comfy`) and matches file keys against it; every key left over is logged as
  "lora key not loaded" and skipped.
- diffusers: `HunyuanVideoLoraLoaderMixin.lora_state_dict` converts files in the original naming (any key
  containing `img_attn_qkv`) to its own names, then PEFT injects `transformer.`-prefixed lora_A/lora_B pairs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.config import HUNYUAN_T2V, DiTConfig
from musubi_tuner.networks.lora_naming import (
    KOHYA_PREFIX, diffusers_to_official, kohya_to_module_path, module_path_to_kohya, official_to_comfy,
    official_to_diffusers, to_kohya,
)

CONSUMERS = ("ours", "musubi", "comfyui", "diffusers")
CONSUMER_TITLES = {"ours": "this toolkit", "musubi": "musubi-tuner", "comfyui": "ComfyUI", "diffusers": "diffusers"}


@dataclass
class Coverage:
    """What one consumer does with one file: the keys it applies, the keys it drops (with why), or a refusal."""

    consumer: str
    total: int
    applied: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # the consumer's own names of the layers it changes
    dropped: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None  # the consumer refuses (or fails on) the whole file

    @property
    def complete(self) -> bool:
        return self.fatal is None and not self.dropped and len(self.applied) == self.total

    @property
    def fraction(self) -> float:
        return 0.0 if self.fatal or not self.total else len(self.applied) / self.total


# ----------------------------------------------------------------------------------------------- the model's layers


@functools.lru_cache(maxsize=8)
def dit_linears(config: DiTConfig = HUNYUAN_T2V) -> dict[str, tuple[int, int]]:
    """Every Linear of the official DiT: module path -> weight shape (out, in). Built on the meta device."""
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _in_stream_block(path: str) -> bool:
    return re.match(r"(double|single)_blocks\.\d+\.", path) is not None


# ----------------------------------------------------------------------------------------------- consumers


def coverage(consumer: str, weights: dict[str, torch.Tensor], config: DiTConfig = HUNYUAN_T2V) -> Coverage:
    """`consumer`'s treatment of a LoRA file's tensors (as stored), against a DiT of `config`."""
    rules = {"ours": _ours, "musubi": _musubi, "comfyui": _comfyui, "diffusers": _diffusers}
    if consumer not in rules:
        raise ValueError(f"unknown consumer {consumer!r}; one of {CONSUMERS}")
    return rules[consumer](weights, dit_linears(config))


def _ours(weights, linears) -> Coverage:
    cov = Coverage("ours", len(weights))
    ignored: list[str] = []
    try:
        kohya = to_kohya(weights, ignored=ignored)
        names = sorted({k.split(".", 1)[0] for k in kohya if k.endswith(".lora_down.weight")})
        paths = [kohya_to_module_path(n) for n in names]
    except UserError as e:
        cov.fatal = str(e)
        return cov
    missing = [p for p in paths if p not in linears]
    if missing:
        cov.fatal = f"merging stops: module {missing[0]} does not exist in this DiT ({len(missing)} such modules)"
        return cov
    cov.dropped = {k: "our reader skips it (not a LoRA weight of a known module)" for k in ignored}
    cov.applied = [k for k in weights if k not in cov.dropped]
    cov.modules = paths
    return cov


def _musubi(weights, linears) -> Coverage:
    cov = Coverage("musubi", len(weights))
    targets = {module_path_to_kohya(p): p for p in linears if _in_stream_block(p)}
    modules = set()
    for key in weights:
        name, _, suffix = key.partition(".")
        if name in targets and suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            cov.applied.append(key)
            modules.add(targets[name])
        elif not key.startswith(KOHYA_PREFIX):
            cov.dropped[key] = "musubi-tuner reads only kohya names (lora_unet_*); convert_lora.py --target default converts"
        elif name in targets:
            cov.dropped[key] = f"musubi-tuner reads only .lora_down.weight, .lora_up.weight and .alpha, not .{suffix}"
        else:
            cov.dropped[key] = "musubi-tuner applies LoRAs only to Linears inside the double and single blocks"
    built = {k.partition(".")[0] for k in cov.applied if k.endswith(".lora_down.weight")}
    no_alpha = sorted(n for n in built if f"{n}.alpha" not in weights)
    if no_alpha:
        cov.fatal = f"it needs an .alpha for every module and stops with a KeyError (none for {no_alpha[0]})"
    cov.modules = sorted(modules)
    return cov


# ComfyUI's LoRA loader reads, for each key x of its key map: x.alpha and x.dora_scale; the first of these
# (up, down) pairs present, with x.reshape_weight (and x.lora_mid.weight beside lora_up/lora_down); and the
# tensors of its LoHa and LoKr adapters.
COMFY_LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"), (".lora_B", ".lora_A"),
                    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                    (".lora_B.default.weight", ".lora_A.default.weight"))
COMFY_ALWAYS = (".alpha", ".dora_scale")
COMFY_OTHER_ADAPTERS = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2", ".lokr_w1", ".lokr_w2",
                        ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
# For HunyuanVideo it also accepts diffusion-pipe files: its own names turned back into the official ones by these.
COMFY_LORA_OFFICIAL = (("_mod.lin.", "_mod.linear."), ("_attn.qkv.", "_attn_qkv."), ("_attn.proj.", "_attn_proj."),
                       ("mlp.0.", "mlp.fc1."), ("mlp.2.", "mlp.fc2."), (".modulation.lin.", ".modulation.linear."))


def comfy_key_map(linears) -> dict[str, str]:
    """ComfyUI's LoRA key map for its HunyuanVideo model: LoRA module key -> the ComfyUI weight it patches."""
    key_map = {}
    for official in linears:
        comfy = official_to_comfy(official)
        weight = f"diffusion_model.{comfy}.weight"
        key_map[KOHYA_PREFIX + comfy.replace(".", "_")] = weight  # kohya names are matched against ComfyUI's names
        key_map[f"diffusion_model.{comfy}"] = weight
        diffusion_pipe = weight
        for comfy_part, official_part in COMFY_LORA_OFFICIAL:
            diffusion_pipe = diffusion_pipe.replace(comfy_part, official_part)
        body = diffusion_pipe.removeprefix("diffusion_model.").removesuffix(".weight")
        key_map[f"transformer.{body}"] = weight
        key_map[f"diffusion_model.{body}"] = weight
    return key_map


def _comfyui(weights, linears) -> Coverage:
    cov = Coverage("comfyui", len(weights))
    consumed, modules = set(), set()
    for x, weight in comfy_key_map(linears).items():
        for up, down in COMFY_LORA_PAIRS:
            if x + up in weights:
                consumed |= {x + up, x + down, x + ".reshape_weight"}
                if up == ".lora_up.weight":
                    consumed.add(x + ".lora_mid.weight")
                modules.add(weight.removeprefix("diffusion_model.").removesuffix(".weight"))
                break
        consumed |= {x + extra for extra in COMFY_ALWAYS + COMFY_OTHER_ADAPTERS}
    for key in weights:
        if key in consumed:
            cov.applied.append(key)
        else:
            cov.dropped[key] = "lora key not loaded" + _comfy_hint(key)  # ComfyUI's own warning
    cov.modules = sorted(modules)
    return cov


def _comfy_hint(key: str) -> str:
    """Why a kohya key misses ComfyUI's model: its layer has another name there."""
    name = key.partition(".")[0]
    if not name.startswith(KOHYA_PREFIX):
        return ""
    try:
        official = kohya_to_module_path(name)
    except UserError:
        return ""
    comfy = official_to_comfy(official)
    if comfy == official:
        return ""
    return f": ComfyUI's layer is {comfy}, kohya name {KOHYA_PREFIX}{comfy.replace('.', '_')}"


# diffusers' converter splits every tensor of these layers in three (as a q/k/v lora_B) unless its name says lora_A.
SPLIT_IN_THREE = re.compile(r"(img|txt|self)_attn_qkv")


def _diffusers(weights, linears) -> Coverage:
    cov = Coverage("diffusers", len(weights))
    no_lora = [k for k in weights if "lora" not in k]
    if no_lora:
        cov.fatal = f"'Invalid LoRA checkpoint': key {no_lora[0]} has no 'lora' in its name"
        return cov
    if any("img_attn_qkv" in k for k in weights):
        return _diffusers_original(weights, linears, cov)
    modules = set()
    for key in weights:
        m = re.fullmatch(r"transformer\.(.+)\.(lora_A|lora_B)\.weight", key)
        target = diffusers_to_official(m.group(1)) if m else None
        if target is not None and target[0] in linears:
            cov.applied.append(key)
            modules.add(m.group(1))
        elif not key.startswith("transformer."):
            cov.dropped[key] = ("diffusers reads the original naming only when some key contains 'img_attn_qkv'; "
                                "otherwise it keeps only its own 'transformer.' keys")
        else:
            cov.dropped[key] = "not a lora_A/lora_B weight of a module of diffusers' HunyuanVideo transformer"
    cov.modules = sorted(modules)
    return cov


def _diffusers_original(weights, linears, cov: Coverage) -> Coverage:
    """diffusers' converter for the original naming: strips `transformer.` / `diffusion_model.`, renames, splits q/k/v."""
    modules = set()
    for key in weights:
        m = re.fullmatch(r"(?:transformer\.|diffusion_model\.)?(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None or m.group(1) not in linears or not official_to_diffusers(m.group(1)):
            if SPLIT_IN_THREE.search(key):
                cov.fatal = (f"its HunyuanVideo converter splits {key} in three as a q/k/v weight "
                             "(it reads only lora_A/lora_B weights, without alpha)")
                cov.applied = []
                return cov
            cov.dropped[key] = "diffusers' converter reads only lora_A/lora_B weights of the DiT's layers"
        elif m.group(1) == "final_layer.adaLN_modulation.1":
            cov.dropped[key] = "diffusers' converter swaps the halves of lora_A as well as lora_B here, which changes the update"
        else:
            cov.applied.append(key)
            modules.update(official_to_diffusers(m.group(1)))
    cov.modules = sorted(modules)
    return cov
