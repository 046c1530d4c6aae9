"""What a weight file is, from its key names: for the loaders' refusals, which say which flag a file given to the wrong one
belongs to ("this looks like a VAE (pass it with --vae)"), whatever its packaging (prefixes, a LoRA's naming)."""

from __future__ import annotations

import re

from musubi_tuner.networks.lora_naming import LORA_FLAGS, looks_like_lora

# (kind, flag, a key pattern searched in the first keys; each matches under any prefix: vae., model.diffusion_model., ...)
_KINDS = (
    ("a diffusers-format HunyuanVideo transformer", "not read: use the official-layout DiT file, such as "
     "mp_rank_00_model_states.pt or a ComfyUI/Kijai safetensors, with --dit", r"(^|\.)(x_embedder\.proj|transformer_blocks\.\d+\.attn)\."),
    ("a HunyuanVideo DiT", "pass it with --dit", r"(^|\.)(double_blocks|single_blocks)\.\d+\."),
    ("a VAE", "pass it with --vae", r"(^|\.)(encoder|decoder)\.(down|up|mid|conv_in|conv_out|conv_norm_out)"),
    ("the LLM text encoder", "pass it with --text_encoder1", r"(^|\.)embed_tokens\.weight$"),
    ("the CLIP-L text encoder", "pass it with --text_encoder2", r"(^|\.)embeddings\.token_embedding\.weight$"),
    # (the caches: analysed as LoRAs by lora_info and the doctor, with advice to convert them: fuzz_ar 13)
    ("a latent cache of cache_latents.py", "training reads it through --dataset_config", r"^latents_\d+x\d+x\d+_\w+$"),
    ("a text-encoder cache of cache_text_encoder_outputs.py", "training reads it through --dataset_config",
     r"^(llm|clipL)_(mask|b?float\w*)$"),
)
SAMPLE = 2000  # keys looked at: every kind shows itself in its first few hundred


def what_weights_are(keys: list[str]) -> str | None:
    """"a VAE (pass it with --vae)", or None when the keys are none of the kinds the commands read."""
    sample = keys[:SAMPLE]
    if looks_like_lora(sample[:50]):
        return f"a LoRA file ({LORA_FLAGS})"
    for kind, flag, pattern in _KINDS:
        if any(re.search(pattern, k) for k in sample):
            return f"{kind} ({flag})"
    return None


def is_kind(description: str | None, kind: str) -> bool:
    """Whether what_weights_are's `description` is of `kind` ("a VAE", "a HunyuanVideo DiT", ...)."""
    return description is not None and description.startswith(kind + " (")
