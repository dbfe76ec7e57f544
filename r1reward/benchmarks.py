"""Benchmark loaders and official metrics (SPEC §5).

Three record formats are read into one ``BenchItem`` shape (question, image path,
chosen, rejected, category). A record that cannot be evaluated (bad JSON, a missing
field, an image that is not on disk) is *skipped with its id and reason*: it is never
counted as right or wrong.

Metrics are computed from per-(item, presentation order) rows holding the K sampled
votes (1, 2 or None for an unparseable answer). A vote of None, or a tied majority,
counts as wrong: the judge failed to prefer the chosen response.
"""
from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .images import image_problems

BENCHES = ("vl_reward_bench", "mm_rlhf_reward_bench", "multimodal_rewardbench")
ORDERS = ("chosen_first", "chosen_second")
VL_CATEGORIES = ("general", "hallucination", "reasoning")
MM_RLHF_KEYWORDS = ("mcq", "long", "short", "safety", "video")


@dataclass
class BenchItem:
    key: str          # unique within the file (ids repeat in VL-RewardBench: 1,250 rows, 1,225 ids)
    id: str           # the record's own id (acc+ groups MM-RLHF pairs by it)
    category: str
    image: str | None  # resolved path on disk
    question: str
    chosen: str
    rejected: str


@dataclass
class BenchLoad:
    items: list[BenchItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id or "line N", reason)


def vl_category(record_id: str) -> str:
    """VL-RewardBench category from the id (real ids use upper-case RLHF/RLAIF)."""
    low = record_id.lower()
    if low.startswith(("mmmu", "mathverse")):
        return "reasoning"
    if low.startswith(("hallucination", "rlhf", "rlaif")):
        return "hallucination"
    return "general"


def mm_rlhf_category(record: dict) -> str:
    """MM-RLHF-Reward Bench category: the first keyword found in the record's media
    path (image or video), then its id; an explicit "category" field wins."""
    if isinstance(record.get("category"), str) and record["category"]:
        return record["category"].lower()
    media = record.get("image") or record.get("video") or ""
    hay = " ".join(media if isinstance(media, list) else [str(media)]).lower()
    for text in (hay, str(record.get("id", "")).lower()):
        for kw in MM_RLHF_KEYWORDS:
            if kw in text:
                return kw
    return "other"


def mmrb_category(record_id: str, category: str) -> str:
    """Multimodal RewardBench: safety and reasoning are split by the ID prefix."""
    cat = category.strip().lower()
    rid = record_id.lower()
    if cat == "safety":
        return "safety/bias" if rid.startswith("pairs") else "safety/toxicity"
    if cat == "reasoning":
        return "reasoning/math" if rid.startswith("math") else "reasoning/coding"
    return cat


def _resolve_image(rel, image_root) -> tuple[str | None, str | None]:
    """(path, None) when the image exists, else (None, reason). Relative paths are
    tried under image_root as given and then by file name, since released jsonl files
    carry their own folder prefix (``vl_reward/img/…``)."""
    if not isinstance(rel, str) or not rel:
        return None, "field 'image' is missing or not a single path"
    cands = [Path(rel)] if os.path.isabs(rel) else []
    if image_root is not None:
        cands += [Path(image_root) / rel, Path(image_root) / Path(rel).name]
    elif not os.path.isabs(rel):
        cands.append(Path(rel))
    for c in cands:
        if c.is_file():
            return str(c), None
    return None, f"image not found: {rel} (looked in {', '.join(str(c) for c in cands)})"


