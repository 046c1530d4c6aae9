"""Step caching (--step_cache): the same steps skipped and the same latents as the reference implementations.

First-Block-Cache is compared with diffusers' FirstBlockCache hook on HunyuanVideoTransformer3DModel, TeaCache
with TeaCache4HunyuanVideo's algorithm written here from its description and put on diffusers' model; both
references get our tiny random weights through diffusers' own key conversion. Random weights change far more
from step to step than trained ones, so the thresholds here are larger than those for the released model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_reference import diffusers_dit
from helpers import rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.inference.sampler import Guidance, denoise, initial_noise, sigma_schedule
from musubi_tuner.inference.step_cache import StepCache, expected_speedup

CONFIG = tiny_dit_config()
STEPS = 16
LATENT = (1, 16, 2, 8, 8)
MAX_TEXT = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights():
    return random_dit_state_dict(CONFIG, seed=3, scale=0.05)


@pytest.fixture(scope="module")
def dit(weights):
    model = HunyuanVideoDiT(CONFIG)
    model.load_state_dict(weights)
    return model.eval()


def prompt(seed: int, valid: int) -> dict:
    """One prompt's states, right-padded to MAX_TEXT tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(MAX_TEXT) < valid).long()[None]
    return {"text_states": torch.randn(1, MAX_TEXT, CONFIG.text_states_dim, generator=g) * mask[..., None],
            "text_mask": mask, "text_states_2": torch.randn(1, CONFIG.text_states_dim_2, generator=g)}


COND, UNCOND = prompt(1, 7), prompt(2, 4)
EMBEDDED = Guidance(embedded_scale=6.0)
CFG = Guidance(embedded_scale=1.0, scale=6.0)
CFG_SPLIT = Guidance(embedded_scale=1.0, scale=6.0, split=True)


def ours(dit, guidance: Guidance, cache: StepCache | None, start_step: int = 0, noise=None) -> torch.Tensor:
    with torch.no_grad():
        return denoise(dit, initial_noise(LATENT, seed=5) if noise is None else noise, sigma_schedule(STEPS, 7.0), cond=COND,
                       uncond=UNCOND if guidance.uses_cfg else None, guidance=guidance, step_cache=cache, start_step=start_step)


def computed(cache: StepCache, branch: str) -> str:
    """The branch's steps as a string: C computed, s skipped."""
    return "".join("s" if d.skipped else "C" for d in cache.decisions if d.branch == branch)


def reference_loop(model, guidance: Guidance, call) -> torch.Tensor:
    """The Euler loop of the sampler around diffusers' model; `call(branch, step, *inputs)` runs it for one branch."""
    sigmas = sigma_schedule(STEPS, 7.0)
    x = initial_noise(LATENT, seed=5)
    g = torch.full((1,), guidance.embedded_scale * 1000.0)
    with torch.no_grad():
        for i in range(STEPS):
            s, s_next = sigmas[i].item(), sigmas[i + 1].item()
            t = torch.full((1,), s * 1000.0)
            if not guidance.uses_cfg:
                v = call("cond", i, x, t, COND["text_states"], COND["text_mask"], COND["text_states_2"], g)
            elif guidance.split:  # diffusers' pipeline: the positive prompt first, each in its cache context
                v_pos = call("cond", i, x, t, COND["text_states"], COND["text_mask"], COND["text_states_2"], g)
                v_neg = call("uncond", i, x, t, UNCOND["text_states"], UNCOND["text_mask"], UNCOND["text_states_2"], g)
                v = v_neg + guidance.scale * (v_pos - v_neg)
            else:
                both = {k: torch.cat([UNCOND[k], COND[k]]) for k in COND}
                v_neg, v_pos = call("cond+uncond", i, torch.cat([x, x]), t.repeat(2), both["text_states"], both["text_mask"],
                                    both["text_states_2"], g.repeat(2)).chunk(2)
                v = v_neg + guidance.scale * (v_pos - v_neg)
            x = x + v.float() * (s_next - s)
    return x


# ----------------------------------------------------------------------------------------------- First-Block-Cache


