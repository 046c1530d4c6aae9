"""Step caching: skip the DiT's blocks at steps whose result would barely change (TeaCache, First-Block-Cache).

Consecutive denoising steps give the DiT nearly the same input, and its blocks then add nearly the same
residual to the image tokens. Both methods keep that residual (the image tokens after the last block minus
those before the first) from the last step that ran the blocks, and at a step they judge close enough to
that one they add it instead of running the blocks:

- TeaCache (TeaCache4HunyuanVideo): the judge is the first double block's modulated, normed image input,
  known before any block runs. Its relative L1 change since the previous call, mapped through a polynomial
  fitted on the released HunyuanVideo, is summed over the steps since the last computed one; while the sum
  stays below the threshold the step is skipped. A skipped step costs one LayerNorm and one modulation.
- First-Block-Cache (ParaAttention, diffusers' FirstBlockCache hook): the first double block always runs;
  the relative L1 change of its image residual since the last computed step decides: at or below the
  threshold the other blocks are skipped. A skipped step costs one block.

Rules of both: the first `warmup` steps of a run and its last step always run the blocks (TeaCache's
published rule, with warm-up 1); threshold 0 runs every step exactly as without a cache. Each branch keeps
its own state: with real CFG in one batch the positive and negative prompt decide together (the metric
spans the batch; half a batch cannot be skipped), with --split_uncond each decides on its own, as
diffusers' pipeline does with its "cond" and "uncond" cache contexts.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from musubi_tuner.cli import count, real
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.blocks import modulate_norm

logger = logging.getLogger(__name__)

METHODS = ("teacache", "fbcache")
DEFAULT_THRESHOLD = {"teacache": 0.1, "fbcache": 0.06}
# rel-L1 change of the modulated input -> the change of the output, fitted by TeaCache's authors on the
# released HunyuanVideo (highest power first)
TEACACHE_HUNYUAN_COEFFICIENTS = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)


@dataclass(frozen=True)
class Published:
    """A speed-up its authors measured on the full-size model (not here): the skip rate follows from it."""

    threshold: float
    speedup: float
    source: str


PUBLISHED = {
    "teacache": (Published(0.1, 1.6, "TeaCache4HunyuanVideo README: 720p and 540p, 50 steps, A800"),
                 Published(0.15, 2.1, "TeaCache4HunyuanVideo README: 720p and 540p, 50 steps, A800")),
    "fbcache": (Published(0.06, 1.62, "ParaAttention: 720p, 129 frames, 30 steps, L20"),),
}


def expected_speedup(method: str, threshold: float) -> tuple[float, str]:
    """(speed-up of the denoising, how it was derived) from the published figures; linear between them, and
    from 1.0 at threshold 0. Above the largest published threshold that figure is a lower bound."""
    points = [(0.0, 1.0)] + [(p.threshold, p.speedup) for p in PUBLISHED[method]]
    source = PUBLISHED[method][0].source
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if threshold <= t1:
            speedup = s0 + (s1 - s0) * (threshold - t0) / (t1 - t0)
            exact = threshold == t1
            return speedup, f"{'published' if exact else 'interpolated from the published'} figure ({source})"
    t, s = points[-1]
    return s, f"at least the published {s}x at {t} ({source})"


def add_step_cache_flags(group) -> None:
    """The flags, for hv_generate_video and for the trainer's sample prompts."""
    group.add_argument("--step_cache", choices=METHODS, default=None,
                       help="skip the DiT's blocks at steps whose result barely changes: teacache or fbcache (First-Block-Cache)")
    group.add_argument("--step_cache_threshold", type=real(0), default=None,
                       help="with --step_cache: higher skips more, default 0.1 for teacache (published 1.6x; 0.15: 2.1x), 0.06 for fbcache "
                            "(published 1.62x); 0 computes every step")
    group.add_argument("--step_cache_warmup", type=count(1), default=1, help="with --step_cache: first steps always computed (and the last)")


