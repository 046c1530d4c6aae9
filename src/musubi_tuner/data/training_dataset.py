"""The training-time dataset: batches of cached latents and text-encoder outputs, nothing decoded.

    dataset = TrainingDataset.from_config(config, seed=args.seed)
    loader, sampler = make_dataloader(dataset, num_workers=2)
    for epoch in range(first_epoch, last_epoch + 1):
        sampler.set_epoch(epoch, start=position_to_resume_from if epoch == first_epoch else 0)
        for position, batch in enumerate(loader, start=sampler.start):
            batch["latents"]  # (B, 16, F, H, W)
            ...               # to resume exactly, save (epoch, position + 1)

An epoch's order depends only on (seed, epoch): items are shuffled inside their bucket, each
dataset's batches are shuffled, then all batches are interleaved. A batch never mixes buckets
(latent shapes) or datasets. Resuming at (epoch, position) gives exactly the batches that followed.

Every sample of an epoch (an item, or one of its repeats) has a `sample_id`: its index in the
unshuffled list of all samples. It does not depend on the batch size, the order or the number of
training processes, so the trainer keys each sample's noise and timestep on it.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from musubi_tuner.data import cache_files
from musubi_tuner.data.buckets import BucketSelector
from musubi_tuner.data.config import AnyDatasetConfig, DatasetGroupConfig
from musubi_tuner.dtypes import FP8_DTYPES, dtype_short_name
from musubi_tuner.errors import UserError
from musubi_tuner.files import list_folder, read_safetensors_header
from musubi_tuner.hunyuan.config import HUNYUAN_T2V

logger = logging.getLogger(__name__)

LatentShape = tuple[int, int, int]  # (F, H, W) of the latent; the bucket key
# HunyuanVideo's DiT (and SkyReels V1's) cuts the latent into patches of (frames, height, width) = (1, 2, 2)
LATENT_PATCH: tuple[int, int, int] = HUNYUAN_T2V.patch_size
_REDO_TEXT = "delete it and run cache_text_encoder_outputs.py again"
_REDO_LATENT = "delete it and run cache_latents.py again"


@dataclass(frozen=True)
class TrainingItem:
    latent_path: Path
    text_path: Path


@dataclass(frozen=True)
class BatchPlan:
    """One batch of one epoch: which files (and their sample ids), and the stratified timesteps if a timestep pool is used."""

    dataset: int
    shape: LatentShape
    items: tuple[TrainingItem, ...]
    timesteps: tuple[float, ...] | None = None
    sample_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class DatasetBuckets:
    """One dataset's cached items grouped by latent shape, each item repeated num_repeats times."""

    buckets: dict[LatentShape, list[TrainingItem]]
    batch_size: int
    # (tensor, width) -> the first cache found with it: ("latents", 16), ("llm", 4096), ("clipL", 768) for HunyuanVideo
    widths: dict[tuple[str, int], Path] = field(default_factory=dict)

    @property
    def num_batches(self) -> int:
        return sum(math.ceil(len(items) / self.batch_size) for items in self.buckets.values())


# ------------------------------------------------------------------------------------------ discovery


def held_out_keys(item_keys: Sequence[str], fraction: float) -> set[str]:
    """The items a `validation_split` holds out: round(n * fraction) of them, at least one and never all.

    Chosen by a hash of the item's name, not at random: the same items on every run and every seed, and
    adding items to the dataset moves few of the old ones across. A video's clips share its name, so
    they fall on the same side (no clip of a validation video is trained on).
    """
    keys = sorted(set(item_keys))
    if fraction <= 0 or len(keys) < 2:
        return set()
    count = min(max(1, round(len(keys) * fraction)), len(keys) - 1)
    return set(sorted(keys, key=lambda k: hashlib.sha1(k.encode("utf-8")).hexdigest())[:count])


def _latent_cache_names(dataset: AnyDatasetConfig) -> dict:
    """The dataset's latent cache files, in name order, each with its parsed name (None: not one of ours)."""
    return {p: cache_files.parse_latent_cache_name(p.name, video=dataset.is_video) for p in _latent_files(dataset)}


def _latent_files(dataset: AnyDatasetConfig) -> list[Path]:
    """The latent cache files in the dataset's cache_directory, in name order; none when it is not there. A folder that
    cannot be listed is an error naming it: Path.glob took it for an empty one, and training left the dataset out with
    "no latent cache, run cache_latents.py again" (fuzz_aq 3)."""
    if not os.path.lexists(dataset.cache_directory):  # (a file, or a broken link, there is list_folder's to name)
        return []
    found = list_folder(dataset.cache_directory, "cache folder", f"{dataset.where}.cache_directory")
    # (a folder of a cache's name is none: it was "left out", "trained on as cached" and "delete it": fuzz_bc 12)
    return [p for p in found if p.name.endswith(cache_files.LATENT_SUFFIX) and not os.path.isdir(p)]


