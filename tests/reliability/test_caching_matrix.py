"""cache_latents.py and cache_text_encoder_outputs.py off the happy path: the dataset TOML, the models, the media,
the captions, and the caches already on disk (see cases.py for what every case asserts)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_cases import (
    MEMORY,
    NOISE,
    READ_ONLY,
    TOO_LARGE,
    Case,
    cache_latents_argv,
    cache_text_argv,
    caches,
    check,
    far_clip,
    killed_while_writing,
    link,
    nan_llm,
    nan_vae,
    copy_dataset,
    evil_pt,
    no_file,
    summary_names,
    truncated,
    video_table,
    write,
    write_toml,
)


def corrupt_videos(a, tmp):
    toml, folder = copy_dataset(a, tmp)
    write(folder / "videos" / "corrupt.mp4", NOISE)
    write(folder / "videos" / "corrupt.txt", "noise")
    write(folder / "videos" / "zero.mp4", b"")
    write(folder / "videos" / "zero.txt", "nothing")
    return toml


def odd_images(a, tmp):
    folder = tmp / "images"
    folder.mkdir()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped, not composited
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(folder / "deep.png")  # I;16
    for stem in ("alpha", "deep"):
        write(folder / f"{stem}.txt", f"a {stem} image")
    return write_toml(tmp, f'[[datasets]]\nimage_directory = "{folder}"\ncache_directory = "{tmp / "cache"}"\n')


def images_cached(a, tmp, err, out):
    names = sorted(p.name for p in (tmp / "cache").glob("*_hv.safetensors"))
    assert names == ["alpha_0032x0032_hv.safetensors", "deep_0032x0032_hv.safetensors"]
    assert "2 latent caches cached" in out


def tiny_image(a, tmp):
    toml, folder = copy_dataset(a, tmp)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "images" / "dot.png")
    write(folder / "images" / "dot.txt", "a dot")
    text = toml.read_text().replace("enable_bucket = false", "enable_bucket = true\nbucket_no_upscale = true")
    toml.write_text(text)
    return toml


def links(a, tmp):
    toml, folder = copy_dataset(a, tmp)
    images = folder / "images"
    os.symlink(images / "gone.png", images / "broken.png")
    os.symlink(images / "loop_b.png", images / "loop_a.png")
    os.symlink(images / "loop_a.png", images / "loop_b.png")
    for stem in ("broken", "loop_a", "loop_b"):
        write(images / f"{stem}.txt", stem)
    return toml


def captions(a, tmp, kind: str):
    toml, folder = copy_dataset(a, tmp)
    target = folder / "videos" / "clip_0001.txt"
    if kind == "missing":
        target.unlink()
    elif kind == "empty":
        target.write_text("")
    elif kind == "fifo":  # read, it blocked the run for ever
        target.unlink()
        os.mkfifo(target)
    elif kind == "zero":  # read, it filled the memory
        target.unlink()
        target.symlink_to("/dev/zero")
    elif kind == "huge":  # 1 TiB, sparse: read, a MemoryError without a reason
        os.truncate(target, 2**40)
    else:
        target.write_bytes("un caf\xe9 noir".encode("latin-1"))
    return toml


def fifo_config(a, tmp):
    os.mkfifo(tmp / "dataset.toml")
    return tmp / "dataset.toml"


def image_named_in_latin1(a, tmp):
    """The first image and its caption renamed to b'caf\xe9' (a zip unpacked on Linux); no text cache yet."""
    toml, folder = copy_dataset(a, tmp)
    images = folder / "images"
    for suffix in (b".png", b".txt"):
        os.rename(os.fsencode(images / "image_0000") + suffix, os.fsencode(images) + b"/caf\xe9" + suffix)
    for cache in folder.glob("cache/*/*_hv_te.safetensors"):
        cache.unlink()
    return toml


def both_text_passes_kept(a, tmp, err, out):
    (cache,) = [p for p in (tmp / "ds" / "cache" / "images").iterdir() if os.fsencode(p.name) == b"caf\xe9_hv_te.safetensors"]
    from musubi_tuner.files import read_safetensors_header

    assert {key.split("_")[0] for key in read_safetensors_header(cache)[0]} == {"llm", "clipL"}, "a text pass was dropped"


def every_caption_unreadable(a, tmp):
    """The dataset with every caption file a folder (a caption that no run can read), and no text caches yet."""
    toml, folder = copy_dataset(a, tmp)
    for caption in folder.glob("*/*.txt"):
        caption.unlink()
        caption.mkdir()
    for cache in folder.glob("cache/*/*_hv_te.safetensors"):
        cache.unlink()
    return toml


def misspelt_caption_extension(a, tmp):
    toml, _ = copy_dataset(a, tmp)
    toml.write_text(toml.read_text().replace('caption_extension = ".txt"', 'caption_extension = ".tx"'))
    return toml


def emptied_folder(a, tmp):
    """The images folder as an unmounted drive shows it: there, but empty (its caches live in cache/images)."""
    toml, folder = copy_dataset(a, tmp)
    for p in (folder / "images").iterdir():
        p.unlink()
    return toml


def _with_unreadable_image(a, tmp):
    """A copy of the dataset with a text file named like an image among its images."""
    toml, folder = copy_dataset(a, tmp)
    (folder / "images" / "bad.png").write_text("not an image")
    (folder / "images" / "bad.txt").write_text("a caption")
    return toml


def killed_preview(a, tmp):
    """A copy of the dataset whose image previews folder holds what a --debug_mode video run killed mid-preview left."""
    toml, folder = copy_dataset(a, tmp)
    killed_while_writing(folder / "cache" / "images" / "debug_mode" / "image_0000_0032x0032_hv.jpg")
    return toml


def previews_whole(a, tmp, err, out):
    shown = sorted((tmp / "ds" / "cache" / "images" / "debug_mode").glob("*.jpg"))
    assert shown, out
    for path in shown:
        with Image.open(path) as image:
            image.load()


def huge_resolution(a, tmp):
    """The dataset asked for at 4096x4096: its 32 px items are upscaled, and the VAE's activations outgrow a memory limit."""
    toml, _ = copy_dataset(a, tmp)
    toml.write_text(toml.read_text().replace("resolution = [32, 32]", "resolution = [4096, 4096]"))
    return toml


