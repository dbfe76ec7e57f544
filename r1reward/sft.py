"""Cold-start SFT: teach the ``<think>…</think><answer>N</answer>`` format before RL.

``python -m r1reward.sft --model DIR --data FILE.jsonl --output DIR`` trains on
release-format records that carry the target judgment in a ``response`` field (real
long-CoT data); without ``--data`` it uses templated analyses of the generated set
(``r1reward.data.templated_analysis``). The result is a Hugging Face directory.

:func:`cold_start` is what the trainer calls: it caches the result under
``<cache>/sft/<hash of model, examples, settings>`` so a second run reuses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from r1reward.cache import build_once, cache_root
from r1reward.config import SFTConfig
from r1reward.data import (
    DEFAULT_KINDS,
    KINDS,
    PreferencePair,
    blank_image,
    generated_split,
    guessed_analysis,
    image_fact,
    image_variants,
    load_pairs,
    parse_kinds,
    quoted_claims,
    stated_fact,
    templated_analysis,
)
from r1reward.export import export_hf
from r1reward.generation import build_prompt_inputs
from r1reward.logprobs import FusedLMHead, SeqBatch, build_seq_batch, sft_loss
from r1reward.model import load_model_and_processor
from r1reward.tiny import default_model_dir

logger = logging.getLogger(__name__)

SFT_VERSION = 2  # bump when the recipe changes, so stale caches are not reused


def templated_examples(pairs: list[PreferencePair], n: int, seed: int, guess_rate: float = 0.0,
                       guess_on: tuple[str, ...] = (), both_orders: bool = False
                       ) -> list[tuple[PreferencePair, str]]:
    """A seeded subset of ``n`` pairs, every other one swapped (with ``both_orders``, each
    in both orders), with templated targets.

    A ``guess_rate`` fraction of the targets (only of pairs whose question kind or shape
    is in ``guess_on``, when given) come from a teacher that skips the image check and
    picks a response at random (:func:`r1reward.data.guessed_analysis`)."""
    if not 0.0 <= guess_rate <= 1.0:
        raise ValueError(f"sft.guess_rate must be in [0, 1], got {guess_rate!r}")
    rng = random.Random(f"sft-{seed}")
    chosen = rng.sample(pairs, min(n, len(pairs))) if n > 0 else list(pairs)
    shown = [p.swapped() if i % 2 else p for i, p in enumerate(chosen)]
    if both_orders:
        shown += [p.swapped() for p in shown]
    teacher = random.Random(f"sft-guess-{seed}")  # separate stream: guess_rate 0 = as before
    out = []
    for p in shown:
        eligible = not guess_on or bool({p.meta.get("kind"), p.meta.get("shape")} & set(guess_on))
        if teacher.random() < guess_rate and eligible:
            out.append((p, guessed_analysis(p, teacher.choice((1, 2)))))
        else:
            out.append((p, templated_analysis(p)))
    return out


def examples_for(pairs: list[PreferencePair], cfg: SFTConfig, seed: int
                 ) -> list[tuple[PreferencePair, str]]:
    """The templated cold-start examples ``cfg`` asks for (subset, careless teacher)."""
    guess_on = tuple(k.strip() for k in cfg.guess_on.split(",") if k.strip())
    return templated_examples(pairs, cfg.n_examples, seed, cfg.guess_rate, guess_on,
                              both_orders=cfg.both_orders)


class Target(str):
    """A target text whose ``unsupervised`` character spans are shown to the model but
    carry no loss (it reads them, teacher-forced, and is not trained to write them)."""

    unsupervised: tuple[tuple[int, int], ...] = ()

    @classmethod
    def masked(cls, text: str, spans) -> Target:
        t = cls(text)
        t.unsupervised = tuple(spans)
        return t


def on_blank_image(examples: list[tuple[PreferencePair, str]], kinds: tuple[str, ...] = (),
                   quote_only: bool = False, fact_loss: bool = True, keep_image: bool = False
                   ) -> list[tuple[PreferencePair, str]]:
    """Generated pairs (of ``kinds``, when given) shown with a blank image, so a response's
    claim can only be read from the response. With ``quote_only`` the target only quotes
    each claim (:func:`r1reward.data.quoted_claims`: the copy warm-up); otherwise it is
    the example's own judgment, whose verdicts then follow from the quotes and the stated
    fact alone. With ``fact_loss`` off, the stated fact carries no loss (a blank image
    cannot show it: trained, it teaches stating a response's claim as the image's fact).
    ``keep_image`` shows each pair's own image instead (the same targets, for a base that
    already reads: quoting is then learnt while the image is legible).
    Pairs without generated meta (release data) are left out."""
    blank = None if keep_image else str(blank_image())
    out = []
    for p, target in examples:
        if p.meta.get("kind") not in (kinds or KINDS):
            continue
        if quote_only:
            target = quoted_claims(p)
        elif not fact_loss:
            fact = image_fact(p)
            at = target.find(fact)
            if at >= 0:
                target = Target.masked(target, [(at, at + len(fact))])
        out.append((p if keep_image else dataclasses.replace(p, image=blank), target))
    return out


def reading_only(examples: list[tuple[PreferencePair, str]], kinds: tuple[str, ...]
                 ) -> list[tuple[PreferencePair, str]]:
    """Generated pairs of ``kinds`` with both responses emptied and a target that only
    states the asked fact (:func:`r1reward.data.stated_fact`): the fact can then only come
    from the image, never from a copied claim. Pairs without generated meta are left out."""
    out = []
    for p, _ in examples:
        if p.meta.get("kind") in kinds:
            out.append((dataclasses.replace(p, response_1="", response_2=""), stated_fact(p)))
    return out


def load_sft_file(path: str | Path) -> tuple[list[tuple[PreferencePair, str]], list[str]]:
    """Release-format records + ``response`` (the target judgment). Returns (examples,
    skipped reasons); lines without a usable ``response`` are skipped with the line named."""
    path = Path(path)
    loaded = load_pairs(path)
    skipped = [r for _, r in loaded.skipped]
    targets = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # already reported by load_pairs
            if not isinstance(rec, dict):
                continue
            rid = str(rec.get("id", f"line-{line_no}"))
            resp = rec.get("response")
            if isinstance(resp, str) and resp.strip():
                targets[rid] = resp.strip()
            else:
                skipped.append(f"{path}:{line_no}: field 'response' missing or empty "
                               "(the SFT target judgment)")
    examples = [(p, targets[p.id]) for p in loaded.pairs if p.id in targets]
    if not examples:
        raise ValueError(f"{path}: no usable SFT examples ({len(skipped)} skipped: "
                         f"{skipped[:3]})")
    return examples, skipped


def end_of_turn_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tid is None or tid == tokenizer.unk_token_id:
        tid = tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token to end a turn")
    return tid


def make_batch(processor, examples: list[tuple[PreferencePair, str]], device,
               prompt=None, encoded: dict[str, list[int]] | None = None) -> SeqBatch:
    """Prompt (chat template, left-padded) + target tokens and end-of-turn (right-padded);
    ``prompt``: the prompts' processor output when the caller already has it; ``encoded``:
    a memo of target text → token ids that the caller keeps across batches."""
    if prompt is None:
        prompt = build_prompt_inputs(processor, [p for p, _ in examples], device)
    tok = processor.tokenizer
    eot = end_of_turn_id(tok)
    memo = {} if encoded is None else encoded
    keys = [(str(t), getattr(t, "unsupervised", ())) for _, t in examples]
    for key in keys:
        if key not in memo:
            memo[key] = encode_target(tok, *key)
    ids = [memo[k][0] + [eot] for k in keys]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    resp = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        resp[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    seqs = torch.cat([prompt["input_ids"], resp.to(device)], 1)
    batch = build_seq_batch(prompt, seqs, prompt["input_ids"].shape[1], mask.to(device))
    if any(k[1] for k in keys):  # the attention mask is built: only the loss mask changes
        loss_mask = mask.clone()
        for i, k in enumerate(keys):
            for j in memo[k][1]:
                loss_mask[i, j] = 0
        batch = dataclasses.replace(batch, response_mask=loss_mask.to(device))
    return batch


def encode_target(tok, text: str, unsupervised=()) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the indices of those that overlap an ``unsupervised``
    character span."""
    if not unsupervised:
        return tok(text, add_special_tokens=False)["input_ids"], []
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    skip = [j for j, (s, e) in enumerate(enc["offset_mapping"])
            if any(s < hi and e > lo for lo, hi in unsupervised)]
    return enc["input_ids"], skip


