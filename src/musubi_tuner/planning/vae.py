"""The VAE stages: the code the commands run, on our CausalVideoVAE built on the meta device, every storage counted.

`vae_encode_peak` runs cache_latents' `vae.encode(pixels).sample()`, `vae_decode_peak` generation's
`inference.outputs.decode_to_uint8`, at the real sizes on meta tensors (no memory, no arithmetic), with the tiling
and chunking options the commands set; `measure.TensorBytes` counts each storage an op returns from its creation
until it is freed. Two things differ from running the real thing, both for speed or for the GPU's sake:

- attention: on the meta device PyTorch's SDPA takes its math path (an L x L matrix); a GPU runs a fused kernel,
  which allocates its output and a float32 log-sum-exp per query, as here;
- tiles: every tile of one shape allocates the same, so each shape is run once; a repeat raises the peak by that
  run's rise over what is live and returns an empty output of its shape (a 544x960 decode in 256 px tiles runs
  4 of its 60 tiles).
Not seen: kernel scratch (cuDNN's convolution workspaces, what --vae_chunk_size shrinks).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from unittest import mock

import torch
import torch.nn.functional as F

from musubi_tuner.hunyuan import vae as hv
from musubi_tuner.planning.measure import TensorBytes
from musubi_tuner.planning.tracer import Peak, on_disk

VAE_WEIGHTS = "VAE weights"
VAE_IN = "input frames and latents"
VAE_ACTS = "VAE activations and finished tiles"
VAE_OUT = "decoded video and its uint8 conversion"
DTYPES = {2: torch.float16, 4: torch.float32}
LONGEST_TRACED = 257  # frames; a longer video's peak is extrapolated from the two longest traced lengths (_longer)


@functools.cache
def vae_model(config: hv.VAEConfig = hv.VAEConfig()) -> hv.CausalVideoVAE:
    """The VAE's modules on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        return hv.CausalVideoVAE(config)


def vae_params(config: hv.VAEConfig = hv.VAEConfig()) -> int:
    return sum(p.numel() for p in vae_model(config).parameters())


def fused_attention(q, k, v, *args, **kwargs):
    """What a flash / memory-efficient kernel allocates: a float32 log-sum-exp per query (freed here) and the output."""
    q.new_empty(q.shape[:-1], dtype=torch.float32)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _once_per_shape(counter: TensorBytes, call):
    """`call(x)` run for the first x of each shape; a repeat adds the recorded rise and returns an empty output."""
    seen: dict[tuple, tuple[int, torch.Size, torch.dtype]] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in seen:
            outer_peak, outer_parts, start = counter.peak, counter.peak_parts, counter.current
            counter.reset_peak()
            out = call(x)
            seen[key] = (counter.peak - start, out.shape, out.dtype)
            if outer_peak >= counter.peak:
                counter.peak, counter.peak_parts = outer_peak, outer_parts
            return out
        rise, shape, dtype = seen[key]
        counter.raise_peak(rise)
        return x.new_empty(shape, dtype=dtype)

    return run


def _run(config: hv.VAEConfig, act_bytes: int, tile_px: int | None, chunk_size: int | None, stage, x: torch.Tensor,
         where: str) -> Peak:
    """`stage(vae, x, counter)` on meta tensors: the peak of live storage with its parts, the VAE's weights included
    (kept on disk under the sources of the code that runs: tracer.on_disk)."""
    from musubi_tuner.hunyuan import vae_tiling
    from musubi_tuner.inference import outputs
    from musubi_tuner.planning import measure

    key = (where, tuple(x.shape), x.dtype, config, act_bytes, tile_px, chunk_size)
    sources = (hv.__file__, vae_tiling.__file__, outputs.__file__, measure.__file__, __file__)
    return on_disk(key, sources, lambda: _measure(config, act_bytes, tile_px, chunk_size, stage, x, where), lambda d: Peak(**d))


