"""CPU sweep of the torch backend against the 3-GEMM bound: time ratio and extra memory.

    python -m bench.cpu_sweep              # H ∈ {128, 1024, 4096} × V ∈ {32000, 151936} × N ∈ {256, 4096}
    python -m bench.cpu_sweep --quick      # H ∈ {128, 1024}, V = 32000, N ∈ {256, 4096}
    python -m bench.cpu_sweep --hidden 128 --vocab 65536 --tokens 4096
    python -m bench.cpu_sweep --quick --blas numpy --no-filtered   # one engine forced
    python -m bench.cpu_sweep --quick --rounds 3   # bound and exact workers 3 times each

Per shape, each in its own worker process (``bench._worker``, as ``bench.loss_bench``):
the 3-GEMM bound and the exact fused loss on the "random" case, the filtered fused loss
on the "peaked" case (LM-like softmax: what filtering is for; the bound's GEMM time does
not depend on the values). Time is the median fwd+bwd wall time (and process CPU time,
less disturbed by other jobs); extra memory is the peak RSS growth of the call minus the
gradients' resident size. Targets (checked in the last columns): exact ≤ 1.05× the bound,
extra ≤ 64 MiB. ``--rounds K`` runs the bound and exact workers K times each, alternating,
and keeps the median of the per-round ratios: a slow spell of a shared box then moves one
round, not the verdict. Prints one JSON object per shape, then a table; appends the JSON lines
to ``<out-dir>/cpu_sweep.jsonl``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

from ._inputs import Problem
from ._report import _fmt as _f
from .loss_bench import _int_list, run_worker, versions

FULL = {"hidden": [128, 1024, 4096], "vocab": [32000, 151936], "tokens": [256, 4096]}
QUICK = {"hidden": [128, 1024], "vocab": [32000], "tokens": [256, 4096]}
TARGET_RATIO = 1.05
TARGET_EXTRA_MB = 64.0
# row label -> (method, case)
RUNS = {"bound": ("3gemm", "random"), "exact": ("r1reward-torch", "random"),
        "filtered": ("r1reward-torch-filtered", "peaked")}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small subset (explicit flags win)")
    ap.add_argument("--hidden", type=_int_list)
    ap.add_argument("--vocab", type=_int_list)
    ap.add_argument("-N", "--tokens", type=_int_list)
    ap.add_argument("--batch", type=int, default=4, help="sequences B (N must divide by it)")
    ap.add_argument("--repeats", type=int, default=1, help="timed fwd+bwd calls, median kept")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1,
                    help="bound and exact workers per shape, alternating; medians kept")
    ap.add_argument("--no-filtered", dest="filtered", action="store_false",
                    help="skip the filtered rows")
    ap.add_argument("--blas", choices=("auto", "torch", "numpy"), default=None,
                    help="force the CPU GEMM engine (sets R1REWARD_CPU_BLAS for the workers)")
    ap.add_argument("--out-dir", default="runs/bench")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.repeats < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1 and --warmup >= 0")
    return args


def _run(args, label, n, h, v) -> dict:
    """One worker process: ``label``'s method on its case at one shape."""
    method, case = RUNS[label]
    prob = Problem(case=case, N=n, B=args.batch, H=h, V=v, dtype="fp32", device="cpu")
    spec = {"problem": prob.__dict__, "method": method, "repeats": args.repeats,
            "warmup": args.warmup, "compile": False, "time_forward": False,
            "cache_dir": os.path.join(args.out_dir, "cache")}
    return run_worker(spec, args.timeout, args.verbose)