class PromptCache:
    """Each example's prompt through the processor once (image decoded, resized and cut
    into patches, chat template tokenized), collated per batch as the processor would
    (left padding with the pad token, mask 0): SFT revisits every example ~50 times."""

    # per-token keys, left-padded with (pad id | 0)
    TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")

    def __init__(self, processor):
        self.processor, self.single = processor, {}

    def __call__(self, pairs: list[PreferencePair], device) -> dict:
        if any(p.image is None for p in pairs):  # text-only and mixed batches: the processor's way
            return build_prompt_inputs(self.processor, pairs, device)
        rows = []
        for p in pairs:
            if id(p) not in self.single:
                self.single[id(p)] = (p, build_prompt_inputs(self.processor, [p]))
            rows.append(self.single[id(p)][1])
        width = max(r["input_ids"].shape[1] for r in rows)
        pad = self.processor.tokenizer.pad_token_id
        out = {}
        for k in rows[0]:
            if k in self.TOKEN_KEYS:
                fill = pad if k == "input_ids" else 0
                out[k] = torch.cat([torch.nn.functional.pad(r[k], (width - r[k].shape[1], 0),
                                                            value=fill) for r in rows])
            else:  # per image: pixel_values (patches), image_grid_thw
                out[k] = torch.cat([r[k] for r in rows])
        return {k: v.to(device) for k, v in out.items()}


