"""Text-encoder throughput (prompts per second) for the cache command's batch sizes: ours against
musubi-tuner's way of computing the same thing.

    python bench/text_encoders.py                                 # tiny and medium configs, CPU, fp32
    python bench/text_encoders.py --config medium --batch_sizes 1 4 16 --repeats 7 --threads 1
    python bench/text_encoders.py --device cuda --dtype float16   # on a GPU

Variants, all on the same weights (an HF folder written by demo/tiny_text_encoders.py):
- "musubi-style": what musubi-tuner runs: `AutoModel.from_pretrained` (the whole LlamaModel) with
  `output_hidden_states=True`, `hidden_states[-3]` cropped; CLIPTextModel's `pooler_output`; the
  tokenizer through `AutoTokenizer`.
- "ours": `load_text_encoder1/2(...).encode` (the LLM without the layers it never reads).
- "ours skip_padding": the LLM run only up to the longest prompt of the batch.
The variants take turns inside each round (one warm-up round, then --repeats rounds) so that other
work on the machine slows them alike; the table shows the median. The last column is the relative
error of the states at real (mask = 1) positions against musubi-style.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# Sizes: the tiny demo encoders (4-layer LLM, 2-layer CLIP), and a medium config with the real depths
# (32 and 12 layers, so the share of skipped LLM layers is the real one) at 1/16 and 1/3 of the real widths.
CONFIGS = {
    "tiny": dict(llm={}, clip={}),
    "medium": dict(
        llm=dict(hidden_size=256, intermediate_size=896, num_hidden_layers=32, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=64),
        clip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
                  projection_dim=256),
    ),
}
# Captions of the lengths users write (5 to 60 words), repeated to fill a batch.
CAPTIONS = [
    "A cat walks on the grass, realistic style.",
    "Two people dance in the rain at night, neon lights reflect on the wet street, cinematic, shallow depth of field.",
    "Close-up of a woman smiling.",
    "The camera pans slowly over a mountain lake at sunrise; mist rises from the water while birds fly over the "
    "trees on the far shore. Soft golden light, calm atmosphere, 4k, film grain, wide angle lens, slow movement, "
    "reflections on the surface of the water, a small wooden boat drifts near the pier.",
]


def prompts_for(batch_size: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]


def musubi_style_llm(folder: Path, dtype, device, crop_start: int):
    from transformers import AutoModel, AutoTokenizer

    from musubi_tuner.hunyuan.text_encoders import LLM_MAX_LENGTH, PROMPT_TEMPLATE_VIDEO

    model = AutoModel.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")

    @torch.no_grad()
    def encode(prompts):
        batch = tokenizer([PROMPT_TEMPLATE_VIDEO.format(p) for p in prompts], padding="max_length", truncation=True,
                          max_length=crop_start + LLM_MAX_LENGTH, return_tensors="pt").to(device)
        out = model(**batch, output_hidden_states=True)
        return out.hidden_states[-3][:, crop_start:], batch["attention_mask"][:, crop_start:]

    return encode


def musubi_style_clip(folder: Path, dtype, device):
    from transformers import AutoTokenizer, CLIPTextModel

    model = CLIPTextModel.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    @torch.no_grad()
    def encode(prompts):
        batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").to(device)
        return model(**batch).pooler_output, batch["attention_mask"]

    return encode


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rel_err(got, want, mask):
    if got.dim() == 3:
        got, want = got[mask.bool()], want[mask.bool()]
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def bench_config(name: str, args, workdir: Path) -> list[tuple]:
    from musubi_tuner.demo import tiny_text_encoders as tiny
    from musubi_tuner.hunyuan import text_encoders as te

    sizes = CONFIGS[name]
    llm_dir = tiny.write_tiny_llm_folder(workdir / name / "text_encoder", **sizes["llm"])
    clip_dir = tiny.write_tiny_clip_folder(workdir / name / "text_encoder_2", **sizes["clip"])
    dtype = getattr(torch, args.dtype)
    ours_llm = te.load_text_encoder1(llm_dir, dtype=dtype, device=args.device)
    ours_llm_skip = te.load_text_encoder1(llm_dir, dtype=dtype, device=args.device, skip_padding=True)
    ours_clip = te.load_text_encoder2(clip_dir, dtype=dtype, device=args.device)
    encoders = {
        ("LLM", "musubi-style"): musubi_style_llm(llm_dir, dtype, args.device, ours_llm.crop_start),
        ("LLM", "ours"): ours_llm.encode,
        ("LLM", "ours skip_padding"): ours_llm_skip.encode,
        ("CLIP", "musubi-style"): musubi_style_clip(clip_dir, dtype, args.device),
        ("CLIP", "ours"): ours_clip.encode,
    }
    rows = []
    for batch_size in args.batch_sizes:
        prompts = prompts_for(batch_size)
        times = {key: [] for key in encoders}
        for round_ in range(args.repeats + 1):
            for key, encode in encoders.items():
                sync(args.device)
                start = time.perf_counter()
                encode(prompts)
                sync(args.device)
                if round_:  # round 0 warms up
                    times[key].append(time.perf_counter() - start)
        outputs = {key: encode(prompts) for key, encode in encoders.items()}
        for key in encoders:
            reference, mask = outputs[(key[0], "musubi-style")]
            error = rel_err(outputs[key][0], reference, mask)
            rows.append((name, key[0], batch_size, key[1], batch_size / statistics.median(times[key]), error))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32 on CPU; float16/bfloat16 on a GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # from_pretrained's report of the unused lm_head
    if args.threads:
        torch.set_num_threads(args.threads)

    names = list(CONFIGS) if args.config == "all" else [args.config]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name in names for row in bench_config(name, args, Path(tmp))]

    print(f"device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} runs after one warm-up")
    print(f"{'config':<8}{'encoder':<6}{'batch':>6}  {'variant':<20}{'prompts/s':>11}{'speed-up':>10}{'rel err':>10}")
    baseline = {(r[0], r[1], r[2]): r[4] for r in rows if r[3] == "musubi-style"}
    for name, encoder, batch, variant, rate, error in rows:
        speedup = rate / baseline[(name, encoder, batch)]
        print(f"{name:<8}{encoder:<6}{batch:>6}  {variant:<20}{rate:>11.1f}{speedup:>9.2f}x{error:>10.1e}")


if __name__ == "__main__":
    main()
