"""hv_train_network: trains a LoRA from caches, saves musubi-tuner's files, resumes exactly."""

import math
from pathlib import Path

import pytest
import torch

from helpers import write_cached_dataset
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.errors import UserError
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.networks.lora_files import load_lora
from musubi_tuner.training.args import parse_args
from musubi_tuner.training.loop import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config = tiny_dit_config()
    dit = write_dit(root / "dit.pt", random_dit_state_dict(config, seed=0), config, "pt")
    toml = write_cached_dataset(root / "data", items=4, frames=5, size=(64, 48))
    return root, dit, toml


def base_args(dit, toml, out, *extra):
    return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "adamw",
            "--timestep_sampling", "shift", "--discrete_flow_shift", "7.0", "--seed", "42", "--dit_dtype", "float32",
            "--max_data_loader_n_workers", "0", "--output_dir", str(out), "--output_name", "tiny", *extra]


def test_trains_and_saves_a_lora_per_epoch_with_kohya_keys(assets, tmp_path):
    root, dit, toml = assets
    final = train(parse_args(base_args(dit, toml, tmp_path, "--max_train_epochs", "3", "--save_every_n_epochs", "1")))
    assert final == tmp_path / "tiny.safetensors"
    stems = ["tiny-000001", "tiny-000002", "tiny"]
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert written == sorted([f"{s}.safetensors" for s in stems] + [f"{s}.comfyui.safetensors" for s in stems])  # --lora_format both
    weights = load_lora(final)
    assert len(weights) == 20 * 3  # 2 double blocks x 8 + 2 single x 2 modules, down/up/alpha each
    assert weights["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (3 * 64 + 256, 4)
    assert weights["lora_unet_double_blocks_0_img_mlp_fc2.lora_down.weight"].dtype == torch.float32
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_up" in k)  # it learned something
    _, meta = read_safetensors_header(final)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_steps"] == "12" and meta["ss_epoch"] == "3"
    # what the run computed from --max_train_epochs, as musubi-tuner records it (not the default 1600 steps)
    assert (meta["ss_max_train_steps"], meta["ss_num_batches_per_epoch"], meta["ss_num_epochs"]) == ("12", "4", "3")
    assert meta["modelspec.architecture"] == "hunyuan-video/lora" and len(meta["sshs_model_hash"]) == 64
    assert meta["musubi_tuner.base_model"] == "hunyuan-video-t2v"


def test_a_run_stopped_within_an_epoch_records_the_epoch_it_was_in(assets, tmp_path):
    """fuzz_am 2: --max_train_steps 2 of a 4-batch epoch: the final LoRA said ss_epoch 0 (untrained, to tools that
    show it), its step save at the same step 1."""
    root, dit, toml = assets
    train(parse_args(base_args(dit, toml, tmp_path, "--max_train_steps", "2", "--save_every_n_steps", "2")))
    final, step = (read_safetensors_header(tmp_path / f"{n}.safetensors")[1] for n in ("tiny", "tiny-step00000002"))
    assert (final["ss_steps"], final["ss_epoch"]) == (step["ss_steps"], step["ss_epoch"]) == ("2", "1")


def test_saved_lora_says_what_it_is_and_loads_completely_in_every_consumer(assets, tmp_path):
    from musubi_tuner.networks.lora_doctor import diagnose
    from musubi_tuner.networks.lora_metadata import LoRAFileInfo

    root, dit, toml = assets
    final = train(parse_args(base_args(dit, toml, tmp_path, "--max_train_steps", "2")))
    info = LoRAFileInfo.from_metadata(read_safetensors_header(final)[1])
    assert (info.base_model, info.in_channels, info.resolutions, info.frames) == ("hunyuan-video-t2v", 16, [(64, 48)], [5])
    assert len(info.modules) == 20 and set(info.modules.values()) == {(4, 4.0)} and info.companion == "tiny.comfyui.safetensors"
    diagnosis = diagnose(final, ("ours", "musubi", "comfyui", "kijai", "kijai_blocks"), dit=dit)
    assert diagnosis.ok and not diagnosis.warnings, [v.coverage.dropped for v in diagnosis.verdicts]
    assert {v.consumer: Path((v.alternative or (v.file,))[0]).name for v in diagnosis.verdicts} == {
        "ours": "tiny.safetensors", "musubi": "tiny.safetensors", "comfyui": "tiny.comfyui.safetensors", "kijai": "tiny.safetensors",
        "kijai_blocks": "tiny.comfyui.safetensors"}
    # diffusers splits single-block linear1 at the released width, 3072: at this tiny width no file of ours loads there,
    # which is no fault of the file: "not checked" (another model size), not a failed verdict
    (diffusers,) = diagnose(final, ("diffusers",), dit=dit).verdicts
    assert diffusers.ok and "64 wide" in diffusers.other_size and "width of 3072" in diffusers.tried[0][1].fatal


def test_loss_on_a_fixed_batch_falls(assets, tmp_path):
    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.data.training_dataset import TrainingDataset
    from musubi_tuner.hunyuan.checkpoints import load_dit
    from musubi_tuner.networks import lora
    from musubi_tuner.training.timesteps import TimestepConfig, sample_timesteps
    from musubi_tuner.hunyuan.vae import SCALING_FACTOR

    root, dit, toml = assets
    train(parse_args(base_args(dit, toml, tmp_path, "--max_train_steps", "40", "--learning_rate", "3e-3")))
    data = TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=0)
    batch = data[data.epoch_plan(1)[0]]
    model = load_dit(dit, dtype=torch.float32)

    def fixed_loss():
        g = torch.Generator().manual_seed(123)
        x0 = batch["latents"].float() * SCALING_FACTOR
        losses = []
        for _ in range(8):
            noise = torch.randn(x0.shape, generator=g)
            sigma, ts = sample_timesteps(TimestepConfig("shift", 7.0), 1, x0.shape[-2:], generator=g)
            noisy = (1 - sigma) * x0 + sigma * noise
            with torch.no_grad():
                pred = model(noisy, ts, batch["llm"].float(), batch["llm_mask"], batch["clipL"].float(), torch.tensor([1.0]))
            losses.append((pred - (noise - x0)).square().mean().item())
        return sum(losses) / len(losses)

    before = fixed_loss()
    net = lora.create_arch_network_from_weights(1.0, load_lora(tmp_path / "tiny.safetensors"), model)
    net.apply_to(None, model)
    after = fixed_loss()
    assert after < before * 0.97, (before, after)


