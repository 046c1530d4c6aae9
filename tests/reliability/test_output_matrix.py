"""merge_lora.py, hv_generate_video.py, convert_lora.py, the planner and the LoRA tools off the happy path
(see cases.py for what every case asserts)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from reliability_cases import (
    MEMORY,
    NOISE,
    READ_ONLY,
    TOO_LARGE,
    Case,
    all_said,
    check,
    far_clip,
    generate_argv,
    killed_while_writing,
    leftovers,
    link,
    merge_argv,
    nan_dit,
    nan_llm,
    nan_vae,
    nothing_generated,
    outputs_of,
    plan_argv,
    replaced,
    run_command,
    train_argv,
    write,
)


EMPTY_SAFETENSORS = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"  # a header of no tensors: a valid, empty file


def fifo_link(path: Path, tmp: Path) -> Path:
    """`path` made a link to a FIFO (tmp/pipe): what an output must never replace by a file."""
    os.mkfifo(tmp / "pipe")
    path.parent.mkdir(parents=True, exist_ok=True)
    return link(path, tmp / "pipe")


def still_a_fifo(path: Path) -> None:
    assert stat.S_ISFIFO(os.lstat(path).st_mode), "the FIFO was replaced"


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_written_through_link(tmp: Path) -> None:
    """The state went into the folder the link names (as for a file output), and the link stayed."""
    assert (tmp / "out" / "tiny-state").is_symlink()
    assert sorted(p.name for p in (tmp / "big" / "st").iterdir()) == ["network.safetensors", "optimizer.pt", "rng_0.pt",
                                                                   "train_state.json"]
    assert not leftovers(tmp / "out") and not leftovers(tmp / "big")


def latent_file(path: Path, shape, dtype: str = "float32", metadata: dict | None = None, value: float = 0) -> Path:
    from safetensors.torch import save_file
    import torch

    save_file({"latent": torch.full(shape, value, dtype=getattr(torch, dtype))}, str(path), metadata=metadata)
    return path


def absent(path: Path) -> None:
    assert not path.exists(), f"{path} was written"


def absent_all(folder: Path) -> None:
    """Nothing in `folder`, or no `folder` (a command that fails removes the empty folders it made)."""
    assert not folder.exists() or not list(folder.iterdir()), list(folder.iterdir())


def merged_before(a, tmp, *extra):
    """An earlier merge in tmp/merged (what a failed rerun must not damage), then the rerun's command line."""
    result = run_command("merge_lora", merge_argv(a, tmp), tmp)
    assert result.code == 0, result.err[-3000:]
    return merge_argv(a, tmp, extra=["--lora_multiplier", "0.5", *extra])


def damaged_dit(a, tmp, how: str) -> Path:
    """The tiny DiT as safetensors, damaged: its config metadata not JSON, one tensor gone, or every tensor int32."""
    from safetensors.torch import load_file, save_file

    from musubi_tuner.files import read_safetensors_header

    tensors, metadata = load_file(str(a.dit_st)), read_safetensors_header(a.dit_st)[1]
    if how == "config":
        metadata["musubi_tuner.dit_config"] = "{"
    elif how == "missing":
        del tensors["txt_in.input_embedder.bias"]
    else:
        tensors = {k: v.to(torch.int32) for k, v in tensors.items()}
    path = tmp / f"dit_{how}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def of_run(a, tmp, seed: int) -> Path:
    """The asset LoRA as a checkpoint of the training run of `seed` (in its metadata, as the trainer records it)."""
    from safetensors.torch import load_file, save_file

    from musubi_tuner.files import read_safetensors_header

    metadata = {**read_safetensors_header(a.lora)[1], "ss_seed": str(seed), "ss_learning_rate": "0.001"}
    save_file(load_file(str(a.lora)), str(tmp / f"run{seed}.safetensors"), metadata=metadata)
    return tmp / f"run{seed}.safetensors"


def own_copy(path, tmp):
    """A copy of an asset in tmp/own, which the case may name as its output (and must keep)."""
    import shutil

    (tmp / "own").mkdir(exist_ok=True)
    return Path(shutil.copy2(path, tmp / "own" / path.name))


def vae_safetensors(a, tmp) -> Path:
    """The tiny VAE as tmp/vae.safetensors (made once per case)."""
    path = tmp / "vae.safetensors"
    if not path.exists():
        from musubi_tuner.files import save_safetensors

        save_safetensors(torch.load(a.vae, weights_only=True), path)
    return path


def nothing_where_it_runs(a, tmp, err, out):
    written = [p.name for p in tmp.iterdir() if p.suffix in (".mp4", ".png", ".safetensors")]
    assert not written, written


def assert_names(text: str, pattern: str) -> None:
    import re

    assert re.search(pattern, text), text[-2000:]


def damaged_lora(a, tmp, name: str, change=None, metadata=None) -> Path:
    """A copy of the tiny DiT's LoRA in tmp, its tensors passed through `change` (a dict -> dict) and its metadata updated."""
    from safetensors.torch import save_file

    from musubi_tuner import files

    f = files.StateDictFile(a.lora)
    weights = f.load_all()
    path = tmp / name
    save_file(change(weights) if change else weights, str(path), metadata={**dict(f.metadata), **(metadata or {})})
    return path


def _first_alpha(weights) -> str:
    return sorted(k for k in weights if k.endswith(".alpha"))[0]


def with_int_weights(weights):
    import torch

    return {k: v if k.endswith(".alpha") else v.to(torch.int32) for k, v in weights.items()}


def with_square_alpha(weights):
    import torch

    return {**weights, _first_alpha(weights): torch.ones(32, 32)}


def with_negative_alpha(weights):
    import torch

    return {**weights, _first_alpha(weights): torch.tensor(-4.0)}


