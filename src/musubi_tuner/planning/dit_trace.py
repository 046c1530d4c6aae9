"""The DiT stage: our HunyuanVideoDiT traced at full width on fake tensors, composed to full depth.

The model is built with 3 double and 2 single blocks (fewer if it has fewer), the options applied as the commands
apply them (fp8 weights, LoRA, checkpointing, attention), and one training step (loss and backward) or one denoising
step (one or two DiT calls, the step cache) runs at the real shapes under `tracer.trace`. The blocks of a kind are
identical, so the full model's step is that trace with the middle double block and a single block repeated
(`tracer.compose`). Kept by hand, because a trace on one device cannot see it:

- where weights live: block swap keeps the Linear weights of the swapped blocks in host memory and copies the
  running block's and the next one's in (copies autograd keeps until backward without checkpointing);
  --img_in_txt_in_offloading keeps the embedders there; checkpoint CPU offload keeps the block inputs there.
  On a CPU host and device are one memory: the weights stay, the copies add to them (as measured);
- CUDA kernel scratch: flash attention's float32 dq accumulator in backward;
- the optimizer: AdamW8bit's kernels are CUDA-only and Adafactor decides on values, so the state and the
  temporaries of step() are their documented sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from musubi_tuner.errors import quieted
from musubi_tuner.hunyuan import sequence_parallel
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.hunyuan.sequence_parallel import SequenceParallel
from musubi_tuner.hunyuan.offload import swapped_block_keys
from musubi_tuner.planning.options import MemoryOptions, Workload
from musubi_tuner.planning.tracer import Parts, Peak, Segment, add, compose, fake_module, on_disk, trace

TRACED = {"double": 3, "single": 2}
REPEATED = {("forward", "double"): 1, ("backward", "double"): 1, ("forward", "single"): 0, ("backward", "single"): 1}
SWAP_COPIES, SWAP_HOST, CKPT_HOST = "block swap: on-device copies", "block swap: swapped weights", "checkpointed block inputs"
EMBEDDERS, DQ, OPTIMIZER, OPTIMIZER_STEP = "img_in, txt_in (offloaded)", "flash attention dq (float32)", "optimizer state", "optimizer step"
STEP_CACHE = "step cache: residuals kept between steps"
SCALING_FACTOR = 0.476986  # the VAE's latent scale: the trainer feeds scaled latents


@dataclass(frozen=True)
class Block:
    """What one block of a kind holds: bytes of its parameters and buffers, of its Linear weights (all / those whose
    input needs a grad, the ones autograd keeps: what block swap streams), and of its LoRA parameters; its parameter
    counts."""

    nbytes: int
    linear_bytes: int
    kept_linear_bytes: int
    lora_bytes: int
    lora_shapes: tuple[tuple[int, int], ...]  # (in, out) of each Linear LoRA wraps
    params: int
    fp8_params: int  # Linear weights stored in float8
    lora_params: int


@dataclass(frozen=True)
class Traced:
    segments: tuple[Segment, ...]
    blocks: dict[str, Block]
    embedder_bytes: int
    params: int  # of the full model
    joint_bytes: int  # one block input over the joint sequence (a checkpointed input, one dq accumulator at float32 / 2)
    step_cache_bytes: int  # the residuals a step cache keeps between steps (traced as inputs)
    depth: dict[str, int]  # blocks of each kind in the full model

    def total(self, fact: str) -> int:
        """A `Block` fact summed over the full model's blocks (fp8_params, lora_params, linear_bytes, ...)."""
        return sum(self.depth[k] * getattr(b, fact) for k, b in self.blocks.items())


def _reduced(opts: MemoryOptions) -> MemoryOptions:
    """Only the options that change what the traced step allocates (the others are applied by hand)."""
    return MemoryOptions(fp8=opts.fp8, gradient_checkpointing=opts.gradient_checkpointing, split_attn=opts.split_attn,
                         network_dim=opts.network_dim, mixed_precision=opts.mixed_precision, dit_dtype=opts.dit_dtype,
                         guidance_scale=1.0 if opts.cfg_batch == opts.dit_calls == 1 else 2.0, split_uncond=opts.split_uncond,
                         lora_at_generation=opts.lora_at_generation and opts.fp8, step_cache=opts.step_cache,
                         context_parallel=opts.context_parallel)


