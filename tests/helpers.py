"""Small shared pieces of the test suite."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_formula(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias) -> torch.Tensor:
    """What --fp8_fast computes, in float32: x W^T + b with x rounded to e4m3 per token (scale absmax / 448) and W
    dequantized per output row."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    x_scale = (x2.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    x_fp8 = (x2 / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    out = x_fp8 @ (weight_fp8.float() * weight_scale.float()[:, None]).T + bias
    return out.reshape(*x.shape[:-1], -1)


def dit_inputs(config, batch=1, frames=3, height=6, width=10, text_lens=(7,), max_text=20, seed=1):
    """Random DiT inputs (x, t, text_states, text_mask, pooled, guidance) with right-padded prompts of `text_lens`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, frames, height, width, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, max_text, config.text_states_dim, generator=g)
    mask = torch.zeros(batch, max_text, dtype=torch.long)
    for b, n in enumerate(text_lens):
        mask[b, :n] = 1
    pooled = torch.randn(batch, config.text_states_dim_2, generator=g)
    guidance = torch.full((batch,), 6000.0)
    return x, t, text, mask, pooled, guidance


def write_cached_dataset(root, *, items=4, frames=5, size=(64, 48), llm_dim=64, clip_dim=32, batch_size=1, seed=0,
                         text_lens=None):
    """A dataset TOML plus latent and text caches written by the cache-file rules (random contents, fixed seed).

    Lets the trainer be tested without running the VAE and text encoders. Returns the TOML path.
    """
    from pathlib import Path

    from musubi_tuner.data import cache_files

    root = Path(root)
    cache = root / "cache"
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    cache.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    w, h = size
    f = (frames - 1) // 4 + 1
    for i in range(items):
        stem = f"clip{i}"
        latent = torch.randn(16, f, h // 8, w // 8, generator=g).to(torch.float16)
        cache_files.save_latent_cache(cache_files.latent_cache_path(cache, stem, size, (0, frames)), latent, size=size, frame_count=frames)
        n = (text_lens or [5 + 3 * i])[i % len(text_lens or [1])] if text_lens else 5 + 3 * i
        mask = torch.zeros(256, dtype=torch.int64)
        mask[:n] = 1
        llm = torch.randn(256, llm_dim, generator=g).to(torch.float16) * mask[:, None]
        tensors = {**cache_files.text_encoder_tensors("llm", llm, mask),
                   **cache_files.text_encoder_tensors("clipL", torch.randn(clip_dim, generator=g).to(torch.float16), torch.ones(77, dtype=torch.int64))}
        cache_files.save_text_cache(cache_files.text_cache_path(cache, stem), f"caption {i}", tensors)
    toml = root / "dataset.toml"
    toml.write_text(
        f'[general]\nresolution = [{w}, {h}]\ncaption_extension = ".txt"\nbatch_size = {batch_size}\nenable_bucket = true\n\n'
        f'[[datasets]]\nvideo_directory = "{videos.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n'
        f'target_frames = [{frames}]\n'
    )
    return toml


def free_port() -> int:
    """A TCP port nothing listens on now: each multi-process launch gets its own, so tests can run side by side."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, fn, *args, timeout: float = 120.0, launcher_env: bool = False) -> list:
    """Run fn(rank, world, *args) in `world` processes forked from this one and joined by torch.distributed (gloo);
    returns what each returned (tensors, numbers, dicts of them), in rank order. A failing process fails the call
    with its traceback; the others are stopped (they would wait for it in a collective).

    launcher_env: instead of joining the group here, set the variables `accelerate launch --cpu` / torchrun set
    (RANK, WORLD_SIZE, MASTER_ADDR, ...) and forget accelerate's state inherited from this process, so that the
    commands' own code (an Accelerator) starts the group as under a launcher, without a launcher's seconds per process."""
    import datetime
    import multiprocessing
    import tempfile
    import traceback
    from pathlib import Path

    port = free_port()

    def worker(rank: int, folder: str) -> None:
        import os

        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        try:
            if launcher_env:
                from accelerate.state import AcceleratorState

                AcceleratorState._reset_state(reset_partial_state=True)
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                                  ACCELERATE_USE_CPU="1")
            else:
                dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
            result = fn(rank, world, *args)
            torch.save(result, Path(folder) / f"{rank}.pt")
            if dist.is_initialized():
                dist.destroy_process_group()
        except BaseException:
            (Path(folder) / f"{rank}.err").write_text(traceback.format_exc())
            os._exit(1)
        os._exit(0)

    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as folder:
        procs = [context.Process(target=worker, args=(rank, folder)) for rank in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = sorted(Path(folder).glob("*.err"))
        if errors:
            raise AssertionError(f"process {errors[0].stem} failed:\n{errors[0].read_text()}")
        if any(p.exitcode != 0 for p in procs):
            raise AssertionError(f"exit codes {[p.exitcode for p in procs]}")
        return [torch.load(Path(folder) / f"{rank}.pt", weights_only=True) for rank in range(world)]


def lora_with_random_ups(dit, rank: int, std: float, device=None):
    """A LoRA (alpha = rank) applied to every block Linear of `dit`, on `device` when given, its lora_up weights drawn
    from N(0, std) (seed 1, the same draw for each module): lora_up starts at zero, and this one changes the output."""
    import torch

    from musubi_tuner.networks import lora

    net = lora.create_arch_network(1.0, rank, float(rank), None, None, dit)
    net.apply_to(None, dit)
    if device is not None:
        net.to(device)
    with torch.no_grad():
        for module in net.unet_loras:
            module.lora_up.weight.normal_(0, std, generator=torch.Generator(device=device or "cpu").manual_seed(1))
    return net


def tiny_dit_file_and_lora(folder, rank: int = 4, alpha: float = 2.0, std: float = 0.05, generator=None):
    """(a tiny random DiT written to folder/dit.safetensors, the tensors of a LoRA on it as the trainer saves them,
    the network): lora_up drawn from N(0, std) with `generator` (torch's global RNG when None), so the LoRA acts."""
    import torch

    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.networks import lora

    config = tiny_dit_config()
    dit = write_dit(folder / "dit.safetensors", random_dit_state_dict(config, seed=1, scale=0.05), config)
    net = lora.create_arch_network(1.0, rank, alpha, None, None, HunyuanVideoDiT(config))
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0, std, generator=generator)
    return dit, {k: v.clone() for k, v in net.state_dict_for_saving().items()}, net


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """A command's main() run in this process as its script runs it: (exit status, stdout, stderr)."""
    import sys

    import pytest

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
        sys.exit(0)
    out, err = capsys.readouterr()
    return exit_.value.code or 0, out, err


def write_config(folder, text, name="dataset.toml"):
    """Write a dataset config; returns its path as a user would type it when `folder` is the current folder."""
    from pathlib import Path

    (folder / name).write_text(text)
    return Path(name) if Path.cwd() == folder else folder / name


def config_error(folder, text, name="dataset.toml", **kwargs) -> str:
    """The one-line error loading the dataset config `text` (written to folder/name) gives."""
    import pytest

    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.errors import UserError

    with pytest.raises(UserError) as info:
        load_dataset_config(write_config(folder, text, name), **kwargs)
    return str(info.value)


def dead_pid() -> int:
    """The pid of a process that has ended: what a killed run's temporary file names."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True).stdout)


def folder_once(appears, folder) -> None:
    """Make the folder `folder` once the file `appears` exists (a thread polls for it): a run then fails where it writes
    `folder`'s name, after its start-up checks, which refuse a folder there that is there from the start."""
    import threading
    import time
    from pathlib import Path

    def watch():
        while not Path(appears).exists():
            time.sleep(0.001)
        Path(folder).mkdir(parents=True)

    threading.Thread(target=watch, daemon=True).start()
