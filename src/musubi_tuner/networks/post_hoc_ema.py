"""Post-hoc EMA of saved LoRA checkpoints (musubi-tuner's lora_post_hoc_ema.py): one LoRA averaged from a run's saves.

Files oldest first (by modification time unless told otherwise); the average starts as the first file and takes
each next one as  avg = beta * avg + (1 - beta) * file, in float32, every floating tensor (alphas must agree and are
kept; integer tensors that are not LoRA entries are the first file's). Every file is read as merging reads it
(networks.lora_reader.read_lora_file): integer / bool LoRA weights and an alpha of several values are refused. beta per merge k = 1 .. N-1:

- constant: `beta`; linearly from `beta` to `beta2` over the merges: beta + (beta2 - beta) * (k - 1) / (N - 2);
- power function EMA (`sigma_rel`, Karras et al. 2024, arXiv:2312.02696, Algorithm 2): beta_k = (1 - 1/k)^(gamma + 1),
  gamma the non-negative root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0. Its first
  merge has beta = 0: the profile weighs file k in proportion to k^gamma, so the first file (k = 0) gets none.

The result keeps each tensor's dtype, and the last file's metadata with sd-scripts' hashes recomputed and
`musubi_tuner.post_hoc_ema` added (the files and betas), by which a later average leaves the result out (`order_files`);
inputs scaled by a PEFT `adapter_config.json` beside them give it their config as diffusers' `lora_adapter_metadata`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.files import require_file

logger = logging.getLogger(__name__)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma whose EMA profile has relative width `sigma_rel` (the cubic above)."""
    try:
        t = sigma_rel ** -2
        with np.errstate(all="raise"):
            roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    except (ArithmeticError, np.linalg.LinAlgError):  # sigma_rel^-2, or the cubic's roots, beyond a float
        raise UserError(f"--sigma_rel {sigma_rel}: too narrow for the power-function EMA's formula (its numbers overflow); "
                        "try a value between 0.05 and 0.28") from None
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= 0]
    if not real:
        raise UserError(f"--sigma_rel {sigma_rel}: no power-function EMA has this width (try a value between 0.05 and 0.28)")
    return float(max(real))


def ema_betas(merges: int, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None) -> list[float]:
    """beta of each of the `merges` merges (files 2..N), by the rules of the module docstring."""
    if sigma_rel is not None:
        if beta2 is not None:
            logger.warning("--beta2 %s is ignored: --sigma_rel sets every merge's beta", beta2)
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / k) ** (gamma + 1) for k in range(1, merges + 1)]
    if merges == 1 and beta2 is not None and beta2 != beta:
        logger.warning("--beta2 %s is ignored: two checkpoints make one merge, at --beta %s", beta2, beta)
    beta2 = beta if beta2 is None else beta2
    if merges == 1:
        return [beta]
    return [beta + (beta2 - beta) * i / (merges - 1) for i in range(merges)]


def oldest_first(paths: list[Path], metadata: dict[Path, dict[str, str]]) -> list[Path]:
    """By the training step each file records (`ss_steps`) when they all record one and are of one run
    (`ss_session_id`): copying or downloading sets modification times in any order. Else by modification time, as
    musubi-tuner orders them; ties keep the given order."""
    by_time = sorted(paths, key=lambda p: p.stat().st_mtime)
    runs = {metadata[p].get("ss_session_id") for p in paths}
    steps = {p: metadata[p].get("ss_steps", "") for p in paths}
    if len(runs) != 1 or not all(s.isdigit() for s in steps.values()):
        recorded = [p for p in paths if steps[p].isdigit()]
        if len(recorded) > len(paths) // 2:  # most record their step: the order of time is said, with the files it is
            odd = [p.name for p in paths if not steps[p].isdigit()]  # for (it changed the whole order unsaid: fuzz_ar 11)
            why = (f"{', '.join(odd[:3])} record{'s' if len(odd) == 1 else ''} no training step (ss_steps)" if odd else
                   "they are of several runs (ss_session_id)")
            logger.warning("ordered by modification time, not by the training steps the files record: %s; give them "
                           "oldest first with --no_sort if that time is not their order", why)
        return by_time
    by_step = sorted(by_time, key=lambda p: int(steps[p]))
    if by_step != by_time:
        logger.info("ordered by the training step each file records (ss_steps), not by modification time, which differs "
                    "(copied or downloaded files?): %s", ", ".join(p.name for p in by_step))
    return by_step


