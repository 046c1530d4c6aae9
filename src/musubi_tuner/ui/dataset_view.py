"""What a dataset config produces, item by item, from the caching commands' own code (items.py): buckets, the frame
windows (clips) of each video, captions, cache status, and every item they would skip or fail on, with why.

Nothing is encoded: the items are decoded and cropped exactly as cache_latents.py does before it calls the VAE, and
a thumbnail and a short clip of what the VAE would see are written to the studio's preview folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from musubi_tuner.data import cache_files
from musubi_tuner.data.config import FRAME_EXTRACTIONS, load_dataset_config
from musubi_tuner.data.frames import extract_clips
from musubi_tuner.data.items import CacheReport, caption_items, iter_latent_batches, list_items
from musubi_tuner.files import atomic_write

MAX_PREVIEWS = 48  # per dataset: thumbnails and clips of the first items only (a large dataset is still listed whole)
TEXT_ENCODERS = ("llm_", "clipL_")


def inspect_dataset(toml_path: str | Path, previews: Path, num_workers: int = 2) -> dict:
    """{"path", "datasets": [{"where", "kind", "source", "items": [...], "problems": [...], "latent_caches", ...}]}.

    Raises UserError (the caching commands' one line) when the config itself is wrong.
    """
    config = load_dataset_config(toml_path)
    folder = previews / hashlib.sha1(str(Path(toml_path).resolve()).encode()).hexdigest()[:12]
    return {"path": str(toml_path), "datasets": [_inspect(ds, folder / str(i), num_workers) for i, ds in enumerate(config.all_datasets)]}


def _inspect(ds, previews: Path, num_workers: int) -> dict:
    latent_report, text_report = CacheReport(), CacheReport()
    sources, _ = list_items(ds)
    order = {item.path: n for n, item in enumerate(sources)}
    captions = {c.source.path: c for c in caption_items(ds, text_report)}
    items: dict[Path, dict] = {}
    previewed = 0
    for batch in iter_latent_batches(ds, latent_report, num_workers=num_workers):
        for latent in batch.items:
            path = latent.source.path
            entry = items.get(path)
            if entry is None:
                caption = captions.get(path)
                entry = items[path] = {
                    "path": str(path), "name": path.name, "caption": caption.caption if caption else None,
                    "size": list(latent.size) if latent.clip is None else _source_size(latent.provenance),
                    "bucket": list(latent.bucket), "clips": [],
                    "text_cache": _text_status(caption) if caption else "no caption",
                    # (the frames a `head` or `full` decode stopped at are not the video's: a 24-frame video was shown
                    # as 9 frames, and the clips of a 9-frame one for each mode: fuzz_av 4)
                    "source_frames": int(latent.provenance["source_frames"])
                    if latent.provenance.get(cache_files.WHOLE_VIDEO_KEY) == "true" else None,
                }
            clip = {"start": latent.clip.start if latent.clip else None, "frames": latent.clip.frames if latent.clip else 1,
                    "cache": latent.cache_path.name, "status": cache_files.cache_status(latent.cache_path, latent.provenance) or "cached"}
            if previewed < MAX_PREVIEWS:
                clip.update(_write_previews(latent, previews))
                previewed += 1
            entry["clips"].append(clip)
    listed = sorted(items.values(), key=lambda e: order.get(Path(e["path"]), len(order)))
    if ds.is_video:
        for entry in listed:
            entry["clips"].sort(key=lambda c: (c["frames"], c["start"]))
            entry["windows_by_mode"] = _windows_by_mode(ds, entry["source_frames"])
    problems = sorted({(p, "skipped", r) for p, r in latent_report.skipped + text_report.skipped}
                      | {(p, "failed", r) for p, r in latent_report.failed + text_report.failed})
    return {
        "where": ds.where, "role": ds.role, "kind": "video" if ds.is_video else "image", "source": str(ds.source),
        "cache_directory": str(ds.cache_directory), "items": listed,
        "latent_caches": sum(len(e["clips"]) for e in listed),
        "cached": sum(c["status"] == "cached" for e in listed for c in e["clips"]),
        "text_cached": sum(e["text_cache"] == "cached" for e in listed),
        "buckets": sorted({f"{e['bucket'][0]}x{e['bucket'][1]}" for e in listed}),
        "problems": [{"path": p, "what": w, "reason": r} for p, w, r in problems],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ds.metadata().items()},
    }


def _source_size(provenance: dict[str, str]) -> list[int]:
    width, height = provenance["source_size"].split("x")
    return [int(width), int(height)]


def _text_status(caption) -> str:
    """As cache_text_encoder_outputs.py --skip_existing judges it: both encoders' outputs, of this caption."""
    return cache_files.cache_status(caption.cache_path, {"caption1": caption.caption}, required_prefixes=TEXT_ENCODERS) or "cached"


def _windows_by_mode(ds, source_frames: int | None) -> dict[str, list[list[int]]] | None:
    """The clips each frame_extraction would take from this video, when its whole length is known."""
    if source_frames is None:
        return None
    return {mode: [list(c) for c in extract_clips(source_frames, mode, ds.target_frames, frame_stride=ds.frame_stride,
                                                   frame_sample=ds.frame_sample, max_frames=ds.max_frames)]
            for mode in FRAME_EXTRACTIONS}


def _write_previews(latent, folder: Path) -> dict[str, str]:
    """A JPEG of the first frame and, for a clip, an mp4 of its frames: exactly the pixels the VAE would encode."""
    from musubi_tuner.data.media import write_video

    stem = latent.cache_path.name.removesuffix(".safetensors")
    thumb = folder / f"{stem}.jpg"
    with atomic_write(thumb) as tmp:
        Image.fromarray(latent.pixels[0]).save(tmp, format="JPEG", quality=90)
    out = {"thumbnail": str(thumb)}
    if latent.clip is not None:
        clip = folder / f"{stem}.mp4"
        write_video(clip, latent.pixels, fps=24, bitrate=1_000_000)
        out["preview"] = str(clip)
    return out
