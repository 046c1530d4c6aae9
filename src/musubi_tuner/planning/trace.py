"""A ledger of tensor memory over time: allocations, frees, and what was live at the peak.

The VAE and the text encoders (`planning/vae.py`, `encoders.py`) run without autograd: their stages are
replayed as the tensors the code creates and frees, at the real sizes. The ledger keeps the running total
and, at the highest point, how it splits into named parts. (The DiT is traced instead: `dit_trace.py`.)
"""

from __future__ import annotations


class MemoryTrace:
    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, str]] = {}
        self._next = 0
        self._by_part: dict[str, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.peak_where = ""
        self.where = ""  # what the stage is doing now; recorded with the peak

    def alloc(self, nbytes: int, part: str) -> int:
        """A new tensor of `nbytes`. Returns its handle."""
        handle = self._next
        self._next += 1
        self._entries[handle] = (int(nbytes), part)
        self._add(part, int(nbytes))
        return handle

    def drop(self, *handles: int | None) -> None:
        """Free the tensors (a handle already freed, or None, is ignored)."""
        for h in handles:
            if h is not None and h in self._entries:
                nbytes, part = self._entries.pop(h)
                self._add(part, -nbytes)

    def _add(self, part: str, nbytes: int) -> None:
        self._by_part[part] = self._by_part.get(part, 0) + nbytes
        self.current += nbytes
        if nbytes > 0 and self.current > self.peak:
            self.peak = self.current
            self.peak_parts = {k: v for k, v in self._by_part.items() if v}
            self.peak_where = self.where
