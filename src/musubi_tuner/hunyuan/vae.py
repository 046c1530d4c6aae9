"""HunyuanVideo's causal 3D VAE ("884-16c-hy"): 16 latent channels, 4x temporal and 8x spatial compression.

State-dict keys are the official `vae/pytorch_model.pt` names (the same in diffusers). Causal means a
frame never sees later frames: convolutions pad the past only (replicating the first frame) and the
mid-block attention lets frame i attend to frames <= i. So the first frame is encoded alone, and an
image is a 1-frame video. Latents in and out of this module are UNSCALED (what caches hold); the
diffusion model works on latents x SCALING_FACTOR.

The VAE is frozen and runs without autograd: the convolutions stream their input a few frames at a time
and write over tensors they no longer need (see CausalConv3d), which keeps about two full-resolution
tensors alive where a plain implementation holds four or five. docs/vae.md has the figures.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.dtypes import cpu_lacks_fast_float16
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.model_kinds import is_kind, what_weights_are

SCALING_FACTOR = 0.476986
GROUP_NORM_EPS = 1e-6


def latent_frames(frames: int) -> int:
    """Latent frames of a (4N+1)-frame video: (F - 1) // 4 + 1."""
    return (frames - 1) // 4 + 1


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    temporal_compression: int = 4
    spatial_compression: int = 8

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent of a frames x height x width video."""
        s = self.spatial_compression
        return (self.latent_channels, (frames - 1) // self.temporal_compression + 1, height // s, width // s)

    def downsample_strides(self) -> list[tuple[int, int, int] | None]:
        """(t, h, w) stride of each encoder block's downsampler (None: no downsampler). The decoder mirrors it.

        Spatial halving in the first log2(8) = 3 blocks; temporal halving in the log2(4) = 2 blocks before the last.
        """
        n = len(self.block_out_channels)
        spatial = int(math.log2(self.spatial_compression))
        temporal = int(math.log2(self.temporal_compression))
        strides = []
        for i in range(n):
            s = 2 if i < spatial else 1
            t = 2 if (n - 1 - temporal) <= i < n - 1 else 1
            strides.append(None if (s, t) == (1, 1) else (t, s, s))
        return strides

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str = "VAE checkpoint") -> "VAEConfig":
        """The config read off the shapes of the convolution weights that fix it; a file whose tensors cannot be those
        weights (absent, of another rank, with no channels) is a one-line UserError naming the file and the key."""

        def need(key):
            if key not in shapes:
                sample = ", ".join(sorted(shapes)[:4]) or "no keys"
                raise UserError(f"{source}: not a HunyuanVideo VAE (missing {key!r}; first keys: {sample})")
            return conv_weight(key)

        def conv_weight(key):  # (out, in, t, h, w) of a 3D convolution, each at least 1
            shape = tuple(shapes[key])
            if len(shape) != 5 or min(shape) < 1:
                what = "a 5-D convolution weight" if len(shape) != 5 else "no dimension of size 0"
                raise UserError(f"{source}: not a HunyuanVideo VAE: {key} has shape {list(shape)}, expected {what} "
                                "(the file is damaged or not a VAE: restore it from the model's download)")
            return shape

        channels = []
        i = 0
        while f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight" in shapes:
            channels.append(conv_weight(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0])
            i += 1
        if not channels:
            need("encoder.down_blocks.0.resnets.0.conv1.conv.weight")
        layers = len({m.group(1) for k in shapes if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
        if any(c % 32 for c in channels):  # GroupNorm's 32 groups are not stored in the file; channels must allow them
            raise UserError(f"{source}: VAE block widths {channels} are not multiples of 32 (its GroupNorms use 32 groups)")
        spatial = 2 ** sum(1 for j in range(len(channels)) if f"encoder.down_blocks.{j}.downsamplers.0.conv.conv.weight" in shapes)
        return cls(
            in_channels=need("encoder.conv_in.conv.weight")[1],
            latent_channels=need("decoder.conv_in.conv.weight")[1],
            block_out_channels=tuple(channels),
            layers_per_block=layers,
            spatial_compression=spatial,
        )


# ----------------------------------------------------------------------------------------- parts


# A causal convolution computes at most this many output frames per call, on a padded copy of only the
# input frames those need (normalised and activated, or upsampled, on the way). So no full-size
# normalised, upsampled or padded copy of a tensor exists. On the CPU, calls of 3-4 frames ran within a
# few % of whole-clip calls; 1-frame calls were 1.6x slower, hence the even split (9 frames: 3 x 3).
FRAMES_PER_CALL = 4


class Frames:
    """What a causal convolution reads, a frame range at a time: here the tensor x (B, C, T, H, W) itself."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.shape = tuple(x.shape)  # (B, C, T, H, W) of what the convolution sees

    def write(self, dst: torch.Tensor, start: int, stop: int) -> None:
        """Write frames [start, stop) of what the convolution sees into dst (B, C, stop - start, H, W)."""
        dst.copy_(self.x[:, :, start:stop])


