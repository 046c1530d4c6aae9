"""The tensors our causal 3D VAE (hunyuan/vae.py, vae_tiling.py) creates and frees, replayed at any size.

The replay walks the modules of a `CausalVideoVAE` built on the meta device (so block widths, depths and
strides come from the model itself) and follows each module's forward as written; no autograd (the VAE
runs under no_grad). What is replayed:

- CausalConv3d: per call (at most FRAMES_PER_CALL output frames, last frames first) a padded buffer of
  the input frames that call reads and the call's output; the output tensor of the whole convolution
  (allocated at the first call, or the ResNet block's own conv1 output when conv2 writes over it); the
  previous call's output until the next call's output exists; a 1x1 shortcut's output per call;
- NormSiLU: the float32 `x - mean` of FRAMES_PER_CALL frames that the statistics pass holds at a time
  (float32 whatever the VAE's dtype); the normalised frames themselves go straight into the padded buffer;
- Upsampled: per call, the low-resolution frames `index_select` gathers before they are expanded;
- CausalAttention: the group-normed copy, its token-major copy, q, k, v, one output per frame, their
  concatenation, the output projection and the residual sum (attention as a fused kernel: its output only);
- Python lifetimes: a layer's input lives until the encoder's / decoder's flat loop rebinds it; the mid
  block holds its input for all of its layers; temporaries die when their expression ends;
- spatial tiling (`_spatial_encode` / `_spatial_decode`, tiles of `tile_px` every 3/4 tile, smaller at
  the edges): every tile's output is kept until `_stitch` blends (three strip-sized temporaries per
  blend), concatenates each row and then the rows.
Not replayed: kernel scratch (convolution workspaces, `--vae_chunk_size`'s benefit), temporal tiling (no
flag enables it), tensors of a few hundred bytes (norm statistics, indices).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from musubi_tuner.hunyuan import vae as hv
from musubi_tuner.hunyuan.vae_tiling import OVERLAP
from musubi_tuner.planning.trace import MemoryTrace

VAE_WEIGHTS = "VAE weights"
VAE_ACTS = "VAE activations and finished tiles"
VAE_OUT = "decoded video and its uint8 conversion"
VAE_IN = "input frames and latents"
NORM_STATS_BYTES = 4  # group_norm_affine centres frames in float32


@functools.cache
def vae_model(config: hv.VAEConfig = hv.VAEConfig()) -> hv.CausalVideoVAE:
    """The VAE's modules on the meta device: the architecture the replay walks (no weights, no memory)."""
    with torch.device("meta"):
        return hv.CausalVideoVAE(config)


def vae_params(config: hv.VAEConfig = hv.VAEConfig()) -> int:
    return sum(p.numel() for p in vae_model(config).parameters())


class Act(NamedTuple):
    """A live tensor of the replay: its ledger handle and shape (C, T, H, W) per sample."""

    handle: int
    shape: tuple[int, int, int, int]


