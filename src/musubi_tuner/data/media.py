"""Images and videos in and out: Pillow for images, PyAV (FFmpeg) for videos, uint8 RGB arrays in between.

- Images: any mode becomes RGB (alpha is dropped, not composited, as musubi-tuner does; 16-bit
  greyscale is scaled, not clipped to white); the EXIF orientation is applied.
- Videos: the first video stream, frames as (F, H, W, 3) uint8 RGB, rotation metadata applied;
  decoding stops as soon as enough frames are kept. A folder of images is a video whose frames are
  its images in name order.
- `source_fps`: frames are dropped to reach 24 fps with musubi-tuner's accumulator (see `_decimate`).
Any file that cannot be read raises a UserError that names it.
"""

from __future__ import annotations

import contextlib
import fractions
import importlib.util
import itertools
import logging
import os
import struct
import re
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import av
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from musubi_tuner.errors import UserError, limit_met
from musubi_tuner.files import atomic_write, list_folder, require_file, write_error

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
if importlib.util.find_spec("pillow_jxl") or importlib.util.find_spec("jxlpy"):  # JPEG XL plugins, as musubi-tuner
    IMAGE_EXTENSIONS += (".jxl",)
# image types people caption that are not read (neither here nor by musubi-tuner): named, not left out without a word
UNSUPPORTED_IMAGE_EXTENSIONS = tuple(e for e in (".gif", ".tif", ".tiff", ".heic", ".heif", ".jxl", ".svg", ".jfif", ".jpe", ".tga",
                                                 ".ppm", ".pgm", ".pbm", ".ico", ".dng", ".cr2", ".nef", ".arw", ".raw", ".qoi",
                                                 ".psd", ".exr", ".hdr")
                                     if e not in IMAGE_EXTENSIONS)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")
# video types a video folder may hold that are not read (as musubi-tuner does not): named, not left out without a word
UNSUPPORTED_VIDEO_EXTENSIONS = (".ts", ".mts", ".m2ts", ".3gp", ".3g2", ".3gpp", ".gif", ".vob", ".ogv", ".ogg", ".f4v", ".asf",
                                ".mxf", ".qt", ".divx", ".y4m", ".rm", ".rmvb", ".dv", ".m2v", ".mod")
JPEG_EXTENSIONS = (".jfif", ".jpe")  # JPEG files under another name: renamed to .jpg they are read


def unsupported_type(suffix: str, video: bool) -> str | None:
    """Why a file of this suffix is not read, when it is an image (`video` False) or video type: None for the types
    that are read and for what is no image or video (a .json beside an image is no item)."""
    lower = suffix.lower()
    if video:
        if lower in (*IMAGE_EXTENSIONS, ".apng"):  # (the other kind: said of captioned files, not left out without a word:
            # fuzz_bc 5)
            animated = " (an animated one: convert it to .mp4)" if lower in (".webp", ".apng") else ""
            return f"an image in a video_directory, which reads videos ({', '.join(VIDEO_EXTENSIONS)}){animated}; list images in " \
                   "an image_directory"
        if lower not in UNSUPPORTED_VIDEO_EXTENSIONS:
            return None
        return f"{suffix} is not a supported video type ({', '.join(VIDEO_EXTENSIONS)}); convert it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4"
    if lower in VIDEO_EXTENSIONS:
        return "a video in an image_directory, which reads images; list videos in a video_directory"
    if lower == ".apng":
        return "an animated PNG is not read as an image; convert it to .mp4 for a video_directory, or rename it .png for its first frame"
    if lower not in UNSUPPORTED_IMAGE_EXTENSIONS:
        return None
    renamed = f" (a {suffix} file is a JPEG: renamed to .jpg it is read)" if suffix.lower() in JPEG_EXTENSIONS else ""
    return f"{suffix} is not a supported image type ({', '.join(IMAGE_EXTENSIONS)}); convert it{renamed}"