def image_caches_kept(a, tmp, err, out):
    assert len(list((tmp / "ds").rglob("image_*_hv*.safetensors"))) >= 2, "the image caches were deleted"


def truncated_shard(a, tmp):
    import shutil

    folder = tmp / "te1"
    shutil.copytree(a.te1, folder)
    truncated(folder / "model-00001-of-00002.safetensors", folder / "model-00001-of-00002.safetensors", 0.3)
    return folder


def damaged_te1(a, tmp, damage):
    """A copy of the tiny LLM folder, `damage`d (a function of the folder)."""
    import shutil

    folder = tmp / "te1"
    shutil.copytree(a.te1, folder)
    damage(folder)
    return folder


def videos_into_the_image_cache(a, tmp):
    """A second dataset config whose videos are cached in the folder the first config's images were cached in."""
    _, folder = copy_dataset(a, tmp)
    return write(folder / "videos.toml", f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n[[datasets]]\n'
                                         f'video_directory = "{folder / "videos"}"\ncache_directory = "{folder / "cache" / "images"}"\n'
                                         f'target_frames = [5]\n')


def renamed_images_folder_less_one(a, tmp):
    """The dataset's copy, its image folder renamed and one image (image_0000) deleted from it."""
    toml, folder = copy_dataset(a, tmp)
    (folder / "images").rename(folder / "cat_images")
    for path in (folder / "cat_images").glob("image_0000.*"):
        path.unlink()
    return write(toml, toml.read_text().replace(str(folder / "images"), str(folder / "cat_images")))


def deleted_images_caches_kept_and_named(suffix):
    def then(a, tmp, err, out):
        assert "made by another dataset" not in err, err
        assert list((tmp / "ds").rglob(f"image_0000*{suffix}")), "the caches of a dataset not there now were deleted"
    return then


def replaced_flag(argv: list[str], flag: str, value: str) -> list[str]:
    return [value if i and argv[i - 1] == flag else v for i, v in enumerate(argv)]


def jsonl_after_a_folder(a, tmp):
    """A folder dataset, then a JSONL dataset whose second line is not JSON (a trailing comma)."""
    image = next((a.dataset.parent / "images").glob("*.png"))
    write(tmp / "meta.jsonl", f'{{"image_path": "{image}", "caption": "a"}}\n{{"image_path": "{image}", "caption": "b",}}\n')
    return write_toml(tmp, f'[[datasets]]\nimage_directory = "{image.parent}"\ncache_directory = "{tmp / "first"}"\n'
                           f'[[datasets]]\nimage_jsonl_file = "{tmp / "meta.jsonl"}"\ncache_directory = "{tmp / "second"}"\n')


def image_whose_caption_name_is_too_long(a, tmp):
    """The dataset's copy with an image of a 252-byte name (legal) and no caption: the look-up of the name the hint tries
    (CCC.png.txt, 256 bytes, which no file can have) raised 'File name too long' and stopped both caching commands."""
    import shutil

    toml, folder = copy_dataset(a, tmp)
    shutil.copy(sorted((folder / "images").glob("*.png"))[0], folder / "images" / f"{'C' * 248}.png")
    return toml


def image_of_an_extreme_aspect_ratio(a, tmp):
    """The dataset's copy with a 400000 x 1 image (a PNG of a few KB): scaled whole to cover a 32 x 32 bucket before the
    crop, it would be 12.8 million rows of 32 pixels (1.2 GB, and Pillow's working copies on top)."""
    from PIL import Image

    toml, folder = copy_dataset(a, tmp)
    Image.new("RGB", (1, 400_000), (200, 30, 30)).save(folder / "images" / "thread.png")
    (folder / "images" / "thread.txt").write_text("a red thread")
    return toml


