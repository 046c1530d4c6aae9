"""LoRA training for HunyuanVideo: load, wrap, loop, save.

Flow matching as HunyuanVideo is trained: noisy = (1 - sigma) * x0 + sigma * noise, the DiT predicts
noise - x0, loss = MSE (optionally weighted). The DiT is frozen; only the network's weights train.
Each sample's noise and timestep come from its own seed, made of (run seed, epoch, sample id), so they do
not depend on the batch or process a sample lands in. Multi-GPU and multi-node runs come from
`accelerate launch` (or torchrun): processes = data parallel replicas x --context_parallel N, the N
processes of a group sharing each sample's tokens (distributed.py); gradients of the network are summed
over all processes and divided by the replicas before each optimizer step, so R replicas of batch B
train as one process of batch R x B would.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from musubi_tuner.cli import FLOAT32_MAX, far_from_usual
from musubi_tuner.distributed import (GradientReducer, after_joining, check_same_inputs, describe as describe_layout,
                                      make_layout)
from musubi_tuner.dtypes import str_to_dtype
from musubi_tuner.errors import SharedError, UserError, launched, print_report, quieted, without_worker_traceback
from musubi_tuner.files import StateDictFile, content_digest, require_file
from musubi_tuner.hunyuan.checkpoints import load_dit
from musubi_tuner.hunyuan.compile import (CompileOptions, check_can_compile, check_compile_flags, compile_blocks, compile_errors,
                                          known_gradient_problem, log_graph_breaks)
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.hunyuan.sequence_parallel import check_heads
from musubi_tuner.hunyuan.vae import SCALING_FACTOR, latent_frames
from musubi_tuner.inference import step_cache
from musubi_tuner.progress import progress_bar
from musubi_tuner.training.args import attention_mode, check_attention_flags, log_folder, output_stem
from musubi_tuner.training.checkpointing import CheckpointSaver, check_final_names_free, check_names_fit
from musubi_tuner.training.flow_matching import predict_velocity
from musubi_tuner.training.optimizers import (check_optimizer, check_scheduler, create_optimizer, create_scheduler, is_schedule_free,
                                             optimizer_settings, parse_key_values, total_training_steps)
from musubi_tuner.training.state import TrainProgress, complete_states, load_state, read_progress, run_identity
from musubi_tuner.training.timesteps import (TimestepConfig, loss_weights, read_settings, sample_timesteps,
                                             warn_of_a_range_seldom_drawn, warn_of_unread_flags)

logger = logging.getLogger(__name__)


class NonFiniteLoss(SharedError):
    """Every process stops on it at the same step (the loss, gradients and weights checked are shared), with the same
    message (the items come from every process): process 0 prints it."""


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding NaN/inf, or None."""
    from musubi_tuner.networks.lora_reader import first_non_finite as first_in

    return first_in({name: t for name, t in module.named_parameters() if t.requires_grad})


def diverged_update(network: torch.nn.Module) -> str | None:
    """The network's first module whose update is a diverged training's (networks.lora_reader.diverged: what every
    reader of the saved file would refuse), in words; None when none is."""
    from musubi_tuner.networks.lora_reader import diverged, parse_lora

    with torch.no_grad():
        return diverged(parse_lora({k: t.detach() for k, t in network.state_dict().items()}).patches)


NO_UPDATE = 1e-10  # a change per weight below what a float32 weight of the DiT's size (about 0.02: a step of 2e-9) holds


def largest_update(network: torch.nn.Module) -> float:
    """The largest change the network makes to one weight of the DiT (an upper bound below lora_reader's
    DIVERGED_UPDATE)."""
    from musubi_tuner.networks.lora_reader import largest_update as of_patch, parse_lora

    with torch.no_grad():
        return max((of_patch(p) for p in parse_lora({k: t.detach() for k, t in network.state_dict().items()}).patches), default=0.0)


def far_settings(args) -> str | None:
    """The training flags given far beyond their usual range, as the likely cause of a NaN loss (cli.far_from_usual)."""
    # (--network_alpha 0 means alpha = rank, as in musubi-tuner: the usual scale 1, not a far value: fuzz_ad F6; a flow
    # shift the sampling does not read is said to be ignored, not to be the cause: fuzz_bb 9)
    shift = args.discrete_flow_shift if "discrete_flow_shift" in read_settings(timestep_config(args)) else None
    return far_from_usual([("--network_alpha", args.network_alpha or None, (1e-6, 1e6)), ("--discrete_flow_shift", shift, (1e-3, 1e3)),
                           ("--guidance_scale", args.guidance_scale, (0, 1e3)),
                           *(("--base_weights_multiplier", m, (-100, 100)) for m in args.base_weights_multiplier or ()),
                           ("--network_args loraplus_lr_ratio", _loraplus_ratio(args), (0, 1e3)),
                           ("--max_grad_norm", args.max_grad_norm or None, (1e-6, 1e6)),  # (0: no clipping)
                           ("--scale_weight_norms", args.scale_weight_norms, (1e-6, 1e6))])


def _loraplus_ratio(args) -> float | None:
    """loraplus_lr_ratio of --network_args, or None (not given, or not a number: the network module refuses that)."""
    try:
        ratio = float(parse_key_values(args.network_args, "--network_args")["loraplus_lr_ratio"])
    except (UserError, KeyError, TypeError, ValueError):  # (a malformed one is refused with the other network options)
        return None
    return ratio if math.isfinite(ratio) else None


def grown_lora(network: torch.nn.Module, learning_rate: float, step: int, reached: float | None = None,
               schedule: str = "") -> str | None:
    """Why a loss is NaN when the items are not to blame: the LoRA's update, which stays well below the weights it
    changes, has grown to a diverged training's in the updates before (a learning rate far too high, or no clipping).
    `reached`: the highest rate the schedule (`schedule`, its flags in words) set so far, when above --learning_rate: the
    flag was blamed at its base value where the schedule's args had raised it 1e10 times (fuzz_bb 3)."""
    too_large = diverged_update(network) if step > 1 else None
    if too_large is None:
        return None
    ratio = getattr(network, "loraplus_lr_ratio", None)  # (LoRA+: the up weights train faster; a huge ratio was blamed on
    raised = reached is not None and reached > learning_rate * 1.01
    base = reached if raised else learning_rate
    rate = f" and loraplus_lr_ratio {ratio:g} (the up weights at {base * ratio:g})" if ratio else ""  # the rate: F9)
    said = (f"the learning rate {schedule} reached, {reached:g} (--learning_rate {learning_rate:g}){rate}" if raised else
            f"--learning_rate {learning_rate:g}{rate}")
    return f"The LoRA diverged in the {step - 1} update(s) before ({too_large}): {said} {'are' if ratio else 'is'} far too high"


def schedule_in_words(args) -> str:
    """The learning-rate schedule as its flags say it: "--lr_scheduler_type ExponentialLR --lr_scheduler_args gamma=1e10"."""
    given = f" --lr_scheduler_args {' '.join(args.lr_scheduler_args)}" if args.lr_scheduler_args else ""
    return (f"--lr_scheduler_type {args.lr_scheduler_type}" if args.lr_scheduler_type else f"--lr_scheduler {args.lr_scheduler}") + given


def culprit_items(items: list[str], local_loss: torch.Tensor | None, processes: int) -> list[str]:
    """The items to name when a run diverges: this batch's, or with several processes, those of the processes whose
    own loss was not finite (every process, when the loss is not what went wrong), each marked with its process."""
    if processes == 1:
        return list(items)
    import torch.distributed as dist

    finite = local_loss is None or bool(torch.isfinite(local_loss).all())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (finite, list(items)))
    culprits = [(rank, names) for rank, (ok, names) in enumerate(everyone) if not ok] or list(enumerate(n for _, n in everyone))
    return [f"process {rank}: {name}" for rank, names in culprits for name in names]


def divergence(what: str, step: int, epoch: int, items, saver: CheckpointSaver, known_cause: str | None = None,
               untrained: bool = False) -> NonFiniteLoss:
    """The error that stops a diverged run, naming the newest checkpoint saved before the bad update.

    Weights are checked after every update and before every save, so every checkpoint is finite and was saved
    before the update that went wrong; the state the run resumed from counts when nothing was saved since. A loss
    that is not finite at the step right after a save was computed with that save's weights: said, since the
    cause may then be those weights rather than the items."""
    good = saver.last_good
    if saver.last_saved is not None and what.startswith("loss") and saver.last_step == step - 1:
        good += " (saved at the step before, so its weights gave this loss; an earlier save is safer unless the items are at fault)"
    if untrained and not known_cause:  # (blamed on --learning_rate, which had not acted yet: fuzz_ar 3)
        return NonFiniteLoss(f"{what} at step {step} (epoch {epoch}, items {', '.join(items)}) before any update: the LoRA "
                             "adds nothing yet, so the learning rate is not the cause; check the latent and text caches of "
                             f"those items and the DiT file (--dit){saver.or_bf16}")
    lower = saver.lower_rate
    advice = f"{known_cause}; else {lower[0].lower()}{lower[1:]}" if known_cause else lower  # (with the way from a checkpoint)
    return NonFiniteLoss(f"{what} at step {step} (epoch {epoch}, items {', '.join(items)}); stopped without saving. "
                         f"Last good checkpoint: {good}. {advice}, check the caches of those items{saver.or_bf16}.")


