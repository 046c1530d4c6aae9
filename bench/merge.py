"""Peak memory of baking a LoRA into a DiT file: our streaming merge vs loading everything, against one copy of the model.

    PYTHONPATH=src python bench/merge.py [--double 2] [--single 6] [--rank 32] [--keep DIR]

Bench config: hidden 1024 (8 heads of 128), MLP 4096, 2 double + 6 single blocks (211M parameters, a
402 MiB bf16 safetensors file with random weights), a rank-32 LoRA on every block Linear (28 modules),
written to a temporary folder. Each method runs in its own process; the parent samples the child's
resident memory (/proc/PID/status) every few milliseconds and the child reports its high-water mark.

- ours: `merge_lora.py`'s merge_file (reads, merges and writes one tensor at a time).
- load, merge, stream out: the whole model loaded, LoRAs merged in place, written tensor by tensor
  (how musubi-tuner's merge_lora works).
- naive: safetensors load_file, merge every layer, safetensors save_file (the usual few-line script).

"anon" is the process's own memory (heap, tensors); "file" is the input file's pages mapped into it,
which the kernel can drop at any time (they are the page cache, not a copy the process owns). Both
columns are above the process's resident set just before the merge (torch imported); the ratio is
against one copy of the model (the file's size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, peak_mib, reset_peak, table  # noqa: E402

from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402

METHODS = ("ours", "load, merge, stream out", "naive")


def bench_config(double: int, single: int) -> DiTConfig:
    return DiTConfig(hidden_size=1024, heads_num=8, mlp_hidden_size=4096, mm_double_blocks_depth=double,
                     mm_single_blocks_depth=single, text_states_dim=1024, text_states_dim_2=768)


def write_assets(folder: Path, config: DiTConfig, rank: int) -> tuple[Path, Path]:
    """A bf16 DiT file of random weights (written one tensor at a time) and a rank-`rank` LoRA over its block Linears."""
    from musubi_tuner.files import LazyTensors, save_safetensors
    from musubi_tuner.hunyuan.checkpoints import dit_metadata
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.networks import lora

    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    specs = {k: (torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    dit = folder / "dit.safetensors"
    save_safetensors(LazyTensors(specs, lambda k: (torch.randn(specs[k][1], generator=g) * 0.02).to(torch.bfloat16)), dit,
                     metadata=dit_metadata(config))
    weights = {}
    for path, linear in lora.target_modules(model).items():
        name = lora.lora_name(path)
        weights[f"{name}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.01
        weights[f"{name}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.01
        weights[f"{name}.alpha"] = torch.tensor(float(rank))
    lora_path = folder / "lora.safetensors"
    from safetensors.torch import save_file

    save_file(weights, str(lora_path))
    return dit, lora_path


# ------------------------------------------------------------------------------------------------ the methods


def merge_ours(dit: str, lora_path: str, out: str) -> None:
    from musubi_tuner.networks.merge import merge_file

    merge_file(dit, [lora_path], [1.0], out)


def merge_load_all_stream_out(dit: str, lora_path: str, out: str) -> None:
    from musubi_tuner.hunyuan.checkpoints import load_dit, save_dit
    from musubi_tuner.networks.merge import merge_loras_into

    model = load_dit(dit, dtype=torch.bfloat16)
    merge_loras_into(model, [lora_path], [1.0])
    save_dit(model.state_dict(), model.config, out)


def merge_naive(dit: str, lora_path: str, out: str) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(dit)
    lora_sd = load_file(lora_path)
    for key in [k for k in lora_sd if k.endswith(".lora_down.weight")]:
        name = key.removesuffix(".lora_down.weight")
        down, up = lora_sd[key], lora_sd[f"{name}.lora_up.weight"]
        scale = float(lora_sd[f"{name}.alpha"]) / down.shape[0]
        target = name.removeprefix("lora_unet_")
        target = next(k for k in sd if k.replace(".", "_") == f"{target}_weight")
        sd[target] = (sd[target].float() + (up @ down) * scale).to(sd[target].dtype)
    save_file(sd, out)


def worker(method: str, dit: str, lora_path: str, out: str) -> dict:
    import musubi_tuner.networks.merge  # noqa: F401  (imports before the baseline)
    import safetensors.torch  # noqa: F401

    fn = {"ours": merge_ours, "load, merge, stream out": merge_load_all_stream_out, "naive": merge_naive}[method]
    reset_peak()
    print("ready", flush=True)
    sys.stdin.readline()  # the parent has read the baseline
    t0 = time.perf_counter()
    fn(dit, lora_path, out)
    return {"seconds": time.perf_counter() - t0, "hwm_mib": peak_mib()}


def _status(pid: int) -> dict[str, float]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def run_method(method: str, dit: Path, lora_path: Path, out: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # freed tensors leave the RSS
    child = subprocess.Popen([sys.executable, __file__, "--worker", method, str(dit), str(lora_path), str(out)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().strip() == "ready"
    base = _status(child.pid)
    peaks = dict(base)
    done = threading.Event()

    def poll():
        while not done.is_set():
            for k, v in _status(child.pid).items():
                peaks[k] = max(peaks.get(k, 0.0), v)
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    child.stdin.write("go\n")
    child.stdin.flush()
    lines = child.stdout.read().strip().splitlines()
    done.set()
    thread.join()
    if child.wait() != 0 or not lines:
        raise RuntimeError(f"{method} failed")
    result = json.loads(lines[-1])
    return {"anon": peaks["RssAnon"] - base["RssAnon"], "file": peaks["RssFile"] - base["RssFile"],
            "rss": result["hwm_mib"] - base["VmRSS"], "seconds": result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=6)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--keep", type=Path, default=None, help="write the files here and keep them")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "DIT", "LORA", "OUT"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    config = bench_config(args.double, args.single)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        dit, lora_path = write_assets(folder, config, args.rank)
        model_mib = dit.stat().st_size / 2**20
        print(f"machine: {machine()}")
        print(f"DiT file {model_mib:.0f} MiB (hidden {config.hidden_size}, {args.double} double + {args.single} single blocks, bf16); "
              f"LoRA rank {args.rank}, {lora_path.stat().st_size / 2**20:.1f} MiB")
        rows = []
        for method in METHODS:
            out = folder / f"merged_{METHODS.index(method)}.safetensors"
            r = run_method(method, dit, lora_path, out)
            out.unlink()
            rows.append({"method": method, "seconds": f"{r['seconds']:.1f}", "peak anon MiB": f"{r['anon']:.0f}",
                         "peak file-mapped MiB": f"{r['file']:.0f}", "peak RSS MiB": f"{r['rss']:.0f}",
                         "anon / one copy": f"{r['anon'] / model_mib:.2f}x", "RSS / one copy": f"{r['rss'] / model_mib:.2f}x"})
        print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
