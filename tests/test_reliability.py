"""Bad input, full disks and read-only folders, across every command: the whole list in one place.

Each case runs a command's main(argv) in-process on tiny models and asserts what a user sees: exit
status 2 when the run cannot go on (0 when the input is odd but usable), exactly one `error:` line that
names the culprit (file, key or flag) and the fix, no traceback, and nothing already written damaged:
files that existed keep their bytes and no temporary file is left behind. Where a library test checks
the same rule in more detail, the case's `covered_by` names it.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_cached_dataset
from musubi_tuner import files
from musubi_tuner.demo.synthetic_data import make_synthetic_dataset
from musubi_tuner.demo.tiny_dit import TINY_DIT, random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.demo.tiny_text_encoders import write_tiny_clip_folder, write_tiny_llm_folder
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae
from musubi_tuner.errors import UserError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------------------- assets


@dataclass
class Assets:
    root: Path
    dit: Path  # the official .pt layout
    dit_st: Path  # the same DiT as bf16 safetensors
    vae: Path
    te1: Path
    te2: Path
    dataset: Path  # synthetic: 2 clips + 2 images, 32x32, 5 frames, cached once (latents and text)
    cached: Path  # TOML of a cache-only dataset for training
    lora: Path  # rank 4 on the tiny DiT
    lora_big: Path  # rank 4 on a wider DiT (another model size)
    lora_sdxl: Path  # kohya naming, SDXL modules


def make_lora(dit_model, path: Path, rank: int = 4, seed: int = 1) -> Path:
    from musubi_tuner.networks import lora

    net = lora.create_arch_network(1.0, rank, rank, None, None, dit_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, 0.05, generator=g)
    net.save_weights(str(path), torch.float32, {})
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    from musubi_tuner import cache_latents, cache_text_encoder_outputs
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    root = tmp_path_factory.mktemp("reliability")
    state = random_dit_state_dict(TINY_DIT)
    dit = write_dit(root / "dit.pt", state, TINY_DIT, "pt")
    dit_st = write_dit(root / "dit.safetensors", state, TINY_DIT)
    vae = write_vae(root / "vae.pt", random_vae_state_dict(TINY_VAE))
    te1, te2 = write_tiny_llm_folder(root / "te1"), write_tiny_clip_folder(root / "te2")
    dataset = make_synthetic_dataset(root / "ds", num_videos=2, num_images=2, width=32, height=32, frames=5)
    for main, extra in ((cache_latents.main, ["--vae", str(vae), "--num_workers", "0"]),
                        (cache_text_encoder_outputs.main, ["--text_encoder1", str(te1), "--text_encoder2", str(te2)])):
        main(["--dataset_config", str(dataset), *extra])
    cached = write_cached_dataset(root / "cached", items=2, frames=5, size=(32, 32))
    lora = make_lora(load_dit(dit, dtype=torch.float32), root / "lora.safetensors")
    big = tiny_dit_config(hidden_size=128, heads_num=4, mlp_hidden_size=512)
    lora_big = make_lora(HunyuanVideoDiT(big), root / "lora_big.safetensors")
    lora_sdxl = root / "lora_sdxl.safetensors"
    name = "lora_unet_input_blocks_1_1_proj_in"
    files.save_safetensors({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
                            f"{name}.alpha": torch.tensor(4.0)}, lora_sdxl)
    return Assets(root, dit, dit_st, vae, te1, te2, dataset, cached, lora, lora_big, lora_sdxl)


def copy_dataset(a: Assets, tmp: Path) -> tuple[Path, Path]:
    """A private copy of the cached synthetic dataset: (its TOML, its folder)."""
    folder = tmp / "ds"
    shutil.copytree(a.dataset.parent, folder)
    toml = folder / "dataset.toml"
    toml.write_text(toml.read_text().replace(str(a.dataset.parent), str(folder)))
    return toml, folder


def caches(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*_hv*.safetensors"))


def write_toml(tmp: Path, body: str, general: str = '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n') -> Path:
    path = tmp / "dataset.toml"
    path.write_text(general + body)
    return path


def video_table(a: Assets, tmp: Path, extra: str = "") -> str:
    return (f'[[datasets]]\nvideo_directory = "{a.dataset.parent / "videos"}"\ncache_directory = "{tmp / "cache"}"\n'
            f'target_frames = [5]\n{extra}')


# ----------------------------------------------------------------------------------------------- faults


def _enospc_after(limit: int):
    """An `open` for files.py whose writable files take `limit` bytes, then fail as a full disk does."""
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f, self.left = f, limit

        def write(self, data):
            view = memoryview(data).cast("B")
            if len(view) > self.left:
                self.f.write(view[: self.left])  # half-way: part of the data reached the disk
                self.left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(view)
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if any(c in mode for c in "wax+") else f

    return fake_open


def full_disk(monkeypatch, limit: int = 100, weights: bool = True) -> None:
    """Every weight file write (safetensors through files.py unless not `weights`, torch.save) stops after `limit`
    bytes with ENOSPC."""
    if weights:
        monkeypatch.setattr(files, "open", _enospc_after(limit), raising=False)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as out:
            out.truncate(limit)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", failing_save)


def read_only(folder: Path, monkeypatch, request) -> None:
    """`folder` refuses new files: chmod where that binds; as root (chmod does not bind) the folder's file creation
    fails with EROFS, as on a read-only mount."""
    folder.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        os.chmod(folder, 0o555)
        request.addfinalizer(lambda: os.chmod(folder, 0o755))
        return
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


NOISE = random.Random(0).randbytes(4000)  # not a video (fixed bytes: some random bytes pass for a container without video)
READ_ONLY = r"\((Read-only file system|Permission denied)\)"


# ----------------------------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    command: str  # module under musubi_tuner
    argv: Callable[[Assets, Path], list[str]]  # builds the situation in tmp, returns the command line
    error: str | None  # regex the one `error:` line must match; None: the run must succeed
    keep: Callable[[Assets, Path], list[Path]] | None = None  # files that existed before and must keep their bytes
    fault: str | None = None  # "full_disk", "full_disk_state" (torch.save only) or "read_only:<folder relative to tmp>"
    then: Callable[[Assets, Path, str, str], None] | None = None  # further checks (tmp, stderr, stdout)
    covered_by: str = ""
    extra: dict = field(default_factory=dict)


def cache_latents_argv(toml, a, *extra):
    return ["--dataset_config", str(toml), "--vae", str(a.vae), "--num_workers", "0", *extra]


def cache_text_argv(toml, a, *extra, te1=None, te2=None):
    return ["--dataset_config", str(toml), "--text_encoder1", str(te1 or a.te1), "--text_encoder2", str(te2 or a.te2), *extra]


def train_argv(a, out, *extra, dit=None, toml=None):
    return ["--dit", str(dit or a.dit), "--dataset_config", str(toml or a.cached), "--sdpa", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "adamw", "--seed", "1",
            "--dit_dtype", "float32", "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--output_dir", str(out),
            "--output_name", "tiny", *extra]


def generate_argv(a, tmp, *extra, vae=None):
    return ["--dit", str(a.dit), "--vae", str(vae or a.vae), "--text_encoder1", str(a.te1), "--text_encoder2", str(a.te2),
            "--prompt", "a red circle", "--save_path", str(tmp / "videos"), "--infer_steps", "1", "--video_size", "32", "32",
            "--video_length", "1", "--output_type", "latent", "--seed", "1", *extra]


def merge_argv(a, tmp, *loras, extra=()):
    return ["--dit", str(a.dit), "--lora_weight", *map(str, loras or [a.lora]), "--save_merged_model",
            str(tmp / "merged" / "merged.safetensors"), "--device", "cpu", *extra]


def truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned_by_pickle'}",))


def evil_pt(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"encoder.conv_in.weight": _RunsCode()}, f)
    return path


def corrupt_videos(a: Assets, tmp: Path) -> Path:
    toml, folder = copy_dataset(a, tmp)
    (folder / "videos" / "corrupt.mp4").write_bytes(NOISE)
    (folder / "videos" / "corrupt.txt").write_text("noise")
    (folder / "videos" / "zero.mp4").write_bytes(b"")
    (folder / "videos" / "zero.txt").write_text("nothing")
    return toml


def odd_images(a: Assets, tmp: Path) -> Path:
    folder = tmp / "images"
    folder.mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, not composited
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(folder / "deep.png")  # I;16
    assert Image.open(folder / "deep.png").mode.startswith("I;16")
    for stem in ("alpha", "deep"):
        (folder / f"{stem}.txt").write_text(f"a {stem} image")
    return write_toml(tmp, f'[[datasets]]\nimage_directory = "{folder}"\ncache_directory = "{tmp / "cache"}"\n')


def captions(a: Assets, tmp: Path, kind: str) -> Path:
    toml, folder = copy_dataset(a, tmp)
    target = folder / "videos" / "clip_0001.txt"
    if kind == "missing":
        target.unlink()
    elif kind == "empty":
        target.write_text("")
    else:
        target.write_bytes("un caf\xe9 noir".encode("latin-1"))
    return toml


def trained_before(a: Assets, tmp: Path) -> Path:
    """An earlier run's LoRA and state in tmp/out (what a failed rerun must not damage)."""
    from musubi_tuner import hv_train_network

    out = tmp / "out"
    hv_train_network.main(train_argv(a, out, "--save_state"))
    return out


