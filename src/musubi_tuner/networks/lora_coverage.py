"""What the LoRA doctor's consumers share: the model a file is checked against (its parameter names and shapes,
built on the meta device) and what one consumer does with one file (`Coverage`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from musubi_tuner.hunyuan.config import HUNYUAN_T2V, DiTConfig
from musubi_tuner.networks.lora_naming import module_templates


@dataclass
class Coverage:
    """What one consumer does with one file: the keys it applies, the keys it drops (with why), or a refusal."""

    consumer: str
    total: int
    applied: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # the consumer's own names of the parameters it changes
    dropped: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None  # the consumer refuses (or fails on) the whole file
    # the consumer serves only the released model's size and this file is of another (a test or demo model): why, in
    # words; its refusal is then no fault of the file (the demo's LoRAs were all given a red verdict: fuzz_ac 12)
    other_size: str | None = None

    @property
    def complete(self) -> bool:
        return self.fatal is None and not self.dropped and len(self.applied) == self.total

    @property
    def fraction(self) -> float:
        return 0.0 if self.fatal or not self.total else len(self.applied) / self.total


@dataclass(frozen=True)
class Model:
    """The DiT a file is checked against: its official parameter names, and their shapes when known (a --dit was given)."""

    config: DiTConfig = HUNYUAN_T2V
    shapes_known: bool = False

    @functools.cached_property
    def params(self) -> dict[str, tuple[int, ...] | None]:
        return dit_params(self.config) if self.shapes_known else {p: None for p in _param_names(self.config)}

    def fits(self, param: str, shape) -> bool:
        """Whether an update of `shape` (a LoRA pair's (out, in), or a tensor's shape) fits `param`; unknown shapes fit."""
        want = self.params.get(param)
        if want is None or shape is None:
            return True
        return tuple(shape) in (tuple(want), (want[0], numel(want[1:])) if len(want) >= 2 else ())


def numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _param_names(config: DiTConfig) -> list[str]:
    depth = {"double_blocks": config.mm_double_blocks_depth, "single_blocks": config.mm_single_blocks_depth,
             "txt_in.individual_token_refiner.blocks": config.refiner_depth}
    names = []
    for template in module_templates().values():
        if template.path.startswith("guidance_in") and not config.guidance_embed:
            continue
        container = next((c for c in depth if template.path.startswith(c + ".{i}")), None)
        paths = [template.path.replace("{i}", str(i)) for i in range(depth[container])] if container else [template.path]
        names += [f"{p}.{leaf}" for p in paths for leaf in template.params]
    return names


@functools.lru_cache(maxsize=8)
def dit_params(config: DiTConfig = HUNYUAN_T2V) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official DiT of `config` -> its shape (built on the meta device)."""
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def dit_linears(config: DiTConfig = HUNYUAN_T2V) -> dict[str, tuple[int, int]]:
    """Every Linear of the official DiT: module path -> weight shape (out, in)."""
    return {name.removesuffix(".weight"): shape for name, shape in dit_params(config).items()
            if name.endswith(".weight") and len(shape) == 2}


def shape_of(t) -> tuple[int, ...]:
    return tuple(t.shape)
