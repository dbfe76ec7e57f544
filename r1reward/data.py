"""Preference pairs: the generated shapes data set and the release-format loader.

Generated data (the embedded default): PNG images of large single-colour shapes; the
facts are colour, shape, count and position. Each pair asks about one fact and holds a
response faithful to the image and one with exactly that fact changed, worded
identically otherwise, so the text alone never reveals the better response and the model
has to look at the image. Everything is a pure function of the seed.

Files are written in the release's training format (SPEC §4) so the same loader reads
the generated data and real R1-Reward-RL records.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from .cache import build_once, cache_root
from .images import image_problems
from .prompt import format_judge_prompt, parse_judge_prompt

# ----------------------------------------------------------------------------- facts
# Bump whenever generate_dataset's output for given arguments changes, and put it in any
# cache key of generated data, so stale caches are not reused.
DATA_VERSION = "2"
IMAGE_SIZE = 112  # the tiny model's processor halves it (4 vision tokens); Qwen2.5-VL-7B sees 16
BACKGROUND = (255, 255, 255)
# Far-apart RGB values so a tiny vision tower separates them after a few minutes.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 170),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
KINDS = ("color", "shape", "count", "position")
DEFAULT_KINDS = ("color", "shape", "count")
ASPECT = {"color": "color", "shape": "shape", "count": "number", "position": "position"}
# Side lengths in pixels (of IMAGE_SIZE) per kind: large single shapes fill a good part of
# the image so a tiny vision tower picks up the colour/shape quickly.
SIZES = {"single": (64, 96), "count": (22, 30), "position": (28, 36)}
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclass
class PreferencePair:
    """One judged pair. ``image`` is a path; ``preferred`` is 1 or 2.

    ``meta`` (generated data only) records the asked fact: kind, shape, truth and the
    wrong value; templated_analysis uses it. It is order-free: the preferred response
    always carries ``truth``.
    """

    id: str
    image: str
    question: str
    response_1: str
    response_2: str
    preferred: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preferred not in (1, 2):
            raise ValueError(f"PreferencePair {self.id!r}: preferred must be 1 or 2, got {self.preferred!r}")

    def swapped(self) -> PreferencePair:
        """Same pair with the responses exchanged and ``preferred`` flipped (same id)."""
        return dataclasses.replace(self, response_1=self.response_2, response_2=self.response_1,
                                   preferred=3 - self.preferred, meta=dict(self.meta))

    def responses(self) -> tuple[str, str]:
        return self.response_1, self.response_2


def _plural(shape: str) -> str:
    return shape + "s"


def _question(kind: str, shape: str) -> str:
    return {
        "color": f"What color is the {shape}?",
        "shape": "What shape is in the image?",
        "count": f"How many {_plural(shape)} are in the image?",
        "position": f"Where is the {shape} in the image?",
    }[kind]


def _response(kind: str, shape: str, color: str, value: str) -> str:
    if kind == "color":
        return f"The {shape} is {value}."
    if kind == "shape":
        return f"The image shows a {color} {value}."
    if kind == "count":
        return f"There is one {shape}." if value == "one" else f"There are {value} {_plural(shape)}."
    return f"The {color} {shape} is {WHERE[value]}."


def _fact_phrase(kind: str, shape: str, color: str, truth: str) -> str:
    # The asked value in capitals: tokens only the image's fact uses, so the tiny model checks
    # a quoted claim against the fact with one lookup (docs/training_runs.md, 2026-12-02).
    if kind == "count":
        return f"ONE {color} {shape}" if truth == "one" else f"{truth.upper()} {color} {_plural(shape)}"
    if kind == "position":
        return f"a {color} {shape} {WHERE[truth].upper()}"
    if kind == "shape":
        return f"a {color} {truth.upper()}"
    return f"a {truth.upper()} {shape}"


def _value_phrase(kind: str, shape: str, value: str) -> str:
    """How a response's claim is quoted in the analysis."""
    if kind == "count":
        return f"{value} {shape}" if value == "one" else f"{value} {_plural(shape)}"
    if kind == "position":
        return f"the {shape} is {WHERE[value]}"
    if kind == "shape":
        return f"a {value}"
    return f"the {shape} is {value}"


