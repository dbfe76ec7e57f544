"""Timing and peak-memory probes (CUDA events / allocator stats on GPU, RSS on CPU).

On CPU the peak of one call is read from the kernel's high-water mark: writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM`` (and ``ru_maxrss``) to the current RSS, so a
warmed-up process can measure a single call without the warm-up's (or compilation's)
peak leaking in. Where that reset is not allowed, only the first call of a fresh process
can be measured; :func:`can_reset_peak` tells which. Free heap pages are handed back to
the kernel first, so memory an earlier call freed counts again when a call reuses it.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024.0 * 1024.0


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss() -> int:
    """High-water RSS since start (or since the last :func:`reset_peak_rss`), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _release_free_heap() -> None:
    """Hand glibc's free heap pages back to the kernel (``malloc_trim``), so a call that
    reuses memory an earlier call freed faults its pages in again and shows in the RSS."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory may stay resident and hide part of a call's peak


def reset_peak_rss() -> bool:
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def can_reset_peak() -> bool:
    return reset_peak_rss()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """``(wall seconds, CPU seconds of this process or None on GPU)`` of one call of ``fn``.

    GPU: CUDA events, so queued kernels are counted. CPU: the process CPU time is given
    too because on a shared machine it is far less disturbed by other jobs than wall time.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, None
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn`` needs above what is allocated when it starts, in bytes.

    Whatever ``fn`` leaves allocated (e.g. ``.grad`` tensors) counts: callers subtract it.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    reset_peak_rss()
    base = current_rss()
    fn()
    return max(0, peak_rss() - base)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))
