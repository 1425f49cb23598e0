"""Where a model's file sits in this process's memory: one mapped range of it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    """One mmap of a file in this process: addresses [start, end) show file bytes from `offset`."""

    start: int
    end: int
    offset: int

    def address(self, file_offset: int) -> int:
        return self.start + file_offset - self.offset