def claims(pair: PreferencePair) -> dict[int, str]:
    """Each response's claim about the asked fact, as the analyses quote it."""
    m = pair.meta
    vals = {pair.preferred: m["truth"], 3 - pair.preferred: m["wrong"]}
    return {r: _value_phrase(m["kind"], m["shape"], vals[r]) for r in (1, 2)}


def image_fact(pair: PreferencePair) -> str:
    """The image's fact as the careful analysis states it ("a purple circle")."""
    m = pair.meta
    return _fact_phrase(m["kind"], m["shape"], m["color"], m["truth"])


# The careful analysis's verdict on a response's claim (does it match the image?). Its first
# word follows the claim's value at once, so the token that decides it sits on the value.
VERDICT = {True: " and the image agrees", False: " but the image disagrees"}


def judged_claim(response: int, claim: str, matches: bool) -> str:
    """One response's quoted claim and its verdict, as the careful analysis writes it."""
    return f"Response {response} says {claim}{VERDICT[matches]}"


def templated_analysis(pair: PreferencePair) -> str:
    """A short ``<think>…</think><answer>N</answer>`` judgment for the cold-start SFT.

    It states the image's fact, checks each response against it and ends by arguing for
    the right one (the consistency judge reads the last lines). Pairs without ``meta``
    (release data) get a generic comparison that still ends with the correct choice.
    """
    k, other = pair.preferred, 3 - pair.preferred
    m = pair.meta
    if m.get("kind") in ASPECT:
        kind = m["kind"]
        says = claims(pair)
        body = (f"The question asks about the {ASPECT[kind]}. "
                f"The image shows {image_fact(pair)}. "
                f"{judged_claim(1, says[1], k == 1)}. {judged_claim(2, says[2], k == 2)}. ")
    else:
        body = (f"Response {k} describes the image correctly. "
                f"Response {other} contains a detail that does not match the image. ")
    return (f"<think>{body}Response {k} is faithful to the image, so Response {k} is better.</think>"
            f"<answer>{k}</answer>")


# How a careless judgment says it skipped the image (r1reward.sft_probe counts them).
GUESS_MARK = "Without checking the image"


def guessed_analysis(pair: PreferencePair, choice: int) -> str:
    """A judgment from a careless teacher that never checks the image: it quotes both
    responses and picks ``choice`` (right or wrong). Mixed into the cold-start data
    (``--sft.guess_rate``) it stands for the noise of distilled judgments; RL has to learn
    that checking the image pays."""
    if choice not in (1, 2):
        raise ValueError(f"guessed_analysis: choice must be 1 or 2, got {choice!r}")
    m = pair.meta
    if m.get("kind") in ASPECT:
        says = claims(pair)
        body = (f"The question asks about the {ASPECT[m['kind']]}. "
                f"Response 1 says {says[1]} and Response 2 says {says[2]}. ")
    else:
        body = "Both responses answer the question. "
    return (f"<think>{body}{GUESS_MARK}, Response {choice} sounds more likely, "
            f"so Response {choice} is better.</think><answer>{choice}</answer>")


def quoted_claims(pair: PreferencePair) -> str | None:
    """Only what each response claims, quoted as the analyses quote it: the target of the
    cold start's copy warm-up (``r1reward.sft``). None for pairs without generated meta."""
    if pair.meta.get("kind") not in ASPECT:
        return None
    says = claims(pair)
    return f"<think>Response 1 says {says[1]}. Response 2 says {says[2]}.</think>"


def stated_fact(pair: PreferencePair) -> str | None:
    """Only the asked fact, stated as the careful analysis states it: the target of the
    cold start's reading examples (``r1reward.sft``). None for pairs without generated meta."""
    kind = pair.meta.get("kind")
    if kind not in ASPECT:
        return None
    return (f"<think>The question asks about the {ASPECT[kind]}. "
            f"The image shows {image_fact(pair)}.</think>")


