"""Pure-ASGI middleware: request ids, access log and request metrics; API keys.

Both wrap the router whole, so every route, every error and every way of reaching a
route is covered alike: there is no second path that could skip the key check.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import time
from typing import Any, Callable

from . import clients
from .errors import ExpectationFailed, Forbidden, MalformedRequest, Unauthorized, UnsupportedTransferCoding
from .framing import UNSUPPORTED_CODING, has_body, hosts_fault
from .logs import quick_record
from .request_ids import new_request_id
from .responses import META_HEADERS, echo, problem_response
from .routes import Router, route_path
from .settings import NULL_ORIGIN_HINT
from .yielding import offer_the_cpu

__all__ = ["EXPOSED_HEADERS", "PREFLIGHT_MAX_AGE_S", "AccessMiddleware", "AuthMiddleware", "cors", "cors_answer_headers"]

access_log = logging.getLogger("jacobian_service.access")
_QUIET = ("/healthz", "/readyz", "/metrics")
# Headers every answer carries. nosniff: a browser takes each answer for the type it
# says (problem+json echoes what a request sent; /metrics is text), never sniffs one into
# HTML or script. no-store, unless an answer sets its own caching (the docs pages'
# files): answers are computed now, for whoever asked (a cache in front that keeps
# answers without Cache-Control, as Varnish does for 2 minutes, could serve a stale
# /readyz or /metrics, or one caller's Jacobian to the next). Also written by
# connections.py for the answers below the app.
NOSNIFF = (b"x-content-type-options", b"nosniff")
NO_STORE = (b"cache-control", b"no-store")
# Every answer to a POST says ``Vary: *`` (RFC 9110 12.5.5), in place of the fields it
# names otherwise (Accept, Origin): what it says, a Jacobian or an error, depends on the
# body, which no cache keys. The Cache API (a page's service worker keeps answers there;
# it honours Vary, not no-store, and takes no POST as a key) kept a derivative's answer
# under its URL and gave that Jacobian to the page's next call with other inputs; it
# refuses to keep an answer that varies on anything (a TypeError the page reads).
VARY_ANY = (b"vary", b"*")

# Headers that hold one value (RFC 9110 5.3: not a comma-separated list, so two of them
# cannot be combined): given twice, each reader took the first (the body was read as the
# first Content-Type, the first Authorization was checked), while a proxy or a log in
# front may have taken the other. Content-Length and Host are the parser's and the
# Host check's. (Two X-Request-IDs, a client's and a proxy's, are no such question: the
# last is echoed.)
_SINGLETONS = frozenset({b"content-type", b"authorization", b"x-request-timeout"})
# RFC 9110 7.2: Host = uri-host [ ":" port ], uri-host an IP-literal or a reg-name
# (unreserved, pct-encoded and sub-delims characters; empty where the target has none).
# An IPv6 literal may name its zone (RFC 6874: "%25" and the zone, as httpx, and so this
# project's SDK, send it for a link-local address: [fe80::1%25eth0]:8000 was a 400; or
# "%" and the zone, as Python's http.client before 3.12 did); an IP-literal may also be an
# IPvFuture (RFC 3986 3.2.2).
# One or the other: a literal with more beside it ("[::1]x", "[::1][::2]") is neither.
_HOST = re.compile(rb"(?:\[(?:[0-9A-Fa-f:.]+(?:%(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2})+)?"
                   rb"|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
                   rb"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?")


def _log_access(message: str, *args: Any, **extra: Any) -> None:
    """``access_log.info`` without its search of the call stack for the caller's file
    and line (which an access line never shows), its record made the quick way
    (``logs.quick_record``): one line per request, so it counts."""
    if access_log.isEnabledFor(logging.INFO):
        access_log.handle(quick_record(access_log, logging.INFO, message, args, extra))


class AccessMiddleware:
    """Echo the client's ``X-Request-ID`` (or make one) on every response, log one line
    per request with that id (never any array data, control characters escaped), and
    count every response in the requests metric: errors, 404s, GETs, and streams that
    broke off (as ``aborted``, not as the 200 their header said)."""

    def __init__(self, app: Any, metrics: Any, router: Router) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router
        self.active = 0  # HTTP requests in this process now

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        hosts = 0
        bad_host: bytes | None = None
        twice: list[str] = []
        seen: set[bytes] = set()
        expects: list[bytes] = []
        codings: list[bytes] = []
        length = False
        for key, value in scope["headers"]:
            if key in _SINGLETONS:
                if key in seen and key.decode() not in twice:
                    twice.append(key.decode())
                seen.add(key)
            if key == b"x-request-id":
                request_id = value.decode("latin-1")
            elif key == b"host":
                hosts += 1
                if _HOST.fullmatch(value) is None:
                    bad_host = value
            elif key == b"expect":
                expects.append(value.strip().lower())
            elif key == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif key == b"content-length":
                length = True
        # A client's id is echoed as sent, or not at all: one over 128 characters was cut
        # (an id neither the client's nor unique: two sharing their first 128 shared it),
        # and one of non-ASCII bytes, echoed as its bytes in the header, was written
        # decoded as latin-1 into the problem's request_id ("café" came back as "cafÃ©"
        # beside a header read as "café"). Either gets an id of the service's own.
        if not (0 < len(request_id) <= 128 and request_id.isascii() and request_id.isprintable()):
            request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 0
        recorded = False

        def record(outcome: str) -> None:
            nonlocal recorded
            recorded = True
            path = route_path(scope)
            matches = self.router.match(scope)
            method = scope["method"]
            # The route of this method; else (a CORS preflight, which the CORS middleware
            # answers, a 405) the route of this path, so that they count under it too.
            route, params = matches[0] if matches else (None, {})
            for r, p in matches:
                if r.method == method:
                    route, params = r, p
                    break
            endpoint = route.operation_id if route else "_unrouted"
            # The label comes from the path, so requests refused before their handler ran
            # (auth, unknown function, bad body) count under their function too.
            function = params.get("name", "")
            code = state.get("code", "")
            if method == "OPTIONS" and not code and any(k == b"access-control-request-method" for k, _ in scope["headers"]):
                code = "preflight"  # not a call of the endpoint: kept apart from its calls' counts
            if function and "service" in scope and function not in scope["service"].registry:
                function = "_unknown"  # bounded label values, whatever names clients send
            self.metrics.child(self.metrics.requests, function, endpoint, outcome, code).inc()
            if path not in _QUIET:
                # (control characters and non-ASCII escaped; a printable ASCII path
                # without a backslash is its own escape)
                safe = path[:500] if path.isascii() and path.isprintable() and "\\" not in path else \
                    path.encode("unicode_escape").decode("ascii")[:500]
                _log_access(
                    "%s %s %s", scope["method"], safe, outcome,
                    request_id=request_id, method=scope["method"], path=safe,
                    status=status if outcome != "aborted" else "aborted",
                    duration_ms=round((time.perf_counter() - started) * 1e3, 3),
                )

        # A client that sent Expect: 100-continue waits for the 100 before it sends its
        # body; answered without one (a 401, a 404, before the body was asked for), it
        # may never send it (RFC 9110 10.1.1), and the connection kept open took its next
        # request for the body: eaten, no answer, until the connection timed out. Such an
        # answer now closes the connection (as Go's server does). Only requests that
        # expect pay for the wrapped receive. A request that announces no body (no
        # Content-Length, or 0, and no Transfer-Encoding) leaves nothing in the stream
        # to be taken for the next request, whatever it expects: its connection is kept
        # (a client that sends the header on every request, as .NET's ExpectContinue on
        # an HttpClient's default headers does, had each GET close its connection).
        body_asked = not expects or not has_body(scope["headers"])

        async def receive_marked() -> dict[str, Any]:
            nonlocal body_asked
            body_asked = True  # uvicorn sends the 100 Continue here
            return await receive()

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = []
                cached = False
                posted = scope["method"] == "POST"
                for header in message.get("headers", ()):  # (one pass: most answers carry 3 or 4)
                    key = header[0].lower()
                    if key == b"x-request-id" or (posted and key == b"vary"):
                        continue
                    cached = cached or key == b"cache-control"
                    headers.append(header)
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                headers.append(NOSNIFF)
                if not cached:
                    headers.append(NO_STORE)
                if posted:
                    headers.append(VARY_ANY)
                # The server's cycle (``send`` is its bound method) closes the connection after
                # this answer where it no longer keeps it alive (a graceful shutdown begun while
                # the request was read, a half-closed client, the last request of a pipeline
                # cut short): httptools then says ``Connection: close``, uvicorn's h11 said
                # nothing and closed, and a client reused the connection for its next request.
                if not body_asked or getattr(getattr(send, "__self__", None), "keep_alive", True) is False:
                    headers = [(k, v) for k, v in headers if k.lower() != b"connection"] + [(b"connection", b"close")]
                message["headers"] = headers
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Counted before the last byte leaves, so a client that reads /metrics right
                # after its response already sees that response counted.
                record(str(status))
                await send(message)
                # Its last bytes are with the kernel; what is left of the request here (the
                # server's and the app's ends of it: ~75 us on the loaded VM) need not hold a
                # lone client woken on this core (yielding.py).
                if self.active == 1:
                    offer_the_cpu()
                return
            await send(message)

        # RFC 9112 3.2: an HTTP/1.1 request with no Host, or more than one, is a 400 (the
        # parser, httptools, lets both through; which host did a proxy route it for?). The
        # connection closes, as under h11 (framing.py) and for the other framing faults
        # below: it kept serving what followed, where h11's closed it.
        app = self.app
        if hosts != 1 and scope.get("http_version") == "1.1":
            app = _closing(hosts_fault(hosts), request_id)
        elif bad_host is not None:  # (RFC 9112 3.2: a 400, as for none; one a proxy in front may have routed otherwise)
            app = _closing(MalformedRequest(f"the Host header {echo(bad_host.decode('latin-1'))} is no host[:port]"),
                           request_id)
        elif twice:  # which one was meant? A proxy in front may have read the other one
            app = _closing(MalformedRequest(f"the header {', '.join(twice)} is given more than once; give it once"),
                           request_id)
        elif any(e != b"100-continue" for e in expects):  # RFC 9110 10.1.1: one we cannot meet
            app = _closing(ExpectationFailed("the only expectation served is Expect: 100-continue"), request_id)
        elif codings and length:
            # RFC 9112 6.1: such a request may be read two ways, and a server that answers it
            # must close the connection. httptools refuses it; uvicorn's h11 read the
            # chunked body, kept the connection and served what followed it, which a proxy
            # in front that went by Content-Length took for part of the body (smuggled).
            app = _closing(MalformedRequest("a request with both Content-Length and Transfer-Encoding can be framed two "
                                            "ways; send one of them"), request_id)
        elif codings and scope.get("http_version") == "1.0":
            # RFC 9112 6.1: HTTP/1.0 has no transfer codings; such a message's framing is
            # faulty (a proxy in front may have read the chunked body as the next request).
            app = _closing(MalformedRequest("an HTTP/1.0 request cannot use Transfer-Encoding; send Content-Length"),
                           request_id)
        elif any(c not in (b"chunked", b"") for c in codings):
            # RFC 9112 6.1: a transfer coding the server does not understand is a 501 (a
            # gzip body under chunked framing was read as the JSON or .npy it is not).
            app = _closing(UnsupportedTransferCoding(UNSUPPORTED_CODING), request_id)
        self.active += 1
        try:
            await app(scope, receive if body_asked else receive_marked, send_with_id)
        finally:
            self.active -= 1
            if not recorded:
                record("aborted")


def _closing(error: Any, request_id: str) -> Any:
    """A refusal before the body is read, on a connection then closed: what follows the
    headers is not known to be a body this server can frame."""
    response = problem_response(error, request_id)
    response.headers["connection"] = "close"
    return response


class AuthMiddleware:
    """Bearer API keys on every route but the probes and the docs pages; ``/metrics`` and
    the OpenAPI document by their own settings. Keys are compared in constant time,
    against every key (no early exit on a match). No keys configured turns auth off.

    A route the table marks ``auth="admin"`` (an operator's action: releasing a
    quarantine) takes only an operators' key (``admin_keys``), which is an API key too,
    elsewhere. With API keys but no operators' keys, no key may take it; with neither,
    auth is off for it as for the rest."""

    def __init__(self, app: Any, keys: tuple[str, ...], metrics_auth: bool, docs_auth: bool,
                 admin_keys: tuple[str, ...] = ()) -> None:
        self.app = app
        # Compared as SHA-256 digests: hmac.compare_digest is constant-time only between
        # equal lengths, and returns at once on a length that differs, so the time a
        # guess took told whether its length was a key's. Digests are all 32 bytes.
        self.admin_keys = [_digest(k.encode()) for k in admin_keys]
        # An operator's key opens what an API key opens (when API keys are set at all).
        self.keys = [_digest(k.encode()) for k in keys] + (self.admin_keys if keys else [])
        # The docs pages are HTML shells with nothing secret: they ask for the key that
        # /openapi.json wants (a page load cannot carry one).
        self.open_paths = {"/healthz", "/readyz", "/docs", "/redoc", "/favicon.ico"}
        if not metrics_auth:
            self.open_paths.add("/metrics")
        if not docs_auth:
            self.open_paths.add("/openapi.json")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not (self.keys or self.admin_keys):
            await self.app(scope, receive, send)
            return
        if (action := self._operators(scope)) is not None:
            error = self._check(scope, self.admin_keys, action)
        elif not self.keys or _is_open(route_path(scope), self.open_paths):
            await self.app(scope, receive, send)
            return
        else:
            error = self._check(scope, self.keys)
        if error is None:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["code"] = error.code
        await problem_response(error, scope["state"].get("request_id", ""))(scope, receive, send)

    def _operators(self, scope: dict[str, Any]) -> str | None:
        """The operator's action the request asks for (``DELETE /v1/functions/{name}/quarantine``),
        if its route is one the table marks ``auth="admin"``: matched as the router
        matches it, once (the match is kept in the scope)."""
        match = getattr(self.app, "match", None)
        method = scope.get("method")
        for route, _ in match(scope) if match is not None else ():
            if route.auth == "admin" and route.method == method:
                return f"{route.method} {route.path}"
        return None

    def _check(self, scope: dict[str, Any], keys: list[bytes], action: str | None = None) -> Unauthorized | Forbidden | None:
        operators = action is not None
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if not header or scheme.lower() != "bearer" or not token.strip():
            hint = ""
            if _KEY_IN_QUERY.search(scope.get("query_string", b"")):
                # Refused, and said so: a 401 that only asked for the header left a client
                # that sent ?api_key= wondering whether its key was wrong.
                hint = ("; a key in the query string is not read (URLs are kept in logs and proxies' "
                        "histories): send it in the header")
            wanted = "'Authorization: Bearer <operator's key>' (ADMIN_KEYS)" if operators else "'Authorization: Bearer <key>'"
            return Unauthorized(f"send {wanted}" + hint, headers={"WWW-Authenticate": "Bearer"})
        if operators and not keys:
            # API keys, and no operators' keys: any caller let in with an API key released
            # a quarantine, and had the engine killed again by the function it released.
            return Forbidden(f"{action} is an operator's action, and this server has no operators' keys (ADMIN_KEYS): "
                             f"no API key may take it. {_OPERATOR_HINT}")
        supplied = _digest(token.strip().encode("latin-1"))
        matched = False
        for key in keys:  # every key, always: the time taken says nothing of which matched
            matched |= hmac.compare_digest(supplied, key)
        if not matched:
            if operators:  # (the same words for an API key and for a key that is none: nothing told apart)
                return Forbidden(f"the key is not an operator's (ADMIN_KEYS): {action} is an operator's action. "
                                 f"{_OPERATOR_HINT}")
            return Forbidden("the API key is not valid")
        scope.setdefault("state", {})[clients.KEY] = supplied  # the client, for its share of the streams (clients.py)
        return None


# What a caller refused an operator's action is told (the one such action: a quarantine's release).
_OPERATOR_HINT = "A quarantine also lifts by itself after QUARANTINE_COOLDOWN_S."


# Names clients use for a key in a URL (?api_key=, ?key=, ?access_token=, ?token=).
_KEY_IN_QUERY = re.compile(rb"(?:^|&)(?:api[_-]?key|apikey|key|access[_-]?token|token|auth)=", re.IGNORECASE)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _is_open(path: str, open_paths: set[str]) -> bool:
    # The Swagger UI / ReDoc files are public code: open even when the pages are not. An
    # open path with a trailing slash (/docs/) is open too: the router redirects it there.
    return path in open_paths or path.startswith("/docs-assets/") or (path.endswith("/") and path[:-1] in open_paths)


# The response headers a script may read (every derivative answer's meta headers,
# responses.META_HEADERS, and their times as Server-Timing, which a page read as null
# from its headers, where its Resource Timing entry had them; a 415 for a
# Content-Encoding says which codings are served in Accept-Encoding).
EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "Content-Length", "Content-Disposition", "WWW-Authenticate", "Allow",
                   *META_HEADERS.values(), "Server-Timing", "Accept-Encoding"]


# Request headers the service reads and answers for: each must pass the preflight, or
# a page of an allowed origin that sends it reads "Failed to fetch" where any other
# client gets the service's answer. Content-Encoding is refused with a 415 that says
# none is served (routes.py): a page that gzipped its body (CompressionStream) had its
# preflight refused, and never read why.
SERVICE_HEADERS = ["Authorization", "Content-Type", "Content-Encoding", "Accept", "X-Request-ID", "X-Request-Timeout"]


# Request headers that tracing in a page adds to its calls (OpenTelemetry's fetch and XHR
# instrumentation, Sentry, Datadog RUM, AWS X-Ray, Zipkin's B3, Jaeger): each is named in
# the preflight, and one not allowed failed every call of such a page ("Failed to fetch").
# The service ignores them; a proxy in front may read them.
TRACE_HEADERS = ["traceparent", "tracestate", "baggage",  # W3C Trace Context and Baggage (OpenTelemetry's default)
                 "sentry-trace", "uber-trace-id", "x-amzn-trace-id",
                 "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
                 "x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-origin", "x-datadog-sampling-priority"]


# Request headers that a page's HTTP library or framework sets on every call it makes:
# ``X-Requested-With`` (Laravel's and Rails' axios / jQuery set-up, AngularJS apps), the
# cache-busting ``Cache-Control`` / ``Pragma`` / ``Expires`` of "no-cache" interceptors
# (Angular's; with If-Modified-Since, the old IE fix: CONDITIONAL_HEADERS). None is
# CORS-safelisted, so each is named in the preflight, and refused it failed every call of
# such a page ("Failed to fetch", the preflight's problem unreadable to it). The service
# reads none of them: its answers are ``no-store`` whatever a request asks of caches.
LIBRARY_HEADERS = ["X-Requested-With", "Cache-Control", "Pragma", "Expires"]


# The conditional request headers (RFC 9110 13.1), answered to a page as to any client
# (preconditions.py): answers carry no validator (no ETag, no Last-Modified: each is
# computed afresh and ``no-store``, nothing to revalidate), so an If-None-Match tag never
# matches (its ``*`` is a GET's 304), If-Modified-Since and If-Unmodified-Since are
# ignored without a date (13.1.3, 13.1.4), an If-Match is a 412, and If-Range goes with a
# Range, which a server may ignore (14.2) and this one does (a Range other than one plain
# ``bytes=a-b``, which needs no preflight, is named too). A page's library revalidating
# (an ETag a gateway in front added, axios-cache-interceptor's, a hand-written
# conditional GET) read "Failed to fetch", its preflight refused, where any other client
# read the 200; only If-Modified-Since passed. If-Match passes too: a page reads its 412.
CONDITIONAL_HEADERS = ["If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range", "Range"]


# Methods no path takes whose preflights pass (cors): a page then reads the router's 405
# problem, its Allow naming what the path takes, not "Failed to fetch".
_PASSED_TO_THEIR_405 = ("PUT", "PATCH")

# Chromium's cap on a preflight's Access-Control-Max-Age (Firefox's is a day).
PREFLIGHT_MAX_AGE_S = 7200

_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("cors_request_id", default="")


def cors(app: Any, origins: tuple[str, ...]) -> Any:
    """Browsers on pages of ``origins`` may call the API (Starlette's CORS middleware).
    Preflights are answered here, before auth: a browser sends them without the
    ``Authorization`` header the real request will carry, so that header is allowed by
    name (a ``*`` would not cover it). Scripts may read every header the service sends
    for them (a browser hides any not named in ``expose_headers``): the request id, a
    429's or 503's ``Retry-After``, a 401's ``WWW-Authenticate``, a 405's ``Allow``, a
    derivative answer's meta headers (``X-Device``, ``X-Queue-Ms``..., ``Server-Timing``), a binary
    answer's ``Content-Disposition`` (its file name), and a 415's ``Accept-Encoding``.

    A page of an origin named in ``origins`` may call with credentials (``fetch(...,
    {credentials: "include"})``, axios' ``withCredentials``: a proxy in front that
    signs users in with a cookie, TLS client certificates): the browser then wants
    ``Access-Control-Allow-Credentials: true`` beside that very origin, never ``*``, on
    the preflight and on the answer. Without it every such call of an allowed page
    failed ("Failed to fetch"). ``*`` grants no credentials (Starlette's
    ``allow_credentials`` with ``*`` echoes any origin back: every site would read
    answers with the user's cookies), so under ``*`` only the origins also named get them.

    A page of an allowed origin may reach the service on a private address (a cluster's
    10.x, localhost): Chromium's Private Network Access asks the preflight first
    (``Access-Control-Request-Private-Network``), and the operator who allowed the origin
    has answered it. Refused, the page's every call failed on a service it was allowed."""
    from starlette.datastructures import MutableHeaders
    from starlette.middleware.cors import CORSMiddleware

    class ProblemCORS(CORSMiddleware):
        """A refused preflight as problem+json, as every other error (Starlette answers it
        in plain text: "Disallowed CORS origin")."""

        # The origins named, not "*": those that may send credentials.
        credentialed = frozenset(o for o in origins if o != "*")

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            token = _REQUEST_ID.set(scope.get("state", {}).get("request_id", ""))
            try:
                await super().__call__(scope, receive, send)
            finally:
                _REQUEST_ID.reset(token)

        async def send(self, message: Any, send: Any, request_headers: Any) -> None:
            origin = request_headers.get("origin")
            if message["type"] != "http.response.start" or origin not in self.credentialed:
                await super().send(message, send, request_headers)
                return

            async def with_credentials(start: Any) -> None:
                _allow_credentials(MutableHeaders(scope=start), origin)
                await send(start)

            await super().send(message, with_credentials, request_headers)

        def preflight_response(self, request_headers: Any) -> Any:
            response = super().preflight_response(request_headers)
            if request_headers["origin"] in self.credentialed:
                _allow_credentials(response.headers, request_headers["origin"])
            if response.status_code != 400:
                return response
            # The refusal keeps the CORS headers Starlette gave it: an allowed origin's
            # Access-Control-Allow-Origin above all. Without it a page of an allowed
            # origin whose preflight was refused for a header or a method read in the
            # console "No 'Access-Control-Allow-Origin' header is present", sent to look
            # for its origin in CORS_ORIGINS, where it was; with it Chromium says the
            # preflight was refused, whose detail (DevTools' network panel) names what.
            problem = problem_response(MalformedRequest(self._refusal(request_headers)), _REQUEST_ID.get())
            for key, value in response.headers.items():
                if key.startswith("access-control-") or key in ("timing-allow-origin", "vary"):
                    problem.headers[key] = value
            return problem

        def _refusal(self, request_headers: Any) -> str:
            """What was refused, by name: the origin, the method, or which of the headers
            (it said only "this headers is not allowed here (CORS_ORIGINS)", whichever
            header of the page's it was, and blamed a setting that lists origins)."""
            reasons = []
            origin = request_headers["origin"]
            if origin == "null" and not self.is_allowed_origin(origin=origin):
                reasons.append(NULL_ORIGIN_HINT)
            elif not self.is_allowed_origin(origin=origin):
                reasons.append(f"the origin {echo(origin)} is not among CORS_ORIGINS")
            method = request_headers["access-control-request-method"]
            if method not in self.allow_methods:
                taken = [m for m in self.allow_methods if m not in _PASSED_TO_THEIR_405]
                reasons.append(f"the method {echo(method)} is not allowed (allowed: {', '.join(taken)}; "
                               f"{' and '.join(_PASSED_TO_THEIR_405)}, which no path takes, pass to read their 405)")
            asked = [h.strip().lower() for h in request_headers.get("access-control-request-headers", "").split(",")]
            refused = [h for h in asked if h and h not in self.allow_headers]
            if refused:
                reasons.append(f"the request header{'s' if len(refused) > 1 else ''} {echo(', '.join(refused))} "
                               f"cannot be sent (allowed: {', '.join(sorted(self.allow_headers))})")
            return "CORS preflight refused: " + ("; ".join(reasons) or "not allowed here")

    middleware = ProblemCORS(
        app,
        allow_origins=list(origins),
        # The methods the paths take, and PUT and PATCH, which none takes: their
        # preflight refused, a page read "Failed to fetch" (the console: the preflight
        # "does not have HTTP ok status") where a DELETE on a POST path reads the 405
        # whose Allow names what the path takes. Passed, PUT and PATCH read that 405 too
        # (after the key check, as every method); other methods' preflights are refused.
        allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS", *_PASSED_TO_THEIR_405],
        allow_headers=[*SERVICE_HEADERS, *TRACE_HEADERS, *LIBRARY_HEADERS, *CONDITIONAL_HEADERS],
        expose_headers=EXPOSED_HEADERS,
        allow_private_network=True,
        # How long a browser may keep a preflight's answer (per page origin and URL:
        # each function, endpoint and query string is its own). Starlette's 600 s had a
        # page that calls for 10 minutes ask again for every URL; Chromium keeps one at
        # most 7200 s, Firefox 86400. An origin struck from CORS_ORIGINS loses nothing
        # by it: a preflight only lets the request be sent; the answer is read only with
        # this server's Access-Control-Allow-Origin, and computing endpoints refuse a
        # page of an origin not allowed (routes._refuse_other_sites).
        max_age=PREFLIGHT_MAX_AGE_S,
    )
    if "*" in origins:  # (named origins get it by name: _allow_credentials)
        middleware.simple_headers["Timing-Allow-Origin"] = "*"
    return middleware


def cors_answer_headers(origins: tuple[str, ...]) -> Callable[[str | None], list[tuple[str, str]]]:
    """The CORS headers :func:`cors` gives an answer (not a preflight's) to a request
    from a page's ``origin``, for the answers written below the app
    (``connections.guarded_protocol``: a 431 for oversized headers, a 408 for slow ones,
    a 400 the parser could not read, the connection cap's 503), where no middleware
    runs. Without them a page of an allowed origin read "Failed to fetch" where its
    other errors are problem+json it can read. The same as the app's: a named origin by
    name with credentials, else ``*`` under ``*``; none for an origin not allowed."""
    named = frozenset(o for o in origins if o != "*")
    star = "*" in origins
    exposed = ("Access-Control-Expose-Headers", ", ".join(EXPOSED_HEADERS))

    def headers(origin: str | None) -> list[tuple[str, str]]:
        if origin is None:
            return []
        if origin in named:
            return [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"), exposed,
                    ("Vary", "Origin")]
        if star:
            return [("Access-Control-Allow-Origin", "*"), exposed, ("Vary", "Origin")]
        return []

    return headers


def _allow_credentials(headers: Any, origin: str) -> None:
    """``origin`` by name and credentials allowed (a browser refuses ``*`` with them),
    and the timing of its calls: without ``Timing-Allow-Origin`` a page's Resource
    Timing of every call here was zeros past the start (no time to first byte), so the
    tracing a page's instrumentation records (OpenTelemetry's fetch spans, RUM) had no
    network timings of the calls it traced."""
    headers["Access-Control-Allow-Origin"] = origin
    headers["Access-Control-Allow-Credentials"] = "true"
    headers["Timing-Allow-Origin"] = origin
    if "origin" not in {v.strip().lower() for v in headers.get("vary", "").split(",")}:
        headers["Vary"] = ", ".join(v for v in (headers.get("vary", ""), "Origin") if v)
