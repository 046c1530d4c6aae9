"""LoRA for HunyuanVideo's DiT (`--network_module networks.lora`), in the sd-scripts/kohya naming.

Each targeted Linear gets y = W x + b + multiplier * (alpha / rank) * up(dropout(down(x))), saved as
`lora_unet_<module path with _>.lora_down.weight` (rank, in), `.lora_up.weight` (out, rank) and `.alpha`.
Targets: every Linear inside the double and single stream blocks except the modulation layers
(240 modules in the full model). The module-level entry points and the network's methods are those
musubi-tuner's trainer calls, so LyCORIS-style modules plug in the same way.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.errors import UserError
from musubi_tuner.networks.lora_files import load_network_weights, save_lora

logger = logging.getLogger(__name__)

LORA_PREFIX = "lora_unet_"
TARGET_BLOCKS = ("MMDoubleStreamBlock", "MMSingleStreamBlock")
DEFAULT_EXCLUDE = r".*(img_mod|txt_mod|modulation).*"


def lora_name(module_path: str) -> str:
    """`double_blocks.0.img_attn_qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return LORA_PREFIX + module_path.replace(".", "_")


def target_modules(model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = (DEFAULT_EXCLUDE,)) -> dict[str, nn.Linear]:
    """Linears inside the stream blocks, by dotted path, filtered as musubi-tuner does.

    A module is skipped iff its path fully matches an exclude pattern and no include pattern
    (include patterns only rescue excluded modules).
    """
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    found: dict[str, nn.Linear] = {}
    for block_path, block in model.named_modules():
        if type(block).__name__ not in TARGET_BLOCKS:
            continue
        for child_path, child in block.named_modules():
            if not isinstance(child, nn.Linear) or not child_path:
                continue
            path = f"{block_path}.{child_path}"
            if any(p.fullmatch(path) for p in exc) and not any(p.fullmatch(path) for p in inc):
                continue
            found[path] = child
    return found


class LoRAModule(nn.Module):
    """The low-rank update of one Linear. Installs itself by replacing the Linear's forward."""

    def __init__(self, name: str, org_module: nn.Linear, multiplier: float = 1.0, rank: int = 4, alpha: float | None = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = name
        self.rank = rank
        self.lora_down = nn.Linear(org_module.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = rank if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / rank
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.org_module = [org_module]  # a list keeps the base Linear out of this module's parameters
        self.enabled = True

    def apply_to(self) -> None:
        org = self.org_module[0]
        # Call through the class, not a bound method captured now: block swap and fp8 may change the
        # Linear's class later. A forward already patched on the instance (another LoRA) is kept.
        patched = org.__dict__.get("forward")
        self.org_forward = patched if patched is not None else (lambda x, _m=org: type(_m).forward(_m, x))
        org.forward = self.forward

    def restore(self) -> None:
        org = self.org_module[0]
        if org.__dict__.get("forward") == self.forward:
            del org.forward

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.lora_down.weight.dtype:
            x = x.to(self.lora_down.weight.dtype)
        h = self.lora_down(x)
        scale = self.scale
        if self.training:
            if self.dropout:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout:
                keep = torch.rand((h.shape[0], self.rank), device=h.device) > self.rank_dropout
                h = h * keep.view(h.shape[0], *([1] * (h.ndim - 2)), self.rank).to(h.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * (self.multiplier * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        if not self.enabled or self.multiplier == 0:
            return out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        return out + self.lora_delta(x).to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(up @ down) * alpha/rank in float32: what merging adds to the Linear's weight (times the multiplier)."""
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None, device: torch.device | str | None = None) -> None:
        """W += multiplier * delta, computed in float32 on `device` and cast back to W's dtype and device."""
        org = self.org_module[0]
        m = self.multiplier if multiplier is None else multiplier
        w = org.weight
        device = device or w.device
        merged = w.to(device, torch.float32) + m * self.delta_weight().to(device)
        w.data = merged.to(w.device, w.dtype)


class LoRANetwork(nn.Module):
    def __init__(self, unet: nn.Module, multiplier: float = 1.0, rank: int = 4, alpha: float | None = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                 include_patterns: Iterable[str] = (), exclude_patterns: Iterable[str] = (),
                 ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None,
                 loraplus_lr_ratio: float | None = None, verbose: bool = False):
        super().__init__()
        self.multiplier = multiplier
        self.loraplus_lr_ratio = loraplus_lr_ratio
        if ranks is None:
            targets = target_modules(unet, include_patterns, [*exclude_patterns, DEFAULT_EXCLUDE])
        else:  # built from a file: the Linears it names, wherever they are (as merging does)
            targets = {path: m for path, m in unet.named_modules() if isinstance(m, nn.Linear) and lora_name(path) in ranks}
            unknown = sorted(set(ranks) - {lora_name(p) for p in targets})
            if unknown:
                raise UserError(f"LoRA module {unknown[0]} names no Linear layer of this DiT ({len(unknown)} such modules; a LoRA for another model?)")
        self.unet_loras: list[LoRAModule] = []
        for path, linear in targets.items():
            name = lora_name(path)
            r = ranks[name] if ranks is not None else rank
            a = alphas[name] if alphas is not None else alpha
            module = LoRAModule(name, linear, multiplier, r, a, dropout, rank_dropout, module_dropout)
            self.add_module(name, module)
            self.unet_loras.append(module)
            if verbose:
                logger.info("LoRA %s: rank %d, alpha %s", name, r, module.alpha.item())
        if not self.unet_loras:
            why = "the LoRA file names none (or --lora_blocks keeps none)" if ranks is not None else "the include/exclude patterns leave no Linear layer"
            raise UserError(f"no LoRA modules were created: {why}")
        logger.info("LoRA: %d modules on the DiT", len(self.unet_loras))

    # -- the interface the trainer (and LyCORIS) use
    def apply_to(self, text_encoders=None, unet=None, apply_text_encoder: bool = False, apply_unet: bool = True) -> None:
        for lora in self.unet_loras:
            lora.apply_to()

    def restore(self) -> None:
        for lora in self.unet_loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.unet_loras:
            lora.multiplier = multiplier

    def set_enabled(self, enabled: bool) -> None:
        for lora in self.unet_loras:
            lora.enabled = enabled

    def prepare_optimizer_params(self, unet_lr: float, **_) -> tuple[list[dict], list[str]]:
        """Parameter groups: one for all LoRA weights, or with LoRA+ the up weights at lr x ratio."""
        if not self.loraplus_lr_ratio:
            return [{"params": list(self.parameters()), "lr": unet_lr}], ["unet"]
        down = [p for n, p in self.named_parameters() if "lora_up" not in n]
        up = [p for n, p in self.named_parameters() if "lora_up" in n]
        return [{"params": down, "lr": unet_lr}, {"params": up, "lr": unet_lr * self.loraplus_lr_ratio}], ["unet", "unet plus"]

    def prepare_grad_etc(self, *_, **__) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, *_, **__) -> None:
        self.train()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def state_dict_for_saving(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`name.lora_down.weight`, `name.lora_up.weight`, `name.alpha` in module order, on the CPU."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.unet_loras:
            for key, t in (("lora_down.weight", lora.lora_down.weight), ("lora_up.weight", lora.lora_up.weight), ("alpha", lora.alpha)):
                t = t.detach().to("cpu")
                out[f"{lora.lora_name}.{key}"] = t.to(dtype) if dtype is not None else t.clone()
        return out

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        save_lora(self.state_dict_for_saving(dtype), file, metadata or {})

    def load_weights(self, file: str, allow_partial: bool = False) -> dict:
        """Load a LoRA file (any naming) into this network: every LoRA pair of the file must fit one of its modules."""
        weights = load_network_weights(file, allow_partial)
        own = self.state_dict()
        unknown = [k for k in weights if k not in own]
        if len(unknown) == len(weights):
            raise UserError(f"{file}: none of its {len(weights)} tensors fits this network (e.g. {unknown[0]}); "
                            "a LoRA for another model, or trained with other --network_args include/exclude patterns")
        if unknown and not allow_partial:
            raise UserError(f"{file}: {unknown[0]} matches no module of this network ({len(unknown)} such tensors): build the "
                            "network from the file with --dim_from_weights, or --allow_partial_lora to load the rest")
        if unknown:
            logger.warning("%s: --allow_partial_lora drops %d tensors that match no module of this network: %s", file, len(unknown),
                           ", ".join(unknown))
        wrong = [k for k in weights if k in own and weights[k].shape != own[k].shape]
        if wrong:
            raise UserError(f"{file}: {wrong[0]} has shape {list(weights[wrong[0]].shape)}, this network's is "
                            f"{list(own[wrong[0]].shape)}; train with the file's rank (--dim_from_weights) or another --network_dim")
        missing, _ = self.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
        return {"missing": missing, "unexpected": unknown}

    @torch.no_grad()
    def merge_to(self, text_encoders=None, unet=None, weights_sd=None, dtype=None, device=None, non_blocking=False) -> None:
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=False)
        for lora in self.unet_loras:
            lora.merge_to(device=device)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device) -> tuple[int, float, float]:
        """Scale down LoRA pairs whose update norm exceeds max_norm (musubi-tuner's --scale_weight_norms)."""
        scaled, norms = 0, []
        for lora in self.unet_loras:
            up, down = lora.lora_up.weight, lora.lora_down.weight
            norm = ((up.float() @ down.float()) * lora.scale).norm().clamp(min=max_norm / 2)
            desired = norm.clamp(max=max_norm)
            ratio = (desired / norm).item()
            if ratio != 1:
                scaled += 1
                up.mul_(ratio ** 0.5)
                down.mul_(ratio ** 0.5)
            norms.append((norm * ratio).item())
        return scaled, sum(norms) / len(norms), max(norms)


# --------------------------------------------------------------------------------------------- entry points


def _parse_network_args(kwargs: dict) -> dict:
    """`--network_args key=value` strings (already split into kwargs) to typed options."""
    opts = {}
    for key, low, high in (("rank_dropout", 0.0, 0.99), ("module_dropout", 0.0, 0.99), ("loraplus_lr_ratio", 0.0, float("inf"))):
        if kwargs.get(key) is not None:
            try:
                opts[key] = float(kwargs[key])
            except ValueError:
                raise UserError(f"--network_args {key}={kwargs[key]}: not a number") from None
            if not low <= opts[key] <= high:
                raise UserError(f"--network_args {key}={kwargs[key]}: must be between {low:g} and {high:g}")
    for key in ("include_patterns", "exclude_patterns"):
        value = kwargs.get(key)
        if value is None:
            continue
        try:
            patterns = ast.literal_eval(value) if isinstance(value, str) else value
        except (ValueError, SyntaxError):
            raise UserError(f"--network_args {key}={value}: not a list of regular expressions; write it as "
                            f"{key}=[\"double_blocks\", \"img_mod\"] (quoted, in brackets)") from None
        if not isinstance(patterns, (str, list, tuple)) or not all(isinstance(p, str) for p in ([patterns] if isinstance(patterns, str) else patterns)):
            raise UserError(f"--network_args {key}={value}: not a list of regular expressions (strings)")
        if isinstance(patterns, str):
            patterns = [patterns]
        valid = []
        for p in patterns:
            try:
                re.compile(p)
                valid.append(p)
            except re.error as e:
                raise UserError(f"--network_args {key}: {p!r} is not a valid regular expression ({e})") from None
        opts[key] = valid
    if "verbose" in kwargs:
        opts["verbose"] = str(kwargs["verbose"]).lower() == "true"
    return opts


def create_arch_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                        unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    return LoRANetwork(unet, multiplier, network_dim or 4, network_alpha, dropout=neuron_dropout, **_parse_network_args(kwargs))


create_network = create_arch_network  # the name LyCORIS-style loaders look for


def create_arch_network_from_weights(multiplier: float, weights_sd: dict[str, torch.Tensor], unet: nn.Module | None = None,
                                     for_inference: bool = False, **kwargs) -> LoRANetwork:
    """A network with exactly the modules, ranks and alphas of a kohya-named state dict, weights loaded."""
    ranks, alphas = {}, {}
    for key, t in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            ranks[name] = t.shape[0]
        elif suffix == "alpha":
            alphas[name] = float(t)
    for name, r in ranks.items():
        alphas.setdefault(name, float(r))  # no alpha stored: scale 1 (alpha = rank)
    network = LoRANetwork(unet, multiplier, ranks=ranks, alphas=alphas, **kwargs)
    network.load_state_dict({k: v for k, v in weights_sd.items() if k.split(".", 1)[0] in ranks}, strict=False)
    return network
