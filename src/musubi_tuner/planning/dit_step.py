"""A whole DiT step replayed into memory ledgers: a LoRA training step, or one sampling call.

Follows `hunyuan.dit.HunyuanVideoDiT.forward`, `training.loop.training_step` and the optimizers,
block by block (`dit_blocks`), with the memory options acting as the code makes them act:

- gradient checkpointing keeps each block's inputs and recomputes the block in backward;
  with cpu offload those inputs wait in host memory;
- block swap keeps the Linear weights of the last N blocks in host memory; a block's on-device copy
  exists while it runs (and the next one is fetched ahead). Without checkpointing autograd keeps every
  copy until backward, so in training block swap saves nothing unless checkpointing is on;
- fp8 weights are dequantized per Linear per use, in forward and again in backward: a bf16 copy of one
  Linear's weight exists while it runs; autograd keeps only the fp8 weight.

Two ledgers: `device` (GPU memory) and `host` (CPU memory the options put there). For a CPU run they
are the same ledger, which is how the tests check the replay against measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from musubi_tuner.hunyuan.offload import swapped_block_keys
from musubi_tuner.planning.dit_blocks import SAVED, WORK, BlockShapes, BlockTracer
from musubi_tuner.planning.options import MemoryOptions, Workload
from musubi_tuner.planning.sizes import DiTSizes, dit_sizes
from musubi_tuner.planning.trace import MemoryTrace

WEIGHTS = "DiT weights"
LORA = "LoRA weights (fp32)"
OPTIMIZER = "optimizer state"
OPTIMIZER_STEP = "optimizer step temporaries"
INPUTS = "latents, text states, loss"
ROPE = "rope tables"
CKPT_INPUTS = "checkpointed block inputs"
SWAP_COPIES = "block swap: on-device copies"
SWAP_HOST = "block swap: swapped weights"
EMBED = "embedding (img_in, txt_in)"
STEP_CACHE = "step cache: residuals kept between steps"


@dataclass
class StepReplay:
    device: MemoryTrace
    host: MemoryTrace


def block_shapes(work: Workload, opts: MemoryOptions, batch: int, lora_rank: int, text_lengths=None) -> BlockShapes:
    """The blocks' shapes on one process: with context parallel, its shard of the tokens."""
    c = work.config
    img_tokens, txt_tokens = work.local_tokens(opts.context_parallel)
    return BlockShapes(
        batch=batch, img_tokens=img_tokens, txt_tokens=txt_tokens, hidden=c.hidden_size, mlp_hidden=c.mlp_hidden_size,
        heads=c.heads_num, act=opts.act_bytes, lora_rank=lora_rank, text_lengths=text_lengths, split_attn=opts.split_attn,
        fp8=opts.fp8, weight_cast=opts.weight_bytes != opts.act_bytes, exchange=opts.context_parallel > 1,
    )


def optimizer_state_bytes(sizes: DiTSizes, opts: MemoryOptions) -> int:
    """Persistent optimizer state of the LoRA parameters."""
    name = opts.optimizer_type.lower()
    params = sizes.lora_params(opts.network_dim)
    if name == "adamw":
        return 8 * params  # exp_avg, exp_avg_sq in float32
    if name == "adamw8bit":
        return 2 * params + 2 * 4 * params // 256  # two uint8 states + a float32 absmax per 256-block each
    # Adafactor (relative step, no first moment): a row and a column second-moment vector per matrix
    r = opts.network_dim
    return 4 * sum((r + lin.in_features) + (lin.out_features + r) for lin in sizes.block_linears if lin.lora)


def optimizer_step_bytes(sizes: DiTSizes, opts: MemoryOptions, cuda: bool) -> int:
    """Temporaries of optimizer.step(): torch's foreach AdamW (the CUDA default) makes one float32 copy of
    every parameter (the sqrt of exp_avg_sq); the per-parameter loops only the largest one (or three, Adafactor)."""
    r = opts.network_dim
    largest = 4 * max(r * max(lin.in_features, lin.out_features) for lin in sizes.block_linears if lin.lora)
    name = opts.optimizer_type.lower()
    if name == "adamw":
        return 4 * sizes.lora_params(r) if cuda else largest
    if name == "adamw8bit":
        return 0
    return 3 * largest


