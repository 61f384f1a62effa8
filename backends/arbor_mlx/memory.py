"""Device memory as the planner needs it: total and free bytes, from MLX where it knows them.

On Apple Silicon the GPU shares the machine's memory, and Metal recommends a working set (about
two thirds to three quarters of it) beyond which it starts paging: that is the total arbor
plans with, less what MLX already holds, and never more than the system has available. Where
MLX runs on the CPU (Linux, mlx[cpu]) it reports no memory figures: psutil's available RAM, as
the torch backend uses on CPU.
"""

from __future__ import annotations

import mlx.core as mx
import psutil

from arbor_core.backend import MemoryInfo


def metal_available() -> bool:
    return mx.metal.is_available()


def device_info() -> dict:
    info = getattr(mx, "device_info", None) or mx.metal.device_info  # mx.device_info from mlx 0.29
    return dict(info())


def active_memory() -> int:
    return int((getattr(mx, "get_active_memory", None) or mx.metal.get_active_memory)())


def peak_memory() -> int:
    return int((getattr(mx, "get_peak_memory", None) or mx.metal.get_peak_memory)())


def reset_peak_memory() -> None:
    (getattr(mx, "reset_peak_memory", None) or mx.metal.reset_peak_memory)()


def memory_info(device: str) -> MemoryInfo:
    vm = psutil.virtual_memory()
    if device == "gpu" and metal_available():
        info = device_info()
        total = int(info.get("max_recommended_working_set_size") or info.get("memory_size") or vm.total)
        free = min(total - active_memory(), int(vm.available))
        return MemoryInfo(total_bytes=total, free_bytes=max(0, free))
    return MemoryInfo(total_bytes=int(vm.total), free_bytes=int(vm.available))