def traced_step(work: Workload, opts: MemoryOptions) -> Traced:
    return _traced(work, _reduced(opts))


@functools.lru_cache(maxsize=32)
def _traced(work: Workload, opts: MemoryOptions) -> Traced:
    """Kept on disk (tracer.on_disk) under the workload, the options and the source of every module the traced model is
    made of, and of the code that runs the step."""
    import musubi_tuner.hunyuan as hunyuan
    from musubi_tuner.inference import step_cache
    from musubi_tuner.networks import lora

    c = work.config
    depth = {"double": min(c.mm_double_blocks_depth, TRACED["double"]), "single": min(c.mm_single_blocks_depth, TRACED["single"])}
    model = meta_model(dataclasses.replace(c, mm_double_blocks_depth=depth["double"], mm_single_blocks_depth=depth["single"]), opts)
    kinds = {type(m) for m in model.modules()}
    sources = [*Path(hunyuan.__file__).parent.glob("*.py"), __file__, lora.__file__, step_cache.__file__,
               *filter(None, map(inspect.getsourcefile, kinds))]
    return on_disk((work, opts, sorted(k.__qualname__ for k in kinds)), sources, lambda: _trace_step(model, work, opts, depth),
                   _from_json)


def _from_json(d: dict) -> Traced:
    blocks = {k: Block(**{**b, "lora_shapes": tuple(map(tuple, b["lora_shapes"]))}) for k, b in d["blocks"].items()}
    return Traced(tuple(Segment(**seg) for seg in d["segments"]), blocks, d["embedder_bytes"], d["params"], d["joint_bytes"],
                  d["step_cache_bytes"], d["depth"])


def _trace_step(model: HunyuanVideoDiT, work: Workload, opts: MemoryOptions, depth: dict[str, int]) -> Traced:
    from musubi_tuner.hunyuan import rope

    c = work.config
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_model(model, opts, mode, train=work.mode == "train")
    if opts.context_parallel > 1:  # this process's share of the tokens: rank 0 of a group whose collectives move nothing
        model.sequence_parallel = SequenceParallel(None, opts.context_parallel, 0)
    rope._rotation_table.cache_clear()  # a table cached by a real run must not meet fake tensors, nor a fake one real runs
    try:
        with (mode, mock.patch.object(sequence_parallel, "dist", _NoCollectives),
              quieted("musubi_tuner.networks.lora", logging.WARNING)):  # (the traced LoRA network is no news to the user)
            if work.mode == "train":
                segments, network, cached = _training_trace(model, work, opts)
            else:
                segments, network, cached = _sampling_trace(model, work, opts)
    finally:
        rope._rotation_table.cache_clear()
    blocks = {kind: _block_facts(getattr(model, f"{kind}_blocks")[0], network, f"{kind}_blocks_0_") for kind in depth}
    embedders = sum(p.nbytes for m in (model.img_in, model.txt_in) for p in m.parameters())
    full = {"double": c.mm_double_blocks_depth, "single": c.mm_single_blocks_depth}
    params = sum(p.numel() for p in model.parameters()) + sum((full[k] - depth[k]) * blocks[k].params for k in full)
    batch = work.batch * (opts.cfg_batch if work.mode == "generate" else 1)
    joint = batch * sum(work.local_tokens(opts.context_parallel)) * c.hidden_size * opts.act_bytes
    return Traced(tuple(segments), blocks, embedders, params, joint, cached, full)


class _NoCollectives:
    """The collectives `hunyuan.sequence_parallel` calls, for a traced process: their buffers are allocated by the caller
    (and traced); what arrives in them is no concern of a memory trace."""

    @staticmethod
    def all_to_all_single(output, input, group=None) -> None:
        pass

    @staticmethod
    def all_gather(outputs, input, group=None) -> None:
        pass

    @staticmethod
    def all_reduce(tensor, group=None) -> None:
        pass


def meta_model(config, opts: MemoryOptions) -> HunyuanVideoDiT:
    """The DiT as the commands load it (`load_frozen_dit`: dtype, fp8) on the meta device."""
    from musubi_tuner.hunyuan.fp8 import convert_to_fp8

    with torch.device("meta"):
        model = HunyuanVideoDiT(config).to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[opts.dit_dtype])
    if opts.fp8:
        convert_to_fp8(model)
    return model


