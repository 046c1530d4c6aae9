"""The text encoder stages: the LLM and CLIP-L the commands load, traced on fake tensors as they encode prompts.

Each model is built as hunyuan/text_encoders.py builds it for loading (`build_llm`: the 30 decoder layers HunyuanVideo
reads, no final norm; `build_clip`) and given fake weights as the loader gives real ones (`assign_weights`): fp16, or
under --fp8_llm the Linears `llm_weight_storage` names in fp8 with float32 row scales and the rest in bf16. Then
`LLMTextEncoder.encode` / `CLIPTextEncoder.encode` run on `prompts` prompts under `tracer.trace` (no_grad, crop_start +
256 tokens for the LLM, 77 for CLIP, padded as short prompts are). The layers are identical: three are traced and the
middle one repeated to full depth (`tracer.compose`, which would also repeat anything a layer left behind): the same
peak as a trace of all 30 LLM layers, in 0.6 s instead of 1.6 s.

The fake device is the CPU. There transformers' SDPA call (a boolean padding mask, the 8 key/value heads repeated to
32) runs as `_scaled_dot_product_flash_attention_for_cpu`, a fused kernel like the memory-efficient one a masked fp16
call gets on CUDA: neither holds an L x L attention matrix per head. CUDA also turns the mask into an additive fp16
bias padded to 352 columns (under 0.3 MB a prompt), which the trace does not see.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from musubi_tuner.hunyuan.fp8 import FP8_DTYPE
from musubi_tuner.planning.tracer import Peak, compose, on_disk, trace

if TYPE_CHECKING:  # transformers takes seconds to import: only when a stage is traced
    from transformers import CLIPTextConfig, LlamaConfig

TRACED_LAYERS = 3  # the first and the last differ (the embedding output is still held; the tail): the middle one repeats


class Prompts:
    """Stands for a tokenizer: `crop_start` template tokens, then every prompt padded to the length asked for (half
    of it real: transformers builds the padding mask it builds for real prompts)."""

    def __init__(self, crop_start: int = 0):
        self.crop_start = crop_start

    def ids(self, text: str) -> list[int]:  # the template before the prompt, which LLMTextEncoder counts
        return [0] * self.crop_start

    def __call__(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        with unset_fake_temporarily():  # a real mask: transformers reads its values
            mask = (torch.arange(max_length) < max_length // 2).long().expand(len(prompts), -1).contiguous()
        return torch.zeros(len(prompts), max_length, dtype=torch.int64), mask


def llm_peak(prompts: int, fp8: bool, config: LlamaConfig | str | None = None, crop_start: int | None = None) -> Peak:
    """The LLM (text encoder 1) encoding `prompts` prompts; `config` (or its JSON) defaults to llava-llama-3-8b's and
    `crop_start` (template tokens) to the real tokenizer's."""
    return _peak("LLM", prompts, fp8, _json(config), crop_start)


def clip_peak(prompts: int, config: CLIPTextConfig | str | None = None) -> Peak:
    """CLIP-L (text encoder 2) encoding `prompts` prompts; `config` (or its JSON) defaults to CLIP-L's."""
    return _peak("CLIP", prompts, False, _json(config), None)


def _json(config) -> str | None:
    return config if config is None or isinstance(config, str) else config.to_json_string()


@functools.lru_cache(maxsize=16)
def _peak(which: str, prompts: int, fp8: bool, config: str | None, crop_start: int | None) -> Peak:
    """Traced, or read back from disk under transformers' version and our files (then transformers is not imported)."""
    from importlib.metadata import version

    here = Path(__file__).parents[1]
    sources = [Path(__file__), here / "hunyuan" / "text_encoders.py", here / "hunyuan" / "fp8.py"]
    key = (which, prompts, fp8, config, crop_start, version("transformers"))
    return on_disk(key, sources, lambda: _trace(which, prompts, fp8, config, crop_start), lambda d: Peak(**d))


def _trace(which: str, prompts: int, fp8: bool, config: str | None, crop_start: int | None) -> Peak:
    from transformers import CLIPTextConfig, LlamaConfig

    from musubi_tuner.hunyuan import text_encoders as te

    if which == "LLM":
        model = te.build_llm(LlamaConfig.from_dict(json.loads(config)) if config else LlamaConfig(**te.LLAVA_LLAMA3_CONFIG))
        dtype, fp8_keys = te.llm_weight_storage(model.state_dict(), torch.float16, fp8)
        tokens = Prompts(te.CROP_START if crop_start is None else crop_start)
        encoder, stack = te.LLMTextEncoder(model, tokens, torch.float16, None), model
    else:
        model = te.build_clip(CLIPTextConfig.from_dict(json.loads(config)) if config else CLIPTextConfig(**te.CLIP_L_CONFIG))
        dtype, fp8_keys = torch.float16, set()
        encoder, stack = te.CLIPTextEncoder(model, Prompts(), torch.float16, None), model.encoder
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        state = {k: torch.empty(p.shape, dtype=FP8_DTYPE if k in fp8_keys else dtype) for k, p in model.state_dict().items()}
        scales = {k: torch.empty(state[k].shape[0]) for k in fp8_keys}
    te.assign_weights(model, state, scales, None)
    # the layers past TRACED_LAYERS are cut; their weights are present throughout, the middle layer runs in their place
    layers, traced = stack.layers, stack.layers[:TRACED_LAYERS]
    untraced = sum(t.nbytes for layer in layers[TRACED_LAYERS:] for t in (*layer.parameters(), *layer.buffers()))
    stack.layers = traced
    with mode, warnings.catch_warnings():
        # a function transformers runs as a module is entered twice in attention: attribution only, not the totals
        warnings.filterwarnings("ignore", "The module hierarchy tracking maybe be messed up")
        segments = trace(lambda mark: encoder.encode([""] * prompts), [model], {m: f"layer {i}" for i, m in enumerate(traced)})
    peak = compose(segments, {"forward layer 1": len(layers) - len(traced) + 1}, static={"weights": untraced})
    weights = "weights (fp8 Linears, bf16 rest)" if fp8_keys else "weights (fp16)"
    return Peak(peak.total, {weights if k == "weights" else k: v for k, v in peak.parts.items()}, which + " forward", peak.end)
