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

from musubi_tuner.errors import UserError, did_you_mean
from musubi_tuner.networks.lora_files import load_network_weights, save_lora
from musubi_tuner.networks.lora_reader import alpha_or_rank, warn_once

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


class AdapterModule(nn.Module):
    """What every adapter of one Linear shares (LoRA here, LoHa and LoKr in their modules): it installs itself by
    replacing the Linear's forward, adds `multiplier * update(x)` to the Linear's output, and merges, scales and
    saves its update. Subclasses define `update`, `delta_weight`, `scale_update_` and `tensors`."""

    def __init__(self, name: str, org_module: nn.Linear, multiplier: float, rank: int, alpha: float | None,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        self.lora_name = name
        self.rank = rank
        alpha = alpha_or_rank(alpha, rank)
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

    def own_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """x in the adapter's dtype when autocast does not cast it (a bfloat16 DiT with float32 adapter weights)."""
        dtype = next(self.parameters()).dtype
        return x if torch.is_autocast_enabled(x.device.type) or x.dtype == dtype else x.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.org_forward(x)
        if not self.enabled or self.multiplier == 0:
            return out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        return out + self.update(x).to(out.dtype)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * (the adapter's change of the Linear's output), with the training-time dropouts."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update of the Linear's weight at multiplier 1, scale included, in float32, (out, in)."""
        raise NotImplementedError

    def scale_update_(self, ratio: float) -> None:
        """Scale the factors in place so that delta_weight() is multiplied by `ratio`."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's entries as saved: key suffix -> tensor, e.g. `lora_down.weight`, `alpha`."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None, device: torch.device | str | None = None) -> None:
        """W += multiplier * delta, computed in float32 on `device` and cast back to W's dtype and device."""
        org = self.org_module[0]
        m = self.multiplier if multiplier is None else multiplier
        w = org.weight
        device = device or w.device
        merged = w.to(device, torch.float32) + m * self.delta_weight().to(device)
        w.data = merged.to(w.device, w.dtype)


class LoRAModule(AdapterModule):
    """The low-rank update of one Linear: multiplier * (alpha / rank) * up(dropout(down(x)))."""

    def __init__(self, name: str, org_module: nn.Linear, multiplier: float = 1.0, rank: int = 4, alpha: float | None = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__(name, org_module, multiplier, rank, alpha, dropout, rank_dropout, module_dropout)
        self.lora_down = nn.Linear(org_module.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(self.own_dtype(x))
        scale = self.scale
        if self.training:
            if self.dropout:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout:
                keep = torch.rand((h.shape[0], self.rank), device=h.device) > self.rank_dropout
                h = h * keep.view(h.shape[0], *([1] * (h.ndim - 2)), self.rank).to(h.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * (self.multiplier * scale)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(up @ down) * alpha/rank in float32: what merging adds to the Linear's weight (times the multiplier)."""
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale

    @torch.no_grad()
    def scale_update_(self, ratio: float) -> None:
        self.lora_up.weight.mul_(ratio ** 0.5)
        self.lora_down.weight.mul_(ratio ** 0.5)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight, "alpha": self.alpha}


class LoRANetwork(nn.Module):
    """The adapters of a DiT's Linears: LoRA (`module_class=LoRAModule`), LoHa or LoKr, with the interface
    musubi-tuner's trainer calls. `per_module` (name -> the module's own keyword arguments, e.g. its rank, alpha and
    factor shapes) builds exactly the modules a file holds; otherwise the targets of `target_modules` all get
    `rank`, `alpha` and `module_kwargs`."""

    def __init__(self, unet: nn.Module, multiplier: float = 1.0, rank: int = 4, alpha: float | None = 1.0,
                 dropout: float | None = None, rank_dropout: float | None = None, module_dropout: float | None = None,
                 include_patterns: Iterable[str] = (), exclude_patterns: Iterable[str] = (),
                 per_module: dict[str, dict] | None = None, loraplus_lr_ratio: float | None = None, verbose: bool = False,
                 module_class: type[AdapterModule] = LoRAModule, module_kwargs: dict | None = None):
        super().__init__()
        self.multiplier = multiplier
        self.loraplus_lr_ratio = loraplus_lr_ratio
        if per_module is None:
            targets = target_modules(unet, include_patterns, [*exclude_patterns, DEFAULT_EXCLUDE])
        else:  # built from a file: the Linears it names, wherever they are (as merging does)
            targets = {path: m for path, m in unet.named_modules() if isinstance(m, nn.Linear) and lora_name(path) in per_module}
            unknown = sorted(set(per_module) - {lora_name(p) for p in targets})
            if unknown:
                raise UserError(f"LoRA module {unknown[0]} names no Linear layer of this DiT ({len(unknown)} such modules; a LoRA for another model?)")
        self.unet_loras: list[AdapterModule] = []
        for path, linear in targets.items():
            name = lora_name(path)
            kwargs = {"rank": rank, "alpha": alpha, **(module_kwargs or {}), **(per_module or {}).get(name, {})}
            module = module_class(name, linear, multiplier, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                                  **kwargs)
            self.add_module(name, module)
            self.unet_loras.append(module)
            if verbose and logger.isEnabledFor(logging.INFO):  # (not on a meta-device stand-in, checked quietly)
                logger.info("%s %s: rank %d, alpha %s", module_class.__name__, name, module.rank, module.alpha.item())
        if not self.unet_loras:
            why = "the LoRA file names none (or --lora_blocks keeps none)" if per_module is not None else "the include/exclude patterns leave no Linear layer"
            raise UserError(f"no LoRA modules were created: {why}")
        logger.info("%s: %d modules on the DiT", module_class.__name__.removesuffix("Module"), len(self.unet_loras))

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
        up = [p for n, p in self.named_parameters() if "lora_up" in n]
        if self.loraplus_lr_ratio and not up:
            logger.warning("loraplus_lr_ratio does nothing here: LoRA+ raises the rate of LoRA's up weights, and %s has none",
                           type(self.unet_loras[0]).__name__.removesuffix("Module"))
        if not self.loraplus_lr_ratio or not up:
            return [{"params": list(self.parameters()), "lr": unet_lr}], ["unet"]
        down = [p for n, p in self.named_parameters() if "lora_up" not in n]
        return [{"params": down, "lr": unet_lr}, {"params": up, "lr": unet_lr * self.loraplus_lr_ratio}], ["unet", "unet plus"]

    def prepare_grad_etc(self, *_, **__) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, *_, **__) -> None:
        self.train()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def state_dict_for_saving(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Each module's entries (`name.lora_down.weight`, ..., `name.alpha`) in module order, on the CPU."""
        out: dict[str, torch.Tensor] = {}
        for lora in self.unet_loras:
            for key, t in lora.tensors().items():
                t = t.detach().to("cpu")
                out[f"{lora.lora_name}.{key}"] = t.to(dtype) if dtype is not None else t.clone()
        return out

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        save_lora(self.state_dict_for_saving(dtype), file, metadata or {})

    def load_weights(self, file: str, allow_partial: bool = False) -> dict:
        """Load a LoRA file (any naming) into this network: every LoRA pair of the file must fit one of its modules."""
        weights = load_network_weights(file, allow_partial)
        unknown = self.check_takes(file, weights, allow_partial)
        if unknown:
            warn_once("%s: --allow_partial_lora drops %d tensors that match no module of this network: %s", file, len(unknown),
                      ", ".join(unknown))
        own = self.state_dict()
        missing, _ = self.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
        return {"missing": missing, "unexpected": unknown, "alpha": self._take_alphas(file, weights)}

    def check_takes(self, file: str, weights: dict[str, torch.Tensor], allow_partial: bool = False) -> list[str]:
        """Refuse `file`'s `weights` unless every tensor fits one of this network's (kind, names, shapes; with
        `allow_partial`, the rest fit); returns the keys that match no module. Reads shapes only: a network on the meta
        device checks a file before any model loads."""
        require_module_kind(file, weights, type(self.unet_loras[0]))
        own = self.state_dict()
        unknown = [k for k in weights if k not in own]
        if len(unknown) == len(weights):
            raise UserError(f"{file}: none of its {len(weights)} tensors fits this network (e.g. {unknown[0]}); "
                            "a LoRA for another model, or trained with other --network_args include/exclude patterns")
        if unknown and not allow_partial and all(".lokr_" in k for k in unknown):  # a full w2 against a low-rank one
            raise UserError(f"{file}: its LoKr modules are of another factor or rank than this network's ({unknown[0]}): give "
                            "the --network_args factor and --network_dim it was trained with, or build the network from the "
                            "file with --dim_from_weights")
        if unknown and not allow_partial:
            raise UserError(f"{file}: {unknown[0]} matches no module of this network ({len(unknown)} such tensors): build the "
                            "network from the file with --dim_from_weights, or --allow_partial_lora to load the rest")
        wrong = [k for k in weights if k in own and weights[k].shape != own[k].shape]
        if wrong:  # a layer of another width is said as merging says it; what is left differs in rank (or LoKr factor)
            require_fits(file, weights, {m.lora_name: tuple(m.org_module[0].weight.shape) for m in self.unet_loras})
            raise UserError(f"{file}: {wrong[0]} has shape {list(weights[wrong[0]].shape)}, this network's is "
                            f"{list(own[wrong[0]].shape)}; train with the file's rank (--dim_from_weights) or another --network_dim"
                            f"{' or LoKr factor' if 'lokr' in wrong[0] else ''}")
        return unknown

    @torch.no_grad()
    def _take_alphas(self, file: str, weights: dict[str, torch.Tensor]) -> float | None:
        """Each module the file holds acts with the file's alpha (none saved: its rank), as the file was trained: the
        weights continue at the strength they have, and the alpha saved is the one trained with. A module built with
        another alpha is said once. Returns the alpha all the file's modules share (None: they differ)."""
        changed, alphas = set(), set()
        for module in self.unet_loras:
            if not any(k.startswith(module.lora_name + ".") for k in weights):
                continue
            saved = weights.get(f"{module.lora_name}.alpha")
            alpha = alpha_or_rank(None if saved is None else float(saved), module.rank)
            alphas.add(alpha)
            if alpha != module.scale * module.rank:
                if not math.isclose(alpha, module.scale * module.rank, rel_tol=1e-2):  # (a 16-bit file stores 0.37 as
                    changed.add((module.scale * module.rank, alpha))                   # 0.369141: the same alpha, unsaid)
                module.alpha.fill_(alpha)
                module.scale = alpha / module.rank
        if changed:
            built, taken = (", ".join(sorted({f"{pair[i]:g}" for pair in changed})) for i in (0, 1))
            logger.warning("%s: trained with alpha %s, and the network was built with %s (--network_alpha): the file's alpha is "
                           "kept, so the LoRA continues at the strength it has", file, taken, built)
        return alphas.pop() if len(alphas) == 1 else None

    @torch.no_grad()
    def merge_to(self, text_encoders=None, unet=None, weights_sd=None, dtype=None, device=None, non_blocking=False) -> None:
        if weights_sd is not None:
            self.load_state_dict(weights_sd, strict=False)
        for lora in self.unet_loras:
            lora.merge_to(device=device)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device) -> tuple[int, float, float]:
        """Scale down updates whose norm exceeds max_norm (musubi-tuner's --scale_weight_norms): |delta W|_F, clamped
        below at max_norm / 2, is brought to at most max_norm by scaling the factors."""
        scaled, norms = 0, []
        for lora in self.unet_loras:
            norm = lora.delta_weight().norm().clamp(min=max_norm / 2)
            ratio = (norm.clamp(max=max_norm) / norm).item()
            if ratio != 1:
                scaled += 1
                lora.scale_update_(ratio)
            norms.append(norm.item() * ratio)
        return scaled, sum(norms) / len(norms), max(norms)


# --------------------------------------------------------------------------------------------- entry points


NETWORK_ARGS = ("rank_dropout", "module_dropout", "loraplus_lr_ratio", "include_patterns", "exclude_patterns", "verbose")
MODULE_ARGS = {"factor": "networks.lokr"}  # what only one network module reads (it takes it out before the others)
# what musubi-tuner's network modules read and HunyuanVideo has nothing for: its LoRA targets are Linear layers only
NO_EFFECT_ARGS = ("conv_dim", "conv_alpha")


def _parse_network_args(kwargs: dict, say: bool = False) -> dict:
    """`--network_args key=value` strings (already split into kwargs) to typed options. A key no module reads is
    refused, naming the closest one: musubi-tuner ignores it silently, and a misspelt `rank_dropuot` trains without it.
    A key musubi-tuner's modules read to no effect here (conv_dim, another module's factor) is taken, and with `say`
    (the check before the work) said to be ignored: a musubi-tuner command line that holds one was refused (fuzz_ad F7)."""
    kwargs = dict(kwargs)
    for key in list(kwargs):
        if key in NETWORK_ARGS:
            continue
        if key in MODULE_ARGS or key in NO_EFFECT_ARGS:
            if say:
                why = (f"only --network_module {MODULE_ARGS[key]} reads it" if key in MODULE_ARGS else
                       "HunyuanVideo's LoRA targets are Linear layers, with no convolution to train")
                logger.warning("--network_args %s=%s: ignored (%s), as musubi-tuner ignores it", key, kwargs[key], why)
            del kwargs[key]
            continue
        known = NETWORK_ARGS + tuple(MODULE_ARGS)
        raise UserError(f"--network_args {key}: not an option of the network modules{did_you_mean(key, known)}; they read: "
                        f"{', '.join(known)}")
    if kwargs.get("loraplus_lr_ratio") is not None and _number(kwargs["loraplus_lr_ratio"]) == 0:  # (musubi-tuner trains
        # the up weights at lr 0 then, and they start at zero: a LoRA that learns nothing; here it was dropped unsaid: F9)
        raise UserError("--network_args loraplus_lr_ratio=0: the up weights would train at a rate of 0 and, starting at "
                        "zero, the LoRA would learn nothing; leave it out to train without LoRA+")
    opts = {}
    for key, low, high in (("rank_dropout", 0.0, 0.99), ("module_dropout", 0.0, 0.99), ("loraplus_lr_ratio", 0.0, None)):
        if kwargs.get(key) is not None:
            try:
                opts[key] = float(kwargs[key])
            except ValueError:
                raise UserError(f"--network_args {key}={kwargs[key]}: not a number") from None
            if not math.isfinite(opts[key]) or not low <= opts[key] <= (high if high is not None else math.inf):
                allowed = f"between {low:g} and {high:g}" if high is not None else f"a finite number, at least {low:g}"
                raise UserError(f"--network_args {key}={kwargs[key]}: must be {allowed}")
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
        if str(kwargs["verbose"]).lower() not in ("true", "false"):
            raise UserError(f"--network_args verbose={kwargs['verbose']}: true or false")
        opts["verbose"] = str(kwargs["verbose"]).lower() == "true"
    return opts


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def check_network_args(kwargs: dict, dit_config=None) -> None:
    """Before any model loads: every --network_args key is one this module reads, with a value it takes; given the
    DiT's config (its file's header), the include/exclude patterns are tried on its module names (`check_patterns`)."""
    opts = _parse_network_args(kwargs, say=dit_config is None)  # (the check before the DiT's config is known says what
    # is ignored; the one with it, after, tries the patterns)
    if dit_config is not None:
        check_patterns(dit_config, opts.get("include_patterns", []), opts.get("exclude_patterns", []))


def check_patterns(dit_config, include: list[str], exclude: list[str]) -> None:
    """A pattern that matches no module is said (it must match a module's whole name: `single_blocks` matches none,
    `single_blocks.*` all of theirs); patterns that leave no module are refused, before the DiT loads."""
    from musubi_tuner.hunyuan.dit import HunyuanVideoDiT

    with torch.device("meta"):
        dit = HunyuanVideoDiT(dit_config)
    names = list(target_modules(dit, exclude=()))
    for key, patterns in (("include_patterns", include), ("exclude_patterns", exclude)):
        for pattern in patterns:
            if not any(re.fullmatch(pattern, n) for n in names):
                wider = sum(bool(re.fullmatch(f".*(?:{pattern}).*", n)) for n in names)
                logger.warning("--network_args %s: %r matches no module (a pattern matches a module's whole name, such as %s)%s",
                               key, pattern, names[0], f"; '.*{pattern}.*' would match {wider}" if wider else "")
    if not target_modules(dit, include, [*exclude, DEFAULT_EXCLUDE]):
        raise UserError("--network_args: the include/exclude patterns leave no Linear layer of the DiT for the LoRA")


def create_arch_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoders,
                        unet: nn.Module, neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    return LoRANetwork(unet, multiplier, network_dim or 4, network_alpha, dropout=neuron_dropout, **_parse_network_args(kwargs))


create_network = create_arch_network  # the name LyCORIS-style loaders look for


def create_arch_network_from_weights(multiplier: float, weights_sd: dict[str, torch.Tensor], unet: nn.Module | None = None,
                                     for_inference: bool = False, **kwargs) -> LoRANetwork:
    """A network with exactly the modules, ranks and alphas of a kohya-named state dict, weights loaded."""
    per_module = {key.partition(".")[0]: {"rank": t.shape[0]} for key, t in weights_sd.items() if key.endswith(".lora_down.weight")}
    return network_from_weights(LoRAModule, per_module, multiplier, weights_sd, unet, **kwargs)


# the entry that marks each kind of module in a kohya-named file, and the --network_module that trains it
NETWORK_MODULES = {"LoRAModule": ("lora_down.weight", "networks.lora"), "LoHaModule": ("hada_w1_b", "networks.loha"),
                   "LoKrModule": ("lokr_w1", "networks.lokr")}


def require_module_kind(source: str, weights_sd: dict[str, torch.Tensor], module_class: type[AdapterModule] | str) -> None:
    """A file of LoHa modules cannot start a LoRA network, and so on: say which --network_module it needs."""
    own_entry, own_module = NETWORK_MODULES[module_class if isinstance(module_class, str) else module_class.__name__]
    if any(k.endswith("." + own_entry) for k in weights_sd):
        return
    for entry, module in NETWORK_MODULES.values():
        if any(k.endswith("." + entry) for k in weights_sd):
            raise UserError(f"{source}: its modules are {module.split('.')[1]} modules ({entry}), not {own_module.split('.')[1]}: "
                            f"use --network_module {module}")


def check_weights_fit(source: str, weights_sd: dict[str, torch.Tensor], network_module: str, rank: int) -> None:
    """Before any model loads: a --network_weights file (not --dim_from_weights) holds modules of --network_module's
    kind, of rank --network_dim. (A LoKr module's shapes depend on its factor too: checked when the network is built.)"""
    kind = next((cls for cls, (_, module) in NETWORK_MODULES.items() if module == network_module.removeprefix("musubi_tuner.")), None)
    if kind is None:  # a module of another package: its own loading says
        return
    require_module_kind(source, weights_sd, kind)
    if kind == "LoKrModule":
        return
    entry = NETWORK_MODULES[kind][0]  # (rank, in) for LoRA's down and LoHa's w1_b
    ranks = sorted({t.shape[0] for k, t in weights_sd.items() if k.endswith("." + entry)})
    if ranks and ranks != [rank]:
        fix = f"give --network_dim {ranks[0]}, or --dim_from_weights" if len(ranks) == 1 else "build the network from the file with --dim_from_weights"
        raise UserError(f"{source}: its modules have rank {'/'.join(map(str, ranks))}, and --network_dim is {rank}: {fix}")


def require_fits(file, weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], every: bool = False) -> None:
    """Refuse `file` when a module of its kohya-named `weights` (a network's) does not fit the Linear layer of that name
    (`shapes`: kohya module name -> the layer's weight shape), in `Patch.misfit`'s words, as merging says it; with
    `every`, also when a module names no layer in `shapes` (a network built from the file: --dim_from_weights)."""
    from musubi_tuner.networks.lora_reader import parse_lora

    for patch in parse_lora(weights).patches:
        shape = shapes.get(lora_name(patch.module))
        if shape is None and every:
            raise UserError(f"{file}: {patch.keys[0]}: module {patch.module} is no Linear layer of this DiT (a LoRA for another "
                            "model?)")
        if shape is not None and (misfit := patch.misfit(shape, "the DiT")):
            raise UserError(f"{file}: {misfit}")


def network_from_weights(module_class: type[AdapterModule], per_module: dict[str, dict], multiplier: float,
                         weights_sd: dict[str, torch.Tensor], unet: nn.Module, **kwargs) -> LoRANetwork:
    """The network of `module_class` modules a kohya-named state dict holds, weights loaded: `per_module` gives each
    module's shape arguments (its rank, ...), its `.alpha` entry its alpha (none: alpha = rank, a scale of 1).
    `kwargs` are --network_args; the file decides the modules, so include/exclude patterns do not apply."""
    require_module_kind("--network_weights", weights_sd, module_class)
    for name, spec in per_module.items():
        alpha = weights_sd.get(f"{name}.alpha")
        spec["alpha"] = None if alpha is None else float(alpha)
    opts = {k: v for k, v in _parse_network_args(kwargs).items() if k not in ("include_patterns", "exclude_patterns")}
    network = LoRANetwork(unet, multiplier, per_module=per_module, module_class=module_class, **opts)
    network.load_state_dict({k: v for k, v in weights_sd.items() if k.partition(".")[0] in per_module}, strict=False)
    return network
