"""Reward server: ``python -m r1reward.serve --model PATH [--host 127.0.0.1 --port 8000
--image-root DIR]``.

Endpoints (JSON in, JSON out; every error is JSON ``{"error": ...}`` with a 4xx status):
- ``GET /health``
- ``POST /get_reward``: OpenRLHF's remote reward protocol: ``{"query": [...],
  "prompts": [...], "labels": [...]?, "images": [...]?}`` -> ``{"rewards": [...]}``; the
  response is ``query`` minus its ``prompts`` prefix, the reward is the debiased
  probability that it beats ``labels[i]`` (or the baseline answer).
- ``POST /judge``: ``{"image", "question", "response_1", "response_2", "k"}`` ->
  ``{"verdict", "votes", "score", ...}``.

Concurrency: the standard library's ThreadingHTTPServer parses requests on threads; each
pair goes on one queue, and a single worker takes up to ``--max-batch`` pairs at a time
onto the model (the model is never run from two threads). Images come only inline
(base64 or a data URL) or from files under ``--image-root``; the server binds to
loopback unless ``--host`` says otherwise.
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
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .images import ImageTooLarge, open_image
from .judge import PairRequest

_B64 = re.compile(r"^[A-Za-z0-9+/\s]+={0,2}\s*$")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_body_bytes: int = 16 << 20
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 4096 * 4096
    max_items: int = 64      # pairs in one /get_reward request
    max_k: int = 16


# ----------------------------------------------------------------------------- batching

class Batcher:
    """One worker thread owns the model: it takes up to max_batch queued pairs (waiting
    at most wait_s for a batch to fill) and judges them together, grouped by k."""

    def __init__(self, judge, max_batch: int = 8, wait_s: float = 0.005):
        self.judge, self.max_batch, self.wait_s = judge, max_batch, wait_s
        self.q: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, req: PairRequest, k: int) -> Future:
        fut: Future = Future()
        self.q.put((req, k, fut))
        return fut

    def close(self):
        self.q.put(None)
        self._thread.join(timeout=10)

    def _loop(self):
        while True:
            first = self.q.get()
            if first is None:
                return
            items, deadline = [first], time.monotonic() + self.wait_s
            while len(items) < self.max_batch:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)  # finish this batch, then stop
                    break
                items.append(nxt)
            self.batch_sizes.append(len(items))
            for k in sorted({k for _, k, _ in items}):
                group = [(r, f) for r, kk, f in items if kk == k]
                try:
                    results = self.judge.judge_batch([r for r, _ in group], k=k, swap=True)
                except Exception as e:  # a failure answers every waiting request, never hangs
                    for _, f in group:
                        f.set_exception(e)
                    continue
                for (_, f), res in zip(group, results):
                    f.set_result(res)


# ----------------------------------------------------------------------------- validation

def load_request_image(value, image_root, limits: Limits):
    """None, base64 / data URL, or a path under image_root -> PIL image (RGB)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise HTTPError(400, "field 'image' must be a base64 string, a data URL or a path")
    data = None
    if value.startswith("data:"):
        _, _, value = value.partition(",")
        if not value:
            raise HTTPError(400, "field 'image': data URL without data")
    if _B64.match(value) and len(value) >= 16:
        if len(value) * 3 // 4 > limits.max_image_bytes:
            raise HTTPError(413, f"image larger than {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            data = None
    if data is None:
        if image_root is None:
            raise HTTPError(400, "field 'image' is not base64 and the server has no --image-root for paths")
        root = os.path.realpath(image_root)
        path = os.path.realpath(os.path.join(root, value))
        if os.path.commonpath([root, path]) != root:
            raise HTTPError(403, f"image path escapes --image-root: {value}")
        if not os.path.isfile(path):
            raise HTTPError(400, f"image not found under --image-root: {value}")
        if os.path.getsize(path) > limits.max_image_bytes:
            raise HTTPError(413, f"image larger than {limits.max_image_bytes} bytes: {value}")
        data = Path(path).read_bytes()
    try:  # the size is checked from the header: a huge image is refused before decoding
        return open_image(data, name="request image", max_pixels=limits.max_image_pixels)
    except ImageTooLarge as e:
        raise HTTPError(413, str(e)) from None
    except ValueError as e:
        raise HTTPError(400, f"field 'image': {e}") from None


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


# ----------------------------------------------------------------------------- handlers

def handle_judge(server, body):
    limits = server.limits
    req = PairRequest(load_request_image(body.get("image"), server.image_root, limits),
                      _field(body, "question"), _field(body, "response_1"), _field(body, "response_2"))
    j = server.batcher.submit(req, _k(body, limits)).result()
    out = {"verdict": j.verdict, "votes": j.votes, "score": j.score, "vote_verdict": j.vote_verdict,
           "weighted_verdict": j.weighted_verdict, "order_scores": j.order_scores,
           "samples": j.samples}
    if body.get("return_analyses"):
        out["analyses"] = j.analyses
    return out


def handle_get_reward(server, body):
    limits, judge = server.limits, server.batcher.judge
    queries = _field(body, "query", list)
    n = len(queries)
    if n > limits.max_items:
        raise HTTPError(413, f"{n} queries in one request, over the limit of {limits.max_items}")
    lists = {}
    for name in ("prompts", "labels", "images"):
        v = _field(body, name, list, required=False, default=None)
        if v is not None and len(v) != n:
            raise HTTPError(400, f"field {name!r} has {len(v)} entries, 'query' has {n}")
        lists[name] = v
    reqs = []
    for i, q in enumerate(queries):
        prompt = lists["prompts"][i] if lists["prompts"] else ""
        if not isinstance(q, str) or not isinstance(prompt, str):
            raise HTTPError(400, f"query[{i}] and prompts[{i}] must be strings")
        response = q[len(prompt):] if prompt and q.startswith(prompt) else q
        label = lists["labels"][i] if lists["labels"] else None
        image = load_request_image(lists["images"][i], server.image_root, limits) if lists["images"] else None
        reqs.append((PairRequest(image, prompt, response.strip(),
                                 label if isinstance(label, str) and label else judge.baseline),
                     _k(body, limits)))
    futures = [server.batcher.submit(r, k) for r, k in reqs]
    return {"rewards": [f.result().score for f in futures]}


ROUTES = {("POST", "/judge"): handle_judge, ("POST", "/get_reward"): handle_get_reward}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep a load test's output readable
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            return self._send(200, {"status": "ok", "model": self.server.model_name,
                                    "max_batch": self.server.batcher.max_batch})
        self._send(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self):
        try:
            route = ROUTES.get(("POST", self.path.split("?")[0]))
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise HTTPError(411, "a Content-Length header is required")
            if int(length) > self.server.limits.max_body_bytes:
                self.close_connection = True  # the unread body must not be parsed as a request
                raise HTTPError(413, f"body of {length} bytes, over the limit of "
                                     f"{self.server.limits.max_body_bytes}")
            raw = self.rfile.read(int(length))
            if route is None:
                raise HTTPError(404, f"no such endpoint: POST {self.path}")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HTTPError(400, "body is not valid JSON") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "body must be a JSON object")
            self._send(200, route(self.server, body))
        except HTTPError as e:
            self._send(e.status, {"error": str(e)})
        except Exception as e:  # a model failure is the server's fault, not the client's
            self._send(500, {"error": f"{type(e).__name__}: {e}"})


