"""hv_generate_video.py on tiny models: what a user gets for the flags they type.

Every run goes through the real pipeline and the real loaders (the official DiT .pt, the VAE .pt, HF text
encoder folders, a SkyReels I2V safetensors); sizes are tiny (32x32, 5 frames, 3 steps). Runs with the same
flags are made once and shared between tests.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import dit_inputs, rel_err, run_group
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.demo.tiny_text_encoders import write_tiny_clip_folder, write_tiny_llm_folder
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict, write_vae
from musubi_tuner.files import StateDictFile
from musubi_tuner.hunyuan.vae import SCALING_FACTOR, load_vae
from musubi_tuner.hv_generate_video import build_parser, main
from musubi_tuner.inference import pipeline

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "generate.md"
PROMPT = "A cat walks on the grass, realistic style."


def sharp_vae_state_dict() -> dict[str, torch.Tensor]:
    """The tiny VAE with a posterior as narrow as a trained VAE's (std e^-15), so decode(encode(x)) is one thing."""
    sd = random_vae_state_dict(TINY_VAE, seed=0)
    latent = TINY_VAE.latent_channels
    sd["quant_conv.weight"][latent:] = 0.0
    sd["quant_conv.bias"][latent:] = -30.0  # log-variance
    return sd


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are all overhead: one intra-op thread runs them faster than two, and shares a busy machine better."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    t2v, i2v = tiny_dit_config(), tiny_dit_config(in_channels=32)
    m = {
        "dit": write_dit(root / "mp_rank_00_model_states.pt", random_dit_state_dict(t2v, seed=3, scale=0.05), t2v, "pt"),
        "dit_i2v": write_dit(root / "skyreels_hunyuan_i2v_bf16.safetensors", random_dit_state_dict(i2v, seed=4, scale=0.05), i2v),
        "vae": write_vae(root / "pytorch_model.pt", sharp_vae_state_dict()),
        "te1": write_tiny_llm_folder(root / "text_encoder"),
        "te2": write_tiny_clip_folder(root / "text_encoder_2"),
        "root": root,
    }
    m["lora"] = write_lora(m["dit"], root / "lora.safetensors")
    return m


def write_lora(dit_path: Path, path: Path) -> Path:
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.networks import lora

    net = lora.create_arch_network(1.0, 4, 2.0, None, None, load_dit(dit_path, dtype=torch.float32))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for module in net.unet_loras:
            module.lora_up.weight.normal_(0, 0.3, generator=g)  # strong enough to change the video clearly
    net.save_weights(str(path), torch.float32, {})
    return path


