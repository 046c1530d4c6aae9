"""HunyuanVideo's two text encoders: the llava-llama-3-8b text tower (LLM) and CLIP-L.

What HunyuanVideo reads from them (hyvideo/constants.py, hyvideo/text_encoder; musubi-tuner does the same):
- LLM: the prompt inside the video prompt template (also for images), tokenized to `crop_start + 256`
  tokens (right padding, truncation), the hidden state `HIDDEN_STATE_SKIP_LAYER = 2` layers before the
  end without the final norm, i.e. the output of decoder layer 30 of 32, and the first `crop_start`
  (template) positions cut off: states (B, 256, 4096) and mask (B, 256).
- CLIP-L: 77 tokens, `pooler_output` (the final-layer-normed EOS state, no projection): (B, 768).

Both models are transformers' own classes. Because the last two decoder layers, the final norm and
`lm_head` never influence the states HunyuanVideo reads, the LLM is built without them: the weights are
not loaded (0.9 to 1.9 GB less in fp16) and the two layers are not run.

Accepted files (see docs/text_encoders.md): the official HF folders (`ckpts/text_encoder`,
`ckpts/text_encoder_2`; also the diffusers `text_encoder` / `text_encoder_2` folders and whole
llava / CLIP checkpoints), ComfyUI's single files (`llava_llama3_fp16.safetensors`, its scaled-fp8
variant, `clip_l.safetensors`), and the tiny demo files. Each tensor is read, cast and placed one at a
time onto a model built on the meta device.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

from musubi_tuner.errors import UserError
from musubi_tuner.files import StateDictFile, list_folder, require_file, require_present
from musubi_tuner.hunyuan.fp8 import FP8_DTYPE, make_fp8_linear, quantize_rows
from musubi_tuner.hunyuan.tokenization import (TextTokenizer, json_type_name, load_clip_tokenizer, load_llm_tokenizer,
                                               parse_json, read_json)
from musubi_tuner.hunyuan.model_kinds import what_weights_are

logger = logging.getLogger(__name__)

# The official video template (hyvideo/constants.py PROMPT_TEMPLATE_ENCODE_VIDEO), byte for byte.
PROMPT_TEMPLATE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
CROP_START = 95             # tokens before the user prompt (BOS included) with the llava-llama-3 tokenizer
LLM_MAX_LENGTH = 256        # prompt tokens kept after the crop
HIDDEN_STATE_SKIP_LAYER = 2
CLIP_MAX_LENGTH = 77

# Single files carry no config: the full-size ones are these (the official folders' config.json).
LLAVA_LLAMA3_CONFIG = dict(
    vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001,
)
CLIP_L_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    # eos_token_id 2 is openai's legacy value: the pooler then takes the state at argmax(input_ids), the first EOS.
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# Files we write that are not full size (the demo's tiny encoders) keep their config in the metadata.
CONFIG_METADATA_KEY = "musubi_tuner.text_encoder_config"

# LLM weights stored in fp8 with --fp8_llm: the decoder layers' Linears (LlamaModel names).
LLM_FP8_WEIGHTS = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def crop_start_of(tokenizer: TextTokenizer, template: str = PROMPT_TEMPLATE_VIDEO) -> int:
    """Number of tokens before the user prompt (BOS included): 95 for the real template and tokenizer."""
    return len(tokenizer.ids(template[: template.index("{}")]))


# ----------------------------------------------------------------------------------------------- encoders


class LLMTextEncoder:
    """The LLM side: prompts -> (states (B, 256, hidden) in `dtype`, mask (B, 256) int64).

    `skip_padding`: run the model only up to the longest prompt of the batch and return zeros at the
    padded positions (masked out everywhere downstream). Real positions are unchanged; the padded ones
    differ from musubi-tuner's caches, so it is off by default.
    """

    def __init__(self, model: LlamaModel, tokenizer: TextTokenizer, dtype: torch.dtype, path: Path,
                 skip_padding: bool = False):
        self.model, self.tokenizer, self.dtype, self.path = model, tokenizer, dtype, path
        self.crop_start = crop_start_of(tokenizer)
        self.max_length = self.crop_start + LLM_MAX_LENGTH
        self.skip_padding = skip_padding
        self.told_cut = False
        self.prompts_seen = self.prompts_cut = 0  # over the encoder's life: cut_summary

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def to(self, device: torch.device | str) -> "LLMTextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Template applied; ids and mask (B, crop_start + 256) int64."""
        return self.tokenizer([PROMPT_TEMPLATE_VIDEO.format(p) for p in prompts], self.max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        if not prompts:
            return (torch.zeros(0, LLM_MAX_LENGTH, self.hidden_size, dtype=self.dtype, device=self.device),
                    torch.zeros(0, LLM_MAX_LENGTH, dtype=torch.int64, device=self.device))
        ids, mask = self.tokenize(prompts)
        cut = [p for p in prompts if len(self.tokenizer.ids(PROMPT_TEMPLATE_VIDEO.format(p))) > self.max_length]
        self.prompts_seen, self.prompts_cut = self.prompts_seen + len(prompts), self.prompts_cut + len(cut)
        if cut and not self.told_cut:  # once per encoder: a caching run of long captions is not a wall of warnings
            self.told_cut = True
            logger.warning("prompts longer than the LLM's %d tokens are cut there (as in musubi-tuner), e.g. %r (the count "
                           "follows at the end)", LLM_MAX_LENGTH, cut[0][:60] + "...")
        ids, mask = ids.to(self.device), mask.to(self.device)
        length = int(mask.sum(dim=1).max()) if self.skip_padding else self.max_length
        states = self.model(input_ids=ids[:, :length], attention_mask=mask[:, :length], use_cache=False).last_hidden_state
        if length < self.max_length:
            states = nn.functional.pad(states, (0, 0, 0, self.max_length - length)) * mask[..., None].to(states.dtype)
        return states[:, self.crop_start:].to(self.dtype), mask[:, self.crop_start:]

    def cut_summary(self) -> str | None:
        """How many of the prompts encoded so far were cut at the LLM's length (the first batch's count was all it said)."""
        if not self.prompts_cut:
            return None
        return (f"{self.prompts_cut:,} of {self.prompts_seen:,} prompts were longer than the LLM's {LLM_MAX_LENGTH} tokens: "
                "the text past them is not read")


class CLIPTextEncoder:
    """The CLIP-L side: prompts -> (pooled (B, 768) in `dtype`, mask (B, 77) int64)."""

    def __init__(self, model: CLIPTextModel, tokenizer: TextTokenizer, dtype: torch.dtype, path: Path):
        self.model, self.tokenizer, self.dtype, self.path = model, tokenizer, dtype, path
        self.max_length = CLIP_MAX_LENGTH
        self.prompts_seen = self.prompts_cut = 0  # over the encoder's life: cut_summary

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def to(self, device: torch.device | str) -> "CLIPTextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(list(prompts), self.max_length)

    def cut_summary(self) -> str | None:
        """How many of the prompts encoded so far CLIP-L read only the start of (its 77 tokens; it was never said)."""
        if not self.prompts_cut:
            return None
        return (f"{self.prompts_cut:,} of {self.prompts_seen:,} prompts were longer than CLIP-L's {CLIP_MAX_LENGTH} tokens: its "
                "pooled vector is of their start (as in musubi-tuner)")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        if not prompts:
            return (torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device),
                    torch.zeros(0, CLIP_MAX_LENGTH, dtype=torch.int64, device=self.device))
        cut = sum(len(self.tokenizer.ids(p)) > self.max_length for p in prompts)
        self.prompts_seen, self.prompts_cut = self.prompts_seen + len(prompts), self.prompts_cut + cut
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pooled = self.model(input_ids=ids, attention_mask=mask).pooler_output
        return pooled.to(self.dtype), mask


