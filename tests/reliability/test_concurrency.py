"""Two runs at once, runs killed half-way, output cut short by a reader: real processes and real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from command_runner import no_traceback, run_command, start_command
from reliability_cases import (
    cache_latents_argv,
    copy_dataset,
    generate_argv,
    leftovers,
    merge_argv,
    train_argv,
)

from helpers import free_port
from musubi_tuner import files
from musubi_tuner.errors import UserError
from musubi_tuner.files import describe_holder, train_lock

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def wait_for(condition, started, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert started.process.exitcode is None, f"the run ended first: {started.stderr_so_far()[-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.0005)


def holder(lock: Path) -> dict:
    return json.loads(lock.read_text()) if lock.exists() and lock.read_text().strip() else {}


def test_a_second_training_of_the_same_name_into_the_same_folder_is_refused_and_a_killed_runs_lock_is_taken_over(assets, tmp_path):
    """Runs of other names share the folder (a sweep side by side, as musubi-tuner runs them: fuzz_at 4), unless their
    files would share names: the running run's step-4 checkpoint is tiny-step00000004.safetensors."""
    out = tmp_path / "out"
    lock = out / ".musubi-train.tiny.lock"
    first = start_command("hv_train_network", train_argv(assets, out, "--max_train_steps", "100000"), tmp_path)
    wait_for(lambda: holder(lock).get("pid") == first.pid, first)

    second = run_command("hv_train_network", train_argv(assets, out), tmp_path)
    no_traceback(second)
    assert second.code == 2, second.err[-2000:]
    (line,) = second.error_lines
    assert re.fullmatch(rf"error: {re.escape(str(out))}: another training run is using this \(pid {first.pid} on \S+, started "
                        rf"[0-9-]+ [0-9:]+: \S*hv_train_network\.py --dit .*\); wait for it to finish or choose "
                        rf"another --output_name or --output_dir \(if that run is gone, delete {re.escape(str(lock))}\)", line), line
    colliding = run_command("hv_train_network", train_argv(assets, out, "--output_name", "tiny-step00000004"), tmp_path)
    assert colliding.code == 2, colliding.err[-2000:]
    assert colliding.error_lines == [f"error: {out}: another training run is using this ({describe_holder(holder(lock))}, writing "
                                     "--output_name tiny), whose files would share names with this run's; wait for it to "
                                     "finish or choose another --output_name or --output_dir"]
    assert not list(out.glob("tiny-step00000004*")), "the refused run wrote files"
    beside = run_command("hv_train_network", train_argv(assets, out, "--output_name", "other"), tmp_path)
    assert beside.code == 0, beside.err[-2000:]
    assert (out / "other.safetensors").is_file() and first.process.is_alive()

    first.process.kill()  # SIGKILL: no clean-up runs; the OS releases the file lock
    first.process.join()
    assert lock.exists()
    third = run_command("hv_train_network", train_argv(assets, out), tmp_path)
    assert third.code == 0, third.err[-2000:]
    assert re.search(rf"taking over the lock of a training run that did not finish \(pid {first.pid} on ", third.err)
    assert not lock.exists() and not leftovers(out)


def test_a_second_latent_caching_of_the_same_cache_folder_is_refused_but_text_caching_may_run_beside_it(assets, tmp_path):
    toml, folder = copy_dataset(assets, tmp_path)
    lock = folder / "cache" / "videos" / ".musubi-cache-latents.lock"
    first = start_command("cache_latents", cache_latents_argv(toml, assets), tmp_path)
    wait_for(lambda: holder(lock).get("pid") == first.pid, first)
    os.kill(first.pid, signal.SIGSTOP)  # hold it there, whatever the speed of this machine
    try:
        second = run_command("cache_latents", cache_latents_argv(toml, assets), tmp_path)
        text = run_command("cache_text_encoder_outputs", ["--dataset_config", str(toml), "--text_encoder1", str(assets.te1),
                                                          "--text_encoder2", str(assets.te2)], tmp_path)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.code == 2 and re.search(r"cache/(images|videos): another latent caching run is using this "
                                          rf"\(pid {first.pid} on ", second.error_lines[0]), second.err[-2000:]
    assert text.code == 0, text.err[-2000:]
    assert first.wait().code == 0
    assert not leftovers(folder)


