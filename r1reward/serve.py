"""Reward server: ``python -m r1reward.serve --model PATH [--host 127.0.0.1 --port 8000
--image-root DIR]``.

Endpoints (JSON in, JSON out; every error is JSON ``{"error": ...}``, 4xx for the
client's mistakes, 500 only for a model failure, 503 when busy):
- ``GET /health`` (also HEAD)
- ``POST /get_reward``: OpenRLHF's remote reward protocol: ``{"query": [...],
  "prompts": [...], "labels": [...]?, "images": [...]?}`` -> ``{"rewards": [...]}``; the
  response is ``query`` minus its ``prompts`` prefix (special tokens kept, image pads
  expanded, as OpenRLHF decodes it: :mod:`r1reward.reward_query`), the question is the
  prompt's last user turn, the reward is the debiased probability that the response beats
  ``labels[i]`` (a string; null or "" for the baseline answer; a JSON object
  ``{"reference", "image"}`` also brings the image OpenRLHF does not send).
- ``POST /judge``: ``{"image", "question", "response_1", "response_2", "k"}`` ->
  ``{"verdict", "votes", "score", ...}``.

Images: a data URL (``data:image/png;base64,...``), a file under ``--image-root``, or a
bare base64 string; a value naming an existing file under the root is read as that file
even when it also looks like base64. Text must be valid Unicode (no lone surrogates).

Limits (:class:`Limits`, all checked before any image is decoded or the model runs):
body bytes and JSON values; per request, the pairs, ``k``, the text (characters per pair
and in all, tokens per pair by the model's tokenizer) and the images (encoded bytes and
pixels, per image and in total: a reference repeated 64 times counts 64 times); per
server, the decoded pixels held at once by all requests (a request waits for room, up to
its timeout). The connection layer (:mod:`r1reward.serve_http`) caps connections and puts
deadlines on every read.

Concurrency: each connection has a handler thread (at most ``max_connections``); each
pair goes on one queue, and a single worker takes up to ``--max-batch`` pairs at a time
onto the model (the model is never run from two threads). A pair whose client has left
is dropped before the model runs; a request waits at most ``request_timeout_s`` (then
503). When a batch fails, its pairs are judged again one by one, so a request that makes
the model fail fails only itself. The server binds to loopback unless ``--host`` says
otherwise.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .images import ImageTooLarge, open_image
from .judge import JudgeCancelled, PairRequest, add_engine_args, engine_kwargs, model_label
from .reward_query import parse_label, question_of, split_response
from .serve_http import ClientGone, GuardedHTTPServer, HTTPError, JSONRequestHandler

__all__ = ["Limits", "Batcher", "HTTPError", "RewardHTTPServer", "make_server", "load_request_image",
           "load_test", "main"]

# base64 alphabet, then padding: two disjoint classes, so matching is linear
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_MAX_PATH_CHARS = 4096


@dataclass
class Limits:
    # one request: HTTP
    max_body_bytes: int = 16 << 20
    max_json_values: int = 200_000          # commas + brackets + braces in a body
    # one request: pairs and text
    max_items: int = 64                     # pairs in one /get_reward request
    max_k: int = 16
    max_pair_chars: int = 32_768            # question + both responses (or reference) of a pair
    max_request_chars: int = 1 << 20        # all text of a request
    max_pair_tokens: int = 8192             # a pair's text by the model's tokenizer (if it has one;
                                            # capped at the model's context less max_new_tokens)
    # one request: images (a reference repeated n times counts n times)
    max_image_bytes: int = 8 << 20          # one image, encoded
    max_image_pixels: int = 4096 * 4096     # one image
    max_request_image_bytes: int = 32 << 20  # all images of a request, encoded
    max_request_pixels: int = 2 * 4096 * 4096  # all images of a request
    # the server
    max_inflight_pixels: int = 4 * 4096 * 4096  # decoded images held by all requests at once
    max_connections: int = 128
    idle_timeout_s: float = 10.0            # a connection waiting for its next request
    read_timeout_s: float = 30.0            # a request's first byte to the end of its body
    write_timeout_s: float = 30.0
    request_timeout_s: float = 600.0        # waiting for image room and the model (then 503)
    max_drain_bytes: int = 64 << 20         # of an oversized body, read so the client sees 413


# ----------------------------------------------------------------------------- batching

@dataclass
class _Job:
    req: PairRequest
    k: int
    future: Future
    alive: object = None  # () -> bool: is the client still there


class Batcher:
    """One worker thread owns the model: it takes up to max_batch queued pairs (waiting
    at most wait_s for a batch to fill), drops those whose client has left or that were
    cancelled, and judges the rest together, grouped by k. If a group fails, each pair is
    judged alone, so a pair that makes the model fail fails only its own request."""

    def __init__(self, judge, max_batch: int = 8, wait_s: float = 0.005):
        self.judge, self.max_batch, self.wait_s = judge, max_batch, wait_s
        self.q: queue.Queue = queue.Queue()
        self.batch_sizes: Counter = Counter()  # pairs per model batch -> how many batches
        self.cancelled_on_model = 0  # batches stopped mid-generation: all their clients left
        self.dropped = 0   # pairs never judged: their client left or their request timed out
        self.retried = 0   # failed groups judged again pair by pair
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, req: PairRequest, k: int, alive=None) -> Future:
        fut: Future = Future()
        self.q.put(_Job(req, k, fut, alive))
        return fut

    def pending(self) -> int:
        return self.q.qsize()

    def close(self):
        self.q.put(None)
        self._thread.join(timeout=10)

    def _loop(self):
        while True:
            first = self.q.get()
            if first is None:
                return
            jobs, deadline = [first], time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)  # finish this batch, then stop
                    break
                jobs.append(nxt)
            try:
                self._run(jobs)
            except Exception as e:  # never leave a request waiting on a dead batch
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)

    def _run(self, jobs):
        live = []
        for j in jobs:
            gone = j.alive is not None and not _alive(j.alive)
            if gone:
                j.future.cancel()
            if gone or not j.future.set_running_or_notify_cancel():
                self.dropped += 1
                continue
            live.append(j)
        if not live:
            return
        self.batch_sizes[len(live)] += 1
        for k in sorted({j.k for j in live}):
            self._judge([j for j in live if j.k == k], k)

    def _judge(self, group, k):
        def everyone_left() -> bool:  # polled while the model generates
            return all(j.alive is not None and not _alive(j.alive) for j in group)
        try:
            results = self.judge.judge_batch([j.req for j in group], k=k, swap=True,
                                              should_stop=everyone_left)
        except JudgeCancelled:
            self.dropped += len(group)
            self.cancelled_on_model += 1
            for j in group:  # running futures cannot be cancelled; nobody reads them now
                if not j.future.done():
                    j.future.set_exception(JudgeCancelled("the client left"))
            return
        except Exception as e:
            if len(group) == 1:
                group[0].future.set_exception(e)
                return
            self.retried += 1
            for j in group:
                self._judge([j], k)
            return
        for j, res in zip(group, results):
            j.future.set_result(res)


def _alive(check) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


# ----------------------------------------------------------------------------- text

def _field(body, name, kind=str, required=True, default=None):
    if name not in body or body[name] is None:
        if required:
            raise HTTPError(400, f"missing field {name!r}")
        return default
    if not isinstance(body[name], kind) or (kind is int and isinstance(body[name], bool)):
        raise HTTPError(400, f"field {name!r} must be {kind.__name__}")
    return body[name]


def _k(body, limits):
    k = _field(body, "k", int, required=False, default=1)
    if not 1 <= k <= limits.max_k:
        raise HTTPError(400, f"field 'k' must be between 1 and {limits.max_k}, got {k}")
    return k


def _utf8(text: str, field: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HTTPError(400, f"field {field} is not valid UTF-8 text (a lone surrogate at "
                             f"character {e.start})") from None
    return text


def check_text(server, pairs):
    """pairs: [(label, question, response_1, response_2)] (already checked to be valid
    UTF-8) -> HTTPError 413 unless within the character limits, then the token limit."""
    limits, total = server.limits, 0
    for label, *texts in pairs:
        n = sum(map(len, texts))
        if n > limits.max_pair_chars:
            raise HTTPError(413, f"{label}: {n} characters of text, over the limit of "
                                 f"{limits.max_pair_chars} per pair")
        total += n
    if total > limits.max_request_chars:
        raise HTTPError(413, f"{total} characters of text in one request, over the limit of "
                             f"{limits.max_request_chars}")
    tok = getattr(getattr(server.batcher.judge, "processor", None), "tokenizer", None)
    if tok is None or not pairs:
        return
    try:
        ids = tok([t for _, *texts in pairs for t in texts], add_special_tokens=False)["input_ids"]
    except Exception as e:
        raise HTTPError(400, f"text the tokenizer cannot take ({type(e).__name__}: {e})") from None
    for i, (label, *_) in enumerate(pairs):
        n = sum(len(x) for x in ids[3 * i:3 * i + 3])
        if n > server.max_pair_tokens:
            raise HTTPError(413, f"{label}: {n} tokens of text, over the limit of "
                                 f"{server.max_pair_tokens} per pair")


# ----------------------------------------------------------------------------- images

def _plan_b64(text: str, field: str, limits: Limits, bare: bool):
    """("b64", text without whitespace, decoded size), or None when a bare value is not
    base64 (a data URL's payload must be)."""
    s = "".join(text.split())
    if not _B64.fullmatch(s) or len(s) % 4 == 1 or (bare and len(s) < 16):
        if bare:
            return None
        raise HTTPError(400, f"field {field!r}: the data URL's payload is not valid base64 "
                             "(only base64 data URLs are accepted)")
    size = len(s) * 3 // 4
    if size > limits.max_image_bytes:
        raise HTTPError(413, f"field {field!r}: image of about {size} bytes, over the limit of "
                             f"{limits.max_image_bytes}")
    return ("b64", s, size)


def _path_under_root(value: str, root: str, field: str):
    """(path, None) for an existing file under root, else (None, the HTTPError to give)."""
    if len(value) > _MAX_PATH_CHARS:
        return None, HTTPError(400, f"field {field!r} is not base64 and too long for a path")
    if "\x00" in value:
        return None, HTTPError(400, f"field {field!r}: a path cannot contain a NUL character")
    try:
        path = os.path.realpath(os.path.join(root, value))
        inside = os.path.commonpath([root, path]) == root
        is_file = inside and os.path.isfile(path)
    except (OSError, ValueError):  # e.g. a lone surrogate the file system cannot encode
        return None, HTTPError(400, f"field {field!r} is neither base64 nor a valid path")
    if not inside:
        return None, HTTPError(403, f"field {field!r}: image path escapes --image-root: {value[:200]}")
    if not is_file:
        return None, HTTPError(400, f"field {field!r}: image not found under --image-root: {value[:200]}")
    return path, None


def _plan_image(value, field: str, image_root, limits: Limits):
    """What an image reference names, without reading or decoding it:
    ("file", path, size) or ("b64", base64 text, decoded size)."""
    if not isinstance(value, str) or not value:
        raise HTTPError(400, f"field {field!r} must be a base64 string, a data URL or a path")
    if value.startswith("data:"):
        _, comma, payload = value.partition(",")
        if not comma or not payload:
            raise HTTPError(400, f"field {field!r}: data URL without data")
        return _plan_b64(payload, field, limits, bare=False)  # (";base64" or not, as before)
    path_error = None
    if image_root is not None:  # an existing file wins over a base64 reading of its name
        path, path_error = _path_under_root(value, image_root, field)
        if path is not None:
            try:
                size = os.path.getsize(path)
            except OSError as e:
                raise HTTPError(400, f"field {field!r}: cannot read {value[:200]} ({e.strerror})") from None
            if size > limits.max_image_bytes:
                raise HTTPError(413, f"image larger than {limits.max_image_bytes} bytes: {value[:200]}")
            return ("file", path, size)
    plan = _plan_b64(value, field, limits, bare=True)
    if plan is not None:
        return plan
    if path_error is None:
        raise HTTPError(400, f"field {field!r} is not base64 and the server has no --image-root for paths")
    raise path_error


def _read_planned(plan, field: str) -> bytes:
    kind, what, _ = plan
    if kind == "file":
        try:
            return Path(what).read_bytes()
        except OSError as e:
            raise HTTPError(400, f"field {field!r}: cannot read the image file ({e.strerror})") from None
    try:
        return base64.b64decode(what + "=" * (-len(what) % 4) if "=" not in what else what, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"field {field!r} is not valid base64") from None


def _header_pixels(data: bytes, field: str) -> int:
    """Pixels from the image header alone (0 when there is no readable header: open_image
    names the problem when it decodes)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise HTTPError(413, f"field {field!r}: {e}") from None
    except Exception:
        return 0
    return w * h


def _decode(data: bytes, field: str, limits: Limits):
    try:  # the size is checked from the header: a huge image is refused before decoding
        return open_image(data, name=f"image in field {field!r}", max_pixels=limits.max_image_pixels)
    except ImageTooLarge as e:
        raise HTTPError(413, str(e)) from None
    except ValueError as e:
        if "decompressed data too large" in str(e).lower():  # e.g. a PNG text-chunk bomb
            raise HTTPError(413, f"field {field!r}: {e}") from None
        raise HTTPError(400, f"field {field!r}: {e}") from None


def load_request_image(value, image_root, limits: Limits, field: str = "image"):
    """None, a data URL, a path under image_root or base64 -> PIL image (RGB); HTTPError
    for anything else. ``image_root`` must be a real path (see make_server)."""
    if value is None:
        return None
    plan = _plan_image(value, field, image_root, limits)
    return _decode(_read_planned(plan, field), field, limits)


class _PixelBudget:
    """Decoded-image pixels held at once by all requests (waiting for or on the model)."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._cv = threading.Condition()

    def acquire(self, n: int, client, deadline: float):
        with self._cv:
            while self.used + n > self.capacity:
                if not client.client_alive():
                    raise ClientGone()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HTTPError(503, "server busy: other requests' images fill the server's "
                                         "image budget; try again", {"Retry-After": "1"})
                self._cv.wait(min(left, 0.1))
            self.used += n

    def release(self, n: int):
        with self._cv:
            self.used -= n
            self._cv.notify_all()


def load_images(server, refs, client, deadline):
    """refs: [(field, value or None)] -> ([PIL image or None], pixels reserved).

    Every budget is checked before anything is decoded: the encoded bytes and the header
    pixels of all references (each repeat counted), then the server-wide pixel budget is
    reserved (the caller releases it); each distinct reference is decoded once."""
    limits = server.limits
    plans, first_field, total = {}, {}, 0
    for field, value in refs:
        if value is None:
            continue
        if not isinstance(value, str) or value not in plans:
            plans[value] = _plan_image(value, field, server.image_root, limits)
            first_field[value] = field
        total += plans[value][2]
        if total > limits.max_request_image_bytes:
            raise HTTPError(413, f"the images of this request total over {limits.max_request_image_bytes} "
                                 "bytes (each reference counts, repeats included)")
    if not plans:
        return [None] * len(refs), 0
    data = {v: _read_planned(p, first_field[v]) for v, p in plans.items()}
    pixels = {v: _header_pixels(d, first_field[v]) for v, d in data.items()}
    total = sum(pixels[v] for _, v in refs if v is not None)
    if total > limits.max_request_pixels:
        raise HTTPError(413, f"the images of this request total {total} pixels, over the limit of "
                             f"{limits.max_request_pixels} (each reference counts, repeats included)")
    server.pixel_budget.acquire(total, client, deadline)
    try:
        decoded = {v: _decode(d, first_field[v], limits) for v, d in data.items()}
    except BaseException:
        server.pixel_budget.release(total)
        raise
    return [None if v is None else decoded[v] for _, v in refs], total


# ----------------------------------------------------------------------------- handlers

def _wait(futures, client, deadline, timeout_s):
    """The futures' results; ClientGone when the client leaves, 503 past the deadline.
    Whatever ends the wait early cancels the pairs not yet on the model."""
    try:
        out = []
        for f in futures:
            while True:
                try:
                    out.append(f.result(timeout=0.1))
                    break
                except FutureTimeout:
                    if not client.client_alive():
                        raise ClientGone() from None
                    if time.monotonic() > deadline:
                        raise HTTPError(503, f"no answer within {timeout_s:g} s (server busy); try again",
                                        {"Retry-After": "1"}) from None
                except CancelledError:  # dropped by the batcher: the client had left
                    raise ClientGone() from None
        return out
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def _judge_pairs(server, reqs, image_refs, k, client):
    """Validated pairs -> judgments: text limits, image budgets, then the model."""
    limits = server.limits
    deadline = time.monotonic() + limits.request_timeout_s
    check_text(server, reqs)
    images, reserved = load_images(server, image_refs, client, deadline)
    try:
        futures = [server.batcher.submit(PairRequest(im, q, r1, r2), k, client.client_alive)
                   for im, (_, q, r1, r2) in zip(images, reqs)]
        del images
        return _wait(futures, client, deadline, limits.request_timeout_s)
    finally:
        server.pixel_budget.release(reserved)


def handle_judge(server, body, client):
    k = _k(body, server.limits)
    texts = [_utf8(_field(body, f), repr(f)) for f in ("question", "response_1", "response_2")]
    [j] = _judge_pairs(server, [("the pair", *texts)], [("image", body.get("image"))], k, client)
    out = {"verdict": j.verdict, "votes": j.votes, "score": j.score, "vote_verdict": j.vote_verdict,
           "weighted_verdict": j.weighted_verdict, "order_scores": j.order_scores,
           "samples": j.samples}
    if body.get("return_analyses"):
        out["analyses"] = j.analyses
    return out


def handle_get_reward(server, body, client):
    limits, baseline = server.limits, server.batcher.judge.baseline
    queries = _field(body, "query", list)
    n = len(queries)
    if n > limits.max_items:
        raise HTTPError(413, f"{n} queries in one request, over the limit of {limits.max_items}")
    k = _k(body, limits)
    lists = {}
    for name in ("prompts", "labels", "images"):
        v = _field(body, name, list, required=False, default=None)
        if v is not None and len(v) != n:
            raise HTTPError(400, f"field {name!r} has {len(v)} entries, 'query' has {n}")
        lists[name] = v
    reqs, refs = [], []
    for i, q in enumerate(queries):
        prompt = lists["prompts"][i] if lists["prompts"] else ""
        if not isinstance(q, str) or not isinstance(prompt, str):
            raise HTTPError(400, f"query[{i}] and prompts[{i}] must be strings")
        label = lists["labels"][i] if lists["labels"] else None
        if label is not None and not isinstance(label, str):
            raise HTTPError(400, f"field 'labels' entry {i} must be a string or null, "
                                 f"got {type(label).__name__}")
        _utf8(q, f"'query'[{i}]")
        _utf8(prompt, f"'prompts'[{i}]")
        _utf8(label or "", f"'labels'[{i}]")
        try:
            response = split_response(q, prompt)
            reference, label_image = parse_label(label)
        except ValueError as e:
            raise HTTPError(400, f"query[{i}] / labels[{i}]: {e}") from None
        image = lists["images"][i] if lists["images"] else None
        reqs.append((f"query[{i}]", question_of(prompt), response, reference or baseline))
        refs.append((f"images[{i}]", image) if image is not None else (f"labels[{i}].image", label_image))
    judgments = _judge_pairs(server, reqs, refs, k, client)
    return {"rewards": [j.score for j in judgments]}


def handle_health(server, body, client):
    return {"status": "ok", "model": server.model_name, "max_batch": server.batcher.max_batch,
            "queued": server.batcher.pending(), "connections": server.connections()}


ROUTES = {"/health": {"GET": handle_health, "HEAD": handle_health},
          "/judge": {"POST": handle_judge}, "/get_reward": {"POST": handle_get_reward}}


class Handler(JSONRequestHandler):
    pass


class RewardHTTPServer(GuardedHTTPServer):
    pass


def pair_token_limit(judge, limits: Limits) -> int:
    """limits.max_pair_tokens, and no more than the model's context leaves beside the
    generated analysis (a longer prompt would only be truncated nonsense to the model)."""
    cfg = getattr(getattr(judge, "model", None), "config", None)
    ctx = (getattr(getattr(cfg, "text_config", None), "max_position_embeddings", None)
           or getattr(cfg, "max_position_embeddings", None))
    if isinstance(ctx, int) and ctx > 0:
        return max(1, min(limits.max_pair_tokens, ctx - int(getattr(judge, "max_new_tokens", 0) or 0)))
    return limits.max_pair_tokens


def make_server(judge, host="127.0.0.1", port=8000, image_root=None, max_batch=8,
                limits: Limits | None = None, model_name="", verbose=False) -> RewardHTTPServer:
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"--image-root is not a directory: {image_root}")
    limits = limits or Limits()
    srv = RewardHTTPServer((host, port), Handler, limits, ROUTES, verbose=verbose)
    srv.batcher = Batcher(judge, max_batch=max_batch)
    srv.image_root = None if image_root is None else os.path.realpath(image_root)
    srv.pixel_budget = _PixelBudget(max(limits.max_inflight_pixels, limits.max_request_pixels))
    srv.max_pair_tokens = pair_token_limit(judge, limits)
    srv.model_name = model_name
    return srv