def outputs_of(folder_name: str):
    def keep(a, tmp):
        return sorted(p for p in (tmp / folder_name).rglob("*") if p.is_file())
    return keep


def no_llm_pass(a, tmp, err, out):
    assert "llm text" not in err, "the LLM pass ran before the CLIP file was checked"


def nothing_generated(a, tmp, err, out):
    assert "denoising" not in err, "sampling ran before the bad input was found"
    assert not list((tmp / "videos").glob("*")) if (tmp / "videos").exists() else True


def summary_names(*patterns):
    def check(a, tmp, err, out):
        for pattern in patterns:
            assert re.search(pattern, out), (pattern, out)
    return check


def images_cached(a, tmp, err, out):
    names = sorted(p.name for p in (tmp / "cache").glob("*_hv.safetensors"))
    assert names == ["alpha_0032x0032_hv.safetensors", "deep_0032x0032_hv.safetensors"]
    assert "2 latent caches cached" in out


CASES = [
    # --- dataset TOML (through cache_latents; the other commands read it with the same code)
    Case("toml-misspelt-key", "cache_latents", lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t, 'frame_extration = "head"')), a),
         r"dataset\.toml: \[\[datasets\]\]\[0\]\.frame_extration is not a video dataset key \(did you mean frame_extraction\?\)",
         covered_by="tests/data/test_config.py::test_a_misspelt_key_names_file_table_and_the_closest_key"),
    Case("toml-unknown-general-key", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t), general='[general]\nresolutoin = [32, 32]\ncaption_extension = ".txt"\n'), a),
         r"dataset\.toml: \[general\]\.resolutoin is not a dataset key \(did you mean resolution\?\)"),
    Case("toml-wrong-type", "cache_latents", lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t, 'batch_size = "2"')), a),
         r'dataset\.toml: \[\[datasets\]\]\[0\]\.batch_size = "2" is not an integer',
         covered_by="tests/data/test_config.py::test_wrong_types_and_values_name_the_key_and_value"),
    Case("toml-missing-folder", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t).replace(str(a.dataset.parent / "videos"), str(t / "nope"))), a),
         r'dataset\.toml: \[\[datasets\]\]\[0\]\.video_directory = ".*nope": folder not found'),
    Case("toml-size-not-multiple-of-16", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t), general='[general]\nresolution = [40, 40]\ncaption_extension = ".txt"\n'), a),
         r"dataset\.toml: \[\[datasets\]\]\[0\]\.resolution = \[40, 40\] must be multiples of 16 when enable_bucket is false \(try \[32, 32\]\)"),
    Case("toml-target-frames-not-4n1-rounded", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t).replace("target_frames = [5]", "target_frames = [6]")), a),
         None, then=summary_names(r"2 latent caches cached"), extra={"warning": r"target_frames: is not 4N\+1, rounded down \(6 -> 5"},
         covered_by="tests/data/test_config.py::test_target_frames_are_rounded_down_to_4n_plus_1_with_a_warning"),
    # --- the VAE file
    Case("vae-missing", "cache_latents", lambda a, t: ["--dataset_config", str(a.dataset), "--vae", str(t / "vae.pt")],
         r"vae\.pt: VAE checkpoint not found \(--vae\)"),
    Case("vae-truncated", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a)[:3] + [str(truncated(a.vae, t / "vae.pt"))],
         r"vae\.pt: not a readable PyTorch VAE checkpoint \(truncated or a different format"),
    Case("vae-is-the-dit", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a)[:3] + [str(a.dit)],
         r"dit\.pt: not a VAE checkpoint: its tensors sit under 'module' .*pass it with --dit"),
    Case("vae-pickle-runs-code", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a)[:3] + [str(evil_pt(t))],
         r"evil\.pt: refused to load: the pickle holds objects other than tensors",
         then=lambda a, t, err, out: _no_file(t / "pwned_by_pickle"),
         covered_by="tests/hunyuan/test_vae.py::test_vae_pickle_that_would_run_code_is_refused"),
    # --- media
    Case("video-corrupt-and-empty-are-skipped", "cache_latents", lambda a, t: cache_latents_argv(corrupt_videos(a, t), a), None,
         then=summary_names(r"failed: .*corrupt\.mp4: not a readable video", r"failed: .*zero\.mp4: empty file \(0 bytes\)",
                            r"\[\[datasets\]\]\[1\]: 2 latent caches cached, 0 already cached, 0 skipped, 2 failed")),
    Case("video-corrupt-strict", "cache_latents", lambda a, t: cache_latents_argv(corrupt_videos(a, t), a, "--strict"),
         r"corrupt\.mp4: not a readable video"),
    Case("image-alpha-and-16-bit-work", "cache_latents", lambda a, t: cache_latents_argv(odd_images(a, t), a), None, then=images_cached,
         covered_by="tests/data/test_media.py::test_rgba_drops_alpha_without_compositing, ::test_16_bit_greyscale_is_scaled_not_clipped_to_white"),
    # --- writing caches
    Case("cache-latents-full-disk", "cache_latents", lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a),
         r"_hv\.safetensors: cannot write \(No space left on device\); check free space and permissions of .*cache",
         keep=lambda a, t: caches(t / "ds" / "cache"), fault="full_disk"),
    Case("cache-latents-read-only-folder", "cache_latents", lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a),
         r"cache/images/.*_hv\.safetensors: cannot write " + READ_ONLY, keep=lambda a, t: caches(t / "ds" / "cache"),
         fault="read_only:ds/cache/images"),
    # --- captions and text encoders
    Case("caption-missing-is-reported", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(captions(a, t, "missing"), a), None,
         then=summary_names(r"failed: .*clip_0001\.txt: caption file not found \(for clip_0001\.mp4\)"),
         covered_by="tests/data/test_items.py::test_a_missing_video_caption_fails_that_video_only"),
    Case("caption-empty-works", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(captions(a, t, "empty"), a), None,
         then=summary_names(r"\[\[datasets\]\]\[1\]: 2 text caches cached"), extra={"warning": r"clip_0001\.txt: empty caption"}),
    Case("caption-not-utf8-strict", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(captions(a, t, "latin1"), a, "--strict"),
         r"clip_0001\.txt: caption is not UTF-8 text \(byte 6\); save it as UTF-8", keep=lambda a, t: caches(t / "ds" / "cache"),
         covered_by="tests/data/test_items.py::test_a_caption_that_is_not_utf8_is_reported_naming_the_file"),
    Case("text-encoder2-is-the-dit", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(copy_dataset(a, t)[0], a, te2=a.dit),
         r"dit\.pt: not a CLIP text encoder .*this looks like a HunyuanVideo DiT \(pass it with --dit\)",
         keep=lambda a, t: caches(t / "ds" / "cache"), then=no_llm_pass),
    Case("text-encoder1-truncated-shard", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(a.dataset, a, te1=_truncated_shard(a, t)),
         r"model-00001-of-00002\.safetensors: file is truncated"),
    Case("text-cache-full-disk", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(copy_dataset(a, t)[0], a),
         r"_hv_te\.safetensors: cannot write \(No space left on device\)", keep=lambda a, t: caches(t / "ds" / "cache"), fault="full_disk"),
    # --- training
    Case("train-config-file-misspelt-option", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--config_file", str(_write(t / "run.toml", "learning_rat = 1e-4\n"))),
         r"run\.toml: unknown option 'learning_rat' \(did you mean 'learning_rate'\?\)"),
    Case("train-config-file-wrong-type", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--config_file", str(_write(t / "run.toml", 'gradient_checkpointing = "false"\n'))),
         r'run\.toml: gradient_checkpointing = "false" must be true or false \(without quotes\)'),
    Case("train-dit-truncated", "hv_train_network", lambda a, t: train_argv(a, t / "out", dit=truncated(a.dit_st, t / "dit.safetensors")),
         r"dit\.safetensors: file is truncated", covered_by="tests/hunyuan/test_dit_files.py::test_truncated_safetensors_is_reported_as_truncated"),
    Case("train-dit-is-the-vae", "hv_train_network", lambda a, t: train_argv(a, t / "out", dit=a.vae),
         r"vae\.pt: this is a VAE checkpoint, not a DiT; pass it with --vae"),
    Case("train-network-weights-of-another-model", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora_sdxl)),
         r"lora_sdxl\.safetensors: a LoRA for another model: its module 'lora_unet_input_blocks_1_1_proj_in' names no layer"),
    Case("train-network-weights-of-another-rank", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora), "--network_dim", "8"),
         r"lora\.safetensors: lora_unet_\S+ has shape \[.*\], this network's is \[.*\]; train with the file's rank \(--dim_from_weights\)"),
    Case("train-resume-not-a-state", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--resume", str(a.root)),
         r"not a complete training state \(no train_state\.json\); pick another folder or --resume auto"),
    Case("train-full-disk-keeps-the-last-lora-and-state", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--save_state", "--max_train_steps", "3"),
         r"tiny\.safetensors: cannot write \(No space left on device\)", keep=outputs_of("out"), fault="full_disk"),
    Case("train-full-disk-during-the-state-save", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--save_state", "--max_train_steps", "3"),
         r"tiny-state: cannot write the training state \(No space left on device\); check free space",
         keep=lambda a, t: sorted((t / "out" / "tiny-state").iterdir()), fault="full_disk_state"),
    Case("train-read-only-output-folder", "hv_train_network", lambda a, t: train_argv(a, t / "out"),
         r"out: cannot write to this folder " + READ_ONLY + r"; fix its permissions or choose another --output_dir", fault="read_only:out"),
    Case("train-dry-run-read-only-output-folder", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--dry_run"),
         r"out: cannot write to this folder " + READ_ONLY + r"; fix its permissions or choose another --output_dir", fault="read_only:out"),
    # --- merging
    Case("merge-multiplier-count", "merge_lora", lambda a, t: merge_argv(a, t, extra=["--lora_multiplier", "1", "0.5"]),
         r"1 LoRA files but 2 values of --lora_multiplier: give one per file, or one for all"),
    Case("merge-lora-of-another-model-size", "merge_lora", lambda a, t: merge_argv(a, t, a.lora_big),
         r"lora_big\.safetensors: \S+ has shape \[.*\] in the LoRA but \[.*\] in .*dit\.pt",
         covered_by="tests/networks/test_merge.py::test_lora_of_another_model_size_is_named"),
    Case("merge-lora-is-the-dit", "merge_lora", lambda a, t: merge_argv(a, t, a.dit),
         r"dit\.pt: not a LoRA file: its tensors sit under 'module' .*pass it with --dit"),
    Case("merge-full-disk-keeps-the-old-merge", "merge_lora", lambda a, t: _merged_before(a, t),
         r"merged\.safetensors: cannot write \(No space left on device\)", keep=outputs_of("merged"), fault="full_disk"),
    Case("merge-read-only-folder", "merge_lora", lambda a, t: merge_argv(a, t),
         r"merged\.safetensors: cannot write " + READ_ONLY, fault="read_only:merged"),
    # --- generation: everything checked before the text encoders and the sampler run
    Case("generate-video-length-not-4n1", "hv_generate_video", lambda a, t: generate_argv(a, t, "--video_length", "6"),
         r"--video_length 6 is not 4N\+1 \(try 5 or 9\)"),
    Case("generate-size-not-multiple-of-16", "hv_generate_video", lambda a, t: generate_argv(a, t, "--video_size", "40", "47"),
         r"--video_size 40 47: height and width must be multiples of 16 \(try 48 48\)", then=nothing_generated),
    Case("generate-i2v-image-with-t2v-model", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--image_path", str(a.dataset.parent / "images" / "image_0000.png")),
         r"--image_path needs a SkyReels I2V DiT \(32 input channels\); .*dit\.pt has 16"),
    Case("generate-multiplier-count", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora), "--lora_multiplier", "1", "2"),
         r"1 LoRA files but 2 values of --lora_multiplier"),
    Case("generate-lora-of-another-model-size", "hv_generate_video", lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora_big)),
         r"lora_big\.safetensors: \S+ is \[\d+, \d+\] in the LoRA but \[.*\] in .*dit\.pt \(a LoRA for another model size\?\)",
         then=nothing_generated),
    Case("generate-vae-is-the-dit", "hv_generate_video", lambda a, t: generate_argv(a, t, vae=a.dit),
         r"dit\.pt: not a VAE checkpoint: its tensors sit under 'module'", then=nothing_generated),
    Case("generate-v2v-video-corrupt", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--video_path", str(_write(t / "clip.mp4", NOISE))),
         r"clip\.mp4: not a readable video", then=nothing_generated),
    Case("generate-read-only-save-path", "hv_generate_video", lambda a, t: generate_argv(a, t),
         r"videos: cannot write to this folder " + READ_ONLY + r"; fix its permissions or choose another --save_path",
         fault="read_only:videos", then=nothing_generated),
    Case("generate-dry-run-read-only-save-path", "hv_generate_video", lambda a, t: generate_argv(a, t, "--dry_run"),
         r"videos: cannot write to this folder " + READ_ONLY + r"; fix its permissions or choose another --save_path",
         fault="read_only:videos", then=nothing_generated),
    # --- converting
    Case("convert-missing-input", "convert_lora",
         lambda a, t: ["--input", str(t / "nope.safetensors"), "--output", str(t / "out.safetensors"), "--target", "other"],
         r"nope\.safetensors: LoRA file not found"),
    Case("convert-lora-of-another-model", "convert_lora",
         lambda a, t: ["--input", str(a.lora_sdxl), "--output", str(t / "out.safetensors"), "--target", "other"],
         r"lora_sdxl\.safetensors: a LoRA for another model"),
]


