"""Tiled VAE encode/decode: overlapping tiles in space (and optionally time), cross-faded where they overlap.

The official / musubi-tuner / diffusers scheme: tiles of 256 px (32 latent px) placed every 192 px
(overlap 1/4); each tile is blended linearly into its upper and left neighbours over the overlap and
then cropped to the stride. In time: tiles of 64 frames (16 latent frames) every 48, each tile after
the first dropping its first output frame (a causal VAE treats a tile's first frame as an image).
Peak memory follows the tile, not the video; the price is a small seam error (see docs/vae.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OVERLAP = 0.25


@dataclass(frozen=True)
class TilingOptions:
    spatial: bool = True
    tile_sample_size: int = 256  # pixels; the latent tile is this // 8
    temporal: bool = False
    tile_sample_frames: int = 64  # frames; the latent tile is this // 4

    def __post_init__(self):
        from musubi_tuner.errors import UserError

        if self.tile_sample_size % 32 or self.tile_sample_size < 32:
            raise UserError(f"--vae_spatial_tile_sample_min_size {self.tile_sample_size}: use a multiple of 32 (e.g. 128 or 256)")
        if self.tile_sample_frames % 16:
            raise UserError(f"temporal VAE tiles of {self.tile_sample_frames} frames: use a multiple of 16")


def _ramp(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=like.dtype) / n


def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first `extent` slices of `cur` along `dim` with the last `extent` of `prev` (in place on cur)."""
    extent = min(prev.shape[dim], cur.shape[dim], extent)
    if extent <= 0:
        return cur
    shape = [1] * cur.ndim
    shape[dim] = extent
    w = _ramp(extent, cur).view(shape)
    head = cur.narrow(dim, 0, extent)
    head.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + head * w)
    return cur


def _stitch(rows: list[list[torch.Tensor]], blend: int, keep: int) -> torch.Tensor:
    """Blend each tile with its upper and left neighbours, crop to `keep`, and join into one tensor (B, C, T, H, W)."""
    out_rows = []
    for i, row in enumerate(rows):
        pieces = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend, 3)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend, 4)
            pieces.append(tile[:, :, :, :keep, :keep])
        out_rows.append(torch.cat(pieces, dim=4))
    return torch.cat(out_rows, dim=3)


def _spatial_encode(vae, x: torch.Tensor, size: int) -> torch.Tensor:
    ratio = vae.config.spatial_compression
    H, W = x.shape[-2:]
    if H <= size and W <= size:
        return vae._encode_moments(x)
    stride = int(size * (1 - OVERLAP))
    tile_latent, stride_latent = size // ratio, stride // ratio
    rows = [[vae._encode_moments(x[:, :, :, i : i + size, j : j + size]) for j in range(0, W, stride)] for i in range(0, H, stride)]
    return _stitch(rows, tile_latent - stride_latent, stride_latent)[:, :, :, : H // ratio, : W // ratio]


def _spatial_decode(vae, z: torch.Tensor, size: int) -> torch.Tensor:
    ratio = vae.config.spatial_compression
    h, w = z.shape[-2:]
    tile_latent = size // ratio
    if h <= tile_latent and w <= tile_latent:
        return vae._decode_untiled(z)
    stride = int(size * (1 - OVERLAP))
    stride_latent = stride // ratio
    starts = [(i, j) for i in range(0, h, stride_latent) for j in range(0, w, stride_latent)]
    tiles = [z[:, :, :, i : i + tile_latent, j : j + tile_latent] for i, j in starts]
    share = getattr(vae, "tile_share", None)  # several processes: each decodes its share of the tiles (distributed.WorkShare)
    decoded = share.map(vae._decode_untiled, tiles) if share is not None else [vae._decode_untiled(t) for t in tiles]
    columns = len(range(0, w, stride_latent))
    rows = [decoded[r : r + columns] for r in range(0, len(decoded), columns)]
    return _stitch(rows, size - stride, stride)[:, :, :, : h * ratio, : w * ratio]


def tiled_encode(vae, x: torch.Tensor, opts: TilingOptions) -> torch.Tensor:
    """pixels (B, 3, F, H, W) -> moments (B, 2C, f, h, w), tiled as `opts` says."""
    size = opts.tile_sample_size if opts.spatial else max(x.shape[-2:])
    frames = x.shape[2]
    if not opts.temporal or frames <= opts.tile_sample_frames:
        return _spatial_encode(vae, x, size)
    ratio = vae.config.temporal_compression
    stride = int(opts.tile_sample_frames * (1 - OVERLAP))
    tile_latent, stride_latent = opts.tile_sample_frames // ratio, stride // ratio
    tiles = []
    for start in range(0, frames, stride):
        tile = _spatial_encode(vae, x[:, :, start : start + opts.tile_sample_frames + 1], size)
        tiles.append(tile[:, :, 1:] if start > 0 else tile)
    return _stitch_time(tiles, tile_latent - stride_latent, stride_latent)[:, :, : (frames - 1) // ratio + 1]


def tiled_decode(vae, z: torch.Tensor, opts: TilingOptions) -> torch.Tensor:
    """latents (B, C, f, h, w) -> pixels (B, 3, 4(f-1)+1, 8h, 8w), tiled as `opts` says."""
    size = opts.tile_sample_size if opts.spatial else max(z.shape[-2:]) * vae.config.spatial_compression
    frames = z.shape[2]
    ratio = vae.config.temporal_compression
    tile_latent = opts.tile_sample_frames // ratio
    if not opts.temporal or frames <= tile_latent:
        return _spatial_decode(vae, z, size)
    stride = int(opts.tile_sample_frames * (1 - OVERLAP))
    stride_latent = stride // ratio
    tiles = []
    for start in range(0, frames, stride_latent):
        tile = _spatial_decode(vae, z[:, :, start : start + tile_latent + 1], size)
        tiles.append(tile[:, :, 1:] if start > 0 else tile)
    return _stitch_time(tiles, opts.tile_sample_frames - stride, stride)[:, :, : (frames - 1) * ratio + 1]


def _stitch_time(tiles: list[torch.Tensor], blend: int, keep: int) -> torch.Tensor:
    pieces = []
    for i, tile in enumerate(tiles):
        if i > 0:
            tile = _blend(tiles[i - 1], tile, blend, 2)
            pieces.append(tile[:, :, :keep])
        else:
            pieces.append(tile[:, :, : keep + 1])
    return torch.cat(pieces, dim=2)
