"""Cache files: names, keys, metadata, reading and writing; exactly musubi-tuner's layout for HunyuanVideo.

Latent cache, one per image or video clip:
    {cache_dir}/{stem}_{W:04d}x{H:04d}_hv.safetensors                       image, W x H = image size
    {cache_dir}/{stem}_{start:05d}-{frames:03d}_{W:04d}x{H:04d}_hv.safetensors   video clip, W x H = bucket
  one tensor `latents_{F}x{H/8}x{W/8}_{dtype}` (16, F, H/8, W/8): the VAE posterior sample, unscaled;
  metadata architecture=hunyuan_video, width, height, format_version=1.0.1 (+ frame_count for clips).
Text cache, one per image or video (shared by its clips):
    {cache_dir}/{stem}_hv_te.safetensors
  `llm_{dtype}` (256, 4096), `llm_mask` (256,) int64, `clipL_{dtype}` (768,), `clipL_mask` (77,) int64;
  metadata architecture, caption1 (the caption), format_version. Written in two passes (LLM, then CLIP)
  that merge into one file.

Our caches also record what made them (`source_*`, `bucket`, `clip`, `vae`, `llm_model`, ...) so that
`--skip_existing` re-encodes what a changed source or model made stale. Readers never require those
keys: musubi-tuner's caches lack them, and musubi-tuner ignores them in ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

import torch

from musubi_tuner.dtypes import dtype_short_name
from musubi_tuner.errors import UserError
from musubi_tuner import files
from musubi_tuner.files import read_safetensors_header, save_safetensors
from musubi_tuner.hunyuan.vae import LATENT_FAR

logger = logging.getLogger(__name__)

ARCHITECTURE = "hv"
ARCHITECTURE_FULL = "hunyuan_video"
FORMAT_VERSION = "1.0.1"
LATENT_SUFFIX = f"_{ARCHITECTURE}.safetensors"
TEXT_SUFFIX = f"_{ARCHITECTURE}_te.safetensors"
TEXT_ENCODERS = ("llm", "clipL")  # key prefixes of the two text encoders' outputs
TEXT_FAR = 3e4  # no text encoder's output reaches this: an LLM's largest activations are some thousands, and float16 ends at 65504
# One caching run of each kind per cache folder (latent and text caching may run side by side: they write other files)
LOCK_NAMES = {"latents": ".musubi-cache-latents.lock", "text": ".musubi-cache-text.lock"}  # one caching run of each kind
USE_NAMES = {"latents": ".musubi-cache-latents.use", "text": ".musubi-cache-text.use"}  # caching against training
CACHING_RUNS = {"latents": "latent caching run", "text": "text caching run"}


def lock_cache_directories(datasets, kind: str):
    """A context holding the `kind` ("latents" or "text") caching lock of every dataset's cache folder, and the
    folder's use by caching (refused while a training reads it: the caches would change under it)."""
    import contextlib

    stack = contextlib.ExitStack()
    try:
        for ds in datasets:
            stack.enter_context(files.RunLock(Path(ds.cache_directory) / LOCK_NAMES[kind], CACHING_RUNS[kind],
                                              f"cache_directory ({ds.where})"))
            use = stack.enter_context(files.FolderUse(Path(ds.cache_directory) / USE_NAMES[kind], exclusive=True))
            if not use.acquire():
                raise UserError(f"{ds.cache_directory}: a training run is reading these caches ({ds.where}: "
                                f"{files.use_holders(Path(ds.cache_directory) / USE_NAMES[kind])}); this "
                                f"{CACHING_RUNS[kind]} would change them under it: wait for it to finish, or stop it first")
    except BaseException:
        stack.close()
        raise
    return stack


