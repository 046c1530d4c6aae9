"""The two caching commands as users run them, on tiny models: every item cached in musubi-tuner's layout,
a killed run finished by running it again, bad files reported by name and skipped."""

import logging
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file

from helpers import dead_pid

from musubi_tuner.cache_latents import main as cache_latents_main
from musubi_tuner.cache_text_encoder_outputs import main as cache_text_main
from musubi_tuner.data.config import load_dataset_config
from musubi_tuner.data.training_dataset import TrainingDataset
from musubi_tuner.demo.synthetic_data import make_synthetic_dataset
from musubi_tuner.demo.tiny_text_encoders import (TINY_CLIP_HIDDEN, TINY_LLM_HIDDEN, write_tiny_clip_folder,
                                                  write_tiny_clip_single_file, write_tiny_llm_folder,
                                                  write_tiny_llm_single_file)
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.hunyuan.text_encoders import CLIPTextEncoder, LLMTextEncoder

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "src" / "musubi_tuner"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return SimpleNamespace(vae=write_vae(root / "vae" / "pytorch_model.pt", random_vae_state_dict(TINY_VAE)),
                           te1=write_tiny_llm_folder(root / "text_encoder"),
                           te2=write_tiny_clip_folder(root / "text_encoder_2"))


def latent_args(toml, models, *flags):
    return ["--dataset_config", str(toml), "--vae", str(models.vae), *flags]


def text_args(toml, models, *flags):
    return ["--dataset_config", str(toml), "--text_encoder1", str(models.te1), "--text_encoder2", str(models.te2), *flags]


def clips(root, count, batch_size=1):
    """`count` synthetic 32x32 clips of 5 frames; returns (dataset TOML, cache folder)."""
    toml = make_synthetic_dataset(root, num_videos=count, num_images=0, width=32, height=32, frames=5, batch_size=batch_size)
    return toml, root / "cache" / "videos"


def test_uniform_clips_that_repeat_a_start_are_encoded_and_counted_once(models, tmp_path, capsys):
    """musubi-tuner's uniform extraction repeats a start on a short video: 5 clips of 5 frames from a 5-frame video
    all start at 0. A repeat is the same cache file: encoded once, counted once."""
    toml, cache = clips(tmp_path, 1)
    toml.write_text(toml.read_text().replace('frame_extraction = "head"', 'frame_extraction = "uniform"\nframe_sample = 5'))
    cache_latents_main(latent_args(toml, models))
    out = capsys.readouterr().out
    assert "1 latent caches cached, 0 already cached, 0 skipped, 0 failed" in out, out
    assert len(list(cache.glob("*_hv.safetensors"))) == 1