# ----------------------------------------------------------------------------------------------- weight files


class WeightFiles:
    """The tensors of a text encoder as one key space: a single file, or every weight file of an HF folder."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = require_present(path, what)
        files = _folder_weight_files(self.path) if self.path.is_dir() else [self.path]
        # subdict keys: so that a pickled DiT (`module`) passed by mistake is recognised as one
        self.files = [StateDictFile(f, what=what, subdict_keys=("module", "state_dict")) for f in files]
        self.owner: dict[str, StateDictFile] = {}  # key -> the file that holds it
        for f in self.files:
            for k in f.keys():
                if k in self.owner:  # (the file sorted last won: a stray copy in the folder replaced the model, unsaid)
                    raise UserError(f"{self.path}: {k} is in two of its files, {self.owner[k].path.name} and {f.path.name}; "
                                    "keep the model's own files in the folder (a copy or an older version beside them is "
                                    "read too)")
                self.owner[k] = f
        self.metadata = self.files[0].metadata if len(self.files) == 1 else {}

    def keys(self) -> list[str]:
        return list(self.owner)

    def __contains__(self, key: str) -> bool:
        return key in self.owner

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: f.shape(k) for k, f in self.owner.items()}

    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The tensor, refused when it holds NaN or infinity (StateDictFile.finite): a damaged text encoder made caches
        with a channel stored as 0, or NaN sample prompts blamed on the LoRA."""
        f = self.owner[key]
        return f.finite(key, f.get(key, dtype, device), "compute in bfloat16 or float32")

    def float_dtype(self, key: str) -> torch.dtype:
        return self.owner[key].dtype(key)


