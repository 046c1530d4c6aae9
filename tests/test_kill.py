"""kill -9 during a checkpoint save and during a training step: `--resume auto` finishes the run, what is on disk
is always whole (the old file or the new one), and the final LoRA is the uninterrupted run's.

The trainer runs as a subprocess, exactly as users start it, and is killed from outside with SIGKILL: once
the moment a save has a temporary file open, once as the state of a (seeded) random step appears. (Killing the caching commands
is tested with them.)
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import folder_once, write_cached_dataset
from musubi_tuner.demo.tiny_dit import TINY_DIT, random_dit_state_dict, write_dit
from musubi_tuner.files import StateDictFile, load_torch_file
from musubi_tuner.training.state import STATE_MARKER, newest_state

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def train_argv(dit: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "adamw", "--seed", "7", "--dit_dtype", "float32",
            "--max_data_loader_n_workers", "0", "--max_train_steps", str(STEPS), "--output_dir", str(out), "--output_name", "tiny",
            *extra]


def environment() -> dict[str, str]:
    # the same thread count as this process (conftest), so that both runs add up in the same order
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(torch.get_num_threads()))


def start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, str(ROOT / "src" / "musubi_tuner" / "hv_train_network.py"), *argv],
                                cwd=ROOT, env=environment(), stdout=f, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """SIGKILL the process as soon as `ready()` is true; fails if the run ends or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run finished before the moment to kill it came"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL


def saving(out: Path, after_step: int):
    """True while a save after `after_step` has a file or state folder half-written."""
    def ready() -> bool:
        if not (out / f"tiny-step{after_step:08d}-state").is_dir():
            return False
        return any(p.name.endswith((".tmp", ".incomplete")) for p in os.scandir(out))
    return ready


def state_appears(out: Path, step: int):
    """True once the state of `step` is in place: the run is then pruning or already computing the next step."""
    return lambda: (out / f"tiny-step{step:08d}-state").is_dir()


def assert_whole(out: Path) -> None:
    """Every file a run leaves is whole; only temp files and .incomplete folders (never read as real) may be partial."""
    for path in out.iterdir():
        if path.name.endswith((".tmp", ".incomplete")) or re.fullmatch(r"\.musubi-train\..*\.lock", path.name):  # the killed
            continue  # run's lock: taken over
        if path.suffix == ".safetensors":
            StateDictFile(path).load_all()
        elif path.suffix == ".csv":
            rows = list(csv.DictReader(path.open()))
            assert rows and all(r["step"].isdigit() for r in rows), path
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.is_dir() and path.name.endswith(("-state", "-state.old")):
            assert (path / STATE_MARKER).is_file(), f"{path} has no {STATE_MARKER}"
            StateDictFile(path / "network.safetensors").load_all()
            assert load_torch_file(path / "optimizer.pt")["optimizer"]["state"]
            load_torch_file(path / "rng_0.pt")
        else:
            raise AssertionError(f"unexpected {path}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from musubi_tuner import hv_train_network

    root = tmp_path_factory.mktemp("kill")
    dit = write_dit(root / "dit.pt", random_dit_state_dict(TINY_DIT), TINY_DIT, "pt")
    toml = write_cached_dataset(root / "data", items=3, frames=5, size=(32, 32))  # 3 batches per epoch: resumes cross epochs
    hv_train_network.main(train_argv(dit, toml, root / "straight"))
    return dit, toml, StateDictFile(root / "straight" / "tiny.safetensors").load_all()


def test_kill_during_a_save_and_during_a_step_then_resume_auto_finishes_as_an_uninterrupted_run(setup, tmp_path):
    dit, toml, straight = setup
    out, log = tmp_path / "out", tmp_path / "train.log"
    argv = train_argv(dit, toml, out, "--save_every_n_steps", "1", "--save_state", "--save_last_n_steps", "2", "--resume", "auto")
    rng = random.Random(10)

    kill_when(start(argv, log), saving(out, after_step=rng.randint(1, 3)))  # while a save has its temp file open
    assert_whole(out)
    resumes_at = json.loads((newest_state(out) / STATE_MARKER).read_text())["global_step"]
    kill_when(start(argv, log), state_appears(out, min(resumes_at + rng.randint(1, 2), STEPS - 1)))  # a random step later
    assert_whole(out)
    final = start(argv, log)
    assert final.wait(600) == 0, log.read_text()[-3000:]

    assert_whole(out)
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".incomplete", ".old", ".lock"))]
    assert log.read_text().count("resumed from") == 2, log.read_text()[-3000:]
    assert log.read_text().count("taking over the lock of a training run that did not finish") == 2
    resumed = StateDictFile(out / "tiny.safetensors").load_all()
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], rtol=0, atol=1e-5), key
    # --save_last_n_steps 2 keeps the steps within 2 of the last (musubi-tuner's arithmetic): nothing piles up across the kills
    assert sorted(p.name for p in out.glob("tiny-step*")) == [
        f"tiny-step{s:08d}{suffix}" for s in range(STEPS - 2, STEPS + 1) for suffix in ("-state", ".comfyui.safetensors", ".safetensors")]


