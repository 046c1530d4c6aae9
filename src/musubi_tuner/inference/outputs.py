"""What generation writes: latent files (musubi-tuner's layout), mp4 videos and PNG frames, named by time and seed."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch
from PIL import Image

from musubi_tuner.errors import UserError
from musubi_tuner.files import StateDictFile, atomic_folder, atomic_write, save_safetensors

logger = logging.getLogger(__name__)

# what generation names its outputs: a time_flag, the batch index, the seed; a video, a latent, or a folder of frames
OUTPUT_NAME = re.compile(r"\d{8}-\d{6}-\d{3}_0_-?\d+(?:\.mp4|_latent\.safetensors)?")


def time_flag(now: float | None = None) -> str:
    """Local time with milliseconds, as musubi-tuner names outputs: 20260101-120000-123."""
    now = time.time() if now is None else now
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}"


def free_stamp(folder: Path, seed: int) -> str:
    """The time_flag of now, or of the first millisecond after it that no output of this seed in `folder` has: two
    generations of one seed saved in the same millisecond, or after the clock was set back, replaced each other's
    video and latent without a word."""
    now = time.time()
    for ms in range(100_000):
        stamp = time_flag(now + ms / 1000)
        stem = f"{stamp}_0_{seed}"
        if not any((folder / name).exists() for name in (f"{stem}.mp4", f"{stem}_latent.safetensors", stem)):
            return stamp
    raise UserError(f"{folder}: holds outputs of seed {seed} for every millisecond of the next 100 s; choose another --save_path")


def generation_metadata(args, seed: int, steps_run: int) -> dict[str, str]:
    meta = {
        "seeds": str(seed), "prompt": args.prompt, "height": str(args.video_size[0]), "width": str(args.video_size[1]),
        "video_length": str(args.video_length), "infer_steps": str(steps_run), "guidance_scale": str(args.guidance_scale),
        "embedded_cfg_scale": str(args.embedded_cfg_scale), "flow_shift": str(args.flow_shift), "preset": args.preset,
    }
    if args.negative_prompt:
        meta["negative_prompt"] = args.negative_prompt
    if args.lora_weight:
        meta["lora_weight"] = json.dumps([str(p) for p in args.lora_weight])
        from musubi_tuner.networks.merge import resolve_multipliers

        # what each file was applied at, as the LoRAs are applied (the list as typed was recorded: fuzz_ap 9)
        meta["lora_multiplier"] = json.dumps(resolve_multipliers(args.lora_weight, args.lora_multiplier))
        if args.lora_blocks:
            meta["lora_blocks"] = json.dumps(args.lora_blocks)
        if args.exclude_single_blocks:
            meta["exclude_single_blocks"] = "true"
    # what else changes the frames, when it is not the default (the metadata described another video: fuzz_ai 2)
    if getattr(args, "video_path", None):  # (V2V: infer_steps is the steps run, as musubi-tuner records it)
        meta |= {"video_path": str(args.video_path), "strength": str(args.strength)}
    if getattr(args, "image_path", None):
        meta["image_path"] = str(args.image_path)
    if args.guidance_scale != 1.0 and args.cfg_end != 1.0:
        meta["cfg_end"] = str(args.cfg_end)
    if args.fp8:
        meta["fp8"] = "true"
    meta["fps"] = str(args.fps)  # (a latent decoded later played at the default 24, a 12 fps run twice as fast: fuzz_ap 7)
    return meta


def save_latent(latent: torch.Tensor, meta: dict[str, str], folder: Path, seed: int, no_metadata: bool,
                stamp: str | None = None) -> Path:
    """(16, F, H, W) float32 latent (already times the VAE scaling factor) under the key `latent`; `stamp`: the
    generation's time_flag, which its video shares (as musubi-tuner names them: a latent is found by its video's name)."""
    path = folder / f"{stamp or free_stamp(folder, seed)}_0_{seed}_latent.safetensors"
    save_safetensors({"latent": latent.float().contiguous()}, path, metadata=None if no_metadata else meta)
    return path


def load_latent(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    from musubi_tuner.hunyuan.vae import VAEConfig

    f = StateDictFile(path, what="latent file", bare_key="latent")  # (a .pt of the tensor alone, as musubi-tuner's torch.load
    # reads it, was refused: fuzz_al 9)
    if "latent" not in f:
        raise UserError(f"{path}: no tensor named 'latent' (keys: {', '.join(f.keys()[:4])})")
    stored = f.shape("latent")
    shape = stored[1:] if len(stored) == 5 and stored[0] == 1 else stored
    shape = (shape[0], 1, *shape[1:]) if len(shape) == 3 else shape  # an image latent without a time axis
    channels = VAEConfig.latent_channels  # HunyuanVideo's VAE, T2V and SkyReels alike
    if len(shape) != 4 or shape[0] != channels or 0 in shape:
        raise UserError(f"{path}: latent has shape {list(stored)}, expected ({channels}, frames, height, width), "
                        "none of them 0 (a latent this command or musubi-tuner saved with --output_type latent)")
    if not f.dtype("latent").is_floating_point:
        raise UserError(f"{path}: latent is {str(f.dtype('latent')).removeprefix('torch.')}, not floating point "
                        "(a latent this command or musubi-tuner saved with --output_type latent)")
    return f.get("latent", dtype=torch.float32).reshape(shape), dict(f.metadata)


def decode_to_frames(vae, latent: torch.Tensor) -> torch.Tensor:
    """Scaled latent (16, F, H, W) -> uint8 frames (frames, height, width, 3) on the CPU."""
    return decode_to_uint8(vae, latent).permute(1, 2, 3, 0).cpu()


def decode_to_uint8(vae, latent: torch.Tensor) -> torch.Tensor:
    """Scaled latent (16, F, H, W) -> uint8 pixels (3, frames, height, width) on the VAE's device (the planner
    measures this on meta tensors: planning/vae.py)."""
    from musubi_tuner.hunyuan.vae import SCALING_FACTOR

    with torch.no_grad():
        pixels = vae.decode((latent[None] / SCALING_FACTOR).to(vae.device, vae.dtype))[0]
        total = pixels.sum(dtype=torch.float32)  # NaN/inf anywhere make the sum so: one number, not a mask of the video
    real = total.device.type != "meta"  # (the planner runs this on meta tensors)
    if real and not torch.isfinite(total):
        raise NonFinitePixels("the VAE decoded NaN/inf pixels from a finite latent: the VAE file (--vae) is damaged, or "
                              "float16 overflowed (--vae_dtype float32); no video was written")
    # pixels lie in [-1, 1], a few just past it: a bulk far outside is a damaged decoder's, every pixel clipped to 0 or 255
    # (a VAE of weights x1e30 wrote such videos, exit 0: fuzz_ar 8); |x| summed without a copy of the video
    mean_abs = float(torch.linalg.vector_norm(pixels, ord=1, dtype=torch.float32)) / max(1, pixels.numel()) if real else 0.0
    if mean_abs > FAR_PIXELS:
        raise NonFinitePixels(f"the VAE decoded pixels {mean_abs:.3g} from 0 on average, where they lie within [-1, 1], from a "
                              "latent within a few units: the VAE file (--vae) is damaged; no video was written")
    frames = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    if real and frames.numel() and frames.amax() == frames.amin():  # (a zeroed decoder's: one grey, however the latent)
        logger.warning("every pixel decoded is the same colour (%d): a damaged VAE file (--vae), or a latent of nothing "
                       "but zeros, does that", int(frames.view(-1)[0]))
    return frames


FAR_PIXELS = 2.0  # decoded pixels this far from 0 on average are not an image (a trained VAE's average well under 1)


class NonFinitePixels(UserError):
    pass


def _seed_in_name(meta: dict[str, str]) -> str:
    """The seed an output's file name carries: the metadata's `seeds` (a --latent_path file's, which anyone may have
    written) when it is one, else 0, said: text such as `../../x` or a `/` put the output outside --save_path."""
    seed = meta.get("seeds", "0")
    if re.fullmatch(r"-?\d{1,20}", seed):
        return seed
    logger.warning("the latent's metadata gives seeds = %r, which is no seed: the output is named with seed 0", seed[:80])
    return "0"


def decode_and_save(vae, latent: torch.Tensor, meta: dict[str, str], args, folder: Path, stamp: str | None = None) -> list[Path]:
    from musubi_tuner.data.media import write_video

    frames = decode_to_frames(vae, latent)
    seed = _seed_in_name(meta)
    stem = f"{stamp or free_stamp(folder, seed)}_0_{seed}"
    saved = []
    if args.output_type in ("video", "both"):
        path = folder / f"{stem}.mp4"
        # (a latent saved without metadata, decoded, wrote the comment '{}': fuzz_ap 9)
        comment = None if args.no_metadata or not meta else {"comment": json.dumps(meta)}
        write_video(path, frames.numpy(), fps=args.fps, bitrate=4_000_000, metadata=comment)
        saved.append(path)
    if args.output_type == "images":
        out = folder / stem
        digits = max(3, len(str(len(frames) - 1)))  # (musubi-tuner's 3 digits; past 1,000 frames _1000 sorted before _101:
        with atomic_folder(out) as partial:          # fuzz_ap 6)
            for i, frame in enumerate(frames.numpy()):
                with atomic_write(partial / f"{stem}_{i:0{digits}d}.png") as tmp:
                    Image.fromarray(frame).save(tmp, format="PNG")
        saved.append(out)
    return saved
