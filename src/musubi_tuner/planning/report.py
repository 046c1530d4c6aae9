"""Plans and budget searches as text for the terminal."""

from __future__ import annotations

from musubi_tuner.planning.calibration import HOPPER
from musubi_tuner.planning.dit_trace import traced_step
from musubi_tuner.planning.planner import ALLOCATOR_MARGIN, CUDA_CONTEXT, GB, Plan, Search, calibrated_utilisation


def gb(nbytes: float) -> str:
    return f"{nbytes / GB:,.1f} GB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_model(plan: Plan) -> str:
    c = plan.workload.config
    kind = "SkyReels V1 I2V" if c.in_channels == 32 else "HunyuanVideo"
    return f"{kind} DiT, {traced_step(plan.workload, plan.options).params / 1e9:.2f}B parameters ({c.mm_double_blocks_depth} double + {c.mm_single_blocks_depth} single blocks)"


def format_plan(plan: Plan) -> str:
    w, o, g = plan.workload, plan.options, plan.gpu
    train = w.mode == "train"
    lines = [
        f"{describe_model(plan)}; {w.mode} at {w.describe()}",
        f"options: {o.flags(w.mode)}" + (f"  (LoRA rank {o.network_dim}, {o.optimizer_type}, {o.mixed_precision})" if train
                                         else f"  (LoRAs of rank {o.network_dim} in all beside the fp8 weights)" if o.lora_at_generation else ""),
        "",
        f"{'stage':<58} {'GPU peak':>10} {'host':>9}  peak during",
    ]
    for s in plan.stages:
        lines.append(f"{s.name:<58} {gb(s.device_peak):>10} {gb(s.host) if s.host else '-':>9}  {s.when}")
    lines.append(f"needed on {'each' if o.processes > 1 else 'the'} GPU: {gb(plan.needed)} (largest stage + {ALLOCATOR_MARGIN:.0%} allocator margin + "
                 f"{gb(CUDA_CONTEXT)} CUDA context)")
    lines.append("")
    for s in [plan.dit_stage] * (plan.dit_stage not in (None, plan.peak_stage)) + [plan.peak_stage]:
        lines.append(f"{s.name}, at its peak ({s.when}):")
        for part, nbytes in sorted(s.device_parts.items(), key=lambda kv: -kv[1]):
            if nbytes >= 0.005 * GB:
                lines.append(f"  {part:<52} {gb(nbytes):>10}")
        if s.host_parts:
            lines.append("  in host memory:")
            for part, nbytes in sorted(s.host_parts.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {part:<52} {gb(nbytes):>10}")
    lines.append("")
    if plan.dit_stage is None:
        lines.append("no denoising step runs (V2V at this --strength of --infer_steps): the text encoders and the DiT are "
                     "not loaded, and the VAE's stages are not timed")
        return "\n".join(lines + [f"warning: {warning}" for warning in plan.warnings])
    t = plan.time
    what = "training step" if train else "denoising step"
    lines.append(f"FLOPs per {what}: {plan.flops_per_step / 1e12:,.0f} TFLOP ({plan.flops_note})")
    lines.append(f"time per {what} on {g.name} ({g.bf16_tflops:g} TFLOP/s bf16 dense, {plan.utilisation:.0%} "
                 f"of it {how_utilisation(plan)}): {duration(t.total_s)} = {duration(t.compute_s)} compute"
                 + (f" + {duration(t.transfer_s)} transfers not hidden" if t.transfer_s else "")
                 + (f" + {duration(t.dequant_s)} fp8 dequantization" if t.dequant_s else "")
                 + (f" + {duration(t.collectives_s)} collectives" if t.collectives_s else ""))
    if not train:
        denoising = plan.steps * t.total_s
        lines.append(f"{plan.steps} steps: {duration(denoising)} of denoising per video{' without step caching' if o.step_cache else ''} "
                     "(VAE and text encoders not timed)")
        lines += step_cache_lines(o, plan.steps, denoising)
    for note in t.notes:
        lines.append(f"  - {note}")
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def step_cache_lines(o, steps: int, denoising_s: float) -> list[str]:
    """The denoising time per video with --step_cache (the chosen method, or each at its default threshold): a skipped
    step costs next to nothing, so time / speed-up, and 1 - 1 / speed-up of the steps skipped, at most those the
    warm-up and the last step leave (the speed-up then follows from them)."""
    from musubi_tuner.inference.step_cache import DEFAULT_THRESHOLD, METHODS, expected_speedup, skippable_steps

    if o.step_cache:
        chosen = [(o.step_cache, DEFAULT_THRESHOLD[o.step_cache] if o.step_cache_threshold is None else o.step_cache_threshold)]
    else:
        chosen = [(method, DEFAULT_THRESHOLD[method]) for method in METHODS]
    lines = ["with step caching, at the speed-ups published for the full-size model (not measured here: the share of "
             "skipped steps depends on the weights, the prompt and the step count):"]
    for method, threshold in chosen:
        speedup, how = expected_speedup(method, threshold)
        skipped, most = round(steps * (1 - 1 / speedup)), skippable_steps(steps, o.step_cache_warmup)
        if skipped > most:
            skipped, speedup = most, steps / (steps - most)
            how = f"capped: the first {o.step_cache_warmup} steps (--step_cache_warmup) and the last always run"
        elif skipped == 0:  # (too few steps for the published share to skip one: 1 step was "0 skipped" at 1.6x: fuzz_af 9)
            speedup, how = 1.0, f"too few steps for the published {speedup:.3g}x to skip one"
        lines.append(f"  --step_cache {method} --step_cache_threshold {threshold:g}: about {duration(denoising_s / speedup)} per video, "
                     f"{skipped} of {steps} steps skipped ({speedup:.3g}x: {how})")
    return lines


def format_search(search: Search, budget_label: str) -> str:
    lines = [f"--vram_budget {budget_label} (read as GiB, as GPU memory is sold: {gb(search.budget_bytes)}): "
             "the fastest option set whose every stage fits, keeping the memory options given"]
    if search.best is None:
        lines.append("nothing fits. The smallest option sets tried:")
        smallest = sorted(search.ruled_out, key=lambda c: c.plan.needed)
        for c in smallest[:4]:
            lines.append(f"  {c.options.flags(c.plan.workload.mode):<90} needs {gb(c.plan.needed)}")
        if smallest:  # what does not fit even so: no resolution changes an encoder's (a fixed sentence blamed it: fuzz_af 10)
            over = [s for s in smallest[0].plan.stages if s.needed > search.budget_bytes]
            lines.append("Even so, " + "; ".join(f"{s.name} needs {gb(s.needed)}" for s in over) + ".")
            encoders_only = all(s.name.startswith("text encoder") for s in over)
            lines.append("A larger GPU is needed: no option or size shrinks the text encoders further." if encoders_only
                         else "Lower the resolution or the frame count" + (" (or train on images)" if smallest[0].plan.workload.mode
                                                                          == "train" else "") + ", or use a larger GPU.")
        else:
            lines.append("Lower the resolution or the frame count, or use a larger GPU.")
        return "\n".join(lines)
    mode = search.best.plan.workload.mode

    def row(c) -> str:
        return f"  {c.options.flags(mode):<95} {gb(c.plan.needed):>10}  {duration(c.plan.time.total_s):>9}/step"

    lines.append(f"{'':2}{'option set':<95} {'needs':>10}  {'time':>14}")
    if search.ruled_out:
        lines.append("faster, but do not fit:")
        lines += [row(c) for c in search.ruled_out]
    lines.append("chosen:")
    lines.append(row(search.best))
    if search.also_fit:
        lines.append("slower alternatives that fit:")
        lines += [row(c) for c in search.also_fit]
    lines.append("")
    lines.append(format_plan(search.best.plan))
    return "\n".join(lines)


def how_utilisation(plan: Plan) -> str:
    """Where the share of peak came from: the calibration for this GPU and kernel, or the user."""
    if plan.utilisation != calibrated_utilisation(plan.workload, plan.options, plan.gpu):
        return "as given"
    if not plan.gpu.key:
        return f"with {plan.options.attn_mode} attention, a default share: no published time is of this GPU (give --gpu or --utilisation)"
    ours = plan.options.attn_mode == "sdpa" and plan.gpu.key in HOPPER
    source = "published times" + (" and our steps timed on an H200" if ours else "")
    return f"with {plan.options.attn_mode} attention, learnt from {source}: docs/memory_planner.md"
