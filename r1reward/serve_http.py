"""The reward server's HTTP layer: the standard library's ThreadingHTTPServer, hardened
for clients that misbehave (``r1reward.serve`` holds the API; this module knows nothing
of models).

What it adds to ``http.server`` (the numbers come from the server's ``limits``):
- a connection cap (``max_connections``): a new connection over the cap closes the
  connection that has waited longest for its next request; when none is idle it gets a
  JSON 503 and is closed, so the handler threads stay bounded;
- deadlines on every read: a connection waits at most ``idle_timeout_s`` for a request
  to start, and a request must arrive whole (request line, headers and body) within
  ``read_timeout_s`` of its first byte, so a client trickling a byte at a time holds its
  connection no longer than an idle one; writes time out after ``write_timeout_s``;
- every answer is JSON, the standard library's own errors included (a bad request line,
  too many headers, an unknown method: it answers those as HTML);
- a body is always consumed per its ``Content-Length`` (a GET's body is never parsed as
  a second request); a non-ASCII-digit or conflicting ``Content-Length`` is a 400, a
  missing one on POST a 411, and chunked bodies are refused (411);
- a body over ``max_body_bytes`` gets a JSON 413, then up to ``max_drain_bytes`` of it are
  read and dropped before the connection closes, so a client that sends the whole body
  before reading (Python's http.client and urllib do) reads the 413 instead of a reset;
  an ``Expect: 100-continue`` client is refused before it sends the body;
- a route's handler can ask whether its client is still there (``client_alive``), so
  work for a client that left is dropped.

Why not a production server such as uvicorn: it has no deadline for receiving a request
(its keep-alive timer stops at the first byte, so a client sending a byte every few
seconds holds a connection for good), answers malformed requests in plain text, and
leaves body limits to the application; covering those would mean wrapping its private
protocol classes. The standard library server with the limits above needs no dependency.
"""
from __future__ import annotations

import io
import json
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit() is True)
_READ_CHUNK = 1 << 20
MAX_HEADER_BYTES = 128 << 10  # request line + headers of one request


