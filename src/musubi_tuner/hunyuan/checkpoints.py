"""Loading and saving DiT files: the official `.pt`, bf16/fp16/fp8 safetensors, SkyReels files, merged models.

The model is built on the `meta` device and each tensor is read, cast to its target dtype and placed
on the target device one at a time (`load_state_dict(assign=True)`), so loading never holds a second
copy of the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.files import StateDictFile, require_file, save_safetensors
from musubi_tuner.hunyuan.config import DiTConfig, default_rope_axes
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.hunyuan.fp8 import is_fp8_weight, make_fp8_linear, quantize_rows
from musubi_tuner.hunyuan.model_kinds import is_kind, what_weights_are
from musubi_tuner.networks.lora_naming import comfy_param_to_official

# Where a pickled checkpoint may keep its weights (the official file uses `module`).
SUBDICT_KEYS = ("module", "state_dict", "model")
# Key prefixes of other packagings (ComfyUI full checkpoints, diffusion-pipe's ComfyUI-layout files, DeepSpeed wrappers).
KEY_PREFIXES = ("model.diffusion_model.", "model.model.", "diffusion_model.", "module.")
CONFIG_METADATA_KEY = "musubi_tuner.dit_config"


class DiTFile(StateDictFile):
    """A DiT file's tensors under official names. Tencent's FP8 release (`mp_rank_00_model_states_fp8.pt`, whose block
    Linear weights are stored divided by a per-layer scale, the scales in `mp_rank_00_model_states_fp8_map.pt` beside
    it, as the official loader reads them) gives those weights multiplied back: read as plain fp8 they were 100-1000x
    off, silently (fuzz_an 5)."""

    scales: dict[str, torch.Tensor]  # weight key -> the scale its stored values are multiplied by

    def get(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        scale = self.scales.get(key)
        if scale is None:
            return super().get(key, dtype, device)
        weight = super().get(key, torch.float32, device)
        weight = weight * scale.to(weight.device).reshape(-1, *[1] * (weight.dim() - 1))
        return weight if dtype is None else weight.to(dtype)

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if key in self.scales else super().dtype(key)


def fp8_map_path(path: str | os.PathLike) -> Path:
    """Where Tencent's loader looks for an FP8 checkpoint's scales: NAME.pt -> NAME_map.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}_map.pt")


