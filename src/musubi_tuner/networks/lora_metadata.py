"""LoRA file metadata: our `musubi_tuner.*` keys (what a LoRA was trained on and for, how it is named), read back
from files trained here or, as far as they say, from musubi-tuner's `ss_*` keys. The trainer writes them
(training.metadata); the LoRA tools (info, doctor, convert) read them. Also sd-scripts' hashes of a file, which
the trainer and the post-hoc EMA merge both write, and what the metadata says against a DiT: another model
family's LoRA (`other_model`, which every reading that applies a LoRA refuses) and another base (`base_mismatch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re

import torch

from musubi_tuner.hunyuan.config import DiTConfig

logger = logging.getLogger(__name__)

BASE_MODELS = ("hunyuan-video-t2v", "skyreels-t2v", "skyreels-i2v")
OURS = "musubi_tuner."  # prefix of our own keys
POST_HOC_EMA = OURS + "post_hoc_ema"  # a post-hoc EMA result's: JSON {"checkpoints": [file names, oldest first], "betas": [...]}

# LoRAs of other model families, by what their trainers write: sd-scripts' and musubi-tuner's ss_base_model_version
# (flux1, sd_v1, sdxl_base_v1-0, wan, qwen_image), the model spec's modelspec.architecture before its "/" (flux-1-dev,
# stable-diffusion-xl-v1-base, wan2.1) and the network module after its "networks.lora_" (networks.lora_flux,
# networks.lora_sd3, networks.lora_wan). Flux.1's blocks have HunyuanVideo's names and widths, so its LoRAs pass every
# name and shape check: only the metadata tells. A pattern matches the start of the name in lower case with only its
# letters and digits. Only names positively of another family are listed: --metadata_arch is free text (a SkyReels
# name), and HunyuanVideo's own are hunyuan_video and hunyuan-video.
OTHER_MODELS = {
    "Flux": r"flux",
    "Stable Diffusion 1/2": r"(sd|stablediffusion)v?[12]",
    "SDXL": r"(sd|stablediffusion)xl",
    "Stable Diffusion 3": r"(sd|stablediffusion)v?3",
    "HunyuanVideo 1.5": r"hunyuanvideo15",
    "Wan": r"wan",
    "FramePack": r"framepack",
    "Qwen-Image": r"qwenimage",
    "Lumina": r"lumina",
    "HiDream": r"hidream",
    "Chroma": r"chroma",
    "Kandinsky": r"kandinsky",
    "Z-Image": r"zimage",
    "LTX-Video": r"ltx",
    "CogVideoX": r"cogvideo",
    "Mochi": r"mochi",
}
# metadata key -> the model name in its value (None: the value names no model, e.g. networks.lora)
_MODEL_NAME_KEYS = {
    "ss_base_model_version": lambda v: v,
    "modelspec.architecture": lambda v: v.split("/", 1)[0],
    "ss_network_module": lambda v: m.group(1) if (m := re.fullmatch(r"networks\.[a-z]+_(\w+)", v.strip())) else None,
}


@dataclasses.dataclass(frozen=True)
class OtherModel:
    """The metadata says the LoRA is for another model family than HunyuanVideo."""

    model: str  # a name of OTHER_MODELS
    key: str
    value: str

    def __str__(self) -> str:
        return f"{self.model} ({self.key}={self.value})"


def other_model(meta: dict[str, str]) -> OtherModel | None:
    """The other model family (OTHER_MODELS) the first of ss_base_model_version, modelspec.architecture and
    ss_network_module names, or None (HunyuanVideo's values, a name we do not know, no metadata)."""
    for key, model_name in _MODEL_NAME_KEYS.items():
        value = meta.get(key)
        if not isinstance(value, str) or not (name := model_name(value)):
            continue
        name = re.sub(r"[^a-z0-9]", "", name.lower())
        for model, pattern in OTHER_MODELS.items():
            if re.match(pattern, name):
                return OtherModel(model, key, value)
    return None


@dataclasses.dataclass
class LoRAFileInfo:
    """Our `musubi_tuner.*` metadata of a LoRA file: what it was trained on and for, and how it is named.

    `from_metadata` also fills what it can from musubi-tuner's `ss_*` keys for files trained elsewhere
    (`written_here` tells which).
    """

    version: str | None = None  # of this toolkit
    base_model: str | None = None  # one of BASE_MODELS
    in_channels: int | None = None  # of the DiT trained on: 16 T2V, 32 SkyReels I2V
    text_template: str | None = None
    modules: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)  # official module path -> (rank, alpha)
    resolutions: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # training (width, height) per dataset
    frames: list[int] = dataclasses.field(default_factory=list)  # training frame counts (1 for images)
    naming: str | None = None  # "kohya" or "other" (networks.lora_naming)
    companion: str | None = None  # file name of the same LoRA in the other naming, written beside this one
    written_here: bool = False
    other_model: OtherModel | None = None  # the metadata says it is a LoRA of another model family

    @property
    def target_blocks(self) -> list[str]:
        """`double_blocks.0`, ... in model order: the blocks the LoRA changes."""
        blocks = {m.group(0) for p in self.modules if (m := re.match(r"(double|single)_blocks\.\d+", p))}
        return sorted(blocks, key=lambda b: (not b.startswith("double"), int(b.rsplit(".", 1)[1])))

    def to_metadata(self) -> dict[str, str]:
        values = {
            "version": self.version, "base_model": self.base_model, "in_channels": self.in_channels,
            "text_template": self.text_template,
            "lora_modules": json.dumps({path: [rank, alpha] for path, (rank, alpha) in self.modules.items()}),
            "target_blocks": json.dumps(self.target_blocks),
            "resolutions": json.dumps([list(r) for r in self.resolutions]), "frames": json.dumps(self.frames),
            "lora_naming": self.naming, "companion": self.companion,
        }
        return {OURS + k: str(v) for k, v in values.items() if v is not None}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str | None = None) -> "LoRAFileInfo":
        """What the metadata says. Every key is informational: one that cannot be read (not valid JSON, JSON of another
        shape, a value of the wrong type) is left out with a warning naming the file (`source`) and the key; the others
        are read as ever."""
        def get(key: str, parse=str, default=None):
            return _parsed(meta, OURS + key, parse, default, source)

        other = other_model(meta)
        if get("version") is not None:
            return cls(
                version=get("version"), base_model=get("base_model"), in_channels=get("in_channels", _whole_number),
                text_template=get("text_template"), modules=get("lora_modules", _modules, {}),
                resolutions=get("resolutions", _resolutions, []), frames=get("frames", _frames, []),
                naming=get("lora_naming"), companion=get("companion", _file_name), written_here=True, other_model=other)
        # trained elsewhere: musubi-tuner's keys say the data, and the DiT file's name hints at the base (unless the file
        # is another model's, or the name is another model's: flux1-dev.safetensors is no HunyuanVideo)
        resolutions, frames = _parsed(meta, "ss_datasets", _datasets, ([], []), source)
        base = None
        model_name = _parsed(meta, "ss_sd_model_name", str, "", source).lower()
        if model_name and other is None and other_model({"ss_base_model_version": model_name}) is None:
            base = "skyreels-i2v" if "i2v" in model_name else "skyreels-t2v" if "skyreels" in model_name else "hunyuan-video-t2v"
        # (and what a conversion here recorded of it: each module's rank and alpha, folded into a copy in the other
        # naming, which --target default gives back: fuzz_aw 9)
        return cls(base_model=base, resolutions=resolutions, frames=frames, other_model=other,
                   modules=get("lora_modules", _modules, {}), naming=get("lora_naming"))


