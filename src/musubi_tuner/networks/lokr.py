"""LoKr for HunyuanVideo's DiT (`--network_module networks.lokr`), in musubi-tuner's file format.

Each targeted Linear (the same 240 as networks.lora) gets y = W x + b + multiplier * F.linear(x, delta W) with
delta W = kron(w1, w2) * scale (networks.lycoris_math). The layer's out and in sizes are split into factor pairs
(out1, out2), (in1, in2) by `factorization` with `--network_args factor=N` (default -1: balanced); w1 is
(out1, in1). w2 is (out2, in2): low-rank `w2_a @ w2_b` with scale alpha / rank when rank < max(out2, in2) / 2,
else a full matrix with scale 1 (alpha is then saved as the rank). Saved as `lora_unet_<module>.lokr_w1`,
`.lokr_w2_a` (out2, rank) and `.lokr_w2_b` (rank, in2), or `.lokr_w2`, and `.alpha`.
Init: w1 and w2_a Kaiming-uniform, w2_b (or the full w2) zero, so delta W = 0 at the start.

Files are read by their tensors' shapes, so a LoKr trained with any `factor` loads without repeating it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.errors import UserError
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora import AdapterModule, LoRANetwork, _parse_network_args, network_from_weights
from musubi_tuner.networks.loha import row_dropout, warn_network_dropout
from musubi_tuner.networks.lycoris_math import factorization, lokr_delta

logger = logging.getLogger(__name__)


class LoKrModule(AdapterModule):
    def __init__(self, name: str, org_module: nn.Linear, multiplier: float = 1.0, rank: int = 4, alpha: float | None = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                 factor: int = -1, w1_shape: tuple[int, int] | None = None, full_w2: bool | None = None):
        """`w1_shape` and `full_w2` (from a file) override what `factor` and `rank` would choose."""
        out_dim, in_dim = org_module.out_features, org_module.in_features
        out1, in1 = w1_shape or (factorization(out_dim, factor)[0], factorization(in_dim, factor)[0])
        if out_dim % out1 or in_dim % in1:
            raise UserError(f"{name}: a LoKr w1 of shape {[out1, in1]} does not divide the layer's {[out_dim, in_dim]}")
        out2, in2 = out_dim // out1, in_dim // in1
        self.full_w2 = rank >= max(out2, in2) / 2 if full_w2 is None else full_w2
        super().__init__(name, org_module, multiplier, rank, rank if self.full_w2 else alpha, dropout, rank_dropout, module_dropout)
        self.lokr_w1 = nn.Parameter(torch.empty(out1, in1))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out2, in2))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out2, rank))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in2))

    def factors(self) -> dict[str, nn.Parameter]:
        names = ("lokr_w1", "lokr_w2") if self.full_w2 else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
        return {n: getattr(self, n) for n in names}

    def w2(self) -> torch.Tensor:
        return self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b

    def update(self, x: torch.Tensor) -> torch.Tensor:
        delta, scale = row_dropout(lokr_delta(self.lokr_w1, self.w2(), self.scale), self.rank_dropout, self.training)
        return F.linear(self.own_dtype(x), delta) * (self.multiplier * scale)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return lokr_delta(self.lokr_w1.float(), self.w2().float(), self.scale)

    @torch.no_grad()
    def scale_update_(self, ratio: float) -> None:
        self.lokr_w1.mul_(ratio ** 0.5)
        (self.lokr_w2 if self.full_w2 else self.lokr_w2_a).mul_(ratio ** 0.5)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.factors(), "alpha": self.alpha}


def _factor(kwargs: dict) -> int:
    value = kwargs.pop("factor", -1)
    try:
        factor = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--network_args factor={value}: not a whole number (-1 splits each size into balanced factors)") from None
    if factor == 0 or factor < -1:
        raise UserError(f"--network_args factor={value}: must be -1 (balanced) or a positive number such as 4 or 8")
    return factor


def check_network_args(kwargs: dict, dit_config=None) -> None:
    _factor(kwargs)
    lora.check_network_args(kwargs, dit_config)  # (_factor took its key out)


def create_arch_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                        unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    warn_network_dropout("LoKr", neuron_dropout)
    factor = _factor(kwargs)
    network = LoRANetwork(unet, multiplier, network_dim or 4, network_alpha, module_class=LoKrModule,
                          module_kwargs={"factor": factor}, **_parse_network_args(kwargs))
    full = sum(m.full_w2 for m in network.unet_loras)
    if full:
        logger.warning("LoKr: rank %d is at least half of w2's size in %d of %d layers: they train a full w2 (scale 1, alpha "
                       "ignored)", network_dim or 4, full, len(network.unet_loras))
    return network


create_network = create_arch_network


def create_arch_network_from_weights(multiplier: float, weights_sd: dict[str, torch.Tensor], unet: nn.Module | None = None,
                                     for_inference: bool = False, **kwargs) -> LoRANetwork:
    """The LoKr network a kohya-named state dict holds, weights loaded: w1's shape from `.lokr_w1`, a full w2 where the
    file has `.lokr_w2`, else the rank from `.lokr_w2_a` (so `factor` need not be given again)."""
    kwargs.pop("factor", None)
    per_module = {}
    for key, t in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lokr_w1":
            per_module.setdefault(name, {})["w1_shape"] = tuple(t.shape)
        elif suffix == "lokr_w2":
            per_module.setdefault(name, {}).update(full_w2=True, rank=max(t.shape))
        elif suffix == "lokr_w2_a":
            per_module.setdefault(name, {}).update(full_w2=False, rank=t.shape[1])
    return network_from_weights(LoKrModule, per_module, multiplier, weights_sd, unet, **kwargs)
