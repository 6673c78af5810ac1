"""Peak memory, two ways.

- `PeakMemory`: what `mechhi bench` reports, the process's own high-water mark over one
  stretch of work: on CUDA ``torch.cuda.max_memory_allocated`` (tensors, weights
  included), on CPU the peak resident set size. Linux lets a process reset its RSS
  high-water mark (writing 5 to ``/proc/self/clear_refs``), so the peak covers only the
  measured forward, not the imports or the model build before it; where that is not
  possible (macOS), it is the peak since the process started.
- `TensorBytes`: a deterministic count for tests. A dispatch mode sees every tensor an
  operation creates while it is active and follows its storage until it is freed, so
  ``peak`` is the largest number of bytes of those tensors alive at once, and
  ``live`` the bytes alive now. Tensors made before (the weights) are not counted, nor
  the scratch memory inside a fused kernel (SDPA's), which no operation returns.
"""

from __future__ import annotations

import gc
import resource
import sys
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


class PeakMemory:
    """``reset()`` then work then ``peak()``: the bytes at the high-water mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.kind = "cuda max allocated" if self.device.type == "cuda" else "peak RSS"
        self.since_start = False

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            self.since_start = True
            self.kind = "peak RSS since start"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if not self.since_start:
            return _status_bytes("VmHWM")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)

    def current(self) -> int:
        """What is held now (before a run: the weights and the runtime)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return 0 if self.since_start else _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{STATUS} has no {field}")


def available_bytes(device: torch.device) -> int:
    """Memory a new process could still take on ``device``."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


class TensorBytes(TorchDispatchMode):
    """Bytes of the tensors created under this mode that are alive (``live``) and at
    most (``peak``); ``marks`` records ``live`` at named points (`mark`).

    >>> with TensorBytes() as counted:
    ...     y = torch.ones(1000) * 2
    >>> counted.peak
    8000
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.marks: list[tuple[str, int]] = []
        self._sizes: dict[int, int] = {}  # storage address -> bytes, for storages alive

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and not value.is_meta and _address(value) not in inputs:
                self._follow(value.untyped_storage())  # new memory, not a view or an in-place result
        return out

    def _follow(self, storage: torch.UntypedStorage) -> None:
        address, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or address in self._sizes:
            return
        self._sizes[address] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, address, size)

    def _freed(self, address: int, size: int) -> None:
        if self._sizes.pop(address, None) is not None:
            self.live -= size

    def mark(self, name: str) -> None:
        self.marks.append((name, self.live))


def _address(tensor: torch.Tensor) -> int:
    return 0 if tensor.is_meta else tensor.untyped_storage().data_ptr()
