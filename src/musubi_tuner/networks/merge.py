"""Baking LoRAs into a DiT (loaded, or streamed file to file): each patch's math (networks.lora_reader) in float32,
cast back per parameter."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.hunyuan.fp8 import Fp8Linear, quantize_rows
from musubi_tuner.networks.lora_metadata import LoRAFileInfo, base_mismatch
from musubi_tuner.networks.lora_reader import DIVERGED_UPDATE, Patch, largest_update, read_lora

logger = logging.getLogger(__name__)


def check_merged_model_output(output: str, dit: str, loras: Sequence[str], others: Mapping[str, Sequence] | None = None) -> None:
    """--save_merged_model, before any work: a .safetensors name, and none of the files the command reads (`others`: the
    generation's other models, flag -> files: a typo replaced the VAE or a text encoder's weights with the merged DiT)."""
    from musubi_tuner.files import check_output_file

    if not str(output).endswith(".safetensors"):
        raise UserError(f"--save_merged_model {output}: the merged model is written as .safetensors")
    check_output_file(output, "--save_merged_model", {"--dit": [dit], "--lora_weight": loras, **(others or {})})


def resolve_multipliers(lora_paths: Sequence[str], multipliers: Sequence[float] | float | None, flag: str = "--lora_multiplier",
                        say: bool = False) -> list[float]:
    """One multiplier per LoRA, as musubi-tuner reads the flag: the i-th value for the i-th file, 1.0 for each file after
    the last value, values beyond the files unused; none means 1.0 each. A file after the last value whose `.comfyui`
    companion (or own file) has one takes that one: the two are one LoRA (a glob `out/NAME*.safetensors` and one value).
    `say`: the checks before the work say a list that is not one value per file (a single value was applied to every
    file here, which changed a musubi-tuner command's merge without a word: fuzz_ad F2)."""
    if multipliers is None:
        return [1.0] * len(lora_paths)
    if isinstance(multipliers, (int, float)):
        multipliers = [float(multipliers)]
    given, count = list(multipliers), len(lora_paths)
    values = (given + [1.0] * count)[:count]
    if say and len(given) > count:
        logger.warning("%s gives %d values for %d file(s): the last %d unused", flag, len(given), count, len(given) - count)
    if len(given) < count:
        from musubi_tuner.networks.lora_files import companion_copies

        partner = {}
        for copy, kept in companion_copies(lora_paths).items():
            partner[os.path.realpath(copy)], partner[os.path.realpath(kept)] = os.path.realpath(kept), os.path.realpath(copy)
        first = {os.path.realpath(p): i for i, p in reversed(list(enumerate(lora_paths)))}
        rest = []
        for i in range(len(given), count):
            other = first.get(partner.get(os.path.realpath(lora_paths[i]), ""), count)
            if other < len(given):
                values[i] = values[other]
            else:
                rest.append(Path(lora_paths[i]).name)
        if say and rest:
            logger.warning("%s gives %d value(s) for %d files: %s %s applied at 1.0, as musubi-tuner reads the flag (give one "
                           "value per file)", flag, len(given), count, ", ".join(rest[:3]) + (", ..." if len(rest) > 3 else ""),
                           "is" if len(rest) == 1 else "are")
    return values


# --lora_blocks words; anything else is a regular expression searched in the module path
BLOCK_PRESETS = {"all": r"", "double": r"^double_blocks\.", "single": r"^single_blocks\."}

ModuleFilter = Callable[[str], bool]  # official module path (`double_blocks.3.img_attn_qkv`) -> apply its LoRA?


def block_filter(spec: str | None, exclude_single_blocks: bool = False, flag: str = "--lora_blocks") -> ModuleFilter:
    r"""The modules a `--lora_blocks` value keeps: `all` (or None), `double`, `single`, or a regular expression
    searched in the module path, e.g. `double_blocks\.1[0-9]\.` for double blocks 10-19, `img_attn` for the
    image attention layers. `exclude_single_blocks` (musubi-tuner's flag) also drops the single blocks."""
    if spec is not None and not spec.strip():  # (an unset shell variable: the empty pattern kept every block, unsaid)
        raise UserError(f"{flag} is empty (an unset shell variable gives an empty value): give all, double, single or a "
                        "regular expression")
    pattern = BLOCK_PRESETS.get(spec or "all", spec)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{flag} {spec!r}: not 'all', 'double', 'single' or a valid regular expression ({e})") from None
    return lambda path: rx.search(path) is not None and not (exclude_single_blocks and path.startswith("single_blocks."))


def _block_specs(lora_paths: Sequence[str], specs: Sequence[str] | str | None, say: bool = False) -> list[str | None]:
    """The `--lora_blocks` value of each LoRA file; `say`: a file given twice with the same value is warned about."""
    if specs is None or isinstance(specs, str):
        specs = [specs]
    specs = list(specs) or [None]
    if len(specs) == 1:
        specs = specs * len(lora_paths)
    if len(specs) != len(lora_paths):
        raise UserError(f"{len(lora_paths)} LoRA files but {len(specs)} values of --lora_blocks: give one per file, or one for all")
    seen: dict[tuple[str, str | None], str] = {}
    for path, spec in zip(lora_paths, specs):
        if (key := (os.path.realpath(path), spec)) in seen and say:
            also = "" if seen[key] == str(path) else f" (also as {seen[key]})"
            logger.warning("%s is given twice among the LoRA files%s: it is applied twice to the same blocks, as one file at "
                           "the sum of its multipliers", path, also)
        seen.setdefault(key, str(path))
    return specs


def lora_jobs(lora_paths: Sequence[str], multipliers, lora_blocks: Sequence[str] | str | None = None,
              exclude_single_blocks: bool = False, say: bool = False,
              multiplier_flag: str = "--lora_multiplier") -> list[tuple[str, float, ModuleFilter]]:
    """(file, multiplier, module filter) of each LoRA file to apply, in order: what every command that applies several
    LoRA files (merge_lora, generation, training's --base_weights) iterates over. A `.comfyui` companion given beside its
    own LoRA file (networks.lora_files.companion_copies; a glob `out/my-lora*.safetensors` matches both) is the same LoRA:
    it is left out with a warning, or refused when given another multiplier or --lora_blocks value than that file.
    `say`: the warnings are said (by the checks before the work; the work's own call is quiet: they were said twice)."""
    from musubi_tuner.networks.lora_files import companion_copies

    jobs = list(zip(lora_paths, resolve_multipliers(lora_paths, multipliers, multiplier_flag, say), _block_specs(lora_paths, lora_blocks, say)))
    copies = companion_copies(lora_paths)
    settings = {Path(path): (m, spec) for path, m, spec in reversed(jobs)}  # of its first mention
    for copy, kept in copies.items():
        if settings[copy] != settings[kept]:
            raise UserError(f"{copy} is the .comfyui companion of {kept} (the same LoRA in the other naming), but given with "
                            f"another --lora_multiplier or --lora_blocks value: give one of the two files")
        times = sum(os.path.realpath(path) == os.path.realpath(kept) for path in lora_paths)
        if say:  # (its partner given twice is applied twice, as said beside: "applied once" contradicted it, fuzz_au 9)
            logger.warning("%s is the .comfyui companion of %s, also given (the same LoRA in the other naming): left out, "
                           "so the LoRA is applied %s", copy, kept, "once" if times == 1 else f"as often as {kept} is given ({times} times)")
    left_out = {os.path.realpath(copy) for copy in copies}
    return [(path, m, block_filter(spec, exclude_single_blocks)) for path, m, spec in jobs
            if os.path.realpath(path) not in left_out]


def warn_base_mismatch(metadata: dict[str, str], source: str, config: DiTConfig, dit_path: str) -> None:
    """Log the doctor's warning when a LoRA file's metadata names another base than the DiT (SkyReels I2V on a T2V DiT)."""
    if mismatch := base_mismatch(LoRAFileInfo.from_metadata(metadata, source), config, str(dit_path)):
        logger.warning("%s: %s", source, mismatch)


def lora_patches(path, keep: ModuleFilter | None = None, allow_partial: bool = False,
                 base: tuple[DiTConfig, str] | None = None, multiplier: float = 1.0) -> list[Patch]:
    """The patches of a LoRA file (any naming, refused unless whole and finite) on the modules `keep` accepts; with `base`
    (the DiT's config and file) warned about when its metadata names another base. A `multiplier` whose product with a
    pair's alpha / rank is past float32 (an alpha stored as float64 1e300) is refused: torch took it with a traceback."""
    contents = read_lora(path, allow_partial)
    if base is not None:
        warn_base_mismatch(contents.metadata, contents.source, *base)
    patches = contents.select(keep)
    if not patches:
        raise UserError(f"{path}: no LoRA module of this file applies to the DiT (or to the blocks --lora_blocks keeps)")
    for patch in patches:
        if patch.kind == "lora" and not abs(multiplier * patch.scale) <= torch.finfo(torch.float32).max:
            raise UserError(f"{path}: {patch.module}: the multiplier {multiplier:g} times its alpha / rank {patch.scale:g} is past "
                            "the range of float32 numbers; use a smaller multiplier")
        # the file's update is a trained LoRA's (read_lora); a far multiplier can make it a diverged training's: a DiT of
        # 1e36 weights was merged and written, and generation then blamed the files
        largest = abs(multiplier) * largest_update(patch) if abs(multiplier) > 1 and patch.kind != "set" else 0.0
        if largest > DIVERGED_UPDATE:  # (a bound so far: the update itself, to say and to decide on)
            largest = abs(multiplier) * patch.delta(patch.shape).abs().max().item()
        if largest > DIVERGED_UPDATE:
            raise UserError(f"{path}: {patch.module}: with the multiplier {multiplier:g} its update reaches {largest:.3g} per weight, "
                            "where a trained LoRA's stays well below 1: the output would be noise; use a multiplier near 1")
    return patches


def apply_patch(weight: torch.Tensor, patch: Patch, multiplier: float) -> None:
    """One patch's documented math on a float32 parameter, in place: W += m * up @ down * alpha / rank (reshaped),
    W += m * LoHa's or LoKr's delta, W += m * diff, b += m * diff_b, or W = set_weight (any multiplier but 0, as ComfyUI)."""
    if patch.kind in ("loha", "lokr"):
        weight.add_(patch.delta(weight.shape, weight.device), alpha=multiplier)
    elif patch.kind == "lora":
        up, down = patch.factors_2d()
        weight.view(weight.shape[0], -1).addmm_(up.to(weight.device), down.to(weight.device), alpha=multiplier * patch.scale)
    elif patch.kind == "set":
        if multiplier != 0:
            weight.copy_(patch.tensor.reshape(weight.shape))
    else:
        weight.add_(patch.tensor.to(weight.device, torch.float32).reshape(weight.shape), alpha=multiplier)


def patch_target(dit: HunyuanVideoDiT, patch: Patch, source: str):
    try:
        module = dit.get_submodule(patch.module)
    except AttributeError:
        raise UserError(f"{source}: module {patch.module} does not exist in this DiT (a LoRA for another model?)") from None
    param = getattr(module, patch.param.rsplit(".", 1)[1], None)
    if not isinstance(param, torch.Tensor):
        raise UserError(f"{source}: {patch.keys[0]} changes {patch.param}, which this DiT does not have")
    if misfit := patch.misfit(param.shape, "the DiT"):
        raise UserError(f"{source}: {misfit}")
    return module, param


@torch.no_grad()
def merge_loras_into(dit: HunyuanVideoDiT, lora_paths: Sequence[str], multipliers, device: torch.device | str | None = None,
                     exclude_single_blocks: bool = False, lora_blocks: Sequence[str] | str | None = None,
                     allow_partial: bool = False) -> int:
    """Merge each LoRA file (any naming we read) into the DiT's parameters in place; returns the number of patches applied.

    `lora_blocks`: a `--lora_blocks` value per file (or one for all) choosing the blocks each LoRA is applied to.
    """
    changed = 0
    for path, m, keep in lora_jobs(lora_paths, multipliers, lora_blocks, exclude_single_blocks):
        patches = lora_patches(path, keep, allow_partial, multiplier=m)
        for patch in patches:
            merge_patch(dit, patch, m, device, str(path))
        logger.info("merged %s (multiplier %s): %d patches", path, m, len(patches))
        changed += len(patches)
    return changed


def merge_patch(dit: HunyuanVideoDiT, patch: Patch, multiplier: float, device=None, source: str = "LoRA") -> None:
    """Apply one patch to the DiT's parameter in float32 on `device`, cast back (fp8 weights are requantized)."""
    module, param = patch_target(dit, patch, source)
    device = device or param.device
    if isinstance(module, Fp8Linear) and param is module.weight:
        full = module.dequantized_weight(torch.float32).to(device)
        apply_patch(full, patch, multiplier)
        q, scale = quantize_rows(full)
        param.data = q.to(param.device)
        module.weight_scale = scale.to(param.device)
        return
    w = param.to(device, torch.float32, copy=True)
    apply_patch(w, patch, multiplier)
    param.data = w.to(param.device, param.dtype)


def check_loras_fit(lora_paths: Sequence[str], dit_shapes: dict[str, tuple[int, ...]], dit_name: str, allow_partial: bool = False) -> None:
    """Every LoRA file is readable, whole and finite, and each patch is a parameter of this DiT of the LoRA's shape (no weights
    merged); a file whose metadata names another base than the DiT is warned about."""
    config = DiTConfig.from_shapes(dit_shapes, source=dit_name)
    for path in lora_paths:
        contents = read_lora(path, allow_partial)
        warn_base_mismatch(contents.metadata, contents.source, config, dit_name)
        for patch in contents.patches:
            shape = dit_shapes.get(patch.param)
            if shape is None:
                raise UserError(f"{path}: module {patch.module} does not exist in {dit_name} (a LoRA for another model?)")
            if misfit := patch.misfit(shape, dit_name):
                raise UserError(f"{path}: {misfit}")


GROWTH_WARNED = 100  # a merged layer this many times the base's norm (a LoRA moves weights by a few percent)


def _finite(t: torch.Tensor, key: str, what: str, cause: str) -> torch.Tensor:
    """`t`, or a UserError if it holds NaN/inf: a merged model must never carry them into a video silently."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise UserError(f"{what} would hold {bad} NaN/inf values ({cause}); nothing was written")
    return t


def merge_file(dit_path: str, lora_paths: Sequence[str], multipliers, out_path: str, device: torch.device | str = "cpu",
               exclude_single_blocks: bool = False, in_channels: int | None = None, lora_blocks: Sequence[str] | str | None = None,
               allow_partial: bool = False) -> dict:
    """Merge LoRAs into a DiT file and write the result, streaming one tensor at a time.

    Each parameter is read, its LoRAs' patches applied in float32 on `device` (`apply_patch`, in place), cast back
    to its stored dtype and written before the next is read. Only the LoRAs' small factors are kept in between,
    so peak memory is about one layer in float32 plus the LoRA files, not a second model. Every LoRA is read and
    checked (whole, finite, fitting) before the first weight is.
    fp8 inputs are written in bf16: rounding W + delta back to e4m3 would erase most of a LoRA's small update.
    """
    from musubi_tuner.files import LazyTensors, RunLock, StateDictFile, output_file_lock, remove_leftover_temp_files, save_safetensors
    from musubi_tuner.hunyuan.checkpoints import check_dit_file, dit_metadata, open_dit_file, read_dit_config
    from musubi_tuner.hunyuan.fp8 import FP8_DTYPE

    source = open_dit_file(dit_path)
    config = read_dit_config(source)
    check_dit_file(source, config)  # a damaged base is named now, not found by whoever loads the merged file
    if in_channels is not None and in_channels != config.in_channels:
        raise UserError(f"{dit_path}: --dit_in_channels {in_channels} but the file's DiT takes {config.in_channels} input channels")
    ops: dict[str, list[tuple[float, Patch]]] = {}  # parameter key -> (multiplier, patch) per LoRA, in order
    jobs = lora_jobs(lora_paths, multipliers, lora_blocks, exclude_single_blocks)
    for path, m, keep in jobs:
        for patch in lora_patches(path, keep, allow_partial, base=(config, dit_path), multiplier=m):
            if patch.param not in source:
                raise UserError(f"{path}: module {patch.module} does not exist in {dit_path} (a LoRA for another model?)")
            if misfit := patch.misfit(source.shape(patch.param), dit_path):
                raise UserError(f"{path}: {misfit}")
            ops.setdefault(patch.param, []).append((m, patch))

    def out_dtype(key: str) -> torch.dtype:  # (as stored: Tencent's scaled fp8 weights read as float32, and were written so,
        # a file of twice a bf16 merge's size: fuzz_ba 3)
        return torch.bfloat16 if StateDictFile.dtype(source, key) == FP8_DTYPE else source.dtype(key)

    grown: dict[str, float] = {}  # layers the LoRAs made many times larger: (finite) nonsense, said after the write

    def compute(key: str) -> torch.Tensor:
        t = source.read(key)  # a copy of its own: the file's pages do not pile up in this process
        if key not in ops:
            return _finite(t.to(out_dtype(key)), key, f"{dit_path}: {key}", "the DiT file itself holds them")
        merged = t.to(device, torch.float32, copy=True)
        del t
        _finite(merged, key, f"{dit_path}: {key}", "the DiT file itself holds them")  # before a LoRA is blamed for them
        before = merged.norm().item()
        for m, patch in ops[key]:
            apply_patch(merged, patch, m)  # a LoRA pair is added with addmm_: no delta-sized temporary
        after = merged.norm().item()
        if after > GROWTH_WARNED * before:
            grown[key] = after / max(before, 1e-30)
        return _finite(merged.to("cpu", out_dtype(key)), key, f"merging {', '.join(map(str, lora_paths))} into {dit_path}: {key}",
                       f"a sum beyond {out_dtype(key)}")

    specs = {k: (out_dtype(k), tuple(source.shape(k))) for k in source.keys()}
    out = Path(out_path)
    with RunLock(output_file_lock(out), "merge into this file", "--save_merged_model"):
        remove_leftover_temp_files(out.parent, lambda name: name == out.name)
        from musubi_tuner.inference.presets import PRESET_METADATA_KEY, detect_preset

        # (the model it came from: a merged SkyReels T2V model ran with HunyuanVideo's defaults, its name lost: fuzz_aj 2)
        preset = {PRESET_METADATA_KEY: detect_preset(config.in_channels, dit_path, source.metadata)}
        save_safetensors(LazyTensors(specs, compute), out, metadata=dit_metadata(config) | preset)
    if grown:
        key = max(grown, key=grown.get)
        logger.warning("%s: the merged weights of %d layer(s) are over %d times the base's (%s: %.3g times), where a LoRA changes "
                       "a layer by a few percent: the merged model is unlikely to work; check the LoRA files with musubi-lora-info "
                       "and the --lora_multiplier", out, len(grown), GROWTH_WARNED, key, grown[key])
    return {"files": len(jobs), "layers": len(ops), "fp8_input": any(StateDictFile.dtype(source, k) == FP8_DTYPE for k in source.keys())}
