"""On a CUDA GPU: the planner's full-size rows (docs/memory_planner.md) against the real model on this GPU.

    python bench/gpu_plan_check.py [--cases generate-720p-swap36,train-33f-ckpt,...]

Each case builds the full-size HunyuanVideo DiT (random bf16 weights, LoRA rank 32 when training) with the row's
memory options, as the trainer and the sampler build it (tests/plan_runs.py), and runs one step of it:

- memory: the CUDA allocator's peak (`max_memory_allocated`) against the planned tensor peak of the DiT stage, and
  the GPU memory the step really took (the allocator's reserved peak during the step, its cache emptied before, plus
  the CUDA context, read from the driver) against the plan's "needs" (tensors + allocator margin + context), and one
  more step with the allocator capped at those needs (what a GPU of that size has): does it fit?
- time: the step, timed with CUDA events, against the planned step time for this GPU (planning/timing.GPUS, its
  share of peak learnt from published figures of the same chip family).

A training case runs two steps and reports the second (the first creates the optimizer state); a denoising step has
no state, so its first step is the one reported (its cuBLAS / SDPA set-up is milliseconds against seconds).
bench/gpu_check.py runs this after timing the blocks. Both set the CUDA allocator as the commands do
(errors.use_expandable_segments), unless PYTORCH_CUDA_ALLOC_CONF says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "src"))

from common import table  # noqa: E402

from musubi_tuner.errors import use_expandable_segments  # noqa: E402
from musubi_tuner.hunyuan.config import HUNYUAN_T2V  # noqa: E402
from musubi_tuner.planning.options import MemoryOptions, Workload  # noqa: E402

GiB = 2**30
PINNED_SWAP = dict(use_pinned_memory_for_block_swap=True)


@dataclass(frozen=True)
class Case:
    key: str
    work: Workload
    opts: MemoryOptions
    row: str  # the docs' row it checks

    @property
    def name(self) -> str:
        flags = self.opts.flags(self.work.mode)
        return f"{self.work.mode} {self.work.height}x{self.work.width}x{self.work.frames}: {flags}"


def _work(height: int, width: int, frames: int, mode: str) -> Workload:
    return Workload(HUNYUAN_T2V, height, width, frames, text_tokens=256, mode=mode)


CASES = (
    Case("generate-720p-swap36", _work(720, 1280, 129, "generate"), MemoryOptions(blocks_to_swap=36, **PINNED_SWAP),
         "Generation, 720x1280x129 at 16 GB"),
    Case("generate-544p", _work(544, 960, 129, "generate"), MemoryOptions(), "Generation, 544x960x129 at 80 GB"),
    Case("train-33f-ckpt", _work(544, 960, 33, "train"), MemoryOptions(gradient_checkpointing=True),
         "Training, 544x960x33 at 80 GB"),
    Case("train-33f-fp8-swap36", _work(544, 960, 33, "train"),
         MemoryOptions(fp8=True, blocks_to_swap=36, gradient_checkpointing=True, **PINNED_SWAP), "Training, 544x960x33 at 16 GB"),
)


def this_gpu_key(name: str) -> str | None:
    """The planning.timing.GPUS key of a GPU as CUDA names it, or None for one the planner does not know."""
    import re

    for pattern, key in (("H200", "h200"), ("H100|H800", "h100"), ("H20", "h20"), ("A100", "a100"), ("A800", "a800"),
                         ("L20", "l20"), ("4090", "rtx4090"), ("3090", "rtx3090")):
        if re.search(pattern, name):
            return key
    return None


def cuda_context_bytes() -> int:
    """What the driver says this process uses beyond the allocator's reserve: the context, cuBLAS's handles, kernels."""
    torch.zeros(1, device="cuda") @ torch.zeros(1, 1, device="cuda")  # create the context and a cuBLAS handle
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def check(case: Case, gpu_key: str | None, context: int) -> dict:
    from plan_runs import measured_cuda_step

    from musubi_tuner.planning.planner import Stage, step_time
    from musubi_tuner.planning.timing import GPUS

    stage = Stage.of_dit("DiT", case.work, case.opts)
    row = {"case": case.name, "checks": case.row, "planned GiB": f"{stage.device_peak / GiB:.2f}"}
    step = measured_cuda_step(case.work, case.opts, warm_up=case.work.mode == "train", capped_at=stage.needed - context)
    row.update({
        "allocated GiB": f"{step.peak / GiB:.2f}", "error": f"{stage.device_peak / step.peak - 1:+.1%}",
        "needs GiB (plan / GPU)": f"{stage.needed / GiB:.1f} / {(step.reserved + context) / GiB:.1f}",
        "fits in needs": "yes" if step.fits else "no: out of memory",
        "before step GiB": f"{step.before / GiB:.2f}", "step s": f"{step.seconds:.2f}",
    })
    if gpu_key is not None:
        device = GPUS[gpu_key]
        planned = step_time(case.work, case.opts, device).total_s
        row["planned s"] = f"{planned:.2f} ({device.name})"
        row["time ratio"] = f"{step.seconds / planned:.2f}"
    return row


def run_cases(keys: list[str] | None = None) -> list[dict]:
    """The cases named (all by default), one after another in this process; a case that fails is reported and skipped."""
    name = torch.cuda.get_device_name()
    gpu_key = this_gpu_key(name)
    context = cuda_context_bytes()
    print(f"{name}: the planner's timing model is {gpu_key or 'not known for this GPU (memory only)'}; "
          f"CUDA context measured {context / GiB:.2f} GiB (the planner assumes 0.56 GiB)", flush=True)
    rows = []
    for case in CASES:
        if keys and case.key not in keys:
            continue
        t0 = time.monotonic()
        try:
            rows.append(check(case, gpu_key, context))
        except Exception as e:  # noqa: BLE001 (one case's failure is a finding, not the end of the check)
            traceback.print_exc()
            rows.append({"case": case.name, "checks": case.row, "error": f"failed: {type(e).__name__}: {str(e)[:200]}"})
        gc.collect()  # the case's model goes before the next one (and before gpu_check's tests, in other processes)
        torch.cuda.empty_cache()
        # each row as it comes: a run stopped at its time limit still reports the rows it finished
        figures = ", ".join(f"{k} {v}" for k, v in rows[-1].items() if k not in ("case", "checks"))
        print(f"{case.key} ({time.monotonic() - t0:.0f} s): {figures}", flush=True)
    return rows


COLUMNS = ["case", "checks", "planned GiB", "allocated GiB", "error", "needs GiB (plan / GPU)", "fits in needs", "before step GiB", "step s",
           "planned s", "time ratio"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="", help=f"comma-separated, of {', '.join(c.key for c in CASES)} (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (run this on a machine with a CUDA GPU)")
        return 0
    use_expandable_segments()
    print(table(run_cases([k for k in args.cases.split(",") if k]), COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