def _read_fp8_scales(f: DiTFile) -> dict[str, torch.Tensor]:
    """The per-layer scales of Tencent's FP8 checkpoint (keyed by weight), {} for any other file; a UserError when an
    FP8 `.pt` of that name has no map beside it, or a map that does not fit the file."""
    stored_fp8 = [k for k in f.keys() if k.endswith(".weight") and f.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if f.path.suffix != ".pt" or not stored_fp8:
        return {}
    map_path = fp8_map_path(f.path)
    if os.path.lexists(map_path) and not map_path.is_file():  # (a folder there was "not beside it": fuzz_ba 3)
        raise UserError(f"{map_path}: not a file, where {f.path.name}'s FP8 scale map goes; put the map there")
    if not map_path.is_file():
        if f.path.stem.endswith("_fp8") or _stored_scaled(f, stored_fp8[0]):  # (renamed, it loaded 100-1000x off: fuzz_ba 3)
            raise UserError(f"{f.path}: Tencent's FP8 checkpoint, whose weights are stored divided by the per-layer scales of "
                            f"{map_path.name}, which is not beside it; put it there (it comes with the checkpoint), or give the "
                            "bf16 mp_rank_00_model_states.pt (--fp8 stores it in fp8 as it loads)")
        return {}
    from musubi_tuner.files import load_torch_file

    raw = load_torch_file(map_path, f"FP8 scale map of {f.path.name}")  # (a truncated one: said so, with its remedy)
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise UserError(f"{map_path}: not an FP8 scale map (a dict of layer names to scales, as Tencent's loader reads it)")
    scales = {}
    for name, scale in raw.items():
        for prefix in KEY_PREFIXES:
            name = name.removeprefix(prefix)
        key = f"{name}.weight"
        if key not in f:
            raise UserError(f"{map_path}: scale of {name}, a layer {f.path.name} does not have: the map of another checkpoint?")
        if scale.numel() not in (1, f.shape(key)[0]) or not scale.is_floating_point() or not torch.isfinite(scale).all():
            raise UserError(f"{map_path}: the scale of {name} ({scale.dtype}, shape {list(scale.shape)}) is not one finite "
                            f"number per layer or per output row of {key} {list(f.shape(key))}")
        scales[key] = scale.float().reshape(-1)
    unscaled = [k for k in stored_fp8 if k not in scales]
    if unscaled:
        raise UserError(f"{f.path}: {len(unscaled)} fp8 weights have no scale in {map_path.name} (e.g. {unscaled[0]}): the map "
                        "of another checkpoint?")
    return scales


STORED_SCALED_FROM = 64.0  # a block Linear's largest |weight| past this is stored divided by a scale (Tencent's: max |W| / 448,
# so the largest is e4m3's 448; a model's own weights stay within a few units)


def _stored_scaled(f: DiTFile, key: str) -> bool:
    """Whether an fp8 `.pt`'s weights are stored divided by per-layer scales (Tencent's FP8 release under another name),
    by the first one's largest value: a plain cast keeps the weights' own few units."""
    return bool(f.get(key).float().abs().max() > STORED_SCALED_FROM)


def open_dit_file(path: str | os.PathLike) -> DiTFile:
    """The file's tensors under official names, or a UserError that says what the file is instead."""
    require_file(path, "DiT checkpoint", "--dit")  # (every command takes the DiT as --dit: named when it is not a file)
    f = DiTFile(path, what="DiT checkpoint", subdict_keys=SUBDICT_KEYS)
    f.scales = {}
    for prefix in KEY_PREFIXES:
        f.strip_prefix(prefix)
    if "double_blocks.0.img_attn_qkv.weight" not in f and "double_blocks.0.img_attn.qkv.weight" in f:
        f.rename(comfy_param_to_official)  # ComfyUI's module names, which diffusion-pipe reads too (it was refused as
        # "not in the official layout": fuzz_an 4)
    if "img_in.proj.weight" not in f:  # (a file given to the wrong flag: said which one it goes to)
        other = what_weights_are(f.keys())
        if other is not None and not is_kind(other, "a HunyuanVideo DiT"):
            raise UserError(f"{f.path}: not a DiT: this is {other}")
    f.scales = _read_fp8_scales(f)
    return f


def read_dit_config(f: StateDictFile) -> DiTConfig:
    """The DiT's config, from the metadata this project writes or from the tensors' shapes; a UserError naming the file
    when neither makes a model (malformed metadata, tensors of odd ranks or empty dimensions)."""
    where = f"its metadata {CONFIG_METADATA_KEY}" if CONFIG_METADATA_KEY in f.metadata else "the shapes of its tensors"
    try:
        if CONFIG_METADATA_KEY in f.metadata:
            config = DiTConfig.from_json(f.metadata[CONFIG_METADATA_KEY])
        else:
            config = DiTConfig.from_shapes(f.shapes(), source=str(f.path))
        with torch.device("meta"):
            HunyuanVideoDiT(config)
    except UserError:
        raise
    except Exception as e:  # json, the dataclass, the model's own arithmetic: any of them may refuse a damaged file
        raise UserError(f"{f.path}: not a usable HunyuanVideo DiT: {where} give no model ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None
    if config.in_channels not in (16, 32):  # (33: Tencent's HunyuanVideo-I2V, which conditions otherwise; it was read and
        # ended in a convolution's traceback at the first step, after the text encoders had run: fuzz_aj 11)
        raise UserError(f"{f.path}: a DiT of {config.in_channels} input channels: this toolkit runs HunyuanVideo T2V (16) and "
                        "SkyReels V1 I2V (32)" + (" (Tencent's HunyuanVideo-I2V, with 33, is another model)" if config.in_channels
                                                   == 33 else ""))
    # the latents it takes and gives are the VAE's, in patches of (1, 2, 2): a final layer or patch embedding of other
    # shapes (a damaged tensor pair) made a model every header check passed, a traceback at the first step (fuzz_ba 1)
    if config.out_channels != 16 or tuple(config.patch_size) != (1, 2, 2):
        said = (f"img_in.proj has a patch of {list(config.patch_size)}" if tuple(config.patch_size) != (1, 2, 2) else
                f"final_layer.linear gives {config.out_channels} output channels")
        raise UserError(f"{f.path}: {said}; a HunyuanVideo DiT takes and gives the VAE's 16 latent channels, in patches of "
                        f"[1, 2, 2] (a damaged file, or another model's)")
    try:  # (the header only: a plan or a --dry_run that passes is of a file the run loads)
        check_dit_file(f, config)
    except UserError as e:
        if CONFIG_METADATA_KEY not in f.metadata or DiTConfig.from_shapes(f.shapes(), source=str(f.path)) == config:
            raise
        raise UserError(f"{e} (its metadata {CONFIG_METADATA_KEY} describes another model than its tensors)") from None
    return config


def check_in_channels(f: StateDictFile, config: DiTConfig, in_channels: int | None) -> None:
    """--dit_in_channels, when given, is the file's: checked as the DiT loads, and by the trainer's --dry_run."""
    if in_channels is not None and in_channels != config.in_channels:
        kind = "SkyReels I2V" if config.in_channels == 32 else "text-to-video"
        raise UserError(
            f"{f.path}: --dit_in_channels {in_channels} was given but this {kind} DiT takes {config.in_channels} input channels "
            f"(img_in.proj.weight {list(f.shape('img_in.proj.weight'))}); drop the flag or pass the matching file"
        )


def check_dit_file(f: StateDictFile, config: DiTConfig) -> None:
    """Every key of the model, of its shape, in a floating-point dtype (fp8 included), and nothing else: what load_dit
    and merge_lora check before any long work."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in HunyuanVideoDiT(config).state_dict().items()}
    _check_keys(f, expected)
    for key in expected:
        if not f.dtype(key).is_floating_point:
            raise UserError(f"{f.path}: tensor {key} is {str(f.dtype(key)).removeprefix('torch.')}; a DiT's weights are "
                            f"floating point (the file is damaged or not a model)")


def load_dit(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    in_channels: int | None = None,
    attn_mode: str = "sdpa",
    split_attn: bool = False,
) -> HunyuanVideoDiT:
    """Load a frozen DiT in eval mode. The config comes from the file; `in_channels` only checks it.

    dtype: what every tensor is stored and computed in. fp8: the block Linears are stored as float8 e4m3fn
    (see `hunyuan.fp8`), the rest in `dtype`.
    """
    f = open_dit_file(path)
    config = read_dit_config(f)
    check_in_channels(f, config, in_channels)
    check_dit_file(f, config)
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    state: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor | None] = {}
    for key in expected:
        if fp8 and is_fp8_weight(key):
            weight, scale = quantize_rows(f.finite(key, f.get(key, device=device), DIT_CAST_ADVICE))
            state[key], scales[key] = weight, scale
        else:
            state[key] = f.finite(key, f.get(key, dtype=dtype, device=device), DIT_CAST_ADVICE)
    model.load_state_dict(state, strict=True, assign=True)
    for key, scale in scales.items():
        module = model.get_submodule(key.removesuffix(".weight"))
        make_fp8_linear(module, None if scale is None else scale.to(device))
    model.requires_grad_(False)
    model.eval()
    model.set_attention(attn_mode, split_attn)
    return model


DIT_CAST_ADVICE = "compute in bfloat16 (--dit_dtype bf16)"


def _check_keys(f: StateDictFile, expected: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in f]
    unexpected = [k for k in f.keys() if k not in expected]
    scaled = [k for k in unexpected if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8"]
    if scaled and len(scaled) == len(unexpected):  # (it was "not a complete HunyuanVideo DiT: keys 36 unexpected")
        raise UserError(f"{f.path}: a scaled-fp8 DiT (ComfyUI's layout: {scaled[0]}, ...), which is not read, as in musubi-tuner: "
                        "give the bf16 or plain fp8 file; --fp8 (--fp8_base in training) stores it in fp8 as it loads")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{f.path}: not a complete HunyuanVideo DiT: keys {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(f.shape(k)) != shape:
            raise UserError(f"{f.path}: tensor {k} has shape {list(f.shape(k))}, expected {list(shape)} for this model size")


def dit_metadata(config: DiTConfig) -> dict[str, str]:
    """Metadata we write into DiT safetensors; the config only when shapes alone cannot tell it."""
    meta = {"format": "pt", "musubi_tuner.architecture": "hunyuan_video_dit", "in_channels": str(config.in_channels)}
    if tuple(config.rope_dim_list) != default_rope_axes(config.head_dim):
        meta[CONFIG_METADATA_KEY] = config.to_json()
    return meta


def save_dit(state_dict: dict[str, torch.Tensor], config: DiTConfig, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Save a DiT state dict (official names) as safetensors, atomically, one tensor at a time (cast to `dtype` if given)."""
    save_safetensors(state_dict, path, metadata=dit_metadata(config), cast=dtype)
    return Path(path)
