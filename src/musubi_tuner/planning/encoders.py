"""Memory of the stages around the DiT: the two text encoders and the causal 3D VAE.

These models are loaded one at a time, used, and freed (inference.pipeline), so each is a stage of its
own. The text encoders are standard transformers models whose activations at 351 tokens are small next
to their weights. The VAE is the opposite: 0.5 GB of weights and activations of up to 900 channels of
full-resolution video per tile; its replay below (checked against diffusers' implementation of the same
architecture by bench/vae_plan_vs_diffusers.py) walks the decoder and encoder of the published
architecture (musubi-tuner-behaviour.md 4.2, 4.3) with the same ledger as the DiT:

- a ResNet block holds its input (the residual), the norm/SiLU output, the causally padded copy the
  convolution reads and the convolution's output;
- an up / down block's input stays alive until the block returns (the decoder's loop holds it);
- an upsampler holds the interpolated frames, their concatenation and the padded copy;
- the mid-block attention builds a frame-causal additive mask of L x L for the L latent tokens of a
  tile (as the official and diffusers code do);
- spatial tiling decodes tiles of `tile` pixels (latent tile / 8) at a stride of 3/4 tile, every
  frame at once (musubi-tuner's HunyuanVideo scripts do not tile in time), keeps the decoded tiles
  until they are blended, then concatenates them.
`--vae_chunk_size` splits each convolution along the width: the same tensors, a bounded convolution
workspace (cuDNN's workspace is not modeled).
"""

from __future__ import annotations

from musubi_tuner.planning.sizes import (
    CLIP_HIDDEN,
    CLIP_LAYERS,
    CLIP_PARAMS,
    CLIP_TOKENS,
    LLM_EMBEDDING_PARAMS,
    LLM_HIDDEN,
    LLM_LAYERS,
    LLM_MLP,
    LLM_PARAMS,
    LLM_PROMPT_TOKENS,
    VAE_BLOCK_CHANNELS,
    VAE_LATENT_CHANNELS,
    VAE_PARAMS,
)
from musubi_tuner.planning.trace import MemoryTrace

TE_WEIGHTS = "text encoder weights"
TE_ACTS = "text encoder activations"
VAE_WEIGHTS = "VAE weights"
VAE_ACTS = "VAE activations (one tile)"
VAE_MASK = "VAE mid-block attention mask"
VAE_OUT = "decoded tiles and the blended video"
VAE_IN = "input frames and latents"


def llm_stage(prompts: int, fp8: bool, act_bytes: int = 2) -> MemoryTrace:
    """The LLM (text encoder 1) encoding `prompts` prompts of 351 tokens, all hidden states returned."""
    t = MemoryTrace()
    t.where = "LLM forward"
    if fp8:  # every Linear in float8, the embedding kept in fp16
        t.alloc(LLM_EMBEDDING_PARAMS * 2 + (LLM_PARAMS - LLM_EMBEDDING_PARAMS), TE_WEIGHTS + " (fp8)")
    else:
        t.alloc(LLM_PARAMS * 2, TE_WEIGHTS + " (fp16)")
    tokens = prompts * LLM_PROMPT_TOKENS
    states = t.alloc((LLM_LAYERS + 1) * tokens * LLM_HIDDEN * act_bytes, TE_ACTS)  # output_hidden_states keeps every layer's
    mlp = t.alloc(3 * tokens * LLM_MLP * act_bytes, TE_ACTS)  # gate, up, act * up
    if fp8:  # autocast upcasts one Linear's weight per call (the MLP's are the largest)
        t.drop(t.alloc(LLM_MLP * LLM_HIDDEN * act_bytes, TE_ACTS + " (upcast weight)"))
    t.drop(mlp, states)
    return t


def clip_stage(prompts: int) -> MemoryTrace:
    t = MemoryTrace()
    t.where = "CLIP forward"
    t.alloc(CLIP_PARAMS * 2, TE_WEIGHTS + " (fp16)")
    t.drop(t.alloc((CLIP_LAYERS + 1) * prompts * CLIP_TOKENS * 4 * CLIP_HIDDEN * 2, TE_ACTS))
    return t