def order_files(paths: Sequence[str | os.PathLike], sort: bool = True) -> list[Path]:
    """The checkpoints oldest first (`oldest_first`), or as given, without the files a
    glob matches beside them that are no checkpoint of their own, each left out with a message: a `.comfyui` companion
    given with its kohya file (`out/name-0000*.safetensors` matches both; networks.lora_files.companion_copies), an
    earlier post-hoc EMA result (its metadata `musubi_tuner.post_hoc_ema`), and a file of the same run saved at the same
    step as an older one (`ss_session_id`, `ss_steps`: the run's final LoRA beside its last step's checkpoint, which
    `out/name*.safetensors` matches)."""
    from musubi_tuner.files import read_safetensors_header
    from musubi_tuner.networks.lora_files import companion_copies
    from musubi_tuner.networks.lora_metadata import POST_HOC_EMA

    paths = [Path(p) for p in paths]
    for p in paths:
        require_file(p, "LoRA file")
    companions = companion_copies(paths)
    if companions:
        logger.info("leaving out %d .comfyui companions of the kohya files given (the same weights)", len(companions))
        paths = [p for p in paths if p not in companions]
    metadata = {p: read_safetensors_header(p)[1] if p.suffix == ".safetensors" else {} for p in paths}
    kept, saved_at = [], {}
    for p in oldest_first(paths, metadata) if sort else paths:
        meta = metadata[p]
        if POST_HOC_EMA in meta:
            logger.warning("%s is itself a post-hoc EMA result (its metadata %s): left out of the average", p, POST_HOC_EMA)
            continue
        step = (meta.get("ss_session_id"), meta.get("ss_steps"))
        if None not in step and step in saved_at:
            logger.warning("%s was saved at step %s of the same run as %s (the run's final LoRA beside its last checkpoint?): "
                           "the same weights, left out of the average", p, step[1], saved_at[step].name)
            continue
        saved_at.setdefault(step, p)
        kept.append(p)
    if not kept:
        raise UserError(f"{paths[0]}: no checkpoint to average among the files given (each is left out, see above)")
    return kept


RUN_SETTINGS = ("ss_seed", "ss_learning_rate", "ss_network_dim", "ss_network_alpha")


def _run_settings(metadata: dict[str, str]) -> dict[str, str]:
    """What the checkpoints of one training run share in their metadata (a resumed run included: it keeps its seed and
    rate), for telling two runs apart; empty without metadata."""
    return {k: metadata[k] for k in RUN_SETTINGS if k in metadata}


