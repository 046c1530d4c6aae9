"""Tokenizers of the two text encoders, found and built without a network.

Where a tokenizer comes from, in order (the first that exists wins):
1. the folder the user names (`tokenizer_path`);
2. the text encoder's own HF folder (`tokenizer.json`, or CLIP's `vocab.json` + `merges.txt`);
3. files beside it: `<stem>_tokenizer/` next to a single file (`llava_llama3_fp16_tokenizer/`), or the
   diffusers sibling of a folder (`text_encoder` -> `tokenizer`, `text_encoder_2` -> `tokenizer_2`);
4. a vocabulary shipped in a PyPI package: Llama 3's `tokenizer.model` in `llama-models`, CLIP's
   `bpe_simple_vocab_16e6.txt.gz` in `open_clip_torch` (also `openai-clip`). These are read as files,
   never imported, so the packages' own dependencies do not matter.

Every tokenizer ends up as a `tokenizers.Tokenizer` with the pipeline of the HF fast tokenizer the
official code uses (same normaliser, pre-tokenizer, BPE, special tokens and post-processor), wrapped
in `TextTokenizer`, which pads and truncates on the right to a fixed length like
`tokenizer(text, padding="max_length", truncation=True, max_length=N)`.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from musubi_tuner.errors import UserError
from musubi_tuner.files import read_small_file, require_file

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- Llama 3

# Llama 3's pre-tokenizer split (the `pat_str` of Meta's tiktoken tokenizer and of the HF tokenizer.json).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_BOS = "<|begin_of_text|>"
# The special tokens that follow the 128,000 BPE tokens, in id order, as named in the llava-llama-3
# tokenizer (Llama 3.0 names), then llava's three additions: 128256 <unk>, 128257 <image>, 128258 <pad>.
LLAMA3_SPECIAL_TOKENS = (
    [LLAMA3_BOS, "<|end_of_text|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
)
LLAVA_ADDED_TOKENS = ["<unk>", "<image>", "<pad>"]
LLAVA_PAD = "<pad>"
# Tokens the HunyuanVideo prompt template needs; a Llama tokenizer without them is the wrong one.
LLAMA3_TEMPLATE_TOKENS = (LLAMA3_BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# ----------------------------------------------------------------------------------------------- CLIP

CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI's BPE file holds more merges than CLIP uses: 49408 tokens = 256 bytes x 2 (with and without
# the end-of-word mark) + 48894 merges + the two special tokens.
CLIP_NUM_MERGES = 49408 - 512 - 2

# PyPI packages that ship the vocabularies, as (import name, file inside it, pip arguments).
# open_clip_torch's dependencies (torchvision, timm) are not needed to read one file, hence --no-deps.
LLAMA3_PACKAGED = (("llama_models", "llama3/tokenizer.model", "llama-models"),)
CLIP_PACKAGED = (
    ("open_clip", "bpe_simple_vocab_16e6.txt.gz", "--no-deps open_clip_torch"),
    ("clip", "bpe_simple_vocab_16e6.txt.gz", "openai-clip"),
)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# ----------------------------------------------------------------------------------------------- the wrapper


class TextTokenizer:
    """A tokenizer that turns a batch of texts into fixed-length ids and masks.

    `tokenizer` must add its own special tokens (BOS for Llama; BOS/EOS for CLIP) through its post-processor.
    """

    def __init__(self, tokenizer: Tokenizer, pad_token: str, source: str):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise UserError(f"{source}: the tokenizer has no padding token {pad_token!r}")
        # Some tokenizer.json files carry padding/truncation settings; lengths are ours to set.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_token, self.pad_id = pad_token, pad_id
        self.source = source
        self._fixed: dict[int, Tokenizer] = {}

    def ids(self, text: str) -> list[int]:
        """Token ids of one text with the special tokens, unpadded and untruncated."""
        return self.tokenizer.encode(text).ids

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, max_length) int64 and attention mask (B, max_length) int64, right-padded and right-truncated."""
        fixed = self._fixed.get(max_length)
        if fixed is None:
            # A copy configured once per length; the shared tokenizer stays unpadded for `ids`.
            fixed = Tokenizer.from_str(self.tokenizer.to_str())
            fixed.enable_truncation(max_length)
            fixed.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
            self._fixed[max_length] = fixed
        encodings = fixed.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids.reshape(len(encodings), max_length), mask.reshape(len(encodings), max_length)

    def max_id(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True) - 1

    def __repr__(self) -> str:
        return f"TextTokenizer({self.source})"


