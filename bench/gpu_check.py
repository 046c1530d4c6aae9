"""The one command to run when a CUDA GPU is at hand: the GPU tests, then the real model's blocks timed.

    python bench/gpu_check.py [--runs 3] [--kernels sdpa,flash3,flash] [--budget 540] [--skip-plan] [--skip-tests]

1. One full-width double block and one single block (hidden 3072, 24 heads, MLP 12288, LoRA rank 32 on
   every block Linear, bf16 weights under bf16 autocast) are timed with CUDA events at the token counts of
   544x960x97 (51,000 image tokens) and 720x1280x129 (118,800), with 256 text tokens: a forward alone (a
   denoising step) and a forward + backward (a LoRA training step), for each attention kernel installed.
2. They are extrapolated to the real depth (20 double + 40 single blocks; the embedders and the final layer
   are well under 1% of the FLOPs): a training step with gradient checkpointing (forward, then forward again
   and backward), and a whole video (steps x forwards per step). The video times are set beside published
   ones as utilisation (the model's FLOPs over the time, over the GPU's bf16 peak), which compares GPUs.
3. The planner's full-size rows are run on this GPU (bench/gpu_plan_check.py): the full-depth DiT with each row's
   memory options, its allocator peak and step time against the plan.
4. `pytest -m gpu tests/gpu` runs in what is left of --budget (seconds; the whole check stays under it), the
   compiled-block cases each in a process of their own (a CUDA error there would fail every later test).

Nothing is installed: it needs torch and pytest (no diffusers, no video packages), runs this tree's src
whether the package is installed or not, times the kernels that are importable and names the others.
Without a CUDA device it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "src"))  # this tree's package, installed or not: a GPU machine may have torch alone

import gpu_plan_check  # noqa: E402
from common import measure, table  # noqa: E402
from gpu.support import cuda_seconds, no_cuda_reason  # noqa: E402

from musubi_tuner.errors import use_expandable_segments  # noqa: E402
from musubi_tuner.hunyuan.config import DiTConfig  # noqa: E402
from musubi_tuner.hunyuan.cost import forward_flops  # noqa: E402
from musubi_tuner.planning.options import Workload  # noqa: E402
from musubi_tuner.planning.timing import GPUS  # noqa: E402

FULL = DiTConfig()  # HunyuanVideo / SkyReels V1 T2V
TEXT_TOKENS = 256
KERNELS = ("sdpa", "flash3", "flash", "xformers", "sageattn")  # sageattn has no backward: forward times only
LORA_RANK = 32


@dataclass(frozen=True)
class Video:
    height: int
    width: int
    frames: int
    steps: int
    forwards_per_step: int  # 2 with classifier-free guidance (a batch of two), 1 with embedded guidance
    published_s: float
    published_gpu: str  # a key of planning.timing.GPUS
    source: str

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    def workload(self) -> Workload:
        return Workload(config=FULL, height=self.height, width=self.width, frames=self.frames, text_tokens=TEXT_TOKENS)


def published_video(gpu: str, height: int, width: int) -> Video:
    """A one-GPU figure of the planner's calibration table (planning/calibration.py, which names its source)."""
    from musubi_tuner.planning.calibration import PUBLISHED

    f = next(p for p in PUBLISHED if (p.gpu, p.height, p.width, p.processes) == (gpu, height, width, 1))
    return Video(f.height, f.width, f.frames, f.steps, 2 if f.guidance != 1.0 else 1, f.seconds, f.gpu, f.source)


VIDEOS = (published_video("rtx4090", 544, 960), published_video("h100", 720, 1280))


@dataclass(frozen=True)
class BlockTimes:
    """Seconds for one block, batch 1: forward alone (no graph) and forward + backward; None where it did not run."""

    double_forward: float | None
    double_train: float | None
    single_forward: float | None
    single_train: float | None


