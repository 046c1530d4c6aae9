"""Time per step from FLOPs and bytes moved: a stated GPU throughput, utilisation and PCIe bandwidth.

compute = FLOPs / (peak dense bf16 FLOP/s x utilisation), the utilisation learnt per GPU family and attention
kernel from published times (planning/calibration.py). Context parallel's collectives move their bytes
over the GPU-to-GPU link, not overlapped with compute (the all-to-alls sit between the matmuls). Block swap streams each swapped block's
Linear weights host -> device once per block run (forward; again for the recomputation in backward);
with pinned memory the copy overlaps the previous block's compute (time = the larger of the two),
from pageable memory it does not (the host thread waits for each copy). Checkpoint CPU offload moves
each block's inputs to the host in forward and back in backward, synchronously. fp8 weights cost a
dequantization per Linear per use: reading 1 byte and writing 2 per weight at memory bandwidth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from musubi_tuner.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense, with float32 accumulation
    memory_gb: float
    hbm_gbps: float  # device memory bandwidth, GB/s
    pcie_pinned_gbps: float  # host -> device, pinned memory, achieved
    pcie_pageable_gbps: float  # from pageable memory
    source: str
    link_gbps: float = 25.0  # GPU-to-GPU, one direction, per GPU: what context parallel's all-to-alls run over
    key: str = ""  # its name in GPUS: which published figures calibrate it


# Peak figures from the vendors' datasheets / architecture whitepapers; PCIe rates are typical measured
# host-to-device rates for the link generation (PCIe 4.0 x16 ~25 GB/s pinned, ~12 GB/s pageable; 5.0 ~2x).
# GPU-to-GPU links: NVLink's total bidirectional figure halved (SXM boards); consumer cards talk over PCIe.
GPUS = {
    "h100": GPU("H100 SXM", 989.4, 80, 3350, 50, 20, "NVIDIA H100 datasheet: 989 TFLOP/s dense BF16; NVLink 4 900 GB/s", 450),
    "h200": GPU("H200 SXM", 989.4, 141, 4800, 50, 20,
                "NVIDIA H200 datasheet: the H100's 989 TFLOP/s dense BF16, 141 GB HBM3e 4.8 TB/s; NVLink 900 GB/s", 450),
    "h20": GPU("H20", 148.0, 96, 4000, 50, 20, "NVIDIA H20 product brief: 148 TFLOP/s dense BF16, 96 GB HBM3 4.0 TB/s; NVLink 900 GB/s", 450),
    "a100": GPU("A100 80GB", 312.0, 80, 2039, 25, 12, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16; NVLink 3 600 GB/s", 300),
    "a800": GPU("A800 80GB", 312.0, 80, 2039, 25, 12, "NVIDIA A800 datasheet: A100's chip, 312 TFLOP/s dense BF16; NVLink 400 GB/s", 200),
    "l20": GPU("L20", 119.5, 48, 864, 25, 12, "NVIDIA L20 datasheet: 119.5 TFLOP/s dense FP16/BF16 tensor, 48 GB GDDR6 864 GB/s, PCIe 4.0"),
    "rtx4090": GPU("RTX 4090", 165.2, 24, 1008, 25, 12, "NVIDIA Ada whitepaper: 165.2 TFLOP/s FP16/BF16 tensor, FP32 accumulate"),
    "rtx3090": GPU("RTX 3090", 71.0, 24, 936, 25, 12, "NVIDIA Ampere GA102 whitepaper: 71 TFLOP/s FP16 tensor, FP32 accumulate"),
}
GPUS = {key: dataclasses.replace(g, key=key) for key, g in GPUS.items()}
DEFAULT_UTILISATION = 0.4  # of peak: only for a GPU whose family has no published figure (calibration.py)


def gpu(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise UserError(f"--gpu {name}: known GPUs are {', '.join(GPUS)} (or give --tflops and --pcie_gbps)") from None


def default_gpu_for_budget(budget_gib: float) -> str:
    """The GPU the time estimates assume when only a memory budget is given (the plan says so): a 24 GB card up to
    24 GiB, else an H100."""
    return "rtx4090" if budget_gib <= 24 else "h100"


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    transfer_s: float  # not hidden behind compute
    dequant_s: float
    total_s: float
    notes: tuple[str, ...] = ()
    collectives_s: float = 0.0  # context parallel (included in total_s)


def utilisation_for(device: GPU, attn_mode: str, attention_share: float) -> float:
    """The share of `device`'s peak this model reaches with `attn_mode`, attention being `attention_share` of the
    FLOPs: its family's fit to published times (calibration.py), over the kernel's time factor (above 1 with a
    kernel faster than flash-attention 2: an effective figure)."""
    from musubi_tuner.planning.calibration import fitted_utilisation, kernel_factor

    base = fitted_utilisation(device.key) if device.key else None
    return (base or DEFAULT_UTILISATION) / kernel_factor(attn_mode, attention_share, device.key)


def compute_seconds(flops: float, device: GPU, utilisation: float = DEFAULT_UTILISATION) -> float:
    return flops / (device.bf16_tflops * 1e12 * utilisation)


def overlapped_swap_seconds(block_compute_s: list[float], block_transfer_bytes: list[int], device: GPU, pinned: bool) -> tuple[float, float]:
    """(total, exposed transfer) seconds for a sequence of blocks, each prefetched while the previous runs."""
    total = exposed = 0.0
    for compute, nbytes in zip(block_compute_s, block_transfer_bytes):
        if not nbytes:
            total += compute
            continue
        if pinned:
            transfer = nbytes / (device.pcie_pinned_gbps * 1e9)
            total += max(compute, transfer)
            exposed += max(0.0, transfer - compute)
        else:
            transfer = nbytes / (device.pcie_pageable_gbps * 1e9)
            total += compute + transfer
            exposed += transfer
    return total, exposed