def too_few_to_split(config: DatasetGroupConfig) -> list[str]:
    """The datasets whose validation_split holds out nothing because fewer than two of their items are cached (one
    item cannot be both trained on and held out), each as "WHERE: validation_split = X ... N cached item(s)"."""
    found = []
    for ds in config.datasets:
        if ds.validation_split > 0:
            count = len({n.item_key for n in _latent_cache_names(ds).values() if n is not None})
            if count < 2:
                found.append(f"{ds.where}: validation_split = {ds.validation_split:g} holds out nothing from its {count} cached "
                             f"item{'' if count == 1 else 's'} (it needs at least 2)")
    return found


def find_cached_items(dataset: AnyDatasetConfig, held_out: bool = False) -> DatasetBuckets:
    """Pair every latent cache of the dataset's cache folder with its text cache, grouped by latent shape.

    held_out=False: the training items (those `validation_split` does not hold out), num_repeats times
    each; held_out=True: the held-out items once each (all items of a [[validation_datasets]] table).
    Latent caches without a complete text cache, or whose files cannot be read, are left out with a
    warning. Caches of another size than the config gives now are used, in their own bucket, with a
    warning (the config's resolution changed since caching), and so are clips of a length target_frames no longer
    gives.
    """
    cache_dir = dataset.cache_directory
    names = _latent_cache_names(dataset)
    latent_files = list(names)
    keys = {n.item_key for n in names.values() if n is not None}
    validation = keys if dataset.role == "validation" else held_out_keys(keys, dataset.validation_split)
    kept = validation if held_out else keys - validation
    repeats = 1 if held_out else dataset.num_repeats
    selector = BucketSelector(dataset.resolution, dataset.enable_bucket, dataset.bucket_no_upscale)
    buckets: dict[LatentShape, list[TrainingItem]] = {}
    problems: list[str] = []
    text_problems: dict[Path, str | None] = {}  # a video's clips share one text cache: check it once
    widths: dict[tuple[str, int], Path] = {}
    other_size = 0
    # clips of a length target_frames no longer gives (`full` takes each video's own length)
    lengths = set(dataset.target_frames) if dataset.is_video and dataset.frame_extraction != "full" else None
    other_length = 0
    for latent_path in latent_files:
        name = names[latent_path]
        if name is None:
            if not held_out:  # reported once, by the training pass
                problems.append(f"{latent_path.name}: not {'a video clip' if dataset.is_video else 'an image'} cache name")
            continue
        if name.item_key not in kept:
            continue
        text_path = cache_files.text_cache_path(cache_dir, name.item_key)
        if text_path not in text_problems:
            text_problems[text_path] = text_cache_problem(text_path, widths)
        if text_problems[text_path] is not None:
            problems.append(f"{latent_path.name}: {text_problems[text_path]}")
            continue
        full_shape = cached_latent_shape(latent_path, problems)
        if full_shape is not None:
            widths.setdefault(("latents", full_shape[0]), latent_path)
            shape = full_shape[1:]
            other_size += (shape[2] * 8, shape[1] * 8) != _bucket_or_none(selector, name.size)
            other_length += lengths is not None and name.frames not in lengths
            buckets.setdefault(shape, []).extend([TrainingItem(latent_path, text_path)] * repeats)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        logger.warning("%s: %d cached items left out: %s", dataset.where, len(problems), shown)
    if other_size:
        logger.warning("%s: %d caches in %s are not the size this config gives (was resolution changed?); "
                       "run cache_latents.py again to remake them", dataset.where, other_size, cache_dir)
    if other_length:
        logger.warning("%s: %d clip caches in %s are of a length target_frames %s does not give (was target_frames "
                       "changed?); they are used as they are: run cache_latents.py again to remake them", dataset.where,
                       other_length, cache_dir, list(dataset.target_frames))
    return DatasetBuckets(dict(sorted(buckets.items())), dataset.batch_size, widths)