def test_a_killed_merge_leaves_nothing_the_next_merge_keeps(assets, tmp_path):
    merged = tmp_path / "merged" / "merged.safetensors"
    first = start_command("merge_lora", merge_argv(assets, tmp_path), tmp_path)
    temp = lambda: [p for p in merged.parent.glob(".merged.safetensors.*.tmp")] if merged.parent.exists() else []  # noqa: E731
    wait_for(lambda: bool(temp()), first)
    first.process.kill()
    first.process.join()
    left = temp()
    assert left and not merged.exists(), "the kill came too late to leave a temporary file"

    again = run_command("merge_lora", merge_argv(assets, tmp_path), tmp_path)
    assert again.code == 0, again.err[-2000:]
    assert f"removed {left[0]} (left by an interrupted run)" in again.err
    assert not leftovers(tmp_path / "merged")
    files.StateDictFile(merged).load_all()


def test_generation_removes_temporary_files_of_dead_runs_only(assets, tmp_path):
    """Of its own output names, and never a user's files that look alike: --save_path is any folder."""
    from reliability_cases import generate_argv

    videos = tmp_path / "videos"
    videos.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    dead_temp = videos / f".20261205-101010-123_0_7_latent.safetensors.{dead_pid}-abc12345.tmp"
    live_temp = videos / f".20261205-101010-456_0_7.mp4.{os.getpid()}-def45678.tmp"  # this test process: alive
    dead_temp.write_bytes(b"partial")
    live_temp.write_bytes(b"partial")
    dead_frames = videos / f".20261205-101010-789_0_7.{dead_pid}-ghi78901.tmp"  # a killed run's frames folder (images)
    (dead_frames / "20261205-101010-789_0_7_000.png").parent.mkdir()
    (dead_frames / "20261205-101010-789_0_7_000.png").write_bytes(b"partial")
    # a run in another container (or on another machine sharing the folder): its pid means nothing here, but it holds
    # the lock every temporary file is written under
    elsewhere = videos / f".20261205-101010-999_0_7.mp4.{dead_pid}-jkl01234.tmp"
    elsewhere.write_bytes(b"partial")
    # a user's files that only look like temporary ones: another name, a date or a long number where a pid would be,
    # a random part of another length, a link
    users = [videos / f".notes.txt.{dead_pid}-abcdefgh.tmp", videos / ".report.20241201-abcdefgh.tmp",
             videos / ".backup.20241201123456-final.tmp", videos / ".holiday.2023-summer.tmp" / "photo.jpg"]
    for path in users:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"mine")
    link = videos / f".20261205-101010-111_0_7.mp4.{dead_pid}-mno56789.tmp"
    link.symlink_to(users[0])
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(elsewhere)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_command("hv_generate_video", generate_argv(assets, tmp_path), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert result.code == 0, result.err[-2000:]
    assert not dead_temp.exists() and not dead_frames.exists() and live_temp.exists() and elsewhere.exists()
    assert all(path.read_bytes() == b"mine" for path in users) and link.is_symlink()


def test_a_training_start_leaves_what_another_command_writes_into_its_output_folder(assets, tmp_path):
    """A post-hoc EMA or a merge writing tiny-ema.safetensors beside the LoRAs of a training named tiny: the training's
    start removes leftovers of its own names, whose writer is gone, not that write."""
    out = tmp_path / "out"
    out.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    own_leftover = out / f".tiny-step00000002.safetensors.{dead}-abcd1234.tmp"
    others_leftover = out / f".tiny-ema.safetensors.{dead}-abcd1234.tmp"  # not a name the training writes: not its to judge
    for path in (own_leftover, others_leftover):
        path.write_bytes(b"partial")
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom musubi_tuner.files import atomic_write\n"
                               "with atomic_write(sys.argv[1]) as tmp:\n    print('writing', flush=True)\n"
                               "    sys.stdin.readline()\n    tmp.write_bytes(b'averaged')\n", str(out / "tiny-ema.safetensors")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        result = run_command("hv_train_network", train_argv(assets, out), tmp_path)
        writer.stdin.write("\n")
        writer.stdin.close()
        assert writer.wait(60) == 0
    finally:
        writer.kill()
    assert result.code == 0, result.err[-2000:]
    assert (out / "tiny-ema.safetensors").read_bytes() == b"averaged"
    assert not own_leftover.exists() and others_leftover.exists()


def test_an_output_named_as_a_running_training_s_lora_is_refused_and_another_name_beside_it_is_not(assets, tmp_path):
    """merge_lora, lora_post_hoc_ema and convert_lora wrote onto a running training's own names: a checkpoint became a
    merged DiT (its .comfyui copy left the training's), an average was replaced by the next save, without a word."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom musubi_tuner.files import RunLock, train_lock\n"
                               "with RunLock(train_lock(sys.argv[1], 'tiny'), 'training run', '--output_dir', writes='tiny'):\n"
                               "    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = {name: run_command("convert_lora", ["--input", str(assets.lora), "--output", str(out / name), "--target", "other"],
                                     tmp_path) for name in ("tiny-step00000004.safetensors", "tiny.comfyui.safetensors")}
        merged = run_command("merge_lora", ["--dit", str(assets.dit), "--lora_weight", str(assets.lora), "--save_merged_model",
                                            str(out / "tiny.safetensors"), "--device", "cpu"], tmp_path)
        beside = run_command("convert_lora", ["--input", str(assets.lora), "--output", str(out / "tiny-ema.safetensors"),
                                              "--target", "other"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    for name, result in [*refused.items(), ("tiny.safetensors", merged)]:
        assert result.code == 2 and re.fullmatch(
            rf"error: --\S+ {re.escape(str(out / name))}: a name of the training run writing into {re.escape(str(out))} \(pid "
            rf"{holder.pid} on .*\), which would replace it, or be replaced by it; choose another name, or wait for the run to end",
            result.error_lines[0]), result.err[-2000:]
        assert not (out / name).exists()
    assert beside.code == 0 and (out / "tiny-ema.safetensors").is_file(), beside.err[-2000:]


def test_a_training_killed_with_its_data_loader_workers_alive_leaves_its_folder_free_at_once(assets, tmp_path):
    """SIGKILL to the training process: its workers live on for seconds (torch's watchdog), and held its folder's lock,
    which fork had shared with them; a rerun was refused naming the dead process. (Started as users start it: the
    workers are forked from the training process.)"""
    out = tmp_path / "out"
    argv = train_argv(assets, out, "--max_data_loader_n_workers", "2", "--persistent_data_loader_workers", "--max_train_steps", "100000",
                      "--save_every_n_steps", "1")
    run = subprocess.Popen([sys.executable, "src/musubi_tuner/hv_train_network.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (out / "tiny-step00000001.safetensors").exists():  # a step done: its two workers have started
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        workers = [int(pid) for pid in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()]
        assert len(workers) == 2
        for pid in workers:  # held where they are: alive after the training, as torch's watchdog keeps them for seconds
            os.kill(pid, signal.SIGSTOP)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        with files.RunLock(train_lock(out, "tiny"), "training run", "--output_dir"):  # taken over at once, not refused
            pass
    finally:
        run.kill()
        run.wait()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_output_cut_short_by_a_reader_ends_quietly(assets, tmp_path):
    """`musubi-lora-info FILE | head -1`: the closed pipe ends the command without a BrokenPipeError traceback."""
    command = f"{sys.executable} src/musubi_tuner/lora_info.py {assets.lora} --json | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "{"
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


@pytest.mark.slow
def test_under_accelerate_launch_quiet_our_line_is_the_last_on_screen(assets, tmp_path):
    """docs/training.md: `accelerate launch -q` keeps the launcher's own traceback off the screen."""
    accelerate = Path(sys.executable).with_name("accelerate")
    argv = train_argv(assets, tmp_path / "out", "--network_dim", "0")
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    result = subprocess.run([str(accelerate), "launch", "-q", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "src/musubi_tuner/hv_train_network.py", *argv], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --network_dim 0: must be between 1 and 1048576"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_under_a_multi_process_launch_the_failure_summary_names_our_error(assets, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    argv = train_argv(assets, tmp_path / "out", "--dit", str(tmp_path / "missing.pt"))
    env = dict(os.environ, ACCELERATE_USE_CPU="1")
    result = subprocess.run([str(accelerate), "launch", "-q", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                             "--mixed_precision", "no", "--dynamo_backend", "no", "src/musubi_tuner/hv_train_network.py", *argv],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert re.search(r"traceback : error: \S+missing\.pt: DiT checkpoint not found", result.stderr), result.stderr[-3000:]
    assert "Traceback (most recent call last)" not in result.stderr


def test_caching_is_refused_while_a_training_reads_the_cache_folder(assets, tmp_path):
    """A cache_latents run rewrote every cache under a running training (and deleted a removed image's, which
    stopped the training at step 1269, without a save): now it waits its turn, told which process it waits for."""
    import fcntl

    toml, folder = copy_dataset(assets, tmp_path)
    use = folder / "cache" / "images" / ".musubi-cache-latents.use"

    def training_reads() -> bool:
        if not use.exists():
            return False
        with open(use) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
        return False

    training = start_command("hv_train_network", train_argv(assets, tmp_path / "out", "--max_train_steps", "100000", toml=toml), tmp_path)
    try:
        wait_for(training_reads, training)
        before = {p.name: p.stat().st_mtime_ns for p in (folder / "cache" / "images").glob("*_hv.safetensors")}
        caching = run_command("cache_latents", cache_latents_argv(toml, assets), tmp_path)
        no_traceback(caching)
        assert caching.code == 2, caching.err[-2000:]
        (line,) = caching.error_lines
        assert re.fullmatch(rf"error: \S+/cache/(images|videos): a training run is reading these caches \(\S+ \[\[datasets\]\]\[\d\]: "
                            rf"pid {training.process.pid}: .+\); this latent caching run would change them under it: wait for it "
                            r"to finish, or stop it first", line), line
        assert {p.name: p.stat().st_mtime_ns for p in (folder / "cache" / "images").glob("*_hv.safetensors")} == before
    finally:
        training.process.kill()
        training.process.join()


def test_training_is_refused_while_a_caching_run_writes_the_cache_folder(assets, tmp_path):
    """A training started while cache_latents was writing trained on the 3 caches of 12 made so far. The caching run
    here is this test's process, holding what cache_latents holds while it writes."""
    from musubi_tuner.data.cache_files import lock_cache_directories
    from musubi_tuner.data.config import load_dataset_config

    toml, folder = copy_dataset(assets, tmp_path)
    with lock_cache_directories(load_dataset_config(toml).all_datasets, "latents"):
        training = run_command("hv_train_network", train_argv(assets, tmp_path / "out", toml=toml), tmp_path)
    no_traceback(training)
    assert training.code == 2, training.err[-2000:]
    (line,) = training.error_lines
    assert re.fullmatch(rf"error: \S+/cache/(images|videos): a latent caching run is writing these caches \(pid {os.getpid()} on "
                        r"\S+, started [0-9-]+ [0-9:]+: .*\); training would read them half-made: wait for it to finish \(.*\)", line), line
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
    again = run_command("hv_train_network", train_argv(assets, tmp_path / "out", toml=toml), tmp_path)  # the lock released
    assert again.code == 0, again.err[-2000:]


def test_a_training_whose_folder_is_moved_away_stops_at_its_next_save_and_leaves_the_new_folders_run_alone(assets, tmp_path):
    """The lock lives in the folder it guards: a folder moved (or deleted) under a run took the lock with it, a second
    run into a new folder of that name was let in, and the first one wrote on into it, both saying they had saved the
    same files."""
    out, moved, rescues = tmp_path / "out", tmp_path / "moved", tmp_path / "rescues"
    rescues.mkdir()
    first = start_command("hv_train_network", train_argv(assets, out, "--max_train_steps", "100000", "--save_every_n_steps", "1",
                                                         "--learning_rate", "5e-4"), tmp_path, env={"TMPDIR": str(rescues)})
    wait_for(lambda: (out / "tiny-step00000001.safetensors").exists(), first)
    while True:  # stopped between two saves, not within one
        os.kill(first.pid, signal.SIGSTOP)
        if not [p for p in out.iterdir() if p.name.endswith((".tmp", ".incomplete"))]:
            break
        os.kill(first.pid, signal.SIGCONT)
        time.sleep(0.01)
    out.rename(moved)
    second = run_command("hv_train_network", train_argv(assets, out), tmp_path)
    assert second.code == 0, second.err[-2000:]
    os.kill(first.pid, signal.SIGCONT)
    result = first.wait(timeout=120)  # (before: it trained on, into the second run's folder)
    no_traceback(result)
    assert result.code == 2
    (line,) = result.error_lines
    assert re.fullmatch(rf"error: {re.escape(str(out))}: deleted, moved or replaced while this training run was writing into it "
                        rf"\(its lock went with it\); stopped, so as not to write beside a run that may have started there "
                        rf"since\. Nothing was written to {re.escape(str(out))}/\S+\. The trained LoRA is saved as "
                        rf"{re.escape(str(rescues))}/tiny-rescued-step\d+\.safetensors instead: move it where it belongs", line), line
    assert files.read_safetensors_header(out / "tiny.safetensors")[1]["ss_learning_rate"] == "0.001"  # the second run's
    assert not list(out.glob("tiny-step*")), "the first run wrote into the second's folder"
    assert not leftovers(out) and not (out / ".musubi-train.lock").exists()


def test_a_lock_whose_folder_was_replaced_is_no_longer_held_and_its_release_leaves_the_new_lock(tmp_path):
    folder = tmp_path / "out"
    lock = files.RunLock(folder / ".musubi-train.lock", "training run", "--output_dir").__enter__()
    files.check_locks_still_held(folder / "a.safetensors")  # held: nothing to say
    folder.rename(tmp_path / "moved")
    with files.RunLock(folder / ".musubi-train.lock", "training run", "--output_dir"):  # another run, in a new folder
        assert not lock.still_held()
        with pytest.raises(UserError, match=rf"^{re.escape(str(folder))}: deleted, moved or replaced while this training run"):
            files.check_locks_still_held(folder / "a.safetensors")
        files.check_locks_still_held(tmp_path / "elsewhere" / "b.safetensors")  # (outside the folder: none of its business)
        lock.release()
        assert (folder / ".musubi-train.lock").exists(), "the first run's release removed the second run's lock"
    assert not (folder / ".musubi-train.lock").exists()


def test_a_training_starting_as_another_ends_shares_the_cache_folder_instead_of_being_refused(tmp_path):
    """fuzz_at 5: an ending training takes its use of the cache folder exclusively for the moment it removes the use
    file, and one starting then was refused as if a caching run were writing the caches. Here the other process holds
    it exclusively for 0.2 s, as that moment stretched."""
    use = tmp_path / ".musubi-cache-latents.use"
    ending = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom musubi_tuner.files import FolderUse\n"
                               "u = FolderUse(sys.argv[1], exclusive=True)\nassert u.acquire()\nprint('held', flush=True)\n"
                               "time.sleep(0.2)\nu.release()", str(use)], stdout=subprocess.PIPE, text=True)
    try:
        assert ending.stdout.readline() == "held\n"
        starting = files.FolderUse(use, exclusive=False)
        assert starting.acquire(), "refused while the other process gave way"
        starting.release()
        assert ending.wait(timeout=30) == 0
    finally:
        ending.kill()


# ------------------------------------------------------------------------------------------ a launcher's processes


def _launched_training(assets, tmp_path):
    """A training of two processes under torchrun, long enough to be stopped; (the launcher, its log file)."""
    log = tmp_path / "launcher.log"
    argv = train_argv(assets, tmp_path / "out", "--max_train_steps", "100000")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT / "src"))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                 str(free_port()), str(ROOT / "src" / "musubi_tuner" / "hv_train_network.py"), *argv],
                                cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "steps:" not in log.read_text(errors="replace"):  # both processes joined and training
        assert launcher.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return launcher, log


