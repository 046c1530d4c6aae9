"""The LoRA doctor: does every weight of this file load in ComfyUI, diffusers, musubi-tuner and this toolkit,
and does the file fit the DiT it is meant for?

`python -m musubi_tuner.lora_doctor FILE [--for ...] [--dit CHECKPOINT] [--json]` prints the diagnosis and
exits 1 when a consumer would drop or refuse weights (or a layer does not fit the DiT, or the metadata says the file
is another model's LoRA).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.networks.lora_consumers import CONSUMER_TITLES, CONSUMERS, coverage, model_for
from musubi_tuner.networks.lora_coverage import Coverage
from musubi_tuner.networks.lora_inspect import LoRAInspection, inspect_lora, summary_lines
from musubi_tuner.networks.lora_reader import (check_usable, kohya_state_dict, other_state_dict, read_lora_contents,
                                               same_update)
from musubi_tuner.networks.lora_metadata import base_mismatch, base_model_kind

logger = logging.getLogger(__name__)

# what to give a consumer the file does not serve completely: our two outputs, made by convert_lora.py
CONVERSIONS = {"convert_lora.py --target default": kohya_state_dict, "convert_lora.py --target other": other_state_dict}


@dataclass
class Verdict:
    """One consumer's treatment of the file, and what to give it instead when that serves it completely: the
    companion file (its path) or one of our outputs (the convert_lora.py command that writes it)."""

    consumer: str
    file: Path
    coverage: Coverage
    alternative: tuple[str, Coverage] | None = None
    tried: list[tuple[str, Coverage]] = field(default_factory=list)  # the other files / outputs checked, none complete

    @property
    def ok(self) -> bool:
        """The file, or its companion beside it, serves the consumer completely (a conversion still to make is advice),
        or the consumer serves only the released model's size and the file is of another."""
        return (self.coverage.complete or self.other_size is not None
                or (self.alternative is not None and not self.alternative[0].startswith("convert_lora.py")))

    @property
    def other_size(self) -> str | None:
        """Why the consumer cannot be checked on this file or on one of our outputs of it (with which): it serves only
        the released model's size, and the file is of another (a test or demo model)."""
        if self.coverage.other_size:
            return self.coverage.other_size
        for label, cov in self.tried:
            if cov.other_size:
                return f"{cov.other_size}, with {label if label.startswith('convert_lora.py') else Path(label).name}"
        return None


@dataclass
class Diagnosis:
    inspection: LoRAInspection
    verdicts: list[Verdict]
    dit: str | None = None
    dit_config: DiTConfig | None = None
    warnings: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)  # layers whose shape differs from the DiT's

    @property
    def ok(self) -> bool:
        return (all(v.ok for v in self.verdicts) and not self.mismatches and not self.inspection.unusable
                and not self.inspection.info.other_model)


def diagnose(path: str | os.PathLike, consumers=CONSUMERS, dit: str | os.PathLike | None = None) -> Diagnosis:
    """Inspect a LoRA file and check it against each consumer's rules and the DiT (if given); for a consumer it does
    not serve completely, find the companion file or the output of ours that does."""
    ins = inspect_lora(path)
    diagnosis = Diagnosis(ins, [], dit=str(dit) if dit else None)
    model = model_for(_check_base(diagnosis, dit) if dit is not None else None)
    candidates: list[tuple[str, dict]] = []
    if ins.info.companion:
        companion_file = ins.path.parent / ins.info.companion
        if companion_file.is_file():
            try:  # recommended only when usable and the same LoRA (a NaN one, or another LoRA copied over it, was)
                companion = read_lora_contents(companion_file)
                check_usable(str(companion_file), companion)
                if not same_update(ins.contents, companion):
                    raise UserError(f"{companion_file}: it changes the DiT differently from {ins.path.name}: another LoRA")
                candidates.append((str(companion_file), companion.tensors))
            except UserError as e:  # a damaged companion: the file itself is still diagnosed
                diagnosis.warnings.append(f"the metadata names a companion file {ins.info.companion}, which cannot be used: {e}")
        else:
            diagnosis.warnings.append(f"the metadata names a companion file {ins.info.companion}, but it is not beside {ins.path.name}")
    foreign = ins.info.other_model  # another model's LoRA: this toolkit refuses it, and converts it to nothing
    if ins.contents.patches and not ins.problems and not ins.unusable and not foreign:  # our outputs hold every entry of the file
        candidates += [(command, convert(ins.contents.patches)) for command, convert in CONVERSIONS.items()]
    for consumer in consumers:
        verdict = Verdict(consumer, ins.path, _coverage(consumer, ins.weights, model))
        if consumer == "ours" and foreign:
            verdict.coverage = Coverage(consumer, len(ins.weights),
                                        fatal=f"a LoRA for {foreign}: merging, converting and generation refuse it")
        if not verdict.coverage.complete:
            for label, weights in candidates:
                other = _coverage(consumer, weights, model)
                if other.complete:
                    verdict.alternative = (label, other)
                    break
                verdict.tried.append((label, other))
        diagnosis.verdicts.append(verdict)
    return diagnosis