def out_of_date_caches(dataset: AnyDatasetConfig, shown: int = 3, trained: set[str] | None = None) -> str | None:
    """One line on the dataset's caches that no longer match its sources, or None when all match.

    Counts and names a few items whose latent cache was made from another version of the image or video, whose text
    cache from another caption, or whose source is gone, and the images/videos that have no latent cache at all (a
    killed cache_latents.py leaves them): the first are trained on as they were cached, the last are left out. It
    compares what the caches record (source_bytes, source_mtime_ns, caption1) with the sources by the check
    --skip_existing uses (cache_files.cache_status): a stat and a caption read per item, nothing decoded. A dataset
    whose sources are absent or list nothing (a cache-only dataset) gives None, as do caches without that record
    (musubi-tuner's).
    """
    from musubi_tuner.data import items

    if not dataset.source.exists():
        return None
    try:
        sources, skipped = items.list_items(dataset)
    except (UserError, OSError):  # a damaged JSONL or an unreadable folder: training needs only the caches
        return None
    if not sources:
        return None
    cache_dir = dataset.cache_directory
    latents: dict[str, list[Path]] = {}
    for path in _latent_files(dataset):
        name = cache_files.parse_latent_cache_name(path.name, video=dataset.is_video)
        if name is not None:
            latents.setdefault(name.item_key, []).append(path)
    kind = "video" if dataset.is_video else "image"
    kept: list[str] = []  # "stem: why caching skips or fails it now", of items cached before (see below)
    changed: list[tuple[str, str]] = []  # (stem, what changed)
    uncached: list[str] = []
    rejected: list[str] = []  # "stem: why latent caching could not use it"
    recorded = cache_files.left_out(cache_dir)
    for item in sources:
        if item.stem not in latents:
            entry = recorded.get(item.stem)  # what latent caching could not use: caching again changes nothing
            if entry is not None and _same_source(item.path, entry):
                rejected.append(f"{item.stem}: {entry.get('reason', '?')}")
            else:
                uncached.append(item.stem)
            continue
        try:
            signature = cache_files.source_signature(item.path)
        except OSError:  # a JSONL entry whose file is gone
            changed.append((item.stem, "source deleted"))
            continue
        whats = []
        if any((cache_files.cache_status(path, signature) or "").startswith("source_") for path in latents[item.stem]):
            entry = recorded.get(item.stem)
            if entry is not None and _same_source(item.path, entry):  # changed into what caching cannot read (a truncated
                # copy): caching again keeps the old cache, as it did (fuzz_ag 5b)
                kept.append(f"{item.stem}: changed since it was cached, and cache_latents.py cannot use it now: "
                            f"{entry.get('reason', '?')}")
                continue
            whats.append(f"{kind} changed")
        try:
            caption = item.read_caption()
        except UserError as e:  # caching fails it now (a video's caption is read there): trained on its old caches
            gone = "not found" in str(e)
            kept.append(f"{item.stem}: {'caption file gone, trained on its cached caption' if gone else str(e)}")
            continue
        text_path = cache_files.text_cache_path(cache_dir, item.stem)
        if caption is not None and (cache_files.cache_status(text_path, {"caption1": caption}) or "").startswith("caption1"):
            whats.append("caption changed")
        if whats:
            changed.append((item.stem, " and ".join(whats)))
    listed = {item.stem for item in sources} | {cache_files.item_stem(path) for path, _ in skipped}
    changed += [(stem, "source deleted") for stem in sorted(latents) if stem not in listed]
    if trained is not None:  # (`trained`: the stems the scan keeps; those it left out were said "trained on as cached"
        # too: fuzz_bg 5)
        changed = [(stem, what) for stem, what in changed if stem in trained]
    # items caching skips now but cached before, whose caches caching keeps (so that a mistyped caption_extension cannot
    # delete a dataset's caches): a caption deleted to take an item out (musubi-tuner's way), an image made a .gif. They
    # were trained on without a word (a video's), or with advice to cache again, which changes nothing (fuzz_ag 1d)
    for path, reason in skipped:
        stem = cache_files.item_stem(path)
        if stem in latents:
            reason = reason.removeprefix(f"{path}: ")
            caption_gone = reason.startswith("no caption file") or reason.endswith("caption file not found")
            kept.append(f"{stem}: {'caption file gone, trained on its cached caption' if caption_gone else reason}")
    if not changed and not uncached and not rejected and not kept:
        return None
    parts = []
    if changed:
        parts.append(f"{_count(len(changed), 'cached item', 'is', 'are')} older than the dataset and trained on as cached "
                     f"({_first([f'{stem}: {what}' for stem, what in changed], shown)})")
    if uncached:
        parts.append(f"{_count(len(uncached), kind, 'has', 'have')} no latent cache and {'is' if len(uncached) == 1 else 'are'} "
                     f"left out ({_first(uncached, shown)})")
    if rejected:
        parts.append(f"{_count(len(rejected), kind, 'is', 'are')} left out, as cache_latents.py could not use "
                     f"{'it' if len(rejected) == 1 else 'them'} ({_first(rejected, shown)})")
    if kept:
        parts.append(f"{_count(len(kept), kind, 'is', 'are')} skipped by caching now but still trained on from "
                     f"{'its' if len(kept) == 1 else 'their'} earlier caches ({_first(kept, shown)})")
    advice = ["run cache_latents.py and cache_text_encoder_outputs.py again (with --skip_existing they redo only these)"
              if changed or uncached else "fix or remove those files"] if changed or uncached or rejected else []
    if kept:
        advice.append(f"to leave out what caching skips, delete its caches from {cache_dir} (caching keeps them, so that a "
                      "mistyped caption_extension cannot delete a dataset's caches)")
    return f"{dataset.where}: {', and '.join(parts)}; {'; '.join(advice)}"


