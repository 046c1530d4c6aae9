"""Block swap's CUDA stream ordering, checked on the CPU with a fake `torch.cuda` that records every call.

On a GPU the copies run on a side stream while the compute stream works; what makes that correct is the
order of the calls: each copy is queued on the side stream behind the compute already queued, the compute
stream waits on the copy's event before the block uses it, the copy's memory is recorded as in use by the
compute stream, the next block's copy is queued before the current block computes (that is the overlap),
and the host waits for the GPU before it allocates a third copy. The GPU tests (tests/gpu) check the
numbers and the timing; these check the order, so that a GPU run finds numeric problems, not typos.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode

from helpers import dit_inputs
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.hunyuan.offload import BlockSwap, CopyStream

CONFIG = tiny_dit_config(mm_double_blocks_depth=3, mm_single_blocks_depth=4)


class FakeStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: "FakeEvent") -> None:
        self.log.append(("wait_event", self.name, event.id))


class FakeEvent:
    def __init__(self, cuda: "FakeCuda"):
        self.cuda = cuda
        self.id = len(cuda.events)
        cuda.events.append(self)

    def record(self, stream: FakeStream) -> None:
        self.cuda.log.append(("record", stream.name, self.id))

    def synchronize(self) -> None:
        self.cuda.log.append(("host_waits", self.id))


class FakeCuda:
    """The part of torch.cuda that CopyStream calls; `current` is the stream work is queued on now."""

    def __init__(self):
        self.log: list[tuple] = []
        self.events: list[FakeEvent] = []
        self.current = FakeStream("compute", self.log)

    def Stream(self, device):  # noqa: N802 (torch.cuda's name)
        return FakeStream("side", self.log)

    def Event(self):  # noqa: N802
        return FakeEvent(self)

    def current_stream(self, device=None) -> FakeStream:
        return self.current

    @contextmanager
    def stream(self, s: FakeStream):
        outer, self.current = self.current, s
        try:
            yield
        finally:
            self.current = outer


class CopyLog(TorchFunctionMode):
    """Logs each host -> device copy (`Tensor.to(..., non_blocking=True)`) of a swapped weight with the stream it is queued on."""

    def __init__(self, cuda: FakeCuda, key_of: dict[int, tuple]):
        super().__init__()
        self.cuda, self.key_of = cuda, key_of

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.to and kwargs.get("non_blocking") and id(args[0]) in self.key_of:
            key = self.key_of[id(args[0])]
            self.cuda.log.append(("copy", key, self.cuda.current.name))
            self.key_of[id(out)] = key  # so that record_stream on the copy names its block
        return out


def swapped_model(monkeypatch, blocks_to_swap=3):
    """A tiny DiT whose block swap runs its stream path against a FakeCuda; the log records blocks and copies too."""
    model = HunyuanVideoDiT(CONFIG)
    model.load_state_dict(random_dit_state_dict(CONFIG, seed=3, scale=0.05))
    model.requires_grad_(False)
    cuda = FakeCuda()
    swap = BlockSwap(model, blocks_to_swap, "cpu", copy_stream=CopyStream(torch.device("cpu"), cuda=cuda))
    key_of = {id(m.weight): key for key, linears in swap._linears.items() for m in linears}
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, stream: cuda.log.append(("record_stream", key_of.get(id(t)), stream.name)))
    for kind, blocks in (("double", model.double_blocks), ("single", model.single_blocks)):
        for i, block in enumerate(blocks):
            if (kind, i) in swap._linears:
                block.register_forward_pre_hook(lambda m, a, key=(kind, i): cuda.log.append(
                    ("compute", key, cuda.current.name, all(lin.device_weight is not None for lin in swap._linears[key]))))
                block.register_forward_hook(lambda m, a, o, key=(kind, i): cuda.log.append(("block_end", key)))
    return model, swap, cuda, CopyLog(cuda, key_of)


def check_schedule(log: list[tuple], phases: list[list[tuple]]) -> None:
    """The ordering rules of a side-stream copy schedule; `phases` are the swapped blocks in the order each pass
    (a forward, a backward's recomputations) runs them. A pass's first block cannot have been prefetched."""
    copies: dict = {}  # key -> [(log index of its copy, the event recorded on the side stream after it)]
    last_copy = None
    for i, entry in enumerate(log):
        if entry[0] != "copy":
            continue
        _, key, stream = entry
        assert stream == "side", f"{key} copied on the {stream} stream"
        if last_copy is None or log[last_copy][1] != key:  # a block's copies follow one wait_stream
            since = log[(last_copy or -1) + 1 : i]
            assert ("wait_stream", "side", "compute") in since, f"{key} copied without waiting for the compute stream"
            record = next(e for e in log[i:] if e[0] == "record")
            assert record[1] == "side"
            copies.setdefault(key, []).append((i, record[2]))
        last_copy = i

    position = 0
    for order in phases:
        previous_compute = None
        for key in order:
            compute = next(i for i in range(position, len(log)) if log[i][0] == "compute" and log[i][1] == key)
            _, _, stream, fetched = log[compute]
            assert stream == "compute" and fetched, f"{key} computed on the {stream} stream, copies in place: {fetched}"
            copied_at, event = max(c for c in copies[key] if c[0] < compute)
            waits = [i for i in range(copied_at, compute) if log[i] == ("wait_event", "compute", event)]
            assert waits, f"{key} computed before the compute stream waited for its copy"
            assert ("record_stream", key, "compute") in log[copied_at:compute]
            if previous_compute is not None:  # queued before the block before it computed: the two overlap
                assert copied_at < previous_compute, f"{key} was not prefetched"
            previous_compute = position = compute

    # at most two copies on the device: a copy is released once the host has waited on an event recorded on the
    # compute stream after its block ended
    marks: dict = {}  # event id -> the blocks that had ended when it was recorded
    ended: list = []
    live: list = []
    for entry in log:
        if entry[0] == "block_end":
            ended.append(entry[1])
        elif entry[0] == "record" and entry[1] == "compute":
            marks[entry[2]] = list(ended)
        elif entry[0] == "host_waits" and entry[1] in marks:
            live = [k for k in live if k not in marks[entry[1]]]
        elif entry[0] == "copy" and (not live or live[-1] != entry[1]):
            live.append(entry[1])
            assert len(live) <= 2, f"copies of {live} would all be on the device"


def test_forward_copies_each_block_on_the_side_stream_ahead_of_its_compute(monkeypatch):
    model, swap, cuda, copy_log = swapped_model(monkeypatch)
    assert swap.swapped == [("double", 2), ("single", 1), ("single", 2), ("single", 3)]
    x, t, text, mask, pooled, guidance = dit_inputs(CONFIG)
    with torch.no_grad(), copy_log:
        model(x, t, text, mask, pooled, guidance)
        model(x, t, text, mask, pooled, guidance)  # a second call (the next denoising step) starts the same way
    check_schedule(cuda.log, [swap.swapped, swap.swapped])
    assert swap.resident_copies() == 0
    assert sum(e[0] == "host_waits" for e in cuda.log) >= 2 * len(swap.swapped) - 2


def test_checkpointed_backward_prefetches_in_reverse_order(monkeypatch):
    model, swap, cuda, copy_log = swapped_model(monkeypatch)
    model.enable_gradient_checkpointing()
    model.train()
    x, t, text, mask, pooled, guidance = dit_inputs(CONFIG)
    x.requires_grad_(True)
    with copy_log:
        model(x, t, text, mask, pooled, guidance).square().mean().backward()
    check_schedule(cuda.log, [swap.swapped, swap.swapped[::-1]])
    assert x.grad is not None and swap.resident_copies() == 0


def test_the_check_catches_a_block_that_computes_before_its_copy_arrives(monkeypatch):
    model, swap, cuda, copy_log = swapped_model(monkeypatch)
    monkeypatch.setattr(swap, "_wait", lambda key: None)  # forget to make the compute stream wait
    x, *rest = dit_inputs(CONFIG)
    with torch.no_grad(), copy_log:
        model(x, *rest)
    with pytest.raises(AssertionError, match="before the compute stream waited"):
        check_schedule(cuda.log, [swap.swapped])


def test_the_check_catches_copies_that_pile_up_on_the_device(monkeypatch):
    model, swap, cuda, copy_log = swapped_model(monkeypatch)
    monkeypatch.setattr(swap, "_last_block_done", None)
    monkeypatch.setattr(swap._copies, "mark", lambda: None)  # the host never waits for the GPU
    x, *rest = dit_inputs(CONFIG)
    with torch.no_grad(), copy_log:
        model(x, *rest)
    with pytest.raises(AssertionError, match="would all be on the device"):
        check_schedule(cuda.log, [swap.swapped])


def test_a_swap_past_the_models_blocks_names_the_range_zero_included():
    """fuzz_al 5: generation said "between 1 and N" where 0 (none) is accepted, and the planner "0 and N"."""
    from musubi_tuner.errors import UserError

    with pytest.raises(UserError, match=r"^--blocks_to_swap 10: must be between 0 and 5 for this model \(0 swaps none\)$"):
        BlockSwap(HunyuanVideoDiT(CONFIG), 10, "cpu")
