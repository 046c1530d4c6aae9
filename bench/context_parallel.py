"""Context parallel on this CPU: 1 process x 2 threads against 2 processes x 1 thread sharing each sample's tokens,
and the bytes the collectives move per step, counted and on the wire, against the planner's formula.

    PYTHONPATH=src python bench/context_parallel.py [--runs 5] [--rounds 3] [--modes train,generate]

Bench config: DiT hidden 512 (4 heads of 128), MLP 2048, 1 double + 2 single blocks, 2 refiner blocks, fp32
weights and activations; one sample of 16 x 2 x 32 x 32 latents (512 image tokens) and 60 valid text tokens.
train: a LoRA step (rank 16): forward, MSE loss, backward, the gradients reduced in buckets, AdamW step.
generate: one denoising step (one DiT forward, no CFG).

Both variants use the machine's 2 cores: one process with 2 intra-op threads, or two processes (gloo over
loopback TCP) with one thread each, each holding half the tokens. On a CPU the two should be near parity:
the all-to-alls cost memory copies and loopback traffic, the single process loses some of its second
thread to synchronisation. On GPUs the point is memory (each holds 1/N of the activations) and time (1/N
of the FLOPs each); this bench measures what the collectives cost.

Traffic: "counted" is what the process of rank 0 hands to the collectives in one step (distributed.
logging_collectives: all-to-all (N-1)/N of its tensor, ring all-reduce 2(N-1)/N, all-gather (N-1) parts);
"formula" is planning.planner.collective_bytes for the same shapes; "on the wire" is the growth of the
loopback interface's byte counter (/proc/net/dev) during that step, both processes together, so about
twice the counted bytes plus gloo's framing (and any other local traffic of the machine).

Each round runs both variants once (fresh processes, `--runs` timed steps after a warm-up); the table
gives the medians over rounds and the median of the per-round ratios, so a busy machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, table  # noqa: E402

from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402

CONFIG = DiTConfig(hidden_size=512, heads_num=4, mlp_hidden_size=2048, mm_double_blocks_depth=1, mm_single_blocks_depth=2,
                   refiner_depth=2, text_states_dim=256, text_states_dim_2=64)
LATENT = (16, 2, 32, 32)
TEXT = 60
RANK = 16


def loopback_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, data = line.partition(":")
            if name.strip() == "lo":
                return int(data.split()[0])  # received bytes (what was sent, on loopback)
    return 0


def build(seed: int = 0):
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.networks import lora

    torch.manual_seed(seed)
    dit = HunyuanVideoDiT(CONFIG)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.02)
    dit.requires_grad_(False)
    net = lora.create_arch_network(1.0, RANK, RANK, None, None, dit)
    net.apply_to(None, dit)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 256, dtype=torch.long)
    mask[:, :TEXT] = 1
    inputs = (torch.randn(1, *LATENT, generator=g), torch.full((1,), 600.0), torch.randn(1, 256, CONFIG.text_states_dim, generator=g),
              mask, torch.randn(1, CONFIG.text_states_dim_2, generator=g), torch.full((1,), 6000.0))
    target = torch.randn(1, *LATENT, generator=g)
    return dit, net, inputs, target


def rank_main(rank: int, world: int, threads: int, mode: str, runs: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from musubi_tuner.distributed import GradientReducer, logging_collectives, make_layout

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    layout = make_layout(world)
    dit, net, inputs, target = build()
    dit.sequence_parallel = layout.sequence
    reducer = GradientReducer(list(net.parameters()), divide_by=layout.replicas)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        if mode == "generate":
            with torch.no_grad():
                dit(*inputs)
            return
        loss = (dit(*inputs) - target).square().mean()
        loss.backward()
        if world > 1:
            reducer.reduce()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(runs):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result = {"median": statistics.median(times), "params": sum(p.numel() for p in net.parameters()),
              "tensors": len(reducer.params), "buckets": len(reducer.buckets)}
    if world > 1:
        dist.barrier()
        wire = loopback_bytes()
        with logging_collectives() as log:
            step()
        dist.barrier()
        result.update(wire=loopback_bytes() - wire, counted=log.bytes_sent(), calls={k: log.count(k) for k in
                                                                                    ("all_to_all", "all_gather", "all_reduce")})
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def run_variant(world: int, threads: int, mode: str, runs: int) -> dict:
    """A fresh group of `world` processes with `threads` threads each; rank 0's result."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}  # no spinning on a shared machine
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world), str(threads), mode, str(runs),
                                   str(port), out], env=env) for rank in range(world)]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"a worker of {world} x {threads} ({mode}) failed")
        return json.loads(Path(out).read_text())


def formula(mode: str) -> int:
    from musubi_tuner.planning import MemoryOptions, Workload
    from musubi_tuner.planning.planner import collective_bytes

    work = Workload(CONFIG, LATENT[2] * 8, LATENT[3] * 8, (LATENT[1] - 1) * 4 + 1, text_tokens=TEXT, mode=mode)
    return collective_bytes(work, MemoryOptions(mixed_precision="no", dit_dtype="fp32", context_parallel=2, network_dim=RANK))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, threads, mode, runs, port, out = sys.argv[2:]
        rank_main(int(rank), int(world), int(threads), mode, int(runs), int(port), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="train,generate")
    a = ap.parse_args()
    print(f"machine: {machine()}; the machine may be shared: compare the ratio, measured in the same rounds")
    rows, traffic = [], []
    for mode in a.modes.split(","):
        one, two, ratios = [], [], []
        for _ in range(a.rounds):
            single = run_variant(1, 2, mode, a.runs)
            pair = run_variant(2, 1, mode, a.runs)
            one.append(single["median"])
            two.append(pair["median"])
            ratios.append(pair["median"] / single["median"])
        rows.append({"step": mode, "1 process x 2 threads (s)": f"{statistics.median(one):.3f}",
                     "2 processes x 1 thread (s)": f"{statistics.median(two):.3f}", "ratio 2p/1p": f"{statistics.median(ratios):.2f}"})
        calls = pair["calls"]
        traffic.append({"step": mode, "counted (MB)": f"{pair['counted'] / 1e6:.3f}", "formula (MB)": f"{formula(mode) / 1e6:.3f}",
                        "on the wire, both (MB)": f"{pair['wire'] / 1e6:.3f}",
                        "collectives": f"{calls['all_to_all']} all-to-all, {calls['all_gather']} all-gather, {calls['all_reduce']} all-reduce",
                        "LoRA grads": "-" if mode == "generate" else
                        f"{pair['tensors']} tensors in {pair['buckets']} bucket(s) (was {pair['tensors']} all-reduces)"})
    print(f"DiT hidden {CONFIG.hidden_size}, {CONFIG.heads_num} heads, {CONFIG.mm_double_blocks_depth} double + "
          f"{CONFIG.mm_single_blocks_depth} single blocks, fp32; latent {LATENT}, {TEXT} text tokens; LoRA rank {RANK}; "
          f"{a.rounds} rounds x {a.runs} steps")
    print(table(rows, list(rows[0])))
    print()
    print("bytes per step sent by one process of two (context parallel over 2):")
    print(table(traffic, list(traffic[0])))


if __name__ == "__main__":
    main()