_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that swap width and height
_TRANSPOSE_FOR = {  # what displays an image of each EXIF orientation upright (the table ImageOps.exif_transpose uses)
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _list(folder: str | os.PathLike, extensions: tuple[str, ...]) -> list[Path]:
    """Files of `folder` (not recursive) whose extension is one of `extensions`, any case, sorted by name.

    Hidden files (a leading dot: macOS's `._name.png` resource forks, editors' temporary files) are not listed, as
    musubi-tuner's glob does not list them. Everything else with such a name is listed, as musubi-tuner's glob lists
    it: a folder named like a video is read as a folder of frames; a folder named like an image, a broken or looping
    link, a FIFO, a device or a socket fails when read, with a message that names it, where dropping it here would
    lose it without a word."""
    # (a folder that cannot be listed: its error, not a bare "Permission denied" naming nothing: fuzz_as 2)
    return sorted((p for p in list_folder(folder) if p.suffix.lower() in extensions and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _require_readable_file(path: Path) -> None:
    """A clear reason for what is not a file with data: a broken or looping link, not a regular file (a FIFO would
    block the decoder, /dev/zero never end), an empty file."""
    require_file(path)
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")


def list_images(folder: str | os.PathLike) -> list[Path]:
    return _list(folder, IMAGE_EXTENSIONS)


def list_videos(folder: str | os.PathLike) -> list[Path]:
    return _list(folder, VIDEO_EXTENSIONS)


# ------------------------------------------------------------------------------------------ images


# Pillow warns of an image past MAX_IMAGE_PIXELS (and refuses one past twice that) in two lines that name no file: said
# here instead, one line naming it (fuzz_ag 4)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# A compressed text chunk (a generator's embedded workflow, an XMP packet) past Pillow's 1 MB per chunk made the image "not
# readable", its pixels fine (fuzz_bc 10): the metadata is never read here; MAX_TEXT_MEMORY (64 MB) still bounds the text.
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY)


def _open_image(path: Path) -> Image.Image:
    try:
        _require_readable_file(path)
        with _exif_said(path) as said:
            img = Image.open(path)
        if said:  # Pillow read the block at open, and may not again when asked for the orientation
            img.info[_CORRUPT_EXIF] = True
        return img
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({_reason(e)})") from None
    except Image.DecompressionBombError as e:  # Pillow's guard: more than twice MAX_IMAGE_PIXELS
        raise UserError(f"{path}: too large to open ({e}); downscale it") from None


_SAID_BAD_EXIF: set[str] = set()  # images whose corrupt EXIF block was said
_CORRUPT_EXIF = "musubi_tuner.corrupt_exif"  # marks an opened image whose EXIF block Pillow found corrupt


@contextlib.contextmanager
def _exif_said(path: Path):
    """Pillow's words on a corrupt EXIF block (at open, and when the orientation is read), said once per image as one
    line naming it: Pillow prints a two-line warning naming neither the image nor what follows (fuzz_aj 9). Yields a
    list that holds those words once the block ends."""
    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield said
    for warning in caught:
        if "EXIF" not in str(warning.message):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        said.append(" ".join(str(warning.message).split()).rstrip("."))
        if str(path) not in _SAID_BAD_EXIF:
            _SAID_BAD_EXIF.add(str(path))
            logger.warning("%s: %s: its orientation is not applied", path, said[-1])


def _orientation(img: Image.Image, path: Path) -> int:
    """The EXIF orientation (1: as stored, also for a corrupt EXIF block)."""
    with _exif_said(path) as said:
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a block Pillow cannot read at all (or pixel data cut short, which decoding names)
            orientation = 1
    if said or img.info.get(_CORRUPT_EXIF) or orientation not in range(1, 9):
        return 1
    return orientation


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), without decoding the pixels."""
    path = Path(path)
    with _open_image(path) as img:
        width, height = img.size
        orientation = _orientation(img, path)
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied."""
    path = Path(path)
    with _open_image(path) as img:
        pixels = img.width * img.height
        if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
            logger.warning("%s: %dx%d, %s pixels: decoding it takes about %.1f GB", path, img.width, img.height,
                           f"{pixels:,}", pixels * 4 / 1e9)
        try:
            img.load()
            method = _TRANSPOSE_FOR.get(_orientation(img, path))
            return _rgb_array(img if method is None else img.transpose(method))
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt pixel data
            raise UserError(f"{path}: not a readable image ({_reason(e)})") from None


def _rgb_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8, writable (np.asarray of an image is read-only, and torch.from_numpy warns about that)."""
    if img.mode == "RGB":
        return np.array(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # Pillow's own conversion clips these to 0..255, which turns a 16-bit image white
        values = np.asarray(img, dtype=np.float32)
        if not np.isfinite(values).all():  # (one NaN pixel left the peak NaN: the image came out black: fuzz_bc 6)
            raise ValueError(f"{int((~np.isfinite(values)).sum()):,} of its pixels are NaN or infinite")
        peak = values.max(initial=0.0)
        if img.mode.startswith("I;16") or peak > 255:
            values = values / 257.0
        elif img.mode == "F" and peak <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:  # (as RGB at once, Pillow warned in two lines naming no file:
        img = img.convert("RGBA")  # fuzz_bc 6; the same colours)
    return np.array(img.convert("RGB"))  # RGBA, LA, P, L, CMYK, YCbCr...: alpha dropped, palette expanded


# ------------------------------------------------------------------------------------------ videos


class Video(NamedTuple):
    frames: np.ndarray  # (F, H, W, 3) uint8 RGB, after any resize
    size: tuple[int, int]  # (width, height) of the frames as stored, rotation applied, before any resize


def kept_source_frames(num_frames: int, source_fps: float, target_fps: float = 24.0) -> list[int]:
    """Indices of the source frames that survive conversion from `source_fps` to `target_fps` (see _decimate)."""
    return list(_decimate(iter(range(num_frames)), source_fps, target_fps))


def _decimate(frames: Iterator, source_fps: float | None, target_fps: float) -> Iterator:
    """musubi-tuner's frame dropping: an accumulator starts at 0 and grows by target/source per source
    frame; a frame is kept when the accumulator's integer part (before adding) differs from the last
    kept one. 30 -> 24 fps keeps 4 of every 5 frames; at or below 24 fps every frame is kept."""
    if source_fps is None:
        yield from frames
        return
    step = target_fps / source_fps
    accumulator, last = 0.0, -1
    for frame in frames:
        index = int(accumulator)
        accumulator += step
        if index != last:
            last = index
            yield frame


def _as_displayed(pixels: np.ndarray, frame) -> np.ndarray:
    """`pixels` turned and mirrored as players show them, by the frame's display matrix (FFmpeg's autorotate): a
    rotation by quarter turns, or one of the four mirrors (a mirrored matrix's angle, applied as a rotation, turned a
    horizontally mirrored video upside down: fuzz_ag 1c). A degenerate matrix is ignored, as players ignore it (its
    angle, INT_MIN, turned the frames by a quarter)."""
    matrix = next((bytes(d) for d in frame.side_data if d.type == av.sidedata.sidedata.Type.DISPLAYMATRIX), None)
    if matrix is None or len(matrix) != 36:
        return pixels
    a, b, _, c, d = struct.unpack("=9i", matrix)[:5]  # the 2x2 part: x' = a x + c y, y' = b x + d y (16.16 fixed point)
    determinant = a * d - b * c
    if determinant > 0:  # a rotation
        quarter_turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, as np.rot90
        return np.ascontiguousarray(np.rot90(pixels, quarter_turns)) if quarter_turns else pixels
    if determinant == 0:
        return pixels
    if b == 0 and c == 0:  # a mirror about an axis
        return np.ascontiguousarray(pixels[:, ::-1] if a < 0 else pixels[::-1])
    # a mirror about a diagonal: x' = y, y' = x (the main one: a transpose) or x' = -y, y' = -x (the other)
    return np.ascontiguousarray(np.transpose(pixels if b > 0 else pixels[::-1, ::-1], (1, 0, 2)))


def _square_pixels(pixels: np.ndarray, sar) -> np.ndarray:
    """`pixels` with its width scaled by the stream's sample aspect ratio, as players show them (none, or 1:1: as stored)."""
    if not sar or sar == 1 or sar < 0:
        return pixels
    height, width = pixels.shape[:2]
    shown = max(1, round(width * float(sar)))
    if shown == width:
        return pixels
    return np.array(Image.fromarray(pixels).resize((shown, height), Image.Resampling.BICUBIC))


