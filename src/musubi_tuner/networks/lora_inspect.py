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

from musubi_tuner.errors import UserError
from musubi_tuner.networks.lora_files import read_lora_file
from musubi_tuner.networks.lora_naming import detect_naming, kohya_to_module_path, peft_alphas, to_kohya
from musubi_tuner.training.metadata import LoRAFileInfo

NAMINGS = {
    "kohya": "kohya (lora_unet_*): musubi-tuner, sd-scripts, this toolkit",
    "other": "diffusion_model.* lora_A/lora_B: ComfyUI, diffusers, diffusion-pipe, this toolkit",
    "diffusers": "diffusers/PEFT (transformer.transformer_blocks.*): diffusers, this toolkit",
    "unknown": "unknown",
}
# musubi-tuner's ss_* keys worth showing, in this order
TRAINING_KEYS = ("ss_output_name", "ss_sd_model_name", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                 "ss_learning_rate", "ss_optimizer", "ss_lr_scheduler", "ss_steps", "ss_epoch", "ss_max_train_steps",
                 "ss_mixed_precision", "ss_timestep_sampling", "ss_discrete_flow_shift", "ss_weighting_scheme", "ss_guidance_scale",
                 "ss_seed", "ss_training_comment", "modelspec.title", "modelspec.resolution")


@dataclass
class ModuleUpdate:
    path: str  # official module path, e.g. double_blocks.0.img_attn_qkv
    shape: tuple[int, int]  # (out, in) of the layer it changes
    rank: int
    alpha: float  # as stored; rank when the file folds the scale into its weights
    norm: float  # Frobenius norm of the update up @ down * alpha / rank

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

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules})

    def block_norms(self) -> dict[str, float]:
        """Norm of each block's whole update (root of the sum of its modules' squared norms), in model order."""
        sums: dict[str, float] = {}
        for m in self.modules:
            sums[m.block] = sums.get(m.block, 0.0) + m.norm ** 2
        return {b: math.sqrt(sums[b]) for b in sorted(sums, key=_block_order)}


def _block_order(block: str) -> tuple:
    """Model order: embedders and token refiner, double blocks, single blocks, final layer."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)", block)
    if m:
        return (1 if m.group(1) == "double" else 2, int(m.group(2)), "")
    return (3 if block.startswith("final_layer") else 0, 0, block)


def update_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> float:
    """‖up @ down‖_F * scale without forming the (out, in) product: sqrt(sum((upᵀup) ∘ (down downᵀ)))."""
    up, down = up.double().flatten(1), down.double().flatten(1)
    return math.sqrt(max(((up.T @ up) * (down @ down.T)).sum().item(), 0.0)) * abs(scale)


def inspect_lora(path: str | os.PathLike) -> LoRAInspection:
    weights, metadata = read_lora_file(path)
    naming = detect_naming(weights)
    modules = []
    if naming != "unknown":
        kohya = to_kohya({**weights, **peft_alphas(weights, metadata)}, source=str(path))
        for key, down in kohya.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key.removesuffix(".lora_down.weight")
            up = kohya[f"{name}.lora_up.weight"]
            rank = down.shape[0]
            alpha = float(kohya[f"{name}.alpha"]) if f"{name}.alpha" in kohya else float(rank)
            try:
                module = kohya_to_module_path(name)
            except UserError:  # a name no HunyuanVideo layer has: shown as stored
                module = name
            modules.append(ModuleUpdate(module, (up.shape[0], down.flatten(1).shape[1]), rank, alpha, update_norm(down, up, alpha / rank)))
    modules.sort(key=lambda m: (_block_order(m.block), m.path))
    return LoRAInspection(Path(path), weights, metadata, naming, modules, LoRAFileInfo.from_metadata(metadata))


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
        m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", p)
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
        if ins.naming == "other" and info.modules:  # the scale is folded into the weights; the metadata has the trained values
            alphas = f"{_fmt_values(sorted({a for _, a in info.modules.values()}))} (folded into the weights)"
        lines.append(f"  modules    {len(ins.modules)} in {len(blocks)} blocks, rank {_fmt_values(ins.ranks)}, alpha {alphas}")
        lines += [f"             {g}" for g in module_groups([m.path for m in ins.modules])]
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
    else:
        lines.append("  trained    no training metadata in the file")
    if info.companion:
        lines.append(f"  companion  {info.companion}")
    return lines


def inspection_text(ins: LoRAInspection) -> str:
    lines = summary_lines(ins)
    if ins.modules:
        lines += ["", "  update norm per block (|up @ down| * alpha/rank):"]
        norms = ins.block_norms()
        top = max(norms.values()) or 1.0
        for block, norm in norms.items():
            lines.append(f"    {block:<20} {norm:10.4g}  {'#' * max(1, round(30 * norm / top)) if norm else ''}")
    shown = [(k, ins.metadata[k]) for k in TRAINING_KEYS if k in ins.metadata]
    if shown:
        lines += ["", "  training settings:"] + [f"    {k:<28} {v}" for k, v in shown]
    return "\n".join(lines)
