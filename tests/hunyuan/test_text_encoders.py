"""The text encoders compute what HunyuanVideo computes, from every file layout, with offline tokenizers."""

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from musubi_tuner.demo import tiny_text_encoders as tiny
from musubi_tuner.errors import UserError
from musubi_tuner.files import StateDictFile, save_safetensors
from musubi_tuner.hunyuan import text_encoders as te
from musubi_tuner.hunyuan import tokenization as tok
from musubi_tuner.hunyuan.fp8 import Fp8Linear

PROMPTS = [
    "A cat walks on the grass, realistic style.",
    "",                                                        # empty caption
    "Two people dance in the rain at night; neon lights! 1234 café",
    "  leading spaces and\nnew lines\tand tabs",
    "it's a dog's life, I'LL say " + "very " * 400,             # truncated
]
# sha256 of PROMPT_TEMPLATE_ENCODE_VIDEO in Tencent/HunyuanVideo hyvideo/constants.py (commit fa14b00).
OFFICIAL_TEMPLATE_SHA256 = "a52f68dde3637b127592fffe9e2483a5d0563987a49db6ddb9b06146f2ba7cb5"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def installed(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    return dict(
        root=root,
        llm_folder=tiny.write_tiny_llm_folder(root / "ckpts" / "text_encoder", seed=1),
        llm_file=tiny.write_tiny_llm_single_file(root / "comfy" / "llava_llama3_fp16.safetensors", seed=1),
        clip_folder=tiny.write_tiny_clip_folder(root / "ckpts" / "text_encoder_2", seed=2),
        clip_file=tiny.write_tiny_clip_single_file(root / "comfy" / "clip_l.safetensors", seed=2),
    )


@pytest.fixture(scope="module")
def llm(files):
    return te.load_text_encoder1(files["llm_folder"], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- template


def test_template_is_the_official_one_byte_for_byte():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    assert hashlib.sha256(te.PROMPT_TEMPLATE_VIDEO.encode()).hexdigest() == OFFICIAL_TEMPLATE_SHA256
    assert te.PROMPT_TEMPLATE_VIDEO == DEFAULT_PROMPT_TEMPLATE["template"]
    assert te.CROP_START == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95


def test_crop_start_is_the_number_of_template_tokens_before_the_prompt(llm):
    ids, mask = llm.tokenize(["a cat"])
    prompt_ids = llm.tokenizer.ids("a cat")[1:]  # without BOS
    eot = llm.tokenizer.tokenizer.token_to_id("<|eot_id|>")
    n = len(prompt_ids)
    assert ids[0, llm.crop_start:llm.crop_start + n + 1].tolist() == prompt_ids + [eot]
    assert ids[0, :llm.crop_start].tolist() == llm.tokenizer.ids(te.PROMPT_TEMPLATE_VIDEO.split("{}")[0])
    assert llm.max_length == llm.crop_start + 256


# ----------------------------------------------------------------------------------------------- tokenizers


def test_llm_tokenizer_equals_transformers_autotokenizer(files, llm):
    reference = AutoTokenizer.from_pretrained(str(files["llm_folder"]), padding_side="right")
    texts = [te.PROMPT_TEMPLATE_VIDEO.format(p) for p in PROMPTS]
    want = reference(texts, padding="max_length", truncation=True, max_length=llm.max_length, return_tensors="pt")
    ids, mask = llm.tokenize(PROMPTS)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert ids.dtype == mask.dtype == torch.int64
    assert mask[4].all() and not mask[0].all()  # the long prompt fills every position, the short one is padded
    assert (ids[0][mask[0] == 0] == llm.tokenizer.tokenizer.token_to_id("<pad>")).all()


def test_padding_and_truncation_saved_in_tokenizer_json_are_ignored(files, tmp_path, llm):
    folder = tiny.write_tiny_llm_tokenizer(tmp_path / "tok")
    saved = tiny.tiny_llm_tokenizer()
    saved.enable_padding(length=40, pad_id=0)
    saved.enable_truncation(40)
    saved.save(str(folder / "tokenizer.json"))
    encoder = te.load_text_encoder1(files["llm_file"], dtype=torch.float32, tokenizer_path=folder)
    assert encoder.crop_start == llm.crop_start
    assert torch.equal(encoder.tokenize(PROMPTS)[0], llm.tokenize(PROMPTS)[0])


@pytest.mark.parametrize("drop_tokenizer_json", [False, True])
def test_clip_tokenizer_equals_transformers(files, tmp_path, drop_tokenizer_json):
    folder = tiny.write_tiny_clip_tokenizer(tmp_path / "tok")
    if drop_tokenizer_json:  # only vocab.json + merges.txt, as in older copies of the openai folder
        (folder / "tokenizer.json").unlink()
    ours = tok.load_clip_tokenizer(files["clip_file"], tokenizer_path=folder)
    reference = AutoTokenizer.from_pretrained(str(files["clip_folder"]))
    want = reference(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids, mask = ours(PROMPTS, 77)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])


def test_tiktoken_rank_file_converts_to_the_same_tokenizer(tmp_path):
    """The packaged-vocabulary path for Llama 3, run offline on the tiny vocabulary in Meta's format."""
    path = tiny.write_tiktoken_file(tiny.tiny_llm_tiktoken_ranks(), tmp_path / "tokenizer.model")
    converted = tok.llama3_tokenizer_from_tiktoken(path)
    reference = tiny.tiny_llm_tokenizer()
    for text in tiny.CORPUS + [te.PROMPT_TEMPLATE_VIDEO.format(p) for p in PROMPTS]:
        assert converted.encode(text).ids == reference.encode(text).ids


def test_clip_bpe_file_converts_to_the_same_tokenizer(tmp_path):
    """The packaged-vocabulary path for CLIP, run offline on the tiny merges in OpenAI's format."""
    path = tiny.write_clip_bpe_file(tiny.tiny_clip_merges(), tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    converted = tok.clip_tokenizer_from_bpe_file(path, num_merges=tiny.TINY_CLIP_MERGES)
    reference = tiny.tiny_clip_tokenizer()
    for text in tiny.CORPUS + PROMPTS:
        assert converted.encode(text).ids == reference.encode(text).ids


@pytest.mark.skipif(not installed("llama_models", "tiktoken"), reason="needs the llama-models extra (and tiktoken)")
def test_packaged_llama3_vocabulary_gives_metas_token_ids_and_crop_95():
    import tiktoken

    path, _ = tok.packaged_vocabulary(tok.LLAMA3_PACKAGED)
    ours = tok.TextTokenizer(tok.llama3_tokenizer_from_tiktoken(path), tok.LLAVA_PAD, "packaged")
    specials = {t: 128000 + i for i, t in enumerate(tok.LLAMA3_SPECIAL_TOKENS)}
    meta = tiktoken.Encoding("llama3", pat_str=tok.LLAMA3_SPLIT_PATTERN, mergeable_ranks=tok.read_tiktoken_ranks(path),
                             special_tokens=specials)
    assert te.crop_start_of(ours) == te.CROP_START == 95
    texts = [te.PROMPT_TEMPLATE_VIDEO.format(p) for p in PROMPTS]
    ids, mask = ours(texts, 95 + 256)
    for row, m, text in zip(ids, mask, texts):
        want = ([128000] + meta.encode(text, allowed_special="all"))[:351]
        assert row[: int(m.sum())].tolist() == want
    # the template's chat tokens and the crop position: <|eot_id|><|start_header_id|>user<|end_header_id|>\n\n | prompt
    assert ids[0, :5].tolist() == [128000, 128006, 9125, 128007, 271]
    assert ids[0, 90:95].tolist() == [128009, 128006, 882, 128007, 271]
    assert ids[1, 95:97].tolist() == [128009, 128258]  # empty caption: <|eot_id|>, then llava's <pad>


@pytest.mark.skipif(not (installed("open_clip") or installed("clip")), reason="needs openai-clip or open_clip_torch (the vocab extra)")
def test_packaged_clip_vocabulary_equals_transformers_clip_tokenizer():
    from transformers import CLIPTokenizer

    path, _ = tok.packaged_vocabulary(tok.CLIP_PACKAGED)
    ours = tok.TextTokenizer(tok.clip_tokenizer_from_bpe_file(path), tok.CLIP_EOS, "packaged")
    merges = tok.read_clip_bpe_file(path)
    vocab = tok.clip_vocab_from_merges(merges)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    reference = CLIPTokenizer(vocab=vocab, merges=merges)
    want = reference(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids, mask = ours(PROMPTS, 77)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert ids[0, :4].tolist() == [49406, 320, 2368, 8192]  # "a cat walks", ids known from openai's vocab.json


# OpenAI's reference tokenizer ships beside the vocabulary in both packages.
REFERENCE_TOKENIZERS = {"open_clip": "tokenizer.py", "clip": "simple_tokenizer.py"}


@pytest.mark.parametrize("package", list(REFERENCE_TOKENIZERS))
def test_packaged_clip_vocabulary_equals_openais_simple_tokenizer(package):
    if not installed(package, "ftfy", "regex"):
        pytest.skip(f"needs {package} (open_clip_torch / openai-clip) and ftfy")
    entry = next(p for p in tok.CLIP_PACKAGED if p[0] == package)
    path, _ = tok.packaged_vocabulary((entry,))
    spec = importlib.util.spec_from_file_location(f"{package}_reference", path.parent / REFERENCE_TOKENIZERS[package])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the file alone: importing open_clip would pull torchvision
    reference = module.SimpleTokenizer(str(path))
    ours = tok.TextTokenizer(tok.clip_tokenizer_from_bpe_file(path), tok.CLIP_EOS, "packaged")
    for prompt in PROMPTS:
        assert ours.ids(prompt)[1:-1] == reference.encode(prompt)


@pytest.mark.skipif("MUSUBI_TEST_LLAVA_TOKENIZER" not in os.environ,
                    reason="set MUSUBI_TEST_LLAVA_TOKENIZER to the official text_encoder folder")
@pytest.mark.skipif(not installed("llama_models"), reason="needs the llama-models extra")
def test_official_llava_folder_tokenizer_equals_the_packaged_one():
    folder = tok.llama_tokenizer_from_folder(Path(os.environ["MUSUBI_TEST_LLAVA_TOKENIZER"]))
    path, _ = tok.packaged_vocabulary(tok.LLAMA3_PACKAGED)
    packaged = tok.TextTokenizer(tok.llama3_tokenizer_from_tiktoken(path), tok.LLAVA_PAD, "packaged")
    texts = [te.PROMPT_TEMPLATE_VIDEO.format(p) for p in PROMPTS]
    assert all(torch.equal(a, b) for a, b in zip(folder(texts, 351), packaged(texts, 351)))


# ----------------------------------------------------------------------------------------------- where tokenizers come from


def test_single_file_uses_the_tokenizer_folder_beside_it(files):
    encoder = te.load_text_encoder1(files["llm_file"], dtype=torch.float32)
    assert encoder.tokenizer.source.endswith("llava_llama3_fp16_tokenizer")


def test_named_tokenizer_folder_wins(files, tmp_path):
    folder = tiny.write_tiny_clip_tokenizer(tmp_path / "my_clip_tokenizer")
    encoder = te.load_text_encoder2(files["clip_file"], dtype=torch.float32, tokenizer_path=folder)
    assert encoder.tokenizer.source == str(folder)


def test_diffusers_layout_finds_the_sibling_tokenizer_folder(files, tmp_path):
    # hunyuanvideo-community/HunyuanVideo: text_encoder/ (LlamaModel names, no tokenizer) beside tokenizer/
    model_dir = tmp_path / "HunyuanVideo" / "text_encoder"
    state = {k.removeprefix("model."): v for k, v in tiny.tiny_llm_state_dict(seed=1).items() if k != "lm_head.weight"}
    save_safetensors(state, model_dir / "model.safetensors", cast=torch.float16)
    (model_dir / "config.json").write_text((files["llm_folder"] / "config.json").read_text())
    tiny.write_tiny_llm_tokenizer(tmp_path / "HunyuanVideo" / "tokenizer")
    encoder = te.load_text_encoder1(model_dir, dtype=torch.float32)
    assert encoder.tokenizer.source == str(tmp_path / "HunyuanVideo" / "tokenizer")
    reference = te.load_text_encoder1(files["llm_folder"], dtype=torch.float32)
    assert torch.equal(encoder.encode(PROMPTS[:2])[0], reference.encode(PROMPTS[:2])[0])


def test_packaged_vocabulary_is_the_last_resort(files, tmp_path, monkeypatch):
    path = tiny.write_tiktoken_file(tiny.tiny_llm_tiktoken_ranks(), tmp_path / "pkg" / "tokenizer.model")
    monkeypatch.setattr(tok, "packaged_vocabulary", lambda packaged: (path, "fake_package"))
    lone = tiny.write_tiny_llm_single_file(tmp_path / "lone.safetensors", seed=1, with_tokenizer=False)
    encoder = te.load_text_encoder1(lone, dtype=torch.float32)
    assert "fake_package" in encoder.tokenizer.source
    beside = te.load_text_encoder1(files["llm_file"], dtype=torch.float32)
    assert torch.equal(encoder.tokenize(PROMPTS)[0], beside.tokenize(PROMPTS)[0])


@pytest.mark.parametrize("loader,writer,package", [
    (te.load_text_encoder1, tiny.write_tiny_llm_single_file, "llama-models"),
    (te.load_text_encoder2, tiny.write_tiny_clip_single_file, "open_clip_torch"),
])
def test_no_tokenizer_anywhere_is_one_clear_error(tmp_path, monkeypatch, loader, writer, package):
    monkeypatch.setattr(tok, "packaged_vocabulary", lambda packaged: None)
    path = writer(tmp_path / "alone.safetensors", with_tokenizer=False)
    with pytest.raises(UserError) as e:
        loader(path)
    message = str(e.value)
    assert str(path) in message and package in message and "alone_tokenizer" in message and "\n" not in message


def test_a_tokenizer_too_big_for_the_model_is_refused(files, monkeypatch, tmp_path):
    # e.g. the real Llama 3 vocabulary picked up for a small model
    bad = tok.TextTokenizer(tok.llama3_tokenizer({"a": 0, "b": 1}, [], [f"<x{i}>" for i in range(2000)]
                                                 + list(tok.LLAMA3_TEMPLATE_TOKENS) + ["<pad>"]), "<pad>", "big")
    monkeypatch.setattr(te, "load_llm_tokenizer", lambda path, tokenizer_path=None: bad)
    with pytest.raises(UserError, match="does not belong to this model"):
        te.load_text_encoder1(files["llm_file"])


# ----------------------------------------------------------------------------------------------- LLM


def as_hf_folder(single_file, config, folder):
    """A single file dressed as an HF folder, so that transformers loads it by its own rules."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(single_file, folder / "model.safetensors")
    config.save_pretrained(str(folder))
    return folder


def reference_llm(files, form, tmp_path):
    """transformers' own model and tokenizer on the same stored weights."""
    folder = files["llm_folder"]
    if form == "file":
        metadata = StateDictFile(files["llm_file"]).metadata[te.CONFIG_METADATA_KEY]
        folder = as_hf_folder(files["llm_file"], LlamaConfig(**json.loads(metadata)), tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer_dir = files["llm_folder"] if form == "folder" else files["llm_file"].parent / "llava_llama3_fp16_tokenizer"
    return model.eval(), AutoTokenizer.from_pretrained(str(tokenizer_dir), padding_side="right")


@pytest.mark.parametrize("form", ["folder", "file"])
def test_llm_states_equal_transformers_hidden_states_minus_3_cropped(files, form, tmp_path):
    encoder = te.load_text_encoder1(files[f"llm_{form}"], dtype=torch.float32)
    model, tokenizer = reference_llm(files, form, tmp_path)
    crop = encoder.crop_start
    batch = tokenizer([te.PROMPT_TEMPLATE_VIDEO.format(p) for p in PROMPTS], padding="max_length", truncation=True,
                      max_length=crop + 256, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    want_states = out.hidden_states[-(te.HIDDEN_STATE_SKIP_LAYER + 1)][:, crop:]
    states, mask = encoder.encode(PROMPTS)
    assert states.shape == (len(PROMPTS), 256, tiny.TINY_LLM_HIDDEN) and mask.shape == (len(PROMPTS), 256)
    assert torch.equal(mask, batch["attention_mask"][:, crop:])
    assert rel_err(states, want_states) < 1e-5


def test_folder_and_single_file_of_the_same_weights_give_the_same_states(files, llm):
    from_file = te.load_text_encoder1(files["llm_file"], dtype=torch.float32)
    a, mask_a = llm.encode(PROMPTS)
    b, mask_b = from_file.encode(PROMPTS)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)


def test_llm_is_built_without_the_layers_it_never_reads(llm):
    assert len(llm.model.layers) == tiny.TINY_LLM_CONFIG["num_hidden_layers"] - te.HIDDEN_STATE_SKIP_LAYER
    assert isinstance(llm.model.norm, torch.nn.Identity)


def test_batch_encoding_equals_one_prompt_at_a_time(llm):
    states, mask = llm.encode(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        one, one_mask = llm.encode([prompt])
        assert torch.equal(one_mask[0], mask[i])
        assert torch.allclose(one[0], states[i], atol=1e-5, rtol=1e-5)


def test_empty_caption_keeps_exactly_the_closing_token(llm):
    states, mask = llm.encode([""])
    assert mask[0].tolist() == [1] + [0] * 255
    assert torch.isfinite(states).all()


def test_an_empty_batch_gives_empty_tensors(llm, files):
    states, mask = llm.encode([])
    assert states.shape == (0, 256, tiny.TINY_LLM_HIDDEN) and mask.shape == (0, 256)
    pooled, mask = te.load_text_encoder2(files["clip_file"]).encode([])
    assert pooled.shape == (0, tiny.TINY_CLIP_HIDDEN) and mask.shape == (0, 77)


def test_skip_padding_keeps_the_real_positions_and_zeroes_the_rest(files, llm):
    fast = te.load_text_encoder1(files["llm_folder"], dtype=torch.float32, skip_padding=True)
    want, want_mask = llm.encode(PROMPTS[:3])
    got, mask = fast.encode(PROMPTS[:3])
    real = mask.bool()
    assert torch.equal(mask, want_mask)
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert (got[~real] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_states_come_out_in_the_encoder_dtype(files, dtype):
    encoder = te.load_text_encoder1(files["llm_file"], dtype=dtype)
    states, mask = encoder.encode(PROMPTS[:1])
    assert encoder.dtype == states.dtype == dtype and mask.dtype == torch.int64
    assert encoder.model.embed_tokens.weight.dtype == dtype


def test_cast_llm_rope_gives_musubi_tuners_fp16_states_bit_for_bit(files):
    """musubi-tuner loads the LLM and casts the whole module to fp16, rotary frequencies included; the default keeps
    those in float32 (3e-4 apart here, 1.2e-2 at full width: docs/text_encoders.md)."""
    from transformers import AutoModel

    folder = files["llm_folder"]
    musubi = AutoModel.from_pretrained(str(folder), dtype=torch.float16).to(dtype=torch.float16).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    cast, ours = (te.load_text_encoder1(folder, dtype=torch.float16, cast_rope=c) for c in (True, False))
    batch = tokenizer([te.PROMPT_TEMPLATE_VIDEO.format(p) for p in PROMPTS[:3]], padding="max_length", truncation=True,
                      max_length=cast.max_length, return_tensors="pt")
    with torch.no_grad():
        want = musubi(**batch, output_hidden_states=True).hidden_states[-(te.HIDDEN_STATE_SKIP_LAYER + 1)][:, cast.crop_start:]
    got, mask = cast.encode(PROMPTS[:3])
    assert torch.equal(got, want)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float16 and ours.model.rotary_emb.inv_freq.dtype == torch.float32
    default, _ = ours.encode(PROMPTS[:3])
    real = mask.bool()
    assert 0 < rel_err(default[real], want[real]) < 2e-3


def test_dtype_none_keeps_the_stored_dtype(files):
    assert te.load_text_encoder1(files["llm_file"], dtype=None).dtype == torch.float16
    assert te.load_text_encoder2(files["clip_folder"], dtype=None).dtype == torch.float32


def test_fp8_llm_stores_linear_weights_in_e4m3fn_and_stays_close_to_bf16(files):
    encoder = te.load_text_encoder1(files["llm_folder"], dtype=torch.float16, fp8=True)
    reference = te.load_text_encoder1(files["llm_folder"], dtype=torch.bfloat16)
    linears = [m for m in encoder.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Fp8Linear) and m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert encoder.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.bfloat16 for n, m in encoder.model.named_modules() if n.endswith("layernorm"))
    states, mask = encoder.encode(PROMPTS)
    want, _ = reference.encode(PROMPTS)
    real = mask.bool()
    assert states.dtype == torch.float16
    # e4m3 keeps 3 mantissa bits (per-row scaled): a few percent per layer; the stated bound is 5%.
    assert rel_err(states[real], want[real]) < 0.05


def test_comfyui_scaled_fp8_file_loads(files, tmp_path):
    """llava_llama3_fp8_scaled.safetensors: Linear weights in e4m3fn with a `.scale_weight` beside each."""
    state = tiny.tiny_llm_state_dict(seed=1)
    scaled = {}
    for key, value in state.items():
        if te.LLM_FP8_WEIGHTS.fullmatch(key.removeprefix("model.")):
            scale = value.abs().max() / 448
            scaled[key] = (value / scale).to(torch.float8_e4m3fn)
            scaled[key.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
        else:
            scaled[key] = value.half()
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "llava_llama3_fp8_scaled.safetensors"
    save_safetensors(scaled, path, metadata={te.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_LLM_CONFIG)})
    tiny.write_tiny_llm_tokenizer(tmp_path / "llava_llama3_fp8_scaled_tokenizer")
    want, mask = te.load_text_encoder1(files["llm_file"], dtype=torch.float32).encode(PROMPTS[:2])
    real = mask.bool()
    got, _ = te.load_text_encoder1(path, dtype=torch.float32).encode(PROMPTS[:2])
    assert rel_err(got[real], want[real]) < 0.05
    fp8 = te.load_text_encoder1(path, fp8=True)
    assert fp8.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert rel_err(fp8.encode(PROMPTS[:2])[0][real], want[real]) < 0.05


# ----------------------------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("form", ["folder", "file"])
def test_clip_pooled_output_equals_transformers(files, form, tmp_path):
    encoder = te.load_text_encoder2(files[f"clip_{form}"], dtype=torch.float32)
    folder = files["clip_folder"]
    if form == "file":
        metadata = StateDictFile(files["clip_file"]).metadata[te.CONFIG_METADATA_KEY]
        folder = as_hf_folder(files["clip_file"], CLIPTextConfig(**json.loads(metadata)), tmp_path / "hf")
    model = CLIPTextModel.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(files["clip_folder"]))
    batch = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        want = model.eval()(**batch).pooler_output
    pooled, mask = encoder.encode(PROMPTS)
    assert pooled.shape == (len(PROMPTS), tiny.TINY_CLIP_HIDDEN) and mask.shape == (len(PROMPTS), 77)
    assert mask.dtype == torch.int64 and torch.equal(mask, batch["attention_mask"])
    assert rel_err(pooled, want) < 1e-5


def test_clip_folder_and_single_file_agree(files):
    a, _ = te.load_text_encoder2(files["clip_folder"], dtype=torch.float16).encode(PROMPTS)
    b, _ = te.load_text_encoder2(files["clip_file"], dtype=torch.float16).encode(PROMPTS)
    assert torch.equal(a, b)  # the folder holds fp32, the file fp16: the same values once cast


# ----------------------------------------------------------------------------------------------- full size


def test_full_size_llm_config_is_the_official_model(manifest):
    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(**te.LLAVA_LLAMA3_CONFIG))
    ref = manifest("text_encoder_llm_LlamaModel.json")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["keys"]
    assert sum(p.numel() for p in model.parameters()) == ref["params"] == 7_505_186_816


@pytest.mark.parametrize("manifest_name", [
    "text_encoder_llm_LlamaForCausalLM.json",   # official ckpts/text_encoder (transformers 4.46 save)
    "comfyui_llava_llama3_fp16.json",           # ComfyUI single file
    "text_encoder_llm_LlamaModel.json",         # diffusers / hunyuanvideo-community text_encoder
])
def test_full_size_llm_reads_the_official_and_comfyui_key_names(manifest, manifest_name):
    model = te.build_llm(LlamaConfig(**te.LLAVA_LLAMA3_CONFIG))
    file_shapes = {k: tuple(v) for k, v in manifest(manifest_name)["keys"].items()}
    prefix = te.key_prefix(list(file_shapes), "embed_tokens.weight")
    plan = te.plan_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, file_shapes, prefix, "m", "LLM")
    unused = set(file_shapes) - set(plan.values())
    expected_unused = {k for k in file_shapes if k.startswith((prefix + "layers.30.", prefix + "layers.31."))}
    expected_unused |= {prefix + "norm.weight"} | ({"lm_head.weight"} & set(file_shapes))
    assert unused == expected_unused


def test_full_size_clip_reads_the_official_and_comfyui_key_names(manifest):
    model = te.build_clip(CLIPTextConfig(**te.CLIP_L_CONFIG))
    for name in ("text_encoder_clip_l_CLIPTextModel.json", "comfyui_clip_l.json"):
        ref = manifest(name)
        file_shapes = {k: tuple(v) for k, v in ref["keys"].items()}
        prefix = te.key_prefix(list(file_shapes), "embeddings.token_embedding.weight")
        plan = {k: te.clip_file_key(k, prefix) for k in model.state_dict()}
        assert sorted(plan.values()) == sorted(file_shapes)  # one to one, nothing left over
        assert all(file_shapes[plan[k]] == tuple(v.shape) for k, v in model.state_dict().items())
        assert sum(p.numel() for p in model.parameters()) == ref["params"] == 123_060_480


# ----------------------------------------------------------------------------------------------- errors


def one_line_error(loader, path, *fragments):
    with pytest.raises(UserError) as e:
        loader(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


@pytest.mark.parametrize("loader", [te.load_text_encoder1, te.load_text_encoder2])
def test_missing_file_is_named(tmp_path, loader):
    one_line_error(loader, tmp_path / "nope.safetensors", "not found")


@pytest.mark.parametrize("loader", [te.load_text_encoder1, te.load_text_encoder2])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_dit_passed_as_a_text_encoder_is_named(tmp_path, loader, fmt):
    from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit

    config = tiny_dit_config()
    path = write_dit(tmp_path / f"dit.{fmt}", random_dit_state_dict(config), config, fmt=fmt)
    one_line_error(loader, path, "DiT", "--dit")


def test_a_vae_passed_as_a_text_encoder_is_named(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_safetensors({"encoder.down_blocks.0.resnets.0.conv1.conv.weight": torch.zeros(2, 2, 1, 1, 1),
                      "decoder.up_blocks.0.resnets.0.conv1.conv.weight": torch.zeros(2, 2, 1, 1, 1)}, path)
    one_line_error(te.load_text_encoder1, path, "VAE", "--vae")


def test_the_encoders_swapped_are_named(files):
    one_line_error(te.load_text_encoder1, files["clip_file"], "CLIP", "--text_encoder2")
    one_line_error(te.load_text_encoder2, files["llm_file"], "--text_encoder1")


def test_a_folder_without_weights_is_named(tmp_path):
    folder = tmp_path / "text_encoder"
    tiny.write_tiny_llm_tokenizer(folder)
    one_line_error(te.load_text_encoder1, folder, "no weight files")


def test_a_file_of_another_size_is_named(files, tmp_path):
    path = tmp_path / "llava.safetensors"
    state = StateDictFile(files["llm_file"]).load_all()
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:100]
    save_safetensors(state, path, metadata={te.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_LLM_CONFIG)})
    tiny.write_tiny_llm_tokenizer(tmp_path / "llava_tokenizer")
    one_line_error(te.load_text_encoder1, path, "model.layers.0.mlp.up_proj.weight", "[100, 64]")


def test_a_file_without_metadata_is_checked_against_the_full_size_config(files, tmp_path):
    path = tmp_path / "llava.safetensors"
    save_safetensors(StateDictFile(files["llm_file"]).load_all(), path)  # tiny weights, no config
    tiny.write_tiny_llm_tokenizer(tmp_path / "llava_tokenizer")
    one_line_error(te.load_text_encoder1, path, "decoder layers", "32")


def test_a_prompt_past_the_llms_256_tokens_is_said_to_be_cut_once(files, caplog):
    """musubi-tuner cuts the text past 256 tokens silently; a prompt that short keeps every word and says nothing."""
    import logging

    encoder = te.load_text_encoder1(files["llm_folder"], dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="musubi_tuner"):
        encoder.encode(["a red ball rolls on the grass"])
        assert "longer than the LLM" not in caplog.text
        long = " ".join(f"word{i}" for i in range(400))
        states, mask = encoder.encode([long, "short"])
        encoder.encode([long])
    assert caplog.text.count("prompts longer than the LLM's 256 tokens are cut there (as in musubi-tuner)") == 1
    assert caplog.text.count("longer than the LLM") == 1
    assert mask[0].sum() == 256 and mask[1].sum() < 256
    # the count is of every prompt encoded, not of the first batch that had one ("1 of 1" when 5 of 5 were cut: fuzz_aa 8)
    assert encoder.cut_summary() == "2 of 4 prompts were longer than the LLM's 256 tokens: the text past them is not read"


def test_a_prompt_past_clips_77_tokens_is_counted(files):
    """CLIP-L reads 77 tokens: a caption of 60-230 words fits the LLM and was cut by CLIP without a word (fuzz_aa 8)."""
    encoder = te.load_text_encoder2(files["clip_folder"], dtype=torch.float32)
    encoder.encode(["a red ball", " ".join(["word"] * 100)])
    assert encoder.cut_summary() == ("1 of 2 prompts were longer than CLIP-L's 77 tokens: its pooled vector is of their start "
                                     "(as in musubi-tuner)")


# ----------------------------------------------------------------------------------------------- damaged folders (D10)


def refused(load, named: Path, *fragments) -> str:
    """load() raises one one-line UserError that starts with the file it names, and holds every fragment."""
    with pytest.raises(UserError) as e:
        load()
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{named}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def damaged_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("name,damage", [
    ("config.json", lambda d: (d / "config.json").write_text("[1, 2]")),
    ("tokenizer_config.json", lambda d: (d / "tokenizer_config.json").write_text("[]")),
    # read when tokenizer_config.json names no pad token
    ("special_tokens_map.json", lambda d: ((d / "tokenizer_config.json").unlink(), (d / "special_tokens_map.json").write_text('"x"'))),
    ("model.safetensors.index.json", lambda d: (d / "model.safetensors.index.json").write_text("7")),
])
def test_every_json_file_of_a_text_encoder_folder_of_another_json_type_is_named(files, tmp_path, name, damage):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    damage(folder)
    refused(lambda: te.load_text_encoder1(folder), folder / name, "where an object is expected")


@pytest.mark.parametrize("name,fragment", [("config.json", "is a folder, not a JSON file"),
                                           ("tokenizer.json", "expected a CLIP tokenizer file, found a folder")])
def test_a_file_of_the_clip_folder_that_is_a_folder_is_named(files, tmp_path, name, fragment):
    folder = damaged_copy(files["clip_folder"], tmp_path / "text_encoder_2")
    (folder / name).unlink()
    (folder / name).mkdir()
    refused(lambda: te.load_text_encoder2(folder), folder / name, fragment)


@pytest.mark.parametrize("field,value,fragment", [
    ("hidden_size", "64", "expected int, got str"),
    ("num_attention_heads", 3, "not a multiple of the number of attention heads (3)"),
    ("vocab_size", None, "expected int"),
])
def test_llm_config_values_transformers_refuses_are_named_with_file_and_field(files, tmp_path, field, value, fragment):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    edit_json(folder / "config.json", lambda raw: raw.update({field: value}))
    refused(lambda: te.load_text_encoder1(folder), folder / "config.json", f"({field}: ", fragment, "not a usable")


def test_clip_config_values_transformers_refuses_are_named(files, tmp_path):
    folder = damaged_copy(files["clip_folder"], tmp_path / "text_encoder_2")
    edit_json(folder / "config.json", lambda raw: raw["text_config"].update(num_attention_heads=5))
    refused(lambda: te.load_text_encoder2(folder), folder / "config.json", "text_config", "attention heads (5)")


def test_a_config_that_transformers_accepts_but_gives_no_model_is_named(files, tmp_path):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    edit_json(folder / "config.json", lambda raw: raw.update(hidden_size=-64, head_dim=-2))
    refused(lambda: te.load_text_encoder1(folder), folder / "config.json", "not a usable Llama text encoder config")


@pytest.mark.parametrize("metadata,fragment", [
    ("[1]", "holds an array where an object is expected"),
    (json.dumps(dict(tiny.TINY_LLM_CONFIG, hidden_size="64")), "(hidden_size: "),
])
def test_a_config_in_the_metadata_that_is_refused_is_named(files, tmp_path, metadata, fragment):
    path = tmp_path / "llava.safetensors"
    save_safetensors(StateDictFile(files["llm_file"]).load_all(), path, metadata={te.CONFIG_METADATA_KEY: metadata})
    tiny.write_tiny_llm_tokenizer(tmp_path / "llava_tokenizer")
    refused(lambda: te.load_text_encoder1(path), path, te.CONFIG_METADATA_KEY, fragment)


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "sub/../../model-00001-of-00002.safetensors", "ABSOLUTE",
                                   "..\\text_encoder\\model-00001-of-00002.safetensors"])
