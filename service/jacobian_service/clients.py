"""Who a request's client is, for the limits that share a front end's room among clients.

A client is, in order: the API key it was let in with (auth on: each key its own client,
behind a proxy too), else the address a trusted proxy says it forwarded for (the last
``X-Forwarded-For`` entry, the one that proxy appended, when the peer is among
``TRUSTED_PROXIES``), else the peer's address. Without keys or trusted proxies, every
caller behind one proxy is one client. Connections and ports are never a client: a
client that opens more connections is the same client.

Behind proxies in tiers, each appending its peer, the client is the last entry that is
not itself a trusted proxy (the last alone named the inner proxy's own peer, the outer
proxy: every caller one client). An address is compared as an address, not as text: a
port or brackets a proxy wrote beside it (``1.2.3.4:51000``, ``[2001:db8::1]:443``: each
connection had been a client of its own), an IPv6 zone, another spelling of the same
IPv6 address, or an IPv4 address seen mapped into IPv6 (a server listening on ``::``
sees an IPv4 proxy as ``::ffff:10.0.0.1``, which ``10.0.0.0/8`` did not take) are one
address, and an IPv6 address is its /64 (a host's own, any address of which it may
send from). ``Forwarded`` (RFC 7239) is never read: a proxy that appends to
``X-Forwarded-For`` passes a client's own ``Forwarded`` through, and read first it would
let each request name a client of its own. Any host among ``TRUSTED_PROXIES`` is taken for
a proxy (there is no telling one apart), so a network named there lets each host in it
name any client: the docs ask for the proxies' own addresses.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

__all__ = ["KEY", "address_client", "client_of", "parse_proxies"]

# Where AuthMiddleware leaves the digest of the key a request was let in with (scope["state"]).
KEY = "api_key_digest"

Networks = tuple["ipaddress.IPv4Network | ipaddress.IPv6Network", ...]


def parse_proxies(text: str) -> Networks:
    """``TRUSTED_PROXIES``: comma-separated addresses or networks (``10.0.0.0/8``)."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip())


def client_of(scope: dict[str, Any], proxies: Networks = ()) -> str:
    key = scope.get("state", {}).get(KEY)
    if key is not None:
        return "key:" + key.hex()[:16]
    text = (scope.get("client") or ("",))[0]
    if not proxies:
        return _peer_client(text) if len(text) <= _LONGEST_ADDRESS else "addr:" + _named(_address(text))
    peer = _address(text)
    if not _among(peer, proxies):
        return "addr:" + _named(peer)
    forwarded = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for").decode("latin-1")
    client = peer
    for entry in reversed(forwarded.split(",")):  # nearest hop first; each entry its proxy's peer
        if entry.strip():
            client = _address(entry)
            if not _among(client, proxies):
                break
    return "addr:" + _named(client)


def address_client(address: str) -> str:
    """A peer's address (as a socket gives it) as a client: what the connection cap
    counts connections by (``connections.guarded_protocol``), as ``client_of`` names it."""
    return address if ":" not in address else _named(_address(address))  # (IPv4: as it is)


# Both below are pure functions of their argument, asked of the same few peers and proxies
# at every request that may stream (every .npy Jacobian): ipaddress's parsing, ~10 us a
# request, was 4 % of a front end's instructions for a small .npy Jacobian.
@functools.lru_cache(maxsize=4096)
def _named(address: "ipaddress.IPv4Address | ipaddress.IPv6Address | str") -> str:
    """An IPv6 address names its /64: a host is given a /64 and may send from any address
    in it (RFC 8981's temporary addresses; one a connection), and each address its own
    client let one host hold a share, and connections, per address."""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


@functools.lru_cache(maxsize=4096)
def _peer_client(text: str) -> str:
    """``client_of`` a peer with no proxy trusted, by the peer's text as the server gave
    it: the two caches below are keyed by the parsed address, whose hash is Python code
    (``ipaddress``'s ``__hash__``, a ``hex`` of its ``int``), asked again at every
    request that may stream; a string keeps its hash. Short texts only (as below)."""
    return "addr:" + _named(_address(text))


# No address as a proxy writes it ("[IPv6%zone]:port") is longer. An entry that is held
# no address and kept as written (cut to this) where it is longer: the caches above and
# below are keyed by it, and a caller whose proxy is trusted (or inside a trusted network)
# that sent 4,096 entries of 30 KB kept 234 MB in a front end's caches, for good.
_LONGEST_ADDRESS = 80


def _address(text: str) -> "ipaddress.IPv4Address | ipaddress.IPv6Address | str":
    """An entry as proxies write it, as an address: without the port or brackets beside
    it ("1.2.3.4:51000", "[2001:db8::1]:443"), its IPv6 zone ("fe80::1%eth0") or quotes,
    an IPv4 address mapped into IPv6 as IPv4; or as it is where it is none (the test
    client's "testclient", a Unix socket's "", "unknown")."""
    if len(text) > _LONGEST_ADDRESS:
        text = text.strip()
        return _parsed(text) if len(text) <= _LONGEST_ADDRESS else text[:_LONGEST_ADDRESS]
    return _parsed(text)


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> "ipaddress.IPv4Address | ipaddress.IPv6Address | str":
    text = text.strip().strip('"')
    host = text
    if text.startswith("["):
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # (an IPv6 address has two at least)
        host = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return text
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _among(address: "ipaddress.IPv4Address | ipaddress.IPv6Address | str", proxies: Networks) -> bool:
    return not isinstance(address, str) and any(address in net for net in proxies)
