"""Encode every caption of a dataset with both text encoders once, and write musubi-tuner's text caches.

    python src/musubi_tuner/cache_text_encoder_outputs.py --dataset_config dataset.toml \
        --text_encoder1 ckpts/text_encoder --text_encoder2 ckpts/text_encoder_2 --batch_size 16

The LLM runs first over all captions, then CLIP-L; only one encoder is in memory at a time.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import gc
import logging
import os


from musubi_tuner.cli import Parser, compute_dtype, count, path, resolve_device
from musubi_tuner.errors import require_one_process, run_cli
from musubi_tuner.files import require_present

logger = logging.getLogger("cache_text_encoder_outputs")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cache_text_encoder_outputs.py", description=__doc__)
    p.add_argument("--dataset_config", type=path, required=True, help="dataset TOML (or JSON)")

    g = p.add_argument_group("models")
    g.add_argument("--text_encoder1", type=path, required=True, help="LLM: HF folder (ckpts/text_encoder) or ComfyUI llava_llama3_fp16.safetensors")
    g.add_argument("--text_encoder2", type=path, required=True, help="CLIP-L: HF folder (ckpts/text_encoder_2) or ComfyUI clip_l.safetensors")
    g.add_argument("--text_encoder_dtype", type=compute_dtype, default=None, help="encoders' dtype (default float16)")
    g.add_argument("--fp8_llm", action="store_true", help="LLM Linear weights in fp8 (for GPUs under 16 GB)")
    g.add_argument("--cast_llm_rope", action="store_true",
                   help="round the LLM's rotary frequencies to --text_encoder_dtype, as musubi-tuner's cast does: its caches "
                        "bit for bit (default: kept in float32, the more exact; see docs/text_encoders.md)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available, else cpu)")

    g = p.add_argument_group("what to cache")
    g.add_argument("--batch_size", type=count(1), default=None, help="captions per encoder call (default: the dataset's batch_size)")
    g.add_argument("--num_workers", type=count(0), default=None, help="threads reading caption files (default CPUs - 1)")
    g.add_argument("--skip_existing", action="store_true", help="keep caches made from the same caption and model")
    g.add_argument("--keep_cache", action="store_true", help="do not delete caches of items no longer in the dataset")
    g.add_argument("--strict", action="store_true", help="stop at the first unreadable caption instead of skipping it")
    return p


def run_encoder(name: str, load, batches: list[list], total: int, made_by: dict[str, str]) -> int:
    """Encode the captions of `batches` (one encoder call each; `total` captions in the dataset) with one
    encoder and merge its outputs into their caches, recording `made_by` (cache_files.text_provenance)."""
    import torch

    from musubi_tuner.data import cache_files
    from musubi_tuner.progress import progress_bar

    todo = sum(len(batch) for batch in batches)
    if not todo:
        logger.info("%s: nothing to encode (%d already cached)", name, total)
        return 0
    logger.info("%s: encoding %d captions (%d already cached)", name, todo, total - todo)
    encoder = load()
    changed: list[tuple] = []
    with progress_bar(total=todo, desc=f"{name} text", unit="caption") as bar:
        for batch in batches:
            with torch.no_grad():
                embeds, masks = encoder.encode([c.caption for c in batch])
            for item, embed, mask in zip(batch, embeds.cpu(), masks.cpu()):
                cache_files.save_text_cache(item.cache_path, item.caption, cache_files.text_encoder_tensors(name, embed, mask),
                                            provenance={**made_by, **(item.record or {})}, changed=changed)
            bar.update(len(batch))
    if changed:  # one line for a re-captioned dataset, not one per caption (fuzz_am 5)
        shown = "; ".join(f"{path.name}: {old!r} -> {new!r}" for path, old, new in changed[:3])
        logger.warning("%d caption(s) changed since their caches were made; the new ones are stored (%s%s)", len(changed),
                       shown, f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
    cut = encoder.cut_summary()
    if cut:
        logger.info("%s: %s", name, cut)
    del encoder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return todo


def encoder_batches(datasets, captions, todo, batch_size: int | None) -> list[list]:
    """The `todo` captions in encoder calls: `batch_size` at a time, or each dataset's own batch_size
    (musubi-tuner's default), never mixing datasets."""
    from musubi_tuner.data.items import chunks

    todo = set(todo)
    return [batch for ds, cs in zip(datasets, captions)
            for batch in chunks([c for c in cs if c in todo], batch_size or ds.batch_size)]


def main(argv=None) -> None:
    def run(argv):
        import torch

        args = build_parser().parse_args(argv)
        require_one_process("cache_text_encoder_outputs.py")
        from musubi_tuner.data.config import load_dataset_config
        from musubi_tuner.data.items import (CacheReport, caption_items, require_some_cached, stale_text_caches, text_encoding_todo,
                                             tidy_cache_directory)
        from musubi_tuner.dtypes import cpu_lacks_fast_float16, str_to_dtype
        from musubi_tuner.hunyuan.text_encoders import check_text_encoder1, check_text_encoder2, load_text_encoder1, load_text_encoder2

        for flag in ("text_encoder1", "text_encoder2"):
            require_present(getattr(args, flag), "text encoder", f"--{flag}")
        config = load_dataset_config(args.dataset_config, args)
        check_text_encoder1(args.text_encoder1)  # both now: a wrong CLIP file must not wait for the whole LLM pass
        device = resolve_device(args.device)
        dtype = str_to_dtype(args.text_encoder_dtype, torch.float16, "--text_encoder_dtype")
        check_text_encoder2(args.text_encoder2, values_in=dtype)  # (its values too: it runs after the LLM's pass)
        if device.type == "cpu" and dtype == torch.float16 and cpu_lacks_fast_float16():
            logger.warning("this CPU has no fast float16 kernels: float16 encoders run about 4x slower than float32 and 8x slower "
                           "than bfloat16 here; --text_encoder_dtype bf16 (same memory) or fp32 (twice the memory) is faster")

        from musubi_tuner.data.cache_files import lock_cache_directories, text_provenance

        with lock_cache_directories(config.all_datasets, "text"):  # before any encoder loads: a second run stops at once
            workers = args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
            reports, captions = [], []
            for ds in config.all_datasets:  # validation datasets too
                report = CacheReport()
                captions.append(caption_items(ds, report, strict=args.strict, num_workers=workers))
                reports.append(report)
            everything = [c for cs in captions for c in cs]
            # decide both passes before either runs: the LLM pass rewrites the files the CLIP pass would check
            made_by = {"llm": text_provenance("llm", args.text_encoder1, dtype, args.fp8_llm),
                       "clipL": text_provenance("clipL", args.text_encoder2, dtype)}
            unrecorded = set()  # kept caches that do not record their encoders (musubi-tuner's)
            todo_llm = text_encoding_todo(everything, "llm", skip_existing=args.skip_existing, model=made_by["llm"],
                                          unrecorded=unrecorded)
            todo_clip = text_encoding_todo(everything, "clipL", skip_existing=args.skip_existing, model=made_by["clipL"],
                                           unrecorded=unrecorded)
            run_encoder("llm", lambda: load_text_encoder1(args.text_encoder1, dtype=dtype, device=device, fp8=args.fp8_llm,
                                                          cast_rope=args.cast_llm_rope),
                        encoder_batches(config.all_datasets, captions, todo_llm, args.batch_size), len(everything), made_by["llm"])
            run_encoder("clipL", lambda: load_text_encoder2(args.text_encoder2, dtype=dtype, device=device),
                        encoder_batches(config.all_datasets, captions, todo_clip, args.batch_size), len(everything), made_by["clipL"])

            changed = {c.cache_path for c in todo_llm} | {c.cache_path for c in todo_clip}
            for ds, report, cs in zip(config.all_datasets, reports, captions):
                report.cached = sum(c.cache_path in changed for c in cs)
                report.already_cached = len(cs) - report.cached
                report.unrecorded = sum(c.cache_path in unrecorded and c.cache_path not in changed for c in cs)
                tidy_cache_directory(ds.cache_directory, stale_text_caches(ds, cs, report), keep_cache=args.keep_cache, text=True)
                print(f"{ds.where}: {report.summary('text caches')}")
            require_some_cached(reports, "text cache")

    run_cli(run, argv, memory_advice="--fp8_llm and a smaller --batch_size need less")


if __name__ == "__main__":
    main()