class VAEReplay:
    """Encoder / decoder of one clip (or tile) of `batch` samples, `act_bytes` per element, into the ledger `t`."""

    def __init__(self, t: MemoryTrace, act_bytes: int, batch: int = 1, part: str = VAE_ACTS):
        self.t, self.a, self.batch, self.part = t, act_bytes, batch, part

    def alloc(self, shape, nbytes_per_element: int | None = None, part: str | None = None) -> Act:
        return Act(self.t.alloc(self.batch * math.prod(shape) * (nbytes_per_element or self.a), part or self.part), tuple(shape))

    def drop(self, *acts: Act | None) -> None:
        self.t.drop(*(a.handle for a in acts if a is not None))

    # ------------------------------------------------------------------------------ parts
    def norm_stats(self, x: Act) -> None:
        """group_norm_affine: one float32 `x - mean` of up to FRAMES_PER_CALL frames at a time."""
        c, f, h, w = x.shape
        self.drop(self.alloc((c, min(f, hv.FRAMES_PER_CALL), h, w), NORM_STATS_BYTES))

    def conv(self, conv: hv.CausalConv3d, source: tuple[int, int, int, int], upsample=None, overwrite: Act | None = None,
             shortcut: hv.nn.Conv3d | None = None) -> Act:
        """CausalConv3d.forward on what it sees, `source` (C, T, H, W); `upsample` (t, s, s): an Upsampled source
        (each call gathers its low-resolution frames); `overwrite`: the output goes into that tensor."""
        c_in, frames, h, w = source
        k, pad, (st, sh, sw) = conv.kernel_size, conv.kernel_size // 2, conv.conv.stride
        out_shape = (conv.conv.out_channels, (frames - 1) // st + 1, (h + 2 * pad - k) // sh + 1, (w + 2 * pad - k) // sw + 1)
        calls = math.ceil(out_shape[1] / hv.FRAMES_PER_CALL)
        per_call = math.ceil(out_shape[1] / calls)
        out = y = None
        for o0 in reversed(range(0, out_shape[1], per_call)):
            o1 = min(o0 + per_call, out_shape[1])
            first, stop = o0 * st - (k - 1), (o1 - 1) * st + 1
            buf = self.alloc((c_in, stop - first, h + 2 * pad, w + 2 * pad))
            if upsample:  # Upsampled.write: index_select of one low-resolution frame per frame written
                self.drop(self.alloc((c_in, stop - max(first, 0), h // upsample[1], w // upsample[2])))
            y_new = self.alloc((out_shape[0], o1 - o0, *out_shape[2:]))
            self.drop(buf, y)  # the argument, then the previous call's output as `y` is rebound
            y = y_new
            if shortcut is not None:  # residual(): the 1x1 convolution of this call's input frames
                self.drop(self.alloc((out_shape[0], o1 - o0, *out_shape[2:])))
            if calls == 1:
                return Act(y.handle, out_shape)
            out = out or overwrite or self.alloc(out_shape)
        self.drop(y)
        return Act(out.handle, out_shape)

    def resnet(self, block: hv.ResnetBlockCausal3D, x: Act) -> Act:
        """conv1 of silu(norm1(x)), then conv2 of silu(norm2(h)) plus x, written over h; x is held by the caller."""
        self.norm_stats(x)
        h = self.conv(block.conv1, x.shape)
        self.norm_stats(h)
        shortcut = block.conv_shortcut.conv if block.conv_shortcut is not None else None
        out = self.conv(block.conv2, h.shape, overwrite=h, shortcut=shortcut)
        if out.handle != h.handle:  # one call: conv2 returned a new tensor; h dies with the frame
            self.drop(h)
        return out

    def attention(self, x: Act) -> Act:
        """CausalAttention.forward: frame by frame fused attention over the frames up to it (no L x L mask)."""
        c, f, h, w = x.shape
        tokens = (f * h * w, c)
        normed = self.alloc(x.shape)
        flat = self.alloc(tokens)  # permute + reshape copies
        self.drop(normed)
        qkv = [self.alloc(tokens) for _ in range(3)]
        per_frame = [self.alloc((h * w, c)) for _ in range(f)]
        joined = self.alloc(tokens)
        self.drop(*per_frame)
        projected = self.alloc(tokens)
        self.drop(joined)
        out = self.alloc(x.shape)  # x + out
        self.drop(flat, *qkv, projected)
        return out

    def mid_block(self, block: hv.MidBlock, x: Act) -> Act:
        """resnets[1](attention(resnets[0](x))); x is held by the caller throughout."""
        first = self.resnet(block.resnets[0], x)
        attended = self.attention(first)
        self.drop(first)
        out = self.resnet(block.resnets[1], attended)
        self.drop(attended)
        return out

    def layer(self, layer, x: Act) -> Act:
        if isinstance(layer, hv.ResnetBlockCausal3D):
            return self.resnet(layer, x)
        if isinstance(layer, hv.Upsample):
            c, f, h, w = x.shape
            ft, fh, fw = layer.factor
            return self.conv(layer.conv, (c, 1 + (f - 1) * ft, h * fh, w * fw), upsample=layer.factor)
        return self.conv(layer.conv, x.shape)  # Downsample

    def encoder(self, model: hv.CausalVideoVAE, pixels: Act) -> Act:
        """Encoder.forward and quant_conv: pixels (3, F, H, W) -> moments (2 x latent channels, f, h, w)."""
        enc = model.encoder
        x = self.conv(enc.conv_in, pixels.shape)  # the pixels stay held by the caller
        for layer in [layer for block in enc.down_blocks for layer in block.layers()]:
            y = self.layer(layer, x)
            self.drop(x)
            x = y
        y = self.mid_block(enc.mid_block, x)
        self.drop(x)
        self.norm_stats(y)
        out = self.conv(enc.conv_out, y.shape)
        self.drop(y)
        moments = self.alloc(out.shape)  # quant_conv
        self.drop(out)
        return moments

    def decoder(self, model: hv.CausalVideoVAE, latents: Act) -> Act:
        """post_quant_conv and Decoder.forward: latents (16, f, h, w) -> pixels (3, F, H, W)."""
        dec = model.decoder
        z = self.alloc(latents.shape)  # post_quant_conv, the decoder's argument until it returns
        x = self.conv(dec.conv_in, z.shape)
        y = self.mid_block(dec.mid_block, x)
        self.drop(x)
        x = y
        for layer in [layer for block in dec.up_blocks for layer in block.layers()]:
            y = self.layer(layer, x)
            self.drop(x)
            x = y
        self.norm_stats(x)
        out = self.conv(dec.conv_out, x.shape)
        self.drop(x, z)
        return out


# ----------------------------------------------------------------------------------------- tiling


def tile_spans(size: int, tile: int, stride: int) -> list[int]:
    """Extents of the tiles along one axis: a tile every `stride` while its start is inside (smaller at the edge)."""
    return [min(tile, size - start) for start in range(0, size, stride)]


def stitch(r: VAEReplay, rows: list[list[Act]], blend: int, keep: int) -> Act:
    """vae_tiling._stitch: blend each tile into its upper and left neighbours, crop, join rows, join the rows."""
    joined_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            c, f, h, w = tile.shape
            if i > 0:  # prev * (1 - w), cur * w, their sum
                r.drop(*[r.alloc((c, f, min(blend, h, rows[i - 1][j].shape[2]), w)) for _ in range(3)])
            if j > 0:
                r.drop(*[r.alloc((c, f, h, min(blend, w, row[j - 1].shape[3]))) for _ in range(3)])
        c, f = row[0].shape[:2]
        joined_rows.append(r.alloc((c, f, min(keep, row[0].shape[2]), sum(min(keep, tile.shape[3]) for tile in row))))
    c, f = joined_rows[0].shape[:2]
    out = r.alloc((c, f, sum(row.shape[2] for row in joined_rows), joined_rows[0].shape[3]))
    r.drop(*joined_rows, *(tile for row in rows for tile in row))
    return out


def decode(r: VAEReplay, model: hv.CausalVideoVAE, latents: Act, tile_px: int | None) -> Act:
    """CausalVideoVAE.decode of latents (16, f, h, w) held by the caller, in spatial tiles of `tile_px` (None: untiled)."""
    ratio = model.config.spatial_compression
    c, f, h, w = latents.shape
    tile = tile_px // ratio if tile_px else max(h, w)
    if h <= tile and w <= tile:
        return r.decoder(model, latents)
    stride = int(tile_px * (1 - OVERLAP))
    spans = [tile_spans(size, tile, stride // ratio) for size in (h, w)]
    rows = [[r.decoder(model, Act(latents.handle, (c, f, th, tw))) for tw in spans[1]] for th in spans[0]]
    return stitch(r, rows, tile_px - stride, stride)


def encode(r: VAEReplay, model: hv.CausalVideoVAE, pixels: Act, tile_px: int | None) -> Act:
    """CausalVideoVAE.encode of pixels (3, F, H, W) held by the caller: the moments (tiled as `decode`)."""
    ratio = model.config.spatial_compression
    c, f, h, w = pixels.shape
    if not tile_px or (h <= tile_px and w <= tile_px):
        return r.encoder(model, pixels)
    stride = int(tile_px * (1 - OVERLAP))
    spans = [tile_spans(size, tile_px, stride) for size in (h, w)]
    rows = [[r.encoder(model, Act(pixels.handle, (c, f, th, tw))) for tw in spans[1]] for th in spans[0]]
    return stitch(r, rows, tile_px // ratio - stride // ratio, stride // ratio)


# ----------------------------------------------------------------------------------------- stages


def vae_decode_stage(frames: int, height: int, width: int, tiling: bool = True, tile_px: int = 256, act_bytes: int = 2,
                     config: hv.VAEConfig = hv.VAEConfig()) -> MemoryTrace:
    """inference.outputs.decode_to_frames of one video (generation decodes its videos one at a time): the latents
    (16, (frames-1)/4+1, height/8, width/8) in the VAE's dtype, decoded, then converted to uint8 frames."""
    t = MemoryTrace()
    t.where = "VAE decode"
    t.alloc(vae_params(config) * act_bytes, VAE_WEIGHTS)
    r = VAEReplay(t, act_bytes)
    s = config.spatial_compression
    latents = r.alloc((config.latent_channels, hv.latent_frames(frames), height // s, width // s), part=VAE_IN)
    pixels = decode(r, vae_model(config), latents, tile_px if tiling else None)
    out = VAEReplay(t, act_bytes, part=VAE_OUT)
    value = pixels if act_bytes == 4 else out.alloc(pixels.shape, 4)  # .float()
    for _ in range(5):  # / 2, + 0.5, clamp, * 255, round: each a new float32 tensor, the previous one a dropped temporary
        new = out.alloc(pixels.shape, 4)
        if value is not pixels:
            out.drop(value)
        value = new
    frames_u8 = out.alloc(pixels.shape, 1)
    out.drop(value, pixels, latents, frames_u8)
    return t


def vae_encode_stage(frames: int, height: int, width: int, batch: int = 1, tiling: bool = False, tile_px: int = 256,
                     act_bytes: int = 2, config: hv.VAEConfig = hv.VAEConfig()) -> MemoryTrace:
    """cache_latents' `vae.encode(pixels).sample(generator)` of (batch, 3, frames, height, width) pixels."""
    t = MemoryTrace()
    t.where = "VAE encode"
    t.alloc(vae_params(config) * act_bytes, VAE_WEIGHTS)
    r = VAEReplay(t, act_bytes, batch)
    pixels = r.alloc((config.in_channels, frames, height, width), part=VAE_IN)
    moments = encode(r, vae_model(config), pixels, tile_px if tiling else None)
    half = (moments.shape[0] // 2, *moments.shape[1:])
    logvar = r.alloc(half)  # DiagonalGaussian: the clamped log-variance, exp(0.5 * logvar)
    scaled = r.alloc(half)
    std = r.alloc(half)
    r.drop(scaled)
    noise = r.alloc(half)  # sample(): mean + std * noise
    product = r.alloc(half)
    sample = r.alloc(half)
    r.drop(product, noise, logvar, std, moments, sample, pixels)
    return t
