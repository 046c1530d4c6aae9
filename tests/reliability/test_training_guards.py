"""Training when the numbers go wrong, and what --resume auto finds after crashes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from command_runner import no_traceback, run_command
from helpers import dead_pid, write_cached_dataset
from reliability_cases import leftovers, train_argv, write

from musubi_tuner import files

ROOT = Path(__file__).resolve().parents[2]


def poison_text(cache: Path, value: float) -> None:
    """Put `value` into a text cache's LLM states, stored in float32 (a latent cache of such a value, no VAE's, is
    refused as a damaged one when it is read)."""
    f = files.StateDictFile(cache)
    tensors = f.load_all()
    key = next(k for k in tensors if k.startswith("llm_") and tensors[k].is_floating_point())
    states = tensors.pop(key).float()
    states.view(-1)[0] = value
    files.save_safetensors({**tensors, key.replace("float16", "float32"): states}, cache, metadata=f.metadata)


def test_nan_loss_stops_naming_the_step_the_items_and_the_last_good_checkpoint(assets, tmp_path):
    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.data.training_dataset import TrainingDataset

    toml = write_cached_dataset(tmp_path / "data", items=3, frames=5, size=(32, 32))
    data = TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=1)
    (second,) = data[data.epoch_plan(1)[1]]["item_names"]  # the batch of step 2: step 1 saves a good checkpoint first
    stem = second.split("_00000-")[0]
    poison_text(tmp_path / "data" / "cache" / f"{stem}_hv_te.safetensors", 3e38)  # finite, and past what the forward can hold
    out = tmp_path / "out"
    result = run_command("hv_train_network", train_argv(assets, out, "--save_every_n_steps", "1", "--max_train_steps", "6",
                                                        toml=toml), tmp_path)
    no_traceback(result)
    (line,) = result.error_lines
    last_good = out / "tiny-step00000001.safetensors"
    assert result.code == 2
    # (a value past any text encoder's output: the cache is refused at the step that reads it, before its loss is NaN,
    # naming the last good checkpoint: 49b3d38, 89406e0)
    text_cache = tmp_path / "data" / "cache" / f"{stem}_hv_te.safetensors"
    assert line == (f"error: {text_cache}: llm_float32 reaches 3e+38, where a text encoder's outputs stay below 3e+04 (in "
                    "float16, in which caching runs them, past it is an overflow): a damaged cache; delete it and run "
                    f"cache_text_encoder_outputs.py again. Last good checkpoint: {last_good}.")
    assert files.StateDictFile(last_good).load_all()
    assert not (out / "tiny-step00000002.safetensors").exists() and not leftovers(out)


def test_a_nan_loss_before_any_update_blames_the_inputs_not_the_learning_rate(assets, tmp_path):
    """fuzz_ar 3: a text cache of huge values made the first loss NaN, blamed on --learning_rate (which had not acted yet:
    the LoRA adds nothing before its first update) and named the batch's latent cache alone."""
    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.data.training_dataset import TrainingDataset

    toml = write_cached_dataset(tmp_path / "data", items=2, frames=5, size=(32, 32))
    data = TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=1)
    (first,) = data[data.epoch_plan(1)[0]]["item_names"]
    poison_text(tmp_path / "data" / "cache" / f"{first.split('_00000-')[0]}_hv_te.safetensors", 3e38)
    earlier = "kind,step,loss\ntrain,1,0.5\ntrain,2,0.25\n"  # an earlier run's curve: a run that made no step keeps it
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiny-loss.csv").write_text(earlier)  # (it was replaced by a header: fuzz_au 2)
    result = run_command("hv_train_network", train_argv(assets, tmp_path / "out", "--max_train_steps", "2", toml=toml), tmp_path)
    assert (tmp_path / "out" / "tiny-loss.csv").read_text() == earlier
    no_traceback(result)
    text_cache = tmp_path / "data" / "cache" / f"{first.split('_00000-')[0]}_hv_te.safetensors"
    assert result.code == 2 and result.error_lines == [  # (the cache named before its loss is NaN: 49b3d38)
        f"error: {text_cache}: llm_float32 reaches 3e+38, where a text encoder's outputs stay below 3e+04 (in float16, in "
        "which caching runs them, past it is an overflow): a damaged cache; delete it and run cache_text_encoder_outputs.py "
        "again. Last good checkpoint: none yet."], result.err[-2000:]


