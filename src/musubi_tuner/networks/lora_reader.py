"""One reading path for every HunyuanVideo LoRA file this ecosystem writes: the file's entries as patches of the
official DiT's parameters, each with its documented math.

Entries understood, for a module named in any naming of `lora_naming` (kohya with official or ComfyUI module
names, `diffusion_model.` / `transformer.` prefixes, diffusers/PEFT with its fused q/k/v):

| entry | patch | math at multiplier m |
| --- | --- | --- |
| up/down pair (`lora_up/lora_down`, `lora_B/lora_A`, `_lora.up/down`, `.lora.up/down`, `lora_linear_layer.up/down`) | lora | W += m * (up @ down) * alpha / rank, reshaped to W (conv LoRAs) |
| `.alpha` | the pair's alpha | (rank if absent; PEFT's `lora_alpha` / `alpha_pattern` / `use_rslora` from the file's metadata or `adapter_config.json`: `PeftScales`) |
| `.diff`, `.w_norm` | diff | W += m * diff |
| `.diff_b`, `.b_norm` | diff_b | b += m * diff_b |
| `.set_weight` | set | W = set_weight (whatever m, as ComfyUI does) |
| `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` | loha | W += m * ((w1_a @ w1_b) * (w2_a @ w2_b)) * alpha / rank |
| `.lokr_w1` (or `_a`/`_b`), `.lokr_w2` or `.lokr_w2_a`/`_b` | lokr | W += m * kron(w1, w2) * alpha / rank (1 with a whole w2) |

Any other entry (Tucker cores, DoRA scales, GLoRA, a key naming no layer, a pair whose ranks disagree, two updates
of one weight) is a `Problem`: `LoRAContents.require_whole` refuses the file naming it, or with `allow_partial` warns and
lists what is dropped. Non-finite tensors and a diverged training's updates are always refused (`check_usable`), and so, by every reading of a file, are
integer or bool weights and an alpha that is not one real number (`check_entry_types`). `read_lora`, the reading of
everything that applies or converts a file (merging, generation, training from a LoRA, convert_lora), also refuses a
file whose metadata names another model family (`check_model`): Flux.1 LoRAs have HunyuanVideo's layer names and widths.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.files import StateDictFile
from musubi_tuner.networks.lora_metadata import OURS, other_model
from musubi_tuner.tomlio import loads_json
from musubi_tuner.networks.lora_naming import (
    DIFFUSERS_PREFIXES, KOHYA_PREFIX, OTHER_PREFIXES, diffusers_to_official, module_path_to_kohya, module_template, official_module,
)

logger = logging.getLogger(__name__)
_SAID: set[str] = set()  # the warnings warn_once has said


def warn_once(message: str, *args) -> None:
    """A warning about a file, said once by a process that reads the file several times (training's checks before the
    models load, then the loading: --allow_partial_lora's list of what it drops was said twice, fuzz_ay 7)."""
    text = message % args
    if text not in _SAID:
        _SAID.add(text)
        logger.warning("%s", text)

# entry suffix -> role, longest first where one ends another
_PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"), (".lora_B.default.weight", ".lora_A.default.weight"), (".lora_B.weight", ".lora_A.weight"),
    ("_lora.up.weight", "_lora.down.weight"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora.up.weight", ".lora.down.weight"), (".lora_B", ".lora_A"),
)
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_ROLES = {**{up: "up" for up, _ in _PAIR_SUFFIXES}, **{down: "down" for _, down in _PAIR_SUFFIXES},
          ".alpha": "alpha", ".diff": "diff", ".w_norm": "diff", ".diff_b": "diff_b", ".b_norm": "diff_b", ".set_weight": "set",
          **{f".{f}": f for f in LOHA_FACTORS + LOKR_FACTORS}}
# entries of adapters other programs write that we do not apply: suffix -> what they are
_UNSUPPORTED = {".dora_scale": "a DoRA scale", ".lora_magnitude_vector": "a DoRA magnitude (PEFT's use_dora)",
                ".lora_magnitude_vector.weight": "a DoRA magnitude (PEFT's use_dora)", ".lora_mid.weight": "a LoCon/Tucker middle factor", ".reshape_weight": "a weight reshape",
                ".lora_B.bias": "a LoRA bias", **{s: "a LoHa/LoKr Tucker core (of a convolution)" for s in (".hada_t1", ".hada_t2", ".lokr_t2")},
                **{s: "a GLoRA factor" for s in (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")}}
_SUFFIXES = sorted([*_ROLES, *_UNSUPPORTED], key=len, reverse=True)
ADAPTERS = ("lora", "loha", "lokr")  # the kinds that are a low-rank update of a weight (one per weight)
NAMINGS = ("kohya", "other", "diffusers")


def alpha_or_rank(alpha: float | None, rank: int) -> float:
    """The alpha a LoRA module acts with: a missing alpha, or 0, means the rank (scale 1), as musubi-tuner and kohya's
    LoRA modules read it."""
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


@dataclass
class Patch:
    """One change a LoRA file makes to one parameter of the official DiT."""

    module: str  # official module path, e.g. double_blocks.0.img_attn_qkv
    kind: str  # "lora", "loha", "lokr", "diff", "diff_b" or "set"
    keys: tuple[str, ...]  # the file's keys it was read from
    up: torch.Tensor | None = None  # lora: (out, rank) (or a conv layout of it)
    down: torch.Tensor | None = None  # lora: (rank, in) (or (rank, in, *kernel))
    alpha: float | None = None  # lora, loha, lokr: None means alpha = rank
    tensor: torch.Tensor | None = None  # diff / diff_b / set
    factors: dict[str, torch.Tensor] | None = None  # loha: hada_w1_a ...; lokr: lokr_w1 and lokr_w2 or lokr_w2_a, lokr_w2_b

    @property
    def param(self) -> str:
        return f"{self.module}.{'bias' if self.kind == 'diff_b' else 'weight'}"

    @property
    def rank(self) -> int | None:
        """A LoRA's or LoHa's rank, a low-rank LoKr's w2 rank; None for a LoKr with a full w2."""
        if self.kind == "loha":
            return self.factors["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            return self.factors["lokr_w2_a"].shape[1] if "lokr_w2_a" in self.factors else None
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank (1 for a LoKr with a full w2, as musubi-tuner and ComfyUI have it)."""
        if self.rank is None:
            return 1.0
        return alpha_or_rank(self.alpha, self.rank) / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """(out, in) of an adapter (in counts a convolution's kernel); a diff's or set's own shape."""
        if self.kind == "lora":
            return (self.up.shape[0], self.down.flatten(1).shape[1])
        if self.kind == "loha":
            return (self.factors["hada_w1_a"].shape[0], self.factors["hada_w1_b"].shape[1])
        if self.kind == "lokr":
            (out1, in1), (out2, in2) = self.factors["lokr_w1"].shape, self._w2_shape()
            return (out1 * out2, in1 * in2)
        return tuple(self.tensor.shape)

    def misfit(self, shape, dit_name: str) -> str | None:
        """Why the patch does not fit a parameter of `shape` in the DiT `dit_name`, in words, or None when it fits. A
        convolution LoRA's update is shown in the parameter's own rank, not as the (out, in x kernel) it is multiplied
        in; an img_in LoRA of the other task (T2V 16 input channels, I2V 32) is said to be one."""
        from musubi_tuner.hunyuan.config import task_of

        if self.fits(shape):
            return None
        shape = tuple(shape)
        shown = (self.up.shape[0], *self.down.shape[1:]) if self.kind == "lora" and self.down.dim() > 2 else self.shape
        cause = "a LoRA for another model size?"
        kernel = math.prod(shape[2:])
        # an adapter's in counts the kernel; a diff's or set's shape is the parameter's own (fuzz_aw 4)
        channels = (self.shape[1] // kernel if self.shape[1] % kernel == 0 else None) if self.kind in ADAPTERS else self.shape[1]
        if self.module == "img_in.proj" and len(shape) == 5 and self.shape[0] == shape[0] and channels:
            task, other = task_of(channels), task_of(shape[1])
            cause = (f"an img_in LoRA of {_article(task)} {task} DiT ({channels} input channels) cannot apply to "
                     f"{_article(other)} {other} DiT ({shape[1]})")
        return f"{self.module} is {list(shown)} in the LoRA but {list(shape)} in {dit_name} ({cause})"

    def _w2_shape(self) -> tuple[int, int]:
        f = self.factors
        return tuple(f["lokr_w2"].shape) if "lokr_w2" in f else (f["lokr_w2_a"].shape[0], f["lokr_w2_b"].shape[1])

    def fits(self, shape) -> bool:
        shape = tuple(shape)
        if self.kind in ADAPTERS:
            return len(shape) >= 2 and self.shape == (shape[0], math.prod(shape[1:]))
        return self.shape == shape

    def factors_2d(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA's (up (out, rank), down (rank, in)) in float32, 2-D."""
        return self.up.float().flatten(1), self.down.float().flatten(1)

    def delta(self, shape, device=None) -> torch.Tensor:
        """The float32 update at multiplier 1 to a parameter of `shape`, computed on `device`: (up @ down) * alpha / rank,
        LoHa's or LoKr's (networks.lycoris_math), or the diff."""
        from musubi_tuner.networks.lycoris_math import loha_delta, lokr_delta

        if self.kind == "lora":
            up, down = self.factors_2d()
            return ((up.to(device) @ down.to(device)) * self.scale).reshape(shape)
        f = {k: v.to(device, torch.float32) for k, v in (self.factors or {}).items()}
        if self.kind == "loha":
            return loha_delta(*(f[k] for k in LOHA_FACTORS), self.scale).reshape(shape)
        if self.kind == "lokr":
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
            return lokr_delta(f["lokr_w1"], w2, self.scale).reshape(shape)
        return self.tensor.to(device, torch.float32).reshape(shape)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou8" else "a"


@dataclass
class Problem:
    keys: list[str]
    message: str  # says why, without the file name


@dataclass
class LoRAContents:
    source: str
    patches: list[Patch]
    problems: list[Problem] = field(default_factory=list)
    naming: str = "unknown"  # "kohya", "other", "diffusers", "mixed" or "unknown"
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the file's tensors as stored

    @property
    def dropped(self) -> list[str]:
        return [k for p in self.problems for k in p.keys]

    def require_whole(self, allow_partial: bool = False) -> "LoRAContents":
        """Refuse a file with entries we cannot apply (naming the first); with `allow_partial`, warn and list them."""
        self.require_some()
        if not self.problems:
            return self
        first = self.problems[0]
        if not allow_partial:
            more = f" ({len(self.dropped)} entries cannot be applied)" if len(self.dropped) > len(first.keys) else ""
            raise UserError(f"{self.source}: {first.keys[0]}: {first.message}{more}; "
                            "--allow_partial_lora applies the rest and lists what it drops")
        lines = [f"{k}: {p.message}" for p in self.problems for k in p.keys]
        warn_once("%s: --allow_partial_lora drops %d entries:\n  %s", self.source, len(lines), "\n  ".join(lines))
        return self

    def require_some(self) -> "LoRAContents":
        """Refuse a file with nothing a LoRA of this model holds (a DiT checkpoint, an empty file, another model's LoRA)."""
        if not self.patches:
            raise UserError(self._nothing_applies())
        return self

    def _nothing_applies(self) -> str:
        foreign = [p for p in self.problems if p.message.startswith("names no layer")]
        if foreign and len(foreign) == len(self.problems):
            module = _module_name(foreign[0].keys[0])
            return f"{self.source}: a LoRA for another model: its module {module!r} names no layer of the HunyuanVideo DiT"
        if self.problems:
            return f"{self.source}: nothing in it can be applied: {self.problems[0].keys[0]}: {self.problems[0].message}"
        return f"{self.source}: holds no LoRA entries"

    def select(self, keep) -> list[Patch]:
        """The patches whose module `keep` accepts (a --lora_blocks filter), or all when keep is None."""
        return [p for p in self.patches if keep is None or keep(p.module)]


def _module_name(key: str) -> str:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


# ----------------------------------------------------------------------------------------------- reading


def read_lora(path: str | os.PathLike, allow_partial: bool = False) -> LoRAContents:
    """A LoRA file's patches, refused (UserError naming the file and entry) unless it is HunyuanVideo's (`check_model`)
    and every entry applies, is finite and is not a diverged training's (`check_usable`)."""
    contents = read_lora_contents(path)
    check_model(contents.source, contents.metadata)
    check_usable(contents.source, contents)
    return contents.require_whole(allow_partial)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata exactly as stored, refused (UserError naming the file and entry) when an entry cannot be what
    its name says (`check_entry_types`). Every reading of a LoRA file goes through here: merging, generation, training
    from a LoRA, convert_lora, the post-hoc EMA, lora_info and the doctor."""
    f = StateDictFile(path, what="LoRA file")
    weights = f.load_all()
    check_entry_types(str(path), weights)
    return weights, dict(f.metadata)


def check_entry_types(source: str, weights: dict[str, torch.Tensor]) -> None:
    """Every LoRA entry (a name this reader knows: pairs, LoHa / LoKr factors, diffs, set_weights, and the entries it
    knows but does not apply) holds floating-point values (fp8 included), and every `.alpha` is one real number (any
    integer or float type). Integer or bool weights are what a damaged or foreign file holds: cast to integers, the
    trained values (|w| < 1) are zeros, and the LoRA would silently do nothing."""
    for key, t in weights.items():
        split = _split_entry(key)
        if split is None:
            continue  # not named as a LoRA entry: parse_lora reports it
        if _ROLES.get(split[1]) == "alpha":
            if t.dtype == torch.bool or t.is_complex():
                raise UserError(f"{source}: {key}: a {_dtype_name(t)} alpha; an alpha is one real number (a damaged or foreign file: "
                                "re-save the LoRA from its source)")
            if t.numel() != 1:
                raise UserError(f"{source}: {key}: its alpha holds {t.numel()} values, not one (shape {list(t.shape)}; a damaged "
                                "file: re-save the LoRA from its source)")
        elif not t.is_floating_point():
            raise UserError(f"{source}: {key}: {_dtype_name(t)} weights; a LoRA holds floating-point tensors (a damaged or foreign "
                            "file: re-save the LoRA from its source)")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def read_lora_contents(path: str | os.PathLike) -> LoRAContents:
    """A LoRA file's patches and problems, without refusing anything (what info and the doctor show)."""
    weights, metadata = read_lora_file(path)
    return parse_lora(weights, metadata, str(path), peft_config(path, weights, metadata))


PROBES = 8  # random vectors per parameter: one alone met a cancellation (1.08 % apart for a pair 0.2 % apart: fuzz_ad F3)


def same_update(a: LoRAContents, b: LoRAContents, tolerance: float | None = None) -> bool:
    """Whether two files change the same parameters alike (to the rounding of their stored weights and a folded alpha):
    the pair a `--lora_format both` training writes is one LoRA in two namings, and a file only named like its companion
    is not. Each parameter's change is compared through PROBES random probes (its update times a vector), which form no
    update for a LoRA pair. `tolerance` (relative): by default 1 %, or four of the coarsest stored dtype's steps (3 % for
    bfloat16, whose folded copy rounds the factors again)."""
    if tolerance is None:
        stored = [t.dtype for c in (a, b) for t in c.tensors.values() if t.is_floating_point()]
        tolerance = min(0.1, max([1e-2, *(4 * torch.finfo(d).eps for d in stored)]))

    def probes(contents: LoRAContents) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for patch in contents.patches:
            if patch.kind in ("diff_b", "set"):
                probe = patch.tensor.double().flatten()
            else:
                columns = math.prod(patch.shape[1:])
                v = torch.randn(columns, PROBES, generator=torch.Generator().manual_seed(columns), dtype=torch.float64)
                if patch.kind == "lora":
                    up, down = (t.double().flatten(1) for t in (patch.up, patch.down))
                    probe = (up @ (down @ v)).flatten() * patch.scale
                else:
                    probe = (patch.delta(patch.shape).double().flatten(1) @ v).flatten()
            out[patch.param] = out[patch.param] + probe if patch.param in out else probe
        return out

    pa, pb = probes(a), probes(b)
    if pa.keys() != pb.keys():
        return False
    return all(pa[k].shape == pb[k].shape and bool((pa[k] - pb[k]).norm() <= tolerance * max(pa[k].norm(), pb[k].norm()) + 1e-12)
               for k in pa)


def check_model(source: str, metadata: dict[str, str]) -> None:
    """Refuse a LoRA whose metadata names another model family (networks.lora_metadata.other_model)."""
    other = other_model(metadata)
    if other is not None:
        raise UserError(f"{source}: a LoRA for {other}, not for HunyuanVideo: applied, it would make a wrong video"
                        + (" (Flux.1's layers have HunyuanVideo's names and widths, so only the metadata tells)"
                           if other.model == "Flux" else ""))


def check_usable(source: str, contents: LoRAContents) -> None:
    """Refuse a LoRA holding NaN/inf, or whose update is a diverged training's (`diverged`)."""
    bad = first_non_finite(contents.tensors)
    if bad is not None:
        raise UserError(f"{source}: {non_finite_words(bad, contents.tensors[bad])} (a diverged training?): this LoRA cannot be applied")
    too_large = diverged(contents.patches)
    if too_large is not None:
        raise UserError(f"{source}: {too_large}: this LoRA cannot be applied")


# A trained LoRA moves each weight of the DiT (whose weights are well below 1) by a small fraction of it. An update past
# this, per weight, is a diverged training's (a learning rate far too high): applied, it turns the output to noise or
# NaN, so every reader refuses it as it refuses NaN. Finite values of 1e30 were saved, and called good.
DIVERGED_UPDATE = 1e3


def diverged(patches: list[Patch]) -> str | None:
    """The first patch whose largest change to one weight (at multiplier 1) is past DIVERGED_UPDATE, in words."""
    for patch in patches:
        largest = largest_update(patch)
        if not largest <= DIVERGED_UPDATE:  # (NaN too: factors whose product overflowed, inf x 0)
            size = f"{largest:.3g}" if math.isfinite(largest) else "past float32's range (3.4e+38)"
            return (f"{patch.module}: its update reaches {size} per weight, where a trained LoRA's stays well below 1 "
                    f"(a diverged training)")
    return None


def largest_update(patch: Patch) -> float:
    """The largest change `patch` makes to one weight at multiplier 1 (a set_weight: none). Formed only when a bound
    from its factors' row and column norms (Cauchy-Schwarz) is past DIVERGED_UPDATE: a bound below it is the answer's
    upper limit, cheaply."""
    if patch.kind == "set":
        return 0.0
    bound = _update_bound(patch)
    if bound <= DIVERGED_UPDATE:
        return bound
    return patch.delta(patch.shape).abs().max().item()


def _update_bound(patch: Patch) -> float:
    def rows(t: torch.Tensor) -> float:  # largest row norm
        return t.float().flatten(1).norm(dim=1).max().item() if t.numel() else 0.0

    def cols(t: torch.Tensor) -> float:  # largest column norm
        return t.float().flatten(1).norm(dim=0).max().item() if t.numel() else 0.0

    f = patch.factors or {}
    if patch.kind == "lora":
        up, down = patch.factors_2d()
        return abs(patch.scale) * rows(up) * cols(down)
    if patch.kind == "loha":
        return abs(patch.scale) * rows(f["hada_w1_a"]) * cols(f["hada_w1_b"]) * rows(f["hada_w2_a"]) * cols(f["hada_w2_b"])
    if patch.kind == "lokr":
        w2 = f["lokr_w2"].float().abs().max().item() if "lokr_w2" in f else rows(f["lokr_w2_a"]) * cols(f["lokr_w2_b"])
        return abs(patch.scale) * f["lokr_w1"].float().abs().max().item() * w2
    return patch.tensor.float().abs().max().item() if patch.tensor.numel() else 0.0


def first_non_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The first key whose values are NaN or inf in float32, where every program applies a LoRA: a float64 value past
    float32's range is inf there (fp8 has no isfinite of its own either)."""
    for key, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t if t.dtype == torch.float32 else t.float()).all()):
            return key
    return None


def past_float32(tensor: torch.Tensor) -> bool:
    """`first_non_finite` found no NaN or inf in `tensor`, but float64 values that float32 cannot hold."""
    return tensor.dtype == torch.float64 and bool(torch.isfinite(tensor).all())


def non_finite_words(key: str, tensor: torch.Tensor) -> str:
    """What `first_non_finite` found in `tensor`, in words."""
    if past_float32(tensor):
        return f"{key} holds values up to {tensor.abs().max().item():.3g}, past float32's range (3.4e+38), in which LoRAs are applied"
    return f"{key} holds NaN or infinite values"


PEFT_LAYOUT = "base_model.model."  # the key prefix of PEFT's save_pretrained, whose alphas are in adapter_config.json only


def peft_config(path: str | os.PathLike, weights=(), metadata=None) -> dict | None:
    """The `adapter_config.json` PEFT (and diffusion-pipe) save beside `adapter_model.safetensors`, if there is one, as
    JSON (`PeftScales.read` reads its values); beside a file of PEFT's layout (`weights`' keys) of any name too: a
    renamed adapter was applied at alpha = rank with its config beside it (fuzz_an 6).

    Never for a file this toolkit wrote (its `metadata` holds `musubi_tuner.*` keys: convert_lora's output, the
    trainer's LoRA and `.comfyui` copy, a post-hoc EMA): it carries its own scale (folded into its factors, in `.alpha`
    entries, or in `lora_adapter_metadata`), and the config beside it, of the adapter it was made from, scaled it
    twice (fuzz_aw 3)."""
    path = Path(path)
    config = path.parent / "adapter_config.json"
    ours = path.name.startswith("adapter_model") or any(k.startswith(PEFT_LAYOUT) for k in weights)
    if not ours or any(k.startswith(OURS) for k in metadata or {}) or not config.is_file():
        return None
    try:
        return loads_json(config.read_text())
    except (OSError, ValueError) as e:  # (loads_json: syntax, a key given twice, a huge integer, deep nesting)
        raise UserError(f"{config}: unreadable ({e}); it holds the LoRA's lora_alpha, without which its scale is unknown: "
                        "fix or restore the file") from None


@dataclass(frozen=True)
class PeftScales:
    """What a PEFT adapter's config says of its modules' scales, as PEFT's LoRA layers compute them: lora_alpha / r, or
    lora_alpha / sqrt(r) with `use_rslora`; the alpha is the first `alpha_pattern` entry that matches the end of the
    module's path (PEFT's get_pattern_key), else `lora_alpha`. r is the module's rank in the file (which PEFT's `r` and
    `rank_pattern` made). Without a lora_alpha the scale is 1 (alpha = rank), as for any LoRA file without alphas.

    A LoHa or LoKr config (`peft_type` LOHA / LOKR) keeps its alpha as `alpha`, and PEFT's LoHa and LoKr layers scale
    every module by alpha / r, r being `rank_pattern`'s or `r` (PEFT's defaults 8 and 8 where the config has none): for a
    LoKr with a whole w2 too, whose file shows no rank (`lycoris_scale`)."""

    lora_alpha: float | None = None
    alpha_pattern: tuple[tuple[re.Pattern, float], ...] = ()
    use_rslora: bool = False
    lycoris_alpha: float | None = None  # a LoHa / LoKr config's `alpha` (None: the config is no LoHa / LoKr one)
    r: int = 8
    rank_pattern: tuple[tuple[re.Pattern, int], ...] = ()

    @classmethod
    def read(cls, metadata: dict[str, str], config, source: str) -> "PeftScales":
        """The scales of diffusers' `lora_adapter_metadata` (keys `transformer.lora_alpha`, ...) or else of the
        adapter_config.json beside the file (`config`, its JSON); a value of the wrong type, a pattern that is no regular
        expression, or a NaN / infinite alpha is refused naming the file and the key."""
        raw = metadata.get("lora_adapter_metadata")
        if raw:
            where, prefix = f"{source}: metadata lora_adapter_metadata", "transformer."
            try:
                config = loads_json(raw)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({e}); it holds the LoRA's lora_alpha, without which its scale is "
                                "unknown") from None
        else:
            where, prefix = str(Path(source).parent / "adapter_config.json"), ""
        if config is None:
            return cls()
        if not isinstance(config, dict):
            raise UserError(f"{where}: a JSON {type(config).__name__}, not an object of PEFT's LoRA settings")

        def get(key: str):
            name = prefix + key if prefix + key in config else key  # diffusers' prefixed key, or PEFT's own
            return name, config.get(name)

        def patterns(key: str, number) -> tuple[tuple[re.Pattern, float], ...]:
            name, pattern = get(key)
            if pattern is not None and not isinstance(pattern, dict):
                raise UserError(f"{where}: {name} is a JSON {type(pattern).__name__}, not an object of module pattern -> "
                                f"{key.removesuffix('_pattern')}")
            out = []
            for k, value in (pattern or {}).items():
                try:
                    re.compile(k)  # alone first: an error's position is then the key's own
                    rx = re.compile(rf"(?:.*\.)?(?:{k})")
                except re.error as e:
                    raise UserError(f"{where}: {name} {k!r} is not a regular expression ({e})") from None
                out.append((rx, number(value, where, f"{name} {k!r}")))
            return tuple(out)

        name, alpha = get("lora_alpha")
        alpha = None if alpha is None else _peft_number(alpha, where, name)
        alpha_pattern = patterns("alpha_pattern", _peft_number)
        name, rslora = get("use_rslora")
        if rslora is not None and not isinstance(rslora, bool):
            raise UserError(f"{where}: {name} = {json.dumps(rslora)} is not true or false")
        if str(get("peft_type")[1]).upper() not in ("LOHA", "LOKR"):
            return cls(alpha, alpha_pattern, bool(rslora))
        name, lycoris_alpha = get("alpha")
        lycoris_alpha = 8.0 if lycoris_alpha is None else _peft_number(lycoris_alpha, where, name)
        name, r = get("r")
        r = 8 if r is None else _peft_rank(r, where, name)
        return cls(alpha, alpha_pattern, bool(rslora), lycoris_alpha, r, patterns("rank_pattern", _peft_rank))

    def alpha(self, path: str, rank: int) -> float | None:
        """The alpha that gives a module (its PEFT path, its rank) PEFT's scale as alpha / rank; None: alpha = rank."""
        alpha = next((a for rx, a in self.alpha_pattern if rx.fullmatch(path)), self.lora_alpha)
        if alpha is None or not self.use_rslora:
            return alpha
        return alpha * math.sqrt(rank)  # PEFT's rsLoRA scale alpha / sqrt(r), as alpha' / r

    def lycoris_scale(self, path: str) -> float | None:
        """PEFT's scale alpha / r of a LoHa or LoKr module (its PEFT path), or None when the config is no LoHa / LoKr one."""
        if self.lycoris_alpha is None:
            return None
        alpha = next((a for rx, a in self.alpha_pattern if rx.fullmatch(path)), self.lycoris_alpha)
        return alpha / next((r for rx, r in self.rank_pattern if rx.fullmatch(path)), self.r)


def _peft_number(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: {key} = {json.dumps(value)} is not a number")
    if not math.isfinite(value):
        raise UserError(f"{where}: {key} = {value} is not a finite number: this LoRA cannot be applied")
    if value == 0:  # PEFT's scale alpha / r is 0; a kohya alpha of 0 means the rank: no file of ours can say "nothing"
        raise UserError(f"{where}: {key} = 0: PEFT and diffusers apply these modules at scale 0, that is not at all, where "
                        "kohya's readers (musubi-tuner, ComfyUI) take an alpha of 0 as the rank, at full strength; set the "
                        "alpha the LoRA was trained with, or leave the file out")
    return float(value)


def _peft_rank(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: {key} = {json.dumps(value)} is not a positive whole number (PEFT's rank)")
    return value


def _split_entry(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


@dataclass
class _Entry:
    """The keys of one module name of the file, by role."""

    naming: str
    module: str  # official module
    part: int | None  # which fused part (diffusers q/k/v/mlp), None for a whole layer
    peft_path: str  # the module's path as PEFT names it (for alpha_pattern)
    keys: dict[str, str] = field(default_factory=dict)  # role -> key


def _resolve(name: str) -> tuple[str, str, int | None, str] | None:
    """(naming, official module, part, PEFT module path) for a module name of a file, None if it names no layer."""
    official = official_module(name)
    if official is not None:
        naming = "kohya" if name.startswith(KOHYA_PREFIX) else "other"
        return naming, official, None, next((name[len(p):] for p in OTHER_PREFIXES if name.startswith(p)), name)
    for prefix in DIFFUSERS_PREFIXES:
        if name.startswith(prefix):
            target = diffusers_to_official(name[len(prefix):])
            if target is not None:
                return "diffusers", target[0], target[1], name[len(prefix):]
    return None


def parse_lora(weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, source: str = "LoRA",
               adapter_config: dict | None = None, mlp_hidden: int | None = None, say: bool = True) -> LoRAContents:
    """A state dict in any naming -> patches of the official DiT (see the module docstring), and what cannot be applied.
    `say`: what the file's scale leaves unknown is said (not by a reading of its tensors alone, such as the doctor's
    model of a consumer, which said of a PEFT folder's adapter that its adapter_config.json was missing: fuzz_aw 11)."""
    metadata = metadata or {}
    problems: list[Problem] = []
    entries: dict[str, _Entry] = {}
    if weights and not any(_split_entry(k) for k in weights):
        from musubi_tuner.hunyuan.model_kinds import what_weights_are

        sample = ", ".join(list(weights)[:4])
        other = what_weights_are(list(weights))
        problems.append(Problem(list(weights), "not a HunyuanVideo LoRA in any naming we know (kohya lora_unet_*, "
                                               f"diffusion_model.*.lora_A/B, diffusers transformer.*); first keys: {sample}"
                                               + (f"; this is {other}" if other else "")))
        return LoRAContents(source, [], problems, "unknown", metadata, weights)
    for key in weights:
        split = _split_entry(key)
        if split is None:
            problems.append(Problem([key], "not a LoRA entry (no lora_up/lora_down, lora_A/lora_B, alpha, diff, diff_b or set_weight)"))
            continue
        name, suffix = split
        if suffix in _UNSUPPORTED:
            problems.append(Problem([key], f"{_UNSUPPORTED[suffix]}, which this toolkit does not apply"))
            continue
        resolved = _resolve(name)
        if resolved is None:
            problems.append(Problem([key], "names no layer of the HunyuanVideo DiT"))
            continue
        entry = entries.setdefault(name, _Entry(*resolved))
        role = _ROLES[suffix]
        if role in entry.keys:
            problems.append(Problem([key], f"a second {role} entry for {name} (beside {entry.keys[role]})"))
            continue
        entry.keys[role] = key
    scales = PeftScales.read(metadata, adapter_config, source)
    peft_keys = [k for k in weights if k.startswith(PEFT_LAYOUT)]
    unscaled = ("lora_alpha" if scales.lora_alpha is None and any(k.endswith("lora_A.weight") for k in peft_keys) else
                "alpha" if scales.lycoris_alpha is None and any(k.endswith((".hada_w1_a", ".lokr_w1", ".lokr_w1_a")) for k in peft_keys)
                else None)  # (LoHa / LoKr: PEFT's LoHaConfig / LoKrConfig name it alpha)
    # (PEFT keeps its lora_alpha out of the file: no reader can know the scale)
    if say and unscaled and not any(k.endswith(".alpha") for k in weights):
        warn_once("%s: PEFT's layout (%s...), whose %s is kept in adapter_config.json, and there is none beside it: applied "
                  "at alpha = rank (scale 1); put its adapter_config.json beside it for PEFT's scale", source, PEFT_LAYOUT, unscaled)
    patches, fused = [], {}
    for name, entry in entries.items():
        for patch in _entry_patches(name, entry, weights, problems, scales):
            if entry.part is None:
                patches.append(patch)
            else:
                fused.setdefault(entry.module, []).append((entry.part, patch))
    for module, parts in fused.items():
        patches += _fuse_parts(module, parts, problems, mlp_hidden)
    patches = _without_conflicts(patches, problems)
    namings = {e.naming for e in entries.values()}
    naming = namings.pop() if len(namings) == 1 else ("mixed" if namings else "unknown")
    return LoRAContents(source, patches, problems, naming, metadata, weights)


def _entry_patches(name: str, entry: _Entry, weights, problems: list[Problem], scales: PeftScales) -> list[Patch]:
    keys, out = entry.keys, []
    if "up" in keys or "down" in keys:
        if "up" not in keys or "down" not in keys:
            have, missing = ("up", "down") if "up" in keys else ("down", "up")
            problems.append(Problem([keys[have]] + ([keys["alpha"]] if "alpha" in keys else []), f"a LoRA {have} weight without its {missing} weight"))
        else:
            up, down = weights[keys["up"]], weights[keys["down"]]
            pair = [keys["up"], keys["down"]] + ([keys["alpha"]] if "alpha" in keys else [])
            if up.ndim < 2 or down.ndim < 2 or up.flatten(1).shape[1] != down.shape[0]:
                problems.append(Problem(pair, f"its up weight {list(up.shape)} and down weight {list(down.shape)} have different "
                                              "ranks (a damaged or mismatched file)"))
            elif down.shape[0] == 0:
                problems.append(Problem(pair, "rank 0: its up and down weights are empty (a damaged file)"))
            elif bad := _bad_alpha(weights, keys):
                problems.append(Problem(pair, bad))
            else:
                alpha = float(weights[keys["alpha"]]) if "alpha" in keys else scales.alpha(entry.peft_path, down.shape[0])
                if _diffusers_norm_out(entry):
                    up = _halves_exchanged(up)
                used = tuple(keys[r] for r in ("down", "up", "alpha") if r in keys)
                out.append(Patch(entry.module, "lora", used, up=up, down=down, alpha=alpha))
    if any(f in keys for f in LOHA_FACTORS + LOKR_FACTORS):
        out += _lycoris_patch(entry, weights, problems, scales)
    elif "alpha" in keys and not ("up" in keys or "down" in keys):
        problems.append(Problem([keys["alpha"]], "an alpha without a LoRA pair"))
    for role in ("diff", "diff_b", "set"):
        if role in keys:
            tensor = weights[keys[role]]
            if _diffusers_norm_out(entry):
                tensor = _halves_exchanged(tensor)
            if entry.part is not None:
                problems.append(Problem([keys[role]], f"a {role} of one part of a fused layer, which this toolkit does not apply"))
            else:
                out.append(Patch(entry.module, role, (keys[role],), tensor=tensor))
    return out


def _diffusers_norm_out(entry: _Entry) -> bool:
    """Whether the entry is diffusers' norm_out.linear, whose output is ordered (scale, shift) where the official
    final_layer.adaLN_modulation.1's is (shift, scale): its update's two halves of rows are exchanged (`_halves_exchanged`)."""
    return entry.module == "final_layer.adaLN_modulation.1" and entry.naming == "diffusers"


def _halves_exchanged(t: torch.Tensor) -> torch.Tensor:
    return torch.cat(t.chunk(2, dim=0)[::-1])


def _bad_alpha(weights, keys: dict[str, str]) -> str | None:
    """Why an entry's alpha cannot be read as its one number, or None (also when it has none)."""
    if "alpha" in keys and (n := weights[keys["alpha"]].numel()) != 1:
        return f"its alpha holds {n} values, not one (a damaged file)"
    return None


def _lycoris_patch(entry: _Entry, weights, problems: list[Problem], scales: PeftScales) -> list[Patch]:
    """A LoHa or LoKr module's patch (LoKr in musubi-tuner's form: w1 whole, w2 whole or as w2_a @ w2_b). Without an
    `.alpha`, a PEFT LoHa / LoKr config's scale (`PeftScales.lycoris_scale`) is the module's; diffusers' norm_out has its
    update's halves exchanged (`_diffusers_norm_out`)."""
    keys = entry.keys
    loha = [f for f in LOHA_FACTORS if f in keys]
    lokr = [f for f in LOKR_FACTORS if f in keys]
    used = [keys[f] for f in loha + lokr] + ([keys["alpha"]] if "alpha" in keys else [])
    t = {f: weights[keys[f]].float() for f in loha + lokr}
    if bad := _bad_alpha(weights, keys):
        return _bad(problems, used, bad)
    alpha = float(weights[keys["alpha"]]) if "alpha" in keys else None
    peft = None if "alpha" in keys else scales.lycoris_scale(entry.peft_path)  # PEFT's alpha / r of the whole update
    if loha and lokr:
        problems.append(Problem(used, "LoHa and LoKr factors for one layer (a damaged file)"))
        return []
    if entry.part is not None:
        problems.append(Problem(used, f"a {'LoHa' if loha else 'LoKr'} of one part of a fused layer, which this toolkit does not apply"))
        return []
    if loha:
        missing = [f for f in LOHA_FACTORS if f not in keys]
        if missing:
            return _bad(problems, used, f"a LoHa module without its {', '.join(missing)}")
        if any(v.ndim != 2 for v in t.values()) or not (t["hada_w1_a"].shape[1] == t["hada_w1_b"].shape[0] and
                                                         t["hada_w1_a"].shape == t["hada_w2_a"].shape and t["hada_w1_b"].shape == t["hada_w2_b"].shape):
            return _bad(problems, used, "LoHa factors whose shapes do not fit together: " +
                        ", ".join(f"{f} {list(v.shape)}" for f, v in t.items()))
        if empty := _empty_factors(t, keys, used):
            return _bad(problems, *empty)
        factors = {f: weights[keys[f]] for f in LOHA_FACTORS}
        if _diffusers_norm_out(entry):  # the rows of (w1_a @ w1_b) * (w2_a @ w2_b) are those of w1_a and w2_a
            factors.update({f: _halves_exchanged(factors[f]) for f in ("hada_w1_a", "hada_w2_a")})
        alpha = alpha if peft is None else peft * t["hada_w1_b"].shape[0]
        return [Patch(entry.module, "loha", tuple(used), alpha=alpha, factors=factors)]
    if any(v.ndim != 2 for v in t.values()):
        return _bad(problems, used, "a LoKr factor that is not a matrix (a convolution's; this toolkit applies LoKr to Linear layers)")
    for a, b in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")):
        if a in t and b in t and t[a].shape[1] != t[b].shape[0]:  # (not "without its w2": both are there, fuzz_aw 10)
            return _bad(problems, [keys[a], keys[b]] + [k for k in used if k not in (keys[a], keys[b])],
                        f"its {a} {list(t[a].shape)} and {b} {list(t[b].shape)} have different ranks (a damaged or mismatched file)")
    w1, w1_rank = _lokr_half(t, "lokr_w1")
    w2, w2_rank = _lokr_half(t, "lokr_w2")
    if w1 is None or w2 is None:
        return _bad(problems, used, "a LoKr module without its " + ("w1 (lokr_w1 or lokr_w1_a/_b)" if w1 is None else "w2 (lokr_w2 or lokr_w2_a/_b)"))
    if empty := _empty_factors(t, keys, used):
        return _bad(problems, *empty)
    factors = {"lokr_w1": weights[keys["lokr_w1"]]} if "lokr_w1" in keys else {}
    if w1_rank is not None:  # LyCORIS's w1_a @ w1_b: made whole; its scale is folded in when w2 is whole (ComfyUI's rule)
        factors["lokr_w1"] = w1 * ((alpha or w1_rank) / w1_rank if w2_rank is None else 1.0)
        if w2_rank is None:
            alpha = None
    if w2_rank is None:
        factors["lokr_w2"] = weights[keys["lokr_w2"]]
    else:
        factors.update(lokr_w2_a=weights[keys["lokr_w2_a"]], lokr_w2_b=weights[keys["lokr_w2_b"]])
    if peft is not None:  # PEFT scales kron(w1, w2) by alpha / r whatever the factors: into w1 when w2 shows no rank
        if w2_rank is None:
            factors["lokr_w1"], alpha = w1 * peft, None
        else:
            alpha = peft * w2_rank
    if _diffusers_norm_out(entry):
        rows = factors["lokr_w1"].shape[0]
        if rows % 2 == 0:  # kron(w1, w2)'s first half of rows is kron(w1's first half, w2)
            factors["lokr_w1"] = _halves_exchanged(factors["lokr_w1"])
        elif rows == 1:  # ... or, with one row of w1, kron(w1, w2's first half)
            half = "lokr_w2" if w2_rank is None else "lokr_w2_a"
            factors[half] = _halves_exchanged(factors[half])
        else:
            return _bad(problems, used, f"a LoKr of diffusers' norm_out.linear whose w1 has {rows} rows: its update's (scale, "
                                        "shift) halves cannot be put in the official (shift, scale) order as a LoKr, and "
                                        "this toolkit does not apply it")
    return [Patch(entry.module, "lokr", tuple(used), alpha=alpha, factors=factors)]


def _empty_factors(t: dict[str, torch.Tensor], keys: dict[str, str], used: list[str]) -> tuple[list[str], str] | None:
    """(the keys, the empty factors first, and why) when a LoHa's or LoKr's factors that fit together hold no values (rank
    0, or a w1 of no rows): a damaged file, whose scale alpha / rank and update cannot be formed; None when none is empty."""
    empty = [f for f, v in t.items() if v.numel() == 0]
    if not empty:
        return None
    rank0 = all(v.ndim == 2 and ((f.endswith("_a") and v.shape[1] == 0) or (f.endswith("_b") and v.shape[0] == 0))
                for f, v in t.items() if f in empty)
    named = " and ".join(f"{f} {list(t[f].shape)}" for f in empty)
    why = f"{'rank 0: ' if rank0 else ''}its {named} {'are' if len(empty) > 1 else 'is'} empty (a damaged file)"
    return [keys[f] for f in empty] + [k for k in used if k not in {keys[f] for f in empty}], why


def _lokr_half(t: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor | None, int | None]:
    """(LoKr's w1 or w2, its rank if given as a low-rank product), or (None, None) when the file lacks it (the ranks of
    a product's two factors agree: `_lycoris_patch` said otherwise)."""
    if name in t:
        return t[name], None
    a, b = t.get(f"{name}_a"), t.get(f"{name}_b")
    if a is None or b is None:
        return None, None
    return a @ b, b.shape[0]


def _bad(problems: list[Problem], keys: list[str], message: str) -> list:
    problems.append(Problem(keys, message))
    return []


_PART_NAMES = ("q", "k", "v", "mlp")  # a fused layer's diffusers parts, in their order (lora_naming's table)


def _fuse_parts(module: str, parts: list[tuple[int, Patch]], problems: list[Problem], mlp_hidden: int | None) -> list[Patch]:
    """One exact LoRA of an official fused Linear from the LoRAs of its diffusers parts (q, k, v[, mlp]).

    The fused layer's rows are its parts' outputs stacked, so down = [A_q; A_k; A_v], up = blockdiag(B_q * s_q, ...),
    with each part's scale s folded into its rows (alpha = rank of the result); a missing part's rows stay zero.
    """
    by_part: dict[int, Patch] = {}
    for part, patch in parts:
        if patch.kind != "lora":
            continue
        if part in by_part:  # one part under two prefixes (transformer. and none, or base_model.model.): entries differ by name
            problems.append(Problem(list(patch.keys), f"a second LoRA of the {_PART_NAMES[part]} part of {module} (beside {by_part[part].keys[0]}): "
                                                      "the file names that layer twice"))
            continue
        by_part[part] = patch
    if not by_part:
        return []
    hidden = next(iter(by_part.values())).down.shape[1]
    sizes = [hidden] * 3
    if module.endswith("linear1"):
        sizes.append(by_part[3].up.shape[0] if 3 in by_part else (mlp_hidden or 4 * hidden))
    for part, patch in by_part.items():
        if patch.down.shape[1] != hidden or patch.up.shape[0] != sizes[part]:
            problems.append(Problem(list(patch.keys), f"a part of {module} of shape {list(patch.shape)}, which does not fit its other parts"))
            return []
    rank = sum(p.rank for p in by_part.values())
    down, up = torch.zeros(rank, hidden), torch.zeros(sum(sizes), rank)
    r = 0
    for part in sorted(by_part):
        patch = by_part[part]
        b, a = patch.factors_2d()  # (up, down)
        row = sum(sizes[:part])
        down[r : r + patch.rank] = a
        up[row : row + sizes[part], r : r + patch.rank] = b * patch.scale
        r += patch.rank
    keys = tuple(k for part in sorted(by_part) for k in by_part[part].keys)
    return [Patch(module, "lora", keys, up=up, down=down, alpha=None)]


def _without_conflicts(patches: list[Patch], problems: list[Problem]) -> list[Patch]:
    """Two patches of one kind for one parameter (a file holding two namings of a layer), or a set beside another
    patch of the same weight, cannot both be meant: they are problems."""
    seen: dict[tuple[str, str], Patch] = {}
    sets = {p.param for p in patches if p.kind == "set"}
    kept = []
    for p in patches:
        kind = "adapter" if p.kind in ADAPTERS else p.kind  # a LoRA, LoHa or LoKr: one update of the weight
        if (p.param, kind) in seen:
            other = seen[(p.param, kind)]
            problems.append(Problem(list(p.keys), f"a second {p.kind} of {p.param} (beside {other.keys[0]}): the file names that layer twice"))
            continue
        if p.kind != "set" and p.param in sets:
            problems.append(Problem(list(p.keys), f"a {p.kind} of {p.param}, which the same file also replaces with a set_weight"))
            continue
        seen[(p.param, kind)] = p
        kept.append(p)
    return kept


# ----------------------------------------------------------------------------------------------- writing


def _conv_layout(patch: Patch) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv layer's pair as convolutions (down (rank, in, *kernel), up (out, rank, 1, ...)), which PEFT and kohya LoCon
    write; a Linear's as matrices (up (out, rank), down (rank, in)), also where the file stored it as 1x1 convolutions,
    as some LoCon converters do (a network's Linear modules took them as is: a size-mismatch traceback, fuzz_aw 13)."""
    kernel = module_template(patch.module).kernel
    if not kernel:
        return patch.up.flatten(1), patch.down.flatten(1)
    down = patch.down.reshape(patch.rank, -1, *kernel)
    return patch.up.reshape(patch.up.shape[0], patch.rank, *([1] * len(kernel))), down


_ENTRY_NAMES = {"diff": "diff", "diff_b": "diff_b", "set": "set_weight"}


def kohya_state_dict(patches: list[Patch]) -> dict[str, torch.Tensor]:
    """Patches in our (musubi-tuner's) kohya naming: `lora_unet_<official path>.lora_down.weight`, `.lora_up.weight`,
    `.alpha` (as read; rank when the file had none), `.diff`, `.diff_b`, `.set_weight`; LoHa / LoKr factors
    (`.hada_w1_a`, ..., `.lokr_w1`, ...) and their `.alpha` when the file has one."""
    out: dict[str, torch.Tensor] = {}
    for p in patches:
        name = module_path_to_kohya(p.module)
        if p.kind == "lora":
            up, down = _conv_layout(p)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(alpha_or_rank(p.alpha, p.rank))
        elif p.kind in ADAPTERS:
            out.update(_lycoris_entries(name, p))
        else:
            out[f"{name}.{_ENTRY_NAMES[p.kind]}"] = p.tensor
    return out


def _lycoris_entries(name: str, patch: Patch) -> dict[str, torch.Tensor]:
    """A LoHa's or LoKr's factors under `name.` (`name.hada_w1_a`, ...), and its alpha when it has one: musubi-tuner's
    layout, which its convert_lora.py keeps in the other naming, and which ComfyUI reads in both."""
    out = {f"{name}.{factor}": t for factor, t in patch.factors.items()}
    if patch.alpha is not None:
        out[f"{name}.alpha"] = torch.tensor(float(patch.alpha))
    return out


def folded_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a LoRA factor is written in with alpha / rank folded into it: its own, but bf16 for fp8 (an fp8 factor
    times sqrt(alpha / rank) is no fp8 number: e4m3 would round most of a trained up weight to 0, e5m2 by up to 12%)."""
    return torch.bfloat16 if dtype.is_floating_point and dtype.itemsize == 1 else dtype


def _folded(factor: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """`factor` times `scale` in `folded_dtype(dtype)`, or in float32 where that dtype cannot hold the products: an
    fp16 LoRA of an alpha far above its rank was written with inf, one far below it in fp16's subnormals, 1 % off
    (fuzz_aw 2)."""
    product = factor.float() * scale
    target = folded_dtype(dtype)
    if target == torch.float16 and product.numel():  # (bf16 has float32's range)
        info, nonzero = torch.finfo(target), factor != 0
        # past its range, or a scale that takes values into the subnormals, where they lose their precision (more than
        # a tenth of them that were not there)
        subnormal = lambda t: (t.abs() < info.tiny)[nonzero].float().mean() if nonzero.any() else 0.0  # noqa: E731
        if float(product.abs().max()) > info.max or subnormal(product) - subnormal(factor.float()) > 0.1:
            target = torch.float32
    return product.to(target)


def other_state_dict(patches: list[Patch], prefix: str = "diffusion_model") -> dict[str, torch.Tensor]:
    """Patches in the "other" naming (ComfyUI, diffusers' loader, diffusion-pipe): `<prefix>.<official path>.lora_A.weight`,
    `.lora_B.weight` with alpha / rank folded into both (sqrt of its size each, its sign in B; diffusers reads no alpha), in
    `folded_dtype` of theirs, `.diff`, `.diff_b`, `.set_weight`;
    LoHa / LoKr factors with their `.alpha` (`<prefix>.<official path>.hada_w1_a`, ..., as musubi-tuner converts them)."""
    out: dict[str, torch.Tensor] = {}
    for p in patches:
        name = f"{prefix}.{p.module}"
        if p.kind == "lora":
            up, down = _conv_layout(p)
            # sqrt(|alpha / rank|) into each factor and the sign into B: a negative alpha (kohya's and musubi-tuner's
            # scale is the plain number alpha / rank) flips the update, and a complex root would be cast to zeros
            root = abs(p.scale) ** 0.5
            out[f"{name}.lora_A.weight"] = _folded(down, root, down.dtype)
            out[f"{name}.lora_B.weight"] = _folded(up, math.copysign(root, p.scale), up.dtype)
        elif p.kind in ADAPTERS:
            out.update(_lycoris_entries(name, p))
        else:
            out[f"{name}.{_ENTRY_NAMES[p.kind]}"] = p.tensor
    return out


def kohya_to_other(weights: dict[str, torch.Tensor], prefix: str = "diffusion_model") -> dict[str, torch.Tensor]:
    """A kohya-named state dict (ours, every entry applies) in the "other" naming."""
    return other_state_dict(parse_lora(weights).require_whole().patches, prefix)