def _folder_weight_files(folder: Path) -> list[Path]:
    """An HF folder's weight files: the shards an index names, else model.safetensors or pytorch_model.bin (as transformers
    reads the folder), else every safetensors file, else `.bin` files."""
    entries = list_folder(folder, "text encoder folder")  # (one that cannot be listed is not one without weights, nor
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):  # an index it could not read: fuzz_as 2)
        if (folder / index).is_file():
            return _index_shards(folder, folder / index)
    # (a weight file that is a looping link, a folder or a FIFO is named as what it is: it was "no weight files")
    for single in ("model.safetensors", "pytorch_model.bin"):  # what transformers reads without an index
        if any(p.name == single for p in entries):
            return [require_file(folder / single, "text encoder weight file")]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        named = [p for p in entries if fnmatch.fnmatchcase(p.name, pattern)]
        found = [p for p in named if p.is_file()]
        if found:
            return found
        if named:
            require_file(named[0], "text encoder weight file")
    raise UserError(f"{folder}: no weight files in this folder (expected *.safetensors or pytorch_model*.bin)")


def _index_shards(folder: Path, index: Path) -> list[Path]:
    """The shard files a weight index names (`weight_map`: tensor name -> file name), each a file inside `folder`."""
    weight_map = read_json(index).get("weight_map")
    fix = "restore the index from the model's download"
    if not isinstance(weight_map, dict):
        found = "no weight_map" if weight_map is None else f"weight_map is {json_type_name(weight_map)}"
        raise UserError(f"{index}: {found}, where an object (tensor name -> shard file) is expected; {fix}")
    if not weight_map:
        raise UserError(f"{index}: weight_map is empty: the index names no shard files; {fix}")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"{index}: weight_map[{key!r}] is {json_type_name(name)}, not a shard file name; {fix}")
        if _leaves_folder(name):
            raise UserError(f"{index}: weight_map[{key!r}] = {name!r} is not a file in {folder} (a shard must sit beside "
                            f"the index); {fix}")
    shards = sorted({folder / name for name in weight_map.values()})
    for shard in shards:  # (a shard that is a folder or a looping link is named as what it is, not as missing)
        if os.path.lexists(shard):
            require_file(shard, "weight shard", f"named by {index.name}")
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise UserError(f"{folder}: {index.name} names shards that are missing: {', '.join(missing[:3])}")
    return shards