class NormSiLU(Frames):
    """silu(group_norm(x)): statistics taken once over the whole tensor, applied per frame range."""

    def __init__(self, norm: nn.GroupNorm, x: torch.Tensor):
        super().__init__(x)
        self.scale, self.shift = group_norm_affine(norm, x)

    def write(self, dst: torch.Tensor, start: int, stop: int) -> None:
        F.silu(torch.addcmul(self.shift, self.x[:, :, start:stop], self.scale, out=dst), inplace=True)


class Upsampled(Frames):
    """x upsampled by nearest neighbour by (t, s, s), the first frame in space only: T -> t(T - 1) + 1 frames."""

    def __init__(self, x: torch.Tensor, factor: tuple[int, int, int]):
        super().__init__(x)
        self.factor = factor
        B, C, T, H, W = x.shape
        self.shape = (B, C, 1 + (T - 1) * factor[0], H * factor[1], W * factor[2])

    def write(self, dst: torch.Tensor, start: int, stop: int) -> None:
        ft, fh, fw = self.factor
        index = torch.tensor([0 if j == 0 else 1 + (j - 1) // ft for j in range(start, stop)], device=self.x.device)
        src = self.x.index_select(2, index)
        B, C, n, H, W = src.shape
        dst.unflatten(4, (W, fw)).unflatten(3, (H, fh)).copy_(src[:, :, :, :, None, :, None].expand(B, C, n, H, fh, W, fw))


def group_norm_affine(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (B, C, 1, 1, 1), float32 (float64 for a float64 x), such that norm(x) = x * scale + shift
    (as PyTorch's kernel computes it).

    Two passes over frame ranges: no full-size temporary and no float32 copy of a half-precision x (torch.var_mean
    would need one). The second sums the squares of x - mean, and its sum of x - mean corrects the mean: both then
    lie within float32 rounding of a float64 computation, on flat frames (a variance far below the mean's square)
    and on frames of high dynamic range alike. A norm of the deviations, squared, was up to 4e-5 off (and 13% faster).
    """
    B, C, T, H, W = x.shape
    groups = norm.num_groups
    count = C // groups * T * H * W
    dtype = torch.promote_types(x.dtype, torch.float32)
    mean = x.view(B, groups, -1).sum(dim=2, dtype=dtype) / count
    deviation = torch.zeros_like(mean)
    m2 = torch.zeros_like(mean)
    for start in range(0, T, FRAMES_PER_CALL):
        part = x[:, :, start : start + FRAMES_PER_CALL].view(B, groups, C // groups, -1) - mean[:, :, None, None]  # no copy of x
        deviation += part.sum(dim=(2, 3))
        m2 += part.square_().sum(dim=(2, 3))
        del part  # before the next range's is made: one range's float32 copy at a time
    deviation /= count
    mean += deviation
    variance = m2 / count - deviation.square()
    rstd = torch.rsqrt(variance + norm.eps).repeat_interleave(C // groups, dim=1)
    scale = rstd * norm.weight.to(dtype)
    shift = norm.bias.to(dtype) - mean.repeat_interleave(C // groups, dim=1) * scale
    return scale.view(B, C, 1, 1, 1), shift.view(B, C, 1, 1, 1)


def padded_frames(source: Frames, first: int, stop: int, pad: int) -> torch.Tensor:
    """Frames [first, stop) of `source` (frames before 0 repeat frame 0), edges replicated by `pad` pixels: what a
    causal convolution reads. Written straight into one new buffer: the source's frames pass through memory once."""
    B, C, _, H, W = source.shape
    buf = torch.empty(B, C, stop - first, H + 2 * pad, W + 2 * pad, dtype=source.x.dtype, device=source.x.device)
    lead = max(0, -first)
    source.write(buf[:, :, lead:, pad : pad + H, pad : pad + W], first + lead, stop)
    if pad:
        body = buf[:, :, lead:]
        body[:, :, :, :pad, pad : pad + W] = body[:, :, :, pad : pad + 1, pad : pad + W]
        body[:, :, :, pad + H :, pad : pad + W] = body[:, :, :, pad + H - 1 : pad + H, pad : pad + W]
        body[:, :, :, :, :pad] = body[:, :, :, :, pad : pad + 1]
        body[:, :, :, :, pad + W :] = body[:, :, :, :, pad + W - 1 : pad + W]
    if lead:
        buf[:, :, :lead] = buf[:, :, lead : lead + 1]
    return buf


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`; on the CPU, float32 always through oneDNN, and float16 in float32 where oneDNN has no float16.

    PyTorch picks oneDNN for a CPU convolution only when N x C x T x H of the input exceeds 20,480 (a rule made for
    2D convolutions); smaller inputs go to an im2col kernel that is 2-3x slower at the VAE's widths (10x when two
    processes share the cores). The VAE's short frame windows, column chunks and small tiles are such inputs: a
    128 px tiled decode took 1.7x longer before. A float16 convolution on a CPU without oneDNN float16 support
    (no AVX512-FP16 / AMX-FP16) runs a scalar kernel 60-140x slower than float32, and float16 is the VAE's default
    dtype: it is computed in float32 and rounded back (float32 accumulation: no less exact). bfloat16
    keeps PyTorch's choice.
    """
    if (x.device.type == "cpu" and x.dtype == conv.weight.dtype and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available()
            and (x.dtype == torch.float32 or x.dtype == torch.float16 and cpu_lacks_fast_float16())):
        bias = None if conv.bias is None else conv.bias.float()  # .float() of a float32 tensor is the tensor itself
        return torch.ops.aten.mkldnn_convolution(x.float(), conv.weight.float(), bias, conv.padding, conv.stride,
                                                 conv.dilation, conv.groups).to(x.dtype)
    return conv(x)


class CausalConv3d(nn.Module):
    """Conv3d after padding k-1 past frames (copies of the first) and k//2 replicated pixels on each side (`conv` holds
    the weights). Inference only: the VAE runs under torch.no_grad().

    The input is a tensor or a `Frames` source (normalised, upsampled), read FRAMES_PER_CALL output frames' worth at a
    time, last frames first. A call reads no input frame later than those it writes, so with `overwrite` the output
    goes into the source's own tensor (the ResNet block's second convolution: one full tensor fewer).
    `residual(start, stop)`, if given, is added to output frames [start, stop). With `chunk_size`, each call is further
    split into column chunks (`--vae_chunk_size`): the same result, a smaller convolution working set.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int | tuple[int, int, int] = 1):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride)
        self.chunk_size: int | None = None

    def forward(self, x: torch.Tensor | Frames, overwrite: bool = False, residual=None) -> torch.Tensor:
        source = x if isinstance(x, Frames) else Frames(x)
        k, pad, stride = self.kernel_size, self.kernel_size // 2, self.conv.stride[0]
        frames_out = (source.shape[2] - 1) // stride + 1
        calls = math.ceil(frames_out / FRAMES_PER_CALL)
        per_call = math.ceil(frames_out / calls)
        out = None
        for o0 in reversed(range(0, frames_out, per_call)):
            o1 = min(o0 + per_call, frames_out)
            first, stop = o0 * stride - (k - 1), (o1 - 1) * stride + 1  # input frames read; those before 0 repeat frame 0
            y = self._conv(padded_frames(source, first, stop, pad))
            if residual is not None:
                y += residual(o0, o1)
            if calls == 1:
                return y
            if out is None:
                out = source.x if overwrite else y.new_empty((y.shape[0], y.shape[1], frames_out, *y.shape[3:]))
            out[:, :, o0:o1] = y
        return out

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of a padded input, in column chunks of about `chunk_size` when it is at least 1.5 chunks wide."""
        width = x.shape[-1]
        if not self.chunk_size or width < 1.5 * self.chunk_size:
            return conv3d(self.conv, x)
        k, stride = self.kernel_size, self.conv.stride[2]
        out_width = (width - k) // stride + 1
        step = max(1, self.chunk_size // stride)
        pieces = []
        for start in range(0, out_width, step):
            stop = min(start + step, out_width)
            if out_width - stop < step // 2:  # fold a small trailing piece into this one
                stop = out_width
            pieces.append(conv3d(self.conv, x[..., start * stride : (stop - 1) * stride + k]))
            if stop == out_width:
                break
        return torch.cat(pieces, dim=-1)


class ResnetBlockCausal3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + conv2(silu(norm2(conv1(silu(norm1(x)))))) (x through a 1x1 conv if the width changes); x is not modified."""
        h = self.conv1(NormSiLU(self.norm1, x))
        if self.conv_shortcut is None:
            def residual(start, stop):
                return x[:, :, start:stop]
        else:
            def residual(start, stop):
                return conv3d(self.conv_shortcut.conv, x[:, :, start:stop])
        return self.conv2(NormSiLU(self.norm2, h), overwrite=True, residual=residual)  # written over h: one tensor fewer


class CausalAttention(nn.Module):
    """Single-head self-attention over all (frame, y, x) positions; frame i attends to frames <= i."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        hw = H * W
        tokens = self.group_norm(x).permute(0, 2, 3, 4, 1).reshape(B, 1, T * hw, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        # Block-causal attention without an (L x L) mask: each frame's queries see the keys of frames 0..t.
        out = torch.cat([
            F.scaled_dot_product_attention(q[:, :, t * hw : (t + 1) * hw], k[:, :, : (t + 1) * hw], v[:, :, : (t + 1) * hw])
            for t in range(T)
        ], dim=2)
        out = self.to_out[0](out).reshape(B, T, H, W, C).permute(0, 4, 1, 2, 3)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(channels, channels, groups), ResnetBlockCausal3D(channels, channels, groups)])
        self.attentions = nn.ModuleList([CausalAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a causal conv; the first frame is upsampled in space only (T -> 2T - 1)."""

    def __init__(self, channels: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(Upsampled(x, self.factor))  # upsampled a few frames at a time, never all at once


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, stride):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels, stride)]) if stride else None

    def layers(self) -> list[nn.Module]:
        """The resnets then the downsampler, for the encoder to run in its own loop (see Encoder.forward)."""
        return [*self.resnets, *(self.downsamplers or [])]


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, factor):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels, factor)]) if factor else None

    def layers(self) -> list[nn.Module]:
        """The resnets then the upsampler, for the decoder to run in its own loop (see Decoder.forward)."""
        return [*self.resnets, *(self.upsamplers or [])]


class Encoder(nn.Module):
    """(B, 3, F, H, W) pixels -> (B, 2 * latent_channels, f, h, w) mean and log-variance (before quant_conv)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = c.block_out_channels
        self.conv_in = CausalConv3d(c.in_channels, ch[0], 3)
        strides = c.downsample_strides()
        self.down_blocks = nn.ModuleList([DownBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c.norm_num_groups, strides[i]) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], c.norm_num_groups)
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[-1], eps=GROUP_NORM_EPS)
        self.conv_out = CausalConv3d(ch[-1], 2 * c.latent_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        # One flat loop over every layer: a nested block.forward would keep the block's input alive in this frame
        # while the block's later layers run (one full-resolution tensor more at the peak).
        for layer in [layer for block in self.down_blocks for layer in block.layers()]:
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(NormSiLU(self.conv_norm_out, x))


class Decoder(nn.Module):
    """(B, latent_channels, f, h, w) -> (B, 3, 4(f-1)+1, 8h, 8w) pixels in about [-1, 1] (after post_quant_conv)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        ch = tuple(reversed(c.block_out_channels))
        self.conv_in = CausalConv3d(c.latent_channels, ch[0], 3)
        self.mid_block = MidBlock(ch[0], c.norm_num_groups)
        strides = c.downsample_strides()  # the decoder's block i upsamples by what the encoder's block i downsamples
        self.up_blocks = nn.ModuleList([UpBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, c.norm_num_groups, strides[i]) for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[-1], eps=GROUP_NORM_EPS)
        self.conv_out = CausalConv3d(ch[-1], c.in_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for layer in [layer for block in self.up_blocks for layer in block.layers()]:  # flat, as in Encoder.forward
            x = layer(x)
        return self.conv_out(NormSiLU(self.conv_norm_out, x))


class DiagonalGaussian:
    """The encoder's posterior: mean and log-variance (clamped to [-30, 20]), each (B, C, f, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std x noise drawn on the generator's device (a CPU generator gives the same sample on any device, as
        diffusers' randn_tensor draws it; drawn on the GPU with it, I2V and V2V failed on CUDA: fuzz_aj 6)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


# ----------------------------------------------------------------------------------------- the model


class CausalVideoVAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        self.tiling = None  # set by set_memory_options
        self.tile_share = None  # several processes decoding one video: a distributed.WorkShare splits the spatial tiles

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def set_memory_options(self, *, tiling: bool = False, spatial_tile_sample_min_size: int | None = None,
                           chunk_size: int | None = None, temporal_tiling: bool = False) -> None:
        """Spatial tiling (tiles of `spatial_tile_sample_min_size` px, default 256, overlap 1/4, blended),
        temporal tiling (64-frame tiles, overlap 1/4) and chunked causal convolutions (`chunk_size` columns)."""
        from musubi_tuner.hunyuan.vae_tiling import TilingOptions

        spatial = tiling or spatial_tile_sample_min_size is not None
        self.tiling = TilingOptions(spatial=spatial, tile_sample_size=spatial_tile_sample_min_size or 256,
                                    temporal=temporal_tiling) if (spatial or temporal_tiling) else None
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.chunk_size = chunk_size if chunk_size and chunk_size > 0 else None

    def _encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        return conv3d(self.quant_conv, self.encoder(pixels))

    def _decode_untiled(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(conv3d(self.post_quant_conv, latents))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> DiagonalGaussian:
        """pixels (B, 3, F, H, W) in [-1, 1] with F = 4N+1 (or 1) and H, W multiples of 8 -> the posterior."""
        if pixels.ndim != 5 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"expected pixels (B, {self.config.in_channels}, F, H, W), got {tuple(pixels.shape)}")
        pixels = pixels.to(self.dtype)
        if self.tiling is not None:
            from musubi_tuner.hunyuan.vae_tiling import tiled_encode

            return DiagonalGaussian(tiled_encode(self, pixels, self.tiling))
        return DiagonalGaussian(self._encode_moments(pixels))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """UNSCALED latents (B, 16, f, h, w) -> pixels (B, 3, 4(f-1)+1, 8h, 8w), about [-1, 1], not clamped."""
        latents = latents.to(self.dtype)
        if self.tiling is not None:
            from musubi_tuner.hunyuan.vae_tiling import tiled_decode

            return tiled_decode(self, latents, self.tiling)
        return self._decode_untiled(latents)


# ----------------------------------------------------------------------------------------- loading


# the largest latent value (scaled, as caches and saved latents hold it) read as one the VAE could have encoded: its
# latents stay within a few units; one of 60,000 or 1e30 is a damaged file or a diverged sampling's
LATENT_FAR = 1e3
VAE_CAST_ADVICE = "compute in float32 (--vae_dtype float32)"


def check_vae_weights(path: str | os.PathLike) -> None:
    """Read every weight of the VAE file once, as stored, and refuse one that holds NaN or infinity: generation loads the
    VAE after all the sampling steps, and a damaged decoder weight was found only then."""
    f, _ = open_vae_file(path)
    for key in f.keys():
        f.finite(key, f.get(key), VAE_CAST_ADVICE)


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> CausalVideoVAE:
    """The official `vae/pytorch_model.pt` (a plain state dict, or under `state_dict`, or with `vae.` prefixes) or
    safetensors; the config is read off the weights, so tiny VAEs load too. Frozen, in eval mode."""
    f, config = open_vae_file(path)
    with torch.device("meta"):
        model = CausalVideoVAE(config)
    # (every weight checked as it loads: a NaN in a decoder weight was found only after all the sampling steps)
    model.load_state_dict({k: f.finite(k, f.get(k, dtype=dtype, device=device), VAE_CAST_ADVICE)
                           for k in model.state_dict()}, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def open_vae_file(path: str | os.PathLike):
    """The file's tensors and the VAE config read off them, every key and shape checked; no weights are read.

    Lets a command refuse a wrong --vae before hours of other work (generation uses the VAE last)."""
    from musubi_tuner.files import StateDictFile, require_file

    require_file(path, "VAE checkpoint", "--vae")  # (every command takes the VAE as --vae: named when it is not a file)
    f = StateDictFile(path, what="VAE checkpoint", subdict_keys=("state_dict",))
    f.strip_prefix("vae.")
    other = what_weights_are(f.keys())  # (a file given to the wrong flag: said which one it goes to)
    if other is not None and not is_kind(other, "a VAE"):
        raise UserError(f"{f.path}: not a VAE: this is {other}")
    config = VAEConfig.from_shapes(f.shapes(), source=str(f.path))
    with torch.device("meta"):
        model = CausalVideoVAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in f]
    unexpected = [k for k in f.keys() if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{f.path}: not a complete HunyuanVideo VAE: keys {'; '.join(detail)}")
    for k, shape in expected.items():
        if tuple(f.shape(k)) != shape:
            raise UserError(f"{f.path}: tensor {k} has shape {list(f.shape(k))}, expected {list(shape)}")
    for k in expected:  # integer or bool weights would be cast into a VAE that encodes garbage
        if not f.dtype(k).is_floating_point:
            raise UserError(f"{f.path}: tensor {k} is {str(f.dtype(k)).removeprefix('torch.')}; a VAE's weights are "
                            "floating point (the file is damaged or not a VAE: restore it from the model's download)")
    return f, config
