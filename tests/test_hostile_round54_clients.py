"""Hostile clients, round 54: the shipped gateway (deploy/nginx.conf.template, whole).

1. An upload was buffered whole by the gateway before a replica saw any of it: a 50 MB
   body with a wrong key was refused after 4.8 s of upload (curl --limit-rate 10M; 3 ms
   from the replica itself), and every upload sat in the gateway's temporary files
   meanwhile. Now a body of 1 MB or more, or a chunked one, goes to the replica as it
   arrives, and its refusal comes back while the client is still sending; smaller bodies
   stay buffered (resent to another replica when one drains).
2. What nginx refused itself before any replica (a request line or a header line over
   its 64 KiB buffers: 414 and 400; a request that is no valid HTTP: 400; a transfer
   coding it does not know: 501) was nginx's HTML, no problem+json, no CORS headers.
   Now the service's 431 headers_too_large, 400 malformed_request and 501
   unsupported_transfer_coding, CORS included where the Origin header was read.

The replica here is a stub on a socket (no engine, no torch): what reaches it, and when,
is the point, not what the service computes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jacobian_client import wire

from ._client_support import free_port

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf.template"
PAGE = "https://app.example.org"
LIMIT = 4 << 20  # the gateway's client_max_body_size here (the template's 256m, smaller to send)


class _Replica(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[dict] = []  # each request's target and the body bytes it had when answered


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 keep-alive as nginx's upstream connections use it. ``/refuse/...`` is
    answered 403 as soon as its head is in (as the service refuses a wrong key), then
    the rest is read and dropped until the peer closes (the service's lingering close);
    anything else is answered once its whole body is read, with what it got."""

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(1 << 20)
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers = {}
            while (field := self.rfile.readline(1 << 20)) not in (b"\r\n", b"\n", b""):
                name, _, value = field.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if target.startswith("/refuse/"):
                self.server.seen.append({"target": target, "headers": headers})
                self._answer(403, {"code": "forbidden"}, close=True)
                try:
                    while self.connection.recv(1 << 16):
                        pass
                except OSError:
                    pass
                return
            body = self._body(headers)
            self.server.seen.append({"target": target, "headers": headers, "bytes": len(body)})
            self._answer(200, {"target": target, "method": method, "bytes": len(body),
                               "sha256": hashlib.sha256(body).hexdigest()})

    def _body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", ""):
            out = bytearray()
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        return self.rfile.read(int(headers.get("content-length", "0")))

    def _answer(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.wfile.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                         f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode() + data)
        self.wfile.flush()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, _Replica]]:
    """The whole template as Compose renders it, its upstream the stub replica and a
    replica that is gone (a port nothing listens on), CORS_ORIGINS the page's."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("no nginx (apt-get install nginx-light)")
    replica = _Replica()
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    folder = tmp_path_factory.mktemp("gateway")
    port = free_port()
    text = TEMPLATE.read_text()
    text = re.sub(r"\sresolve\s", " ", text)  # (nginx < 1.27.3; no Compose network here)
    text = re.sub(r"\n *server +jacobian-gpu[23]:\d+[^\n]*", "", text)
    text = text.replace("server jacobian:8000", f"server 127.0.0.1:{replica.server_address[1]}")
    text = text.replace("server jacobian-gpu1:8000", f"server 127.0.0.1:{free_port()}")  # gone
    text = text.replace("${NGINX_LOCAL_RESOLVERS}", "127.0.0.1").replace("${JACOBIAN_SERVICE_CORS_ORIGINS}", PAGE)
    text = text.replace("worker_processes auto;", "worker_processes 1; daemon off;")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {folder}/nginx.pid;").replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("access_log /dev/stdout main;", "access_log off;").replace("error_log /dev/stderr warn;", "")
    assert "client_max_body_size 256m;" in text
    text = text.replace("client_max_body_size 256m;", f"client_max_body_size {LIMIT >> 20}m;")
    temp = "".join(f"{kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {", "http {\n" + temp, 1)
    (folder / "nginx.conf").write_text(text)
    proc = subprocess.Popen([binary, "-p", str(folder), "-e", f"{folder}/error.log", "-c", str(folder / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/gateway-health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "error.log").read_text()
            time.sleep(0.05)
        yield url, replica
    finally:
        proc.terminate()
        proc.wait(10)
        replica.shutdown()
        replica.server_close()


def _answer_while_sending(url: str, head: bytes, first: bytes, timeout_s: float = 30) -> tuple[bytes, float]:
    """Sends the head and the first part of a body and no more; the answer that comes
    before the rest (the client still holding most of its body), and when."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        t0 = time.monotonic()
        s.sendall(head + first)
        got = b""
        while b"\r\n\r\n" not in got:
            try:
                piece = s.recv(65536)
            except TimeoutError:
                break
            if not piece:
                break
            got += piece
        return got, time.monotonic() - t0


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_large_upload_is_refused_while_it_is_still_being_sent(gateway, framing):
    """A 3 MB upload (a declared Content-Length, or chunked) whose first 64 KiB are sent:
    the replica's refusal comes back at once, the client never sends the rest. It came
    only after the whole body was in (buffered by the gateway: no answer here at all)."""
    url, replica = gateway
    before = len(replica.seen)
    first = b"\x93NUMPY" + b"\0" * (64 << 10)
    if framing == "length":
        head = (b"POST /refuse/v1/functions/sin/jacobian HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer wrong\r\n"
                b"Content-Type: application/x-npy\r\nContent-Length: 3000000\r\n\r\n")
    else:
        head = (b"POST /refuse/v1/functions/sin/jacobian HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer wrong\r\n"
                b"Content-Type: application/x-npy\r\nTransfer-Encoding: chunked\r\n\r\n")
        first = f"{len(first):x}\r\n".encode() + first + b"\r\n"
    got, _ = _answer_while_sending(url, head, first)
    assert got.startswith(b"HTTP/1.1 403 "), got[:300]
    assert len(replica.seen) == before + 1 and replica.seen[-1]["target"] == "/refuse/v1/functions/sin/jacobian"


