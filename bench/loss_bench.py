"""Benchmark the fused StableReinforce loss against the 3-GEMM bound, Liger and CCE.

    python -m bench.loss_bench                 # the issue's shapes (N=512, H=2048/3584, V=151936)
    python -m bench.loss_bench --quick         # small shapes, for smoke runs
    python -m bench.loss_bench --methods 3gemm,r1reward-torch --hidden 2048 --cases random

Each (problem, method) runs in its own subprocess (``bench._worker``) so peak memory is
that method's alone. Prints one JSON object per row, then a table; appends the rows to
``<out-dir>/loss_bench.csv`` and ``loss_bench.jsonl`` (``runs/`` is git-ignored).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import subprocess
import sys
import time

from . import _report
from ._inputs import CASES, DTYPES, Problem
from ._methods import METHODS, PEAKED_METHODS
from ._worker import ROW_PREFIX

# Small enough for a smoke run, big enough that full logits (N·V·4 = 96 MiB) exceed the
# torch backend's 64 MiB chunk buffer, so the memory columns still tell methods apart.
QUICK = {"tokens": [512], "hidden": [64], "vocab": 49152, "batch": 4}
FULL = {"tokens": [512], "hidden": [2048, 3584], "vocab": 151936, "batch": 4}  # the issue's
# A fixed malloc mmap threshold makes every buffer >= 128 KiB its own mapping, returned to
# the OS when freed, so RSS follows tensor lifetimes closely (glibc otherwise raises the
# threshold after frees and keeps freed memory in the heap, hiding later peaks).
_GLIBC_TUNABLE = "glibc.malloc.mmap_threshold=131072"


def _int_list(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _choices(allowed):
    def parse(s: str) -> list[str]:
        out = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in out if x not in allowed]
        if bad or not out:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {', '.join(allowed)}")
        return out
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.loss_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", type=_choices(METHODS), default=list(METHODS),
                    help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--cases", type=_choices(CASES), default=list(CASES),
                    help="random (all methods) and/or peaked (LM-like softmax; only "
                         + ", ".join(PEAKED_METHODS) + ")")
    ap.add_argument("-N", "--tokens", type=_int_list, help="tokens per batch (default 512)")
    ap.add_argument("--hidden", type=_int_list, help="hidden sizes H (default 2048,3584)")
    ap.add_argument("--vocab", type=int, help="vocabulary size V (default 151936)")
    ap.add_argument("--batch", type=int, help="sequences B, N must divide by it (default 4)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--bf16", action="store_const", const="bf16", dest="dtype")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per measurement, median reported (default 3 GPU, 1 CPU)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed fwd+bwd calls first")
    ap.add_argument("--quick", action="store_true",
                    help=f"small default shapes for smoke runs: N={QUICK['tokens'][0]}, "
                         f"H={QUICK['hidden'][0]}, V={QUICK['vocab']} (explicit flags win)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="disable torch.compile (Liger's loss math, CCE's CPU path): fast smoke runs")
    ap.add_argument("--target-p", type=float, default=0.9,
                    help="peaked case: softmax mass of the target token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/bench")
    ap.add_argument("--plot", action="store_true", help="write a PNG bar chart of fwd+bwd time")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per method run")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False here")
    if args.repeats is None:
        args.repeats = 3 if args.device == "cuda" else 1
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def problems(args) -> list[Problem]:
    out = []
    for case in args.cases:
        for n in args.tokens:
            for h in args.hidden:
                try:
                    out.append(Problem(case=case, N=n, B=args.batch, H=h, V=args.vocab,
                                       dtype=args.dtype, device=args.device, seed=args.seed,
                                       target_p=args.target_p))
                except ValueError as e:
                    raise SystemExit(f"bad problem (--tokens/--batch/--hidden/--vocab): {e}") from None
    return out


def run_worker(spec: dict, timeout: float, verbose: bool) -> dict:
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), _GLIBC_TUNABLE) if x)
    if not spec["compile"]:
        env["TORCHDYNAMO_DISABLE"] = "1"  # turns CCE's module-level torch.compile off too
    cmd = [sys.executable, "-m", "bench._worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {"method": spec["method"], "status": f"error: timed out after {timeout:.0f} s"}
    if verbose and proc.stderr:
        sys.stderr.write(proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_PREFIX):
            return json.loads(line[len(ROW_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
    return {"method": spec["method"],
            "status": f"error: worker rc={proc.returncode}{killed}: {tail}"[:400]}


def versions() -> dict:
    """Package versions and the run's start time (device/threads/git come from the workers)."""
    env = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for pkg, dist in (("torch", "torch"), ("triton", "triton"), ("liger_kernel", "liger-kernel"),
                      ("cut_cross_entropy", "cut-cross-entropy")):
        try:
            env[pkg] = md.version(dist)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    env = versions()
    cache_dir = os.path.join(args.out_dir, "cache")
    rows = []
    for prob in problems(args):
        methods = [m for m in args.methods if prob.case == "random" or m in PEAKED_METHODS]
        # The bound first, so a crash later still leaves it to compare with.
        methods.sort(key=lambda m: m != "3gemm")
        for m in methods:
            spec = {"problem": prob.__dict__, "method": m, "repeats": args.repeats,
                    "warmup": args.warmup, "compile": args.compile, "cache_dir": cache_dir}
            row = run_worker(spec, args.timeout, args.verbose)
            row.update({k: getattr(prob, k) for k in ("case", "N", "B", "H", "V", "dtype",
                                                       "device")})
            row.update(env, repeats=args.repeats, warmup=args.warmup, compiled=args.compile)
            rows.append(row)
            _report.add_ratios(rows)
            print(json.dumps(row), flush=True)
    print(_report.table(rows))
    csv_path = _report.append_csv(rows, os.path.join(args.out_dir, "loss_bench.csv"))
    with open(os.path.join(args.out_dir, "loss_bench.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"rows appended to {csv_path} and {os.path.join(args.out_dir, 'loss_bench.jsonl')}")
    if args.plot:
        png = _report.bar_chart(rows, os.path.join(args.out_dir, "loss_bench.png"))
        if png:
            print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
