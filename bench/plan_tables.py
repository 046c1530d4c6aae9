"""The planner's tables for the full-size model, as they appear in docs/memory_planner.md (and docs/multi_gpu.md).

    python bench/plan_tables.py [multi_gpu]

For 544x960x129 and 720x1280x129 frames, training (LoRA rank 32, AdamW, bf16) and generation
(50 steps, embedded guidance, no real CFG): the fastest option set that fits 12, 16, 24 and 80 GB,
what it needs and the time per step; then the same model under the settings peers published figures for.
"""

from __future__ import annotations

from musubi_tuner.hunyuan.config import HUNYUAN_T2V
from musubi_tuner.hunyuan.cost import forward_flops, train_step_flops
from musubi_tuner.planning import MemoryOptions, Workload, fit_budget, gpu, plan
from musubi_tuner.planning.calibration import fitted_utilisation
from musubi_tuner.planning.report import duration
from musubi_tuner.planning.timing import default_gpu_for_budget

SIZES = ((544, 960), (720, 1280))
BUDGETS = (12, 16, 24, 80)


def budget_table(mode: str, clips=((544, 960, 129), (720, 1280, 129))) -> str:
    lines = [f"| video | budget | fastest option set that fits | needs | {'s / step' if mode == 'train' else 'denoising, 50 steps'} | GPU figures |",
             "|---|---|---|---|---|---|"]
    for h, w, f in clips:
        work = Workload(HUNYUAN_T2V, h, w, f, mode=mode)
        for budget in BUDGETS:
            device = gpu(default_gpu_for_budget(budget))
            search = fit_budget(work, MemoryOptions(), budget, device)
            if search.best is None:
                smallest = min(search.ruled_out, key=lambda c: c.plan.needed)
                lines.append(f"| {h}x{w}x{f} | {budget} GB | nothing fits (smallest: `{smallest.options.flags(mode)}`) | "
                             f"{smallest.plan.needed / 1e9:.1f} GB | | |")
                continue
            p = search.best.plan
            t = p.time.total_s * (1 if mode == "train" else p.steps)
            lines.append(f"| {h}x{w}x{f} | {budget} GB | `{search.best.options.flags(mode)}` | {p.needed / 1e9:.1f} GB "
                         f"(DiT {p.dit_stage.device_peak / 1e9:.1f}, host {p.dit_stage.host / 1e9:.0f}) | {duration(t)} | {device.name} |")
    return "\n".join(lines)


def stage_table(mode: str, opts: MemoryOptions) -> str:
    lines = ["| video | " + " | ".join(s.name for s in plan(Workload(HUNYUAN_T2V, 544, 960, 129, mode=mode), opts, gpu("h100")).stages) + " |"]
    lines.append("|---" * (len(lines[0].split("|")) - 2) + "|")
    for h, w in SIZES:
        p = plan(Workload(HUNYUAN_T2V, h, w, 129, mode=mode), opts, gpu("h100"))
        lines.append(f"| {h}x{w}x129 | " + " | ".join(f"{s.device_peak / 1e9:.1f} GB" for s in p.stages) + " |")
    return "\n".join(lines)


def flops_table() -> str:
    h100 = gpu("h100")
    share = fitted_utilisation("h100")
    lines = [f"| video | tokens | forward | training step (checkpointing) | at {share:.0%} of H100 bf16 | 50 denoising steps at {share:.0%} of H100 |",
             "|---|---|---|---|---|---|"]
    for h, w in SIZES:
        work = Workload(HUNYUAN_T2V, h, w, 129)
        fwd = forward_flops(HUNYUAN_T2V, work.latent_shape, 256)
        step = train_step_flops(HUNYUAN_T2V, work.latent_shape, 256, 1, 32, True)
        rate = h100.bf16_tflops * 1e12 * share
        lines.append(f"| {h}x{w}x129 | {work.image_tokens:,} + 256 | {fwd.total / 1e12:,.0f} TFLOP ({fwd.attention / fwd.total:.0%} attention) | "
                     f"{step.total / 1e12:,.0f} TFLOP | {duration(step.total / rate)} / step | {duration(50 * fwd.total / rate)} |")
    return "\n".join(lines)


