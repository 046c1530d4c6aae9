"""Tiny text encoders with the real architectures, written in the real file layouts, tokenizers included.

- LLM: a 4-layer Llama (hidden 64, GQA) as an HF folder like the official `ckpts/text_encoder`
  (config.json, sharded LlamaForCausalLM safetensors with an index, tokenizer files) and as a
  ComfyUI-style single file (`model.*` + `lm_head.weight`, fp16).
- CLIP: a 2-layer CLIP text model (hidden 32) as an HF folder like `ckpts/text_encoder_2` (a whole
  CLIPModel: text and vision towers, vocab.json + merges.txt + tokenizer.json) and as a ComfyUI-style
  `clip_l.safetensors` (`text_model.*`, fp16).

The tokenizers are trained here, offline, on a small built-in corpus with the `tokenizers` library,
using the real pipelines (Llama 3's byte-level BPE with its split regex, chat special tokens at the
real relative ids and llava's <pad>; CLIP's lower-cased BPE with `</w>`), so the template, the crop
and the padding work as they do with the real vocabularies. Single files get their tokenizer in a
`<stem>_tokenizer/` folder beside them unless `with_tokenizer=False`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from musubi_tuner.files import atomic_write, save_safetensors
from musubi_tuner.hunyuan import tokenization as tok
from musubi_tuner.hunyuan.text_encoders import CONFIG_METADATA_KEY, PROMPT_TEMPLATE_VIDEO

# The tiny DiT (demo/tiny_dit.py) takes text states of these widths.
TINY_LLM_HIDDEN = 64
TINY_CLIP_HIDDEN = 32

TINY_LLM_BPE_TOKENS = 704      # byte-level BPE tokens before the special tokens
TINY_CLIP_MERGES = 448

TINY_LLM_CONFIG = dict(
    vocab_size=1024,  # 704 BPE + 256 Llama 3 specials + 3 llava tokens = 963, padded to a multiple of 64 as the real 128320
    hidden_size=TINY_LLM_HIDDEN, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    bos_token_id=TINY_LLM_BPE_TOKENS, eos_token_id=TINY_LLM_BPE_TOKENS + 1,
)
TINY_CLIP_TEXT_CONFIG = dict(
    vocab_size=512 + TINY_CLIP_MERGES + 2, hidden_size=TINY_CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=TINY_CLIP_HIDDEN, bos_token_id=0, eos_token_id=2, pad_token_id=1,  # openai's legacy ids
)
TINY_CLIP_VISION_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16, projection_dim=TINY_CLIP_HIDDEN)

# Text to train the tiny vocabularies on: the template and captions like the ones users write.
CORPUS = [
    PROMPT_TEMPLATE_VIDEO.format(""),
    "A cat walks on the grass, realistic style.",
    "A red ball rolls across a wooden floor in a bright room.",
    "Two people dance in the rain at night, neon lights reflect on the wet street.",
    "Close-up of a woman smiling, soft light, shallow depth of field.",
    "The camera pans slowly over a mountain lake at sunrise; mist rises from the water.",
    "A blue square moves from left to right on a white background.",
    "A green circle grows and shrinks; the background is black.",
    "An old man reads a newspaper on a park bench while pigeons walk around him.",
    "Aerial view of a city with cars driving on the highway, 4k, cinematic.",
    "A dog jumps into a swimming pool and splashes water everywhere!",
    "Timelapse of clouds moving over a field of yellow flowers.",
    "It's a sunny day; the children are playing football in the schoolyard.",
    "Anime style: a girl with long hair looks at the stars, 1990s film grain.",
    "A robot assembles a car in a factory, sparks fly, industrial lighting.",
    "Slow motion shot of a hummingbird drinking from a flower.",
]


# ----------------------------------------------------------------------------------------------- tokenizers


@functools.lru_cache(maxsize=None)
def _llama_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    trainer_tokenizer = Tokenizer(BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = BpeTrainer(vocab_size=TINY_LLM_BPE_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    assert len(model["vocab"]) == TINY_LLM_BPE_TOKENS, "the corpus is too small for the tiny vocabulary"
    return model["vocab"], merges


def tiny_llm_tokenizer() -> Tokenizer:
    """Llama 3's pipeline over a tiny vocabulary: 704 BPE tokens, then the 256 Llama 3 special tokens
    (`<|begin_of_text|>` = 704, `<|start_header_id|>` = 710, ...) and llava's <unk>, <image>, <pad>."""
    vocab, merges = _llama_bpe()
    return tok.llama3_tokenizer(dict(vocab), list(merges), tok.LLAMA3_SPECIAL_TOKENS + tok.LLAVA_ADDED_TOKENS)