def build_model(model: HunyuanVideoDiT, opts: MemoryOptions, mode: FakeTensorMode, train: bool) -> HunyuanVideoDiT:
    """`meta_model` on fake tensors, frozen, with the attention and checkpointing the options ask for."""
    model = fake_module(model, mode)
    model.requires_grad_(False)
    model.set_attention("sdpa", opts.split_attn)
    if train and opts.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model.train(train and opts.gradient_checkpointing)


def _inputs(work: Workload, batch: int, lengths: tuple[int, ...]) -> dict:
    """A batch as the caches give it: latents, LLM states padded to 256 and their mask (a real tensor: the DiT reads
    it on the host), CLIP's pooled vector."""
    c = work.config
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        mask = (torch.arange(256) < torch.tensor(lengths)[:, None]).long()
    return {"latents": torch.empty(batch, c.out_channels, *work.latent_shape, dtype=torch.bfloat16),
            "llm": torch.empty(batch, 256, c.text_states_dim, dtype=torch.bfloat16), "llm_mask": mask,
            "clipL": torch.empty(batch, c.text_states_dim_2, dtype=torch.bfloat16)}


def _marks(model: HunyuanVideoDiT) -> dict[nn.Module, str]:
    return {b: f"{kind}_blocks.{i}" for kind in ("double", "single") for i, b in enumerate(getattr(model, f"{kind}_blocks"))}


def _training_trace(model: HunyuanVideoDiT, work: Workload, opts: MemoryOptions):
    """hv_train_network's step: noise the latents, predict under autocast, the float32 loss, backward (LoRA grads)."""
    from musubi_tuner.networks.lora import LoRANetwork

    network = LoRANetwork(model, rank=opts.network_dim, alpha=1.0)
    network.apply_to(None, model)
    network.prepare_grad_etc()
    B, c = work.batch, work.config
    b = _inputs(work, B, work.text_lengths or (work.text_tokens,) * B)

    def step(mark) -> None:
        latents = b["latents"].float() * SCALING_FACTOR
        noise = torch.randn_like(latents)
        s = torch.full((B, 1, 1, 1, 1), 0.6)
        model_input = (1.0 - s) * latents + s * noise
        if c.in_channels == 2 * c.out_channels:  # SkyReels I2V: the clean first frame conditions the rest
            model_input = torch.cat([model_input, torch.zeros_like(latents)], dim=1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.act_bytes == 2):
            pred = model(model_input, torch.full((B,), 600.0), b["llm"], b["llm_mask"], b["clipL"], torch.full((B,), 1000.0))
        loss = (pred.float() - (noise - latents)).square().mean(dim=(1, 2, 3, 4)).mean()
        del pred, model_input
        loss.backward()

    return trace(step, [model, network, b["latents"], b["llm"], b["clipL"]], _marks(model)), network, 0