def test_weight_index_entries_that_leave_the_folder_are_refused_naming_the_index(files, tmp_path, entry):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    entry = str(files["clip_folder"] / "model.safetensors") if entry == "ABSOLUTE" else entry
    index = folder / "model.safetensors.index.json"
    edit_json(index, lambda raw: raw["weight_map"].update({next(iter(raw["weight_map"])): entry}))
    refused(lambda: te.load_text_encoder1(folder), index, "is not a file in", "weight_map[")


@pytest.mark.parametrize("weight_map,fragment", [([1], "weight_map is an array"), ({}, "weight_map is empty"),
                                                 ({"model.norm.weight": 3}, "is a number, not a shard file name")])
def test_a_weight_index_without_a_usable_weight_map_is_named(files, tmp_path, weight_map, fragment):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    index = folder / "model.safetensors.index.json"
    edit_json(index, lambda raw: raw.update(weight_map=weight_map))
    refused(lambda: te.load_text_encoder1(folder), index, fragment)


def test_shards_inside_the_folder_or_linked_elsewhere_still_load(files, tmp_path):
    """A Hugging Face cache's shards are links into its blobs folder: links are not refused, only names that leave."""
    folder = damaged_copy(files["llm_folder"], tmp_path / "snapshot")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in folder.glob("*.safetensors"):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)
    reference = te.load_text_encoder1(files["llm_folder"], dtype=torch.float32)
    assert torch.equal(te.load_text_encoder1(folder, dtype=torch.float32).encode(PROMPTS[:1])[0], reference.encode(PROMPTS[:1])[0])


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_text_encoder_weights_that_are_not_floating_point_are_refused_naming_file_and_key(files, tmp_path, dtype):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    shard = folder / "model-00001-of-00002.safetensors"
    save_safetensors({k: v.to(dtype) for k, v in StateDictFile(shard).load_all().items()}, shard)
    refused(lambda: te.load_text_encoder1(folder), shard, "tensor model.", "weights are floating point", str(dtype).removeprefix("torch."))
    clip = tmp_path / "clip_l.safetensors"
    state = StateDictFile(files["clip_file"]).load_all()
    key = "text_model.encoder.layers.0.mlp.fc1.weight"
    state[key] = state[key].to(dtype)
    save_safetensors(state, clip, metadata=StateDictFile(files["clip_file"]).metadata)
    tiny.write_tiny_clip_tokenizer(tmp_path / "clip_l_tokenizer")
    refused(lambda: te.load_text_encoder2(clip), clip, f"tensor {key} is {str(dtype).removeprefix('torch.')}")