def lr_factor(step: int, steps: int, decay_from: float = 0.0) -> float:
    """The cold start's lr multiplier at ``step`` of ``steps``: 1 for the first
    ``decay_from`` share of the steps, then a cosine down to 0 at the last step."""
    flat = round(decay_from * steps)
    if step < flat:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step - flat, steps - flat) / max(steps - flat, 1)))


def train_sft(model, processor, examples, cfg: SFTConfig, seed: int = 0, log=None,
              after_step=None, decay: bool = True, views=None) -> list[float]:
    """Plain AdamW SFT (LR from :func:`lr_factor`, or constant with ``decay=False``) on the
    fused log-prob path; returns per-step losses. ``after_step(step, losses)``, if given, is
    called after every optimizer step. ``views[i]``, if given, lists the pairs example ``i``
    is shown as, in turn, each time it is drawn (the same pair with other images)."""
    log = log or logger.info
    FusedLMHead.install(model, backend="auto")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, cfg.decay_from) if decay else 1.0)
    order: list[int] = []
    shown = [0] * len(examples)
    losses = []
    prompts, encoded = PromptCache(processor), {}
    model.train()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        chosen = [examples[i] for i in idx]
        if views is not None:
            chosen = [(views[i][shown[i] % len(views[i])], t) for i, (_, t) in zip(idx, chosen)]
            for i in idx:
                shown[i] += 1
        batch = make_batch(processor, chosen, device, prompt=prompts([p for p, _ in chosen], device),
                           encoded=encoded)
        loss = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(10, cfg.steps // 30) == 0 or step == cfg.steps - 1:
            log(f"sft step {step + 1}/{cfg.steps} loss {losses[-1]:.4f}")
        if after_step is not None:
            after_step(step + 1, losses)
            model.train()
    model.eval()
    return losses


def train_cold_start(model, processor, examples, cfg: SFTConfig, seed: int = 0, log=None,
                     after_step=None) -> list[float]:
    """``cfg.steps`` optimizer steps. With ``cfg.read_warmup`` > 0, first that share on
    reading the image alone (:func:`reading_only`). With ``cfg.copy_warmup`` > 0 and
    generated pairs of the ``cfg.copy_warmup_on`` kinds: then the copy warm-up, that share
    of the steps at a constant LR on those pairs with a blank image, their judgments with
    the stated fact shown but not trained (``cfg.copy_warmup_judge``; otherwise targets
    that only quote the claims); then the cold start proper on the examples plus the pairs
    of the ``cfg.blank_judge_on`` kinds with a blank image and their full judgments (the
    fact trained only with ``cfg.blank_fact_loss``). Without the blank-image judgments in the mix,
    the image's colour took the copy's place again, or the comparison with the stated fact
    never formed, in the seeds probed (docs/training_runs.md). Returns the losses of every
    phase; ``after_step`` sees one step count through all of them."""
    log = log or logger.info
    kinds = parse_kinds(cfg.copy_warmup_on)
    warm = on_blank_image(examples, kinds, quote_only=not cfg.copy_warmup_judge, fact_loss=False,
                          keep_image=cfg.copy_warmup_image == "own") if cfg.copy_warmup > 0 else []
    if cfg.copy_warmup > 0 and not warm:
        log("sft: no generated pairs to quote, so no copy warm-up")
    n_warm = warmup_steps(cfg) if warm else 0
    reading = reading_only(examples, parse_kinds(cfg.read_on)) if cfg.read_warmup > 0 else []
    n_read = reading_steps(cfg, n_warm) if reading else 0
    losses: list[float] = []
    if n_read:
        log(f"sft: reading warm-up, {n_read} of {cfg.steps} steps on {len(reading)} examples")
        losses += train_sft(model, processor, reading, dataclasses.replace(cfg, steps=n_read),
                            seed=seed, log=log, after_step=after_step, decay=False)
    mix = list(examples)
    if n_warm:
        log(f"sft: copy warm-up, {n_warm} of {cfg.steps} steps on {len(warm)} examples "
            f"({cfg.copy_warmup_image} image)")
        # constant LR: the copy forms abruptly, a few hundred steps in
        losses += train_sft(model, processor, warm, dataclasses.replace(cfg, steps=n_warm),
                            seed=seed, log=log, decay=False, after_step=None if after_step is None
                            else (lambda step, ls: after_step(n_read + step, losses + ls)))
        mix += on_blank_image(examples, parse_kinds(cfg.blank_judge_on),
                              fact_loss=cfg.blank_fact_loss)
    views = None
    if cfg.image_variants > 1:
        views = [image_variants(p, cfg.image_variants) for p, _ in examples] + \
            [[p] for p, _ in mix[len(examples):]]  # the blank-image ones stay blank
        log(f"sft: up to {cfg.image_variants} images per example in the cold start proper")
    hook = None if after_step is None else \
        (lambda step, ls: after_step(n_read + n_warm + step, losses + ls))
    return losses + train_sft(model, processor, mix,
                              dataclasses.replace(cfg, steps=cfg.steps - n_read - n_warm), seed=seed,
                              log=log, after_step=hook, views=views)


def warmup_steps(cfg: SFTConfig) -> int:
    """Steps of the copy warm-up out of ``cfg.steps`` (at least one is left for the rest)."""
    return min(round(cfg.copy_warmup * cfg.steps), max(cfg.steps - 1, 0))


def reading_steps(cfg: SFTConfig, n_warm: int) -> int:
    """Steps of the reading warm-up, given the copy warm-up's (one is left for the rest)."""
    return max(0, min(round(cfg.read_warmup * cfg.steps), cfg.steps - n_warm - 1))


def _file_digest(path: Path, h) -> None:
    st = path.stat()
    h.update(f"{path.name}:{st.st_size}".encode())
    if st.st_size < 200 * 2**20:  # hash small files fully; big shards by name/size/mtime
        h.update(path.read_bytes())
    else:
        h.update(str(st.st_mtime_ns).encode())


def cache_key(model_dir: Path, examples, cfg: SFTConfig, seed: int) -> str:
    # ``seed`` is hashed as given; the config's own seed field only chooses it.
    settings = {k: v for k, v in vars(cfg).items() if k != "seed"}
    h = hashlib.sha256(f"v{SFT_VERSION}|{seed}|{json.dumps(settings, sort_keys=True)}".encode())
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file():
            _file_digest(f, h)
    for p, t in examples:
        h.update(json.dumps([p.question, p.response_1, p.response_2, p.preferred, t]).encode())
        _file_digest(Path(p.image), h)
    return h.hexdigest()[:16]


def cold_start(model_dir, examples, cfg: SFTConfig, seed: int = 0, log=None,
               cache: Path | None = None) -> tuple[Path, dict]:
    """SFT ``model_dir`` on ``examples`` once; returns (HF dir of the result, info)."""
    log = log or logger.info
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    key = cache_key(model_dir, examples, cfg, seed)
    out = (cache or cache_root()) / "sft" / key
    info_file = out / "sft_info.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        info["cached"] = True
        log(f"cold-start SFT: reusing cached {out}")
        return out, info
    info = {}

    def build(tmp: Path) -> None:
        t0 = time.time()
        model, processor = load_model_and_processor(model_dir)
        losses = train_cold_start(model, processor, examples, cfg, seed=seed, log=log)
        export_hf(model, processor, tmp)
        info.update(key=key, base_model=str(model_dir), examples=len(examples), steps=len(losses),
                    first_loss=losses[0] if losses else None,
                    final_loss=losses[-1] if losses else None, seconds=time.time() - t0)
        (tmp / "sft_info.json").write_text(json.dumps(info, indent=2))  # written last: complete

    build_once(out, build, marker="sft_info.json")
    if not info:  # another process finished the same entry in the meantime
        info.update(json.loads(info_file.read_text()))
    info["cached"] = False
    return out, info


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m r1reward.sft", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local HF checkpoint dir (default: embedded tiny)")
    p.add_argument("--data", default=None,
                   help="release-format JSONL with a 'response' field (default: templated "
                        "analyses of the generated set)")
    p.add_argument("--output", required=True, help="where to write the SFT'd HF checkpoint")
    d = SFTConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--n-examples", type=int, default=d.n_examples)
    p.add_argument("--guess-rate", type=float, default=d.guess_rate,
                   help="fraction of templated targets that guess without checking the image")
    p.add_argument("--guess-on", default=d.guess_on,
                   help='question kinds or shapes the careless teacher guesses on ("" = all)')
    p.add_argument("--copy-warmup", type=float, default=d.copy_warmup,
                   help="share of --steps spent first on the copy warm-up (0 = none)")
    p.add_argument("--copy-warmup-on", default=d.copy_warmup_on,
                   help='question kinds the copy warm-up quotes ("" = all)')
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from r1reward.log import setup_logging
    setup_logging()
    cfg = SFTConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, n_examples=a.n_examples,
                    guess_rate=a.guess_rate, guess_on=a.guess_on, copy_warmup=a.copy_warmup,
                    copy_warmup_on=a.copy_warmup_on)
    if a.data:
        examples, skipped = load_sft_file(a.data)
        for s in skipped:
            print(f"skipped {s}")
        if a.n_examples > 0:
            examples = examples[:a.n_examples]
    else:
        train_file, _ = generated_split(256, 64, 0, DEFAULT_KINDS)
        examples = examples_for(load_pairs(train_file, strict=True).pairs, cfg, a.seed)
    model, processor = load_model_and_processor(a.model)
    losses = train_cold_start(model, processor, examples, cfg, seed=a.seed)
    export_hf(model, processor, a.output)
    print(json.dumps({"output": a.output, "examples": len(examples), "first_loss": losses[0],
                      "final_loss": losses[-1]}))


if __name__ == "__main__":
    main()