def _parsed(meta: dict[str, str], key: str, parse, default, source: str | None):
    """`parse(meta[key])`, or `default` when the key is absent or empty, or (with a warning naming the file and the key)
    when `parse` cannot read it: the one way every metadata key is read."""
    text = meta.get(key)
    if text is None or text == "":
        return default
    try:
        if not isinstance(text, str):
            raise ValueError(f"is a {type(text).__name__}, not text")
        return parse(text)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        logger.warning("%s: metadata %s %s; ignored", source or "LoRA file", key, e)
        return default


def _json(text: str, type_: type):
    """The JSON value of `text`, which must be of `type_` (list or dict)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("is not valid JSON") from None
    if not isinstance(value, type_):
        raise ValueError(f"is {_json_kind(value)}, not {'an object' if type_ is dict else 'a list'}")
    return value


def _json_kind(value) -> str:
    return {dict: "a JSON object", list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "JSON null"}.get(
        type(value), "a JSON number")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole_number(text: str) -> int:
    if not re.fullmatch(r"\s*\d{1,9}\s*", text) or int(text) <= 0:
        raise ValueError(f"= {_short(text)} is not a whole number above 0")
    return int(text)


def _file_name(text: str) -> str:
    """A file name beside the LoRA (a companion): no folder in it."""
    if text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise ValueError(f"= {_short(text)} is not a file name (it names a folder)")
    return text


def _modules(text: str) -> dict[str, tuple[int, float]]:
    modules = {}
    for path, value in _json(text, dict).items():
        if not (isinstance(value, list) and len(value) == 2 and _is_whole(value[0]) and _is_real(value[1])):
            raise ValueError(f"entry {_short(path)} is {_short(value)}, not [rank, alpha]")
        modules[path] = (value[0], float(value[1]))
    return modules


def _pair(value, what: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(_is_whole(v) for v in value)):
        raise ValueError(f"holds {_short(value)}, not {what}")
    return tuple(value)


def _resolutions(text: str) -> list[tuple[int, int]]:
    return [_pair(r, "[width, height]") for r in _json(text, list)]


def _frames(text: str) -> list[int]:
    frames = _json(text, list)
    if not all(_is_whole(f) for f in frames):
        raise ValueError(f"= {_short(frames)} is not a list of whole numbers")
    return frames


def _datasets(text: str) -> tuple[list[tuple[int, int]], list[int]]:
    """musubi-tuner's `ss_datasets`: a list of dataset objects, of which the resolution (a number or [width, height]) and
    target_frames (a list of whole numbers) are read."""
    datasets = _json(text, list)
    for i, d in enumerate(datasets):
        if not isinstance(d, dict):
            raise ValueError(f"entry {i} is {_json_kind(d)}, not an object")
        res = d.get("resolution")
        if res and not (_is_whole(res) or isinstance(res, list) and len(res) == 2 and all(_is_whole(v) for v in res)):
            raise ValueError(f"entry {i}: resolution {_short(res)} is not a number or [width, height]")
        frames = d.get("target_frames")
        if frames and not (isinstance(frames, list) and all(_is_whole(f) for f in frames)):
            raise ValueError(f"entry {i}: target_frames {_short(frames)} is not a list of whole numbers")
    return data_shapes(datasets)


def data_shapes(datasets: list[dict]) -> tuple[list[tuple[int, int]], list[int]]:
    """Training resolutions (width, height) and frame counts from the `ss_datasets` entries."""
    resolutions, frames = [], set()
    for d in datasets:
        res = d.get("resolution")
        if res:
            res = tuple(res) if isinstance(res, (list, tuple)) else (int(res), int(res))
            if res not in resolutions:
                resolutions.append(res)
        if d.get("target_frames"):
            frames.update(d["target_frames"])
        elif "image_directory" in d or "image_jsonl_file" in d:
            frames.add(1)
    return resolutions, sorted(frames)


def lora_module_info(network) -> dict[str, tuple[int, float]]:
    """Official module path -> (rank, alpha) of every module of a LoRA network (for the file's metadata)."""
    from musubi_tuner.networks.lora_naming import kohya_to_module_path

    return {kohya_to_module_path(m.lora_name): (int(m.rank), float(m.alpha)) for m in getattr(network, "unet_loras", [])}


def base_model_kind(config: DiTConfig, dit_path: str | None) -> str:
    """T2V, SkyReels T2V or SkyReels I2V: 32 input channels is I2V; the file name tells SkyReels T2V from HunyuanVideo."""
    if config.in_channels == 32:
        return "skyreels-i2v"
    if dit_path and "skyreels" in os.path.basename(dit_path).lower():
        return "skyreels-t2v"
    return "hunyuan-video-t2v"


def base_mismatch(info: LoRAFileInfo, config: DiTConfig, dit_path: str) -> str | None:
    """Why the base a LoRA's metadata names does not look like the DiT it is applied to (the doctor's warning, which
    merging and generation log too), or None: another input-channel count (SkyReels I2V vs T2V), or another base."""
    kind = base_model_kind(config, dit_path)
    name = os.path.basename(dit_path)
    if info.in_channels is not None and info.in_channels != config.in_channels:
        fit = "its img_in layer cannot apply, and" if "img_in.proj" in info.modules else "the layers fit, but"
        return (f"trained on {info.base_model} ({info.in_channels} input channels) but {name} is {kind} ({config.in_channels}): "
                f"{fit} the LoRA learned another task (image-to-video vs text-to-video)")
    if info.base_model and info.base_model != kind:
        guessed = "" if info.written_here else " (guessed from ss_sd_model_name)"
        return (f"trained on {info.base_model}{guessed} but {name} looks like {kind}: the layers fit, "
                "the results may differ from what the LoRA was trained for")
    return None


def with_naming(metadata: dict[str, str], naming: str, companion: str | None = None) -> dict[str, str]:
    """The metadata for a file in `naming` ("kohya" / "other"), naming its companion file if there is one."""
    meta = {k: v for k, v in metadata.items() if k not in (OURS + "lora_naming", OURS + "companion")}
    meta[OURS + "lora_naming"] = naming
    if companion:
        meta[OURS + "companion"] = companion
    return meta


def sd_scripts_hashes(state_dict: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> tuple[str, str]:
    """SHA-256 of the data section of a safetensors serialisation, and the legacy 8-hex-digit hash (sd-scripts' definitions)."""
    from safetensors.torch import save

    from musubi_tuner.files import utf8_text

    # (as files.save_safetensors writes them: a name that is not UTF-8 was a UnicodeEncodeError here, after the whole run)
    blob = save({k: v.contiguous() for k, v in state_dict.items()}, metadata={k: utf8_text(v) for k, v in ss_metadata.items()})
    n = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + n :]).hexdigest()
    legacy = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy
