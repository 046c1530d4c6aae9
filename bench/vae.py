"""VAE encode and decode: time and peak memory, untiled / tiled / chunked, ours vs diffusers' AutoencoderKLHunyuanVideo.

    python bench/vae.py [--runs 3] [--clip 9x64x96] [--tile 64] [--chunk 32] [--ops encode,decode] [--threads 1]
    python bench/vae.py --full_size_only    # only the real-size memory table (seconds)

Bench config: the real VAE (block widths 128/256/512/512, 2 resnets per block, 246M
parameters) with random float32 weights (N(0, 0.02), norm scales 1), the same in both
implementations; batch 1; by default a clip of 9 frames of 64x96 (latents 3 x 8 x 12), small enough
for a 2-core CPU. Variants:
- untiled: one pass over the whole clip (diffusers: `use_framewise_encoding/decoding` off; at 9
  frames / 3 latent frames its defaults do not split the clip either);
- tiled: spatial tiles of --tile px every 3/4 tile (ours `set_memory_options(tiling=True,
  spatial_tile_sample_min_size=...)`, diffusers `enable_tiling` with the same sizes and stride);
- chunked: ours with `--vae_chunk_size` --chunk (each convolution split into column chunks);
- tiled+chunked: both.
Time: one process per op holds both models (sharing the weight tensors) and runs a warm-up round
then --runs rounds in which every variant runs once, so that other work on the machine slows them
alike; the table gives the median wall time (with min..max) and the median CPU time of the process
(steadier than wall time when other work shares the cores). Workers run one intra-op thread by default:
on a machine shared with other jobs, a two-thread op waits for a second free core, and the scheduler's
delays (milliseconds per op) then weigh more than the code. Memory: one fresh process per (op, impl, variant)
runs one call and reports the resident-set peak above the resident set before it (weights and
inputs excluded; bench/common.py). Ratios are against diffusers untiled.

A second table replays encodes and decodes of the real VAE at real sizes (544x960 at 33 and 129
frames, untiled and in 256 px tiles) on the meta device and reports the live tensor peak of each
implementation (see full_size_live_peaks): what the small CPU clip cannot show, since the streamed
convolutions keep a few frames of padded input where a plain implementation keeps whole copies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, measure, run_process, table  # noqa: E402

from musubi_tuner.hunyuan.vae import CausalVideoVAE, VAEConfig, latent_frames  # noqa: E402

CONFIG = VAEConfig()  # the real widths and depths
VARIANTS = [("diffusers", "untiled"), ("diffusers", "tiled"), ("ours", "untiled"), ("ours", "tiled"), ("ours", "chunked"),
            ("ours", "tiled+chunked")]


def bench_weights() -> dict[str, torch.Tensor]:
    """N(0, 0.02) for every weight and bias, 1 for norm scales, from a fixed seed, in the official key order."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalVideoVAE(CONFIG).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    return {k: torch.ones(shape) if "norm" in k and k.endswith("weight") else torch.empty(shape).normal_(0.0, 0.02, generator=g)
            for k, shape in shapes.items()}


def build(impl: str, weights: dict[str, torch.Tensor]):
    if impl == "ours":
        with torch.device("meta"):
            model = CausalVideoVAE(CONFIG)
    else:
        from diffusers import AutoencoderKLHunyuanVideo

        with torch.device("meta"):
            model = AutoencoderKLHunyuanVideo(block_out_channels=CONFIG.block_out_channels, layers_per_block=CONFIG.layers_per_block)
        model.use_framewise_encoding = model.use_framewise_decoding = False
    model.load_state_dict(weights, assign=True)
    return model.eval().requires_grad_(False)


def call_for(op: str, impl: str, variant: str, model, x: torch.Tensor, tile: int, chunk: int):
    """A no-argument function running `op` on x with `variant`'s settings (set on each call: models are shared)."""
    tiled, chunked = variant in ("tiled", "tiled+chunked"), variant in ("chunked", "tiled+chunked")
    if impl == "ours":
        def run():
            model.set_memory_options(tiling=tiled, spatial_tile_sample_min_size=tile if tiled else None, chunk_size=chunk if chunked else None)
            with torch.no_grad():
                return model.encode(x).mean if op == "encode" else model.decode(x)
    else:
        def run():
            model.use_tiling = False
            if tiled:
                model.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                    tile_sample_stride_height=tile * 3 // 4, tile_sample_stride_width=tile * 3 // 4)
            with torch.no_grad():
                return model.encode(x).latent_dist.mean if op == "encode" else model.decode(x).sample
    return run


def make_input(op: str, clip: tuple[int, int, int]) -> torch.Tensor:
    frames, height, width = clip
    g = torch.Generator().manual_seed(1)
    if op == "encode":
        return torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1
    return torch.randn(1, CONFIG.latent_channels, latent_frames(frames), height // 8, width // 8, generator=g)


def time_worker(op: str, clip, tile: int, chunk: int, runs: int) -> dict:
    weights = bench_weights()
    models = {impl: build(impl, weights) for impl in ("diffusers", "ours")}
    x = make_input(op, clip)
    calls = {f"{impl} {variant}": call_for(op, impl, variant, models[impl], x, tile, chunk) for impl, variant in VARIANTS}
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in calls}
    for round_ in range(runs + 1):  # round 0 warms up
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            if round_:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.process_time() - cpu)
    return times


def memory_worker(op: str, impl: str, variant: str, clip, tile: int, chunk: int) -> dict:
    model = build(impl, bench_weights())
    x = make_input(op, clip)
    call = call_for(op, impl, variant, model, x, tile, chunk)
    return measure(call, runs=1)