def musubi_reads_latent_cache(path):
    """musubi-tuner's training-side reading of a latent cache, written out from its rules (behaviour ref. 2.10, 3.1)."""
    tokens = path.name.split("_")
    item_key, frame_token, size_token = "_".join(tokens[:-3]), tokens[-3], tokens[-2]
    start, frames = (int(v) for v in frame_token.split("-"))
    width, height = (int(v) for v in size_token.split("x"))
    tensors = load_file(str(path))
    (key, latent), = tensors.items()
    assert key == f"latents_{(frames - 1) // 4 + 1}x{height // 8}x{width // 8}_float16"
    assert latent.shape == (16, (frames - 1) // 4 + 1, height // 8, width // 8) and latent.dtype == torch.float16
    return item_key, path.parent / f"{item_key}_hv_te.safetensors"


def cache_state(folder):
    """{file name: mtime_ns} of every file in the cache folder, temporary files included."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def assert_every_cache_loads(folder):
    for path in folder.glob("*.safetensors"):
        load_file(str(path))  # raises on a truncated or partial file


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_a_hundred_synthetic_clips_cache_end_to_end_in_musubi_tuners_layout(models, tmp_path, capsys):
    toml, cache = clips(tmp_path, 100, batch_size=4)
    cache_latents_main(latent_args(toml, models, "--num_workers", "2"))
    cache_text_main(text_args(toml, models, "--batch_size", "16"))
    out = capsys.readouterr().out
    assert "100 latent caches cached, 0 already cached, 0 skipped, 0 failed" in out
    assert "100 text caches cached, 0 already cached, 0 skipped, 0 failed" in out

    latents = sorted(cache.glob("*_hv.safetensors"))
    assert [p.name for p in latents] == [f"clip_{i:04d}_00000-005_0032x0032_hv.safetensors" for i in range(100)]
    for path in latents:
        _, text_path = musubi_reads_latent_cache(path)
        text = load_file(str(text_path))
        assert {k: (tuple(v.shape), v.dtype) for k, v in text.items()} == {
            "llm_float16": ((256, TINY_LLM_HIDDEN), torch.float16), "llm_mask": ((256,), torch.int64),
            "clipL_float16": ((TINY_CLIP_HIDDEN,), torch.float16), "clipL_mask": ((77,), torch.int64)}
        caption = (tmp_path / "videos" / f"{path.name[:9]}.txt").read_text().strip()
        assert read_safetensors_header(text_path)[1]["caption1"] == caption
    first, second = (load_file(str(p)).popitem()[1] for p in latents[:2])
    assert not torch.equal(first, second)  # each clip was encoded, not one latent copied
    assert TrainingDataset.from_config(load_dataset_config(toml), seed=0).num_items == 100
    assert not list(cache.glob(".*"))


@pytest.mark.parametrize("flags, calls", [((), [4, 4, 2]), (("--batch_size", "3"), [3, 3, 3, 1])],
                         ids=["the dataset's batch_size", "--batch_size"])
def test_captions_reach_the_text_encoders_a_batch_at_a_time(models, tmp_path, monkeypatch, flags, calls):
    toml, _ = clips(tmp_path, 10, batch_size=4)
    seen = {"llm": [], "clipL": []}
    for name, encoder in (("llm", LLMTextEncoder), ("clipL", CLIPTextEncoder)):
        def recording(self, prompts, _encode=encoder.encode, _name=name):
            seen[_name].append(len(prompts))
            return _encode(self, prompts)
        monkeypatch.setattr(encoder, "encode", recording)
    cache_text_main(text_args(toml, models, *flags))
    assert seen == {"llm": calls, "clipL": calls}


def test_cast_llm_rope_changes_the_llm_caches_only(models, tmp_path):
    """--cast_llm_rope: musubi-tuner's fp16 rotary frequencies (bit-equal states: test_text_encoders.py)."""
    toml, cache = clips(tmp_path, 2)
    caches = {}
    for flags in ((), ("--cast_llm_rope",)):
        cache_text_main(text_args(toml, models, "--text_encoder_dtype", "bf16", *flags))
        caches[flags] = {p.name: load_file(str(p)) for p in sorted(cache.glob("*_hv_te.safetensors"))}
    plain, cast = caches.values()
    assert plain.keys() == cast.keys() and len(plain) == 2
    for name in plain:
        assert not torch.equal(plain[name]["llm_bfloat16"], cast[name]["llm_bfloat16"])
        assert torch.equal(plain[name]["clipL_bfloat16"], cast[name]["clipL_bfloat16"])


@pytest.mark.parametrize("flags, warned", [((), True), (("--text_encoder_dtype", "bf16"), False)], ids=["float16", "bf16"])
def test_float16_text_encoding_on_a_cpu_without_float16_kernels_says_what_is_faster(models, tmp_path, monkeypatch,
                                                                                    caplog, flags, warned):
    import musubi_tuner.dtypes

    monkeypatch.setattr(musubi_tuner.dtypes, "cpu_lacks_fast_float16", lambda: True)
    toml, _ = clips(tmp_path, 2)
    with caplog.at_level(logging.WARNING):
        cache_text_main(text_args(toml, models, "--device", "cpu", *flags))
    assert ("--text_encoder_dtype bf16" in caplog.text) == warned


# ------------------------------------------------------------------------------------------ interrupted runs

# Runs a caching script as a file, as users do, and SIGKILLs it at its k-th cache write: after the
# temporary file is written, before it is renamed into place. Nothing in the process gets to clean up.
KILL_AT_WRITE = """
import os, runpy, signal, sys
kill_at, script = int(sys.argv[1]), sys.argv[2]
writes, rename = 0, os.replace
def rename_or_die(src, dst, *args, **kwargs):
    global writes
    if str(dst).endswith(".safetensors"):
        writes += 1
        if writes == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)
os.replace = rename_or_die
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def run_killed_at_write(tmp_path, k, script, args):
    killer = tmp_path / "kill_at_write.py"
    killer.write_text(KILL_AT_WRITE)
    result = subprocess.run([sys.executable, str(killer), str(k), str(SCRIPTS / script), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


@pytest.mark.slow
def test_a_killed_latent_run_is_finished_by_running_it_again(models, tmp_path, capsys):
    toml, cache = clips(tmp_path, 10)
    run_killed_at_write(tmp_path, 5, "cache_latents.py", latent_args(toml, models, "--num_workers", "1"))
    after_kill = cache_state(cache)
    finished = [name for name in after_kill if name.endswith("_hv.safetensors")]
    assert len(finished) == 4 and len([n for n in after_kill if n.endswith(".tmp")]) == 1
    assert_every_cache_loads(cache)

    cache_latents_main(latent_args(toml, models, "--skip_existing"))
    assert "6 latent caches cached, 4 already cached, 0 skipped, 0 failed" in capsys.readouterr().out
    after_rerun = cache_state(cache)
    assert sorted(after_rerun) == [f"clip_{i:04d}_00000-005_0032x0032_hv.safetensors" for i in range(10)]
    assert {name: after_rerun[name] for name in finished} == {name: after_kill[name] for name in finished}
    assert_every_cache_loads(cache)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, llm_message, clip_message", [
    (5, "llm: encoding 6 captions (4 already cached)", "clipL: encoding 10 captions (0 already cached)"),
    (15, "llm: nothing to encode (10 already cached)", "clipL: encoding 6 captions (4 already cached)"),
], ids=["killed in the LLM pass", "killed in the CLIP pass"])
def test_a_killed_text_run_is_finished_by_running_it_again(models, tmp_path, caplog, kill_at, llm_message, clip_message):
    toml, cache = clips(tmp_path, 10)
    run_killed_at_write(tmp_path, kill_at, "cache_text_encoder_outputs.py", text_args(toml, models))
    assert len(list(cache.glob(".*.tmp"))) == 1
    assert_every_cache_loads(cache)

    with caplog.at_level(logging.INFO):
        cache_text_main(text_args(toml, models, "--skip_existing"))
    assert llm_message in caplog.text and clip_message in caplog.text
    assert sorted(p.name for p in cache.iterdir()) == [f"clip_{i:04d}_hv_te.safetensors" for i in range(10)]
    for path in cache.iterdir():
        assert sorted(load_file(str(path))) == ["clipL_float16", "clipL_mask", "llm_float16", "llm_mask"]


@pytest.mark.parametrize("command", ["latents", "text"])
def test_keep_cache_keeps_stale_caches_but_removes_temporary_files_of_killed_runs(models, tmp_path, command):
    toml, cache = clips(tmp_path, 2)
    run, args, stale, temporary = {
        "latents": (cache_latents_main, latent_args, "gone_00000-005_0032x0032_hv.safetensors",
                    f".clip_0001_00000-005_0032x0032_hv.safetensors.{dead_pid()}-k2x9q0ab.tmp"),
        "text": (cache_text_main, text_args, "gone_hv_te.safetensors", f".clip_0001_hv_te.safetensors.{dead_pid()}-k2x9q0ab.tmp"),
    }[command]
    run(args(toml, models))
    if command == "text":  # (a text cache of an item gone: any name is a text cache's, so one that reads as such: 5a61f21)
        from musubi_tuner.data.cache_files import save_text_cache

        save_text_cache(cache / stale, "a clip since deleted", {"llm_float16": torch.zeros(1).half()})
    else:  # (a latent cache's name tells it, even cut short)
        (cache / stale).write_bytes(b"a cache of a clip since deleted")
    (cache / temporary).write_bytes(b"half a cache")
    run(args(toml, models, "--skip_existing", "--keep_cache"))
    assert (cache / stale).exists() and not (cache / temporary).exists()
    run(args(toml, models, "--skip_existing"))
    assert not (cache / stale).exists()


def test_skip_existing_redoes_latents_of_another_vae_of_the_same_file_name_or_another_dtype(models, tmp_path, capsys):
    """Every official VAE file is pytorch_model.pt: the name tells nothing, so the cache records what the file holds."""
    toml, _ = clips(tmp_path, 2)
    other = write_vae(tmp_path / "finetuned" / "vae" / "pytorch_model.pt", random_vae_state_dict(TINY_VAE, seed=1))
    cache_latents_main(latent_args(toml, models))
    for vae, flags, cached in [(other, (), 2), (other, (), 0), (other, ("--vae_dtype", "fp32"), 2), (models.vae, (), 2)]:
        capsys.readouterr()
        cache_latents_main(["--dataset_config", str(toml), "--vae", str(vae), "--skip_existing", *flags])
        assert f"{cached} latent caches cached, {2 - cached} already cached" in capsys.readouterr().out, (vae, flags)


def test_skip_existing_redoes_text_of_another_encoder_of_the_same_folder_name_or_another_setting(models, tmp_path, caplog):
    toml, _ = clips(tmp_path, 2)
    other = write_tiny_llm_folder(tmp_path / "finetuned" / "text_encoder", seed=1)
    cache_text_main(text_args(toml, models))
    runs = [((other, models.te2), (), "llm: encoding 2 captions"), ((other, models.te2), (), "llm: nothing to encode"),
            ((other, models.te2), ("--fp8_llm",), "llm: encoding 2 captions"),
            ((other, models.te2), ("--fp8_llm", "--text_encoder_dtype", "fp32"), "clipL: encoding 2 captions")]
    for (te1, te2), flags, said in runs:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            cache_text_main(["--dataset_config", str(toml), "--text_encoder1", str(te1), "--text_encoder2", str(te2),
                             "--skip_existing", *flags])
        assert said in caplog.text, (te1, flags)
        if flags == ("--fp8_llm",):
            assert "clipL: nothing to encode" in caplog.text  # --fp8_llm changes the LLM only


# ------------------------------------------------------------------------------------------ bad files


def add_bad_videos(root):
    """Beside the synthetic clips: an empty file and a truncated mp4, both with captions."""
    videos = root / "videos"
    good = (videos / "clip_0000.mp4").read_bytes()
    (videos / "broken.mp4").write_bytes(good[: len(good) // 2])
    (videos / "empty.mp4").write_bytes(b"")
    for name in ("broken", "empty"):
        (videos / f"{name}.txt").write_text("a clip that cannot be read")


def test_an_unreadable_video_is_reported_by_name_and_the_other_clips_are_cached(models, tmp_path, capsys, caplog):
    toml, cache = clips(tmp_path, 3)
    add_bad_videos(tmp_path)
    with caplog.at_level(logging.WARNING):
        cache_latents_main(latent_args(toml, models))
    out = capsys.readouterr().out
    assert "3 latent caches cached, 0 already cached, 0 skipped, 2 failed" in out
    assert f"failed: {tmp_path / 'videos' / 'broken.mp4'}: not a readable video (Invalid data found when processing input)\n" in out
    assert f"failed: {tmp_path / 'videos' / 'empty.mp4'}: empty file (0 bytes)" in out
    assert len(list(cache.glob("clip_*_hv.safetensors"))) == 3 and not list(cache.glob("broken*")) + list(cache.glob("empty*"))
    assert all(record.exc_info is None for record in caplog.records)  # a line per file, no traceback


def test_a_video_without_its_caption_file_gets_no_text_cache_and_the_run_goes_on(models, tmp_path, capsys):
    toml, cache = clips(tmp_path, 3)
    (tmp_path / "videos" / "clip_0001.txt").unlink()
    cache_text_main(text_args(toml, models))
    out = capsys.readouterr().out
    assert "2 text caches cached, 0 already cached, 0 skipped, 1 failed" in out
    assert f"{tmp_path / 'videos' / 'clip_0001.txt'}: caption file not found" in out
    assert sorted(p.name for p in cache.iterdir()) == ["clip_0000_hv_te.safetensors", "clip_0002_hv_te.safetensors"]


def test_strict_stops_at_an_unreadable_video_with_a_one_line_error(models, tmp_path, capsys):
    toml, _ = clips(tmp_path, 1)
    (tmp_path / "videos" / "empty.mp4").write_bytes(b"")
    (tmp_path / "videos" / "empty.txt").write_text("nothing")
    with pytest.raises(SystemExit) as exit_info:
        cache_latents_main(latent_args(toml, models, "--strict"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"error: {tmp_path / 'videos' / 'empty.mp4'}: empty file (0 bytes)\n" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ docs/caching.md


def documented_commands():
    """Every command line in the ```bash blocks of docs/caching.md, in page order, as argv lists."""
    page = (ROOT / "docs" / "caching.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", page, re.S)
    return [shlex.split(line) for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_every_command_on_the_caching_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """The page's commands, in order, in a folder laid out as they assume: dataset.toml and ckpts/ with
    tiny models (official folders and ComfyUI single files) under the real names."""
    make_synthetic_dataset(tmp_path, num_videos=2, num_images=1, width=32, height=32, frames=5)
    ckpts = tmp_path / "ckpts"
    write_vae(ckpts / "hunyuan-video-t2v-720p" / "vae" / "pytorch_model.pt", random_vae_state_dict(TINY_VAE))
    write_tiny_llm_folder(ckpts / "text_encoder")
    write_tiny_clip_folder(ckpts / "text_encoder_2")
    write_tiny_llm_single_file(ckpts / "llava_llama3_fp16.safetensors")
    write_tiny_clip_single_file(ckpts / "clip_l.safetensors")
    monkeypatch.chdir(tmp_path)
    commands = documented_commands()
    assert len(commands) == 8
    mains = {"src/musubi_tuner/cache_latents.py": cache_latents_main,
             "src/musubi_tuner/cache_text_encoder_outputs.py": cache_text_main}
    for argv in commands:
        assert argv[0] == "python" and argv[1] in mains, argv
        mains[argv[1]](argv[2:])
        out = capsys.readouterr().out
        assert "failed" not in out.replace("0 failed", ""), (argv, out)

    for kind, count in (("videos", 2), ("images", 1)):
        cache = tmp_path / "cache" / kind
        assert len(list(cache.glob("*_hv.safetensors"))) == count and len(list(cache.glob("*_hv_te.safetensors"))) == count
        for path in cache.glob("*_hv_te.safetensors"):
            assert sorted(load_file(str(path))) == ["clipL_float16", "clipL_mask", "llm_float16", "llm_mask"]
    assert len(list((tmp_path / "cache" / "videos" / "debug_mode").glob("*_hv.mp4"))) == 2  # --debug_mode video's clips


def test_a_dataset_given_through_a_link_deletes_the_caches_of_its_removed_items(models, tmp_path):
    """Its caches record its folder as it is: a link to it names the same dataset, whose stale caches are its own."""
    make_synthetic_dataset(tmp_path / "real", num_videos=0, num_images=3, width=32, height=32, frames=5)
    (tmp_path / "linked").symlink_to(tmp_path / "real" / "images")
    tomls = {}
    for name, folder in (("real", tmp_path / "real" / "images"), ("linked", tmp_path / "linked")):
        tomls[name] = tmp_path / f"{name}.toml"
        tomls[name].write_text(f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n[[datasets]]\n'
                               f'image_directory = "{folder}"\ncache_directory = "{tmp_path / "cache"}"\n')
    cache_latents_main(latent_args(tomls["real"], models))
    first = sorted((tmp_path / "real" / "images").glob("*.png"))[0]
    first.unlink()
    first.with_suffix(".txt").unlink()
    cache_latents_main(latent_args(tomls["linked"], models, "--skip_existing"))
    assert len(list((tmp_path / "cache").glob("*_hv.safetensors"))) == 2


def test_previews_in_the_media_folder_are_not_cached_as_items(models, tmp_path):
    """Without cache_directory the caches (and --debug_mode video's previews) go into the image and video folders: the
    previews, written beside the sources, were cached as items by the next run, and previews of previews by the next."""
    make_synthetic_dataset(tmp_path, num_videos=2, num_images=2, width=32, height=32, frames=5)
    toml = tmp_path / "here.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n'
                    f'[[datasets]]\nimage_directory = "{tmp_path / "images"}"\n'
                    f'[[datasets]]\nvideo_directory = "{tmp_path / "videos"}"\ntarget_frames = [5]\n')
    for _ in range(2):
        cache_latents_main(latent_args(toml, models, "--debug_mode", "video"))
    cache_latents_main(latent_args(toml, models))
    assert len(list((tmp_path / "images").glob("*_hv.safetensors"))) == 2
    assert len(list((tmp_path / "videos").glob("*_hv.safetensors"))) == 2
    assert len(list((tmp_path / "videos" / "debug_mode").glob("*.mp4"))) == 2


def test_console_back_paints_every_row_and_names_the_colours_it_takes():
    """--debug_mode console --console_back (musubi-tuner's ascii_magic Back names): each row on that background."""
    import numpy as np

    from musubi_tuner.data.debug_view import ascii_art, background_code
    from musubi_tuner.errors import UserError

    rows = ascii_art(np.full((8, 16, 3), 200, np.uint8), width=8, color=False, back=background_code("Blue")).splitlines()
    assert rows and all(r.startswith("\x1b[44m") and r.endswith("\x1b[0m") for r in rows)
    assert "\x1b" not in ascii_art(np.zeros((8, 16, 3), np.uint8), width=8, color=False)
    with pytest.raises(UserError, match="--console_back pink: one of black, red, green"):
        background_code("pink")


def cached(toml, models):
    """Both caching commands run over the dataset; its config as training reads it."""
    cache_latents_main(latent_args(toml, models))
    cache_text_main(text_args(toml, models))
    return load_dataset_config(toml, check_sources=False)


def training_warnings(config, caplog) -> list[str]:
    """The warnings the training dataset logs as it is built."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        TrainingDataset.from_config(config, seed=0)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_image_whose_caption_was_deleted_since_caching_is_said_to_train_on_its_cached_caption(models, tmp_path, caplog):
    """An edited caption was said, a deleted one (to take the image out, say) not: the image trained on its old caption
    (fuzz_aa 15). Its caches are kept, as a misspelt caption_extension costs no cache."""
    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=2, width=32, height=32, frames=5)
    config = cached(toml, models)
    (tmp_path / "images" / "image_0001.txt").unlink()
    assert [w for w in training_warnings(config, caplog) if "skipped by caching now" in w] == [
        f"{toml}: [[datasets]][0]: 1 image is skipped by caching now but still trained on from its earlier caches (image_0001: "
        f"caption file gone, trained on its cached caption); to leave out what caching skips, delete its caches from "
        f"{tmp_path / 'cache' / 'images'} (caching keeps them, so that a mistyped caption_extension cannot delete a dataset's "
        "caches)"]  # (fuzz_ag 1d: it said to run the caching again, which changes nothing)


def test_an_image_truncated_since_it_was_cached_is_not_sent_back_to_the_caching(models, tmp_path, caplog):
    """fuzz_ag 5b: an image cached, then replaced by a truncated copy: caching fails it and keeps its old cache, and
    training said to run the caching again, which keeps failing it."""
    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=2, width=32, height=32, frames=5)
    config = cached(toml, models)
    image = tmp_path / "images" / "image_0001.png"
    image.write_bytes(image.read_bytes()[:60])
    cache_latents_main(latent_args(toml, models))  # (it fails the image, and keeps its earlier cache)
    warnings = [w for w in training_warnings(config, caplog) if "image_0001" in w]
    assert len(warnings) == 1 and "image_0001: changed since it was cached, and cache_latents.py cannot use it now: not a " \
        "readable image" in warnings[0] and "still trained on from its earlier caches" in warnings[0], warnings
    assert "run cache_latents.py" not in warnings[0]


def test_training_warns_once_per_dataset_about_caches_older_than_the_dataset_and_items_never_cached(models, tmp_path, caplog):
    """fuzz_a D8: a replaced image, an edited caption, a deleted image and a killed cache_latents.py (latent caches
    missing) were trained on, or left out, without a word. Training compares what the caches record with a stat of
    each source and its caption (the check --skip_existing uses), and names a few of each kind."""
    import os

    from PIL import Image

    toml = make_synthetic_dataset(tmp_path, num_videos=2, num_images=5, width=32, height=32, frames=5)
    config = cached(toml, models)
    assert not [w for w in training_warnings(config, caplog) if "older than" in w or "no latent cache" in w]  # just cached

    images, image_caches = tmp_path / "images", tmp_path / "cache" / "images"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(images / "image_0000.png")  # same size and name: only the pixels changed
    os.utime(images / "image_0000.png", ns=(1, 10**18))
    (images / "image_0001.txt").write_text("a totally different caption")
    (images / "image_0002.png").unlink()
    for stem in ("image_0003", "image_0004"):  # as a killed cache_latents.py leaves them
        next(image_caches.glob(f"{stem}_*_hv.safetensors")).unlink()
    (tmp_path / "videos" / "clip_0001.txt").write_text("another caption")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dataset = TrainingDataset.from_config(config, seed=0)
    assert dataset.num_items == 3 + 2  # image_0000, image_0001, image_0002 (source gone, caches still there); the clips
    lines = [r.getMessage() for r in caplog.records if "older than the dataset" in r.getMessage() or "no latent cache" in r.getMessage()]
    assert lines == [
        f"{toml}: [[datasets]][0]: 3 cached items are older than the dataset and trained on as cached (image_0000: image "
        "changed; image_0001: caption changed; image_0002: source deleted), and 2 images have no latent cache and are left out "
        "(image_0003; image_0004); run cache_latents.py and cache_text_encoder_outputs.py again (with --skip_existing they "
        "redo only these)",
        f"{toml}: [[datasets]][1]: 1 cached item is older than the dataset and trained on as cached (clip_0001: caption "
        "changed); run cache_latents.py and cache_text_encoder_outputs.py again (with --skip_existing they redo only these)",
    ]

    cache_latents_main(latent_args(toml, models, "--skip_existing"))  # what the warning says to do silences it
    cache_text_main(text_args(toml, models, "--skip_existing"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert TrainingDataset.from_config(config, seed=0).num_items == 4 + 2
    assert "older than" not in caplog.text and "no latent cache" not in caplog.text


def test_training_tells_items_caching_could_not_use_from_items_never_cached(models, tmp_path, caplog):
    """Every training run said 'no latent cache ... run cache_latents.py again' of items caching had rejected for good
    (a damaged image, a clip too short): running it again changed nothing, and the warning came back at every run."""
    from PIL import Image

    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=3, width=32, height=32, frames=5)
    (tmp_path / "images" / "image_0001.png").write_bytes(b"not a PNG")
    config = cached(toml, models)
    (line,) = [w for w in training_warnings(config, caplog) if "left out" in w]
    assert line.startswith(f"{toml}: [[datasets]][0]: 1 image is left out, as cache_latents.py could not use it (image_0001: ")
    assert line.endswith("); fix or remove those files") and "run cache_latents.py" not in line
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "image_0001.png")  # fixed since: never cached, as a new item
    assert any("1 image has no latent cache and is left out (image_0001); run cache_latents.py" in w
               for w in training_warnings(config, caplog))
    cache_latents_main(latent_args(toml, models, "--skip_existing"))
    assert not (tmp_path / "cache" / "images" / ".musubi-left-out.json").exists()  # nothing left out any more


def test_a_dataset_whose_sources_are_absent_says_nothing_about_stale_caches(models, tmp_path, caplog):
    """Training needs only the caches: with the source folder gone (or a cache-only dataset) there is nothing to compare."""
    import shutil

    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=2, width=32, height=32, frames=5)
    cache_latents_main(latent_args(toml, models))
    cache_text_main(text_args(toml, models))
    shutil.rmtree(tmp_path / "images")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=0).num_items == 2
    assert "older than" not in caplog.text and "no latent cache" not in caplog.text


def test_an_image_whose_name_is_not_utf8_is_cached_and_trained_on(models, tmp_path, capsys):
    """A name in Latin-1 (b'caf\\xe9.png', from a zip unpacked on Linux) is a valid POSIX name: safetensors' own reader
    refused its cache's path, the second text pass dropped the first's tensors and reported success, and training left
    the item out or failed in its fingerprint. Its caches are read from a descriptor now, and it trains like any."""
    import os

    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=2, width=32, height=32, frames=5)
    images = tmp_path / "images"
    for suffix in (b".png", b".txt"):
        os.rename(os.fsencode(images / "image_0001") + suffix, os.fsencode(images) + b"/caf\xe9" + suffix)
    os.link(images / "image_0000.png", os.fsencode(images) + b"/na\xefve.png")  # (no caption: skipped)
    for _ in range(2):  # the second run (--skip_existing) finds every cache complete
        cache_latents_main(latent_args(toml, models, "--skip_existing"))
        cache_text_main(text_args(toml, models, "--skip_existing"))
    out = capsys.readouterr().out
    # (the skipped item's name was a UnicodeEncodeError traceback in the record of what was left out: fuzz_aa 4)
    assert out.count("2 latent caches cached, 0 already cached, 1 skipped, 0 failed") == 1, out
    assert out.count("0 latent caches cached, 2 already cached, 1 skipped, 0 failed") == 1, out
    assert "0 text caches cached, 2 already cached" in out, out
    (text_cache,) = [p for p in (tmp_path / "cache" / "images").iterdir() if os.fsencode(p.name).startswith(b"caf\xe9_hv_te")]
    assert {k.split("_")[0] for k in read_safetensors_header(text_cache)[0]} == {"llm", "clipL"}
    for cache in (tmp_path / "cache" / "images").glob("*.safetensors"):  # the safetensors library refused a header whose
        # metadata escaped the name's byte as a lone surrogate (ComfyUI, musubi-tuner and diffusers read with it)
        safetensors_load(cache.read_bytes())
    dataset = TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=0)
    assert dataset.num_items == 2 and dataset.fingerprint()


def test_a_relative_cache_directory_is_one_folder_from_whichever_folder_the_commands_run(models, tmp_path, monkeypatch, capsys):
    """fuzz_i F3: image_directory = "images" was found beside the config, but cache_directory = "cache", not there
    yet, went to the current folder: caching from two folders split the latents and the text caches in two, and
    training found neither half complete. A relative cache_directory follows where its dataset's source was found."""
    project, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    make_synthetic_dataset(project, num_videos=0, num_images=2, width=32, height=32, frames=5)
    elsewhere.mkdir()
    toml = project / "dataset.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n'
                    '[[datasets]]\nimage_directory = "images"\ncache_directory = "cache"\n')
    monkeypatch.chdir(elsewhere)
    cache_latents_main(latent_args("../proj/dataset.toml", models))
    monkeypatch.chdir(project)
    cache_text_main(text_args("dataset.toml", models))
    assert not (elsewhere / "cache").exists()
    assert len(list((project / "cache").glob("*_hv.safetensors"))) == 2
    assert len(list((project / "cache").glob("*_hv_te.safetensors"))) == 2
    for cwd, config in ((project, "dataset.toml"), (elsewhere, "../proj/dataset.toml")):
        monkeypatch.chdir(cwd)
        (dataset,) = load_dataset_config(config).datasets
        assert dataset.cache_directory == project / "cache"  # in full, in every message that names it
        assert TrainingDataset.from_config(load_dataset_config(config, check_sources=False), seed=0).num_items == 2


def test_a_relative_cache_directory_beside_an_absolute_source_says_which_folder_holds_the_caches(models, tmp_path, monkeypatch, caplog):
    """fuzz_x F6: with the source written in full there is nothing to anchor a relative cache_directory to but the
    current folder (musubi-tuner's rule): caching from one folder and training from another found nothing, unsaid."""
    project, here = tmp_path / "proj", tmp_path / "here"
    make_synthetic_dataset(project, num_videos=0, num_images=2, width=32, height=32, frames=5)
    here.mkdir()
    toml = project / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n'
                    f'[[datasets]]\nimage_directory = "{(project / "images").as_posix()}"\ncache_directory = "cache"\n')
    monkeypatch.chdir(here)
    with caplog.at_level(logging.WARNING):
        cache_latents_main(latent_args(str(toml), models))
    assert (f'cache_directory = "cache": relative to the folder this command runs from, so the caches go to {here / "cache"} '
            f"(not there yet); run from another folder, a command uses that folder's cache instead") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cache_text_main(text_args(str(toml), models))  # the same folder, which now exists: nothing to say
    assert "relative to the folder this command runs from" not in caplog.text
    monkeypatch.chdir(project)  # (the config's own folder: where the caches go is no surprise)
    with caplog.at_level(logging.WARNING):
        load_dataset_config(toml)
    assert "relative to the folder this command runs from" not in caplog.text


def test_training_tells_a_broken_link_caching_could_not_read_from_an_item_never_cached(models, tmp_path, caplog):
    """fuzz_ag 5: a broken link among the images was left out of caching's record (it cannot be stat'ed), so training
    said "no latent cache ... run cache_latents.py again", which fails on it the same way."""
    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=2, width=32, height=32, frames=5)
    (tmp_path / "images" / "broken.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "images" / "broken.txt").write_text("a caption")
    config = cached(toml, models)
    (line,) = [w for w in training_warnings(config, caplog) if "left out" in w]
    assert line.startswith(f"{toml}: [[datasets]][0]: 1 image is left out, as cache_latents.py could not use it (broken: ")
    assert line.endswith("); fix or remove those files")
    (tmp_path / "gone.png").symlink_to(tmp_path / "images" / "image_0000.png")  # mended: never cached, as a new item
    assert any("1 image has no latent cache and is left out (broken); run cache_latents.py" in w
               for w in training_warnings(config, caplog))


def test_training_says_how_to_leave_out_an_item_caching_now_skips_but_cached_before(models, tmp_path, caplog):
    """fuzz_ag 1d: an image whose caption was deleted (musubi-tuner's way to take it out) was trained on with advice to
    cache again, which changes nothing; one made a .gif, and a video whose caption was deleted, without a word."""
    toml = make_synthetic_dataset(tmp_path, num_videos=2, num_images=3, width=32, height=32, frames=5)
    config = cached(toml, models)
    (tmp_path / "images" / "image_0000.txt").unlink()
    (tmp_path / "images" / "image_0001.png").rename(tmp_path / "images" / "image_0001.gif")
    (tmp_path / "videos" / "clip_0000.txt").unlink()
    cached(toml, models)  # what the advice said to do: the items are skipped, their caches kept
    lines = [w for w in training_warnings(config, caplog) if "skipped by caching now" in w]
    images, videos = sorted(lines, key=lambda line: "[[datasets]][1]" in line)
    assert "2 images are skipped by caching now but still trained on from their earlier caches (image_0000: caption file " \
           "gone, trained on its cached caption; image_0001: .gif is not a supported image type" in images
    assert "1 video is skipped by caching now but still trained on from its earlier caches (clip_0000: caption file gone" in videos
    for line in lines:
        assert line.endswith("to leave out what caching skips, delete its caches from "
                             f"{tmp_path / 'cache' / ('images' if line is images else 'videos')} (caching keeps them, so that a "
                             "mistyped caption_extension cannot delete a dataset's caches)") and "run cache_latents" not in line


def test_a_recaptioned_dataset_is_said_in_one_line_not_one_per_caption(models, tmp_path, caplog):
    """fuzz_am 5: re-captioning 800 images and caching again printed 800 'caption changed' warnings."""
    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=5, width=32, height=32, frames=5)
    cached(toml, models)
    for i, caption in enumerate(sorted((tmp_path / "images").glob("*.txt"))):
        caption.write_text(f"a new caption {i}")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cache_text_main(text_args(toml, models))
    said = [r.getMessage() for r in caplog.records if "caption" in r.getMessage() and "changed" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("5 caption(s) changed since their caches were made; the new ones are stored (")
    assert said[0].endswith("'a new caption 2'; and 2 more)")


def test_images_in_subfolders_are_named_as_such_and_stale_caches_in_one_line(models, tmp_path, caplog):
    """fuzz_am 6: a folder whose images were all in subfolders was "empty, or a drive not mounted?", and images in
    subfolders beside top-level ones were skipped without a word; fuzz_am 5: a line per stale cache deleted."""
    import shutil

    toml = make_synthetic_dataset(tmp_path, num_videos=0, num_images=4, width=32, height=32, frames=5)
    cached(toml, models)
    images = tmp_path / "images"
    (images / "sub").mkdir()
    for path in sorted(images.glob("image_000[0-2].*")):
        shutil.move(path, images / "sub" / path.name)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cache_latents_main(latent_args(toml, models))
    said = [r.getMessage() for r in caplog.records]
    assert any("[[datasets]][0]: 3 images in 1 subfolder(s) (sub) are not read: a folder is not searched below its own "
               "files" in line for line in said), said
    deleted = [line for line in said if line.startswith("deleted ")]
    assert len(deleted) == 1 and deleted[0].startswith(f"deleted 3 cache(s) in {tmp_path / 'cache' / 'images'} of items not "
                                                       "in the dataset any more: ")
    for path in sorted(images.glob("image_0003.*")):
        shutil.move(path, images / "sub" / path.name)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cache_latents_main(latent_args(toml, models))
    assert "lists no images (it holds 4 images in 1 subfolder(s) (sub), and a folder is not searched below its own files" in caplog.text


def test_the_latent_bar_counts_the_source_files_so_a_watcher_has_a_total_and_a_time_left(models, tmp_path, monkeypatch):
    """fuzz_ao 9: the bar counted windows, which are known only once each file is read: no total, no ETA, an empty bar
    on the studio's page for the whole caching. The files are known first; a failed one counts as taken."""
    import json

    from musubi_tuner import progress

    toml, _ = clips(tmp_path, 3)
    add_bad_videos(tmp_path)
    watched = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress.PROGRESS_FILE_VARIABLE, str(watched))
    monkeypatch.setattr(progress, "REPORT_SECONDS", 0.0)
    cache_latents_main(latent_args(toml, models, "--num_workers", "1"))
    bars = [r for r in map(json.loads, watched.read_text().splitlines()) if r["desc"].endswith(" latents")]
    assert {r["total"] for r in bars} == {5} and {r["unit"] for r in bars} == {"file"}
    assert (bars[-1]["n"], bars[-1]["closed"]) == (5, True) and any(r["remaining"] is not None for r in bars)


def test_a_vae_that_encodes_latents_no_vae_gives_is_named_and_nothing_is_cached(tmp_path, capsys):
    """fuzz_ar 9: a VAE of huge finite weights wrote every cache at 7e29 (exit 0, with --vae_dtype float32, as the fp16
    refusal advised); training then called each cache damaged and said to cache again: a loop, the VAE never named."""
    toml, cache = clips(tmp_path, 2)
    state = random_vae_state_dict(TINY_VAE)
    far = write_vae(tmp_path / "far_vae.pt", {**state, "encoder.conv_out.conv.bias": state["encoder.conv_out.conv.bias"] + 1e30})
    with pytest.raises(SystemExit):
        cache_latents_main(["--dataset_config", str(toml), "--vae", str(far), "--vae_dtype", "float32"])
    err = capsys.readouterr().err
    assert f"error: --vae {far}: the latents of {tmp_path / 'videos'}" in err and "the VAE file is damaged" in err, err
    assert not list(cache.glob("*_hv.safetensors"))
