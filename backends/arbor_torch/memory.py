"""Device memory as the planner needs it: total and free bytes."""

from __future__ import annotations

import psutil
import torch

from arbor_core.backend import MemoryInfo


def memory_info(device: str) -> MemoryInfo:
    kind = torch.device(device).type
    if kind == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return MemoryInfo(total_bytes=int(total), free_bytes=int(free))
    if kind == "mps":
        total = int(torch.mps.recommended_max_memory())
        return MemoryInfo(total_bytes=total, free_bytes=max(0, total - int(torch.mps.driver_allocated_memory())))
    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=int(vm.total), free_bytes=int(vm.available))


def release_freed_heap() -> None:
    """Hand the C heap's freed pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Loading builds the runtime tensors through large transients (the checkpoint's pages, row blocks of
    the head dequantized): freed, glibc keeps them in the process, ~300 MiB of the default model's
    resident memory after a load (docs/performance.md, "Resident memory")."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc without malloc_trim: nothing to release
        pass
