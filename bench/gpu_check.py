"""One command that validates and times the GPU path on one H100/H200, offline, in ≤ 8 min.

    python -m bench.gpu_check --out runs/gpu_check        # on the GPU machine
    python -m bench.gpu_check --out /tmp/gc --smoke       # every stage on CPU at tiny sizes

Stages, each time-boxed; every record is appended to ``<out>/results.jsonl`` as soon as it
exists (a crash or a kill keeps what was measured), then ``<out>/summary.md`` is written:

1. ``wheels``: peers (Liger, CCE) from ``wheels/*.whl`` if present and not importable
   (``pip install --no-index --no-deps``; fetch them with ``bench/fetch_wheels.sh``).
2. ``env``: versions, GPU, clocks (nvidia-smi), TF32 state.
3. ``correctness``: our backends vs the reference backend at odd and real shapes (fp32,
   bf16, fp16, V·H > 2³¹, non-contiguous, filtered, TF32).
4. ``resources``: registers / spills / shared memory of every Triton kernel (compile gate).
5. ``timings``: N=16384, H=3584, V=151936 bf16: cuBLAS 3-GEMM bound, ours exact and
   filtered, CCE exact and filtered, Liger GRPO (TF32 off and on); median of several
   calls and peak memory each (``bench._worker``, one process per method).
6. ``trainer``: a few RL steps of the embedded Qwen2.5-VL-shaped model through
   ``python -m r1reward.train`` (optional: a failure is recorded, never fatal).

``--smoke`` runs the same stages on CPU (torch backend, Triton interpreter) at tiny sizes;
``tests/test_gpu_check.py`` runs it so this script cannot rot.
"""
from __future__ import annotations

import os
import sys

# The Triton interpreter must be chosen before triton is first imported (see
# tests/test_triton_interpret.py), so --smoke sets it before anything imports torch.
if "--smoke" in sys.argv and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from . import _check_correct, _check_stages  # noqa: E402
from ._check_summary import write_summary  # noqa: E402

# (name, function, time box in seconds on GPU, in --smoke): 460 s in all on GPU, so the
# whole run (with start-up) stays within 8 minutes.
STAGES = (("wheels", _check_stages.wheels, 20, 5),
          ("env", _check_stages.env, 10, 10),
          ("correctness", _check_correct.correctness, 130, 30),
          ("resources", _check_stages.resources, 75, 60),
          ("timings", _check_stages.timings, 180, 60),
          ("trainer", _check_stages.trainer, 45, 60))


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise :class:`StageTimeout` in this (main) thread after ``seconds``; subprocess
    stages also pass the remaining time on as their own timeouts."""
    def fire(signum, frame):
        raise StageTimeout(f"time box of {seconds:.0f} s exceeded")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Recorder:
    """Appends JSON records to results.jsonl (flushed per record) and keeps them."""

    def __init__(self, path: str):
        self.path, self.records = path, []

    def __call__(self, stage: str, **fields) -> dict:
        rec = {"stage": stage, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **fields}
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        return rec


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (results.jsonl, summary.md)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (tests)")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip")
    ap.add_argument("--wheels", default="wheels", help="folder of peer wheels (stage 1)")
    args = ap.parse_args(argv)
    names = [s[0] for s in STAGES]
    bad = [s for s in args.skip.split(",") if s and s not in names]
    if bad:
        ap.error(f"--skip: unknown {bad}; stages are {names}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rec = Recorder(os.path.join(args.out, "results.jsonl"))
    ctx = _check_stages.Context(out=args.out, smoke=args.smoke, wheels=args.wheels,
                                root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rec("run", kind="start", smoke=args.smoke, argv=sys.argv[1:])
    failed = []
    for name, fn, box, smoke_box in STAGES:
        if name in args.skip.split(","):
            rec(name, kind="stage", status="skipped: --skip")
            continue
        limit = smoke_box if args.smoke else box
        t0 = time.time()
        ctx.deadline = t0 + limit
        status, error = "ok", None
        try:
            with time_box(limit):
                status = fn(ctx, functools.partial(rec, name, kind="item")) or "ok"
        except StageTimeout as e:
            status, error = "timeout", str(e)
        except Exception as e:  # noqa: BLE001 - a stage's failure is recorded, the run goes on
            status, error = "error", f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        rec(name, kind="stage", status=status, seconds=round(time.time() - t0, 1), error=error)
        print(f"[gpu_check] {name}: {status} ({time.time() - t0:.1f} s)"
              + (f" {error}" if error else ""), flush=True)
        if status not in ("ok", "skipped") and name != "trainer":
            failed.append(name)
    path = write_summary(rec.records, os.path.join(args.out, "summary.md"))
    print(f"[gpu_check] results: {rec.path}\n[gpu_check] summary: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
