"""A WebSocket handshake handed to the app, answered as the plain HTTP GET it also is.

The service has no WebSocket endpoint. ``jacobian-service serve`` runs uvicorn with
``ws="none"``, so a handshake (``GET`` with ``Upgrade: websocket``) reaches the app as an
HTTP request: ``405`` on a POST-only route, ``401`` without a key, ``403`` from a page
of another site. Under an ASGI server that speaks WebSocket (uvicorn run by hand, or
the tests' servers), the app got a ``websocket`` scope instead, which the router cannot
take: Starlette's ``Request`` asserted, and the server answered a plain-text 500 and
logged the traceback. A page's ``new WebSocket(...)`` read "Unexpected response code:
500". Here that scope is served as the same GET, and its answer goes back through ASGI's
``websocket.http.response`` extension: the same status and problem+json as under
``serve``. A server without that extension gets the handshake closed, which it answers
with 403.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

__all__ = ["as_plain_get"]

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def as_plain_get(app: Callable[..., Awaitable[None]], scope: dict[str, Any], receive: Receive,
                       send: Send) -> None:
    """Serve the WebSocket handshake in ``scope`` with ``app`` as an HTTP GET."""
    await receive()  # "websocket.connect": the handshake, nothing more
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    http = {k: v for k, v in scope.items() if k != "subprotocols"}
    http.update(type="http", method="GET", scheme={"wss": "https"}.get(scope.get("scheme", "ws"), "http"))
    body_sent = False

    async def plain_receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        while True:
            if (await receive())["type"] == "websocket.disconnect":
                return {"type": "http.disconnect"}

    async def plain_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            await send({"type": "websocket.http.response.start", "status": message["status"],
                        "headers": message.get("headers", [])})
        elif message["type"] == "http.response.body":
            await send({"type": "websocket.http.response.body", "body": message.get("body", b""),
                        "more_body": message.get("more_body", False)})

    await app(http, plain_receive, plain_send)