def _sampling_trace(model: HunyuanVideoDiT, work: Workload, opts: MemoryOptions):
    """One step of inference.sampler.denoise: the DiT on the prompt, on a CFG batch of two, or on each in turn."""
    from musubi_tuner.inference.step_cache import StepCache

    network = None
    if opts.lora_at_generation:  # LoRAs beside fp8 weights (merged into bf16 ones)
        from musubi_tuner.networks.lora import LoRANetwork

        network = LoRANetwork(model, rank=opts.network_dim, alpha=1.0)
        network.apply_to(None, model)
        network.requires_grad_(False)
    model.eval()
    c, B = work.config, work.batch
    cond = _inputs(work, B, (work.text_tokens,) * B)
    uncond = _inputs(work, B, (max(1, work.text_tokens // 4),) * B)  # a shorter negative prompt
    pair = _inputs(work, 2 * B, (max(1, work.text_tokens // 4),) * B + (work.text_tokens,) * B)
    latents = torch.empty(B, c.out_channels, *work.latent_shape)
    cache = StepCache(opts.step_cache, 1e-12) if opts.step_cache else None

    def dit(branch: str, x, inputs) -> torch.Tensor:
        n = x.shape[0]
        args = (x, torch.full((n,), 1000.0), inputs["llm"], inputs["llm_mask"], inputs["clipL"], torch.full((n,), 6000.0))
        if cache is None:
            return model(*args)
        with cache.call(model, 0, 0, 0, branch):  # a step that computes its blocks (the first and the last always do)
            return model(*args)

    def step(mark) -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            x = latents
            model_in = x if c.in_channels == c.out_channels else torch.cat([x, torch.zeros_like(x)], dim=1)
            if opts.guidance_scale == 1.0:
                v = dit("cond", model_in, cond)
            elif opts.split_uncond:
                v_neg = dit("uncond", model_in, uncond)
                v_pos = dit("cond", model_in, cond)
                v = v_neg.float() + 6.0 * (v_pos.float() - v_neg.float())
            else:
                both = dit("cond+uncond", torch.cat([model_in, model_in]), pair)
                v_neg, v_pos = both.float().chunk(2)
                v = v_neg + 6.0 * (v_pos - v_neg)
            x + v.float() * -0.1

    if cache is not None:  # an earlier step left its residuals in the cache
        step(lambda label: None)
    kept = [t for br in (cache._branches.values() if cache else ()) for t in (br.previous, br.residual) if t is not None]
    external = [model, latents, *kept] + ([network] if network else [])
    external += [t for inputs in (cond, uncond, pair) for k, t in inputs.items() if k != "llm_mask"]
    return trace(step, external, _marks(model)), network, sum(t.untyped_storage().nbytes() for t in kept)


def _block_facts(block: nn.Module, network, lora_prefix: str) -> Block:
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    modulation = {id(m.linear) for m in block.modules() if hasattr(m, "factor")}
    lora = [m for m in (network.unet_loras if network is not None else ()) if lora_prefix in m.lora_name]
    return Block(
        nbytes=sum(t.nbytes for t in (*block.parameters(), *block.buffers())),
        linear_bytes=sum(m.weight.nbytes for m in linears),
        kept_linear_bytes=sum(m.weight.nbytes for m in linears if id(m) not in modulation),
        lora_bytes=sum(p.nbytes for m in lora for p in m.parameters()),
        lora_shapes=tuple((m.lora_down.in_features, m.lora_up.out_features) for m in lora),
        params=sum(p.numel() for p in block.parameters()),
        fp8_params=sum(m.weight.numel() for m in linears if m.weight.element_size() == 1),
        lora_params=sum(p.numel() for m in lora for p in m.parameters()))


# ------------------------------------------------------------------------------------------------ composing


def _where(label: str) -> tuple[str, str, int] | None:
    """("forward" | "backward", "double" | "single", traced index) of a block's segment."""
    phase, _, name = label.partition(" ")
    if not name.endswith(tuple("0123456789")) or "_blocks." not in name:
        return None
    kind, index = name.split("_blocks.")
    return phase, kind, int(index)


def dit_peak(work: Workload, opts: MemoryOptions, on_cpu: bool = False) -> tuple[Peak, Parts]:
    """(the device's peak during the step, with its parts; what the options keep in host memory, by part)."""
    t = traced_step(work, opts)
    depth = t.depth
    count = {k: depth[k] - TRACED[k] + 1 if depth[k] >= TRACED[k] else 1 for k in depth}
    train = work.mode == "train"

    def index(phase: str, kind: str, j: int, i: int) -> int:
        """The full model's block that the i-th run of traced block j stands for."""
        rep = REPEATED[(phase, kind)]
        if j != rep or count[kind] == 1:
            return j if j < rep else j + count[kind] - 1
        return rep + i if phase == "forward" else rep + count[kind] - 1 - i

    repeats = {f"{phase} {kind}_blocks.{j}": count[kind] for (phase, kind), j in REPEATED.items()}
    untraced = sum((depth[k] - min(depth[k], TRACED[k])) * (b.nbytes + b.lora_bytes) for k, b in t.blocks.items())
    static = {"weights": untraced, "inputs": -t.step_cache_bytes, STEP_CACHE: t.step_cache_bytes}
    host: Parts = {}
    swapped = swapped_block_keys(opts.blocks_to_swap, depth["double"], depth["single"])
    if swapped and not on_cpu:
        moved = sum(t.blocks[k].linear_bytes for k, _ in swapped)
        static = add(static, {"weights": -moved})
        host[SWAP_HOST] = moved
    offload_embedders = opts.img_in_txt_in_offloading and not on_cpu
    if offload_embedders:
        static = add(static, {"weights": -t.embedder_bytes})
        host[EMBEDDERS] = t.embedder_bytes
    offload_inputs = train and opts.gradient_checkpointing and opts.gradient_checkpointing_cpu_offload and not on_cpu
    if train:
        static[OPTIMIZER] = optimizer_state_bytes(t, opts)
    held_on_host = [0]

    def adjust(label: str, i: int) -> tuple[Parts, Parts]:
        at_top: Parts = {}
        left: Parts = {}
        if label == "start" and offload_embedders:
            at_top[EMBEDDERS] = t.embedder_bytes
        where = _where(label)
        if where is None:
            return at_top, left
        phase, kind, j = where
        key = (kind, index(phase, kind, j, i))
        if key in swapped:  # this block's copy and the next one's, fetched ahead
            ahead = swapped.index(key) + (-1 if phase == "backward" else 1)
            recompute = phase == "forward" or opts.gradient_checkpointing or not train
            if recompute:
                at_top[SWAP_COPIES] = t.blocks[kind].linear_bytes + (
                    t.blocks[swapped[ahead][0]].linear_bytes if 0 <= ahead < len(swapped) else 0)
            if train and not opts.gradient_checkpointing:  # autograd keeps the copy for the input grads until backward
                left[SWAP_COPIES] = t.blocks[kind].kept_linear_bytes * (1 if phase == "forward" else -1)
        if phase == "backward" and not on_cpu:
            at_top[DQ] = 4 * t.joint_bytes // opts.act_bytes
        if offload_inputs and key != ("double", 0):  # the checkpoint keeps the block's input in host memory
            sign = 1 if phase == "forward" else -1
            held_on_host[0] += sign * t.joint_bytes
            host[CKPT_HOST] = max(host.get(CKPT_HOST, 0), held_on_host[0])
            left["activations"] = -sign * t.joint_bytes
            if phase == "backward":  # copied back for the recomputation
                at_top["activations"] = t.joint_bytes
        elif train and opts.gradient_checkpointing:  # named apart from the activations: the block inputs the checkpoint holds
            sign = 1 if phase == "forward" else -1
            left = add(left, {"activations": -sign * t.joint_bytes, CKPT_HOST: sign * t.joint_bytes})
        return at_top, left

    peak = compose(list(t.segments), repeats, adjust, static)
    if _where(peak.where):  # a traced block stands for several: name the phase and the kind
        phase, kind, _ = _where(peak.where)
        peak.where = f"{phase}, {kind} blocks"
    if train:
        peak.consider(add(peak.end, {OPTIMIZER_STEP: optimizer_step_bytes(t, opts, cuda=not on_cpu)}), "optimizer step")
    return peak, host


# ------------------------------------------------------------------------------------------------ the optimizer


def optimizer_state_bytes(t: Traced, opts: MemoryOptions) -> int:
    """AdamW: exp_avg and exp_avg_sq in float32; AdamW8bit: two uint8 states and a float32 absmax per 256 values each;
    Adafactor (no first moment): a float32 row and column second moment per matrix."""
    r, name, params = opts.network_dim, opts.optimizer_type.lower(), t.total("lora_params")
    if name == "adamw":
        return 8 * params
    if name == "adamw8bit":
        return 2 * params + 2 * 4 * params // 256
    return 4 * sum(t.depth[k] * (2 * r + i + o) for k, b in t.blocks.items() for i, o in b.lora_shapes)


def optimizer_step_bytes(t: Traced, opts: MemoryOptions, cuda: bool) -> int:
    """torch's AdamW on CUDA runs foreach: a float32 temporary per parameter; on the CPU it loops (the largest matrix
    at a time); Adafactor holds three temporaries of the largest matrix; AdamW8bit works in place."""
    r, name = opts.network_dim, opts.optimizer_type.lower()
    largest = 4 * r * max((max(i, o) for b in t.blocks.values() for i, o in b.lora_shapes), default=0)
    if name == "adamw8bit":
        return 0
    if name == "adamw" and cuda:
        return 4 * t.total("lora_params")
    return (3 if name == "adafactor" else 1) * largest