# ----------------------------------------------------------------------------------------------- set-up


def batches_of(loader, saver: CheckpointSaver):
    """The loader's batches; what stops it (a cache found damaged or gone at the step that reads it, hours in) names the
    last good checkpoint, as a stop of the training's own does (fuzz_ar 6)."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UserError as e:
            raise type(e)(f"{without_worker_traceback(str(e), type(e).__name__)}. Last good checkpoint: {saver.last_good}.") from None
        yield batch


def timestep_config(args) -> TimestepConfig:
    """The timestep flags as one config (which checks them together: --min_timestep below --max_timestep, ...)."""
    return TimestepConfig(args.timestep_sampling, args.discrete_flow_shift, args.sigmoid_scale, args.weighting_scheme,
                          args.logit_mean, args.logit_std, args.mode_scale, args.min_timestep, args.max_timestep,
                          args.preserve_distribution_shape, args.sigma_uses_shift)


def check_args(args) -> None:
    """Everything that can be checked before loading a model."""
    for flag in ("dataset_config", "dit", "network_module", "output_dir", "output_name"):
        if getattr(args, flag) is None:
            raise UserError(f"--{flag} is required")
        if not str(getattr(args, flag)).strip():  # (given, and empty: "is required" said it was not given: fuzz_as 5)
            raise UserError(f"--{flag} is empty (an unset shell variable gives an empty value): give its value")
    joined = output_stem(args.output_dir, args.output_name)
    # the files' folder is output_dir from here on, so pruning, --resume auto and the run lock look where they are
    args.output_dir, args.output_name = str(joined.parent), joined.name
    check_names_fit(args.output_dir, args.output_name)
    check_final_names_free(args.output_dir, args.output_name, args.lora_format)
    require_file(args.dataset_config, "dataset config", "--dataset_config")
    require_file(args.dit, "DiT checkpoint", "--dit")
    attention_mode(args)
    check_attention_flags(args)
    warn_of_unread_flags(timestep_config(args))
    warn_of_a_range_seldom_drawn(timestep_config(args))
    if args.guidance_scale_x1000 and args.guidance_scale > FLOAT32_MAX / 1000:  # (what the DiT is fed, times 1000, is a
        # float32: past it, a traceback at the first step, after the model had loaded: fuzz_ab 10)
        raise UserError(f"--guidance_scale {args.guidance_scale:g}: with --guidance_scale_x1000 at most {FLOAT32_MAX / 1000:g} "
                        "(the DiT is fed it times 1000, a float32)")
    far = far_settings(args)
    if far:  # said before the work: a far value that does not overflow trains a LoRA that learns nothing without a word
        logger.warning(f"{far} of a NaN loss or of a LoRA that learns nothing")
    if args.resume and not args.resume_from_huggingface:
        from musubi_tuner.training.state import check_same_run, complete_states, read_state_folder

        # missing, or no complete state: said before the model loads (--resume auto: its first state, where a state of
        # another run is refused, as every older one would be too)
        first = next(iter(complete_states(Path(args.output_dir), args.output_name)), None) if args.resume == "auto" else args.resume
        if first is not None:
            _, saved = read_state_folder(first)
            processes = {} if args.dry_run else {"processes": launched()[1]}  # (a dry run may plan for other processes)
            if "dit_in_channels" in saved:  # (the DiT file's header: an I2V state resumed on a T2V DiT)
                from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

                processes["dit_in_channels"] = read_dit_config(open_dit_file(args.dit)).in_channels
            check_same_run(Path(first), saved, {**identity_from_flags(args), **processes}, say=False)
    if args.gradient_checkpointing_cpu_offload and not args.gradient_checkpointing:
        raise UserError("--gradient_checkpointing_cpu_offload needs --gradient_checkpointing")
    if args.sample_prompts and not (args.vae and args.text_encoder1 and args.text_encoder2):
        raise UserError("--sample_prompts needs --vae, --text_encoder1 and --text_encoder2")
    from musubi_tuner.planning.from_args import check_budget_flag

    check_budget_flag(args)
    if step_cache.from_args(args) is not None and not args.sample_prompts:
        logger.warning("--step_cache acts on the samples of --sample_prompts only; without them it does nothing")
    compile_options = check_compile_flags(args)
    if compile_options is not None and not args.dry_run:
        check_can_compile(compile_options, "cuda" if torch.cuda.is_available() else "cpu", training=True)
    sampling = [f"--{flag}" for flag in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first", "vae_tiling",
                                         "vae_chunk_size", "vae_spatial_tile_sample_min_size") if getattr(args, flag)]
    if not args.sample_prompts and sampling:
        logger.warning("%s: act%s on the samples of --sample_prompts, and none is given: ignored", ", ".join(sampling),
                       "" if len(sampling) > 1 else "s")
    if args.use_pinned_memory_for_block_swap and not args.blocks_to_swap:
        logger.warning("--use_pinned_memory_for_block_swap acts with --blocks_to_swap, and none is given: ignored")
    for unit in ("epochs", "steps"):  # the window of saves kept acts on the saves of that unit
        for kept in (f"save_last_n_{unit}", f"save_last_n_{unit}_state"):
            if getattr(args, kept) and not getattr(args, f"save_every_n_{unit}"):
                logger.warning("--%s acts on the saves of --save_every_n_%s, and none is set: it is ignored", kept, unit)
    if args.log_tracker_config:
        tracker_init_kwargs(args)  # read now: a missing or malformed file is said before the models load
    if args.network_weights:
        require_file(args.network_weights, "LoRA file", "--network_weights")
    if args.dim_from_weights and not args.network_weights:
        raise UserError("--dim_from_weights needs --network_weights")
    check_lora_files(args)
    network_options(args)
    check_network_fits(args)
    from musubi_tuner.training.hub import check_hub_args

    check_hub_args(args)
    if args.wandb_api_key and args.log_with not in ("wandb", "all"):
        logger.warning("--wandb_api_key is used only with --log_with wandb or all; it is ignored")
    from musubi_tuner.files import require_writable_folder

    require_writable_folder(args.output_dir, "--output_dir", create=not args.dry_run)
    if args.sample_prompts:  # the samples' folder, which sampling makes only at the first sample (hours in)
        require_writable_folder(Path(args.output_dir) / "sample", "--output_dir", create=not args.dry_run)
    if args.logging_dir:
        require_writable_folder(args.logging_dir, "--logging_dir", create=not args.dry_run)
        from musubi_tuner.files import require_names_fit

        # the run's log folder: --log_prefix and the start time (log_folder); too long, the whole run would go unlogged
        require_names_fit(args.logging_dir, "--log_prefix", args.log_prefix or "", [Path(log_folder(args)).name])


def check_lora_files(args) -> None:
    """--network_weights and --base_weights are whole, finite LoRA files (networks.lora_reader) that fit the DiT, before
    any model loads."""
    from musubi_tuner.networks.lora_files import load_network_weights

    allow_partial = getattr(args, "allow_partial_lora", False)
    if args.network_weights:
        weights = load_network_weights(args.network_weights, allow_partial)
        if not args.dim_from_weights:  # the kind and rank of its modules, which the network is built with
            from musubi_tuner.networks.lora import check_weights_fit

            check_weights_fit(args.network_weights, weights, args.network_module, args.network_dim or 4)
        check_network_takes(args, weights)
    if args.base_weights:  # each layer fitted to the DiT's header as the merge after the DiT loads would
        from musubi_tuner.hunyuan.checkpoints import open_dit_file
        from musubi_tuner.networks.merge import check_loras_fit

        check_loras_fit(args.base_weights, open_dit_file(args.dit).shapes(), args.dit, allow_partial)
    if args.base_weights_multiplier and not args.base_weights:
        logger.warning("--base_weights_multiplier acts on the files of --base_weights, and none is given: it is ignored")
    if args.base_weights:
        from musubi_tuner.networks.merge import lora_jobs

        lora_jobs(args.base_weights, args.base_weights_multiplier, say=True, multiplier_flag="--base_weights_multiplier")


LORA_BYTES_PER_PARAMETER = 16  # float32 weight, gradient and AdamW's two moments


def check_network_fits(args) -> None:
    """Before any model loads: the network the flags build, its weights, gradients and optimizer state, fits in the
    memory it trains in (the GPU's, else the machine's). --network_dim 1048576 on the tiny DiT was killed by the kernel
    without a word (fuzz_ab 6); the flag's own bound is the widest layer any model has."""
    module, _ = network_options(args, check=False)
    if args.dim_from_weights or not module.__name__.startswith("musubi_tuner."):
        return
    from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

    try:  # (a DiT file, or network options, the run refuses are said where the run says them, in its order: a launcher's
        # problem first, say)
        dit_file = open_dit_file(args.dit)
        try:
            config = read_dit_config(dit_file)
        finally:
            dit_file.close()
        with torch.device("meta"), quieted("musubi_tuner.networks", logging.CRITICAL):
            network = make_network(args, HunyuanVideoDiT(config), lambda: {})
        needed = LORA_BYTES_PER_PARAMETER * sum(p.numel() for p in network.parameters())
    except Exception:
        return
    if torch.cuda.is_available():
        where, memory = "the GPU's", torch.cuda.get_device_properties(0).total_memory
    else:
        where, memory = "this machine's", _host_memory()
    if memory and needed > memory:
        # (every layer a LoRA targets is at least the model's width wide on both sides)
        why = (f"; a rank above the layers' width ({config.hidden_size}) adds nothing but memory"
               if args.network_dim and args.network_dim > config.hidden_size else "")
        raise UserError(f"--network_dim {args.network_dim}: the LoRA alone needs {needed / 1e9:,.1f} GB (weights, gradients "
                        f"and optimizer state), more than {where} {memory / 1e9:,.1f} GB{why}")
    if args.network_dim and args.network_dim > config.hidden_size:  # (it trained, and wrote a 2.4 GB LoRA of a 1.3 MB
        # model's, without a word: fuzz_bb 5)
        logger.warning("--network_dim %d is above the width of every layer the LoRA trains (%d at the narrowest): a higher "
                       "rank adds nothing but memory and a larger file (its weights alone: %s GB in float32)", args.network_dim,
                       config.hidden_size, f"{needed / LORA_BYTES_PER_PARAMETER * 4 / 1e9:,.3g}")


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # (not on every system)
        return None


