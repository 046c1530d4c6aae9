"""Which noise levels training sees: musubi-tuner's timestep samplers, number for number.

Notation: t in [0, 1] is the noise level (1 = pure noise); noisy = (1 - t) * x0 + t * noise. The model
receives t * 1000 + 1 for every mode except `sigma` (musubi-tuner's convention, kept so a run here and
there train the same thing). `sigma` (the default) draws an integer index and looks up the unshifted
schedule, so `--discrete_flow_shift` does not act in that mode (a musubi-tuner quirk we keep by default:
`--sigma_uses_shift` applies the shift there too).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields

import torch

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.schedule import shift_sigma

SAMPLING_MODES = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "flux2_shift", "qwen_shift", "krea2_shift",
                  "logsnr", "qinglong_flux", "qinglong_qwen")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
NUM_TRAIN_TIMESTEPS = 1000
_NORMAL_DRAWS = ("sigmoid", "shift", "flux_shift", "flux2_shift", "qwen_shift", "krea2_shift", "qinglong_flux", "qinglong_qwen")
_DENSITIES = ("logit_normal", "mode")  # weighting schemes that shape the sigma sampling's draws; the others weight the loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimestepConfig:
    mode: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int | None = None
    max_timestep: int | None = None
    preserve_distribution_shape: bool = False
    sigma_uses_shift: bool = False

    def __post_init__(self):
        if self.mode not in SAMPLING_MODES:
            raise UserError(f"--timestep_sampling {self.mode!r} is unknown; choose one of {', '.join(SAMPLING_MODES)}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"--weighting_scheme {self.weighting_scheme!r} is unknown; choose one of {', '.join(WEIGHTING_SCHEMES)}")
        lo, hi = self.min_timestep or 0, NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep
        if not 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--min_timestep {lo} / --max_timestep {hi}: need 0 <= min < max <= 1000")

    @property
    def t_min(self) -> float:
        return (self.min_timestep or 0) / NUM_TRAIN_TIMESTEPS

    @property
    def t_max(self) -> float:
        return (NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep) / NUM_TRAIN_TIMESTEPS


# Which sampling reads each flag (besides --timestep_sampling, and --min_timestep / --max_timestep that all read), as
# sample_timesteps and loss_weights do: (who reads it, said in the warning; whether `cfg` does). warn_of_unread_flags
# warns of each flag given that the sampling in effect ignores.
_READ_BY = {
    "discrete_flow_shift": ("--timestep_sampling shift, and sigma with --sigma_uses_shift",
                            lambda c: c.mode == "shift" or (c.mode == "sigma" and c.sigma_uses_shift)),
    "sigmoid_scale": (f"--timestep_sampling {', '.join(_NORMAL_DRAWS)}", lambda c: c.mode in _NORMAL_DRAWS),
    "weighting_scheme": ("--timestep_sampling sigma, as the density of its draws (sigma_sqrt and cosmap weight the loss in every "
                         "sampling)", lambda c: c.mode == "sigma" or c.weighting_scheme not in _DENSITIES),
    **dict.fromkeys(("logit_mean", "logit_std"), (
        "--timestep_sampling logsnr, qinglong_flux, and sigma with --weighting_scheme logit_normal",
        lambda c: c.mode in ("logsnr", "qinglong_flux") or (c.mode == "sigma" and c.weighting_scheme == "logit_normal"))),
    "mode_scale": ("--timestep_sampling sigma with --weighting_scheme mode", lambda c: c.mode == "sigma" and c.weighting_scheme == "mode"),
    "sigma_uses_shift": ("--timestep_sampling sigma with a --discrete_flow_shift other than 1",
                         lambda c: c.mode == "sigma" and c.discrete_flow_shift != 1.0),
    "preserve_distribution_shape": ("every --timestep_sampling but sigma, with --min_timestep or --max_timestep",
                                    lambda c: c.mode != "sigma" and (c.t_min > 0 or c.t_max < 1)),
}


def warn_of_unread_flags(cfg: TimestepConfig) -> None:
    """A warning for each timestep flag given (not at its default) that the chosen sampling does not read."""
    defaults = {f.name: f.default for f in fields(TimestepConfig)}
    for flag, (readers, reads) in _READ_BY.items():
        value = getattr(cfg, flag)
        if value != defaults[flag] and not reads(cfg):
            given = f"--{flag}" if isinstance(value, bool) else f"--{flag} {value}"
            weighting = f" --weighting_scheme {cfg.weighting_scheme}" if cfg.weighting_scheme != "none" and flag != "weighting_scheme" else ""
            logger.warning("%s is read only by %s; ignored with --timestep_sampling %s%s", given, readers, cfg.mode, weighting)


RARE_IN_RANGE = 0.005  # a share of draws in range below which a step's 1,000 rounds of one draw miss it 1% of the time


def _limited_by_rejection(cfg: TimestepConfig) -> bool:
    return cfg.mode != "sigma" and cfg.preserve_distribution_shape and (cfg.t_min > 0 or cfg.t_max < 1)


def _range_words(cfg: TimestepConfig) -> str:
    return f"--min_timestep {cfg.min_timestep or 0:g} / --max_timestep {NUM_TRAIN_TIMESTEPS if cfg.max_timestep is None else cfg.max_timestep:g}"


def warn_of_a_range_seldom_drawn(cfg: TimestepConfig, latent_hw: tuple[int, int] = (128, 128)) -> None:
    """Before the work: --preserve_distribution_shape keeps the draws that fall in the range, and a step whose 1,000
    rounds find too few trains on unconstrained ones (musubi-tuner's fallback, which it warns of at that step). With
    a range the sampling seldom reaches, most steps trained outside it, without a word (fuzz_ab 5). The share is
    measured on 100,000 draws at `latent_hw` (a 1024 px image's latent, as --show_timesteps)."""
    if not _limited_by_rejection(cfg):
        return
    t = _draw(cfg, 100_000, latent_hw, torch.Generator().manual_seed(0), None)
    share = float(((t >= cfg.t_min) & (t <= cfg.t_max)).float().mean())
    if share < RARE_IN_RANGE:
        logger.warning("--preserve_distribution_shape: %.2g%% of --timestep_sampling %s's draws fall within %s; a step that "
                       "finds too few in 1,000 rounds trains on unconstrained draws, as musubi-tuner does. Widen the range, "
                       "or leave the flag out to rescale the draws into it", 100 * share, cfg.mode, _range_words(cfg))


_fallback_said = False


def read_settings(cfg: TimestepConfig) -> dict:
    """The settings the sampling in effect reads (every field but the flags of _READ_BY it ignores): what a resumed run
    records and compares, so that a flag it never read, changed, is not said to change how noise levels are drawn."""
    return {k: v for k, v in asdict(cfg).items() if k not in _READ_BY or _READ_BY[k][1](cfg)}


def _mu_line(x: float, x1: float, y1: float, x2: float, y2: float) -> float:
    return (y2 - y1) / (x2 - x1) * (x - x1) + y1


def _normal_from_uniform(u: torch.Tensor) -> torch.Tensor:
    u = u.clamp(1e-7, 1 - 1e-7)
    return math.sqrt(2) * torch.erfinv(2 * u - 1)


def _draw(cfg: TimestepConfig, batch: int, latent_hw: tuple[int, int], generator: torch.Generator | None,
          uniform: torch.Tensor | None) -> torch.Tensor:
    """One batch of t in [0, 1] from a non-sigma mode, before range limits."""
    def u01():
        return uniform if uniform is not None else torch.rand(batch, generator=generator)

    def normal():
        return _normal_from_uniform(uniform) if uniform is not None else torch.randn(batch, generator=generator)

    h, w = latent_hw
    mode = cfg.mode
    if mode == "uniform":
        return u01()
    if mode == "logsnr":
        return torch.sigmoid(-(cfg.logit_mean + cfg.logit_std * normal()) / 2)
    if mode in ("qinglong_flux", "qinglong_qwen"):
        base = _draw_shift_family("flux_shift" if mode == "qinglong_flux" else "qwen_shift", cfg, normal(), h, w)
        u = torch.rand(batch, generator=generator)
        mid = torch.sigmoid(-(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator)) / 2)
        high = torch.sigmoid(-(5.36 + torch.randn(batch, generator=generator)) / 2)
        if mode == "qinglong_flux":
            return torch.where(u < 0.79, base, torch.where(u < 0.90, mid, high))
        return torch.where(u < 0.95, base, high)
    return _draw_shift_family(mode, cfg, normal(), h, w)


def _draw_shift_family(mode: str, cfg: TimestepConfig, n: torch.Tensor, h: int, w: int) -> torch.Tensor:
    t = torch.sigmoid(cfg.sigmoid_scale * n)
    if mode == "sigmoid":
        return t
    if mode == "shift":
        return shift_sigma(t, cfg.discrete_flow_shift)
    tokens = (h // 2) * (w // 2)
    mu = {
        "flux_shift": lambda: _mu_line(tokens, 256, 0.5, 4096, 1.15),
        "flux2_shift": lambda: _mu_line(h * w, 256, 0.5, 4096, 1.15),
        "qwen_shift": lambda: _mu_line(tokens, 256, 0.5, 8192, 0.9),
        "krea2_shift": lambda: _mu_line(tokens, 256, 0.5, 6400, 1.15),
    }[mode]()
    return shift_sigma(t, math.exp(mu))


def sample_timesteps(cfg: TimestepConfig, batch: int, latent_hw: tuple[int, int], generator: torch.Generator | None = None,
                     uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma in [0, 1], model timesteps) for a batch, float32.

    `uniform` (B,) values in [0, 1) replace the random draws (timestep buckets).
    """
    if cfg.mode == "sigma":
        if cfg.weighting_scheme == "logit_normal":
            u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * (torch.randn(batch, generator=generator) if uniform is None else _normal_from_uniform(uniform)))
        elif cfg.weighting_scheme == "mode":
            v = torch.rand(batch, generator=generator) if uniform is None else uniform
            u = 1 - v - cfg.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        else:
            u = torch.rand(batch, generator=generator) if uniform is None else uniform
        lo = cfg.min_timestep or 0
        hi = NUM_TRAIN_TIMESTEPS if cfg.max_timestep is None else cfg.max_timestep
        index = (u * (hi - lo) + lo).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        timesteps = (NUM_TRAIN_TIMESTEPS - index).float()  # the unshifted schedule 1000, 999, ..., 1
        sigma = timesteps / NUM_TRAIN_TIMESTEPS
        if cfg.sigma_uses_shift and cfg.discrete_flow_shift != 1.0:
            sigma = shift_sigma(sigma, cfg.discrete_flow_shift)
            timesteps = sigma * NUM_TRAIN_TIMESTEPS
        return sigma, timesteps

    if _limited_by_rejection(cfg):
        kept = torch.empty(0)
        t = None
        for _ in range(1000):
            t = _draw(cfg, batch, latent_hw, generator, None)
            kept = torch.cat([kept, t[(t >= cfg.t_min) & (t <= cfg.t_max)]])
            if len(kept) >= batch:
                break
        if len(kept) >= batch:
            t = kept[:batch]
        else:
            global _fallback_said
            if not _fallback_said:  # (said once a run: musubi-tuner says it at every such step)
                _fallback_said = True
                logger.warning("--preserve_distribution_shape: 1,000 rounds of draws found fewer than %d timesteps within %s: "
                               "this step, and any other such, trains on unconstrained draws, as musubi-tuner does", batch,
                               _range_words(cfg))
    else:
        t = _draw(cfg, batch, latent_hw, generator, uniform)
        t = t * (cfg.t_max - cfg.t_min) + cfg.t_min
    t = t.float()
    return t, t * NUM_TRAIN_TIMESTEPS + 1


def model_timesteps(cfg: TimestepConfig, sigma: torch.Tensor) -> torch.Tensor:
    """The timestep the DiT is given for noise level `sigma`, as `sample_timesteps` pairs them:
    sigma * 1000 in the `sigma` mode, sigma * 1000 + 1 in the others (musubi-tuner's conventions)."""
    return sigma * NUM_TRAIN_TIMESTEPS if cfg.mode == "sigma" else sigma * NUM_TRAIN_TIMESTEPS + 1


def loss_weights(cfg: TimestepConfig, sigma: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights (B,), or None for uniform weighting."""
    if cfg.weighting_scheme == "sigma_sqrt":
        return sigma.clamp(min=1e-6) ** -2.0
    if cfg.weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return None


def timestep_bucket_pool(num_buckets: int, total: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stratified uniform values: ceil(total / K) from each of K equal intervals, shuffled, `total` of them (musubi §5.3)."""
    per = math.ceil(total / num_buckets)
    values = torch.cat([(i + torch.rand(per, generator=generator)) / num_buckets for i in range(num_buckets)])
    return values[torch.randperm(len(values), generator=generator)][:total]
