"""A dataset's items for the caching commands: listing, captions, decoding in worker threads, batches.

    items, problems = list_items(dataset)                     # cheap: names and caption files only
    for batch in iter_latent_batches(dataset, report, num_workers=4, vae=vae_provenance("vae.pt", dtype)):
        latents = vae.encode(batch.pixels(device, dtype))     # workers decode the next items meanwhile
        ...save_latent_cache(item.cache_path, ...) for each item; report.cached += len(batch)
    print(report.summary())

An item that cannot be read is recorded in the report with its reason and skipped; `strict=True`
raises instead. Batches group items of one bucket (and clip length) as musubi-tuner does.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from musubi_tuner.data import cache_files, media
from musubi_tuner.data.buckets import BucketSelector, resize_to_bucket
from musubi_tuner.data.config import TARGET_FPS, AnyDatasetConfig, VideoDatasetConfig
from musubi_tuner.data.frames import Clip, decode_limit, extract_clips, round_to_4n1
from musubi_tuner.data.training_dataset import cached_latent_shape, text_cache_problem
from musubi_tuner.errors import MachineLimit, UserError, printable
from musubi_tuner.files import (expanded_path, not_text, read_safetensors_header, read_small_file, require_file, require_present,
                                 text_lines, unwritable_name)
from musubi_tuner.tomlio import loads_json

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ report


LOGGED_SKIPS = 10


@dataclass
class CacheReport:
    """What a caching run did, for the summary at the end. Only the main thread updates it."""

    cached: int = 0
    already_cached: int = 0  # --skip_existing found them current
    unrecorded: int = 0  # of those, caches that do not record all of what made them (musubi-tuner's): not compared
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): nothing to cache from it
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): could not be read
    cache_paths: set[Path] = field(default_factory=set)  # every cache the current items have (or will have)
    kept_stems: set[str] = field(default_factory=set)  # items not judged this run (unreadable, no caption): caches kept
    listed: int = 0  # items the dataset's folder or JSONL lists, whatever became of them

    def fail(self, path: str | os.PathLike, reason: str, strict: bool = False) -> None:
        """Record an unreadable item (or raise it as a UserError in strict mode); its old caches are kept."""
        if strict:
            raise UserError(_naming(path, reason))
        logger.warning("cannot use %s", _naming(path, reason))
        self.failed.append((str(path), reason))
        self.kept_stems.add(cache_files.item_stem(path))

    def skip(self, path: str | os.PathLike, reason: str, *, superseded: bool = False) -> None:
        """Record an item that gives nothing to cache. Its old caches are kept (a missing caption may be a typo in
        caption_extension) unless `superseded`: the item was read and the config now makes nothing of it.

        The first LOGGED_SKIPS are logged as they come; the rest only count (a wrong caption_extension skips every
        item, and the summary lists the first of them with the total)."""
        if len(self.skipped) < LOGGED_SKIPS:
            logger.info("skipped %s", _naming(path, reason))
        elif len(self.skipped) == LOGGED_SKIPS:
            logger.info("skipping more items: the summary at the end counts them")
        self.skipped.append((str(path), reason))
        if not superseded:
            self.kept_stems.add(cache_files.item_stem(path))

    def summary(self, unit: str = "items", limit: int = 20) -> str:
        """`98 clips cached, 0 already cached, 1 skipped, 1 failed` and a line per skipped or failed file."""
        lines = [f"{self.cached} {unit} cached, {self.already_cached} already cached, "
                 f"{len(self.skipped)} skipped, {len(self.failed)} failed"]
        for title, entries in (("failed", self.failed), ("skipped", self.skipped)):
            for path, reason in entries[:limit]:
                lines.append(f"  {title}: {_naming(path, reason)}")
            if len(entries) > limit:
                lines.append(f"  ... and {len(entries) - limit} more {title}")
        if self.unrecorded:
            lines.append(f"  {self.unrecorded} of those already cached do not record what made them (caches of musubi-tuner or "
                         "of an older version): kept without comparing the model and settings; without --skip_existing "
                         "they are made anew")
        return "\n".join(lines)


def require_some_cached(reports: list[CacheReport], unit: str) -> None:
    """A caching run that made no cache at all and could not read some items failed: exit status 2 (after the summary),
    so that a script stops there instead of training on nothing. Skipped items (no caption, too short) are not
    failures: a run that skips everything still succeeds, as in musubi-tuner."""
    made = sum(r.cached + r.already_cached for r in reports)
    failed = sum(len(r.failed) for r in reports)
    if made == 0 and failed:
        raise UserError(f"no {unit} made: {failed} item(s) could not be read (listed above) and no other item gave one; "
                        f"fix or remove those files, or the dataset config")
    skipped = sum(len(r.skipped) for r in reports)
    if made == 0 and skipped:  # (a caption_extension that matches no file, say): still a success, as in musubi-tuner
        logger.warning("no %s made: every one of the %d item(s) was skipped (the reasons above); training has nothing to "
                       "train on from these datasets", unit, skipped)


def _naming(path: str | os.PathLike, reason: str) -> str:
    """The reason, prefixed with the file unless it already names it (UserErrors do); on one line whatever the names in it
    hold (errors.printable: a newline in a name made one entry of the log and the summary read as two)."""
    return printable(reason if str(path) in reason else f"{path}: {reason}")


# ------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class SourceItem:
    """One image or video (file or frame folder) of a dataset, not yet read."""

    path: Path
    stem: str  # cache names start with it
    caption_file: Path | None = None  # directory datasets
    jsonl_caption: str | None = None  # JSONL datasets
    jsonl_line: int | None = None  # JSONL datasets: the line that lists it
    caption_hint: str = ""  # a video whose caption file is missing: where it may be instead (_missing_caption_hint)

    def read_caption(self) -> str:
        """The caption, stripped. Raises UserError naming the caption file if it is missing or not UTF-8."""
        if self.caption_file is None:
            return self.jsonl_caption.strip()
        # (a FIFO, /dev/zero, a socket or a 1 TB sparse file as a caption: named, where a read would hang or fill memory)
        try:
            data = read_small_file(self.caption_file, "caption file", f"for {self.path.name}", MAX_CAPTION_BYTES)
        except UserError as e:
            if self.caption_hint and not os.path.lexists(self.caption_file):  # (a video's: where it may be instead)
                raise UserError(f"{e}{self.caption_hint}") from None
            raise
        bom = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        if bom or b"\x00" in data:  # (PowerShell's Out-File: without a byte-order mark it decoded as "a\x00 \x00c\x00a\x00t\x00",
            # and was trained on without a word)
            what = "is UTF-16 text (it starts with a byte-order mark)" if bom else "holds NUL bytes (UTF-16 text, or not text)"
            raise UserError(f"{self.caption_file}: caption {what}; save it as UTF-8")
        try:  # (line breaks read as musubi-tuner's text-mode open reads them: a CRLF caption's \r was a token more per line)
            return "\n".join(text_lines(data.decode("utf-8-sig"))).strip()
        except UnicodeDecodeError as e:
            raise UserError(f"{self.caption_file}: caption is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


MAX_NAME_BYTES = 255  # a file name's limit on every file system a dataset lives on (ext4, XFS, btrfs, NTFS, APFS)
MAX_CAPTION_BYTES = 2**20  # a caption is a sentence or a paragraph; the text encoders read a few hundred tokens of it


def list_items(dataset: AnyDatasetConfig) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """The dataset's items in name (or JSONL) order, and (file, reason) for entries left out.

    Image folders keep only images that have a caption file (as musubi-tuner); video folders list
    every video. Two items whose cache names would collide keep the first. A malformed JSONL line is
    a UserError naming the line.
    """
    if dataset.source_key.endswith("_directory"):
        items, problems = _directory_items(dataset)
    else:
        items, problems = _jsonl_items(dataset), []
    unique: dict[str, SourceItem] = {}
    for item in items:
        if item.stem not in unique:
            unique[item.stem] = item
        elif _same_file(unique[item.stem].path, item.path):  # a JSONL that lists one file twice (in any spelling: a/../a/x.png,
            first = unique[item.stem]                        # a linked folder, was "rename one" and kept the first caption: fuzz_ag 8f)
            lines = f"lines {first.jsonl_line} and {item.jsonl_line} of {dataset.source.name}"
            if first.path != item.path:
                lines += f" (as {first.path} and {item.path}, one file)"
            if first.jsonl_caption != item.jsonl_caption:  # musubi-tuner's text cache ends with the last line's caption
                unique[item.stem] = item
                problems.append((str(item.path), f"listed on {lines} with two captions; line {item.jsonl_line}'s is used, as "
                                                 "musubi-tuner uses it (one item per file: give each caption its own copy)"))
            else:
                problems.append((str(item.path), f"listed twice, on {lines}; it is one item"))
        else:
            problems.append((str(item.path), f"same cache name {item.stem!r} as {unique[item.stem].path}; rename one"))
    return list(unique.values()), problems


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one is missing: reading it names it)
        return os.path.realpath(a) == os.path.realpath(b)


def _directory_items(dataset: AnyDatasetConfig) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    folder, extension = dataset.source, dataset.caption_extension
    try:
        files = media.list_videos(folder) if dataset.is_video else media.list_images(folder)
    except OSError as e:
        raise UserError(f"{dataset.where}.{dataset.source_key}: cannot list {folder} ({e.strerror or e})") from None
    items, problems = [], []
    siblings: dict[str, list[str]] | None = None  # stem -> the other files' suffixes, listed once, at the first miss
    loose: dict = {}  # the same by a name's Unicode-normalised, case-folded form
    for path in files:
        caption_file = path.with_name(path.stem + extension)
        if not dataset.is_video and len(os.fsencode(caption_file.name)) > MAX_NAME_BYTES:  # (no such file can exist)
            problems.append((str(path), f"its caption file would be named {caption_file.name[:40]}..., "
                                        f"{len(os.fsencode(caption_file.name))} bytes, over the {MAX_NAME_BYTES} a file name may "
                                        "have; shorten the image's name"))
            continue
        hint = ""
        if not os.path.exists(caption_file):
            if caption_file.is_symlink():  # there, but a broken or looping link: said so, not "no caption file"
                try:
                    require_file(caption_file, "caption file")
                except UserError as e:
                    problems.append((str(path), str(e)))
                    continue
            if siblings is None:
                siblings = _suffixes_by_stem(folder)
                loose = _by_loose_name(siblings)
            hint = _missing_caption_hint(path, extension, siblings, loose)
            if not dataset.is_video:  # (musubi-tuner leaves such images out; a video without its caption fails, as there:
                # its failure says the same hint)
                problems.append((str(path), f"no caption file {caption_file.name}{hint}"))
                continue
        items.append(SourceItem(path, cache_files.item_stem(path), caption_file=caption_file, caption_hint=hint))
    if not dataset.is_video:
        problems += _unsupported_images(folder, extension, {path.stem for path in files})
    else:  # (images there: those captioned, as items meant; a cover.jpg beside the videos is none, nor a video's own
        # thumbnail, clip.jpg beside clip.mp4, which was taken for the video left out: fuzz_bg 1)
        # (a folder of images alone listed as a video_directory is said once, as such: not image by image)
        captioned, videos = _captioned_stems(folder, extension), {path.stem for path in files}
        problems += [(str(p), why) for p in sorted(Path(folder).iterdir())
                     if (why := media.unsupported_type(p.suffix, video=True)) and not p.name.startswith(".")
                     and (p.suffix.lower() not in (*media.IMAGE_EXTENSIONS, ".apng") or (videos and p.stem in captioned
                                                                                          and p.stem not in videos))]
    return items, problems


def _captioned_stems(folder: Path, extension: str) -> set[str]:
    return {p.name[:-len(extension)] for p in Path(folder).iterdir() if extension and p.name.endswith(extension)}


def _missing_caption_hint(path: Path, extension: str, siblings: dict[str, list[str]], loose: dict) -> str:
    """Where the caption of `path` may be instead, said after "no caption file": a caption_extension without its dot,
    x.png.txt, a name that only looks the same (_caption_named_otherwise) or another suffix beside it."""
    caption_name = path.stem + extension
    # (os.path.exists: a hint's name may be too long to exist, which Path.exists raises for)
    dotted = path.with_name(f"{path.stem}.{extension}")
    if extension and not extension.startswith(".") and os.path.exists(dotted):
        return f" (caption_extension = {extension!r} does not start with a dot; {dotted.name} exists: write '.{extension}')"
    if os.path.exists(path.with_name(path.name + extension)):  # x.png.txt: the caption of x.png is x.txt
        return f" ({path.name}{extension} exists: the caption of {path.name} is named {caption_name})"
    hint = _caption_named_otherwise(loose, path.stem, extension, caption_name)
    others = [s for s in siblings.get(path.stem, []) if s.lower() not in (*media.IMAGE_EXTENSIONS, *media.VIDEO_EXTENSIONS)]
    if others and not hint:
        hint = f" ({path.stem}{others[0]} exists: caption_extension = {others[0]!r}?)"
    return hint


def _unsupported_images(folder: Path, extension: str, listed_stems: set[str]) -> list[tuple[str, str]]:
    """Captioned images of a type that is not read (.gif, .tiff): named, where leaving them out said nothing."""
    captioned = _captioned_stems(folder, extension)
    return [(str(p), why) for p in sorted(Path(folder).iterdir())
            if (why := media.unsupported_type(p.suffix, video=False)) and p.stem in captioned and p.stem not in listed_stems
            and not p.name.startswith(".")
            # (a folder of videos alone listed as an image_directory is said once, as such: not video by video)
            and (listed_stems or p.suffix.lower() not in media.VIDEO_EXTENSIONS)]


def _by_loose_name(siblings: dict[str, list[str]]) -> dict[str, list[tuple[str, list[str]]]]:
    """The folder's stems (with their suffixes) by their Unicode-normalised, case-folded form."""
    index: dict[str, list[tuple[str, list[str]]]] = {}
    for stem, suffixes in siblings.items():
        index.setdefault(_loose(stem), []).append((stem, suffixes))
    return index


