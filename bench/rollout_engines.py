"""Rollout throughput: the HF engine against vLLM, and HF under FSDP2 before/after gathering
the blocks once per rollout.

    .venv-vllm/bin/python -m bench.rollout_engines engines   # hf vs vllm, one process
    python -m bench.rollout_engines fsdp                     # 2 CPU ranks (torchrun, gloo)

Both modes sample ``--samples`` judgments for each of ``--prompts`` generated pairs (with
their images) from the embedded tiny model in its vLLM variant (random weights: every
sample runs to ``--max-new-tokens``, so both sides generate the same number of tokens),
at temperature 0.7. A first call per side warms up (vLLM compiles kernels on its first
batch) and is not counted; the sides then run ``--repeats`` times, interleaved; the table
shows medians of generated tokens per second. Prints one JSON object per measurement and
a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ._report import _fmt


def _pairs(n: int):
    from r1reward.data import generated_split, load_pairs
    train, _ = generated_split(max(n, 8), 8, 0, ("color", "shape"))
    return load_pairs(train).pairs[:n]


def _time(engine, pairs, args) -> dict:
    import torch
    torch.manual_seed(0)
    t = time.perf_counter()
    gen = engine.generate(pairs, do_sample=True, temperature=0.7, max_new_tokens=args.max_new_tokens,
                          num_samples=args.samples)
    s = time.perf_counter() - t
    n = int(gen.response_mask.sum())
    return {"seconds": s, "tokens": n, "tokens_per_s": n / s}


def _table(rows: list[dict], key: str) -> None:
    cols = [(key, "s"), ("tokens_per_s", ".0f"), ("seconds", ".2f"), ("tokens", "d"), ("runs", "d")]
    print(" | ".join(c for c, _ in cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(_fmt(r[c], f) for c, f in cols))


def _summarize(results: dict[str, list[dict]], key: str, setting: dict) -> list[dict]:
    rows = []
    for name, runs in results.items():
        rows.append({key: name, "runs": len(runs),
                     **{k: statistics.median(r[k] for r in runs)
                        for k in ("tokens_per_s", "seconds", "tokens")}})
        rows[-1]["tokens"] = int(rows[-1]["tokens"])
    print(json.dumps({"summary": rows, "setting": setting}))
    _table(rows, key)
    return rows


def engines(args) -> None:
    import torch

    from r1reward.engine import HFEngine
    from r1reward.engine_vllm import VLLMEngine
    from r1reward.model import load_model_and_processor
    from r1reward.tiny import VLLM_HEADS, default_model_dir

    torch.set_num_threads(args.threads)  # before vLLM binds its threads
    model_dir = default_model_dir(VLLM_HEADS)
    model, proc = load_model_and_processor(model_dir)
    pairs = _pairs(args.prompts)
    sides = {"hf": HFEngine(model, proc), "hf, static cache": HFEngine(model, proc, static_cache=True),
             "vllm": VLLMEngine(model_dir, proc, kv_cache_gb=1.0, max_model_len=2048)}
    for engine in sides.values():
        _time(engine, pairs[:2], args)  # warm-up
    results = {k: [] for k in sides}
    for rep in range(args.repeats):
        for name, engine in sides.items():
            r = _time(engine, pairs, args)
            print(json.dumps({"engine": name, "repeat": rep, **r}), flush=True)
            results[name].append(r)
    _summarize(results, "engine", vars(args))


def fsdp_worker(args) -> None:
    import torch
    import torch.distributed as dist

    from r1reward.engine import HFEngine
    from r1reward.model import load_model_and_processor
    from r1reward.parallelize import init_distributed, parallelize
    from r1reward.tiny import VLLM_HEADS, default_model_dir

    torch.set_num_threads(1)
    d = init_distributed(fsdp=True)
    model, proc = load_model_and_processor(default_model_dir(VLLM_HEADS))
    parallelize(model, fsdp=True, compile=False, ac=False, device=d.device)
    pairs = _pairs(args.prompts * 2)[d.rank::2]
    sides = {"sharded (gather per step)": HFEngine(model, proc, unshard_once=False),
             "gather once per rollout": HFEngine(model, proc, unshard_once=True)}
    for engine in sides.values():
        _time(engine, pairs[:2], args)
    results = {k: [] for k in sides}
    for rep in range(args.repeats):
        for name, engine in sides.items():
            dist.barrier()
            r = _time(engine, pairs, args)
            tokens = torch.tensor([float(r["tokens"])])
            seconds = torch.tensor([r["seconds"]])
            dist.all_reduce(tokens)  # both ranks' tokens
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the rollout ends with the slower rank
            r = {"tokens": int(tokens.item()), "seconds": seconds.item(),
                 "tokens_per_s": tokens.item() / seconds.item()}
            if d.rank == 0:
                print(json.dumps({"fsdp_hf": name, "repeat": rep, **r}), flush=True)
            results[name].append(r)
    if d.rank == 0:
        _summarize(results, "fsdp_hf", {**vars(args), "ranks": 2})
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rollout_engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("engines", "fsdp"))
    p.add_argument("--prompts", type=int, default=16, help="prompts per rollout (per rank: fsdp)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode == "engines":
        return engines(args)
    if args.worker:
        return fsdp_worker(args)
    from r1reward.tiny import VLLM_HEADS, default_model_dir
    default_model_dir(VLLM_HEADS)  # build once before the ranks start
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bench.rollout_engines", "fsdp", "--worker", "--prompts", str(args.prompts),
           "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
           "--repeats", str(args.repeats)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   cwd=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    main()