def _no_file(path: Path) -> None:
    assert not path.exists(), f"{path} exists: the pickle ran code"


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _truncated_shard(a: Assets, tmp: Path) -> Path:
    folder = tmp / "te1"
    shutil.copytree(a.te1, folder)
    truncated(folder / "model-00001-of-00002.safetensors", folder / "model-00001-of-00002.safetensors", 0.3)
    return folder


def _merged_before(a: Assets, tmp: Path) -> list[str]:
    from musubi_tuner import merge_lora

    merge_lora.main(merge_argv(a, tmp))
    return merge_argv(a, tmp, extra=["--lora_multiplier", "0.5"])


def run_command(command: str, argv: list[str], capsys) -> tuple[int, str, str]:
    main = importlib.import_module(f"musubi_tuner.{command}").main
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".incomplete")) or ".write-test." in p.name]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, assets, tmp_path, capsys, caplog, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    argv = case.argv(assets, tmp_path)
    kept = {p: p.read_bytes() for p in case.keep(assets, tmp_path)} if case.keep else {}
    assert kept or not case.keep, "the case meant to protect files but found none"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    if case.fault in ("full_disk", "full_disk_state"):
        full_disk(monkeypatch, weights=case.fault == "full_disk")
    elif case.fault:
        read_only(tmp_path / case.fault.split(":", 1)[1], monkeypatch, request)

    code, err, out = run_command(case.command, argv, capsys)

    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    if case.error is None:
        assert code == 0 and not errors, err[-2000:]
    else:
        assert code == 2, (code, err[-2000:])
        assert len(errors) == 1 and re.search(case.error, errors[0]), err[-2000:]
        assert not any(line.rstrip().endswith(("]error:", "error:")) for line in err.splitlines()), "message glued to a bar"
    if "warning" in case.extra:
        assert re.search(case.extra["warning"], caplog.text), caplog.text[-2000:]
    for path, data in kept.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was damaged"
    assert not leftovers(tmp_path), leftovers(tmp_path)
    for path in tmp_path.rglob("*.safetensors"):  # what the run wrote is whole: the old file or the new one
        if before.get(path) != path.read_bytes():
            files.StateDictFile(path).load_all()
    if case.then:
        case.then(assets, tmp_path, err, out)


