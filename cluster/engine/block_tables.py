"""Every live sequence's block table kept as a row of one int32 array, written as blocks are
appended, so a step's padded [rows, width] table is one numpy gather.

A table only grows by appends (or is freed whole), yet it was rebuilt from the sequences'
lists every step: at 1,000 running sequences on an H200 host that rebuild was 22% of the
offline engine loop's host time. The lists stay (the scheduler, the prefix cache and the
tiers read them); this array mirrors them.
"""

from __future__ import annotations

import numpy as np


class TableRows:
    def __init__(self, rows: int = 64, width: int = 16):
        self.array = np.zeros((rows, width), dtype=np.int32)
        self.free_rows = list(range(rows - 1, -1, -1))

    def take(self) -> int:
        """A row for a sequence that gets its first block (all zeros)."""
        if not self.free_rows:
            rows, width = self.array.shape
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self.free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self.free_rows.pop()

    def put(self, row: int, index: int, block: int) -> None:
        if index >= self.array.shape[1]:
            grown = np.zeros((self.array.shape[0], max(2 * self.array.shape[1], index + 1)),
                             dtype=np.int32)
            grown[:, : self.array.shape[1]] = self.array
            self.array = grown
        self.array[row, index] = block

    def release(self, row: int, length: int) -> None:
        """The row goes back, zeroed: padding past a table's end reads as block 0."""
        self.array[row, :length] = 0
        self.free_rows.append(row)

    def gather(self, rows: list[int], width: int) -> np.ndarray:
        """The tables of `rows` as one [len(rows), width] array (a copy)."""
        return self.array[np.asarray(rows, dtype=np.intp), :width]