def _decoded_frames(path: Path) -> Iterator[np.ndarray]:
    """Every frame of the first video stream as (H, W, 3) uint8 RGB, as players show it: its pixels made square (its
    sample aspect ratio), its display rotation applied."""
    try:
        _require_readable_file(path)
        with av.open(str(path), metadata_errors="replace") as container:  # (tags in Latin-1: fuzz_ag 0)
            if not container.streams.video:
                kinds = {s.type for s in container.streams}
                damaged = kinds and not kinds & {"audio", "subtitle"}  # (a cut-short mp4: half its index, read as data)
                raise UserError(f"{path}: has no video stream" + (f" (only {', '.join(sorted(kinds))}: cut short or damaged?)"
                                                                  if damaged else ""))
            stream = container.streams.video[0]
            sar = stream.sample_aspect_ratio  # (pixels that are not square: a 16:9 DVD's 720x480 was trained as 3:2, squeezed,
            # where players widen it: fuzz_bc 7)
            for frame in container.decode(stream):
                yield _as_displayed(_square_pixels(frame.to_ndarray(format="rgb24"), sar), frame)
    except (av.FFmpegError, OSError) as e:
        limit = limit_met(path, e)
        if limit is not None:
            raise limit from None
        raise UserError(f"{path}: {'not a readable video' if isinstance(e, av.FFmpegError) else 'cannot read'} ({_reason(e)})") from None


