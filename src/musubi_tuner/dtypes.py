"""dtype names as users type them on the command line (the same spellings musubi-tuner accepts)."""

from __future__ import annotations

import functools

import torch

from musubi_tuner.errors import UserError

_DTYPES = {
    torch.bfloat16: ("bf16", "bfloat16"),
    torch.float16: ("fp16", "float16", "half"),
    torch.float32: ("fp32", "float32", "float"),
    torch.float8_e4m3fn: ("fp8", "float8", "fp8_e4m3fn", "e4m3fn", "float8_e4m3fn"),
    torch.float8_e4m3fnuz: ("fp8_e4m3fnuz", "e4m3fnuz", "float8_e4m3fnuz"),
    torch.float8_e5m2: ("fp8_e5m2", "e5m2", "float8_e5m2"),
    torch.float8_e5m2fnuz: ("fp8_e5m2fnuz", "e5m2fnuz", "float8_e5m2fnuz"),
}
_BY_NAME = {name: dtype for dtype, names in _DTYPES.items() for name in names}

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


def str_to_dtype(name: str | torch.dtype | None, default: torch.dtype | None = None, flag: str = "dtype") -> torch.dtype:
    """Parse a dtype name; None gives `default`. Raises UserError naming `flag` for unknown names."""
    if name is None:
        if default is None:
            raise UserError(f"{flag} is required")
        return default
    if isinstance(name, torch.dtype):
        return name
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise UserError(f"{flag} {name!r} is not a dtype; use one of bf16, fp16, fp32, fp8 (e4m3fn), fp8_e5m2") from None


def dtype_short_name(dtype: torch.dtype) -> str:
    """The name torch prints without the `torch.` prefix, e.g. `float16`; used in cache keys."""
    return str(dtype).removeprefix("torch.")


@functools.cache
def cpu_lacks_fast_float16() -> bool:
    """True where PyTorch has no fast float16 kernels on this CPU (no oneDNN float16: no AVX512-FP16 / AMX-FP16).
    Measured on an AMD EPYC against float32: small 3D convolutions 60-140x slower, Linear layers 4-5x, CLIP-L 4x;
    bfloat16 is not affected (2x faster than float32 there)."""
    return not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported())