def test_a_run_that_stops_keeps_every_step_it_made_in_its_loss_csv(assets, tmp_path):
    """fuzz_ao 11: the live loss CSV is written every few seconds, and a run that stopped (Stop, Ctrl-C, a NaN) lost the
    steps since: the curve ended a few steps before the run."""
    import csv

    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.data.training_dataset import TrainingDataset

    toml = write_cached_dataset(tmp_path / "data", items=6, frames=5, size=(32, 32))
    data = TrainingDataset.from_config(load_dataset_config(toml, check_sources=False), seed=1)
    (fourth,) = data[data.epoch_plan(1)[3]]["item_names"]
    poison_text(tmp_path / "data" / "cache" / f"{fourth.split('_00000-')[0]}_hv_te.safetensors", 3e38)
    out = tmp_path / "out"
    result = run_command("hv_train_network", train_argv(assets, out, "--max_train_steps", "6", toml=toml), tmp_path)
    assert result.code == 2 and "llm_float32 reaches 3e+38" in result.error_lines[0], result.err[-2000:]  # (at step 4)
    with open(out / "tiny-loss.csv", newline="") as f:
        steps = [int(row[1]) for row in csv.reader(f) if row[0] == "train"]
    assert steps == [1, 2, 3]


def test_a_diverging_run_names_a_finite_checkpoint_saved_before_the_bad_update_and_resumes_from_it(assets, tmp_path):
    """A learning rate of 1e6 sends the update past anything a trained LoRA holds within a few updates. Every step is
    saved: the error must name the newest checkpoint that every reader takes, and its state must resume."""
    from musubi_tuner.networks.lora_reader import read_lora

    out = tmp_path / "out"
    argv = train_argv(assets, out, "--save_every_n_steps", "1", "--save_state", "--max_train_steps", "8", "--max_grad_norm", "0",
                      "--optimizer_type", "SGD", "--learning_rate", "1e6")
    result = run_command("hv_train_network", argv, tmp_path)
    no_traceback(result)
    assert result.code == 2, result.err[-3000:]
    (line,) = result.error_lines
    match = re.search(r"Last good checkpoint: (\S+\.safetensors) \(state (\S+)\)[. ]", line)
    assert match, line
    lora, state = Path(match[1]), Path(match[2])
    assert all(torch.isfinite(t).all() for t in files.StateDictFile(lora).load_all().values())
    for saved in out.glob("tiny-step*.safetensors"):  # nothing non-finite or diverged was ever written
        assert all(torch.isfinite(t).all() for t in files.StateDictFile(saved).load_all().values()), saved
        read_lora(saved)
    step = json.loads((state / "train_state.json").read_text())["global_step"]
    assert lora.name == f"tiny-step{step:08d}.safetensors" and not (out / f"tiny-step{step + 1:08d}.safetensors").exists()

    resumed = run_command("hv_train_network", train_argv(assets, tmp_path / "again", "--resume", str(state), "--optimizer_type", "SGD",
                                                         "--learning_rate", "1e6", "--max_grad_norm", "0",
                                                         "--max_train_steps", str(step + 1)), tmp_path)
    assert f"resumed from {state} at step {step}" in resumed.err, resumed.err[-3000:]
    # the same rate (a --resume keeps its state's) diverges again: the checkpoint it resumed from is named, with the way
    # to a lower rate (fuzz_ar 10: "Last good checkpoint: none yet", and "Lower --learning_rate", which --resume ignores)
    assert resumed.code == 2 and f"Last good checkpoint: {lora} (state {state}, which this run resumed from)" in resumed.err
    assert f"in a new run with --network_weights {lora}: --resume continues at its state's rate" in resumed.err


