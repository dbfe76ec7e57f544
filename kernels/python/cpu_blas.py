"""CPU GEMM engine for the chunked backend, chosen by measuring on the running machine.

Two engines compute the per-chunk GEMMs (logits ``[C, H]·[H, V]`` and ∂h ``[C, V]·[V, H]``):

* ``"torch"``: ``torch.mm`` (the torch wheel's BLAS: MKL on x86);
* ``"numpy"``: ``np.matmul`` on zero-copy views (the BLAS numpy's wheels bundle, OpenBLAS),
  run on torch's thread count through threadpoolctl.

∂W always accumulates in place with ``torch.addmm_`` (numpy cannot accumulate into an
output), so the two engines are timed as the whole sequence of three GEMMs a chunk runs;
that also counts the cost of two thread pools taking turns on the cores.

Which one is faster depends on the CPU and the shape (MKL won on the Intel Xeon box, numpy's
OpenBLAS on the AMD EPYC one; figures in docs/kernels_cpu.md), so neither is assumed: the
first call of a shape class measures both on a vocabulary slice and stores the winner in
``<cache root>/cpu_blas.json`` under a key naming this machine. ``R1REWARD_CPU_BLAS=torch``
or ``=numpy`` forces one (no measurement); ``auto`` (the default) measures.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

ENGINES = ("torch", "numpy")
ENV = "R1REWARD_CPU_BLAS"
CACHE_FILE = "cpu_blas.json"
# Below this many multiply-adds per chunk GEMM the call overheads dominate: no measurement.
MIN_MACS = 1 << 26
# The probe GEMMs use a vocabulary slice of up to this many multiply-adds (~25 ms each at
# 200 GFLOP/s): large enough that the weight slice outgrows the caches, as the real one does.
PROBE_MACS = 1 << 31
# The probe runs inside the first call, so its buffers (weight slice, its gradient, the
# logits) stay within that call's extra-memory budget.
PROBE_BYTES = 48 << 20
PROBE_ROUNDS = 5  # interleaved rounds per engine; the minimum is kept (noisy shared boxes)
# numpy must beat torch by this factor to be chosen: a coin-flip on a noisy box should not
# stick (the choice is cached) and torch.mm needs no second thread pool.
NUMPY_MARGIN = 0.9
PROBE_VERSION = 3  # part of the cache key: a changed probe re-measures

_memo: dict[tuple, str] = {}  # (shape class, threads) -> engine, for this process
_blas_ctl = None  # threadpoolctl controller of numpy's BLAS (None: not probed; False: absent)


def setting() -> str:
    """``auto``, ``torch`` or ``numpy`` from the environment (read on every call)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", *ENGINES):
        raise ValueError(f"{ENV}={value!r}: expected auto, torch or numpy")
    return value


def engine(hidden: int, vocab: int, rows: int) -> str:
    """Engine for chunk GEMMs of ``rows × hidden × vocab`` (measured once per shape class)."""
    forced = setting()
    if forced != "auto":
        return forced
    if rows * hidden * vocab < MIN_MACS:
        return "torch"
    key = shape_class(hidden, vocab, rows)
    memo_key = (key, torch.get_num_threads())  # a changed thread count is another machine key
    if memo_key not in _memo:
        _memo[memo_key] = _cached_or_measured(key, hidden, vocab, rows)
    return _memo[memo_key]


def shape_class(hidden: int, vocab: int, rows: int) -> str:
    """Powers of two nearest to each size: shapes within a class behave alike."""
    def p2(x):
        return 1 << max(0, round(math.log2(max(x, 1))))
    return f"H{p2(hidden)}-V{p2(vocab)}-C{p2(rows)}"


