"""On a CUDA GPU: block swap (side stream, pinned memory) and checkpoint CPU offload give the numbers of the
model without them, and block swap's copies run while the blocks compute (timed with CUDA events)."""

from __future__ import annotations

import re

import pytest
import torch

from gpu.support import CUDA, cuda_seconds, mid_dit, mid_inputs
from helpers import rel_err
from musubi_tuner.hunyuan.offload import BlockSwap, SwappedLinear

pytestmark = pytest.mark.gpu


def forward_backward(model, inputs):
    """Output and the gradient w.r.t. the input latents (the DiT is frozen, as in LoRA training)."""
    x, *rest = inputs
    x = x.clone().requires_grad_(True)
    out = model(x, *rest)
    out.square().mean().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_block_swap_on_cuda_gives_the_same_outputs_and_gradients(pinned, checkpointing):
    inputs = mid_inputs()
    plain = mid_dit()
    swapped = mid_dit(device="cpu")
    swap = BlockSwap(swapped, 3, CUDA, use_pinned_memory=pinned, max_blocks=36)
    for model in (plain, swapped):
        if checkpointing:
            model.enable_gradient_checkpointing()
            model.train()
    linears = [m for key in swap.swapped for m in swap._linears[key]]
    assert linears and all(isinstance(m, SwappedLinear) and m.weight.device.type == "cpu" and m.weight.is_pinned() == pinned
                           for m in linears)
    assert swapped.double_blocks[0].img_attn_qkv.weight.device.type == "cuda" and swapped.final_layer.linear.weight.is_cuda
    want, want_grad = forward_backward(plain, inputs)
    for _ in range(2):  # a second step starts from what the first left behind
        got, got_grad = forward_backward(swapped, inputs)
        assert rel_err(got, want) < 1e-6 and rel_err(got_grad, want_grad) < 1e-5
        assert swap.resident_copies() == 0


def test_checkpoint_cpu_offload_gives_the_same_outputs_and_gradients_in_less_memory():
    inputs = mid_inputs(frames=9, size=32)  # 2,304 image tokens: block inputs worth keeping off the device
    model = mid_dit()
    model.train()
    results = {}
    for offload in (False, True):
        model.enable_gradient_checkpointing(cpu_offload=offload)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out, grad = forward_backward(model, inputs)
        torch.cuda.synchronize()
        results[offload] = out, grad, torch.cuda.max_memory_allocated() - base
    (want, want_grad, kept), (got, got_grad, offloaded) = results[False], results[True]
    assert got.is_cuda and rel_err(got, want) < 1e-6 and rel_err(got_grad, want_grad) < 1e-5
    assert offloaded < kept, f"peak above the weights: {offloaded / 2**20:.0f} MiB with offload, {kept / 2**20:.0f} MiB without"


def test_pinned_block_swap_hides_its_copies_behind_the_blocks_compute():
    """Real width (hidden 3072, 24 heads) and 38,760 image tokens (a 544x960x73 video): a block computes for
    longer than its weights take to copy, so with pinned memory the copies cost (almost) nothing but the first
    one, which nothing runs before."""
    from musubi_tuner.hunyuan.config import DiTConfig
    from musubi_tuner.planning.options import MemoryOptions
    from plan_runs import build_dit

    config = DiTConfig(mm_double_blocks_depth=3, mm_single_blocks_depth=6, refiner_depth=1, text_states_dim=256, text_states_dim_2=64)
    g = torch.Generator(device=CUDA).manual_seed(0)
    inputs = (torch.randn(1, 16, 19, 68, 120, device=CUDA, generator=g), torch.full((1,), 500.0, device=CUDA),
              torch.randn(1, 64, 256, device=CUDA, generator=g), torch.ones(1, 64, dtype=torch.long, device=CUDA),
              torch.randn(1, 64, device=CUDA, generator=g), torch.full((1,), 6000.0, device=CUDA))

    def forward_seconds(model) -> float:
        def step():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(*inputs)

        return cuda_seconds(step)

    resident = build_dit(config, MemoryOptions(), device="cuda").eval()
    compute = forward_seconds(resident)
    del resident
    torch.cuda.empty_cache()
    timed = {}
    for pinned in (True, False):
        model = build_dit(config, MemoryOptions(blocks_to_swap=5, use_pinned_memory_for_block_swap=pinned), device="cuda").eval()
        swap = model.block_hooks
        timed[pinned] = forward_seconds(model)
        if pinned:  # each swapped block's copies alone
            per_block = [cuda_seconds(lambda ms=swap._linears[key]: [m.weight.to(CUDA, non_blocking=True) for m in ms])
                         for key in swap.swapped]
        del model, swap
        torch.cuda.empty_cache()
    first, copies = per_block[0], sum(per_block)
    numbers = (f"forward {compute * 1e3:.0f} ms resident, {timed[True] * 1e3:.0f} ms swapped from pinned memory, "
               f"{timed[False] * 1e3:.0f} ms from pageable memory; copies alone {copies * 1e3:.0f} ms (first block {first * 1e3:.0f} ms)")
    if compute < 1.5 * copies:
        pytest.skip(f"this machine copies too slowly for the blocks' compute to hide it: {numbers}")
    exposed = timed[True] - compute
    assert exposed < first + 0.25 * (copies - first) + 0.02 * compute, numbers


def test_running_out_of_gpu_memory_is_one_line_that_says_how_much():
    """A real CUDA allocation failure, read as the commands report it (errors.run_cli)."""
    from musubi_tuner.errors import out_of_memory

    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.OutOfMemoryError) as caught:
        torch.empty(2 * total, dtype=torch.uint8, device="cuda")
    message = out_of_memory(caught.value)
    assert re.fullmatch(r"out of GPU memory: an allocation of [\d.]+ GiB failed \(GPU 0 holds [\d.]+ GiB, [\d.]+ \w+ of it free\)",
                        message), message