@pytest.mark.parametrize("flags, refusal", [
    # finite in float32, infinite once cast to fp16 (above 65504): refused whole, as a NaN one is (a tiny alpha keeps the
    # update itself small: weights past fp16's range with an update a LoRA can make)
    (["--save_every_n_steps", "1", "--max_train_steps", "2", "--max_grad_norm", "0", "--optimizer_type", "SGD", "--learning_rate",
      "1e14", "--network_alpha", "1e-4", "--save_precision", "fp16"],
     r"error: \S+/tiny-step00000001\.safetensors: not saved: lora_unet_\S+ does not fit --save_precision fp16 at step 1 \(its "
     r"largest value is \S+\)\. Last good checkpoint: none yet\. Lower --learning_rate, or save in bf16 or float\."),
    # one update at a learning rate of 1e30: finite weights of 1e24 and more were saved with exit 0, and every reader now
    # refuses such a file (lora_reader.DIVERGED_UPDATE)
    (["--max_train_steps", "1", "--learning_rate", "1e30"],
     r"error: \S+/tiny\.safetensors: not saved at step 1: \S+: its update reaches .+ per weight, where a trained LoRA's stays "
     r"well below 1 \(a diverged training\)\. Last good checkpoint: none yet\. Lower --learning_rate\."),
])
def test_a_lora_that_no_reader_would_take_is_not_saved(assets, tmp_path, flags, refusal):
    out = tmp_path / "out"
    result = run_command("hv_train_network", train_argv(assets, out, *flags), tmp_path)
    no_traceback(result)
    assert result.code == 2, result.err[-3000:]
    (line,) = result.error_lines
    assert re.fullmatch(refusal, line), line
    assert not list(out.glob("*.safetensors")) and not leftovers(out)


def _state_like(src: Path, dst: Path, step: int | None) -> Path:
    """A copy of a state folder claiming `step` (None: without its completion marker, as a half-written one)."""
    shutil.copytree(src, dst)
    marker = dst / "train_state.json"
    if step is None:
        marker.unlink()
    else:
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "global_step": step}))
    return dst


def test_resume_auto_takes_the_newest_complete_state_and_clears_a_killed_runs_leftovers(assets, tmp_path):
    from musubi_tuner.training.state import newest_state

    out = tmp_path / "out"
    argv = train_argv(assets, out, "--save_every_n_steps", "2", "--save_state")
    assert run_command("hv_train_network", argv + ["--max_train_steps", "4"], tmp_path).code == 0
    # what runs killed later would leave: a state folder without its marker, one still being written, a temp
    # file, and a .old folder half deleted
    step4 = out / "tiny-step00000004-state"
    half = _state_like(step4, out / "tiny-step00000006-state", None)
    writing = _state_like(step4, out / "tiny-step00000008-state.incomplete", 8)
    old = out / "tiny-state.old"
    old.mkdir()
    write(old / "optimizer.pt", b"partial")
    temp = write(out / f".tiny-step00000008.safetensors.{dead_pid()}-k2j4m9x0.tmp", b"partial")
    assert json.loads((newest_state(out) / "train_state.json").read_text())["global_step"] == 4

    result = run_command("hv_train_network", argv + ["--max_train_steps", "6", "--resume", "auto"], tmp_path)
    assert result.code == 0, result.err[-3000:]
    assert re.search(r"resumed from \S+/tiny(-step00000004)?-state at step 4", result.err)
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


@pytest.mark.parametrize("resumed", [True, False], ids=["resumed", "fresh"])
def test_pruning_keeps_the_last_n_and_removes_what_a_killed_run_left_behind(tmp_path, resumed):
    """A resumed run removes every save up to the window's edge (what the killed run left); a fresh run only the save
    that left the window, as musubi-tuner: the others are an earlier run's, which it says it leaves (it removed them:
    fuzz_am 4)."""
    from types import SimpleNamespace

    from musubi_tuner.training.checkpointing import CheckpointSaver

    saver = CheckpointSaver.__new__(CheckpointSaver)  # only the pruning: no network, no accelerator
    saver.out, saver.name, saver.accelerator, saver.hub = tmp_path, "x", SimpleNamespace(is_main_process=True), None
    saver.resumed_from = tmp_path / "x-step00000008-state" if resumed else None
    saver.args = SimpleNamespace(save_every_n_steps=2, save_last_n_steps=4, save_last_n_steps_state=None, save_state=True,
                                 save_every_n_epochs=1, save_last_n_epochs=2, save_last_n_epochs_state=None)
    for stem in [f"x-step{s:08d}" for s in (2, 4, 6, 8, 10)] + [f"x-{e:06d}" for e in (1, 2, 3, 4)] + ["xy-step00000002"]:
        write(tmp_path / f"{stem}.safetensors", b"")
        write(tmp_path / f"{stem}.comfyui.safetensors", b"")
        (tmp_path / f"{stem}-state").mkdir()
    (tmp_path / "x-step00000002.safetensors").unlink()  # killed between removing a LoRA and its companion
    saver.prune_steps(10)  # step 4 leaves the window; step 2 is what a run killed before its pruning left
    saver._prune_epochs(4)
    left = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors" and ".comfyui" not in p.name)
    earlier = [] if resumed else ["x-000001.safetensors"]  # (x-step00000002.safetensors: unlinked above)
    assert left == [*earlier, "x-000003.safetensors", "x-000004.safetensors", "x-step00000006.safetensors",
                    "x-step00000008.safetensors", "x-step00000010.safetensors", "xy-step00000002.safetensors"]
    states = sorted(p.name for p in tmp_path.glob("*-state"))
    assert states == sorted([n.replace(".safetensors", "-state") for n in left] + ([] if resumed else ["x-step00000002-state"]))
    assert len(list(tmp_path.glob("*.comfyui.safetensors"))) == len(left) + (0 if resumed else 1)