def read_cache_directories(datasets):
    """A context holding training's use of every dataset's cache folder: refused while a caching run writes one (its
    caches would be read half-made), and keeping caching runs out until training ends."""
    import contextlib

    stack = contextlib.ExitStack()
    try:
        for ds in datasets:
            if (denied := files.denied_on_the_way(ds.cache_directory)) is not None:  # (a line without the key: fuzz_aq 9)
                raise UserError(f"{ds.cache_directory}: cannot read the caches: this user may not enter {denied}; fix its "
                                f"permissions, or choose another cache_directory ({ds.where})")
            for kind in LOCK_NAMES:
                use = stack.enter_context(files.FolderUse(Path(ds.cache_directory) / USE_NAMES[kind], exclusive=False))
                if not use.acquire():
                    raise UserError(f"{ds.cache_directory}: a {CACHING_RUNS[kind]} is writing these caches "
                                    f"({files.lock_holder(Path(ds.cache_directory) / LOCK_NAMES[kind])}); training would read "
                                    f"them half-made: wait for it to finish ({ds.where})")
    except BaseException:
        stack.close()
        raise
    return stack


# ------------------------------------------------------------------------------------------ names


def item_stem(source: str | os.PathLike) -> str:
    """The name caches of an item start with: its file name without extension (a frame folder's name)."""
    return os.path.splitext(os.path.basename(os.path.normpath(source)))[0]


def latent_cache_path(cache_dir: str | os.PathLike, stem: str, size: tuple[int, int],
                      clip: tuple[int, int] | None = None) -> Path:
    """Latent cache of an image (`clip` None, `size` = image size) or of a video clip (start, frames) at bucket `size`."""
    width, height = size
    clip_part = f"_{clip[0]:05d}-{clip[1]:03d}" if clip is not None else ""
    return Path(cache_dir) / f"{stem}{clip_part}_{width:04d}x{height:04d}{LATENT_SUFFIX}"


def text_cache_path(cache_dir: str | os.PathLike, stem: str) -> Path:
    return Path(cache_dir) / f"{stem}{TEXT_SUFFIX}"


class LatentCacheName(NamedTuple):
    item_key: str  # the stem; its text cache is {item_key}_hv_te.safetensors
    size: tuple[int, int]  # (width, height) from the name
    start: int | None  # video clips only
    frames: int | None


def parse_latent_cache_name(name: str, video: bool) -> LatentCacheName | None:
    """Split a latent cache file name the way musubi-tuner's training reads it; None if it does not fit.

    Image: `{key}_{W}x{H}_hv.safetensors`; video: `{key}_{start}-{frames}_{W}x{H}_hv.safetensors`
    (a third `-NN` section index, written by other architectures, is tolerated and ignored).
    """
    if not name.endswith(LATENT_SUFFIX):
        return None
    tokens = name[: -len(LATENT_SUFFIX)].split("_")
    try:
        width, height = (int(v) for v in tokens[-1].split("x"))
        if not video:
            return LatentCacheName("_".join(tokens[:-1]), (width, height), None, None) if len(tokens) > 1 else None
        start, frames = (int(v) for v in tokens[-2].split("-")[:2])
    except (ValueError, IndexError):
        return None
    return LatentCacheName("_".join(tokens[:-2]), (width, height), start, frames) if len(tokens) > 2 else None


def latent_key(latent: torch.Tensor) -> str:
    """`latents_{F}x{H}x{W}_{dtype}` for a latent of shape (C, F, H, W)."""
    _, frames, height, width = latent.shape
    return f"latents_{frames}x{height}x{width}_{dtype_short_name(latent.dtype)}"


@lru_cache(maxsize=1)
def _dtype_names() -> tuple[str, ...]:
    """Every dtype name torch prints, longest first (so `float8_e4m3fn` wins over a shorter match)."""
    names = {dtype_short_name(v) for v in vars(torch).values() if isinstance(v, torch.dtype)}
    return tuple(sorted(names, key=len, reverse=True))


def strip_dtype(key: str) -> str:
    """`llm_float8_e4m3fn` -> `llm`; a key without a dtype suffix is returned unchanged."""
    for name in _dtype_names():
        if key.endswith("_" + name):
            return key[: -len(name) - 1]
    return key


def logical_key(key: str) -> str:
    """The batch key a stored key feeds (musubi-tuner's rule): `latents_7x68x120_float16` -> `latents`,
    `llm_bfloat16` -> `llm`, `llm_mask` -> `llm_mask`."""
    if key.endswith("_mask"):
        return key
    key = strip_dtype(key)
    return key.rsplit("_", 1)[0] if key.startswith("latents_") else key


