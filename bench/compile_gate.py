"""Print the sm_80 / sm_90 resource table of every Triton kernel (no GPU needed).

Usage: ``python -m bench.compile_gate [--dtypes bf16,fp16,fp32] [--targets 80,90]``.
Prints a table, then one JSON line per kernel; exits 1 if any kernel spills or exceeds
the target's register / shared-memory limits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from r1reward.kernels import compile_gate as cg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="operand dtypes (bf16,fp16,fp32)")
    ap.add_argument("--targets", default="80,90", help="compute capabilities (80,90)")
    args = ap.parse_args(argv)
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    bad = [d for d in dtypes if d not in cg._TL]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from {sorted(cg._TL)}")
    targets = tuple(int(t) for t in args.targets.split(",") if t)
    bad = [t for t in targets if t not in cg.SMEM_LIMIT]
    if bad:
        ap.error(f"--targets: unknown {bad}; choose from {sorted(cg.SMEM_LIMIT)}")
    t0 = time.time()
    rows = cg.run_gate(targets, dtypes)
    head = (f"{'kernel':<32}{'sm':>4}{'warps':>6}{'stages':>7}{'REG':>5}{'SHARED':>8}"
            f"{'smem(dyn)':>10}{'LOCAL':>6}{'STACK':>6}  status")
    print(head)
    print("-" * len(head))
    failed = False
    for r in rows:
        status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
        failed |= bool(r.problems)
        print(f"{r.kernel:<32}{r.cc:>4}{r.num_warps:>6}{r.num_stages:>7}{r.regs:>5}"
              f"{r.shared_static:>8}{r.shared_dynamic:>10}{r.local:>6}{r.stack:>6}  {status}")
    print(f"# {len(rows)} kernels compiled in {time.time() - t0:.1f} s")
    for r in rows:
        print(json.dumps({**dataclasses.asdict(r), "problems": r.problems}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
