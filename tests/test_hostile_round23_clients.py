"""Red team, round twenty-three: hostile clients over raw sockets and odd HTTP (evading
the per-client share of the streams behind proxies; the header-field limit on uvicorn's
h11; one client's many connections pushing out other clients' idle keep-alives; ...).

Each names what a user saw before. Who a client is (``clients.client_of``) is checked on
the scopes a server makes, without a server; the HTTP cases run a bare app under the
server's guarded protocol class (``test_connections._guarded_uvicorn``).
"""

from __future__ import annotations

import pytest

from jacobian_service.clients import client_of, parse_proxies
from jacobian_service.connections import MAX_HEADER_FIELDS

# ------------------------------------------------------------ who a client is, behind proxies

_PROXIES = parse_proxies("10.0.0.0/8, fd00::/8")


def _client(peer: str, *forwarded: str, **state) -> str:
    headers = [(b"host", b"t")] + [(b"x-forwarded-for", f.encode()) for f in forwarded]
    return client_of({"client": (peer, 51000), "headers": headers, "state": state}, _PROXIES)


def test_proxies_in_tiers_name_the_client_not_the_outer_proxy() -> None:
    """Behind two trusted proxies (a load balancer, then nginx), the inner one appends the
    outer one's address: the last entry was the load balancer's for every caller, so all
    of them were one client, each held to one share (one caller's streams refused the
    others 429). The client is the last entry that is no trusted proxy."""
    assert _client("10.0.0.2", "203.0.113.7, 10.0.0.1") == "addr:203.0.113.7"
    assert _client("10.0.0.2", "198.51.100.9, 10.0.0.1") == "addr:198.51.100.9"
    # What a client wrote itself, before its proxy's entry, is still never read ...
    assert _client("10.0.0.2", "10.9.9.9, 192.0.2.1, 203.0.113.7, 10.0.0.1") == "addr:203.0.113.7"
    # ... nor anything from a peer that is no trusted proxy.
    assert _client("192.0.2.50", "203.0.113.7") == "addr:192.0.2.50"
    # Several headers are one list (RFC 9110 5.3), in order; empty entries are no hop.
    assert _client("10.0.0.2", "192.0.2.1", "203.0.113.7 ,  ", " 10.0.0.1") == "addr:203.0.113.7"


@pytest.mark.parametrize("written", ["203.0.113.7:51000", "203.0.113.7:443", '"203.0.113.7"', " 203.0.113.7 "])
def test_a_port_beside_an_address_is_no_client_of_its_own(written: str) -> None:
    """A proxy that writes its peer's port too (Azure's gateway, some nginx set-ups:
    ``$remote_addr:$remote_port``) made each connection a client of its own: one caller
    opening a connection per stream had a share per stream, no share at all."""
    assert _client("10.0.0.2", written) == "addr:203.0.113.7"


@pytest.mark.parametrize("written", ["2001:db8::1", "[2001:db8::1]:443", "[2001:DB8:0::1]", "2001:db8:0:0:0:0:0:1",
                                     "[2001:db8::1]"])
def test_ipv6_spellings_are_one_client(written: str) -> None:
    assert _client("fd00::5", written) == "addr:2001:db8::/64"


def test_an_ipv6_client_is_its_64() -> None:
    """A host is given a /64 and may send from any address in it (RFC 8981: a temporary
    address a connection): each address its own client, one host held a stream share,
    and the connection cap's count, per address it chose. One /64 is one client, for the
    share and for the cap alike; another /64 is another."""
    from jacobian_service.clients import address_client

    assert _client("10.0.0.2", "2001:db8::1") == _client("10.0.0.2", "2001:db8::ab:cd:ef:1") == "addr:2001:db8::/64"
    assert _client("10.0.0.2", "2001:db8:0:1::1") == "addr:2001:db8:0:1::/64"
    assert _client("2001:db8::1") == _client("2001:db8::2") == "addr:" + address_client("2001:db8::2")
    assert address_client("::ffff:192.0.2.1") == address_client("192.0.2.1") == "192.0.2.1"


def test_an_ipv6_zone_and_a_mapped_ipv4_peer_are_addresses() -> None:
    """A server listening on ``::`` sees an IPv4 proxy as ``::ffff:10.0.0.2``, which
    ``10.0.0.0/8`` did not take: the proxy was no trusted proxy and every caller behind it
    one client."""
    assert _client("::ffff:10.0.0.2", "203.0.113.7") == "addr:203.0.113.7"
    assert _client("10.0.0.2", "::ffff:203.0.113.7") == "addr:203.0.113.7"
    assert _client("10.0.0.2", "fe80::1%eth0") == _client("10.0.0.2", "[fe80::1%25eth0]:80") == "addr:fe80::/64"
    # A name or an obfuscated entry (RFC 7239's "unknown", "_hidden") is kept as written.
    assert _client("10.0.0.2", "unknown") == "addr:unknown"


def test_forwarded_is_never_read_and_a_key_is_its_own_client() -> None:
    """``Forwarded`` (RFC 7239) a client sends passes a proxy that appends to
    ``X-Forwarded-For``: read, each request could name a client of its own."""
    scope = {"client": ("10.0.0.2", 1), "headers": [(b"forwarded", b"for=192.0.2.1"), (b"x-forwarded-for", b"203.0.113.7")]}
    assert client_of(scope, _PROXIES) == "addr:203.0.113.7"
    assert _client("10.0.0.2", "203.0.113.7", api_key_digest=b"\x01" * 32) == "key:" + "01" * 8


# ------------------------------------------------------------ the same head limits under either parser