def test_as_a_script_the_refusal_is_the_only_line_on_stderr(assets, tmp_path):
    """Started exactly as users type it: a refused pickle prints one line naming the object refused (not the opening of
    torch's paragraph on its weights_only default), no torch warning wall, and runs nothing."""
    from reliability_cases import evil_pt

    result = subprocess.run([sys.executable, "src/musubi_tuner/cache_latents.py", "--dataset_config", str(assets.dataset),
                             "--vae", str(evil_pt(tmp_path))], cwd=ROOT, capture_output=True, text=True)
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2 and re.fullmatch(r"error: \S+evil\.pt: refused to load: the pickle holds objects other than "
                                                   r"tensors and plain containers \(it could run code when unpickled; (?!Weights only)[^;]*\)", line)
    assert not (Path.cwd() / "pwned_by_pickle").exists()


def test_debug_shows_the_traceback(assets, tmp_path):
    result = run_command("cache_latents", ["--dataset_config", str(assets.dataset), "--vae", str(tmp_path / "vae.pt"), "--debug"],
                         tmp_path)
    assert result.code == 1 and "Traceback" in result.err and "UserError: " in result.err and "VAE checkpoint not found" in result.err


def test_the_seeds_training_command_prints_only_our_lines(assets, tmp_path):
    """Started as users type it (AdamW8bit, the default constant schedule): every line on stderr is ours or a progress
    bar. bitsandbytes 0.50 logs at import that it could not fetch a 4-bit CPU kernel from the hub, which training
    never uses; and transformers' schedules import peft and bitsandbytes (seconds) for a constant learning rate."""
    argv = train_argv(assets, tmp_path / "out", "--gradient_checkpointing")
    argv[argv.index("adamw")] = "adamw8bit"
    result = subprocess.run([sys.executable, "src/musubi_tuner/hv_train_network.py", *argv], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONWARNINGS": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    foreign = [line for line in result.stderr.splitlines() if line.strip()
               and not re.match(r"(INFO|WARNING) musubi_tuner[.:]|steps: |saved ", line.split("\r")[-1])]
    assert not foreign, foreign


def _lora_sizes(assets, tmp_path) -> tuple[int, int]:
    """(bytes of the final LoRA file a run of train_argv writes, bytes of its tensors alone), from a probe run."""
    from command_runner import read_only_mounts_work

    if not read_only_mounts_work():
        pytest.skip("needs a private mount namespace (root with CAP_SYS_ADMIN)")
    probe = run_command("hv_train_network", train_argv(assets, tmp_path / "probe", "--lora_format", "musubi"), tmp_path)
    assert probe.code == 0, probe.err[-3000:]
    path = tmp_path / "probe" / "tiny.safetensors"
    return path.stat().st_size, sum(t.nbytes for t in files.StateDictFile(path).load_all().values())


