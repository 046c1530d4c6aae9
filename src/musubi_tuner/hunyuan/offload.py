"""Block swap (`--blocks_to_swap N`): the Linear weights of N blocks live in host memory and are copied in ahead of use.

The DiT is frozen during LoRA training and inference, so weights only ever travel host -> device: a
swapped Linear computes with an on-device copy that exists only while something needs it. In a plain
forward the copy is dropped right after the block; under gradient checkpointing the block is recomputed
in backward, fetches its weights again, and autograd frees the copy once that block's backward is done.
No device -> host traffic, no per-block bookkeeping in backward, and the numbers are the same as without
swapping because the arithmetic is the same.

The next swapped block is fetched while the current one computes (on a side CUDA stream where there is
one, `CopyStream`; `use_pinned_memory` makes those copies truly asynchronous). Asynchronous copies let the
host run ahead of the GPU, and a copy's memory is allocated on the host's clock: so before it allocates the
next copy, the host waits until the GPU has finished the swapped block before the current one. At most two
blocks' copies (the one in use and the one arriving) then exist on the device, as the memory planner counts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.dit import BlockHooks, HunyuanVideoDiT
from musubi_tuner.hunyuan.fp8 import Fp8Linear

MAX_BLOCKS_TO_SWAP_TRAINING = 36
MAX_BLOCKS_TO_SWAP_INFERENCE = 38


class SwappedLinear(nn.Linear):
    """nn.Linear whose weight stays in host memory; forward uses the on-device copy block swap provides."""

    device_weight: torch.Tensor | None = None

    def stored_weight(self) -> torch.Tensor:
        if self.device_weight is None:  # not prefetched: fetch on demand (correct, just not overlapped)
            return self.weight.to(self.bias.device if self.bias is not None else "cpu", non_blocking=True)
        return self.device_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.stored_weight(), self.bias)


class SwappedFp8Linear(Fp8Linear):
    device_weight: torch.Tensor | None = None
    stored_weight = SwappedLinear.stored_weight


class CopyStream:
    """Host -> device copies on a side CUDA stream, ordered against the compute stream with events.

    Every CUDA call of block swap is made here, through `cuda` (torch.cuda; the CPU tests pass a fake that
    records the order of the calls).
    """

    def __init__(self, device: torch.device, cuda=torch.cuda):
        self.device = device
        self.cuda = cuda
        self.side = cuda.Stream(device)

    def start(self, weights: list[torch.Tensor]) -> tuple[list[torch.Tensor], object]:
        """Queue on-device copies of `weights` after the work already queued on the compute stream; returns the
        copies and the event that marks them done."""
        self.side.wait_stream(self.cuda.current_stream(self.device))
        with self.cuda.stream(self.side):
            copies = [w.to(self.device, non_blocking=True, copy=True) for w in weights]
            done = self.cuda.Event()
            done.record(self.side)
        return copies, done

    def finish(self, copies: list[torch.Tensor], done) -> None:
        """The compute stream waits for the copies; their memory is not reused before the compute stream is done with them."""
        compute = self.cuda.current_stream(self.device)
        compute.wait_event(done)
        for copy in copies:
            copy.record_stream(compute)

    def mark(self):
        """An event that completes when the work queued so far on the compute stream is done."""
        event = self.cuda.Event()
        event.record(self.cuda.current_stream(self.device))
        return event


def swap_limit(config, max_blocks: int = MAX_BLOCKS_TO_SWAP_INFERENCE) -> int:
    """The most blocks a DiT of `config` can swap (all double blocks but one, the single blocks they weigh), at most
    `max_blocks` (a training run's MAX_BLOCKS_TO_SWAP_TRAINING, a generation's MAX_BLOCKS_TO_SWAP_INFERENCE)."""
    return min(max_blocks, (config.mm_double_blocks_depth - 1) * 2 + 1)


def split_blocks_to_swap(n: int, double_depth: int, single_depth: int) -> tuple[int, int]:
    """How many double and single blocks N swaps: a double block weighs about two single blocks (musubi-tuner's split)."""
    double = n // 2
    single = (n - double) * 2 + 1 if n > 0 else 0
    return min(double, double_depth - 1), min(single, single_depth - 1)


def swapped_block_keys(n: int, double_depth: int, single_depth: int) -> list[tuple[str, int]]:
    """The blocks N swaps, in the order a forward runs them: the last double blocks, then the last single blocks."""
    n_double, n_single = split_blocks_to_swap(n, double_depth, single_depth)
    return ([("double", i) for i in range(double_depth - n_double, double_depth)]
            + [("single", i) for i in range(single_depth - n_single, single_depth)])


class BlockSwap(BlockHooks):
    """Keeps the Linear weights of the last N double/single blocks on the host and streams them in."""

    def __init__(self, model: HunyuanVideoDiT, blocks_to_swap: int, device: torch.device | str,
                 use_pinned_memory: bool = False, max_blocks: int = MAX_BLOCKS_TO_SWAP_INFERENCE,
                 copy_stream: CopyStream | None = None):
        c = model.config
        limit = swap_limit(c, max_blocks)
        if not 0 < blocks_to_swap <= limit:
            raise UserError(f"--blocks_to_swap {blocks_to_swap}: must be between 0 and {limit} for this model (0 swaps none)")
        self.device = torch.device(device)
        self.swapped = swapped_block_keys(blocks_to_swap, c.mm_double_blocks_depth, c.mm_single_blocks_depth)
        self.model = model
        self._linears: dict[tuple[str, int], list[nn.Linear]] = {}
        self._pending: dict[tuple[str, int], object] = {}  # fetched blocks: their copies' done event (None: copied already)
        self._copies = copy_stream or (CopyStream(self.device) if self.device.type == "cuda" else None)
        self._last_block_done = None  # compute-stream event after the last swapped block that ran
        self._backward_phase = False

        swapped = set(self.swapped)
        for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
            for i, block in enumerate(blocks):
                if (kind, i) not in swapped:
                    block.to(self.device)
                    continue
                linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
                for m in linears:
                    host = m.weight.data.to("cpu")
                    m.weight.data = host.pin_memory() if use_pinned_memory and self.device.type == "cuda" else host
                    m.__class__ = SwappedFp8Linear if isinstance(m, Fp8Linear) else SwappedLinear
                    m.device_weight = None
                # everything except the Linear weights (biases, norms, scales) lives on the device
                for name, p in block.named_parameters():
                    if not any(p is m.weight for m in linears):
                        p.data = p.data.to(self.device)
                for m in linears:
                    if getattr(m, "weight_scale", None) is not None:
                        m.weight_scale = m.weight_scale.to(self.device)
                self._linears[(kind, i)] = linears
        for name, child in model.named_children():
            if name not in ("double_blocks", "single_blocks"):
                child.to(self.device)
        model.block_hooks = self

    # -- the schedule
    def start_forward(self) -> None:
        self._backward_phase = False

    def end_forward(self) -> None:
        self._backward_phase = True  # blocks seen from now on are backward recomputations, in reverse order

    def before(self, key: tuple[str, int]) -> None:
        if key not in self._linears:
            return
        self._fetch(key)
        self._wait(key)
        i = self.swapped.index(key)
        nxt = i - 1 if self._backward_phase else i + 1
        if 0 <= nxt < len(self.swapped):
            self._fetch(self.swapped[nxt])

    def after(self, key: tuple[str, int]) -> None:
        if key not in self._linears:
            return
        # Drop our reference; autograd keeps the copy alive exactly as long as backward needs it.
        for m in self._linears[key]:
            m.device_weight = None
        self._pending.pop(key, None)
        if self._copies is not None:
            self._last_block_done = self._copies.mark()

    def _fetch(self, key: tuple[str, int]) -> None:
        if key in self._pending:
            return
        linears = self._linears[key]
        if self._copies is None:
            for m in linears:
                m.device_weight = m.weight.to(self.device, copy=True)
            self._pending[key] = None
            return
        if self._last_block_done is not None:
            # Copies are allocated on the host's clock, which may be blocks ahead of the GPU's: wait until the GPU has
            # finished the previous swapped block, so that its copy's memory is free for this one (two copies on the
            # device, not one per block queued).
            self._last_block_done.synchronize()
        copies, done = self._copies.start([m.weight for m in linears])
        for m, copy in zip(linears, copies):
            m.device_weight = copy
        self._pending[key] = done

    def _wait(self, key: tuple[str, int]) -> None:
        done = self._pending.get(key)
        if done is not None:
            self._copies.finish([m.device_weight for m in self._linears[key]], done)

    def resident_copies(self) -> int:
        """How many swapped blocks currently hold an on-device copy (for tests and debugging)."""
        return sum(any(m.device_weight is not None for m in ms) for ms in self._linears.values())
