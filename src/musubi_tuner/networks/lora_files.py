"""LoRA files: reading (any naming we understand, returned in our kohya naming) and atomic writing.

No one naming loads completely everywhere (docs/lora_formats.md): musubi-tuner reads only the kohya
naming, while ComfyUI drops its double-block MLP weights and diffusers cannot read it at all. So the
trainer writes, per `--lora_format`, the kohya file, its "other"-naming companion
`NAME.comfyui.safetensors` (which ComfyUI and diffusers load completely), or both.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.files import remove_leftover_temp_files, save_safetensors
from musubi_tuner.networks.lora_naming import module_template
from musubi_tuner.networks.lora_reader import (ADAPTERS, LoRAContents, Patch, kohya_state_dict, kohya_to_other, read_lora,
                                               read_lora_contents, same_update, warn_once)

logger = logging.getLogger(__name__)


def save_lora(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path}: LoRA files are written as .safetensors")
    remove_leftover_temp_files(path.parent, lambda name: name == path.name)  # an earlier write of this file, killed
    save_safetensors(state_dict, path, metadata={k: str(v) for k, v in metadata.items()})
    return path


def load_lora(path: str | os.PathLike, allow_partial: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA file in any naming, in ours (`lora_unet_*.lora_down/up.weight`, `.alpha`, `.diff`, `.diff_b`, `.set_weight`);
    refused unless every entry applies (networks.lora_reader)."""
    return kohya_state_dict(read_lora(path, allow_partial).patches)


def load_network_weights(path: str | os.PathLike, allow_partial: bool = False) -> dict[str, torch.Tensor]:
    """The LoRA (LoHa, LoKr) modules of Linear layers of a file, in our naming: what a network (--network_weights) holds.

    Anything else (bias or weight diffs, a conv LoRA, set_weight) cannot be trained on: refused naming the first
    entry, or with `allow_partial` dropped with a warning."""
    patches = unfolded(read_lora(path, allow_partial))
    pairs = [p for p in patches if p.kind in ADAPTERS and module_template(p.module).weight_ndim == 2]
    others = [p for p in patches if not (p.kind in ADAPTERS and module_template(p.module).weight_ndim == 2)]
    if others and not allow_partial:
        raise UserError(f"{path}: {others[0].keys[0]}: a {others[0].kind} of {others[0].param}, but a network holds LoRA, LoHa or "
                        f"LoKr modules of Linear layers only ({len(others)} such entries): merge the file into the base with "
                        "--base_weights, or --allow_partial_lora to train on its modules alone")
    if others:
        warn_once("%s: --allow_partial_lora drops %d entries the network cannot hold: %s", path, len(others),
                  ", ".join(k for p in others for k in p.keys))
    return kohya_state_dict(pairs)


def unfolded(contents: LoRAContents) -> list[Patch]:
    """The file's patches, each LoRA pair whose alpha / rank was folded into its factors (a `.comfyui` copy this toolkit
    wrote: its metadata keeps each module's [rank, alpha] in musubi_tuner.lora_modules) given back its alpha and its
    factors as trained. The update is the same either way; a training continued from the copy (--network_weights) went
    on at scale 1 where the LoRA had alpha / rank, so every step moved it otherwise (fuzz_ad F11)."""
    from musubi_tuner.networks.lora_metadata import LoRAFileInfo

    info = LoRAFileInfo.from_metadata(contents.metadata, contents.source)
    if info.naming != "other" or not info.modules:
        return contents.patches
    out, unread = [], []
    for p in contents.patches:
        rank, alpha = info.modules.get(p.module, (None, None))
        if p.kind == "lora" and p.alpha is None and rank == p.rank and alpha and alpha != rank:
            root = abs(alpha / rank) ** 0.5  # (other_state_dict: sqrt(|alpha / rank|) into each factor, its sign into B)
            back = replace(p, down=(p.down.float() / root).to(p.down.dtype), alpha=float(alpha),
                           up=(p.up.float() / math.copysign(root, alpha / rank)).to(p.up.dtype))
            # (metadata is informational: an alpha past float32, or factors it would take past their dtype, keeps the
            # folded ones; unfolded, a file of good tensors was written with inf, or trained from NaN: fuzz_aw 8)
            if abs(alpha) <= torch.finfo(torch.float32).max and all(torch.isfinite(t).all() and (t != 0).any() == (f != 0).any()
                                                                    for t, f in ((back.down, p.down), (back.up, p.up))):
                p = back
            else:
                unread.append(p.module)
        out.append(p)
    if unread:
        logger.warning("%s: musubi_tuner.lora_modules gives %d module(s) an alpha their folded factors cannot be unfolded "
                       "by (%s, ...): read as folded, at alpha = rank (the update is the same)", contents.source, len(unread),
                       unread[0])
    return out


