"""The reward server against hostile clients, over real HTTP on loopback with the scripted
judge of test_judge.py: cheap validation, per-request budgets, isolation of a failing
request, cancellation, timeouts, the connection cap, and JSON answers for every error.
Each test names the failure it guards against (found on the server before these fixes)."""
import base64
import contextlib
import io
import json
import random
import select
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from test_judge import ScriptedJudge, scripted_p1

from r1reward import serve as S

BASE = {"question": "q", "response_1": "q=1", "response_2": "q=0"}


def debiased(r1, r2):
    return (scripted_p1(r1, r2) + 1 - scripted_p1(r2, r1)) / 2


class RecordingJudge(ScriptedJudge):
    """The scripted judge, recording the questions it is given; it can hold the model
    until ``gate`` is set, take ``delay`` seconds per batch, and fails (as a tokenizer
    or the model would) on any batch holding a response with "boom"."""

    def __init__(self, delay=0.0, gate=None, **kw):
        super().__init__(baseline="q=0", **kw)
        self.delay, self.gate = delay, gate
        self.questions = []
        self.started = threading.Event()

    def _generate_texts(self, reqs, n, do_sample, should_stop=None):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.questions += [r.question for r in reqs]
        if any("boom" in r.response_1 + r.response_2 for r in reqs):
            raise RuntimeError("model failed on boom")
        return super()._generate_texts(reqs, n, do_sample)


