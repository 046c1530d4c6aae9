"""hv_train_network.py off the happy path: flags, files, caches made for another model, resuming, full disks
(see cases.py for what every case asserts)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from reliability_cases import (
    MEMORY,
    READ_ONLY,
    TOO_LARGE,
    Case,
    all_said,
    check,
    copy_cached,
    copy_dataset,
    killed_while_writing,
    nan_dit,
    nan_vae,
    outputs_of,
    replaced,
    run_command,
    train_argv,
    trained_before,
    truncated,
    write,
)

from musubi_tuner import files
from musubi_tuner.data import cache_files


def assert_metadata(path: Path, **expected: str) -> None:
    from musubi_tuner.files import read_safetensors_header

    metadata = read_safetensors_header(path)[1]
    assert {k: metadata.get(k) for k in expected} == expected, metadata


def trained(path: Path) -> None:
    """The LoRA's up weights moved from their zero start: an optimizer step was made."""
    from safetensors.torch import load_file

    assert any(v.abs().max() > 0 for k, v in load_file(str(path)).items() if k.endswith("lora_up.weight")), "an untrained LoRA"


def up_norm_at_most(path: Path, bound: float) -> None:
    from safetensors.torch import load_file

    ups = [v.float() for k, v in load_file(str(path)).items() if k.endswith("lora_up.weight")]
    norm = float(sum(v.pow(2).sum() for v in ups) ** 0.5)
    assert 0 < norm <= bound * 1.001, norm


def i2v_lora(a, tmp) -> Path:
    """The assets' LoRA, its metadata saying it was trained here on a SkyReels I2V DiT (32 input channels)."""
    files.save_safetensors(files.StateDictFile(a.lora).load_all(), tmp / "i2v.safetensors",
                           metadata={"musubi_tuner.version": "0.1", "musubi_tuner.base_model": "skyreels-i2v", "musubi_tuner.in_channels": "32"})
    return tmp / "i2v.safetensors"


def lokr_of_factor_4(a, tmp) -> Path:
    """A LoKr network file of rank 4 and factor 4 on the assets' DiT (its w2s low-rank where factor -1 makes them whole)."""
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.networks import lokr

    net = lokr.create_arch_network(1.0, 4, 4, None, None, load_dit(a.dit, dtype=torch.float32), factor="4")
    net.save_weights(str(tmp / "lokr4.safetensors"), None, {})
    return tmp / "lokr4.safetensors"


def saved_with_alpha(path: Path, alpha: float) -> None:
    """Every module of the saved LoRA has `alpha`, and its metadata records the same: the strength it trained at."""
    from safetensors.torch import load_file

    alphas = {float(v) for k, v in load_file(str(path)).items() if k.endswith(".alpha")}
    assert alphas == {alpha}, alphas
    assert_metadata(path, ss_network_alpha=str(alpha))


def output_name_with_a_folder(a, tmp):
    """A first run into --output_name sub/tiny, pruned to its last step file; the rerun resumes it (--resume auto)."""
    out = tmp / "out"
    first = train_argv(a, out, "--save_state", "--save_every_n_steps", "1", "--save_last_n_steps", "1", "--save_last_n_steps_state", "1",
                       "--max_train_steps", "3")
    first[first.index("--output_name") + 1] = "sub/tiny"
    result = run_command("hv_train_network", first, tmp)
    assert result.code == 0, result.err[-3000:]
    steps = sorted(p.name for p in (out / "sub").glob("tiny-step*[0-9].safetensors"))
    assert steps == ["tiny-step00000002.safetensors", "tiny-step00000003.safetensors"], steps  # step 1 pruned, as with a plain name
    return [*first, "--resume", "auto", "--max_train_steps", "4"]


def resumed_into_the_folder(a, tmp, err, out):
    assert "resumed from" in err and "sub/tiny-state at step 3" in err, err[-3000:]
    assert (tmp / "out" / "sub" / "tiny.safetensors").is_file()


def _half_written_state(out: Path) -> Path:
    """What a run killed while it saved its step-3 state leaves in `out` (training.state writes a state under
    `.incomplete` and renames it when whole): the folder, its LoRA cut short. Returns `out`."""
    folder = out / "tiny-step00000003-state.incomplete"
    folder.mkdir()
    (folder / "network.safetensors").write_bytes((out / "tiny.safetensors").read_bytes()[:100])
    return out


def _epoch_and_step_samples(a, tmp) -> list[str]:
    """Samples every 4 steps and every epoch: the 4 batches of an epoch end it on a sampling step."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("a cat --w 32 --h 32 --d 1 --s 2\n")
    return ["--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--sample_every_n_epochs", "1", "--vae", str(a.vae),
            "--text_encoder1", str(a.te1), "--text_encoder2", str(a.te2)]


def _same_samples(folder: Path, first: str, second: str) -> None:
    """The samples of two prompts (named by their tags) have the same frames."""
    import av
    import numpy as np
    from PIL import Image

    def frames(tag):
        (path,) = [p for p in folder.iterdir() if tag in p.name and p.suffix in (".mp4", ".png")]
        if path.suffix == ".png":
            return np.asarray(Image.open(path))
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.array_equal(frames(first), frames(second))


def before_the_model_loads(a, tmp, err, out):
    assert "modules on the DiT" not in err, "the LoRA was built: the model had loaded before the error"


def state_file(a, tmp, name="train_state.json"):
    return tmp / "out" / "tiny-state" / name


def with_run(**changes):
    """An earlier run's state whose recorded run identity says `changes` (as another kind of run would have saved it)."""
    def make(a, tmp):
        out = trained_before(a, tmp)
        marker = state_file(a, tmp)
        data = json.loads(marker.read_text())
        data["run"].update(changes)
        marker.write_text(json.dumps(data))
        return out
    return make


def with_run_progress(**changes):
    """An earlier run's state whose saved progress says `changes`; the rerun resumes from it."""
    def make(a, tmp):
        out = trained_before(a, tmp)
        marker = state_file(a, tmp)
        marker.write_text(json.dumps({**json.loads(marker.read_text()), **changes}))
        return train_argv(a, out, "--resume", str(out / "tiny-state"), "--max_train_steps", "3")
    return make


def no_escape(tmp: Path) -> None:
    assert not (tmp / "escaped").exists()


def text_cache_with_nan(a, tmp) -> Path:
    """The cached dataset's copy, a NaN in one text cache's LLM states (a damaged file: caching writes none). The loss of
    its batch was NaN, and the error named the item's latent cache."""
    toml = copy_cached(a, tmp)
    path = sorted(toml.parent.rglob("*_hv_te.safetensors"))[0]
    f = files.StateDictFile(path)
    tensors = f.load_all()
    tensors["llm_float16"].view(-1)[0] = float("nan")
    files.save_safetensors(tensors, path, metadata=f.metadata)
    return toml


def text_cache_far_from_any_encoder(a, tmp) -> Path:
    """The cached dataset's copy, one text cache's CLIP output all 65504, float16's largest (finite: fuzz_bb 4 trained on it,
    a loss 1e7 times the others, without a word)."""
    toml = copy_cached(a, tmp)
    path = sorted(toml.parent.rglob("*_hv_te.safetensors"))[0]
    f = files.StateDictFile(path)
    tensors = f.load_all()
    key = next(k for k in tensors if k.startswith("clipL_") and "mask" not in k)
    tensors[key] = torch.full_like(tensors[key], 65504)
    files.save_safetensors(tensors, path, metadata=f.metadata)
    return toml


def latent_cache_far_from_any_vae(a, tmp) -> Path:
    """The cached dataset's copy, one latent cache's values all 60,000 (finite: fuzz_ab 8 trained on it, a loss 5e8
    times the others, without a word)."""
    toml = copy_cached(a, tmp)
    path = sorted(toml.parent.rglob("*_hv.safetensors"))[0]
    f = files.StateDictFile(path)
    tensors = f.load_all()
    key = next(k for k in tensors if k.startswith("latents_"))
    tensors[key] = torch.full_like(tensors[key], 60000)
    files.save_safetensors(tensors, path, metadata=f.metadata)
    return toml


def without_its_state(out: Path) -> Path:
    """An earlier run's LoRA files in `out`, its state removed (a run saved without --save_state)."""
    shutil.rmtree(out / "tiny-state")
    return out


def with_damaged_state(part: str):
    """An earlier run's state whose LoRA (`network`) or AdamW moments (`optimizer`) have another shape than this run's,
    or whose LoRA is integer (`integer`); the rerun resumes from it."""
    def make(a, tmp):
        from safetensors.torch import load_file, save_file

        out = trained_before(a, tmp)
        state = out / "tiny-state"
        if part in ("optimizer", "optimizer-nan", "lr-nan", "schedule-inf"):
            saved = torch.load(state / "optimizer.pt", weights_only=True)
            for moments in saved["optimizer"]["state"].values():
                if part == "optimizer":
                    moments["exp_avg"] = torch.zeros(3, 3)
                elif part == "optimizer-nan":
                    moments["exp_avg_sq"].view(-1)[0] = float("nan")
            if part == "lr-nan":
                saved["optimizer"]["param_groups"][0]["lr"] = float("nan")
            if part == "schedule-inf":
                saved["scheduler"]["base_lrs"] = [float("inf")]
            torch.save(saved, state / "optimizer.pt")
        else:
            weights = load_file(str(state / "network.safetensors"))
            key = sorted(k for k in weights if k.endswith("lora_down.weight"))[0]
            if part == "network":
                weights[key] = torch.zeros(8, weights[key].shape[1])
            else:
                weights = {k: v.to(torch.int32) for k, v in weights.items()}
            save_file(weights, str(state / "network.safetensors"))
        return train_argv(a, out, "--resume", str(state), "--max_train_steps", "3")
    return make