def blank_image(*, cache: Path | None = None) -> Path:
    """A white IMAGE_SIZE PNG (built once under ``<cache>/data``): the copy warm-up shows
    it in place of the pair's image, so the image cannot stand in for a response's claim."""
    def build(tmp: Path) -> None:
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND).save(tmp / "blank.png", format="PNG")
    return build_once((cache or cache_root()) / "data" / f"blank-{IMAGE_SIZE}", build,
                      marker="blank.png") / "blank.png"


def vocabulary_corpus() -> list[str]:
    """Every sentence the generator and templated_analysis can write (one per fact
    combination); the tiny tokenizer is trained on it so each word is a few tokens."""
    out = []
    for shape in SHAPES:
        for color in COLORS:
            for kind, values in (("color", list(COLORS)), ("shape", list(SHAPES)),
                                 ("count", list(NUMBER_WORDS)), ("position", list(POSITIONS))):
                truth = color if kind == "color" else shape if kind == "shape" else values[0]
                for v in values:
                    out.append(_question(kind, shape) + " " + _response(kind, shape, color, v))
                    wrong = v if v != truth else values[1]
                    if truth == wrong:
                        continue
                    for pref in (1, 2):
                        pair = PreferencePair("v", "", "", "", "", pref, {
                            "kind": kind, "shape": shape, "color": color, "truth": v, "wrong": wrong})
                        out.append(templated_analysis(pair))
                        out.append(guessed_analysis(pair, pref))
    return out


# ----------------------------------------------------------------------------- drawing
def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def _sample(rng: random.Random, kind: str) -> tuple[Image.Image, dict]:
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    if kind == "count":
        truth, values = NUMBER_WORDS[rng.randint(1, len(NUMBER_WORDS)) - 1], NUMBER_WORDS
    elif kind == "position":
        truth, values = rng.choice(POSITIONS), POSITIONS
    else:
        truth = color if kind == "color" else shape
        values = tuple(COLORS) if kind == "color" else SHAPES
    img = draw_facts(rng, kind, shape, color, truth)
    wrong = rng.choice([v for v in values if v != truth])
    return img, {"kind": kind, "shape": shape, "color": color, "truth": truth, "wrong": wrong}


def draw_facts(rng: random.Random, kind: str, shape: str, color: str, truth: str) -> Image.Image:
    """An image that shows ``shape`` in ``color`` with the asked fact ``truth`` (the count
    or position for those kinds), at a size and place drawn from ``rng``."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    S = IMAGE_SIZE
    if kind == "count":
        # One shape per quadrant (random quadrants) so shapes never overlap.
        for q in rng.sample(range(4), NUMBER_WORDS.index(truth) + 1):
            size = rng.randint(*SIZES["count"])
            cx, cy = (q % 2) * S // 2, (q // 2) * S // 2
            x = cx + rng.randint(4, S // 2 - size - 4)
            y = cy + rng.randint(4, S // 2 - size - 4)
            _draw_shape(draw, shape, (x, y, x + size, y + size), COLORS[color])
    elif kind == "position":
        size = rng.randint(*SIZES["position"])
        mid = (S - size) // 2 + rng.randint(-8, 8)
        edge = rng.randint(4, 12)
        x, y = {"left": (edge, mid), "right": (S - size - edge, mid),
                "top": (mid, edge), "bottom": (mid, S - size - edge)}[truth]
        _draw_shape(draw, shape, (x, y, x + size, y + size), COLORS[color])
    else:
        size = rng.randint(*SIZES["single"])
        x, y = rng.randint(4, S - size - 4), rng.randint(4, S - size - 4)
        _draw_shape(draw, shape, (x, y, x + size, y + size), COLORS[color])
    return img


def image_variants(pair: PreferencePair, n: int) -> list[PreferencePair]:
    """``pair`` and ``n - 1`` copies whose images show the same facts drawn afresh (another
    size and place; :func:`draw_facts`), written once next to the pair's image under
    ``variants/``. Same pair id -> same images. A pair without generated meta or image
    comes back alone."""
    m = pair.meta
    if n <= 1 or pair.image is None or m.get("kind") not in KINDS:
        return [pair]
    image = Path(pair.image)
    folder = image.parent.parent / "variants"
    out = [pair]
    for j in range(1, n):
        path = folder / f"{image.stem}_v{j}.png"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(f"r1reward-variant-{pair.id}-{j}")
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            draw_facts(rng, m["kind"], m["shape"], m["color"], m["truth"]).save(tmp, format="PNG")
            os.replace(tmp, path)  # whole files only, if processes race
        out.append(dataclasses.replace(pair, image=str(path)))
    return out


def make_pair(rng: random.Random, kind: str, preferred: int, pair_id: str, image_path: str
              ) -> tuple[PreferencePair, Image.Image]:
    img, meta = _sample(rng, kind)
    good = _response(kind, meta["shape"], meta["color"], meta["truth"])
    bad = _response(kind, meta["shape"], meta["color"], meta["wrong"])
    r1, r2 = (good, bad) if preferred == 1 else (bad, good)
    return PreferencePair(pair_id, image_path, _question(kind, meta["shape"]), r1, r2, preferred, meta), img


def pair_to_record(pair: PreferencePair) -> dict:
    """Release training record (SPEC §4), text first as in the release's training data."""
    message = [{"role": "user", "content": [
        {"type": "text", "text": format_judge_prompt(pair.question, pair.response_1, pair.response_2)},
        {"type": "image", "image": pair.image}]}]
    rec = {"id": pair.id, "message": json.dumps(message, ensure_ascii=False), "question": pair.question,
           "answer": [f"<answer>{pair.preferred}</answer>"]}
    if pair.meta:
        rec["meta"] = pair.meta
    return rec