def measure_shape(args, n, h, v, env) -> dict:
    """Bound, exact and filtered rows of one shape, folded into one summary dict.

    With ``--rounds K`` > 1 the bound and exact workers run K times each, alternating (the
    order flips every round); times are the medians over rounds, the ratios the medians of
    the per-round ratios, extra memory the largest of the rounds."""
    out = {"N": n, "H": h, "V": v}
    rounds = {"bound": [], "exact": []}
    for r in range(args.rounds):
        for label in (("bound", "exact") if r % 2 == 0 else ("exact", "bound")):
            rounds[label].append(_run(args, label, n, h, v))
    if args.filtered:
        rounds["filtered"] = [_run(args, "filtered", n, h, v)]
    for label, rows in rounds.items():
        bad = [row.get("status") for row in rows if row.get("status") != "ok"]
        out[f"{label}_status"] = bad[0] if bad else "ok"
        for key, field in (("s", "fwdbwd_s"), ("cpu_s", "fwdbwd_cpu_s")):
            vals = [row.get(field) for row in rows]
            out[f"{label}_{key}"] = None if None in vals else statistics.median(vals)
        mbs = [row.get("logit_mb") for row in rows if row.get("logit_mb") is not None]
        out[f"{label}_extra_mb"] = max(mbs) if mbs else None
        for row in rows:
            for k in ("cpu_blas", "device_name", "cpu_isa", "threads", "git", "load1"):
                if row.get(k) is not None:
                    out.setdefault(k, row[k])
    if args.rounds > 1:
        out["rounds"] = args.rounds
        for key, field in (("", "fwdbwd_s"), ("_cpu", "fwdbwd_cpu_s")):
            pairs = [(b.get(field), x.get(field)) for b, x in zip(rounds["bound"], rounds["exact"])]
            out[f"exact_round_ratios{key}"] = [x / b if b and x else None for b, x in pairs]
    add_ratios(out)
    out.update(env)
    return out


def add_ratios(r: dict) -> None:
    """Ratios to the bound (wall and CPU time) and the two targets' verdicts; the exact
    ratios are the medians of the per-round ratios when there were several rounds."""
    for label in ("exact", "filtered"):
        for t in ("s", "cpu_s"):
            suffix = "" if t == "s" else "_cpu"
            b, x = r.get(f"bound_{t}"), r.get(f"{label}_{t}")
            per_round = r.get(f"{label}_round_ratios{suffix}") or []
            if per_round and None not in per_round:
                r[f"{label}_ratio{suffix}"] = statistics.median(per_round)
            else:
                r[f"{label}_ratio{suffix}"] = x / b if b and x else None
    ratio, extra = r.get("exact_ratio"), r.get("exact_extra_mb")
    r["meets_time"] = None if ratio is None else ratio <= TARGET_RATIO
    extras = [r.get(f"{k}_extra_mb") for k in ("exact", "filtered") if r.get(f"{k}_extra_mb") is not None]
    r["meets_memory"] = None if extra is None else max(extras) <= TARGET_EXTRA_MB


def table(rows: list[dict]) -> str:
    head = (f"{'N':>5} {'H':>5} {'V':>6} {'bound_s':>8} {'exact_s':>8} {'x_bound':>7} {'x_cpu':>6} "
            f"{'filt_s':>7} {'f_bound':>7} {'ex_MB':>6} {'filt_MB':>7} {'blas':>6}  targets")
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = {True: "ok", False: "MISS", None: "-"}
        lines.append(
            f"{r['N']:>5} {r['H']:>5} {r['V']:>6} {_f(r.get('bound_s'), '8.3f')} "
            f"{_f(r.get('exact_s'), '8.3f')} {_f(r.get('exact_ratio'), '7.2f')} "
            f"{_f(r.get('exact_ratio_cpu'), '6.2f')} {_f(r.get('filtered_s'), '7.3f')} "
            f"{_f(r.get('filtered_ratio'), '7.2f')} {_f(r.get('exact_extra_mb'), '6.1f')} "
            f"{_f(r.get('filtered_extra_mb'), '7.1f')} {r.get('cpu_blas', '-'):>6}  "
            f"time {verdict[r.get('meets_time')]}, memory {verdict[r.get('meets_memory')]}"
            + "".join(f" [{k}: {r[k + '_status']}]" for k in ("bound", "exact", "filtered")
                      if r.get(k + "_status") not in (None, "ok")))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.blas:
        os.environ["R1REWARD_CPU_BLAS"] = args.blas
    env = versions()
    rows = []
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "cpu_sweep.jsonl")
    for n, h, v in itertools.product(args.tokens, args.hidden, args.vocab):
        if n % args.batch:
            raise SystemExit(f"N={n} must divide into --batch {args.batch} sequences")
        r = measure_shape(args, n, h, v, env)
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
    print(table(rows))
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