def installed_kernels(wanted: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(importable, missing with the reason) among the attention modes `wanted`."""
    from musubi_tuner.errors import UserError
    from musubi_tuner.hunyuan.attention import check_attention_mode

    found, missing = [], []
    for mode in wanted:
        try:
            check_attention_mode(mode)
            found.append(mode)
        except UserError as e:
            missing.append(f"{mode}: {e}")
    return found, missing


def seconds(step: Callable[[], object], device: torch.device, runs: int, warmup: int = 1) -> float:
    """Median time of `step`: CUDA events on a GPU (the device's clock), the host's clock elsewhere."""
    return cuda_seconds(step, runs, warmup) if device.type == "cuda" else measure(step, runs, warmup)["median"]


def one_block_each(config: DiTConfig, device: torch.device):
    """A DiT of `config`'s width with one double and one single block, random bf16 weights, LoRA on its blocks."""
    import dataclasses

    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.networks.lora import LoRANetwork

    small = dataclasses.replace(config, mm_double_blocks_depth=1, mm_single_blocks_depth=1, refiner_depth=1)
    with torch.device("meta"):
        model = HunyuanVideoDiT(small)
    model = model.to_empty(device=device).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        generator = torch.Generator(device=device).manual_seed(0)
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    network = LoRANetwork(model, rank=LORA_RANK, alpha=1.0)
    network.apply_to(None, model)
    network.to(device)
    network.prepare_grad_etc()
    with torch.no_grad():  # lora_up starts at zero; non-zero weights so the LoRA path computes what training computes
        for p in network.parameters():
            p.normal_(0.0, 0.01, generator=generator)
    return model, network


def time_blocks(model, work: Workload, mode: str, device: torch.device, runs: int) -> BlockTimes:
    """Time the model's double and single block on `work`'s token counts with attention `mode`."""
    from musubi_tuner.hunyuan.blocks import AttentionContext
    from musubi_tuner.hunyuan.rope import rope_rotations

    c = model.config
    img_len = work.image_tokens
    generator = torch.Generator(device=device).manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=generator)

    img, txt, silu_vec = rand(1, img_len, c.hidden_size), rand(1, work.text_tokens, c.hidden_size), rand(1, c.hidden_size)
    rotation = rope_rotations(work.latent_shape, c.patch_size, c.rope_dim_list, c.rope_theta, device)
    ctx = AttentionContext(mode=mode, rotation=torch.cat([rotation, rotation.new_ones(work.text_tokens, rotation.shape[1])]),
                           img_len=img_len)
    joint = torch.cat([img, txt], dim=1)
    cases = {"double": (model.double_blocks[0], (img, txt)), "single": (model.single_blocks[0], (joint,))}
    times = {}
    for kind, (block, inputs) in cases.items():
        def forward(block=block, inputs=inputs):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                block(*inputs, silu_vec, ctx)

        def train(block=block, inputs=inputs):
            leaves = [t.detach().requires_grad_(True) for t in inputs]  # later blocks propagate input gradients
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = block(*leaves, silu_vec, ctx)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        times[f"{kind}_forward"] = _guarded(lambda: seconds(forward, device, runs), device)
        times[f"{kind}_train"] = None if mode == "sageattn" else _guarded(lambda: seconds(train, device, runs), device)
    return BlockTimes(**times)


def _guarded(measure: Callable[[], float], device: torch.device) -> float | None:
    """A measurement, or None where the device ran out of memory (the table says so)."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


@dataclass(frozen=True)
class Extrapolated:
    train_step_s: float | None  # one LoRA training step with gradient checkpointing, batch 1
    video_s: float | None  # every denoising step of the video


def extrapolate(t: BlockTimes, video: Video, config: DiTConfig = FULL) -> Extrapolated:
    """Scale one block of each kind to the model's depth. Checkpointing runs every block's forward twice."""
    d, s = config.mm_double_blocks_depth, config.mm_single_blocks_depth
    forward = None if None in (t.double_forward, t.single_forward) else d * t.double_forward + s * t.single_forward
    train = None if None in (t.double_train, t.single_train) or forward is None else forward + d * t.double_train + s * t.single_train
    video_s = None if forward is None else video.steps * video.forwards_per_step * forward
    return Extrapolated(train_step_s=train, video_s=video_s)


def video_flops(video: Video, config: DiTConfig = FULL) -> float:
    """Model FLOPs of every forward of the video's denoising."""
    return video.steps * video.forwards_per_step * forward_flops(config, video.workload().latent_shape, TEXT_TOKENS).total


def this_gpu_peak(name: str) -> tuple[float, str]:
    """(dense bf16 TFLOP/s, where it comes from) for a GPU name as CUDA reports it."""
    key = gpu_plan_check.this_gpu_key(name)
    if key is not None:
        return GPUS[key].bf16_tflops, GPUS[key].source
    return measured_matmul_tflops(), "measured: 8192^3 bf16 matmul (no datasheet figure known for this GPU)"


def measured_matmul_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / seconds(lambda: a @ b, torch.device("cuda"), runs=5) / 1e12


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0, missing: str = "out of memory") -> str:
    return missing if value is None else f"{value * scale:,.{digits}f}"