# ----------------------------------------------------------------------------- load test

def load_test(url: str, n: int, concurrency: int, image_b64: str) -> dict:
    """Fire n /judge requests from `concurrency` client threads; requests/s and errors."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        body = json.dumps({"image": image_b64, "question": "What colour is the shape?",
                           "response_1": f"It is red ({i}).", "response_2": "It is blue.", "k": 1})
        rq = urllib.request.Request(url + "/judge", data=body.encode(), method="POST",
                                    headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(rq, timeout=600) as r:
            return r.status

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda i: _safe(one, i), range(n)))
    dt = time.perf_counter() - t0
    return {"requests": n, "concurrency": concurrency, "seconds": round(dt, 3),
            "requests_per_s": round(n / dt, 3), "errors": sum(r != 200 for r in results)}


def _safe(fn, i):
    try:
        return fn(i)
    except Exception as e:
        return repr(e)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m r1reward.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--image-root", default=None, help="the only folder image paths may name")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    add_engine_args(ap)
    d = Limits()
    ap.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20))
    ap.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="one image")
    ap.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                    help="all images of a request, repeats counted")
    ap.add_argument("--max-inflight-pixels", type=int, default=d.max_inflight_pixels,
                    help="decoded images held by all requests at once")
    ap.add_argument("--max-items", type=int, default=d.max_items)
    ap.add_argument("--max-k", type=int, default=d.max_k)
    ap.add_argument("--max-pair-chars", type=int, default=d.max_pair_chars)
    ap.add_argument("--max-pair-tokens", type=int, default=d.max_pair_tokens)
    ap.add_argument("--max-connections", type=int, default=d.max_connections)
    ap.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, metavar="S")
    ap.add_argument("--read-timeout", type=float, default=d.read_timeout_s, metavar="S")
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S")
    ap.add_argument("--load-test", type=int, default=0, metavar="N",
                    help="start on a free loopback port, send N /judge requests, print requests/s, exit")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    from .judge import RewardJudge
    judge = RewardJudge.from_pretrained(a.model, device=a.device, max_new_tokens=a.max_new_tokens,
                                        max_batch=a.max_batch, **engine_kwargs(a))
    limits = Limits(max_body_bytes=int(a.max_body_mb * (1 << 20)), max_image_pixels=a.max_image_pixels,
                    max_request_pixels=a.max_request_pixels, max_inflight_pixels=a.max_inflight_pixels,
                    max_items=a.max_items, max_k=a.max_k, max_pair_chars=a.max_pair_chars,
                    max_pair_tokens=a.max_pair_tokens, max_connections=a.max_connections,
                    idle_timeout_s=a.idle_timeout, read_timeout_s=a.read_timeout,
                    request_timeout_s=a.request_timeout)
    port = 0 if a.load_test else a.port
    srv = make_server(judge, a.host, port, a.image_root, a.max_batch, limits,
                      model_name=model_label(a), verbose=a.verbose)
    host, port = srv.server_address[:2]
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {a.host}, reachable from other machines", file=sys.stderr)
    if a.load_test:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        buf = io.BytesIO()
        Image.new("RGB", (112, 112), (220, 30, 30)).save(buf, format="PNG")
        stats = load_test(f"http://{host}:{port}", a.load_test, a.concurrency,
                          base64.b64encode(buf.getvalue()).decode())
        stats["batch_sizes"] = dict(sorted(srv.batcher.batch_sizes.items()))
        print(json.dumps(stats))
        srv.shutdown()
        return 0 if stats["errors"] == 0 else 1
    print(f"serving on http://{host}:{port} (GET /health, POST /get_reward, POST /judge)", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.batcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