def _loose(name: str) -> str:
    """A name as it looks: in one Unicode form, one letter case, without blanks and invisible characters."""
    return "".join(c for c in unicodedata.normalize("NFC", name).casefold() if not c.isspace() and unicodedata.category(c) != "Cf")


def _caption_named_otherwise(by_loose_name: dict, stem: str, extension: str, expected: str) -> str:
    """A hint when a caption file is there under a name that only looks the same: another Unicode form (café in NFD, as
    macOS writes it, beside an image named in NFC), other letter case (IMG_1.png beside img_1.txt), or a blank or an
    invisible character in it ("a.txt ", "b .txt": the hint proposed caption_extension = '.txt ', which the config then
    refuses). musubi-tuner matches names exactly too, so the caption is not taken; it is said."""
    for other, suffixes in by_loose_name.get(_loose(stem), []):
        # (a suffix in other letter case alone, x.TXT: the caption_extension hint names it, for a folder of them)
        named = [s for s in suffixes if _loose(s) == _loose(extension) and not (other == stem and s.lower() == extension.lower())]
        if named and not any(s.lower() in (*media.IMAGE_EXTENSIONS, *media.VIDEO_EXTENSIONS) for s in named):
            name = other + named[0]
            if unicodedata.normalize("NFC", name) == unicodedata.normalize("NFC", stem + extension):
                how = "in another Unicode form"
            elif name.casefold() == (stem + extension).casefold():
                how = "in other letter case"
            else:
                how = "with a blank or an invisible character in it"
            return f" ({printable(repr(name))} exists, its name {how}: rename it {expected})"
    return ""