def swapped_blocks(sizes: DiTSizes, opts: MemoryOptions) -> dict[tuple[str, int], int]:
    """The blocks `--blocks_to_swap` streams, in run order, with the bytes of their Linear weights (hunyuan.offload)."""
    c = sizes.config
    order = swapped_block_keys(opts.blocks_to_swap, c.mm_double_blocks_depth, c.mm_single_blocks_depth)
    return {key: sizes.block_linear_weight_bytes(key, opts.weight_bytes, opts.fp8) for key in order}


class _Swap:
    """Block swap's on-device copies: the running block's and the one fetched ahead."""

    def __init__(self, sizes: DiTSizes, opts: MemoryOptions, device: MemoryTrace):
        self.bytes = swapped_blocks(sizes, opts)
        self.order = list(self.bytes)
        # autograd keeps the weights whose layer's input needs a grad: all but the modulation Linears
        self.kept_bytes = {key: sizes.block_linear_weight_bytes(key, opts.weight_bytes, opts.fp8, modulation=False) for key in self.order}
        self.t = device
        self.copies: dict[tuple[str, int], tuple[int, int]] = {}

    def before(self, key, backward: bool) -> None:
        if key not in self.bytes:
            return
        self._fetch(key)
        i = self.order.index(key) + (-1 if backward else 1)
        if 0 <= i < len(self.order):
            self._fetch(self.order[i])

    def after(self, key, kept_by_autograd: bool) -> int | None:
        """The block is done: drop our reference. Returns the copy's handle if autograd keeps it."""
        handles = self.copies.pop(key, None)
        if handles is None:
            return None
        kept, modulation = handles
        if kept_by_autograd:
            self.t.save(kept)
        self.t.drop(kept, modulation)
        return kept if kept_by_autograd else None

    def _fetch(self, key) -> None:
        if key not in self.copies:
            kept = self.kept_bytes[key]
            self.copies[key] = (self.t.alloc(kept, SWAP_COPIES), self.t.alloc(self.bytes[key] - kept, SWAP_COPIES))


def _resident_weights(sizes: DiTSizes, opts: MemoryOptions, device: MemoryTrace, host: MemoryTrace, swap: _Swap | None,
                      on_cpu: bool) -> None:
    """Weights that stay put for the whole step: on the device, and in host memory what the options put there.
    On a CPU "device" host memory is the same memory, so everything is counted once, on the device."""
    swapped = [] if swap is None or on_cpu else swap.order
    on_device, on_host = sizes.split_weight_bytes(opts.weight_bytes, opts.fp8, swapped, opts.img_in_txt_in_offloading and not on_cpu)
    for label, nbytes in on_device.items():
        device.alloc(nbytes, f"{WEIGHTS} {label}")
    for label, nbytes in on_host.items():
        host.alloc(nbytes, f"{SWAP_HOST} {label}")


def _embed(t: MemoryTrace, sizes: DiTSizes, work: Workload, opts: MemoryOptions, batch: int) -> tuple[int, int, int]:
    """img_in, txt_in and the rope tables: returns (img, txt, rope) handles."""
    c = work.config
    a = opts.act_bytes
    li, lt = work.local_tokens(opts.context_parallel)
    if opts.img_in_txt_in_offloading:  # the embedders visit the device for this
        t.drop(t.alloc(sizes.embedder_params * opts.weight_bytes, EMBED))
    t.drop(t.alloc(4 * batch * work.text_tokens * c.mlp_hidden_size * a, EMBED))  # the token refiner (whole): a few hundred tokens
    if opts.context_parallel > 1:  # img_in's output for every token, before this process keeps its shard
        t.drop(t.alloc(batch * work.image_tokens * c.hidden_size * a, EMBED))
    img = t.alloc(batch * li * c.hidden_size * a, WORK)
    txt = t.alloc(batch * lt * c.hidden_size * a, WORK)
    # rope: the complex table of the image tokens (cached between steps) and the [image, text] one every block reads
    rope = t.alloc((work.image_tokens + (li + lt)) * c.head_dim * 4, ROPE)
    return img, txt, rope


def _blocks(config) -> list[tuple[str, int]]:
    return [("double", i) for i in range(config.mm_double_blocks_depth)] + [("single", i) for i in range(config.mm_single_blocks_depth)]


def replay_training_step(work: Workload, opts: MemoryOptions, on_cpu: bool = False) -> StepReplay:
    """One optimizer step of LoRA training (steady state: the optimizer state exists, the grads do not yet)."""
    return _TrainingStep(work, opts, on_cpu).run()


