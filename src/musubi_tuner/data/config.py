"""The dataset config file (musubi-tuner's TOML, or the same structure as JSON), validated into typed objects.

A value is looked up, first found wins, in: the `[[datasets]]` table, `[general]`, the command line's
non-None flags of the same name (how `cache_latents.py --batch_size` reaches a dataset that sets
none, as in musubi-tuner), then the default. Every problem is a UserError that names the file, the
table and the key: `dataset.toml: [[datasets]][1].frame_extraction = "heads" is not one of ...`. A key that the
dataset's other settings do not read (frame_stride without "slide", ...: READ_ONLY_WITH) is accepted, as musubi-tuner
accepts it, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Union

from musubi_tuner.cli import MAX_PIXELS
from musubi_tuner.data import media
from musubi_tuner.data.buckets import RESOLUTION_STEP, floor_to
from musubi_tuner.data.frames import FRAME_EXTRACTIONS, normalize_target_frames
from musubi_tuner.errors import UserError, did_you_mean
from musubi_tuner.files import kind_of, read_small_file, require_file, unnamable, utf8_text, why_unreadable
from musubi_tuner.tomlio import load_toml, loads_json, loads_toml

logger = logging.getLogger(__name__)

TARGET_FPS = 24.0  # HunyuanVideo's frame rate; source_fps decimates to it


# ------------------------------------------------------------------------------------------ typed configs


@dataclass(frozen=True)
class DatasetConfig:
    """What image and video datasets share. Sizes are (width, height)."""

    index: int
    where: str  # "dataset.toml: [[datasets]][1]", the prefix of every message about this dataset
    resolution: tuple[int, int]
    caption_extension: str | None
    batch_size: int
    num_repeats: int
    enable_bucket: bool
    bucket_no_upscale: bool
    cache_directory: Path
    ignored_keys: tuple[str, ...] = ()
    validation_split: float = 0.0  # fraction of the items held out for validation (training datasets)
    role: str = "train"  # "train": [[datasets]]; "validation": [[validation_datasets]], every item held out

    is_video: ClassVar[bool] = False

    @property
    def source(self) -> Path:
        """The folder or JSONL file the items come from."""
        raise NotImplementedError

    @property
    def source_key(self) -> str:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """The dataset's entry of `ss_datasets` in LoRA metadata (musubi-tuner's keys)."""
        return {
            "resolution": list(self.resolution), "caption_extension": self.caption_extension,
            "batch_size_per_device": self.batch_size, "num_repeats": self.num_repeats,
            "enable_bucket": self.enable_bucket, "bucket_no_upscale": self.bucket_no_upscale,
            self.source_key: utf8_text(self.source.name), "has_control": False,  # (LoRA metadata: see utf8_text)
        }


@dataclass(frozen=True)
class ImageDatasetConfig(DatasetConfig):
    image_directory: Path | None = None
    image_jsonl_file: Path | None = None

    @property
    def source(self) -> Path:
        return self.image_directory if self.image_directory is not None else self.image_jsonl_file

    @property
    def source_key(self) -> str:
        return "image_directory" if self.image_directory is not None else "image_jsonl_file"


@dataclass(frozen=True)
class VideoDatasetConfig(DatasetConfig):
    video_directory: Path | None = None
    video_jsonl_file: Path | None = None
    target_frames: tuple[int, ...] = (1,)  # 4N+1, sorted, unique
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None

    is_video: ClassVar[bool] = True

    @property
    def source(self) -> Path:
        return self.video_directory if self.video_directory is not None else self.video_jsonl_file

    @property
    def source_key(self) -> str:
        return "video_directory" if self.video_directory is not None else "video_jsonl_file"

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "frame_extraction": self.frame_extraction, "frame_stride": self.frame_stride,
                "frame_sample": self.frame_sample, "target_frames": list(self.target_frames),
                "max_frames": self.max_frames, "source_fps": self.source_fps}


AnyDatasetConfig = Union[ImageDatasetConfig, VideoDatasetConfig]


@dataclass(frozen=True)
class DatasetGroupConfig:
    path: Path
    datasets: tuple[AnyDatasetConfig, ...] = field(default_factory=tuple)
    validation_datasets: tuple[AnyDatasetConfig, ...] = field(default_factory=tuple)

    @property
    def all_datasets(self) -> tuple[AnyDatasetConfig, ...]:
        """Training and validation datasets: what the caching commands encode."""
        return self.datasets + self.validation_datasets

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_datasets) or any(d.validation_split > 0 for d in self.datasets)

    @property
    def image_datasets(self) -> tuple[ImageDatasetConfig, ...]:
        return tuple(d for d in self.datasets if not d.is_video)

    @property
    def video_datasets(self) -> tuple[VideoDatasetConfig, ...]:
        return tuple(d for d in self.datasets if d.is_video)


# ------------------------------------------------------------------------------------------ value checks

Check = Callable[[Any, str], Any]  # (value, "where.key = value") -> converted value, or raises UserError


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML: strings quoted, booleans lower-case."""
    return json.dumps(value) if isinstance(value, (str, bool, list, tuple, dict)) or value is None else repr(value)


