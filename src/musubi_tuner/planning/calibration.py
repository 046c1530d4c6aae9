"""The share of a GPU's peak this model reaches, learnt from published end-to-end times, and the speed of PyTorch's
SDPA on Hopper, learnt from this project's own steps timed on an H200 (one table of each, used by the time model and
printed in docs/memory_planner.md).

A figure marked `fit` sets its GPU's utilisation: the model's FLOPs over (seconds x the GPU's dense bf16 peak),
the geometric mean where a GPU has several. Every other figure is a check of the model. All the fit figures ran
flash-attention 2 (the official code, xDiT, diffusers); another attention kernel changes only the attention's
share of the time, by the kernel's speed over flash-attention 2 (ATTENTION_SPEEDUP; for SDPA on Hopper, the
denoising steps of MEASURED). GPUs with no published figure take the one of the same chip family (CALIBRATED_FROM).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from musubi_tuner.hunyuan.config import HUNYUAN_T2V
from musubi_tuner.hunyuan.cost import forward_flops
from musubi_tuner.planning.options import MemoryOptions, Workload

HUNYUAN = "[HunyuanVideo README](https://github.com/Tencent/HunyuanVideo), xDiT table"
XDIT = "[xDiT docs/performance/hunyuanvideo.md](https://github.com/xdit-project/xDiT/blob/main/docs/performance/hunyuanvideo.md)"
SKYREELS = "[SkyReels-V1 README](https://github.com/SkyworkAI/SkyReels-V1), Performance Comparison"
FASTVIDEO = ("[FastVideo README of Dec 2024](https://github.com/hao-ai-lab/FastVideo/blob/58cfd71b5e734edf9508f6da40c6c7f866246cf3/README.md): "
             "\"a 5-second 720P video with Hunyuan takes 13 minutes on 4 X A100\"")


@dataclass(frozen=True)
class Published:
    gpu: str  # a key of timing.GPUS
    height: int
    width: int
    frames: int
    steps: int
    guidance: float  # != 1: real CFG, two forwards per step
    seconds: float  # end to end: text encoders, denoising, VAE decode
    source: str
    fit: bool = False
    processes: int = 1  # context parallel (Ulysses) over this many GPUs
    attn_mode: str = "flash"
    fp8: bool = False
    blocks_to_swap: int = 0  # their offload, as our block swap from pinned memory
    note: str = ""
    outside: str = ""  # why the model cannot come within 30% of this figure

    def workload(self) -> Workload:
        return Workload(HUNYUAN_T2V, self.height, self.width, self.frames, 1, text_tokens=256, mode="generate")

    def options(self) -> MemoryOptions:
        return MemoryOptions(guidance_scale=self.guidance, infer_steps=self.steps, context_parallel=self.processes,
                             attn_mode=self.attn_mode, fp8=self.fp8, blocks_to_swap=self.blocks_to_swap,
                             use_pinned_memory_for_block_swap=bool(self.blocks_to_swap))

    def setting(self) -> str:
        cfg = ", CFG" if self.guidance != 1.0 else ""
        gpus = f"{self.processes} x " if self.processes > 1 else ""
        return f"{self.height}x{self.width}x{self.frames}, {self.steps} steps{cfg}, {gpus}{self.gpu.upper()}, {self.attn_mode}"


PUBLISHED = (
    Published("h100", 720, 1280, 129, 50, 1.0, 1904.08, HUNYUAN + "; " + XDIT, fit=True),
    Published("h100", 960, 960, 129, 50, 1.0, 1735.01, XDIT, fit=True),
    Published("h20", 720, 1280, 129, 50, 1.0, 6639.17, XDIT, fit=True),
    Published("h20", 960, 960, 129, 50, 1.0, 6621.46, XDIT, fit=True),
    Published("l20", 720, 1280, 129, 50, 1.0, 6043.88, XDIT + " (diffusers implementation)", fit=True),
    Published("l20", 960, 960, 129, 50, 1.0, 6039.08, XDIT + " (diffusers implementation)", fit=True),
    Published("a800", 544, 960, 97, 30, 6.0, 884.20, SKYREELS + " (HunyuanVideo + xDiT)", fit=True),
    Published("a800", 544, 960, 97, 30, 6.0, 771.03, SKYREELS + " (SkyReelsInfer)"),
    Published("rtx4090", 544, 960, 97, 30, 6.0, 889.31, SKYREELS + " (SkyReelsInfer)", attn_mode="sageattn", fp8=True,
              blocks_to_swap=38, note="fp8 weights, their offload as --blocks_to_swap 38 (pinned); torch.compile not modelled"),
    Published("h100", 720, 1280, 129, 50, 1.0, 925.04, XDIT, processes=2),
    Published("h100", 720, 1280, 129, 50, 1.0, 514.08, XDIT, processes=4),
    Published("h100", 720, 1280, 129, 50, 1.0, 337.58, XDIT, processes=8,
              outside="8 GPUs run attention on 3 of the 24 heads each, and the text encoders and VAE decode do not divide: "
                      "from 4 to 8 GPUs the published time falls by 176 s, not the 257 s that halving would give"),
    Published("h20", 720, 1280, 129, 50, 1.0, 940.97, XDIT, processes=8),
    Published("a800", 544, 960, 97, 30, 6.0, 263.48, SKYREELS + " (HunyuanVideo + xDiT)", processes=4),
    Published("a100", 720, 1280, 125, 50, 1.0, 13 * 60, FASTVIDEO, processes=4,
              note="frames (125, their scripts') and steps (50, the default) assumed; a rounded figure"),
)

# Attention kernels' speed over flash-attention 2 (what the fit figures ran). PyTorch's SDPA runs flash-attention 2's
# kernel for bf16 on Ampere and Ada; on Hopper it is faster, by sdpa_speedup_on_hopper(). SageAttention:
# "outperforms FlashAttention2 ... by about 2.1 times" (its paper, arXiv 2410.02367,
# https://github.com/thu-ml/SageAttention). flash3 and xformers: no published figure for this model, taken as
# flash-attention 2.
ATTENTION_SPEEDUP = {"sageattn": 2.1}
# Cards with no published figure: the same chip family's (H200 = H100's Hopper chip, more memory; A100 = A800's chip;
# RTX 4090 = L20's Ada; RTX 3090 Ampere).
CALIBRATED_FROM = {"h200": "h100", "a100": "a800", "rtx4090": "l20", "rtx3090": "a800"}


# Full-size steps of this project's code (random weights, bf16, SDPA), timed with CUDA events by bench/gpu_check.py
# (bench/gpu_plan_check.py) on one H200: torch 2.11.0+cu130, cuDNN 9.19, driver 580, 2026-12-04. The allocator's
# peak is beside each, for the memory half of the planner (tests/test_plan.py holds the trace to it).
MEASURED_ON = "bench/gpu_plan_check.py on an H200 (torch 2.11.0+cu130), 2026-12-04"
PINNED = dict(use_pinned_memory_for_block_swap=True)


@dataclass(frozen=True)
class Measured:
    gpu: str  # a key of timing.GPUS
    height: int
    width: int
    frames: int
    mode: str  # "generate": one denoising step, embedded guidance (fits SDPA's speed); "train": a check
    options: MemoryOptions  # LoRA rank 32 and AdamW when training
    seconds: float  # one step
    allocated_gib: float  # torch.cuda.max_memory_allocated during it

    def workload(self) -> Workload:
        return Workload(HUNYUAN_T2V, self.height, self.width, self.frames, 1, text_tokens=256, mode=self.mode)

    def setting(self) -> str:
        flags = self.options.flags(self.mode).replace("(no memory options)", "no options")
        return f"{self.mode} {self.height}x{self.width}x{self.frames}, {flags}, {self.gpu.upper()}, sdpa"


MEASURED = (
    Measured("h200", 720, 1280, 129, "generate", MemoryOptions(blocks_to_swap=36, **PINNED), 22.86, 13.08),
    Measured("h200", 544, 960, 129, "generate", MemoryOptions(), 8.01, 29.47),
    Measured("h200", 544, 960, 33, "train", MemoryOptions(gradient_checkpointing=True), 4.28, 34.81),
    Measured("h200", 544, 960, 33, "train", MemoryOptions(fp8=True, blocks_to_swap=36, gradient_checkpointing=True, **PINNED),
             4.59, 12.85),
)
# The chips whose SDPA is not flash-attention 2's kernel (PyTorch runs cuDNN's or its own Hopper attention there).
HOPPER = ("h100", "h200", "h20")


@functools.cache
def sdpa_speedup_on_hopper() -> float:
    """SDPA's attention speed over flash-attention 2's on Hopper: the geometric mean, over the measured denoising
    steps, of the speed that makes the time model give the measured time (its other parts, such as block swap's
    exposed copies, kept as they are)."""
    from musubi_tuner.planning.planner import step_time
    from musubi_tuner.planning.timing import GPUS

    logs = []
    for m in MEASURED:
        if m.mode != "generate":
            continue
        work, device = m.workload(), GPUS[m.gpu]
        t = step_time(work, m.options.replace(attn_mode="flash"), device)
        fwd = forward_flops(work.config, work.latent_shape, work.text_tokens)
        a = fwd.attention / fwd.total
        # measured = compute x ((1 - a) + a / speed) + the rest
        logs.append(math.log(a / ((m.seconds - (t.total_s - t.compute_s)) / t.compute_s - (1 - a))))
    return math.exp(sum(logs) / len(logs))


def implied_utilisation(figure: Published, peak_tflops: float) -> float:
    """The model's FLOPs over (seconds x peak) for a flash-attention figure on one GPU."""
    work = figure.workload()
    forwards = 2 if figure.guidance != 1.0 else 1
    flops = forward_flops(work.config, work.latent_shape, work.text_tokens, forwards).total * figure.steps
    return flops / (figure.seconds * figure.processes * peak_tflops * 1e12)