class _TrainingStep:
    """training.loop.training_step, then backward and optimizer.step(), in the ledgers."""

    def __init__(self, work: Workload, opts: MemoryOptions, on_cpu: bool):
        self.work, self.opts, self.on_cpu = work, opts, on_cpu
        self.sizes = dit_sizes(work.config)
        self.device = MemoryTrace()
        self.host = self.device if on_cpu else MemoryTrace()
        self.shapes = block_shapes(work, opts, work.batch, opts.network_dim, work.text_lengths)
        self.joint_bytes = work.batch * self.shapes.tokens * work.config.hidden_size * opts.act_bytes
        self.swap = _Swap(self.sizes, opts, self.device) if opts.blocks_to_swap else None
        self.ckpt = opts.gradient_checkpointing
        self.offload = self.ckpt and opts.gradient_checkpointing_cpu_offload and not on_cpu
        self.recording = BlockTracer(self.device, self.shapes, grad=True)
        self.plain = BlockTracer(self.device, self.shapes, grad=False)  # checkpointed blocks keep nothing at first
        self.saved_by_block: dict = {}  # without checkpointing: what each block's forward saved
        self.held_inputs: dict = {}  # with checkpointing: each block's inputs (on the host with cpu offload)
        self.copies: dict = {}  # block swap copies autograd keeps

    def run(self) -> StepReplay:
        work, opts, device, c = self.work, self.opts, self.device, self.work.config
        _resident_weights(self.sizes, opts, device, self.host, self.swap, self.on_cpu)
        device.alloc(4 * self.sizes.lora_params(opts.network_dim), LORA)
        device.alloc(optimizer_state_bytes(self.sizes, opts), OPTIMIZER)
        latent_elems = work.batch * c.out_channels * work.latent_shape[0] * work.latent_shape[1] * work.latent_shape[2]
        inputs = device.alloc(4 * latent_elems * (4 if c.in_channels > c.out_channels else 3) + 2 * work.batch * 256 * c.text_states_dim,
                              INPUTS)
        device.where = "forward"
        x, rope = self.forward()
        # final layer (its norm saves the joint output), unpatchify, the float32 loss
        final_in = device.alloc(work.batch * self.shapes.img_tokens * c.hidden_size * opts.act_bytes, WORK)
        device.save(x, part=SAVED)
        device.drop(x)
        pred = device.alloc(2 * work.batch * work.image_tokens * c.patch_volume * c.out_channels * opts.act_bytes, WORK)
        device.drop(final_in)
        loss = device.alloc(3 * 4 * latent_elems, INPUTS)
        device.where = "backward"
        grad = device.alloc(self.joint_bytes, WORK)  # through the final layer and the split: the joint sequence's grad
        device.drop(pred, loss)
        device.unsave(x)
        self.backward(grad)
        device.drop(grad, rope)
        device.where = "optimizer step"
        device.drop(device.alloc(optimizer_step_bytes(self.sizes, opts, cuda=not self.on_cpu), OPTIMIZER_STEP))
        device.drop(inputs)
        return StepReplay(device, self.host)

    def forward(self) -> tuple[int, int]:
        """The blocks' forward; returns the joint sequence's handle and the rope tables'."""
        device, swap = self.device, self.swap
        img, txt, rope = _embed(device, self.sizes, self.work, self.opts, self.work.batch)
        x = last_double = None
        for key in _blocks(self.work.config):
            kind, _ = key
            if kind == "single" and x is None:
                x = device.alloc(self.joint_bytes, WORK)  # torch.cat([img, txt])
                last_double = (img, txt)  # dit.forward's locals keep them until after the single blocks
            args = (img, txt) if kind == "double" else (x,)
            needs_grad = key != ("double", 0)  # img_in / txt_in outputs do not require grad
            if swap:
                swap.before(key, backward=False)
            tracer = self.plain if self.ckpt else self.recording
            if kind == "double":
                img, txt, saved = tracer.double_block(*args, needs_grad)
            else:
                x, saved = tracer.single_block(*args, needs_grad)
            if swap:
                self.copies[key] = swap.after(key, kept_by_autograd=not self.ckpt)
            if not self.ckpt:
                self.saved_by_block[key] = saved
            elif self.offload and key != ("double", 0):  # the block's inputs arrived in host memory
                self.held_inputs[key] = [self.host.alloc(device.nbytes(h), CKPT_INPUTS) for h in args]
            else:
                device.save(*args, part=CKPT_INPUTS)
                self.held_inputs[key] = list(args)
            device.drop(*args)
        device.drop(*last_double)
        return x, rope

    def backward(self, grad: int) -> None:
        """The blocks' backward, newest first; with checkpointing each block is first recomputed."""
        device, swap = self.device, self.swap
        for key in reversed(_blocks(self.work.config)):
            kind, _ = key
            needs_grad = key != ("double", 0)
            moved = False
            if self.ckpt:  # recompute the block, with autograd recording this time
                args = self.held_inputs.pop(key)
                moved = self.offload and key != ("double", 0)
                on_device = [device.alloc(self.host.nbytes(h), CKPT_INPUTS) for h in args] if moved else args
                if swap:
                    swap.before(key, backward=True)
                *outs, saved = (self.recording.double_block(*on_device, needs_grad) if kind == "double"
                                else self.recording.single_block(*on_device, needs_grad))
                device.drop(*outs)
                if swap:
                    self.copies[key] = swap.after(key, kept_by_autograd=True)
            else:
                saved = self.saved_by_block.pop(key)
            if kind == "double":  # the joint grad's views are the outputs' grads
                self.recording.double_block_backward(saved, grad, None, needs_grad, dq_accumulator=not self.on_cpu)
            else:
                self.recording.single_block_backward(saved, grad, needs_grad, dq_accumulator=not self.on_cpu)
            device.unsave(self.copies.pop(key, None))
            if self.ckpt and moved:
                device.drop(*on_device)
                self.host.drop(*args)
            elif self.ckpt:
                device.unsave(*args)