def rows_for(video: Video, mode: str, times: BlockTimes, peak_tflops: float) -> dict:
    """One row of the table: the block times, their extrapolations and the published figure beside them."""
    est = extrapolate(times, video)
    flops = video_flops(video)
    published = GPUS[video.published_gpu]
    ours = "" if est.video_s is None else f"{flops / est.video_s / 1e12 / peak_tflops:.0%}"
    return {
        "video": video.name, "tokens": f"{video.workload().image_tokens:,}+{TEXT_TOKENS}", "attention": mode,
        "double fwd ms": _fmt(times.double_forward, 1e3), "double fwd+bwd ms": _fmt(times.double_train, 1e3, missing="-"),
        "single fwd ms": _fmt(times.single_forward, 1e3), "single fwd+bwd ms": _fmt(times.single_train, 1e3, missing="-"),
        "train step s": _fmt(est.train_step_s, digits=1, missing="-"),
        "steps x forwards": f"{video.steps} x {video.forwards_per_step}", "video s": _fmt(est.video_s),
        "published s": f"{video.published_s:.0f} ({published.name})",
        "utilisation ours / published": f"{ours} / {flops / video.published_s / 1e12 / published.bf16_tflops:.0%}",
    }


ISOLATED = "compiled_blocks"  # tests that run each in a process of its own (-k expression)


def run_gpu_tests(timeout_s: float) -> str:
    """`pytest -m gpu tests/gpu` in fresh processes (this tree's src first); their summaries, or why they stopped.

    A CUDA error such as an illegal memory access poisons the process's CUDA context, and every later test in it would
    fail too. The compiled-block cases, where the first GPU run saw one, therefore run each in a process of its own,
    after the rest."""
    started = time.monotonic()
    base = ["-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
            "-p", "no:logging"]  # a failing compile test would otherwise print every DEBUG record torch logged
    listed = _pytest(["tests/gpu", "-k", ISOLATED, "--collect-only", "-q", "-p", "no:cacheprovider"], 120)
    isolated = [line.strip() for line in (listed[1] if listed else "").splitlines() if "::" in line]
    runs = [("tests/gpu", "-k", f"not {ISOLATED}", "--durations=10"), *[(node,) for node in isolated]]
    summaries = []
    for args in runs:
        left = timeout_s - (time.monotonic() - started)
        if left < 30:
            summaries.append(f"{args[0]}: not run, no time left in --budget")
            continue
        done = _pytest([*args, *base], left)
        if done is None:
            summaries.append(f"{args[0]}: ran past the time left and was stopped (raise --budget or run pytest -m gpu alone)")
            continue
        code, out, err = done
        print(out, err[-3000:], sep="\n")
        lines = [line for line in out.splitlines() if line.strip()]
        summaries.append(f"{args[0] if len(runs) > 1 else 'gpu tests'}: {lines[-1].strip('= ') if lines else 'no output'} (exit {code})")
    return "gpu tests:\n  " + "\n  ".join(summaries)


def _pytest(args: list[str], timeout_s: float) -> tuple[int, str, str] | None:
    """(exit code, stdout, stderr) of pytest in a fresh process, or None where it ran past `timeout_s` (its output printed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        print(e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        return None
    return done.returncode, done.stdout, done.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per block (the median is shown)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="attention modes to time, those installed")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole check; the gpu tests get what is left")
    parser.add_argument("--skip-plan", action="store_true", help="do not run the planner's full-size rows")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    args = parser.parse_args(argv)
    started = time.monotonic()
    reason = no_cuda_reason()
    if reason:
        print(f"no GPU: {reason}. Nothing to check here; run this on a machine with a CUDA GPU "
              "(the gpu tests skip on this one: pytest -m gpu).")
        return 0
    use_expandable_segments()  # as the commands run (the gpu tests inherit it)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak, peak_source = this_gpu_peak(name)
    kernels, missing = installed_kernels(tuple(args.kernels.split(",")))
    print(f"GPU: {name}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}, "
          f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"bf16 peak taken as {peak:.0f} TFLOP/s ({peak_source}); measured 8192^3 bf16 matmul {measured_matmul_tflops():.0f} TFLOP/s")
    for line in missing:
        print(f"not timed: {line}")
    model, _network = one_block_each(FULL, device)
    rows = [rows_for(video, mode, time_blocks(model, video.workload(), mode, device, args.runs), peak)
            for video in VIDEOS for mode in kernels]
    del model, _network
    torch.cuda.empty_cache()
    print(table(rows, list(rows[0])), flush=True)
    plan_rows = [] if args.skip_plan else gpu_plan_check.run_cases()
    summary = "gpu tests skipped (--skip-tests)" if args.skip_tests else run_gpu_tests(args.budget - (time.monotonic() - started))
    print()
    print(table(rows, list(rows[0])))
    if plan_rows:
        print()
        print(table(plan_rows, gpu_plan_check.COLUMNS))
    for video in VIDEOS:
        print(f"published {video.name}: {video.source}")
    print(summary)
    print(f"gpu_check took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