def test_fp8_text_encoder_weights_are_floating_point_and_load(files, tmp_path):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    shard = folder / "model-00001-of-00002.safetensors"
    save_safetensors({k: v.to(torch.float8_e4m3fn) for k, v in StateDictFile(shard).load_all().items()}, shard)
    te.check_text_encoder1(folder)


@pytest.mark.parametrize("damage,fragment", [
    (lambda p: p.unlink(), "tokenizer.json: not found, though"),
    (lambda p: (p.unlink(), p.mkdir()), "tokenizer.json: expected a Llama 3 tokenizer file, found a folder"),
    # (fuzz_y 8: a FIFO was called a folder, a looping link was not named)
    (lambda p: (p.unlink(), os.mkfifo(p)), "tokenizer.json: not a regular file (a FIFO); expected a Llama 3 tokenizer file"),
    (lambda p: (p.unlink(), p.symlink_to(p.name)), "tokenizer.json: symbolic link loop"),
])
def test_a_missing_or_folder_typed_tokenizer_json_is_named_not_blamed_on_a_packaged_vocabulary(files, tmp_path, damage, fragment):
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    damage(folder / "tokenizer.json")
    message = refused(lambda: te.load_text_encoder1(folder), folder / "tokenizer.json", fragment)
    assert "does not belong" not in message
    # named as well when the folder is passed as the tokenizer folder
    refused(lambda: te.load_text_encoder1(files["llm_file"], tokenizer_path=folder), folder / "tokenizer.json", fragment)


