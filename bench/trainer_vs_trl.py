"""Our RL trainer beside TRL's GRPOTrainer, same everything, one command.

    python -m bench.trainer_vs_trl                    # 6 steps of 4 prompts x 4 samples
    python -m bench.trainer_vs_trl --steps 3 --sft-steps 100 --heldout 16   # quick look

Shared: the tiny Qwen2.5-VL checkpoint after the same short cold-start SFT (built once and
cached), the generated judge prompts with their images (every other pair swapped, as our
rollouts present them), the rule reward (format 0.5 + accuracy; no consistency judge: TRL
has none), GRPO advantages over G samples per prompt, sampling temperature 1 and the
generation length, AdamW (lr, betas, no decay, constant schedule, grad clip 1), one
on-policy optimizer step per RL step, no KL, the torch thread count. Each side runs in its
own process (``bench._trainer_side``) so peak memory is its own. The first step is warm-up
and not counted; the sides run ``--repeats`` times, interleaved, and the table shows
medians. Afterwards both final policies get the same greedy held-out evaluation (every
pair in both orders). Prints one JSON object per run and a table; writes
``<out>/trainer_vs_trl.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from ._report import _fmt


def prepare(args) -> tuple[Path, Path, Path]:
    """(cold-start checkpoint, train.jsonl, heldout.jsonl), cached under $R1REWARD_CACHE."""
    from r1reward import sft
    from r1reward.config import DataConfig, SFTConfig
    from r1reward.data import generated_split, load_pairs
    from r1reward.tiny import default_model_dir

    train, heldout = generated_split(args.n_train, args.heldout, gen_seed=0, kinds=DataConfig.kinds)
    pairs = load_pairs(train).pairs
    cfg = SFTConfig(steps=args.sft_steps)
    examples = sft.examples_for(pairs, cfg, seed=0)
    init_dir, _ = sft.cold_start(default_model_dir(), examples, cfg, seed=0,
                                 log=lambda m: print(m, file=sys.stderr))
    return init_dir, train, heldout


def run_side(side: str, args, init_dir, train, heldout, out: Path) -> dict:
    result = out / f"{side}.json"
    cmd = [sys.executable, "-m", "bench._trainer_side", side, "--init", str(init_dir),
           "--train", str(train), "--heldout", str(heldout), "--out", str(out / side),
           "--result", str(result), "--steps", str(args.steps), "--prompts", str(args.prompts),
           "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
           "--lr", str(args.lr), "--threads", str(args.threads), "--seed", str(args.seed)]
    print(f"[{side}] {' '.join(cmd[2:])}", file=sys.stderr)
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(result.read_text())


COLUMNS = [("side", "s"), ("s_per_step", ".2f"), ("rollout_s", ".2f"), ("update_s", ".2f"),
           ("response_tokens_per_s", ".1f"), ("peak_rss_mb", ".0f"), ("mean_response_len", ".1f"),
           ("heldout_acc_before", ".3f"), ("heldout_acc_after", ".3f")]


def table(rows: list[dict]) -> str:
    head = " | ".join(c for c, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" | ".join(_fmt(r.get(c), spec) for c, spec in COLUMNS))
    return "\n".join(lines)


def combine(side: str, runs: list[dict], before: float) -> dict:
    """One row per side: medians of the timings over repeats, the largest peak memory,
    the last repeat's accuracy (every repeat starts from the same seed)."""
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("s_per_step", "rollout_s", "update_s", "response_tokens_per_s", "mean_response_len")}
    return {**runs[-1], **med, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "repeats": len(runs),
            "heldout_acc_before": before}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="RL steps per side (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (GRPO group size)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--sft-steps", type=int, default=600, help="shared cold start (cached)")
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--heldout", type=int, default=64, help="held-out pairs (each judged in both orders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="r1reward,trl")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved; medians reported")
    p.add_argument("--out", default="bench_out/trainer_vs_trl")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_dir, train, heldout = prepare(args)
    from ._trainer_side import heldout_accuracy

    before = heldout_accuracy(init_dir, init_dir, heldout, args.max_new_tokens)
    sides = args.sides.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeats):  # sides interleaved, so drift of the machine hits both
        for side in sides:
            row = run_side(side, args, init_dir, train, heldout, out / f"rep{rep}")
            print(json.dumps({**row, "repeat": rep}))
            runs[side].append(row)
    rows = [combine(side, runs[side], before) for side in sides]
    if len(rows) == 2:
        a, b = rows
        per_rep = [y["s_per_step"] / x["s_per_step"] for x, y in zip(runs[a["side"]], runs[b["side"]])]
        print(f"\nthroughput {a['side']} / {b['side']}: {b['s_per_step'] / a['s_per_step']:.2f}x "
              f"(median seconds per step, steps 2..{args.steps}; per repeat "
              f"{', '.join(f'{r:.2f}x' for r in per_rep)})")
    print()
    print(table(rows))
    (out / "trainer_vs_trl.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
