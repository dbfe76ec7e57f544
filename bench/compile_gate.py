"""Print the sm_80 / sm_90 resource table of every Triton kernel (no GPU needed).

Usage: ``python -m bench.compile_gate [--dtypes bf16,fp16,fp32] [--targets 80,90]
[--triton 3.6.0]``. Prints a table, then one JSON line per kernel; exits 1 if any kernel
spills or exceeds the target's register / shared-memory limits.

``--triton VERSION`` runs the gate under that Triton release instead of the installed one
(the lent GPU image ships Triton 3.6): it is pip-installed once, without dependencies, into
``$R1REWARD_CACHE/triton-VERSION`` and put first on the path of a child process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from r1reward.kernels import compile_gate as cg

# Disk a Triton release takes once unpacked (3.6.0: 0.64 GB), with room for pip's temporaries.
TRITON_RELEASE_BYTES = 1_500_000_000


def triton_release(version: str) -> Path:
    """A directory holding Triton ``version`` (and nothing else), built once."""
    from r1reward.cache import build_once, cache_root

    def install(tmp: Path) -> None:
        free = shutil.disk_usage(tmp).free
        if free < TRITON_RELEASE_BYTES:
            raise SystemExit(f"compile_gate --triton {version}: {free / 2**30:.1f} GiB free under "
                             f"{tmp.parent}, need ~{TRITON_RELEASE_BYTES / 2**30:.1f} GiB "
                             "(set R1REWARD_CACHE to a roomier disk)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-cache-dir", "--target", str(tmp), f"triton=={version}"], check=True)
    return build_once(cache_root() / f"triton-{version}", install, marker="triton/__init__.py")


def run_under(version: str, argv: list[str]) -> int:
    """This gate in a child process that imports Triton ``version``."""
    path = triton_release(version)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "bench.compile_gate", *argv], env=env,
                          cwd=Path(__file__).resolve().parent.parent).returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="operand dtypes (bf16,fp16,fp32)")
    ap.add_argument("--targets", default="80,90", help="compute capabilities (80,90)")
    ap.add_argument("--triton", default=None, metavar="VERSION",
                    help="run under this Triton release (e.g. 3.6.0, the GPU image's)")
    args = ap.parse_args(argv)
    if args.triton:
        import triton
        if triton.__version__ != args.triton:
            return run_under(args.triton, ["--dtypes", args.dtypes, "--targets", args.targets])
    dtypes = tuple(d for d in args.dtypes.split(",") if d)
    bad = [d for d in dtypes if d not in cg._TL]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; choose from {sorted(cg._TL)}")
    targets = tuple(int(t) for t in args.targets.split(",") if t)
    bad = [t for t in targets if t not in cg.SMEM_LIMIT]
    if bad:
        ap.error(f"--targets: unknown {bad}; choose from {sorted(cg.SMEM_LIMIT)}")
    import triton
    print(f"# Triton {triton.__version__} ({Path(triton.__file__).parent})")
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
        print(json.dumps({**dataclasses.asdict(r), "problems": r.problems,
                          "triton": triton.__version__}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