def eventually(pred, timeout=5.0) -> bool:
    """Whether pred() turns true within timeout: the server's threads may lag the client."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def serving(judge=None, root=None, max_batch=8, **limits):
    judge = judge if judge is not None else RecordingJudge()
    srv = S.make_server(judge, "127.0.0.1", 0, None if root is None else str(root), max_batch=max_batch,
                        limits=S.Limits(**limits))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield "http://{}:{}".format(*srv.server_address[:2]), srv, judge
    finally:
        if judge.gate is not None:
            judge.gate.set()
        srv.shutdown()
        srv.batcher.close()
        srv.server_close()


def call(url, path, body=None, raw=None, method=None, timeout=10):
    """(status, parsed JSON answer) through urllib, as a Python client would."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    method = method or ("POST" if data is not None else "GET")
    rq = urllib.request.Request(url + path, data=data, method=method,
                                headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(rq, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def addr(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(url, data: bytes, timeout=5.0) -> bytes:
    """Send raw bytes, read until the server closes (or timeout)."""
    with socket.create_connection(addr(url), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def responses(raw: bytes):
    """[(status, headers dict, JSON body or None)] of the HTTP/1.1 answers in raw."""
    out = []
    while raw.startswith(b"HTTP/1."):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        n = int(headers.get("Content-Length", 0))
        body, raw = rest[:n], rest[n:]
        out.append((int(lines[0].split()[1]), headers, json.loads(body) if body else None))
    return out


def png(size=(16, 16), mode="RGB", noise=False):
    if noise:
        im = Image.frombytes(mode, size, random.Random(0).randbytes(size[0] * size[1] * len(mode)))
    else:
        im = Image.new(mode, size)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def b64(data):
    return base64.b64encode(data).decode()


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def handler_threads():
    return sum("process_request_thread" in t.name for t in threading.enumerate())


# ----------------------------------------------------------------------------- 1. base64 check

def test_base64_check_is_linear_and_never_freezes_the_server(tmp_path):
    # before: a 60 KB image value of "A", spaces, "!" took 18 s in the base64 regex, holding
    # the GIL: every thread, /health included, froze
    with serving(root=tmp_path) as (url, _, judge):
        body = dict(BASE, image="A" + " " * 60_000 + "!")
        with ThreadPoolExecutor(2) as ex:
            t0 = time.monotonic()
            hostile = ex.submit(call, url, "/judge", body, timeout=5)
            time.sleep(0.05)
            assert call(url, "/health", timeout=2)[0] == 200
            st, out = hostile.result()
        assert time.monotonic() - t0 < 1.5
        assert st == 400 and "not base64" in out["error"]
        t0 = time.monotonic()  # 4 MB of whitespace between base64 characters: still linear
        st, _ = call(url, "/judge", dict(BASE, image="QUJD" + " \n" * 2_000_000 + "!"), timeout=5)
        assert st == 400 and time.monotonic() - t0 < 2 and not judge.questions


# ----------------------------------------------------------------------------- 2. one bad request

@pytest.mark.parametrize("path,body,field", [
    ("/judge", dict(BASE, question="bad \ud800 text"), "'question'"),
    ("/judge", dict(BASE, response_2="\udfff"), "'response_2'"),
    ("/get_reward", {"query": ["q=1", "x\ud800"]}, "'query'[1]"),
    ("/get_reward", {"query": ["P: q=1"], "prompts": ["P:\ud83d"]}, "'prompts'[0]"),
    ("/get_reward", {"query": ["q=1"], "labels": ["\udc00"]}, "'labels'[0]"),
])
def test_text_that_is_not_utf8_is_a_400_before_the_model(path, body, field):
    # before: a lone surrogate passed validation and crashed the tokenizer inside the
    # batch (TypeError), failing every request batched with it with a 500
    with serving() as (url, _, judge):
        st, out = call(url, path, body)
        assert st == 400 and field in out["error"] and "UTF-8" in out["error"]
        assert not judge.questions


def test_a_request_that_fails_the_model_fails_only_itself():
    # before: one request that crashed the model call answered its error (500) to the
    # seven good requests batched with it
    gate = threading.Event()
    with serving(RecordingJudge(gate=gate)) as (url, srv, judge):
        with ThreadPoolExecutor(9) as ex:
            blocker = ex.submit(call, url, "/judge", dict(BASE, question="hold"))
            assert judge.started.wait(5)  # the worker is busy: the next 8 queue up together
            bodies = [dict(BASE, response_1=f"q={i % 3}") for i in range(7)] + [dict(BASE, response_1="boom")]
            futs = [ex.submit(call, url, "/judge", b) for b in bodies]
            deadline = time.monotonic() + 5
            while srv.batcher.pending() < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            results = [f.result() for f in futs]
            assert blocker.result()[0] == 200
        for (st, out), b in zip(results[:7], bodies):
            assert st == 200 and out["score"] == pytest.approx(debiased(b["response_1"], "q=0"))
        st, out = results[7]
        assert st == 500 and "model failed on boom" in out["error"]
        assert srv.batcher.batch_sizes[8] == 1 and srv.batcher.retried == 1


@pytest.mark.parametrize("image,status,needle", [
    (b64(png((4000, 10))), 400, "aspect ratio 400:1"),         # the processor would refuse it
    (b64(png((64, 64), noise=True)[:300]), 400, "not a readable image"),  # truncated
    (b64(b"\x89PNG\r\n\x1a\n" + bytes(200)), 400, "not a readable image"),  # corrupt
    (b64(bytes(range(256)) * 4), 400, "not a readable image"),  # not an image at all
])
def test_images_are_decoded_and_checked_at_request_time(image, status, needle):
    with serving() as (url, _, judge):
        st, out = call(url, "/judge", dict(BASE, image=image))
        assert st == status and needle in out["error"] and not judge.questions


# ----------------------------------------------------------------------------- 3. budgets

def test_image_budget_counts_every_reference_before_decoding(tmp_path, monkeypatch):
    # before: a 2.2 KB /get_reward request naming a 2 KB 4096x4096 PNG 64 times decoded it
    # 64 times and peaked at 6.7 GB
    bomb = png((4096, 4096), mode="1")
    assert len(bomb) < 4096
    (tmp_path / "bomb.png").write_bytes(bomb)
    decoded = []
    monkeypatch.setattr(S, "open_image", lambda *a, **kw: decoded.append(1) or Image.new("RGB", (1, 1)))
    with serving(root=tmp_path) as (url, _, judge):  # the default limits
        body = {"query": [f"q={i}" for i in range(64)], "images": ["bomb.png"] * 64}
        assert len(json.dumps(body)) < 2400
        rss0, t0 = rss_mb(), time.monotonic()
        st, out = call(url, "/get_reward", body)
        assert st == 413 and "pixels" in out["error"] and "repeats included" in out["error"]
        assert time.monotonic() - t0 < 2 and rss_mb() - rss0 < 100
        assert decoded == [] and judge.questions == []  # refused before any decoding
        # the encoded bytes count per reference too
        with serving(root=tmp_path, max_request_image_bytes=10_000) as (url2, _, _):
            noisy = b64(png((40, 40), noise=True))
            st, out = call(url2, "/get_reward", {"query": ["a"] * 4, "images": [noisy] * 4})
            assert st == 413 and "bytes" in out["error"] and decoded == []


def test_image_budget_admits_what_fits_and_server_budget_is_released(tmp_path):
    (tmp_path / "a.png").write_bytes(png((100, 100)))
    with serving(root=tmp_path, max_items=8, max_image_pixels=100 * 100, max_request_pixels=40_000,
                 max_inflight_pixels=40_000) as (url, srv, _):
        st, out = call(url, "/get_reward", {"query": ["q=1"] * 4, "images": ["a.png"] * 4})
        assert st == 200 and len(out["rewards"]) == 4
        st, out = call(url, "/get_reward", {"query": ["q=1"] * 5, "images": ["a.png"] * 5})
        assert st == 413 and "50000 pixels" in out["error"]
        assert srv.pixel_budget.used == 0


def test_the_server_wide_image_budget_makes_requests_wait(tmp_path):
    (tmp_path / "a.png").write_bytes(png((100, 100)))
    gate = threading.Event()
    body = dict(BASE, image="a.png")
    with serving(RecordingJudge(gate=gate), root=tmp_path, max_image_pixels=10_000, max_request_pixels=10_000,
                 max_inflight_pixels=10_000) as (url, srv, judge):
        with ThreadPoolExecutor(2) as ex:
            holder = ex.submit(call, url, "/judge", dict(body, question="holder"))
            assert judge.started.wait(5) and srv.pixel_budget.used == 10_000
            waiter = ex.submit(call, url, "/judge", dict(body, question="waiter"))
            time.sleep(0.3)  # its image is not decoded, nor its pair queued, until there is room
            assert not waiter.done() and srv.batcher.pending() == 0
            gate.set()
            assert holder.result()[0] == 200 and waiter.result()[0] == 200
        assert srv.pixel_budget.used == 0
        with pytest.raises(S.HTTPError, match="image budget"):  # past the request's deadline: 503
            srv.pixel_budget.used = 1
            srv.pixel_budget.acquire(10_000, type("Client", (), {"client_alive": lambda self: True})(),
                                     time.monotonic() + 0.2)
        srv.pixel_budget.used = 0


# ----------------------------------------------------------------------------- 4. text, cancellation

def test_text_limits_refuse_long_text_before_the_model():
    # before: a 64k-character question held the single model worker for 34 s
    with serving() as (url, _, judge):
        t0 = time.monotonic()
        st, out = call(url, "/judge", dict(BASE, question="why " * 16_000))
        assert st == 413 and "characters" in out["error"] and time.monotonic() - t0 < 1
    with serving(max_request_chars=30_000) as (url, _, judge2):
        st, out = call(url, "/get_reward", {"query": ["x" * 10_000] * 4})
        assert st == 413 and "in one request" in out["error"]
    assert not judge.questions and not judge2.questions


def test_work_of_a_client_that_left_is_dropped_before_the_model():
    # before: a client that gave up still had its request judged, delaying the next client
    judge = RecordingJudge(delay=0.6)
    with serving(judge, max_batch=1) as (url, srv, _):
        with ThreadPoolExecutor(2) as ex:
            first = ex.submit(call, url, "/judge", dict(BASE, question="first"))
            assert judge.started.wait(5)
            body = json.dumps(dict(BASE, question="left")).encode()
            with socket.create_connection(addr(url)) as s:  # queued behind "first", then gone
                s.sendall(b"POST /judge HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                time.sleep(0.2)
            t0 = time.monotonic()
            st, _ = call(url, "/judge", dict(BASE, question="next"))
            waited = time.monotonic() - t0
            assert st == 200 and first.result()[0] == 200
        assert "left" not in judge.questions and srv.batcher.dropped == 1
        assert waited < 1.5  # "first"'s remainder and "next", not "left" as well


def test_a_request_waits_at_most_its_timeout_then_503_and_is_dropped():
    gate = threading.Event()
    with serving(RecordingJudge(gate=gate), max_batch=1, request_timeout_s=0.5) as (url, srv, judge):
        with ThreadPoolExecutor(1) as ex:
            hold = ex.submit(call, url, "/judge", dict(BASE, question="hold"))
            assert judge.started.wait(5)
            t0 = time.monotonic()
            st, out = call(url, "/judge", dict(BASE, question="late"))
            assert st == 503 and "no answer within 0.5 s" in out["error"]
            assert time.monotonic() - t0 < 1.5
            # "hold" timed out too (same 0.5 s) and its client has gone before the gate
            # lets the model check: its work on the model is stopped
            assert hold.result()[0] == 503
            gate.set()
        assert eventually(lambda: srv.batcher.cancelled_on_model == 1)
        # the worker takes "late" off the queue only after "hold"'s batch stops: wait for it
        assert eventually(lambda: srv.batcher.dropped == 2 and srv.batcher.pending() == 0)
        # "late" never reached the model
        assert "late" not in judge.questions


# ----------------------------------------------------------------------------- 5. connections

def test_idle_connections_are_capped_and_closed():
    # before: idle connections were never closed and never capped (150 idle sockets: 150
    # threads; /health timed out)
    with serving(max_connections=8, idle_timeout_s=0.6) as (url, srv, _):
        socks = [socket.create_connection(addr(url)) for _ in range(30)]
        try:
            time.sleep(0.2)
            for _ in range(3):
                t0 = time.monotonic()
                assert call(url, "/health", timeout=2)[0] == 200
                assert time.monotonic() - t0 < 1
            assert handler_threads() <= 8 + 2
            # every idle socket is closed by the server: evicted, refused with 503, or timed out
            deadline = time.monotonic() + 3
            for s in socks:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = s.recv(65536)
                    while data.startswith(b"HTTP/1.1 503") and b"}" not in data[-2:]:
                        data += s.recv(65536)
                    assert data == b"" or data.startswith(b"HTTP/1.1 503")
                except ConnectionResetError:
                    pass
        finally:
            for s in socks:
                s.close()
        assert eventually(lambda: srv.connections() == 0)


def test_over_the_cap_a_connection_its_client_closed_goes_first():
    # before: a closed connection still held read as "a request is arriving" and was
    # skipped, so the next idle connection evicted could be a client about to send
    from r1reward.serve_http import _Conn
    with serving(max_connections=8) as (url, srv, _):
        pairs = {name: socket.socketpair() for name in ("quiet", "closed", "data")}
        pairs["closed"][1].close()
        pairs["data"][1].sendall(b"P")
        conns = {}
        for age, name in enumerate(("quiet", "closed", "data")):  # "quiet" idle the longest
            conns[name] = c = _Conn(pairs[name][0])
            c.since -= 10 - age
            srv._conns[c.sock] = c
        try:
            with srv._conns_lock:
                assert srv._evict_idle()
                assert set(srv._conns.values()) == {conns["quiet"], conns["data"]}
                assert srv._evict_idle()
                assert set(srv._conns.values()) == {conns["data"]}
                assert not srv._evict_idle()  # request bytes waiting: not idle
        finally:
            srv._conns.clear()
            for a, b in pairs.values():
                a.close()
                b.close()


def _held_open(url, head: bytes, trickle: bytes, every=0.1, limit=4.0):
    """Send head, then trickle a byte at a time; (seconds until the server answers or
    closes, what it sent until it closed)."""
    with socket.create_connection(addr(url)) as s:
        s.sendall(head)
        t0 = time.monotonic()
        for i in range(int(limit / every)):
            r, _, _ = select.select([s], [], [], every)
            if r:
                took, data = time.monotonic() - t0, b""
                s.settimeout(2)
                while chunk := s.recv(65536):
                    data += chunk
                return took, data
            try:
                s.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
            except OSError:
                return time.monotonic() - t0, b""
        return None, b""


def test_a_request_arriving_slowly_is_cut_at_the_read_deadline():
    # before: no socket timeout: a client trickling bytes held its thread forever
    with serving(read_timeout_s=0.6) as (url, _, _):
        took, data = _held_open(url, b"POST /judge HTTP/1.1\r\n", b"X-Slow: yes\r\n")
        assert took is not None and took < 1.5 and data == b""  # headers never ended: closed
        body = json.dumps(BASE).encode()
        took, data = _held_open(url, b"POST /judge HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body), body)
        assert took is not None and took < 1.5
        [(st, _, out)] = responses(data)
        assert st == 408 and "not received within" in out["error"]


# ----------------------------------------------------------------------------- 12. HTTP details

def _chunk(typ, data):
    return struct.pack(">I", len(data)) + typ + data + struct.pack(">I", zlib.crc32(typ + data))


def _png_with(w, h, extra=b"", idat=None):
    idat = zlib.compress(bytes((3 * w + 1) * h)) if idat is None else idat
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + extra
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


TEXT_BOMB = _png_with(8, 8, _chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(20 << 20), 9)))
HEADER_BOMB = _png_with(30_000, 30_000, idat=b"x")


@pytest.mark.parametrize("body,status,needle", [
    (dict(BASE, image="ok\x00.png"), 400, "NUL"),           # before: 500 ValueError
    (dict(BASE, image="\ud800.png"), 400, "valid path"),     # before: 500 UnicodeEncodeError
    (dict(BASE, image=b64(TEXT_BOMB)), 413, "too large"),    # before: 400
    (dict(BASE, image=b64(HEADER_BOMB)), 413, "pixels"),
    (dict(BASE, image="data:image/png,not-base64"), 400, "only base64"),
    (dict(BASE, image="data:image/png;base64,@@@@"), 400, "not valid base64"),
    (dict(BASE, image=3), 400, "must be a base64 string"),
])
def test_bad_images_are_client_errors(tmp_path, body, status, needle):
    with serving(root=tmp_path) as (url, _, _):
        st, out = call(url, "/judge", body)
        assert st == status and needle in out["error"]


@pytest.mark.parametrize("labels", [[5], [["q=1"]], [{"a": 1}], [True]])
def test_labels_must_be_strings(labels):
    # before: a non-string label silently became the baseline answer
    with serving() as (url, _, judge):
        st, out = call(url, "/get_reward", {"query": ["q=1"], "labels": labels})
        assert st == 400 and "'labels' entry 0" in out["error"] and not judge.questions
        st, out = call(url, "/get_reward", {"query": ["q=1", "q=1"], "labels": [None, ""]})
        assert st == 200 and out["rewards"] == [pytest.approx(debiased("q=1", "q=0"))] * 2


def test_malformed_json_and_headers_are_400_not_500():
    with serving() as (url, _, _):
        # before: RecursionError -> 500
        st, out = call(url, "/judge", raw=b"[" * 100_000 + b"]" * 100_000)
        assert st == 400 and "nested too deeply" in out["error"]
        st, out = call(url, "/judge", raw=b'{"k": ' + b"9" * 5000 + b"}")
        assert st == 400 and "not valid JSON" in out["error"]
        st, out = call(url, "/judge", raw=b"[" + b"{}," * 300_000 + b"{}]")
        assert st == 413 and "values" in out["error"]
        for cl in ["\u00b2", "\u0661\u0662", "1 2", "-1", "+5"]:  # before: "²" -> 500 (int() failed)
            [(st, h, out)] = responses(exchange(url, b"POST /judge HTTP/1.1\r\nContent-Length: "
                                                + cl.encode("utf-8") + b"\r\n\r\n{}"))
            assert st == 400 and "Content-Length" in out["error"] and h["Connection"] == "close"
        [(st, _, out)] = responses(exchange(url, b"POST /judge HTTP/1.1\r\nContent-Length: 2\r\n"
                                            b"Content-Length: 3\r\n\r\n{}"))
        assert st == 400
        [(st, _, out)] = responses(exchange(url, b"POST /judge HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
                                            b"\r\n2\r\n{}\r\n0\r\n\r\n"))
        assert st == 411 and "chunked" in out["error"]
        [(st, _, out)] = responses(exchange(url, b"GET /he\x00alth HTTP/1.1\r\nConnection: close\r\n\r\n"))
        assert st == 404 and "error" in out
        flood = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 2000) for i in range(99))  # 200 KB of headers
        raw = exchange(url, b"GET /health HTTP/1.1\r\n" + flood + b"\r\n")
        assert not raw.startswith(b"HTTP/1.1 200")  # cut off, not parsed
        assert call(url, "/health")[0] == 200


def test_oversized_body_gets_a_readable_413():
    # before: the server closed with the body unread and urllib got a connection reset
    with serving(max_body_bytes=200_000) as (url, _, _):
        for size in (300_000, 20_000_000):  # (before: 3 MB reset sometimes, 20 MB always)
            st, out = call(url, "/judge", raw=b"x" * size)
            assert st == 413 and f"body of {size} bytes" in out["error"]
        assert call(url, "/health")[0] == 200
        # a client that asks first is refused before it sends the body
        [(st, h, out)] = responses(exchange(url, b"POST /judge HTTP/1.1\r\nContent-Length: 5000000\r\n"
                                            b"Expect: 100-continue\r\n\r\n"))
        assert st == 413 and h["Connection"] == "close"


def test_every_method_and_error_answers_json():
    # before: HEAD/PUT/DELETE got HTML 501 pages
    with serving() as (url, _, _):
        raw = exchange(url, b"HEAD /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 200") and b"application/json" in raw and raw.endswith(b"\r\n\r\n")
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            st, out = call(url, "/judge", raw=b"{}", method=method)
            assert st == 405 and "use POST" in out["error"]
        st, out = call(url, "/health", raw=b"{}", method="POST")
        assert st == 405 and "use GET, HEAD" in out["error"]
        for request in (b"BREW /judge HTTP/1.1\r\n\r\n", b"garbage\r\n\r\n",
                        b"GET /health HTTP/9.9\r\n\r\n", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"):
            [(st, h, out)] = responses(exchange(url, request))
            assert 400 <= st < 600 and h["Content-Type"] == "application/json" and out["error"]


def test_a_get_body_is_never_parsed_as_a_second_request():
    # before: the body of a GET was read as the next request on the connection
    with serving() as (url, _, _):
        smuggled = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        raw = exchange(url, b"GET /health HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
                       + b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert [st for st, _, _ in responses(raw)] == [200, 200]


def test_a_file_named_like_base64_is_read_as_the_file(tmp_path):
    # before: a real file named "QUJDREVGR0hJSktMTU5PUA==" was base64-decoded instead
    (tmp_path / "QUJDREVGR0hJSktMTU5PUA==").write_bytes(png())
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(jpeg, format="JPEG")
    assert b64(jpeg.getvalue()).startswith("/9j/")  # inline base64 that looks like an absolute path
    with serving(root=tmp_path) as (url, _, _):
        for image in ("QUJDREVGR0hJSktMTU5PUA==", b64(jpeg.getvalue()), b64(png()),
                      "data:image/png;base64," + b64(png())):
            st, out = call(url, "/judge", dict(BASE, image=image))
            assert st == 200 and out["score"] == pytest.approx(debiased("q=1", "q=0")), image[:30]
        st, out = call(url, "/judge", dict(BASE, image="QUJDREVGR0hJSktMTU5PUQ=="))  # no such file
        assert st == 400 and "not a readable image" in out["error"]


class PollingJudge(RecordingJudge):
    """For the question "left", a 'generation' of up to 3 s that polls should_stop every
    20 ms, as the HF stopping criterion does every token; others are immediate."""

    def _generate_texts(self, reqs, n, do_sample, should_stop=None):
        self.started.set()
        t_end = time.monotonic() + (3.0 if any(r.question == "left" for r in reqs) else 0.0)
        while time.monotonic() < t_end and not (should_stop and should_stop()):
            time.sleep(0.02)
        return super()._generate_texts(reqs, n, do_sample)


def test_work_on_the_model_stops_when_its_client_leaves():
    # before: a client that left after its request reached the model still cost the next
    # client the whole generation
    judge = PollingJudge()
    with serving(judge, max_batch=1) as (url, srv, _):
        body = json.dumps(dict(BASE, question="left")).encode()
        with socket.create_connection(addr(url)) as s:
            s.sendall(b"POST /judge HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert judge.started.wait(5)
        t0 = time.monotonic()
        st, _ = call(url, "/judge", dict(BASE, question="next"))
        assert st == 200 and time.monotonic() - t0 < 2.0  # not the 3 s the left one would take
        assert srv.batcher.cancelled_on_model == 1


def test_hf_generation_polls_should_stop_every_token(tiny_dir):
    from r1reward.judge import JudgeCancelled, RewardJudge
    judge = RewardJudge.from_pretrained(tiny_dir, max_new_tokens=64)
    polls = []

    def stop_after_three():
        polls.append(1)
        return len(polls) >= 3
    with pytest.raises(JudgeCancelled):
        judge.judge_batch([(None, "What colour?", "Red.", "Blue.")], k=1, swap=False,
                          should_stop=stop_after_three)
    assert 3 <= len(polls) <= 5  # stopped at the third token, not after 64
