"""Measure one method on one problem in this (fresh) process; print one ``BENCH_ROW`` line.

Run by ``bench.loss_bench``: ``python -m bench._worker '<json spec>'``. A fresh process per
method keeps CPU peak-RSS readings from mixing methods (freed memory, compile caches).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import torch

from r1reward import machine

from . import _measure as M
from ._inputs import Problem, make_inputs
from ._methods import MODES, Options, build, unavailable

ROW_PREFIX = "BENCH_ROW "


def _clear_grads(inp):
    inp["hidden"].grad = None
    inp["weight"].grad = None


def _grad_bytes(inp) -> int:
    return sum(t.grad.nbytes for t in (inp["hidden"], inp["weight"]) if t.grad is not None)


def measure(spec: dict) -> dict:
    p = Problem(**spec["problem"])
    method = spec["method"]
    repeats, warmup = int(spec.get("repeats", 1)), int(spec.get("warmup", 1))
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = torch.device(p.device)
    if "tf32" in spec and dev.type == "cuda":  # torch's switch, which our kernels follow too
        set_tf32(bool(spec["tf32"]))
    row = {"method": method, "mode": MODES.get(method), "status": "ok", **_context(dev)}
    why = unavailable(method, dev)
    if why:
        row["status"] = why
        return row
    inp = make_inputs(p, spec.get("cache_dir"))
    row.update(inp["info"])
    forward, step = build(method, inp, Options(compile=spec.get("compile", True)))

    # Without a resettable high-water mark only the first call can be measured on CPU.
    first_call_mem = dev.type == "cpu" and not M.can_reset_peak()

    def run(fn, with_mem):
        """``(wall s, cpu s, peak extra bytes or None, grad bytes, resident grad bytes)``."""
        _clear_grads(inp)
        t = {}

        def call():
            t["s"] = M.timed_call(fn, dev)
        if with_mem:
            peak = M.peak_extra_bytes(call, dev)
        else:
            call()
            peak = None
        nbytes = _grad_bytes(inp)
        resident = nbytes
        if dev.type == "cpu":
            # A filtered weight gradient is mostly never-touched zero pages: what it holds
            # in RAM is what freeing it gives back (freed big buffers leave the RSS here).
            before = M.current_rss()
            _clear_grads(inp)
            resident = min(nbytes, max(0, before - M.current_rss()))
        return (*t["s"], peak, nbytes, resident)

    first = [run(step, first_call_mem) for _ in range(warmup)]
    # Forward-only timing is optional (the CPU sweep skips it: only fwd+bwd is compared).
    fwd = ([run(forward, not first_call_mem) for _ in range(repeats)]
           if spec.get("time_forward", True) else [])
    steps = [run(step, not first_call_mem) for _ in range(repeats)]
    _clear_grads(inp)
    mem_runs = first[:1] if first_call_mem else steps
    peaks = [r[2] for r in mem_runs if r[2] is not None]
    fwd_peaks = [r[2] for r in fwd if r[2] is not None]
    grad_b = steps[-1][3]
    grad_resident = mem_runs[-1][4] if mem_runs else grad_b
    row.update({
        "fwd_s": M.median([r[0] for r in fwd]) if fwd else None, "fwdbwd_s": M.median([r[0] for r in steps]),
        "fwd_cpu_s": _median_or_none([r[1] for r in fwd]) if fwd else None,
        "fwdbwd_cpu_s": _median_or_none([r[1] for r in steps]),
        "fwd_peak_mb": max(fwd_peaks) / M.MB if fwd_peaks else None,
        "peak_mb": max(peaks) / M.MB if peaks else None,
        "grad_mb": grad_b / M.MB,
        "grad_resident_mb": grad_resident / M.MB,
        "logit_mb": (max(peaks) - grad_resident) / M.MB if peaks else None,
        "mem_source": "first-call" if first_call_mem else (
            "cuda-allocator" if dev.type == "cuda" else "rss-hwm"),
        "load1": os.getloadavg()[0],  # other jobs on the machine make timings noisy
    })
    if method.startswith("r1reward-torch") and dev.type == "cpu":
        from r1reward.kernels import cpu_blas, whole_batch
        engines = sorted(set(cpu_blas._memo.values())) + (["whole"] if whole_batch.calls else [])
        row["cpu_blas"] = ",".join(engines) or cpu_blas.setting()
    return row


def set_tf32(on: bool) -> None:
    """TF32 for fp32 CUDA matmuls, through the API this torch has (≥ 2.9: fp32_precision)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        m.fp32_precision = "tf32" if on else "ieee"
    else:
        m.allow_tf32 = on


def _median_or_none(xs):
    return None if any(x is None for x in xs) else M.median(xs)


def _context(dev: torch.device) -> dict:
    """Where the row was measured: device, threads, ATen's instruction set on a CPU, and
    the checkout's code version."""
    if dev.type == "cuda":
        return {"device_name": torch.cuda.get_device_name(dev), "threads": torch.get_num_threads(),
                "git": _git_version()}
    m = machine.describe()
    return {"device_name": f"CPU {m['cpu']}", "threads": m["torch_threads"],
            "cpu_isa": m["aten_cpu_capability"], "git": _git_version()}


def _git_version() -> str | None:
    """Commit of the checkout, ``+dirty`` if kernels/ or bench/ have uncommitted edits
    (the kernels change under a running benchmark when others commit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                             capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "bench"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty.strip() else "")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench._worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    try:
        row = measure(spec)
    except Exception as e:  # noqa: BLE001 - report the failure as the row's status
        traceback.print_exc()
        row = {"method": spec.get("method"), "mode": MODES.get(spec.get("method")),
               "status": f"error: {type(e).__name__}: {e}"[:400]}
    print(ROW_PREFIX + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