def check_network_takes(args, weights: dict[str, torch.Tensor]) -> None:
    """Before any model loads: the network these flags build takes --network_weights (its module names, shapes, LoKr
    factor), built on a DiT of --dit's config on the meta device, which holds no memory. Modules of other packages are
    left to their own loading."""
    import warnings

    from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

    module, _ = network_options(args, check=False)
    if not module.__name__.startswith("musubi_tuner."):
        return
    dit_file = open_dit_file(args.dit)
    try:
        config = read_dit_config(dit_file)
    finally:
        dit_file.close()
    # (the real build says what it builds, once)
    with torch.device("meta"), warnings.catch_warnings(), quieted("musubi_tuner.networks", logging.ERROR):
        warnings.simplefilter("ignore")  # loading into meta parameters copies nothing, as torch warns
        network = make_network(args, HunyuanVideoDiT(config), lambda: weights)
        network.check_takes(args.network_weights, weights, getattr(args, "allow_partial_lora", False))


def make_accelerator(args) -> Accelerator:
    from accelerate.utils import InitProcessGroupKwargs
    import datetime

    kwargs = []
    if args.ddp_timeout:
        kwargs.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    log_with, project_dir = None, None
    if args.logging_dir or args.log_with:
        check_trackers(args)
        log_with = {"all": ["tensorboard", "wandb"], None: "tensorboard"}.get(args.log_with, args.log_with)
        project_dir = log_folder(args)
        if args.log_with in ("wandb", "all"):
            wandb_login(args)
    # accelerate tells each process started without a launcher that it sets OMP_NUM_THREADS: two lines of its source per
    # process, a traceback each under PYTHONWARNINGS=error (fuzz_bd 9); it sets it, as a launcher does
    warnings.filterwarnings("ignore", message="OMP_NUM_THREADS/MKL_NUM_THREADS unset", category=UserWarning)
    try:
        accelerator = TrackedAccelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                         mixed_precision=args.mixed_precision, log_with=log_with, project_dir=project_dir,
                                         kwargs_handlers=kwargs)
    except ValueError as e:
        raise UserError(f"accelerate: {e}") from None
    except ImportError as e:  # ACCELERATE_USE_DEEPSPEED=true left from another launch: "DeepSpeed is not installed"
        used = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("ACCELERATE_USE_") and k != "ACCELERATE_USE_CPU"]
        raise UserError(f"accelerate: {e} ({', '.join(used) or 'its configuration'} asks for it; unset it, or install it)") from None
    # accelerate takes the accumulation from ACCELERATE_GRADIENT_ACCUMULATION_STEPS over the argument: a leftover made the
    # optimizer accumulate otherwise than the loop counted, and the metadata said another (fuzz_ah 5)
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:
        raise UserError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={os.environ.get('ACCELERATE_GRADIENT_ACCUMULATION_STEPS')} in the "
                        f"environment overrides --gradient_accumulation_steps {args.gradient_accumulation_steps}; unset it, or "
                        "give the flag its value")
    accelerator.logs_to = f"--logging_dir {project_dir}" if project_dir else f"--log_with {args.log_with}"
    return accelerator


class TrackedAccelerator(Accelerator):
    """An Accelerator whose trackers (--log_with: TensorBoard, wandb) are a side output that never costs the run.

    Every call into them (init_trackers, log, end_training, and `tracking` for the rest, as the sample images) goes
    through `tracking`: a tracker that fails to write (a full disk under --logging_dir, a file-size limit, wandb's
    own errors) is said once, in a warning that names where the logs go and why, and tracking is off for the rest of
    the run, which trains on and saves. Before, TensorBoard's full disk killed the run mid-way with two tracebacks
    and no LoRA for the steps done."""

    logs_to = "--logging_dir"
    tracking_off = False

    def init_trackers(self, *args, **kwargs):
        if self.is_main_process:
            _quiet_tensorboard_writer_threads()
        self.tracking(lambda: super(TrackedAccelerator, self).init_trackers(*args, **kwargs))

    def log(self, values: dict, step: int | None = None, log_kwargs: dict | None = None):
        self.tracking(lambda: super(TrackedAccelerator, self).log(values, step=step, log_kwargs=log_kwargs))

    def end_training(self):
        def finish():
            for tracker in self.trackers:
                tracker.finish()

        self.tracking(finish)
        self.trackers = []
        self.state.destroy_process_group()  # what accelerate's end_training does after the trackers

    def tracking(self, call):
        """`call()`, which writes to the trackers, unless tracking is off; a failure to write turns it off."""
        if self.tracking_off:
            return None
        try:
            return call()
        except _tracker_errors() as e:
            self.stop_tracking(e)
            return None

    def stop_tracking(self, e: BaseException) -> None:
        self.tracking_off = True
        logger.warning("%s: cannot write the training logs (%s); logging is off for the rest of the run, which trains on",
                       self.logs_to, getattr(e, "strerror", None) or str(e) or type(e).__name__)
        for tracker in self.trackers:  # close what can be closed; each failed or fails alike
            try:
                tracker.finish()
            except Exception:
                pass
        self.trackers = []