def machine_key() -> str:
    """CPU model, cores, torch threads and both libraries' versions: a new key when any
    of them changes, so a stale measurement is never reused."""
    blas = ""
    with contextlib.suppress(Exception):
        import threadpoolctl
        blas = ",".join(f"{i.get('internal_api')}-{i.get('version')}"
                        for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas")
    return "|".join([f"probe{PROBE_VERSION}", _cpu_model(), f"cpus{os.cpu_count()}",
                     f"threads{torch.get_num_threads()}",
                     f"torch{torch.__version__}", f"numpy{np.__version__}", blas])


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    try:
        from r1reward.cache import cache_root
    except ImportError:  # the source folder imported on its own: same default
        root = Path(os.environ.get("R1REWARD_CACHE", Path.home() / ".cache" / "r1reward"))
    else:
        root = cache_root()
    return root / CACHE_FILE


def _cached_or_measured(key, hidden, vocab, rows) -> str:
    path, machine = cache_path(), machine_key()
    entry = _read(path).get(machine, {}).get(key)
    if entry and entry.get("engine") in ENGINES:
        return entry["engine"]
    entry = measure(hidden, vocab, rows)
    entry["measured_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-measurement
        data = _read(path)
        data.setdefault(machine, {})[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: a concurrent reader sees all or nothing
    return entry["engine"]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measure(hidden: int, vocab: int, rows: int) -> dict:
    """Time one chunk's three GEMMs with each engine on a vocabulary slice; the faster wins.

    Returns ``{"engine", "torch_s", "numpy_s", "probe": [rows, hidden, vocab slice]}``.
    """
    vs = min(vocab, PROBE_MACS // max(1, rows * hidden),
             PROBE_BYTES // (4 * (2 * hidden + rows)))
    vs = max(vs, 64)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(vs, hidden, generator=gen)
    h = torch.randn(rows, hidden, generator=gen)
    z = torch.empty(rows, vs)
    dw = torch.zeros(vs, hidden)
    best = {e: math.inf for e in ENGINES}
    for _ in range(PROBE_ROUNDS + 1):  # the first round warms both libraries up
        for e in ENGINES:
            t0 = time.perf_counter()
            logits(e, h, w, z)
            mm_w(e, z, w)
            dw.addmm_(z.t(), h)
            best[e] = min(best[e], time.perf_counter() - t0)
    winner = "numpy" if best["numpy"] < NUMPY_MARGIN * best["torch"] else "torch"
    return {"engine": winner, "torch_s": best["torch"], "numpy_s": best["numpy"],
            "probe": [rows, hidden, vs]}


def logits(eng: str, h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """``out = h·wᵀ`` (fp32 CPU; ``out`` row-contiguous)."""
    if eng == "numpy":
        with numpy_threads(torch.get_num_threads()):
            np.matmul(h.detach().numpy(), w.detach().numpy().T, out=out.numpy())
    else:
        torch.mm(h, w.t(), out=out)


def mm_w(eng: str, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``p·w`` as a new ``[C, H]`` tensor."""
    if eng != "numpy":
        return torch.mm(p, w)
    out = torch.empty(p.shape[0], w.shape[1], dtype=torch.float32)
    with numpy_threads(torch.get_num_threads()):
        np.matmul(p.detach().numpy(), w.detach().numpy(), out=out.numpy())
    return out


def numpy_threads(n: int):
    """Context that runs numpy's BLAS on ``n`` threads (torch's setting), so a process that
    lowered torch's thread count (e.g. one rank of several) does not oversubscribe cores."""
    global _blas_ctl
    if _blas_ctl is None:
        try:
            import threadpoolctl
            _blas_ctl = threadpoolctl.ThreadpoolController().select(user_api="blas")
        except Exception:  # noqa: BLE001 - without it numpy keeps its own thread count
            _blas_ctl = False
    if _blas_ctl and any(lib["num_threads"] != n for lib in _blas_ctl.info()):
        return _blas_ctl.limit(limits=n)
    return contextlib.nullcontext()


__all__ = ["engine", "measure", "setting", "shape_class", "machine_key", "cache_path",
           "logits", "mm_w", "numpy_threads", "ENGINES", "ENV"]
