"""Encode every image and video clip of a dataset with the VAE once, and write musubi-tuner's latent caches.

    python src/musubi_tuner/cache_latents.py --dataset_config dataset.toml --vae vae/pytorch_model.pt \
        --vae_chunk_size 32 --vae_tiling

Files that cannot be read are reported by name and skipped (`--strict` stops instead); each cache is
written atomically, so an interrupted run is finished by running it again.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: import the package from src/, not sibling files
    import os as _os
    import sys as _sys

    _sys.path[0] = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

import argparse
import logging
import os


from musubi_tuner.cli import Parser, compute_dtype, count, path, pixels, resolve_device
from musubi_tuner.errors import UserError, require_one_process, run_cli
from musubi_tuner.files import require_present

logger = logging.getLogger("cache_latents")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cache_latents.py", description=__doc__)
    p.add_argument("--dataset_config", type=path, required=True, help="dataset TOML (or JSON)")

    g = p.add_argument_group("model")
    g.add_argument("--vae", type=path, help="VAE checkpoint (vae/pytorch_model.pt)")
    g.add_argument("--vae_dtype", type=compute_dtype, default=None, help="VAE dtype (default float16)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda if available, else cpu)")
    g.add_argument("--disable_cudnn_backend", action="store_true", help="turn cuDNN off (AMD GPUs, or when its convolutions are slow)")

    g = p.add_argument_group("memory")
    g.add_argument("--vae_tiling", action="store_true", help="encode in overlapping spatial tiles (256 px unless set below)")
    g.add_argument("--vae_chunk_size", type=count(1), default=None, help="evaluate the causal convolutions in chunks (32 suggested)")
    g.add_argument("--vae_spatial_tile_sample_min_size", type=pixels, default=None, help="tile size in pixels; implies --vae_tiling")

    g = p.add_argument_group("what to cache")
    g.add_argument("--batch_size", type=count(1), default=None, help="items per VAE call (default: the dataset's batch_size)")
    g.add_argument("--num_workers", type=count(0), default=None, help="threads decoding media while the VAE runs (default CPUs - 1)")
    g.add_argument("--skip_existing", action="store_true", help="keep caches whose source, bucket and VAE are unchanged")
    g.add_argument("--keep_cache", action="store_true", help="do not delete caches of items no longer in the dataset")
    g.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of skipping it")

    g = p.add_argument_group("looking at the dataset instead of caching")
    g.add_argument("--debug_mode", choices=("image", "console", "video"), default=None,
                   help="show what would be encoded instead of caching")
    g.add_argument("--console_width", type=count(8, 1000), default=80, help="--debug_mode console: characters per row")
    g.add_argument("--console_back", default=None,
                   help="--debug_mode console: background colour (black, red, green, yellow, blue, magenta, cyan, white)")
    g.add_argument("--console_num_images", type=count(1), default=None, help="--debug_mode console: show at most N items of each dataset")
    return p


def encode_dataset(dataset, items, report, vae, args, device, generator):
    """Cache one dataset's `items` (`listed_items`, whose `report` this completes); returns the report."""
    import torch

    from musubi_tuner.data import cache_files
    from musubi_tuner.data.items import chunks, iter_latent_batches, stack_pixels, stale_latent_caches, tidy_cache_directory
    from musubi_tuner.hunyuan.vae import LATENT_FAR
    from musubi_tuner.progress import progress_bar

    workers = args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    record = cache_files.dataset_record(dataset.source, dataset.cache_directory)
    # the bar counts the source files, whose number is known (their windows are known once each is read): a bar of
    # the windows had no total, so no ETA, for the longest job but training (fuzz_ao 9)
    bar = progress_bar(total=len(items), desc=f"{dataset.where} latents", unit="file")
    made_by = cache_files.vae_provenance(args.vae, vae.dtype)
    for batch in iter_latent_batches(dataset, report, num_workers=workers, skip_existing=args.skip_existing,
                                     vae=made_by, strict=args.strict, items=items, taken=lambda item: bar.update(1)):
        for part in chunks(batch.items, args.batch_size):
            with torch.no_grad():
                latents = vae.encode(stack_pixels(part, device, vae.dtype)).sample(generator).to("cpu", vae.dtype)
            # (a few NaN are stored as 0, as musubi-tuner stores them; infinities are refused as the cache is written)
            largest = float(torch.nan_to_num(latents.float(), nan=0.0, posinf=0.0, neginf=0.0).abs().max()) if latents.numel() else 0.0
            if largest > LATENT_FAR:  # every cache would be refused by training, which said to cache again
                raise UserError(f"--vae {args.vae}: the latents of {part[0].source.path} reach {largest:.3g}, where a VAE's "  # (fuzz_ar 9)
                                "stay within a few units: the VAE file is damaged (or float16 overflowed: --vae_dtype "
                                "float32); nothing more is cached")
            for item, latent in zip(part, latents):
                cache_files.save_latent_cache(item.cache_path, latent, size=item.size, frame_count=item.frame_count,
                                              provenance={**item.provenance, **record})
                report.cached += 1
    bar.close()
    tidy_cache_directory(dataset.cache_directory, stale_latent_caches(dataset, report), keep_cache=args.keep_cache)
    from musubi_tuner.data.cache_files import record_left_out

    record_left_out(dataset.cache_directory, report.skipped + report.failed)  # (training quotes why, not "cache again")
    return report