def without_caches(a, tmp):
    """The dataset's copy with no cache folder yet (a first caching run)."""
    import shutil

    toml, folder = copy_dataset(a, tmp)
    shutil.rmtree(folder / "cache")
    return toml


def no_cache_folder(folder):
    assert not (folder / "cache").exists(), sorted(map(str, (folder / "cache").rglob("*")))


def jsonl_with_a_missing_image(a, tmp, second=None):
    """A JSONL dataset whose second line names an image that is not there (a typo), or `second`."""
    image = next((a.dataset.parent / "images").glob("*.png"))
    write(tmp / "meta.jsonl", f'{{"image_path": "{image}", "caption": "a"}}\n{{"image_path": "{second or tmp / "typo.png"}", "caption": "b"}}\n')
    return write_toml(tmp, f'[[datasets]]\nimage_jsonl_file = "{tmp / "meta.jsonl"}"\ncache_directory = "{tmp / "cache"}"\n')


def edit_json(path, edit):
    import json

    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def integer_shard(folder):
    from musubi_tuner import files

    shard = folder / "model-00001-of-00002.safetensors"
    files.save_safetensors({k: v.to(torch.int32) for k, v in files.StateDictFile(shard).load_all().items()}, shard)


def damaged_vae(a, tmp, damage):
    """The tiny VAE with `damage` applied to its state dict."""
    state = torch.load(a.vae, weights_only=True)
    damage(state)
    torch.save(state, tmp / "vae.pt")
    return tmp / "vae.pt"


def flattened_conv_in(state):
    state["encoder.conv_in.conv.weight"] = state["encoder.conv_in.conv.weight"].reshape(-1)


def all_int32(state):
    for k in state:
        state[k] = state[k].to(torch.int32)


def tokenizer_json_a_folder(folder):
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").mkdir()


TE = "tests/hunyuan/test_text_encoders.py::"
VAE = "tests/hunyuan/test_vae.py::"


def no_llm_pass(a, tmp, err, out):
    assert "llm text" not in err, "the LLM pass ran before the CLIP file was checked"


def first_cache(a, tmp):
    return sorted((tmp / "ds").rglob("*_hv.safetensors"))[0]


def folder_at_a_cache_name(a, tmp) -> Path:
    """The dataset's copy, with a folder where its first latent cache belongs."""
    toml, _ = copy_dataset(a, tmp)
    cache = first_cache(a, tmp)
    cache.unlink()
    cache.mkdir()
    return toml


def fifo_at_a_cache_name(a, tmp) -> Path:
    """The dataset's copy, with a FIFO where its first latent cache belongs."""
    toml, _ = copy_dataset(a, tmp)
    cache = first_cache(a, tmp)
    cache.unlink()
    os.mkfifo(cache)
    return toml


def source_of_a_long_name(a, tmp) -> Path:
    """The dataset's copy, one image (and its caption) renamed to a 236-byte stem: its cache's name is over 255 bytes."""
    toml, folder = copy_dataset(a, tmp)
    image = sorted((folder / "images").glob("*.png"))[0]
    long = "n" * 236
    image.with_suffix(".txt").rename(image.with_name(f"{long}.txt"))
    image.rename(image.with_name(f"{long}.png"))
    return toml


def all_caches(a, tmp):
    return caches(tmp / "ds")


def image_caches(a, tmp):
    return caches(tmp / "ds" / "cache" / "images")