# ----------------------------------------------------------------------------------------------- builders


def llama3_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: list[str]) -> Tokenizer:
    """Llama 3's HF pipeline: byte-level BPE (whole-word lookups first, as tiktoken does), its split
    regex, `special_tokens` appended after the vocabulary in order, and BOS added in front of every text."""
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    _add_bos(tokenizer, LLAMA3_BOS)
    return tokenizer


def llama3_tokenizer_from_tiktoken(path: str | os.PathLike) -> Tokenizer:
    """The llava-llama-3 tokenizer from Meta's `tokenizer.model` (base64 token, rank per line).

    transformers' tiktoken converter turns the ranks into a vocabulary and merges; the special tokens
    are the llava tokenizer's, so ids, BOS and padding equal those of the official `text_encoder` folder.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        # Read the rank file ourselves so the `tiktoken` package is not needed.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(tiktoken_url)

    vocab, merges = _Converter(str(path)).extract_vocab_merges_from_model(str(path))
    return llama3_tokenizer(vocab, merges, LLAMA3_SPECIAL_TOKENS + LLAVA_ADDED_TOKENS)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """CLIP's HF fast-tokenizer pipeline: NFC, collapsed whitespace, lower case; CLIP's split regex;
    byte-level BPE with `</w>` marking word ends; `<|startoftext|> ... <|endoftext|>` around every text."""
    tokenizer = Tokenizer(BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=CLIP_EOS))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (CLIP_BOS, CLIP_EOS)])
    tokenizer.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False, add_prefix_space=False)
    return tokenizer


def clip_vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: the 256 byte symbols, the same with `</w>`, one token per merge, BOS, EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}


def read_clip_bpe_file(path: str | os.PathLike, num_merges: int = CLIP_NUM_MERGES) -> list[tuple[str, str]]:
    """Merges from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a version line, then one merge per line)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1:1 + num_merges] if line]


def clip_tokenizer_from_bpe_file(path: str | os.PathLike, num_merges: int = CLIP_NUM_MERGES) -> Tokenizer:
    merges = read_clip_bpe_file(path, num_merges)
    return clip_tokenizer(clip_vocab_from_merges(merges), merges)


def _add_bos(tokenizer: Tokenizer, bos: str) -> None:
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


# ----------------------------------------------------------------------------------------------- HF folders


_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                    bool: "true or false", type(None): "null"}


def json_type_name(value) -> str:
    """How JSON names the type of a parsed value ("an object", "an array", ...), for messages."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_json(text: str, source: str, expect: type = dict):
    """JSON text as a value of type `expect` (dict: a JSON object); a one-line UserError naming `source` if it is
    not JSON or holds another JSON type."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # (a JSONDecodeError is a ValueError; so is an integer of 4300+ digits)
        raise UserError(f"{source}: not valid JSON ({str(e)[:160]}); the file is damaged: restore it from the "
                        "model's download") from None
    if not isinstance(value, expect) or (expect in (int, float) and isinstance(value, bool)):
        want = _JSON_TYPE_NAMES.get(expect, expect.__name__)
        raise UserError(f"{source}: holds {json_type_name(value)} where {want} is expected; the file is damaged: "
                        "restore it from the model's download")
    return value


def read_json(path: Path, expect: type = dict):
    """Every JSON file of a model or tokenizer folder is read here: its value, checked to be of type `expect`
    (dict: a JSON object), or, if the file does not exist, {} (None when `expect` is not dict); a one-line UserError
    naming the file if it is a folder, unreadable, not UTF-8 JSON or of another JSON type."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a JSON file; put the file from the model's download there")
    if not path.exists() and not path.is_symlink():  # (a broken or looping link is named by read_small_file)
        return {} if expect is dict else None
    data = read_small_file(path, "JSON file")  # (a FIFO in its place was read, and the command waited for ever)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start}); the file is damaged: "
                        "restore it from the model's download") from None
    return parse_json(text, str(path), expect)


def _configured_token(folder: Path, name: str) -> str | None:
    """A special token named in tokenizer_config.json or special_tokens_map.json (str or {"content": ...})."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        value = read_json(folder / file).get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