FULL_SIZE_CLIPS = ((33, 544, 960), (129, 544, 960))
FULL_SIZE_TILE = 256  # the default tile (hv_generate_video always tiles; cache_latents with --vae_tiling)


def full_size_live_peaks(frames: int, height: int, width: int, dtype=torch.float16) -> dict[str, float]:
    """GiB of live tensor storage at the peak of an encode / decode of the real VAE at a real size, untiled and in
    256 px tiles, per impl ("ours tiled decode": ...).

    Replayed on the meta device (no compute, no memory): every op's output is counted from its creation until it
    is freed (planning.measure.TensorBytes, here counting meta storage too); the weights and the input are not.
    Attention is replaced by what a flash kernel allocates (its output), as on a GPU; diffusers' L x L causal
    mask is built by diffusers itself and counts.
    """
    import torch.nn.functional as F

    from musubi_tuner.planning.measure import TensorBytes
    from musubi_tuner.planning.vae import fused_attention as flash_like

    peaks = {}
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, flash_like
    try:
        for impl in ("diffusers", "ours"):
            with torch.device("meta"):
                model = build(impl, {k: v.to(dtype) for k, v in CausalVideoVAE(CONFIG).state_dict().items()})
                pixels = torch.empty(1, 3, frames, height, width, dtype=dtype)
                latents = torch.empty(1, CONFIG.latent_channels, latent_frames(frames), height // 8, width // 8, dtype=dtype)
            for op, x in (("encode", pixels), ("decode", latents)):
                for variant in ("untiled", "tiled"):
                    counter = TensorBytes(count_meta=True)
                    with counter:
                        call_for(op, impl, variant, model, x, FULL_SIZE_TILE, 0)()
                    peaks[f"{impl} {variant} {op}"] = counter.peak / 2**30
    finally:
        F.scaled_dot_product_attention = sdpa
    return peaks


def measured_table(args) -> str:
    print(f"machine: {machine()}")
    print(f"clip {args.clip} (F x H x W), float32, tiles of {args.tile} px every {args.tile * 3 // 4}, --vae_chunk_size {args.chunk}; "
          f"{args.threads} thread(s) per worker; time: median of {args.runs} rounds after a warm-up round")
    common = ["--clip", args.clip, "--tile", str(args.tile), "--chunk", str(args.chunk), "--runs", str(args.runs),
              "--threads", str(args.threads)]
    rows = []
    for op in args.ops.split(","):
        times = run_process(__file__, ["time", op, *common], memory=False)
        peaks = {(impl, variant): run_process(__file__, ["memory", op, impl, variant, *common], memory=True)["peak_mib"]
                 for impl, variant in VARIANTS}
        base = times["diffusers untiled"]
        base_wall, base_cpu, base_peak = statistics.median(base["wall"]), statistics.median(base["cpu"]), peaks["diffusers", "untiled"]
        for impl, variant in VARIANTS:
            t = times[f"{impl} {variant}"]
            wall, cpu = statistics.median(t["wall"]), statistics.median(t["cpu"])
            rows.append({
                "op": op, "impl": impl, "variant": variant,
                "wall s": f"{wall:.2f}", "min..max": f"{min(t['wall']):.2f}..{max(t['wall']):.2f}", "CPU s": f"{cpu:.2f}",
                "peak MiB": f"{peaks[impl, variant]:.0f}",
                "wall / CPU vs diffusers untiled": f"{wall / base_wall:.2f}x / {cpu / base_cpu:.2f}x",
                "memory vs diffusers untiled": f"{peaks[impl, variant] / base_peak:.2f}x",
            })
        print(f"  {op} done", file=sys.stderr, flush=True)
    return table(rows, list(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clip", default="9x64x96", help="FRAMESxHEIGHTxWIDTH of the pixels (F = 4N+1, H and W multiples of 8)")
    parser.add_argument("--tile", type=int, default=64, help="spatial tile in pixels (multiple of 32)")
    parser.add_argument("--chunk", type=int, default=32, help="--vae_chunk_size")
    parser.add_argument("--ops", default="encode,decode")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of the workers (1: on a shared machine a 2-thread op waits for a free core)")
    parser.add_argument("--full_size_only", action="store_true", help="only the meta-device table (seconds)")
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    clip = tuple(int(v) for v in args.clip.split("x"))
    if args.worker:
        torch.set_num_threads(args.threads)
        kind, op, *rest = args.worker
        if kind == "time":
            print(json.dumps(time_worker(op, clip, args.tile, args.chunk, args.runs)))
        else:
            print(json.dumps(memory_worker(op, *rest, clip, args.tile, args.chunk)))
        return

    if not args.full_size_only:
        print(measured_table(args))
    print(f"\nLive tensor peak of the real VAE at real sizes, float16, untiled and in {FULL_SIZE_TILE} px tiles "
          "(meta-device replay, GiB; activations only, weights and input excluded):")
    rows = []
    for clip in FULL_SIZE_CLIPS:
        peaks = full_size_live_peaks(*clip)
        for op in ("encode", "decode"):
            row = {"clip (F x H x W)": "x".join(map(str, clip)), "op": op}
            for variant in ("untiled", "tiled"):
                ours, theirs = peaks[f"ours {variant} {op}"], peaks[f"diffusers {variant} {op}"]
                row[f"{variant}: diffusers"] = f"{theirs:.1f}"
                row[f"{variant}: ours"] = f"{ours:.1f} ({ours / theirs:.2f}x)"
            rows.append(row)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
