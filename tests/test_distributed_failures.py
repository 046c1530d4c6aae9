"""A run of several processes off the happy path: processes given different command lines, a process that dies or
stops answering, a loss that is not finite on one process, an error that every process meets. Each case runs real
processes joined by torch.distributed (gloo), forked from the test (helpers.run_group) or started as commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import run_group

ROOT = Path(__file__).resolve().parents[1]


def _check_command_lines(rank, world, argvs):
    from musubi_tuner.distributed import check_same_command_line
    from musubi_tuner.errors import SharedError

    try:
        check_same_command_line(argvs[rank])
    except SharedError as e:
        return {"error": str(e)}
    return {"error": ""}


def test_processes_given_different_command_lines_all_stop_with_one_message_naming_the_flag():
    same = ["--video_size", "64", "64", "--infer_steps", "4", "--local_rank=0"]
    assert [r["error"] for r in run_group(2, _check_command_lines, [same, same[:-1] + ["--local_rank=1"]])] == ["", ""]
    other = ["--video_size", "64", "64", "--infer_steps", "6"]
    errors = [r["error"] for r in run_group(2, _check_command_lines, [same[:-1], other])]
    assert errors[0] == errors[1]
    assert errors[0].startswith("process 1 was started with another command line than process 0 (near --infer_steps: "
                                "'--infer_steps 6' vs '--infer_steps 4')"), errors[0]
    # the same bytes, read under another locale (C: the non-ASCII bytes as surrogates) are the same command line (fuzz_bd 3)
    latin = ["--save_path", os.fsdecode("café".encode("utf-8")).encode("utf-8", "surrogateescape").decode("ascii", "surrogateescape")]
    assert [r["error"] for r in run_group(2, _check_command_lines, [["--save_path", "café"], latin])] == ["", ""]


def _wait_for_a_peer_that_dies(rank, world, mode):
    import datetime
    import time

    import torch.distributed as dist

    from musubi_tuner.errors import lost_peer

    os.environ["WORLD_SIZE"] = str(world)
    group = dist.new_group(timeout=datetime.timedelta(seconds=3))
    if rank == 1:
        if mode == "dies":
            os._exit(0)  # gone without a word, as a process the kernel killed
        time.sleep(6)  # stuck longer than the group's timeout
        return {"message": ""}
    try:
        dist.all_reduce(torch.ones(4), group=group)
    except Exception as e:  # what gloo raises on the process left waiting
        return {"message": lost_peer(e) or f"not recognised: {type(e).__name__}: {e}"}
    return {"message": "the collective returned"}


@pytest.mark.parametrize("mode, message", [
    ("dies", "another process of this run stopped or lost its connection"),
    ("stuck", "the other processes of this run did not answer in time"),
])
def test_a_process_that_dies_or_stops_answering_is_one_line_on_the_others(mode, message):
    import multiprocessing
    import tempfile

    # run_group fails on a process that exits without a result, so process 0's answer is collected by hand here
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "0.json"

        def worker(rank):
            import datetime

            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
            out = _wait_for_a_peer_that_dies(rank, 2, mode)
            if rank == 0:
                result.write_text(json.dumps(out))
            os._exit(0)

        from helpers import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        procs = [multiprocessing.get_context("fork").Process(target=worker, args=(r,)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        assert json.loads(result.read_text())["message"].startswith(message)


def _culprits(rank, world):
    from musubi_tuner.training.loop import culprit_items

    loss = torch.tensor(float("nan") if rank == 1 else 0.5)
    return {"loss": culprit_items([f"item{rank}a", f"item{rank}b"], loss, world),
            "update": culprit_items([f"item{rank}"], None, world)}


def test_a_loss_that_is_not_finite_on_one_process_names_that_processs_items_on_every_process():
    first, second = run_group(2, _culprits)
    assert first == second
    assert first["loss"] == ["process 1: item1a", "process 1: item1b"]
    assert first["update"] == ["process 0: item0", "process 1: item1"]  # the weights are shared: every item counts


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_an_error_every_process_meets_is_printed_by_process_0_only_and_given_to_the_launcher(tmp_path, rank, printed):
    error_file = tmp_path / "error.json"
    env = dict(os.environ, RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", TORCHELASTIC_ERROR_FILE=str(error_file))
    done = subprocess.run([sys.executable, "src/musubi_tuner/hv_generate_video.py", "--save_path", "x", "--infer_steps", "0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert ("error: --infer_steps" in done.stderr) == printed, done.stderr
    assert json.loads(error_file.read_text())["message"].startswith("error: --infer_steps")


def test_processes_that_accelerate_does_not_join_are_refused_before_they_train_alone(tmp_path):
    """torchrun on a CPU without ACCELERATE_USE_CPU: accelerate runs each process as if it were alone, and every one
    would train and write the same files. The processes stop before loading anything, with one line."""
    from helpers import free_port

    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    (tmp_path / "d.toml").write_text("[general]\nresolution = [32, 32]\n")
    (tmp_path / "dit.pt").write_bytes(b"x")
    argv = ["--dit", str(tmp_path / "dit.pt"), "--dataset_config", str(tmp_path / "d.toml"), "--sdpa", "--network_module",
            "networks.lora", "--output_dir", str(tmp_path / "out"), "--output_name", "x", "--timestep_sampling", "shift",
            "--discrete_flow_shift", "1e6"]  # (shift sampling reads it: a far value it ignores is said ignored, 0ceb500)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "src/musubi_tuner/hv_train_network.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stderr[-2000:]
    printed = [line for line in done.stderr.splitlines() if line.startswith("error: launched as 2 processes (WORLD_SIZE)")]
    assert printed == ["error: launched as 2 processes (WORLD_SIZE), but accelerate joined 1; on a machine without a GPU set "
                       "ACCELERATE_USE_CPU=1 (accelerate launch --cpu sets it)"], done.stderr[-3000:]  # once, by process 0
    # and a warning of the command line, said before the processes join their group: once too (it was once per process)
    assert done.stderr.count("--discrete_flow_shift 1e+06, far from the usual") == 1, done.stderr[-3000:]
    assert not (tmp_path / "out" / "x.safetensors").exists()


def _tiny_training(tmp_path: Path, *extra: str) -> list[str]:
    from helpers import write_cached_dataset
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit

    config = tiny_dit_config()
    dit = write_dit(tmp_path / "dit.pt", random_dit_state_dict(config, seed=0), config, "pt")
    toml = write_cached_dataset(tmp_path / "data", items=4, frames=5, size=(64, 48))
    return ["--dit", str(dit), "--dataset_config", str(toml), "--sdpa", "--network_module", "networks.lora", "--network_dim", "4",
            "--learning_rate", "1e-3", "--dit_dtype", "float32", "--output_dir", str(tmp_path / "out"), "--output_name", "tiny", *extra]


def _launch(argv: list[str], log: Path, processes: int = 2) -> subprocess.Popen:
    """hv_train_network as `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` runs it, in a session
    of its own (as a terminal's job)."""
    from helpers import free_port

    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                                 "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
                                 "src/musubi_tuner/hv_train_network.py", *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_sigterm_to_a_launched_run_with_data_loader_workers_is_one_line_per_process(tmp_path):
    """docker stop or a batch system's limit SIGTERMs `accelerate launch`, which SIGTERMs each process's group: the
    data-loader workers too. A worker that died of it first made the process's stop a traceback ("DataLoader worker
    ... is killed by signal: Terminated"), in three of three runs; now the workers leave the signal to their process."""
    import signal
    import time

    out, log = tmp_path / "out", tmp_path / "run.log"
    run = _launch(_tiny_training(tmp_path, "--max_data_loader_n_workers", "1", "--persistent_data_loader_workers",
                                 "--max_train_steps", "100000", "--save_every_n_steps", "2"), log)
    try:
        deadline = time.monotonic() + 300
        while not (out / "tiny-step00000004.safetensors").is_file():
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        run.wait(120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Traceback" not in text and "killed by signal" not in text, text[-4000:]
    assert [line.split("]: ")[-1] for line in text.splitlines() if line.endswith("terminated")] == ["terminated"] * 2, text[-3000:]


def test_a_launched_run_into_a_folder_another_run_holds_stops_every_process_at_once(tmp_path):
    """Process 0 takes the output folder's lock. Before, it stopped alone, and process 1, waiting for it in a
    collective, ignored the launcher's SIGTERM until the launcher killed it half a minute later."""
    import signal
    import time

    from musubi_tuner.files import RunLock

    argv = _tiny_training(tmp_path, "--max_train_steps", "2")
    with RunLock(tmp_path / "out" / ".musubi-train.lock", "training run", "--output_dir"):
        started = time.monotonic()
        run = _launch(argv, tmp_path / "run.log")
        try:
            code = run.wait(120)
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert code != 0 and time.monotonic() - started < 25, text[-3000:]  # (25 s: the start of two processes on 2 slow cores)
    assert "SIGKILL" not in text and "SIGABRT" not in text and "terminate called" not in text, text[-3000:]
    printed = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(printed) == 1 and "another training run is using this" in printed[0], text[-3000:]  # by process 0 alone


def _training_of_process_0(tmp_path, **env) -> subprocess.CompletedProcess:
    """hv_train_network started as process 0 of 2 by hand (as a scheduler's script does: the variables set, no launcher),
    on stand-in files: it stops before reading them."""
    (tmp_path / "d.toml").write_text("[general]\nresolution = [32, 32]\n")
    (tmp_path / "dit.pt").write_bytes(b"x")
    argv = ["--dit", str(tmp_path / "dit.pt"), "--dataset_config", str(tmp_path / "d.toml"), "--sdpa", "--network_module",
            "networks.lora", "--output_dir", str(tmp_path / "out"), "--output_name", "x", "--ddp_timeout", "1"]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1", **env)
    return subprocess.run([sys.executable, "src/musubi_tuner/hv_train_network.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_master_address_that_does_not_resolve_is_named_at_once(tmp_path):
    """It made training wait twice --ddp_timeout and blame the other processes ('did not answer in time'), and
    generation retry for 30 minutes without a word."""
    from helpers import free_port

    done = _training_of_process_0(tmp_path, MASTER_ADDR="nohost.invalid", MASTER_PORT=str(free_port()))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: MASTER_ADDR nohost.invalid: cannot resolve this host name ("), done.stderr[-2000:]


def test_a_master_port_in_use_is_named_not_blamed_on_another_process(tmp_path):
    import socket

    from helpers import free_port

    port = free_port()
    with socket.socket() as taken:  # another program on the port
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = _training_of_process_0(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: MASTER_PORT {port} is in use on this machine (another run or program); choose another port (torchrun "
        "--master_port, accelerate launch --main_process_port, or MASTER_PORT) (--debug shows where)"), done.stderr[-2000:]


def _wait_while_process_0_works(rank, world, seconds):
    """Process 0 busy alone (a sample, a save) for longer than the collective timeout the others wait under."""
    import datetime
    import time

    import torch.distributed as dist

    from musubi_tuner.distributed import patient_wait

    hasty = dist.new_group(timeout=datetime.timedelta(seconds=2))  # as --ddp_timeout would set it, in seconds
    if rank == 0:
        time.sleep(seconds)
    patient_wait()  # outside that timeout: it returns once process 0 is done
    if rank == 0:
        time.sleep(seconds)
    try:
        dist.barrier(group=hasty)
    except Exception as e:  # what gloo raises on the process left waiting past the timeout
        return {"hasty": type(e).__name__}
    return {"hasty": "returned"}


def test_waiting_for_process_0_s_samples_is_not_bounded_by_the_hang_timeout():
    """A training sample longer than --ddp_timeout killed a healthy run: 'one of them is stuck'."""
    first, second = run_group(2, _wait_while_process_0_works, 5)
    assert second["hasty"] != "returned"  # the collective timeout would have ended the run here


@pytest.mark.parametrize("command", ["cache_latents.py", "cache_text_encoder_outputs.py"])
def test_a_caching_command_under_a_launcher_is_refused_once_before_it_reads_anything(tmp_path, command):
    """fuzz_ae 5: with the training's `accelerate launch --multi_gpu` prefix each process cached every item and the
    second was refused the cache folder's lock as "another caching run", one the user had not started; process 0 was
    then stopped half-way. The processes stop at once, process 0 saying why."""
    from helpers import free_port

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), f"src/musubi_tuner/{command}", "--dataset_config", str(tmp_path / "missing.toml"),
                           *(["--text_encoder1", "te1", "--text_encoder2", "te2"] if "text" in command else [])],
                          cwd=ROOT, env=dict(os.environ, ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    printed = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert printed == [f"error: {command} runs in one process (2 were started): run it without accelerate launch or torchrun"], \
        done.stderr[-3000:]


PROCESS_0_DIES_DURING_ITS_WORK = r'''
import os, signal, sys, time
from pathlib import Path
import torch
from musubi_tuner import distributed
from musubi_tuner.errors import run_cli

here = Path(sys.argv[1])

def run(argv):
    distributed.join_launched_group(torch.device("cpu"))
    (here / f"pid{distributed.rank()}").write_text(str(os.getpid()))
    if distributed.rank() == 0:
        if os.fork() == 0:  # a data-loader worker: a copy of the process, its connections to the others open
            while not (here / "pid1").exists():
                time.sleep(0.05)
            deadline = time.time() + 120  # it ends when process 0's parent notices: here, when process 1 has gone
            while time.time() < deadline and os.path.exists(f"/proc/{(here / 'pid1').read_text()}"):
                time.sleep(0.05)
            os._exit(0)
        time.sleep(1)  # (process 1 waits meanwhile)
        os.kill(os.getpid(), signal.SIGKILL)  # killed during its sample or save
    distributed.patient_wait()

run_cli(run, [])
'''


def test_a_process_waiting_for_process_0_that_died_stops_at_the_launchers_sigterm_with_its_line(tmp_path):
    """fuzz_ae 2: process 0 killed during its sample (its data-loader workers keeping its connections open), the others
    sat in the barrier of their patient wait, where the launcher's SIGTERM was not handled: killed 30 s later (exit
    -9), without a line. They end at the SIGTERM, saying why they stopped."""
    from helpers import free_port

    script = tmp_path / "run.py"
    script.write_text(PROCESS_0_DIES_DURING_ITS_WORK)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "terminated while waiting for another process's work (a process that failed says why above)" in done.stderr, \
        done.stderr[-3000:]
    assert "exitcode  : 143" in done.stderr and "forcefully exiting via 9" not in done.stderr, done.stderr[-3000:]


def test_launcher_variables_left_in_the_environment_are_named_not_silent_or_a_traceback(tmp_path):
    """fuzz_ah 4 and 5: RANK=1 WORLD_SIZE=2 exported in a shell made caching and training end with status 2 and no
    word (process 1 leaves the message to a process 0 that did not exist), generation a traceback from torch's
    rendezvous; RANK=abc was a traceback in every command; a leftover ACCELERATE_GRADIENT_ACCUMULATION_STEPS made the
    optimizer accumulate otherwise than the loop counted, and ACCELERATE_USE_DEEPSPEED=true was a traceback."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "ACCELERATE_"))}
    training = _tiny_training(tmp_path)

    def error_of(script, argv, **env):
        done = subprocess.run([sys.executable, f"src/musubi_tuner/{script}", *argv], cwd=ROOT, env={**base, **env},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        return [line for line in done.stderr.splitlines() if line.startswith("error:")]

    assert error_of("cache_latents.py", ["--dataset_config", str(tmp_path / "d.toml")], RANK="1", WORLD_SIZE="2") == [
        "error: cache_latents.py runs in one process (WORLD_SIZE=2 is set in the environment): run it without accelerate "
        "launch or torchrun, or unset WORLD_SIZE and RANK"]
    assert error_of("hv_train_network.py", training, RANK="1", WORLD_SIZE="2") == [
        "error: RANK=1 and WORLD_SIZE=2 are set in the environment, but MASTER_ADDR and MASTER_PORT are not: unset RANK and "
        "WORLD_SIZE to run this command alone, or start its processes with accelerate launch or torchrun"]
    assert error_of("lora_info.py", [str(tmp_path / "x.safetensors")], RANK="abc") == [
        "error: RANK='abc' in the environment is not a number (a launcher sets it: unset it to run this command alone)"]
    assert error_of("hv_train_network.py", training, ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4") == [
        "error: ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4 in the environment overrides --gradient_accumulation_steps 1; unset "
        "it, or give the flag its value"]
    (line,) = error_of("hv_train_network.py", training, ACCELERATE_USE_DEEPSPEED="true")
    assert line.startswith("error: accelerate: DeepSpeed is not installed") and "(ACCELERATE_USE_DEEPSPEED=true asks for it" in line


def _joined_timeout(rank, world, argv):
    import torch
    import torch.distributed as dist

    from musubi_tuner.distributed import join_launched_group
    from musubi_tuner.hv_generate_video import build_parser

    args = build_parser().parse_args(argv)
    join_launched_group(torch.device("cpu"), args.ddp_timeout)
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return {"seconds": backend.options._timeout.total_seconds()}


def test_generation_takes_ddp_timeout_for_its_process_group():
    """fuzz_ae 8: generation waited PyTorch's 30 minutes in silence on a stopped process, with no flag to shorten it;
    it takes training's --ddp_timeout (minutes)."""
    argv = ["--dit", "d", "--vae", "v", "--text_encoder1", "t1", "--text_encoder2", "t2", "--prompt", "p", "--save_path", "s"]
    assert [r["seconds"] for r in run_group(2, _joined_timeout, [*argv, "--ddp_timeout", "3"], launcher_env=True)] == [180.0] * 2
    assert [r["seconds"] for r in run_group(2, _joined_timeout, argv, launcher_env=True)] == [1800.0] * 2  # gloo's default


STORE_GONE = """
import datetime, multiprocessing, os, sys, time

def server(port):
    import torch.distributed as dist
    dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=30))
    time.sleep(2)
    os._exit(0)

def main(argv):
    import torch.distributed as dist
    helper = multiprocessing.get_context("spawn").Process(target=server, args=(int(argv[0]),))
    helper.start()
    time.sleep(1)
    store = dist.TCPStore("127.0.0.1", int(argv[0]), 2, False, timeout=datetime.timedelta(seconds=30))
    store.get("never set")  # the store's process goes away meanwhile

if __name__ == "__main__":
    from musubi_tuner.errors import run_cli
    run_cli(main, sys.argv[1:])
"""


@pytest.mark.parametrize("debug", [False, True])
def test_a_store_that_goes_away_prints_no_cpp_backtrace_but_with_debug(tmp_path, debug):
    """fuzz_ae 3: a process whose store (process 0's, or the launcher's) went away printed torch's 20-frame C++
    backtrace before its one line; --debug keeps it. (A store read outside a collective, as here, is not a run's lost
    peer: its error stays Python's.)"""
    from helpers import free_port

    script = tmp_path / "store_gone.py"
    script.write_text(STORE_GONE)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("TORCH_CPP_LOG_LEVEL", None)
    done = subprocess.run([sys.executable, str(script), str(free_port()), *(["--debug"] if debug else [])], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    if debug:
        assert "TCPStore.cpp" in done.stderr
    else:
        assert "TCPStore.cpp" not in done.stderr and "frame #" not in done.stderr, done.stderr[-2000:]
    assert "Failed to recv" in done.stderr  # (the error itself is said either way)


@pytest.mark.parametrize("stop, said, code", [("SIGTERM", "terminated", 143), ("SIGINT", "interrupted", 130)])
def test_a_process_waiting_for_the_others_to_join_stops_at_once(tmp_path, stop, said, code):
    """fuzz_bd 2 (fuzz_ah 4c): blocked in the process group's rendezvous, a process took neither Ctrl-C nor SIGTERM: started
    by hand it could only be killed, and under a launcher whose other process failed before joining it was killed 30 s
    later, without its line."""
    import signal
    import time

    from helpers import free_port

    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), ACCELERATE_USE_CPU="1",
               PYTHONPATH=str(ROOT / "src"))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # (accelerate's warning of them, said by every process: fuzz_bd 9)
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "src/musubi_tuner/hv_train_network.py", *_tiny_training(tmp_path, "--max_train_steps", "1")],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, deadline = "", time.monotonic() + 120
    while "waiting for the others" not in err and time.monotonic() < deadline:
        err += process.stderr.readline()
    time.sleep(2)  # (into the rendezvous)
    process.send_signal(getattr(signal, stop))
    try:
        rest = process.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{stop} did not stop a process waiting for the others")
    assert process.returncode == code and rest.strip().splitlines()[-1] == said, rest[-2000:]
    assert "Traceback" not in err + rest and "OMP_NUM_THREADS" not in err + rest, err + rest
