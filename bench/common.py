"""Shared pieces of the bench scripts: subprocess workers, peak memory, medians, tables, the machine's matmul rate.

Each measured variant runs in its own processes: one for time, one for memory. Memory is the resident
set's high-water mark during the steps above the resident set before them (Linux: the mark is reset
through /proc/self/clear_refs). So that the resident set tracks live tensors, the memory process runs
with glibc's mmap threshold fixed (every large block is returned to the system when freed) and trims
the heap before its baseline; that slows allocation, which is why time is measured in another process.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import torch


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MEMORY_MODE_ENV = "MUSUBI_BENCH_MEMORY"


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(step: Callable[[], None], runs: int, warmup: int = 1) -> dict:
    """In a memory process: the peak MiB of one step. Otherwise: `runs` timed steps after `warmup`."""
    if os.environ.get(MEMORY_MODE_ENV):
        _trim_heap()
        base = rss_mib()
        reset_peak()
        step()
        return {"peak_mib": peak_mib() - base}
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "median": statistics.median(times)}


def measure_interleaved(steps: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, dict]:
    """Time several variants in one process, one step of each in turn (the order flips every round), so that the
    machine's drift (its clock, a neighbour's load) falls on all of them alike. {name: {"times", "median"}}."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: {"times": t, "median": statistics.median(t)} for name, t in times.items()}


def run_process(script: str, args: Sequence[str], memory: bool) -> dict:
    """Run `script --worker args...` in a fresh process (a memory process if `memory`) and return its JSON result."""
    env = dict(os.environ)
    if memory:
        env.update({MEMORY_MODE_ENV: "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(script: str, args: Sequence[str]) -> dict:
    """Run `script --worker args...` twice in fresh processes (time, then memory) and merge their JSON results."""
    return {**run_process(script, args, memory=False), **run_process(script, args, memory=True)}


def matmul_rate(dtype: torch.dtype, n: int = 2048, runs: int = 5) -> float:
    """Measured GFLOP/s of an n x n matmul on this machine."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-+-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def machine() -> str:
    return f"{os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