def other_model_latents(a, tmp):
    toml = copy_cached(a, tmp)
    victim = sorted((tmp / "cached" / "cache").glob("*_hv.safetensors"))[1]
    size = (32, 32)
    cache_files.save_latent_cache(victim, torch.zeros(32, 2, 4, 4, dtype=torch.float16), size=size, frame_count=5)
    return toml


def other_width_text(a, tmp):
    toml = copy_cached(a, tmp)
    victim = sorted((tmp / "cached" / "cache").glob("*_hv_te.safetensors"))[2]
    victim.unlink()
    mask = torch.ones(256, dtype=torch.int64)
    tensors = {**cache_files.text_encoder_tensors("llm", torch.zeros(256, 4096, dtype=torch.float16), mask),
               **cache_files.text_encoder_tensors("clipL", torch.zeros(32, dtype=torch.float16), torch.ones(77, dtype=torch.int64))}
    cache_files.save_text_cache(victim, "a caption", tensors)
    return toml


def repeated(a, tmp, repeats: int):
    toml = tmp / "cached" / "dataset.toml"
    if not toml.exists():
        toml = copy_cached(a, tmp)
    text = toml.read_text()
    text = re.sub(r"num_repeats = \d+\n", "", text)
    toml.write_text(text.replace("target_frames", f"num_repeats = {repeats}\ntarget_frames"))
    return toml


def fewer_repeats(a, tmp):
    out = trained_before(a, tmp, "--dataset_config", str(repeated(a, tmp, 2)))
    repeated(a, tmp, 1)
    return train_argv(a, out, "--resume", "auto", "--save_state", "--max_train_steps", "3", toml=tmp / "cached" / "dataset.toml")


WARMUP = ("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1")


def more_repeats(a, tmp):
    out = trained_before(a, tmp, "--dataset_config", str(repeated(a, tmp, 1)))
    repeated(a, tmp, 4)
    return train_argv(a, out, "--resume", "auto", "--save_state", "--max_train_steps", "6", toml=tmp / "cached" / "dataset.toml")


def swapped_state_file(a, tmp):
    """Step 1's state folder holding step 2's LoRA, as a copy between two state folders makes it."""
    import shutil

    out = trained_before(a, tmp, "--save_every_n_steps", "1")
    shutil.copy(out / "tiny-step00000002-state" / "network.safetensors", out / "tiny-step00000001-state" / "network.safetensors")
    return train_argv(a, out, "--resume", str(out / "tiny-step00000001-state"), "--max_train_steps", "3")


def trained_to_step_6(a, tmp, err, out):
    """fuzz_z 1: the epochs were counted from step 0, so the resumed run (moved to the next epoch) had none left: it
    trained nothing and saved a "final" LoRA at the resumed step, exit 0."""
    assert files.read_safetensors_header(tmp / "out" / "tiny.safetensors")[1]["ss_steps"] == "6", err[-3000:]


STEP_LR = ("--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10")  # a class name, as the trainer takes it


def trained_to_step_3(a, tmp, err, out):
    assert "resumed from" in err and files.read_safetensors_header(tmp / "out" / "tiny.safetensors")[1]["ss_steps"] == "3", err[-3000:]


def damaged_newest(a, tmp):
    out = trained_before(a, tmp, "--save_every_n_steps", "1")
    for state in ("tiny-state", "tiny-step00000002-state"):
        truncated(out / state / "network.safetensors", out / state / "network.safetensors")
    return train_argv(a, out, "--resume", "auto", "--save_state", "--max_train_steps", "3")


def nan_newest(a, tmp):
    """The two newest states' LoRAs with a NaN, as a state saved by a run without finiteness checks could be."""
    from musubi_tuner import files

    out = trained_before(a, tmp, "--save_every_n_steps", "1")
    for state in ("tiny-state", "tiny-step00000002-state"):
        weights = files.StateDictFile(out / state / "network.safetensors").load_all()
        key = sorted(k for k in weights if k.endswith("lora_up.weight"))[0]
        weights[key] = weights[key].clone()
        weights[key].view(-1)[0] = float("nan")
        files.save_safetensors(weights, out / state / "network.safetensors")
    return out


def damaged_caches(a, tmp, everywhere=False):
    """The cache-only dataset with an odd-sized latent cache and a text cache whose llm_mask is shorter than its llm
    (fuzz D5, D14); with `everywhere`, every latent cache integer (D7)."""
    from safetensors.torch import load_file, save_file

    toml = copy_cached(a, tmp)
    cache = tmp / "cached" / "cache"
    latents, texts = sorted(cache.glob("*_hv.safetensors")), sorted(cache.glob("*_hv_te.safetensors"))
    meta = {"architecture": "hunyuan_video"}
    if everywhere:
        for path in latents:
            save_file({"latents_2x4x4_int32": torch.ones(16, 2, 4, 4, dtype=torch.int32)}, str(path), metadata=meta)
        return toml
    save_file({"latents_2x3x3_float16": torch.ones(16, 2, 3, 3).half()}, str(latents[0]), metadata=meta)
    tensors = load_file(str(texts[1]))
    tensors["llm_mask"] = tensors["llm_mask"][:100].clone()
    save_file(tensors, str(texts[1]), metadata=meta)
    return toml


def stale_dataset(a, tmp):
    """A copy of the cached synthetic dataset (sources included) whose caption changed and one latent cache is missing,
    as a killed cache_latents.py leaves it (fuzz_a D8)."""
    toml, folder = copy_dataset(a, tmp)
    (folder / "images" / "image_0000.txt").write_text("a caption written after caching")
    next((folder / "cache" / "images").glob("image_0001_*_hv.safetensors")).unlink()
    return toml