_SAID_UNPADDED: set[str] = set()  # frame folders whose unpadded numbers were said to be read out of order


def _folder_frames(folder: Path) -> Iterator[np.ndarray]:
    files = list_images(folder)
    if not files:
        raise UserError(f"{folder}: a folder used as a video holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    # the number ending each name (frame_1, out12: ffmpeg's %d): bare numbers alone were said (fuzz_bc 8)
    numbered = [re.fullmatch(r"(.*?)(\d+)", p.stem) for p in files]
    numbers = [(m[1], int(m[2])) for m in numbered if m]
    if len(numbers) == len(files) and numbers != sorted(numbers) and str(folder) not in _SAID_UNPADDED:
        _SAID_UNPADDED.add(str(folder))  # (1.png ... 12.png: read 1, 10, 11, 12, 2, ..., silently: fuzz_ag 8e)
        logger.warning("%s: frames are read in name order, as musubi-tuner reads them: %s, ... (not in number order); "
                       "name them with leading zeros (01.png, frame_01.png) to read them in order", folder,
                       ", ".join(p.name for p in files[:4]))
    for file in files:
        yield load_image(file)


def iter_video_frames(path: str | os.PathLike, *, max_frames: int | None = None, source_fps: float | None = None,
                      target_fps: float = 24.0) -> Iterator[np.ndarray]:
    """Frames of a video file or a folder of images, after `source_fps` decimation, at most `max_frames`.

    Decoding stops once `max_frames` frames are kept.
    """
    path = Path(path)
    frames = _folder_frames(path) if path.is_dir() else _decoded_frames(path)
    try:
        yield from itertools.islice(_decimate(frames, source_fps, target_fps), max_frames)
    finally:
        frames.close()  # close the container now when stopping early


def load_video(path: str | os.PathLike, *, max_frames: int | None = None, source_fps: float | None = None,
               target_fps: float = 24.0, resize: Callable[[np.ndarray, tuple[int, int]], np.ndarray] | None = None,
               ) -> Video:
    """Decode a video (or a folder of frames) into memory.

    `resize(frame, first_frame_size)` is applied to every frame as it is decoded, so a long 4K video
    never sits in memory at full size; it receives the first frame's (width, height) so that every
    frame goes to the same bucket. Raises UserError if the video has no frames.
    """
    path = Path(path)
    frames, size = [], None
    for frame in iter_video_frames(path, max_frames=max_frames, source_fps=source_fps, target_fps=target_fps):
        frame_size = (frame.shape[1], frame.shape[0])
        if size is None:
            size = frame_size
        if resize is not None:
            frame = resize(frame, size)
        elif frame_size != size:
            raise UserError(f"{path}: frame {len(frames)} is {frame_size[0]}x{frame_size[1]}, "
                            f"the first is {size[0]}x{size[1]}")
        frames.append(frame)
    if not frames:
        raise UserError(f"{path}: no video frames could be decoded")
    return Video(np.stack(frames), size)


def video_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the first frame as displayed (decodes only that frame)."""
    for frame in iter_video_frames(path, max_frames=1):
        return frame.shape[1], frame.shape[0]
    raise UserError(f"{path}: no video frames could be decoded")


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 24.0, bitrate: int = 1_000_000,
                codec: str = "libx264", options: dict[str, str] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write (F, H, W, 3) uint8 RGB frames as H.264 yuv420p, atomically (a killed run leaves no half file).

    yuv420p needs even sizes: an odd last row or column is dropped. The container follows the suffix;
    `metadata` goes into the container's tags (e.g. {"comment": ...}).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    container_format = {".mkv": "matroska", ".mov": "mov", ".webm": "webm"}.get(path.suffix.lower(), "mp4")
    try:
        with atomic_write(path) as tmp:
            with av.open(str(tmp), mode="w", format=container_format) as container:
                container.metadata.update(metadata or {})
                rate = fractions.Fraction(fps).limit_denominator(1001)
                stream = container.add_stream(codec, rate=rate, options=options or {})
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.bit_rate = bitrate
                for pixels in frames:
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[:height, :width]), format="rgb24")
                    container.mux(stream.encode(frame))
                container.mux(stream.encode())
    except OSError as e:
        raise write_error(path, e) from e
    return path


def _reason(error: BaseException) -> str:
    # FFmpeg's and the OS's own words, without the errno and the file name the message already starts with
    text = str(getattr(error, "strerror", None) or error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
