"""Memory of the text encoder stages (the VAE's stages are in planning/vae.py).

These models are loaded one at a time, used, and freed (inference.pipeline), so each is a stage of its
own. The text encoders are standard transformers models whose activations at 351 tokens are small next
to their weights.
"""

from __future__ import annotations

from musubi_tuner.planning.sizes import (
    CLIP_HIDDEN,
    CLIP_LAYERS,
    CLIP_PARAMS,
    CLIP_TOKENS,
    LLM_EMBEDDING_PARAMS,
    LLM_HIDDEN,
    LLM_LAYERS,
    LLM_MLP,
    LLM_PARAMS,
    LLM_PROMPT_TOKENS,
)
from musubi_tuner.planning.trace import MemoryTrace

TE_WEIGHTS = "text encoder weights"
TE_ACTS = "text encoder activations"


def llm_stage(prompts: int, fp8: bool, act_bytes: int = 2) -> MemoryTrace:
    """The LLM (text encoder 1) encoding `prompts` prompts of 351 tokens, all hidden states returned."""
    t = MemoryTrace()
    t.where = "LLM forward"
    if fp8:  # every Linear in float8, the embedding kept in fp16
        t.alloc(LLM_EMBEDDING_PARAMS * 2 + (LLM_PARAMS - LLM_EMBEDDING_PARAMS), TE_WEIGHTS + " (fp8)")
    else:
        t.alloc(LLM_PARAMS * 2, TE_WEIGHTS + " (fp16)")
    tokens = prompts * LLM_PROMPT_TOKENS
    states = t.alloc((LLM_LAYERS + 1) * tokens * LLM_HIDDEN * act_bytes, TE_ACTS)  # output_hidden_states keeps every layer's
    mlp = t.alloc(3 * tokens * LLM_MLP * act_bytes, TE_ACTS)  # gate, up, act * up
    if fp8:  # autocast upcasts one Linear's weight per call (the MLP's are the largest)
        t.drop(t.alloc(LLM_MLP * LLM_HIDDEN * act_bytes, TE_ACTS + " (upcast weight)"))
    t.drop(mlp, states)
    return t


def clip_stage(prompts: int) -> MemoryTrace:
    t = MemoryTrace()
    t.where = "CLIP forward"
    t.alloc(CLIP_PARAMS * 2, TE_WEIGHTS + " (fp16)")
    t.drop(t.alloc((CLIP_LAYERS + 1) * prompts * CLIP_TOKENS * 4 * CLIP_HIDDEN * 2, TE_ACTS))
    return t