def post_hoc_ema(paths: Sequence[Path], betas: Sequence[float]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(averaged tensors, the last file's metadata with new hashes) of `paths` (oldest first), one beta per later file."""
    from musubi_tuner.networks.lora_metadata import POST_HOC_EMA, sd_scripts_hashes
    from musubi_tuner.networks.lora_reader import check_usable, peft_config, read_lora_contents, read_lora_file

    first_contents = _checkpoint(paths[0])
    first, first_scales = first_contents.tensors, _scales(first_contents)
    dtypes = {k: v.dtype for k, v in first.items()}
    average = {k: v.float() if v.is_floating_point() else v for k, v in first.items()}
    first_metadata = read_lora_file(paths[0])[1]
    first_run = _run_settings(first_metadata)
    for path, beta in zip(paths[1:], betas):
        contents = read_lora_contents(path)
        weights, metadata = contents.tensors, contents.metadata
        _check_same_base(paths[0], first_metadata, path, metadata)
        _check_same_keys(paths[0], first, path, weights)  # so the same LoRA entries as the first
        if (run := _run_settings(metadata)) != first_run and first_run and run:
            changed = ", ".join(f"{k} {first_run.get(k)} -> {run.get(k)}" for k in first_run if first_run.get(k) != run.get(k))
            logger.warning("%s: not of the run of %s (%s): the average mixes two training runs (a fresh run into the same "
                           "--output_dir keeps the other run's older checkpoints)", path, paths[0].name, changed)
        check_usable(str(path), contents)
        logger.info("%s: beta %.4f", path.name, beta)
        for key, value in weights.items():
            if key.endswith(".alpha"):  # one real number each (the reader refuses any other alpha), of any dtype
                if not math.isclose(float(value), float(average[key]), rel_tol=1e-5, abs_tol=1e-8):
                    raise UserError(f"{path}: {key} = {float(value):g}, but {paths[0].name} has {float(average[key]):g}: "
                                    "checkpoints of one run share their alphas")
                continue
            if not value.is_floating_point():
                continue  # counters and such (not LoRA entries: the reader refuses integer LoRA weights): the first file's
            if value.shape != average[key].shape:
                raise UserError(f"{path}: {key} has shape {list(value.shape)}, {paths[0].name} {list(average[key].shape)}: "
                                "not checkpoints of one run")
            average[key] = average[key] * beta + value.float() * (1 - beta)
        _check_same_scales(paths[0], first_scales, path, _scales(contents))  # (the scales no .alpha entry holds)
    out = {k: v.to(dtypes[k]) for k, v in average.items()}
    metadata = dict(read_lora_file(paths[-1])[1])
    config = peft_config(paths[-1], first, metadata)
    if config is not None and "lora_adapter_metadata" not in metadata:  # the scale the adapter_config.json beside the
        # inputs gave them, carried as diffusers carries it: this file, ours, is not read with a config beside it
        metadata["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    if metadata:
        model_hash, legacy_hash = sd_scripts_hashes(out, {k: v for k, v in metadata.items() if k.startswith("ss_")})
        metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy_hash)
        metadata.pop("musubi_tuner.companion", None)  # the companion of the last checkpoint is not this file's
    # what it is, by which order_files leaves it out of a later average
    metadata[POST_HOC_EMA] = json.dumps({"checkpoints": [p.name for p in paths], "betas": list(betas)})
    return out, metadata


def _checkpoint(path: Path):
    """The first checkpoint's contents (lora_reader.LoRAContents); refused when it holds no LoRA entries, a NaN or a
    diverged update (it would spread to every later average). The later ones must hold the same keys, and be usable too."""
    from musubi_tuner.networks.lora_reader import check_usable, read_lora_contents

    contents = read_lora_contents(path).require_some()
    check_usable(str(path), contents)
    return contents


def _scales(contents) -> dict[str, float]:
    """Each patched parameter's scale (alpha / rank) as the file is read: from its .alpha entries, or from PEFT's
    lora_alpha / use_rslora in its metadata or adapter_config.json, which hold no tensor to compare."""
    return {p.param: p.scale for p in contents.patches if p.kind in ("lora", "loha", "lokr")}


def _check_same_scales(first_path: Path, first: dict[str, float], path: Path, scales: dict[str, float]) -> None:
    """Averaged factors of two scales are applied at the last file's (PEFT files whose lora_alpha differed were
    averaged without a word, where kohya files' differing .alpha are refused: fuzz_an 3)."""
    for param, scale in scales.items():
        if param in first and not math.isclose(scale, first[param], rel_tol=1e-5):
            raise UserError(f"{path}: {param.removesuffix('.weight')} is applied at the scale {scale:g} (alpha / rank), "
                            f"{first_path.name} at {first[param]:g}: checkpoints of one run share their scales (PEFT's "
                            "lora_alpha and use_rslora, in the metadata or the adapter_config.json)")


def _check_same_base(first_path: Path, first_metadata: dict, path: Path, metadata: dict) -> None:
    """LoRAs trained on two base models (a SkyReels I2V run's and a T2V run's: the same keys and shapes) are no
    checkpoints of one run: refused when their DiTs' input channels differ, said when only the named bases do (those
    are guessed from file names for files trained elsewhere) (fuzz_aj 8)."""
    from musubi_tuner.networks.lora_metadata import LoRAFileInfo

    first = LoRAFileInfo.from_metadata(first_metadata, str(first_path))
    info = LoRAFileInfo.from_metadata(metadata, str(path))
    if None not in (first.in_channels, info.in_channels) and first.in_channels != info.in_channels:
        raise UserError(f"{path}: trained on {info.base_model} ({info.in_channels} input channels) but {first_path.name} on "
                        f"{first.base_model} ({first.in_channels}): LoRAs of two base models are not checkpoints of one run")
    if None not in (first.base_model, info.base_model) and first.base_model != info.base_model:
        logger.warning("%s: trained on %s but %s on %s: the average mixes LoRAs of two base models", path, info.base_model,
                       first_path.name, first.base_model)


def _check_same_keys(first_path: Path, first: dict, path: Path, weights: dict) -> None:
    missing, extra = sorted(set(first) - set(weights)), sorted(set(weights) - set(first))
    if not missing and not extra:
        return
    key = (extra or missing)[0]
    where = f"{path.name} has {key}, which {first_path.name} lacks" if extra else f"{path.name} lacks {key} of {first_path.name}"
    mixed = any(".comfyui." in p.name for p in (first_path, path))
    hint = " (a .comfyui file among kohya files? give the files of one naming)" if mixed else ""
    raise UserError(f"{path}: not a checkpoint of the same LoRA: {where}{hint}")