def tiny_llm_tiktoken_ranks() -> dict[bytes, int]:
    """The tiny BPE vocabulary in Meta's `tokenizer.model` form (token bytes -> rank)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab, _ = _llama_bpe()
    return {bytes(byte_of[c] for c in token): rank for token, rank in vocab.items()}


def write_tiktoken_file(ranks: dict[bytes, int], path: str | os.PathLike) -> Path:
    import base64

    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    with atomic_write(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return Path(path)


@functools.lru_cache(maxsize=None)
def tiny_clip_merges() -> tuple[tuple[str, str], ...]:
    """CLIP-style merges learned on the corpus; merges that would repeat an existing token are dropped,
    because CLIP's vocabulary has exactly one token per merge."""
    trainer_tokenizer = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    trainer_tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                         normalizers.Lowercase()])
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         end_of_word_suffix="</w>", show_progress=False)
    trainer_tokenizer.train_from_iterator(CORPUS * 4, trainer)
    merges = json.loads(trainer_tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    seen = set(bytes_to_unicode().values()) | {c + "</w>" for c in bytes_to_unicode().values()}
    kept = []
    for left, right in merges:
        if left in seen and right in seen and left + right not in seen:
            kept.append((left, right))
            seen.add(left + right)
    assert len(kept) >= TINY_CLIP_MERGES, "the corpus is too small for the tiny CLIP vocabulary"
    return tuple(kept[:TINY_CLIP_MERGES])


def tiny_clip_tokenizer() -> Tokenizer:
    merges = list(tiny_clip_merges())
    return tok.clip_tokenizer(tok.clip_vocab_from_merges(merges), merges)


def write_clip_bpe_file(merges, path: str | os.PathLike) -> Path:
    """Merges in the layout of OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a version line first)."""
    import gzip

    text = "\n".join(["\"bpe_simple_vocab_16e6.txt#version: 0.2"] + [f"{a} {b}" for a, b in merges]) + "\n"
    with atomic_write(path) as tmp:
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write(text)
    return Path(path)


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer_json(path: Path, tokenizer: Tokenizer) -> None:
    with atomic_write(path) as tmp:  # written by Python: tokenizers' own save reports a full disk as a bare Exception
        Path(tmp).write_text(tokenizer.to_str(), encoding="utf-8")


def write_tiny_llm_tokenizer(folder: str | os.PathLike) -> Path:
    """tokenizer.json + the llava folder's tokenizer_config.json / special_tokens_map.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_json(folder / "tokenizer.json", tiny_llm_tokenizer())
    special = {"bos_token": tok.LLAMA3_BOS, "eos_token": "<|end_of_text|>", "pad_token": tok.LLAVA_PAD, "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {
        # as in xtuner's llava-llama-3 folder, including its (slow) tokenizer class name
        **special, "add_bos_token": True, "add_eos_token": False, "padding_side": "right", "legacy": True,
        "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "LlamaTokenizer",
        "model_input_names": ["input_ids", "attention_mask"],
    })
    return folder


def write_tiny_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """openai/clip-vit-large-patch14's tokenizer files: vocab.json, merges.txt, tokenizer.json, configs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = list(tiny_clip_merges())
    _write_json(folder / "vocab.json", tok.clip_vocab_from_merges(merges))
    with atomic_write(folder / "merges.txt") as tmp:
        Path(tmp).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    _write_tokenizer_json(folder / "tokenizer.json", tiny_clip_tokenizer())
    special = {"bos_token": tok.CLIP_BOS, "eos_token": tok.CLIP_EOS, "pad_token": tok.CLIP_EOS, "unk_token": tok.CLIP_EOS}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
                                                   "do_lower_case": True})
    return folder