# ------------------------------------------------------------------------------------------ provenance


def source_signature(source: str | os.PathLike) -> dict[str, str]:
    """Size and modification time of an image or video file; of a frame folder, those of its frames (the files read as
    frames, not a stray caption) and a digest of which file is which frame, in the order they are read: frames
    `1.png ... 12.png` renamed `01.png ... 12.png` (read in another order, every file's time kept by `mv`) were taken
    for the cached video (fuzz_ag 1)."""
    source = Path(source)
    if not source.is_dir():
        stat = source.stat()
        return {"source_bytes": str(stat.st_size), "source_mtime_ns": str(stat.st_mtime_ns)}
    from musubi_tuner.data.media import list_images

    frames = [(p.name, p.stat()) for p in list_images(source)]
    listing = "\n".join(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}" for name, stat in frames)
    return {"source_bytes": str(sum(stat.st_size for _, stat in frames)),
            "source_mtime_ns": str(max((stat.st_mtime_ns for _, stat in frames), default=0)),
            "source_frame_files": hashlib.sha256(listing.encode("utf-8", "surrogateescape")).hexdigest()[:16]}


LEFT_OUT_NAME = ".musubi-left-out.json"  # in a cache folder: the items latent caching could not use, and why


def record_left_out(cache_dir: str | os.PathLike, left_out: Iterable[tuple[str, str]]) -> None:
    """What latent caching could not use, (source, reason) pairs, with each source's signature then: training tells
    such items apart from ones never cached, for which running the caching again helps (for these it changes nothing).
    Rewritten by every latent caching run of the folder; removed when nothing was left out."""
    entries = {}
    for path, reason in left_out:
        try:
            signature = source_signature(path)
        except OSError:  # a broken link, say: recorded without a signature, as what could not be read (training told the
            signature = {}  # user to run the caching again, which gave the same failure: fuzz_ag 5)
        entries[item_stem(path)] = {"reason": reason.removeprefix(f"{path}: "), **signature}
    target = Path(cache_dir) / LEFT_OUT_NAME
    try:
        files.remove_leftover_temp_files(cache_dir, lambda name: name == LEFT_OUT_NAME)  # (a killed run's write of it)
        if entries:
            with files.atomic_write(target) as tmp:
                tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")  # (ASCII: a name that is not UTF-8 is
                # escaped, and read back as Python holds it)
        else:
            target.unlink(missing_ok=True)
    except (OSError, UserError):  # a record that cannot be written only makes training's advice less precise
        pass


