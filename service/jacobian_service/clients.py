"""Who a request's client is, for the limits that share a front end's room among clients.

A client is, in order: the API key it was let in with (auth on: each key its own client,
behind a proxy too), else the address a trusted proxy says it forwarded for (the last
``X-Forwarded-For`` entry, the one that proxy appended, when the peer is among
``TRUSTED_PROXIES``), else the peer's address. Without keys or trusted proxies, every
caller behind one proxy is one client. Connections and ports are never a client: a
client that opens more connections is the same client.
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["KEY", "client_of", "parse_proxies"]

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
    peer = (scope.get("client") or ("",))[0]
    if proxies and _among(peer, proxies):
        forwarded = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for")
        last = forwarded.rsplit(b",", 1)[-1].strip().decode("latin-1")
        if last:
            return "addr:" + last
    return "addr:" + peer


def _among(address: str, proxies: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # (the test client's "testclient", a Unix socket's "")
        return False
    return any(ip in net for net in proxies)
