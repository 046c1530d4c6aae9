"""fp8 base weights: the big Linear layers of the DiT stored as float8 e4m3fn, computed in bf16.

Which layers: every Linear of the double and single stream blocks, the modulation Linears included (97% of
the parameters; musubi-tuner casts these and everything else). Norms, embedders, the token refiner and the final
layer stay in high precision: 0.36 B parameters together, and they shape every token's input or the output.
The modulation Linears (3.4 B parameters, 27% of the model) set every block's scale, shift and gate; with a scale
per output row their outputs stay within e4m3's rounding (see docs/dit.md for the measured error).

Weights cast here from bf16/fp32 get one scale per output row (absmax / 448), which keeps small
weights out of e4m3's subnormal range; weights that arrive already in fp8 (the unofficial fp8 file,
a plain cast) keep their values with scale 1.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.errors import UserError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Linear weights stored in fp8 (official names); everything else keeps the compute dtype.
FP8_WEIGHT_PATTERN = re.compile(
    r"(double_blocks\.\d+\.(img|txt)_(mod\.linear|attn_qkv|attn_proj|mlp\.fc1|mlp\.fc2)"
    r"|single_blocks\.\d+\.(linear[12]|modulation\.linear))\.weight"
)


def is_fp8_weight(key: str) -> bool:
    return FP8_WEIGHT_PATTERN.fullmatch(key) is not None


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 weight, per-row float32 scale) for a high-precision weight; (weight, None) if it is fp8 already."""
    if weight.dtype == FP8_DTYPE:
        return weight, None
    w = weight.float()
    # Divided by a tensor, not a Python number: CUDA multiplies by the reciprocal of a number (PyTorch's div kernel,
    # "may lose one bit"), the CPU divides. One ulp in the scale flipped 741 of 1.57M fp8 bytes on an H200, so a
    # model quantized on the GPU differed from the same model quantized on the CPU (as block swap loads it).
    scale = (w.abs().amax(dim=1, keepdim=True) / torch.tensor(FP8_MAX, device=w.device)).clamp(min=1e-12)
    return (w / scale).to(FP8_DTYPE), scale.squeeze(1)


class Fp8Linear(nn.Linear):
    """nn.Linear whose weight is stored in fp8; the forward upcasts one layer at a time.

    `weight_scale` (out_features,) is a non-persistent buffer, so state-dict keys stay the official ones.
    With `fast`, devices that have fp8 tensor cores multiply in fp8 directly (torch._scaled_mm).
    """

    weight_scale: torch.Tensor | None
    fast: bool = False

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    def stored_weight(self) -> torch.Tensor:
        """The fp8 weight to compute with (block swap substitutes its on-device copy)."""
        return self.weight

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return _dequantize(self.stored_weight(), self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x)
        if self.fast and x.device.type == "cuda":
            return _scaled_mm_linear(x.to(dtype), self.stored_weight(), self.weight_scale, self.bias, dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if torch.is_grad_enabled() and x.requires_grad and not (bias is not None and bias.requires_grad):
            return _Fp8LinearFunction.apply(x.to(dtype), self.stored_weight(), self.weight_scale, bias, dtype)
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), bias)


def _dequantize(weight_fp8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A fresh `dtype` copy of the weight, scaled in place: one high-precision copy at a time, not two."""
    w = weight_fp8.to(dtype, copy=True)
    if scale is not None:
        w.mul_(scale.to(dtype).unsqueeze(1))
    return w


class _Fp8LinearFunction(torch.autograd.Function):
    """F.linear with a frozen fp8 weight that autograd keeps as fp8: dequantized for the forward, and again for
    the input's gradient. A plain F.linear would keep every layer's high-precision copy until backward, so
    fp8 weights would cost more memory in training than bf16 ones (autocast's casts do the same)."""

    @staticmethod
    def forward(ctx, x, weight_fp8, scale, bias, dtype):
        ctx.save_for_backward(weight_fp8, scale)
        ctx.dtype = dtype
        return F.linear(x, _dequantize(weight_fp8, scale, dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, scale = ctx.saved_tensors
        grad_x = grad_out.to(ctx.dtype) @ _dequantize(weight_fp8, scale, ctx.dtype)
        return grad_x, None, None, None, None


def _scaled_mm_linear(x, weight_fp8, weight_scale, bias, dtype):
    """x @ W.T + b with x quantized to e4m3 per token (row) and W per output row, multiplied in fp8.

    What CUDA's row-wise scaled matmul takes: A row-major, B column-major (W.T of a row-major W), both inner
    sizes multiples of 16, float32 scales of shapes (M, 1) and (1, N), and a bf16 output (and bias) on most
    torch builds; the result is cast to `dtype` afterwards.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    x_fp8 = (x2 / x_scale).to(FP8_DTYPE)
    w_scale = (weight_scale if weight_scale is not None else torch.ones(weight_fp8.shape[0], device=x.device)).float()
    out = torch._scaled_mm(x_fp8, weight_fp8.t(), scale_a=x_scale, scale_b=w_scale.unsqueeze(0).contiguous(),
                           out_dtype=torch.bfloat16, bias=None if bias is None else bias.to(torch.bfloat16))
    return out.to(dtype).reshape(*shape[:-1], weight_fp8.shape[0])


def make_fp8_linear(module: nn.Linear, scale: torch.Tensor | None) -> None:
    """Turn a loaded nn.Linear (fp8 weight already assigned) into an Fp8Linear in place."""
    module.__class__ = Fp8Linear
    module.register_buffer("weight_scale", scale, persistent=False)


def enable_fp8_fast(model: nn.Module) -> int:
    """Switch every Fp8Linear to scaled fp8 matmuls; a clear error where the device cannot do them."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if not layers:
        raise UserError("--fp8_fast needs fp8 weights: add --fp8 (or --fp8_base)")
    device = layers[0].weight.device
    if device.type != "cuda":
        raise UserError(f"--fp8_fast needs a CUDA GPU with fp8 tensor cores (RTX 40x0 / Ada, H100); the DiT is on {device}. Drop --fp8_fast.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"--fp8_fast needs compute capability 8.9 or newer (RTX 40x0, H100); this GPU has {major}.{minor}. Drop --fp8_fast.")
    for m in layers:
        m.fast = True
    return len(layers)


@torch.no_grad()
def convert_to_fp8(model: nn.Module) -> int:
    """Quantize the block Linears of an already loaded DiT in place (used when LoRAs are merged first)."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, Fp8Linear) and is_fp8_weight(f"{name}.weight"):
            weight, scale = quantize_rows(module.weight.data)
            module.weight.data = weight
            make_fp8_linear(module, scale)
            count += 1
    return count