def left_out(cache_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """record_left_out's record of a cache folder ({} when there is none, or it is damaged)."""
    try:
        record = json.loads((Path(cache_dir) / LEFT_OUT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, dict)} if isinstance(record, dict) else {}


# whether a video's `source_frames` are all of its frames ("true") or where the decode stopped ("false": `head` and `full`
# decode only what they need): what --skip_existing knows of its length from a cache. Recorded, never compared: it
# says what a decode reached, not what made the pixels.
WHOLE_VIDEO_KEY = "source_frames_whole"


def latent_provenance(source: str | os.PathLike, source_size: tuple[int, int], bucket: tuple[int, int],
                      vae: Mapping[str, str] | None = None, source_frames: int | None = None,
                      source_fps: float | None = None, whole: bool | None = None) -> dict[str, str]:
    """What made a latent cache, for its metadata: the source file and its state, its size (and, for a
    video, its frame count after source_fps, and the dataset's source_fps: another keeps other frames in the same
    clip, and --skip_existing reused the clip: fuzz_ag 1a; `whole`: WHOLE_VIDEO_KEY), the bucket and the VAE
    (`vae_provenance`)."""
    provenance = {"source": _name(source), **source_signature(source),
                  "source_size": f"{source_size[0]}x{source_size[1]}", "bucket": f"{bucket[0]}x{bucket[1]}"}
    if source_frames is not None:
        provenance["source_frames"] = str(source_frames)
        provenance["source_fps"] = "none" if source_fps is None else f"{source_fps:g}"
    if whole is not None:
        provenance[WHOLE_VIDEO_KEY] = str(whole).lower()
    return {**provenance, **(vae or {})}


def _name(path: str | os.PathLike) -> str:
    """A file's or folder's name as metadata holds it (and compares it: files.utf8_text, as every header is written)."""
    return files.utf8_text(os.path.basename(os.path.normpath(path)))


def vae_provenance(vae: str | os.PathLike, dtype: torch.dtype) -> dict[str, str]:
    """The VAE's part of a latent cache's provenance: its file name, what the file holds (files.content_digest: every
    official VAE file has the same name) and the dtype it encoded in. Computed once per run."""
    return {"vae": _name(vae), "vae_digest": files.content_digest(vae), "vae_dtype": dtype_short_name(dtype)}


DATASET_KEY = "dataset"


def dataset_record(source: str | os.PathLike, cache_dir: str | os.PathLike) -> dict[str, str]:
    """For a cache's metadata: the dataset that made it, as the path of its image/video folder or JSONL file relative
    to the cache folder (a project copied or moved whole keeps it). Not provenance, which --skip_existing compares:
    it tells this dataset's stale caches from those of another dataset config sharing the folder, which are not this
    one's to delete."""
    source, cache_dir = os.path.realpath(source), os.path.realpath(cache_dir)  # (a folder given through a link is itself)
    try:
        where = os.path.relpath(source, cache_dir)
    except ValueError:  # another drive
        where = source
    return {DATASET_KEY: files.utf8_text(os.path.normcase(where).replace(os.sep, "/"))}


def made_by_another_dataset(paths: Iterable[Path], source: str | os.PathLike, cache_dir: str | os.PathLike) -> dict[Path, str]:
    """Of `paths`, the caches whose metadata names another dataset than `source`: path -> that dataset. Caches without
    the record (musubi-tuner's, or older ones) are not listed. One whose dataset is not there now is listed too: a
    drive not mounted, or a folder being renamed, would cost that dataset all its caches (fuzz_ay 1); the warning that
    keeps them says so (_own)."""
    own = dataset_record(source, cache_dir)[DATASET_KEY]
    other = {}
    for path in paths:
        try:
            recorded = read_safetensors_header(path)[1].get(DATASET_KEY)
        except UserError:  # a damaged cache is nobody's to keep
            continue
        if recorded is not None and recorded != own:
            other[path] = recorded
    return other


def text_provenance(encoder: str, model: str | os.PathLike, dtype: torch.dtype, fp8: bool = False) -> dict[str, str]:
    """What made one encoder's part of a text cache: the model's file or folder name, what it holds
    (files.content_digest), the dtype it ran in and, for the LLM, whether its weights were fp8 (--fp8_llm).
    Computed once per run."""
    record = {f"{encoder}_model": _name(model), f"{encoder}_digest": files.content_digest(model),
              f"{encoder}_dtype": dtype_short_name(dtype)}
    if encoder == "llm":
        record["llm_fp8"] = str(bool(fp8)).lower()
    return record


def clip_provenance(video_provenance: dict[str, str], clip: tuple[int, int]) -> dict[str, str]:
    """A video's provenance plus which clip (start, frames) of it a cache holds."""
    return {**video_provenance, "clip": f"{clip[0]}-{clip[1]}"}


# ------------------------------------------------------------------------------------------ writing


def _finite(tensors: dict[str, torch.Tensor], what: str, dtype_flag: str) -> dict[str, torch.Tensor]:
    """NaN -> 0 with a warning (musubi-tuner does the same: a few overflowed values); the caller's tensors are not
    modified. A tensor that is mostly NaN, or holds any infinity (an output past its dtype's range: float16 ends at
    65504), is refused instead: zeros in its place would be a cache of nothing, an infinity a loss of NaN at the step
    that meets it, and the next encodes would be the same (a damaged model file spreads NaN through every output)."""
    clean = {}
    for key, t in tensors.items():
        if t.is_floating_point() and t.dtype.itemsize > 1:
            infinite, nans = int(torch.isinf(t).sum()), int(torch.isnan(t).sum())
            if infinite or 2 * nans > t.numel():
                raise UserError(f"{what}: {key} came out {'infinite' if infinite else 'NaN'} in {infinite or nans:,} of its "
                                f"{t.numel():,} values: the encoder's model file is damaged, or {dtype_flag} float32 avoids an "
                                f"overflow; nothing was written (the cache already there is kept)")
            if nans:
                logger.warning("%s: %s holds NaN values; they are stored as 0", what, key)
                t = torch.nan_to_num(t, nan=0.0)
        clean[key] = t.detach().cpu().contiguous()
    return clean


def save_latent_cache(path: str | os.PathLike, latent: torch.Tensor, *, size: tuple[int, int],
                      frame_count: int | None = None, provenance: Mapping[str, str] | None = None) -> Path:
    """Write one latent cache atomically. `latent`: (16, F, H, W); `size` (width, height) as in the name."""
    if latent.dim() != 4:
        raise ValueError(f"latent must be (C, F, H, W), got {tuple(latent.shape)}")
    path = Path(path)
    metadata = {**(provenance or {}), "architecture": ARCHITECTURE_FULL, "width": str(size[0]), "height": str(size[1]),
                "format_version": FORMAT_VERSION}
    if frame_count is not None:
        metadata["frame_count"] = str(frame_count)
    save_safetensors(_finite({latent_key(latent): latent}, str(path), "--vae_dtype"), path, metadata=metadata)
    return path


def record_whole_video(path: str | os.PathLike) -> None:
    """Add WHOLE_VIDEO_KEY ("true") to a current latent cache of a clip that does not record it (made before it was
    recorded), once a decode has seen its video whole: without it, every later --skip_existing run decoded that video
    again to learn its length, for ever (fuzz_ay 4). The file is rewritten as it was, with the key (a few KB)."""
    from safetensors.torch import load_file

    metadata = read_safetensors_header(path)[1]
    if metadata.get(WHOLE_VIDEO_KEY) is None and "source_frames" in metadata:  # (ours: musubi-tuner's are left as they are)
        save_safetensors(load_file(str(path)), path, metadata={**metadata, WHOLE_VIDEO_KEY: "true"})


def text_encoder_tensors(encoder: str, embed: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The stored keys of one encoder's output: `{encoder}_{dtype}` and `{encoder}_mask`."""
    if encoder not in TEXT_ENCODERS:
        raise ValueError(f"encoder must be one of {TEXT_ENCODERS}, got {encoder!r}")
    tensors = {f"{encoder}_{dtype_short_name(embed.dtype)}": embed}
    if mask is not None:
        tensors[f"{encoder}_mask"] = mask
    return tensors


def save_text_cache(path: str | os.PathLike, caption: str, tensors: Mapping[str, torch.Tensor],
                    provenance: Mapping[str, str] | None = None, changed: list | None = None) -> Path:
    """Write or merge into a text-encoder cache, atomically (musubi-tuner's two-pass rule).

    `tensors` holds stored keys (see text_encoder_tensors): one encoder's or both. If the file exists,
    its tensors are kept except those whose dtype-stripped name is written now (so a re-run in another
    precision replaces, not duplicates); a caption change wins with a warning, and drops the other encoder's
    tensors (made from the old caption: until its pass writes them anew, the cache lacks them, and a run killed
    between the two passes leaves a cache that --skip_existing completes, never one that mixes two captions);
    one unreadable, or saying it is of another architecture (damaged), is written anew, with a warning.
    """
    path = Path(path)
    tensors = _finite(dict(tensors), str(path), "--text_encoder_dtype")
    metadata = {"architecture": ARCHITECTURE_FULL, "caption1": caption, "format_version": FORMAT_VERSION}
    if path.exists():
        kept, old_metadata = _mergeable_text_cache(path, {strip_dtype(k) for k in tensors})
        if old_metadata.get("caption1", caption) != caption:
            if changed is not None:  # (a caller that says them all in one line: a re-captioned dataset was a line each)
                changed.append((path, old_metadata["caption1"], caption))
            else:
                logger.warning("%s: caption changed from %r to %r; the new one is stored", path, old_metadata["caption1"], caption)
            kept = {}
        tensors = {**kept, **tensors}
        metadata = {**old_metadata, **metadata}
    metadata.update(provenance or {})
    save_safetensors(tensors, path, metadata=metadata)
    return path


def _mergeable_text_cache(path: Path, replaced: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The existing file's tensors not in `replaced`, and its metadata; ({}, {}) if it is unreadable.

    Read through files.StateDictFile, which reads from a descriptor: safetensors' own reader takes a path as UTF-8
    text and refuses any other (an image named in Latin-1 or Shift-JIS, from a zip unpacked on Linux)."""
    try:
        _, metadata = read_safetensors_header(path)
        if metadata.get("architecture", ARCHITECTURE_FULL) == ARCHITECTURE_FULL:
            return {k: t for k, t in _read_all(path).items() if strip_dtype(k) not in replaced}, dict(metadata)
    except Exception as e:  # a half-written file from a killed run (musubi-tuner's writes are not atomic)
        logger.warning("%s: unreadable (%s); writing it anew", path, str(e)[:160])
        return {}, {}
    # a cache of this name is this dataset's, whatever its header says (another architecture's caches have names of their
    # own): a damaged byte there stopped the run half-way through its encoders, some caches rewritten (fuzz_ar 17)
    logger.warning("%s: says it is a cache of architecture %r, not %s (damaged); writing it anew", path,
                   metadata["architecture"][:60], ARCHITECTURE_FULL)
    return {}, {}


# ------------------------------------------------------------------------------------------ reading


def load_cache(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A latent or text cache as {logical key: tensor}, e.g. `latents` (16, F, H, W), `llm` (256, 4096)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise UserError(f"{path}: cache file not found; run the caching commands again")
    try:
        stored = _read_all(path)
    except UserError as e:  # truncated, damaged or foreign
        reason = str(e).removeprefix(f"{path}: ")
        raise UserError(f"{path}: unreadable cache file ({reason[:160]}); delete it and run the caching command again") from None
    tensors: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        finite = torch.isfinite(t.float() if t.element_size() == 1 else t) if t.is_floating_point() else None  # (fp8: no isfinite)
        if finite is not None and not bool(finite.all()):  # (caching writes none: see _finite)
            bad = int((~finite).sum())
            raise UserError(f"{path}: {key} holds {bad:,} NaN or infinite values of {t.numel():,}: a damaged cache; delete it "
                            "and run the caching command again")
        name = logical_key(key)
        if name == "latents" and t.is_floating_point() and t.numel() and float(t.float().abs().max()) > LATENT_FAR:
            # (finite but absurd: trained on without a word, a loss 5e8 times the others: fuzz_ab 8)
            raise UserError(f"{path}: {key} reaches {float(t.float().abs().max()):.3g}, where a VAE's latents stay within a "
                            "few units: a damaged cache; delete it and run the caching command again")
        if name in TEXT_ENCODERS and t.is_floating_point() and t.numel() and float(t.float().abs().max()) > TEXT_FAR:
            # (clipL all 65504, float16's largest: a loss 1e7 times the others, trained on without a word: fuzz_bb 4)
            raise UserError(f"{path}: {key} reaches {float(t.float().abs().max()):.3g}, where a text encoder's outputs stay "
                            f"below {TEXT_FAR:.0e} (in float16, in which caching runs them, past it is an overflow): a damaged "
                            "cache; delete it and run cache_text_encoder_outputs.py again")
        if name.endswith("_mask") and t.numel() and not bool(((t == 0) | (t == 1)).all()):
            # (a flipped bit, 2 or -1 trained on other token counts without a word: fuzz_ar 5)
            raise UserError(f"{path}: {key} holds values other than 0 and 1, as no token mask does: a damaged cache; delete "
                            "it and run cache_text_encoder_outputs.py again")
        if name in tensors:
            raise UserError(f"{path}: holds two versions of {name!r} (different dtypes); "
                            f"delete it and run the caching command again")
        tensors[name] = t
    return tensors


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a cache file, read from its descriptor (any file name works; see _mergeable_text_cache)."""
    f = files.StateDictFile(path, what="cache file")
    try:
        return {k: f.read(k) for k in f.keys()}
    finally:
        f.close()


def cache_status(path: str | os.PathLike, expected: Mapping[str, str] | None = None,
                 required_prefixes: tuple[str, ...] = (), unrecorded: set | None = None) -> str | None:
    """None if the cache at `path` can be reused, else why not ("missing", "vae changed (a -> b)", ...).

    A metadata key in `expected` that the file lacks (musubi-tuner's caches record no provenance)
    does not make it stale; such a reusable cache's path is added to `unrecorded`, for the summary to say so.
    `required_prefixes`: tensor keys that must be present, e.g. ("llm_",).
    """
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        entries, metadata = read_safetensors_header(path)
    except UserError as e:
        return f"unreadable ({e})"
    if metadata.get("architecture", ARCHITECTURE_FULL) != ARCHITECTURE_FULL:
        return f"made for {metadata['architecture']}"
    for prefix in required_prefixes:
        if not any(k.startswith(prefix) for k in entries):
            return f"has no {prefix.rstrip('_')} tensors"
    expected = {k: v for k, v in (expected or {}).items() if k != WHOLE_VIDEO_KEY}
    for key, value in expected.items():
        if key in metadata and metadata[key] != value:
            return f"{key} changed ({metadata[key]} -> {value})"
    if unrecorded is not None and any(key not in metadata for key in expected):
        unrecorded.add(path)
    return None


def stale_caches(cache_dir: str | os.PathLike, current: Iterable[str | os.PathLike], *, text: bool = False,
                 keep_stems: Iterable[str] = ()) -> list[Path]:
    """Cache files in `cache_dir` that no current item produces.

    `text` selects `*_hv_te.safetensors`, otherwise `*_hv.safetensors`. The caches of a stem in `keep_stems` (items
    that could not be read this time) are never listed: those whose item key is that stem, not every name it begins
    (a skipped cat.png kept the caches of a deleted cat_2.png, and training trained on them). Deleting them (unless
    --keep_cache) is the caching scripts' job.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    suffix = TEXT_SUFFIX if text else LATENT_SUFFIX
    wanted = {os.path.normcase(os.path.abspath(p)) for p in current}
    kept = set(keep_stems)

    def protected(name: str) -> bool:
        if text:
            return name[: -len(TEXT_SUFFIX)] in kept
        return any(parsed is not None and parsed.item_key in kept for parsed in (parse_latent_cache_name(name, video) for video in (False, True)))

    return [p for p in sorted(cache_dir.iterdir())
            if p.name.endswith(suffix) and os.path.normcase(os.path.abspath(p)) not in wanted and not protected(p.name)
            and is_a_cache(p, text=text)]


def is_a_cache(path: Path, *, text: bool = False) -> bool:
    """Whether a file named like a cache is one (a latent cache, or with `text` a text cache): the cache folder is the
    image folder unless set, and a LoRA named `style_hv.safetensors` there, or a folder of a cache's name, was deleted as
    the cache of an item gone from the dataset (fuzz_bc 1, 2). One whose header cannot be read is a cache if its name
    parses as one (a write cut short; a text cache's name is any name: a 4-byte notes_hv_te.safetensors went, fuzz_bf 5);
    one that reads is a cache if it holds a cache's tensors."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    try:
        entries, metadata = read_safetensors_header(path)
    except UserError:
        return not text and any(parse_latent_cache_name(path.name, video) is not None for video in (False, True))
    if metadata.get("architecture", ARCHITECTURE_FULL) != ARCHITECTURE_FULL:
        return False
    names = {logical_key(k) for k in entries}
    return bool(names & set(TEXT_ENCODERS)) if text else "latents" in names


def leftover_temp_files(cache_dir: str | os.PathLike, *, text: bool = False, remove: bool = False) -> list[Path]:
    """Temporary files of latent (or, with `text`, text) caches whose write was killed before its rename; with `remove`,
    deleted (files.remove_leftover_temp_files).

    They are never caches, so they go even with --keep_cache; a live run's are never listed (files.leftover_temp_files).
    """
    suffix = TEXT_SUFFIX if text else LATENT_SUFFIX
    find = files.remove_leftover_temp_files if remove else files.leftover_temp_files
    return find(cache_dir, lambda name: name.endswith(suffix))