def base_flags(m) -> list[str]:
    return ["--dit", str(m["dit"]), "--vae", str(m["vae"]), "--text_encoder1", str(m["te1"]), "--text_encoder2", str(m["te2"]),
            "--prompt", PROMPT, "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "3", "--seed", "1"]


_runs: dict[tuple, list[Path]] = {}


def generate(m, *flags: str, output_type: str = "latent") -> list[Path]:
    """hv_generate_video in-process with the base flags plus `flags` (later flags win); the saved paths."""
    key = (*flags, output_type)
    if key not in _runs:
        out = m["root"] / f"out{len(_runs)}"
        args = build_parser().parse_args([*base_flags(m), *flags, "--output_type", output_type, "--save_path", str(out)])
        _runs[key] = pipeline.generate(args)
    return _runs[key]


def latent_of(m, *flags: str) -> tuple[torch.Tensor, dict[str, str]]:
    (path,) = generate(m, *flags)
    f = StateDictFile(path, what="latent")
    return f.get("latent"), dict(f.metadata)


def video_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def encoded(m, frames_uint8: np.ndarray) -> torch.Tensor:
    """What the VAE makes of (F, H, W, 3) uint8 frames: the scaled latent (16, f, h, w)."""
    vae = load_vae(m["vae"], dtype=torch.float32)
    pixels = torch.from_numpy(frames_uint8).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        return vae.encode(pixels).mode()[0] * SCALING_FACTOR


# ----------------------------------------------------------------------------------------------- seeds and outputs


def test_same_seed_gives_identical_latents_and_another_seed_differs(models):
    first, meta = latent_of(models)
    again, _ = latent_of(models, "--infer_steps", "3", "--seed", "1", "--fps", "12")  # same settings, a separate run
    other, _ = latent_of(models, "--seed", "2")
    assert first.shape == (16, 2, 4, 4) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.1
    assert (meta["seeds"], meta["prompt"], meta["infer_steps"], meta["video_length"]) == ("1", PROMPT, "3", "5")


def test_output_both_writes_the_video_asked_for_and_a_latent_that_decodes_to_the_same_frames(models):
    saved = generate(models, "--video_size", "32", "48", output_type="both")
    latent_file, = [p for p in saved if p.name.endswith("_latent.safetensors")]
    mp4, = [p for p in saved if p.suffix == ".mp4"]
    assert latent_file.name.split("_")[-2] == "1" and mp4.stem.endswith("_1")  # names carry the seed
    assert latent_file.name == f"{mp4.stem}_latent.safetensors"  # and one time: the latent is found by its video's name
    frames = video_frames(mp4)
    assert frames.shape == (5, 32, 48, 3)  # --video_length frames of --video_size (height, width)
    with av.open(str(mp4)) as container:
        assert PROMPT in container.metadata.get("comment", "")

    decoded, = pipeline.generate(build_parser().parse_args([
        "--dit", str(models["dit"]), "--vae", str(models["vae"]), "--latent_path", str(latent_file),
        "--save_path", str(models["root"] / "decoded"), "--output_type", "video",
        "--video_size", "72", "64"]))  # a size no run takes, ignored with a warning by a decode (refused: fuzz_au 10)
    assert np.array_equal(video_frames(decoded), frames)
    assert StateDictFile(latent_file).metadata["fps"] == "24"  # (what the video is played at: fuzz_ap 7)
    # a .pt of the tensor alone, as musubi-tuner's torch.load path reads it (it was refused: fuzz_al 9)
    bare = models["root"] / "latent.pt"
    torch.save(StateDictFile(latent_file).get("latent"), bare)
    decoded, = pipeline.generate(build_parser().parse_args([
        "--dit", str(models["dit"]), "--vae", str(models["vae"]), "--latent_path", str(bare),
        "--save_path", str(models["root"] / "decoded_pt"), "--output_type", "video"]))
    assert np.array_equal(video_frames(decoded), frames)


# ----------------------------------------------------------------------------------------------- guidance


def test_guidance_scale_1_is_no_cfg_even_with_a_negative_prompt(models):
    plain, _ = latent_of(models)
    with_negative, _ = latent_of(models, "--negative_prompt", "blurry, low quality", "--guidance_scale", "1.0")
    assert torch.equal(plain, with_negative)


def test_split_uncond_equals_batched_cfg(models):
    plain, _ = latent_of(models)
    cfg = ("--guidance_scale", "6.0", "--negative_prompt", "blurry")  # shorter than the prompt: padded in the batch
    batched, meta = latent_of(models, *cfg)
    split, _ = latent_of(models, *cfg, "--split_uncond")
    assert rel_err(split, batched) < 1e-5
    assert rel_err(batched, plain) > 0.01  # CFG did something (the tiny random DiT listens to text only a little)
    assert (meta["guidance_scale"], meta["negative_prompt"]) == ("6.0", "blurry")


# ----------------------------------------------------------------------------------------------- LoRA


def test_lora_multiplier_0_equals_no_lora(models):
    plain, _ = latent_of(models)
    zero, _ = latent_of(models, "--lora_weight", str(models["lora"]), "--lora_multiplier", "0")
    one, meta = latent_of(models, "--lora_weight", str(models["lora"]), "--lora_multiplier", "1.0")
    assert torch.equal(zero, plain)
    assert rel_err(one, plain) > 0.005  # the LoRA does something at 1.0
    assert Path(eval(meta["lora_weight"])[0]).name == "lora.safetensors"


def test_lora_applied_on_the_fly_equals_lora_merged(models):
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.networks.merge import merge_loras_into

    merged = load_dit(models["dit"], dtype=torch.float32)
    merge_loras_into(merged, [models["lora"]], [0.7])
    on_the_fly = load_dit(models["dit"], dtype=torch.float32)
    pipeline.apply_loras_on_the_fly(on_the_fly, [models["lora"]], [0.7], exclude_single_blocks=False)
    base = load_dit(models["dit"], dtype=torch.float32)
    inputs = dit_inputs(merged.config, frames=2, height=4, width=4, text_lens=(9,))
    with torch.no_grad():
        got, want, without = on_the_fly(*inputs), merged(*inputs), base(*inputs)
    assert rel_err(got, want) < 1e-5 and rel_err(without, want) > 0.005


def test_fp8_runs_loras_on_the_fly_with_the_effect_of_the_merged_lora(models):
    lora = ("--lora_weight", str(models["lora"]), "--lora_multiplier", "1.0")
    plain, _ = latent_of(models)
    merged, _ = latent_of(models, *lora)
    fp8, _ = latent_of(models, "--fp8")
    fp8_lora, _ = latent_of(models, "--fp8", *lora)
    # fp8 rounds the block Linears to 3 mantissa bits: an error far below the LoRA's own effect (about 1.5% here),
    # and the LoRA changes the fp8 result as it changes the merged one
    assert rel_err(fp8_lora, merged) < 0.003 < 0.005 < rel_err(merged, plain)
    assert rel_err(fp8_lora - fp8, merged - plain) < 0.1


def test_save_merged_model_writes_the_merged_dit_and_loads_no_model(models, no_model_loads, capsys):
    from musubi_tuner.hunyuan.checkpoints import open_dit_file
    from musubi_tuner.networks.lora_reader import read_lora

    out = models["root"] / "merged.safetensors"
    main([*base_flags(models), "--lora_weight", str(models["lora"]), "--lora_multiplier", "0.5", "--save_merged_model", str(out),
          "--save_path", str(models["root"] / "unused")])
    assert f"saved {out}" in capsys.readouterr().out
    patch = read_lora(models["lora"]).patches[0]
    key = patch.param
    base, merged = open_dit_file(models["dit"]).get(key, dtype=torch.float32), StateDictFile(out).get(key, dtype=torch.float32)
    delta = patch.delta(base.shape)
    assert torch.allclose(merged, base + 0.5 * delta, atol=1e-2) and not torch.allclose(merged, base, atol=1e-2)


def test_what_a_list_of_loras_warns_about_is_said_once_with_or_without_save_merged_model(models, capsys, caplog):
    """fuzz_ap 9: the checks before the work and the work itself (the merge, the on-the-fly LoRA) each said it."""
    lora = str(models["lora"])
    for extra in (["--save_merged_model", str(models["root"] / "merged-twice.safetensors")], ["--infer_steps", "1"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            main([*base_flags(models), "--lora_weight", lora, lora, "--save_path", str(models["root"] / "twice"), *extra])
        assert caplog.text.count(f"{lora} is given twice among the LoRA files") == 1, (extra, caplog.text)


def test_damaged_files_of_finite_weights_write_no_video_of_nothing(models, tmp_path, capsys, caplog):
    """fuzz_ar 8: only NaN/inf was checked. A DiT whose last layer was x1e20 sampled a latent of 1e20 that was decoded and
    written (exit 0), though --latent_path refuses that latent; a VAE decoder x1e30 clipped every pixel to 0 or 255; a
    zeroed decoder wrote one flat grey."""
    from musubi_tuner.hunyuan.checkpoints import open_dit_file

    config = tiny_dit_config()
    state = {k: open_dit_file(models["dit"]).get(k) for k in random_dit_state_dict(config)}
    far_dit = write_dit(tmp_path / "far.safetensors", {**state, "final_layer.linear.weight": state["final_layer.linear.weight"] * 1e20,
                                                         "final_layer.linear.bias": state["final_layer.linear.bias"] + 1e20}, config)
    vae = sharp_vae_state_dict()
    far_vae = write_vae(tmp_path / "far_vae.pt", {**vae, "decoder.conv_out.conv.weight": vae["decoder.conv_out.conv.weight"] * 1e30})
    flat_vae = write_vae(tmp_path / "flat_vae.pt", {k: torch.zeros_like(v) if k.startswith("decoder.conv_out") else v for k, v in vae.items()})
    flags = [*base_flags(models), "--output_type", "both"]
    with pytest.raises(SystemExit):
        main([*flags, "--dit", str(far_dit), "--save_path", str(tmp_path / "a")])
    assert f"error: the sampled latent of {far_dit} reaches " in capsys.readouterr().err and not list((tmp_path / "a").glob("*"))
    with pytest.raises(SystemExit):
        main([*flags, "--vae", str(far_vae), "--save_path", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "from 0 on average, where they lie within [-1, 1], from a latent within a few units: the VAE file (--vae) is damaged" in err
    assert not list((tmp_path / "b").glob("*.mp4"))
    with caplog.at_level(logging.WARNING):
        main([*flags, "--vae", str(flat_vae), "--save_path", str(tmp_path / "c")])
    assert "every pixel decoded is the same colour (128): a damaged VAE file (--vae)" in caplog.text


# ----------------------------------------------------------------------------------------------- V2V and I2V


def write_frames(folder: Path, count: int, width: int, height: int) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        frame = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * i)], axis=-1).astype(np.uint8)
        Image.fromarray(frame).save(folder / f"frame_{i:03d}.png")
        frames.append(frame)
    return np.stack(frames)


def test_v2v_with_strength_0_returns_the_encoded_input(models):
    frames = write_frames(models["root"] / "v2v_frames", 6, 32, 32)  # one frame more than --video_length
    latent, meta = latent_of(models, "--video_path", str(models["root"] / "v2v_frames"), "--strength", "0")
    assert torch.allclose(latent, encoded(models, frames[:5]), atol=1e-4)
    assert meta["infer_steps"] == "0"  # the steps run, as musubi-tuner records them; and what makes it V2V (fuzz_ai 2)
    assert (meta["video_path"], meta["strength"]) == (str(models["root"] / "v2v_frames"), "0.0")


@pytest.mark.parametrize("strength", ["0", "0.1"])
def test_v2v_that_runs_no_step_loads_neither_the_dit_nor_the_text_encoders(models, monkeypatch, caplog, strength):
    """fuzz_ap 9: --strength 0 (or one that runs int(steps * strength) = 0 steps) loaded the DiT and both text encoders for
    a run that used neither."""
    def forbidden(*_, **__):
        raise AssertionError("loaded for a run without a denoising step")

    monkeypatch.setattr(pipeline, "load_generation_dit", forbidden)
    monkeypatch.setattr(pipeline, "encode_prompts", forbidden)
    frames = write_frames(models["root"] / "v2v_frames", 6, 32, 32)
    with caplog.at_level(logging.WARNING):
        latent, meta = latent_of(models, "--video_path", str(models["root"] / "v2v_frames"), "--strength", strength, "--infer_steps", "7")
    assert torch.allclose(latent, encoded(models, frames[:5]), atol=1e-4) and meta["infer_steps"] == "0"
    assert ("runs int(0.7) = 0 of them: the input video comes back unchanged" in caplog.text) == (strength == "0.1")


def test_the_metadata_records_what_else_changes_the_frames_when_given(models):
    """fuzz_ai 2: --cfg_end 0 with real CFG gave the latent of a run without CFG, recorded as one with it; the LoRAs'
    blocks and fp8 weights were not recorded either."""
    _, plain = latent_of(models)
    _, meta = latent_of(models, "--negative_prompt", "ugly", "--guidance_scale", "6", "--cfg_end", "0", "--fp8")
    assert {k: meta[k] for k in ("guidance_scale", "cfg_end", "fp8")} == {"guidance_scale": "6.0", "cfg_end": "0.0", "fp8": "true"}
    assert not {"cfg_end", "fp8", "video_path", "strength", "image_path", "lora_blocks"} & set(plain)


class PerfectFirstFrameI2V(torch.nn.Module):
    """Stands in for a SkyReels I2V DiT that has learned to keep the first frame: it runs the real (tiny, random)
    32-channel DiT, then sets frame 0's velocity to the one that lands on the image latent it was given in
    channels 16..31. If the pipeline put the image anywhere else, or not at all, the first frame would not follow it."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, x, t, *text_and_guidance):
        assert x.shape[1] == 32
        v = self.dit(x, t, *text_and_guidance).clone()
        sigma = (t / 1000).view(-1, 1, 1, 1)
        noisy, image = x[:, :16, 0], x[:, 16:, 0]
        v[:, :, 0] = (noisy - image) / sigma
        return v


def test_i2v_first_frame_follows_the_image(models, monkeypatch):
    from musubi_tuner.data.buckets import resize_to_bucket

    image = write_frames(models["root"] / "i2v", 1, 48, 40)[0]  # another size: resized and cropped to --video_size
    load = pipeline.load_generation_dit
    monkeypatch.setattr(pipeline, "load_generation_dit", lambda args, device: PerfectFirstFrameI2V(load(args, device)))
    latent, meta = latent_of(models, "--dit", str(models["dit_i2v"]), "--image_path", str(models["root"] / "i2v" / "frame_000.png"))
    want = encoded(models, resize_to_bucket(image, (32, 32))[None])[:, 0]
    assert torch.allclose(latent[:, 0], want, atol=1e-4)
    assert not torch.allclose(latent[:, 1], want, atol=0.1)
    # the file says SkyReels I2V: its preset filled in what was not typed
    assert (meta["preset"], meta["guidance_scale"], meta["embedded_cfg_scale"]) == ("skyreels-i2v", "6.0", "1.0")
    assert meta["prompt"] == "FPS-24, " + PROMPT and meta["negative_prompt"].startswith("Aerial view")


# ----------------------------------------------------------------------------------------------- input checks


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: input checks must come first."""
    from musubi_tuner.hunyuan import checkpoints, text_encoders, vae

    def forbidden(*_, **__):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module, name in ((text_encoders, "load_text_encoder1"), (text_encoders, "load_text_encoder2"),
                         (checkpoints, "load_dit"), (vae, "load_vae")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("change,message", [
    (["--video_length", "6"], "--video_length 6 is not 4N+1 (try 5 or 9)"),
    (["--video_size", "40", "32"], "--video_size 40 32: height and width must be multiples of 16 (try 48 32)"),
    (["--dit", "missing.pt"], "missing.pt: DiT checkpoint not found (--dit)"),
    (["--text_encoder2", "missing_clip"], "missing_clip: text encoder not found (--text_encoder2)"),
    (["--video_path", "missing.mp4"], "missing.mp4: video not found (--video_path)"),
    # every file flag says why in the same words: a broken link, a loop, a file where a folder must be, a folder
    (["--vae", "{broken}"], "broken: broken symbolic link (to {tmp}/gone, which does not exist) (--vae)"),
    (["--text_encoder1", "{loop}"], "loop: symbolic link loop (--text_encoder1)"),
    (["--dit", "{under_file}"], "dit.pt: DiT checkpoint not found: {tmp}/file is a file, not a folder (--dit)"),
    (["--image_path", "{tmp}"], "expected an image, found a folder (--image_path)"),
    (["--video_path", "{broken}"], "broken: broken symbolic link (to {tmp}/gone, which does not exist) (--video_path)"),
    (["--save_path", "{broken}"], "broken: is a broken symbolic link (to {tmp}/gone), not a folder; choose another --save_path"),
    (["--lora_weight", "missing.safetensors"], "missing.safetensors: LoRA file not found (--lora_weight)"),
    (["--image_path", "{dit}"], "--image_path needs a SkyReels I2V DiT (32 input channels)"),
    (["--dit", "{dit_i2v}"], "is an image-to-video DiT (32 input channels): give the first frame with --image_path"),
    (["--context_parallel", "3"], "--context_parallel 3: the DiT's 2 attention heads do not split over 3 processes; use one of 1, 2"),
    (["--context_parallel", "2"], "--context_parallel 2: one process was started; start 2 (accelerate launch --multi_gpu"),
    (["--video_path", "{short}"], "short: has 1 frame, fewer than --video_length 5"),  # (fuzz_ag 2: after both encoders ran)
    (["--video_path", "{fifo}"], "fifo.mp4: not a regular file (a FIFO); expected a file (--video_path)"),  # (fuzz_ag 8c)
])
def test_bad_inputs_stop_with_one_line_naming_the_flag_before_any_model_loads(models, no_model_loads, capsys, tmp_path, change,
                                                                              message):
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("")
    write_frames(tmp_path / "short", 1, 32, 32)
    os.mkfifo(tmp_path / "fifo.mp4")
    paths = {**models, "tmp": tmp_path, "broken": tmp_path / "broken", "loop": tmp_path / "loop",
             "under_file": tmp_path / "file" / "dit.pt", "short": tmp_path / "short", "fifo": tmp_path / "fifo.mp4"}
    message = message.format(**paths)
    argv = [*base_flags(models), "--save_path", str(models["root"] / "unused"), *(c.format(**paths) for c in change)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[-1].startswith("error: ") and message in err[-1]


# ----------------------------------------------------------------------------------------------- the documented commands


def doc_commands() -> list[list[str]]:
    """Every hv_generate_video.py command in docs/generate.md, as argv after the script."""
    commands, lines, in_block = [], [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            lines.append(line)
    text = "\n".join(lines).replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["python", "src/musubi_tuner/hv_generate_video.py"]:
            commands.append(words[2:])
    return commands


def with_values(argv: list[str], values: dict[str, list[str]]) -> list[str]:
    """argv with the values of the given flags replaced."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] in values:
            out += values[argv[i]]
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        else:
            i += 1
    return out


def test_every_documented_command_parses():
    commands = doc_commands()
    assert len(commands) >= 8
    for argv in commands:
        build_parser().parse_args(argv)


def test_the_documented_t2v_command_runs_as_typed_on_tiny_models(models, tmp_path):
    argv = doc_commands()[0]  # the quick start
    tiny = with_values(argv, {"--dit": [str(models["dit"])], "--vae": [str(models["vae"])], "--text_encoder1": [str(models["te1"])],
                              "--text_encoder2": [str(models["te2"])], "--save_path": [str(tmp_path)],
                              "--lora_weight": [str(models["lora"])], "--video_size": ["32", "48"], "--infer_steps": ["2"]})
    result = subprocess.run([sys.executable, "src/musubi_tuner/hv_generate_video.py", *tiny], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    mp4, = tmp_path.glob("*.mp4")
    assert f"saved {mp4}" in result.stdout
    length = int(argv[argv.index("--video_length") + 1])
    assert video_frames(mp4).shape == (length, 32, 48, 3)


# ----------------------------------------------------------------------------------------------- step caching


SPEED_MODES = {
    "fp8 with LoRAs on the fly": ["--fp8", "--lora_weight", "{lora}"],
    "SkyReels I2V preset, CFG split": ["--dit", "{dit_i2v}", "--image_path", "{root}/i2v_cache/frame_000.png", "--split_uncond"],
    "V2V": ["--video_path", "{root}/v2v_cache", "--strength", "0.8"],
    "block swap, CFG in one batch": ["--blocks_to_swap", "2", "--guidance_scale", "4.0"],
}


@pytest.fixture(scope="module")
def speed_inputs(models):
    write_frames(models["root"] / "i2v_cache", 1, 32, 32)
    write_frames(models["root"] / "v2v_cache", 5, 32, 32)
    return models


@pytest.mark.parametrize("mode", ["fp8 with LoRAs on the fly", "SkyReels I2V preset, CFG split"])
@pytest.mark.parametrize("method", ["teacache", "fbcache"])
def test_step_cache_threshold_0_gives_exactly_the_uncached_latents(speed_inputs, mode, method):
    flags = [f.format(**speed_inputs) for f in SPEED_MODES[mode]]
    plain, _ = latent_of(speed_inputs, *flags)
    cached, meta = latent_of(speed_inputs, *flags, "--step_cache", method, "--step_cache_threshold", "0")
    assert torch.equal(cached, plain)
    calls = 6 if "CFG" in mode else 3
    assert (meta["step_cache"], meta["step_cache_threshold"], meta["step_cache_skipped"]) == (method, "0", f"0/{calls}")


@pytest.mark.parametrize("mode", list(SPEED_MODES))
def test_step_cache_skips_all_but_the_warmup_and_last_steps_in_every_mode(speed_inputs, mode, caplog):
    flags = [f.format(**speed_inputs) for f in SPEED_MODES[mode]]
    with caplog.at_level("INFO", logger="musubi_tuner"):
        latent, meta = latent_of(speed_inputs, *flags, "--infer_steps", "5", "--step_cache", "fbcache", "--step_cache_threshold", "1e9",
                                 "--step_cache_warmup", "2")
    steps = 4 if mode == "V2V" else 5  # strength 0.8 runs the last 4 of 5
    per_call = 2 if "CFG" in mode else 1
    skipped, evaluations = per_call * (steps - 3), per_call * steps
    assert meta["step_cache_skipped"] == f"{skipped}/{evaluations}"
    assert f"skipped {skipped} of {evaluations} DiT evaluations" in caplog.text
    plain, _ = latent_of(speed_inputs, *flags, "--infer_steps", "5")
    assert torch.isfinite(latent).all() and 0 < rel_err(latent, plain) < 0.5


def test_step_cache_flags_are_checked_before_any_model_loads(models, no_model_loads, capsys):
    for change, message in ((["--step_cache_threshold", "0.1"], "--step_cache_threshold needs --step_cache teacache or fbcache"),
                            (["--step_cache_warmup", "3"], "--step_cache_warmup needs --step_cache teacache or fbcache"),  # (fuzz_ap 8)
                            (["--step_cache", "teacache", "--step_cache_threshold", "-1"], "--step_cache_threshold -1: must be at least 0"),
                            (["--compile", "--compile_mode", "fast"], "--compile_mode: invalid choice: 'fast' (choose from 'default', 'reduce-overhead'")):
        with pytest.raises(SystemExit) as exit_:
            main([*base_flags(models), *change, "--save_path", str(models["root"] / "unused")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_compile_gives_the_eager_latents_with_a_step_cache_and_block_swap(models):
    flags = ("--infer_steps", "5", "--step_cache", "teacache", "--step_cache_threshold", "1e9", "--blocks_to_swap", "2")
    eager, _ = latent_of(models, *flags)
    compiled, meta = latent_of(models, *flags, "--compile", "--compile_backend", "aot_eager")
    assert rel_err(compiled, eager) < 1e-5 and meta["step_cache_skipped"] == "3/5"


# ----------------------------------------------------------------------------------------------- several processes
# (last: the one-process references are those of the tests above, already made)


def _generate_in_group(rank, world, argv):
    return [str(p) for p in pipeline.generate(build_parser().parse_args(argv))]


def test_the_skyreels_t2v_preset_follows_the_file_name_and_a_merge_of_one_keeps_it(models, tmp_path):
    """fuzz_aj 2: the whole --dit path was searched for "skyreels" (a HunyuanVideo file in a folder named skyreels_models
    ran with SkyReels' real CFG and prefix), and a merged SkyReels T2V model lost its preset (HunyuanVideo's defaults,
    no real CFG)."""
    import shutil

    from musubi_tuner.networks.merge import merge_file

    def preset_of(dit):
        args = build_parser().parse_args(["--dit", str(dit), "--vae", str(models["vae"]), "--text_encoder1", str(models["te1"]),
                                          "--text_encoder2", str(models["te2"]), "--prompt", "a cat", "--save_path", str(tmp_path)])
        pipeline.check_and_fill(args)
        return args.preset

    (tmp_path / "skyreels_models").mkdir()
    shutil.copy(models["dit"], tmp_path / "skyreels_models" / "mp_rank_00_model_states.pt")
    shutil.copy(models["dit"], tmp_path / "skyreels_hunyuan_t2v_bf16.pt")
    merged = tmp_path / "mine.safetensors"
    merge_file(str(tmp_path / "skyreels_hunyuan_t2v_bf16.pt"), [str(models["lora"])], [1.0], str(merged))
    assert [preset_of(d) for d in (tmp_path / "skyreels_models" / "mp_rank_00_model_states.pt",
                                   tmp_path / "skyreels_hunyuan_t2v_bf16.pt", merged)] == ["hunyuan-t2v", "skyreels-t2v", "skyreels-t2v"]


def test_the_skyreels_prefix_is_added_once_whatever_its_spelling_and_a_cfg_end_of_no_step_is_said(models, caplog):
    """fuzz_aj 12: "FPS-24, " was added again to a prompt that began " fps-24," or "FPS-24 a cat"; fuzz_aj 10: a
    --cfg_end that rounds to no guided step turned real CFG off without a word."""
    import logging

    write_frames(models["root"] / "prefix_image", 1, 32, 32)
    image = models["root"] / "prefix_image" / "frame_000.png"

    def prompt_of(prompt, *extra):
        args = build_parser().parse_args([*base_flags(models), "--dit", str(models["dit_i2v"]), "--image_path", str(image),
                                          "--save_path", "x", *extra])
        args.prompt = prompt
        pipeline.check_and_fill(args)
        return args.prompt

    assert prompt_of("a cat") == "FPS-24, a cat"
    for given in (" fps-24, a cat", "FPS-24 a cat", "FPS-24, a cat"):
        assert prompt_of(given) == given
    with caplog.at_level(logging.WARNING):
        prompt_of("a cat", "--cfg_end", "0.1")
    assert "--cfg_end 0.1 of 3 steps guides none of them: real CFG is off" in caplog.text


def _decode_on_machine(rank, world, machines, argv):
    from musubi_tuner.errors import SharedError

    os.chdir(machines[rank])
    try:
        return [str(p) for p in pipeline.generate(build_parser().parse_args(argv))]
    except SharedError as e:
        return str(e)


def test_two_processes_decoding_latents_that_differ_stop_naming_the_file(models, tmp_path):
    """fuzz_ae 1: each process of a run read its own machine's --latent_path (and --video_path) and mixed a differing
    copy into the video without a word."""
    from safetensors.torch import save_file

    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for seed, machine in enumerate(machines):
        machine.mkdir()
        save_file({"latent": torch.randn((16, 1, 4, 4), generator=torch.Generator().manual_seed(seed))}, str(machine / "l.safetensors"))
    argv = ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--latent_path", "l.safetensors", "--save_path", "out"]
    said = run_group(2, _decode_on_machine, machines, argv, launcher_env=True)
    assert said == ["--latent_path l.safetensors differs between process 0 and process 1 (each reads its own machine's copy); "
                    "give every process the same files"] * 2
    assert not (machines[0] / "out").exists() or not any((machines[0] / "out").iterdir())


def test_two_processes_sharing_the_tokens_generate_the_one_process_video_and_only_the_first_writes(speed_inputs, tmp_path):
    """As under `torchrun --nproc_per_node 2` (the variables it sets, in processes forked from this one); fp8 with a LoRA."""
    flags = [f.format(**speed_inputs) for f in SPEED_MODES["fp8 with LoRAs on the fly"]]
    one, _ = latent_of(speed_inputs, *flags)
    argv = [*base_flags(speed_inputs), *flags, "--context_parallel", "2", "--output_type", "both", "--save_path", str(tmp_path),
            "--vae_spatial_tile_sample_min_size", "32"]  # 2 x 2 tiles: each process decodes two
    first, second = run_group(2, _generate_in_group, argv, launcher_env=True)
    assert second == [] and sorted(Path(p).name for p in first) == sorted(p.name for p in tmp_path.iterdir())
    latent, = [Path(p) for p in first if p.endswith(".safetensors")]
    assert rel_err(StateDictFile(latent).get("latent"), one) < 1e-5
    mp4, = [Path(p) for p in first if p.endswith(".mp4")]
    assert video_frames(mp4).shape == (5, 32, 32, 3)


def test_two_processes_run_the_negative_and_positive_prompt_of_skyreels_i2v_side_by_side(speed_inputs, tmp_path):
    flags = [f.format(**speed_inputs) for f in SPEED_MODES["SkyReels I2V preset, CFG split"]]
    one, _ = latent_of(speed_inputs, *flags)
    argv = [*base_flags(speed_inputs), *flags, "--output_type", "latent", "--save_path", str(tmp_path)]
    (latent, ), _ = run_group(2, _generate_in_group, argv, launcher_env=True)  # the image encoded once, by the first
    assert rel_err(StateDictFile(latent).get("latent"), one) < 1e-5


def test_two_outputs_of_one_seed_in_the_same_millisecond_keep_both(tmp_path, monkeypatch):
    """Names come from the clock: two generations of one seed saved in one millisecond (or after the clock was set back)
    replaced each other's latent and video without a word."""
    import time

    from musubi_tuner.inference import outputs

    monkeypatch.setattr(time, "time", lambda: 1790000000.123)  # a clock that does not move
    first = outputs.save_latent(torch.zeros(16, 1, 2, 2), {"prompt": "a"}, tmp_path, 1, False)
    second = outputs.save_latent(torch.ones(16, 1, 2, 2), {"prompt": "b"}, tmp_path, 1, False)
    assert first != second and outputs.OUTPUT_NAME.fullmatch(second.name)
    assert [outputs.load_latent(str(p))[1]["prompt"] for p in (first, second)] == ["a", "b"]
    assert outputs.free_stamp(tmp_path, 2) == outputs.time_flag()  # (another seed's names are its own)


def test_two_processes_with_real_cfg_a_cfg_end_and_a_step_cache_give_the_one_process_latent_and_counts(speed_inputs, tmp_path):
    """fuzz_ap 1: past --cfg_end each CFG-parallel process ran the positive prompt with its own step cache (the negative
    one's held no state of it): two latents, process 0's saved, the video tiled from both; the summary and the metadata
    counted process 0's prompt only."""
    flags = ["--negative_prompt", "ugly blurry", "--guidance_scale", "4", "--infer_steps", "8", "--cfg_end", "0.5",
             "--step_cache", "teacache", "--step_cache_threshold", "1"]
    one, meta = latent_of(speed_inputs, *flags, "--split_uncond")
    argv = [*base_flags(speed_inputs), *flags, "--output_type", "latent", "--save_path", str(tmp_path)]
    (latent, ), _ = run_group(2, _generate_in_group, argv, launcher_env=True)
    two = StateDictFile(latent)
    assert rel_err(two.get("latent"), one) < 1e-5
    assert two.metadata["step_cache_skipped"] == meta["step_cache_skipped"]
    assert int(meta["step_cache_skipped"].split("/")[0]) > 0  # (the cache did skip steps, past --cfg_end too)


def test_cfg_end_is_a_fraction_of_the_steps_v2v_runs(speed_inputs, caplog):
    """fuzz_ap 2: --cfg_end counted from step 0 of the whole schedule, so with --strength 0.5 a --cfg_end 0.5 guided
    none of the 5 steps V2V runs: the run was --guidance_scale 1's, without a word."""
    import logging

    v2v = [f.format(**speed_inputs) for f in SPEED_MODES["V2V"]][:2] + ["--strength", "0.5", "--infer_steps", "10"]
    plain, _ = latent_of(speed_inputs, *v2v)
    guided, meta = latent_of(speed_inputs, *v2v, "--guidance_scale", "6", "--negative_prompt", "ugly", "--cfg_end", "0.5")
    assert not torch.equal(guided, plain) and meta["cfg_end"] == "0.5"
    with caplog.at_level(logging.WARNING):
        latent_of(speed_inputs, *v2v, "--guidance_scale", "6", "--negative_prompt", "ugly", "--cfg_end", "0.05")
    assert "--cfg_end 0.05 of 5 steps guides none of them" in caplog.text  # (the 5 steps V2V runs, not the 10)


def test_a_seed_past_32_bits_is_said_to_draw_the_noise_of_its_low_bits(models, caplog):
    """fuzz_ap 3: torch's CPU generator keeps a seed's low 32 bits (musubi-tuner's too): --seed 2^32+1 gave --seed 1's
    video under another name, without a word."""
    import logging

    plain, _ = latent_of(models)  # (--seed 1)
    with caplog.at_level(logging.WARNING):
        same, _ = latent_of(models, "--seed", str(2**32 + 1))
    assert torch.equal(same, plain)  # (musubi-tuner's noise for that seed, kept)
    assert f"--seed {2**32 + 1}: the noise generator takes its low 32 bits, as musubi-tuner's does: the same noise, and video, " \
           "as --seed 1" in caplog.text


def test_a_latent_of_another_fps_is_said_when_decoded(models, caplog, tmp_path):
    """fuzz_ap 7: --fps was recorded nowhere: a --fps 12 latent decoded with --latent_path played at 24, twice as fast."""
    import logging

    (latent,) = generate(models, "--fps", "12")
    assert StateDictFile(latent).metadata["fps"] == "12"
    with caplog.at_level(logging.WARNING):
        pipeline.generate(build_parser().parse_args(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--latent_path",
                                                     str(latent), "--save_path", str(tmp_path), "--output_type", "video"]))
    assert f"{latent}: generated for --fps 12; its video is written at --fps 24 (give --fps 12 for its speed)" in caplog.text


def test_the_step_caches_warm_up_and_the_plan_count_the_steps_v2v_runs(speed_inputs, caplog, capsys):
    """fuzz_ap 4: with --strength 0.25 of 12 steps V2V runs 3, of which a warm-up of 2 leaves none to skip: no warning
    was given, and the dry run planned 12 steps, 6 of them skipped."""
    import logging

    v2v = [f.format(**speed_inputs) for f in SPEED_MODES["V2V"]][:2] + ["--strength", "0.25", "--infer_steps", "12"]
    cache = ["--step_cache", "teacache", "--step_cache_threshold", "0.15", "--step_cache_warmup", "2"]
    with caplog.at_level(logging.WARNING):
        main([*base_flags(speed_inputs), *v2v, *cache, "--save_path", str(speed_inputs["root"] / "unused"), "--dry_run"])
    assert "--step_cache_warmup 2 with the 3 steps V2V runs of --infer_steps 12: the first 2 steps and the last always run" in caplog.text
    out = capsys.readouterr().out
    assert "3 steps" in out and "12 steps" not in out, out


@pytest.mark.parametrize("strength,stages", [
    ("0", ["VAE encode of --video_path", "VAE decode"]),
    ("0.5", ["text encoder 1 (LLM)", "text encoder 2 (CLIP-L)", "VAE encode of --video_path", "DiT denoising step", "VAE decode"]),
])
def test_the_dry_run_of_v2v_plans_the_encode_and_no_model_a_run_without_steps_does_not_load(speed_inputs, capsys, strength, stages):
    """fuzz_au 11: a V2V that runs no step loads the VAE alone, and its dry run planned the text encoders and a DiT step,
    and asked for options for them; no V2V dry run planned the VAE's encode of the input video."""
    v2v = [f.format(**speed_inputs) for f in SPEED_MODES["V2V"]][:2] + ["--strength", strength, "--infer_steps", "4"]
    main([*base_flags(speed_inputs), *v2v, "--save_path", str(speed_inputs["root"] / "unused"), "--dry_run"])
    out = capsys.readouterr().out
    table = out[out.index("peak during"):out.index("needed on")].splitlines()[1:]
    assert [line[:58].strip() for line in table] == [next(line[:58].strip() for line in table if line.startswith(stage))
                                                     for stage in stages], out
    assert ("no denoising step runs" in out) == (strength == "0")


@pytest.mark.parametrize("steps", [3, 7])
def test_a_v2v_strength_that_runs_no_step_is_said_by_the_dry_run_with_one_that_runs_one(speed_inputs, caplog, capsys, steps):
    """fuzz_ay 5: the advice named 1 / steps rounded down (0.333333 of 3 steps runs int(0.999999) = 0), and the dry run
    did not give it."""
    import logging
    import re

    v2v = [f.format(**speed_inputs) for f in SPEED_MODES["V2V"]][:2] + ["--strength", "0.1", "--infer_steps", str(steps)]
    with caplog.at_level(logging.WARNING):
        main([*base_flags(speed_inputs), *v2v, "--save_path", str(speed_inputs["root"] / "unused"), "--dry_run"])
    least = float(re.search(r"raise --strength to at least (\S+) or --infer_steps", caplog.text).group(1))
    assert int(steps * least) == 1 and int(steps * (least - 2e-6)) == 0


def test_image_frames_past_a_thousand_keep_their_order_in_name_order(models, tmp_path):
    """fuzz_ap 6: frames were named _000 .. _999, then _1000, which sorts before _101: a folder read back in name order
    (--video_path) was scrambled. Musubi-tuner's three digits up to 1,000 frames, one digit more past them."""
    from safetensors.torch import save_file

    latent = tmp_path / "long_latent.safetensors"
    save_file({"latent": torch.randn(1, 16, 257, 2, 2) * 0.1}, str(latent))
    (folder,) = pipeline.generate(build_parser().parse_args(["--dit", str(models["dit"]), "--vae", str(models["vae"]),
                                                            "--latent_path", str(latent), "--save_path", str(tmp_path / "out"),
                                                            "--output_type", "images"]))
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 1025 and names[0].endswith("_0000.png") and names[-1].endswith("_1024.png")
    assert [int(n.rsplit("_", 1)[1][:-4]) for n in names] == list(range(1025))


def test_the_metadata_records_each_loras_multiplier_as_applied_and_a_bare_latent_writes_no_comment(models, tmp_path):
    """fuzz_ap 9: --lora_multiplier 0.5 for two files recorded [0.5] (the second is applied at 1.0, as musubi-tuner
    reads the flag); a latent saved without metadata, decoded, wrote the comment '{}'."""
    import json

    from safetensors.torch import save_file

    lora = str(models["lora"])
    _, meta = latent_of(models, "--lora_weight", lora, lora, "--lora_multiplier", "0.5")
    assert json.loads(meta["lora_multiplier"]) == [0.5, 1.0]
    _, meta = latent_of(models, "--lora_weight", lora, "--lora_multiplier", "0.5", "0.7")
    assert json.loads(meta["lora_multiplier"]) == [0.5]
    bare = tmp_path / "bare_latent.safetensors"
    save_file({"latent": torch.randn(1, 16, 1, 4, 4) * 0.1}, str(bare))
    (mp4,) = pipeline.generate(build_parser().parse_args(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--latent_path",
                                                         str(bare), "--save_path", str(tmp_path / "out"), "--output_type", "video"]))
    with av.open(str(mp4)) as container:
        assert "comment" not in container.metadata


def test_the_i2v_preset_on_a_t2v_dit_is_said(models, caplog):
    """fuzz_ap 9: --preset skyreels-i2v on a 16-channel DiT ran a T2V video recorded as skyreels-i2v, without a note."""
    import logging

    with caplog.at_level(logging.WARNING):
        latent_of(models, "--preset", "skyreels-i2v", "--guidance_scale", "1")
    assert "--preset skyreels-i2v is SkyReels' image-to-video preset" in caplog.text and "(16 input channels)" in caplog.text
