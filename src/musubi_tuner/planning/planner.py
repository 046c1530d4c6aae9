"""The plan: peak GPU and host memory per stage, FLOPs and time per step, and the fastest options for a budget.

    plan(workload, options)          -> Plan   (what these options cost)
    fit_budget(workload, budget_gb)  -> Search (the fastest option set that fits, and what was ruled out)

Stages run one after another (the commands load one model at a time), so the GPU peak is the largest
stage's. Training's stages are the two caching commands and the training step; generation's are the
text encoders, the denoising steps and the VAE decode.

Beyond the tensors, a CUDA process holds its context and kernels (CUDA_CONTEXT) and the caching
allocator keeps freed blocks it cannot reuse (ALLOCATOR_MARGIN of the tensors): the budget check adds both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from musubi_tuner.hunyuan.cost import block_flops, forward_flops, lora_forward_flops, train_step_flops
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.offload import MAX_BLOCKS_TO_SWAP_INFERENCE, MAX_BLOCKS_TO_SWAP_TRAINING, swap_limit, swapped_block_keys
from musubi_tuner.planning import encoders, vae
from musubi_tuner.planning.dit_trace import dit_peak, traced_step
from musubi_tuner.planning.options import MemoryOptions, Workload
from musubi_tuner.planning.timing import DEFAULT_UTILISATION, GPU, StepTime, compute_seconds, overlapped_swap_seconds, utilisation_for
from musubi_tuner.planning.tracer import Peak

GB = 1e9
CUDA_CONTEXT = int(0.6 * GB)  # CUDA context, cuBLAS/cuDNN handles and kernels (typical for torch 2.x)
ALLOCATOR_MARGIN = 0.05  # fragmentation of the caching allocator, as a share of the tensor peak


@dataclass
class Stage:
    name: str
    device_peak: int  # bytes of tensors on the GPU at the stage's peak
    device_parts: dict[str, int]  # what they are
    when: str  # where in the stage the peak falls
    host: int = 0  # host memory the options put there during the stage
    host_parts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of_dit(cls, name: str, work: Workload, opts: MemoryOptions) -> "Stage":
        """The DiT step traced on fake tensors (`dit_trace`), with what the options keep in host memory."""
        return cls.from_peak(name, *dit_peak(work, opts))

    @classmethod
    def from_peak(cls, name: str, peak: Peak, host_parts: dict[str, int] | None = None) -> "Stage":
        return cls(name, peak.total, dict(peak.parts), peak.where, sum((host_parts or {}).values()), dict(host_parts or {}))

    @property
    def needed(self) -> int:
        """What the GPU must have for this stage: tensors, allocator margin, CUDA context."""
        return int(self.device_peak * (1 + ALLOCATOR_MARGIN)) + CUDA_CONTEXT


@dataclass
class Plan:
    workload: Workload
    options: MemoryOptions
    stages: list[Stage]
    flops_per_step: int  # one training step, or one denoising step (all its DiT calls)
    flops_note: str
    time: StepTime
    gpu: GPU
    steps: int = 1  # denoising steps (generation)
    utilisation: float = DEFAULT_UTILISATION
    warnings: list[str] = field(default_factory=list)

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda s: s.needed)

    @property
    def needed(self) -> int:
        return self.peak_stage.needed

    @property
    def dit_stage(self) -> Stage | None:
        """None for a generation that runs no denoising step (V2V at a strength that runs none)."""
        return next((s for s in self.stages if s.name.startswith("DiT")), None)

    def fits(self, budget_bytes: float) -> bool:
        return self.needed <= budget_bytes


# ------------------------------------------------------------------------------------------------ plan


def plan(work: Workload, opts: MemoryOptions, device: GPU, utilisation: float | None = None) -> Plan:
    """Memory per stage and time per step of running `work` with `opts` on `device` (at `utilisation` of its peak;
    None: calibrated for the GPU and attention kernel)."""
    _check_runs(work, opts)
    if utilisation is None:
        utilisation = calibrated_utilisation(work, opts, device)
    warnings = _warnings(work, opts)
    stages = []
    train = work.mode == "train"
    denoises = train or opts.infer_steps > 0  # (a V2V whose strength runs no step loads neither the text encoders nor
    if denoises:                              # the DiT, which its dry run planned: fuzz_au 11)
        prompts = 1 if train else (2 if opts.guidance_scale != 1.0 else 1)
        stages.append(Stage.from_peak("text encoder 1 (LLM)" + (" [cache_text_encoder_outputs]" if train else ""),
                                      encoders.llm_peak(prompts, opts.fp8_llm, work.llm_config)))
        stages.append(Stage.from_peak("text encoder 2 (CLIP-L)", encoders.clip_peak(prompts, work.clip_config)))
    tiles = f"tiles of {opts.vae_spatial_tile_sample_min_size} px"
    if train:
        stages.append(Stage.from_peak(f"VAE encode [cache_latents{', --vae_tiling' if opts.vae_tiling else ''}]", vae.vae_encode_peak(
            work.frames, work.height, work.width, 1, opts.vae_spatial_tile_sample_min_size if opts.vae_tiling else None,
            config=work.vae_config)))
        stages.append(Stage.of_dit("DiT training step (forward + backward + optimizer)", work, opts))
    else:
        if work.video_input:  # (not planned: fuzz_au 11)
            stages.append(Stage.from_peak(f"VAE encode of --video_path ({tiles}, {opts.vae_dtype})", vae.vae_encode_peak(
                work.frames, work.height, work.width, 1, opts.vae_spatial_tile_sample_min_size, opts.vae_bytes, opts.vae_chunk_size,
                work.vae_config)))
        if denoises:
            stages.append(Stage.of_dit("DiT denoising step", work, opts))
        stages.append(Stage.from_peak(f"VAE decode ({tiles}, {opts.vae_dtype})", vae.vae_decode_peak(
            work.frames, work.height, work.width, opts.vae_spatial_tile_sample_min_size, opts.vae_bytes, opts.vae_chunk_size,
            work.vae_config)))
    flops, note = step_flops(work, opts)
    time = step_time(work, opts, device, utilisation)
    return Plan(work, opts, stages, flops, note, time, device, steps=1 if train else opts.infer_steps, utilisation=utilisation,
                warnings=warnings)


def calibrated_utilisation(work: Workload, opts: MemoryOptions, device: GPU) -> float:
    """The GPU family's share of peak learnt from published times, adjusted for the attention kernel."""
    fwd = forward_flops(work.config, work.latent_shape, work.text_tokens, work.batch)
    return utilisation_for(device, opts.attn_mode, fwd.attention / fwd.total)