# the flags each way of running reads besides the dataset's: caching, or looking at the dataset (--debug_mode MODE)
CACHING_ONLY = ("vae", "vae_dtype", "device", "disable_cudnn_backend", "vae_tiling", "vae_chunk_size",
                "vae_spatial_tile_sample_min_size", "skip_existing", "keep_cache", "strict")


def say_unused_flags(args) -> None:
    """A warning naming each flag given that this run does not read: the caching flags with --debug_mode, the
    console's without --debug_mode console (--console_num_images also limits the other modes)."""
    parser = build_parser()  # its defaults: a flag at its default was not given
    unused = [*(CACHING_ONLY if args.debug_mode else ()), *(("console_width", "console_back") if args.debug_mode != "console" else ()),
              *(() if args.debug_mode else ("console_num_images",))]
    given = [f"--{f}" for f in unused if getattr(args, f) != parser.get_default(f)]
    if given:
        logger.warning("%s: not read %s; ignored", ", ".join(given),
                       f"by --debug_mode {args.debug_mode}, which caches nothing" if args.debug_mode else "while caching")


def main(argv=None) -> None:
    def run(argv):
        import torch

        args = build_parser().parse_args(argv)
        require_one_process("cache_latents.py")
        from musubi_tuner.data.config import load_dataset_config

        config = load_dataset_config(args.dataset_config, args)
        say_unused_flags(args)
        if args.debug_mode:
            from musubi_tuner.data.debug_view import show_dataset

            show_dataset(config, args)
            return
        if not args.vae:
            raise UserError("--vae is required (the VAE checkpoint, e.g. hunyuan-video-t2v-720p/vae/pytorch_model.pt)")
        require_present(args.vae, "VAE checkpoint", "--vae")
        from musubi_tuner.data.cache_files import lock_cache_directories
        from musubi_tuner.data.items import CacheReport, listed_items
        from musubi_tuner.dtypes import str_to_dtype
        from musubi_tuner.hunyuan.vae import load_vae

        # every dataset's items (validation datasets too) before the VAE loads: a malformed JSONL line of the last
        # dataset stops the run now, not after the others are encoded
        reports = [CacheReport() for _ in config.all_datasets]
        items = [listed_items(ds, report) for ds, report in zip(config.all_datasets, reports)]
        device = resolve_device(args.device)
        with lock_cache_directories(config.all_datasets, "latents"):  # before the VAE loads: a second run stops at once
            if args.disable_cudnn_backend:
                torch.backends.cudnn.enabled = False
            vae = load_vae(args.vae, dtype=str_to_dtype(args.vae_dtype, torch.float16, "--vae_dtype"), device=device)
            vae.set_memory_options(tiling=args.vae_tiling or args.vae_spatial_tile_sample_min_size is not None,
                                   spatial_tile_sample_min_size=args.vae_spatial_tile_sample_min_size, chunk_size=args.vae_chunk_size)
            generator = torch.Generator(device).manual_seed(0)  # the posterior sample is reproducible run to run
            for ds, todo, report in zip(config.all_datasets, items, reports):
                encode_dataset(ds, todo, report, vae, args, device, generator)
        print("\n".join(f"{ds.where}: {r.summary('latent caches')}" for ds, r in zip(config.all_datasets, reports)))
        from musubi_tuner.data.items import require_some_cached

        require_some_cached(reports, "latent cache")

    run_cli(run, argv, memory_advice="--vae_tiling (with a smaller --vae_spatial_tile_sample_min_size), --vae_chunk_size 16 "
                                      "and --batch_size 1 need less")


if __name__ == "__main__":
    main()
