"""How far fp16 text-encoder caches move when the LLM's rotary frequencies (`inv_freq`) are rounded to fp16, as
musubi-tuner's whole-module cast does (`--cast_llm_rope`), against keeping them float32 (our default).

    python bench/text_encoder_rope_dtype.py                 # full width (4096, 32 heads), 4 layers, 351 positions
    python bench/text_encoder_rope_dtype.py --layers 2 --threads 2

Random weights (transformers' initialisation, seeded) at the real width: hidden 4096, 32 heads of 128, 8 KV heads,
MLP 14336; fewer layers than the real 30 (memory and time on a CPU). One prompt of 351 real tokens (the template's
95 and 256 prompt tokens), so every cached position is real. The table gives, after each decoder layer, the relative
Frobenius error over the cached positions (95..350) between the two fp16 runs, and of each against the same weights
in float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaModel

    from musubi_tuner.hunyuan.text_encoders import CROP_START, LLAVA_LLAMA3_CONFIG, LLM_MAX_LENGTH, cast_rope_buffers

    config = LlamaConfig(**{**LLAVA_LLAMA3_CONFIG, "vocab_size": 1024, "num_hidden_layers": args.layers})
    torch.manual_seed(args.seed)
    model = LlamaModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, CROP_START + LLM_MAX_LENGTH), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def states(m):
        start = time.perf_counter()
        with torch.no_grad():
            out = m(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        print(f"  ran in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return [h[:, CROP_START:].float() for h in out[1:]]

    exact = states(model)
    rotary = {name: buf.clone() for name, buf in model.rotary_emb.named_buffers()}
    model.to(torch.float16)  # the weights and, like musubi-tuner's cast, the rotary frequencies
    for name, buf in rotary.items():
        setattr(model.rotary_emb, name, buf)  # ours: the weights only, frequencies kept in float32
    ours = states(model)
    cast_rope_buffers(model, torch.float16)
    musubi = states(model)

    print("| after layer | fp16 inv_freq vs float32 inv_freq | float32 inv_freq vs float32 model | fp16 inv_freq vs float32 model |")
    print("| --- | --- | --- | --- |")
    for i, (a, b, c) in enumerate(zip(ours, musubi, exact), start=1):
        print(f"| {i} | {rel_err(b, a):.2e} | {rel_err(a, c):.2e} | {rel_err(b, c):.2e} |")


if __name__ == "__main__":
    main()
