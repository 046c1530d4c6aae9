"""`--fp8_fast`: Linear layers multiplied in fp8 (torch._scaled_mm), checked on the CPU, which has the op too.

The GPU run (tests/gpu/test_kernels.py) compares the CUDA kernel with the same formula; here the formula,
its error and the operands' layouts, dtypes and shapes that CUDA's row-wise scaled matmul takes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import fp8_formula, rel_err
from musubi_tuner.hunyuan.fp8 import FP8_DTYPE, FP8_MAX, _scaled_mm_linear, quantize_rows


def layer(in_features=512, out_features=384, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    weight_fp8, scale = quantize_rows(linear.weight.data)
    x = torch.randn(2, 40, in_features).to(torch.bfloat16)
    return linear, weight_fp8, scale, x


def test_the_fp8_matmul_is_the_formula_rounded_to_bf16():
    linear, weight_fp8, scale, x = layer()
    got = _scaled_mm_linear(x, weight_fp8, scale, linear.bias.data, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 40, 384)
    assert rel_err(got, fp8_formula(x, weight_fp8, scale, linear.bias.data)) < 5e-3  # bf16 output: ~2e-3


def test_the_fp8_matmul_error_against_float32_is_bounded():
    # e4m3 keeps 3 mantissa bits: each operand's rounding costs ~2.6% of a product (weights alone, --fp8 without
    # --fp8_fast), both operands ~3.7% (measured on the CPU); a wrong scale would cost orders of magnitude more
    linear, weight_fp8, scale, x = layer()
    want = F.linear(x.float(), linear.weight.data, linear.bias.data)
    assert rel_err(_scaled_mm_linear(x, weight_fp8, scale, linear.bias.data, torch.bfloat16), want) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_scale", [True, False])
def test_the_operands_are_what_cudas_row_wise_scaled_matmul_takes(monkeypatch, dtype, with_bias, with_scale):
    cpu_scaled_mm = torch._scaled_mm

    def cuda_contract(a, b, scale_a, scale_b, bias=None, out_dtype=None, **kwargs):
        (M, K), (K2, N) = a.shape, b.shape
        assert a.dtype == b.dtype == FP8_DTYPE and K == K2
        assert a.is_contiguous() and b.t().is_contiguous(), "A row-major, B column-major"
        assert K % 16 == 0 and N % 16 == 0
        assert scale_a.shape == (M, 1) and scale_b.shape == (1, N), "row-wise scales"
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.is_contiguous() and scale_b.is_contiguous()
        assert out_dtype == torch.bfloat16, "row-wise scaling gives bf16 outputs"
        assert bias is None or (bias.dtype == torch.bfloat16 and bias.shape == (N,))
        return cpu_scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", cuda_contract)
    linear, weight_fp8, scale, x = layer()
    if not with_scale:  # the unofficial fp8 file: weights cast as they are, no scale
        weight_fp8, scale = linear.weight.data.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    bias = linear.bias.data.to(dtype) if with_bias else None
    out = _scaled_mm_linear(x.to(dtype), weight_fp8, scale, bias, dtype)
    assert out.dtype == dtype and out.shape == (2, 40, 384)
    want = fp8_formula(x, weight_fp8, torch.ones(384) if scale is None else scale, linear.bias.data if with_bias else 0)
    assert rel_err(out, want) < 5e-3