def _tracker_errors() -> tuple[type[BaseException], ...]:
    """What a tracker raises when it cannot write: OSError, and the errors of the tracker libraries loaded."""
    import sys

    errors: list[type[BaseException]] = [OSError]
    for module, name in (("wandb.errors", "Error"), ("tensorboard.compat.tensorflow_stub.errors", "OpError")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _quiet_tensorboard_writer_threads() -> None:
    """TensorBoard writes its events in a thread, which printed a traceback when a write failed. The thread also keeps
    its error for the training's next call into the writer, which TrackedAccelerator.tracking says in a line: the
    thread's traceback is dropped (its OSError only; anything else, and every other thread's, is printed as before)."""
    import threading

    if getattr(threading.excepthook, "quiets_tensorboard", False):
        return
    previous = threading.excepthook

    def hook(args):
        if not (type(args.thread).__module__.startswith(("tensorboard", "tensorboardX", "torch.utils.tensorboard"))
                and issubclass(args.exc_type, _tracker_errors())):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def check_trackers(args) -> None:
    """--log_with's trackers can start: tensorboard has its --logging_dir, wandb its package (the run and its dry run)."""
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        raise UserError("--log_with tensorboard needs --logging_dir")
    if args.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--log_with {args.log_with} needs the wandb package: pip install wandb")


def wandb_login(args) -> None:
    """As musubi-tuner: wandb logs beside --logging_dir (WANDB_DIR), after `wandb.login(key=--wandb_api_key)` when one is given."""
    try:
        import wandb
    except ImportError:
        raise UserError(f"--log_with {args.log_with} needs the wandb package: pip install wandb") from None
    if args.logging_dir:
        os.environ.setdefault("WANDB_DIR", args.logging_dir)
    if args.wandb_api_key:
        wandb.login(key=args.wandb_api_key)


def say_the_length(args, batches_per_epoch: int, total_steps: int) -> None:
    """What sets the run's length when it is not what the flags suggest: an accumulation longer than an epoch (whose
    every epoch is then one step). (--max_train_epochs over a --max_train_steps given too: parse_args says so.)"""
    if args.gradient_accumulation_steps > batches_per_epoch:
        logger.warning("--gradient_accumulation_steps %d is more than the %d batches of an epoch: each epoch is one optimizer "
                       "step, of its %d batches' gradients (divided by %d, as accelerate does)", args.gradient_accumulation_steps,
                       batches_per_epoch, batches_per_epoch, args.gradient_accumulation_steps)
    epochs = math.ceil(total_steps * args.gradient_accumulation_steps / max(1, batches_per_epoch))
    workers = min(args.max_data_loader_n_workers, os.cpu_count() or 1)
    if workers and not args.persistent_data_loader_workers and epochs >= 20 and batches_per_epoch <= 8:
        # (300 epochs of one image took 423 s, 47 s as one epoch of 300 steps: fuzz_am 8; musubi-tuner's default too)
        logger.info("%d epochs of %d batch(es): the data loader starts its %d worker process(es) anew each epoch (about a "
                    "second each time); --persistent_data_loader_workers keeps them", epochs, batches_per_epoch, workers)


def tracker_init_kwargs(args) -> dict:
    """accelerate's init_kwargs: --log_tracker_config (a TOML file, as musubi-tuner) or the wandb run name."""
    if args.log_tracker_config:
        from musubi_tuner.tomlio import load_toml

        return load_toml(Path(args.log_tracker_config), "tracker config", "--log_tracker_config")
    return {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}


NETWORK_MODULES_HERE = "this project has networks.lora, networks.loha and networks.lokr"


def load_network_module(name: str):
    """The --network_module, which must make networks (create_arch_network or create_network, as musubi-tuner calls)."""
    for candidate in (f"musubi_tuner.{name}", name):
        try:
            module = importlib.import_module(candidate)
        except ModuleNotFoundError as e:
            if e.name is None or not (candidate == e.name or candidate.startswith(e.name + ".")):  # (the module is there;
                # something it imports is not)
                raise UserError(f"--network_module {name}: it imports {e.name or e}, which is not installed") from None
            continue  # (the module or a folder above it is not there: musubi_tuner.musubi_tuner.networks.lora, fuzz_ad F1)
        if not hasattr(module, "create_arch_network") and not hasattr(module, "create_network"):
            raise UserError(f"--network_module {name}: not a network module (it has no create_network); {NETWORK_MODULES_HERE}")
        return module
    raise UserError(f"--network_module {name}: no such module ({NETWORK_MODULES_HERE})")


def load_frozen_dit(args, device: torch.device) -> HunyuanVideoDiT:
    dit_dtype = str_to_dtype(args.dit_dtype, torch.bfloat16, "--dit_dtype")
    merge_first = bool(args.base_weights)
    load_device = "cpu" if args.blocks_to_swap or merge_first else device
    dit = load_dit(args.dit, device=load_device, dtype=dit_dtype, fp8=args.fp8_base and not merge_first,
                   in_channels=args.dit_in_channels, attn_mode=attention_mode(args), split_attn=args.split_attn)
    if merge_first:
        from musubi_tuner.networks.merge import merge_loras_into

        merge_loras_into(dit, args.base_weights, args.base_weights_multiplier, device=device,
                         allow_partial=getattr(args, "allow_partial_lora", False))
        if args.fp8_base:
            from musubi_tuner.hunyuan.fp8 import convert_to_fp8

            convert_to_fp8(dit)
    if args.gradient_checkpointing:
        dit.enable_gradient_checkpointing(args.gradient_checkpointing_cpu_offload)
    if args.img_in_txt_in_offloading:
        dit.offload_embedders = True
    if args.blocks_to_swap:
        from musubi_tuner.hunyuan.offload import MAX_BLOCKS_TO_SWAP_TRAINING, BlockSwap

        BlockSwap(dit, args.blocks_to_swap, device, args.use_pinned_memory_for_block_swap, max_blocks=MAX_BLOCKS_TO_SWAP_TRAINING)
    else:
        dit.to(device)
    dit.train(args.gradient_checkpointing)  # official behaviour: train mode only matters for checkpointing
    compile_options = CompileOptions.from_args(args)
    if compile_options is not None:  # block by block, after block swap: its hooks run between the compiled blocks
        compile_blocks(dit, compile_options, training=True)
    return dit


def network_options(args, dit_config=None, check: bool = True):
    """--network_module and its --network_args: the module, and the arguments it reads (checked, when it can say;
    with the DiT's config, its include/exclude patterns too). `check` False: for a network built after check_args has
    checked them (what they ignore was said once per build, four times a run)."""
    module = load_network_module(args.network_module)
    net_kwargs = parse_key_values(args.network_args, "--network_args")
    net_kwargs = {k: v if isinstance(v, str) else repr(v) if isinstance(v, (list, tuple)) else str(v) for k, v in net_kwargs.items()}
    check = getattr(module, "check_network_args", None) if check else None
    if check is not None:
        check(dict(net_kwargs), *([dit_config] if dit_config is not None and not args.dim_from_weights else []))
    if dit_config is not None and args.dim_from_weights and {"include_patterns", "exclude_patterns"} & set(net_kwargs):
        logger.warning("--network_args include_patterns / exclude_patterns: ignored with --dim_from_weights, where the file's "
                       "modules are the network's")
    return module, net_kwargs


def make_network(args, dit: HunyuanVideoDiT, file_weights):
    """The network of --network_module on `dit`, not applied: of --network_dim and --network_args, or with
    --dim_from_weights of the modules of `file_weights()` (--network_weights' tensors)."""
    module, net_kwargs = network_options(args, check=False)
    if args.dim_from_weights:
        from musubi_tuner.networks.lora import lora_name, require_fits

        weights = file_weights()
        if module.__name__.startswith("musubi_tuner."):  # (a network's own modules, in our naming)
            require_fits(args.network_weights, weights, {lora_name(path): tuple(m.weight.shape) for path, m in dit.named_modules()
                                                         if isinstance(m, torch.nn.Linear)}, every=True)
        return module.create_arch_network_from_weights(1.0, weights, unet=dit, **net_kwargs)
    create = getattr(module, "create_arch_network", None) or getattr(module, "create_network")
    return create(1.0, args.network_dim, args.network_alpha, None, None, dit, neuron_dropout=args.network_dropout, **net_kwargs)


def build_network(args, dit: HunyuanVideoDiT):
    from musubi_tuner.networks.lora_files import load_network_weights

    allow_partial = getattr(args, "allow_partial_lora", False)
    network = make_network(args, dit, lambda: load_network_weights(args.network_weights, allow_partial))
    if args.dim_from_weights:
        record_file_shape(args, network)
    network.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    if args.network_weights and not args.dim_from_weights:
        info = network.load_weights(args.network_weights, **({"allow_partial": True} if allow_partial else {}))
        logger.info("loaded %s into the network (%s)", args.network_weights, info)
        if info.get("alpha") is not None:
            args.network_alpha = info["alpha"]  # the metadata records the alpha the LoRA trains with
    network.prepare_grad_etc(None, dit)
    return network


def record_file_shape(args, network) -> None:
    """--dim_from_weights: the file decides each module's rank and alpha. Where they are one rank and one alpha, the
    metadata records them, not --network_dim / --network_alpha, which are said to be ignored where they differ
    (--network_alpha at its default, 1, is not taken as given)."""
    ranks = {m.rank for m in network.unet_loras}
    alphas = {float(m.alpha) for m in network.unet_loras}
    given = {"--network_dim": (args.network_dim, ranks), "--network_alpha": (args.network_alpha if args.network_alpha != 1 else None, alphas)}
    ignored = [f"{flag} {value:g}" for flag, (value, found) in given.items() if value is not None and {float(value)} != found]
    if ignored:
        logger.warning("--dim_from_weights: the modules of %s have rank %s and alpha %s; %s ignored", args.network_weights,
                       "/".join(map(str, sorted(ranks))), "/".join(f"{a:g}" for a in sorted(alphas)), " and ".join(ignored))
    if len(ranks) == 1:
        args.network_dim = ranks.pop()
    if len(alphas) == 1:
        args.network_alpha = alphas.pop()


# ----------------------------------------------------------------------------------------------- the step


def sample_seeds(seed: int, epoch: int, sample_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(noise seed, timestep seed) per sample: a function of the run's seed, the epoch and the sample only.

    So a sample gets the same noise and timestep whichever batch or process it lands in: two processes of
    batch B train exactly as one process of batch 2B, a resumed run as an uninterrupted one, and no two
    processes share noise.
    """
    seeds = []
    for sample_id in sample_ids:
        noise_seed, timestep_seed = np.random.SeedSequence([seed, epoch, sample_id]).generate_state(2, np.uint64)
        seeds.append((int(noise_seed) >> 1, int(timestep_seed) >> 1))
    return seeds


def draw_noise_and_timesteps(ts_cfg: TimestepConfig, latents: torch.Tensor, seeds: Sequence[tuple[int, int]] | None,
                             uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise like latents, sigma (B,), model timesteps (B,)) on the latents' device.

    With `seeds` (see sample_seeds) each sample's draws come from its own generators; without, from the
    process's global RNG. `uniform` (B,) are timestep-pool values replacing the uniform draws.
    """
    B, device = latents.shape[0], latents.device
    hw = tuple(latents.shape[-2:])
    if seeds is None:
        noise = torch.randn_like(latents)
        sigma, timesteps = sample_timesteps(ts_cfg, B, hw, uniform=uniform)
    else:
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator(device).manual_seed(n), device=device,
                                         dtype=latents.dtype) for n, _ in seeds])
        drawn = [sample_timesteps(ts_cfg, 1, hw, generator=torch.Generator().manual_seed(t), uniform=None if uniform is None else uniform[j:j + 1])
                 for j, (_, t) in enumerate(seeds)]
        sigma, timesteps = torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])
    return noise, sigma.to(device), timesteps.to(device)