def lora_of_two_ranks(a, tmp):
    """The tiny DiT's rank-4 LoRA (alpha 4) with one module cut to rank 2 (alpha 1): a file whose modules differ."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(a.lora))
    name = next(k for k in weights if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    weights[f"{name}.lora_down.weight"] = weights[f"{name}.lora_down.weight"][:2].contiguous()
    weights[f"{name}.lora_up.weight"] = weights[f"{name}.lora_up.weight"][:, :2].contiguous()
    weights[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(weights, str(tmp / "two_ranks.safetensors"))
    return tmp / "two_ranks.safetensors"


def lora_with_a_rank_0_module(a, tmp):
    """The tiny DiT's LoRA with one module emptied to rank 0 (a damaged file that --allow_partial_lora drops from)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(a.lora))
    name = next(k for k in weights if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    weights[f"{name}.lora_down.weight"] = weights[f"{name}.lora_down.weight"][:0].contiguous()
    weights[f"{name}.lora_up.weight"] = weights[f"{name}.lora_up.weight"][:, :0].contiguous()
    save_file(weights, str(tmp / "rank0.safetensors"))
    return tmp / "rank0.safetensors"


def metadata_says(**expected):
    def check(a, tmp, err, out):
        from musubi_tuner.files import read_safetensors_header

        metadata = read_safetensors_header(tmp / "out" / "tiny.safetensors")[1]
        assert {k: metadata.get(k) for k in expected} == expected, (metadata, err[-2000:])
    return check


def _no_data_keys(path):
    """A --no_metadata LoRA says nothing of the data it was trained on (musubi-tuner's minimal metadata)."""
    from musubi_tuner.files import read_safetensors_header

    metadata = read_safetensors_header(path)[1]
    assert metadata.get("musubi_tuner.resolutions", "[]") == "[]" and metadata.get("musubi_tuner.frames", "[]") == "[]", metadata
    assert "ss_datasets" not in metadata and "ss_network_module" in metadata, metadata


def resumed_from_step_1(a, tmp, err, out):
    assert "resumed from" in err and "tiny-step00000001-state at step 1" in err, err[-3000:]


CASES = [
    # --- flags checked against their domain before anything loads
    Case("train-network-dim-zero", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--network_dim", "0"),
         r"--network_dim 0: must be between 1 and 1048576"),
    Case("train-network-dim-past-any-layer", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--network_dim", str(2**63)),
         r"--network_dim 9223372036854775808: must be between 1 and 1048576 \(HunyuanVideo's layers are 3,072 wide",
         then=before_the_model_loads),
    Case("train-ddp-timeout-past-a-year", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--ddp_timeout", str(2**63)),
         r"--ddp_timeout 9223372036854775808: must be between 1 and 525600 minutes \(a year\)", then=before_the_model_loads),
    Case("train-gradient-accumulation-zero", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--gradient_accumulation_steps", "0"), r"--gradient_accumulation_steps 0: must be at least 1"),
    Case("train-accumulation-ends-each-epoch-with-a-step", "hv_train_network",  # 4 batches: a step at batch 3, one at 4
         lambda a, t: train_argv(a, t / "out", "--gradient_accumulation_steps", "3", "--max_train_epochs", "2"), None,
         then=lambda a, t, err, out: assert_metadata(t / "out" / "tiny.safetensors", ss_steps="4")),
    Case("train-accumulation-longer-than-an-epoch", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--gradient_accumulation_steps", "7", "--max_train_epochs", "1"), None,
         warning=r"--gradient_accumulation_steps 7 is more than the 4 batches of an epoch: each epoch is one optimizer step",
         then=lambda a, t, err, out: (assert_metadata(t / "out" / "tiny.safetensors", ss_steps="1"), trained(t / "out" / "tiny.safetensors"))),
    Case("train-data-loader-workers-within-a-low-open-file-limit", "hv_train_network",  # two workers fail at ulimit -n 32
         lambda a, t: train_argv(a, t / "out", "--max_data_loader_n_workers", "2"), None, open_files=32,
         warning=r"the limit on open files \(ulimit -n\) is 32: 2 data-loader workers need about \d+; using [01] \(raise the limit",
         then=lambda a, t, err, out: trained(t / "out" / "tiny.safetensors")),
    Case("train-max-train-epochs-over-max-train-steps-is-said", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--max_train_epochs", "1"), None,
         warning=r"--max_train_epochs 1 sets the run's length; --max_train_steps 2 is ignored",
         then=lambda a, t, err, out: assert_metadata(t / "out" / "tiny.safetensors", ss_steps="4")),
    Case("train-max-train-epochs-over-the-default-max-train-steps-given-is-said", "hv_train_network",  # 1600 given, not defaulted
         lambda a, t: train_argv(a, t / "out", "--max_train_steps", "1600", "--max_train_epochs", "1"), None,
         warning=r"--max_train_epochs 1 sets the run's length; --max_train_steps 1600 is ignored"),
    *[Case(f"train-{kept.replace('_', '-')}-without-its-saves", "hv_train_network", lambda a, t, kept=kept: train_argv(a, t / "out", f"--{kept}", "2"),
           None, warning=rf"--{kept} acts on the saves of --save_every_n_{unit}, and none is set: it is ignored")
      for kept, unit in (("save_last_n_epochs", "epochs"), ("save_last_n_steps_state", "steps"))],
    Case("train-gradients-are-clipped", "hv_train_network",  # one SGD step of rate 1 from lora_up = 0 moves it by the clipped gradient
         lambda a, t: train_argv(a, t / "out", "--max_train_steps", "1", "--optimizer_type", "SGD", "--learning_rate", "1",
                                 "--max_grad_norm", "0.001"), None,
         then=lambda a, t, err, out: up_norm_at_most(t / "out" / "tiny.safetensors", 0.001)),
    Case("train-log-tracker-config-missing", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--log_with", "tensorboard", "--logging_dir", str(t / "logs"), "--log_tracker_config",
                                 str(t / "missing.toml")),
         r"missing\.toml: tracker config not found \(--log_tracker_config\)", then=before_the_model_loads),
    Case("train-output-name-too-long-for-the-names-it-makes", "hv_train_network",
         lambda a, t: [*train_argv(a, t / "out")[:-2], "--output_name", "n" * 216],
         r"--output_name: 216 bytes, and the names of the files it names reach 279 \(such as \.n+\.\.\.\), over the 255 "
         r"bytes a name may have in \S+; use a name of at most 192 bytes", then=before_the_model_loads),
    Case("train-output-name-too-long-for-a-sample-seed", "hv_train_network",  # fits a 10-digit seed, not the prompt's 19
         lambda a, t: [*train_argv(a, t / "out")[:-2], "--output_name", "n" * 192, "--sample_every_n_steps", "1", "--sample_prompts",
                       str(write(t / "prompts.txt", "a cat --w 32 --h 32 --d 1234567890123456789\n")), "--vae", str(a.vae),
                       "--text_encoder1", str(a.te1), "--text_encoder2", str(a.te2)],
         r"--output_name: 192 bytes, and the names of the files it names reach 264 \(such as \.n+\.\.\.\), over the 255 "
         r"bytes a name may have in \S+; use a name of at most 183 bytes", then=before_the_model_loads),
    Case("train-a-sample-that-cannot-be-written-costs-the-sample-not-the-run", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--sample_every_n_steps", "1", "--sample_prompts",
                                 str(write(t / "prompts.txt", "a cat --w 32 --h 32 --f 5\n")), "--vae", str(a.vae),
                                 "--text_encoder1", str(a.te1), "--text_encoder2", str(a.te2)), None,
         small_disk=("out/sample", 4096), warning=r"(sample 0|the samples' grid) at step 1 not written: .*No space left on device",
         then=lambda a, t, err, out: trained(t / "out" / "tiny.safetensors")),
    Case("train-a-loss-curve-that-cannot-be-written-costs-the-curve-not-the-run", "hv_train_network",  # a folder at its name
         lambda a, t: (Path(t / "out" / "tiny-loss.png").mkdir(parents=True),
                       train_argv(a, t / "out", "--save_every_n_steps", "1", "--save_state"))[1], None,
         warning=r"the loss curve not written: \S+tiny-loss\.png: cannot write: a folder has this name",
         then=lambda a, t, err, out: (trained(t / "out" / "tiny.safetensors"), state_file(a, t).is_file() or pytest.fail("no state"))),
    Case("train-a-folder-at-the-final-lora-name-is-refused-before-the-run", "hv_train_network",  # it was found at the end
         lambda a, t: (Path(t / "out" / "tiny.safetensors").mkdir(parents=True), train_argv(a, t / "out"))[1],
         r"\S+/out/tiny\.safetensors: a folder has this name, where the run saves its LoRA at the end; move it away or choose "
         r"another --output_name", then=before_the_model_loads),
    Case("train-a-folder-at-the-final-comfyui-copy-name-is-refused-before-the-run", "hv_train_network",
         lambda a, t: (Path(t / "out" / "tiny.comfyui.safetensors").mkdir(parents=True), train_argv(a, t / "out"))[1],
         r"\S+/out/tiny\.comfyui\.safetensors: a folder has this name, where the run saves its LoRA at the end", then=before_the_model_loads),
    Case("train-a-folder-at-a-step-lora-name-is-refused-before-the-run", "hv_train_network",  # (found at that save, the
         lambda a, t: (Path(t / "out" / "tiny-step00000002.safetensors").mkdir(parents=True),  # steps since the last were
                       train_argv(a, t / "out", "--save_every_n_steps", "1"))[1],  # lost: fuzz_aq 2)
         r"\S+/out/tiny-step00000002\.safetensors: a folder has this name, where the run saves one of its LoRAs; move it away",
         then=before_the_model_loads),
    Case("train-a-file-at-a-step-state-name-is-refused-before-the-run", "hv_train_network",
         lambda a, t: (write(t / "out" / "tiny-step00000001-state", "my notes"),
                       train_argv(a, t / "out", "--save_every_n_steps", "1", "--save_state"))[1],
         r"\S+/out/tiny-step00000001-state: a file has this name, where the run saves one of its states \(a folder\); move it away",
         keep=lambda a, t: [t / "out" / "tiny-step00000001-state"], then=before_the_model_loads),
    Case("train-log-prefix-out-of-the-logging-dir", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--logging_dir", str(t / "logs"), "--log_prefix", "../escaped/"),
         r"--log_prefix \.\./escaped/: leads out of --logging_dir; give the folder as --logging_dir",
         then=lambda a, t, err, out: no_escape(t)),
    Case("train-log-prefix-too-long-for-the-log-folder", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--logging_dir", str(t / "logs"), "--log_prefix", "p" * 250),
         r"--log_prefix: 250 bytes, and the names of the files it names reach 264 .* use a name of at most 241 bytes",
         then=before_the_model_loads),
    Case("train-dataset-config-is-a-folder", "hv_train_network", lambda a, t: train_argv(a, t / "out", toml=t),
         r": expected a dataset config, found a folder \(--dataset_config\)"),
    Case("train-max-train-epochs-zero", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--max_train_epochs", "0"),
         r"--max_train_epochs 0: must be at least 1"),
    Case("train-seed-beyond-32-bits", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--seed", str(2**64)),
         r"--seed 18446744073709551616: must be between 0 and 4294967295"),
    Case("train-learning-rate-far-too-high-is-named-as-the-cause", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--learning_rate", "1e10", "--max_train_steps", "4"),
         r"at step \d \(epoch 1, items .*\); stopped without saving\. Last good checkpoint: none yet\. The LoRA diverged in the "
         r"\d update\(s\) before \(\S+: its update reaches \S+ per weight, where a trained LoRA's stays well below 1 \(a diverged "
         r"training\)\): --learning_rate 1e\+10 is far too high; else lower"),
    Case("train-learning-rate-a-schedule-raised-far-too-high-is-named-as-the-cause", "hv_train_network",  # (the flag was
         lambda a, t: train_argv(a, t / "out", "--lr_scheduler_type", "ExponentialLR", "--lr_scheduler_args", "gamma=1e10",  # blamed
                                 "--max_train_steps", "4"),  # at its base value, and a float32 run told to use bf16: fuzz_bb 3, 7)
         r"The LoRA diverged in the \d update\(s\) before \(.*\): the learning rate --lr_scheduler_type ExponentialLR "
         r"--lr_scheduler_args gamma=1e10 reached, 1e\+\d\d \(--learning_rate 0\.001\) is far too high; else lower "
         r"--learning_rate, check the caches of those items\.$"),
    Case("train-network-dim-above-every-layer-s-width-is-said", "hv_train_network",  # (a 2.4 GB LoRA of a 1.3 MB model,
         lambda a, t: train_argv(a, t / "out", "--network_dim", "512", "--max_train_steps", "1"), None,  # unsaid: fuzz_bb 5)
         warning=r"--network_dim 512 is above the width of every layer the LoRA trains \(64 at the narrowest\): a higher rank "
                 r"adds nothing but memory and a larger file \(its weights alone: \S+ GB in float32\)"),
    Case("train-saved-in-fp16-that-zeroes-the-lora-s-small-weights-is-said-once", "hv_train_network",  # (99% of the up
         lambda a, t: train_argv(a, t / "out", "--learning_rate", "1e-8", "--save_precision", "fp16",  # weights written as
                                 "--save_every_n_steps", "1", "--max_train_steps", "3"), None,  # 0, unsaid: fuzz_bb 6)
         warning=r"tiny-step00000001\.safetensors: --save_precision fp16 changes \S+lora_up\.weight by \d+% \(values below "
                 r"fp16's smallest, 6e-08, are saved as 0, as a small learning rate's are\); save in bf16 or float to keep them",
         then=lambda a, t, err, out: err.count("--save_precision fp16 changes") == 1 or pytest.fail(err[-3000:])),
    Case("train-far-network-alpha-is-named-as-the-likely-cause", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_alpha", "1e30"),
         r"at step 1 \(epoch 1, items .*\); stopped without saving\. Last good checkpoint: none yet\. --network_alpha 1e\+30, far "
         r"from the usual, may be the cause; else lower --learning_rate"),
    Case("train-far-flow-shift-that-does-not-overflow-is-said-before-the-work", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--timestep_sampling", "shift", "--discrete_flow_shift", "1e6", "--max_train_steps", "1"),
         None, warning=r"--discrete_flow_shift 1e\+06, far from the usual, may be the cause of a NaN loss or of a LoRA that learns "
                       r"nothing"),
    Case("train-far-flow-shift-its-sampling-does-not-read-is-said-to-be-ignored-only", "hv_train_network",  # (and the cause
         lambda a, t: train_argv(a, t / "out", "--timestep_sampling", "flux_shift", "--discrete_flow_shift", "1e30",  # of a NaN
                                 "--max_train_steps", "1"), None,  # loss, in the same breath: fuzz_bb 9)
         warning=r"--discrete_flow_shift 1e\+30 is read only by --timestep_sampling shift, and sigma with --sigma_uses_shift; "
                 r"ignored with --timestep_sampling flux_shift",
         then=lambda a, t, err, out: "far from the usual" not in err or pytest.fail(err[-3000:])),
    *(Case(f"train-{flag[2:]}-so-small-the-lora-learns-nothing-is-said-at-the-start-and-at-the-end", "hv_train_network",
           lambda a, t, flag=flag: train_argv(a, t / "out", flag, "1e-30"), None,
           then=lambda a, t, err, out, flag=flag: all_said(
               err, rf"{flag} 1e-30, far from the usual, may be the cause of a NaN loss or of a LoRA that learns nothing",
               r"tiny\.safetensors changes no weight of the DiT by more than \S+ after 2 steps: this LoRA has learnt nothing"))
      for flag in ("--max_grad_norm", "--scale_weight_norms")),  # (fuzz_ab 16: saved as an ordinary success)
    Case("train-batch-that-cannot-pass-through-shared-memory-stops-the-run", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--max_data_loader_n_workers", "2"),
         r"a data-loader worker \(pid [\d, ]+\) ended \(its reason is the line above, when it could give one\); "
         r"--max_data_loader_n_workers 0 loads the batches in the training process",
         warning=r"a data-loader worker could not hand a batch over to the training process through shared memory \(.*File "
                 r"too large.*\); free space in /dev/shm",  # (a full /dev/shm fails alike: the run waited forever for the batch)
         file_size_limit=lambda a, t: 1024),
    Case("train-under-a-file-size-limit-of-0-says-so-at-once", "hv_train_network", lambda a, t: train_argv(a, t / "out"),
         r"this process may write no file: its file-size limit is 0 \(ulimit -f\); raise it",  # (fuzz_aq 10: torch's import
         file_size_limit=lambda a, t: 0, then=before_the_model_loads),                       # blamed the temporary folders)
    Case("train-learning-rate-not-a-number", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--learning_rate", "nan"),
         r"--learning_rate nan: not a finite number"),
    Case("train-network-args-not-a-list", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", "exclude_patterns=[("),
         r"--network_args exclude_patterns=\[\(: not a list of regular expressions"),
    Case("train-network-args-misspelt-key", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", "rank_dropuot=0.1"),
         r"--network_args rank_dropuot: not an option of the network modules \(did you mean rank_dropout\?"),
    # (what musubi-tuner's modules read to no effect here is taken and said: a command line holding one was refused: F7)
    Case("train-network-args-of-another-module-is-ignored-as-in-musubi-tuner", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", "factor=4", "conv_dim=4", "conv_alpha=1", "--max_train_steps", "1"),
         None, then=lambda a, t, err, out: (all_said(
             err, r"--network_args factor=4: ignored \(only --network_module networks\.lokr reads it\), as musubi-tuner ignores it",
             r"--network_args conv_dim=4: ignored \(HunyuanVideo's LoRA targets are Linear layers, with no convolution to train\)"),
                                            err.count("conv_dim=4: ignored") == 1 or pytest.fail(err))),  # (once: it was said by every build, four times)
    Case("train-loraplus-ratio-zero-learns-nothing", "hv_train_network",  # (F9: dropped unsaid; musubi-tuner freezes the up
         lambda a, t: train_argv(a, t / "out", "--network_args", "loraplus_lr_ratio=0"),  # weights, which start at zero)
         r"--network_args loraplus_lr_ratio=0: the up weights would train at a rate of 0 and, starting at zero, the LoRA would "
         r"learn nothing; leave it out to train without LoRA\+"),
    Case("train-loraplus-ratio-far-is-named-not-the-learning-rate", "hv_train_network",  # (F9: "--learning_rate 0.001 is far
         lambda a, t: train_argv(a, t / "out", "--network_args", "loraplus_lr_ratio=1e30", "--max_train_steps", "4"),  # too high")
         r"--network_args loraplus_lr_ratio 1e\+30, far from the usual, may be the cause"),
    Case("train-network-alpha-zero-is-alpha-rank-not-far", "hv_train_network",  # (F6: 0 means alpha = rank, scale 1)
         lambda a, t: train_argv(a, t / "out", "--network_alpha", "0", "--max_train_steps", "1"), None,
         then=lambda a, t, err, out: "far from the usual" not in err or pytest.fail(err)),
    Case("train-resume-with-network-args-spelled-otherwise", "hv_train_network",  # (F8: refused "args [..0.1] -> [..0.10]")
         lambda a, t: train_argv(a, trained_before(a, t, "--network_args", "rank_dropout=0.1"), "--resume", "auto",
                                 "--network_args", "rank_dropout=0.10", "verbose=True", "--max_train_steps", "3"), None,
         then=lambda a, t, err, out: all_said(err, r"resumed from \S+tiny-state at step 2")),
    Case("train-dim-from-weights-of-several-ranks-records-the-files", "hv_train_network",  # (F4: "ss_network_dim 4" from the
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(lora_of_two_ranks(a, t)), "--dim_from_weights",  # flag
                                 "--network_dim", "16", "--network_args", "exclude_patterns=['single']", "--max_train_steps", "1"),
         None, then=metadata_says(ss_network_dim="4", ss_network_alpha="4.0", ss_network_args=None)),  # (nor the patterns)
    Case("train-no-metadata-leaves-out-the-training-data", "hv_train_network",  # (F10: resolutions and frames were written)
         lambda a, t: train_argv(a, t / "out", "--no_metadata", "--max_train_steps", "1"), None,
         then=lambda a, t, err, out: [_no_data_keys(p) for p in (t / "out").glob("tiny*.safetensors")]),
    Case("train-network-module-missing", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_module", "networks.lycoris"),
         r"--network_module networks\.lycoris: no such module \(this project has networks\.lora, networks\.loha and networks\.lokr\)"),
    Case("train-network-module-of-three-parts-missing", "hv_train_network",  # (fuzz_ad F1: a traceback, "No module named
         lambda a, t: train_argv(a, t / "out", "--network_module", "my.lora.module"),  # 'musubi_tuner.my'")
         r"--network_module my\.lora\.module: no such module"),
    Case("train-network-module-by-its-full-name", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_module", "musubi_tuner.networks.lora", "--max_train_steps", "1"), None,
         then=lambda a, t, err, out: (t / "out" / "tiny.safetensors").is_file() or pytest.fail(err)),
    *[Case(f"train-network-module-{name}-makes-no-network", "hv_train_network",
           lambda a, t, name=name: train_argv(a, t / "out", "--network_module", name),
           rf"--network_module {name}: not a network module \(it has no create_network\); this project has networks\.lora",
           then=before_the_model_loads) for name in ("networks", "networks.lora_reader", "json")],
    Case("train-lokr-factor-not-a-number", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_module", "networks.lokr", "--network_args", "factor=abc"),
         r"--network_args factor=abc: not a whole number"),
    Case("train-list-flag-given-twice", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", "verbose=true", "--network_args", "rank_dropout=0.1"),
         r"--network_args given twice; list all its values after one --network_args"),
    Case("train-pattern-that-matches-no-module-is-said", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", 'exclude_patterns=["single_blocks"]'), None,
         warning=r"--network_args exclude_patterns: 'single_blocks' matches no module \(a pattern matches a module's whole name, "
                 r"such as double_blocks\.0\.\S+\); '\.\*single_blocks\.\*' would match \d+"),
    Case("train-patterns-that-leave-no-module", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", 'exclude_patterns=[".*"]'),
         r"--network_args: the include/exclude patterns leave no Linear layer of the DiT for the LoRA", then=before_the_model_loads),
    Case("train-loraplus-ratio-infinite", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", "loraplus_lr_ratio=inf"),
         r"--network_args loraplus_lr_ratio=inf: not a finite number"),
    Case("train-network-args-verbose-not-true-or-false", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_args", "verbose=yes"), r"--network_args verbose=yes: true or false"),
    Case("train-base-weights-multiplier-without-files", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--base_weights_multiplier", "0.5"), None,
         warning=r"--base_weights_multiplier acts on the files of --base_weights, and none is given: it is ignored"),
    Case("train-base-weights-multiplier-count", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--base_weights", str(a.lora), "--base_weights_multiplier", "1", "2"), None,
         warning=r"--base_weights_multiplier gives 2 values for 1 file\(s\): the last 1 unused"),  # (as musubi-tuner reads it)
    Case("train-network-alpha-zero-means-rank", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--network_alpha", "0"), None),
    Case("train-config-file-misspelt-option", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--config_file", str(write(t / "run.toml", "learning_rat = 1e-4\n"))),
         r"run\.toml: unknown option 'learning_rat' \(did you mean learning_rate\?\)"),
    Case("train-config-file-wrong-type", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--config_file", str(write(t / "run.toml", 'gradient_checkpointing = "false"\n'))),
         r'run\.toml: gradient_checkpointing = "false" must be true or false \(without quotes\)'),
    Case("train-config-file-value-out-of-range", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--config_file", str(write(t / "run.toml", "max_train_steps = 0\n"))),
         r"run\.toml: max_train_steps = 0: must be at least 1"),
    # the optimizer is built on a stand-in parameter before the model loads: values it rejects end the run there
    Case("train-optimizer-args-value-rejected", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--optimizer_args", "weight_decay=-1"),
         r"--optimizer_args weight_decay=-1 for AdamW: Invalid weight_decay value: -1", then=before_the_model_loads),
    # (fuzz_ab 2: a RuntimeError of the constructor was a traceback; an optimizer that cannot step met the first step)
    Case("train-optimizer-args-that-conflict", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--optimizer_args", "foreach=True", "fused=True"),
         r"--optimizer_args foreach=True fused=True for AdamW: `fused` and `foreach` cannot be `True` together",
         then=before_the_model_loads),
    *[Case(f"train-optimizer-{name}-that-cannot-step-a-lora", "hv_train_network",
           lambda a, t, name=name: train_argv(a, t / "out", "--optimizer_type", name),
           rf"--optimizer_type {name}: cannot step a LoRA's parameters as training steps them \({why}", then=before_the_model_loads)
      for name, why in (("LBFGS", r"TypeError: .*closure"), ("SparseAdam", r"RuntimeError: SparseAdam does not support dense"))],
    Case("train-optimizer-by-a-module-path-not-installed", "hv_train_network",  # (fuzz_ab 14)
         lambda a, t: train_argv(a, t / "out", "--optimizer_type", "notinstalledopt.Fast"),
         r"--optimizer_type notinstalledopt\.Fast: cannot import notinstalledopt \(notinstalledopt is not installed: pip install "
         r"notinstalledopt\)", then=before_the_model_loads),
    Case("train-optimizer-by-musubi-tuners-bitsandbytes-path", "hv_train_network",  # (fuzz_ab 1: refused)
         lambda a, t: train_argv(a, t / "out", "--optimizer_type", "bitsandbytes.optim.AdamW8bit", "--max_train_steps", "1"), None,
         then=lambda a, t, err, out: (t / "out" / "tiny.safetensors").is_file() or pytest.fail(err)),
    Case("train-guidance-scale-times-1000-past-float32", "hv_train_network",  # (fuzz_ab 10: a traceback at the first step)
         lambda a, t: train_argv(a, t / "out", "--guidance_scale", "3e38", "--guidance_scale_x1000"),
         r"--guidance_scale 3e\+38: with --guidance_scale_x1000 at most 3\.40282e\+35", then=before_the_model_loads),
    *[Case(f"train-show-timesteps-{how}-of-the-default-sampling", "hv_train_network",  # (fuzz_ab 4: an IndexError)
           lambda a, t, how=how: ["--show_timesteps", how] + (["--output_dir", str(t)] if how == "image" else []), None,
           then=lambda a, t, err, out, how=how: ("Traceback" not in err + out and (how == "image" or "timestep sampling sigma"
                                                  in out + err)) or pytest.fail(err)) for how in ("console", "image")],
    *[Case(f"train-{flag}-not-finite-{i}", "hv_train_network",  # (fuzz_ab 3: a LoRA that never learned was "saved")
           lambda a, t, flag=flag, value=value: train_argv(a, t / "out", f"--{flag}", value, *extra),
           rf"--{flag} {re.escape(value)}: not a finite number", then=before_the_model_loads)
      for i, (flag, value, extra) in enumerate((("optimizer_args", "eps=1e999", ()), ("optimizer_args", "betas=(0.9,nan)", ()),
                                                ("lr_scheduler_args", "num_cycles=nan", ("--lr_scheduler", "cosine"))))],
    Case("train-a-pattern-holding-inf-is-text-not-a-number", "hv_train_network",  # (read as "not a finite number")
         lambda a, t: train_argv(a, t / "out", "--network_args", "exclude_patterns=['.*inf.*']", "--max_train_steps", "1"), None,
         warning=r"exclude_patterns: '\.\*inf\.\*' matches no module"),
    Case("train-adafactor-schedule-rate-not-a-number", "hv_train_network",  # (fuzz_ab 13: a traceback)
         lambda a, t: train_argv(a, t / "out", "--optimizer_type", "adafactor", "--lr_scheduler", "adafactor:abc"),
         r"--lr_scheduler adafactor:abc: adafactor:RATE takes a finite initial learning rate, at least 0"),
    Case("train-validation-timesteps-past-the-schedule", "hv_train_network",  # (fuzz_ab 15: a silent stall before step 1)
         lambda a, t: train_argv(a, t / "out", "--validation_timesteps", "20000"),
         r"--validation_timesteps 20000: must be between 1 and 1000 \(the schedule has 1,000 noise levels"),
    Case("train-optimizer-args-wrong-type", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--optimizer_type", "SGD", "--optimizer_args", "momentum=fast"),
         r"--optimizer_args momentum=fast for SGD: ", then=before_the_model_loads),
    Case("train-scheduler-args-missing-key", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "gamma=0.5"),
         r"--lr_scheduler_args gamma=0\.5 for StepLR: .*missing 1 required positional argument: 'step_size'", then=before_the_model_loads),
    Case("train-scheduler-args-fail-at-the-first-step", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=abc"),
         r"--lr_scheduler_args step_size=abc: the schedule fails at its first step", then=before_the_model_loads),
    Case("train-adafactor-with-the-default-scheduler", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--optimizer_type", "adafactor"), None,
         warning=r"using the adafactor schedule instead of --lr_scheduler constant"),
    Case("train-adafactor-scheduler-with-another-optimizer", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--lr_scheduler", "adafactor"),
         r"--lr_scheduler adafactor: works only with --optimizer_type adafactor \(it reports the step size Adafactor computes\), "
         r"not adamw; choose another --lr_scheduler", then=before_the_model_loads),
    # --- model and weight files
    Case("train-dit-truncated", "hv_train_network", lambda a, t: train_argv(a, t / "out", dit=truncated(a.dit_st, t / "dit.safetensors")),
         r"dit\.safetensors: file is truncated"),
    Case("train-sample-prompt-seed-beyond-64-bits", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--sample_prompts", str(write(t / "prompts.txt", "a cat --d 99999999999999999999999\n")),
                                 "--sample_every_n_steps", "1", "--vae", str(a.vae), "--text_encoder1", str(a.te1),
                                 "--text_encoder2", str(a.te2)),
         r"prompts\.txt: line 1: --d 99999999999999999999999: must be between 0 and", then=before_the_model_loads),
    Case("train-sample-folder-is-a-file", "hv_train_network",
         lambda a, t: train_argv(a, write(t / "out" / "sample", "x").parent, "--sample_prompts", str(write(t / "prompts.txt", "a cat\n")),
                                 "--sample_every_n_steps", "1", "--vae", str(a.vae), "--text_encoder1", str(a.te1),
                                 "--text_encoder2", str(a.te2)),
         r"out/sample: is a file, not a folder; choose another --output_dir$", keep=lambda a, t: [t / "out" / "sample"]),
    Case("train-logging-dir-is-a-file", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--logging_dir", str(write(t / "logs", "x"))),
         r"logs: is a file, not a folder; choose another --logging_dir$", keep=lambda a, t: [t / "logs"]),
    Case("train-sample-prompt-beyond-any-machine", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--sample_prompts", str(write(t / "prompts.txt", "a cat --w 32 --h 99999 --f 100001\n")),
                                 "--sample_every_n_steps", "1", "--vae", str(a.vae), "--text_encoder1", str(a.te1),
                                 "--text_encoder2", str(a.te2)),
         r"prompts\.txt: line 1: --h 99999: must be between 1 and 8192"),
    # (its weights are checked as it loads, before the DiT: each sample was skipped with a warning, the run trained on)
    Case("train-samples-with-a-vae-holding-nan-are-refused-before-the-run", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--sample_prompts", str(write(t / "prompts.txt", "a cat --w 32 --h 32\n")),
                                 "--sample_every_n_steps", "1", "--vae", str(nan_vae(a, t, "decoder")), "--text_encoder1", str(a.te1),
                                 "--text_encoder2", str(a.te2)),
         r"nan_vae\.pt: decoder\.\S+ holds NaN or infinite values: the file is damaged, download it again",
         then=before_the_model_loads),
    Case("train-latent-cache-far-beyond-any-vae-latent-is-named", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--save_every_n_steps", "1", "--max_train_steps", "8",  # (found at the step
                                 toml=latent_cache_far_from_any_vae(a, t)),  # that reads it, it names the last save: fuzz_ar 6)
         r"_hv\.safetensors: latents_\S+ reaches 6e\+04, where a VAE's latents stay within a few units: a damaged cache; "
         r"delete it and run the caching command again\. Last good checkpoint: \S+/out/tiny-step0000000\d\.safetensors\.$"),
    Case("train-text-cache-far-beyond-any-encoder-output-is-named", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", toml=text_cache_far_from_any_encoder(a, t)),
         r"_hv_te\.safetensors: clipL_\S+ reaches 6\.55e\+04, where a text encoder's outputs stay below 3e\+04 \(in float16, in "
         r"which caching runs them, past it is an overflow\): a damaged cache; delete it and run cache_text_encoder_outputs\.py "
         r"again\. Last good checkpoint: "),
    Case("train-text-cache-holding-nan-is-named-not-its-item-s-latents", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", toml=text_cache_with_nan(a, t)),
         r"_hv_te\.safetensors: llm_float16 holds 1 NaN or infinite values of [\d,]+: a damaged cache; delete it and run the "
         r"caching command again\. Last good checkpoint: (none yet|\S+/out/tiny-step0000000\d\.safetensors)\.$"),
    Case("train-sample-whose-latent-is-not-finite-names-its-options-not-the-vae", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--sample_prompts", str(write(t / "prompts.txt", "a cat --w 32 --h 32 --l 3e38 --n dog\n")),
                                 "--sample_every_n_steps", "1", "--vae", str(a.vae), "--text_encoder1", str(a.te1),
                                 "--text_encoder2", str(a.te2)),
         None, then=lambda a, t, err, out: all_said(  # (fuzz_ab 11: said at the start, and the LoRA was blamed too)
             err, r"prompts\.txt: line 1: --l 3e\+38, far from the usual, may be the cause of a NaN or noisy sample",
             r"sample 0 at step 1: the sampled latent holds NaN/inf values: the prompt's options \(guidance 6, flow shift "
             r"14\.5, CFG 3e\+38\) are the likely cause, the LoRA is not: the DiT without it gives such a latent too; no video was "
             r"written")),
    Case("train-sample-whose-latent-is-far-beyond-any-vae-latent-writes-no-video", "hv_train_network",  # (a video of noise
         lambda a, t: train_argv(a, t / "out", "--sample_prompts", str(write(t / "prompts.txt", "a cat --w 32 --h 32 --l 1e10 --n dog\n")),
                                 "--sample_every_n_steps", "1", "--vae", str(a.vae), "--text_encoder1", str(a.te1),  # was written,
                                 "--text_encoder2", str(a.te2)), None,  # exit 0: fuzz_bb 1)
         warning=r"sample 0 at step 1: the sampled latent reaches \S+, where a VAE's latents stay within a few units: the prompt's "
                 r"options \(guidance 6, flow shift 14\.5, CFG 1e\+10\) are the likely cause, the LoRA is not",
         then=lambda a, t, err, out: not list((t / "out" / "sample").glob("*.mp4")) and not list((t / "out" / "sample").glob("*.png"))
         or pytest.fail(str(sorted((t / "out" / "sample").iterdir())))),
    Case("train-sample-with-a-cfg-scale-and-no-negative-prompt-samples-without-cfg-as-musubi-tuner", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--sample_prompts", str(write(t / "prompts.txt", "a cat --w 32 --h 32 --d 1\n"
                                                                                             "a cat --w 32 --h 32 --d 1 --l 4\n")),
                                 "--sample_at_first", "--max_train_steps", "1", "--vae", str(a.vae), "--text_encoder1", str(a.te1),
                                 "--text_encoder2", str(a.te2)),
         None, warning=r"prompts\.txt: line 2: --l 4 is ignored without a negative prompt \(--n\), as in musubi-tuner: sampled "
                       r"without real CFG",
         then=lambda a, t, err, out: _same_samples(t / "out" / "sample", "_000000_00_", "_000000_01_")),  # (fuzz_ai 7)
    Case("train-resumed-at-an-epoch-that-ended-on-a-sampling-step-does-not-sample-it-again", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t, *_epoch_and_step_samples(a, t), "--max_train_epochs", "1"),
                                 *_epoch_and_step_samples(a, t), "--max_train_epochs", "2", "--resume", "auto"), None,
         then=lambda a, t, err, out: sorted({p.name.split("_")[1] for p in (t / "out" / "sample").iterdir()}) == ["000004", "000008"]
         or pytest.fail(str(sorted(p.name for p in (t / "out" / "sample").iterdir())))),  # (fuzz_ai 5: an e000001 set too)
    Case("train-two-attention-flags-say-which-is-used", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--flash_attn", "--max_train_steps", "1"), None,
         warning=r"--sdpa --flash_attn: one attention is used, --sdpa \(the first of --sdpa, --flash_attn, --sage_attn, "
                 r"--xformers, --flash3\); --flash_attn ignored"),  # (fuzz_ai 6: dropped without a word)
    Case("train-dit-with-inf-is-named", "hv_train_network", lambda a, t: train_argv(a, t / "out", dit=nan_dit(a, t)),
         r"nan_dit\.safetensors: final_layer\S+ holds NaN or infinite values: the file is damaged, download it again",
         then=before_the_model_loads),
    Case("train-dit-is-the-vae", "hv_train_network", lambda a, t: train_argv(a, t / "out", dit=a.vae),
         r"vae\.pt: not a DiT: this is a VAE \(pass it with --vae\)"),
    Case("train-network-weights-of-another-model", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora_sdxl)),
         r"lora_sdxl\.safetensors: a LoRA for another model: its module 'lora_unet_input_blocks_1_1_proj_in' names no layer"),
    Case("train-network-weights-with-a-dropped-module-say-it-once", "hv_train_network",  # (twice: checks, load: fuzz_ay 7)
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(lora_with_a_rank_0_module(a, t)), "--allow_partial_lora"),
         None, warning=r"rank0\.safetensors: --allow_partial_lora drops \d+ entries"),
    Case("train-network-weights-keep-their-alpha", "hv_train_network",  # a.lora: rank 4, alpha 4
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora), "--network_alpha", "1"), None,
         warning=r"lora\.safetensors: trained with alpha 4, and the network was built with 1 \(--network_alpha\): the file's "
                 r"alpha is kept, so the LoRA continues at the strength it has",
         then=lambda a, t, err, out: saved_with_alpha(t / "out" / "tiny.safetensors", 4.0)),
    Case("train-dim-from-weights-records-the-files-rank-and-alpha", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora), "--dim_from_weights", "--network_dim", "8",
                                 "--network_alpha", "2"), None,
         warning=r"--dim_from_weights: the modules of \S+lora\.safetensors have rank 4 and alpha 4; --network_dim 8 and "
                 r"--network_alpha 2 ignored",
         then=lambda a, t, err, out: (saved_with_alpha(t / "out" / "tiny.safetensors", 4.0),
                                      assert_metadata(t / "out" / "tiny.safetensors", ss_network_dim="4"))),
    *[Case(f"train-{flag.strip('-').replace('_', '-')}-of-an-i2v-dit-is-said", "hv_train_network",
           lambda a, t, flag=flag: train_argv(a, t / "out", flag, str(i2v_lora(a, t))), None,
           warning=r"i2v\.safetensors: trained on skyreels-i2v \(32 input channels\) but dit\.pt is hunyuan-video-t2v \(16\): "
                   r"the layers fit, but the LoRA learned another task")
      for flag in ("--network_weights", "--base_weights")],
    Case("train-network-weights-of-another-rank", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora), "--network_dim", "8"),
         r"lora\.safetensors: its modules have rank 4, and --network_dim is 8: give --network_dim 4, or --dim_from_weights",
         then=before_the_model_loads),
    Case("train-network-weights-of-another-lokr-factor", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(lokr_of_factor_4(a, t)), "--network_module", "networks.lokr"),
         r"lokr4\.safetensors: its LoKr modules are of another factor or rank than this network's \(\S+\): give the "
         r"--network_args factor and --network_dim it was trained with", then=before_the_model_loads),
    Case("train-network-weights-of-another-model-size", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora_big)),
         r"lora_big\.safetensors: double_blocks\.0\.img_attn_qkv is \[384, 128\] in the LoRA but \[192, 64\] in the DiT \(a LoRA "
         r"for another model size\?\)", then=before_the_model_loads),
    Case("train-network-weights-of-another-kind", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--network_weights", str(a.lora), "--network_module", "networks.loha"),
         r"lora\.safetensors: its modules are lora modules \(lora_down\.weight\), not loha: use --network_module networks\.lora",
         then=before_the_model_loads),
    # --- caches made for another model, found before the DiT loads
    Case("train-latents-of-another-model", "hv_train_network", lambda a, t: train_argv(a, t / "out", toml=other_model_latents(a, t)),
         r"clip1_00000-005_0032x0032_hv\.safetensors: latent channels 32, but \S+dit\.pt takes 16 \(it was made with another model\)"),
    Case("train-text-of-another-width", "hv_train_network", lambda a, t: train_argv(a, t / "out", toml=other_width_text(a, t)),
         r"clip2_hv_te\.safetensors: LLM text width 4096, but \S+dit\.pt takes \d+"),
    # --- caches training cannot use are left out with a warning naming each, before any model loads
    Case("train-damaged-caches-are-left-out", "hv_train_network", lambda a, t: train_argv(a, t / "out", toml=damaged_caches(a, t)),
         None, warning=r"\[\[datasets\]\]\[0\]: 2 cached items left out: clip0_00000-005_0032x0032_hv\.safetensors: "
                       r"latents_2x3x3_float16 has shape \[16, 2, 3, 3\]: frames, height and width must be multiples of the "
                       r"DiT's patch \[1, 2, 2\]; delete it and run cache_latents\.py again; clip1_00000-005_0032x0032_hv\."
                       r"safetensors: clip1_hv_te\.safetensors: llm_float16 has 256 tokens but llm_mask 100; they must match; "
                       r"delete it and run cache_text_encoder_outputs\.py again"),
    Case("train-integer-latents-train-nothing", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", toml=damaged_caches(a, t, everywhere=True)),
         r"dataset\.toml: no cached training items in \S+cache; run cache_latents\.py",
         warning=r"4 cached items left out: clip0_00000-005_0032x0032_hv\.safetensors: latents_2x4x4_int32 is int32, not a "
                 r"floating-point tensor", then=before_the_model_loads),
    Case("train-num-repeats-absurd", "hv_train_network", lambda a, t: train_argv(a, t / "out", toml=repeated(a, t, 10**17)),
         r"dataset\.toml: \[\[datasets\]\]\[0\]\.num_repeats = 100000000000000000 is too large: at most 10,000 .*; to train "
         r"longer, set --max_train_steps or --max_train_epochs$", then=before_the_model_loads),
    Case("train-caches-older-than-the-dataset-are-named", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", toml=stale_dataset(a, t)), None,
         warning=r"\[\[datasets\]\]\[0\]: 1 cached item is older than the dataset and trained on as cached \(image_0000: "
                 r"caption changed\), and 1 image has no latent cache and is left out \(image_0001\); run cache_latents\.py and "
                 r"cache_text_encoder_outputs\.py again"),
    Case("train-timesteps-min-above-max", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--min_timestep", "900", "--max_timestep", "100"),
         r"--min_timestep 900.*--max_timestep 100", then=before_the_model_loads),
    # --- resuming checks what it resumes
    Case("train-output-name-with-a-folder-prunes-and-resumes-there", "hv_train_network", output_name_with_a_folder, None,
         then=resumed_into_the_folder),
    Case("train-output-name-out-of-the-output-folder", "hv_train_network",
         lambda a, t: [*train_argv(a, t / "out")[:-2], "--output_name", "../elsewhere/tiny"],
         r"--output_name \.\./elsewhere/tiny: leads out of --output_dir with '\.\.'; give the folder as --output_dir",
         then=before_the_model_loads),
    Case("train-resume-a-lora-file", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--resume", str(a.lora)),
         r"lora\.safetensors: a file, not a training state folder \(--resume\) \(a LoRA file\? start from its weights with "
         r"--network_weights\); give a \*-state folder or --resume auto", then=before_the_model_loads),
    Case("train-config-file-without-suffix", "hv_train_network",
         lambda a, t: train_argv(a, t / "out", "--config_file", str(write(t / "run", "max_train_steps = 0\n"))),
         r"run: max_train_steps = 0"),
    Case("train-output-name-absolute", "hv_train_network",
         lambda a, t: [*train_argv(a, t / "out")[:-2], "--output_name", str(t / "elsewhere" / "tiny")], None,
         then=lambda a, t, err, out: (t / "elsewhere" / "tiny.safetensors").is_file() or (_ for _ in ()).throw(AssertionError(err[-2000:]))),
    Case("train-removes-what-a-killed-run-left-in-its-sample-folder", "hv_train_network",
         lambda a, t: (killed_while_writing(t / "out" / "sample" / "tiny_000002_00_20261205000000_42.mp4"),
                       train_argv(a, t / "out"))[1], None),
    Case("train-on-a-disk-without-room-for-one-save", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--save_state"),
         r"out: 0\.0 MB free, and each save of this run writes about 0\.\d MB \(the LoRA and its \.comfyui copy, the training "
         r"state\); free some space or choose another --output_dir", small_disk=("out", 16_384)),
    Case("train-resume-a-finished-run", "hv_train_network", lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto"),
         None, warning=r"tiny-state is at step 2 of 2: nothing left to train, nothing written", keep=outputs_of("out")),
    Case("train-resume-a-finished-run-removes-a-state-a-kill-left-half-written", "hv_train_network",
         lambda a, t: train_argv(a, _half_written_state(trained_before(a, t)), "--resume", "auto"), None,
         warning=r"tiny-state is at step 2 of 2: nothing left to train, nothing written"),  # (leftovers() finds the folder)
    Case("train-resume-auto-leaves-another-names-state", "hv_train_network",
         lambda a, t: [*train_argv(a, trained_before(a, t))[:-2], "--output_name", "other", "--resume", "auto"], None,
         warning=r"--resume auto: no saved state of other in \S+, starting fresh \(states of other names there: tiny-state;",
         keep=outputs_of("out"), then=lambda a, t, err, out: assert_metadata(t / "out" / "other.safetensors", ss_steps="2")),
    Case("train-resume-with-another-learning-rate-says-the-saved-one-continues", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--max_train_steps", "3", "--learning_rate", "5e-4"),
         None, warning=r"tiny-state: saved with --learning_rate 0\.001; its optimizer and schedule continue at that rate, not "
                       r"at 0\.0005, and the LoRA's metadata records 0\.001",
         then=lambda a, t, err, out: assert_metadata(t / "out" / "tiny.safetensors", ss_learning_rate="0.001", ss_steps="3")),
    Case("train-afresh-over-an-earlier-run-says-so", "hv_train_network", lambda a, t: train_argv(a, trained_before(a, t)), None,
         warning=r"out holds 3 files of an earlier run named tiny \(tiny\.comfyui\.safetensors, tiny\.safetensors, tiny-state\); "
                 r"this run starts afresh"),
    Case("train-resume-auto-that-finds-no-state-over-an-earlier-run-says-so-too", "hv_train_network",  # (fuzz_at 2: unsaid)
         lambda a, t: train_argv(a, without_its_state(trained_before(a, t)), "--resume", "auto"), None,
         warning=r"out holds 2 files of an earlier run named tiny \(tiny\.comfyui\.safetensors, tiny\.safetensors\); this run "
                 r"starts afresh"),
    Case("train-resume-a-state-whose-lora-has-another-shape", "hv_train_network", with_damaged_state("network"),
         r"tiny-state/network\.safetensors: \S+lora_down\.weight is float32 \[8, \d+\], this run's LoRA holds float32 \[4, \d+\]; "
         r"pick another state folder or --resume auto", keep=outputs_of("out")),
    Case("train-resume-a-state-of-integer-weights", "hv_train_network", with_damaged_state("integer"),
         r"tiny-state/network\.safetensors: \S+ is int32 \[.*\], this run's LoRA holds float32", keep=outputs_of("out")),
    Case("train-resume-a-state-whose-optimizer-moments-hold-nan", "hv_train_network", with_damaged_state("optimizer-nan"),
         r"tiny-state/optimizer\.pt: exp_avg_sq of parameter \d+ holds NaN or infinite values: no state to resume from; pick an "
         r"older state folder or --resume auto", keep=outputs_of("out")),
    Case("train-resume-a-state-whose-optimizer-moments-have-another-shape", "hv_train_network", with_damaged_state("optimizer"),
         r"tiny-state/optimizer\.pt: exp_avg of parameter \d+ has shape \[3, 3\], its parameter \[\d+, \d+\]; pick another "
         r"state folder", keep=outputs_of("out")),
    Case("train-resume-a-state-without-its-rng-file-says-so", "hv_train_network",
         lambda a, t: (trained_before(a, t), state_file(a, t, "rng_0.pt").unlink(),
                       train_argv(a, t / "out", "--resume", str(t / "out" / "tiny-state"), "--max_train_steps", "3"))[-1], None,
         warning=r"rng_0\.pt: no RNG state for process 0; dropout and other draws differ from an uninterrupted run"),
    Case("train-resume-a-state-of-a-fractional-step", "hv_train_network", with_run_progress(global_step=1.5),
         r"tiny-state/train_state\.json: damaged \(global_step = 1\.5 is not a step, epoch or batch count\)", keep=outputs_of("out")),
    Case("train-resume-not-a-state", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--resume", str(a.root)),
         r"not a complete training state \(no train_state\.json\); pick another folder or --resume auto", then=before_the_model_loads),
    Case("train-resume-missing-folder", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--resume", str(t / "nope-state")),
         r"nope-state: training state folder not found \(--resume\)", then=before_the_model_loads),
    Case("train-resume-cut-json", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", str(truncated(state_file(a, t), state_file(a, t)).parent)),
         r"tiny-state/train_state\.json: damaged \(.*\); pick another state folder or --resume auto", keep=outputs_of("out"),
         then=before_the_model_loads),
    Case("train-resume-other-optimizer", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--optimizer_type", "SGD"),
         r"tiny-state: saved with the optimizer torch\.optim\.adamw\.AdamW, this run uses torch\.optim\.sgd\.SGD", keep=outputs_of("out")),
    Case("train-resume-other-optimizer-setting", "hv_train_network",  # (the same class: its settings are compared)
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--optimizer_args", "weight_decay=0.1"),
         r"tiny-state: saved with the optimizer torch\.optim\.adamw\.AdamW, this run uses torch\.optim\.adamw\.AdamW\(weight_decay=0\.1\)",
         keep=outputs_of("out")),
    Case("train-resume-other-rank", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--network_dim", "8"),
         r"tiny-state: saved with another network \(dim 4 -> 8\)", keep=outputs_of("out"), then=before_the_model_loads),
    Case("train-resume-an-image-to-video-state-on-a-text-to-video-dit", "hv_train_network",  # (fuzz_aj 7: "another DiT
         lambda a, t: train_argv(a, with_run(dit_in_channels=32)(a, t), "--resume", "auto"),  # file", the result labelled T2V)
         r"tiny-state: saved by a run on an image-to-video DiT \(32 input channels\), --dit has 16: the run would go on "
         r"learning another task", keep=outputs_of("out"), then=before_the_model_loads),
    Case("train-resume-two-process-state-with-one", "hv_train_network",
         lambda a, t: train_argv(a, with_run(processes=2)(a, t), "--resume", "auto"),
         r"tiny-state: saved by 2 training processes, this run has 1; resume with the same number", keep=outputs_of("out")),
    Case("train-resume-a-context-parallel-state-as-data-parallel", "hv_train_network",
         lambda a, t: train_argv(a, with_run(context_parallel=2)(a, t), "--resume", "auto"),
         r"tiny-state: saved with --context_parallel 2, this run has 1: its processes would share out the work otherwise",
         keep=outputs_of("out")),
    Case("train-resume-after-num-repeats-lowered", "hv_train_network", fewer_repeats, None,
         warning=r"the dataset or batching changed since this state was saved \(8 batches per epoch then, 4 now\).*continues at the "
                 r"start of epoch 2"),
    Case("train-resume-after-num-repeats-raised-trains-the-steps-left", "hv_train_network", more_repeats, None,
         warning=r"the dataset or batching changed since this state was saved .*continues at the start of epoch 2",
         then=trained_to_step_6),
    Case("train-resume-with-another-warmup", "hv_train_network",  # (fuzz_z 3: the schedule, rebuilt from the flags, took another curve)
         lambda a, t: train_argv(a, trained_before(a, t, *WARMUP), "--resume", "auto", *WARMUP[:-1], "10"),
         r"tiny-state: saved with another learning-rate schedule \(--lr_warmup_steps 1 -> 10\); resume with the same flags",
         keep=outputs_of("out"), then=before_the_model_loads),  # (checked before the DiT loads: fuzz_z 4)
    *[Case(f"train-resume-with-{flags[0].strip('-').replace('_', '-')}-that-changes-nothing-resumes", "hv_train_network",
           lambda a, t, flags=flags: train_argv(a, trained_before(a, t), "--resume", "auto", *flags, "--max_train_steps", "3"), None,
           then=trained_to_step_3)  # (refused as another schedule or network: fuzz_ax 9)
      for flags in (("--lr_scheduler_power", "3"), ("--lr_scheduler_timescale", "100"), ("--network_dropout", "0"),
                    ("--network_args", "rank_dropout=0", "module_dropout=0.0"),  # (fuzz_az 5)
                    ("--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999"))],  # (AdamW's defaults: fuzz_ax 9)
    Case("train-resume-of-a-bare-lr-scheduler-type-with-a-flag-it-does-not-read-resumes", "hv_train_network",  # (fuzz_az 6)
         lambda a, t: train_argv(a, trained_before(a, t, *STEP_LR), "--resume", "auto", *STEP_LR, "--lr_scheduler_power", "3",
                                 "--max_train_steps", "3"), None, then=trained_to_step_3),
    *[Case(f"train-resume-with-another-{flag.strip('-').replace('_', '-')}-is-said-once", "hv_train_network",  # (silent, or
           lambda a, t, flag=flag, value=value: train_argv(a, trained_before(a, t), "--resume", "auto", flag, value,  # said twice:
                                                           "--max_train_steps", "3"), None,  # fuzz_ax 10)
           warning=rf"tiny-state: saved by a run {said} \({flag} \S+ -> \S+\); the steps from here", then=trained_to_step_3)
      for flag, value, said in (("--max_grad_norm", "0.05", "of other training settings"),
                                ("--num_timestep_buckets", "4", "of other training settings"),
                                ("--timestep_sampling", "shift", "that drew its noise levels otherwise"))],
    Case("train-resume-of-a-cosine-schedule-for-more-steps-is-said", "hv_train_network",  # (its rate rose again unsaid:
         lambda a, t: train_argv(a, trained_before(a, t, "--lr_scheduler", "cosine"), "--resume", "auto",  # fuzz_ax 7)
                                 "--lr_scheduler", "cosine", "--max_train_steps", "3"), None,
         warning=r"tiny-state: saved by a run whose --lr_scheduler cosine spans 2 steps; it is built for 3 here",
         then=trained_to_step_3),
    Case("train-resume-with-network-weights-and-another-flow-shift-is-said", "hv_train_network",  # (fuzz_z 5: silent)
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--network_weights", str(t / "out" / "tiny.safetensors"),
                                 "--timestep_sampling", "shift", "--discrete_flow_shift", "3", "--max_train_steps", "3"), None,
         then=lambda a, t, err, out: all_said(err, r"--network_weights \S+tiny\.safetensors: the LoRA of \S+tiny-state replaces it",
                                              r"tiny-state: saved by a run that drew its noise levels otherwise \(--timestep_sampling "
                                              r"sigma -> shift\); the steps")),  # (the shift, unread by sigma then, not listed)
    Case("train-resume-with-a-flag-its-sampling-does-not-read-changed-says-no-change", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--sigmoid_scale", "2", "--max_train_steps", "3"), None,
         then=lambda a, t, err, out: (all_said(err, r"--sigmoid_scale 2\.0 is read only by"),  # (it was said to change the draws)
                                      not re.search("drew its noise levels otherwise", err) or pytest.fail(err))),
    Case("train-resume-a-state-holding-another-state-s-file", "hv_train_network", swapped_state_file,  # (fuzz_z 6: resumed "at step
         r"tiny-step00000001-state/network\.safetensors: not the file this state was saved with \(another state's, or changed "  # 1"
         r"since\); pick another state folder or --resume auto", keep=outputs_of("out")),  # with step 2's weights, unsaid)
    Case("train-resume-with-another-seed-inside-an-epoch", "hv_train_network",  # (fuzz_z 2: items trained twice, others never)
         lambda a, t: replaced(train_argv(a, trained_before(a, t), "--resume", "auto"), "--seed", 2),
         r"tiny-state: saved by a run of --seed 1, 2 batches into epoch 1, whose order of the items is that seed's; resume without "
         r"--seed \(or with --seed 1\)", keep=outputs_of("out")),
    Case("train-resume-auto-skips-a-damaged-newest-state", "hv_train_network", damaged_newest, None, then=resumed_from_step_1,
         warning=r"--resume auto: .*network\.safetensors: file is truncated.*; trying the next older state"),
    Case("train-resume-a-state-whose-learning-rate-is-nan", "hv_train_network", with_damaged_state("lr-nan"),
         r"tiny-state/optimizer\.pt: lr of param group 0 is nan: no state to resume from; pick an older state folder or "
         r"--resume auto", keep=outputs_of("out")),
    Case("train-resume-a-state-whose-schedule-is-inf", "hv_train_network", with_damaged_state("schedule-inf"),
         r"tiny-state/optimizer\.pt: the schedule's base_lrs is \[inf\]: no state to resume from", keep=outputs_of("out")),
    Case("train-resume-a-state-past-the-end-of-its-epoch", "hv_train_network",
         with_run_progress(batch_in_epoch=10**6),
         r"tiny-state/train_state\.json: damaged \(batch_in_epoch 1000000 of an epoch of \d+ batches\)", keep=outputs_of("out")),
    Case("train-resume-a-state-holding-nan-is-refused", "hv_train_network",
         lambda a, t: train_argv(a, nan_newest(a, t), "--resume", str(t / "out" / "tiny-state"), "--max_train_steps", "3"),
         r"tiny-state/network\.safetensors: lora_unet_\S+ holds NaN or infinite values: no state to resume from"),
    Case("train-resume-auto-skips-states-holding-nan", "hv_train_network",
         lambda a, t: train_argv(a, nan_newest(a, t), "--resume", "auto", "--save_state", "--max_train_steps", "3"),
         None, then=resumed_from_step_1, warning=r"--resume auto: .*holds NaN or infinite values.*; trying the next older state"),
    Case("train-resume-negative-step-is-damaged", "hv_train_network", with_run_progress(global_step=-5),
         r"train_state\.json: damaged \(global_step = -5 is not a step, epoch or batch count\)"),
    # --- writing: a full disk or a file-size limit keeps the last LoRA and state whole
    Case("train-full-disk-keeps-the-last-lora-and-state", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--save_state", "--max_train_steps", "3"),
         r"tiny\.safetensors: cannot write " + TOO_LARGE, keep=outputs_of("out"),
         file_size_limit=lambda a, t: (t / "out" / "tiny.safetensors").stat().st_size // 2,
         warning=r"this process may write files of at most [\d.]+ MB \(ulimit -f\), and each save of this run writes one of about "
                 r"[\d.]+ MB: every save, the final one included, will fail"),  # (said at the start: fuzz_w 7)
    Case("train-full-disk-during-the-state-save", "hv_train_network",
         lambda a, t: train_argv(a, trained_before(a, t), "--resume", "auto", "--save_state", "--max_train_steps", "3"),
         r"tiny-state: cannot write the training state " + TOO_LARGE + r"; the file is past this process's file-size limit \(ulimit -f\)",
         keep=lambda a, t: sorted((t / "out" / "tiny-state").iterdir()),
         file_size_limit=lambda a, t: int((t / "out" / "tiny-state" / "optimizer.pt").stat().st_size * 0.7)),
    Case("train-lora-larger-than-the-machine-is-refused-before-the-model-loads", "hv_train_network",  # (fuzz_ab 6: killed by
         lambda a, t: train_argv(a, t / "out", "--network_dim", "1048576"),  # the kernel without a word)
         r"--network_dim 1048576: the LoRA alone needs [\d,.]+ GB \(weights, gradients and optimizer state\), more than this "
         r"machine's [\d,.]+ GB; a rank above the layers' width \(64\) adds nothing but memory", then=before_the_model_loads),
    # (a rank the machine holds, past the memory this run may map: the allocation fails, and is said)
    Case("train-out-of-memory-says-what-needs-less", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--network_dim", "60000"),
         r"out of host memory: an allocation of \S+ \S+ failed under this process's address-space limit of \S+ \S+ \(ulimit -v\): "
         r"raise it, or ask for a larger one; .* a lower --network_dim; --dry_run --vram_budget 24G",
         memory_headroom=MEMORY),
    Case("train-read-only-output-folder", "hv_train_network", lambda a, t: train_argv(a, t / "out"),
         r"out: cannot write to this folder " + READ_ONLY + r"; \S*out is on a read-only file system, or choose another --output_dir", read_only="out"),
    Case("train-flags-their-partner-flag-would-use-are-said", "hv_train_network",  # (each was ignored without a word)
         lambda a, t: train_argv(a, t / "out", "--dry_run", "--compile_backend", "eager", "--use_pinned_memory_for_block_swap",
                                 "--vae_chunk_size", "8", "--sample_every_n_steps", "1"), None,
         warning=r"--compile_backend: acts with --compile, which is not given: ignored",
         then=lambda a, t, err, out: all_said(err, r"--sample_every_n_steps, --vae_chunk_size: act on the samples of --sample_prompts, "
                                                   r"and none is given: ignored",
                                              r"--use_pinned_memory_for_block_swap acts with --blocks_to_swap, and none is given: ignored")),
    Case("train-dry-run-read-only-output-folder", "hv_train_network", lambda a, t: train_argv(a, t / "out", "--dry_run"),
         r"out: cannot write to this folder " + READ_ONLY + r"; \S*out is on a read-only file system, or choose another --output_dir", read_only="out"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_training(case, assets, tmp_path):
    check(case, assets, tmp_path)
