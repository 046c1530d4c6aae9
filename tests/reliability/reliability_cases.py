"""The shape of a reliability case and the one check every case gets.

A case builds a situation in a fresh folder (a bad flag, a damaged file, a file-size limit, a memory limit, a read-only folder)
and runs one command in its own process (runner.py). What a user sees is asserted: exit status 2 when the run
cannot go on (0 when the input is odd but usable), exactly one `error:` line naming the culprit, no traceback,
files that existed keep their bytes, no temporary file left behind, and whatever the run wrote is whole.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from command_runner import no_traceback, read_only_mounts_work, run_command
from reliability_assets import Assets

from musubi_tuner import files


@dataclass
class Case:
    id: str
    command: str  # module under musubi_tuner
    argv: Callable[[Assets, Path], list[str]]  # builds the situation in tmp, returns the command line
    error: str | None  # regex the one `error:` line must match; None: the run must succeed
    keep: Callable[[Assets, Path], list[Path]] | None = None  # files that existed before and must keep their bytes
    file_size_limit: Callable[[Assets, Path], int] | None = None  # RLIMIT_FSIZE of the command's process, in bytes
    memory_headroom: int | None = None  # bytes of address space the command may map beyond its start (RLIMIT_AS)
    read_only: str | None = None  # a folder (relative to tmp) mounted read-only for the command's process
    small_disk: tuple[str, int] | None = None  # (a folder relative to tmp, bytes): a file system that small mounted there
    open_files: int | None = None  # the command's limit on open files (ulimit -n)
    then: Callable[[Assets, Path, str, str], None] | None = None  # further checks (tmp, stderr, stdout)
    warning: str | None = None  # regex a log line on stderr must match
    covered_by: str = ""  # where a library test checks the same rule in more detail
    extra: dict = field(default_factory=dict)


_READ_ONLY_OK: bool | None = None


def check(case: Case, assets: Assets, tmp: Path) -> None:
    global _READ_ONLY_OK
    if case.read_only or case.small_disk:
        if _READ_ONLY_OK is None:
            _READ_ONLY_OK = read_only_mounts_work()
        if not _READ_ONLY_OK:
            pytest.skip("needs a private mount namespace (root with CAP_SYS_ADMIN)")
    argv = case.argv(assets, tmp)
    if case.read_only:
        (tmp / case.read_only).mkdir(parents=True, exist_ok=True)
    kept = {p: p.read_bytes() for p in case.keep(assets, tmp)} if case.keep else {}
    assert kept or not case.keep, "the case meant to protect files but found none"
    before = {p: p.read_bytes() for p in tmp.rglob("*.safetensors") if p.is_file()}

    result = run_command(case.command, argv, tmp, file_size_limit=case.file_size_limit(assets, tmp) if case.file_size_limit else None,
                         memory_headroom=case.memory_headroom, read_only=tmp / case.read_only if case.read_only else None,
                         small_disk=(tmp / case.small_disk[0], case.small_disk[1]) if case.small_disk else None,
                         open_files=case.open_files)

    no_traceback(result)
    errors = result.error_lines
    if case.error is None:
        assert result.code == 0 and not errors, result.err[-3000:]
    else:
        assert result.code == 2, (result.code, result.err[-3000:])
        assert len(errors) == 1 and re.search(case.error, errors[0]), result.err[-3000:]
        assert not any(line.rstrip().endswith(("]error:", "error:")) for line in result.err.splitlines()), "message glued to a bar"
    if case.warning:  # said, and once: the same warning said twice reads as two problems (fuzz_au 9)
        said = [match.group(0) for match in re.finditer(case.warning, result.err)]
        assert said and len(said) == len(set(said)), result.err[-3000:]
    for path, data in kept.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was damaged"
    assert not leftovers(tmp), leftovers(tmp)
    for path in filter(Path.is_file, tmp.rglob("*.safetensors")):  # what the run wrote is whole: the old file or the new one
        if before.get(path) != path.read_bytes():
            files.StateDictFile(path).load_all()
    if case.then:
        case.then(assets, tmp, result.err, result.out)


def replaced(argv: list[str], flag: str, value) -> list[str]:
    """`argv` with `flag`'s value replaced by `value`."""
    i = argv.index(flag)
    return [*argv[: i + 1], str(value), *argv[i + 2:]]