@pytest.mark.parametrize("size", [1 << 10, 1_500_000])
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_upload_reaches_the_replica_whole_and_as_sent(gateway, size, framing):
    """Buffered (small, with a length) or passed on as it arrives (large, or chunked):
    the body is the client's byte for byte, and the target as the client wrote it
    (escapes, slashes, the query), whichever way it went."""
    url, replica = gateway
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    target = "/v1/functions/a%2Fb/%65valuate?x=%31&y=//z"
    content = body if framing == "length" else iter([body[:size // 2], body[size // 2:]])  # (httpx: chunked)
    with httpx.Client(timeout=30) as client:
        r = client.post(url + target, content=content, headers={"Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    assert r.json() == {"target": target, "method": "POST", "bytes": size, "sha256": hashlib.sha256(body).hexdigest()}


def test_a_chunked_upload_past_the_gateways_limit_is_its_problem(gateway):
    """A chunked body (passed on as it arrives) over client_max_body_size is still the
    gateway's 413 problem+json, readable by the allowed page, not nginx's HTML."""
    url, _ = gateway
    piece = b"\0" * (1 << 20)
    with httpx.Client(timeout=30) as client:
        r = client.post(url + "/v1/functions/sin/jacobian", content=iter([piece] * ((LIMIT >> 20) + 2)),
                        headers={"Content-Type": "application/x-npy", "Origin": PAGE})
    assert (r.status_code, r.headers["content-type"], r.json()["code"]) == (413, "application/problem+json",
                                                                            "payload_too_large"), r.text[:300]
    assert r.headers["access-control-allow-origin"] == PAGE


def _raw(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        got = b""
        while piece := s.recv(65536):
            got += piece
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split(" ")[1]), fields, body


ORIGIN = f"Origin: {PAGE}\r\n".encode()


@pytest.mark.parametrize("case, data, code, cors", [
    ("request line over 64 KiB", b"GET /v1/functions?x=" + b"a" * (70 << 10) + b" HTTP/1.1\r\nHost: g\r\n" + ORIGIN
     + b"\r\n", "headers_too_large", False),  # (the Origin is never read: no CORS, as the service's own)
    ("header line over 64 KiB", b"GET /v1/functions HTTP/1.1\r\nHost: g\r\n" + ORIGIN + b"X-Big: " + b"a" * (70 << 10)
     + b"\r\n\r\n", "headers_too_large", True),
    ("no request line", b"HELLO\r\n\r\n", "malformed_request", False),
    ("two Host headers", b"GET /v1/functions HTTP/1.1\r\n" + ORIGIN + b"Host: g\r\nHost: h\r\n\r\n", "malformed_request",
     True),
    ("an unknown transfer coding", b"POST /v1/functions/sin/jacobian HTTP/1.1\r\nHost: g\r\n" + ORIGIN
     + b"Transfer-Encoding: gzip\r\n\r\n", "unsupported_transfer_coding", True),
    ("another HTTP version", b"GET /v1/functions HTTP/2.0\r\nHost: g\r\n" + ORIGIN + b"\r\n", "malformed_request",
     False),  # (nginx's 505: the service's 400)
    ("TRACE", b"TRACE /v1/functions HTTP/1.1\r\nHost: g\r\n" + ORIGIN + b"\r\n", "method_not_allowed", True),
    ("a gateway page's own path", b"GET /.gateway/headers_too_large HTTP/1.1\r\nHost: g\r\nConnection: close\r\n" + ORIGIN
     + b"\r\n",
     "not_found", True),
])
def test_what_the_gateway_cannot_pass_on_is_the_services_problem(gateway, case, data, code, cors):
    """Each was nginx's HTML page (414, 400, 400, 400, 501, 505, 405, 404) with no CORS headers: now the
    code the service itself gives such a request, as problem+json, with the request id
    in header and body, and the page's CORS headers wherever nginx had read its Origin."""
    url, replica = gateway
    before = len(replica.seen)
    status, fields, body = _raw(url, data)
    problem = json.loads(body)
    assert (status, fields["content-type"], problem["code"]) == (wire.PROBLEM_STATUS[code], "application/problem+json",
                                                                 code), (case, status, body[:300])
    assert problem["status"] == status and problem["request_id"] == fields["x-request-id"], case
    assert fields.get("access-control-allow-origin") == (PAGE if cors else None), (case, fields)
    assert len(replica.seen) == before, case  # (nothing passed on)
    assert fields["server"] == "nginx", fields  # (no version: server_tokens off)


def test_an_http_1_0_request_without_host_is_served_as_the_replica_serves_it(gateway):
    """HTTP/1.0 without Host (a plain probe) is served directly; through the gateway it
    went on with no Host at all (nginx drops an empty header) and the replica refused
    the HTTP/1.1 request it got (400). The gateway now names its own address."""
    url, replica = gateway
    status, _, body = _raw(url, b"GET /v1/functions HTTP/1.0\r\n\r\n")
    assert status == 200, body[:300]
    assert replica.seen[-1]["headers"]["host"] == "127.0.0.1"



def test_a_client_holding_many_idle_connections_does_not_shut_the_gateway(gateway):
    """1,100 connections whose headers never end (one worker, as here): the next
    client's connection was closed at once ("1024 worker_connections are not enough")
    for as long as they were held. It is served; and they are held no longer than the
    service holds such a connection (HEADER_TIMEOUT_S: the template's timeouts, below)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1100 + 200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"open-file limit {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    url, _ = gateway
    port = int(url.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(1100):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /v1/functions HTTP/1.1\r\nHost: g\r\nX-Slow: ")
            held.append(s)
        r = httpx.get(url + "/v1/functions", timeout=30)
        assert r.status_code == 200 and r.json()["target"] == "/v1/functions", r.text[:300]
    finally:
        for s in held:
            s.close()
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_gateways_client_timeouts_are_no_longer_than_the_services():
    """docs/deploy.md: behind a proxy, keep the proxy's client timeouts no longer than the
    service's. nginx's defaults (60 s for headers, a body's piece and an answer's piece;
    75 s of keep-alive) held a slow client six times as long as the service would; and
    the gateway kept idle connections to a replica (60 s) past the replica's keep-alive,
    so that a request could go out on one being closed."""
    from jacobian_service.settings import Settings

    text = TEMPLATE.read_text()

    def seconds(name: str, where: str = text) -> float:
        found = re.findall(rf"^\s*{name}\s+(\d+)s;", where, re.M)
        assert len(found) == 1, (name, found)
        return float(found[0])

    defaults = Settings()
    upstream = re.search(r"upstream jacobian_replicas \{(.*?)\n    \}", text, re.S).group(1)
    http = text.replace(upstream, "")
    assert seconds("client_header_timeout", http) <= defaults.header_timeout_s
    assert seconds("client_body_timeout", http) <= defaults.read_idle_timeout_s
    assert seconds("send_timeout", http) <= defaults.send_timeout_s
    assert seconds("keepalive_timeout", http) <= defaults.header_timeout_s + 1
    assert seconds("keepalive_timeout", upstream) < defaults.header_timeout_s + 1  # (the replica's keep-alive)
