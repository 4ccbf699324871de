"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto server, for the tests.

Every request is forwarded, unless it draws a fault: S3's ``503 SlowDown`` or ``500
InternalError`` (the JSON services' equivalents for Batch, SageMaker, Athena, Glue, SQS) answered
before moto sees it, a response cut off mid-body with a TCP reset (a GET's), a response lost
after S3 did the work (an S3 PUT's or DELETE's: the connection reset before its status line, so
the client retries what already happened, a conditional put meeting its own write), or a delay. Which
request draws what is a function of the seed and the request itself (method, path, the how-manyth
time it is made), not of thread timing, so a run with the same seed meets the same faults.
``stats`` counts requests, faults by kind, and retries (botocore numbers its attempts in the
``amz-sdk-request`` header).
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

S3_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
JSON_ERRORS = {
    "slowdown": (503, "ServiceUnavailableException", "Service is unavailable, try again."),
    "internal": (500, "InternalFailure", "The request failed due to an internal error."),
}
KINDS = ("slowdown", "internal", "reset", "delay", "lost")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0, faults=None):
        """``faults(method, path, nth)``, if given, names each request's fault (or None) in
        place of the seeded draw: for a test that needs one fault at one place."""
        self.upstream = urlsplit(upstream)
        self.rate, self.seed, self.faults = rate, seed, faults
        self.stats: Counter = Counter()
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                kind = proxy.draw(self.command, self.path, self.headers, body)
                if kind in ("slowdown", "internal"):
                    return self._error(kind)
                if kind == "delay":
                    time.sleep(0.2)
                status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
                if kind == "lost":
                    # S3 single-object writes only: a lost answer to a JSON API's create (a job
                    # submitted twice) or to a multipart completion is another fault, not this one
                    multipart = "uploadId" in self.path or "uploads" in self.path
                    if self.command in ("PUT", "DELETE") and not self._json_api() and not multipart:
                        return self._reset()
                    proxy.count("lost_not_applicable")
                cut = kind == "reset" and self.command == "GET" and status == 200 and len(data) > 1
                if kind == "reset" and not cut:  # nothing to cut: count it as what it became
                    proxy.count("reset_not_applicable")
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if cut:
                    self.wfile.write(data[: len(data) // 2])
                    return self._reset()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _reset(self):
                self.wfile.flush()
                # SO_LINGER 0: the close is a reset, as a dropped connection looks
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True

            def _json_api(self) -> bool:  # Batch, SageMaker, Athena, Glue, SQS; else S3
                return "X-Amz-Target" in self.headers or self.path.startswith("/v1/")

            def _error(self, kind: str):
                json_api = self._json_api()
                status, code, message = (JSON_ERRORS if json_api else S3_ERRORS)[kind]
                if json_api:
                    data = f'{{"__type": "{code}", "message": "{message}"}}'.encode()
                    ctype = "application/x-amz-json-1.1"
                else:
                    data = (
                        '<?xml version="1.0" encoding="UTF-8"?>'
                        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
                    ).encode()
                    ctype = "application/xml"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def draw(self, method: str, path: str, headers, body: bytes) -> str | None:
        """The fault this request meets, if any: a function of the seed and the request (the
        JSON services all POST to /: their operation and body tell requests apart)."""
        attempt = headers.get("amz-sdk-request", "")
        request = (method, path, headers.get("X-Amz-Target", ""), hashlib.sha256(body).hexdigest())
        with self._lock:
            self.stats["requests"] += 1
            if "attempt=" in attempt and not attempt.startswith("attempt=1;"):
                self.stats["retries"] += 1
            self._seen[request] += 1
            nth = self._seen[request]
        if self.faults:
            kind = self.faults(method, path, nth)
        else:
            digest = hashlib.sha256(f"{self.seed}|{'|'.join(request)}|{nth}".encode()).digest()
            hit = int.from_bytes(digest[:8], "big") / 2**64 < self.rate
            kind = KINDS[digest[8] % len(KINDS)] if hit else None
        if kind:
            self.count(kind)
        return kind

    def forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=300)
        try:
            out = {
                k: v
                for k, v in headers.items()
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
            }
            out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()
