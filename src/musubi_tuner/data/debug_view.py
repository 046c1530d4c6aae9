"""`cache_latents.py --debug_mode`: look at what would be encoded (buckets, crops, extracted clips) instead of caching.

video: writes each item as an .mp4 (clips) or .jpg (images) beside its would-be cache file;
console: draws each item's first frame in the terminal; image: opens it in the system's image viewer.
Nothing is cached and nothing is deleted.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from musubi_tuner.data.items import CacheReport, _naming, iter_latent_batches
from musubi_tuner.errors import UserError
from musubi_tuner.files import atomic_write, remove_leftover_temp_files

_RAMP = " .:-=+*#%@"
# --console_back: the background colours musubi-tuner takes (ascii_magic's Back names) -> ANSI codes
BACKGROUNDS = {"black": 40, "red": 41, "green": 42, "yellow": 43, "blue": 44, "magenta": 45, "cyan": 46, "white": 47}


def background_code(name: str | None) -> int | None:
    if name is None:
        return None
    if name.lower() not in BACKGROUNDS:
        raise UserError(f"--console_back {name}: one of {', '.join(BACKGROUNDS)}")
    return BACKGROUNDS[name.lower()]


def ascii_art(frame: np.ndarray, width: int = 80, color: bool = True, back: int | None = None) -> str:
    """(H, W, 3) uint8 -> lines of characters (and ANSI colours, on background `back`), `width` columns, aspect kept
    (cells are ~2:1)."""
    h, w = frame.shape[:2]
    rows = max(1, round(h / w * width / 2))
    small = np.asarray(Image.fromarray(frame).resize((width, rows), Image.BOX)).astype(np.int32)
    lum = (small @ np.array([299, 587, 114]) // 1000).clip(0, 255)
    lines = []
    for y in range(rows):
        chars = []
        for x in range(width):
            ch = _RAMP[lum[y, x] * (len(_RAMP) - 1) // 255]
            if color:
                r, g, b = small[y, x]
                ch = f"\x1b[38;2;{r};{g};{b}m{ch}"
            chars.append(ch)
        start = f"\x1b[{back}m" if back is not None else ""
        lines.append(start + "".join(chars) + ("\x1b[0m" if color or back is not None else ""))
    return "\n".join(lines)


PREVIEW_FOLDER = "debug_mode"  # --debug_mode video writes into this folder of each dataset's cache folder


def show_dataset(config, args) -> None:
    from musubi_tuner.data.media import write_video

    if args.debug_mode == "image" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.name == "nt"):
        raise UserError("--debug_mode image needs a display (none found here); use --debug_mode video (writes files) or console")
    back = background_code(args.console_back)
    cleaned = set()
    for dataset in config.all_datasets:
        report = CacheReport()
        shown = 0
        for batch in iter_latent_batches(dataset, report, num_workers=1):
            for item in batch.items:
                if args.console_num_images is not None and shown >= args.console_num_images:
                    break
                label = f"{item.source.path} -> bucket {item.bucket[0]}x{item.bucket[1]}" + (
                    f", frames {item.clip.start}..{item.clip.start + item.clip.frames - 1}" if item.clip else "")
                if args.debug_mode == "video":
                    # in a folder of their own: the cache folder is often the image/video folder, whose next caching
                    # would take previews beside the sources for items (a listing never looks into subfolders)
                    folder = item.cache_path.parent / PREVIEW_FOLDER
                    folder.mkdir(parents=True, exist_ok=True)
                    if folder not in cleaned:
                        remove_leftover_temp_files(folder, lambda name: name.endswith((".mp4", ".jpg")))  # a killed run's previews
                        cleaned.add(folder)
                    stem = str(folder / item.cache_path.name.removesuffix(".safetensors"))
                    if item.clip is not None:
                        write_video(f"{stem}.mp4", item.pixels, fps=24, bitrate=1_000_000)
                    else:
                        with atomic_write(f"{stem}.jpg") as tmp:
                            Image.fromarray(item.pixels[0]).save(tmp, format="JPEG", quality=95)
                    print(f"{label}: wrote {stem}{'.mp4' if item.clip is not None else '.jpg'}")
                elif args.debug_mode == "console":
                    print(label)
                    print(ascii_art(item.pixels[0], args.console_width, back=back))
                else:
                    Image.fromarray(item.pixels[0]).show(title=label)
                shown += 1
        print(f"{dataset.where}: {shown} items shown")
        for path, reason in report.failed + report.skipped:
            print(f"  not shown: {_naming(path, reason)}")  # (a UserError names its file: it was printed twice)