@functools.cache
def fitted_utilisation(gpu_key: str) -> float | None:
    """The geometric mean of the implied utilisation of `gpu_key`'s (or its family's) fit figures; None without any."""
    key = CALIBRATED_FROM.get(gpu_key, gpu_key)
    from musubi_tuner.planning.timing import GPUS

    values = [implied_utilisation(f, GPUS[key].bf16_tflops) for f in PUBLISHED if f.fit and f.gpu == key]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def kernel_factor(attn_mode: str, attention_share: float, gpu_key: str = "") -> float:
    """Time with `attn_mode` over time with flash-attention 2 on GPU `gpu_key`, attention being `attention_share` of
    the FLOPs."""
    speed = sdpa_speedup_on_hopper() if attn_mode == "sdpa" and gpu_key in HOPPER else ATTENTION_SPEEDUP.get(attn_mode, 1.0)
    return (1 - attention_share) + attention_share / speed


def predicted_seconds(figure: Published) -> float:
    """The planner's denoising time for a published setting (steps x step time at the calibrated utilisation)."""
    from musubi_tuner.planning.planner import step_time
    from musubi_tuner.planning.timing import GPUS

    return figure.steps * step_time(figure.workload(), figure.options(), GPUS[figure.gpu]).total_s


def markdown_tables() -> str:
    """The shares learnt per GPU, then every figure beside ours, as docs/memory_planner.md shows them."""
    from musubi_tuner.planning.timing import GPUS

    lines = ["| GPU | share of dense bf16 peak (flash-attention 2) |", "|---|---|"]
    for key, g in GPUS.items():
        u = fitted_utilisation(key)
        family = f" (from the {GPUS[CALIBRATED_FROM[key]].name})" if key in CALIBRATED_FROM else ""
        lines.append(f"| {g.name} | {u:.0%}{family} |")
    lines += ["", "| setting | published | source | use | ours | ours / published | note |", "|---|---|---|---|---|---|---|"]
    for f in PUBLISHED:
        ours = predicted_seconds(f)
        note = "; ".join(x for x in (f.note, "outside 30%: see below" if f.outside else "") if x)
        lines.append(f"| {f.setting()} | {f.seconds:,.0f} s | {f.source} | {'fit' if f.fit else 'check'} | {ours:,.0f} s "
                     f"| {ours / f.seconds:.2f} | {note} |")
    lines += ["", f"SDPA on Hopper: {sdpa_speedup_on_hopper():.2f} x flash-attention 2's attention speed, learnt from our "
              f"own steps ({MEASURED_ON}):", "",
              "| step | measured | use | ours | ours / measured |", "|---|---|---|---|---|"]
    for m in MEASURED:
        ours = measured_step_seconds(m)
        lines.append(f"| {m.setting()} | {m.seconds:.2f} s | {'fit' if m.mode == 'generate' else 'check'} | {ours:.2f} s "
                     f"| {ours / m.seconds:.2f} |")
    return "\n".join(lines)


def measured_step_seconds(m: Measured) -> float:
    """The planner's time for one of our measured steps."""
    from musubi_tuner.planning.planner import step_time
    from musubi_tuner.planning.timing import GPUS

    return step_time(m.workload(), m.options, GPUS[m.gpu]).total_s
