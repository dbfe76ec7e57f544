"""Measure one method on one problem in this (fresh) process; print one ``BENCH_ROW`` line.

Run by ``bench.loss_bench``: ``python -m bench._worker '<json spec>'``. A fresh process per
method keeps CPU peak-RSS readings from mixing methods (freed memory, compile caches).
"""
from __future__ import annotations

import json
import sys
import traceback

import torch

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
    row = {"method": method, "mode": MODES.get(method), "status": "ok"}
    why = unavailable(method, dev)
    if why:
        row["status"] = why
        return row
    inp = make_inputs(p, spec.get("cache_dir"))
    row.update(inp["info"])
    forward, step = build(method, inp, Options(compile=spec.get("compile", True)))

    # Without a resettable high-water mark only the first call can be measured on CPU.
    first_call_mem = dev.type == "cpu" and not M.can_reset_peak()
    fwd_peaks, step_peaks, grad_bytes = [], [], 0
    for i in range(warmup):
        _clear_grads(inp)
        if first_call_mem and i == 0:
            step_peaks.append(M.peak_extra_bytes(step, dev))
            grad_bytes = _grad_bytes(inp)
        else:
            step()

    def run(fn):
        """(seconds, peak extra bytes or None) of one call, measured together."""
        _clear_grads(inp)
        if first_call_mem:
            return M.timed_call(fn, dev), None
        t = {}
        peak = M.peak_extra_bytes(lambda: t.setdefault("s", M.timed_call(fn, dev)), dev)
        return t["s"], peak

    fwd_s, step_s = [], []
    for _ in range(repeats):
        s, peak = run(forward)  # the loss (and its graph) is dropped when forward returns
        fwd_s.append(s)
        if peak is not None:
            fwd_peaks.append(peak)
    for _ in range(repeats):
        s, peak = run(step)
        step_s.append(s)
        if peak is not None:
            step_peaks.append(peak)
            grad_bytes = _grad_bytes(inp)
    _clear_grads(inp)
    peak_b = max(step_peaks) if step_peaks else None
    row.update({
        "fwd_s": M.median(fwd_s), "fwdbwd_s": M.median(step_s),
        "fwd_peak_mb": max(fwd_peaks) / M.MB if fwd_peaks else None,
        "peak_mb": None if peak_b is None else peak_b / M.MB,
        "grad_mb": grad_bytes / M.MB,
        "logit_mb": None if peak_b is None else (peak_b - grad_bytes) / M.MB,
        "mem_source": "first-call" if first_call_mem else (
            "cuda-allocator" if dev.type == "cuda" else "rss-hwm"),
    })
    return row


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
