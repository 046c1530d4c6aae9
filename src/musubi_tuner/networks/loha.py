"""LoHa for HunyuanVideo's DiT (`--network_module networks.loha`), in musubi-tuner's file format.

Each targeted Linear (the same 240 as networks.lora) gets y = W x + b + multiplier * F.linear(x, delta W) with
delta W = ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / rank (networks.lycoris_math), saved as
`lora_unet_<module path with _>.hada_w1_a` (out, rank), `.hada_w1_b` (rank, in), `.hada_w2_a`, `.hada_w2_b`, `.alpha`.
Init: w1_a ~ N(0, 0.1), w1_b and w2_b ~ N(0, 1), w2_a = 0, so delta W = 0 at the start.

As in musubi-tuner: rank_dropout drops rows of delta W (output features), not ranks; `--network_dropout` has no
effect; LoRA+ has no up weights to act on. Unlike it, `--scale_weight_norms` applies to delta W here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.networks.lora import AdapterModule, LoRANetwork, _parse_network_args, check_network_args, network_from_weights  # noqa: F401 (check_network_args: the trainer asks this module)
from musubi_tuner.networks.lycoris_math import loha_delta

logger = logging.getLogger(__name__)

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def row_dropout(delta: torch.Tensor, p: float | None, training: bool) -> tuple[torch.Tensor, float]:
    """musubi-tuner's rank_dropout for LoHa/LoKr: each output row of delta W kept with probability 1 - p, the rest
    rescaled by 1 / (1 - p); (delta, 1.0) when not training."""
    if not (training and p):
        return delta, 1.0
    keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)
    return delta * keep[:, None], 1.0 / (1.0 - p)


class LoHaModule(AdapterModule):
    def __init__(self, name: str, org_module: nn.Linear, multiplier: float = 1.0, rank: int = 4, alpha: float | None = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(name, org_module, multiplier, rank, alpha, dropout, rank_dropout, module_dropout)
        out_dim, in_dim = org_module.out_features, org_module.in_features
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank).normal_(std=0.1))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim).normal_(std=1.0))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_dim, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim).normal_(std=1.0))

    def delta(self) -> torch.Tensor:
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        delta, scale = row_dropout(self.delta(), self.rank_dropout, self.training)
        return F.linear(self.own_dtype(x), delta) * (self.multiplier * scale)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return loha_delta(*(getattr(self, f).float() for f in FACTORS), self.scale)

    @torch.no_grad()
    def scale_update_(self, ratio: float) -> None:
        self.hada_w1_a.mul_(ratio ** 0.5)
        self.hada_w2_a.mul_(ratio ** 0.5)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f: getattr(self, f) for f in FACTORS}, "alpha": self.alpha}


def warn_network_dropout(kind: str, neuron_dropout: float | None) -> None:
    """musubi-tuner's LoHa/LoKr accept --network_dropout and do nothing with it: say so."""
    if neuron_dropout:
        logger.warning("--network_dropout has no effect on %s (musubi-tuner ignores it too); rank_dropout and module_dropout "
                       "in --network_args do act", kind)


def create_arch_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                        unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    warn_network_dropout("LoHa", neuron_dropout)
    return LoRANetwork(unet, multiplier, network_dim or 4, network_alpha, module_class=LoHaModule, **_parse_network_args(kwargs))


create_network = create_arch_network


def create_arch_network_from_weights(multiplier: float, weights_sd: dict[str, torch.Tensor], unet: nn.Module | None = None,
                                     for_inference: bool = False, **kwargs) -> LoRANetwork:
    """The LoHa network a kohya-named state dict holds (rank from each `.hada_w1_b`), weights loaded."""
    per_module = {key.partition(".")[0]: {"rank": t.shape[0]} for key, t in weights_sd.items() if key.endswith(".hada_w1_b")}
    return network_from_weights(LoHaModule, per_module, multiplier, weights_sd, unet, **kwargs)
