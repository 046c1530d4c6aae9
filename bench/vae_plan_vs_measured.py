"""The planner's VAE replay (planning/vae.py) next to runs of our VAE (hunyuan/vae.py): the peak of live tensor storage.

    python bench/vae_plan_vs_measured.py [--skip_cpu]

Two measurements of the real VAE (246M parameters), both counting every storage an op returns from its
creation until it is freed (planning.measure.TensorBytes); weights and the input are excluded:
- real CPU runs, float32, random weights, small clips, untiled and in 64 px tiles (a minute or two);
- meta-device runs at real sizes, float16 (no compute, no memory: seconds), attention counted as the fused
  kernel a GPU runs allocates it (its output), untiled and in 256 px tiles.
The replay is `planning.vae.encode` / `decode` on a ledger holding the same input.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from musubi_tuner.hunyuan.vae import CausalVideoVAE, VAEConfig, latent_frames
from musubi_tuner.planning import vae as replay
from musubi_tuner.planning.measure import TensorBytes
from musubi_tuner.planning.trace import MemoryTrace

CPU_CLIPS = (((9, 64, 96), 64), ((13, 96, 128), 64))  # (frames, height, width), tile px
FULL_SIZE_CLIPS = (((33, 544, 960), 256), ((129, 544, 960), 256))


class MetaTensorBytes(TensorBytes):
    """TensorBytes counting meta-device storage too (its nbytes are what the real tensor would take)."""

    def _add(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        if id(storage) not in self._live:
            self._live[id(storage)] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, id(storage))


def replayed(op: str, shape: tuple[int, ...], act_bytes: int, tile: int | None) -> int:
    """Peak bytes of the replay above its input: encode of pixels (3, F, H, W) / decode of latents (16, f, h, w)."""
    t = MemoryTrace()
    r = replay.VAEReplay(t, act_bytes)
    x = r.alloc(shape)
    start = t.current
    (replay.encode if op == "encode" else replay.decode)(r, replay.vae_model(), x, tile)
    return t.peak - start


def measured(vae: CausalVideoVAE, op: str, x: torch.Tensor, tile: int | None, counter: TensorBytes) -> int:
    vae.set_memory_options(tiling=tile is not None, spatial_tile_sample_min_size=tile)
    counter.track([*vae.parameters(), x])  # weights too: an op returning a view of one (Linear's .t()) is no allocation
    start = counter.current
    with torch.no_grad(), counter:
        vae.encode(x).mean if op == "encode" else vae.decode(x)
    return counter.peak - start


def rows(vae: CausalVideoVAE, clips, dtype: torch.dtype, device: str, counter_type):
    for (frames, height, width), tile in clips:
        for op in ("encode", "decode"):
            shape = (3, frames, height, width) if op == "encode" else (16, latent_frames(frames), height // 8, width // 8)
            with torch.device(device):
                x = torch.randn(1, *shape, dtype=dtype)
            for t in (None, tile):
                got = measured(vae, op, x, t, counter_type())
                want = replayed(op, shape, dtype.itemsize, t)
                yield (f"| {op} | {frames}x{height}x{width} | {f'{t} px tiles' if t else 'untiled'} | {want / 2**20:,.0f} | "
                       f"{got / 2**20:,.0f} | {want / got - 1:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip_cpu", action="store_true", help="only the meta-device runs at real sizes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    header = "| op | clip | tiling | replayed MiB | measured MiB | error |\n|---|---|---|---|---|---|"
    if not args.skip_cpu:
        torch.manual_seed(0)
        vae = CausalVideoVAE(VAEConfig()).eval().requires_grad_(False)
        with torch.no_grad():
            for p in vae.parameters():
                p.normal_(0.0, 0.02)
        print("CPU runs, float32, activations (weights and input excluded):\n" + header)
        for row in rows(vae, CPU_CLIPS, torch.float32, "cpu", TensorBytes):
            print(row, flush=True)
        del vae
    with torch.device("meta"):
        vae = CausalVideoVAE(VAEConfig()).to(torch.float16).eval().requires_grad_(False)
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: q.new_empty((*q.shape[:-1], v.shape[-1]))  # a fused kernel's output
    try:
        print("\nMeta-device runs at real sizes, float16, activations:\n" + header)
        for row in rows(vae, FULL_SIZE_CLIPS, torch.float16, "meta", MetaTensorBytes):
            print(row, flush=True)
    finally:
        F.scaled_dot_product_attention = sdpa


if __name__ == "__main__":
    main()