def _ranks_of(launcher) -> dict[int, int]:
    """{RANK: pid} of the launcher's child processes."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = dict(v.split("=", 1) for v in Path(f"/proc/{entry}/environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher.pid and "RANK" in environ:
            ranks[int(environ["RANK"])] = int(entry)
    return ranks


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the launcher's processes in /proc")
def test_the_launcher_s_summary_names_the_process_that_died_not_the_one_that_reported_it(assets, tmp_path):
    """Process 1 killed without a word (the OOM killer): process 0 reports the lost connection, and its report was dated
    before the launcher noticed the death, so the summary's 'Root Cause' named process 0, the healthy one."""
    launcher, log = _launched_training(assets, tmp_path)
    os.kill(_ranks_of(launcher)[1], signal.SIGKILL)
    assert launcher.wait(120) != 0
    text = log.read_text(errors="replace")
    # process 0 reports the lost connection, or is stopped by the launcher first (it noticed the death sooner): both fine
    assert "error: another process of this run stopped or lost its connection" in text or "\nterminated" in text, text[-3000:]
    cause = text.split("Root Cause (first observed failure):", 1)[1]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", cause), text[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_processes_of_a_launcher_killed_without_a_word_stop_instead_of_training_on(assets, tmp_path):
    """torchrun killed with SIGKILL (the OOM killer, kill -9) left its processes running with no parent: they trained to
    the end, holding the GPUs and the output folder, and wrote the final LoRA of a run its user thought gone."""
    launcher, log = _launched_training(assets, tmp_path)
    ranks = _ranks_of(launcher)
    assert sorted(ranks) == [0, 1]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while any(files.pid_alive(pid) and "zombie" not in _state(pid) for pid in ranks.values()):
        assert time.monotonic() < deadline, f"still running: {log.read_text(errors='replace')[-2000:]}"
        time.sleep(0.2)
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
    assert not train_lock(tmp_path / "out", "tiny").exists()  # stopped as on SIGTERM: the output folder is free again