def _leaves_folder(name: str) -> bool:
    """Whether a file name from an index points outside its folder: an absolute path, a drive, or a `..` part (checked
    by its words, not by resolving links: a Hugging Face cache's shards are links into its blobs folder)."""
    if "\0" in name:
        return True
    return any(p.is_absolute() or p.anchor or ".." in p.parts for p in (PurePosixPath(name), PureWindowsPath(name)))


def key_prefix(keys: list[str], anchor: str) -> str | None:
    """The key prefix under which `anchor` sits (`model.` in LlamaForCausalLM files), shortest first."""
    found = [k[: -len(anchor)] for k in keys if k == anchor or k.endswith("." + anchor)]
    return min(found, key=len) if found else None


def plan_keys(model_shapes: dict[str, tuple[int, ...]], file_shapes: dict[str, tuple[int, ...]], prefix: str,
              source: str, what: str) -> dict[str, str]:
    """model key -> file key (`prefix + key`), checking that every tensor the model needs is there with its shape."""
    plan = {k: prefix + k for k in model_shapes}
    missing = [f for f in plan.values() if f not in file_shapes]
    if missing:
        raise UserError(f"{source}: not a complete {what}: {len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    for k, f in plan.items():
        if tuple(file_shapes[f]) != tuple(model_shapes[k]):
            raise UserError(f"{source}: tensor {f} has shape {list(file_shapes[f])}, expected {list(model_shapes[k])} "
                            f"for this {what}")
    return plan


# What transformers / huggingface_hub raise for a config value they refuse (types, a head count that does not divide
# the hidden size, a negative width...); their StrictDataclass errors are Exceptions of their own.
try:
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # an older huggingface_hub: transformers' configs then raise TypeError / ValueError only
    _StrictDataclassError = ValueError
CONFIG_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, ZeroDivisionError,
                 RuntimeError, _StrictDataclassError)


def _read_config(weights: WeightFiles, config_class, full_size: dict, model_type: str, what: str):
    """(config, where it came from) from the folder's config.json (a whole llava/CLIP config gives its text part),
    else the file's metadata, else the full-size config. Values transformers refuses are one UserError naming the
    file and the field."""
    config_file = weights.path / "config.json"
    if weights.path.is_dir() and (config_file.exists() or config_file.is_symlink()):  # (a broken link is named by read_json)
        raw = read_json(config_file)
        if raw.get("model_type") == "clip":
            from transformers import CLIPConfig

            config = make_config(lambda d: CLIPConfig.from_dict(d).text_config, raw, str(config_file), what)
        else:
            source, part = str(config_file), raw
            if "text_config" in raw:
                source, part = f"{config_file}: text_config", raw["text_config"]
                if not isinstance(part, dict):
                    raise UserError(f"{source} is {json_type_name(part)}, where an object is expected; restore config.json "
                                    "from the model's download")
            config = make_config(lambda d: config_class(**d), part, source, what)
        if config.model_type != model_type:
            raise UserError(f"{config_file}: model_type {config.model_type!r} is not a {what} ({model_type!r})")
        return config, str(config_file)
    if CONFIG_METADATA_KEY in weights.metadata:
        source = f"{weights.path}: metadata {CONFIG_METADATA_KEY}"
        raw = parse_json(weights.metadata[CONFIG_METADATA_KEY], source)
        return make_config(lambda d: config_class(**d), raw, source, what), source
    return config_class(**full_size), f"the full-size {what} config"


def make_config(build, raw: dict, source: str, what: str):
    """build(raw), its refusal of a value a one-line UserError naming `source` and the field."""
    try:
        return build(raw)
    except CONFIG_ERRORS as e:
        field, cause = _refused_field(build, raw, e)
        where = f"{field}: " if field else ""
        raise UserError(f"{source}: not a usable {what} config ({where}{cause}); correct the value or restore the "
                        "config from the model's download") from None