def _coverage(consumer: str, weights, model) -> Coverage:
    """`coverage`, with an emulated consumer that fails on a damaged file (a shape or key its rules do not foresee)
    reported as that consumer's verdict, so the doctor still diagnoses the file for the others."""
    try:
        return coverage(consumer, weights, model)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as e:
        logger.debug("checking %s", consumer, exc_info=True)
        cov = Coverage(consumer, len(weights))
        cov.fatal = f"the doctor could not apply its rules to this file ({type(e).__name__}: {e}): a damaged file?"
        return cov


def _check_base(diagnosis: Diagnosis, dit) -> DiTConfig:
    """Compare the LoRA with the DiT file (a safetensors is read for its header only): base, input channels, shapes."""
    from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

    source = open_dit_file(dit)
    config = read_dit_config(source)
    diagnosis.dit_config = config
    name = Path(dit).name
    if mismatch := base_mismatch(diagnosis.inspection.info, config, str(dit)):
        diagnosis.warnings.append(mismatch)
    shapes = source.shapes()
    for patch in diagnosis.inspection.contents.patches:
        if patch.param in shapes and (misfit := patch.misfit(shapes[patch.param], name)):
            diagnosis.mismatches.append(misfit)
    return config


# ----------------------------------------------------------------------------------------------- output