def test_the_matrix_covers_every_command():
    assert len(CASES) >= 25
    assert {c.command for c in CASES} == {"cache_latents", "cache_text_encoder_outputs", "hv_train_network", "merge_lora",
                                          "hv_generate_video", "convert_lora"}


def test_debug_shows_the_traceback(assets, tmp_path, capsys):
    from musubi_tuner import cache_latents

    with pytest.raises(UserError, match="VAE checkpoint not found"):
        cache_latents.main(["--dataset_config", str(assets.dataset), "--vae", str(tmp_path / "vae.pt"), "--debug"])


# ----------------------------------------------------------------------------------------------- training guards


def poison(cache: Path, value: float) -> None:
    """Put `value` into a latent cache as a broken VAE run would (the cache writer itself stores NaN as 0)."""
    f = files.StateDictFile(cache)
    (key,) = f.keys()
    latents = f.get(key).clone()
    latents[0, 0, 0, 0] = value
    files.save_safetensors({key: latents}, cache, metadata=f.metadata)


def test_nan_loss_stops_naming_the_step_the_items_and_the_last_good_checkpoint(assets, tmp_path, capsys):
    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.data.training_dataset import TrainingDataset

    toml = write_cached_dataset(tmp_path / "data", items=3, frames=5, size=(32, 32))
    data = TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=1)
    (second,) = data[data.epoch_plan(1)[1]]["item_names"]  # the batch of step 2: step 1 saves a good checkpoint first
    poison(tmp_path / "data" / "cache" / second, float("nan"))
    out = tmp_path / "out"
    code, err, _ = run_command("hv_train_network", train_argv(assets, out, "--save_every_n_steps", "1", "--max_train_steps", "6",
                                                              toml=toml), capsys)
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    assert code == 2 and "Traceback" not in err
    last_good = out / "tiny-step00000001.safetensors"
    assert line == (f"error: loss is nan at step 2 (epoch 1, items {second}); stopped without saving. Last good checkpoint: "
                    f"{last_good}. Lower --learning_rate, check the caches of those items, or use bf16 instead of fp16.")
    assert files.StateDictFile(last_good).load_all()
    assert not (out / "tiny-step00000002.safetensors").exists() and not leftovers(out)