def _refused_field(build, raw: dict, error: Exception) -> tuple[str | None, str]:
    """(the field whose value `build` refuses, if one can be named; the refusal in one short line).

    huggingface_hub names the field of a wrong type; a check across fields (heads dividing the hidden size) names
    none, so each field is tried alone on the defaults: the first refused alone is the one named."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = (lines[-1] if lines else type(error).__name__)[:200]
    named = re.search(r"field '([^']+)'", str(error))
    if named and named.group(1) in raw:
        return named.group(1), cause
    for key, value in raw.items():
        try:
            build({key: value})
        except CONFIG_ERRORS:
            return key, cause
        except Exception:  # noqa: BLE001 - a probe only; the original refusal is what is reported
            continue
    return (named.group(1) if named else None), cause


def _build_model(build, config, source: str, what: str):
    """The model of `config` on meta; a config transformers accepts but cannot build a model of is a UserError too."""
    try:
        return build(config)
    except CONFIG_ERRORS as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{source}: not a usable {what} config: it gives no model ({type(e).__name__}: "
                        f"{(lines[-1] if lines else '')[:160]}); correct it or restore it from the model's download") from None


def check_float_weights(weights: WeightFiles, file_keys, what: str) -> None:
    """Every tensor a text encoder is built from is floating point (fp8 included): integer or bool weights are a
    damaged or foreign file, and would be cast into a model that computes garbage."""
    for key in file_keys:
        dtype = weights.float_dtype(key)
        if not dtype.is_floating_point:
            raise UserError(f"{weights.owner[key].path}: tensor {key} is {str(dtype).removeprefix('torch.')}; a {what}'s "
                            "weights are floating point (the file is damaged or not a model): restore it from the model's "
                            "download")


def _load_into(model: nn.Module, weights: WeightFiles, plan: dict[str, str], dtype: torch.dtype, device,
               fp8_keys: set[str] = frozenset()) -> None:
    """Read each tensor into a model built on meta; `fp8_keys` become float8 e4m3fn with per-row scales."""
    state, scales = {}, {}
    for key, file_key in plan.items():
        scale_key = file_key.removesuffix("weight") + "scale_weight"   # ComfyUI's scaled-fp8 files
        scale = weights.get(scale_key, torch.float32) if scale_key in weights else None
        if scale is not None and scale.numel() != 1:  # (a RuntimeError of broadcasting; a per-row one read two ways)
            raise UserError(f"{weights.owner[scale_key].path}: {scale_key} has shape {list(scale.shape)}; a scaled-fp8 file's "
                            "scale_weight is one number per weight")
        if key in fp8_keys:
            raw = weights.get(file_key, device=device)
            weight, row_scale = quantize_rows(raw) if scale is None else (raw.to(FP8_DTYPE), None)
            if scale is not None:
                row_scale = scale.to(device).reshape(-1).expand(weight.shape[0]).contiguous()
            state[key], scales[key] = weight, row_scale
        elif scale is not None:
            state[key] = (weights.get(file_key, torch.float32, device) * scale.to(device)).to(dtype)
        else:
            state[key] = weights.get(file_key, dtype, device)
    assign_weights(model, state, scales, device)


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor | None], device) -> None:
    """Give a model built on meta its tensors: `state` for every parameter, the fp8 ones with their per-row
    float32 `scales` (those Linears become `Fp8Linear`s); frozen, in eval mode. The non-persistent buffers (rotary
    frequencies, position ids) were built on the CPU: they move to `device` (None: they stay; the planner's fake
    weights cannot move)."""
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model.to(device)
    for key, scale in scales.items():
        make_fp8_linear(model.get_submodule(key.removesuffix(".weight")), scale)
    model.requires_grad_(False)
    model.eval()


def _default_dtype(weights: WeightFiles, key: str, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    stored = weights.float_dtype(key)
    return stored if stored in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


# ----------------------------------------------------------------------------------------------- LLM


def build_llm(config: LlamaConfig) -> LlamaModel:
    """A LlamaModel holding only what HunyuanVideo reads: all but the last `HIDDEN_STATE_SKIP_LAYER`
    decoder layers and no final norm, so `last_hidden_state` is `hidden_states[-3]` of the full model.
    Parameters on the meta device (buffers real), to be filled by loading."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(config)
    config.num_hidden_layers -= HIDDEN_STATE_SKIP_LAYER
    with init_empty_weights():
        model = LlamaModel(config)
    model.norm = nn.Identity()
    return model