def test_fp8_base_trains_as_the_high_precision_base_does(assets, tmp_path):
    """Same seed, data, noise and timesteps: fp8 block weights (modulation included) change the loss curve and the
    learned update only by their rounding (bench/fp8_base_error.py: 0.1% per step, 10-15% of the update after 80
    steps). A broken gradient through the fp8 Linears would leave the LoRA untrained or far off."""
    import csv

    root, dit, toml = assets
    runs = {}
    for name, extra in (("full", ()), ("fp8", ("--fp8_base",))):
        out = tmp_path / name
        train(parse_args(base_args(dit, toml, out, "--max_train_steps", "8", *extra)))
        with open(out / "tiny-loss.csv", newline="") as f:
            losses = [float(r["loss"]) for r in csv.DictReader(f)]
        lora = load_lora(out / "tiny.safetensors")
        runs[name] = losses, {k: lora[k] @ lora[k.replace("lora_up", "lora_down")] for k in lora if k.endswith("lora_up.weight")}
    (full, full_delta), (fp8, fp8_delta) = runs["full"], runs["fp8"]
    assert len(full) == len(fp8) == 8 and max(abs(a - b) / b for a, b in zip(fp8, full)) < 0.01
    moved = sum(d.norm() for d in full_delta.values())
    assert moved > 0 and sum((fp8_delta[k] - d).norm() for k, d in full_delta.items()) < 0.3 * moved


