"""Output of the loss benchmark: console table, JSON lines, CSV rows, optional bar chart."""
from __future__ import annotations

import csv
import os
import sys
import time

# Column order of the CSV (and of the JSON rows, which may carry a few more keys).
FIELDS = ("method", "case", "mode", "status", "N", "B", "H", "V", "dtype", "device",
          "fwd_s", "fwdbwd_s", "ratio_to_3gemm", "fwd_cpu_s", "fwdbwd_cpu_s",
          "cpu_ratio_to_3gemm", "fwd_peak_mb", "peak_mb", "grad_mb", "grad_resident_mb",
          "logit_mb",
          "target_p_mean", "repeats", "warmup", "compiled", "mem_source", "threads", "load1",
          "device_name", "cpu_isa", "git", "torch", "triton", "liger_kernel", "cut_cross_entropy",
          "time_utc")


def add_ratios(rows: list[dict]) -> None:
    """``ratio_to_3gemm`` = fwd+bwd time / the 3-GEMM bound's, same problem, same run
    (``cpu_ratio_to_3gemm`` the same with process CPU time, CPU runs only)."""
    for col, out in (("fwdbwd_s", "ratio_to_3gemm"), ("fwdbwd_cpu_s", "cpu_ratio_to_3gemm")):
        bound = {_problem_key(r): r.get(col) for r in rows
                 if r["method"] == "3gemm" and r.get("status") == "ok"}
        for r in rows:
            b, v = bound.get(_problem_key(r)), r.get(col)
            r[out] = v / b if r.get("status") == "ok" and b and v is not None else None


def _problem_key(r):
    return (r.get("case"), r.get("N"), r.get("H"), r.get("V"), r.get("dtype"), r.get("device"))


def _fmt(v, spec):
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def table(rows: list[dict]) -> str:
    head = (f"{'case':7} {'N':>5} {'H':>5} {'V':>6} {'method':25} {'fwd_s':>8} {'fwdbwd_s':>9} "
            f"{'x3gemm':>7} {'cpu_x3g':>7} {'fwd_pk_mb':>9} {'peak_mb':>9} {'logit_mb':>9}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.get('case', ''):7} {r.get('N', ''):>5} {r.get('H', ''):>5} {r.get('V', ''):>6} "
            f"{r['method']:25} {_fmt(r.get('fwd_s'), '8.3f')} {_fmt(r.get('fwdbwd_s'), '9.3f')} "
            f"{_fmt(r.get('ratio_to_3gemm'), '7.2f')} {_fmt(r.get('cpu_ratio_to_3gemm'), '7.2f')} "
            f"{_fmt(r.get('fwd_peak_mb'), '9.1f')} {_fmt(r.get('peak_mb'), '9.1f')} "
            f"{_fmt(r.get('logit_mb'), '9.1f')}  {r.get('status')}")
    return "\n".join(lines)


def append_csv(rows: list[dict], path: str) -> str:
    """Append rows to ``path``; if it holds another column layout, write beside it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(FIELDS):
            stem, ext = os.path.splitext(path)
            path = f"{stem}-{time.strftime('%Y%m%dT%H%M%S')}{ext}"
            print(f"note: {path!r} used: the existing CSV has other columns", file=sys.stderr)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def bar_chart(rows: list[dict], path: str) -> str | None:
    """fwd+bwd seconds per method, one group per problem; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed, no chart written", file=sys.stderr)
        return None
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    groups = sorted({_problem_key(r) for r in ok}, key=str)
    methods = list(dict.fromkeys(r["method"] for r in ok))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4))
    for j, m in enumerate(methods):
        ys = [next((r["fwdbwd_s"] for r in ok if r["method"] == m and _problem_key(r) == g),
                   0.0) for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], ys, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{g[0]} N={g[1]}\nH={g[2]} V={g[3]} {g[4]}" for g in groups], fontsize=8)
    ax.set_ylabel("forward+backward seconds (median)")
    ax.set_title(f"StableReinforce loss vs the 3-GEMM bound ({ok[0].get('device_name')})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