def step_flops(work: Workload, opts: MemoryOptions) -> tuple[int, str]:
    c, shape, lt = work.config, work.latent_shape, work.text_tokens
    if work.mode == "train":
        f = train_step_flops(c, shape, lt, work.batch, opts.network_dim, opts.gradient_checkpointing)
        note = (f"forward {f.forward / 1e12:,.0f} + backward {f.backward / 1e12:,.0f} + recompute {f.recompute / 1e12:,.0f}"
                f" + LoRA {f.lora / 1e12:,.0f} TFLOP")
        return f.total, note
    samples = work.batch * (2 if opts.guidance_scale != 1.0 else 1)
    fwd = forward_flops(c, shape, lt, samples)
    lora = lora_forward_flops(c, work.image_tokens, lt, opts.network_dim, samples) if opts.lora_at_generation and opts.fp8 else 0
    note = f"{samples} DiT forward(s) of {fwd.total / samples / 1e12:,.0f} TFLOP ({fwd.attention / fwd.total:.0%} attention)"
    return fwd.total + lora, note


def collective_bytes(work: Workload, opts: MemoryOptions) -> int:
    """Bytes one process sends per training step / denoising step in context parallel's collectives.

    Per DiT call: two all-to-alls per attention (q, k, v out, the output back: sequence_parallel.exchange_bytes)
    and the gather of the prediction ((N - 1) shards). Training runs the all-to-alls again in backward (and once
    more when checkpointing recomputes) and all-reduces the LoRA gradients; CFG-parallel swaps the predictions."""
    from musubi_tuner.hunyuan.sequence_parallel import exchange_bytes

    c, n, a = work.config, opts.context_parallel, opts.act_bytes
    li, lt = work.local_tokens(n)
    total = 0
    if n > 1:
        batch = work.batch * (1 if work.mode == "train" else opts.cfg_batch)
        call = c.num_blocks * exchange_bytes(batch, li + lt, c.hidden_size, n, a)
        gather = batch * li * c.patch_volume * c.out_channels * a * (n - 1)
        if work.mode == "train":
            passes = 3 if opts.gradient_checkpointing else 2
            total = passes * call + gather + 4 * traced_step(work, opts).total("lora_params") * 2 * (n - 1) // n
        else:
            total = opts.dit_calls * (call + gather)
    if work.mode == "generate" and opts.uses_cfg_parallel:
        latent = work.batch * c.out_channels * work.latent_shape[0] * work.latent_shape[1] * work.latent_shape[2]
        total += 4 * latent  # this process's prediction to its partner (float32)
    return total


