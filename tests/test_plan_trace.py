"""The DiT stage traced on fake tensors (planning.dit_trace): a change to a block reaches the plan by itself.

(The traced peak against real CPU runs: tests/test_plan.py::test_traced_peak_matches_the_live_tensor_peak_of_a_cpu_run.)"""

from __future__ import annotations

import torch

from musubi_tuner.hunyuan import dit as dit_module
from musubi_tuner.hunyuan.blocks import MMSingleStreamBlock
from musubi_tuner.planning import dit_trace
from musubi_tuner.planning.options import MemoryOptions
from test_plan import small_work

class ExtraActivation(MMSingleStreamBlock):
    """A single block that multiplies its output by a tensor of ones: the product's backward keeps the ones."""

    def forward(self, x, *args, **kwargs):
        out = super().forward(x, *args, **kwargs)
        return out * torch.ones_like(out)


ExtraActivation.__name__ = "MMSingleStreamBlock"  # the LoRA network picks the blocks it wraps by class name


def test_an_extra_activation_in_a_block_grows_the_plan_by_exactly_that_tensor(monkeypatch):
    work, opts = small_work(), MemoryOptions(network_dim=16)
    plain, _ = dit_trace.dit_peak(work, opts, on_cpu=True)
    monkeypatch.setattr(dit_module, "MMSingleStreamBlock", ExtraActivation)
    dit_trace._traced.cache_clear()
    try:
        extra, _ = dit_trace.dit_peak(work, opts, on_cpu=True)
    finally:
        dit_trace._traced.cache_clear()
    c = work.config
    ones = work.batch * (work.image_tokens + work.text_tokens) * c.hidden_size * 2  # bf16 under autocast
    # at the peak (the last single block's backward) the first single block's ones are still held; the last one's went
    # when its product's backward ran
    assert extra.total - plain.total == ones
    assert {k: extra.parts.get(k, 0) - plain.parts.get(k, 0) for k in plain.parts} == {**dict.fromkeys(plain.parts, 0), "activations": ones}
