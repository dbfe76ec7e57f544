"""``python -m r1reward.sft_probe``: how fast the cold start learns each kind of judgment.

Runs the embedded default's cold-start SFT (generated pairs, templated analyses, the
careless teacher as configured) and every ``--every`` steps judges a held-out slice
greedily, each pair in both orders (also at the end of the copy warm-up). Accuracy is
reported overall, per question kind and per (kind, shape), with the share of judgments
written in the careless teacher's style (no image check), the share of response claims
quoted right, the share of judgments that state the image's fact right, and of the verdicts
given after a right reading and a right quote, the share that is right: which of reading
the image, quoting a claim and comparing the two a cold start lacks. The comparison of a
response with the image forms late and abruptly, and at a different step per kind, machine
and seed (docs/training_runs.md): this is the instrument for it.

Writes ``probe.jsonl`` (one row per checkpoint) to ``--output`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from r1reward.config import DataConfig, SFTConfig
from r1reward.data import (
    GUESS_MARK,
    KINDS,
    PreferencePair,
    claims,
    generated_split,
    image_fact,
    judged_claim,
    load_pairs,
    parse_kinds,
)
from r1reward.rewards import parse_answer
from r1reward.rollout import eval_groups


def judge_groups(engine, pairs: list[PreferencePair], *, max_new_tokens: int = 80,
                 batch_size: int = 48) -> dict[str, dict]:
    """Greedy judgments of ``pairs`` in both orders, per group ("all", the kind,
    "kind/shape"): accuracy, careless share, the share of response claims quoted right
    ("Response k says <claim>"), the share of judgments that state the image's fact right
    ("read"), and "compared": of the claims quoted right and followed by one of the two
    verdicts in a judgment that read the image right, the share given the right verdict
    (None when there were none). A judgment can read and quote right and still fail the
    comparison: these tell the three apart."""
    shown = list(pairs) + [p.swapped() for p in pairs]
    counts: dict[str, list[int]] = {}
    for i in range(0, len(shown), batch_size):
        chunk = shown[i:i + batch_size]
        gen = engine.generate(chunk, do_sample=False, max_new_tokens=max_new_tokens, num_samples=1)
        for p, text in zip(chunk, gen.texts):
            said = claims(p)
            quoted = sum(f"Response {r} says {said[r]}" in text for r in (1, 2))
            read = f"The image shows {image_fact(p)}." in text
            judged = [r for r in (1, 2) if read and any(
                judged_claim(r, said[r], ok) in text for ok in (True, False))]
            compared = [judged_claim(r, said[r], r == p.preferred) in text for r in judged]
            for key in ("all", *eval_groups(p)):
                c = counts.setdefault(key, [0] * 7)
                c[0] += parse_answer(text) == p.preferred
                c[1] += GUESS_MARK in text
                c[2] += 1
                c[3] += quoted
                c[4] += read
                c[5] += len(compared)
                c[6] += sum(compared)
    return {k: {"accuracy": c[0] / c[2], "careless": c[1] / c[2], "quoted": c[3] / (2 * c[2]),
                "read": c[4] / c[2], "compared": c[6] / c[5] if c[5] else None, "n": c[2]}
            for k, c in sorted(counts.items())}


def probe(out: Path, cfg: SFTConfig, *, every: int, kinds: tuple[str, ...], n_train: int,
          n_heldout: int, seed: int, log=None) -> list[dict]:
    """SFT with a held-out reading every ``every`` steps (and at the last); progress rows
    go to ``log`` (default: stderr), every row to ``out/probe.jsonl``."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    from r1reward import sft
    from r1reward.engine import HFEngine
    from r1reward.model import load_model_and_processor

    train_file, held_file = generated_split(n_train, n_heldout, 0, kinds)
    train = load_pairs(train_file, strict=True).pairs
    held = load_pairs(held_file, strict=True).pairs
    examples = sft.examples_for(train, cfg, seed)
    model, processor = load_model_and_processor(None)
    engine = HFEngine(model, processor)
    rows: list[dict] = []
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    sink = open(out / "probe.jsonl", "w", encoding="utf-8")

    n_warm = sft.warmup_steps(cfg)
    n_read = sft.reading_steps(cfg, n_warm)
    ends = {n_read, n_read + n_warm, cfg.steps} - {0}  # each warm-up's last step and the last

    def checkpoint(step: int, losses: list[float]) -> None:
        if step % every and step not in ends:
            return
        recent = losses[-every:]
        row = {"step": step, "loss": sum(recent) / len(recent), "seconds": time.time() - t0,
               "groups": judge_groups(engine, held)}
        rows.append(row)
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        log(table(rows) if len(rows) == 1 else table_row(row, columns(rows)))

    with sink:
        sft.train_cold_start(model, processor, examples, cfg, seed=seed, log=lambda _: None,
                             after_step=checkpoint)
    return rows


def columns(rows: list[dict]) -> list[str]:
    groups = rows[0]["groups"]
    return ["all"] + [k for k in groups if k != "all" and "/" not in k] + \
        [k for k in groups if "/" in k]


