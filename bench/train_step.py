"""Cold-start training step of the embedded tiny model: the teacher-forced forward with the
padding mask against the padding-free layout the trainer uses (``r1reward.logprobs.causal_layout``).

    python -m bench.train_step [--batches 8] [--batch-size 16] [--rounds 8]

Builds the default tiny Qwen2.5-VL (cached) and the default generated training pairs with
their cold-start targets, encodes ``--batches`` batches once, then times AdamW steps of
``sft_loss`` over all of them, the two layouts alternating ``--rounds`` times in one
process (the box's drift hits both alike). Prints one JSON object per layout (min and
median ms per step) and a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from ._report import _fmt


def _batches(n_batches: int, batch_size: int):
    from r1reward.config import SFTConfig
    from r1reward.data import DEFAULT_KINDS, generated_split, load_pairs
    from r1reward.model import load_model_and_processor
    from r1reward.sft import PromptCache, examples_for, make_batch

    train, _ = generated_split(max(64, n_batches * batch_size), 8, 0, DEFAULT_KINDS)
    examples = examples_for(load_pairs(train, strict=True).pairs, SFTConfig(), 0)
    model, processor = load_model_and_processor(None)
    prompts, encoded, out = PromptCache(processor), {}, []
    for i in range(n_batches):
        chosen = examples[i * batch_size:(i + 1) * batch_size]
        out.append(make_batch(processor, chosen, "cpu", encoded=encoded,
                              prompt=prompts([p for p, _ in chosen], "cpu")))
    return model, out


def measure(n_batches: int = 8, batch_size: int = 16, rounds: int = 8) -> list[dict]:
    import torch

    from r1reward import logprobs
    from r1reward.logprobs import FusedLMHead, sft_loss

    model, batches = _batches(n_batches, batch_size)
    FusedLMHead.install(model, backend="auto")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    layouts = {"padding mask": lambda _batch: None, "causal layout": logprobs.causal_layout}
    real = logprobs.causal_layout

    def run_all():
        for b in batches:
            loss = sft_loss(model, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    times: dict[str, list[float]] = {k: [] for k in layouts}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for name, fn in layouts.items():
                logprobs.causal_layout = fn
                t = time.perf_counter()
                run_all()
                if r:
                    times[name].append((time.perf_counter() - t) / len(batches) * 1e3)
    finally:
        logprobs.causal_layout = real
    columns = statistics.mean(b.attention_mask.shape[1] for b in batches)
    return [{"layout": k, "ms_per_step_min": min(v), "ms_per_step_median": statistics.median(v),
             "rounds": len(v), "batch_size": batch_size, "batches": n_batches,
             "columns": columns, "threads": torch.get_num_threads()} for k, v in times.items()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    a = p.parse_args(argv)
    for name, v in (("--batches", a.batches), ("--batch-size", a.batch_size), ("--rounds", a.rounds)):
        if v < 1:
            p.error(f"{name} must be ≥ 1, got {v}")
    rows = measure(a.batches, a.batch_size, a.rounds)
    for r in rows:
        print(json.dumps(r))
    base = rows[0]["ms_per_step_median"]
    cols = [("layout", "s"), ("ms_per_step_min", ".1f"), ("ms_per_step_median", ".1f")]
    print(" | ".join(c for c, _ in cols) + " | × padding mask (median)")
    print(" | ".join("---" for _ in range(len(cols) + 1)))
    for r in rows:
        print(" | ".join(_fmt(r[c], f) for c, f in cols) + f" | {r['ms_per_step_median'] / base:.2f}")


if __name__ == "__main__":
    main()
