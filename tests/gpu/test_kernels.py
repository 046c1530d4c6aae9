"""On a CUDA GPU: the attention kernels, the fp8 matmuls of --fp8_fast and --compile (Inductor + Triton) give
the float32 / eager numbers within the tolerances stated here.

Errors are relative L2 norms (helpers.rel_err). Attention runs on unit-variance q, k, v, which is what the
q/k RMSNorm feeds it. A kernel whose package is not installed is skipped, naming the package.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu.support import CUDA, mid_dit, mid_inputs
from helpers import fp8_formula, lora_with_random_ups, rel_err
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.attention import attention, check_attention_mode

pytestmark = pytest.mark.gpu

# bf16 inputs and outputs alone cost ~3e-3. SageAttention also quantizes q and k to int8 and P and V to fp8 (~1-3%).
ATTENTION_TOLERANCE = {"sdpa": 1e-2, "flash": 1e-2, "flash3": 1e-2, "xformers": 1e-2, "sageattn": 5e-2}
# The whole DiT in bf16 autocast against float32 (the CPU measures ~0.7% for bf16 SDPA, tests/hunyuan/test_dit_memory.py).
DIT_TOLERANCE = {"sdpa": 3e-2, "flash": 3e-2, "flash3": 3e-2, "xformers": 3e-2, "sageattn": 8e-2}
TRAINABLE = ("sdpa", "flash", "flash3", "xformers")  # SageAttention has no backward


def available(mode: str) -> None:
    try:
        check_attention_mode(mode)
    except UserError as e:
        pytest.skip(str(e))


def padded_qkv(seed: int = 0, length: int = 1536, heads: int = 8, head_dim: int = 128):
    """Two samples: one of `length` valid tokens, one of 1000 valid tokens and padding after them."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    q, k, v = (torch.randn(2, length, heads, head_dim, device=CUDA, generator=g) for _ in range(3))
    lengths = torch.tensor([length, 1000], device=CUDA)
    valid = torch.arange(length, device=CUDA)[None, :] < lengths[:, None]
    return q, k, v, lengths, valid


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("mode", list(ATTENTION_TOLERANCE))
def test_bf16_attention_kernels_match_float32_sdpa(mode, split):
    available(mode)
    q, k, v, lengths, valid = padded_qkv()
    want = attention(q, k, v, lengths, "sdpa")
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths, mode, split)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    error = rel_err(got[valid], want[valid])
    assert error < ATTENTION_TOLERANCE[mode], f"{mode}: {error:.2e}"


@pytest.mark.parametrize("mode", TRAINABLE)
def test_attention_kernel_gradients_match_float32_sdpa(mode):
    available(mode)
    q, k, v, lengths, valid = padded_qkv(seed=1)
    grad_out = torch.randn(*valid.shape, q.shape[2] * q.shape[3], device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(2))

    def gradients(dtype, kernel):
        leaves = [t.detach().clone().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, lengths, kernel)
        (out[valid].float() * grad_out[valid]).sum().backward()
        return [t.grad.float() for t in leaves]

    for name, got, want in zip("qkv", gradients(torch.bfloat16, mode), gradients(torch.float32, "sdpa")):
        error = rel_err(got, want)
        assert error < 2e-2, f"{mode}: d{name} {error:.2e}"


@pytest.mark.parametrize("mode", list(DIT_TOLERANCE))
def test_the_dit_with_each_kernel_matches_float32(mode):
    available(mode)
    model = mid_dit()
    inputs = mid_inputs()  # prompts of 20 and 50 tokens: masked (sdpa) or packed (the others)
    with torch.no_grad():
        want = model(*inputs)
        model.set_attention(mode)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(*inputs)
    error = rel_err(got, want)
    assert error < DIT_TOLERANCE[mode], f"{mode}: {error:.2e}"


def needs_fp8_matmuls() -> None:
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        pytest.skip(f"fp8 matmuls need compute capability 8.9 or newer; this GPU has {major}.{minor}")


def test_weights_quantize_to_the_same_fp8_bytes_on_cuda_as_on_the_cpu():
    """Block swap loads a model on the CPU, a resident one on the GPU: with --fp8_base both must hold the same bytes."""
    from musubi_tuner.hunyuan.fp8 import quantize_rows

    weight = torch.randn(3072, 3072, generator=torch.Generator().manual_seed(0)).bfloat16()
    (on_cpu, cpu_scale), (on_cuda, cuda_scale) = quantize_rows(weight), quantize_rows(weight.to(CUDA))
    assert torch.equal(cuda_scale.cpu(), cpu_scale)
    differing = (on_cuda.cpu().view(torch.uint8) != on_cpu.view(torch.uint8)).sum().item()
    assert differing == 0, f"{differing} of {weight.numel()} fp8 bytes differ"


def test_fp8_fast_matmul_is_the_fp8_formula_and_its_error_is_bounded():
    from musubi_tuner.hunyuan.fp8 import _scaled_mm_linear, quantize_rows

    needs_fp8_matmuls()
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 1536)
    weight_fp8, scale = quantize_rows(linear.weight.data)
    x = torch.randn(2, 300, 1024).bfloat16()
    got = _scaled_mm_linear(x.to(CUDA), weight_fp8.to(CUDA), scale.to(CUDA), linear.bias.data.to(CUDA), torch.bfloat16).cpu()
    # the CUDA kernel computes the formula (bf16 output rounding: ~2e-3) ...
    assert rel_err(got, fp8_formula(x, weight_fp8, scale, linear.bias.data)) < 5e-3
    # ... whose error against float32 is e4m3's rounding of both operands (~3.7% on the CPU)
    assert rel_err(got, F.linear(x.float(), linear.weight.data, linear.bias.data)) < 0.05