def _suffixes_by_stem(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.suffix and not p.name.startswith("."):
            out.setdefault(p.stem, []).append(p.suffix)
    return out


def _jsonl_items(dataset: AnyDatasetConfig) -> list[SourceItem]:
    jsonl = dataset.source
    path_keys = ("video_path",) if dataset.is_video else ("image_path", "image_path_0")
    where = f"({dataset.where}.{dataset.source_key})"
    items = []
    data = read_small_file(jsonl, "JSONL file", f"{dataset.where}.{dataset.source_key}", MAX_JSONL_BYTES)
    try:
        lines = text_lines(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{jsonl}: not UTF-8 text (byte {e.start}) {where}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = loads_json(line)
        except ValueError as e:  # every problem loads_json has: syntax, a key given twice, a huge integer, deep nesting
            reason = e.msg if isinstance(e, json.JSONDecodeError) else e  # (the line is named; its "line 1" is not)
            raise UserError(f"{jsonl}:{number}: not a JSON object ({reason}) {where}") from None
        if not isinstance(entry, dict):
            raise UserError(f"{jsonl}:{number}: not a JSON object {where}")
        key = next((k for k in path_keys if k in entry), path_keys[0])
        media_path = entry.get(key)
        if not isinstance(media_path, str) or not media_path.strip():
            given = "" if media_path is None else f" ({key} is {json.dumps(media_path)[:40]}, not a path)"
            raise UserError(f"{jsonl}:{number}: no \"{path_keys[0]}\"{given} {where}")
        caption = entry.get("caption")
        if not isinstance(caption, str):
            raise UserError(f"{jsonl}:{number}: no \"caption\" string {where}")
        problem = not_text(caption)
        if problem is not None:  # (a JSON escape of half a pair: the tokenizer failed on it once the encoder had loaded)
            raise UserError(f"{jsonl}:{number}: the caption {problem} {where}")
        try:
            path = _jsonl_media_path(media_path, jsonl, f"{jsonl}:{number}: {json.dumps(media_path)}")
        except UserError as e:  # (a NUL character, a ~ that cannot be expanded)
            raise UserError(f"{e} {where}") from None
        items.append(SourceItem(path, cache_files.item_stem(path), jsonl_caption=caption, jsonl_line=number))
    return items


MAX_JSONL_BYTES = 2**30  # a line per item: a million items with long captions


def _jsonl_media_path(value: str, jsonl: Path, at: str) -> Path:
    """Relative to the current folder as musubi-tuner reads it, else (if only that exists) to the JSONL's folder."""
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+://", value):  # (Path() made "https://a/x.png" "https:/a/x.png", "not found")
        raise UserError(f"{at}: a URL; give the path of a file on this machine (download it first)")
    path = expanded_path(value, at)
    if path.is_absolute() or os.path.exists(path) or not os.path.exists(jsonl.parent / path):  # (not raising: a name too long)
        return path
    return jsonl.parent / path


# ------------------------------------------------------------------------------------------ latent items


@dataclass
class LatentItem:
    """One image or video clip, decoded and cropped to its bucket, ready for the VAE."""

    source: SourceItem
    pixels: np.ndarray  # (F, H, W, 3) uint8 RGB; F = 1 for images
    bucket: tuple[int, int]  # (width, height)
    size: tuple[int, int]  # (width, height) in the cache name and metadata: image size, or bucket for clips
    clip: Clip | None
    cache_path: Path
    provenance: dict[str, str]

    @property
    def frame_count(self) -> int | None:
        return self.clip.frames if self.clip is not None else None


@dataclass
class LatentBatch:
    key: tuple[int, ...]  # (width, height) for images, (width, height, frames) for clips
    items: list[LatentItem]

    def pixels(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1], what the VAE encodes."""
        return stack_pixels(self.items, device, dtype)


def stack_pixels(items: Sequence[LatentItem], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Items of one batch as (B, 3, F, H, W) in [-1, 1]."""
    frames = torch.from_numpy(np.stack([item.pixels for item in items])).to(device)
    return frames.permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0


@dataclass
class _Loaded:
    """What a worker returns for one source item."""

    items: list[LatentItem] = field(default_factory=list)
    already_cached: list[Path] = field(default_factory=list)  # current caches, not decoded again
    unrecorded: set[Path] = field(default_factory=set)  # of those, the ones that record not all of what made them
    skip_reason: str | None = None


class _LatentLoader:
    """Turns a SourceItem into LatentItems (runs in worker threads; touches no shared state)."""

    def __init__(self, dataset: AnyDatasetConfig, vae: Mapping[str, str] | None, skip_existing: bool):
        self.dataset = dataset
        self.vae = vae
        self.skip_existing = skip_existing
        self.selector = BucketSelector(dataset.resolution, dataset.enable_bucket, dataset.bucket_no_upscale)

    def __call__(self, item: SourceItem) -> _Loaded:
        if item.caption_file is not None:  # a video without its caption: failed here as text caching fails it, before
            item.read_caption()  # the VAE's time is spent (its latents were cached without a word, and never trained on)
        return self._video(item) if self.dataset.is_video else self._image(item)

    def _current(self, path: Path, provenance: dict[str, str], unrecorded: set[Path]) -> bool:
        return (self.skip_existing and cache_files.cache_status(path, provenance, unrecorded=unrecorded) is None
                and cached_latent_shape(path, []) is not None)  # (one training leaves out was "already cached": fuzz_ar 4)

    def _image(self, item: SourceItem) -> _Loaded:
        size = media.image_size(item.path)
        bucket = self.selector.bucket_for(size)
        path = _writable(cache_files.latent_cache_path(self.dataset.cache_directory, item.stem, size))
        provenance = cache_files.latent_provenance(item.path, size, bucket, vae=self.vae)
        unrecorded: set[Path] = set()
        if self._current(path, provenance, unrecorded):
            return _Loaded(already_cached=[path], unrecorded=unrecorded)
        pixels = resize_to_bucket(media.load_image(item.path), bucket)[None]
        return _Loaded([LatentItem(item, pixels, bucket, size, None, path, provenance)])

    def _video(self, item: SourceItem) -> _Loaded:
        ds: VideoDatasetConfig = self.dataset
        loaded = _Loaded()
        if self.skip_existing:
            loaded.already_cached = self._cached_clips(item, loaded.unrecorded)
            if loaded.already_cached:
                return loaded
        limit = decode_limit(ds.frame_extraction, ds.target_frames, ds.max_frames)
        video = media.load_video(item.path, max_frames=limit, source_fps=ds.source_fps, target_fps=TARGET_FPS,
                                 resize=lambda frame, size: resize_to_bucket(frame, self.selector.bucket_for(size)))
        bucket = (video.frames.shape[2], video.frames.shape[1])
        num_frames = len(video.frames)
        clips = self._clips(num_frames)
        if not clips:
            after = f" after source_fps = {ds.source_fps:g}" if ds.source_fps else ""  # (the file has more: fuzz_ag 8a)
            return _Loaded(skip_reason=f"only {num_frames} frame{'s' if num_frames != 1 else ''}{after}, shorter than every target_frames "
                                       f"{list(ds.target_frames)}")
        video_provenance = cache_files.latent_provenance(item.path, video.size, bucket, self.vae, num_frames, ds.source_fps,
                                                         whole=limit is None or num_frames < limit)
        for clip in clips:
            path = _writable(cache_files.latent_cache_path(ds.cache_directory, item.stem, bucket, clip))
            provenance = cache_files.clip_provenance(video_provenance, clip)
            if self._current(path, provenance, loaded.unrecorded):
                loaded.already_cached.append(path)
                if provenance[cache_files.WHOLE_VIDEO_KEY] == "true":
                    cache_files.record_whole_video(path)
            else:
                pixels = video.frames[clip.start:clip.start + clip.frames]
                loaded.items.append(LatentItem(item, pixels, bucket, bucket, clip, path, provenance))
        return loaded

    def _clips(self, num_frames: int) -> list[Clip]:
        """The video's clips, each once: `uniform` repeats a start on a short video (as musubi-tuner's extraction
        does), and a repeat is the same cache file encoded again."""
        ds: VideoDatasetConfig = self.dataset
        return list(dict.fromkeys(extract_clips(num_frames, ds.frame_extraction, ds.target_frames, frame_stride=ds.frame_stride,
                                                frame_sample=ds.frame_sample, max_frames=ds.max_frames)))

    def _cached_clips(self, item: SourceItem, unrecorded: set[Path]) -> list[Path]:
        """With --skip_existing: the caches of all clips if every one is cached and current, else [] (those that do not
        record all of what made them are added to `unrecorded`).

        Decodes only the first frame (for the bucket); the frame count comes from the metadata of the
        clip that starts at 0, which every video with clips has: the video's length when the cache says its decode
        reached the end (cache_files.WHOLE_VIDEO_KEY), or at least that many frames. A video that may hold more frames
        than the cache saw, and that this config may use, is decoded: the count was taken for the length, and a longer
        target_frames, another frame_extraction or a larger max_frames was "already cached" without its new clips
        (fuzz_av 1). Caches without our provenance (musubi-tuner's) are checked by decoding the video instead.
        """
        ds: VideoDatasetConfig = self.dataset
        size = media.video_size(item.path)
        bucket = self.selector.bucket_for(size)
        # every video with clips has one starting at 0: of the shortest target, or for `full` of unknown length
        full = ds.frame_extraction == "full"
        first_lengths = range(round_to_4n1(ds.max_frames), 0, -4) if full else ds.target_frames[:1]
        for length in first_lengths:
            probe = cache_files.latent_cache_path(ds.cache_directory, item.stem, bucket, Clip(0, length))
            if unwritable_name(probe) is None and probe.exists():  # (a name too long is an error to exists())
                break
        else:
            return []
        try:
            metadata = read_safetensors_header(probe)[1]
            num_frames = int(metadata["source_frames"])
        except (UserError, KeyError, ValueError):
            return []
        limit = decode_limit(ds.frame_extraction, ds.target_frames, ds.max_frames)
        if metadata.get(cache_files.WHOLE_VIDEO_KEY) == "true":
            frames_now = num_frames if limit is None else min(num_frames, limit)
        elif limit is not None and limit <= num_frames:
            frames_now = limit
        else:
            return []
        video_provenance = cache_files.latent_provenance(item.path, size, bucket, self.vae, num_frames, ds.source_fps)
        paths, partly = [], set()
        for clip in self._clips(frames_now):
            path = cache_files.latent_cache_path(ds.cache_directory, item.stem, bucket, clip)
            if (cache_files.cache_status(path, cache_files.clip_provenance(video_provenance, clip), unrecorded=partly) is not None
                    or cached_latent_shape(path, []) is None):  # (one training leaves out: fuzz_az 7)
                return []
            paths.append(path)
        unrecorded.update(partly)
        return paths


def _writable(cache: Path) -> Path:
    """`cache`, or the UserError that fails its item (before it is decoded) when no file can be written there: the
    source's name makes a cache name too long for the file system, or a folder stands there. Before, the first such
    item stopped the whole caching run."""
    problem = unwritable_name(cache)
    if problem:
        raise UserError(problem)
    return cache


def listed_items(dataset: AnyDatasetConfig, report: CacheReport) -> list[SourceItem]:
    """`list_items`, with what it leaves out counted and reported in `report`."""
    items, problems = list_items(dataset)
    report.listed += len(items) + len(problems)
    for path, reason in problems:
        report.skip(path, reason)
    return items


def iter_latent_batches(dataset: AnyDatasetConfig, report: CacheReport, *, num_workers: int = 1,
                        skip_existing: bool = False, vae: Mapping[str, str] | None = None, strict: bool = False,
                        items: Sequence[SourceItem] | None = None,
                        taken: Callable[[SourceItem], None] | None = None) -> Iterator[LatentBatch]:
    """Decode the dataset's items in `num_workers` threads and yield batches of one bucket (and clip length).

    A batch is yielded as soon as its group holds the dataset's batch_size items; the rest at the end.
    Results are taken in item order, so batches are the same on every run. With `skip_existing`,
    items whose caches are current (see cache_files.cache_status) are counted, not decoded again.
    `report` collects every cache path the items have, for stale_latent_caches once all are written. `taken` is
    called with each source file once the caller has asked for the batch after the last one holding its windows (its
    caches are written by then), or once it is read when it has none to write (failed, skipped, cached): the files
    are known before they are read, their windows only after (a progress bar of the windows had no total). It was
    called as each file was read, so the bar stood at 100% while the VAE encoded the groups left to the end (fuzz_au 8).
    """
    if items is None:
        items = listed_items(dataset, report)
    loader = _LatentLoader(dataset, vae, skip_existing)
    groups: dict[tuple[int, ...], list[LatentItem]] = {}
    unwritten: dict[int, int] = {}  # id(source item) -> its windows in batches not yet handed back

    done = taken or (lambda _: None)

    def handed_back(batch: LatentBatch) -> None:
        for latent_item in batch.items if taken is not None else ():
            unwritten[id(latent_item.source)] -= 1
            if not unwritten[id(latent_item.source)]:
                del unwritten[id(latent_item.source)]
                done(latent_item.source)

    for item, loaded in _map_in_threads(loader, items, num_workers):
        if isinstance(loaded, BaseException):
            report.fail(item.path, _failure_reason(item, loaded), strict)
            done(item)
            continue
        report.already_cached += len(loaded.already_cached)
        report.unrecorded += len(loaded.unrecorded)
        report.cache_paths.update(loaded.already_cached)
        report.cache_paths.update(latent_item.cache_path for latent_item in loaded.items)
        if loaded.skip_reason:  # read whole: shorter than every target_frames the config asks for now
            report.skip(item.path, loaded.skip_reason, superseded=True)
        if loaded.items:
            unwritten[id(item)] = len(loaded.items)
        else:
            done(item)
        for latent_item in loaded.items:
            key = latent_item.bucket + ((latent_item.clip.frames,) if latent_item.clip else ())
            group = groups.setdefault(key, [])
            group.append(latent_item)
            if len(group) == dataset.batch_size:
                batch = LatentBatch(key, groups.pop(key))
                yield batch
                handed_back(batch)
    for key in sorted(groups):
        batch = LatentBatch(key, groups[key])
        yield batch
        handed_back(batch)


def _failure_reason(item: SourceItem, error: BaseException) -> str:
    """Why `item` failed, for the report; a limit of the machine (no threads or memory left to decode) is raised instead:
    the item is not to blame, and every later one would fail alike (all the videos were 'not readable' and the run
    ended well)."""
    if isinstance(error, MachineLimit):
        raise error
    if isinstance(error, UserError):
        return str(error)
    logger.debug("unexpected error reading %s", item.path, exc_info=error)
    if isinstance(error, MemoryError) or "can't allocate memory" in str(error):  # (a MemoryError says nothing itself)
        return f"{item.path}: out of host memory while reading it"
    return f"{item.path}: {type(error).__name__}: {error}"


def _map_in_threads(function, items: Sequence, num_workers: int) -> Iterator[tuple[object, object]]:
    """(item, function(item) or the exception it raised), in item order, with at most 2 * num_workers in flight.

    The caller's work between results (the VAE) overlaps with the workers decoding the next items.
    """
    def guarded(item):
        try:
            return function(item)
        except Exception as e:  # reported per item by the caller
            return e

    if num_workers <= 0:
        for item in items:
            yield item, guarded(item)
        return
    window: collections.deque[tuple[object, Future]] = collections.deque()
    source = iter(items)
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="decode") as pool:
        try:
            for item in source:
                window.append((item, pool.submit(guarded, item)))
                if len(window) >= 2 * num_workers:
                    head, future = window.popleft()
                    yield head, future.result()
            while window:
                head, future = window.popleft()
                yield head, future.result()
        finally:
            for _, future in window:
                future.cancel()


# ------------------------------------------------------------------------------------------ caption items


@dataclass(frozen=True)
class CaptionItem:
    source: SourceItem
    caption: str
    cache_path: Path  # {cache_dir}/{stem}_hv_te.safetensors
    record: dict[str, str] | None = field(default=None, compare=False)  # which dataset made it (cache_files.dataset_record)


def caption_items(dataset: AnyDatasetConfig, report: CacheReport, *, strict: bool = False,
                  num_workers: int = 0) -> list[CaptionItem]:
    """Every item's caption and text cache path, in item order; unreadable captions are reported (or
    raised when `strict`). `num_workers` threads read the caption files (worth it on network drives)."""
    items = listed_items(dataset, report)
    what = "video" if dataset.is_video else "image"

    def read(item: SourceItem) -> str:
        if item.caption_file is None:  # a JSONL line's file: a typo is said here, not first by latent caching (an image
            # is a file; a video may be a folder of frames)
            (require_present if dataset.is_video else require_file)(item.path, what)
        return item.read_caption()

    result = []
    for item, caption in _map_in_threads(read, items, num_workers):
        if isinstance(caption, BaseException):
            report.fail(item.path, _failure_reason(item, caption), strict)
            continue
        cache = cache_files.text_cache_path(dataset.cache_directory, item.stem)
        # (judged by the longest name the item needs, its latent cache's: the two caching commands gave two "shorten by"
        # figures, and an item could get a text cache and never a latent one)
        longest = cache_files.latent_cache_path(dataset.cache_directory, item.stem, (9999, 9999),
                                                (0, 999) if dataset.is_video else None)
        problem = unwritable_name(longest) or unwritable_name(cache)
        if problem:
            report.fail(item.path, problem, strict)
            continue
        if not caption:  # legal (it trains the unconditional case), but usually a caption file saved empty by mistake
            logger.warning("%s: empty caption; %s is trained with an empty prompt", item.caption_file or item.path, item.path.name)
        result.append(CaptionItem(item, caption, cache, cache_files.dataset_record(dataset.source, dataset.cache_directory)))
    return result


def text_encoding_todo(items: Iterable[CaptionItem], encoder: str, *, skip_existing: bool,
                       model: Mapping[str, str] | None = None, unrecorded: set[Path] | None = None) -> list[CaptionItem]:
    """The items one text encoder ("llm" or "clipL") must encode.

    Without skip_existing: all. With it: those whose cache lacks this encoder's output, was made from
    another caption, or (when recorded) by another model or setting (`model`: cache_files.text_provenance; caches
    kept that do not record it are added to `unrecorded`).
    Call it for both encoders before running either pass: the first pass rewrites the file the second would look at.
    """
    items = list(items)
    if not skip_existing:
        return items
    todo = []
    for item in items:
        expected = {"caption1": item.caption, **(model or {})}
        if (cache_files.cache_status(item.cache_path, expected, required_prefixes=(f"{encoder}_",), unrecorded=unrecorded) is not None
                or _refused_by_training(item.cache_path)):
            todo.append(item)
    return todo


def _refused_by_training(text_cache: Path) -> bool:
    """A readable text cache holding both encoders' outputs that training leaves out (a tensor of an integer dtype, a
    dimension of 0, a mask of floats...): it was "already cached" for --skip_existing, and left out by every training
    (fuzz_ar 4). One lacking an output is an encoder's pass to make, not damage."""
    entries, _ = read_safetensors_header(text_cache)
    both = all(any(cache_files.logical_key(k) == e for k in entries) for e in cache_files.TEXT_ENCODERS)
    return both and text_cache_problem(text_cache, {}) is not None


def stale_latent_caches(dataset: AnyDatasetConfig, report: CacheReport) -> list[Path]:
    """Latent caches in the dataset's folder that are known to be superseded (after iter_latent_batches): of items
    whose caches are now other files (another bucket, other clips), or whose source is no longer listed.

    Caches of items that were only skipped this time (unreadable, no caption) are kept: a file that is
    briefly unreadable, or a typo in caption_extension, must not cost its caches. A dataset that lists no
    items at all (an empty or unmounted folder) deletes nothing.
    """
    if not _lists_anything(dataset, report):
        return []
    if dataset.source.is_dir() and (nested := _in_subfolders(dataset)):  # (skipped without a word: fuzz_am 6)
        logger.warning("%s: %s are not read: a folder is not searched below its own files, as in musubi-tuner; give "
                       "each subfolder its own [[datasets]] table", dataset.where, nested)
    return _own(dataset, cache_files.stale_caches(dataset.cache_directory, report.cache_paths, keep_stems=report.kept_stems))


def stale_text_caches(dataset: AnyDatasetConfig, captions: Iterable[CaptionItem], report: CacheReport) -> list[Path]:
    """Text caches in the dataset's folder that none of `captions` (from caption_items) has, under the same rules
    as stale_latent_caches."""
    if not _lists_anything(dataset, report):
        return []
    return _own(dataset, cache_files.stale_caches(dataset.cache_directory, [c.cache_path for c in captions], text=True,
                                                  keep_stems=report.kept_stems))


def _own(dataset: AnyDatasetConfig, stale: list[Path]) -> list[Path]:
    """`stale` without the caches another dataset made (two dataset configs sharing one cache folder), which are kept
    with a warning: deleting them lost the other config's caches, without a word."""
    other = cache_files.made_by_another_dataset(stale, dataset.source, dataset.cache_directory)
    there = {path: owner for path, owner in other.items() if os.path.lexists(os.path.join(dataset.cache_directory, owner))}
    if there:
        owners = sorted(set(there.values()))
        logger.warning("%s: %d cache(s) in %s were made by another dataset (of %s, from that folder), not by %s: kept; "
                       "training takes every cache of the folder, theirs too, so give each dataset config its own cache_directory",
                       dataset.where, len(there), dataset.cache_directory, ", ".join(owners[:2]) + (", ..." if len(owners) > 2 else ""),
                       dataset.source)
    if gone := sorted(set(other) - set(there)):  # (a renamed dataset folder's deleted items, said to be another dataset's
        owners = sorted({other[path] for path in gone})  # that no longer existed, with advice that could not help: fuzz_av 3)
        logger.warning("%s: %d cache(s) in %s were made by a dataset of %s (from that folder), which is not there now: kept, "
                       "in case it is a drive not mounted; training takes them too. If that was this dataset under its old "
                       "name, delete them: %s", dataset.where, len(gone), dataset.cache_directory,
                       ", ".join(owners[:2]) + (", ..." if len(owners) > 2 else ""),
                       ", ".join(p.name for p in gone[:3]) + (", ..." if len(gone) > 3 else ""))
    return [path for path in stale if path not in other]


def _lists_anything(dataset: AnyDatasetConfig, report: CacheReport) -> bool:
    if report.listed:
        return True
    kind = "videos" if dataset.is_video else "images"
    why = "empty, or a drive not mounted?"
    if dataset.source.is_dir():  # a folder of the other kind: the key is the wrong one
        others = (media.list_images if dataset.is_video else media.list_videos)(dataset.source)
        if others:
            other_key = "image_directory" if dataset.is_video else "video_directory"
            why = f"it holds {len(others)} {'images' if dataset.is_video else 'videos'}: list it as {other_key}"
        elif nested := _in_subfolders(dataset):  # (it was "empty, or a drive not mounted?": fuzz_am 6)
            why = (f"it holds {nested}, and a folder is not searched below its own files, as in musubi-tuner: give "
                   "each subfolder its own [[datasets]] table")
    logger.warning("%s: %s lists no %s (%s); no cache in %s is deleted", dataset.where, dataset.source, kind, why,
                   dataset.cache_directory)
    return False


def _in_subfolders(dataset: AnyDatasetConfig, most: int = 2000) -> str | None:
    """"12 images in 3 subfolder(s) (a, ...)" when the dataset's folder holds its kind of media below its own level
    (looking into `most` folders at most), else None."""
    lister = media.list_videos if dataset.is_video else media.list_images
    found, seen = {}, 0
    for folder, subfolders, _ in os.walk(dataset.source):
        subfolders.sort()
        seen += 1
        if Path(folder) != dataset.source and (listed := lister(Path(folder))):
            found[Path(folder)] = len(listed)
        if seen >= most:
            break
    if not found:
        return None
    first = next(iter(found))
    kind = "videos" if dataset.is_video else "images"
    return (f"{sum(found.values())} {kind} in {len(found)} subfolder(s) ({first.relative_to(dataset.source)}"
            + (", ...)" if len(found) > 1 else ")"))


def tidy_cache_directory(cache_dir: Path, stale: Iterable[Path], *, keep_cache: bool, text: bool = False) -> None:
    """Delete `stale` caches (with `keep_cache`, only say so) and, always, the temporary files that
    killed runs left in `cache_dir` (of latent caches, or of text caches with `text`)."""
    stale = list(stale)
    if not keep_cache:
        for path in list(stale):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # (the caches are written: a stale one that stays costs nothing but its room)
                logger.warning("%s: a cache of an item not in the dataset any more, not deleted (%s)", path, e.strerror or e)
                stale.remove(path)
    if stale:  # one line, not one per file (32,000 stale caches were a 32,000-line log: fuzz_am 5)
        names = ", ".join(p.name for p in stale[:3]) + (f", and {len(stale) - 3} more" if len(stale) > 3 else "")
        logger.info("%s %d cache(s) in %s of items not in the dataset any more%s: %s", "kept" if keep_cache else "deleted",
                    len(stale), cache_dir, " (--keep_cache)" if keep_cache else "", names)
    cache_files.leftover_temp_files(cache_dir, text=text, remove=True)


def chunks(items: Sequence, size: int | None) -> Iterator[list]:
    """Consecutive pieces of `size` items (all of them at once when size is None)."""
    items = list(items)
    size = size or max(1, len(items))
    for start in range(0, len(items), size):
        yield items[start:start + size]