# ----------------------------------------------------------------------------------------------- weights


def tiny_llm_config(**overrides) -> LlamaConfig:
    """The tiny LLM's config; `overrides` make bigger ones for benchmarks (vocab_size must stay >= 963)."""
    return LlamaConfig(**{**TINY_LLM_CONFIG, **overrides})


def tiny_clip_config(**overrides) -> CLIPConfig:
    """The tiny CLIPModel's config; `overrides` change its text model."""
    text = {**TINY_CLIP_TEXT_CONFIG, **overrides}
    return CLIPConfig(text_config=text, vision_config=TINY_CLIP_VISION_CONFIG, projection_dim=text["projection_dim"])


def tiny_llm_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """float32 LlamaForCausalLM weights (`model.*` + `lm_head.weight`), PyTorch/transformers' init, norms random too."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llm_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # make the norms' weights matter in equivalence tests
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_clip_state_dict(seed: int = 0, text_only: bool = False, **overrides) -> dict[str, torch.Tensor]:
    """float32 CLIPModel weights under their on-disk names (`text_model.*`, `vision_model.*`, projections)."""
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**overrides))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if text_only:
        state = {k: v for k, v in state.items() if k.startswith("text_model.")}
    return state


def _metadata(config: dict) -> dict[str, str]:
    return {CONFIG_METADATA_KEY: json.dumps(config), "format": "pt"}


def write_tiny_llm_folder(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """The official `text_encoder` layout: config.json, two fp16 safetensors shards + index, tokenizer files."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_llm_state_dict(seed, **overrides)
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        save_safetensors({k: state[k] for k in shard_keys}, folder / name, metadata={"format": "pt"}, cast=torch.float16)
    total = sum(v.numel() * 2 for v in state.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                          "weight_map": {k: n for n, ks in shards.items() for k in ks}})
    config = {**tiny_llm_config(**overrides).to_dict(), "architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"}
    _write_json(folder / "config.json", config)
    write_tiny_llm_tokenizer(folder)
    return folder


def write_tiny_llm_single_file(path: str | os.PathLike, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """ComfyUI's `llava_llama3_fp16.safetensors` layout: LlamaForCausalLM names with lm_head, fp16."""
    path = Path(path)
    save_safetensors(tiny_llm_state_dict(seed), path, metadata=_metadata(TINY_LLM_CONFIG), cast=torch.float16)
    if with_tokenizer:
        write_tiny_llm_tokenizer(path.parent / f"{path.stem}_tokenizer")
    return path


def write_tiny_clip_folder(path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """The official `text_encoder_2` layout (openai/clip-vit-large-patch14): a whole CLIPModel in fp32."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(tiny_clip_state_dict(seed, **overrides), folder / "model.safetensors", metadata={"format": "pt"})
    _write_json(folder / "config.json", {**tiny_clip_config(**overrides).to_dict(), "architectures": ["CLIPModel"]})
    write_tiny_clip_tokenizer(folder)
    return folder


def write_tiny_clip_single_file(path: str | os.PathLike, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """ComfyUI's `clip_l.safetensors` layout: the text model's `text_model.*` tensors only, fp16."""
    path = Path(path)
    save_safetensors(tiny_clip_state_dict(seed, text_only=True), path, metadata=_metadata(TINY_CLIP_TEXT_CONFIG),
                     cast=torch.float16)
    if with_tokenizer:
        write_tiny_clip_tokenizer(path.parent / f"{path.stem}_tokenizer")
    return path