def _module_of(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> ('lora_unet_x', '.lora_down.weight'): the module part of a key and its tensor suffix."""
    m = re.fullmatch(r"(.+?)((?:\.|_lora\.)(?:lora_[AB]|lora_down|lora_up|alpha|up|down|lora_mid|dora_scale)(?:\.default)?(?:\.weight)?)", key)
    return (m.group(1), m.group(2)) if m else (key, "")


def dropped_lines(cov: Coverage, limit: int = 16) -> list[str]:
    """Dropped keys grouped by module, one line each: 'module (.suffixes): reason'."""
    groups: dict[tuple[str, str], list[str]] = {}
    for key, reason in cov.dropped.items():
        module, suffix = _module_of(key)
        groups.setdefault((module, reason), []).append(suffix)
    lines = [f"{module} ({' '.join(sorted(s for s in suffixes if s)) or 'key'}): {reason}" for (module, reason), suffixes in groups.items()]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more modules (--json lists every key)"]
    return lines


def _use(v: Verdict) -> str:
    """What to give this consumer."""
    if v.coverage.complete:
        return v.file.name
    if v.other_size:
        return "not checked: another model size"
    if v.alternative is None:
        return "none of our outputs loads completely"
    label = v.alternative[0]
    return label if label.startswith("convert_lora.py") else Path(label).name


def _coverage_cell(cov: Coverage) -> str:
    """'   36/60      60%' or 'refuses', 17 wide."""
    if cov.fatal:
        return f"{'refuses':>12}{'':5}"
    return f"{len(cov.applied):>5}/{cov.total:<5}{cov.fraction:>6.0%}"


def diagnosis_text(d: Diagnosis) -> str:
    lines = summary_lines(d.inspection)
    if d.dit:
        c = d.dit_config
        lines.append(f"  DiT        {Path(d.dit).name}: {base_model_kind(c, d.dit)}, {c.in_channels} input channels, "
                     f"{c.mm_double_blocks_depth}+{c.mm_single_blocks_depth} blocks of width {c.hidden_size}")
    lines += ["", f"  {'consumer':<14} {'keys applied':>17}  give it"]
    for v in d.verdicts:
        there = f"  ({len(v.alternative[1].applied)}/{v.alternative[1].total} keys applied there)" if v.alternative else ""
        use = f"none: the file holds {d.inspection.unusable_in_short}" if d.inspection.unusable else f"{_use(v)}{there}"
        lines.append(f"  {CONSUMER_TITLES[v.consumer]:<14} {_coverage_cell(v.coverage)}  {use}")
    for v in d.verdicts:
        if v.other_size:
            lines += ["", f"  {CONSUMER_TITLES[v.consumer]} is not checked: {v.other_size}; a LoRA of the released model's "
                          "size is"]
        if v.ok:
            continue
        title = CONSUMER_TITLES[v.consumer]
        if v.coverage.fatal:
            lines += ["", f"  {title} refuses {v.file.name}: {v.coverage.fatal}"]
        if v.coverage.dropped:
            lines += ["", f"  {title} drops {len(v.coverage.dropped)} of {v.coverage.total} keys of {v.file.name}:"]
            lines += [f"    {line}" for line in dropped_lines(v.coverage)]
        for label, cov in ([] if v.alternative else v.tried):  # why none of our outputs serves it
            why = cov.fatal or f"drops {len(cov.dropped)} keys ({next(iter(cov.dropped.values()))})"
            lines.append(f"    with {label if label.startswith('convert_lora.py') else Path(label).name}: {why}")
    if d.mismatches:
        lines += ["", f"  {len(d.mismatches)} layers do not fit {Path(d.dit).name}:"]
        lines += [f"    {m}" for m in d.mismatches[:8]] + ([f"    ... and {len(d.mismatches) - 8} more"] if len(d.mismatches) > 8 else [])
    if d.inspection.unusable:
        lines += ["", f"  {d.inspection.unusable}: every program would produce garbage with it"]
    lines.append("")
    lines += [f"  warning: {w}" for w in d.warnings]
    if d.ok:
        lines.append("  ok: every consumer checked applies every weight")
    else:
        convert = [CONSUMER_TITLES[v.consumer] for v in d.verdicts if not v.ok and v.alternative]
        none = [CONSUMER_TITLES[v.consumer] for v in d.verdicts if not v.ok and not v.alternative]
        problems = ([f"{', '.join(convert)} would not apply every weight of this file: give them the output named above"] if convert else [])
        problems += [f"{', '.join(none)} would not apply every weight of any of our outputs"] if none else []
        problems += ["its layers do not fit the DiT"] if d.mismatches else []
        problems += [f"it holds {d.inspection.unusable_in_short}"] if d.inspection.unusable else []
        problems += [f"it is a LoRA for {d.inspection.info.other_model}, not for HunyuanVideo"] if d.inspection.info.other_model else []
        lines.append(f"  problem: {'; '.join(problems)}")
    return "\n".join(lines)


def _coverage_json(cov: Coverage, file: Path | str) -> dict:
    return {"file": str(file), "applied": len(cov.applied), "total": cov.total, "fraction": round(cov.fraction, 6),
            "complete": cov.complete, "fatal": cov.fatal, "dropped": cov.dropped, "modules": cov.modules}


def inspection_json(ins: LoRAInspection) -> dict:
    info = dataclasses.asdict(ins.info) | {"target_blocks": ins.info.target_blocks}
    info["modules"] = {p: list(v) for p, v in info["modules"].items()}
    return {
        "file": str(ins.path), "naming": ins.naming, "keys": len(ins.weights), "ranks": ins.ranks, "alphas": ins.alphas,
        "modules": [dataclasses.asdict(m) for m in ins.modules], "block_norms": ins.block_norms(), "info": info,
        "metadata": ins.metadata, "diverged": ins.diverged,
    }


def diagnosis_json(d: Diagnosis) -> dict:
    consumers = {}
    for v in d.verdicts:
        entry = _coverage_json(v.coverage, v.file) | {"ok": v.ok, "alternative": None, "use": _use(v), "other_size": v.other_size}
        if v.alternative:
            entry["alternative"] = _coverage_json(v.alternative[1], v.alternative[0])
        consumers[v.consumer] = entry
    dit = None
    if d.dit:
        c = d.dit_config
        dit = {"path": d.dit, "base_model": base_model_kind(c, d.dit), "in_channels": c.in_channels, "hidden_size": c.hidden_size}
    return {**inspection_json(d.inspection), "consumers": consumers, "dit": dit, "warnings": d.warnings, "non_finite": d.inspection.non_finite,
            "diverged": d.inspection.diverged,
            "shape_mismatches": d.mismatches, "ok": d.ok}