class RewardHTTPServer(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: in a burst of concurrent clients the
    # connections beyond it are reset before a thread can accept them.
    request_queue_size = 256
    daemon_threads = True


def make_server(judge, host="127.0.0.1", port=8000, image_root=None, max_batch=8,
                limits: Limits | None = None, model_name="", verbose=False) -> ThreadingHTTPServer:
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"--image-root is not a directory: {image_root}")
    srv = RewardHTTPServer((host, port), Handler)
    srv.batcher = Batcher(judge, max_batch=max_batch)
    srv.limits, srv.image_root = limits or Limits(), image_root
    srv.model_name, srv.verbose = model_name, verbose
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
    ap.add_argument("--max-body-mb", type=float, default=16)
    ap.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    ap.add_argument("--max-items", type=int, default=64)
    ap.add_argument("--max-k", type=int, default=16)
    ap.add_argument("--load-test", type=int, default=0, metavar="N",
                    help="start on a free loopback port, send N /judge requests, print requests/s, exit")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    from .judge import RewardJudge
    judge = RewardJudge.from_pretrained(a.model, device=a.device, max_new_tokens=a.max_new_tokens,
                                        max_batch=a.max_batch)
    limits = Limits(max_body_bytes=int(a.max_body_mb * (1 << 20)), max_image_pixels=a.max_image_pixels,
                    max_items=a.max_items, max_k=a.max_k)
    port = 0 if a.load_test else a.port
    srv = make_server(judge, a.host, port, a.image_root, a.max_batch, limits,
                      model_name=str(a.model or "embedded tiny model"), verbose=a.verbose)
    host, port = srv.server_address[:2]
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {a.host}, reachable from other machines", file=sys.stderr)
    if a.load_test:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        from PIL import Image
        buf = io.BytesIO()
        Image.new("RGB", (112, 112), (220, 30, 30)).save(buf, format="PNG")
        stats = load_test(f"http://{host}:{port}", a.load_test, a.concurrency,
                          base64.b64encode(buf.getvalue()).decode())
        stats["batch_sizes"] = dict(sorted(Counter(srv.batcher.batch_sizes).items()))
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