CASES = [
    # --- dataset TOML: every value checked against its domain, keys named with the closest valid one
    Case("toml-misspelt-key", "cache_latents", lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t, 'frame_extration = "head"')), a),
         r"dataset\.toml: \[\[datasets\]\]\[0\]\.frame_extration is not a video dataset key \(did you mean frame_extraction\?\)",
         covered_by="tests/data/test_config.py::test_a_misspelt_key_names_file_table_and_the_closest_key"),
    Case("toml-misspelt-source-key", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t).replace("video_directory", "video_directroy")), a),
         r"\[\[datasets\]\]\[0\]\.video_directroy is not a dataset key \(did you mean video_directory\?\)"),
    Case("toml-unknown-general-key", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t), general='[general]\nresolutoin = [32, 32]\ncaption_extension = ".txt"\n'), a),
         r"dataset\.toml: \[general\]\.resolutoin is not a dataset key \(did you mean resolution\?\)"),
    Case("toml-wrong-type", "cache_latents", lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t, 'batch_size = "2"')), a),
         r'dataset\.toml: \[\[datasets\]\]\[0\]\.batch_size = "2" is not an integer'),
    Case("toml-num-repeats-zero", "cache_latents", lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t, "num_repeats = 0")), a),
         r"dataset\.toml: \[\[datasets\]\]\[0\]\.num_repeats = 0 must be at least 1"),
    Case("toml-caption-extension-with-a-path", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t), general='[general]\nresolution = [32, 32]\n'
                                                                                  'caption_extension = "../../etc/passwd"\n'), a),
         r'dataset\.toml: \[general\]\.caption_extension = "\.\./\.\./etc/passwd" must be a file extension such as "\.txt" '
         r"\(no /, \\ or NUL\)", covered_by="tests/data/test_config.py::"
                                      "test_a_caption_extension_holding_a_path_separator_is_refused_naming_the_key"),
    Case("toml-num-repeats-absurd", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t, "num_repeats = 100000000000000000")), a),
         r"dataset\.toml: \[\[datasets\]\]\[0\]\.num_repeats = 100000000000000000 is too large: at most 10,000",
         covered_by="tests/data/test_config.py::test_an_absurd_num_repeats_is_refused_naming_the_key_and_the_flags_for_longer_training"),
    Case("toml-resolution-under-two-bucket-steps", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t), general='[general]\nresolution = [16, 16]\nenable_bucket = true\n'
                                                                                  'caption_extension = ".txt"\n'), a),
         r"\[general\]\.resolution \(for \[\[datasets\]\]\[0\]\) = \[16, 16\] is too small for enable_bucket: the area must be at "
         r"least 32x32"),  # (the key is in [general]: it was blamed on [[datasets]][0]: fuzz_al 3)
    Case("toml-resolution-under-one-step", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t), general='[general]\nresolution = [8, 8]\ncaption_extension = ".txt"\n'), a),
         r"\[general\]\.resolution = \[8, 8\] must be at least 16"),
    Case("toml-missing-folder", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t).replace(str(a.dataset.parent / "videos"), str(t / "nope"))), a),
         r'dataset\.toml: \[\[datasets\]\]\[0\]\.video_directory = ".*nope": folder not found'),
    Case("toml-size-not-multiple-of-16", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t), general='[general]\nresolution = [40, 40]\ncaption_extension = ".txt"\n'), a),
         r"dataset\.toml: \[general\]\.resolution \(for \[\[datasets\]\]\[0\]\) = \[40, 40\] must be multiples of 16 when "
         r"enable_bucket is false \(try \[32, 32\]\)"),
    Case("toml-target-frames-not-4n1-rounded", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t).replace("target_frames = [5]", "target_frames = [6]")), a),
         None, then=summary_names(r"2 latent caches cached"), warning=r"target_frames: is not 4N\+1, rounded down \(6 -> 5"),
    Case("toml-cache-directory-is-a-file", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t).replace(str(t / "cache"), str(write(t / "cfile", "x")))), a),
         r"cfile: is a file, not a folder; choose another cache_directory"),
    Case("toml-cache-directory-under-a-file", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(write_toml(t, video_table(a, t).replace(str(t / "cache"), str(write(t / "cfile", "x") / "cache"))), a),
         r"cfile: is a file, not a folder; choose another cache_directory"),
    Case("toml-folder-is-a-broken-link", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, video_table(a, t).replace(str(a.dataset.parent / "videos"), str(link(t / "gone", t / "nowhere")))), a),
         r'dataset\.toml: \[\[datasets\]\]\[0\]\.video_directory = ".*gone": broken symbolic link \(to .*nowhere, which does not exist\)'),
    Case("cache-latents-image-whose-caption-name-cannot-exist-is-skipped", "cache_latents",
         lambda a, t: cache_latents_argv(image_whose_caption_name_is_too_long(a, t), a), None,
         then=summary_names(r"skipped: \S+/C{248}\.png: no caption file C{248}\.txt\n", r"[1-9] latent caches cached")),
    Case("cache-latents-extreme-aspect-image-costs-its-bucket-not-its-whole-scale", "cache_latents",
         lambda a, t: cache_latents_argv(image_of_an_extreme_aspect_ratio(a, t), a), None, memory_headroom=MEMORY,
         then=summary_names(r"\[\[datasets\]\]\[0\]: 3 latent caches cached, 0 already cached, 0 skipped, 0 failed")),
    Case("cache-text-jsonl-image-missing-is-reported", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(jsonl_with_a_missing_image(a, t), a), None,
         then=summary_names(r"1 text caches cached, 0 already cached, 0 skipped, 1 failed", r"failed: .*typo\.png: image not found")),
    Case("cache-text-jsonl-image-that-is-a-folder-is-reported", "cache_text_encoder_outputs",  # (it got a text cache)
         lambda a, t: cache_text_argv(jsonl_with_a_missing_image(a, t, second=a.dataset.parent / "images"), a), None,
         then=summary_names(r"1 text caches cached, 0 already cached, 0 skipped, 1 failed", r"failed: .*images: expected an image, "
                            r"found a folder")),
    # --- flags
    Case("cache-latents-batch-size-zero", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a, "--batch_size", "0"),
         r"--batch_size 0: must be at least 1"),
    Case("cache-latents-device-without-cuda", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a, "--device", "cuda"),
         r"--device cuda: (this PyTorch is built without CUDA|no CUDA device is visible)"),
    Case("cache-text-device-unknown", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(a.dataset, a, "--device", "gpu0"),
         r"--device gpu0: not a device"),
    # --- the VAE file
    Case("vae-missing", "cache_latents", lambda a, t: ["--dataset_config", str(a.dataset), "--vae", str(t / "vae.pt")],
         r"vae\.pt: VAE checkpoint not found \(--vae\)"),
    Case("vae-truncated", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a)[:3] + [str(truncated(a.vae, t / "vae.pt"))],
         r"vae\.pt: not a readable PyTorch VAE checkpoint \(truncated or a different format"),
    Case("vae-is-the-dit", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a)[:3] + [str(a.dit)],
         r"dit\.pt: not a VAE checkpoint: its tensors sit under 'module' .*; they look like a HunyuanVideo DiT \(pass it with --dit\)"),
    Case("vae-with-nan-keeps-the-caches", "cache_latents", lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a)[:3] + [
         str(nan_vae(a, t)), "--num_workers", "0"], r"nan_vae\.pt: encoder\.conv_in\.conv\.weight holds NaN or infinite values: the file is damaged, "
         r"download it again", keep=all_caches),  # (checked as the VAE loads, as the DiT's weights are: fuzz_y 1)
    Case("vae-with-nan-leaves-no-cache-folders-it-made", "cache_latents",
         lambda a, t: cache_latents_argv(without_caches(a, t), a)[:3] + [str(nan_vae(a, t)), "--num_workers", "0"],
         r"nan_vae\.pt: encoder\.conv_in\.conv\.weight holds NaN or infinite values", then=lambda a, t, err, out: no_cache_folder(t / "ds")),
    Case("vae-conv-weight-of-another-rank", "cache_latents",
         lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a)[:3] + [str(damaged_vae(a, t, flattened_conv_in)), "--num_workers", "0"],
         r"vae\.pt: not a HunyuanVideo VAE: encoder\.conv_in\.conv\.weight has shape \[\d+\], expected a 5-D convolution "
         r"weight \(the file is damaged or not a VAE", keep=all_caches,
         covered_by=VAE + "test_a_tensor_of_another_rank_where_the_config_is_read_is_named"),
    Case("vae-integer-weights", "cache_latents",
         lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a)[:3] + [str(damaged_vae(a, t, all_int32)), "--num_workers", "0"],
         r"vae\.pt: tensor \S+ is int32; a VAE's weights are floating point", keep=all_caches,
         covered_by=VAE + "test_a_vae_whose_weights_are_not_floating_point_is_refused_naming_file_and_key"),
    Case("vae-pickle-runs-code", "cache_latents", lambda a, t: cache_latents_argv(a.dataset, a)[:3] + [str(evil_pt(t))],
         r"evil\.pt: refused to load: the pickle holds objects other than tensors",
         then=lambda a, t, err, out: no_file(t / "pwned_by_pickle")),
    # --- media: unreadable items are named and skipped, never dropped in silence
    Case("video-corrupt-and-empty-are-skipped", "cache_latents", lambda a, t: cache_latents_argv(corrupt_videos(a, t), a), None,
         then=summary_names(r"failed: .*corrupt\.mp4: not a readable video", r"failed: .*zero\.mp4: empty file \(0 bytes\)",
                            r"\[\[datasets\]\]\[1\]: 2 latent caches cached, 0 already cached, 0 skipped, 2 failed")),
    Case("video-corrupt-strict", "cache_latents", lambda a, t: cache_latents_argv(corrupt_videos(a, t), a, "--strict"),
         r"corrupt\.mp4: not a readable video"),
    Case("image-alpha-and-16-bit-work", "cache_latents", lambda a, t: cache_latents_argv(odd_images(a, t), a), None, then=images_cached),
    Case("image-1x1-under-no-upscale-is-named", "cache_latents", lambda a, t: cache_latents_argv(tiny_image(a, t), a), None,
         then=summary_names(r"failed: .*dot\.png: 1x1 pixels is smaller than one bucket step \(16 px\)")),
    Case("image-broken-and-looping-links-are-named", "cache_latents", lambda a, t: cache_latents_argv(links(a, t), a), None,
         then=summary_names(r"failed: .*broken\.png: broken symbolic link", r"failed: .*loop_a\.png: symbolic link loop",
                            r"failed: .*loop_b\.png: symbolic link loop")),
    # --- caches already on disk: deleted only when known to be superseded
    Case("cache-latents-misspelt-caption-extension-keeps-caches", "cache_latents",  # (its videos fail as in text caching)
         lambda a, t: cache_latents_argv(misspelt_caption_extension(a, t), a),
         r"no latent cache made: 2 item\(s\) could not be read \(listed above\)", keep=all_caches,
         warning=r"skipped .*image_0000\.png: no caption file image_0000\.tx"),
    Case("cache-text-misspelt-caption-extension-keeps-caches", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(misspelt_caption_extension(a, t), a),
         r"no text cache made: 2 item\(s\) could not be read \(listed above\)", keep=all_caches),
    Case("cache-latents-videos-listed-as-images-says-so", "cache_latents", lambda a, t: cache_latents_argv(write_toml(t,
         f'[[datasets]]\nimage_directory = "{a.dataset.parent / "videos"}"\ncache_directory = "{t / "cache"}"\n'), a), None,
         warning=r"videos lists no images \(it holds 2 videos: list it as video_directory\)"),
    Case("cache-latents-bad-jsonl-line-of-a-later-dataset-stops-before-any-encoding", "cache_latents",
         lambda a, t: cache_latents_argv(jsonl_after_a_folder(a, t), a),
         r"meta\.jsonl:2: not a JSON object .*\[\[datasets\]\]\[1\]\.image_jsonl_file",
         then=lambda a, t, err, out: not list((t / "first").glob("*_hv.safetensors")) or pytest.fail("the first dataset was encoded")),
    *[Case(f"cache-{kind}-keeps-the-caches-another-dataset-config-made-in-its-folder", command,
           lambda a, t, argv=argv: argv(videos_into_the_image_cache(a, t), a), None, then=image_caches_kept,
           warning=r"\[\[datasets\]\]\[0\]: 2 cache\(s\) in \S+/cache/images were made by another dataset \(of \.\./\.\./images, "
                   r"from that folder\), not by \S+/videos: kept")
      for kind, command, argv in (("latents", "cache_latents", cache_latents_argv), ("text", "cache_text_encoder_outputs", cache_text_argv))],
    *[Case(f"cache-{kind}-of-a-renamed-dataset-folder-names-the-caches-of-its-deleted-items", command,  # (kept as another
           lambda a, t, argv=argv: argv(renamed_images_folder_less_one(a, t), a), None,  # dataset's, with advice that could
           warning=r"\[\[datasets\]\]\[0\]: 1 cache\(s\) in \S+ were made by a dataset of \.\./\.\./images \(from that "  # not help:
                   r"folder\), which is not there now: kept, in case it is a drive not mounted; training takes them too\. If "  # fuzz_av 3;
                   rf"that was this dataset under its old name, delete them: image_0000\S*{suffix.replace('.', '[.]')}",  # deleted,
           then=deleted_images_caches_kept_and_named(suffix))  # another dataset's on a drive not mounted: fuzz_ay 1)
      for kind, command, argv, suffix in (("latents", "cache_latents", cache_latents_argv, "_hv.safetensors"),
                                          ("text", "cache_text_encoder_outputs", cache_text_argv, "_hv_te.safetensors"))],
    Case("cache-latents-that-skips-every-item-says-so", "cache_latents",
         lambda a, t: cache_latents_argv(write_toml(t, f'[[datasets]]\nimage_directory = "{a.dataset.parent / "images"}"\n'
                                                       f'cache_directory = "{t / "cache"}"\ncaption_extension = ".caption"\n'), a), None,
         warning=r"no latent cache made: every one of the 2 item\(s\) was skipped \(the reasons above\)"),
    Case("cache-latents-console-width-beyond-any-terminal", "cache_latents",
         lambda a, t: cache_latents_argv(a.dataset, a, "--debug_mode", "console", "--console_width", "100000"),
         r"--console_width 100000: must be between 8 and 1000"),
    Case("cache-latents-debug-mode-names-the-caching-flags-it-ignores", "cache_latents",
         lambda a, t: replaced_flag(cache_latents_argv(copy_dataset(a, t)[0], a, "--debug_mode", "console", "--skip_existing"),
                                    "--vae", str(t / "missing.pt")), None,
         warning=r"--vae, --skip_existing: not read by --debug_mode console, which caches nothing; ignored"),
    Case("cache-latents-debug-mode-names-an-unreadable-item-once", "cache_latents",
         lambda a, t: cache_latents_argv(_with_unreadable_image(a, t), a, "--debug_mode", "console"), None,
         then=lambda a, t, err, out: re.search(r"^  not shown: (\S+/bad\.png): not a readable image \(cannot identify image file '\1'\)$", out, re.M)
         or pytest.fail(out[-2000:])),  # (fuzz_ag 6: the file was named twice)
    Case("cache-latents-debug-video-removes-what-a-killed-preview-left-and-writes-whole-ones", "cache_latents",
         lambda a, t: cache_latents_argv(killed_preview(a, t), a, "--debug_mode", "video"), None, then=previews_whole),
    Case("cache-latents-names-the-console-flags-it-ignores", "cache_latents",
         lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a, "--console_width", "120", "--console_num_images", "2"), None,
         warning=r"--console_width, --console_num_images: not read while caching; ignored"),
    Case("cache-latents-empty-folder-deletes-nothing", "cache_latents", lambda a, t: cache_latents_argv(emptied_folder(a, t), a), None,
         then=image_caches_kept, warning=r"lists no images \(empty, or a drive not mounted\?\); no cache in .* is deleted"),
    # a cache that cannot be written because of its item fails that item, not the run (which it stopped before)
    Case("cache-latents-folder-where-a-cache-belongs", "cache_latents",
         lambda a, t: cache_latents_argv(folder_at_a_cache_name(a, t), a, "--skip_existing"), None,
         then=summary_names(r"\n  failed: \S+\.png: a folder stands where its file \S+_hv\.safetensors goes; move it away\n",
                            r"\[\[datasets\]\]\[0\]: \d+ latent caches cached, \d+ already cached, 0 skipped, 1 failed",
                            r"\[\[datasets\]\]\[1\]: .*, 0 failed")),
    Case("cache-latents-fifo-where-a-cache-belongs", "cache_latents",  # (it stopped the whole run at that item: fuzz_aq 14)
         lambda a, t: cache_latents_argv(fifo_at_a_cache_name(a, t), a, "--skip_existing"), None,
         then=summary_names(r"\n  failed: \S+\.png: cannot write: it is a FIFO, not a file to save in; move it away or choose "
                            r"another name\n", r"\[\[datasets\]\]\[0\]: \d+ latent caches cached, \d+ already cached, 0 skipped, "
                            r"1 failed", r"\[\[datasets\]\]\[1\]: .*, 0 failed")),
    Case("cache-latents-source-name-too-long-for-its-cache", "cache_latents",
         lambda a, t: cache_latents_argv(source_of_a_long_name(a, t), a), None,
         then=summary_names(r"\n  failed: \S+/n{236}\.png: the name of its file n{40}\.\.\. is too long for \S+ \(with its "
                            r"temporary file's, 28 bytes over the 255 a name may have\); shorten the name it comes from by 28 bytes",
                            r"\[\[datasets\]\]\[0\]: \d+ latent caches cached, \d+ already cached, 0 skipped, 1 failed",
                            r"\[\[datasets\]\]\[1\]: .*, 0 failed")),
    Case("cache-text-source-name-too-long-for-its-cache", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(source_of_a_long_name(a, t), a), None,
         then=summary_names(r"\n  failed: \S+/n{236}\.png: the name of its file n{40}\.\.\. is too long for \S+ \(with its "
                            r"temporary file's, 28 bytes over the 255 a name may have\); shorten the name it comes from by 28 "
                            r"bytes", r"1 failed")),  # (the latent cache's figure: fuzz_aa 19, it said 21)
    Case("cache-latents-full-disk", "cache_latents", lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a),
         r"_hv\.safetensors: cannot write " + TOO_LARGE + r"; the file is past this process's file-size limit \(ulimit -f\)",
         keep=all_caches, file_size_limit=lambda a, t: first_cache(a, t).stat().st_size // 2),
    Case("cache-latents-read-only-folder", "cache_latents", lambda a, t: cache_latents_argv(copy_dataset(a, t)[0], a),
         r"ds/cache(/images)?: cannot .*" + READ_ONLY, keep=all_caches, read_only="ds/cache/images"),
    Case("cache-latents-out-of-memory-keeps-caches", "cache_latents", lambda a, t: cache_latents_argv(huge_resolution(a, t), a),
         r"out of host memory: an allocation of \S+ \S+ failed under this process's address-space limit of \S+ \S+ \(ulimit -v\): "
         r"raise it, or ask for a larger one; --vae_tiling .* need less", keep=all_caches, memory_headroom=MEMORY),
    # --- captions and text encoders
    Case("caption-missing-is-reported", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(captions(a, t, "missing"), a), None,
         then=summary_names(r"failed: .*clip_0001\.txt: caption file not found \(for clip_0001\.mp4\)")),
    Case("caption-every-one-unreadable-fails-the-run", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(every_caption_unreadable(a, t), a),
         r"no text cache made: 4 item\(s\) could not be read \(listed above\) and no other item gave one"),
    Case("caption-empty-works", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(captions(a, t, "empty"), a), None,
         then=summary_names(r"\[\[datasets\]\]\[1\]: 2 text caches cached"), warning=r"clip_0001\.txt: empty caption"),
    Case("caption-not-utf8-strict", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(captions(a, t, "latin1"), a, "--strict"),
         r"clip_0001\.txt: caption is not UTF-8 text \(byte 6\); save it as UTF-8", keep=all_caches),
    *[Case(f"caption-{kind}-is-named-not-read", "cache_text_encoder_outputs",
           lambda a, t, kind=kind: cache_text_argv(captions(a, t, kind), a), None,
           then=summary_names(rf"failed: .*clip_0001\.txt: {reason} \(for clip_0001\.mp4\)",
                              r"\[\[datasets\]\]\[1\]: 1 text caches cached, 0 already cached, 0 skipped, 1 failed"),
           covered_by="tests/data/test_input_files.py::test_a_fifo_a_device_and_a_huge_sparse_file_as_captions_are_named_and_the_others_read")
      for kind, reason in (("fifo", r"not a regular file \(a FIFO\); expected a caption file"),
                           ("zero", r"not a regular file \(a character device\); expected a caption file"),
                           ("huge", r"1 TiB, too large for a caption file \(at most 1 MiB\)"))],
    Case("dataset-config-a-fifo-is-named-not-read", "cache_latents", lambda a, t: cache_latents_argv(fifo_config(a, t), a),
         r"dataset\.toml: not a regular file \(a FIFO\); expected a dataset config$",
         covered_by="tests/test_files_inputs.py::test_a_dataset_config_that_is_not_a_regular_file_or_is_huge_is_named"),
    Case("text-cache-of-an-image-named-in-latin1-keeps-both-passes", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(image_named_in_latin1(a, t), a), None, then=both_text_passes_kept,
         covered_by="tests/data/test_caching_commands.py::test_an_image_whose_name_is_not_utf8_is_cached_and_trained_on"),
    Case("text-encoder2-is-the-dit", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(copy_dataset(a, t)[0], a, te2=a.dit),
         r"dit\.pt: not a CLIP text encoder .*this looks like a HunyuanVideo DiT \(pass it with --dit\)", keep=all_caches, then=no_llm_pass),
    Case("text-encoder1-truncated-shard", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(a.dataset, a, te1=truncated_shard(a, t)),
         r"model-00001-of-00002\.safetensors: file is truncated"),
    Case("text-encoder1-config-json-is-an-array", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(a.dataset, a, te1=damaged_te1(a, t, lambda d: (d / "config.json").write_text("[1, 2]"))),
         r"te1/config\.json: holds an array where an object is expected",
         covered_by=TE + "test_every_json_file_of_a_text_encoder_folder_of_another_json_type_is_named"),
    Case("text-encoder1-config-value-refused", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(a.dataset, a, te1=damaged_te1(
             a, t, lambda d: edit_json(d / "config.json", lambda raw: raw.update(num_attention_heads=3)))),
         r"te1/config\.json: not a usable Llama text encoder config \(num_attention_heads: .*not a multiple of the number of "
         r"attention heads \(3\)", covered_by=TE + "test_llm_config_values_transformers_refuses_are_named_with_file_and_field"),
    Case("text-encoder1-index-leaves-the-folder", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(a.dataset, a, te1=damaged_te1(a, t, lambda d: edit_json(
             d / "model.safetensors.index.json",
             lambda raw: raw["weight_map"].update({next(iter(raw["weight_map"])): "../../../../etc/passwd"})))),
         r"te1/model\.safetensors\.index\.json: weight_map\['\S+'\] = '\.\./\.\./\.\./\.\./etc/passwd' is not a file in",
         covered_by=TE + "test_weight_index_entries_that_leave_the_folder_are_refused_naming_the_index"),
    Case("text-encoder1-integer-weights", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(copy_dataset(a, t)[0], a, te1=damaged_te1(a, t, integer_shard)),
         r"te1/model-00001-of-00002\.safetensors: tensor \S+ is int32; a text encoder's weights are floating point",
         keep=all_caches, covered_by=TE + "test_text_encoder_weights_that_are_not_floating_point_are_refused_naming_file_and_key"),
    Case("text-encoder1-tokenizer-json-missing", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(a.dataset, a, te1=damaged_te1(a, t, lambda d: (d / "tokenizer.json").unlink())),
         r"te1/tokenizer\.json: not found, though .*te1 holds tokenizer_config\.json",
         covered_by=TE + "test_a_missing_or_folder_typed_tokenizer_json_is_named_not_blamed_on_a_packaged_vocabulary"),
    Case("text-encoder1-tokenizer-json-is-a-folder", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(a.dataset, a, te1=damaged_te1(a, t, tokenizer_json_a_folder)),
         r"te1/tokenizer\.json: expected a Llama 3 tokenizer file, found a folder",
         covered_by=TE + "test_a_missing_or_folder_typed_tokenizer_json_is_named_not_blamed_on_a_packaged_vocabulary"),
    Case("text-encoder1-with-nan-keeps-the-caches", "cache_text_encoder_outputs",
         lambda a, t: cache_text_argv(copy_dataset(a, t)[0], a, te1=nan_llm(a, t)),
         r"te1/model-00001-of-00002\.safetensors: model\.layers\.0\.mlp\.down_proj\.weight holds NaN or infinite values: the file "
         r"is damaged", keep=all_caches),
    Case("text-encoder2-past-float16-is-refused-before-the-llm-pass", "cache_text_encoder_outputs",  # (found after it, when
         lambda a, t: cache_text_argv(copy_dataset(a, t)[0], a, te2=far_clip(a, t)),  # every cache had been rewritten: fuzz_ba 4)
         r"te2_far/model\.safetensors: text_model\.final_layer_norm\.bias holds values past float16's range",
         keep=all_caches, then=lambda a, t, err, out: "llm text" not in err or pytest.fail(err[-3000:])),
    Case("text-cache-full-disk", "cache_text_encoder_outputs", lambda a, t: cache_text_argv(copy_dataset(a, t)[0], a),
         r"_hv_te\.safetensors: cannot write " + TOO_LARGE, keep=all_caches,
         file_size_limit=lambda a, t: sorted((t / "ds").rglob("*_hv_te.safetensors"))[0].stat().st_size // 2),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_caching(case, assets, tmp_path):
    check(case, assets, tmp_path)
