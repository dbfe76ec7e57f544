"""``python -m r1reward.sft_screen``: how often a cold-start recipe forms each comparison.

Whether the tiny model's comparison of a response with the image forms in the cold start
is close to a coin toss per seed (docs/training_runs.md), so one probe says little about a
recipe. This runs ``python -m r1reward.sft_probe`` once per seed, ``--jobs`` at a time,
each on one thread (a probe is deterministic for its seed and thread count, whatever else
runs), and counts per question kind the seeds whose last reading is above chance.

    python -m r1reward.sft_screen --output DIR --seeds 3-10 --jobs 2 -- --lr 1.5e-3

Everything after ``--`` goes to every probe. Writes ``seed_<S>/`` (the probe's
``probe.jsonl`` and ``log.txt``) and ``screen.json`` to ``--output``, prints a table. A
seed whose probe already reached its last step with the same flags is read, not rerun,
so an interrupted screen resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from r1reward import machine
from r1reward.config import SFTConfig
from r1reward.rollout import CHANCE_MARGIN


def parse_seeds(spec: str) -> list[int]:
    """``"3-6,9"`` → [3, 4, 5, 6, 9]."""
    seeds: list[int] = []
    for part in filter(None, (s.strip() for s in spec.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"--seeds: {part!r} is not a seed or a range like 3-10")
        seeds += range(int(lo), int(hi or lo) + 1)
    if not seeds:
        raise ValueError("--seeds: no seed given")
    return sorted(set(seeds))


def last_reading(seed_dir: Path) -> dict | None:
    path = seed_dir / "probe.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-1] if rows else None


def formed(reading: dict) -> list[str]:
    """Question kinds judged above chance at ``reading`` (more than the at-chance margin
    above 0.5; shown in both orders, a judge that ignores the image scores 0.5)."""
    return [k for k, g in reading["groups"].items()
            if k != "all" and "/" not in k and g["accuracy"] > 0.5 + CHANCE_MARGIN]


def run_probe(seed: int, seed_dir: Path, probe_args: list[str], steps: int) -> dict:
    """The seed's last reading: read back if its probe, with the same flags, already
    reached ``steps``."""
    args_file = seed_dir / "probe_args.json"
    done = last_reading(seed_dir)
    same = args_file.exists() and json.loads(args_file.read_text()) == probe_args
    if done is not None and done["step"] >= steps and same:
        return done
    seed_dir.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps(probe_args) + "\n")
    cmd = [sys.executable, "-m", "r1reward.sft_probe", "--output", str(seed_dir),
           "--seed", str(seed), "--overwrite", *probe_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(seed_dir / "log.txt", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    reading = last_reading(seed_dir)
    if rc != 0 or reading is None:
        raise RuntimeError(f"seed {seed}: the probe exited with {rc}; see {seed_dir / 'log.txt'}")
    return reading


def summarize(readings: dict[int, dict]) -> dict:
    kinds = sorted({k for r in readings.values() for k in r["groups"] if k != "all" and "/" not in k})
    seeds = {s: {"step": r["step"], "all": r["groups"]["all"]["accuracy"],
                 **{k: r["groups"][k]["accuracy"] for k in kinds if k in r["groups"]},
                 "formed": formed(r)} for s, r in sorted(readings.items())}
    return {"n": len(seeds), "formed": {k: sum(k in v["formed"] for v in seeds.values()) for k in kinds},
            "all_formed": sum(len(v["formed"]) == len(kinds) for v in seeds.values()),
            "margin": CHANCE_MARGIN, "seeds": seeds}


def table(summary: dict) -> str:
    kinds = list(summary["formed"])
    lines = ["| seed | all | " + " | ".join(kinds) + " | formed |", "|" + "---|" * (len(kinds) + 3)]
    for s, v in summary["seeds"].items():
        cells = [f"{v[k]:.3f}" if k in v else "–" for k in kinds]
        done = ", ".join(v["formed"]) or "–"
        lines.append(f"| {s} | {v['all']:.3f} | " + " | ".join(cells) + f" | {done} |")
    n = summary["n"]
    counts = ", ".join(f"{k} {c}/{n}" for k, c in summary["formed"].items())
    lines.append(f"\nformed above chance (> 0.5 + {summary['margin']}): {counts}; "
                 f"every kind: {summary['all_formed']}/{n}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    probe_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m r1reward.sft_screen",
                                description=__doc__.split("\n")[0],
                                epilog="Arguments after -- go to every python -m r1reward.sft_probe.")
    p.add_argument("--output", required=True, help="directory for seed_<S>/ and screen.json")
    p.add_argument("--seeds", default="0-3", help="seeds, e.g. 3-10 or 0,2,5 (default 0-3)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="probes at a time, one thread each (default: the CPU count)")
    a = p.parse_args(own)
    try:
        seeds = parse_seeds(a.seeds)
    except ValueError as e:
        p.error(str(e))
    if a.jobs < 1:
        p.error("--jobs: must be >= 1")
    for flag in ("--output", "--seed", "--overwrite"):
        if flag in probe_args:
            p.error(f"{flag} after --: the screen sets it for each probe")
    steps = SFTConfig().steps
    for i, arg in enumerate(probe_args):
        if arg == "--steps" or arg.startswith("--steps="):
            value = arg.partition("=")[2] or (probe_args[i + 1] if i + 1 < len(probe_args) else "")
            if not value.isdigit():
                p.error(f"--steps after --: {value!r} is not a step count")
            steps = int(value)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    readings, failed = {}, []
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = {pool.submit(run_probe, s, out / f"seed_{s}", probe_args, steps): s for s in seeds}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="probes", unit="seed"):
            try:
                readings[futures[fut]] = fut.result()
            except RuntimeError as e:
                failed.append(str(e))
    summary = summarize(readings) if readings else {"n": 0, "formed": {}, "seeds": {}}
    # the probes inherit this environment (ATEN_CPU_CAPABILITY, MKL_CBWR) on one thread each
    summary.update(probe_args=probe_args, failed=failed,
                   machine={**machine.describe(), "torch_threads": 1})
    (out / "screen.json").write_text(json.dumps(summary, indent=2) + "\n")
    if readings:
        print(table(summary))
        print(f"machine: {machine.one_line(summary['machine'])}")
    for msg in failed:
        print(msg, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