def _state_like(src: Path, dst: Path, step: int | None) -> Path:
    """A copy of a state folder claiming `step` (None: without its completion marker, as a half-written one)."""
    shutil.copytree(src, dst)
    marker = dst / "train_state.json"
    if step is None:
        marker.unlink()
    else:
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "global_step": step}))
    return dst


def test_resume_auto_takes_the_newest_complete_state_and_clears_a_killed_runs_leftovers(assets, tmp_path, capsys, caplog):
    from musubi_tuner.training.state import newest_state

    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    argv = train_argv(assets, out, "--save_every_n_steps", "2", "--save_state")
    assert run_command("hv_train_network", argv + ["--max_train_steps", "4"], capsys)[0] == 0
    # what runs killed later would leave: a state folder without its marker, one still being written, a temp
    # file, and a .old folder half deleted
    step4 = out / "tiny-step00000004-state"
    half = _state_like(step4, out / "tiny-step00000006-state", None)
    writing = _state_like(step4, out / "tiny-step00000008-state.incomplete", 8)
    old = out / "tiny-state.old"
    old.mkdir()
    (old / "optimizer.pt").write_bytes(b"partial")
    temp = _write(out / ".tiny-step00000008.safetensors.k2j4.tmp", b"partial")
    assert json.loads((newest_state(out) / "train_state.json").read_text())["global_step"] == 4

    code, err, _ = run_command("hv_train_network", argv + ["--max_train_steps", "6", "--resume", "auto"], capsys)
    assert code == 0, err[-2000:]
    assert re.search(r"resumed from \S+/tiny(-step00000004)?-state at step 4", caplog.text)
    assert not writing.exists() and not old.exists() and not temp.exists()
    for state in (half, out / "tiny-state"):  # rewritten whole at step 6 (the stale .old no longer blocks the rename)
        assert json.loads((state / "train_state.json").read_text())["global_step"] == 6


