"""Baking LoRAs into a loaded DiT: W += multiplier * (up @ down) * alpha / rank, in float32, cast back per layer."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Sequence

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.hunyuan.fp8 import Fp8Linear, quantize_rows
from musubi_tuner.networks.lora_files import load_lora
from musubi_tuner.networks.lora_naming import kohya_to_module_path

logger = logging.getLogger(__name__)


def resolve_multipliers(lora_paths: Sequence[str], multipliers: Sequence[float] | float | None, flag: str = "--lora_multiplier") -> list[float]:
    """One multiplier per LoRA; a single value applies to all; none means 1.0 each."""
    if multipliers is None:
        return [1.0] * len(lora_paths)
    if isinstance(multipliers, (int, float)):
        multipliers = [float(multipliers)]
    multipliers = list(multipliers)
    if len(multipliers) == 1:
        return multipliers * len(lora_paths)
    if len(multipliers) != len(lora_paths):
        raise UserError(f"{len(lora_paths)} LoRA files but {len(multipliers)} values of {flag}: give one per file, or one for all")
    return multipliers


# --lora_blocks words; anything else is a regular expression searched in the module path
BLOCK_PRESETS = {"all": r"", "double": r"^double_blocks\.", "single": r"^single_blocks\."}

ModuleFilter = Callable[[str], bool]  # official module path (`double_blocks.3.img_attn_qkv`) -> apply its LoRA?


def block_filter(spec: str | None, exclude_single_blocks: bool = False, flag: str = "--lora_blocks") -> ModuleFilter:
    r"""The modules a `--lora_blocks` value keeps: `all` (or None), `double`, `single`, or a regular expression
    searched in the module path, e.g. `double_blocks\.1[0-9]\.` for double blocks 10-19, `img_attn` for the
    image attention layers. `exclude_single_blocks` (musubi-tuner's flag) also drops the single blocks."""
    pattern = BLOCK_PRESETS.get(spec or "all", spec)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{flag} {spec!r}: not 'all', 'double', 'single' or a valid regular expression ({e})") from None
    return lambda path: rx.search(path) is not None and not (exclude_single_blocks and path.startswith("single_blocks."))


def block_filters(lora_paths: Sequence[str], specs: Sequence[str] | str | None, exclude_single_blocks: bool = False) -> list[ModuleFilter]:
    """One module filter per LoRA file: one `--lora_blocks` value per file, or one for all."""
    if specs is None or isinstance(specs, str):
        specs = [specs]
    specs = list(specs) or [None]
    if len(specs) == 1:
        specs = specs * len(lora_paths)
    if len(specs) != len(lora_paths):
        raise UserError(f"{len(lora_paths)} LoRA files but {len(specs)} values of --lora_blocks: give one per file, or one for all")
    return [block_filter(s, exclude_single_blocks) for s in specs]


def select_lora_blocks(weights: dict[str, torch.Tensor], keep: ModuleFilter) -> dict[str, torch.Tensor]:
    """The part of a kohya-named LoRA state dict whose modules `keep` accepts."""
    return {k: v for k, v in weights.items() if keep(kohya_to_module_path(k.split(".", 1)[0]))}


def lora_factors(weights: dict[str, torch.Tensor], source: str, keep: ModuleFilter | None = None):
    """(module path, up (out, rank), down (rank, in), alpha / rank) per module of a kohya-named LoRA state dict
    (the modules `keep` accepts); up and down in float32. The delta weight is up @ down * (alpha / rank)."""
    for key, down in weights.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        up = weights.get(f"{name}.lora_up.weight")
        if up is None:
            raise UserError(f"{source}: {name} has lora_down but no lora_up")
        path = kohya_to_module_path(name)
        if keep is not None and not keep(path):
            continue
        rank = down.shape[0]
        alpha = float(weights[f"{name}.alpha"]) if f"{name}.alpha" in weights else float(rank)
        d = down.float()
        if d.ndim > 2:  # 1x1 conv layout from some trainers
            d = d.flatten(1)
        yield path, up.float().reshape(up.shape[0], -1), d, alpha / rank


def lora_deltas(weights: dict[str, torch.Tensor], source: str, keep: ModuleFilter | None = None):
    """(module path, float32 delta weight) per module of a kohya-named LoRA state dict (the modules `keep` accepts)."""
    for path, up, down, scale in lora_factors(weights, source, keep):
        yield path, (up @ down) * scale


@torch.no_grad()
def merge_loras_into(dit: HunyuanVideoDiT, lora_paths: Sequence[str], multipliers, device: torch.device | str | None = None,
                     exclude_single_blocks: bool = False, lora_blocks: Sequence[str] | str | None = None) -> int:
    """Merge each LoRA file (any naming we read) into the DiT's weights in place; returns the number of layers changed.

    `lora_blocks`: a `--lora_blocks` value per file (or one for all) choosing the blocks each LoRA is applied to.
    """
    changed = 0
    keeps = block_filters(lora_paths, lora_blocks, exclude_single_blocks)
    for path, m, keep in zip(lora_paths, resolve_multipliers(lora_paths, multipliers), keeps):
        weights = load_lora(path)
        count = 0
        for module_path, delta in lora_deltas(weights, str(path), keep):
            try:
                linear = dit.get_submodule(module_path)
            except AttributeError:
                raise UserError(f"{path}: module {module_path} does not exist in this DiT (a LoRA for another model?)") from None
            _add_delta(linear, delta, m, device, str(path))
            count += 1
        if count == 0:
            raise UserError(f"{path}: no LoRA module of this file applies to the DiT (or to the blocks --lora_blocks keeps)")
        logger.info("merged %s (multiplier %s) into %d layers", path, m, count)
        changed += count
    return changed


def check_loras_fit(lora_paths: Sequence[str], dit_shapes: dict[str, tuple[int, ...]], dit_name: str) -> None:
    """Every LoRA file is readable and each of its modules is a layer of this DiT with the LoRA's shape (no weights merged)."""
    for path in lora_paths:
        weights = load_lora(path)
        for key, down in weights.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key.removesuffix(".lora_down.weight")
            module_path = kohya_to_module_path(name)
            up = weights.get(f"{name}.lora_up.weight")
            if up is None:
                raise UserError(f"{path}: {name} has lora_down but no lora_up")
            shape = dit_shapes.get(f"{module_path}.weight")
            if shape is None:
                raise UserError(f"{path}: module {module_path} does not exist in {dit_name} (a LoRA for another model?)")
            if (up.shape[0], down.flatten(1).shape[1]) != tuple(shape[:2]):
                raise UserError(f"{path}: {module_path} is {[up.shape[0], down.flatten(1).shape[1]]} in the LoRA but "
                                f"{list(shape)} in {dit_name} (a LoRA for another model size?)")


def _add_delta(linear, delta: torch.Tensor, multiplier: float, device, source: str) -> None:
    w = linear.weight
    if tuple(delta.shape) != tuple(w.shape):
        raise UserError(f"{source}: LoRA for a layer of shape {list(delta.shape)} but the DiT's is {list(w.shape)} (a LoRA for another model size?)")
    device = device or w.device
    if isinstance(linear, Fp8Linear):
        full = linear.dequantized_weight(torch.float32).to(device) + multiplier * delta.to(device)
        q, scale = quantize_rows(full)
        w.data = q.to(w.device)
        linear.weight_scale = scale.to(w.device)
        return
    w.data = (w.to(device, torch.float32) + multiplier * delta.to(device)).to(w.device, w.dtype)


def _finite(t: torch.Tensor, key: str, what: str, cause: str) -> torch.Tensor:
    """`t`, or a UserError if it holds NaN/inf: a merged model must never carry them into a video silently."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise UserError(f"{what} would hold {bad} NaN/inf values ({cause}); nothing was written")
    return t


def merge_file(dit_path: str, lora_paths: Sequence[str], multipliers, out_path: str, device: torch.device | str = "cpu",
               exclude_single_blocks: bool = False, in_channels: int | None = None, lora_blocks: Sequence[str] | str | None = None) -> dict:
    """Merge LoRAs into a DiT file and write the result, streaming one tensor at a time.

    Each weight is read, its LoRA deltas added in float32 on `device` (W += m * up @ down * alpha / rank, in
    place), cast back to its stored dtype and written before the next is read. Only the LoRAs' small factors
    are kept in between, so peak memory is about one layer in float32 plus the LoRA files, not a second model.
    fp8 inputs are written in bf16: rounding W + delta back to e4m3 would erase most of a LoRA's small update.
    """
    from musubi_tuner.files import LazyTensors, RunLock, leftover_temp_files, save_safetensors
    from musubi_tuner.hunyuan.checkpoints import dit_metadata, open_dit_file, read_dit_config
    from musubi_tuner.hunyuan.fp8 import FP8_DTYPE

    source = open_dit_file(dit_path)
    config = read_dit_config(source)
    if in_channels is not None and in_channels != config.in_channels:
        raise UserError(f"{dit_path}: --dit_in_channels {in_channels} but the file's DiT takes {config.in_channels} input channels")
    factors: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}  # weight key -> (m * scale, up, down) per LoRA
    keeps = block_filters(lora_paths, lora_blocks, exclude_single_blocks)
    for path, m, keep in zip(lora_paths, resolve_multipliers(lora_paths, multipliers), keeps):
        count = 0
        for module_path, up, down, scale in lora_factors(load_lora(path), str(path), keep):
            key = f"{module_path}.weight"
            if key not in source:
                raise UserError(f"{path}: module {module_path} does not exist in {dit_path} (a LoRA for another model?)")
            shape = (up.shape[0], down.shape[1])
            if shape != tuple(source.shape(key)):
                raise UserError(f"{path}: {module_path} has shape {list(shape)} in the LoRA but {list(source.shape(key))} in {dit_path}")
            factors.setdefault(key, []).append((m * scale, up, down))
            count += 1
        if count == 0:
            raise UserError(f"{path}: no LoRA module of this file applies to the DiT (or to the blocks --lora_blocks keeps)")

    def out_dtype(key: str) -> torch.dtype:
        dtype = source.dtype(key)
        return torch.bfloat16 if dtype == FP8_DTYPE else dtype

    def compute(key: str) -> torch.Tensor:
        t = source.read(key)  # a copy of its own: the file's pages do not pile up in this process
        if key not in factors:
            return _finite(t.to(out_dtype(key)), key, f"{dit_path}: {key}", "the DiT file itself holds them")
        merged = t.to(device, torch.float32, copy=True)
        del t
        for factor, up, down in factors[key]:
            merged.addmm_(up.to(device), down.to(device), alpha=factor)  # no delta-sized temporary
        return _finite(merged.to("cpu", out_dtype(key)), key, f"merging {', '.join(map(str, lora_paths))} into {dit_path}: {key}",
                       f"a LoRA holding NaN/inf values, or a sum beyond {out_dtype(key)}; check them with musubi-lora-info")

    specs = {k: (out_dtype(k), tuple(source.shape(k))) for k in source.keys()}
    out = Path(out_path)
    with RunLock(out.with_name(f".{out.name}.lock"), "merge into this file", "--save_merged_model"):
        for stale in leftover_temp_files(out.parent, lambda name: name == out.name, owned=True):
            stale.unlink(missing_ok=True)
            logger.info("removed %s (left by an interrupted merge)", stale)
        save_safetensors(LazyTensors(specs, compute), out, metadata=dit_metadata(config))
    return {"layers": len(factors), "fp8_input": any(source.dtype(k) == FP8_DTYPE for k in source.keys())}