def from_args(args) -> "StepCache | None":
    """The step cache the flags ask for (None without --step_cache); a UserError for bad values."""
    method = getattr(args, "step_cache", None)
    threshold, warmup = getattr(args, "step_cache_threshold", None), getattr(args, "step_cache_warmup", 1)
    if method is None:
        if threshold is not None:
            raise UserError("--step_cache_threshold needs --step_cache teacache or fbcache")
        if warmup != 1:  # (dropped without a word, where the threshold is refused: fuzz_ap 8)
            raise UserError("--step_cache_warmup needs --step_cache teacache or fbcache")
        return None
    return StepCache(method, threshold, warmup)


def skippable_steps(steps: int, warmup: int) -> int:
    """The most steps of a run a cache can skip: the first `warmup` and the last always run the blocks."""
    return max(0, steps - warmup - 1)


def check_args(args) -> None:
    """Generation's early check of the step cache flags: their values (from_args), and a warning when --step_cache_warmup
    leaves no step of those that run (V2V runs the last ones) to skip."""
    from musubi_tuner.inference.sampler import steps_that_run

    cache, steps = from_args(args), getattr(args, "infer_steps", None)
    if cache is not None and steps is not None:
        runs = steps_that_run(steps, getattr(args, "video_path", None), getattr(args, "strength", None))
        if skippable_steps(runs, cache.warmup) == 0:
            ran = f"--infer_steps {steps}" if runs == steps else f"the {runs} steps V2V runs of --infer_steps {steps}"
            logger.warning("--step_cache_warmup %d with %s: the first %d steps and the last always run, so --step_cache %s can "
                           "skip no step", cache.warmup, ran, cache.warmup, cache.method)


@dataclass
class Decision:
    step: int
    branch: str
    skipped: bool
    metric: float | None  # TeaCache: the accumulated rescaled distance; FBCache: the residual's relative change
    samples: int  # the call's batch (2 for CFG in one batch)


@dataclass
class _Branch:
    previous: torch.Tensor | None = None  # TeaCache: the last modulated input; FBCache: the first block's last computed residual
    residual: torch.Tensor | None = None  # what the blocks added to the image tokens at the last computed step
    accumulated: float = 0.0


@dataclass
class _Call:
    step: int
    first_step: int
    last_step: int
    branch: str