def test_a_disk_with_room_for_the_loras_tensors_but_not_its_header_is_refused_at_the_start(assets, tmp_path):
    """The start's check of free space counted the tensors only: a disk within the header's few kilobytes of full
    passed it, and the run trained to its end to fail at the final save."""
    size, tensors = _lora_sizes(assets, tmp_path)
    disk = 4096 + -(-tensors // 4096) * 4096  # the run's lock file, and the tensors' bytes rounded up to whole blocks
    assert disk - 4096 < size, "the test needs a header larger than the rounding"
    out, elsewhere = tmp_path / "out", tmp_path / "tmp"
    elsewhere.mkdir()
    result = run_command("hv_train_network", train_argv(assets, out, "--lora_format", "musubi"), tmp_path,
                         small_disk=(out, disk), env={"TMPDIR": str(elsewhere)})
    no_traceback(result)
    (line,) = result.error_lines
    assert result.code == 2
    assert re.fullmatch(r"error: \S+/out: 0\.\d MB free, and each save of this run writes about 0\.\d MB \(the LoRA\); free some "
                        r"space or choose another --output_dir", line), line
    assert not list(elsewhere.iterdir())  # refused before training, not rescued after it


def test_a_rescue_name_is_taken_by_one_run_only(tmp_path):
    """fuzz_aq 13: two runs rescuing at once both chose the first free name (checked, then written), and one rescued
    LoRA replaced the other. A name is taken by creating it, exclusively, in a second process here."""
    import subprocess
    import sys

    from musubi_tuner.training.checkpointing import _taken

    name = tmp_path / "l-rescued-step00000012.safetensors"
    assert _taken(name) and name.stat().st_size == 0
    code = f"from musubi_tuner.training.checkpointing import _taken; print(_taken({str(name)!r}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("steps, saved", [(3, "tiny"), (4, "tiny-step00000004")], ids=["final", "periodic-on-the-last-step"])
def test_a_lora_the_disk_has_no_room_for_is_saved_in_the_temporary_folder_and_named(assets, tmp_path, steps, saved):
    """A full disk at the final save lost the run's training (all of it, without --save_state): the LoRA was in memory
    only. It is written to the temporary folder instead, and the error names it. A periodic save on the run's last step
    (the usual case: --save_every_n_steps dividing the steps) was not rescued, and lost it too (fuzz_aq 6)."""
    size, _ = _lora_sizes(assets, tmp_path)
    # a disk with room for one save (the start's check) beside the run's lock file, which the save at step 2 fills: the
    # next one finds no room
    disk = 4096 + -(-(size + 48 * 1024) // 4096) * 4096
    out, elsewhere = tmp_path / "out", tmp_path / "tmp"
    elsewhere.mkdir()
    earlier = elsewhere / f"tiny-rescued-step{steps:08d}.safetensors"  # an earlier run's rescue of the same name and step
    earlier.write_bytes(b"an earlier run's LoRA")  # (was replaced; another user's in a shared /tmp refused the write)
    result = run_command("hv_train_network", train_argv(assets, out, "--lora_format", "musubi", "--max_train_steps", str(steps),
                                                        "--save_every_n_steps", "2"), tmp_path,
                         small_disk=(out, disk), env={"TMPDIR": str(elsewhere)})
    no_traceback(result)
    (line,) = result.error_lines
    rescued = elsewhere / f"tiny-rescued-step{steps:08d}-1.safetensors"
    assert earlier.read_bytes() == b"an earlier run's LoRA"
    assert result.code == 2
    assert re.fullmatch(rf"error: \S+/out/{saved}\.safetensors: cannot write .*No space left on device.*\. The trained LoRA "
                        rf"is saved as {re.escape(str(rescued))} instead: move it where it belongs", line), line
    weights = files.StateDictFile(rescued).load_all()
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert files.read_safetensors_header(rescued)[1]["ss_steps"] == str(steps)  # the run's metadata, as its file's


def test_a_save_into_a_name_another_command_is_writing_is_refused_naming_it_and_the_lora_rescued(assets, tmp_path):
    """fuzz_at 1: a merge into a step checkpoint's name, started before the run, replaced that checkpoint with the merged
    DiT once it renamed its file; both said they had saved it."""
    import subprocess
    import sys



    out, rescues = tmp_path / "out", tmp_path / "rescues"
    out.mkdir()
    rescues.mkdir()
    step = out / "tiny-step00000002.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom musubi_tuner.files import RunLock, output_file_lock\n"
                               f"with RunLock(output_file_lock({str(step)!r}), 'merge into this file', '--save_merged_model'):\n"
                               "    print('held', flush=True)\n    time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = run_command("hv_train_network", train_argv(assets, out, "--lora_format", "musubi", "--max_train_steps", "3",
                                                            "--save_every_n_steps", "2"), tmp_path, env={"TMPDIR": str(rescues)})
    finally:
        holder.kill()
        holder.wait()
    no_traceback(result)
    assert result.code == 2 and re.fullmatch(
        rf"error: --output_dir / --output_name {re.escape(str(step))}: another command is writing this file \(pid {holder.pid} .*\)"
        rf"; wait for it to end, or choose another name\. The trained LoRA is saved as {re.escape(str(rescues))}/tiny-rescued-"
        rf"step00000002\.safetensors instead: move it where it belongs", result.error_lines[0]), result.error_lines
    assert not step.exists()