def test_resume_auto_continues_the_newest_run_and_a_folder_of_states_is_named_as_one(assets, tmp_path):
    """A run started afresh in a folder holding an earlier run's states, stopped before it passed their step: --resume
    auto continued the earlier run's state (the most advanced), and the stopped run's work was lost (fuzz_z 7). A
    --resume of the output folder itself was called a damaged state (fuzz_z 9)."""
    import shutil

    root, dit, toml = assets
    out = tmp_path / "out"
    train(parse_args(base_args(dit, toml, out, "--max_train_steps", "6", "--save_state")))  # the earlier run: at step 6
    train(parse_args(base_args(dit, toml, tmp_path / "b", "--max_train_steps", "2", "--save_every_n_steps", "1",
                               "--save_state", "--output_name", "tiny")))  # a later run, stopped at step 2 (its states moved in)
    shutil.move(tmp_path / "b" / "tiny-step00000002-state", out / "tiny-step00000002-state")
    with pytest.raises(UserError, match=rf"^{out}: a folder of training states, not one: give one of them \(tiny-step00000002-state, "
                                        r"tiny-state\), or --resume auto with --output_dir"):
        train(parse_args(base_args(dit, toml, tmp_path / "c", "--max_train_steps", "3", "--resume", str(out))))
    from musubi_tuner.training.state import complete_states

    assert [p.name for p in complete_states(out, "tiny")] == ["tiny-step00000002-state", "tiny-state"]


def test_a_run_named_as_another_with_a_number_after_it_is_not_its_checkpoints(assets, tmp_path):
    """fuzz_ax 13: run "tiny" took the states and LoRA files of run "tiny-2" in the same folder for its own epoch
    checkpoints: --resume auto finished tiny with tiny-2's weights, and validation named tiny-2.safetensors its best."""
    from musubi_tuner.files import lora_file_names, names_collide
    from musubi_tuner.training.state import complete_states

    root, dit, toml = assets
    out = tmp_path / "out"
    for name, seed in (("tiny", "42"), ("tiny-2", "7")):
        train(parse_args(base_args(dit, toml, out, "--max_train_steps", "2", "--save_state", "--output_name", name, "--seed", seed)))
    assert [p.name for p in complete_states(out, "tiny")] == ["tiny-state"]
    own = lora_file_names("tiny")
    assert [own.fullmatch(n) is not None for n in ("tiny-2.safetensors", "tiny-000002.safetensors", "tiny-step00000004.safetensors",
                                                   "tiny-1234567.comfyui.safetensors")] == [False, True, True, True]
    assert not names_collide("tiny", "tiny-2") and names_collide("tiny", "tiny-000002")


def test_a_resumed_run_is_the_session_it_continues(assets, tmp_path):
    """fuzz_ax 1: each start drew a new ss_session_id, and lora_post_hoc_ema took one stopped-and-resumed run for
    several: it ordered its files by modification time and averaged the last step twice (the final LoRA beside it)."""
    root, dit, toml = assets
    sessions = {}
    for folder in ("a", "b"):
        out = tmp_path / folder
        train(parse_args(base_args(dit, toml, out, "--max_train_steps", "2", "--save_every_n_steps", "2", "--save_state")))
        train(parse_args(base_args(dit, toml, out, "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state",
                                   "--resume", "auto")))
        sessions[folder] = [read_safetensors_header(out / f"tiny{n}.safetensors")[1]["ss_session_id"] for n in ("-step00000002", "")]
    assert sessions["a"][0] == sessions["a"][1] and sessions["b"][0] == sessions["b"][1] and sessions["a"] != sessions["b"]


def test_resume_auto_continues_a_branch_taken_from_an_older_state_not_the_branch_it_left(assets, tmp_path, caplog):
    """fuzz_ax 6: a run resumed from an older state of its own (going back before a divergence, say) and stopped was
    continued by --resume auto from the states of the branch it had left, further on: its work was dropped."""
    import logging
    import re

    root, dit, toml = assets
    out = tmp_path / "out"
    flags = ("--save_every_n_steps", "2", "--save_state", "--output_name", "tiny")
    train(parse_args(base_args(dit, toml, out, "--max_train_steps", "8", *flags)))  # the first branch: states to step 8
    train(parse_args(base_args(dit, toml, out, "--max_train_steps", "4", *flags, "--resume", str(out / "tiny-step00000002-state"),
                               "--max_grad_norm", "0.05")))  # back to step 2, another clip, stopped at step 4
    with caplog.at_level(logging.INFO):
        train(parse_args(base_args(dit, toml, out, "--max_train_steps", "8", *flags, "--resume", "auto")))
    assert re.search(r"resumed from \S+ at step 4 ", caplog.text), caplog.text