def step_time(work: Workload, opts: MemoryOptions, device: GPU, utilisation: float | None = None) -> StepTime:
    """Seconds per training step / denoising step on `device` at `utilisation` of its peak (None: calibrated for the GPU
    and attention kernel; one process's share with context parallel: 1/N of the FLOPs, plus its collectives over the
    GPU-to-GPU link)."""
    if utilisation is None:
        utilisation = calibrated_utilisation(work, opts, device)
    c = work.config
    flops, _ = step_flops(work, opts)
    compute = compute_seconds(flops / opts.processes, device, utilisation)
    notes = []
    collectives = 0.0
    if opts.processes > 1:
        moved = collective_bytes(work, opts)
        collectives = moved / (device.link_gbps * GB)
        notes.append(f"{opts.processes} processes ({_layout_words(opts)}): each computes 1/{opts.processes} of the FLOPs and sends "
                     f"{moved / GB:.2f} GB per step to the others: {collectives:.2f} s at {device.link_gbps:g} GB/s, not overlapped")
    # block swap: the swapped blocks' weights cross PCIe once per block run, overlapped with the previous block
    transfer = 0.0
    if opts.blocks_to_swap:
        swapped = swapped_block_keys(opts.blocks_to_swap, c.mm_double_blocks_depth, c.mm_single_blocks_depth)
        streamed = traced_step(work, opts).blocks  # a swapped block streams its Linear weights
        samples = work.batch * (1 if work.mode == "train" else opts.cfg_batch)
        double, single = block_flops(c, work.image_tokens, work.text_tokens)
        per_run = {"double": double.total * samples, "single": single.total * samples}
        runs = 1 if work.mode == "train" else opts.dit_calls
        passes = 2 if work.mode == "train" else runs  # training: forward and the recomputation in backward
        order = [("double", i) for i in range(c.mm_double_blocks_depth)] + [("single", i) for i in range(c.mm_single_blocks_depth)]
        secs = [compute_seconds(per_run[k[0]], device, utilisation) for k in order]
        moved = [streamed[kind].linear_bytes if (kind, i) in swapped else 0 for kind, i in order]
        _, exposed = overlapped_swap_seconds(secs, moved, device, opts.use_pinned_memory_for_block_swap)
        transfer += passes * exposed
        total_bytes = passes * sum(moved)
        notes.append(f"block swap moves {total_bytes / GB:.1f} GB per step over PCIe "
                     f"({'pinned' if opts.use_pinned_memory_for_block_swap else 'pageable'} memory): {passes * exposed:.2f} s not hidden by compute")
    if opts.gradient_checkpointing_cpu_offload and work.mode == "train":
        joint = work.batch * (work.image_tokens + work.text_tokens) * c.hidden_size * opts.act_bytes
        moved = 2 * c.num_blocks * joint
        transfer += moved / (device.pcie_pageable_gbps * GB)
        notes.append(f"checkpoint CPU offload moves {moved / GB:.1f} GB per step (pageable, not overlapped)")
    if opts.img_in_txt_in_offloading:
        moved = traced_step(work, opts).embedder_bytes * (1 if work.mode == "train" else opts.cfg_batch)
        transfer += moved / (device.pcie_pageable_gbps * GB)
    dequant = 0.0
    if opts.fp8:
        # training dequantizes in forward and again for the input gradients (and once more when checkpointing recomputes)
        runs = (3 if opts.gradient_checkpointing else 2) if work.mode == "train" else opts.dit_calls
        # read fp8, write and read back bf16, x2 with row scales
        dequant = runs * traced_step(work, opts).total("fp8_params") * 5 / (device.hbm_gbps * GB)
        notes.append(f"fp8 dequantization: {dequant:.2f} s per step")
    if work.mode == "train" and opts.gradient_checkpointing:
        notes.append("checkpointing recomputes every block's forward in backward (+1 forward of FLOPs)")
    return StepTime(compute, transfer, dequant, compute + transfer + dequant + collectives, tuple(notes), collectives)