def _same_source(path: Path, recorded: dict[str, str]) -> bool:
    """The source is as it was when latent caching recorded why it could not use it."""
    try:
        signature = cache_files.source_signature(path)
    except OSError:  # unreadable now: the same source if it was unreadable then (recorded without a signature)
        return "source_bytes" not in recorded
    return "source_bytes" in recorded and all(recorded.get(k) == v for k, v in signature.items())


def _count(n: int, noun: str, one: str, many: str) -> str:
    """`1 image has`, `3 images have`."""
    return f"1 {noun} {one}" if n == 1 else f"{n} {noun}s {many}"


def _first(names: list[str], shown: int) -> str:
    return "; ".join(names[:shown]) + (f"; and {len(names) - shown} more" if len(names) > shown else "")


def _bucket_or_none(selector: BucketSelector, size: tuple[int, int]) -> tuple[int, int] | None:
    try:
        return selector.bucket_for(size)
    except UserError:  # a size no bucket takes: the cache came from elsewhere; it is used as it is
        return None


def text_cache_problem(text_path: Path, widths: dict[tuple[str, int], Path]) -> str | None:
    """None if the text cache holds both encoders' outputs as training reads them, else what is wrong (naming the file,
    the tensor and the fix); records each output's width.

    What training needs: `llm` (tokens, width) and `clipL` (width,) of a floating dtype, and `llm_mask` (tokens,) of
    an integer or bool dtype with as many tokens as `llm`; `clipL_mask`, which the DiT does not read, if present is one
    integer or bool vector. No dimension may be 0.
    """
    if not text_path.exists():
        return f"no text cache {text_path.name} (run cache_text_encoder_outputs.py)"
    try:
        entries, _ = read_safetensors_header(text_path)
    except UserError as e:  # (as a latent cache's: it is made again, not downloaded: fuzz_ar 7)
        return f"{str(e).removesuffix('; download it again')}; {_REDO_TEXT}"
    missing = [e for e in cache_files.TEXT_ENCODERS if not any(cache_files.logical_key(k) == e for k in entries)]
    if missing:
        return f"no {' or '.join(missing)} output in {text_path.name}"
    tensors: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}  # logical key -> (stored key, dtype, shape)
    for key, (dtype, shape) in entries.items():
        name = cache_files.logical_key(key)
        if name in tensors:
            return f"{text_path.name} holds two versions of {name} ({tensors[name][0]}, {key}); {_REDO_TEXT}"
        tensors[name] = (key, dtype, shape)
    if "llm_mask" not in tensors:
        return f"{text_path.name} has no llm_mask (the LLM output's token mask); {_REDO_TEXT}"
    expected = {"llm": (True, "[tokens, width]", 2), "llm_mask": (False, "[tokens]", 1),
                "clipL": (True, "[width]", 1), "clipL_mask": (False, "[tokens]", 1)}
    for name, (floating, layout, rank) in expected.items():
        if name not in tensors:
            continue
        key, dtype, shape = tensors[name]
        if not (dtype.is_floating_point if floating else _is_mask_dtype(dtype)):
            kind = "a floating-point" if floating else "an integer or bool"
            return f"{text_path.name}: {key} is {dtype_short_name(dtype)}, not {kind} tensor; {_REDO_TEXT}"
        if len(shape) != rank or 0 in shape:
            return f"{text_path.name}: {key} has shape {list(shape)}, expected {layout} with no dimension 0; {_REDO_TEXT}"
    tokens, mask_tokens = tensors["llm"][2][0], tensors["llm_mask"][2][0]
    if tokens != mask_tokens:
        return (f"{text_path.name}: {tensors['llm'][0]} has {tokens} tokens but llm_mask {mask_tokens}; they must match; "
                f"{_REDO_TEXT}")
    for name in cache_files.TEXT_ENCODERS:
        widths.setdefault((name, tensors[name][2][-1]), text_path)
    return None