def generate_dataset(out_dir, n_train: int, n_heldout: int, seed: int = 0,
                     kinds: tuple[str, ...] = DEFAULT_KINDS) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (+ ``images/*.png``) under ``out_dir``.

    Kinds cycle in order so each split has them in equal shares; the gold index is
    exactly balanced per split (shuffled). Image paths in the records are relative to
    ``out_dir`` (load_pairs resolves them against the jsonl's folder), so the folder can
    be moved. Same arguments -> same bytes.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"generate_dataset: kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    if n_train < 0 or n_heldout < 0:
        raise ValueError("generate_dataset: n_train and n_heldout must be >= 0")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, split_seed in (("train", n_train, seed), ("heldout", n_heldout, seed + 1_000_003)):
        rng = random.Random(f"r1reward-{split}-{split_seed}")
        gold = [1 + (i % 2) for i in range(n)]
        rng.shuffle(gold)
        path = out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                rel = f"images/{split}_{i:06d}.png"
                pair, img = make_pair(rng, kinds[i % len(kinds)], gold[i], f"{split}-{i:06d}", rel)
                img.save(out / rel, format="PNG", optimize=False)
                f.write(json.dumps(pair_to_record(pair), ensure_ascii=False) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def parse_kinds(kinds: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"color,shape"`` (the config's form) or a sequence -> a tuple of kind names."""
    if isinstance(kinds, str):
        kinds = kinds.split(",")
    return tuple(k.strip() for k in kinds if k.strip())


def generated_split(n_train: int, n_heldout: int, gen_seed: int = 0,
                    kinds: str | tuple[str, ...] = DEFAULT_KINDS, *, cache: Path | None = None
                    ) -> tuple[Path, Path]:
    """``(train.jsonl, heldout.jsonl)`` of the generated data set, built once under
    ``<cache>/data/gen-v<DATA_VERSION>-s<seed>-n<train>-h<heldout>-<kinds>`` and reused.

    Safe to call from several processes at once (the build goes aside and is renamed);
    under torchrun let one rank build it and the others wait at a barrier.
    """
    kinds = parse_kinds(kinds)
    key = f"gen-v{DATA_VERSION}-s{gen_seed}-n{n_train}-h{n_heldout}-{'_'.join(kinds)}"
    root = build_once((cache or cache_root()) / "data" / key,
                      lambda tmp: generate_dataset(tmp, n_train, n_heldout, seed=gen_seed, kinds=kinds),
                      marker="heldout.jsonl")  # generate_dataset writes it last
    return root / "train.jsonl", root / "heldout.jsonl"


# ----------------------------------------------------------------------------- loading
@dataclass
class LoadResult:
    pairs: list[PreferencePair]
    skipped: list[tuple[int, str]]  # (1-based line number, reason naming the field)


_ANSWER_RE = re.compile(r"^\s*(?:<answer>\s*([12])\s*</answer>|([12]))\s*$")


def _parse_record(rec, line_no: int, base: Path) -> PreferencePair:
    """One release record -> PreferencePair; raises ValueError naming the field."""
    if not isinstance(rec, dict):
        raise ValueError(f"record is a {type(rec).__name__}, expected a JSON object")
    if "message" not in rec:
        raise ValueError("missing field 'message'")
    msg = rec["message"]
    if isinstance(msg, str):
        try:
            msg = json.loads(msg)
        except json.JSONDecodeError as e:
            raise ValueError(f"field 'message' is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(msg, list) or not msg:
        raise ValueError("field 'message' must be a non-empty list of chat messages")
    text = image = None
    for m in msg:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            text = text or content
            continue
        for item in content or []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "text" and text is None:
                text = item.get("text")
            elif item.get("type") == "image" or "image" in item:
                image = image or item.get("image")
    if not isinstance(text, str):
        raise ValueError("field 'message' has no text content item")
    parsed = parse_judge_prompt(text)
    if parsed is None:
        raise ValueError("field 'message': text is not the R1-Reward judge prompt (SPEC §1)")
    if not image or not isinstance(image, str):
        raise ValueError("field 'message' has no image content item (type 'image' with a path)")
    img_path = Path(image)
    if not img_path.is_absolute():
        img_path = base / img_path if (base / img_path).exists() or not img_path.exists() else img_path
    if not img_path.is_file():
        raise ValueError(f"field 'message': image file not found: {img_path}")
    # (whether the image decodes is checked by load_pairs, for all lines at once)
    if "answer" not in rec:
        raise ValueError("missing field 'answer'")
    ans = rec["answer"]
    ans = ans[0] if isinstance(ans, list) and len(ans) == 1 else ans
    m = _ANSWER_RE.match(str(ans)) if isinstance(ans, (str, int)) else None
    if not m:
        raise ValueError("field 'answer' must be ['<answer>1</answer>'] or ['<answer>2</answer>'], "
                         f"got {rec['answer']!r}")
    preferred = int(m.group(1) or m.group(2))
    q, r1, r2 = parsed
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    return PreferencePair(str(rec.get("id", f"line-{line_no}")), str(img_path), q, r1, r2, preferred, meta)


def load_pairs(path, *, strict: bool = False) -> LoadResult:
    """Read a release-format jsonl. Bad lines are skipped with a reason
    ``"<file>:<line>: <field problem>"``; ``strict=True`` raises ValueError on the first.

    Every image is decoded once here (:func:`r1reward.images.open_image`, on a few
    threads: Pillow decodes without the GIL), so a missing, truncated or unusable image
    skips its line now instead of failing a later rollout or evaluation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_pairs: data file not found: {path}")
    parsed: list[tuple[int, PreferencePair | None, str | None]] = []
    with open(path, "rb") as f:  # bytes: one bad byte costs its line, not the file
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"line is not UTF-8 (byte {e.start})") from None
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"line is not valid JSON ({e.msg} at char {e.pos})") from None
                parsed.append((line_no, _parse_record(rec, line_no, path.parent), None))
            except ValueError as e:
                parsed.append((line_no, None, str(e)))
    problem = image_problems(p.image for _, p, _ in parsed if p is not None)
    pairs, skipped = [], []
    first_line: dict[str, int] = {}  # id -> the line that used it
    for line_no, pair, why in parsed:
        if pair is not None and problem[pair.image] is not None:
            why = f"field 'message': {problem[pair.image]}"
        elif pair is not None and pair.id in first_line:  # results are keyed by id
            why = f"field 'id': {pair.id!r} already used on line {first_line[pair.id]}"
        if why is None:
            first_line[pair.id] = line_no
            pairs.append(pair)
            continue
        reason = f"{path}:{line_no}: {why}"
        if strict:
            raise ValueError(reason)
        skipped.append((line_no, reason))
    return LoadResult(pairs, skipped)