def cast_rope_buffers(model: LlamaModel, dtype: torch.dtype) -> None:
    """Round the rotary frequencies to `dtype`, as a whole-module `model.to(dtype)` does (musubi-tuner's cast).

    transformers computes the rotary angles in float32 from `inv_freq` either way; rounded to fp16 first, Llama 3's
    frequencies are off by up to 5e-4 relative (0.9% for the slowest, subnormal in fp16): angles at position 350 by
    up to 0.057 rad."""
    rotary = model.rotary_emb
    for name in ("inv_freq", "original_inv_freq"):
        if hasattr(rotary, name):
            setattr(rotary, name, getattr(rotary, name).to(dtype))


def load_text_encoder1(path: str | os.PathLike, dtype: torch.dtype | None = torch.float16, device="cpu",
                       fp8: bool = False, tokenizer_path: str | os.PathLike | None = None,
                       skip_padding: bool = False, cast_rope: bool = False) -> LLMTextEncoder:
    """The LLM from an HF folder or a single file. dtype None keeps the stored dtype. fp8: decoder-layer
    Linear weights stored in float8 e4m3fn with per-row scales and computed in bf16 (embedding and norms
    in bf16); the states are still returned in `dtype`. cast_rope: the rotary frequencies rounded to `dtype`
    too, as musubi-tuner's cast of the whole module does (its fp16 / bf16 caches bit for bit; see
    docs/text_encoders.md); by default they stay float32, the more exact."""
    weights, prefix, config, tokenizer, model, plan = _open_llm(path, tokenizer_path)
    dtype = _default_dtype(weights, prefix + "embed_tokens.weight", dtype)
    compute_dtype, fp8_keys = llm_weight_storage(plan, dtype, fp8)
    _load_into(model, weights, plan, compute_dtype, device, fp8_keys)
    if cast_rope:
        cast_rope_buffers(model, dtype)
    return LLMTextEncoder(model, tokenizer, dtype, weights.path, skip_padding=skip_padding)


def llm_weight_storage(keys, dtype: torch.dtype, fp8: bool) -> tuple[torch.dtype, set[str]]:
    """(the dtype the LLM computes in and keeps its other weights in, the weights it stores in fp8) for states
    wanted in `dtype`: --fp8_llm stores the decoder layers' Linear weights in fp8 and computes in bf16."""
    if not fp8:
        return dtype, set()
    return torch.bfloat16, {k for k in keys if LLM_FP8_WEIGHTS.fullmatch(k)}


def check_text_encoder1(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> LlamaConfig:
    """Everything load_text_encoder1 checks (files, keys, shapes, tokenizer) without reading weights, so a wrong
    --text_encoder1 fails before hours of other work; its config (what the planner builds the model from)."""
    return _open_llm(path, tokenizer_path)[2]


@contextlib.contextmanager
def _blamed_on_a_missing_config(weights: WeightFiles, config_source: str) -> Iterator[None]:
    """A folder's weights that do not fit the config, when its config.json is missing: the full-size config was assumed,
    and the weights were blamed ("has 4 decoder layers, the config says 32") for what the missing file did."""
    try:
        yield
    except UserError as e:
        if weights.path.is_dir() and config_source.startswith("the full-size"):
            raise UserError(f"{e} (its config.json is missing, and the full-size config was assumed: restore config.json from "
                            "the model's download)") from None
        raise


def _open_llm(path, tokenizer_path):
    weights = WeightFiles(path, "text encoder 1 (LLM)")
    keys = weights.keys()
    prefix = key_prefix(keys, "embed_tokens.weight")
    if prefix is None:
        other = what_weights_are(keys)
        raise UserError(f"{weights.path}: not a Llama text encoder (no embed_tokens.weight)"
                        + (f"; this looks like {other}" if other else ""))
    config, config_source = _read_config(weights, LlamaConfig, LLAVA_LLAMA3_CONFIG, "llama", "Llama text encoder")
    file_layers = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k))}
    with _blamed_on_a_missing_config(weights, config_source):
        if len(file_layers) != config.num_hidden_layers:
            raise UserError(f"{weights.path}: has {len(file_layers)} decoder layers, the config says {config.num_hidden_layers}")
    tokenizer = load_llm_tokenizer(weights.path, tokenizer_path)
    if tokenizer.max_id() >= config.vocab_size:
        raise UserError(f"{tokenizer.source}: tokenizer ids go up to {tokenizer.max_id()} but {weights.path} "
                        f"has only {config.vocab_size} embeddings; the tokenizer does not belong to this model")
    model = _build_model(build_llm, config, config_source, "Llama text encoder")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with _blamed_on_a_missing_config(weights, config_source):
        plan = plan_keys(shapes, weights.shapes(), prefix, str(weights.path), "Llama text encoder")
    check_float_weights(weights, plan.values(), "text encoder")
    return weights, prefix, config, tokenizer, model, plan


