"""Aspect-ratio buckets for HunyuanVideo and the resize + centre crop into a bucket.

Bucket rules are musubi-tuner's (`dataset/bucket.py`), so the same images land in the same buckets and
cache names stay the same. Sizes are (width, height) everywhere, as in the dataset TOML.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from musubi_tuner.errors import UserError

# The VAE downsamples 8x and the DiT patchifies 2x2: pixel sizes must be multiples of 16.
RESOLUTION_STEP = 16


def floor_to(value: int, step: int = RESOLUTION_STEP) -> int:
    return value - value % step


class BucketSelector:
    """Picks the bucket (width, height) for an image or video frame size.

    With `enable_bucket`, the buckets are every (w, h) of multiples of 16 whose area is close to the
    resolution's area (w from sqrt(area)/2 up to sqrt(area), plus the transposes); an image goes to
    the bucket with the closest aspect ratio. With `no_upscale`, an image smaller than the area keeps
    its own size floored to 16. Without bucketing there is one bucket: the resolution itself.
    """

    def __init__(self, resolution: tuple[int, int], enable_bucket: bool = True, no_upscale: bool = False,
                 step: int = RESOLUTION_STEP):
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.area = self.resolution[0] * self.resolution[1]
        self.step = step
        self.no_upscale = bool(no_upscale and enable_bucket)
        self.buckets: tuple[tuple[int, int], ...] = self._bucket_list() if enable_bucket else (self.resolution,)
        self._aspect_ratios = [w / h for w, h in self.buckets]

    def _bucket_list(self) -> tuple[tuple[int, int], ...]:
        side = int(math.sqrt(self.area))
        sizes = set()
        for w in range(floor_to(side // 2, self.step), side + self.step, self.step):
            h = floor_to(self.area // w, self.step)
            sizes.update({(w, h), (h, w)})
        return tuple(sorted(sizes))

    def bucket_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket (width, height) for an image of `size` (width, height)."""
        width, height = size
        if self.no_upscale and width * height <= self.area:
            if width < self.step or height < self.step:
                raise UserError(f"{width}x{height} pixels is smaller than one bucket step ({self.step} px) and bucket_no_upscale "
                                f"keeps small images at their size; enlarge it, remove it, or set bucket_no_upscale = false")
            return floor_to(width, self.step), floor_to(height, self.step)
        aspect = width / height
        errors = [abs(ar - aspect) for ar in self._aspect_ratios]
        return self.buckets[errors.index(min(errors))]  # the first of equal errors, as numpy's argmin


WHOLE_UPSCALE_LIMIT = 16  # times the bucket's area: an upscale larger than this scales only the part that stays
LANCZOS_REACH = 4  # source pixels beyond a kept one that Lanczos-3 reads when it enlarges (3, and one for rounding)


def resize_to_bucket(image: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Scale `image` (H, W, C) uint8 to cover `bucket` (width, height), then centre-crop to it.

    Upscaling uses Pillow's LANCZOS and downscaling an area average computed as OpenCV's INTER_AREA computes it
    (musubi-tuner uses both), so the pixels are musubi-tuner's.
    Returns (bucket_h, bucket_w, C) uint8.
    """
    height, width = image.shape[:2]
    bucket_w, bucket_h = bucket
    if (width, height) == (bucket_w, bucket_h):
        return image
    scale = max(bucket_w / width, bucket_h / height)
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    left, top = (new_w - bucket_w) // 2, (new_h - bucket_h) // 2
    if scale > 1 and new_w * new_h > WHOLE_UPSCALE_LIMIT * bucket_w * bucket_h:
        # An extreme aspect ratio: the whole image scaled to cover the bucket would be vast (a 1 x 80000 PNG of a few KB
        # took 2 minutes and ended in a MemoryError; 2 x 1000 at 960 x 544 took 4.5 GB). Only the part that stays is
        # scaled, in Pillow's two passes (rows, then columns, each rounded to uint8) on the same source region (its
        # `box`) and the rows the filter reaches: the same pixels as the whole image scaled, then cropped.
        sx, sy = width / new_w, height / new_h
        y0, y1 = top * sy, (top + bucket_h) * sy
        first, last = max(0, int(y0) - LANCZOS_REACH), min(height, int(np.ceil(y1)) + LANCZOS_REACH)
        rows = Image.fromarray(np.ascontiguousarray(image[first:last])).resize(
            (bucket_w, last - first), Image.LANCZOS, box=(left * sx, 0, (left + bucket_w) * sx, last - first))
        return np.array(rows.resize((bucket_w, bucket_h), Image.LANCZOS, box=(0, y0 - first, bucket_w, y1 - first)))
    if scale > 1:
        resized = np.array(Image.fromarray(image).resize((new_w, new_h), Image.LANCZOS))  # writable, as torch wants
    else:
        resized = area_resize(image, (new_w, new_h))
    return np.ascontiguousarray(resized[top:top + bucket_h, left:left + bucket_w])


def area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Shrink (H, W, C) uint8 to `size` (width, height): each output pixel is the mean of the input area it covers.

    The same arithmetic as OpenCV's INTER_AREA, which musubi-tuner uses, so the pixels are equal: by whole factors on
    both axes (1024 -> 512) the block sums rounded as OpenCV rounds them there (2 x 2: half up; other factors: the
    sum times the float32 1 / area, half to even); otherwise float32 weights, columns then rows, rounded to nearest.
    """
    height, width = image.shape[:2]
    if height % size[1] == 0 and width % size[0] == 0:
        fy, fx = height // size[1], width // size[0]
        sums = np.zeros((size[1], size[0], *image.shape[2:]), np.int32)
        for dy in range(fy):  # strided slices: 8x faster than a sum over a reshaped view
            for dx in range(fx):
                sums += image[dy::fy, dx::fx]
        mean = (sums + 2) >> 2 if fy == fx == 2 else np.rint(sums.astype(np.float32) * np.float32(1 / (fy * fx)))
        return mean.astype(np.uint8)
    # Columns first: the order whose float32 rounding is OpenCV's. Each pass gathers whole rows (contiguous).
    columns = _area_resize_first_axis(np.ascontiguousarray(image.transpose(1, 0, 2)), size[0])  # (w, H, C) float32
    rows = _area_resize_first_axis(np.ascontiguousarray(columns.transpose(1, 0, 2)), size[1])  # (h, w, C)
    return np.clip(np.rint(rows), 0, 255).astype(np.uint8)


def _area_resize_first_axis(pixels: np.ndarray, out_len: int) -> np.ndarray:
    """(N, ...) -> (out_len, ...) float32: each output row the weighted sum of its input rows, in order."""
    taps, weights = _area_taps(pixels.shape[0], out_len)
    out = pixels[taps[:, 0]] * weights[:, 0, None, None]
    for k in range(1, taps.shape[1]):
        out += pixels[taps[:, k]] * weights[:, k, None, None]
    return out


@functools.lru_cache(maxsize=64)
def _area_taps(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel: the input pixels its span [i, i+1) * in/out overlaps, and the overlap / span.

    Returns (out_len, taps) indices and float32 weights; each row of weights sums to 1.
    """
    span = in_len / out_len
    lo = np.arange(out_len) * span
    first = np.floor(lo).astype(np.int64)
    index = first[:, None] + np.arange(int(math.ceil(span)) + 1)[None, :]
    overlap = np.minimum(index + 1, lo[:, None] + span) - np.maximum(index, lo[:, None])
    weights = np.clip(overlap, 0, None) / span
    used = weights.max(axis=0) > 0
    return np.minimum(index, in_len - 1)[:, used], weights[:, used].astype(np.float32)