def with_a_weight_diff(weights):
    """The LoRA with a whole-weight difference (.diff) of one block Linear beside its pairs, as LyCORIS writes one."""
    import torch

    from musubi_tuner.demo.tiny_dit import TINY_DIT

    width = TINY_DIT.hidden_size
    return {**weights, "lora_unet_double_blocks_0_img_attn_proj.diff": torch.full((width, width), 0.01)}


def same_update(a, tmp, err, out):
    """The converted file applies what the input applies, a negative alpha's sign included (not zeros)."""
    import torch

    from musubi_tuner.networks.lora_reader import read_lora

    want = {p.module: p.delta(p.shape) for p in read_lora(tmp / "neg.safetensors").patches}
    got = {p.module: p.delta(p.shape) for p in read_lora(tmp / "other.safetensors").patches}
    assert want.keys() == got.keys() and all(torch.allclose(got[m], want[m], atol=1e-6) for m in want)


CASES = [
    # --- merging
    Case("merge-multiplier-count", "merge_lora", lambda a, t: merge_argv(a, t, extra=["--lora_multiplier", "1", "0.5"]), None,
         warning=r"--lora_multiplier gives 2 values for 1 file\(s\): the last 1 unused"),  # (as musubi-tuner reads them)
    Case("merge-multiplier-not-a-number", "merge_lora", lambda a, t: merge_argv(a, t, extra=["--lora_multiplier", "inf"]),
         r"--lora_multiplier inf: not a finite number"),
    Case("merge-lora-that-makes-layers-hundreds-of-times-larger-is-said", "merge_lora",
         lambda a, t: merge_argv(a, t, extra=("--lora_multiplier", "1e3")), None,
         warning=r"merged\.safetensors: the merged weights of \d+ layer\(s\) are over 100 times the base's \(\S+: \S+ times\)"),
    Case("merge-multiplier-that-makes-the-update-a-diverged-training-s-is-refused", "merge_lora",
         lambda a, t: merge_argv(a, t, extra=("--lora_multiplier", "1e8")),
         r"lora\.safetensors: \S+: with the multiplier 1e\+08 its update reaches \S+ per weight, where a trained LoRA's stays well "
         r"below 1: the output would be noise; use a multiplier near 1", then=lambda a, t, err, out: absent(t / "merged")),
    Case("merge-lora-of-another-model-size", "merge_lora", lambda a, t: merge_argv(a, t, a.lora_big),
         r"lora_big\.safetensors: \S+ is \[.*\] in the LoRA but \[.*\] in .*dit\.pt"),
    Case("merge-lora-is-the-dit", "merge_lora", lambda a, t: merge_argv(a, t, a.dit),
         r"dit\.pt: not a LoRA file: its tensors sit under 'module' .*; they look like a HunyuanVideo DiT \(pass it with --dit\)"),
    Case("merge-that-fails-leaves-no-empty-output-folders", "merge_lora",
         lambda a, t: [*merge_argv(a, t, a.lora_nan)[:-4], "--save_merged_model", str(t / "new" / "deep" / "merged.safetensors"),
                       "--device", "cpu"],
         r"lora_nan\.safetensors.*(NaN|non-finite)",
         then=lambda a, t, err, out: not (t / "new").exists() or pytest.fail(f"left: {sorted((t / 'new').rglob('*'))}")),
    Case("merge-lora-with-nan-writes-nothing", "merge_lora", lambda a, t: merged_before(a, t) and merge_argv(a, t, a.lora_nan),
         r"lora_nan\.safetensors.*(NaN|non-finite)", keep=outputs_of("merged")),
    Case("merge-lora-ranks-disagree", "merge_lora", lambda a, t: merge_argv(a, t, a.lora_ranks), r"lora_ranks\.safetensors: \S+"),
    Case("merge-dit-with-inf-where-the-lora-adds-names-the-dit", "merge_lora",
         lambda a, t: ["--dit", str(nan_dit(a, t, "double_blocks.0.img_attn_qkv.weight")), *merge_argv(a, t)[2:]],
         r"nan_dit\.safetensors: double_blocks\.0\.img_attn_qkv\.weight would hold 1 NaN/inf values \(the DiT file itself holds "
         r"them\); nothing was written"),
    Case("merge-dit-with-inf-writes-nothing", "merge_lora", lambda a, t: ["--dit", str(nan_dit(a, t)), *merge_argv(a, t)[2:]],
         r"nan_dit\.safetensors: final_layer\S+ would hold 1 NaN/inf values \(the DiT file itself holds them\); nothing was written"),
    Case("merge-device-without-cuda", "merge_lora", lambda a, t: merge_argv(a, t)[:-2] + ["--device", "cuda:0"],
         r"--device cuda:0: (this PyTorch is built without CUDA|no CUDA device is visible)"),
    Case("merge-full-disk-keeps-the-old-merge", "merge_lora", lambda a, t: merged_before(a, t),
         r"merged\.safetensors: cannot write " + TOO_LARGE, keep=outputs_of("merged"),
         file_size_limit=lambda a, t: (t / "merged" / "merged.safetensors").stat().st_size // 2),
    Case("merge-lora-weight-empty", "merge_lora", lambda a, t: replaced(merge_argv(a, t), "--lora_weight", ""),
         r"--lora_weight is empty: give a file or folder"),  # was a ValueError traceback (Path("") has an empty name)
    Case("merge-read-only-folder", "merge_lora", lambda a, t: merge_argv(a, t), r"merged: cannot .*" + READ_ONLY, read_only="merged"),
    # --- generation: everything checked before the text encoders and the sampler run
    Case("generate-save-path-empty-writes-nothing-where-it-runs", "hv_generate_video",
         lambda a, t: replaced(generate_argv(a, t, "--output_type", "video"), "--save_path", ""),
         r"--save_path is empty: give a file or folder \(an unset shell variable gives an empty value\)",
         then=nothing_where_it_runs),  # (it wrote the video into the folder it ran from)
    Case("generate-video-length-not-4n1", "hv_generate_video", lambda a, t: generate_argv(a, t, "--video_length", "6"),
         r"--video_length 6 is not 4N\+1 \(try 5 or 9\)"),
    Case("generate-size-not-multiple-of-16", "hv_generate_video", lambda a, t: generate_argv(a, t, "--video_size", "40", "47"),
         r"--video_size 40 47: height and width must be multiples of 16 \(try 48 48\)", then=nothing_generated),
    Case("generate-infer-steps-zero", "hv_generate_video", lambda a, t: generate_argv(a, t, "--infer_steps", "0"),
         r"--infer_steps 0: must be between 1 and 1000", then=nothing_generated),
    Case("generate-fps-zero", "hv_generate_video", lambda a, t: generate_argv(a, t, "--fps", "0"), r"--fps 0: must be between 1 and 240"),
    Case("generate-seed-beyond-64-bits", "hv_generate_video", lambda a, t: generate_argv(a, t, "--seed", str(2**64)),
         r"--seed 18446744073709551616: must be between 0 and 18446744073709551615"),
    Case("generate-device-without-cuda", "hv_generate_video", lambda a, t: generate_argv(a, t, "--device", "cuda"),
         r"--device cuda: (this PyTorch is built without CUDA|no CUDA device is visible)", then=nothing_generated),
    Case("generate-i2v-image-with-t2v-model", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--image_path", str(a.dataset.parent / "images" / "image_0000.png")),
         r"--image_path needs a SkyReels I2V DiT \(32 input channels\); .*dit\.pt has 16"),
    Case("generate-multiplier-count", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora), str(shutil.copy(a.lora, t / "second.safetensors")), "--lora_multiplier",
                                 "0.5"), None,
         warning=r"--lora_multiplier gives 1 value\(s\) for 2 files: \S+ is applied at 1\.0, as musubi-tuner reads the flag"),
    Case("generate-lora-weight-given-twice", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora), "--lora_weight", str(a.lora)),
         r"--lora_weight given twice; list all its values after one --lora_weight"),
    Case("generate-lora-weight-without-a-file", "hv_generate_video", lambda a, t: generate_argv(a, t, "--lora_weight"),
         r"--lora_weight: expected at least one argument"),
    Case("merge-lora-multiplier-given-twice", "merge_lora",
         lambda a, t: merge_argv(a, t, extra=("--lora_multiplier", "1", "--lora_multiplier", "0.5")),
         r"--lora_multiplier given twice; list all its values after one --lora_multiplier"),
    Case("generate-lora-multiplier-without-a-lora-is-said-to-do-nothing", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_multiplier", "0.5"), None,
         warning=r"--lora_multiplier acts on the files of --lora_weight, and none is given: ignored"),
    Case("generate-lora-of-another-model-size", "hv_generate_video", lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora_big)),
         r"lora_big\.safetensors: \S+ is \[\d+, \d+\] in the LoRA but \[.*\] in .*dit\.pt \(a LoRA for another model size\?\)",
         then=nothing_generated),
    Case("generate-lora-with-nan-writes-nothing", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora_nan), "--output_type", "video"),
         r"lora_nan\.safetensors.*(NaN|non-finite)", then=nothing_generated),
    Case("generate-lora-ranks-disagree", "hv_generate_video", lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora_ranks)),
         r"lora_ranks\.safetensors: \S+", then=nothing_generated),
    Case("generate-dit-with-inf-writes-nothing", "hv_generate_video",
         lambda a, t: ["--dit", str(nan_dit(a, t)), *generate_argv(a, t, "--output_type", "video")[2:]],
         r"nan_dit\.safetensors: final_layer\S+ holds NaN or infinite values: the file is damaged, download it again",
         then=nothing_generated),
    # (an infinity in a query projection: attention without a mask on the CPU gave finite rows, and a finite video)
    Case("generate-dit-with-inf-in-attention-writes-nothing", "hv_generate_video",
         lambda a, t: ["--dit", str(nan_dit(a, t, "double_blocks.0.img_attn_qkv.weight")),
                       *generate_argv(a, t, "--output_type", "video")[2:]],
         r"nan_dit\.safetensors: double_blocks\.0\.img_attn_qkv\.weight holds NaN or infinite values: the file is damaged",
         then=nothing_generated),
    Case("generate-extreme-lora-multiplier-is-refused-before-sampling", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--output_type", "video", "--lora_weight", str(a.lora), "--lora_multiplier", "1e30"),
         r"lora\.safetensors: \S+: with the multiplier 1e\+30 its update reaches \S+ per weight, where a trained LoRA's stays well "
         r"below 1: the output would be noise; use a multiplier near 1", then=nothing_generated),
    Case("generate-extreme-guidance-is-named-as-the-likely-cause", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--output_type", "video", "--guidance_scale", "1e30"),
         r"(holds \d+ non-finite \(NaN/inf\) values of \d+; nothing was written|the VAE decoded NaN/inf pixels from a finite "
         r"latent|reaches \S+, where a VAE's latents stay within a few units: it cannot be decoded into a video, and nothing "
         r"was written)[:;] --guidance_scale 1e\+30, far from the usual, may be the cause; else ",
         then=lambda a, t, err, out: not list((t / "videos").glob("*.mp4")) or pytest.fail("a video was written")),
    Case("generate-negative-guidance-as-musubi-tuner-takes-it", "hv_generate_video",  # (fuzz_ab 12: "must be at least 0")
         lambda a, t: generate_argv(a, t, "--guidance_scale", "-2", "--negative_prompt", "a blue square"), None,
         then=lambda a, t, err, out: len(list((t / "videos").glob("*.safetensors"))) == 1 or pytest.fail(err)),
    Case("generate-far-flow-shift-that-does-not-overflow-is-said-before-the-work", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--output_type", "latent", "--flow_shift", "1e6"), None,
         warning=r"--flow_shift 1e\+06, far from the usual, may be the cause of a NaN or noisy video"),
    Case("generate-text-encoder-with-nan-generates-nothing", "hv_generate_video",
         lambda a, t: replaced(generate_argv(a, t, "--output_type", "video"), "--text_encoder1", nan_llm(a, t)),
         r"te1/model-00001-of-00002\.safetensors: model\.layers\.0\.mlp\.down_proj\.weight holds NaN or infinite values: the file "
         r"is damaged", then=nothing_generated),
    Case("generate-fp8-with-a-weight-diff-says-it-is-rounded", "hv_generate_video",  # (a 5 % diff reached the model as
         lambda a, t: generate_argv(a, t, "--fp8", "--lora_weight",  # 54 % fp8 rounding, unsaid: fuzz_aw 12)
                                    str(damaged_lora(a, t, "diff.safetensors", with_a_weight_diff))), None,
         warning=r"diff\.safetensors: its whole-weight differences \(\.diff, set_weight\) of 1 fp8 weights are merged and "
                 r"requantized to fp8, which rounds most of a small difference away; generate without --fp8"),
    Case("generate-text-encoder-of-far-values-generates-nothing", "hv_generate_video",  # (finite: the DiT made NaN of it,
         lambda a, t: replaced(generate_argv(a, t, "--output_type", "video"), "--text_encoder2", far_clip(a, t)),  # and was
         r"the prompt's encoding by \S+te2_far \(--text_encoder2\) reaches 1e\+30, past float16's range, in which a text "  # blamed:
         r"encoder runs on a GPU: its file is damaged", then=nothing_generated),  # fuzz_ar 14)
    Case("generate-vae-decoder-with-nan-writes-nothing", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--output_type", "video", vae=nan_vae(a, t, "decoder")),
         r"nan_vae\.pt: decoder\.conv_in\.conv\.weight holds NaN or infinite values: the file is damaged",  # (before the sampling: it
         then=nothing_generated),  # was found after all of it, fuzz_y 1)
    Case("generate-vae-is-the-dit", "hv_generate_video", lambda a, t: generate_argv(a, t, vae=a.dit),
         r"dit\.pt: not a VAE checkpoint: its tensors sit under 'module'", then=nothing_generated),
    Case("generate-v2v-strength-rounds-to-no-step", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--video_path", str(next((a.dataset.parent / "videos").glob("*.mp4")))), None,
         warning=r"--strength 0\.8 of 1 steps runs int\(0\.8\) = 0 of them: the input video comes back unchanged; "
                 r"raise --strength to at least 1 or --infer_steps"),
    Case("generate-strength-without-video-path-is-said", "hv_generate_video",  # (it was ignored without a word)
         lambda a, t: generate_argv(a, t, "--strength", "0.3"), None,
         warning=r"--strength 0\.3: used only with --video_path \(V2V\), and none is given: ignored"),
    Case("generate-flags-their-partner-flag-would-use-are-said", "hv_generate_video",  # (each was ignored without a word)
         lambda a, t: generate_argv(a, t, "--compile_mode", "max-autotune", "--split_uncond", "--use_pinned_memory_for_block_swap",
                                    "--vae_chunk_size", "8", "--cfg_end", "0.5"), None,
         warning=r"--compile_mode: acts with --compile, which is not given: ignored",
         then=lambda a, t, err, out: all_said(err, r"--split_uncond acts with real CFG .*: ignored",
                                              r"--cfg_end 0\.5 acts with real CFG .*: ignored",  # (fuzz_ap 8)
                                              r"--use_pinned_memory_for_block_swap acts with --blocks_to_swap, and none is given: ignored",
                                              r"--vae_chunk_size: the VAE does not run with --output_type latent: ignored")),
    Case("generate-v2v-video-corrupt", "hv_generate_video", lambda a, t: generate_argv(a, t, "--video_path", str(write(t / "clip.mp4", NOISE))),
         r"clip\.mp4: not a readable video", then=nothing_generated),
    Case("generate-save-path-is-a-file", "hv_generate_video",
         lambda a, t: replaced(generate_argv(a, t), "--save_path", write(t / "afile.txt", "notes")),
         r"afile\.txt: is a file, not a folder; choose another --save_path", keep=lambda a, t: [t / "afile.txt"]),
    Case("generate-read-only-save-path", "hv_generate_video", lambda a, t: generate_argv(a, t),
         r"videos: cannot write to this folder " + READ_ONLY + r"; \S*videos is on a read-only file system, or choose another --save_path",
         read_only="videos", then=nothing_generated),
    Case("generate-video-over-the-file-size-limit", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--output_type", "video", "--video_length", "5"),
         r"videos/\S+\.mp4: cannot write " + TOO_LARGE, file_size_limit=lambda a, t: 2000),
    Case("generate-frames-over-the-file-size-limit", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--output_type", "images", "--video_length", "5"),
         r"videos/(\d+-\d+-\d+_0_1)/\1_000\.png: cannot write " + TOO_LARGE, file_size_limit=lambda a, t: 200,
         then=lambda a, t, err, out: absent_all(t / "videos")),  # no frames folder, whole or in part
    *[Case(f"generate-latent-path-of-shape-{'x'.join(map(str, shape))}", "hv_generate_video",
           lambda a, t, shape=shape: ["--dit", str(a.dit), "--vae", str(a.vae), "--save_path", str(t / "videos"),
                                      "--latent_path", str(latent_file(t / "odd.safetensors", shape))],
           r"odd\.safetensors: latent has shape \[" + ", ".join(map(str, shape)) + r"\], expected \(16, frames, height, width\)",
           then=nothing_generated)
      for shape in ((8, 2, 4, 4), (16, 0, 4, 4), (2, 4, 4))],  # (the shape stored, not one with a frame axis added)
    Case("generate-both-whose-video-cannot-be-written-says-where-the-latent-is", "hv_generate_video",  # (fuzz_ah 7: unsaid)
         lambda a, t: replaced(replaced(generate_argv(a, t), "--output_type", "both"), "--video_length", "5"),
         r"\.mp4: cannot write .*; the latent is saved as \S+_latent\.safetensors: decode it later with --latent_path "
         r"\S+_latent\.safetensors$", file_size_limit=lambda a, t: 3000),
    Case("generate-latent-path-far-beyond-any-vae-latent-blames-the-file", "hv_generate_video",  # (fuzz_ab 9: "the VAE ... damaged")
         lambda a, t: ["--dit", str(a.dit), "--vae", str(a.vae), "--save_path", str(t / "videos"), "--latent_path",
                       str(latent_file(t / "far.safetensors", (16, 1, 4, 4), value=1e30, metadata={"guidance_scale": "1e+25"}))],
         r"far\.safetensors: the saved latent reaches 1e\+30, where a VAE's latents stay within a few units: a diverged sampling's "
         r"\(its metadata records --guidance_scale 1e\+25\); it cannot be decoded into a video", then=nothing_generated),
    Case("generate-latent-path-of-integers", "hv_generate_video",
         lambda a, t: ["--dit", str(a.dit), "--vae", str(a.vae), "--save_path", str(t / "videos"),
                       "--latent_path", str(latent_file(t / "odd.safetensors", (16, 1, 4, 4), dtype="int32"))],
         r"odd\.safetensors: latent is int32, not floating point", then=nothing_generated),
    Case("generate-latent-path-says-what-it-ignores", "hv_generate_video",
         lambda a, t: ["--dit", str(a.dit), "--vae", str(a.vae), "--save_path", str(t / "videos"), "--prompt", "a cat",
                       "--image_path", str(write(t / "first.png", NOISE)), "--video_size", "128", "128", "--infer_steps", "9",
                       "--fp8", "--step_cache", "teacache", "--vae_chunk_size", "4",  # (the last one is read)
                       "--latent_path", str(latent_file(t / "saved.safetensors", (16, 1, 4, 4)))], None,
         warning=r"--video_size, --infer_steps, --image_path, --fp8, --step_cache: not used with --latent_path, which only "
                 r"decodes the saved latents \(at their own size and settings\)"),  # (fuzz_ai 3: only --image_path was named)
    Case("generate-latent-path-with-save-merged-model-is-two-jobs", "hv_generate_video",
         lambda a, t: ["--dit", str(a.dit), "--vae", str(a.vae), "--save_path", str(t / "videos"), "--save_merged_model",
                       str(t / "merged.safetensors"), "--latent_path", str(latent_file(t / "saved.safetensors", (16, 1, 4, 4)))],
         r"--save_merged_model and --latent_path are two jobs \(merge LoRAs into the DiT; decode saved latents\): run them as "
         r"two commands", then=nothing_generated),  # (fuzz_ai 3: exit 0, nothing merged, not a word)
    Case("generate-latent-whose-seed-is-a-path-writes-inside-the-save-path", "hv_generate_video",
         lambda a, t: ["--dit", str(a.dit), "--vae", str(a.vae), "--save_path", str(t / "videos"), "--prompt", "a cat",
                       "--latent_path", str(latent_file(t / "saved.safetensors", (16, 1, 4, 4), metadata={"seeds": "/../../escaped"}))],
         None, warning=r"the latent's metadata gives seeds = '/\.\./\.\./escaped', which is no seed: the output is named with seed 0",
         then=lambda a, t, err, out: [p.name for p in t.rglob("*.mp4")] == [p.name for p in (t / "videos").glob("*_0_0.mp4")] != []
         or pytest.fail(f"{sorted(t.rglob('*.mp4'))}")),
    Case("generate-prompt-not-utf-8", "hv_generate_video", lambda a, t: replaced(generate_argv(a, t), "--prompt", "a cat \udcff\udcfe"),
         r"--prompt is not UTF-8 text \(byte 0xff at character 7\)", then=nothing_generated),
    Case("generate-negative-prompt-not-utf-8", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--guidance_scale", "2", "--negative_prompt", "\udcff"),
         r"--negative_prompt is not UTF-8 text \(byte 0xff at character 1\)", then=nothing_generated),
    Case("generate-prompt-blank", "hv_generate_video", lambda a, t: replaced(generate_argv(a, t), "--prompt", " \t "),
         r"--prompt is blank", then=nothing_generated),
    Case("generate-prompt-empty-is-given-and-blank", "hv_generate_video", lambda a, t: replaced(generate_argv(a, t), "--prompt", ""),
         r"--prompt is blank", then=nothing_generated),  # (an unset shell variable: it said "--prompt is required")
    Case("generate-video-size-beyond-any-machine", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--video_size", "100000", "100000"),
         r"--video_size 100000: at most 8192 pixels a side", then=nothing_generated),
    Case("generate-latent-path-is-a-folder", "hv_generate_video",
         lambda a, t: ["--dit", str(a.dit), "--vae", str(a.vae), "--save_path", str(t / "videos"), "--latent_path", str(t)],
         r": expected a latent file, found a folder \(--latent_path\)", then=nothing_generated),
    Case("generate-out-of-memory-says-what-needs-less", "hv_generate_video",  # a 2.06 GiB latent, over MEMORY
         lambda a, t: generate_argv(a, t, "--video_size", "8192", "8192", "--video_length", "129"),
         r"out of host memory: an allocation of [\d.]+ [GMK]iB failed under this process's address-space limit of \S+ \S+ \(ulimit -v\): "
         r"raise it, or ask for a larger one; a smaller --video_size or --video_length needs less, .*"
         r"--dry_run --vram_budget 24G", memory_headroom=MEMORY),
    Case("generate-dry-run-read-only-save-path", "hv_generate_video", lambda a, t: generate_argv(a, t, "--dry_run"),
         r"videos: cannot write to this folder " + READ_ONLY + r"; \S*videos is on a read-only file system, or choose another --save_path",
         read_only="videos", then=nothing_generated),
    # --- outputs that are links to what is no file, or files where a folder goes: refused before the work, kept
    Case("train-output-linked-to-a-fifo-is-refused-and-kept", "hv_train_network",
         lambda a, t: train_argv(a, t / "out") if fifo_link(t / "out" / "tiny.safetensors", t) else [],
         r"out/tiny\.safetensors: cannot write: it is a FIFO \(through a link to \S+/pipe\), not a file to save in; move it away",
         then=lambda a, t, err, out: still_a_fifo(t / "pipe")),
    Case("merge-output-linked-to-a-fifo-is-refused-and-kept", "merge_lora",
         lambda a, t: merge_argv(a, t) if fifo_link(t / "merged" / "merged.safetensors", t) else [],
         r"merged\.safetensors: cannot write: it is a FIFO \(through a link to \S+/pipe\)",
         then=lambda a, t, err, out: still_a_fifo(t / "pipe")),
    Case("train-output-that-is-a-link-loop-is-refused", "hv_train_network",
         lambda a, t: train_argv(a, t / "out") if link(mkdir(t / "out") / "tiny.safetensors", t / "out" / "tiny.safetensors") else [],
         r"out/tiny\.safetensors: cannot write: a symbolic link loop; remove the link or choose another name"),
    Case("train-state-name-taken-by-a-file-is-refused-and-the-file-kept", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--save_state") if write(mkdir(t / "out") / "tiny-state", "my notes") else [],
         r"out/tiny-state: cannot write: it is a file, not a folder to save in; move it away", keep=lambda a, t: [t / "out" / "tiny-state"]),
    Case("train-state-that-is-a-link-writes-the-link-s-folder", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--save_state") if link(mkdir(t / "out") / "tiny-state", mkdir(t / "big" / "st")) else [],
         None, then=lambda a, t, err, out: state_written_through_link(t)),
    Case("merge-output-is-the-dit", "merge_lora",
         lambda a, t: ["--dit", str(own_copy(a.dit_st, t)), "--lora_weight", str(a.lora), "--device", "cpu",
                       "--save_merged_model", str(link(t / "merged.safetensors", t / "own" / a.dit_st.name))],
         r"--save_merged_model .*: is .*, which this command reads \(--dit\)", keep=lambda a, t: [t / "own" / a.dit_st.name]),
    Case("generate-merged-model-is-the-dit", "hv_generate_video",
         lambda a, t: replaced(generate_argv(a, t, "--lora_weight", str(a.lora), "--save_merged_model",
                                             str(t / "own" / a.dit_st.name)), "--dit", own_copy(a.dit_st, t)),
         r"--save_merged_model .*: is .*, which this command reads \(--dit\)", keep=lambda a, t: [t / "own" / a.dit_st.name]),
    Case("generate-merged-model-is-the-lora", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_weight", str(own_copy(a.lora, t)), "--save_merged_model", str(t / "own" / a.lora.name)),
         r"--save_merged_model .*: is .*, which this command reads \(--lora_weight\)", keep=lambda a, t: [t / "own" / a.lora.name]),
    # (a typo replaced the VAE, or a text encoder's weights, with the merged DiT: only --dit and --lora_weight were compared)
    Case("generate-merged-model-is-the-vae", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora), "--save_merged_model", str(vae_safetensors(a, t)),
                                    vae=vae_safetensors(a, t)),
         r"--save_merged_model .*: is .*, which this command reads \(--vae\)", keep=lambda a, t: [vae_safetensors(a, t)]),
    Case("generate-merged-model-is-a-text-encoder-weight-file", "hv_generate_video",
         lambda a, t: replaced(generate_argv(a, t, "--lora_weight", str(a.lora), "--save_merged_model", str(t / "te2" / "model.safetensors")),
                               "--text_encoder2", shutil.copytree(a.te2, t / "te2")),
         r"--save_merged_model .*: is .*, which this command reads \(--text_encoder2\)", keep=lambda a, t: [t / "te2" / "model.safetensors"]),
    Case("generate-merged-model-not-safetensors", "hv_generate_video",
         lambda a, t: generate_argv(a, t, "--lora_weight", str(a.lora), "--save_merged_model", str(t / "merged.pt")),
         r"--save_merged_model .*merged\.pt: the merged model is written as \.safetensors", then=nothing_generated),
    # --- converting, averaging, planning, inspecting
    Case("merge-into-a-dit-whose-config-metadata-is-damaged", "merge_lora",
         lambda a, t: ["--dit", str(damaged_dit(a, t, "config")), *merge_argv(a, t)[2:]],
         r"dit_config\.safetensors: not a usable HunyuanVideo DiT: its metadata musubi_tuner\.dit_config give no model "
         r"\(JSONDecodeError", then=lambda a, t, err, out: absent(t / "merged" / "merged.safetensors")),
    Case("merge-into-a-dit-missing-a-tensor", "merge_lora", lambda a, t: ["--dit", str(damaged_dit(a, t, "missing")), *merge_argv(a, t)[2:]],
         r"dit_missing\.safetensors: not a complete HunyuanVideo DiT: keys 1 missing \(e\.g\. txt_in\.input_embedder\.bias\)",
         then=lambda a, t, err, out: absent(t / "merged" / "merged.safetensors")),
    Case("merge-into-an-integer-dit", "merge_lora", lambda a, t: ["--dit", str(damaged_dit(a, t, "int")), *merge_argv(a, t)[2:]],
         r"dit_int\.safetensors: tensor \S+ is int32; a DiT's weights are floating point",
         then=lambda a, t, err, out: absent(t / "merged" / "merged.safetensors")),
    Case("merge-into-a-git-lfs-pointer", "merge_lora",
         lambda a, t: ["--dit", str(write(t / "dit.pt", "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")),
                       *merge_argv(a, t)[2:]],
         r"dit\.pt: not a PyTorch DiT checkpoint: a Git LFS pointer, not the file \(the download fetched the pointer only"),
    Case("lora-info-of-a-text-file-named-pt", "lora_info", lambda a, t: [str(write(t / "lora.pt", "root:x:0:0:root:/root\n"))],
         r"lora\.pt: not a PyTorch LoRA file: it is text \('root:x:0:0:root:/root'"),
    Case("convert-output-is-the-input", "convert_lora",
         lambda a, t: ["--input", str(own_copy(a.lora, t)), "--output", str(t / "own" / ".." / "own" / a.lora.name), "--target", "other"],
         r"--output .*: is .*, which this command reads \(--input\)", keep=lambda a, t: [t / "own" / a.lora.name]),
    Case("post-hoc-ema-output-is-a-checkpoint", "lora_post_hoc_ema",
         lambda a, t: [str(own_copy(a.lora, t)), str(a.lora), "--output_file", str(t / "own" / a.lora.name)],
         r"--output_file .*: is .*, which this command reads \(the checkpoints to average\)",
         keep=lambda a, t: [t / "own" / a.lora.name]),
    Case("post-hoc-ema-of-two-runs-says-so", "lora_post_hoc_ema",
         lambda a, t: [str(of_run(a, t, 1)), str(of_run(a, t, 2)), "--no_sort", "--output_file", str(t / "ema.safetensors")], None,
         warning=r"run2\.safetensors: not of the run of run1\.safetensors \(ss_seed 1 -> 2\): the average mixes two training runs"),
    Case("post-hoc-ema-a-checkpoint-holds-nan", "lora_post_hoc_ema",
         lambda a, t: [str(a.lora), str(a.lora_nan), "--no_sort", "--output_file", str(t / "ema.safetensors")],
         r"\S+\.safetensors: \S+ holds NaN or infinite values", then=lambda a, t, err, out: absent(t / "ema.safetensors")),
    Case("post-hoc-ema-of-dit-checkpoints", "lora_post_hoc_ema",
         lambda a, t: [str(a.dit_st), str(own_copy(a.dit_st, t)), "--output_file", str(t / "ema.safetensors")],
         r"\S+\.safetensors: nothing in it can be applied: img_in\.proj\.weight: not a HunyuanVideo LoRA"),
    Case("post-hoc-ema-of-a-folder", "lora_post_hoc_ema", lambda a, t: [str(a.lora), str(t), "--output_file", str(t / "ema.safetensors")],
         r": expected a LoRA file, found a folder"),
    Case("post-hoc-ema-of-empty-files", "lora_post_hoc_ema",
         lambda a, t: [str(write(t / "a.safetensors", EMPTY_SAFETENSORS)), str(write(t / "b.safetensors", EMPTY_SAFETENSORS)),
                       "--output_file", str(t / "ema.safetensors")],
         r"a\.safetensors: holds no LoRA entries"),
    Case("convert-output-folder-is-a-file", "convert_lora",
         lambda a, t: ["--input", str(a.lora), "--output", str(write(t / "afile", "x") / "x.safetensors"), "--target", "other"],
         r"afile: is a file, not a folder; choose another --output$", keep=lambda a, t: [t / "afile"]),
    Case("post-hoc-ema-output-folder-is-a-file", "lora_post_hoc_ema",
         lambda a, t: [str(a.lora), str(own_copy(a.lora, t)), "--output_file", str(write(t / "afile", "x") / "ema.safetensors")],
         r"afile: is a file, not a folder; choose another --output_file$", keep=lambda a, t: [t / "afile"]),
    Case("demo-on-a-full-disk-is-one-line", "demo.__main__", lambda a, t: ["--workdir", str(t / "demo")],
         r"demo/\S+: cannot write \(File too large\)", file_size_limit=lambda a, t: 20_000),
    # a name of 240 bytes is a legal file name, but its temporary file's (22 bytes longer) is not: refused before the work
    Case("convert-output-name-too-long-for-its-temporary-file", "convert_lora",
         lambda a, t: ["--input", str(a.lora), "--output", str(t / ("n" * 228 + ".safetensors")), "--target", "other"],
         r"--output: 240 bytes, and the names of the files it names reach 262 \(such as \.n+\.\.\.\), over the 255 bytes a "
         r"name may have in \S+; use a name of at most 233 bytes$"),
    Case("post-hoc-ema-output-name-too-long-for-its-temporary-file", "lora_post_hoc_ema",
         lambda a, t: [str(a.lora), str(own_copy(a.lora, t)), "--output_file", str(t / ("n" * 228 + ".safetensors"))],
         r"--output_file: 240 bytes, .* use a name of at most 233 bytes$"),
    Case("merge-output-name-too-long-for-its-temporary-file", "merge_lora",
         lambda a, t: [*merge_argv(a, t)[:-3], str(t / ("n" * 228 + ".safetensors")), "--device", "cpu"],
         r"--save_merged_model: 240 bytes, .* use a name of at most 233 bytes$"),
    Case("convert-removes-what-a-killed-convert-left", "convert_lora",
         lambda a, t: ["--input", str(a.lora), "--output", str(killed_while_writing(t / "out.safetensors")), "--target", "other"],
         None),
    Case("post-hoc-ema-removes-what-a-killed-one-left", "lora_post_hoc_ema",
         lambda a, t: [str(a.lora), str(own_copy(a.lora, t)), "--output_file", str(killed_while_writing(t / "ema.safetensors"))],
         None),
    Case("convert-missing-input", "convert_lora",
         lambda a, t: ["--input", str(t / "nope.safetensors"), "--output", str(t / "out.safetensors"), "--target", "other"],
         r"nope\.safetensors: LoRA file not found"),
    Case("convert-lora-of-another-model", "convert_lora",
         lambda a, t: ["--input", str(a.lora_sdxl), "--output", str(t / "out.safetensors"), "--target", "other"],
         r"lora_sdxl\.safetensors: a LoRA for another model"),
    Case("plan-video-length-negative", "plan", lambda a, t: plan_argv("--video_length", "-3"), r"--video_length -3: must be at least 1"),
    Case("plan-context-parallel-that-splits-no-heads", "plan", lambda a, t: plan_argv("--context_parallel", "5"),
         r"--context_parallel 5: the DiT's 24 attention heads do not split over 5 processes; use one of 1, 2, 3, 4, 6, 8, 12, 24"),
    Case("plan-flags-of-the-other-mode-are-named", "plan", lambda a, t: plan_argv("--fp8", "--model", "t2v-720p", "--dit", str(a.dit)), None,
         warning=r"--fp8 acts on generation \(--mode generate\); this plan of training ignores it[\s\S]*"
                 r"--model t2v-720p is ignored: the shapes come from --dit"),
    # (the header's keys, shapes and dtypes, as the run checks them: a plan was printed for files the run refuses, fuzz_y 6)
    Case("plan-of-a-dit-the-run-would-refuse", "plan", lambda a, t: ["--dit", str(damaged_dit(a, t, "missing"))],
         r"dit_missing\.safetensors: not a complete HunyuanVideo DiT: keys 1 missing \(e\.g\. txt_in\.input_embedder\.bias\)"),
    Case("generate-dry-run-of-a-dit-of-integers", "hv_generate_video",
         lambda a, t: replaced(generate_argv(a, t, "--dry_run"), "--dit", damaged_dit(a, t, "int")),
         r"dit_int\.safetensors: tensor \S+ is int32; a DiT's weights are floating point"),
    Case("plan-batch-size-zero", "plan", lambda a, t: plan_argv("--batch_size", "0"), r"--batch_size 0: must be between 1 and 65536"),
    Case("plan-size-not-multiple-of-16", "plan", lambda a, t: plan_argv()[:2] + ["--video_size", "540", "960"],
         r"height and width must be multiples of 16"),
    Case("lora-info-reports-a-nan-lora", "lora_info", lambda a, t: [str(a.lora_nan)], None,
         then=lambda a, t, err, out: assert_names(out, r"(NaN|non-finite)")),
    Case("lora-info-missing-file", "lora_info", lambda a, t: [str(t / "nope.safetensors")], r"nope\.safetensors: .*not found"),
    # --- damaged LoRA files: refused by the reader every command goes through, or (metadata) ignored with a warning
    Case("merge-lora-with-integer-weights", "merge_lora", lambda a, t: merge_argv(a, t, damaged_lora(a, t, "ints.safetensors", with_int_weights)),
         r"ints\.safetensors: lora_unet_\w+\.lora_(up|down)\.weight: int32 weights; a LoRA holds floating-point tensors",
         then=lambda a, t, err, out: absent(t / "merged" / "merged.safetensors")),
    Case("convert-lora-with-integer-weights", "convert_lora",
         lambda a, t: ["--input", str(damaged_lora(a, t, "ints.safetensors", with_int_weights)), "--output", str(t / "out.safetensors"),
                       "--target", "other"],
         r"ints\.safetensors: lora_unet_\w+\.lora_(up|down)\.weight: int32 weights; a LoRA holds floating-point tensors",
         then=lambda a, t, err, out: absent(t / "out.safetensors")),
    Case("post-hoc-ema-an-alpha-of-many-values", "lora_post_hoc_ema",
         lambda a, t: [str(a.lora), str(damaged_lora(a, t, "square.safetensors", with_square_alpha)), "--no_sort",
                       "--output_file", str(t / "ema.safetensors")],
         r"square\.safetensors: lora_unet_\w+\.alpha: its alpha holds 1024 values, not one",
         then=lambda a, t, err, out: absent(t / "ema.safetensors")),
    Case("lora-info-with-an-integer-lora", "lora_info", lambda a, t: [str(damaged_lora(a, t, "ints.safetensors", with_int_weights))],
         r"ints\.safetensors: lora_unet_\w+\.lora_(up|down)\.weight: int32 weights; a LoRA holds floating-point tensors"),
    Case("lora-info-ignores-unreadable-metadata", "lora_info",
         lambda a, t: [str(damaged_lora(a, t, "meta.safetensors", metadata={"musubi_tuner.version": "0.1.0",
                                                                            "musubi_tuner.lora_modules": "{not json"}))], None,
         warning=r"meta\.safetensors: metadata musubi_tuner\.lora_modules is not valid JSON; ignored",
         then=lambda a, t, err, out: assert_names(out, r"modules +\d+ in \d+ blocks, rank 4")),
    Case("convert-negative-alpha-keeps-its-sign", "convert_lora",
         lambda a, t: ["--input", str(damaged_lora(a, t, "neg.safetensors", with_negative_alpha)), "--output", str(t / "other.safetensors"),
                       "--target", "other"], None, then=same_update),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_outputs(case, assets, tmp_path):
    check(case, assets, tmp_path)