def _layout_words(opts: MemoryOptions) -> str:
    parts = []
    if opts.context_parallel > 1:
        parts.append(f"context parallel over {opts.context_parallel}")
    if opts.uses_cfg_parallel:
        parts.append("the two CFG prompts side by side")
    return ", ".join(parts)


def _check_runs(work: Workload, opts: MemoryOptions) -> None:
    """Refuse what the command would refuse (a dry run that passes means the run starts): a swap count past the
    model's limit, a kernel without a backward in training."""
    from musubi_tuner.hunyuan.attention import INFERENCE_ONLY

    limit = max_blocks_to_swap(work)
    if opts.blocks_to_swap > limit:
        raise UserError(f"--blocks_to_swap {opts.blocks_to_swap}: must be between 0 and {limit} for this model"
                        + (" in training" if work.mode == "train" else ""))
    if work.mode == "train" and opts.attn_mode in INFERENCE_ONLY:
        raise UserError(f"--attn_mode {opts.attn_mode} is for inference only (it has no backward): a training step "
                        "takes sdpa, flash, flash3 or xformers")


def max_blocks_to_swap(work: Workload) -> int:
    return swap_limit(work.config, MAX_BLOCKS_TO_SWAP_TRAINING if work.mode == "train" else MAX_BLOCKS_TO_SWAP_INFERENCE)


def _warnings(work: Workload, opts: MemoryOptions) -> list[str]:
    out = []
    if work.mode == "train" and opts.blocks_to_swap and not opts.gradient_checkpointing:
        out.append("--blocks_to_swap without --gradient_checkpointing saves little GPU memory in training: autograd keeps "
                   "every swapped block's on-device weights until backward (all but the modulation layers'). "
                   "Add --gradient_checkpointing.")
    if opts.split_attn and work.batch == 1 and opts.cfg_batch == 1 and work.text_lengths is None:
        out.append("--split_attn changes nothing here: one sample per call and no padding to skip")
    return out


# ------------------------------------------------------------------------------------------------ budget


@dataclass
class Candidate:
    options: MemoryOptions
    plan: Plan


@dataclass
class Search:
    budget_bytes: float
    best: Candidate | None
    ruled_out: list[Candidate]  # faster sets that do not fit, fastest first (nothing fits: the smallest sets)
    also_fit: list[Candidate]  # slower sets that fit


