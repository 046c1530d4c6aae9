"""What is in a LoRA file: its naming, modules, ranks and alphas, the size of each block's update, and its metadata.

What users ask when a LoRA "does nothing". `python -m musubi_tuner.lora_info FILE` prints it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from musubi_tuner.errors import printable
from musubi_tuner.networks.lora_metadata import LoRAFileInfo
from musubi_tuner.networks.lora_reader import (ADAPTERS, LoRAContents, alpha_or_rank, diverged, first_non_finite, non_finite_words,
                                               past_float32, read_lora_contents)

NAMINGS = {
    "kohya": "kohya (lora_unet_*): musubi-tuner, sd-scripts, this toolkit",
    "other": "diffusion_model.* lora_A/lora_B: ComfyUI, diffusers, diffusion-pipe, this toolkit",
    "diffusers": "diffusers/PEFT (transformer.transformer_blocks.*): diffusers, this toolkit",
    "mixed": "several namings in one file",
    "unknown": "unknown",
}
KIND_NAMES = {"lora": "LoRA pairs", "loha": "LoHa modules", "lokr": "LoKr modules", "diff": "weight diffs", "diff_b": "bias diffs",
              "set": "set_weights"}
# musubi-tuner's ss_* keys worth showing, in this order
TRAINING_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                 "ss_learning_rate", "ss_optimizer", "ss_lr_scheduler", "ss_steps", "ss_epoch", "ss_max_train_steps",
                 "ss_mixed_precision", "ss_timestep_sampling", "ss_discrete_flow_shift", "ss_weighting_scheme", "ss_guidance_scale",
                 "ss_seed", "ss_training_comment", "modelspec.title", "modelspec.resolution")


@dataclass
class ModuleUpdate:
    path: str  # official module path, e.g. double_blocks.0.img_attn_qkv
    shape: tuple[int, ...]  # (out, in) of the layer a LoRA pair changes; a diff's own shape
    rank: int  # 0 for a diff or set_weight (and a LoKr with a whole w2)
    alpha: float  # as it acts: the rank where the file has none, or 0 (musubi-tuner reads both so)
    norm: float  # Frobenius norm of the update (up @ down * alpha / rank, LoHa's or LoKr's, or the diff)
    kind: str = "lora"  # "lora", "loha", "lokr", "diff", "diff_b" or "set"

    @property
    def block(self) -> str:
        """`double_blocks.3`; a layer outside the stream blocks is its own block."""
        m = re.match(r"(double|single)_blocks\.\d+", self.path)
        return m.group(0) if m else self.path


@dataclass
class LoRAInspection:
    path: Path
    weights: dict[str, torch.Tensor]  # as stored
    metadata: dict[str, str]
    naming: str
    modules: list[ModuleUpdate]
    info: LoRAFileInfo
    contents: LoRAContents | None = None
    non_finite: str | None = None  # the first tensor holding NaN or inf (in float32: lora_reader.first_non_finite)
    diverged: str | None = None  # a patch whose update is a diverged training's (lora_reader.diverged), in words

    @property
    def unusable(self) -> str | None:
        """Why no program can use the file (NaN or inf, a diverged training's update), in words; None when it can."""
        return non_finite_words(self.non_finite, self.weights[self.non_finite]) if self.non_finite else self.diverged

    @property
    def unusable_in_short(self) -> str | None:
        """`unusable` without the key: what the file holds that no program can use."""
        if not self.unusable:
            return None
        if self.non_finite:
            return "values past float32's range" if past_float32(self.weights[self.non_finite]) else "NaN or infinite values"
        return "a diverged training's update"

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules if m.kind in ADAPTERS and m.rank})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules if m.kind in ADAPTERS and m.rank})

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(key, why) of each entry this toolkit cannot apply."""
        return [(k, p.message) for p in (self.contents.problems if self.contents else []) for k in p.keys]

    def block_norms(self) -> dict[str, float]:
        """Norm of each block's whole update (root of the sum of its modules' squared norms), in model order."""
        sums: dict[str, float] = {}
        for m in self.modules:
            sums[m.block] = sums.get(m.block, 0.0) + m.norm * m.norm  # (inf past float's range, where ** 2 raises)
        return {b: math.sqrt(sums[b]) for b in sorted(sums, key=_block_order)}


def _block_order(block: str) -> tuple:
    """Model order: embedders and token refiner, double blocks, single blocks, final layer."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)", block)
    if m:
        return (1 if m.group(1) == "double" else 2, int(m.group(2)), "")
    return (3 if block.startswith("final_layer") else 0, 0, block)