def test_a_state_only_left_as_old_by_a_kill_between_the_renames_is_still_found(tmp_path):
    from musubi_tuner.training.state import newest_state

    def state(name, step):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.json").write_text(json.dumps({"global_step": step}))

    state("x-step00000002-state", 2)
    state("x-step00000004-state.old", 4)
    state("x-step00000006-state.incomplete", 6)
    assert newest_state(tmp_path).name == "x-step00000004-state.old"
    state("x-step00000004-state", 4)  # once the replacement is there, the .old copy is only garbage
    assert newest_state(tmp_path).name == "x-step00000004-state"


def test_pruning_keeps_the_last_n_and_removes_what_a_killed_run_left_behind(tmp_path):
    from types import SimpleNamespace

    from musubi_tuner.training.checkpointing import CheckpointSaver

    saver = CheckpointSaver.__new__(CheckpointSaver)  # only the pruning: no network, no accelerator
    saver.out, saver.name, saver.accelerator = tmp_path, "x", SimpleNamespace(is_main_process=True)
    saver.args = SimpleNamespace(save_every_n_steps=2, save_last_n_steps=4, save_last_n_steps_state=None, save_state=True,
                                 save_every_n_epochs=1, save_last_n_epochs=2, save_last_n_epochs_state=None)
    for stem in [f"x-step{s:08d}" for s in (2, 4, 6, 8, 10)] + [f"x-{e:06d}" for e in (1, 2, 3, 4)] + ["xy-step00000002"]:
        _write(tmp_path / f"{stem}.safetensors", b"")
        _write(tmp_path / f"{stem}.comfyui.safetensors", b"")
        (tmp_path / f"{stem}-state").mkdir()
    (tmp_path / "x-step00000002.safetensors").unlink()  # killed between removing a LoRA and its companion
    saver._prune_steps(10)  # step 4 leaves the window; step 2 is what a run killed before its pruning left
    saver._prune_epochs(4)
    left = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors" and ".comfyui" not in p.name)
    assert left == ["x-000003.safetensors", "x-000004.safetensors", "x-step00000006.safetensors", "x-step00000008.safetensors",
                    "x-step00000010.safetensors", "xy-step00000002.safetensors"]
    assert sorted(p.name for p in tmp_path.glob("*-state")) == [n.replace(".safetensors", "-state") for n in left]
    assert len(list(tmp_path.glob("*.comfyui.safetensors"))) == len(left)


def test_as_a_process_the_refusal_is_the_only_line_on_stderr(assets, tmp_path, monkeypatch):
    """Where warnings and log lines really go: a refused pickle prints one line, no torch warning wall, and runs nothing."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)  # where the pickle would touch its file
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "src/musubi_tuner/cache_latents.py", "--dataset_config", str(assets.dataset),
                             "--vae", str(evil_pt(tmp_path))], cwd=root, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(root / "src")))
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2 and re.fullmatch(r"error: \S+evil\.pt: refused to load: the pickle holds objects other than "
                                                   r"tensors and plain containers \(it could run code when unpickled; .*\)", line)
    assert not (tmp_path / "pwned_by_pickle").exists()