class _VAEReplay:
    """The decoder / encoder of the causal 3D VAE on one tile of (frames, height, width) pixels."""

    def __init__(self, t: MemoryTrace, act_bytes: int):
        self.t = t
        self.a = act_bytes

    def tensor(self, channels: int, shape: tuple[int, int, int]) -> int:
        f, h, w = shape
        return self.t.alloc(channels * f * h * w * self.a, VAE_ACTS)

    def conv(self, x: int, c_in: int, c_out: int, shape, out_shape=None) -> int:
        """CausalConv3d: replicate-pad (a copy of the input), then the convolution."""
        f, h, w = shape
        padded = self.tensor(c_in, (f + 2, h + 2, w + 2))
        out = self.tensor(c_out, out_shape or shape)
        self.t.drop(padded)
        return out

    def resnet(self, x: int, c_in: int, c_out: int, shape) -> int:
        """norm1, SiLU, conv1, norm2, SiLU, conv2, plus the (1x1-projected) input."""
        normed = self.tensor(c_in, shape)
        act = self.tensor(c_in, shape)
        self.t.drop(normed)
        h = self.conv(act, c_in, c_out, shape)
        self.t.drop(act)
        normed = self.tensor(c_out, shape)
        self.t.drop(h)
        act = self.tensor(c_out, shape)
        self.t.drop(normed)
        h = self.conv(act, c_out, c_out, shape)
        self.t.drop(act)
        shortcut = self.tensor(c_out, shape) if c_in != c_out else None
        out = self.tensor(c_out, shape)
        self.t.drop(h, shortcut)
        return out

    def attention(self, x: int, c: int, shape) -> int:
        """Mid-block self-attention over every latent token of the tile, frame-causal mask (L x L)."""
        f, h, w = shape
        tokens = f * h * w
        mask = self.t.alloc(tokens * tokens * self.a, VAE_MASK)
        normed = self.tensor(c, shape)
        qkv = [self.tensor(c, shape) for _ in range(3)]
        out = self.tensor(c, shape)
        self.t.drop(mask, normed, *qkv)
        result = self.tensor(c, shape)
        self.t.drop(out)
        return result

    def stage(self, x: int, c_in: int, c_out: int, shape, resnets: int) -> int:
        """ResNet blocks in a row; the stage's input stays held by its caller (dropped by the caller)."""
        for i in range(resnets):
            y = self.resnet(x, c_in if i == 0 else c_out, c_out, shape)
            if i:
                self.t.drop(x)
            x = y
        return x

    def decode(self, latent_shape: tuple[int, int, int]) -> None:
        channels = list(reversed(VAE_BLOCK_CHANNELS))  # 512, 512, 256, 128
        f, h, w = latent_shape
        z = self.tensor(VAE_LATENT_CHANNELS, latent_shape)
        x = self.conv(z, VAE_LATENT_CHANNELS, channels[0], latent_shape)
        mid_in = x
        x = self.stage(x, channels[0], channels[0], latent_shape, 1)
        y = self.attention(x, channels[0], latent_shape)
        self.t.drop(x)
        x = self.stage(y, channels[0], channels[0], latent_shape, 1)
        self.t.drop(y, mid_in)
        shape = latent_shape
        c_prev = channels[0]
        for i, c in enumerate(channels):
            block_in = x  # the decoder's loop holds an up block's input until the block returns
            x = self.stage(x, c_prev, c, shape, 3)
            c_prev = c
            if i < len(channels) - 1:  # upsample: 2x in space; 2x in time (the first frame alone) in the first two
                frames = shape[0] * 2 - 1 if i < 2 else shape[0]
                up_shape = (frames, shape[1] * 2, shape[2] * 2)
                pieces = self.tensor(c, up_shape)  # the first frame and the rest, interpolated (locals until return)
                joined = self.tensor(c, up_shape)
                y = self.conv(joined, c, c, up_shape)
                self.t.drop(pieces, joined, x)
                x = y
                shape = up_shape
            self.t.drop(block_in)
        normed = self.tensor(c_prev, shape)
        act = self.tensor(c_prev, shape)
        self.t.drop(normed, x)
        out = self.conv(act, c_prev, 3, shape)
        self.t.drop(act, out, z)

    def encode(self, pixel_shape: tuple[int, int, int]) -> None:
        channels = VAE_BLOCK_CHANNELS  # 128, 256, 512, 512
        pixels = self.tensor(3, pixel_shape)
        x = self.conv(pixels, 3, channels[0], pixel_shape)
        shape = pixel_shape
        c_prev = channels[0]
        for i, c in enumerate(channels):
            block_in = x  # held by the encoder's loop until the down block returns
            x = self.stage(x, c_prev, c, shape, 2)
            c_prev = c
            if i < len(channels) - 1:  # downsample: 2x in space in the first three, 2x in time in blocks 1 and 2
                frames = (shape[0] - 1) // 2 + 1 if i in (1, 2) else shape[0]
                down = (frames, shape[1] // 2, shape[2] // 2)
                y = self.conv(x, c, c, shape, down)
                self.t.drop(x)
                x, shape = y, down
            self.t.drop(block_in)
        mid_in = x
        x = self.stage(x, c_prev, c_prev, shape, 1)
        y = self.attention(x, c_prev, shape)
        self.t.drop(x)
        x = self.stage(y, c_prev, c_prev, shape, 1)
        self.t.drop(y, mid_in)
        out = self.conv(x, c_prev, 2 * VAE_LATENT_CHANNELS, shape)
        self.t.drop(x, out, pixels)


def _tiles(size_px: int, tile_px: int) -> int:
    """Tiles along one axis: every 3/4 tile from the start while the start is inside the image."""
    stride = int(tile_px * 0.75)
    return max(1, -(-size_px // stride))


def vae_decode_stage(frames: int, height: int, width: int, batch: int = 1, tiling: bool = True, tile_px: int = 256,
                     act_bytes: int = 2) -> MemoryTrace:
    """Decoding a (batch, 16, (frames-1)/4+1, height/8, width/8) latent into video."""
    t = MemoryTrace()
    t.where = "VAE decode"
    t.alloc(VAE_PARAMS * act_bytes, VAE_WEIGHTS)
    latent_frames = (frames - 1) // 4 + 1
    t.alloc(batch * VAE_LATENT_CHANNELS * latent_frames * (height // 8) * (width // 8) * 4, VAE_IN)
    tiled = tiling and (height > tile_px or width > tile_px)
    tile_h, tile_w = (min(tile_px, height), min(tile_px, width)) if tiled else (height, width)
    n_tiles = _tiles(height, tile_px) * _tiles(width, tile_px) if tiled else 1
    decoded = []
    for _ in range(min(n_tiles, 2)):  # every tile peaks alike; the decoded ones pile up until blending
        _VAEReplay(t, act_bytes).decode((latent_frames, tile_h // 8, tile_w // 8))
        decoded.append(t.alloc(batch * 3 * frames * tile_h * tile_w * act_bytes, VAE_OUT))
    if n_tiles > 2:
        t.drop(t.alloc(batch * 3 * frames * tile_h * tile_w * act_bytes * (n_tiles - 2), VAE_OUT))
        t.alloc(batch * 3 * frames * tile_h * tile_w * act_bytes * (n_tiles - 2), VAE_OUT)
    t.drop(t.alloc(batch * 3 * frames * height * width * act_bytes, VAE_OUT))  # the blended rows, concatenated
    return t


def vae_encode_stage(frames: int, height: int, width: int, batch: int = 1, tiling: bool = False, tile_px: int = 256,
                     act_bytes: int = 2) -> MemoryTrace:
    """Encoding (batch, 3, frames, height, width) pixels (cache_latents, V2V, I2V)."""
    t = MemoryTrace()
    t.where = "VAE encode"
    t.alloc(VAE_PARAMS * act_bytes, VAE_WEIGHTS)
    t.alloc(batch * 3 * frames * height * width * act_bytes, VAE_IN)
    tiled = tiling and (height > tile_px or width > tile_px)
    tile_h, tile_w = (min(tile_px, height), min(tile_px, width)) if tiled else (height, width)
    n_tiles = _tiles(height, tile_px) * _tiles(width, tile_px) if tiled else 1
    latent_tile = 2 * VAE_LATENT_CHANNELS * ((frames - 1) // 4 + 1) * (tile_h // 8) * (tile_w // 8) * act_bytes * batch
    for i in range(min(n_tiles, 2)):
        _VAEReplay(t, act_bytes).encode((frames, tile_h, tile_w))
        t.alloc(latent_tile, VAE_OUT)
    return t