# ----------------------------------------------------------------------------------------------- CLIP


def build_clip(config: CLIPTextConfig) -> CLIPTextModel:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return CLIPTextModel(config)


def clip_file_key(model_key: str, prefix: str) -> str:
    """Files name CLIP's tensors `text_model.*`; transformers 5 names them without it in memory, 4.x with it."""
    return prefix + model_key.removeprefix("text_model.")


def load_text_encoder2(path: str | os.PathLike, dtype: torch.dtype | None = torch.float16, device="cpu",
                       tokenizer_path: str | os.PathLike | None = None) -> CLIPTextEncoder:
    """CLIP-L's text model from an HF folder (a whole CLIPModel is fine) or a single file."""
    weights, prefix, tokenizer, model, plan = _open_clip(path, tokenizer_path)
    dtype = _default_dtype(weights, prefix + "embeddings.token_embedding.weight", dtype)
    _load_into(model, weights, plan, dtype, device)
    return CLIPTextEncoder(model, tokenizer, dtype, weights.path)


def check_text_encoder2(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                        values_in: torch.dtype | None = None) -> CLIPTextConfig:
    """Everything load_text_encoder2 checks, without reading weights; its config. `values_in`: its weights are read too
    and checked finite in that dtype, as its loading does (CLIP-L is 250 MB, a second): text caching runs CLIP after the
    whole LLM pass, which a damaged CLIP file had already made rewrite every cache (fuzz_ba 4)."""
    weights, _, _, model, plan = _open_clip(path, tokenizer_path)
    if values_in is not None:
        for key in plan.values():
            weights.get(key, values_in)
    return model.config


def _open_clip(path, tokenizer_path):
    weights = WeightFiles(path, "text encoder 2 (CLIP-L)")
    keys = weights.keys()
    prefix = key_prefix(keys, "embeddings.token_embedding.weight")
    if prefix is None:
        other = what_weights_are(keys)
        raise UserError(f"{weights.path}: not a CLIP text encoder (no embeddings.token_embedding.weight)"
                        + (f"; this looks like {other}" if other else ""))
    config, config_source = _read_config(weights, CLIPTextConfig, CLIP_L_CONFIG, "clip_text_model", "CLIP text model")
    tokenizer = load_clip_tokenizer(weights.path, tokenizer_path)
    if tokenizer.max_id() >= config.vocab_size:
        raise UserError(f"{tokenizer.source}: tokenizer ids go up to {tokenizer.max_id()} but {weights.path} "
                        f"has only {config.vocab_size} embeddings; the tokenizer does not belong to this model")
    model = _build_model(build_clip, config, config_source, "CLIP text model")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = {k: clip_file_key(k, prefix) for k in shapes}
    with _blamed_on_a_missing_config(weights, config_source):
        plan_keys({plan[k]: s for k, s in shapes.items()}, weights.shapes(), "", str(weights.path), "CLIP text model")
    check_float_weights(weights, plan.values(), "text encoder")
    return weights, prefix, tokenizer, model, plan