@pytest.mark.parametrize("change", [("--gradient_accumulation_steps", "2"), ("--gradient_accumulation_steps", "1")])
def test_a_resume_to_max_train_epochs_trains_the_epochs_left_in_the_new_batching(assets, tmp_path, change):
    """fuzz_ax 2: the end of --max_train_epochs was counted in the new batching's steps from step 0, so a resume whose
    gradient accumulation had changed trained no epoch ("nothing left to train") or too few."""
    root, dit, toml = assets
    out = tmp_path / "out"
    train(parse_args(base_args(dit, toml, out, "--max_train_epochs", "1", "--save_state")))
    first = int(read_safetensors_header(out / "tiny.safetensors")[1]["ss_steps"])
    train(parse_args(base_args(dit, toml, out, "--max_train_epochs", "2", "--save_state", "--resume", "auto", *change)))
    meta = read_safetensors_header(out / "tiny.safetensors")[1]
    assert (meta["ss_epoch"], int(meta["ss_steps"])) == ("2", first + math.ceil(first / int(change[1])))


@pytest.mark.parametrize("linked", ["tiny-step00000002-state", "tiny-state"])
def test_a_state_linked_in_from_another_folder_is_continued_and_left_as_it_was(assets, tmp_path, linked):
    """fuzz_ax 4, fuzz_az 1: a state folder linked into --output_dir to continue another folder's state was written
    through by the final save: the other folder's state became a later step's under its old name, outside the run's
    lock (under its own name too); the curve then started at the resumed step."""
    import json

    root, dit, toml = assets
    first, second = tmp_path / "first", tmp_path / "second"
    train(parse_args(base_args(dit, toml, first, "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state")))
    before = {p.name: p.read_bytes() for p in (first / linked).iterdir()}
    second.mkdir()
    (second / "tiny-state").symlink_to(first / linked)
    train(parse_args(base_args(dit, toml, second, "--max_train_steps", "6", "--save_state", "--resume", "auto")))
    assert {p.name: p.read_bytes() for p in (first / linked).iterdir()} == before
    assert not (second / "tiny-state").is_symlink()
    assert json.loads((second / "tiny-state" / "train_state.json").read_text())["global_step"] == 6
    assert [int(line.split(",")[1]) for line in (second / "tiny-loss.csv").read_text().splitlines()[1:]] == list(range(1, 7))


def test_a_state_of_another_folder_starts_this_folders_series_with_its_own_curve(assets, tmp_path, caplog):
    """fuzz_ax 3: resuming another folder's state spliced its curve onto the loss CSV of the run of that name already in
    --output_dir, pruned that run's files as its own, and said nothing of them."""
    import logging

    root, dit, toml = assets
    first, second = tmp_path / "first", tmp_path / "second"
    train(parse_args(base_args(dit, toml, first, "--max_train_steps", "8", "--save_every_n_steps", "2", "--save_state")))
    train(parse_args(base_args(dit, toml, second, "--max_train_steps", "8", "--save_every_n_steps", "1", "--seed", "7",
                               "--learning_rate", "1e-4")))  # another run of the name, in the folder resumed into
    with caplog.at_level(logging.WARNING):
        train(parse_args(base_args(dit, toml, second, "--max_train_steps", "8", "--save_every_n_steps", "1", "--save_last_n_steps", "1",
                                   "--resume", str(first / "tiny-step00000006-state"))))
    assert f"{second} holds 18 files of an earlier run named tiny" in caplog.text
    assert f"this run continues {first / 'tiny-step00000006-state'}, of another folder, replaces those it writes" in caplog.text
    assert (second / "tiny-step00000001.safetensors").is_file(), "the earlier run's file was pruned as this run's"

    def curve(folder):
        return [line.split(",") for line in (folder / "tiny-loss.csv").read_text().splitlines()[1:]]

    assert curve(second)[:6] == curve(first)[:6] and [int(s) for _, s, _ in curve(second)] == list(range(1, 9))


