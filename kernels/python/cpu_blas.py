"""CPU GEMM engine for the chunked backend, chosen by measuring on the running machine.

Two engines compute the per-chunk GEMMs (logits ``[C, H]·[H, V]`` and ∂h ``[C, V]·[V, H]``):

* ``"torch"``: ``torch.mm`` (the torch wheel's BLAS: MKL on x86);
* ``"numpy"``: ``np.matmul`` on zero-copy views (the BLAS numpy's wheels bundle, OpenBLAS),
  run on torch's thread count through threadpoolctl.

∂W always accumulates in place with ``torch.addmm_`` (numpy cannot accumulate into an
output). Which engine is faster depends on the CPU and the shape (figures in
docs/kernels_cpu.md), so neither is assumed: the first call of a shape class times a
chunk's own work with each engine — on that call's weight, rows and logit buffer, the
softmax pass between the GEMMs, ∂W written into the gradient's storage before the loop
fills it — and stores the winner in ``<cache root>/cpu_blas.json`` under a key naming this
machine. Timing the whole chunk matters: OpenBLAS's worker threads keep spinning after a
call and slow torch's next op, which GEMMs timed alone do not show. The torch rounds run
first, so they never pay for the other library's threads. ``R1REWARD_CPU_BLAS=torch`` or
``=numpy`` forces one (no measurement); ``auto`` (the default) measures.
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
# Without a call's own operands (a direct call), the probe builds random ones: a vocabulary
# slice of at most this many bytes (weight, logits, ∂W).
PROBE_BYTES = 48 << 20
PROBE_ROUNDS = 3  # rounds per engine after one warm-up round; the minimum is kept
# numpy must beat torch by this factor to be chosen: a coin-flip on a noisy box should not
# stick (the choice is cached) and torch.mm needs no second thread pool.
NUMPY_MARGIN = 0.9
PROBE_VERSION = 4  # part of the cache key: a changed probe re-measures

_memo: dict[tuple, str] = {}  # (shape class, threads) -> engine, for this process
_blas_ctl = None  # threadpoolctl controller of numpy's BLAS (None: not probed; False: absent)


def setting() -> str:
    """``auto``, ``torch`` or ``numpy`` from the environment (read on every call)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", *ENGINES):
        raise ValueError(f"{ENV}={value!r}: expected auto, torch or numpy")
    return value


def engine(hidden: int, vocab: int, rows: int, grads: bool = True, probe=None) -> str:
    """Engine for chunk GEMMs of ``rows × hidden × vocab`` (measured once per shape class).

    ``grads``: the chunks also compute gradients (∂h, ∂W), not only log-probs; the two
    patterns are measured apart. ``probe(engine)`` runs one chunk's work on the calling
    op's operands (:func:`chunk_probe`); without it the measurement uses random ones."""
    forced = setting()
    if forced != "auto":
        return forced
    if rows * hidden * vocab < MIN_MACS:
        return "torch"
    key = shape_class(hidden, vocab, rows, grads)
    memo_key = (key, torch.get_num_threads())  # a changed thread count is another machine key
    if memo_key not in _memo:
        _memo[memo_key] = _cached_or_measured(
            key, lambda: measure(probe or random_probe(hidden, vocab, rows, grads)))
    return _memo[memo_key]


def shape_class(hidden: int, vocab: int, rows: int, grads: bool = True) -> str:
    """Powers of two nearest to each size (shapes within a class behave alike), and
    whether the chunks compute gradients."""
    def p2(x):
        return 1 << max(0, round(math.log2(max(x, 1))))
    return f"H{p2(hidden)}-V{p2(vocab)}-C{p2(rows)}-{'grad' if grads else 'fwd'}"


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


def _cached_or_measured(key, measure_now) -> str:
    path, machine = cache_path(), machine_key()
    entry = _read(path).get(machine, {}).get(key)
    if entry and entry.get("engine") in ENGINES:
        return entry["engine"]
    entry = measure_now()
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


def chunk_probe(hc: torch.Tensor, w: torch.Tensor, z: torch.Tensor, grads: bool,
                dw: torch.Tensor | None = None):
    """One chunk's work as the loop runs it, for :func:`measure`: logits ``hc·wᵀ`` into
    ``z``, the in-place softmax, and with ``grads`` the ∂h GEMM and (when a scratch ``dw``
    of ``w``'s shape is given) ∂W written with torch. Every operand is only overwritten."""
    def run(eng: str) -> None:
        logits(eng, hc, w, z)
        torch._softmax(z, 1, False, out=z)
        if grads:
            mm_w(eng, z, w)
            if dw is not None:
                torch.mm(z.t(), hc, out=dw)
    run.shape = [hc.shape[0], w.shape[1], w.shape[0]]
    return run


def random_probe(hidden: int, vocab: int, rows: int, grads: bool = True):
    """:func:`chunk_probe` on random operands: a vocabulary slice within ``PROBE_BYTES``."""
    vs = max(64, min(vocab, PROBE_BYTES // (4 * (2 * hidden + rows))))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(vs, hidden, generator=gen).mul_(hidden ** -0.5)
    return chunk_probe(torch.randn(rows, hidden, generator=gen), w, torch.empty(rows, vs),
                       grads, torch.empty(vs, hidden) if grads else None)


def measure(probe) -> dict:
    """Time ``probe(engine)`` for each engine (one warm-up, then the minimum of
    ``PROBE_ROUNDS``); numpy wins only below ``NUMPY_MARGIN`` of torch's time.

    The engines run one after the other, torch first: OpenBLAS's threads spin for a while
    after its calls, and a torch round run among them would pay for that in this probe
    though never in a loop that uses torch alone. Returns ``{"engine", "torch_s",
    "numpy_s", "probe": [rows, hidden, vocab]}``."""
    best = {}
    for e in ENGINES:
        times = []
        for _ in range(PROBE_ROUNDS + 1):
            t0 = time.perf_counter()
            probe(e)
            times.append(time.perf_counter() - t0)
        best[e] = min(times[1:])
    winner = "numpy" if best["numpy"] < NUMPY_MARGIN * best["torch"] else "torch"
    return {"engine": winner, "torch_s": best["torch"], "numpy_s": best["numpy"],
            "probe": getattr(probe, "shape", None)}


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


__all__ = ["engine", "measure", "chunk_probe", "random_probe", "setting", "shape_class",
           "machine_key", "cache_path", "logits", "mm_w", "numpy_threads", "ENGINES", "ENV"]