def replay_sampling_call(work: Workload, opts: MemoryOptions, on_cpu: bool = False) -> StepReplay:
    """One denoising step of hv_generate_video: the DiT called without autograd, on a batch of two with real CFG."""
    sizes = dit_sizes(work.config)
    device = MemoryTrace()
    host = device if on_cpu else MemoryTrace()
    c = work.config
    a = opts.act_bytes
    B = work.batch * opts.cfg_batch
    lora_beside = opts.lora_at_generation and opts.fp8  # fp8 weights: LoRAs run beside them; otherwise merged
    r = opts.network_dim if lora_beside else 0
    lengths = work.text_lengths
    if B == 2 and lengths is None:  # the negative prompt is shorter than the positive one: masked attention
        lengths = (work.text_tokens, max(1, work.text_tokens // 4))
    shapes = block_shapes(work, opts, B, r, lengths if B > 1 else None)
    swap = _Swap(sizes, opts, device) if opts.blocks_to_swap else None
    tracer = BlockTracer(device, shapes, grad=False)

    _resident_weights(sizes, opts, device, host, swap, on_cpu)
    if lora_beside:
        device.alloc(4 * sizes.lora_params(r), LORA)
    latent_elems = work.batch * c.out_channels * work.latent_shape[0] * work.latent_shape[1] * work.latent_shape[2]
    device.alloc(4 * latent_elems * 3 + 2 * 2 * 256 * c.text_states_dim, INPUTS)  # latents, the model input, the V2V/I2V condition
    if opts.step_cache:  # per sample: the last residual of the blocks and the last judge (modulated input / first block's residual)
        samples = work.batch * (2 if opts.guidance_scale != 1.0 and not opts.uses_cfg_parallel else 1)
        device.alloc(2 * samples * shapes.img_tokens * c.hidden_size * a, STEP_CACHE)

    device.where = "DiT forward"
    calls = opts.dit_calls
    velocity = None
    for _ in range(calls):
        img, txt, rope = _embed(device, sizes, work, opts, B)
        x = last_double = None
        for key in _blocks(c):
            if swap:
                swap.before(key, backward=False)
            if key[0] == "double":
                args = (img, txt)
                img, txt, _ = tracer.double_block(img, txt, False)
            else:
                if x is None:
                    x = device.alloc(B * shapes.tokens * c.hidden_size * a, WORK)
                    last_double = (img, txt)
                args = (x,)
                x, _ = tracer.single_block(x, False)
            if swap:
                swap.after(key, kept_by_autograd=False)
            device.drop(*args)
        device.drop(*last_double)
        out = device.alloc(2 * B * work.image_tokens * c.patch_volume * c.out_channels * a, WORK)
        device.drop(x, rope, velocity)
        velocity = out  # with split_uncond the negative prompt's prediction waits for the positive one
    device.drop(velocity)
    return StepReplay(device, host)
