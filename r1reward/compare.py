"""``python -m r1reward.compare RUN_DIR [RUN_DIR ...]``: finished runs side by side.

One row per run: its seed, held-out accuracy before → after RL overall and per question
kind, the gain in points, the cold start's and RL's seconds, and how often each
StableReinforce mechanism acted (steps with a non-zero Pre-CLIP, PPO-clip or Advantage
Filter fraction, the mean and largest ``ratio_max``, updates the health monitor skipped).
Prints a Markdown table; ``--plot`` draws held-out accuracy over RL per question kind, one
line per run; ``--json`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r1reward.machine import one_line
from r1reward.metrics import heldout_points

MECHANISMS = (("preclip", "preclip_frac"), ("clip", "clip_frac"), ("filter", "filtered_frac"))


class RunError(ValueError):
    pass


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is {path.parent} a finished r1reward.train run?") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


def load_run(run_dir) -> dict:
    """``summary.json``, ``config.json`` and the rows of ``metrics.jsonl`` of a finished run."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json")
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for n, line in enumerate(metrics.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunError(f"{metrics}:{n}: not valid JSON ({e})") from None
    return {"dir": str(run_dir), "summary": summary, "config": config, "rows": rows}


def heldout_curve(run: dict, kind: str | None = None) -> list[tuple[int, float]]:
    """(RL step, held-out accuracy) before RL, at every ``--eval.every`` and after RL;
    ``kind`` picks one question kind."""
    s = run["summary"]

    def point(result):
        return result["accuracy"] if kind is None else result.get("by_group", {}).get(kind)

    key = "heldout_accuracy" if kind is None else f"heldout_accuracy/{kind}"
    return heldout_points(run["rows"], key, point(s["heldout_before"]), point(s["heldout_after"]),
                          s["steps"])


def kinds(run: dict) -> list[str]:
    s = run["summary"]
    groups = set(s["heldout_before"].get("by_group", {})) | set(s["heldout_after"].get("by_group", {}))
    return sorted(g for g in groups if "/" not in g)


def summarize(run: dict) -> dict:
    s, rows = run["summary"], [r for r in run["rows"] if "clip_frac" in r]
    before, after = s["heldout_accuracy_before"], s["heldout_accuracy_after"]
    ratio_max = [r["ratio_max"] for r in rows if isinstance(r.get("ratio_max"), (int, float))]
    out = {"run": run["dir"], "seed": run["config"].get("seed"), "steps": s["steps"],
           "before": before, "after": after, "gain_points": 100 * (after - before),
           "by_kind": {k: (s["heldout_before"]["by_group"].get(k), s["heldout_after"]["by_group"].get(k))
                       for k in kinds(run)},
           "at_chance_after_sft": s.get("cold_start_at_chance", []),
           "sft_seconds": (s.get("sft") or {}).get("seconds"),
           "sft_cached": bool((s.get("sft") or {}).get("cached")),
           "rl_seconds": s["wall_seconds"], "skipped_steps": s.get("skipped_steps", 0),
           "machine": one_line(s["machine"]) if "machine" in s else None}
    for name, key in MECHANISMS:
        out[f"{name}_steps"] = sum(1 for r in rows if (r.get(key) or 0) > 0)
    out["ratio_max_mean"] = sum(ratio_max) / len(ratio_max) if ratio_max else None
    out["ratio_max_max"] = max(ratio_max) if ratio_max else None
    return out


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def table(summaries: list[dict]) -> str:
    all_kinds = sorted({k for s in summaries for k in s["by_kind"]})
    head = (["run", "seed", "before → after", "gain"] + [f"{k} before → after" for k in all_kinds]
            + ["SFT s", "RL s", "Pre-CLIP / clip / filter steps", "ratio_max mean / max", "skipped"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [Path(s["run"]).name, str(s["seed"]), f"{s['before']:.3f} → {s['after']:.3f}",
                 f"{s['gain_points']:+.1f}"]
        for k in all_kinds:
            b, a = s["by_kind"].get(k, (None, None))
            mark = " (at chance after SFT)" if k in s["at_chance_after_sft"] else ""
            cells.append(f"{_f(b)} → {_f(a)}{mark}")
        sft = "cached" if s["sft_cached"] else _f(s["sft_seconds"], "{:.0f}")
        cells += [sft, f"{s['rl_seconds']:.0f}",
                  f"{s['preclip_steps']} / {s['clip_steps']} / {s['filter_steps']} of {s['steps']}",
                  f"{_f(s['ratio_max_mean'], '{:.2f}')} / {_f(s['ratio_max_max'], '{:.2f}')}",
                  str(s["skipped_steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    machines = {s["machine"] for s in summaries if s["machine"]}
    if machines:  # the numbers depend on the machine's numeric paths: name them under the table
        lines.append("")
        lines += [f"machine: {m}" + ("" if len(machines) == 1 else " ("
                  + ", ".join(Path(s["run"]).name for s in summaries if s["machine"] == m) + ")")
                  for m in sorted(machines)]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str | None = None) -> Path:
    """Held-out accuracy over RL: one panel for all questions and one per kind, a line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [None] + sorted({k for r in runs for k in kinds(r)})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8), sharey=True,
                             squeeze=False)
    for ax, kind in zip(axes[0], panels):
        for i, run in enumerate(runs):
            curve = heldout_curve(run, kind)
            seed = run["config"].get("seed")
            label = f"seed {seed}" if seed is not None else Path(run["dir"]).name
            if curve:
                ax.plot(*zip(*curve), "o-", color=f"C{i}", label=label)
        ax.set_title("all questions" if kind is None else f"{kind} questions")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (greedy, both orders)")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m r1reward.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (--output of r1reward.train)")
    p.add_argument("--plot", type=Path, help="write the held-out curves to this PNG")
    p.add_argument("--title", help="the figure's title")
    p.add_argument("--json", type=Path, help="write the rows to this JSON file")
    a = p.parse_args(argv)
    try:
        runs = [load_run(d) for d in a.runs]
    except RunError as e:
        p.exit(2, f"error: {e}\n")
    rows = [summarize(r) for r in runs]
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    if a.plot:
        print(f"wrote {plot(runs, a.plot, a.title)}", file=sys.stderr)


if __name__ == "__main__":
    main()