def test_a_run_killed_while_it_prunes_a_state_leaves_that_state_whole_or_gone(setup, tmp_path):
    """--save_last_n_steps deletes old state folders. A kill part-way through a deletion must not leave a state
    folder with some of its files under its own name, which --resume auto could take for a state. The state is
    padded with many files so that its deletion takes long enough to be killed in."""
    dit, toml, _ = setup
    out, log = tmp_path / "out", tmp_path / "train.log"
    argv = train_argv(dit, toml, out, "--save_every_n_steps", "1", "--save_state", "--save_last_n_steps", "2", "--resume", "auto")
    kill_when(start(argv, log), state_appears(out, 1))
    first, files = out / "tiny-step00000001-state", 30000
    (first / "padding").mkdir()
    for i in range(files):
        (first / "padding" / str(i)).touch()

    def pruning() -> bool:
        try:
            return len(os.listdir(first / "padding")) < files
        except FileNotFoundError:
            return True
    kill_when(start(argv, log), pruning)

    assert not first.exists() or len(os.listdir(first / "padding")) == files, "a half-deleted state is left under its name"
    assert_whole(out)
    final = start(argv, log)
    assert final.wait(600) == 0, log.read_text()[-3000:]
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".incomplete", ".old", ".lock"))]
    assert not first.exists()


def test_a_run_stopped_after_its_last_steps_state_is_finished_by_resume_auto(setup, tmp_path):
    """A run that stops after its last step's state and before its final save (killed, or failing at the end as here:
    a folder made where its final LoRA goes once it has started) is finished by --resume auto, which trains nothing:
    before, it said "nothing left to train" and wrote no final LoRA, ever."""
    dit, toml, straight = setup
    out, log = tmp_path / "out", tmp_path / "train.log"
    argv = train_argv(dit, toml, out, "--save_every_n_steps", "1", "--save_state", "--save_last_n_steps", "2", "--resume", "auto")
    out.mkdir()
    (out / "tiny.comfyui.safetensors").write_bytes(b"an earlier run's copy")
    folder_once(out / "tiny-step00000001.safetensors", out / "tiny.safetensors")
    assert start(argv, log).wait(600) == 2  # "cannot write: a folder has this name"
    assert (out / f"tiny-step{STEPS:08d}-state").is_dir() and not (out / "tiny-state").exists(), log.read_text()[-3000:]
    # the pair's other file, renamed first, is undone: not this run's copy beside another file
    assert (out / "tiny.comfyui.safetensors").read_bytes() == b"an earlier run's copy"

    (out / "tiny.safetensors").rmdir()
    assert start(argv, log).wait(600) == 0, log.read_text()[-3000:]
    assert f"tiny-step{STEPS:08d}-state is the state of the last step ({STEPS}), saved before the run stopped" in log.read_text()
    assert "resumed from" in log.read_text() and "steps:  12%" not in log.read_text().split("resumed from")[-1]  # no step run
    assert_whole(out)
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".incomplete", ".old", ".lock"))]
    resumed = StateDictFile(out / "tiny.safetensors").load_all()
    assert StateDictFile(out / "tiny.comfyui.safetensors").load_all().keys()  # the pair, both of this save
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], rtol=0, atol=1e-5), key
    assert json.loads((out / "tiny-state" / STATE_MARKER).read_text())["global_step"] == STEPS
    assert start(argv, log).wait(600) == 0 and log.read_text().rstrip().endswith("nothing left to train, nothing written "
                                                                                 "(raise --max_train_steps or --max_train_epochs to train on)")


