"""What a run's numbers depend on besides its settings: the CPU (or GPU) and the numeric
code paths it took.

On a CPU the cold start's outcome depends on the BLAS kernels and ATen's vector kernels,
which are chosen per instruction set (AVX-512 on recent Intel Xeons, AVX2 on AMD Zen 3),
so the same seed can form a comparison on one box and not on another. ``describe()`` is
written into ``summary.json`` so two runs can be told apart, and ``python -m
r1reward.machine`` prints it. Both choices can be pinned before the process starts
(``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=AVX2``), which gives a second set of numerics on
one box; on an Intel box that did not reproduce an AMD box's run (docs/training_runs.md).
"""
from __future__ import annotations

import json
import os
import platform
import sys


def _cpuinfo() -> dict:
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "vendor_id") and key not in fields:
                    fields[key] = value.strip()
                if len(fields) == 2:
                    break
    except OSError:
        pass
    return fields


def describe() -> dict:
    """The machine and the numeric paths this process takes."""
    import torch
    info = _cpuinfo()
    out = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": info.get("vendor_id", ""),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_branch": os.environ.get("MKL_CBWR", "AUTO") if torch.backends.mkl.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def one_line(m: dict) -> str:
    """``describe()`` as a log line."""
    isa = f"ATen {m['aten_cpu_capability']}"
    if m.get("mkl_branch"):
        isa += f", MKL {m['mkl_branch']}"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cpu']} ({m['logical_cpus']} CPUs, {m['torch_threads']} threads; {isa}){gpu}"


if __name__ == "__main__":
    json.dump(describe(), sys.stdout, indent=1)
    print()
