"""Static device inputs of CUDA graphs and the pinned host memory they are filled from.

Every staged input has two pinned host twins, used in turn: with steps launched one ahead,
step N's copy may still be queued while step N+1's inputs are written.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cluster.engine.host_tensor import NUMPY

ALIGN = 16  # bytes: every field of a StagingBuffer starts at a multiple (any dtype's view)


class Staged:
    """One static device input and its host twins; one copy per send."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device, fill: int = 0):
        self.dev = torch.full(shape, fill, dtype=dtype, device=device)
        self.host = torch.full((2, *shape), fill, dtype=dtype, pin_memory=True)

    def send(self, flip: int, rows: int) -> None:
        # not a blocking copy: that would wait for the step still running on the GPU
        self.dev[:rows].copy_(self.host[flip, :rows], non_blocking=True)


class StagingBuffer:
    """Several static inputs laid out in one device buffer, written on the host through
    numpy views of one pinned buffer and sent in one copy. A decode step had written five
    host tensors through torch (several us of dispatch each) and queued five copies; here
    the writes are numpy stores and the step queues one copy of the prefix it uses.

    fields: name -> (shape, dtype, fill), in layout order; put the field whose rows a step
    uses only in part last, so `send(flip, upto=that field's end row)` copies no more."""

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype, float]], device):
        self._at: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        size = 0
        for name, (shape, dtype, _) in fields.items():
            self._at[name] = (size, shape, dtype)
            size += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        self.nbytes = size
        self._dev = torch.zeros(size, dtype=torch.uint8, device=device)
        self._host = torch.zeros((2, size), dtype=torch.uint8,
                                 pin_memory=torch.device(device).type == "cuda")
        host = self._host.numpy()  # shares the pinned memory
        self.dev: dict[str, torch.Tensor] = {}
        self.host: list[dict[str, np.ndarray]] = [{}, {}]
        for name, (off, shape, dtype) in self._at.items():
            n = math.prod(shape) * dtype.itemsize
            self.dev[name] = self._dev[off : off + n].view(dtype).view(shape)
            for f in (0, 1):
                self.host[f][name] = host[f, off : off + n].view(NUMPY[dtype]).reshape(shape)
                self.host[f][name][...] = fields[name][2]
        self._dev.copy_(self._host[0])

    def end(self, name: str, rows: int) -> int:
        """The byte offset just past `rows` rows of a field."""
        off, shape, dtype = self._at[name]
        return off + rows * math.prod(shape[1:]) * dtype.itemsize

    def send(self, flip: int, upto: int) -> None:
        """Copies bytes [0, upto) of host twin `flip` to the device, without waiting."""
        self._dev[:upto].copy_(self._host[flip, :upto], non_blocking=True)