def test_a_run_killed_between_the_lora_and_its_comfyui_copy_leaves_no_copy_of_another_save(setup, tmp_path):
    """Both files of a save are written whole before either replaces the previous save's: a kill while the copy is
    written leaves the previous pair, never the new LoRA beside the previous save's copy."""
    import shutil

    from musubi_tuner.files import read_safetensors_header

    dit, toml, _ = setup
    out = tmp_path / "out"
    out.mkdir()
    for name in ("tiny.safetensors", "tiny.comfyui.safetensors"):  # an earlier run's pair (seed 7, 8 steps)
        shutil.copy(dit.parent / "straight" / name, out / name)
    run = start(train_argv(dit, toml, out, "--seed", "8", "--max_train_steps", "1"), tmp_path / "train.log")
    kill_when(run, lambda: any(p.name.startswith(".tiny.comfyui.safetensors.") for p in os.scandir(out)))
    main, copy = (read_safetensors_header(out / name)[1] for name in ("tiny.safetensors", "tiny.comfyui.safetensors"))
    assert (main["ss_seed"], main["ss_steps"]) == (copy["ss_seed"], copy["ss_steps"])


def test_sigterm_stops_a_run_as_ctrl_c_does_leaving_no_lock_or_temporary_file(setup, tmp_path):
    """docker stop, systemd and batch systems send SIGTERM: the run stops at once with 'terminated' and status 143,
    and the next run finds neither a lock to take over nor a temporary file to clear."""
    dit, toml, _ = setup
    out, log = tmp_path / "out", tmp_path / "train.log"
    argv = train_argv(dit, toml, out, "--save_every_n_steps", "1", "--save_state", "--resume", "auto")
    run = start(argv, log)
    deadline = time.monotonic() + 300
    while not (out / "tiny-step00000002-state").is_dir():
        assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 143, log.read_text()[-3000:]
    assert log.read_text().rstrip().endswith("terminated")
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".incomplete", ".lock"))]
    assert_whole(out)
    assert start(argv, log).wait(600) == 0, log.read_text()[-3000:]
    assert "taking over the lock" not in log.read_text() and log.read_text().count("resumed from") == 1


@pytest.mark.parametrize("second", ["ctrl-c", "launcher's sigterm"])
def test_two_quick_ctrl_cs_during_a_save_stop_the_run_in_one_line_and_resume_auto_finishes_it(setup, tmp_path, second):
    """A terminal sends Ctrl-C to the whole process group; pressed twice, the second met the clean-up of the first in a
    data-loader iterator's __del__ and printed "Exception ignored in ... Traceback" (fuzz_z 8). It stops at once,
    quietly, and what it was writing is cleared by the next run, as after a kill. accelerate launch passes one Ctrl-C
    on as a SIGTERM to the trainer, which did the same (fuzz_ax 11): it is let be, and the clean-up goes on."""
    dit, toml, _ = setup
    out, log = tmp_path / "out", tmp_path / "train.log"
    argv = train_argv(dit, toml, out, "--save_every_n_steps", "1", "--save_state", "--resume", "auto",
                      "--max_data_loader_n_workers", "2")
    with open(log, "ab") as f:
        run = subprocess.Popen([sys.executable, str(ROOT / "src" / "musubi_tuner" / "hv_train_network.py"), *argv], cwd=ROOT,
                               env=environment(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    ready, deadline = saving(out, 1), time.monotonic() + 300
    while not ready():
        assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.0005)
    os.killpg(run.pid, signal.SIGINT)
    time.sleep(0.01)
    os.killpg(run.pid, signal.SIGINT) if second == "ctrl-c" else run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert text.rstrip().endswith("interrupted") and "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    assert_whole(out)
    assert start(argv[:-2], log).wait(600) == 0, log.read_text()[-3000:]
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".incomplete", ".lock"))]