def test_a_finished_run_trained_on_keeps_its_final_lora_as_the_epoch_save_it_would_have_been(assets, tmp_path):
    """fuzz_ax 5: training a finished run on (--resume auto with more epochs, as the docs advise) replaced its final LoRA
    without a word, and its series then lacked the epoch save an uninterrupted run makes there."""
    root, dit, toml = assets
    out = tmp_path / "out"
    flags = ("--save_every_n_epochs", "1", "--save_state")
    train(parse_args(base_args(dit, toml, out, "--max_train_epochs", "2", *flags)))
    finished = (out / "tiny.safetensors").read_bytes()
    train(parse_args(base_args(dit, toml, out, "--max_train_epochs", "3", *flags, "--resume", "auto")))
    assert sorted(p.name for p in out.glob("tiny*.safetensors") if ".comfyui" not in p.name) == [
        "tiny-000001.safetensors", "tiny-000002.safetensors", "tiny.safetensors"]
    assert (out / "tiny-000002.safetensors").read_bytes() == finished
    assert read_safetensors_header(out / "tiny.safetensors")[1]["ss_epoch"] == "3"


def test_a_finished_run_trained_on_through_a_link_to_its_folder_whose_step_save_holds_its_end_is_said_nothing(assets, tmp_path,
                                                                                                                 caplog):
    """fuzz_ay 1, 2: a step save at the last step already keeps the finished run's end, and the warning that it would
    be replaced was false; the run's own folder named through a link was taken for another folder's."""
    import logging

    root, dit, toml = assets
    out = tmp_path / "out"
    (tmp_path / "link").symlink_to(out)
    flags = ("--save_every_n_steps", "2", "--save_state")
    train(parse_args(base_args(dit, toml, out, "--max_train_steps", "4", *flags)))
    with caplog.at_level(logging.WARNING):
        train(parse_args(base_args(dit, toml, tmp_path / "link", "--max_train_steps", "6", *flags, "--resume", str(out / "tiny-state"))))
        train(parse_args(base_args(dit, toml, out, "--max_train_steps", "8", "--save_state", "--resume", "auto")))  # (no
    assert "will be replaced" not in caplog.text and "of another folder" not in caplog.text, caplog.text  # step saves now:
    # its step-6 save is there all the same: fuzz_az 3)
    assert read_safetensors_header(out / "tiny-step00000004.safetensors")[1]["ss_steps"] == "4"


def test_a_resume_inside_an_epoch_with_another_accumulation_finishes_that_epoch(assets, tmp_path, caplog):
    """fuzz_ay 6: the position inside the epoch was dropped when only --gradient_accumulation_steps changed (the same
    batches, grouped otherwise), blamed on "12 batches per epoch then, 12 now", and a run of --max_train_epochs 1 then
    trained nothing more."""
    import logging

    root, dit, toml = assets
    out = tmp_path / "out"
    train(parse_args(base_args(dit, toml, out, "--max_train_steps", "1", "--save_state")))
    batches = int(read_safetensors_header(out / "tiny.safetensors")[1]["ss_num_batches_per_epoch"])
    with caplog.at_level(logging.WARNING):
        train(parse_args(base_args(dit, toml, out, "--max_train_epochs", "1", "--save_state", "--resume", "auto",
                                   "--gradient_accumulation_steps", "2")))
    assert ("saved with --gradient_accumulation_steps 1, this run has 2: epoch 1 goes on after its first 1 batches, a step "
            "ending every 2 batches counted from the epoch's start") in caplog.text
    meta = read_safetensors_header(out / "tiny.safetensors")[1]
    assert (meta["ss_epoch"], int(meta["ss_steps"])) == ("1", 1 + math.ceil(batches / 2))  # batches 1, 2-3, ..., the last


def test_a_state_of_an_epochs_last_batch_resumed_on_a_changed_dataset_makes_that_epochs_end(assets, tmp_path, caplog):
    """fuzz_ax 12: a step save at an epoch's last batch, resumed after the dataset changed, was said to be part-way
    through the epoch, and the epoch's end (its save, samples, validation) never came."""
    import logging

    root, dit, toml = assets
    out = tmp_path / "out"
    train(parse_args(base_args(dit, toml, out, "--max_train_epochs", "2", "--save_every_n_steps", "4", "--save_state")))  # 4 a epoch
    changed = tmp_path / "more.toml"
    changed.write_text(toml.read_text().replace("target_frames", "num_repeats = 2\ntarget_frames"))
    with caplog.at_level(logging.WARNING):
        train(parse_args([*base_args(dit, changed, tmp_path / "b", "--max_train_epochs", "2", "--save_every_n_epochs", "1",
                                     "--save_state", "--resume", str(out / "tiny-step00000004-state"))]))
    assert "epoch 1 is complete, and training continues with the new one from epoch 2" in caplog.text, caplog.text
    assert (tmp_path / "b" / "tiny-000001.safetensors").is_file()
    assert read_safetensors_header(tmp_path / "b" / "tiny.safetensors")[1]["ss_steps"] == str(4 + 8)