LORA_FORMATS = {
    "musubi": "kohya naming only (musubi-tuner, this toolkit)",
    "comfyui": "diffusion_model.* lora_A/lora_B naming only (ComfyUI, diffusers, this toolkit)",
    "both": "the kohya file plus NAME.comfyui.safetensors beside it",
}
COMPANION_SUFFIX = ".comfyui.safetensors"


def companion_path(path: str | os.PathLike) -> Path:
    """`out/my_lora.safetensors` -> `out/my_lora.comfyui.safetensors`: where the other-naming copy goes."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + COMPANION_SUFFIX)


def companion_copies(paths: Sequence[str | os.PathLike]) -> dict[Path, Path]:
    """The `.comfyui` companions among `paths` whose own LoRA file is given too (a glob `out/my-lora*.safetensors` matches
    both): companion -> that file. The two are the same LoRA in two namings, written side by side (`--lora_format both`),
    each naming the other in its metadata (`musubi_tuner.companion`): a pair is two files of which one's metadata names
    the other, or `NAME.safetensors` and its `companion_path`. Of a pair, the companion is the file in the other naming
    (`musubi_tuner.lora_naming`), else the `.comfyui` one. Every command that takes several LoRA files applies or
    averages each LoRA once by leaving the companions out (networks.merge.lora_jobs, networks.post_hoc_ema.order_files).
    A pair by name whose files change the DiT differently (lora_reader.same_update) is not a pair: both are used, with
    a warning (a file another LoRA was copied over, say)."""
    from musubi_tuner.files import read_safetensors_header
    from musubi_tuner.networks.lora_metadata import LoRAFileInfo

    given = {os.path.realpath(p): Path(p) for p in reversed(paths)}  # the first spelling of each file
    infos = {p: LoRAFileInfo.from_metadata(read_safetensors_header(p)[1], str(p)) if p.suffix == ".safetensors" else LoRAFileInfo()
             for p in given.values()}
    copies: dict[Path, Path] = {}
    compared: set[frozenset[Path]] = set()
    for p, info in infos.items():
        for named in filter(None, (info.companion and p.parent / info.companion, companion_path(p))):
            q = given.get(os.path.realpath(named))
            if q is None or q == p or p in copies or q in copies or {p, q} in compared:
                continue
            compared.add(frozenset((p, q)))
            if not same_update(read_lora_contents(p), read_lora_contents(q)):
                logger.warning("%s and %s are named as one LoRA in two namings, but change the DiT differently: both are "
                               "used", p, q)
                continue
            other_naming = [f for f in (p, q) if infos[f].naming == "other"]
            copy = other_naming[0] if len(other_naming) == 1 else q if q.name.endswith(COMPANION_SUFFIX) else p
            copies[copy] = q if copy == p else p
    return copies


@dataclass
class LoRAOutput:
    path: Path
    tensors: dict[str, torch.Tensor]
    naming: str  # "kohya" or "other"
    companion: str | None  # file name of the other file of the pair, if one is written


def lora_outputs(kohya_weights: dict[str, torch.Tensor], path: str | os.PathLike, lora_format: str = "both") -> list[LoRAOutput]:
    """The files `--lora_format` asks for, from a kohya-named state dict: (path, tensors, naming, companion)."""
    path = Path(path)
    if lora_format not in LORA_FORMATS:
        raise UserError(f"--lora_format {lora_format}: one of {', '.join(LORA_FORMATS)}")
    if lora_format == "musubi":
        return [LoRAOutput(path, kohya_weights, "kohya", None)]
    other = kohya_to_other(kohya_weights)
    if lora_format == "comfyui":
        return [LoRAOutput(path, other, "other", None)]
    copy = companion_path(path)
    return [LoRAOutput(path, kohya_weights, "kohya", copy.name), LoRAOutput(copy, other, "other", path.name)]