# Files that come with a tokenizer: a folder holding one of them was meant to hold the tokenizer itself.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_file_problem(folder: Path, kind_name: str) -> str | None:
    """Why `folder` does not give the tokenizer it was meant to hold (a one-line message naming the file), or None
    when it holds one, or shows no sign of being meant to (no tokenizer.json and no tokenizer_config.json beside)."""
    path = folder / "tokenizer.json"
    if os.path.lexists(path) and not path.is_file():  # (a FIFO was called a folder; a looping link was not named)
        try:
            require_file(path, f"{kind_name} tokenizer file")
        except UserError as e:
            return f"{e}; put the tokenizer.json of the model's download there"
    if _has_tokenizer(folder):
        return None
    companions = [name for name in TOKENIZER_COMPANIONS if (folder / name).exists()]
    if companions:
        return (f"{path}: not found, though {folder} holds {companions[0]} (the {kind_name} tokenizer's other "
                "files); restore tokenizer.json from the model's download")
    return None


MAX_TOKENIZER_BYTES = 2**30  # Llama 3's tokenizer.json is 9 MB; a vocabulary of millions of tokens stays below this


def _read_tokenizer_json(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    # (read here: the tokenizers library takes a name as UTF-8 only, and a FIFO in its place would be waited on)
    data = read_small_file(path, "tokenizer file", max_bytes=MAX_TOKENIZER_BYTES)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
        raise UserError(f"{path}: unreadable tokenizer file ({str(e)[:160]})") from None


def llama_tokenizer_from_folder(folder: Path) -> TextTokenizer:
    if not (folder / "tokenizer.json").is_file():
        problem = _tokenizer_file_problem(folder, "Llama 3")
        raise UserError(problem or f"{folder / 'tokenizer.json'}: not found (the Llama 3 tokenizer of the text_encoder "
                                   "folder); restore it from the model's download")
    tokenizer = _read_tokenizer_json(folder)
    missing = [t for t in LLAMA3_TEMPLATE_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise UserError(f"{folder}: this tokenizer is not Llama 3's (it lacks {', '.join(missing)}); "
                        "text encoder 1 needs the llava-llama-3 tokenizer")
    bos_id = tokenizer.token_to_id(LLAMA3_BOS)
    if tokenizer.encode("a").ids[:1] != [bos_id]:
        # HF's Llama tokenizers add BOS unless told not to (add_bos_token); the crop of 95 counts it.
        _add_bos(tokenizer, LLAMA3_BOS)
    pad = _configured_token(folder, "pad_token")
    if pad is None or tokenizer.token_to_id(pad) is None:
        pad = LLAVA_PAD if tokenizer.token_to_id(LLAVA_PAD) is not None else "<|end_of_text|>"
        logger.info("%s: no pad token configured; padding with %s", folder, pad)
    return TextTokenizer(tokenizer, pad, source=str(folder))


def clip_tokenizer_from_folder(folder: Path) -> TextTokenizer:
    if (folder / "tokenizer.json").is_file():
        tokenizer = _read_tokenizer_json(folder)
    elif (folder / "tokenizer.json").exists():
        raise UserError(_tokenizer_file_problem(folder, "CLIP"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = _clip_tokenizer_from_vocab_merges(folder)
    else:
        raise UserError(f"{folder}: no CLIP tokenizer (tokenizer.json, or vocab.json and merges.txt); restore them from "
                        "the model's download")
    if tokenizer.token_to_id(CLIP_BOS) is None or tokenizer.token_to_id(CLIP_EOS) is None:
        raise UserError(f"{folder}: this tokenizer is not CLIP's (no {CLIP_BOS} / {CLIP_EOS}); "
                        "text encoder 2 needs the CLIP-L tokenizer")
    pad = _configured_token(folder, "pad_token")
    if pad is None or tokenizer.token_to_id(pad) is None:
        pad = CLIP_EOS
    return TextTokenizer(tokenizer, pad, source=str(folder))


def _clip_tokenizer_from_vocab_merges(folder: Path) -> Tokenizer:
    """CLIP's tokenizer from `vocab.json` (token -> id) and `merges.txt` (a version line, then two tokens a line)."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab = read_json(vocab_path)
    bad = next((k for k, v in vocab.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
    if bad is not None:
        raise UserError(f"{vocab_path}: token {bad!r} has id {json.dumps(vocab[bad])[:40]}, not a token id (an integer "
                        "from 0); the file is damaged: restore it from the model's download")
    for token in (CLIP_BOS, CLIP_EOS):
        if token not in vocab:
            raise UserError(f"{vocab_path}: has no {token}; this is not CLIP's vocabulary (text encoder 2 needs CLIP-L's)")
    try:
        lines = read_small_file(merges_path, "merges file", max_bytes=MAX_TOKENIZER_BYTES).decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{merges_path}: cannot read ({str(e)[:120]}); restore it from the model's download") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if line and not line.startswith("#version"):
            merge = tuple(line.split())
            if len(merge) != 2:
                raise UserError(f"{merges_path}: line {number} is not two tokens ({line[:40]!r}); the file is damaged: "
                                "restore it from the model's download")
            merges.append(merge)
    try:
        return clip_tokenizer(vocab, merges)
    except Exception as e:  # the tokenizers library raises plain Exceptions for merges whose tokens are not in the vocabulary
        raise UserError(f"{merges_path}: does not fit {vocab_path.name} ({str(e)[:120]}); restore both from the model's "
                        "download") from None


# ----------------------------------------------------------------------------------------------- finding one


@dataclass(frozen=True)
class _Kind:
    name: str                                   # for messages
    from_folder: Callable[[Path], TextTokenizer]
    from_package: Callable[[Path], Tokenizer]   # the packaged vocabulary file -> tokenizer
    packaged: tuple[tuple[str, str, str], ...]
    pad: str


LLAMA = _Kind("Llama 3", llama_tokenizer_from_folder, llama3_tokenizer_from_tiktoken, LLAMA3_PACKAGED, LLAVA_PAD)
CLIP = _Kind("CLIP", clip_tokenizer_from_folder, clip_tokenizer_from_bpe_file, CLIP_PACKAGED, CLIP_EOS)


def packaged_vocabulary(packaged: tuple) -> tuple[Path, str] | None:
    """(file, package) for the first installed package that ships the vocabulary; the package is not imported."""
    for module, relative, _ in packaged:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        for root in (spec.submodule_search_locations or []) if spec else []:
            path = Path(root) / relative
            if path.is_file():
                return path, module
    return None


def beside(model_path: Path) -> list[Path]:
    """Folders next to a text encoder where its tokenizer may live."""
    if model_path.is_dir():
        name = model_path.name
        return [model_path.parent / name.replace("text_encoder", "tokenizer")] if "text_encoder" in name else []
    return [model_path.parent / f"{model_path.stem}_tokenizer"]


def find_tokenizer(kind: _Kind, model_path: Path, tokenizer_path: str | os.PathLike | None) -> TextTokenizer:
    if tokenizer_path is not None:
        folder = Path(tokenizer_path)
        if folder.is_file() and folder.name in TOKENIZER_FILES:
            folder = folder.parent
        if not folder.is_dir():
            raise UserError(f"{folder}: tokenizer folder not found")
        return kind.from_folder(folder)
    candidates = ([model_path] if model_path.is_dir() else []) + beside(model_path)
    for folder in candidates:
        if folder.is_dir() and _has_tokenizer(folder):
            return kind.from_folder(folder)
    for folder in candidates:  # a tokenizer meant to be here but missing or damaged is named, not replaced by a vocabulary
        problem = _tokenizer_file_problem(folder, kind.name) if folder.is_dir() else None
        if problem:
            raise UserError(problem)
    found = packaged_vocabulary(kind.packaged)
    if found is not None:
        path, module = found
        logger.info("%s tokenizer for %s: built from %s (package %s)", kind.name, model_path, path, module)
        return TextTokenizer(kind.from_package(path), kind.pad, source=f"{path} ({module})")
    installs = " or ".join(f"`pip install {p}`" for _, _, p in kind.packaged)
    where = candidates[-1] if candidates else model_path
    why = "the folder has no tokenizer files" if model_path.is_dir() else "a single-file text encoder carries none"
    raise UserError(
        f"{model_path}: no {kind.name} tokenizer found ({why}). Put the tokenizer files (tokenizer.json) in "
        f"{where}, pass the official HF folder, or {installs} (the vocabulary it ships is read offline)")


def load_llm_tokenizer(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> TextTokenizer:
    return find_tokenizer(LLAMA, Path(model_path), tokenizer_path)


def load_clip_tokenizer(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> TextTokenizer:
    return find_tokenizer(CLIP, Path(model_path), tokenizer_path)
