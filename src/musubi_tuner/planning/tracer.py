"""Measure real modules without running them: PyTorch's MemTracker over fake (or meta) tensors, cut into segments.

`trace(run, external, marks)` runs `run` under `torch.distributed._tools.mem_tracker.MemTracker`: every tensor an
op returns is counted from its creation until its storage is freed, in parts (weights, activations, gradients,
backward temporaries, inputs). The models are built on fake tensors (`fake_module`), so the real forward and
backward run at full size with no memory and no arithmetic. The trace is cut at the start of every forward and
backward of the `marks` modules; each `Segment` keeps the parts at its start, at its highest point and at its end.

`compose(segments, repeats)` puts segments back in order, a segment repeated as often as `repeats` says, each
repetition starting where the previous one ended: identical blocks leave identical traces, so a model of 60
blocks is composed from a trace of five.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from musubi_tuner.errors import UserError
from musubi_tuner.files import atomic_write

PARTS = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients", "Activation": "activations",
         "Temp": "backward temporaries", "Optstate": "optimizer state", "Other": "inputs"}
Parts = dict[str, int]


def add(a: Parts, b: Parts, sign: int = 1) -> Parts:
    return {k: a.get(k, 0) + sign * b.get(k, 0) for k in {*a, *b}}


@dataclass(frozen=True)
class Segment:
    label: str  # "forward double_blocks.1", "backward single_blocks.0", "start", or a label given to mark()
    start: Parts
    top: Parts  # at the segment's highest total
    end: Parts

    @property
    def rise(self) -> Parts:
        return add(self.top, self.start, -1)

    @property
    def change(self) -> Parts:
        return add(self.end, self.start, -1)


@dataclass
class Peak:
    total: int = 0
    parts: Parts = field(default_factory=dict)
    where: str = ""
    end: Parts = field(default_factory=dict)  # what is left when the last segment ends

    def consider(self, parts: Parts, where: str) -> None:
        total = sum(parts.values())
        if total > self.total:
            self.total, self.parts, self.where = total, {k: v for k, v in parts.items() if v}, where


class _NoHook:
    def remove(self) -> None:
        pass


@functools.cache
def _tracker_class() -> type:
    """MemTracker imports torch.distributed (seconds): only when a trace runs, not when a cached one is read."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _Tracker(MemTracker):
        """MemTracker that takes frozen weights, lets a root module run more than once and cuts the trace into segments."""

        def __init__(self, marks: dict[nn.Module, str]):
            super().__init__()
            self.marks = marks
            self.segments: list[Segment] = []
            self._label, self._start, self._top = "start", {}, {}

        def now(self) -> Parts:
            out: Parts = {}
            for snap in self._curr_mem_snap.values():
                for kind, nbytes in snap.items():
                    if kind != "Total":
                        name = PARTS[kind.value]
                        out[name] = out.get(name, 0) + nbytes
            return out

        def mark(self, label: str) -> None:
            now = self.now()
            self.segments.append(Segment(self._label, self._start, self._top or self._start, now))
            self._label, self._start, self._top = label, now, now

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():  # a frozen weight has no gradient to hook
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _pre_fw_hook(self, module, inputs) -> None:
            if not self._mod_tracker.is_bw:
                self.memory_tracking.pop(module, None)  # a second call (--split_uncond) is a call, not a new iteration
                if module in self.marks:
                    self.mark("forward " + self.marks[module])
            super()._pre_fw_hook(module, inputs)

        def _pre_bw_hook(self, module, args) -> None:
            if module in self.marks:
                self.mark("backward " + self.marks[module])
            super()._pre_bw_hook(module, args)

        def _update_peak_stats(self, peak_state) -> None:  # after every op: only the running segment's top is kept
            now = self.now()
            if sum(now.values()) > sum(self._top.values()):
                self._top = now

    return _Tracker


def fake_module(module: nn.Module, mode: FakeTensorMode, device: str = "cpu") -> nn.Module:
    """A module built on the meta device, given fake storage on `device` (no memory is used)."""
    with mode:
        return module.to_empty(device=device)


def trace(run: Callable[[Callable[[str], None]], None], external: list, marks: dict[nn.Module, str]) -> list[Segment]:
    """Segments of `run(mark)`; `external` are the modules and tensors that exist before it (their parts count
    from the start); `mark(label)` starts a segment of that name."""
    tracker = _tracker_class()(marks)
    tracker.track_external(*external)
    with tracker:
        run(tracker.mark)
        tracker.mark("end")
    return tracker.segments


def compose(segments: list[Segment], repeats: dict[str, int] | None = None,
            adjust: Callable[[str, int], tuple[Parts, Parts]] | None = None, static: Parts | None = None) -> Peak:
    """The highest point of `segments` run in order, segment `label` `repeats[label]` times (default once).

    `adjust(label, i)`, for the i-th run of a segment, returns (parts added at its top, parts it leaves behind):
    what the trace cannot see. `static` is present throughout (weights of blocks that were not traced)."""
    repeats = repeats or {}
    level = add(segments[0].start, static or {})
    peak = Peak()
    peak.consider(level, segments[0].label)
    for seg in segments:
        for i in range(repeats.get(seg.label, 1)):
            at_top, left = adjust(seg.label, i) if adjust else ({}, {})
            peak.consider(add(add(level, seg.rise), at_top), seg.label)
            level = add(add(level, seg.change), left)
    peak.end = level
    return peak


def on_disk(key: object, sources: Iterable[Path], compute: Callable[[], Any], load: Callable[[dict], Any]) -> Any:
    """`compute()` (a dataclass), kept in $XDG_CACHE_HOME/musubi_tuner/plan_traces under a digest of `key`, torch's
    version and the bytes of the `sources` files (the traced modules and the code that runs them: a changed model is
    traced anew) and of this file (the tracing itself); `load` rebuilds it from its JSON. A trace at full size takes
    seconds and a budget search needs several."""
    digest = hashlib.sha256(repr((key, torch.__version__)).encode())
    for f in sorted({Path(__file__), *map(Path, sources)}):
        digest.update(f.read_bytes())
    try:  # (no home folder: HOME unset and a UID without a passwd entry, as in some containers: no cache)
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:
        return compute()
    path = root / "musubi_tuner" / "plan_traces" / f"{digest.hexdigest()[:32]}.json"
    try:
        return load(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: trace again
        pass
    value = compute()
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(value)))
    except (OSError, UserError):  # a cache that cannot be written is only slower
        pass
    return value