async def _echo_fields(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = str(len(scope["headers"])).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("implementation", ["h11", "httptools"])
def test_header_fields_past_the_limit_are_431_under_either_parser(implementation: str) -> None:
    """README: headers over 256 fields are 431. Under uvicorn's h11 (the server's parser
    where httptools is not installed) 3,000 short fields within its 16 KiB were read, held
    as the request's headers and answered 200 ("3001"; here "258"). Both parsers stop at the limit, in
    one piece or trickled a field at a time; one field under it is served."""
    from .test_connections import _connect, _guarded_uvicorn, _problem, _read_to_close

    fields = "".join(f"a{i}:b\r\n" for i in range(MAX_HEADER_FIELDS))  # with Host: one over (Connection: two)
    with _guarded_uvicorn(_echo_fields, implementation, 5.0) as url:
        for pieces in (1, MAX_HEADER_FIELDS):
            s = _connect(url)
            head = f"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{fields}\r\n".encode()
            step = -(-len(head) // pieces)
            for i in range(0, len(head), step):
                s.sendall(head[i:i + step])
            status, headers, problem = _problem(_read_to_close(s, 5))
            s.close()
            assert status == 431, (status, problem)
            assert (problem["code"], headers["connection"]) == ("headers_too_large", "close"), problem
            assert f"limit of {MAX_HEADER_FIELDS} fields" in problem["detail"]
        # At the limit, twice on one connection: the next request's fields are counted afresh.
        s = _connect(url)
        head = f"GET / HTTP/1.1\r\nHost: t\r\n{fields.split(chr(10), 1)[1]}\r\n".encode()
        s.sendall(head)
        s.settimeout(5)
        assert s.recv(65536).endswith(b"\r\n\r\n%d" % MAX_HEADER_FIELDS)
        s.sendall(head.replace(b"a1:b\r\n", b"Connection: close\r\n"))
        raw = _read_to_close(s, 5)
        s.close()
        assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"\r\n\r\n%d" % MAX_HEADER_FIELDS), raw[-300:]


# ------------------------------------------------------------ the connection cap, among clients

def test_one_address_past_the_connection_cap_closes_its_own_idle_connections() -> None:
    """Past the connection cap a new connection closed the one that had waited longest
    idle, whoever's: one client opening connections (an idle one costs it nothing) closed
    every other client's keep-alive, each of its new ones costing another client its
    connection. Now the cap takes room from the address holding the most: its own
    longest idle one goes; where all of its others have requests in progress, its new one
    is 503 (another client's idle keep-alive stays). A client is an address here (no
    request is read yet): behind a proxy, by age as before."""
    import asyncio
    import socket
    import threading

    from jacobian_client import wire

    from .test_connections import _read_to_close
    from .test_hostile_round9 import _capped_uvicorn, _get

    release, entered = threading.Event(), threading.Semaphore(0)

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            entered.release()
        while scope["path"] == "/slow" and not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def served(s: socket.socket, path: str = "/") -> None:
        _get(s, path)
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 200"), path

    opened: list[socket.socket] = []
    with _capped_uvicorn(app, 3) as address:
        try:
            victim = socket.create_connection(address, source_address=("127.0.0.2", 0))
            opened.append(victim)
            served(victim)  # then idle on keep-alive: the oldest connection
            for _ in range(6):  # the other client opens twice the cap, each used once
                opened.append(socket.create_connection(address))
                served(opened[-1])
            served(victim)  # still open (before: closed by the first of them)
            mine = opened[-2:]  # the other client's two left; its older ones were closed
            for s in opened[1:-2]:
                s.settimeout(5)
                assert s.recv(10) == b""
            for s in mine:  # busy, then one more of its own: refused, the victim's kept
                _get(s, "/slow")
            assert entered.acquire(timeout=5) and entered.acquire(timeout=5)  # (their requests are in progress)
            with socket.create_connection(address) as s:
                answer = _read_to_close(s, 5)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower(), answer
            detail = wire.loads(body)["detail"]
            assert "most connections (3), 2 of them this client address's" in detail, detail
            served(victim)
            release.set()
            for s in mine:
                s.settimeout(5)
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            release.set()
            for s in opened:
                s.close()


# ------------------------------------------------------------ Host's edges

@pytest.mark.parametrize("host", ["[fe80::1%25eth0]:8000", "[fe80::1%eth0]", "[fe80::1%25en%2D0]", "[v1.fe:80]:80",
                                  "API.Example.ORG.", "localhost.:8000", "[::ffff:127.0.0.1]"])
def test_a_host_of_any_uri_host_form_is_served(client, host: str) -> None:
    """An IPv6 literal with its zone (RFC 6874) was a 400 "the Host header ... is no
    host[:port]": httpx, and so this project's SDK, sends ``Host: [fe80::1%25eth0]:8000``
    for a service on a link-local address (Python's http.client before 3.12 sent the zone
    after a bare ``%``). A trailing dot, upper case and an IPvFuture are hosts too."""
    import httpx

    if host.startswith("[fe80::1%25eth0]"):  # (what httpx writes, not only what this test does)
        assert httpx.Request("GET", "http://[fe80::1%25eth0]:8000/").headers["host"] == host
    r = client.get("/healthz", headers={"host": host})
    assert r.status_code == 200, (host, r.text)


@pytest.mark.parametrize("host", ["[fe80::1%]", "[fe80::1%eth 0]", "[v1.]", "[fe80::1]%25eth0", "[::1]x:80",
                                  "[::1][::2]", "x[::1]"])
def test_a_zone_or_literal_that_is_none_is_a_400(client, host: str) -> None:
    """... and what is none is still a 400: an empty zone, an IPv6 literal with more
    beside it (served before: the literal and a reg-name's characters were one run)."""
    from .conftest import assert_problem

    assert "Host" in assert_problem(client.get("/healthz", headers={"host": host}), 400, "malformed_request")["detail"]