def peers_table() -> str:
    h100 = gpu("h100")
    rows = [
        ("Tencent, 720x1280x129, 1 GPU, batch 1", Workload(HUNYUAN_T2V, 720, 1280, 129, mode="generate"), MemoryOptions()),
        ("Tencent, 544x960x129", Workload(HUNYUAN_T2V, 544, 960, 129, mode="generate"), MemoryOptions()),
        ("diffusers blog, 512x768x121, 128 text tokens", Workload(HUNYUAN_T2V, 512, 768, 121, text_tokens=128, mode="generate"), MemoryOptions()),
    ]
    lines = ["| setting | stages (ours, one model at a time) |", "|---|---|"]
    for label, work, opts in rows:
        p = plan(work, opts, h100)
        stages = ", ".join(f"{s.name.split(' [')[0]} {s.device_peak / 1e9:.1f}" for s in p.stages)
        lines.append(f"| {label} | {stages} GB; all on the GPU at once: {sum_resident(p) / 1e9:.1f} GB |")
    return "\n".join(lines)


def multi_gpu_tables() -> str:
    """docs/multi_gpu.md's "What it costs": HunyuanVideo 720p generation, SkyReels with real CFG, LoRA training, per GPU."""
    out = ["**HunyuanVideo, 720x1280x129, 50 steps** (H100)", "",
           "| GPUs | needed per GPU | denoising, planned | of which collectives | sent per GPU per step |", "| --- | --- | --- | --- | --- |"]
    from musubi_tuner.planning.planner import collective_bytes

    work = Workload(HUNYUAN_T2V, 720, 1280, 129, mode="generate")
    for n in (1, 2, 4, 8):
        opts = MemoryOptions(context_parallel=n)
        p = plan(work, opts, gpu("h100"))
        collectives, sent = (f"{p.time.collectives_s * 50:.1f} s", f"{collective_bytes(work, opts) / 1e9:.1f} GB") if n > 1 else ("-", "-")
        out.append(f"| {n} | {p.needed / 1e9:.1f} GB | {p.time.total_s * 50 / 60:.1f} min | {collectives} | {sent} |")
    out += ["", "**SkyReels V1, 544x960x97, 30 steps, real CFG 6** (A100 80GB)", "",
            "| GPUs | processes | needed per GPU | denoising, planned |", "| --- | --- | --- | --- |"]
    work = Workload(HUNYUAN_T2V, 544, 960, 97, mode="generate")
    for gpus, n, cfg, label in ((1, 1, False, "one, CFG as a batch of 2"), (2, 1, True, "CFG-parallel, N = 1"),
                                (4, 2, True, "CFG-parallel, N = 2"), (8, 4, True, "CFG-parallel, N = 4")):
        p = plan(work, MemoryOptions(guidance_scale=6.0, infer_steps=30, context_parallel=n, cfg_parallel=cfg), gpu("a100"))
        out.append(f"| {gpus} | {label} | {p.needed / 1e9:.1f} GB | {p.time.total_s * 30 / 60:.1f} min |")
    out += ["", "**LoRA training step, rank 32, gradient checkpointing** (H100)", "",
            "| clip | GPUs (N) | needed per GPU | time per step | sent per GPU per step |", "| --- | --- | --- | --- | --- |"]
    for (h, w, f), counts in (((720, 1280, 129), (1, 2, 4, 8)), ((544, 960, 97), (1, 8))):
        work = Workload(HUNYUAN_T2V, h, w, f)
        for n in counts:
            opts = MemoryOptions(gradient_checkpointing=True, context_parallel=n)
            p = plan(work, opts, gpu("h100"))
            sent = f"{collective_bytes(work, opts) / 1e9:.0f} GB" if n > 1 else "-"
            out.append(f"| {h}x{w}x{f} | {n} | {p.needed / 1e9:.1f} GB | {duration(p.time.total_s)} | {sent} |")
    return "\n".join(out)


def sum_resident(p) -> int:
    """Every model's weights kept on the GPU (the official script without --use-cpu-offload) plus the largest stage's activations."""
    weights = {s.name: sum(v for k, v in s.device_parts.items() if "weights" in k) for s in p.stages}
    return sum(weights.values()) + max(s.device_peak - weights[s.name] for s in p.stages)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["multi_gpu"]:
        print(multi_gpu_tables())
        sys.exit()
    print("## Training (LoRA rank 32, AdamW, bf16 autocast; caching commands included)\n")
    print(budget_table("train"))
    print("\nShorter clips and images:\n")
    print(budget_table("train", ((544, 960, 33), (544, 960, 1))))
    print("\n## Generation (50 steps, embedded guidance)\n")
    print(budget_table("generate"))
    print("\n## Stages, no memory options (training)\n")
    print(stage_table("train", MemoryOptions()))
    print("\n## Stages, no memory options (generation)\n")
    print(stage_table("generate", MemoryOptions()))
    print("\n## FLOPs\n")
    print(flops_table())
    print("\n## Peers' settings\n")
    print(peers_table())