def diffusers_first_block_cache(weights, guidance: Guidance, threshold: float) -> tuple[torch.Tensor, dict[str, str]]:
    """Latents and per-branch decisions of diffusers' FirstBlockCache hook in the same Euler loop."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    model = diffusers_dit(weights, CONFIG)
    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    leader = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).get_hook("fbc_leader_block_hook")
    decisions: dict[str, str] = {}

    def call(branch, step, *inputs):
        with model.cache_context(branch):
            out = model(*inputs, return_dict=False)[0]
            computed_ = leader.state_manager.get_state().should_compute
        decisions[branch] = decisions.get(branch, "") + ("C" if computed_ else "s")
        return out.float()

    return reference_loop(model, guidance, call), decisions


@pytest.mark.parametrize("guidance,branches", [(EMBEDDED, ("cond",)), (CFG_SPLIT, ("cond", "uncond"))], ids=["embedded", "cfg_split"])
@pytest.mark.parametrize("threshold", [0.3, 0.36])
def test_first_block_cache_skips_the_steps_diffusers_hook_skips_and_gives_its_latents(dit, weights, guidance, branches, threshold):
    want, want_decisions = diffusers_first_block_cache(weights, guidance, threshold)
    cache = StepCache("fbcache", threshold)
    got = ours(dit, guidance, cache)
    for branch in branches:
        decisions = want_decisions[branch]
        assert "s" in decisions and decisions.count("C") > 2, "the threshold must both skip and compute here"
        assert decisions[-1] == "C"  # diffusers has no last-step rule; where it computes anyway the two must agree everywhere
        assert computed(cache, branch) == decisions
    assert rel_err(got, want) < 1e-5


# ----------------------------------------------------------------------------------------------- TeaCache

# TeaCache4HunyuanVideo's rescaling polynomial (highest power first), fitted by its authors on the released model
PUBLISHED_COEFFICIENTS = [7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02]


class PublishedTeaCache:
    """TeaCache4HunyuanVideo's algorithm from its description, on diffusers' model (its blocks wrapped).

    Each call: `modulated` = the first double block's image input after its norm1 (LayerNorm, then times 1 + scale,
    plus shift, from the first block's own modulation). The call counter's first and last values (0 and
    num_steps - 1) compute and reset the accumulated distance; any other call adds
    poly(mean|modulated - previous| / mean|previous|) to it and is skipped while the sum stays below the
    threshold, else computed with the sum reset. `previous` becomes `modulated` at every call. A skipped call's
    image tokens are those entering the blocks plus the residual the blocks added at the last computed call.
    """

    def __init__(self, model, threshold: float, num_steps: int):
        self.threshold, self.num_steps = threshold, num_steps
        self.count, self.accumulated = 0, 0.0
        self.previous = self.residual = self.entering = None
        self.compute = True
        self.decisions = ""
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        for i, block in enumerate(blocks):
            self._wrap(block, first=i == 0, last=i == len(blocks) - 1)

    def _decide(self, block, hidden_states, temb) -> None:
        modulated = block.norm1(hidden_states, emb=temb)[0]
        if self.count in (0, self.num_steps - 1):
            self.compute, self.accumulated = True, 0.0
        else:
            change = ((modulated - self.previous).abs().mean() / self.previous.abs().mean()).item()
            self.accumulated += float(np.polyval(PUBLISHED_COEFFICIENTS, change))
            self.compute = self.accumulated >= self.threshold
            if self.compute:
                self.accumulated = 0.0
        self.previous = modulated
        self.count = (self.count + 1) % self.num_steps
        self.entering = hidden_states
        self.decisions += "C" if self.compute else "s"

    def _wrap(self, block, first: bool, last: bool) -> None:
        original = block.forward

        def forward(hidden_states, encoder_hidden_states, temb, *rest):
            if first:
                self._decide(block, hidden_states, temb)
            if self.compute:
                hidden_states, encoder_hidden_states = original(hidden_states, encoder_hidden_states, temb, *rest)
            if last:
                if self.compute:
                    self.residual = hidden_states - self.entering
                else:
                    hidden_states = self.entering + self.residual
            return hidden_states, encoder_hidden_states

        block.forward = forward


@pytest.mark.parametrize("guidance", [EMBEDDED, CFG], ids=["embedded", "cfg_in_one_batch"])
@pytest.mark.parametrize("threshold", [0.12, 0.25])
def test_teacache_equals_the_published_algorithm(dit, weights, guidance, threshold):
    model = diffusers_dit(weights, CONFIG)
    reference = PublishedTeaCache(model, threshold, STEPS)
    want = reference_loop(model, guidance, lambda branch, step, *inputs: model(*inputs, return_dict=False)[0].float())
    cache = StepCache("teacache", threshold)
    got = ours(dit, guidance, cache)
    assert "s" in reference.decisions and reference.decisions.count("C") > 3
    assert computed(cache, "cond+uncond" if guidance.uses_cfg else "cond") == reference.decisions
    assert rel_err(got, want) < 1e-5


# ----------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("method", ["teacache", "fbcache"])
@pytest.mark.parametrize("guidance", [EMBEDDED, CFG, CFG_SPLIT], ids=["embedded", "cfg", "cfg_split"])
def test_threshold_0_equals_the_plain_sampler_exactly(dit, method, guidance):
    cache = StepCache(method, 0.0)
    assert torch.equal(ours(dit, guidance, cache), ours(dit, guidance, None))
    assert cache.skipped == 0 and cache.evaluations == STEPS * (2 if guidance.uses_cfg else 1)


@pytest.mark.parametrize("method", ["teacache", "fbcache"])
@pytest.mark.parametrize("warmup,start_step", [(1, 0), (3, 0), (2, 5)])
def test_warmup_steps_and_the_last_step_are_always_computed(dit, method, warmup, start_step):
    cache = StepCache(method, 1e9, warmup=warmup)  # skips whatever the rules let it skip
    ours(dit, CFG_SPLIT, cache, start_step=start_step)
    run = STEPS - start_step
    for branch in ("cond", "uncond"):
        assert computed(cache, branch) == "C" * warmup + "s" * (run - warmup - 1) + "C"
    assert cache.summary() == (f"step cache {method} (threshold 1e+09): skipped {2 * (run - warmup - 1)} of {2 * run} "
                               f"DiT evaluations ({(run - warmup - 1) / run:.0%})")


def test_cfg_in_one_batch_decides_for_both_prompts_and_split_decides_for_each(dit):
    batched, split = StepCache("fbcache", 0.4), StepCache("fbcache", 0.4)
    ours(dit, CFG, batched)
    ours(dit, CFG_SPLIT, split)
    assert {d.branch for d in batched.decisions} == {"cond+uncond"} and all(d.samples == 2 for d in batched.decisions)
    assert computed(split, "cond") != computed(split, "uncond")  # the prompts change differently from step to step
    assert batched.skipped > 0 and split.skipped > 0


def test_skipping_more_steps_moves_the_latents_further_from_the_uncached_ones(dit):
    plain = ours(dit, EMBEDDED, None)
    errors, skipped = [], []
    for threshold in (0.3, 0.36, 0.5):
        cache = StepCache("fbcache", threshold)
        errors.append(rel_err(ours(dit, EMBEDDED, cache), plain))
        skipped.append(cache.skipped)
    assert skipped == sorted(skipped) and skipped[0] < skipped[-1]
    assert errors == sorted(errors) and 0 < errors[0]


def test_a_skipped_step_moves_no_blocks_under_block_swap(weights):
    from musubi_tuner.hunyuan.offload import BlockSwap

    swapped = HunyuanVideoDiT(CONFIG)
    swapped.load_state_dict(weights)
    swapped.eval()
    swap = BlockSwap(swapped, 2, "cpu")
    fetches: list[int] = []
    fetch = swap._fetch

    def counting_fetch(key):
        fetches[-1] += key not in swap._pending
        fetch(key)

    swap._fetch = counting_fetch
    cache = StepCache("fbcache", 0.36)
    original_call = cache.call

    def call(model, step, *rest):
        fetches.append(0)
        return original_call(model, step, *rest)

    cache.call = call
    got = ours(swapped, EMBEDDED, cache)
    for decision, moved in zip(cache.decisions, fetches):
        assert moved == (0 if decision.skipped else len(swap.swapped))
    assert cache.skipped > 0

    plain_cache = StepCache("fbcache", 0.36)
    dit = HunyuanVideoDiT(CONFIG)
    dit.load_state_dict(weights)
    assert torch.equal(got, ours(dit.eval(), EMBEDDED, plain_cache))  # block swap changes nothing, skipping included


def test_bad_values_are_refused():
    with pytest.raises(UserError, match="--step_cache_threshold -0.1: must be 0 or more"):
        StepCache("teacache", -0.1)
    with pytest.raises(UserError, match="--step_cache_warmup 0: at least 1"):
        StepCache("fbcache", warmup=0)


def test_expected_speedup_follows_the_published_figures():
    assert expected_speedup("teacache", 0.1)[0] == 1.6 and expected_speedup("teacache", 0.15)[0] == 2.1
    assert expected_speedup("teacache", 0.0)[0] == 1.0 and expected_speedup("teacache", 0.05)[0] == pytest.approx(1.3)
    speedup, how = expected_speedup("fbcache", 0.2)
    assert speedup == 1.62 and how.startswith("at least")