class StepCache:
    """One per generation (new_video() between videos). The sampler brackets every DiT call with `call(...)`."""

    def __init__(self, method: str, threshold: float | None = None, warmup: int = 1):
        if method not in METHODS:
            raise UserError(f"--step_cache {method}: one of {', '.join(METHODS)}")
        threshold = DEFAULT_THRESHOLD[method] if threshold is None else threshold
        if not 0.0 <= threshold < float("inf"):
            raise UserError(f"--step_cache_threshold {threshold}: must be 0 or more (0 computes every step)")
        if warmup < 1:
            raise UserError(f"--step_cache_warmup {warmup}: at least 1 (a first step has nothing to reuse)")
        self.method, self.threshold, self.warmup = method, float(threshold), warmup
        self.decisions: list[Decision] = []
        self._also = (0, 0)  # (evaluations, skipped) of the other processes' prompts (count_also)
        self._branches: dict[str, _Branch] = {}
        self._call: _Call | None = None

    def new_video(self) -> None:
        """Forget the cached residuals: the next call starts another video (the counts go on)."""
        self._branches.clear()

    @contextmanager
    def call(self, model, step: int, first_step: int, last_step: int, branch: str):
        """Within this, `model` (a HunyuanVideoDiT) runs its blocks through this cache for step `step` of `branch`."""
        self._call = _Call(step, first_step, last_step, branch)
        model.step_cache = self
        try:
            yield
        finally:
            model.step_cache = None
            self._call = None

    # -- counts
    @property
    def evaluations(self) -> int:
        """DiT evaluations asked for, one per sample per call (a CFG batch counts two), with count_also's."""
        return sum(d.samples for d in self.decisions) + self._also[0]

    @property
    def skipped(self) -> int:
        return sum(d.samples for d in self.decisions if d.skipped) + self._also[1]

    def count_also(self, evaluations: int, skipped: int) -> None:
        """Add another process's counts (the partner replica of CFG-parallel, which ran the other prompt)."""
        self._also = (self._also[0] + evaluations, self._also[1] + skipped)

    def summary(self) -> str:
        share = self.skipped / self.evaluations if self.evaluations else 0.0
        return (f"step cache {self.method} (threshold {self.threshold:g}): skipped {self.skipped} of {self.evaluations} "
                f"DiT evaluations ({share:.0%})")

    # -- the decision
    def run_blocks(self, model, img: torch.Tensor, txt: torch.Tensor, silu_vec: torch.Tensor, ctx) -> torch.Tensor:
        """What model.run_blocks([img, txt], ...) returns, or its cached estimate: the image tokens after the blocks (B, Li, C)."""
        call = self._call
        if call is None:
            raise RuntimeError("StepCache.run_blocks outside StepCache.call")
        state = self._branches.setdefault(call.branch, _Branch())
        forced = call.step < call.first_step + self.warmup or call.step == call.last_step
        if self.threshold == 0:  # exactly the plain forward
            out, skipped, metric = model.run_blocks([img, txt], silu_vec, ctx), False, None
        elif self.method == "teacache":
            out, skipped, metric = self._teacache(model, state, forced, img, txt, silu_vec, ctx)
        else:
            out, skipped, metric = self._first_block(model, state, forced, img, txt, silu_vec, ctx)
        self.decisions.append(Decision(call.step, call.branch, skipped, metric, img.shape[0]))
        return out

    def _teacache(self, model, state: _Branch, forced: bool, img, txt, silu_vec, ctx):
        shift, scale = model.double_blocks[0].img_mod(silu_vec)[:2]
        modulated = modulate_norm(img, shift, scale)
        metric, skip = None, False
        if not forced and state.previous is not None and state.residual is not None:
            state.accumulated += _rescale(relative_l1(modulated, state.previous, ctx.shards))
            metric = state.accumulated
            skip = state.accumulated < self.threshold
        state.previous = modulated
        if skip:
            return img + state.residual, True, metric
        state.accumulated = 0.0
        out = model.run_blocks([img, txt], silu_vec, ctx)
        state.residual = out - img
        return out, False, metric

    def _first_block(self, model, state: _Branch, forced: bool, img, txt, silu_vec, ctx):
        img_1, txt_1 = model.run_double_block(0, img, txt, silu_vec, ctx)
        first_residual = img_1 - img
        metric = None
        if not forced and state.previous is not None and state.residual is not None:  # as TeaCache: a forced step reads nothing
            metric = relative_l1(first_residual, state.previous, ctx.shards)
            if metric <= self.threshold:
                return img_1 + state.residual, True, metric
        state.previous = first_residual
        out = model.run_blocks([img_1, txt_1], silu_vec, ctx, first=1)
        state.residual = out - img_1
        return out, False, metric


def relative_l1(current: torch.Tensor, previous: torch.Tensor, shards=None) -> float:
    """mean |current - previous| / mean |previous|, accumulated in float32. With context parallel (`shards`), over the
    image tokens of every process of the group, so that all of them take the same decision."""
    if shards is not None:
        change, size = shards.sum_image_rows([(current - previous).abs(), previous.abs()])
        return (change / size).item()
    return ((current - previous).abs().mean(dtype=torch.float32) / previous.abs().mean(dtype=torch.float32)).item()


def _rescale(x: float) -> float:
    out = 0.0
    for c in TEACACHE_HUNYUAN_COEFFICIENTS:  # Horner
        out = out * x + c
    return out


def describe(cache: StepCache | None) -> dict[str, str]:
    """What goes into the output's metadata."""
    if cache is None:
        return {}
    return {"step_cache": cache.method, "step_cache_threshold": f"{cache.threshold:g}", "step_cache_skipped": f"{cache.skipped}/{cache.evaluations}"}


__all__ = ["METHODS", "DEFAULT_THRESHOLD", "PUBLISHED", "StepCache", "Decision", "add_step_cache_flags", "check_args", "expected_speedup",
           "from_args", "relative_l1", "skippable_steps"]