def _positive_int(minimum: int = 1, maximum: int | None = None, why: str = "") -> Check:
    def check(value: Any, at: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{at} is not an integer")
        if value < minimum:
            raise UserError(f"{at} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise UserError(f"{at} is too large: at most {maximum:,}{why}")
        return value
    return check


def _bool(value: Any, at: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{at} is not true or false")
    return value


def _str(value: Any, at: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{at} is not a string (put it in quotes)")
    return value


def _path(value: Any, at: str) -> str:
    if not _str(value, at).strip():
        raise UserError(f"{at} is empty")
    return value


def _fps(value: Any, at: str) -> float:
    # musubi-tuner only accepts a TOML float (30.0); 30 means the same, so we take it too
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{at} is not a number")
    if not 0 < value < math.inf:
        raise UserError(f"{at} must be a finite number greater than 0")
    return float(value)


def _int_list(value: Any, at: str) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise UserError(f"{at} is not a list of frame counts like [1, 25, 45]")
    return tuple(_positive_int(1)(v, at) for v in values)


def _resolution(value: Any, at: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise UserError(f"{at} is not [width, height] or a single number")
    sides = tuple(_positive_int(RESOLUTION_STEP)(v, at) for v in value)
    if max(sides) > MAX_RESOLUTION:  # with buckets, every image is scaled to this area: a typo here ran out of host memory
        raise UserError(f"{at}: each side at most {MAX_RESOLUTION} pixels (HunyuanVideo trains at 544x960 "
                        "to 720x1280)")
    return sides


MAX_RESOLUTION = MAX_PIXELS  # a side of a dataset's resolution: the generation command's bound


def _extraction(value: Any, at: str) -> str:
    if _str(value, at) not in FRAME_EXTRACTIONS:
        raise UserError(f"{at} is not one of {', '.join(FRAME_EXTRACTIONS)}{did_you_mean(value, FRAME_EXTRACTIONS)}")
    return value


def _file_extension(value: Any, at: str) -> str:
    """caption_extension: appended to an item's file name without its extension (cat.png -> "cat" + ".txt"), so it must
    stay in that folder, and hold a dot: "txt" names the caption cattxt, in musubi-tuner too, which then finds none."""
    if any(c in value for c in ("/", "\\", "\0")):
        raise UserError(f"{at} must be a file extension such as \".txt\" (no /, \\ or NUL): the caption sits beside "
                        f"its image or video")
    why = unnamable(value)
    if why:
        raise UserError(f"{at} {why}")
    if "." not in value or value != value.strip():
        fixed = value.strip() if "." in value else "." + (value.strip() or "txt")
        problem = "has no dot" if "." not in value else "has spaces around it"
        raise UserError(f"{at} {problem}: the caption of cat.png is \"cat\" + caption_extension; "
                        f"write {json.dumps(fixed)}")
    return value


def _anything(value: Any, at: str) -> Any:
    return value


def _fraction(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{at} is not a number")
    if not 0 <= value < 1:
        raise UserError(f"{at} must be at least 0 and less than 1 (e.g. 0.1 holds out a tenth of the items)")
    return float(value)


# Each repeat of an item is one sample of the epoch, and the epoch's plan holds every sample in host memory (about 300
# bytes each): 10,000 repeats of 1,000 items is already 3 GB, and 10**17 ran out of memory. An epoch that long is never
# needed: epochs only pace saving and sampling, and --max_train_steps / --max_train_epochs set how long a run trains.
MAX_NUM_REPEATS = 10_000
MAX_FRAME_SAMPLE = 10_000  # "uniform" clips per video and length: np.linspace of 1e9 starts took 11 GB and minutes

# Keys that [general] may set for every dataset.
SHARED_KEYS: dict[str, Check] = {
    "resolution": _resolution, "caption_extension": _str, "batch_size": _positive_int(1),
    "num_repeats": _positive_int(1, MAX_NUM_REPEATS, " (every repeat is held in memory for the epoch's plan); to train longer, "
                                                     "set --max_train_steps or --max_train_epochs"),
    "enable_bucket": _bool, "bucket_no_upscale": _bool, "validation_split": _fraction,
}
# Rules a key's value must meet beyond its type (kept apart from the tables above, whose checks name the value's kind).
FURTHER_CHECKS: dict[str, Check] = {"caption_extension": _file_extension}
IMAGE_KEYS: dict[str, Check] = {"image_directory": _path, "image_jsonl_file": _path, "cache_directory": _path}
VIDEO_KEYS: dict[str, Check] = {
    "video_directory": _path, "video_jsonl_file": _path, "cache_directory": _path, "target_frames": _int_list,
    "frame_extraction": _extraction, "frame_stride": _positive_int(1), "frame_sample": _positive_int(1, MAX_FRAME_SAMPLE, " (clips per video and length, each a latent cache)"),
    "max_frames": _positive_int(1), "source_fps": _fps,
}
# Accepted because musubi-tuner's schema accepts them, used by its other architectures, ignored here.
IGNORED_IMAGE_KEYS: dict[str, Check] = {
    "control_directory": _str, "multiple_target": _bool, "fp_latent_window_size": _positive_int(1),
    "fp_1f_clean_indices": _anything, "fp_1f_target_index": _anything, "fp_1f_no_post": _bool,
    "no_resize_control": _bool, "control_resolution": _resolution,
    "flux_kontext_no_resize_control": _bool, "qwen_image_edit_no_resize_control": _bool,
    "qwen_image_edit_control_resolution": _resolution,
}
IGNORED_VIDEO_KEYS: dict[str, Check] = {"control_directory": _str, "fp_latent_window_size": _positive_int(1)}

DEFAULTS: dict[str, Any] = {
    "resolution": (960, 544), "caption_extension": None, "batch_size": 1, "num_repeats": 1, "enable_bucket": False,
    "bucket_no_upscale": False, "cache_directory": None, "target_frames": (1,), "frame_extraction": "head",
    "frame_stride": 1, "frame_sample": 1, "max_frames": 129, "source_fps": None, "validation_split": 0.0,
}
ALL_KEYS = sorted({*SHARED_KEYS, *IMAGE_KEYS, *VIDEO_KEYS, *IGNORED_IMAGE_KEYS, *IGNORED_VIDEO_KEYS})

# Which frame_extraction reads which key (musubi-tuner's modes, data/frames.py), and the clips each mode takes.
EXTRACTION_KEYS: dict[str, tuple[str, ...]] = {
    "target_frames": ("head", "chunk", "slide", "uniform"), "frame_stride": ("slide",), "frame_sample": ("uniform",),
    "max_frames": ("full",),
}
EXTRACTION_CLIPS: dict[str, str] = {
    "head": "one clip of each target_frames length from the first frame", "chunk": "back-to-back clips",
    "slide": "a clip every frame_stride = {frame_stride} frames",
    "uniform": "frame_sample = {frame_sample} clips per length, spread evenly",
    "full": "the whole video, at most max_frames = {max_frames} frames",
}


class ReadOnlyWith(NamedTuple):
    """A key that only some datasets read: which (`reads`), said as `used`, and what a dataset does without it."""

    reads: Callable[[AnyDatasetConfig], bool]
    used: str  # "with enable_bucket = true only"
    instead: Callable[[AnyDatasetConfig], str]


def _extraction_rule(key: str) -> ReadOnlyWith:
    modes = EXTRACTION_KEYS[key]
    named = " or ".join(", ".join(json.dumps(m) for m in modes).rsplit(", ", 1))  # "head", "chunk" or "slide"
    return ReadOnlyWith(lambda ds: ds.frame_extraction in modes, f"with frame_extraction = {named} only",
                        lambda ds: f"frame_extraction = {json.dumps(ds.frame_extraction)} takes "
                                   + EXTRACTION_CLIPS[ds.frame_extraction].format(**ds.metadata()))


# A key set (to other than its default) where its dataset does not read it is accepted, as musubi-tuner does, with a
# warning: `frame_stride = 10` with "head" takes other clips than the writer meant. A [[datasets]] table's own key is
# named for that dataset; a [general] key only when no dataset that inherits it reads it (a [general] value shared by
# datasets that need it and datasets that do not is normal).
READ_ONLY_WITH: dict[str, ReadOnlyWith] = {
    **{key: _extraction_rule(key) for key in EXTRACTION_KEYS},
    "bucket_no_upscale": ReadOnlyWith(lambda ds: ds.enable_bucket, "with enable_bucket = true only",
                                      lambda ds: f"without buckets every item is scaled and cropped to resolution = "
                                                 f"{list(ds.resolution)}"),
    "num_repeats": ReadOnlyWith(lambda ds: ds.role == "train", "by [[datasets]] only",
                                lambda ds: "a validation dataset uses each item once"),
    "caption_extension": ReadOnlyWith(lambda ds: ds.source_key.endswith("_directory"),
                                      "with image_directory or video_directory only",
                                      lambda ds: f"each line of {ds.source_key} holds its \"caption\""),
}


def _checked(checks: Mapping[str, Check], key: str, value: Any, at: str) -> Any:
    """`value` of `key` through its table's check, then through FURTHER_CHECKS."""
    value = checks[key](value, at)
    return FURTHER_CHECKS[key](value, at) if key in FURTHER_CHECKS else value


# ------------------------------------------------------------------------------------------ loading


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw table of a .toml or .json dataset config; syntax errors name the file and the line."""
    path = require_file(path, "dataset config")  # (not a FIFO, /dev/zero or a socket: named as what they are)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return _table(load_toml(path, "dataset config"), path)
    if suffix != ".json":
        raise UserError(f"{path}: a dataset config must end in .toml or .json")
    try:
        raw = loads_json(read_small_file(path, "dataset config").decode("utf-8-sig"))  # (a byte-order mark, as TOML reads one)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:  # every problem loads_json has: syntax, a key given twice, a huge integer, deep nesting
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return _table(raw, path)


def _table(raw: Any, path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a table with [general] and [[datasets]]")
    return raw


def load_dataset_config(path: str | os.PathLike, args: Any = None, *, check_sources: bool = True,
                        text: str | None = None) -> DatasetGroupConfig:
    """Read and validate a dataset config.

    `args`: an argparse Namespace or a mapping whose non-None values named like dataset keys fill
    in what neither the dataset nor [general] sets. `check_sources=False` (training, which reads
    caches only) skips checking that image/video folders and JSONL files exist. `text`: TOML checked as
    the file `path` would be (relative paths against its folder), before that file is written.
    """
    path = Path(path)
    raw = read_config_file(path) if text is None else _table(loads_toml(text, path), path)
    top_level = ("general", "datasets", "validation_datasets")
    for key in raw:
        if key not in top_level:
            raise UserError(f"{path}: unknown top-level key {key!r}; a dataset config holds [general], [[datasets]] and "
                            f"optionally [[validation_datasets]]{did_you_mean(key, top_level)}")
    _name_unknown_keys(raw, path)
    general = _general_table(raw.get("general", {}), path)
    fallback = _command_line_values(args)
    groups = {}
    for name in ("datasets", "validation_datasets"):
        tables = raw.get(name, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UserError(f"{path}: `{name}` must be an array of tables ([[{name}]])")
        groups[name] = tuple(_dataset(i, table, general, fallback, path, check_sources, name) for i, table in enumerate(tables))
    if not groups["datasets"]:
        raise UserError(f"{path}: no [[datasets]] defined")
    _warn_unread_general_keys(raw, general, groups, path)
    _require_distinct_cache_directories(groups["datasets"] + groups["validation_datasets"], path)
    _warn_of_validation_on_training_items(groups["datasets"], groups["validation_datasets"], path)
    return DatasetGroupConfig(path, groups["datasets"], groups["validation_datasets"])


def _name_unknown_keys(raw: dict, path: Path) -> None:
    """A misspelt key anywhere in the file is named (with the closest valid one) before any other problem: the other
    problem is often its consequence (a misspelt video_directory reads as "no source folder")."""
    general = raw.get("general")
    if isinstance(general, dict):
        for key in general:
            if key not in ALL_KEYS:
                raise UserError(f"{path}: [general].{key} is not a dataset key{did_you_mean(key, SHARED_KEYS)}")
    for name in ("datasets", "validation_datasets"):
        tables = raw.get(name)
        for index, table in enumerate(tables if isinstance(tables, list) else []):
            if isinstance(table, dict):
                unknown = [key for key in table if key not in ALL_KEYS]
                if unknown:
                    raise UserError(_unknown_key_message(f"{path}: [[{name}]][{index}]", unknown[0], _kind_of_table(table)))


def _warn_unread_general_keys(raw: dict, general: dict, groups: dict[str, tuple[AnyDatasetConfig, ...]],
                              path: Path) -> None:
    """A [general] key (of READ_ONLY_WITH) that no dataset inheriting it reads: said once."""
    for key, rule in READ_ONLY_WITH.items():
        if key not in general or general[key] == DEFAULTS[key]:
            continue
        heirs = [ds for name, datasets in groups.items() for table, ds in zip(raw.get(name, []), datasets)
                 if key not in table]
        if heirs and not any(rule.reads(ds) for ds in heirs):
            logger.warning("%s: [general].%s = %s is used %s; no dataset that takes it from [general] uses it",
                           path, key, _show(raw["general"][key]), rule.used)


def _general_table(table: Any, path: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UserError(f"{path}: [general] must be a table")
    checked = {}
    for key, value in table.items():
        at = f"{path}: [general].{key} = {_show(value)}"
        if key in SHARED_KEYS:
            checked[key] = _checked(SHARED_KEYS, key, value, at)
        elif key in ALL_KEYS:
            raise UserError(f"{path}: [general].{key} must be set in each [[datasets]] table, not in [general]")
        else:
            raise UserError(f"{path}: [general].{key} is not a dataset key{did_you_mean(key, SHARED_KEYS)}")
    return checked


def _command_line_values(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    values = args if isinstance(args, Mapping) else vars(args)
    return {k: v for k, v in values.items() if v is not None and k in DEFAULTS}


def _dataset(index: int, table: dict, general: dict, fallback: dict, path: Path, check_sources: bool,
             group: str = "datasets") -> AnyDatasetConfig:
    where = f"{path}: [[{group}]][{index}]"
    if group == "validation_datasets" and "validation_split" in table:
        raise UserError(f"{where}.validation_split: a validation dataset is held out whole; set validation_split in [[datasets]]")
    is_video = _is_video_table(table, where)
    keys, ignored_keys = (VIDEO_KEYS, IGNORED_VIDEO_KEYS) if is_video else (IMAGE_KEYS, IGNORED_IMAGE_KEYS)
    own, ignored = {}, []
    for key, value in table.items():
        at = f"{where}.{key} = {_show(value)}"
        if key in SHARED_KEYS or key in keys:
            own[key] = _checked(SHARED_KEYS if key in SHARED_KEYS else keys, key, value, at)
        elif key in ignored_keys:
            ignored_keys[key](value, at)
            ignored.append(key)
        else:
            raise UserError(_unknown_key_message(where, key, is_video))  # a key of the other kind
    if ignored:
        logger.info("%s: %s used by other architectures, ignored for HunyuanVideo", where, ", ".join(ignored))

    def value(key: str) -> Any:
        for source in (own, general):
            if source.get(key) is not None:
                return source[key]
        if key in fallback:
            return _checked(SHARED_KEYS if key in SHARED_KEYS else keys, key, fallback[key],
                            f"command line --{key} = {fallback[key]!r}")
        return DEFAULTS[key]

    common = _common_values(where, value, own, is_video, path, check_sources)
    if group == "validation_datasets":  # every item once; [general].validation_split is for the training datasets
        common.update(role="validation", num_repeats=1, validation_split=0.0)
    else:
        common["validation_split"] = value("validation_split")
    if is_video:
        config = VideoDatasetConfig(index=index, where=where, ignored_keys=tuple(ignored), **common,
                                    **_video_values(where, value))
    else:
        config = ImageDatasetConfig(index=index, where=where, ignored_keys=tuple(ignored), **common)
    for key, rule in READ_ONLY_WITH.items():
        if key in own and own[key] != DEFAULTS[key] and not rule.reads(config):
            logger.warning("%s.%s = %s is used %s; ignored here: %s", where, key, _show(table[key]), rule.used,
                           rule.instead(config))
    return config


def _is_video_table(table: dict, where: str) -> bool:
    image = [k for k in ("image_directory", "image_jsonl_file") if k in table]
    video = [k for k in ("video_directory", "video_jsonl_file") if k in table]
    if image and video:
        raise UserError(f"{where} has both {image[0]} and {video[0]}; a dataset holds images or videos, split it in two")
    if not image and not video:
        raise UserError(f"{where} needs one of image_directory, image_jsonl_file, video_directory, video_jsonl_file")
    return bool(video)


def _kind_of_table(table: dict) -> bool | None:
    """True for a video table, False for an image table, None while no source key says which."""
    if any(k in table for k in ("video_directory", "video_jsonl_file")):
        return True
    if any(k in table for k in ("image_directory", "image_jsonl_file")):
        return False
    return None


def _unknown_key_message(where: str, key: str, is_video: bool | None) -> str:
    if is_video is None:
        return f"{where}.{key} is not a dataset key{did_you_mean(key, [*SHARED_KEYS, *IMAGE_KEYS, *VIDEO_KEYS])}"
    kind, other = ("video", "image") if is_video else ("image", "video")
    other_keys = IMAGE_KEYS if is_video else VIDEO_KEYS
    if key in other_keys:
        return f"{where}.{key} applies to {other} datasets only; this is a {kind} dataset"
    own = [*SHARED_KEYS, *(VIDEO_KEYS if is_video else IMAGE_KEYS)]
    return f"{where}.{key} is not {'a video' if is_video else 'an image'} dataset key{did_you_mean(key, own)}"


def _common_values(where: str, value: Callable[[str], Any], own: dict, is_video: bool, path: Path,
                   check_sources: bool) -> dict[str, Any]:
    kind = "video" if is_video else "image"
    directory_key, jsonl_key = f"{kind}_directory", f"{kind}_jsonl_file"
    if directory_key in own and jsonl_key in own:
        logger.warning("%s sets both %s and %s; using %s as musubi-tuner does", where, directory_key, jsonl_key,
                       directory_key)
    source_key = directory_key if directory_key in own else jsonl_key
    source = _resolve(own[source_key], path, f"{where}.{source_key} = {_show(own[source_key])}")
    if check_sources:
        _check_source(source, source_key, own[source_key], where, is_directory=source_key == directory_key, config_path=path)
    if source_key == directory_key and value("caption_extension") is None:
        raise UserError(f"{where}: caption_extension is required with {directory_key} "
                        f"(set caption_extension = \".txt\" here or in [general])")
    media_extensions = media.VIDEO_EXTENSIONS if is_video else media.IMAGE_EXTENSIONS
    if source_key == directory_key and value("caption_extension").lower() in media_extensions:
        raise UserError(f"{where}: caption_extension = {_show(value('caption_extension'))} is the extension of the "
                        f"{kind}s in {directory_key}, so each {kind} would be read as its own caption; captions need "
                        f"files of their own, such as \".txt\"")
    cache_directory = value("cache_directory")
    if cache_directory is None:
        if source_key == jsonl_key:
            raise UserError(f"{where}: cache_directory is required with {jsonl_key}")
        cache = source
    else:
        cache = _resolve_cache(cache_directory, path, f"{where}.cache_directory = {_show(cache_directory)}",
                               _anchor(own[source_key], source, path), source_key)
    cache = Path(os.path.abspath(cache))  # (named in full in every message: which folder the caches are in)
    enable_bucket = value("enable_bucket")
    resolution = value("resolution")
    # the table that gives the resolution: a [general] one was blamed on [[datasets]][0] (fuzz_al 3)
    at = f"{where}.resolution" if "resolution" in own else f"{path}: [general].resolution (for {_table_name(where, path)})"
    smallest_area = (2 * RESOLUTION_STEP) ** 2  # buckets range from half the side to the side, in steps of 16
    if enable_bucket and resolution[0] * resolution[1] < smallest_area:
        raise UserError(f"{at} = {list(resolution)} is too small for enable_bucket: the area must be at least "
                        f"{2 * RESOLUTION_STEP}x{2 * RESOLUTION_STEP} (two bucket steps of {RESOLUTION_STEP} per side)")
    if not enable_bucket and any(r % RESOLUTION_STEP for r in resolution):
        fixed = [floor_to(r) for r in resolution]
        raise UserError(f"{at} = {list(resolution)} must be multiples of {RESOLUTION_STEP} when "
                        f"enable_bucket is false (try {fixed})")
    return {
        "resolution": resolution, "caption_extension": value("caption_extension"), "batch_size": value("batch_size"),
        "num_repeats": value("num_repeats"), "enable_bucket": enable_bucket,
        "bucket_no_upscale": bool(enable_bucket and value("bucket_no_upscale")),
        "cache_directory": cache, source_key: source,
    }


def _video_values(where: str, value: Callable[[str], Any]) -> dict[str, Any]:
    requested = value("target_frames")
    target_frames = normalize_target_frames(requested)
    changed = [f for f in requested if (f - 1) % 4]
    if changed:
        rounded = ", ".join(f"{f} -> {(f - 1) // 4 * 4 + 1}" for f in changed)
        logger.warning("%s.target_frames: %s not 4N+1, rounded down (%s; the next 4N+1 keeps one more latent frame)",
                       where, "are" if len(changed) > 1 else "is", rounded)
    extraction, frame_sample = value("frame_extraction"), value("frame_sample")
    if extraction == "uniform" and frame_sample == 1:
        logger.warning("%s: frame_extraction = \"uniform\" with frame_sample = 1 is the same as \"head\"; using head", where)
        extraction = "head"
    max_frames = value("max_frames")
    if extraction == "full" and (max_frames - 1) % 4:  # (said of target_frames alone: a max_frames of 2 to 4 cached still
        logger.warning("%s.max_frames: %d is not 4N+1: a video's clip is at most %d frame%s (the next 4N+1, %d, keeps "  # images
                       "one more latent frame)", where, max_frames, (max_frames - 1) // 4 * 4 + 1,  # without a word: fuzz_av 5)
                       "" if max_frames < 5 else "s", (max_frames - 1) // 4 * 4 + 5)
    return {"target_frames": target_frames, "frame_extraction": extraction, "frame_stride": value("frame_stride"),
            "frame_sample": frame_sample, "max_frames": max_frames, "source_fps": value("source_fps")}


def _resolve(value: str, config_path: Path, at: str) -> Path:
    """A path from the config: as written (relative to the current folder, as in musubi-tuner), or,
    when only that exists, relative to the config file's folder."""
    path = _expanded(value, at)
    if path.is_absolute() or path.exists():
        return path
    beside = config_path.parent / path
    return beside if beside.exists() else path


def _expanded(value: str, at: str) -> Path:
    from musubi_tuner.files import expanded_path

    return expanded_path(value, at)


def _anchor(written: str, resolved: Path, config_path: Path) -> bool | None:
    """Where a relative source path was found: True beside the config, False in the current folder, None if absolute
    or found nowhere (training from caches only, the source folder gone)."""
    if Path(written).is_absolute() or written.startswith("~") or not resolved.exists():
        return None
    return resolved == config_path.parent / Path(written)  # (and not the current folder's, which wins when both exist)


def _resolve_cache(value: str, config_path: Path, at: str, anchor: bool | None, source_key: str) -> Path:
    """A relative cache_directory, which often does not exist yet, goes where its dataset's source was found (beside
    the config, or in the current folder): resolved by _resolve alone, it followed the current folder until the
    first run created it beside the config, and commands run from two folders split one dataset's caches in two."""
    path = _expanded(value, at)
    if anchor is None or path.is_absolute():
        resolved = _resolve(value, config_path, at)
        if resolved == path and not path.is_absolute() and not path.exists() and not _same_folder(config_path.parent, Path.cwd()):
            # (musubi-tuner's rule, relative to the current folder: run from another folder, a command finds none)
            logger.warning("%s: relative to the folder this command runs from, so the caches go to %s (not there yet); run "
                           "from another folder, a command uses that folder's %s instead. Write an absolute cache_directory to "
                           "keep them in one place", at, os.path.abspath(path), value)
        return resolved
    chosen, other = (config_path.parent / path, path) if anchor else (path, config_path.parent / path)
    if other.is_dir() and not (chosen.exists() and os.path.samefile(other, chosen)):
        logger.warning("%s: using %s (where %s was found); %s is not used", at, os.path.abspath(chosen), source_key,
                       os.path.abspath(other))
    return chosen


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_source(path: Path, key: str, written: str, where: str, *, is_directory: bool, config_path: Path | None = None) -> None:
    at = f"{where}.{key} = {_show(written)}"
    try:
        os.stat(path)
    except (OSError, ValueError) as e:  # (ValueError: a NUL in the name)
        why = why_unreadable(path, "folder" if is_directory else "file", e) if isinstance(e, OSError) else "not found"
        if why.endswith("not found") and not path.is_absolute() and config_path is not None:  # (where it was looked for: a
            # command run from another folder than the config's named none: fuzz_ah 9c)
            why += (f" (a relative path: looked for in the folder this command runs from, {os.getcwd()}, and beside the "
                    f"config, {config_path.parent.absolute()})")
        raise UserError(f"{at}: {why}") from None
    if is_directory and not path.is_dir():  # (a FIFO was "a file": fuzz_ag 8b)
        raise UserError(f"{at}: is {kind_of(os.stat(path).st_mode)}, expected a folder")
    if not is_directory and path.is_dir():
        raise UserError(f"{at}: is a folder, expected a .jsonl file")


def _table_name(where: str, path: Path) -> str:
    """"[[datasets]][1]": a dataset's `where` ("dataset.toml: [[datasets]][1]") without its file."""
    return where[len(f"{path}: "):]


def _warn_of_validation_on_training_items(training: tuple[AnyDatasetConfig, ...], validation: tuple[AnyDatasetConfig, ...],
                                          path: Path) -> None:
    """A [[validation_datasets]] table whose folder or JSONL file is a training dataset's: its "held-out" items are
    trained on, so its loss measures the training items (accepted without a word: fuzz_ak 3)."""
    for held_out in validation:
        same = [ds for ds in training if os.path.realpath(ds.source) == os.path.realpath(held_out.source)]
        if same:
            table, other = _table_name(held_out.where, path), _table_name(same[0].where, path)
            logger.warning("%s: %s's %s %s is also %s's: its items are trained on, so its validation loss measures training "
                           "items, not held-out ones; hold items out with validation_split, or give it a folder of other items",
                           path, table, held_out.source_key, held_out.source, other)


def _require_distinct_cache_directories(datasets: tuple[AnyDatasetConfig, ...], path: Path) -> None:
    seen: dict[str, str] = {}
    for ds in datasets:
        key = os.path.normcase(os.path.realpath(ds.cache_directory))  # (two names of one folder through a link, too)
        table = _table_name(ds.where, path)
        if key in seen:
            linked = "" if key == os.path.normcase(os.path.abspath(ds.cache_directory)) else f", which is {key}"
            raise UserError(f"{path}: {seen[key]} and {table} share the cache folder {ds.cache_directory}{linked}; give each "
                            f"dataset its own cache_directory (it defaults to the image/video folder)")
        seen[key] = table
