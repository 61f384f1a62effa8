"""Device memory as the planner needs it: total and free bytes."""

from __future__ import annotations

import psutil
import torch

from arbor_cli.backend import MemoryInfo


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