@pytest.mark.parametrize("damage,fragment", [
    (lambda p: (p.unlink(), p.mkdir()), "expected a weight shard, found a folder (named by model.safetensors.index.json)"),
    (lambda p: (p.unlink(), p.symlink_to(p.name)), "symbolic link loop"),
])
def test_a_shard_that_is_a_folder_or_a_link_loop_is_named_as_that_not_as_missing(files, tmp_path, damage, fragment):
    """fuzz_y 8: "model.safetensors.index.json names shards that are missing" for a shard right there."""
    folder = damaged_copy(files["llm_folder"], tmp_path / "text_encoder")
    damage(folder / "model-00002-of-00002.safetensors")
    refused(lambda: te.check_text_encoder1(folder), folder / "model-00002-of-00002.safetensors", fragment)
    single = damaged_copy(files["clip_folder"], tmp_path / "text_encoder_2")
    damage(single / "model.safetensors")  # (it was "no weight files in this folder")
    refused(lambda: te.check_text_encoder2(single), single / "model.safetensors", fragment.split(" (named")[0].replace("weight shard", "text encoder weight file"))


@pytest.mark.parametrize("file,damage,fragment", [
    ("vocab.json", lambda d: (d / "vocab.json").write_text("[]"), "holds an array where an object is expected"),
    ("vocab.json", lambda d: edit_json(d / "vocab.json", lambda v: v.update({"a": "one"})), "token 'a' has id \"one\""),
    ("merges.txt", lambda d: (d / "merges.txt").write_text("#version: 0.2\na b c\n"), "line 2 is not two tokens"),
])
def test_a_damaged_clip_vocabulary_is_named(files, tmp_path, file, damage, fragment):
    folder = damaged_copy(files["clip_folder"], tmp_path / "text_encoder_2")
    (folder / "tokenizer.json").unlink()  # vocab.json + merges.txt are then the tokenizer
    damage(folder)
    refused(lambda: te.load_text_encoder2(folder), folder / file, fragment)