def table_row(row: dict, cols: list[str]) -> str:
    g = row["groups"]
    cells = [f"{g[c]['accuracy']:.3f}" for c in cols]
    a = g["all"]
    tail = [f"{a[k]:.3f}" if a.get(k) is not None else "–"
            for k in ("careless", "quoted", "read", "compared")]
    return f"| {row['step']} | {row['loss']:.4f} | " + " | ".join(cells + tail) + " |"


def table(rows: list[dict]) -> str:
    cols = columns(rows)
    head = "| step | loss | " + " | ".join(cols) + " | careless | quoted | read | compared |"
    rule = "|" + "---|" * (len(cols) + 6)
    return "\n".join([head, rule] + [table_row(r, cols) for r in rows])


def main(argv=None) -> None:
    d, dd = SFTConfig(), DataConfig()
    p = argparse.ArgumentParser(prog="python -m r1reward.sft_probe", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="directory for probe.jsonl")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--every", type=int, default=250, help="SFT steps between held-out readings")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--image-variants", type=int, default=d.image_variants,
                   help="images per example in the cold start proper (1 = the pair's own)")
    p.add_argument("--decay-from", type=float, default=d.decay_from,
                   help="share of the cold start proper at a constant lr before the cosine decay")
    p.add_argument("--both-orders", type=int, choices=(0, 1), default=int(d.both_orders),
                   help="1: every training pair in both orders")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--guess-rate", type=float, default=d.guess_rate)
    p.add_argument("--guess-on", default=d.guess_on)
    p.add_argument("--copy-warmup", type=float, default=d.copy_warmup,
                   help="share of --steps spent first on the copy warm-up (0 = none)")
    p.add_argument("--copy-warmup-on", default=d.copy_warmup_on,
                   help='question kinds the copy warm-up quotes ("" = all)')
    p.add_argument("--blank-judge-on", default=d.blank_judge_on,
                   help='question kinds whose judgments join the mix again on a blank image ("" = all)')
    p.add_argument("--copy-warmup-judge", type=int, choices=(0, 1), default=int(d.copy_warmup_judge),
                   help="1: the copy warm-up's targets are full judgments (no loss on the fact)")
    p.add_argument("--copy-warmup-image", choices=("blank", "own"), default=d.copy_warmup_image,
                   help="the copy warm-up's image: blank, or each pair's own")
    p.add_argument("--blank-fact-loss", type=int, choices=(0, 1), default=int(d.blank_fact_loss),
                   help="1: train the fact the blank-image judgments state; 0: no loss on it")
    p.add_argument("--read-on", default=d.read_on,
                   help='question kinds whose pairs also teach reading the image alone ("" = none)')
    p.add_argument("--read-warmup", type=float, default=d.read_warmup,
                   help="share of --steps spent first on reading the image alone (0 = none)")
    p.add_argument("--kinds", default=dd.kinds, help="question kinds of the generated set")
    p.add_argument("--n-train", type=int, default=dd.n_train)
    p.add_argument("--n-heldout", type=int, default=96, help="held-out pairs judged per reading")
    p.add_argument("--seed", type=int, default=0, help="the cold start's seed (order, teacher)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier probe.jsonl in --output")
    a = p.parse_args(argv)
    if (Path(a.output) / "probe.jsonl").exists() and not a.overwrite:
        p.error(f"--output {a.output}: probe.jsonl exists (an earlier probe); pass --overwrite "
                "to replace it, or choose another directory")
    kinds = parse_kinds(a.kinds)

    def known(spec: str) -> bool:
        return set(parse_kinds(spec)) <= set(KINDS)

    for name, ok in (("--steps", a.steps >= 1), ("--copy-warmup", 0 <= a.copy_warmup < 1),
                     ("--read-warmup", 0 <= a.read_warmup < 1),
                     ("--decay-from", 0 <= a.decay_from < 1),
                     ("--image-variants", a.image_variants >= 1),
                     ("--every", a.every >= 1),
                     ("--n-heldout", a.n_heldout >= 1), ("--n-train", a.n_train >= 1),
                     ("--guess-rate", 0 <= a.guess_rate <= 1), ("--lr", a.lr > 0),
                     ("--kinds", bool(kinds) and known(a.kinds)),
                     ("--copy-warmup-on", known(a.copy_warmup_on)),
                     ("--blank-judge-on", known(a.blank_judge_on)),
                     ("--read-on", known(a.read_on))):
        if not ok:
            p.error(f"{name}: invalid value")
    cfg = SFTConfig(steps=a.steps, lr=a.lr, decay_from=a.decay_from, batch_size=a.batch_size,
                    guess_rate=a.guess_rate, guess_on=a.guess_on, copy_warmup=a.copy_warmup,
                    copy_warmup_on=a.copy_warmup_on, blank_judge_on=a.blank_judge_on,
                    blank_fact_loss=bool(a.blank_fact_loss),
                    copy_warmup_judge=bool(a.copy_warmup_judge), copy_warmup_image=a.copy_warmup_image,
                    read_on=a.read_on, read_warmup=a.read_warmup, image_variants=a.image_variants,
                    both_orders=bool(a.both_orders))
    rows = probe(Path(a.output), cfg, every=a.every, kinds=kinds, n_train=a.n_train,
                 n_heldout=a.n_heldout, seed=a.seed)
    print(table(rows))


if __name__ == "__main__":
    main()