def _state(pid: int) -> str:
    try:
        return {"Z": "zombie"}.get(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0], "running")
    except OSError:
        return "gone"


@pytest.mark.parametrize("rank, world, extra, error", [
    ("1", "2", [], None),  # a process other than 0: checks as process 0 does, prints nothing
    ("0", "3", ["--context_parallel", "2"], "--context_parallel 2 shares each sample over groups of 2 processes, and 3 processes were started"),
    ("0", "2", ["--resume", "STATE"], "tiny-state: saved by 1 training processes, this run has 2"),
])
def test_a_dry_run_under_a_launcher_checks_the_processes_as_the_run_does_and_prints_the_plan_once(assets, tmp_path, rank, world,
                                                                                                   extra, error):
    """Under torchrun, --dry_run printed the plan once per process and said nothing of a layout or a state the real run
    refuses: it exited 0 for launches that fail."""
    from reliability_cases import trained_before

    out = trained_before(assets, tmp_path) if "STATE" in extra else tmp_path / "out"
    extra = [str(out / "tiny-state") if a == "STATE" else a for a in extra]
    result = run_command("hv_train_network", train_argv(assets, out, "--dry_run", *extra), tmp_path,
                         env={"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world})
    no_traceback(result)
    if error is None:
        assert result.code == 0 and "needed on" not in result.out, result.out
    else:
        assert result.code == 2 and error in result.error_lines[0], result.err[-2000:]


def test_a_generation_dry_run_under_a_launcher_checks_the_processes_as_the_run_does(assets, tmp_path):
    result = run_command("hv_generate_video", generate_argv(assets, tmp_path, "--dry_run"), tmp_path,
                         env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    no_traceback(result)
    assert result.code == 2 and result.error_lines == [
        "error: --context_parallel 1: 2 processes were started; run it as one process, without a launcher; or give "
        "--context_parallel 2 for 2 processes"], result.err[-2000:]  # (accelerate refuses --multi_gpu --num_processes 1)
    # 3 processes: the tiny DiT's 2 heads do not split over 3, so no --context_parallel 3 is offered (it was, then
    # refused by the next check: fuzz_al 7)
    result = run_command("hv_generate_video", generate_argv(assets, tmp_path, "--dry_run", "--context_parallel", "2"), tmp_path,
                         env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"})
    assert result.code == 2 and result.error_lines == [
        "error: --context_parallel 2: 3 processes were started; start 2 (accelerate launch --multi_gpu --num_processes 2, "
        "or torchrun --nproc_per_node 2)"], result.err[-2000:]