def _measure(config, act_bytes, tile_px, chunk_size, stage, x, where) -> Peak:
    vae = vae_model(config).to(DTYPES[act_bytes])
    counter = TensorBytes(count_meta=True)
    counter.track(vae.parameters(), VAE_WEIGHTS)
    counter.track([x], VAE_IN)
    counter.part = VAE_ACTS
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", fused_attention))
        for name in ("_encode_moments", "_decode_untiled"):
            stack.enter_context(mock.patch.object(vae, name, _once_per_shape(counter, getattr(vae, name))))
        vae.set_memory_options(tiling=tile_px is not None, spatial_tile_sample_min_size=tile_px, chunk_size=chunk_size)
        stack.callback(vae.set_memory_options)
        stack.enter_context(counter)
        stage(vae, x, counter)
    return Peak(counter.peak, {k: v for k, v in counter.peak_parts.items() if v}, where)


def _longer(peak_at, frames: int) -> Peak:
    """`peak_at(frames)` past LONGEST_TRACED frames. From 17 frames on, each part of a VAE stage's peak grows by the
    same bytes per 4 frames (the causal convolutions stream a fixed window; the input and the finished output grow),
    while a trace runs the VAE's per-frame loop (0.025 s a frame at 544x960: an hour for 100,001 frames)."""
    a, b = peak_at(LONGEST_TRACED - 4), peak_at(LONGEST_TRACED)
    steps = (frames - LONGEST_TRACED) // 4
    parts = {k: b.parts.get(k, 0) + steps * (b.parts.get(k, 0) - a.parts.get(k, 0)) for k in {*a.parts, *b.parts}}
    return Peak(sum(parts.values()), {k: v for k, v in parts.items() if v}, b.where)


@functools.lru_cache(maxsize=64)
def vae_decode_peak(frames: int, height: int, width: int, tile_px: int | None = 256, act_bytes: int = 2,
                    chunk_size: int | None = None, config: hv.VAEConfig = hv.VAEConfig()) -> Peak:
    """Generation's decode of one video (videos are decoded one at a time) of `frames` x `height` x `width` from its
    latents, to uint8 pixels, in spatial tiles of `tile_px` (None: untiled)."""
    from musubi_tuner.inference.outputs import decode_to_uint8

    if frames > LONGEST_TRACED:
        return _longer(lambda f: vae_decode_peak(f, height, width, tile_px, act_bytes, chunk_size, config), frames)

    def stage(vae, latents, counter):
        def decode(z):  # what follows the decode is the conversion to uint8
            pixels = hv.CausalVideoVAE.decode(vae, z)
            counter.part = VAE_OUT
            return pixels

        with mock.patch.object(vae, "decode", decode):
            decode_to_uint8(vae, latents)

    s = config.spatial_compression  # the sampler's latents are float32
    latents = torch.empty(config.latent_channels, hv.latent_frames(frames), height // s, width // s, device="meta")
    return _run(config, act_bytes, tile_px, chunk_size, stage, latents, "VAE decode")


@functools.lru_cache(maxsize=64)
def vae_encode_peak(frames: int, height: int, width: int, batch: int = 1, tile_px: int | None = None, act_bytes: int = 2,
                    chunk_size: int | None = None, config: hv.VAEConfig = hv.VAEConfig()) -> Peak:
    """cache_latents' encode of `batch` clips of `frames` x `height` x `width` pixels and the posterior's sample, in
    spatial tiles of `tile_px` (None: untiled, cache_latents' default)."""
    if frames > LONGEST_TRACED:
        return _longer(lambda f: vae_encode_peak(f, height, width, batch, tile_px, act_bytes, chunk_size, config), frames)
    pixels = torch.empty(batch, config.in_channels, frames, height, width, dtype=DTYPES[act_bytes], device="meta")
    return _run(config, act_bytes, tile_px, chunk_size, lambda vae, x, counter: vae.encode(x).sample(), pixels, "VAE encode")