class HTTPError(Exception):
    """An answer other than 200: ``status``, a message, extra headers; ``close`` ends the
    connection after the answer (the request's body may be unread)."""

    def __init__(self, status: int, message: str, headers: dict | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


class ClientGone(Exception):
    """The client closed its connection: nobody to answer."""


class _Answered(Exception):
    """The answer has been sent already (and the connection is to close)."""


def readable_now(sock) -> bool:
    """Whether sock has bytes (or EOF, or an error) to read, without waiting."""
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(sock, select.POLLIN | select.POLLPRI)
        return bool(p.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


def _peer_state(sock) -> str:
    """'data' (bytes waiting), 'closed' (EOF or error) or 'quiet', without blocking."""
    try:
        if sock.fileno() < 0:
            return "closed"
        if not readable_now(sock):
            return "quiet"
        return "data" if sock.recv(1, socket.MSG_PEEK) else "closed"
    except (OSError, ValueError):
        return "closed"


class _Conn:
    """One accepted connection, as the server and its handler thread share it."""

    __slots__ = ("sock", "phase", "deadline", "since", "head_bytes")

    def __init__(self, sock):
        self.sock = sock
        self.phase = "idle"      # idle (waiting for a request) | head | body | busy
        self.deadline = float("inf")
        self.since = time.monotonic()
        self.head_bytes = 0

    def wait_for_request(self, idle_timeout_s: float):
        self.phase, self.head_bytes = "idle", 0
        self.since = time.monotonic()
        self.deadline = self.since + idle_timeout_s


class _TimedSocketReader(io.RawIOBase):
    """The socket as a raw stream whose every read waits only until the connection's
    deadline: the idle deadline until a request's first byte, then that byte's time plus
    read_timeout_s for the rest of the request."""

    def __init__(self, sock, conn: _Conn, read_timeout_s: float):
        self.sock, self.conn, self.read_timeout_s = sock, conn, read_timeout_s

    def readable(self):
        return True

    def readinto(self, b):
        conn = self.conn
        if conn.phase in ("idle", "head") and conn.head_bytes > MAX_HEADER_BYTES:
            raise ConnectionAbortedError(f"request headers over {MAX_HEADER_BYTES} bytes")
        left = conn.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("read deadline passed")
        self.sock.settimeout(left)
        n = self.sock.recv_into(b)
        if n and conn.phase == "idle":  # a request starts: its deadline runs from here
            conn.phase, conn.deadline = "head", time.monotonic() + self.read_timeout_s
        if conn.phase in ("idle", "head"):
            conn.head_bytes += n
        return n


def parse_json_body(raw: bytes, max_values: int):
    """A JSON object from a request body, or HTTPError 400/413 (never a 500)."""
    # Structural characters bound how many Python objects the parse can create (a 16 MB
    # body of "[{},{},...]" would otherwise become ~400 MB of dicts); it over-counts
    # punctuation inside strings, which is why the default is far above real requests.
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > max_values:
        raise HTTPError(413, f"JSON body with up to {values} values, over the limit of {max_values}")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise HTTPError(400, "body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise HTTPError(400, f"body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "body must be a JSON object")
    return body


class JSONRequestHandler(BaseHTTPRequestHandler):
    """Dispatches ``server.routes`` (``{path: {method: fn(server, body, handler)}}``;
    body is the parsed JSON object for POST, None otherwise; fn returns the JSON answer
    or raises HTTPError / ClientGone)."""

    protocol_version = "HTTP/1.1"
    server_version = "r1reward"
    sys_version = ""

    def setup(self):
        super().setup()
        limits = self.server.limits
        self.conn = self.server.connection_state(self.request)
        self.rfile.close()  # reads go through the deadline-aware reader instead
        self.rfile = io.BufferedReader(_TimedSocketReader(self.connection, self.conn,
                                                          limits.read_timeout_s), 16 << 10)

    def handle_one_request(self):
        self.conn.wait_for_request(self.server.limits.idle_timeout_s)
        super().handle_one_request()

    def log_message(self, fmt, *args):  # keep a load test's output readable
        if self.server.verbose:
            super().log_message(fmt, *args)

    # ---- answers -----------------------------------------------------------------------
    def version_string(self):
        return self.server_version

    def send_json(self, status: int, obj, headers: dict | None = None, close: bool = False):
        data = json.dumps(obj).encode()
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            # an unparsable request line leaves the stdlib's HTTP/0.9 default, which would
            # send the body without a status line or headers
            self.request_version, close = "HTTP/1.0", True
        self.connection.settimeout(self.server.limits.write_timeout_s)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if getattr(self, "command", "") != "HEAD" and status >= 200 and status not in (204, 304):
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own errors (bad request line or headers, URI too long,
        unknown method) as JSON like every other error; the connection closes."""
        self.close_connection = True
        short = self.responses.get(code, ("error",))[0]
        try:
            self.send_json(code, {"error": str(message or short)[:300]}, close=True)
        except OSError:
            pass

    def handle_expect_100(self):
        """Refuse an oversized or malformed body before the client sends it."""
        try:
            self._content_length()
        except HTTPError as e:
            self.send_json(e.status, {"error": e.message}, e.headers, close=True)
            return False
        return super().handle_expect_100()

    # ---- the client --------------------------------------------------------------------
    def client_alive(self) -> bool:
        """False once the client has closed or reset the connection (bytes it sent ahead,
        a pipelined request, count as alive). Never blocks."""
        return _peer_state(self.connection) != "closed"

    # ---- the body ----------------------------------------------------------------------
    def _content_length(self) -> int | None:
        limits = self.server.limits
        if self.headers.get("Transfer-Encoding") is not None:
            raise HTTPError(411, "chunked request bodies are not supported: send a Content-Length",
                            close=True)
        values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
        if not values:
            if self.command in ("POST", "PUT", "PATCH"):
                raise HTTPError(411, "a Content-Length header is required", close=True)
            return None
        if len(set(values)) != 1 or not _CONTENT_LENGTH.fullmatch(values[0]):
            raise HTTPError(400, f"invalid Content-Length header {values[0][:40]!r}", close=True)
        n = int(values[0])
        if n > limits.max_body_bytes:
            raise HTTPError(413, f"body of {n} bytes, over the limit of {limits.max_body_bytes}",
                            close=True)
        return n

    def _read_body(self) -> bytes:
        try:
            n = self._content_length()
        except HTTPError as e:
            if e.status == 413:  # answer first, then read what the client still sends
                self.send_json(e.status, {"error": e.message}, close=True)
                self._discard(int(self.headers["Content-Length"].strip()))
                raise _Answered() from None
            raise
        if not n:
            return b""
        parts, left = [], n
        try:
            while left:
                chunk = self.rfile.read(min(left, _READ_CHUNK))
                if not chunk:
                    raise HTTPError(400, f"body ended after {n - left} of {n} bytes", close=True)
                parts.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            raise HTTPError(408, f"body not received within {self.server.limits.read_timeout_s} s",
                            close=True) from None
        return b"".join(parts)

    def _discard(self, n: int):
        left = min(n, self.server.limits.max_drain_bytes)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, _READ_CHUNK))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:
            pass

    # ---- dispatch ----------------------------------------------------------------------
    def _dispatch(self):
        try:
            if self.conn.phase == "idle":  # the request was read ahead with the previous one
                self.conn.deadline = time.monotonic() + self.server.limits.read_timeout_s
            self.conn.phase = "body"
            raw = self._read_body()
            self.conn.phase = "busy"
            path = self.path.split("?", 1)[0]
            methods = self.server.routes.get(path)
            if methods is None:
                raise HTTPError(404, f"no such endpoint: {self.command} {path[:200]}")
            fn = methods.get(self.command)
            if fn is None:
                allow = ", ".join(methods)
                raise HTTPError(405, f"{self.command} is not allowed on {path}: use {allow}",
                                headers={"Allow": allow})
            body = parse_json_body(raw, self.server.limits.max_json_values) \
                if self.command == "POST" else None
            self.send_json(200, fn(self.server, body, self))
        except HTTPError as e:
            self.send_json(e.status, {"error": e.message}, e.headers, close=e.close)
        except (ClientGone, _Answered):
            self.close_connection = True
        except OSError:  # the client went away while we answered
            self.close_connection = True
        except Exception as e:  # a model failure is the server's fault, not the client's
            self.send_json(500, {"error": f"{type(e).__name__}: {e}"[:2000]})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch


class GuardedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap (see the module docstring)."""

    # socketserver's default listen backlog is 5: in a burst of concurrent clients the
    # connections beyond it are reset before a thread can accept them.
    request_queue_size = 256
    daemon_threads = True
    _MAX_REJECTING = 8  # threads answering 503 to connections over the cap

    def __init__(self, address, handler, limits, routes, verbose=False):
        self.limits, self.routes, self.verbose = limits, routes, verbose
        self._conns: dict = {}
        self._conns_lock = threading.Lock()
        self._rejecting = threading.BoundedSemaphore(self._MAX_REJECTING)
        self.evicted = self.rejected = 0
        super().__init__(address, handler)

    def connections(self) -> int:
        return len(self._conns)

    def connection_state(self, sock) -> _Conn:
        with self._conns_lock:
            return self._conns.get(sock) or _Conn(sock)

    def process_request(self, request, client_address):
        with self._conns_lock:
            admit = len(self._conns) < self.limits.max_connections or self._evict_idle()
            if admit:
                self._conns[request] = _Conn(request)
        if not admit:
            return self._reject(request)
        super().process_request(request, client_address)

    def _evict_idle(self) -> bool:
        """Close an idle connection (holding _conns_lock): one its client already closed
        if any, else the one idle the longest; False if none. A connection with request
        bytes waiting is not idle."""
        idle = sorted((c.since, id(c), c) for c in self._conns.values() if c.phase == "idle")
        states = [(_peer_state(c.sock), c) for _, _, c in idle]
        for want in ("closed", "quiet"):  # a client that left costs nobody anything
            for state, c in states:
                if state != want:
                    continue
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)  # its handler's read returns EOF
                except (OSError, ValueError):
                    pass
                self._conns.pop(c.sock, None)
                self.evicted += 1
                return True
        return False

    def _reject(self, sock):
        self.rejected += 1
        if not self._rejecting.acquire(blocking=False):
            return self.shutdown_request(sock)
        threading.Thread(target=self._reject_thread, args=(sock,), daemon=True).start()

    def _reject_thread(self, sock):
        data = json.dumps({"error": f"server busy: {self.limits.max_connections} connections open"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.settimeout(1.0)
            sock.sendall(head + data)
            sock.shutdown(socket.SHUT_WR)
            end, left = time.monotonic() + 1.0, 1 << 20  # let the client finish sending, bounded
            while left > 0 and time.monotonic() < end:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        finally:
            sock.close()
            self._rejecting.release()

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        """A connection error is the client's business; anything else is printed."""
        if isinstance(sys.exc_info()[1], OSError) and not self.verbose:
            return
        super().handle_error(request, client_address)