def test_a_scaled_fp8_file_whose_scale_is_not_one_number_is_refused_naming_it(tmp_path):
    """A RuntimeError of broadcasting, and a per-row scale read by columns without --fp8_llm, by rows with it (fuzz_y 4)."""
    state = {k: v.half() for k, v in tiny.tiny_llm_state_dict(seed=1).items()}
    key = next(k for k in state if te.LLM_FP8_WEIGHTS.fullmatch(k.removeprefix("model.")))
    state[key.removesuffix("weight") + "scale_weight"] = torch.ones(3)
    path = tmp_path / "llava_llama3_fp8_scaled.safetensors"
    save_safetensors(state, path, metadata={te.CONFIG_METADATA_KEY: json.dumps(tiny.TINY_LLM_CONFIG)})
    tiny.write_tiny_llm_tokenizer(tmp_path / "llava_llama3_fp8_scaled_tokenizer")
    with pytest.raises(UserError, match=rf"{path}: {key.removesuffix('weight')}scale_weight has shape \[3\]; a scaled-fp8 file's "
                                        r"scale_weight is one number per weight"):
        te.load_text_encoder1(path, dtype=torch.float32)


@pytest.mark.parametrize("which", ["llm", "clip"])
def test_a_text_encoder_weight_holding_nan_is_refused_as_it_loads_naming_file_and_key(files, tmp_path, which):
    """The DiT's weights were checked as they load, the text encoders' not: a NaN in CLIP-L's final layer norm made every
    text cache of a run with one channel stored as 0 (a warning per cache, exit 0), and NaN sample prompts blamed on
    the LoRA (fuzz_y 1, 10)."""
    folder = shutil.copytree(files[f"{which}_folder"], tmp_path / which)
    read = "layers.0.mlp.up_proj.weight" if which == "llm" else "final_layer_norm.weight"  # (a weight the encoder reads)
    weights = next(w for w in sorted(folder.glob("*.safetensors")) if any(k.endswith(read) for k in StateDictFile(w).keys()))
    f = StateDictFile(weights)
    state = f.load_all()
    key = next(k for k in state if k.endswith(read))
    state[key] = state[key].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view(state[key].shape)
    save_safetensors(state, weights, metadata=f.metadata)
    load = te.load_text_encoder1 if which == "llm" else te.load_text_encoder2
    with pytest.raises(UserError, match=rf"^{weights}: {key} holds NaN or infinite values: the file is damaged"):
        load(folder, dtype=torch.float32)