def test_stop_resume_gives_the_same_lora_as_an_uninterrupted_run(assets, tmp_path):
    root, dit, toml = assets
    straight = tmp_path / "straight"
    train(parse_args(base_args(dit, toml, straight, "--max_train_steps", "6")))
    parts = tmp_path / "parts"
    # stop after step 3 (a state is saved there), then resume to step 6
    train(parse_args(base_args(dit, toml, parts, "--max_train_steps", "3", "--save_state_on_train_end")))
    assert (parts / "tiny-state" / "train_state.json").is_file()
    train(parse_args(base_args(dit, toml, parts, "--max_train_steps", "6", "--resume", "auto")))
    a, b = load_lora(straight / "tiny.safetensors"), load_lora(parts / "tiny.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_two_runs_of_one_seed_are_two_sessions(assets, tmp_path):
    """post_hoc_ema tells runs apart by ss_session_id: the seeded generator must not draw it."""
    root, dit, toml = assets
    sessions = set()
    for out in (tmp_path / "a", tmp_path / "b"):
        train(parse_args(base_args(dit, toml, out, "--max_train_steps", "1")))
        sessions.add(read_safetensors_header(out / "tiny.safetensors")[1]["ss_session_id"])
    assert len(sessions) == 2


def test_resuming_a_run_without_seed_continues_with_the_seed_it_drew(assets, tmp_path):
    root, dit, toml = assets

    def unseeded(out, *extra):
        args = base_args(dit, toml, out, *extra)
        i = args.index("--seed")
        return args[:i] + args[i + 2:]

    parts = tmp_path / "parts"
    train(parse_args(unseeded(parts, "--max_train_steps", "2", "--save_state_on_train_end")))
    drawn = read_safetensors_header(parts / "tiny.safetensors")[1]["ss_seed"]  # the metadata records the drawn seed
    train(parse_args(unseeded(parts, "--max_train_steps", "4", "--resume", "auto")))
    assert read_safetensors_header(parts / "tiny.safetensors")[1]["ss_seed"] == drawn
    straight = tmp_path / "straight"
    train(parse_args(base_args(dit, toml, straight, "--max_train_steps", "4", "--seed", drawn)))
    a, b = load_lora(straight / "tiny.safetensors"), load_lora(parts / "tiny.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_missing_caches_tell_the_user_what_to_run(assets, tmp_path):
    root, dit, _ = assets
    empty = tmp_path / "d"
    (empty / "v").mkdir(parents=True)
    toml = empty / "dataset.toml"
    toml.write_text(f'[[datasets]]\nvideo_directory = "{(empty / "v").as_posix()}"\ncaption_extension = ".txt"\nresolution = [64, 48]\n')
    with pytest.raises(UserError, match="no cached training items.*run cache_latents.py and cache_text_encoder_outputs.py"):
        train(parse_args(base_args(dit, toml, tmp_path / "out")))


def test_attention_flag_is_required_and_sage_is_refused(assets, tmp_path):
    root, dit, toml = assets
    args = [a for a in base_args(dit, toml, tmp_path) if a != "--sdpa"]
    with pytest.raises(UserError, match="choose an attention implementation"):
        train(parse_args(args))
    with pytest.raises(UserError, match="--sage_attn is for inference only"):
        train(parse_args(args + ["--sage_attn"]))


def test_every_flag_that_docs_training_names_exists():
    import re

    from musubi_tuner.training.args import build_parser

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    ours = {s for a in build_parser()._actions for s in a.option_strings}
    accelerate_launch = {"--multi_gpu", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                         "--main_process_port", "--num_cpu_threads_per_process", "--cpu", "--quiet"}
    sample_prompt_options = {"--w", "--h", "--f", "--d", "--s", "--g", "--fs", "--l", "--n", "--i"}  # inside prompt files
    other_commands = {"--workdir", "--lora_weight"}  # the demo's, hv_generate_video's
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", doc)) - {"--metadata_"}
    unknown = named - ours - accelerate_launch - sample_prompt_options - other_commands
    assert not unknown, f"docs/training.md names flags hv_train_network.py does not have: {sorted(unknown)}"
    assert len(named & ours) > 60


@pytest.mark.slow
def test_compile_trains_the_same_lora_with_checkpointing_and_block_swap(assets, tmp_path):
    """The trainer compiles its blocks one by one (dynamo's eager backend: the tracing without code generation, still
    about 10 s here) under block swap's hooks and gradient checkpointing's recomputation; tests/hunyuan/test_compile.py
    checks the gradients through AOT autograd."""
    root, dit, toml = assets
    flags = ("--max_train_steps", "1", "--gradient_checkpointing", "--blocks_to_swap", "1")
    eager = load_lora(train(parse_args(base_args(dit, toml, tmp_path / "eager", *flags))))
    compiled = load_lora(train(parse_args(base_args(dit, toml, tmp_path / "compiled", *flags, "--compile", "--compile_backend", "eager"))))
    assert eager.keys() == compiled.keys()
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=1e-4, atol=1e-6), key


def test_a_dataset_folder_whose_name_is_not_utf8_gives_a_lora_every_safetensors_reader_opens(assets, tmp_path):
    """A folder named in Latin-1 (b'caf\\xe9', a zip unpacked on Linux) is a valid name, which a JSON dataset config
    names with the escape "\\udce9", as Python's json reads it. The name went into the LoRA's metadata as that escape of
    a lone surrogate, which the safetensors library (ComfyUI, musubi-tuner, diffusers) refuses in a header (fuzz_aa 2):
    now it is the text \\xe9, and the sd-scripts hash is of what is written."""
    import json
    import os

    from safetensors.torch import load as safetensors_load

    from musubi_tuner.networks.lora_metadata import sd_scripts_hashes

    root, dit, _ = assets
    write_cached_dataset(tmp_path / "data", items=2, frames=5, size=(64, 48))
    folder = os.fsdecode(os.fsencode(tmp_path / "data") + b"/caf\xe9")
    os.rename(tmp_path / "data" / "videos", folder)
    config = tmp_path / "dataset.json"
    config.write_text(json.dumps({"general": {"resolution": [64, 48], "caption_extension": ".txt", "enable_bucket": True},
                                  "datasets": [{"video_directory": folder, "cache_directory": str(tmp_path / "data" / "cache"),
                                                "target_frames": [5]}]}))
    final = train(parse_args(base_args(dit, config, tmp_path / "out", "--max_train_steps", "1", "--lora_format", "musubi")))
    safetensors_load(final.read_bytes())
    _, meta = read_safetensors_header(final)
    assert json.loads(meta["ss_datasets"])[0]["video_directory"] == "caf\\xe9"  # (a strict JSON reader takes it)
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    assert sd_scripts_hashes(load_lora(final), ss)[0] == meta["sshs_model_hash"]


@pytest.mark.parametrize("flag", ["--output_name", "--training_comment", "--metadata_author"])
def test_text_flags_that_are_not_utf8_are_refused_when_the_command_line_is_read(assets, tmp_path, flag):
    """Bytes that are not UTF-8 in a text flag (a script saved in Latin-1) made a UnicodeEncodeError after the whole run,
    the LoRA lost (fuzz_aa 2); --prompt was already refused so."""
    root, dit, toml = assets
    argv = [a for a in base_args(dit, toml, tmp_path) if a not in ("--output_name", "tiny")] + [flag, "x\udcffy"]
    argv += ["--output_name", "tiny"] if flag != "--output_name" else []
    with pytest.raises(UserError, match=rf"^{flag} is not UTF-8 text \(byte 0xff at character 2\); check the terminal"):
        parse_args(argv)


def test_a_step_of_several_micro_batches_logs_their_mean_loss(assets, tmp_path):
    """fuzz_ai 1: with --gradient_accumulation_steps N the loss of a step (CSV, progress bar, loss/current) was its
    last micro-batch's alone. With a learning rate too small to move the LoRA, each micro-batch's loss is the loss of
    the same batch trained one per step (sample noise and timesteps depend on the item and epoch only)."""
    import csv

    root, dit, toml = assets

    def losses(out, *extra):
        train(parse_args(base_args(dit, toml, out, "--learning_rate", "1e-30", "--max_train_epochs", "2", *extra)))
        with open(out / "tiny-loss.csv") as f:
            return [float(row[2]) for row in csv.reader(f) if row and row[0] == "train"]

    single, paired = losses(tmp_path / "one"), losses(tmp_path / "two", "--gradient_accumulation_steps", "2")
    assert len(single) == 8 and len(paired) == 4
    assert paired == pytest.approx([(single[2 * k] + single[2 * k + 1]) / 2 for k in range(4)], rel=1e-5)


def test_tensorboard_gets_the_scalars_musubi_tuner_logs_for_max_norm_and_lora_plus(assets, tmp_path):
    """fuzz_ai 4: --scale_weight_norms acted without showing how many keys it scaled, and with LoRA+ only the base
    group's rate was logged; musubi-tuner logs max_norm/keys_scaled, /average_key_norm, /max_key_norm and lr/unet plus."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, dit, toml = assets
    train(parse_args(base_args(dit, toml, tmp_path / "out", "--max_train_steps", "3", "--learning_rate", "1e-2",
                               "--scale_weight_norms", "0.001", "--network_args", "loraplus_lr_ratio=4",
                               "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"))))
    (folder,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(next(p.parent for p in folder.rglob("events.out.tfevents.*")))).Reload()
    tags = events.Tags()["scalars"]
    assert {"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm", "lr/unet", "lr/unet plus"} <= set(tags)
    plus, base = events.Scalars("lr/unet plus")[-1].value, events.Scalars("lr/unet")[-1].value
    assert plus == pytest.approx(4 * base)
    assert events.Scalars("max_norm/keys_scaled")[-1].value > 0  # a bound that small scales every trained key
    assert events.Scalars("max_norm/max_key_norm")[-1].value <= 0.001 * 1.001


def test_a_fresh_run_starts_its_own_loss_history(assets, tmp_path):
    """fuzz_ak 10: a run into a folder holding an earlier run's loss CSV kept that run's step-0 validation point (and
    drew it as its validation curve), though it had no validation."""
    import csv

    root, dit, toml = assets
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny-loss.csv").write_text("kind,step,loss\nvalidation,0,1.5837\ntrain,1,1.6\n")
    train(parse_args(base_args(dit, toml, out, "--max_train_steps", "2")))
    with open(out / "tiny-loss.csv") as f:
        rows = [(r["kind"], int(r["step"])) for r in csv.DictReader(f)]
    assert rows == [("train", 1), ("train", 2)]


def test_many_short_epochs_say_how_to_keep_the_loader_workers(assets, tmp_path, caplog):
    """fuzz_am 8: each epoch restarts the loader's workers (about 1.4 s each): 300 one-image epochs took 423 s, 47 s as
    one epoch of 300 steps; nothing told the user of --persistent_data_loader_workers."""
    import logging

    from musubi_tuner.training.loop import say_the_length

    args = parse_args(base_args(*assets[1:], tmp_path, "--max_data_loader_n_workers", "2"))
    with caplog.at_level(logging.INFO):
        say_the_length(args, batches_per_epoch=1, total_steps=300)
    assert "300 epochs of 1 batch(es): the data loader starts its" in caplog.text and "--persistent_data_loader_workers" in caplog.text
    caplog.clear()
    for quiet in (parse_args(base_args(*assets[1:], tmp_path, "--max_data_loader_n_workers", "2", "--persistent_data_loader_workers")),
                  parse_args(base_args(*assets[1:], tmp_path))):  # (the workers kept, or none: base_args gives 0)
        with caplog.at_level(logging.INFO):
            say_the_length(quiet, batches_per_epoch=1, total_steps=300)
    assert "persistent" not in caplog.text