def update_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> float:
    """‖up @ down‖_F * scale, through whichever is smaller: the (out, in) product, or the two (rank, rank) Gram matrices,
    sqrt(sum((upᵀup) ∘ (down downᵀ))) (a rank of 100,000 on narrow layers asked for 75 GB of them: fuzz_bb 5).

    nan when a factor holds NaN or inf (info reports the file as non-finite)."""
    up, down = up.double().flatten(1), down.double().flatten(1)
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        return math.nan
    rank = up.shape[1]
    if up.shape[0] * down.shape[1] <= 2 * rank * rank:
        return (up @ down).norm().item() * abs(scale)
    return math.sqrt(max(((up.T @ up) * (down @ down.T)).sum().item(), 0.0)) * abs(scale)


def inspect_lora(path: str | os.PathLike) -> LoRAInspection:
    """A file's patches and problems as networks.lora_reader reads it, without refusing anything."""
    contents = read_lora_contents(path)
    modules = []
    for p in contents.patches:
        if p.kind == "lora":
            modules.append(ModuleUpdate(p.module, p.shape, p.rank, alpha_or_rank(p.alpha, p.rank), update_norm(p.down, p.up, p.scale)))
        elif p.kind in ADAPTERS:  # LoHa, LoKr: their (out, in) update is formed (as merging does)
            rank = p.rank or 0
            norm = p.delta(p.shape).double().norm().item() if first_non_finite(p.factors) is None else math.nan
            modules.append(ModuleUpdate(p.module, p.shape, rank, alpha_or_rank(p.alpha, rank), norm, p.kind))
        else:
            modules.append(ModuleUpdate(p.module, p.shape, 0, 0.0, p.tensor.double().norm().item(), p.kind))
    modules.sort(key=lambda m: (_block_order(m.block), m.path, m.kind))
    non_finite = first_non_finite(contents.tensors)
    return LoRAInspection(Path(path), contents.tensors, contents.metadata, contents.naming, modules,
                          LoRAFileInfo.from_metadata(contents.metadata, str(path)), contents, non_finite,
                          None if non_finite else diverged(contents.patches))


# ----------------------------------------------------------------------------------------------- text


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def _fmt_values(values) -> str:
    return ", ".join(f"{v:g}" for v in values) if values else "-"


def module_groups(paths: list[str]) -> list[str]:
    """Covered modules, compressed: blocks with the same layers share a line ('double_blocks 0-19: img_attn_qkv ...')."""
    by_block: dict[tuple[str, int], list[str]] = {}
    others = []
    for p in paths:
        m = re.match(r"(double_blocks|single_blocks|txt_in\.individual_token_refiner\.blocks)\.(\d+)\.(.+)", p)
        if m:
            by_block.setdefault((m.group(1), int(m.group(2))), []).append(m.group(3))
        else:
            others.append(p)
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for (kind, index), leaves in sorted(by_block.items()):
        groups.setdefault((kind, tuple(sorted(leaves))), []).append(index)
    lines = [f"{kind} {_ranges(indices)}: {' '.join(leaves)}" for (kind, leaves), indices in groups.items()]
    return lines + others


