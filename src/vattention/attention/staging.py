"""StepStaging: a step's host-built index arrays reach the device in one copy per dtype.

    begin()              next of two pinned host buffers (alternating by step)
    add(values, dtype)   -> a view of the persistent device buffer where `values` will land
    commit()             host buffer [0, used) ─one non-blocking copy─> device buffer [0, used)

The views exist before the copy does; the caller commits before launching any kernel that reads
them, and the copy runs first on the stream. Two host buffers: while the device may still be
copying step N's inputs the host writes step N+1's into the other one, and before reusing a
buffer (step N+2) begin() waits on the event recorded after its copy, which the engine's
one-step-deep pipeline has always passed by then. One device buffer: step N+1's copy is ordered
after step N's kernels on the stream. On CPU the "device" buffer is the host buffer itself.

A step whose arrays do not fit the capacity gets ordinary copies for the overflow (correct, just
not persistent); the capacity is sized from the engine's per-step limits so that this is rare.
"""

from __future__ import annotations

import numpy as np
import torch

DTYPES = (torch.int64, torch.int32)


class StepStaging:
    def __init__(self, device: torch.device, capacity: int):
        self.device = device
        self.capacity = capacity  # elements per dtype
        pinned = device.type == "cuda"
        self._host = [{d: torch.empty(capacity, dtype=d, pin_memory=pinned) for d in DTYPES}
                      for _ in range(2 if pinned else 1)]
        self._numpy = [{d: t.numpy() for d, t in bufs.items()} for bufs in self._host]
        self._device = ({d: torch.empty(capacity, dtype=d, device=device) for d in DTYPES} if pinned
                        else self._host[0])
        self._events = [None] * len(self._host)  # the copy out of each host buffer
        self._set = 0
        self._used = dict.fromkeys(DTYPES, 0)

    def begin(self) -> None:
        self._set = (self._set + 1) % len(self._host)
        if self._events[self._set] is not None:
            self._events[self._set].synchronize()  # already done in the pipeline; cheap insurance
        self._used = dict.fromkeys(DTYPES, 0)

    def add(self, values, dtype: torch.dtype) -> torch.Tensor:
        """A device tensor that will hold `values` (a list, or a numpy array of any shape) after
        commit()."""
        shape = np.shape(values)
        flat = np.ravel(values)
        n = len(flat)
        start = self._used[dtype]
        if start + n > self.capacity:
            return to_device(values, dtype, self.device)
        self._numpy[self._set][dtype][start:start + n] = flat
        self._used[dtype] = start + n
        return self._device[dtype][start:start + n].view(shape)

    def commit(self) -> None:
        if self.device.type != "cuda":
            return
        host = self._host[self._set]
        for dtype, used in self._used.items():
            if used:
                self._device[dtype][:used].copy_(host[dtype][:used], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[self._set] = event


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without waiting for the device: on CUDA through pinned
    memory (a copy from pageable memory, or torch.tensor(..., device=cuda), synchronizes)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
