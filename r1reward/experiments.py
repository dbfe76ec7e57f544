"""``python -m r1reward.experiments stability``: the paper's stability claim in miniature.

Each variant of the update (StableReinforce, plain Reinforce++, one ablation per part)
runs RL for several seeds from one shared cold start, in a stress setting where updates
are far off-policy (several mini-batches per rollout, several epochs, temperature 1.0, a
high learning rate), with the health monitor off. A seed *collapses* when its loss or
gradient is non-finite, its rollout format rate (mean of 5 steps) falls below 0.5, or its
held-out accuracy falls 20 points below where it started.

Writes ``summary.json``, ``summary.md`` (a table) and ``stability.png`` to ``--output``;
each run's own directory is under ``runs/<variant>/seed<k>``. Finished runs are reused
when the command is repeated with the same settings (so an interrupted sweep resumes); a
run made with other settings (e.g. another ``--lr``) is run again.

``--jobs N`` runs N runs at a time in worker processes, the cores split between them
(default: one per core), after the shared cold start is built.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from r1reward.log import logger as log
from r1reward.log import setup_logging

# The update variants: flags added to the shared setting.
VARIANTS: dict[str, tuple[str, ...]] = {
    "stable_reinforce": (),
    "reinforce_pp": ("--no-algo.preclip", "--algo.adv_filter", "off"),
    "no_preclip": ("--no-algo.preclip",),
    "no_filter": ("--algo.adv_filter", "off"),
    "no_consistency": ("--reward.w_consistency", "0"),
}

# The stress setting: 4 optimizer steps per rollout for 2 epochs (steps 2-8 of each
# rollout are off-policy), sampling at the release's temperature, a learning rate 10x the
# tiny default's. Health monitor off: it is not part of the method.
STRESS = ("--rollout.batch_size", "32", "--algo.train_batch_size", "8", "--algo.ppo_epochs", "2",
          "--rollout.temperature", "1.0", "--optim.warmup_steps", "0",
          "--no-health.enabled", "--no-checkpoint.export", "--checkpoint.interval", "0",
          "--no-progress", "--sft.seed", "0")
STRESS_LR = 3e-3  # --lr: at this rate every variant collapsed (docs/experiments.md); 1e-3 is milder
SIZES = {
    # (RL steps, seeds, held-out pairs, evaluate every, cold-start SFT steps)
    "quick": (30, 2, 64, 10, 1500),
    "full": (80, 3, 128, 20, 3000),
}
CURVES = ("reward", "heldout_accuracy", "ratio_max", "preclip_frac", "clip_frac", "response_length")


def collapse(rows: list[dict], before: float | None) -> str | None:
    """Why (and at which step) a run collapsed, or None."""
    fmt: list[float] = []
    for r in rows:
        for k in ("loss", "grad_norm"):
            v = r.get(k)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"step {r['step']}: non-finite {k}"
        fmt = (fmt + [r["format_rate"]])[-5:]
        if len(fmt) == 5 and sum(fmt) / 5 < 0.5:
            return f"step {r['step']}: format rate {sum(fmt) / 5:.2f} (mean of 5) < 0.5"
        held = r.get("heldout_accuracy")
        if before is not None and isinstance(held, (int, float)) and held < before - 0.2:
            return f"step {r['step']}: held-out {held:.3f} < {before:.3f} - 0.2"
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _same_run(saved_config: Path, cfg) -> bool:
    """Whether the run saved there was made with these settings (invocation flags aside)."""
    from r1reward.config import INVOCATION
    if not saved_config.exists():
        return False
    saved, want = _flat(json.loads(saved_config.read_text())), _flat(cfg.to_dict())
    return all(saved.get(k) == v for k, v in want.items() if k not in INVOCATION)


def run_one(argv: list[str], run_dir: Path) -> dict:
    """One training run (reused if already finished with the same settings); returns its
    summary and rows."""
    from r1reward.config import parse_args
    from r1reward.job import run
    summary_file = run_dir / "summary.json"
    cfg = parse_args([*argv, "--output", str(run_dir)])
    if not (summary_file.exists() and _same_run(run_dir / "config.json", cfg)):
        if summary_file.exists():
            log.info("stability: %s was run with other settings; running it again", run_dir)
        extra = ["--overwrite"] if run_dir.exists() else []
        run(parse_args([*argv, "--output", str(run_dir), *extra]))
    summary = json.loads(summary_file.read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"summary": summary, "rows": rows}


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    setup_logging()


def _run_all(runs: dict, out: Path, jobs: int) -> dict:
    """Every run of ``runs`` ({(variant, seed): argv}); with ``jobs`` > 1, that many at a
    time in worker processes once the shared cold start is built."""
    keys = list(runs)
    done = {}
    if jobs <= 1:
        for k in keys:
            log.info("stability: %s seed %d (%d/%d)", k[0], k[1], len(done) + 1, len(keys))
            done[k] = run_one(runs[k], _run_dir(out, k))
        return done
    shared_cold_start(runs[keys[0]], out)
    threads = max(1, _cores() // jobs)
    log.info("stability: %d runs, %d at a time, %d thread(s) each", len(keys), jobs, threads)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {k: pool.submit(run_one, runs[k], _run_dir(out, k)) for k in keys}
        for k, f in futures.items():
            done[k] = f.result()
            log.info("stability: %s seed %d done (%d/%d)", k[0], k[1], len(done), len(keys))
    return done


def shared_cold_start(argv: list[str], out: Path) -> None:
    """Build the data, tiny model and cold start every run shares (``--sft.seed``) before the
    workers start, so they find it cached instead of each training it."""
    from r1reward.config import parse_args
    from r1reward.job import prepare
    from r1reward.parallelize import init_distributed
    log.info("stability: building the shared cold start")
    prepare(parse_args([*argv, "--output", str(out)]), init_distributed(False), out)


def _run_dir(out: Path, key: tuple[str, int]) -> Path:
    return out / "runs" / key[0] / f"seed{key[1]}"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stability(out: Path, size: str, variants: list[str], seeds: int | None,
              lr: float = STRESS_LR, jobs: int = 1) -> dict:
    steps, n_seeds, n_held, every, sft_steps = SIZES[size]
    n_seeds = seeds or n_seeds
    base = [*STRESS, "--optim.lr", f"{lr:g}", "--steps", str(steps), "--data.n_heldout", str(n_held),
            "--eval.every", str(every), "--sft.steps", str(sft_steps)]
    setting = {"size": size, "steps": steps, "seeds": n_seeds, "heldout_pairs": n_held,
               "sft_steps": sft_steps, "flags": list(base),
               "variants": {v: list(VARIANTS[v]) for v in variants}}
    result = {"setting": setting, "variants": {}}
    runs = {(v, seed): [*base, *VARIANTS[v], "--seed", str(seed)]
            for v in variants for seed in range(n_seeds)}
    done = _run_all(runs, out, jobs)
    for v in variants:
        agg = {"seeds": n_seeds, "collapsed": 0, "collapse_reasons": [], "heldout_before": [],
               "heldout_final": [], "ratio_max": [], "preclip_frac_mean": [],
               "clip_frac_mean": [], "filtered_frac_mean": [], "reward_final10": [], "curves": []}
        for seed in range(n_seeds):
            r = done[(v, seed)]
            s, rows = r["summary"], r["rows"]
            why = collapse(rows, s["heldout_accuracy_before"])
            agg["collapsed"] += why is not None
            agg["collapse_reasons"].append(why)
            agg["heldout_before"].append(s["heldout_accuracy_before"])
            agg["heldout_final"].append(s["heldout_accuracy_after"])
            finite = [x["ratio_max"] for x in rows if isinstance(x["ratio_max"], (int, float))]
            agg["ratio_max"].append(max(finite) if finite else None)
            for k in ("preclip_frac", "clip_frac", "filtered_frac"):
                agg[f"{k}_mean"].append(sum(x[k] for x in rows) / max(len(rows), 1))
            tail = rows[-10:]
            agg["reward_final10"].append(sum(x["reward"] for x in tail) / max(len(tail), 1))
            agg["curves"].append({k: [x.get(k) for x in rows] for k in CURVES}
                                 | {"step": [x["step"] for x in rows]})
        result["variants"][v] = agg
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "summary.md").write_text(table(result))
    plot(result, out / "stability.png")
    return result


def _mean(xs) -> str:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return f"{sum(xs) / len(xs):.3f}" if xs else "-"


def table(result: dict) -> str:
    s = result["setting"]
    lines = [f"# Stability ({s['size']}): {s['steps']} RL steps x {s['seeds']} seeds per variant",
             "", f"Shared setting: `{' '.join(s['flags'])}`", "",
             "| variant | collapsed | held-out before | held-out final (per seed) | max ratio | "
             "pre-clip frac | PPO-clip frac | filtered frac | reward (last 10) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, a in result["variants"].items():
        finals = ", ".join(f"{x:.3f}" if isinstance(x, (int, float)) else "-" for x in a["heldout_final"])
        ratio = max((x for x in a["ratio_max"] if isinstance(x, (int, float))), default=float("nan"))
        lines.append(f"| {name} | {a['collapsed']}/{a['seeds']} | {_mean(a['heldout_before'])} | "
                     f"{finals} | {ratio:.3g} | {_mean(a['preclip_frac_mean'])} | "
                     f"{_mean(a['clip_frac_mean'])} | {_mean(a['filtered_frac_mean'])} | "
                     f"{_mean(a['reward_final10'])} |")
    reasons = [(n, r) for n, a in result["variants"].items() for r in a["collapse_reasons"] if r]
    if reasons:
        lines += ["", "Collapses:"] + [f"- {n}: {r}" for n, r in reasons]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    titles = {"reward": "reward", "heldout_accuracy": "held-out accuracy", "ratio_max": "max ratio (log)",
              "preclip_frac": "pre-clip fraction", "clip_frac": "PPO-clip fraction",
              "response_length": "response length"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, key in zip(axes.flat, CURVES):
        for i, (name, a) in enumerate(result["variants"].items()):
            for j, c in enumerate(a["curves"]):
                pts = [(s, v) for s, v in zip(c["step"], c[key]) if isinstance(v, (int, float))]
                if key == "heldout_accuracy" and c["step"]:  # with the readings before and after RL
                    pts = [(0, a["heldout_before"][j]), *pts, (c["step"][-1], a["heldout_final"][j])]
                if pts:
                    ax.plot(*zip(*pts), color=f"C{i}", lw=1, alpha=0.8,
                            marker="o" if key == "heldout_accuracy" else None, ms=3,
                            label=name if j == 0 else None)
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("RL step")
        if key == "ratio_max":
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m r1reward.experiments", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="experiment", required=True)
    st = sub.add_parser("stability", help="StableReinforce vs Reinforce++ and ablations, several seeds")
    st.add_argument("--output", required=True, help="directory for summary.json/md, the plot and runs")
    st.add_argument("--quick", action="store_true", help="2 seeds x 30 steps (about 15 min on 2 cores)")
    st.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {','.join(VARIANTS)}")
    st.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: by size)")
    st.add_argument("--lr", type=float, default=STRESS_LR, help="learning rate of the stress setting")
    st.add_argument("--jobs", type=int, default=0,
                    help="runs at a time in worker processes (0 = one per core)")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging()
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    if a.jobs < 0:
        p.error(f"--jobs must be >= 0, got {a.jobs}")
    result = stability(out, "quick" if a.quick else "full", variants, a.seeds, a.lr,
                       a.jobs or _cores())
    print(table(result))


if __name__ == "__main__":
    main()