def all_said(err: str, *patterns: str) -> None:
    """Each pattern matches somewhere in the command's stderr (a case's `warning` is one)."""
    missing = [p for p in patterns if not re.search(p, err)]
    assert not missing, (missing, err[-3000:])


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".incomplete", ".lock")) or ".write-test." in p.name]


# ----------------------------------------------------------------------------------------------- command lines


def cache_latents_argv(toml, a, *extra):
    return ["--dataset_config", str(toml), "--vae", str(a.vae), "--num_workers", "0", *extra]


def cache_text_argv(toml, a, *extra, te1=None, te2=None):
    return ["--dataset_config", str(toml), "--text_encoder1", str(te1 or a.te1), "--text_encoder2", str(te2 or a.te2), *extra]


def train_argv(a, out, *extra, dit=None, toml=None):
    return ["--dit", str(dit or a.dit), "--dataset_config", str(toml or a.cached), "--sdpa", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "adamw", "--seed", "1",
            "--dit_dtype", "float32", "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--output_dir", str(out),
            "--output_name", "tiny", *extra]


def generate_argv(a, tmp, *extra, vae=None):
    return ["--dit", str(a.dit), "--vae", str(vae or a.vae), "--text_encoder1", str(a.te1), "--text_encoder2", str(a.te2),
            "--prompt", "a red circle", "--save_path", str(tmp / "videos"), "--infer_steps", "1", "--video_size", "32", "32",
            "--video_length", "1", "--output_type", "latent", "--seed", "1", *extra]


def merge_argv(a, tmp, *loras, extra=()):
    return ["--dit", str(a.dit), "--lora_weight", *map(str, loras or [a.lora]), "--save_merged_model",
            str(tmp / "merged" / "merged.safetensors"), "--device", "cpu", *extra]


def plan_argv(*extra):
    return ["--model", "t2v-720p", "--video_size", "544", "960", *extra]


# ----------------------------------------------------------------------------------------------- situations