def summary_lines(ins: LoRAInspection) -> list[str]:
    """The header both lora_info and the doctor print."""
    info = ins.info
    lines = [f"{ins.path.name}", f"  naming     {NAMINGS[ins.naming]}"]
    if ins.modules:
        blocks = {m.block for m in ins.modules}
        alphas = _fmt_values(ins.alphas)
        folded = ins.contents is not None and not any(p.alpha is not None for p in ins.contents.patches if p.kind in ADAPTERS)
        if ins.naming == "other" and info.modules and folded:  # our LoRA pairs' scale is in the weights; the metadata has
            # the trained values (a LoHa's or LoKr's .alpha entries, or PEFT's lora_alpha, are what is applied: shown as such)
            alphas = f"{_fmt_values(sorted({a for _, a in info.modules.values()}))} (folded into the weights)"
        pairs = [m for m in ins.modules if m.kind == "lora"]
        lines.append(f"  modules    {len({m.path for m in ins.modules})} in {len(blocks)} blocks, rank {_fmt_values(ins.ranks)}, alpha {alphas}")
        lines += [f"             {g}" for g in module_groups(sorted({m.path for m in ins.modules}))]
        others = {kind: sum(m.kind == kind for m in ins.modules) for kind in KIND_NAMES if kind != "lora"}
        if any(others.values()):
            counts = ", ".join(f"{n} {KIND_NAMES[k]}" for k, n in [("lora", len(pairs)), *others.items()] if n)
            lines.append(f"  entries    {counts}")
    if ins.non_finite:
        lines.append(f"  NOT FINITE {ins.unusable}: merging and generation refuse this file")
    if ins.diverged:
        lines.append(f"  DIVERGED   {ins.diverged}: merging and generation refuse this file")
    if ins.problems:
        lines.append(f"  unusable   {len(ins.problems)} entries this toolkit cannot apply (merging refuses the file; "
                     "--allow_partial_lora drops them):")
        lines += [f"             {k}: {why}" for k, why in ins.problems[:8]]
        if len(ins.problems) > 8:
            lines.append(f"             ... and {len(ins.problems) - 8} more (--json lists every one)")
    if info.other_model:
        lines.append(f"  FOR        {info.other_model}: a LoRA of another model, not HunyuanVideo; merging, converting and "
                     "generation refuse it")
    if info.written_here:
        data = ", ".join(f"{w}x{h}" for w, h in info.resolutions) or "?"
        frames = ", ".join(map(str, info.frames)) or "?"
        lines.append(f"  trained    on {info.base_model} ({info.in_channels} input channels), {data}, frames {frames}; "
                     f"musubi_tuner {info.version}")
        lines.append(f"  template   {info.text_template}")
    elif info.base_model or info.resolutions:
        data = ", ".join(f"{w}x{h}" for w, h in info.resolutions) or "?"
        lines.append(f"  trained    elsewhere; base guessed from ss_sd_model_name: {info.base_model or '?'}; data {data}, "
                     f"frames {', '.join(map(str, info.frames)) or '?'}")
    elif not info.other_model:
        lines.append("  trained    no training metadata in the file")
    if info.companion:
        lines.append(f"  companion  {info.companion}")
    return [printable(line) for line in lines]  # (a downloaded file's key or metadata text reaches the terminal here)


def inspection_text(ins: LoRAInspection) -> str:
    lines = summary_lines(ins)
    if ins.modules:
        lines += ["", "  update norm per block (|delta W|: up @ down * alpha/rank, LoHa's, LoKr's, diffs):"]
        norms = ins.block_norms()
        top = max((n for n in norms.values() if math.isfinite(n)), default=0.0) or 1.0
        for block, norm in norms.items():
            bar = "not finite" if not math.isfinite(norm) else "#" * max(1, round(30 * norm / top)) if norm else ""
            lines.append(f"    {block:<20} {norm:10.4g}  {bar}")
    shown = [(k, _shown_value(ins.metadata[k])) for k in TRAINING_KEYS if k in ins.metadata]
    if shown:
        lines += ["", "  training settings:"] + [f"    {k:<28} {v}" for k, v in shown]
    return "\n".join(lines)


SHOWN_VALUE_CHARACTERS = 200


def _shown_value(value: str) -> str:
    """A metadata value on one line, what a terminal acts on escaped (a downloaded file's comment could clear the screen
    or forge the line after it), and cut when long (a comment of 2,000 lines was printed as 2,000 report lines)."""
    value = printable(value)
    if len(value) <= SHOWN_VALUE_CHARACTERS:
        return value
    return f"{value[:SHOWN_VALUE_CHARACTERS]}... ({len(value):,} characters; --json shows all)"