def test_fp8_fast_dit_error_is_bounded_and_block_swap_changes_nothing():
    from musubi_tuner.hunyuan.fp8 import convert_to_fp8, enable_fp8_fast
    from musubi_tuner.hunyuan.offload import BlockSwap

    needs_fp8_matmuls()
    inputs = mid_inputs(batch=1)

    def quantized_on_the_cpu():
        # All three are quantized on the CPU. CUDA rounds a few weights the other way (an H200 under torch 2.11: 741 of
        # 1.57M bytes, its scale = amax / 448 one ulp off), and fp8 activations turn that into ~0.4% at the output.
        model = mid_dit(torch.bfloat16, device="cpu")
        convert_to_fp8(model)
        return model

    with torch.no_grad():
        want = mid_dit()(*inputs)
        weight_only, fast = quantized_on_the_cpu().to(CUDA), quantized_on_the_cpu().to(CUDA)
        assert enable_fp8_fast(fast) == 3 * 10 + 4 * 3  # every block Linear: 10 per double block, 3 per single
        swapped = quantized_on_the_cpu()
        BlockSwap(swapped, 3, CUDA, use_pinned_memory=True)
        enable_fp8_fast(swapped)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_weight_only, got, got_swapped = weight_only(*inputs), fast(*inputs), swapped(*inputs)
    assert rel_err(got, want) < 0.02  # the same bound as --fp8 (tests/hunyuan/test_dit_memory.py); ~0.8% on the CPU
    assert rel_err(got, got_weight_only) > 1e-4  # the fp8 matmuls really ran
    assert rel_err(got_swapped, got) < 1e-6  # the same arithmetic on copies that arrived by the side stream (0.0 on an H200)


# The GPU runs (an H200, torch 2.11) saw NaN LoRA gradients under checkpointing and an illegal memory access without
# it while Inductor compiled the attention (bench/gpu_compile_probe.py), with and without a padding mask or block swap.
# Training now runs the attention between the compiled graphs (compile.attention_outside_graph); these cases check it.
@pytest.mark.parametrize("batch,blocks_to_swap,checkpointing", [(1, 0, True), (2, 0, True), (2, 2, True), (2, 0, False)])
def test_compiled_blocks_on_cuda_give_the_eager_outputs_and_lora_gradients(batch, blocks_to_swap, checkpointing):
    from musubi_tuner.hunyuan.compile import CompileOptions, check_can_compile, compile_blocks, compile_errors
    from musubi_tuner.hunyuan.offload import BlockSwap

    try:
        check_can_compile(CompileOptions(), CUDA)
    except UserError as e:
        pytest.skip(str(e))
    inputs = mid_inputs(batch=batch)  # batch 2: prompts of 20 and 50 tokens, a padding mask in every attention
    outputs, grads = [], []
    try:
        for compiled in (False, True):
            dit = mid_dit(torch.bfloat16, device="cpu")
            if checkpointing:
                dit.enable_gradient_checkpointing()
            dit.train()
            if blocks_to_swap:
                BlockSwap(dit, blocks_to_swap, CUDA, use_pinned_memory=True, max_blocks=36)
            else:
                dit.to(CUDA)
            net = lora_with_random_ups(dit, 8, 0.01, CUDA)
            if compiled:
                compile_blocks(dit, CompileOptions(), training=True)
                assert dit.attention_outside_graph
            with compile_errors():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = dit(*inputs)
                out.float().square().mean().backward()
            outputs.append(out.detach().float())
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    finally:
        torch._dynamo.reset()  # a failed case leaves no compiled graphs to the next
    # bf16: Inductor fuses the elementwise ops and rounds once where eager rounds after each
    assert rel_err(outputs[1], outputs[0]) < 2e-2
    bad = [name for name, p in net.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite LoRA gradients in {len(bad)} modules, the first: {bad[:3]}"
    assert rel_err(grads[1], grads[0]) < 5e-2 and grads[0].abs().sum() > 0


def test_compiled_blocks_on_cuda_denoise_as_eager_does():
    """Generation keeps the attention inside the compiled graphs: a forward alone saves nothing for a backward."""
    from musubi_tuner.hunyuan.compile import CompileOptions, check_can_compile, compile_blocks, compile_errors

    try:
        check_can_compile(CompileOptions(), CUDA)
    except UserError as e:
        pytest.skip(str(e))
    inputs = mid_inputs(batch=2)
    outputs = []
    try:
        for compiled in (False, True):
            dit = mid_dit(torch.bfloat16)
            if compiled:
                compile_blocks(dit, CompileOptions())
                assert not dit.attention_outside_graph
            with compile_errors(), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                outputs.append(dit(*inputs).float())
            torch.cuda.synchronize()  # an illegal memory access shows here, in this test
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(outputs[1]).all() and rel_err(outputs[1], outputs[0]) < 2e-2


def test_the_vae_samples_its_posterior_on_the_gpu_with_a_cpu_generator_as_on_the_cpu():
    """fuzz_aj 6 (from the code): I2V and V2V encode their input with a CPU generator, and the noise was drawn on the
    GPU with it: "Expected a 'cuda' device type for generator but found 'cpu'", after both text encoders had run."""
    from musubi_tuner.hunyuan.vae import DiagonalGaussian

    moments = torch.randn(1, 32, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    on_cpu = DiagonalGaussian(moments).sample(torch.Generator("cpu").manual_seed(1))
    on_gpu = DiagonalGaussian(moments.cuda()).sample(torch.Generator("cpu").manual_seed(1))
    assert on_gpu.device.type == "cuda" and torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-6)
