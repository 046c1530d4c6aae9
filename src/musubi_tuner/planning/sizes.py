"""Parameter counts and bytes of the DiT, from real shapes (the VAE's and the text encoders' come with their traces).

The DiT's numbers come from the model itself, built on the `meta` device from its config (no weights,
no memory): which tensors are stored in fp8 (`hunyuan.fp8.is_fp8_weight`), which Linears block swap
streams (`hunyuan.offload`), which modules LoRA wraps (`networks.lora.target_modules`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from musubi_tuner.hunyuan.config import DiTConfig

# ------------------------------------------------------------------------------------ the DiT


@dataclass(frozen=True)
class LinearShape:
    """One nn.Linear of a stream block: where it is and its sizes."""

    path: str  # official module path, e.g. double_blocks.3.img_mlp.fc1
    block: tuple[str, int]  # ("double" | "single", index)
    in_features: int
    out_features: int
    fp8: bool  # stored in float8 under --fp8_base / --fp8
    lora: bool  # wrapped by the default LoRA network

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def modulation(self) -> bool:
        """img_mod / txt_mod / modulation: fed the conditioning vector, which needs no grad."""
        return self.path.endswith(("_mod.linear", "modulation.linear"))


@dataclass(frozen=True)
class DiTSizes:
    config: DiTConfig
    params: int
    fp8_params: int  # weights stored in fp8 under --fp8 (the block attention and MLP Linears)
    fp8_rows: int  # output rows of those weights: one float32 scale each
    block_linears: tuple[LinearShape, ...]  # every Linear inside the double and single blocks
    embedder_params: int  # img_in + txt_in: what --img_in_txt_in_offloading keeps off the device

    def linears_of(self, block: tuple[str, int]) -> list[LinearShape]:
        return [lin for lin in self.block_linears if lin.block == block]

    def lora_params(self, rank: int) -> int:
        """Trainable parameters of the default LoRA network (down: rank x in, up: out x rank per module)."""
        return sum(rank * (lin.in_features + lin.out_features) for lin in self.block_linears if lin.lora)

    def lora_modules(self) -> int:
        return sum(lin.lora for lin in self.block_linears)

    def weight_bytes(self, dtype_bytes: int, fp8: bool) -> dict[str, int]:
        """Bytes of all weights by storage dtype: {"bf16": ..., "fp8": ..., "fp8 scales": ...}."""
        label = {1: "fp8", 2: "bf16/fp16", 4: "fp32"}[dtype_bytes]
        if not fp8:
            return {label: self.params * dtype_bytes}
        return {label: (self.params - self.fp8_params) * dtype_bytes, "fp8": self.fp8_params, "fp8 scales": self.fp8_rows * 4}

    def block_linear_weight_bytes(self, block: tuple[str, int], dtype_bytes: int, fp8: bool, modulation: bool = True) -> int:
        """What block swap streams for one block: its Linear weights at their storage dtype (without the
        modulation Linears when `modulation` is False)."""
        return sum(lin.weight_params * (1 if fp8 and lin.fp8 else dtype_bytes) for lin in self.linears_of(block)
                   if modulation or not lin.modulation)


@functools.lru_cache(maxsize=8)
def dit_sizes(config: DiTConfig) -> DiTSizes:
    """Read every size off the DiT built on the meta device (a fraction of a second for the full model)."""
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
    from musubi_tuner.hunyuan.fp8 import is_fp8_weight
    from musubi_tuner.networks.lora import target_modules

    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    lora_paths = set(target_modules(model))
    linears = []
    fp8_params = fp8_rows = 0
    for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
        for i, block in enumerate(blocks):
            for name, module in block.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                path = f"{kind}_blocks.{i}.{name}"
                fp8 = is_fp8_weight(f"{path}.weight")
                linears.append(LinearShape(path, (kind, i), module.in_features, module.out_features, fp8, path in lora_paths))
                if fp8:
                    fp8_params += module.weight.numel()
                    fp8_rows += module.out_features
    embedders = sum(p.numel() for name in ("img_in", "txt_in") for p in getattr(model, name).parameters())
    return DiTSizes(config=config, params=sum(p.numel() for p in model.parameters()), fp8_params=fp8_params, fp8_rows=fp8_rows,
                    block_linears=tuple(linears), embedder_params=embedders)


def swapped_blocks(sizes: DiTSizes, opts) -> dict[tuple[str, int], int]:
    """The blocks `--blocks_to_swap` streams, in run order, with the bytes of their Linear weights (hunyuan.offload)."""
    from musubi_tuner.hunyuan.offload import swapped_block_keys

    c = sizes.config
    order = swapped_block_keys(opts.blocks_to_swap, c.mm_double_blocks_depth, c.mm_single_blocks_depth)
    return {key: sizes.block_linear_weight_bytes(key, opts.weight_bytes, opts.fp8) for key in order}
