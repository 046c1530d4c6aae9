"""Measure what the planner predicts: the bytes of live tensor storage during a run, and their peak.

`TensorBytes` is a dispatch mode that sees every tensor an op returns (forward, backward, optimizer)
and counts each storage once, from its creation until it is freed: the allocator's view, without
the allocator's own slack. Tensors that already exist (weights, optimizer state) are registered with
`track`. Kernel-internal scratch buffers are not seen (they are not returned by an op); the resident
set (bench/common.py) sees those too.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live or storage.device.type == "meta":
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out
