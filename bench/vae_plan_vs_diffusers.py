"""The planner's VAE replay next to diffusers' AutoencoderKLHunyuanVideo (the same architecture) on the CPU.

    python bench/vae_plan_vs_diffusers.py

The full-size VAE (246M parameters, random float32 weights) encodes and decodes small clips without
tiling; the peak of live tensor storage (planning.measure.TensorBytes) is compared with
encoders.vae_encode_stage / vae_decode_stage at float32. The replay follows diffusers' structure; our
hunyuan/vae.py streams its convolutions and peaks at about 0.4-0.6x of that (bench/vae.py), so for our
VAE the stage is an upper bound until its replay is re-based. (diffusers decodes in chunks of 4 latent
frames: keep clips short.)
"""

from __future__ import annotations

import torch

from musubi_tuner.planning.encoders import vae_decode_stage, vae_encode_stage
from musubi_tuner.planning.measure import TensorBytes

CLIPS = ((5, 64, 64), (9, 96, 128))


def main() -> None:
    from diffusers import AutoencoderKLHunyuanVideo

    torch.set_num_threads(2)
    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo()
    vae = vae.to_empty(device="cpu").eval().requires_grad_(False)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.02)
    weights = sum(p.numel() * 4 for p in vae.parameters())
    print("| stage | clip | predicted activations MiB | measured MiB | error |")
    print("|---|---|---|---|---|")
    for frames, height, width in CLIPS:
        for name, make_input, run, replay in (
            ("decode", lambda: torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8), lambda x: vae.decode(x).sample,
             lambda: vae_decode_stage(frames, height, width, tiling=False, act_bytes=4)),
            ("encode", lambda: torch.randn(1, 3, frames, height, width), lambda x: vae.encode(x).latent_dist.mean,
             lambda: vae_encode_stage(frames, height, width, tiling=False, act_bytes=4)),
        ):
            x = make_input()
            counter = TensorBytes()
            counter.track(list(vae.parameters()) + list(vae.buffers()) + [x])
            with torch.no_grad(), counter:
                run(x)
            measured = counter.peak - weights
            predicted = replay().peak - weights
            print(f"| {name} | {frames}x{height}x{width} | {predicted / 2**20:.0f} | {measured / 2**20:.0f} | {predicted / measured - 1:+.1%} |")


if __name__ == "__main__":
    main()