def fit_budget(work: Workload, base: MemoryOptions, budget_gb: float, device: GPU, utilisation: float | None = None,
               allow_fp8: bool = True) -> Search:
    """Try option sets from the fastest down and keep the fastest whose every stage fits in `budget_gb`.

    The DiT options searched: fp8 weights, gradient checkpointing (+ CPU offload), block swap (every
    fourth count up to the maximum, pinned memory), and split CFG for generation; the encoder stages
    take fp8 for the LLM and smaller VAE tiles only when they need them. What the user turned on stays on
    (fp8, checkpointing, its CPU offload, at least their --blocks_to_swap, split CFG), and their other
    choices (LoRA rank, optimizer, precision) stay as given.
    """
    budget = budget_gb * GB
    _check_runs(work, base)
    max_swap = max_blocks_to_swap(work)
    sets = []
    swaps = [n for n in (0, *range(4, max_swap + 1, 4), max_swap, base.blocks_to_swap) if n >= base.blocks_to_swap]
    for fp8 in [f for f in ((False, True) if allow_fp8 else (False,)) if f >= base.fp8]:
        if work.mode == "train":
            for ckpt, offload in ((False, False), (True, False), (True, True)):
                if ckpt < base.gradient_checkpointing or offload < base.gradient_checkpointing_cpu_offload:
                    continue
                for swap in swaps:
                    if swap and not ckpt:
                        continue  # saves nothing in training (see the warning)
                    sets.append(base.replace(fp8=fp8, gradient_checkpointing=ckpt, gradient_checkpointing_cpu_offload=offload,
                                             blocks_to_swap=swap, use_pinned_memory_for_block_swap=bool(swap)))
        else:
            for split in [x for x in ((False, True) if base.guidance_scale != 1.0 else (base.split_uncond,)) if x >= base.split_uncond]:
                for swap in swaps:
                    sets.append(base.replace(fp8=fp8, split_uncond=split, blocks_to_swap=swap, use_pinned_memory_for_block_swap=bool(swap)))
    if work.mode == "generate" and not base.infer_steps:
        sets = [base]  # no DiT runs, and the options searched are the DiT's
    # the encoder stages: cheapest settings that fit (they do not change the step time)
    encoder_opts = _fit_encoders(work, base, budget)
    candidates = []
    for opts in dict.fromkeys(sets):
        opts = opts.replace(fp8_llm=encoder_opts.fp8_llm, vae_spatial_tile_sample_min_size=encoder_opts.vae_spatial_tile_sample_min_size)
        candidates.append(Candidate(opts, plan(work, opts, device, utilisation)))
    # fastest first; at equal speed prefer bf16 weights (fp8 costs some quality), then fewer swapped blocks
    candidates.sort(key=lambda c: (round(c.plan.time.total_s, 3), c.options.fp8, c.options.blocks_to_swap))
    best = next((c for c in candidates if c.plan.fits(budget)), None)
    if best is None:  # show the smallest sets tried
        return Search(budget, None, sorted(candidates, key=lambda c: c.plan.needed)[:6], [])
    i = candidates.index(best)
    faster = [c for c in candidates[:i] if not c.plan.fits(budget)]
    slower = [c for c in candidates[i + 1:] if c.plan.fits(budget)]
    return Search(budget, best, _distinct(faster)[:6], _distinct(slower)[:3])


def _fit_encoders(work: Workload, base: MemoryOptions, budget: float) -> MemoryOptions:
    opts = base
    prompts = 2 if work.mode == "generate" and base.guidance_scale != 1.0 else 1
    if Stage.from_peak("", encoders.llm_peak(prompts, False, work.llm_config)).needed > budget:
        opts = opts.replace(fp8_llm=True)
    given = base.vae_spatial_tile_sample_min_size  # (the user's tile size, or 256: the search started at 256 whatever was
    last = None                                      # given, fuzz_af 12)
    for tile in (given, *(t for t in (192, 160, 128, 96, 64) if t < given)):
        if work.mode == "generate":
            peak = vae.vae_decode_peak(work.frames, work.height, work.width, tile, base.vae_bytes, base.vae_chunk_size, work.vae_config)
        else:
            peak = vae.vae_encode_peak(work.frames, work.height, work.width, 1, tile, config=work.vae_config)
        needed = Stage.from_peak("", peak).needed
        if last is not None and needed > 0.98 * last:  # smaller tiles no longer help (the whole video's buffers hold
            break                                      # the peak): a search at 8192x8192x1025 traced every tile size for
        opts, last = opts.replace(vae_spatial_tile_sample_min_size=tile), needed  # minutes (fuzz_af 14)
        if needed <= budget:
            break
    if work.mode == "train":
        opts = opts.replace(vae_tiling=True)
    return opts


def _distinct(cands: list[Candidate]) -> list[Candidate]:
    """Drop candidates that differ from a listed one only in ways that change nothing (same memory and time)."""
    seen, out = set(), []
    for c in cands:
        key = (round(c.plan.needed / 1e8), round(c.plan.time.total_s, 2))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