def _is_mask_dtype(dtype: torch.dtype) -> bool:
    return dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex)


def check_caches_fit(datasets: Sequence[DatasetBuckets], expected: dict[str, int], model: str) -> None:
    """Refuse caches made for another model before any training: `expected` widths such as {"latents": 16, "llm": 4096}.

    Names the first cache whose latent channels or text-encoder width differ, and what made it where it says.
    """
    what = {"latents": "latent channels", "llm": "LLM text width", "clipL": "CLIP-L text width"}
    for found in datasets:
        for (tensor, width), path in found.widths.items():
            if tensor in expected and width != expected[tensor]:
                try:
                    made_for = read_safetensors_header(path)[1].get("architecture")
                except UserError:
                    made_for = None
                origin = f"it says it was made for {made_for}" if made_for and made_for != cache_files.ARCHITECTURE_FULL \
                    else "it was made with another model"
                raise UserError(f"{path}: {what[tensor]} {width}, but {model} takes {expected[tensor]} ({origin}); "
                                f"cache this dataset again for this model, or give it another cache_directory")


def cached_latent_shape(latent_path: Path, problems: list[str]) -> tuple[int, int, int, int] | None:
    """(C, F, H, W) of the cache's one latents tensor, read from the header only; None (and what is wrong, in
    `problems`) unless it is one floating tensor with no dimension 0 whose frames, height and width the DiT's patch
    (LATENT_PATCH) divides. The channel count is checked against the DiT by check_caches_fit."""
    try:
        entries, _ = read_safetensors_header(latent_path)
    except UserError as e:  # (a cache is made again, not downloaded: the reader's advice was "download it again": fuzz_ak 5)
        problems.append(f"{str(e).removesuffix('; download it again')}; {_REDO_LATENT}")
        return None
    latents = [(key, dtype, shape) for key, (dtype, shape) in entries.items() if cache_files.logical_key(key) == "latents"]
    if len(latents) != 1 or len(latents[0][2]) != 4:
        problems.append(f"{latent_path.name}: not one (C, F, H, W) latents tensor; {_REDO_LATENT}")
        return None
    key, dtype, shape = latents[0]
    if not dtype.is_floating_point:
        problems.append(f"{latent_path.name}: {key} is {dtype_short_name(dtype)}, not a floating-point tensor; {_REDO_LATENT}")
        return None
    if 0 in shape:
        problems.append(f"{latent_path.name}: {key} has shape {list(shape)}, a dimension of 0; {_REDO_LATENT}")
        return None
    if any(size % patch for size, patch in zip(shape[1:], LATENT_PATCH)):
        problems.append(f"{latent_path.name}: {key} has shape {list(shape)}: frames, height and width must be multiples "
                        f"of the DiT's patch {list(LATENT_PATCH)}; {_REDO_LATENT}")
        return None
    return tuple(shape)


# ------------------------------------------------------------------------------------------ dataset