def _read_jsonl(path):
    """Yield (line_no, record | None, error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data file not found: {path}")
    with path.open("rb") as f:  # bytes: one bad byte costs its line, not the file
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"{path}:{n}: line is not UTF-8 (byte {e.start})"
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"line {n}: not valid JSON ({e.msg})"
                continue
            if not isinstance(rec, dict):
                yield n, None, f"line {n}: record is not a JSON object"
                continue
            yield n, rec, None


def _str_fields(rec, names):
    bad = [k for k in names if not isinstance(rec.get(k), str)]
    return f"field(s) {', '.join(repr(b) for b in bad)} missing or not a string" if bad else None


def _load(path, image_root, fields, id_field, convert) -> BenchLoad:
    out = _load_records(path, image_root, fields, id_field, convert)
    # Decode every image now (r1reward.images.open_image): one the judge cannot take is
    # skipped with its id here rather than failing a batch of the evaluation.
    problem = image_problems(it.image for it in out.items if it.image)
    bad = [it for it in out.items if it.image and problem[it.image]]
    out.skipped += [(it.id, problem[it.image]) for it in bad]
    out.items = [it for it in out.items if not (it.image and problem[it.image])]
    return out


def unique_key(rid: str, used: Counter) -> str:
    """``rid``, or ``rid#2``, ``rid#3``, ... for repeats: never a key already handed out
    (ids "dup", "dup", "dup#2" get "dup", "dup#2", "dup#2#2")."""
    key = rid
    while used[key]:
        used[rid] += 1
        key = f"{rid}#{used[rid]}"
    used[key] += 1
    used[rid] = max(used[rid], 1)
    return key


def _load_records(path, image_root, fields, id_field, convert) -> BenchLoad:
    out, seen = BenchLoad([]), Counter()
    for n, rec, err in _read_jsonl(path):
        ref = f"line {n}"
        if err:
            out.skipped.append((ref, err))
            continue
        rid = rec.get(id_field)
        ref = str(rid) if isinstance(rid, (str, int)) else ref
        bad = _str_fields(rec, fields) if isinstance(rid, (str, int)) else f"field {id_field!r} missing"
        if bad:
            out.skipped.append((ref, bad))
            continue
        try:
            item_args = convert(rec)
        except ValueError as e:
            out.skipped.append((ref, str(e)))
            continue
        img, why = _resolve_image(item_args.pop("image"), image_root)
        if why:
            out.skipped.append((ref, why))
            continue
        key = unique_key(str(rid), seen)
        out.items.append(BenchItem(key=key, id=str(rid), image=img, **item_args))
    return out


def load_vl_reward_bench(path, image_root=None) -> BenchLoad:
    return _load(path, image_root, ("prompt", "chosen", "rejected"), "id", lambda r: dict(
        category=vl_category(str(r["id"])), image=r.get("image"), question=r["prompt"],
        chosen=r["chosen"], rejected=r["rejected"]))


def _mm_rlhf_convert(r):
    if isinstance(r.get("image"), list) or r.get("video"):
        raise ValueError("video / multi-image records are not supported by the single-image judge")
    return dict(category=mm_rlhf_category(r), image=r.get("image"), question=r["prompt"],
                chosen=r["chosen"], rejected=r["rejected"])


def load_mm_rlhf_reward_bench(path, image_root=None) -> BenchLoad:
    return _load(path, image_root, ("prompt", "chosen", "rejected"), "id", _mm_rlhf_convert)


def _mmrb_convert(r):
    better = r["Better"].strip()
    if better not in ("Output1", "Output2"):
        raise ValueError(f"field 'Better' must be 'Output1' or 'Output2', got {better!r}")
    worse = "Output2" if better == "Output1" else "Output1"
    return dict(category=mmrb_category(str(r["ID"]), r["Category"]), image=r.get("Image"),
                question=r["Text"], chosen=r[better], rejected=r[worse])


def load_multimodal_rewardbench(path, image_root=None) -> BenchLoad:
    return _load(path, image_root, ("Text", "Output1", "Output2", "Better", "Category"), "ID",
                 _mmrb_convert)


LOADERS = {"vl_reward_bench": load_vl_reward_bench,
           "mm_rlhf_reward_bench": load_mm_rlhf_reward_bench,
           "multimodal_rewardbench": load_multimodal_rewardbench}


def load_bench(bench: str, path, image_root=None) -> BenchLoad:
    if bench not in LOADERS:
        raise ValueError(f"--bench must be one of {', '.join(BENCHES)}, got {bench!r}")
    return LOADERS[bench](path, image_root)


# ----------------------------------------------------------------------------- metrics

def majority(votes, k: int | None = None) -> int | None:
    """Voting@K over the first k votes: the strict majority answer among parseable
    votes; None when there is none or it is tied."""
    c = Counter(v for v in votes[:k] if v in (1, 2))
    if c[1] == c[2]:
        return None
    return 1 if c[1] > c[2] else 2


def target(order: str) -> int:
    """The response index that shows the chosen response in this order."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return 1 if order == "chosen_first" else 2