NOISE = random.Random(0).randbytes(4000)  # not a video (fixed bytes: some random bytes pass for a container without video)
READ_ONLY = r"\(Read-only file system\)"
TOO_LARGE = r"\(File too large\)"
MEMORY = 1536 << 20  # a memory limit: what the tiny models' runs need, with room to spare, and far less than a huge size does


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def truncated(src: Path, dst: Path, keep: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def write_toml(tmp: Path, body: str, general: str = '[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n') -> Path:
    return write(tmp / "dataset.toml", general + body)


def video_table(a: Assets, tmp: Path, extra: str = "") -> str:
    return (f'[[datasets]]\nvideo_directory = "{a.dataset.parent / "videos"}"\ncache_directory = "{tmp / "cache"}"\n'
            f'target_frames = [5]\n{extra}')


KILLED_WRITE = ("import os, signal, sys\nfrom musubi_tuner.files import atomic_write\n"
                "with atomic_write(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half a file')\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n")


def killed_while_writing(path: Path) -> Path:
    """What a command killed while it wrote `path` leaves: a process really killed inside atomic_write (its temporary
    file beside `path`, named with its dead pid). Returns `path`; `check` then asserts that the run removed it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(path)], capture_output=True)
    assert done.returncode == -signal.SIGKILL and leftovers(path.parent), done.stderr
    return path


def link(path: Path, target: Path) -> Path:
    """`path` made a symbolic link to `target` (which need not exist)."""
    path.symlink_to(target)
    return path


def copy_dataset(a: Assets, tmp: Path) -> tuple[Path, Path]:
    """A private copy of the cached synthetic dataset: (its TOML, its folder)."""
    folder = tmp / "ds"
    shutil.copytree(a.dataset.parent, folder)
    toml = folder / "dataset.toml"
    toml.write_text(toml.read_text().replace(str(a.dataset.parent), str(folder)))
    return toml, folder


def copy_cached(a: Assets, tmp: Path) -> Path:
    """A private copy of the cache-only training dataset; returns its TOML."""
    folder = tmp / "cached"
    shutil.copytree(a.cached.parent, folder)
    toml = folder / "dataset.toml"
    toml.write_text(toml.read_text().replace(str(a.cached.parent), str(folder)))
    return toml


def caches(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*_hv*.safetensors"))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'pwned_by_pickle'}",))


def evil_pt(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"encoder.conv_in.weight": _RunsCode()}, f)
    return path


def nan_dit(a, tmp, prefix: str = "final_layer"):
    """The tiny DiT with one infinite weight (in the first tensor whose name starts with `prefix`), as a damaged download
    would be."""
    from musubi_tuner.demo.tiny_dit import TINY_DIT, random_dit_state_dict, write_dit

    state = random_dit_state_dict(TINY_DIT)
    key = sorted(k for k in state if k.startswith(prefix))[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("inf")
    return write_dit(tmp / "nan_dit.safetensors", state, TINY_DIT)


def nan_vae(a, tmp, part: str = "encoder"):
    """The tiny VAE with the first convolution of its `part` (encoder or decoder) NaN, as a damaged download would be."""
    import torch

    state = torch.load(a.vae, weights_only=True)
    key = f"{part}.conv_in.conv.weight"
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, tmp / "nan_vae.pt")
    return tmp / "nan_vae.pt"


def nan_llm(a, tmp):
    """The tiny LLM folder with a NaN weight in its first layer."""
    import shutil

    import torch

    from musubi_tuner import files

    folder = tmp / "te1"
    shutil.copytree(a.te1, folder)
    shard = folder / "model-00001-of-00002.safetensors"
    weights = files.StateDictFile(shard).load_all()
    key = "model.layers.0.mlp.down_proj.weight"
    weights[key] = torch.full_like(weights[key], float("nan"))
    files.save_safetensors(weights, shard)
    return folder


def far_clip(a, tmp):
    """The tiny CLIP folder with a bias of 1e30 in its last norm: finite, and far past any encoding a working encoder gives."""
    import shutil

    from musubi_tuner import files

    folder = tmp / "te2_far"
    shutil.copytree(a.te2, folder)
    weights = files.StateDictFile(folder / "model.safetensors").load_all()
    weights["text_model.final_layer_norm.bias"] = weights["text_model.final_layer_norm.bias"] + 1e30
    files.save_safetensors(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def no_file(path: Path) -> None:
    assert not path.exists(), f"{path} exists: the pickle ran code"


def outputs_of(folder_name: str):
    def keep(a, tmp):
        return sorted(p for p in (tmp / folder_name).rglob("*") if p.is_file())
    return keep


def summary_names(*patterns):
    def check_out(a, tmp, err, out):
        for pattern in patterns:
            assert re.search(pattern, out), (pattern, out)
    return check_out


def nothing_generated(a, tmp, err, out):
    assert "denoising" not in err, "sampling ran before the bad input was found"
    assert not list((tmp / "videos").glob("*")) if (tmp / "videos").exists() else True


def trained_before(a: Assets, tmp: Path, *extra: str) -> Path:
    """An earlier run's LoRA and state in tmp/out (what a failed rerun must not damage)."""
    out = tmp / "out"
    result = run_command("hv_train_network", train_argv(a, out, "--save_state", *extra), tmp)
    assert result.code == 0, result.err[-3000:]
    return out


def size_of(path_in_tmp: str, factor: float = 1.0):
    """A file-size limit relative to a file the situation made: `factor` times its size."""
    def limit(a, tmp):
        return int((tmp / path_in_tmp).stat().st_size * factor)
    return limit