def _processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line holds `text` (a run's output folder: its data-loader workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes in /proc")
@pytest.mark.parametrize("sig, said", [(signal.SIGTERM, "terminated"), (signal.SIGHUP, "hung up")])
def test_a_hang_up_or_sigterm_to_the_trainer_alone_stops_its_data_loader_workers_too(setup, tmp_path, sig, said):
    """A closed terminal or ssh session sends SIGHUP; a job manager may signal the trainer's pid only. Before, SIGHUP
    ended the trainer at once without a word, its temporary files left, and a data-loader worker ran on, orphaned."""
    dit, toml, _ = setup
    out, log = tmp_path / "out", tmp_path / "train.log"
    argv = train_argv(dit, toml, out, "--save_every_n_steps", "1", "--max_data_loader_n_workers", "2",
                      "--persistent_data_loader_workers")
    run = start(argv, log)
    deadline = time.monotonic() + 300
    while not (out / "tiny-step00000002.safetensors").is_file():
        assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    assert len(_processes_naming(str(out))) >= 2, "the run's data-loader workers"
    run.send_signal(sig)
    assert run.wait(60) == 128 + sig, log.read_text()[-3000:]
    assert log.read_text().rstrip().endswith(said)
    deadline = time.monotonic() + 10
    while _processes_naming(str(out)) and time.monotonic() < deadline:  # (a worker notices a gone parent in a second)
        time.sleep(0.1)
    assert not _processes_naming(str(out)), "a data-loader worker outlived the run"
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".incomplete", ".lock"))]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("script", ["cache_latents.py", "cache_text_encoder_outputs.py", "hv_generate_video.py", "hv_train_network.py"])
@pytest.mark.parametrize("sig, said, status", [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)])
def test_a_signal_while_torch_loads_is_the_commands_one_line(script, sig, said, status, tmp_path):
    """Ctrl-C in a command's first second landed in the `import torch` at the top of its file: a traceback of the
    import (and a SIGTERM there ended it without a word). The signal is sent once torch's library is mapped."""
    run = subprocess.Popen([sys.executable, str(ROOT / "src" / "musubi_tuner" / script), "--help"], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{run.pid}/maps")
    deadline = time.monotonic() + 60
    while run.poll() is None and "libtorch" not in (maps.read_text() if maps.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    run.send_signal(sig)
    err = run.communicate(timeout=60)[1]
    assert (run.returncode, err.strip().splitlines()[-1:]) == (status, [said]), err


def test_a_command_started_under_nohup_keeps_ignoring_sighup():
    """`nohup` starts a command with SIGHUP ignored so that it outlives its terminal: the commands' handler must not
    take that back."""
    code = ("import os, signal\nfrom musubi_tuner.errors import stop_cleanly_on_sigterm\nstop_cleanly_on_sigterm()\n"
            "os.kill(os.getpid(), signal.SIGHUP)\nprint('still running')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert (done.returncode, done.stdout) == (0, "still running\n"), done.stderr


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes in /proc")
def test_sigterm_to_the_demo_stops_the_training_it_launched(tmp_path):
    """The demo ran each command with subprocess.run, which answered a SIGTERM by killing `accelerate launch` alone:
    the trainer under it ran on, orphaned, with its data-loader workers and its output folder's lock."""
    work = tmp_path / "demo"
    with open(tmp_path / "demo.log", "wb") as log:
        demo = subprocess.Popen([sys.executable, "-m", "musubi_tuner.demo", "--workdir", str(work), "--epochs", "500"], cwd=ROOT,
                                env=environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (work / "output" / "demo-lora-loss.csv").exists():  # training has made steps
            assert demo.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(0.1)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(120) == 143, (tmp_path / "demo.log").read_text()[-3000:]
        deadline = time.monotonic() + 10
        while _processes_naming(str(work)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_naming(str(work)), "the training outlived the demo"
        from musubi_tuner.files import RunLock, train_lock

        with RunLock(train_lock(work / "output", "demo-lora"), "training run", "--output_dir"):  # free (accelerate launch
            pass  # kills what is still cleaning up 5 s after it passed a stop on: the lock file may be left, not held)
    finally:
        for pid in _processes_naming(str(work)):
            os.kill(pid, signal.SIGKILL)
        demo.kill()


def test_a_hang_up_and_a_sigterm_arriving_together_stop_with_one_line():
    """fuzz_bd 8: a terminal's hang-up reaches a launched run as SIGHUP then SIGTERM within a millisecond. The first
    signal's handler set the others to SIG_IGN while the second was already on its way, and Python raised "OSError: Signal
    15 ignored due to race condition": a traceback in every process before its "hung up". Both pending at once here."""
    code = ("import os, signal, time\nfrom musubi_tuner.errors import run_cli\n"
            "def main(argv):\n"
            "    both = {signal.SIGHUP, signal.SIGTERM}\n"
            "    signal.pthread_sigmask(signal.SIG_BLOCK, both)\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    signal.pthread_sigmask(signal.SIG_UNBLOCK, both)\n"
            "    time.sleep(5)\n"
            "run_cli(main, [])\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGHUP and done.stderr.strip() == "hung up", done.stderr[-2000:]
