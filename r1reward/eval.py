"""Benchmark harness: ``python -m r1reward.eval --bench NAME --data FILE --images DIR
[--model PATH] [--k K] [--swap] --output DIR``.

Writes ``DIR/results.jsonl`` (one object per item and presentation order: key, id,
category, order, votes, p1, correct), ``DIR/summary.json`` (the metrics of
r1reward.benchmarks.summarize, keyed by K under "by_k"), ``DIR/accuracy_vs_k.png`` and a
per-category table on the terminal. A rerun with the same --output skips the rows that
are already there, so an interrupted run resumes. Items whose record is malformed or
whose image is missing/unreadable are listed in the summary by id and never scored.

``--bench pairs`` reads release-format preference pairs (r1reward.data.load_pairs); with
no --data it evaluates the generated held-out split (the same pairs the trainer holds
out for the same --seed and --n-heldout).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import benchmarks as B
from .config import DataConfig
from .data import generated_split, load_pairs
from .judge import add_engine_args, engine_kwargs, model_label

PAIRS = "pairs"


def load_items(bench: str, data, images, n_heldout: int = 64, seed: int = 0, cache=None,
               kinds: str = DataConfig.kinds) -> B.BenchLoad:
    if bench != PAIRS:
        if data is None:
            raise SystemExit(f"--data is required for --bench {bench}")
        return B.load_bench(bench, data, images)
    if data is None:  # the generated held-out split (it does not depend on the train size)
        _, data = generated_split(0, n_heldout, seed, kinds, cache=cache)
    res = load_pairs(data)
    out = B.BenchLoad([], [(f"line {n}", why) for n, why in res.skipped])
    for p in res.pairs:  # load_pairs refuses repeated ids, so the id is the key
        chosen, rejected = (p.response_1, p.response_2) if p.preferred == 1 else (p.response_2, p.response_1)
        out.items.append(B.BenchItem(key=p.id, id=p.id,
                                     category=(p.meta or {}).get("kind", "pairs"), image=p.image,
                                     question=p.question, chosen=chosen, rejected=rejected))
    return out


def read_results(path: Path, k: int) -> dict:
    """(key, order) -> row, for rows that already hold at least k votes (last one wins)."""
    done = {}
    if path.is_file():
        # errors="replace": a write cut inside a multi-byte character is just a bad line
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted write is simply redone
            if isinstance(row, dict) and len(row.get("votes", [])) >= k:
                done[(row["key"], row["order"])] = row
    return done


def check_run(out: Path, run: dict, overwrite: bool):
    """Refuse to mix results of a different model/benchmark into one results.jsonl."""
    path = out / "run.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        diff = [k for k in ("bench", "data", "model") if old.get(k) != run.get(k)]
        if diff:
            raise SystemExit(f"{out} holds results of a different run ({', '.join(diff)} differ: "
                             f"{ {k: old.get(k) for k in diff} }); use another --output or --overwrite")
    if overwrite and (out / "results.jsonl").is_file():
        (out / "results.jsonl").unlink()
    path.write_text(json.dumps(run, indent=1))


def evaluate(judge, items, out: Path, k: int, orders, batch_size: int, progress=True) -> tuple[list, list]:
    """Judge every (item, order) not yet in results.jsonl; returns (rows, runtime skips)."""
    from tqdm import tqdm

    from .judge import PairRequest, to_image
    path = out / "results.jsonl"
    done = read_results(path, k)
    todo = [(it, o) for it in items for o in orders if (it.key, o) not in done]
    skipped, bar = [], tqdm(total=len(items) * len(orders), initial=len(items) * len(orders) - len(todo),
                            desc="judging", unit="row", disable=not progress)
    bad_keys = set()
    with path.open("a", encoding="utf-8") as f:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # end a line cut by an interrupted run before appending
        for s in range(0, len(todo), batch_size):
            chunk, reqs = [], []
            for it, o in todo[s:s + batch_size]:
                if it.key in bad_keys:
                    continue
                try:
                    image = to_image(it.image) if it.image else None
                except (OSError, ValueError) as e:
                    bad_keys.add(it.key)
                    skipped.append((it.id, str(e)))
                    continue
                r1, r2 = (it.chosen, it.rejected) if o == "chosen_first" else (it.rejected, it.chosen)
                chunk.append((it, o))
                reqs.append(PairRequest(image, it.question, r1, r2))
            samples = judge.sample(reqs, k, early_stop=False) if reqs else []
            for (it, o), smp in zip(chunk, samples):
                row = {"key": it.key, "id": it.id, "category": it.category, "order": o,
                       "votes": smp.votes, "p1": [round(p, 6) for p in smp.p1],
                       "correct": B.majority(smp.votes) == B.target(o), "k": k,
                       "analysis": smp.texts[0][:2000] if smp.texts else ""}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[(it.key, o)] = row
            f.flush()
            bar.update(len(todo[s:s + batch_size]))
    bar.close()
    rows = [r for (key, _), r in done.items() if key not in bad_keys]
    return rows, skipped


def print_table(summary: dict, file=None):
    file = file or sys.stdout
    ks = list(summary["by_k"])
    cats = sorted({c for m in summary["by_k"].values() for c in m["per_category"]})
    w = max([len(c) for c in cats] + [26])
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"
    print(f"{'':{w}} " + " ".join(f"  K={k:<3}" for k in ks), file=file)
    lines = [(c, lambda m, c=c: m["per_category"].get(c)) for c in cats]
    lines += [("overall accuracy", lambda m: m["overall_accuracy"])]
    for name in ("macro_accuracy", "acc_plus"):
        if name in summary:
            lines.append((name.replace("_", " "), lambda m, n=name: m[n]))
    lines += [("accuracy, chosen first", lambda m: m["accuracy_by_order"]["chosen_first"]),
              ("accuracy, chosen second", lambda m: m["accuracy_by_order"]["chosen_second"]),
              ("debiased score accuracy", lambda m: m["debiased_score_accuracy"]),
              ("Any@K", lambda m: m["any_at_k"]), ("flip rate under swap", lambda m: m["flip_rate"]),
              ("answer-1 rate", lambda m: m["answer1_rate"]),
              ("no-verdict rate", lambda m: m["no_verdict_rate"])]
    for name, get in lines:
        print(f"{name:{w}} " + " ".join(f"{fmt(get(summary['by_k'][k])):>7}" for k in ks), file=file)


def plot(summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [int(k) for k in summary["by_k"]]
    ms = list(summary["by_k"].values())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [m["overall_accuracy"] for m in ms], "o-", label="Voting@K")
    ax.plot(ks, [m["any_at_k"] for m in ms], "s--", label="Any@K")
    if any(m.get("debiased_score_accuracy") is not None for m in ms):
        ax.plot(ks, [m.get("debiased_score_accuracy") for m in ms], "^-.", label="debiased score")
    for c in sorted(ms[-1]["per_category"]):
        ax.plot(ks, [m["per_category"].get(c) for m in ms], ":", alpha=0.7, label=c)
    ax.set_xlabel("K (sampled judgments)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(ks)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['bench']}: accuracy vs K")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m r1reward.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--bench", required=True, choices=[*B.BENCHES, PAIRS])
    ap.add_argument("--data", default=None,
                    help="benchmark jsonl (default for pairs: the generated held-out split)")
    ap.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    ap.add_argument("--output", default="eval_out")
    ap.add_argument("--k", type=int, default=1, help="sampled judgments per order (1 = greedy)")
    ap.add_argument("--swap", action="store_true", help="also judge with the chosen response second")
    ap.add_argument("--limit", type=int, default=None, help="first N items only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"default: {RELEASE_MAX_NEW_TOKENS} (the release's length) for a real "
                         f"checkpoint, {TINY_MAX_NEW_TOKENS} for the embedded tiny model and its exports")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    add_engine_args(ap)
    ap.add_argument("--n-heldout", type=int, default=DataConfig.n_heldout)
    ap.add_argument("--kinds", default=DataConfig.kinds,
                    help="question kinds of the generated held-out split (the trainer's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="discard earlier results in --output")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.k < 1 or a.batch_size < 1:
        ap.error("--k and --batch-size must be >= 1")
    return a


TINY_MAX_NEW_TOKENS = 256
RELEASE_MAX_NEW_TOKENS = 4096  # the release evaluates with long analyses (SPEC §3)


def default_max_new_tokens(model_dir) -> int:
    """The release's generation length for a real checkpoint; short judgments for the
    embedded tiny model (text width <= 256) and what is trained from it."""
    if model_dir is None:
        return TINY_MAX_NEW_TOKENS
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    hidden = getattr(cfg.get_text_config(), "hidden_size", None) or 0
    return TINY_MAX_NEW_TOKENS if hidden <= 256 else RELEASE_MAX_NEW_TOKENS


def main(argv=None, judge=None) -> dict:
    """Run the harness; ``judge`` lets tests inject a scripted RewardJudge."""
    a = parse_args(argv)
    t0 = time.time()
    load = load_items(a.bench, a.data, a.images, a.n_heldout, a.seed, kinds=a.kinds)
    items = load.items[:a.limit] if a.limit else load.items
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    generated = f"generated held-out n={a.n_heldout} seed={a.seed} kinds={a.kinds}"
    run = {"bench": a.bench, "data": str(a.data) if a.data else generated,
           "model": model_label(a)}
    check_run(out, run, a.overwrite)
    for ref, why in load.skipped:
        print(f"skipped {ref}: {why}", file=sys.stderr)
    if judge is None:
        from .judge import RewardJudge
        if a.max_new_tokens is None:  # read from the checkpoint only when it is loaded
            a.max_new_tokens = default_max_new_tokens(a.model)
            print(f"--max-new-tokens {a.max_new_tokens} (default for this checkpoint)", file=sys.stderr)
        judge = RewardJudge.from_pretrained(a.model, device=a.device, max_new_tokens=a.max_new_tokens,
                                            temperature=a.temperature, max_batch=a.batch_size,
                                            **engine_kwargs(a))
    orders = B.ORDERS if a.swap else B.ORDERS[:1]
    rows, late = evaluate(judge, items, out, a.k, orders, a.batch_size, progress=not a.no_progress)
    for ref, why in late:
        print(f"skipped {ref}: {why}", file=sys.stderr)
    skipped = load.skipped + late
    summary = B.summarize(a.bench, items, rows, a.k)
    summary.update(run, k_max=a.k, swap=a.swap, n_items=len(items) - len(late),
                   n_skipped=len(skipped), skipped=[{"id": r, "reason": w} for r, w in skipped],
                   seconds=round(time.time() - t0, 1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "accuracy_vs_k.png")
    print(f"{a.bench}: {summary['n_items']} items, {len(skipped)} skipped, orders: {', '.join(orders)}")
    print_table(summary)
    print(f"wrote {out / 'results.jsonl'}, {out / 'summary.json'}, {out / 'accuracy_vs_k.png'}")
    return summary


if __name__ == "__main__":
    main()