def test_a_json_file_of_a_model_folder_that_is_a_fifo_is_named_not_waited_on(files, tmp_path):
    """config.json as a FIFO: the command waited for ever for a writer (fuzz_y 2)."""
    folder = shutil.copytree(files["clip_folder"], tmp_path / "clip")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(UserError, match=r"config\.json: not a regular file \(a FIFO\)"):
        te.load_text_encoder2(folder, dtype=torch.float32)


def test_a_stray_weight_file_in_a_text_encoder_folder_is_not_read_over_the_model(files, tmp_path):
    """Without an index, every *.safetensors of the folder was read as one, a key in two files taken from the one that
    sorts last: a leftover all-zero copy (zz_old.safetensors) beside model.safetensors replaced CLIP's weights, and the
    caches were made by it without a word (fuzz_y 11). model.safetensors is what transformers reads; other files that
    share a key are refused, naming both."""
    folder = shutil.copytree(files["clip_folder"], tmp_path / "clip")
    want = te.load_text_encoder2(folder, dtype=torch.float32).encode(PROMPTS[:1])[0]
    state = StateDictFile(folder / "model.safetensors").load_all()
    save_safetensors({k: torch.zeros_like(v) for k, v in state.items()}, folder / "zz_old.safetensors")
    assert torch.equal(te.load_text_encoder2(folder, dtype=torch.float32).encode(PROMPTS[:1])[0], want)
    (folder / "model.safetensors").rename(folder / "clip_l.safetensors")
    with pytest.raises(UserError, match=r"is in two of its files, clip_l\.safetensors and zz_old\.safetensors"):
        te.load_text_encoder2(folder, dtype=torch.float32)