def training_step(dit: HunyuanVideoDiT, batch: dict, accelerator: Accelerator, ts_cfg: TimestepConfig, guidance_value: float,
                  uniform: torch.Tensor | None = None, seeds: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """The flow-matching loss of one batch (a scalar, mean over the batch). `seeds`: per-sample draws (see sample_seeds)."""
    device = accelerator.device
    latents = batch["latents"].to(device, torch.float32) * SCALING_FACTOR
    noise, sigma, timesteps = draw_noise_and_timesteps(ts_cfg, latents, seeds, uniform)
    pred, target = predict_velocity(dit, latents, noise, sigma, timesteps, batch, accelerator, guidance_value)
    per_sample = (pred - target).square().mean(dim=(1, 2, 3, 4))
    weights = loss_weights(ts_cfg, sigma)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------- the loop


def largest_workload(dataset_config) -> tuple[tuple[int, int], int, int]:
    """(height, width), frames and batch size of the dataset entry with the most tokens per batch, validation datasets
    included (a larger [[validation_datasets]] batch ran out of memory at the first validation, unplanned: fuzz_ak 9; it
    is planned as a training step, which holds more than its forward does, and said).

    Buckets keep the resolution's area, so the resolution stands for every bucket of its dataset."""

    def frames(d):
        if not d.is_video:
            return 1
        if d.frame_extraction == "full":  # (the whole video, at most max_frames: it was planned at target_frames, which
            from musubi_tuner.data.frames import round_to_4n1  # "full" does not read, 1 frame: fuzz_af 6)

            return round_to_4n1(d.max_frames)
        return max(d.target_frames)

    biggest = max(dataset_config.all_datasets, key=lambda d: d.resolution[0] * d.resolution[1] * latent_frames(frames(d)) * d.batch_size)
    if biggest.role == "validation":
        logger.warning("%s: its batch is the largest, planned as a training step (validation runs it forward only, so "
                       "the plan holds more than it needs)", biggest.where)
    width, height = biggest.resolution
    return (height, width), frames(biggest), biggest.batch_size


def plan_training(args):
    """--dry_run: check the flags and the dataset TOML as a real run would, print the plan for its largest batch."""
    check_args(args)
    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.distributed import check_training_processes
    from musubi_tuner.planning.from_args import dry_run
    from musubi_tuner.planning.options import MAX_PLANNED_BATCH

    rank, world = launched()  # under a launcher: the layout and a --resume state checked as the run would, the plan printed once
    if world > 1:  # (one process plans a run of several: a laptop planning a cluster's)
        check_training_processes(world, args.context_parallel)
    if world > 1 and args.resume and args.resume != "auto" and not args.resume_from_huggingface:
        from musubi_tuner.training.state import check_same_processes, read_state_folder

        check_same_processes(Path(args.resume), read_state_folder(args.resume)[1],
                             {"processes": world, "context_parallel": args.context_parallel})
    if args.dit_in_channels is not None:  # (as the DiT loads: the dry run passed a count the run refused: fuzz_aj 4)
        from musubi_tuner.hunyuan.checkpoints import check_in_channels, open_dit_file, read_dit_config

        dit_file = open_dit_file(args.dit)
        try:
            check_in_channels(dit_file, read_dit_config(dit_file), args.dit_in_channels)
        finally:
            dit_file.close()
    check_trackers(args)  # (what the run refuses at once without a model: the dry run passed them: fuzz_al 2)
    # the optimizer and its schedule on a stand-in parameter, as the run builds them (the run's length needs the caches:
    # a run of epochs is taken as a long one, whose warmup the check cannot find too long)
    check_scheduler(args, check_optimizer(args.optimizer_type, args.learning_rate,
                                          parse_key_values(args.optimizer_args, "--optimizer_args"), torch.device("cpu")),
                    args.max_train_steps if not args.max_train_epochs else 10**6)
    size, frames, batch = largest_workload(load_dataset_config(args.dataset_config, check_sources=False))
    if batch > MAX_PLANNED_BATCH:  # a batch holds at most one bucket's items: the run takes it, the plan cannot
        logger.warning(f"{args.dataset_config}: batch_size {batch:,} is planned as {MAX_PLANNED_BATCH:,} samples, the most the "
                       "planner plans; a batch holds at most the items of one bucket")
        batch = MAX_PLANNED_BATCH
    result = dry_run(args, "train", video_size=size, frames=frames, batch=batch, out=print_report if rank == 0 else lambda text: None)
    if args.sample_prompts and rank == 0:  # (not planned: a 720p CFG sample needs more than many a training step: fuzz_af 16)
        from musubi_tuner.training.sampling import sample_prompts_for

        largest = max(sample_prompts_for(args.sample_prompts, result.workload.config.in_channels),  # (checked as the run
                      key=lambda p: (p.width * p.height * p.frames, p.cfg_scale or 1))  # checks them: fuzz_aj 4)
        cfg = f" --guidance_scale {largest.cfg_scale:g}" if largest.negative_prompt and largest.cfg_scale not in (None, 1.0) else ""
        logger.warning("the samples of --sample_prompts are not in this plan: they run while the LoRA and its optimizer state "
                       "are held. Plan the largest with python -m musubi_tuner.plan --mode generate --dit %s --video_size %d %d "
                       "--video_length %d --infer_steps %d%s", args.dit, largest.height, largest.width, largest.frames,
                       largest.steps, cfg)
    return result


# the flags that shape the learning-rate schedule besides its name and the run's length (what --max_train_steps changes
# to train on), recorded in each state and compared on resume
SCHEDULE_SHAPE_FLAGS = ("lr_warmup_steps", "lr_decay_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "lr_scheduler_timescale",
                        "lr_scheduler_min_lr_ratio", "lr_scheduler_args")


def identity_from_flags(args) -> dict:
    """The part of a run's identity (state.run_identity) its flags alone give: checked against a --resume folder before
    the DiT loads (a resume with another --network_dim was refused minutes late, after the model had loaded: fuzz_z 4)."""
    timesteps = read_settings(timestep_config(args))
    return {"scheduler": args.lr_scheduler_type or args.lr_scheduler, "context_parallel": args.context_parallel,
            "network": {"module": args.network_module, "dim": args.network_dim, "alpha": args.network_alpha,
                        "args": sorted(args.network_args or []), "dropout": args.network_dropout},
            "schedule": {flag: getattr(args, flag) for flag in SCHEDULE_SHAPE_FLAGS},
            # what else shapes each step, said when a resume changes it
            "training": {flag: getattr(args, flag) for flag in ("num_timestep_buckets", "guidance_scale", "guidance_scale_x1000",
                                                                 "max_grad_norm", "scale_weight_norms", "fp8_base", "full_bf16")},
            "timesteps": {("timestep_sampling" if k == "mode" else k): v for k, v in timesteps.items()}}  # (as the flags)


def run_seed(args, accelerator: Accelerator, resume_from: Path | None) -> int:
    """--seed; else the seed of the run being resumed; else a random one, the same on every process.

    A --seed other than the resumed run's is refused inside an epoch: the state's position is one in that seed's order
    of the items, and in another order some were trained twice in the epoch and others never (fuzz_z 2). At an epoch's
    start it only changes the order of the epochs to come, and is said."""
    saved = read_progress(resume_from) if resume_from is not None else None
    if args.seed is not None and saved is not None and saved.seed != args.seed:
        if saved.batch_in_epoch:
            raise UserError(f"{resume_from}: saved by a run of --seed {saved.seed}, {saved.batch_in_epoch} batches into epoch "
                            f"{saved.epoch + 1}, whose order of the items is that seed's; resume without --seed (or with "
                            f"--seed {saved.seed})")
        logger.warning("%s: saved by a run of --seed %d; the epochs from here are shuffled by --seed %d", resume_from, saved.seed,
                       args.seed)
    if args.seed is not None:
        return args.seed
    if saved is not None:
        return saved.seed
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([random.randint(0, 2**32 - 1)])[0]  # every process must shuffle and initialise alike


def take_output_lock(args, accelerator, held: contextlib.ExitStack) -> None:
    """One training run per --output_name in an --output_dir, and none beside it whose files would share names with
    its own (files.names_collide): its state, step files and LoRAs would mix with another's. Held by the process of
    global rank 0 (the one that writes) until the run ends; the others learn whether it got it and stop with it when
    it did not: a process left waiting for it in a collective sees no signal, and the launcher killed it only half a
    minute later."""
    from musubi_tuner.distributed import broadcast_value
    from musubi_tuner.files import RunLock, describe_holder, names_collide, running_trainings, train_lock

    refusal = None
    if accelerator.is_main_process:
        try:
            held.enter_context(RunLock(train_lock(args.output_dir, args.output_name), "training run", "--output_name or --output_dir",
                                       writes=args.output_name))
            for other in running_trainings(args.output_dir):  # (after taking its own: of two starting together, one
                if names_collide(other.get("writes"), args.output_name):  # sees the other)
                    named = f", writing --output_name {other['writes']}" if isinstance(other.get("writes"), str) else ""
                    raise UserError(f"{args.output_dir}: another training run is using this ({describe_holder(other)}{named}), "
                                    "whose files would share names with this run's; wait for it to finish or choose another "
                                    "--output_name or --output_dir")
        except UserError as e:
            refusal = str(e)
    if accelerator.num_processes > 1:
        refusal = broadcast_value(refusal)
        if refusal is not None:  # every process leaves the group together: exiting with gloo's threads live aborted
            from musubi_tuner.distributed import leave_group

            leave_group()
    if refusal is not None:
        raise SharedError(refusal)


def train(args) -> Path | None:
    """The final LoRA's path, or None when a resumed run had nothing left to train."""
    check_args(args)
    with contextlib.ExitStack() as held:
        return _train(args, held)


def _train(args, held: contextlib.ExitStack) -> Path | None:
    """`held`: what the run holds until it ends (the output folder's lock, its use of the cache folders)."""
    from musubi_tuner.distributed import before_joining, while_stoppable

    before_joining()
    if launched()[1] > 1:  # (its rendezvous, stoppable: see while_stoppable; the device is the thread's own in CUDA)
        accelerator = while_stoppable(lambda: make_accelerator(args))
        if accelerator.device.type == "cuda":
            torch.cuda.set_device(accelerator.device)
    else:
        accelerator = make_accelerator(args)
    world = launched()[1]
    if world > 1 and accelerator.num_processes != world:  # each process would train alone into the same files
        raise SharedError(f"launched as {world} processes (WORLD_SIZE), but accelerate joined {accelerator.num_processes}; "
                          f"on a machine without a GPU set ACCELERATE_USE_CPU=1 (accelerate launch --cpu sets it)")
    after_joining()
    take_output_lock(args, accelerator, held)
    if args.cuda_allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cuda_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if accelerator.device.type == "cpu":
        # AdamW's second moments of the zero-initialised lora_up weights decay into float denormals, which
        # the CPU handles about 100x slower (bench/train_step.py); GPUs flush them already.
        torch.set_flush_denormal(True)
    is_main = accelerator.is_main_process
    if not is_main:  # one copy of the progress messages and warnings, from the main process: every process meets the
        # same flags, dataset and state (what differs between them is refused: distributed.check_same_inputs)
        logging.getLogger("musubi_tuner").setLevel(logging.ERROR)
    from musubi_tuner.training.hub import HubUploader, download_state

    hub = HubUploader.from_args(args)
    if hub is not None and is_main:
        hub.create_repo()
    # --resume auto: the newest complete state first, older ones if it turns out damaged
    if args.resume and args.resume_from_huggingface:
        with accelerator.main_process_first():
            candidates = [download_state(args.resume, args.huggingface_token)]
    else:
        candidates = complete_states(Path(args.output_dir), args.output_name) if args.resume == "auto" else [Path(args.resume)] if args.resume else []
    resume_from = candidates[0] if candidates else None
    args.seed = seed = run_seed(args, accelerator, resume_from)  # the metadata records the seed actually used
    set_seed(seed)

    from musubi_tuner.data.config import load_dataset_config
    from musubi_tuner.data.training_dataset import TrainingDataset, make_dataloader

    dataset_config = load_dataset_config(args.dataset_config, check_sources=False)
    from musubi_tuner.data.cache_files import read_cache_directories

    held.enter_context(read_cache_directories(dataset_config.all_datasets))  # no caching run rewrites them meanwhile
    data = TrainingDataset.from_config(dataset_config, seed, args.num_timestep_buckets)
    from musubi_tuner.data.training_dataset import check_caches_fit
    from musubi_tuner.hunyuan.checkpoints import open_dit_file, read_dit_config

    dit_config = read_dit_config(open_dit_file(args.dit))  # the header only: a wrong cache fails before the model loads
    network_options(args, dit_config)  # the include/exclude patterns tried on the DiT's module names
    from musubi_tuner.networks.merge import warn_base_mismatch

    if args.network_weights:  # an I2V LoRA on a T2V DiT, say (--base_weights: check_loras_fit said it; it was said twice:
        lora = StateDictFile(args.network_weights, what="LoRA file")  # fuzz_au 9) (its metadata: check_lora_files read the
        warn_base_mismatch(lora.metadata, str(args.network_weights), dit_config, args.dit)  # whole file already)
        lora.close()
    check_heads(dit_config.heads_num, args.context_parallel)
    check_same_inputs({"--dit": args.dit, "--network_weights": args.network_weights,
                       "--config_file": args.config_file,  # (its copies read alike: network_alpha 1 and 64 trained together
                       # without a word, the command lines the same: fuzz_bd 7)
                       # (each process of a sample's group reads its own prompt file: a prompt differing on one hung the
                       # run in silence, or was a KeyError: fuzz_ae 1)
                       "--sample_prompts": args.sample_prompts,
                       **{f"--base_weights {path}": path for path in args.base_weights or []}},
                      {"the dataset": data.fingerprint()}, lambda what: data.difference_between_processes())
    layout = make_layout(args.context_parallel)
    check_caches_fit(data.datasets, {"latents": dit_config.out_channels, "llm": dit_config.text_states_dim,
                                     "clipL": dit_config.text_states_dim_2}, args.dit)
    held_out = held_out_batches(args, dataset_config)
    # the data is sharded over the replicas: the processes of a context-parallel group share their batches
    loader, sampler = make_dataloader(data, num_workers=min(args.max_data_loader_n_workers, os.cpu_count() or 1),
                                      persistent_workers=args.persistent_data_loader_workers, rank=layout.replica, world=layout.replicas)
    batches_per_epoch = sampler.batches_per_epoch()  # this process's share
    total_steps = total_training_steps(batches_per_epoch, args.max_train_epochs, args.max_train_steps, 1, args.gradient_accumulation_steps)
    say_the_length(args, batches_per_epoch, total_steps)
    optimizer_args = parse_key_values(args.optimizer_args, "--optimizer_args")
    # the optimizer and its schedule, built once on a stand-in parameter: their flags fail here, before any model loads
    check_scheduler(args, check_optimizer(args.optimizer_type, args.learning_rate, optimizer_args, accelerator.device),
                    total_steps * accelerator.num_processes)
    samples = None
    if args.sample_prompts:  # the text encoders run and are freed before the DiT is loaded
        from musubi_tuner.training.sampling import TrainingSampler

        samples = TrainingSampler(args, accelerator, in_channels=dit_config.in_channels, seed=seed, layout=layout)
    dit = load_frozen_dit(args, accelerator.device)
    dit.sequence_parallel = layout.sequence
    network = build_network(args, dit)  # the same initial weights on every process: same seed so far
    network.to(accelerator.device)
    reducer = GradientReducer(list(network.parameters()), divide_by=layout.replicas) if layout.world > 1 else None
    if layout.world > 1:
        # from here on (dropout) each replica draws its own numbers; a group draws alike, as its computations are one
        set_seed(seed + layout.replica)

    groups, group_names = network.prepare_optimizer_params(unet_lr=args.learning_rate)
    optimizer, optimizer_name = create_optimizer(args.optimizer_type, groups, args.learning_rate, optimizer_args)
    scheduler = create_scheduler(args, optimizer, total_steps * accelerator.num_processes)
    # The loader is sharded by our sampler, not by accelerate, so that resuming knows each process's position.
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    if layout.world > 1:
        logger.info("%s; each replica takes one batch in %d, %d batches per epoch each", describe_layout(layout), layout.replicas,
                    batches_per_epoch)
        logger.info(reducer.describe())

    ts_cfg = timestep_config(args)
    guidance_value = args.guidance_scale * (1000.0 if args.guidance_scale_x1000 else 1.0)
    validator = None
    if held_out:
        from musubi_tuner.training.validation import Validator

        validator = Validator(held_out, ts_cfg, guidance_value, levels=args.validation_timesteps, seed=args.validation_seed)
    run = run_identity(optimizer_name=optimizer_name, processes=accelerator.num_processes, batches_per_epoch=batches_per_epoch,
                       accumulation=args.gradient_accumulation_steps, dataset=data.fingerprint(), learning_rate=args.learning_rate,
                       session_started=time.time(), process_started=time.time(), dit_digest=content_digest(args.dit),
                       dit_in_channels=dit_config.in_channels, validation=validator and validator.measure,
                       schedule_steps=total_steps * accelerator.num_processes, optimizer_settings=optimizer_settings(optimizer),
                       **identity_from_flags(args))
    progress, resume_from = resume(candidates, args, run, network=network, optimizer=optimizer, scheduler=scheduler,
                                   accelerator=accelerator, seed=seed)
    args.learning_rate = run["learning_rate"]  # a resumed state's rate (check_resumable): what the metadata must record
    if resume_from is not None and args.network_weights:  # (logged as loaded, then replaced without a word: fuzz_z 5)
        logger.warning("--network_weights %s: the LoRA of %s replaces it (a resumed run continues its state's LoRA)",
                       args.network_weights, resume_from)
    # a resume moved to the start of the next epoch (the dataset or batching changed since the state) is further on in
    # epochs than its step count says: counted from step 0, the epochs left could hold none of the steps left, and the
    # run saved a "final" LoRA at the resumed step, exit 0 (fuzz_z 1)
    # the steps of the epoch before its position: a step ends each group of --gradient_accumulation_steps batches counted
    # from the epoch's start, and its last batch (see the loop), whatever accumulation saved the state (fuzz_ay 6)
    done_in_epoch = (steps_per_epoch if progress.batch_in_epoch >= batches_per_epoch
                     else progress.batch_in_epoch // args.gradient_accumulation_steps)
    if args.max_train_epochs and resume_from is not None:  # the epochs left, in this run's batching: counted from step 0,
        # a resume whose batching changed trained an epoch too few (or none) or ran into one more (fuzz_ax 2)
        total_steps = progress.global_step + max(0, (args.max_train_epochs - progress.epoch) * steps_per_epoch - done_in_epoch)
    num_epochs = max(num_epochs, progress.epoch + math.ceil((total_steps - progress.global_step + done_in_epoch) / steps_per_epoch))
    if samples is not None:
        samples.replaces_earlier = resume_from is not None
    # at the last step: a finished run (its final save is there), or one stopped after its last step's state and before
    # what follows it (pruning, the last samples, the final save), which this run then does, training nothing
    finishing = progress.global_step == total_steps
    if progress.global_step > total_steps or finishing and ran_to_the_end(args, total_steps):  # a step would pass the end
        logger.warning("%s is at step %d of %d: nothing left to train, nothing written (raise --max_train_steps or "
                       "--max_train_epochs to train on)", resume_from, progress.global_step, total_steps)
        if accelerator.is_main_process:
            from musubi_tuner.training.checkpointing import remove_run_leftovers

            remove_run_leftovers(Path(args.output_dir), args.output_name)
        accelerator.end_training()
        return None
    if finishing:
        logger.info("%s is the state of the last step (%d), saved before the run stopped: finishing what the run did after "
                    "it (the last pruning and samples, the final save)", resume_from, progress.global_step)

    saver = CheckpointSaver(args, accelerator, network, dit.config, data, dataset_config, optimizer_name=optimizer_name,
                            batches_per_epoch=batches_per_epoch, max_train_steps=total_steps, num_epochs=num_epochs,
                            scheduler=scheduler, optimizer=optimizer, run=run, hub=hub)
    saver.resumed_from = Path(resume_from) if resume_from is not None else None
    if not saver.resumed_here and is_main:  # (also --resume auto that found no state: it replaced an earlier run's files
        saver.warn_of_an_earlier_run()  # unsaid, fuzz_at 2; and a state of another folder: fuzz_ax 3)
    saver.keep_the_end_it_continues(progress)
    if args.logging_dir or args.log_with:
        accelerator.init_trackers(args.log_tracker_name or "network_train", config=_loggable(args) if args.log_config else None,
                                  init_kwargs=tracker_init_kwargs(args))

    # a resumed run replays what followed its state; a fresh one starts a history of its own (the earlier run's step-0
    # validation point stayed in a run without validation: fuzz_ak 10)
    if resume_from is not None and not saver.resumed_here:  # (the curve of the run it continues, not this folder's)
        saver.take_history_of(progress.global_step)
    else:
        saver.losses.truncate(progress.global_step if resume_from is not None else -1)
    validation = None
    if validator is not None:
        from musubi_tuner.training.validation import Validation

        validation = Validation(validator, dit=dit, network=network, optimizer=optimizer, accelerator=accelerator, losses=saver.losses,
                                layout=layout,
                                every_n_steps=args.validate_every_n_steps, every_n_epochs=args.validate_every_n_epochs)
        saver.before_save = validation.checkpoint_metadata  # every saved LoRA carries its validation loss
        if resume_from is not None:
            validation.recall_saved(Path(args.output_dir), args.output_name, progress.global_step)
        validation.run(progress.global_step)  # the starting point of the validation curve
    if samples is not None and args.sample_at_first:
        samples.sample(dit, network, optimizer, progress.global_step)
    bar = progress_bar(total=total_steps, initial=progress.global_step, disable=not is_main, desc="steps", smoothing=0.05)
    recent: list[float] = []  # the losses of the last epoch's steps (loss/average, loss/epoch)
    micro_losses: list[torch.Tensor] = []  # this step's micro-batches' (--gradient_accumulation_steps)
    compile_pending = bool(args.compile)
    known_cause = known_gradient_problem(CompileOptions.from_args(args), accelerator.device)

    highest_rate: list[float | None] = [None]  # the highest learning rate of the run's updates so far (its schedule's)

    def diverged(what: str, local_loss: torch.Tensor | None = None) -> NonFiniteLoss:
        items = culprit_items(batch["item_names"], local_loss, accelerator.num_processes)
        untrained = progress.global_step == 0 and resume_from is None and not args.network_weights  # (the LoRA: 0)
        return divergence(what, progress.global_step + 1, epoch + 1, items, saver,
                          known_cause or far_settings(args) or grown_lora(network, args.learning_rate, progress.global_step + 1,
                                                                          highest_rate[0], schedule_in_words(args)),
                          untrained=untrained and what.startswith("loss"))

    if is_schedule_free(optimizer):
        optimizer.train()
    network.train()

    def end_epoch(epoch: int) -> None:
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        if recent:
            accelerator.log({"loss/epoch": sum(recent) / len(recent)}, step=epoch + 1)
        if validation is not None:
            validation.after_epoch(epoch + 1, progress.global_step)
        saver.after_epoch(progress, epoch + 1)
        if samples is not None:
            samples.after_epoch(dit, network, optimizer, progress.global_step, epoch + 1)

    if samples is not None and resume_from is not None:  # a state is written before the samples of its step or epoch
        at_epoch_end = progress.batch_in_epoch == 0 and progress.epoch > 0
        samples.catch_up(dit, network, optimizer, progress.global_step, progress.epoch if at_epoch_end else None)
    if finishing:  # what the loop below does after a run's last step
        saver.prune_steps(progress.global_step)
        if progress.batch_in_epoch >= batches_per_epoch:
            end_epoch(progress.epoch)
    first_step = progress.global_step
    try:
        for epoch in range(progress.epoch, num_epochs) if not finishing else ():
            skip = progress.batch_in_epoch if epoch == progress.epoch else 0
            sampler.set_epoch(epoch + 1, start=skip)
            for i, batch in enumerate(batches_of(loader, saver), start=skip):
                # an optimizer step every --gradient_accumulation_steps batches and at each epoch's end, as
                # total_training_steps plans (and accelerate does with a loader it prepared): the rest of an epoch is
                # neither carried into the next nor, at the end of a run, dropped. (accelerator.backward divides the loss
                # by the accumulation, so the step of an epoch's rest is of its share.) Counted in the epoch, so a resume
                # at a saved step keeps the same steps.
                sync = (i + 1) % args.gradient_accumulation_steps == 0 or i + 1 == batches_per_epoch
                with compile_errors():
                    uniform = torch.tensor(batch["timesteps"]) if batch.get("timesteps") is not None else None
                    loss = training_step(dit, batch, accelerator, ts_cfg, guidance_value, uniform, sample_seeds(seed, epoch + 1, batch["sample_ids"]))
                    # the mean over all processes: what is logged, and every process stops together on a bad one
                    global_loss = accelerator.reduce(loss.detach(), reduction="mean") if accelerator.num_processes > 1 else loss.detach()
                    if not torch.isfinite(global_loss):
                        raise diverged(f"loss is {global_loss.item()}", loss.detach())
                    accelerator.backward(loss)
                    micro_losses.append(global_loss)
                    if sync:
                        if reducer is not None:
                            reducer.reduce()
                        norm = accelerator.clip_grad_norm_(network.parameters(), args.max_grad_norm or float("inf"))
                        # fp16's grad scaler skips steps with inf gradients by design; otherwise they would poison the weights
                        if accelerator.scaler is None and norm is not None and not torch.isfinite(torch.as_tensor(norm)):
                            raise diverged(f"the gradient norm is {float(norm)}")
                        rate = optimizer.param_groups[0].get("lr")  # (the rate of this update, for a divergence's words)
                        if isinstance(rate, (int, float)) and (highest_rate[0] is None or rate > highest_rate[0]):
                            highest_rate[0] = float(rate)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        if (bad := first_non_finite(network)) is not None:
                            raise diverged(f"the update made {bad} NaN/inf")
                progress.batch_in_epoch = i + 1
                if not sync:
                    continue
                progress.global_step += 1
                if compile_pending:  # the first step compiled every block
                    log_graph_breaks(args.debug)
                    compile_pending = False
                max_norm = {}
                if args.scale_weight_norms:  # (logged as musubi-tuner logs it: fuzz_ai 4)
                    scaled, mean_norm, max_key_norm = network.apply_max_norm_regularization(args.scale_weight_norms, accelerator.device)
                    max_norm = {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_key_norm}
                # a step's loss is the mean of its micro-batches', which its update followed (the last one's alone was logged,
                # and the epoch's window counted micro-batches, so loss/epoch took in the epoch before: fuzz_ai 1)
                step_loss = torch.stack(micro_losses).float().mean().item()
                micro_losses.clear()
                recent = (recent + [step_loss])[-steps_per_epoch:]
                saver.losses.add(progress.global_step, step_loss)
                # every parameter group's rate under its name, as musubi-tuner logs them ("unet", and LoRA+'s "unet plus")
                rates = scheduler.get_last_lr()
                names = [*(group_names or ["unet"])[:len(rates)], *(f"group{i}" for i in range(len(group_names or ["unet"]), len(rates)))]
                logs = {"loss/current": step_loss, "loss/average": sum(recent) / len(recent),
                        **{f"lr/{name}": lr for name, lr in zip(names, rates)}, **max_norm}
                bar.update(1)
                if validation is not None:
                    validation.after_step(progress.global_step)
                shown = {"val": f"{validation.last.loss:.4f}"} if validation is not None else {}
                if max_norm:
                    shown["keys_scaled"] = max_norm["max_norm/keys_scaled"]
                bar.set_postfix(loss=f"{logs['loss/average']:.4f}", lr=f"{rates[0]:.2e}", **shown)
                accelerator.log(logs, step=progress.global_step)
                saver.after_step(progress)
                if is_main:
                    saver.losses.write_csv_if_due()  # a live curve for whoever watches the run
                if samples is not None:
                    samples.after_step(dit, network, optimizer, progress.global_step)
                if progress.global_step >= total_steps:
                    break
            if progress.batch_in_epoch < batches_per_epoch:  # stopped inside the epoch: a resume continues it
                break
            end_epoch(epoch)
            if progress.global_step >= total_steps:
                break
    except BaseException:  # a stop (Ctrl-C, the studio's Stop), a NaN, a crash: the curve keeps the steps made since
        # its last write, up to LIVE_SECONDS of them (it ended a few steps before the run: fuzz_ao 11); a run that made no
        # step writes nothing (an earlier run's curve was replaced by a header, or cut back to the resumed step: fuzz_au 2)
        if is_main and progress.global_step > first_step:
            saver.losses.write_csv_if_due(at_once=True)
        raise
    bar.close()
    final = saver.final(progress)
    change = largest_update(network) if final is not None and accelerator.is_main_process else None
    if change is not None and change < NO_UPDATE:
        # (a run that ends where it began was reported as an ordinary success: --max_grad_norm 1e-30, fuzz_ab 16)
        logger.warning("%s changes no weight of the DiT by more than %.1g after %d steps: this LoRA has learnt nothing. A "
                       "learning rate of 0 or far too low, or a --max_grad_norm / --scale_weight_norms far too small, does "
                       "that", final, change, progress.global_step)
    if validation is not None:
        validation.report_best()
    accelerator.end_training()
    return final


def ran_to_the_end(args, total_steps: int) -> bool:
    """Whether the run in --output_dir made its final save (the LoRA, then its state when states are saved), at
    `total_steps` or later. A state at the last step without it is of a run stopped before its end."""
    out = Path(args.output_dir)
    final = read_progress(out / f"{args.output_name}-state")
    return (out / f"{args.output_name}.safetensors").is_file() and final is not None and final.global_step >= total_steps


def resume(candidates: list[Path], args, run: dict, *, network, optimizer, scheduler, accelerator, seed: int):
    """(progress, the state resumed from or None): the first of `candidates` that loads whole and fits this run.

    With --resume auto a damaged state is skipped with a warning for the next older one; a state of another run
    (optimizer, network, processes differ) is an error either way, since every older state would differ too.
    """
    from musubi_tuner.training.state import DamagedState

    if args.resume == "auto" and not candidates:
        others = sorted(p.name for p in complete_states(Path(args.output_dir)))
        logger.info("--resume auto: no saved state of %s in %s, starting fresh%s", args.output_name, args.output_dir,
                    f" (states of other names there: {', '.join(others[:3])}; --resume FOLDER continues one)" if others else "")
    for folder in candidates:
        try:
            progress = load_state(folder, network=network, optimizer=optimizer, scheduler=scheduler, scaler=accelerator.scaler,
                                  process_index=accelerator.process_index, run=run)
        except DamagedState as e:
            if args.resume != "auto":
                raise
            logger.warning("--resume auto: %s; trying the next older state", e)
            continue
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, progress.global_step, progress.epoch + 1,
                    progress.batch_in_epoch)
        return progress, folder
    if candidates:
        logger.warning("--resume auto: no state in %s could be read whole; starting fresh", args.output_dir)
    return TrainProgress(seed=seed), None


def held_out_batches(args, dataset_config) -> list:
    """The validation batches the dataset config defines; an error if validation is asked for and there are none."""
    from musubi_tuner.data.training_dataset import too_few_to_split, validation_batches

    batches = validation_batches(dataset_config) if dataset_config.has_validation else []
    asked = args.validate_every_n_steps or args.validate_every_n_epochs
    small = "; ".join(too_few_to_split(dataset_config)) if dataset_config.has_validation and not batches else ""
    flag = f"--validate_every_n_{'steps' if args.validate_every_n_steps else 'epochs'}"
    if asked and not batches and small:  # (caching again cannot help here)
        raise UserError(f"{flag} needs held-out items, and there are none: {small}")
    if asked and not batches:
        where = "no cached validation items (run the caching commands again)" if dataset_config.has_validation else \
            "no validation data: add `validation_split = 0.1` to [general] or a [[validation_datasets]] table"
        raise UserError(f"{dataset_config.path}: {flag} needs held-out items, and there are {where}")
    if small:
        logger.warning("%s; training without validation", small)
    elif dataset_config.has_validation and not batches:
        logger.warning("%s: validation is set up but no validation item is cached; training without it", dataset_config.path)
    return batches


def _loggable(args) -> dict:
    drop = {"wandb_api_key", "huggingface_token", "dit", "vae", "text_encoder1", "text_encoder2", "base_weights", "network_weights",
            "output_dir", "logging_dir"}
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in vars(args).items() if k not in drop}
