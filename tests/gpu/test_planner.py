"""On a CUDA GPU: the memory planner's DiT peak against the CUDA caching allocator's, within 15%.

Mid-size model (hidden 2048, 16 heads of 128, MLP 8192, 2 double + 4 single blocks, LLM width 1024) on a
544x960x33 clip (18,360 image tokens) and a 128-token prompt; LoRA rank 32, AdamW, bf16 weights under bf16
autocast, as the trainer and the sampler run them (tests/plan_runs.py builds the runs). The measured peak is
`torch.cuda.max_memory_allocated()` during a steady-state step: what the allocator handed out, without its
cached free blocks or the CUDA context, which the planner adds separately (planner.ALLOCATOR_MARGIN, CUDA_CONTEXT).
"""

from __future__ import annotations

import pytest

from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.planning.dit_trace import dit_peak
from musubi_tuner.planning.options import MemoryOptions, Workload
from plan_runs import measured_cuda_step

pytestmark = pytest.mark.gpu

CONFIG = DiTConfig(hidden_size=2048, heads_num=16, mlp_hidden_size=8192, mm_double_blocks_depth=2, mm_single_blocks_depth=4,
                   refiner_depth=2, text_states_dim=1024, text_states_dim_2=768)
WORK = dict(config=CONFIG, height=544, width=960, frames=33, text_tokens=128)
PINNED_SWAP = dict(blocks_to_swap=3, use_pinned_memory_for_block_swap=True)

VARIANTS = {
    "plain": ({}, {}),
    "gradient checkpointing": ({}, dict(gradient_checkpointing=True)),
    "checkpointing + CPU offload": ({}, dict(gradient_checkpointing=True, gradient_checkpointing_cpu_offload=True)),
    "fp8 base + checkpointing": ({}, dict(fp8=True, gradient_checkpointing=True)),
    "block swap 3 (pinned) + checkpointing": ({}, dict(gradient_checkpointing=True, **PINNED_SWAP)),
    "batch 2 (prompts 128 + 80) + checkpointing": (dict(batch=2, text_lengths=(128, 80)), dict(gradient_checkpointing=True)),
    "sampling, CFG batch 2": (dict(mode="generate"), dict(guidance_scale=6.0)),
    "sampling, fp8 + block swap 3 (pinned)": (dict(mode="generate"), dict(fp8=True, **PINNED_SWAP)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_the_planner_predicts_the_allocators_peak_within_15_percent(name):
    work_changes, opts_changes = VARIANTS[name]
    work = Workload(**{**WORK, **work_changes})
    opts = MemoryOptions(**opts_changes)
    step = measured_cuda_step(work, opts)
    measured, before = step.peak, step.before
    predicted = dit_peak(work, opts)[0].total
    gib = 2**30
    assert abs(predicted / measured - 1) < 0.15, (
        f"{name}: planned {predicted / gib:.2f} GiB, allocator peak {measured / gib:.2f} GiB "
        f"({before / gib:.2f} GiB allocated before the step)")
