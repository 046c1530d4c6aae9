"""The planner's VAE stages (planning/vae.py) next to runs of our VAE (hunyuan/vae.py): the peak of live tensor storage.

    python bench/vae_plan_vs_measured.py [--skip_cpu]

Both sides count every storage an op returns from its creation until it is freed (planning.measure.TensorBytes);
weights and the input are excluded:
- real CPU runs of the real VAE (246M parameters), float32, random weights, small clips, untiled and in 64 px tiles
  (a minute or two), against the plan of the same clip;
- meta-device runs at real sizes, float16, every tile run (no compute, no memory: seconds to a minute), attention
  counted as a fused kernel allocates it, against the plan, which runs each tile shape once.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F

from musubi_tuner.hunyuan.vae import CausalVideoVAE, VAEConfig, latent_frames
from musubi_tuner.planning import vae as planned
from musubi_tuner.planning.measure import TensorBytes

CPU_CLIPS = (((9, 64, 96), 64), ((13, 96, 128), 64))  # (frames, height, width), tile px
FULL_SIZE_CLIPS = (((33, 544, 960), 256), ((129, 544, 960), 256))


def plan_above_input(op: str, frames: int, height: int, width: int, act_bytes: int, tile: int | None) -> int:
    peak = (planned.vae_encode_peak(frames, height, width, 1, tile, act_bytes) if op == "encode" else
            planned.vae_decode_peak(frames, height, width, tile, act_bytes))
    return peak.total - peak.parts.get(planned.VAE_WEIGHTS, 0) - peak.parts.get(planned.VAE_IN, 0)


def measured(vae: CausalVideoVAE, op: str, x: torch.Tensor, tile: int | None, counter: TensorBytes) -> int:
    vae.set_memory_options(tiling=tile is not None, spatial_tile_sample_min_size=tile)
    counter.track([*vae.parameters(), x])  # weights too: an op returning a view of one (Linear's .t()) is no allocation
    start = counter.current
    with torch.no_grad(), counter:
        if op == "encode":
            vae.encode(x).sample()
        else:  # as generation decodes: to uint8
            ((vae.decode(x).float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return counter.peak - start


def rows(vae: CausalVideoVAE, clips, dtype: torch.dtype, device: str):
    for (frames, height, width), tile in clips:
        for op in ("encode", "decode"):
            with torch.device(device):
                x = (torch.randn(1, 3, frames, height, width, dtype=dtype) if op == "encode" else
                     torch.randn(1, 16, latent_frames(frames), height // 8, width // 8).to(dtype))
            for t in (None, tile):
                got = measured(vae, op, x, t, TensorBytes(count_meta=device == "meta"))
                want = plan_above_input(op, frames, height, width, dtype.itemsize, t)
                yield (f"| {op} | {frames}x{height}x{width} | {f'{t} px tiles' if t else 'untiled'} | {want / 2**20:,.0f} | "
                       f"{got / 2**20:,.0f} | {want / got - 1:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip_cpu", action="store_true", help="only the meta-device runs at real sizes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    header = "| op | clip | tiling | planned MiB | measured MiB | error |\n|---|---|---|---|---|---|"
    if not args.skip_cpu:
        torch.manual_seed(0)
        vae = CausalVideoVAE(VAEConfig()).eval().requires_grad_(False)
        with torch.no_grad():
            for p in vae.parameters():
                p.normal_(0.0, 0.02)
        print("CPU runs, float32, activations (weights and input excluded):\n" + header)
        for row in rows(vae, CPU_CLIPS, torch.float32, "cpu"):
            print(row, flush=True)
        del vae
    with torch.device("meta"):
        vae = CausalVideoVAE(VAEConfig()).to(torch.float16).eval().requires_grad_(False)
    print("\nMeta-device runs at real sizes, every tile, float16, activations:\n" + header)
    with mock.patch.object(F, "scaled_dot_product_attention", planned.fused_attention):
        for row in rows(vae, FULL_SIZE_CLIPS, torch.float16, "meta"):
            print(row, flush=True)


if __name__ == "__main__":
    main()
