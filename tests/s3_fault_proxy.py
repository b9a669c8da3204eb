"""A fault-injecting HTTP proxy in front of the test S3 server (moto), for retry tests.

Clients point their endpoint at the proxy; it forwards every request to the real server, except
that GET-object requests (``GET /bucket/key``, not listings) of a chosen fraction of keys fail
the way S3 fails under load: ``503 SlowDown`` and ``500 InternalError`` with S3's XML error
bodies, and connections reset before any response byte. Faults are bounded three ways, so a test
can never hang on them: at most ``per_key`` per object (the next attempt goes through), at most
``max_faults`` in all, and none after ``seconds``; ``stop_faults()`` turns them off at once.
Keys are chosen by a hash, so which objects fail does not depend on thread timing.

It can also play a server that does not honour conditional reads: ``ignore_if_match`` forwards
object GETs without their ``If-Match`` header (the server then answers 200 with whatever version
it holds), and ``response_headers`` replaces (or, with None, drops) headers of object-GET
answers, e.g. ``{"ETag": None}`` for a server that sends no ETag.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import unquote, urlparse

_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        '<RequestId>fault-proxy</RequestId></Error>')
FAULTS = (
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
    None,  # connection reset
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}


class FaultProxy:
    """Start with `start()`; ``url`` is the endpoint to give clients.

    Args:
        upstream: the real S3 endpoint (``http://127.0.0.1:<port>``).
        fraction: share of object keys whose GETs fail (chosen by a hash of the key).
        per_key: consecutive failing GETs per chosen key before it goes through.
        max_faults: faults injected in all, then the proxy only forwards.
        seconds: faults stop this long after `start()`.
    """

    def __init__(self, upstream: str, fraction: float = 0.3, per_key: int = 1, max_faults: int = 50,
                 seconds: float = 300.0, keys: set[str] | None = None, forbid: set[str] = frozenset(),
                 ignore_if_match: bool = False, response_headers: dict[str, str | None] | None = None):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.fraction, self.per_key, self.max_faults, self.seconds = fraction, per_key, max_faults, seconds
        # keys: exactly these ``bucket/key`` objects fail (instead of a hashed fraction);
        # forbid: these always answer 403 AccessDenied, as S3 does without s3:GetObject.
        self.keys, self.forbid = keys, set(forbid)
        self.ignore_if_match, self.response_headers = ignore_if_match, dict(response_headers or {})
        self.if_match_seen = 0  # object GETs that arrived with If-Match (before any stripping)
        self.lock = threading.Lock()
        self.faulted: Counter = Counter()  # key -> faults injected for it
        self.kinds: Counter = Counter()  # SlowDown / InternalError / reset -> count
        self.enabled = True
        self.deadline = 0.0
        self.server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def chosen(self, key: str) -> bool:
        """Whether GETs of this object key (``bucket/key``) are to fail."""
        if self.keys is not None:
            return key in self.keys
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
        return h / 2**32 < self.fraction

    def fault_for(self, method: str, path: str):
        """The fault to inject for this request (an entry of FAULTS), or False to forward it."""
        parsed = urlparse(path)
        bucket, _, key = unquote(parsed.path).lstrip("/").partition("/")
        if method != "GET" or not key or parsed.query:
            return False
        if f"{bucket}/{key}" in self.forbid:
            return (403, "AccessDenied", "Access Denied")
        with self.lock:
            total = sum(self.faulted.values())
            if (not self.enabled or time.monotonic() > self.deadline or total >= self.max_faults
                    or not self.chosen(f"{bucket}/{key}") or self.faulted[f"{bucket}/{key}"] >= self.per_key):
                return False
            self.faulted[f"{bucket}/{key}"] += 1
            fault = FAULTS[total % len(FAULTS)]
            self.kinds[fault[1] if fault else "reset"] += 1
            return fault

    @staticmethod
    def is_object_get(method: str, path: str) -> bool:
        """``GET /bucket/key`` without a query: an object read, not a listing."""
        parsed = urlparse(path)
        return method == "GET" and bool(unquote(parsed.path).lstrip("/").partition("/")[2]) and not parsed.query

    def rewrite(self, method: str, path: str, request: dict, response: list) -> tuple[dict, list]:
        """(request headers to forward, response headers to send) for one request."""
        if not self.is_object_get(method, path):
            return request, response
        if any(k.lower() == "if-match" for k in request):
            with self.lock:
                self.if_match_seen += 1
            if self.ignore_if_match:
                request = {k: v for k, v in request.items() if k.lower() != "if-match"}
        if self.response_headers:
            names = {k.lower() for k in self.response_headers}
            response = [(k, v) for k, v in response if k.lower() not in names]
            response += [(k, v) for k, v in self.response_headers.items() if v is not None]
        return request, response

    def stop_faults(self) -> None:
        with self.lock:
            self.enabled = False

    def start(self) -> FaultProxy:
        self.deadline = time.monotonic() + self.seconds
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _handler(proxy: FaultProxy):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: pytest output is for failures
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if not size:
                        while self.rfile.readline().strip():  # trailers, then the blank line
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST, which clients see as "connection reset by peer".
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True

        def _forward(self) -> None:
            body = self._body()
            fault = proxy.fault_for(self.command, self.path)
            if fault is None:
                return self._reset()
            if fault:
                status, code, message = fault
                data = _XML.format(code=code, message=message).encode()
                return self._send(status, [("Content-Type", "application/xml")], data)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if self.headers.get("Transfer-Encoding"):
                headers["Content-Length"] = str(len(body))
            headers, _ = proxy.rewrite(self.command, self.path, headers, [])
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP and k.lower() != "content-length"]
                _, out = proxy.rewrite(self.command, self.path, {}, out)
                self._send(resp.status, out, data,
                           length=resp.getheader("Content-Length") if self.command == "HEAD" else None)
            finally:
                conn.close()

        def _send(self, status: int, headers: list, data: bytes, length: str | None = None) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            # HEAD answers carry the object's length, not that of the (empty) body.
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler
