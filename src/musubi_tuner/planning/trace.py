"""A ledger of tensor memory over time: allocations, frees, and what was live at the peak.

The planner replays a training or sampling step as the sequence of tensors our code creates and
releases (see `dit_blocks`), at the sizes of the real model. The ledger keeps the running total
and, at the highest point, how it splits into named parts ("saved activations", "LoRA grads", ...).

A tensor stays alive while Python holds it or autograd has saved it for backward, as in PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Entry:
    nbytes: int
    part: str
    held: bool = True  # a Python reference exists
    saved: bool = False  # autograd keeps it for backward


class MemoryTrace:
    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._next = 0
        self._by_part: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.peak_where = ""
        self.where = ""  # what the step is doing now; recorded with the peak

    # ------------------------------------------------------------------------------ allocation
    def alloc(self, nbytes: int, part: str) -> int:
        """A new tensor of `nbytes`, held by Python. Returns its handle."""
        handle = self._next
        self._next += 1
        self._entries[handle] = _Entry(int(nbytes), part)
        self._add(part, int(nbytes))
        return handle

    def drop(self, *handles: int | None) -> None:
        """Python lets go of the tensors; each is freed unless autograd saved it."""
        for h in handles:
            if h is None or h not in self._entries:
                continue
            e = self._entries[h]
            e.held = False
            if not e.saved:
                self._free(h)

    def save(self, *handles: int | None, part: str | None = None) -> None:
        """Autograd keeps the tensors for backward (optionally counted under another part from now on)."""
        for h in handles:
            if h is None or h not in self._entries:
                continue
            e = self._entries[h]
            e.saved = True
            if part is not None and part != e.part:
                self._add(e.part, -e.nbytes)
                e.part = part
                self._add(part, e.nbytes)

    def unsave(self, *handles: int | None) -> None:
        """Backward has used the tensors; each is freed unless Python still holds it."""
        for h in handles:
            if h is None or h not in self._entries:
                continue
            e = self._entries[h]
            e.saved = False
            if not e.held:
                self._free(h)

    def is_live(self, handle: int | None) -> bool:
        return handle is not None and handle in self._entries

    def nbytes(self, handle: int) -> int:
        return self._entries[handle].nbytes

    def part_bytes(self, part: str) -> int:
        return self._by_part.get(part, 0)

    # ------------------------------------------------------------------------------ internals
    def _free(self, handle: int) -> None:
        e = self._entries.pop(handle)
        self._add(e.part, -e.nbytes)

    def _add(self, part: str, nbytes: int) -> None:
        self._by_part[part] = self._by_part.get(part, 0) + nbytes
        self.current += nbytes
        if nbytes > 0 and self.current > self.peak:
            self.peak = self.current
            self.peak_parts = {k: v for k, v in self._by_part.items() if v}
            self.peak_where = self.where