def test_a_text_encoder_folder_whose_path_is_not_utf8_loads(files, tmp_path):
    """The weights loaded from such a path, the tokenizer did not: the tokenizers library takes a name as UTF-8 only
    ("unreadable tokenizer file", fuzz_y 13)."""
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9_te2")
    shutil.copytree(files["clip_folder"], folder)
    want = te.load_text_encoder2(files["clip_folder"], dtype=torch.float32).encode(PROMPTS[:1])[0]
    assert torch.equal(te.load_text_encoder2(folder, dtype=torch.float32).encode(PROMPTS[:1])[0], want)


@pytest.mark.parametrize("which", ["llm", "clip"])
def test_a_folder_without_its_config_says_so_when_the_weights_do_not_fit_the_assumed_one(files, tmp_path, which):
    """With config.json gone the full-size config is assumed, and the weights were blamed: "has 4 decoder layers, the
    config says 32", "160 tensors missing" (fuzz_y 5)."""
    folder = shutil.copytree(files[f"{which}_folder"], tmp_path / which)
    (folder / "config.json").unlink()
    load = te.load_text_encoder1 if which == "llm" else te.load_text_encoder2
    with pytest.raises(UserError, match=r"\(its config\.json is missing, and the full-size config was assumed: restore config\.json "
                                        r"from the model's download\)$"):
        load(folder, dtype=torch.float32)
    (folder / "config.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(UserError, match=r"config\.json: broken symbolic link"):
        load(folder, dtype=torch.float32)
