"""Measure what the planner predicts: the bytes of live tensor storage during a run, and their peak.

`TensorBytes` is a dispatch mode that sees every tensor an op returns (forward, backward, optimizer)
and counts each storage once, from its creation until it is freed: the allocator's view, without
the allocator's own slack. Tensors that already exist (weights, optimizer state) are registered with
`track`. Each storage is counted under the `part` set when it appeared; `peak_parts` splits the peak.
Kernel-internal scratch buffers are not seen (they are not returned by an op); the resident set
(bench/common.py) sees those too. With `count_meta`, storage on the meta device counts at the size the real
tensor would have: the planner runs real code on meta tensors (planning/vae.py).
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorBytes(TorchDispatchMode):
    def __init__(self, count_meta: bool = False) -> None:
        super().__init__()
        self.count_meta = count_meta
        self._live: dict[int, tuple[int, str]] = {}
        self._by_part: dict[str, int] = {}
        self.part = "activations"
        self.current = 0
        self.peak = 0
        self.peak_parts: dict[str, int] = {}

    def track(self, tensors: Iterable[torch.Tensor], part: str = "inputs") -> None:
        for t in tensors:
            self._add(t, part)

    def reset_peak(self) -> None:
        self.peak = self.current

    def raise_peak(self, nbytes: int) -> None:
        """A peak of `nbytes` above what is live now, seen elsewhere (a repeated call not run again)."""
        if self.current + nbytes > self.peak:
            self.peak = self.current + nbytes
            self.peak_parts = {**self._by_part, self.part: self._by_part.get(self.part, 0) + nbytes}

    def _add(self, t: torch.Tensor, part: str | None = None) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live or (storage.device.type == "meta" and not self.count_meta):
            return
        part = part or self.part
        nbytes = storage.nbytes()
        self._live[key] = (nbytes, part)
        self._count(nbytes, part)
        weakref.finalize(storage, self._free, key)

    def _count(self, nbytes: int, part: str) -> None:
        self._by_part[part] = self._by_part.get(part, 0) + nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_parts = dict(self._by_part)

    def _free(self, key: int) -> None:
        nbytes, part = self._live.pop(key, (0, ""))
        self._by_part[part] = self._by_part.get(part, 0) - nbytes
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out