class TrainingDataset(torch.utils.data.Dataset):
    """Map-style dataset whose indices are BatchPlans (see make_dataloader); one index = one batch.

    Batch keys (musubi-tuner's): `latents` (B, 16, F, H, W), `llm` (B, 256, D), `llm_mask` (B, 256),
    `clipL` (B, 768), `clipL_mask` (B, 77), `timesteps` (B floats in [0, 1) from the timestep pool, or None);
    and `item_names` (B latent cache file names) and `sample_ids` (B ints, see the module docstring).
    Tensors keep the dtype they were cached in.
    """

    def __init__(self, datasets: Sequence[DatasetBuckets], seed: int, num_timestep_buckets: int | None = None):
        self.datasets = list(datasets)
        self.seed = seed
        self.num_timestep_buckets = num_timestep_buckets
        self._plan_cache: tuple[int, list[BatchPlan]] | None = None

    @classmethod
    def from_config(cls, config: DatasetGroupConfig, seed: int, num_timestep_buckets: int | None = None) -> TrainingDataset:
        """Every dataset's caches; a UserError if none holds any (the caching commands have not been run)."""
        datasets = [find_cached_items(ds) for ds in config.datasets]
        trained = {id(ds): {item.text_path.name.removesuffix(cache_files.TEXT_SUFFIX)  # (each item's stem)
                            for items in found.buckets.values() for item in items} for ds, found in zip(config.datasets, datasets)}
        for ds in config.all_datasets:
            warning = out_of_date_caches(ds, trained=trained.get(id(ds)))
            if warning:
                logger.warning("%s", warning)
        for ds, found in zip(config.datasets, datasets):
            count = sum(len(items) for items in found.buckets.values())
            logger.info("%s: %d training items (with repeats) in %d buckets, %d batches", ds.where, count,
                        len(found.buckets), found.num_batches)
        if not any(d.buckets for d in datasets):
            folders = ", ".join(str(ds.cache_directory) for ds in config.datasets)
            raise UserError(f"{config.path}: no cached training items in {folders}; run cache_latents.py and "
                            f"cache_text_encoder_outputs.py with --dataset_config {config.path} first")
        return cls(datasets, seed, num_timestep_buckets)

    def fingerprint(self) -> str:
        """A hash of which cache files make up each dataset's buckets and how they are batched: equal fingerprints mean
        equal epoch plans for equal seeds, so a resumed run can continue inside an epoch."""
        digest = hashlib.sha1()
        for d in self.datasets:
            digest.update(f"batch {d.batch_size}\n".encode())
            for shape, items in d.buckets.items():
                digest.update(f"{shape}: {len(items)}\n".encode())
                for item in items:
                    digest.update(os.fsencode(item.latent_path.name) + b"\n")  # (any file name: one not UTF-8 too)
        return digest.hexdigest()[:16]

    def difference_between_processes(self) -> str:
        """Which cached items the processes of a run see differently, in words (a collective: every process calls it)."""
        import torch.distributed as dist

        mine = sorted(os.fsdecode(item.latent_path.name) for d in self.datasets for items in d.buckets.values() for item in items)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        first = set(everyone[0])
        for process, names in enumerate(everyone):
            missing, extra = sorted(first - set(names)), sorted(set(names) - first)
            if missing or extra:
                listed = lambda found: ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")  # noqa: E731
                return (f"process {process} has {len(names)} cached items, process 0 {len(everyone[0])}"
                        + (f"; not on process {process}: {listed(missing)}" if missing else "")
                        + (f"; only on process {process}: {listed(extra)}" if extra else ""))
        return "the same items, batched otherwise"

    @property
    def num_items(self) -> int:
        """Training items per epoch, repeats included."""
        return sum(len(items) for d in self.datasets for items in d.buckets.values())

    def __len__(self) -> int:
        """Batches per epoch."""
        return sum(d.num_batches for d in self.datasets)

    def epoch_plan(self, epoch: int) -> list[BatchPlan]:
        """All batches of `epoch` in training order; a pure function of (seed, epoch)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rng = random.Random(self.seed + epoch)
            first_ids = [0]
            for d in self.datasets:
                first_ids.append(first_ids[-1] + sum(len(items) for items in d.buckets.values()))
            plan = [b for i, d in enumerate(self.datasets) for b in self._dataset_batches(i, d, rng, first_ids[i])]
            rng.shuffle(plan)
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def _dataset_batches(self, index: int, dataset: DatasetBuckets, rng: random.Random, first_id: int) -> list[BatchPlan]:
        batches = []
        for shape, items in dataset.buckets.items():
            samples = list(enumerate(items, start=first_id))  # (sample id, item), before shuffling
            first_id += len(items)
            rng.shuffle(samples)
            for start in range(0, len(samples), dataset.batch_size):
                chunk = samples[start:start + dataset.batch_size]
                batches.append(BatchPlan(index, shape, tuple(item for _, item in chunk), sample_ids=tuple(i for i, _ in chunk)))
        rng.shuffle(batches)
        if self.num_timestep_buckets is not None and self.num_timestep_buckets > 1:
            batches = self._with_timesteps(batches, dataset.batch_size, rng)
        return batches

    def _with_timesteps(self, batches: list[BatchPlan], batch_size: int, rng: random.Random) -> list[BatchPlan]:
        """Stratified timesteps (musubi-tuner's pool): equal counts from each of K intervals of [0, 1), shuffled."""
        k = self.num_timestep_buckets
        total = len(batches) * batch_size
        per_interval = math.ceil(total / k)
        pool = [rng.uniform(i / k, (i + 1) / k) for i in range(k) for _ in range(per_interval)]
        rng.shuffle(pool)
        return [BatchPlan(b.dataset, b.shape, b.items, tuple(pool[j * batch_size: j * batch_size + len(b.items)]), b.sample_ids)
                for j, b in enumerate(batches)]

    def __getitem__(self, plan: BatchPlan | int) -> dict[str, torch.Tensor | list[float] | None]:
        if isinstance(plan, int):
            plan = self.epoch_plan(1)[plan]
        return load_batch(plan)


def validation_batches(config: DatasetGroupConfig) -> list[BatchPlan]:
    """The held-out items of every dataset and all items of [[validation_datasets]], each once, in a fixed
    order (dataset, bucket, file name), batched by each dataset's batch_size. Empty if there are none."""
    plans = []
    for index, ds in enumerate(config.all_datasets):
        if ds.role != "validation" and ds.validation_split <= 0:
            continue
        found = find_cached_items(ds, held_out=True)
        count = sum(len(items) for items in found.buckets.values())
        logger.info("%s: %d validation items", ds.where, count)
        for shape, items in found.buckets.items():
            items = sorted(items, key=lambda item: item.latent_path.name)
            plans += [BatchPlan(index, shape, tuple(items[i:i + ds.batch_size])) for i in range(0, len(items), ds.batch_size)]
    return plans


def load_batch(plan: BatchPlan) -> dict[str, torch.Tensor | list[float] | None]:
    """Load and stack the cache files of one batch by logical key (see cache_files.logical_key)."""
    columns: dict[str, list[torch.Tensor]] = {}
    for item in plan.items:
        tensors = {**cache_files.load_cache(item.latent_path), **cache_files.load_cache(item.text_path)}
        if columns and set(tensors) != set(columns):
            raise UserError(f"{item.latent_path}: its caches hold {sorted(tensors)}, others in its batch "
                            f"{sorted(columns)}; re-run the caching commands")
        for key, t in tensors.items():
            # float64 caches (the scan takes any float dtype) in float32: float64 text states met the bf16 DiT with a
            # traceback at the first step (fuzz_ar 2)
            columns.setdefault(key, []).append(t.float() if t.dtype == torch.float64 else t)
    batch: dict[str, torch.Tensor | list[float] | None] = {}
    for key, tensors in columns.items():
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise UserError(f"{plan.items[0].latent_path} and others in its batch: {key} shapes differ {sorted(shapes)}; "
                            f"re-run the caching commands")
        if len({t.dtype for t in tensors}) > 1:  # fp8 beside fp16 cannot be stacked (torch promotes no float8 type)
            tensors = [t.float() if t.dtype in FP8_DTYPES else t for t in tensors]
        batch[key] = torch.stack(tensors)
    batch["timesteps"] = list(plan.timesteps) if plan.timesteps is not None else None
    batch["item_names"] = [item.latent_path.name for item in plan.items]
    batch["sample_ids"] = list(plan.sample_ids)
    return batch


# ------------------------------------------------------------------------------------------ loading


class EpochSampler(torch.utils.data.Sampler):
    """Yields the BatchPlans of one epoch from `start` on; set_epoch before each pass over the loader.

    With several training processes, process `rank` of `world` takes every world-th batch of the epoch,
    the plan padded from its start so all processes run the same number of steps; `start` then counts
    this process's batches.
    """

    def __init__(self, dataset: TrainingDataset, rank: int = 0, world: int = 1):
        self.dataset = dataset
        self.rank, self.world = rank, world
        self.epoch = 1
        self.start = 0

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.dataset) / self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (musubi-tuner counts from 1) and the batch to begin with (to resume mid-epoch)."""
        if not 0 <= start <= self.batches_per_epoch():
            raise ValueError(f"start {start} is outside the epoch's {self.batches_per_epoch()} batches")
        self.epoch, self.start = epoch, start

    def _plan(self) -> list[BatchPlan]:
        plan = self.dataset.epoch_plan(self.epoch)
        if self.world == 1:
            return plan
        padded = plan + plan[: self.batches_per_epoch() * self.world - len(plan)]
        return padded[self.rank :: self.world]

    def __iter__(self) -> Iterator[BatchPlan]:
        return iter(self._plan()[self.start:])

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start


def _leave_stops_to_the_training(worker_id: int) -> None:
    """A data-loader worker leaves Ctrl-C, SIGTERM and SIGHUP to the training process, which stops its workers as it
    stops: a launcher or a terminal signals the whole process group, and a worker that died of it first made the
    training's own stop a traceback ("DataLoader worker ... is killed by signal"). A worker whose parent is gone
    ends by itself (torch's watchdog).

    A SIGTERM from the training process itself still ends the worker: it is how Python, at the training process's
    exit, and torch, for a worker that does not stop when asked, end workers. Ignored, it made that exit wait forever
    for a worker that was never asked (a batch iterator kept past the stop, in a reference cycle)."""
    import signal
    import threading

    stops = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}
    for number in stops:
        signal.signal(number, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # (Linux; elsewhere all three stay ignored)
        # held for the worker's threads (those to come inherit it) and taken by one that knows who sent them; Linux
        # queues a held signal even when it is ignored
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            threading.Thread(target=_end_when_the_parent_says, args=(stops, os.getppid()), daemon=True,
                             name="stop signals").start()
        except RuntimeError:  # (no thread to take them: a process limit met, ulimit -u) held, the training's SIGTERM
            # never reached the worker, and the training's exit waited for it for ever (fuzz_bd 1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.excepthook = _quiet_about_a_stopped_receiver(sys.excepthook)


def _end_when_the_parent_says(stops: set, parent: int) -> None:
    import signal

    while True:
        got = signal.sigwaitinfo(stops)
        if got.si_signo == signal.SIGTERM and got.si_pid == parent:
            os._exit(0)  # (asked: nothing for the training process to report)


def _start_worker(worker_id: int) -> None:
    from musubi_tuner.files import close_inherited_locks

    close_inherited_locks()
    _leave_stops_to_the_training(worker_id)
    _end_when_a_batch_cannot_be_handed_over()


def _end_when_a_batch_cannot_be_handed_over() -> None:
    """A worker hands each batch over through shared memory (/dev/shm). When that fails (a full or small /dev/shm, the
    64 MB of a container by default; a file-size limit), the queue's feeder thread printed a traceback and dropped the
    batch, and the training process waited for it forever. The worker now says why in one line and ends, which the
    training process reports (errors.worker_ended) instead of waiting."""
    import multiprocessing.queues

    def failed(error: Exception, obj) -> None:  # (a log line: the training process's error line follows it)
        logger.error(f"a data-loader worker could not hand a batch over to the training process through shared memory "
                     f"({error}); free space in /dev/shm (a container's is often 64 MB: docker run --shm-size 8g) or load the "
                     "batches in the training process with --max_data_loader_n_workers 0")
        os._exit(3)

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(failed)


def _quiet_about_a_stopped_receiver(report):
    """A worker hands each batch's tensors over as file descriptors, which the training process fetches from the
    worker's resource-sharer thread. A training process stopped mid-fetch drops the connection, and that thread reported
    it with a ConnectionResetError traceback under the run's one-line stop (1 run in CI). The stop is the
    training process's to report; any other error of the thread still is."""

    def excepthook(kind, error, tb):
        if issubclass(kind, (ConnectionError, EOFError)) and tb is not None \
                and os.path.basename(tb.tb_frame.f_code.co_filename) == "resource_sharer.py":
            return
        report(kind, error, tb)

    return excepthook


def _no_collate(batch):
    return batch


# Open files a data-loader worker costs the training process: its queues, and a file per tensor of each batch in flight
# (torch shares them as file descriptors). 12 measured with two workers on the demo's dataset; a margin on top.
FILES_PER_WORKER = 16
FILES_SPARE = 16  # what the run opens meanwhile: saves, samples, logs


def workers_within_open_file_limit(num_workers: int) -> int:
    """`num_workers`, or as many as the limit on open files (ulimit -n) holds: the soft limit is raised to the hard one
    first, as far as needed. Past the limit, workers fail with "Too many open files" tracebacks mid-epoch."""
    if num_workers == 0:
        return 0
    try:
        import resource

        open_now = len(os.listdir("/dev/fd"))
    except (ImportError, OSError):  # Windows: no such limit
        return num_workers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_now + FILES_SPARE + FILES_PER_WORKER * num_workers
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return num_workers
    fit = max(0, (soft - open_now - FILES_SPARE) // FILES_PER_WORKER)
    logger.warning("the limit on open files (ulimit -n) is %d: %d data-loader workers need about %d; using %d (raise the limit "
                   "to use them all)", soft, num_workers, need, fit)
    return fit


class _CollectingLoader(torch.utils.data.DataLoader):
    """A DataLoader that collects the process's garbage before it forks its workers. Garbage that holds a thread pool's
    state (a video writer's or reader's swscale context, in a reference cycle: a training's samples, a test's videos)
    was otherwise freed by a worker's own collection, where those threads do not exist: the worker hung for good in
    pthread_cond_destroy (seen in the test suite, a data-loader test after video tests)."""

    def __iter__(self):
        if self.num_workers > 0 and (not self.persistent_workers or self._iterator is None):
            gc.collect()
        return super().__iter__()


def make_dataloader(dataset: TrainingDataset, *, num_workers: int = 0, persistent_workers: bool = False,
                    pin_memory: bool = False, rank: int = 0, world: int = 1) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """A DataLoader that yields whole batches (the dataset batches by bucket itself) and its sampler."""
    sampler = EpochSampler(dataset, rank, world)
    num_workers = workers_within_open_file_limit(num_workers)
    # Its own generator: a DataLoader otherwise draws a worker seed from the global RNG at every epoch,
    # which would shift the training noise after a resume.
    loader = _CollectingLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=_no_collate, worker_init_fn=_start_worker,
        persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory, generator=torch.Generator())
    return loader, sampler
