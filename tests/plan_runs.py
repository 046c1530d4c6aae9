"""Real CPU runs of what the planner replays, built the way the trainer and the sampler build them.

A training step here is `training.loop.training_step` + backward + clip + optimizer step, with the DiT
loaded as `load_frozen_dit` sets it up (fp8, checkpointing, block swap, then LoRA). bf16 weights run
under bf16 autocast as on a GPU. Used by tests/test_plan.py (in process, counting live tensor bytes),
bench/plan_vs_measured.py (fresh processes, also the resident set) and, with device="cuda",
tests/gpu/test_planner.py and bench/gpu_plan_check.py (the CUDA allocator's peak).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from musubi_tuner.hunyuan.config import DiTConfig
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.inference.step_cache import StepCache
from musubi_tuner.planning.measure import TensorBytes
from musubi_tuner.planning.options import MemoryOptions, Workload

SCALING_FACTOR = 0.476986  # the VAE's latent scale (hunyuan.vae.SCALING_FACTOR)


def build_dit(config: DiTConfig, opts: MemoryOptions, seed: int = 0, device: str = "cpu") -> HunyuanVideoDiT:
    """A frozen DiT with random weights on `device`, memory options applied as load_frozen_dit applies them."""
    from musubi_tuner.hunyuan.fp8 import convert_to_fp8
    from musubi_tuner.hunyuan.offload import BlockSwap

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = HunyuanVideoDiT(config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model = model.to({2: torch.bfloat16, 4: torch.float32}[opts.weight_bytes])
    if opts.fp8:
        convert_to_fp8(model)
    model.requires_grad_(False)
    model.set_attention("sdpa", opts.split_attn)
    if opts.gradient_checkpointing:
        model.enable_gradient_checkpointing(opts.gradient_checkpointing_cpu_offload)
    if opts.blocks_to_swap:
        BlockSwap(model, opts.blocks_to_swap, device, opts.use_pinned_memory_for_block_swap, max_blocks=36)
    model.train(opts.gradient_checkpointing)
    if opts.context_parallel > 1:  # run inside a process group of that size (helpers.run_group)
        from musubi_tuner.distributed import make_layout

        model.sequence_parallel = make_layout(opts.context_parallel).sequence
    return model


def dit_inputs(work: Workload, seed: int = 1, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A training batch as the cache loader gives it: latents (bf16), LLM states padded to 256, CLIP pooled."""
    c = work.config
    g = torch.Generator().manual_seed(seed)
    B = work.batch
    lengths = work.text_lengths or (work.text_tokens,) * B
    mask = torch.zeros(B, 256, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    batch = {
        "latents": torch.randn(B, c.out_channels, *work.latent_shape, generator=g).to(torch.bfloat16),
        "llm": torch.randn(B, 256, c.text_states_dim, generator=g).to(torch.bfloat16),
        "llm_mask": mask,
        "clipL": torch.randn(B, c.text_states_dim_2, generator=g).to(torch.bfloat16),
    }
    return {k: v.to(device) for k, v in batch.items()}


class TrainingRun:
    """The model, LoRA network, optimizer and batch of a LoRA training run; `step()` is one optimizer step."""

    def __init__(self, work: Workload, opts: MemoryOptions, device: str = "cpu"):
        from musubi_tuner.networks.lora import LoRANetwork
        from musubi_tuner.training.optimizers import create_optimizer

        self.work, self.opts, self.device = work, opts, torch.device(device)
        self.model = build_dit(work.config, opts, device=device)
        self.network = LoRANetwork(self.model, rank=opts.network_dim, alpha=1.0)
        self.network.apply_to(None, self.model)
        self.network.to(device)
        self.network.prepare_grad_etc()
        groups, _ = self.network.prepare_optimizer_params(unet_lr=1e-4)
        self.optimizer, _ = create_optimizer(opts.optimizer_type, groups, 1e-4, {})
        self.batch = dit_inputs(work, device=device)

    def step(self) -> None:
        b = self.batch
        latents = b["latents"].to(torch.float32) * SCALING_FACTOR
        B = latents.shape[0]
        noise = torch.randn_like(latents)
        sigma = torch.full((B, 1, 1, 1, 1), 0.6, device=self.device)
        model_input = (1.0 - sigma) * latents + sigma * noise
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.opts.act_bytes == 2)
        with autocast:
            pred = self.model(model_input, torch.full((B,), 600.0, device=self.device), b["llm"], b["llm_mask"], b["clipL"],
                              torch.full((B,), 1.0, device=self.device))
        loss = (pred.float() - (noise - latents)).square().mean(dim=(1, 2, 3, 4)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def existing_tensors(self) -> list[torch.Tensor]:
        """What lives between steps: weights (and their fp8 scales), LoRA, optimizer state, the batch, rope tables."""
        out = list(self.model.parameters()) + list(self.model.buffers()) + list(self.network.parameters()) + list(self.network.buffers())
        out += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        out += list(self.batch.values())
        for m in self.model.modules():
            scale = getattr(m, "weight_scale", None)
            if torch.is_tensor(scale):
                out.append(scale)
        return out


class SamplingRun:
    """One denoising step of hv_generate_video (bf16 autocast as on a GPU): a batch of two with real CFG."""

    def __init__(self, work: Workload, opts: MemoryOptions, device: str = "cpu"):
        self.work, self.opts, self.device = work, opts, torch.device(device)
        self.model = build_dit(work.config, opts.replace(gradient_checkpointing=False), device=device)
        self.model.eval()
        self.batch = dit_inputs(work, device=device)
        B = work.batch
        self.latents = torch.randn(B, work.config.out_channels, *work.latent_shape).to(device)
        negative = dit_inputs(work, seed=2, device=device)
        negative["llm_mask"][:, max(1, work.text_tokens // 4):] = 0  # a shorter negative prompt
        self.negative = negative
        # a threshold no step reaches: every step computes and keeps its residuals, as a computed step does
        self.cache = StepCache(opts.step_cache, 1e-12) if opts.step_cache else None

    def step(self) -> None:
        from musubi_tuner.inference.sampler import Guidance, denoise

        cond = {"text_states": self.batch["llm"], "text_mask": self.batch["llm_mask"], "text_states_2": self.batch["clipL"]}
        uncond = {"text_states": self.negative["llm"], "text_mask": self.negative["llm_mask"], "text_states_2": self.negative["clipL"]}
        guidance = Guidance(embedded_scale=1.0, scale=self.opts.guidance_scale, split=self.opts.split_uncond)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16):
            denoise(self.model, self.latents, torch.tensor([1.0, 0.9]), cond=cond, uncond=uncond if guidance.uses_cfg else None,
                    guidance=guidance, step_cache=self.cache)

    def existing_tensors(self) -> list[torch.Tensor]:
        out = list(self.model.parameters()) + list(self.model.buffers()) + list(self.batch.values()) + list(self.negative.values())
        out.append(self.latents)
        if self.cache is not None:  # what the previous steps left in the cache
            out += [t for b in self.cache._branches.values() for t in (b.previous, b.residual) if t is not None]
        for m in self.model.modules():
            scale = getattr(m, "weight_scale", None)
            if torch.is_tensor(scale):
                out.append(scale)
        return out


class FastCpuGemm(TorchDispatchMode):
    """Every bfloat16 matrix product on the CPU with exactly one operand transposed.

    On a CPU without AVX-512 BF16 torch falls back to its own bfloat16 GEMM, which runs at about 0.4 GFLOP/s when both
    operands are row-major (or both column-major) and at 17-19 GFLOP/s when one is transposed (2 threads, an AVX2 EPYC).
    The backward of a Linear multiplies by the row-major weight, so a training step is ~10x slower than it need be.
    Entered below a `TensorBytes` count, the copy this makes is scratch the count does not see; the product is the same.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS and args[-1].dtype == torch.bfloat16 and args[-1].device.type == "cpu":
            *rest, a, b = args
            if (a.stride(-1) == 1) == (b.stride(-1) == 1):
                b = b.t().contiguous().t() if b.stride(-1) == 1 else b.contiguous()
            args = (*rest, a, b)
        return func(*args, **(kwargs or {}))


_GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def make_run(work: Workload, opts: MemoryOptions, device: str = "cpu"):
    return (TrainingRun if work.mode == "train" else SamplingRun)(work, opts, device)


def measured_tensor_peak(work: Workload, opts: MemoryOptions) -> int:
    """Peak bytes of live tensors during one steady-state step (after a first step created the optimizer state)."""
    return measured_tensor_bytes(work, opts)[0]


def measured_tensor_bytes(work: Workload, opts: MemoryOptions) -> tuple[int, int]:
    """(peak during a steady-state step, bytes alive before it: weights, LoRA, optimizer state, batch)."""
    run = make_run(work, opts)
    with FastCpuGemm():
        run.step()
    counter = TensorBytes()
    counter.track(run.existing_tensors())
    from musubi_tuner.hunyuan.rope import rope_rotations

    c = work.config
    counter.track(rope_rotations(work.latent_shape, c.patch_size, c.rope_dim_list, c.rope_theta))  # cached between steps
    before = counter.current
    with FastCpuGemm(), counter:  # the GEMM copies below the count
        run.step()
    return counter.peak, before


@dataclass(frozen=True)
class CudaStep:
    """One step measured on the GPU, above what was allocated before its run was built."""

    peak: int  # torch.cuda.max_memory_allocated during the step
    before: int  # allocated before it: weights, LoRA, optimizer state, the batch
    reserved: int  # torch.cuda.max_memory_reserved during it, the allocator's cache emptied before
    seconds: float  # the step, timed with CUDA events
    fits: bool | None = None  # whether one more step ran with the allocator capped at `capped_at` (None: not tried)


def measured_cuda_step(work: Workload, opts: MemoryOptions, warm_up: bool = True, capped_at: int | None = None) -> CudaStep:
    """On the GPU: one step of `work` with `opts`, after a first one unless not `warm_up` (a training step's first one
    creates the optimizer state; a denoising step has none). A previous run's garbage, still held by a reference cycle,
    is not this run's: it is collected first, and whatever survives is subtracted.

    `capped_at` (bytes): then one more step with the allocator allowed that much in all (what a smaller GPU has: the
    reserve on a large one only says the allocator never had to give memory back)."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    run = make_run(work, opts, "cuda")
    if warm_up:
        run.step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.empty_cache()  # building the model (on the GPU, then swapped out) reserved more than the step will
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run.step()
    end.record()
    end.synchronize()
    step = CudaStep(torch.cuda.max_memory_allocated() - base, before - base, torch.cuda.max_memory_reserved(),
                    start.elapsed_time(end) / 1000)
    if capped_at is None:
        return step
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(capped_at / torch.cuda.get_device_properties(0).total_memory)
    try:
        run.step()
        torch.cuda.synchronize()
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return dataclasses.replace(step, fits=fits)
