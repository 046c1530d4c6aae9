"""On a CUDA GPU: which part of "Inductor-compiled blocks + LoRA training" gives wrong gradients, one variant a process.

    python bench/gpu_compile_probe.py VARIANT     (a CUDA error poisons the process that meets it: one variant per run)

The mid-size DiT of tests/gpu, batch 1 (no padding mask), no block swap, bf16 under autocast; eager against compiled,
the output and the LoRA gradients. Variants:

  inside_ckpt  Inductor with the attention in its graphs, gradient checkpointing (--compile before the fix)
  inside       the same without checkpointing
  aot_eager    AOTAutograd without Inductor, checkpointing
  math         Inductor, checkpointing, SDPA's math kernel only
  traced_ckpt  Inductor over checkpoint(block): the checkpoint traced into the graph
  outside      what training with --compile does now on CUDA: the attention between the compiled graphs, checkpointing

docs/dit.md has the H200's results (torch 2.11.0+cu130).
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "src"))

VARIANTS = ("inside_ckpt", "inside", "aot_eager", "math", "traced_ckpt", "outside")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compile_variant(variant: str, device: torch.device) -> str:
    """One line: the compiled run's output and gradient error against eager, and its non-finite gradients."""
    from gpu.support import MID, mid_dit
    from helpers import dit_inputs, lora_with_random_ups
    from torch.utils.checkpoint import checkpoint

    from musubi_tuner.hunyuan.compile import CompileOptions, compile_blocks

    if variant == "math":
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    inputs = [t.to(device) for t in dit_inputs(MID, batch=1, frames=5, height=16, width=16, text_lens=(20,), max_text=64)]
    outputs, grads = [], []
    for compiled in (False, True):
        dit = mid_dit(torch.bfloat16, device=device)
        if variant != "inside":
            dit.enable_gradient_checkpointing()
        dit.train()
        net = lora_with_random_ups(dit, 8, 0.01, device)
        if compiled and variant == "traced_ckpt":
            dit.disable_gradient_checkpointing()
            for block in [*dit.double_blocks, *dit.single_blocks]:
                block.forward = torch.compile(lambda *a, _f=block.forward: checkpoint(_f, *a, use_reentrant=False))
        elif compiled:
            compile_blocks(dit, CompileOptions(backend="aot_eager" if variant == "aot_eager" else "inductor"),
                           training=variant == "outside")
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = dit(*inputs)
        out.float().square().mean().backward()
        outputs.append(out.detach().float())
        grads.append(torch.cat([p.grad.flatten().float() for p in net.parameters()]))
    finite = torch.isfinite(grads[1])
    return (f"{variant}: output rel err {rel_err(outputs[1], outputs[0]):.2e}, gradient rel err over the finite ones "
            f"{rel_err(grads[1][finite], grads[0][finite]):.2e}, non-finite gradient values {int((~finite).sum())} of {finite.numel()}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(VARIANTS)}}}")
    print(compile_variant(sys.argv[1], torch.device("cuda" if torch.cuda.is_available() else "cpu")), flush=True)