def k_grid(k_max: int) -> list[int]:
    """K values reported: odd K up to k_max (ties impossible), plus k_max itself."""
    return sorted({*range(1, k_max + 1, 2), k_max})


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def metrics_at_k(bench: str, items: list[BenchItem], rows: list[dict], k: int) -> dict:
    """One K's metrics. ``rows``: dicts with key, order, votes (only rows whose key is
    in ``items`` are used)."""
    by_key = {it.key: it for it in items}
    rows = [r for r in rows if r["key"] in by_key]
    ok = {(r["key"], r["order"]): majority(r["votes"], k) == target(r["order"]) for r in rows}
    anyk = [any(v == target(r["order"]) for v in r["votes"][:k]) for r in rows]
    verdicts = [majority(r["votes"], k) for r in rows]
    cats = defaultdict(list)
    for (key, _), c in ok.items():
        cats[by_key[key].category].append(c)
    per_cat = {c: _mean(v) for c, v in sorted(cats.items())}
    # A flip: the judge's preferred *response* changes when the presentation is swapped,
    # i.e. it names the same position both times. Only items with a verdict in both
    # orders count: a missing verdict is neither consistent nor a flip.
    both = [key for key in by_key if (key, ORDERS[0]) in ok and (key, ORDERS[1]) in ok]
    verdict = {(r["key"], r["order"]): v for r, v in zip(rows, verdicts)}
    decided = [key for key in both if None not in (verdict[(key, ORDERS[0])], verdict[(key, ORDERS[1])])]
    out = {
        "k": k,
        "n_rows": len(rows),
        "overall_accuracy": _mean(ok.values()),
        "per_category": per_cat,
        "accuracy_by_order": {o: _mean(c for (_, oo), c in ok.items() if oo == o) for o in ORDERS},
        "any_at_k": _mean(anyk),
        "flip_rate": _mean(verdict[(k_, ORDERS[0])] == verdict[(k_, ORDERS[1])] for k_ in decided),
        "answer1_rate": _mean(v == 1 for v in verdicts if v is not None),
        "no_verdict_rate": _mean(v is None for v in verdicts),
        "debiased_score_accuracy": _debiased_accuracy(rows, both, k),
    }
    if bench == "vl_reward_bench":
        present = [per_cat[c] for c in VL_CATEGORIES if per_cat.get(c) is not None]
        out["macro_accuracy"] = _mean(present)
    if bench == "mm_rlhf_reward_bench":
        # acc+: an id counts only when every pair (and every order) sharing it is right.
        groups = defaultdict(list)
        for (key, _), c in ok.items():
            groups[by_key[key].id].append(c)
        out["acc_plus"] = _mean(all(v) for v in groups.values())
    return out


def _debiased_accuracy(rows, keys_with_both_orders, k):
    """Accuracy of the calibrated, position-debiased score: (p1 with chosen first +
    1 - p1 with chosen second) / 2 > 0.5. None when rows carry no p1."""
    p = {(r["key"], r["order"]): r["p1"][:k] for r in rows if r.get("p1")}
    ok = []
    for key in keys_with_both_orders:
        a, b = p.get((key, ORDERS[0])), p.get((key, ORDERS[1]))
        if a and b:
            ok.append((_mean(a) + 1 - _mean(b)) / 2 > 0.5)
    return _mean(ok)


def summarize(bench: str, items: list[BenchItem], rows: list[dict], k_max: int) -> dict:
    """Metrics for every K in k_grid(k_max); the top level repeats K = k_max."""
    by_k = {str(k): metrics_at_k(bench, items, rows, k) for k in k_grid(k_max)}
    return {"bench": bench, **by_k[str(k_max)], "by_k": by_k}
