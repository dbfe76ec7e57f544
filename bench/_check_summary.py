"""``summary.md`` of a ``bench.gpu_check`` run, from its records (results.jsonl)."""
from __future__ import annotations


def _f(v, spec=".3g"):
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def write_summary(records: list[dict], path: str) -> str:
    by = {}
    for r in records:
        by.setdefault(r["stage"], []).append(r)
    start = next((r for r in records if r["stage"] == "run"), {})
    lines = [f"# GPU check ({'smoke, CPU' if start.get('smoke') else 'GPU'}) — {start.get('time_utc')}",
             "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, recs in by.items():
        if name == "run":
            continue
        st = next((r for r in recs if r.get("kind") == "stage"), {})
        lines.append(f"| {name} | {st.get('status', 'not finished')} | {_f(st.get('seconds'))} | "
                     f"{(st.get('error') or '').replace('|', '/')[:120]} |")
    items = lambda stage: [r for r in by.get(stage, []) if r.get("kind") == "item"]  # noqa: E731
    lines += ["", "## Environment", ""]
    for r in items("wheels") + items("env"):
        rest = {k: v for k, v in r.items() if k not in ("stage", "kind", "time_utc", "item", "output")}
        lines.append(f"- **{r['item']}**: " + ", ".join(f"{k}={v}" for k, v in rest.items()))
    lines += ["", "## Correctness (max |ours − reference| / max |reference|)", "",
              "| case | backend | dtype | N | H | V | loss | logp | entropy | ∂h | ∂W | tol | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in items("correctness"):
        e = r.get("errors") or {}
        lines.append(f"| {r['item']} | {r.get('backend')} | {r.get('dtype', '-')} | {r.get('N', '-')} | "
                     f"{r.get('H', '-')} | {r.get('V', '-')} | "
                     + " | ".join(_f(e.get(k), ".1e") for k in ("loss", "logp", "entropy", "dh", "dW"))
                     + f" | {_f(r.get('tol'), '.0e')} | {r.get('status')} |")
    lines += ["", "## Compiled resources", "",
              "| kernel | sm | REG | LOCAL | STACK | shared (static+dyn) | problems |",
              "|---|---|---|---|---|---|---|"]
    for r in items("resources"):
        lines.append(f"| {r.get('kernel')} | {r.get('cc')} | {r.get('regs')} | {r.get('local')} | "
                     f"{r.get('stack')} | {r.get('shared_static')}+{r.get('shared_dynamic')} | "
                     f"{'; '.join(r.get('problems') or []) or 'none'} |")
    t = items("timings")
    prob = next((r.get("problem") for r in t if r.get("problem")), {})
    lines += ["", f"## Timings ({', '.join(f'{k}={v}' for k, v in prob.items())}; "
              "fwd+bwd median)", "",
              "| method | case | TF32 | fwd+bwd s | × 3-GEMM | peak MB | extra MB | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in t:
        lines.append(f"| {r['item']} | {r.get('case', '-')} | {r.get('tf32', '-')} | "
                     f"{_f(r.get('fwdbwd_s'), '.4f')} | {_f(r.get('x_3gemm'), '.2f')} | "
                     f"{_f(r.get('peak_mb'), '.0f')} | {_f(r.get('extra_mb'), '.0f')} | "
                     f"{r.get('status')} |")
    lines += ["", "## Trainer smoke", ""]
    for r in items("trainer"):
        lines.append(f"- {r['item']}: {r.get('status')} (rc={r.get('rc')}, {_f(r.get('seconds'))} s)")
        if r.get("status") != "ok" and r.get("tail"):
            lines += ["", "```", r["tail"][-1500:], "```"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
