"""Conditional requests (RFC 9110 13): If-Match and If-None-Match evaluated, the dates ignored.

Evaluated in RFC 9110 13.2.2's order, after the request's own checks (13.2.1: a request
refused otherwise, a 404, 415 or 422, gets that refusal, its conditions ignored):

* The target of an unsafe method (a derivative's POST, a quarantine's DELETE) has no
  current representation (its GET is a 405; each answer is computed afresh): an
  ``If-Match`` (``*`` or tags) is false, a 412 ``precondition_failed`` before the body is
  read or anything computed (13.1.1: the method must not be performed); its
  ``If-None-Match`` is then true, whatever it lists.
* A GET's (HEAD's) 2xx answer is the target's current representation: ``If-Match: *`` is
  true, a list of tags true only where one is the answer's ETag (strong comparison; only
  the docs assets carry one), else 412; ``If-None-Match: *``, or a tag that is the
  answer's ETag (weak comparison), is false: 304, with the answer's validator and caching
  fields (15.4.5).
* ``If-Unmodified-Since`` and ``If-Modified-Since`` are ignored: no answer has a
  modification date (13.1.3 and 13.1.4 say to ignore them then).

Before, none was evaluated: an ``If-Match`` on a POST was computed and answered 200 (a
client guarding its call by a tag learnt nothing), and ``If-None-Match: *`` on a GET of a
function that exists was answered in full.
"""

from __future__ import annotations

from starlette.responses import Response

from .errors import PreconditionFailed
from .header_params import bounded_field, split_unquoted
from .responses import echo, problem_response

__all__ = ["conditional", "evaluated", "if_match_holds", "none_match_held", "refuse_unrepresented"]

# The fields of a 200 that its 304 carries too (RFC 9110 15.4.5)
_KEPT_IN_304 = frozenset({b"etag", b"cache-control", b"vary", b"content-location", b"expires", b"date"})


def _field(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A list field's lines joined (RFC 9110 5.3), or None where absent."""
    lines = [v.decode("latin-1") for k, v in headers if k == name]
    return bounded_field(name.decode().title(), ", ".join(lines)) if lines else None


def _tags(field: str) -> list[str]:
    return [t.strip() for t in split_unquoted(field, ",") if t.strip()]  # (a tag's quotes may hold a ",")


def refuse_unrepresented(headers: list[tuple[bytes, bytes]]) -> None:
    """412 for an ``If-Match`` on a target with no current representation (module docstring)."""
    if_match = _field(headers, b"if-match")
    if if_match is not None:
        raise PreconditionFailed(f"If-Match {echo(if_match)} is false: this resource has no current representation to "
                                 "match (each answer is computed afresh and carries no ETag), so the request is not "
                                 "performed (RFC 9110 13.1.1); send it without If-Match")


def if_match_holds(headers: list[tuple[bytes, bytes]], etag: str | None) -> bool:
    """Whether the request's ``If-Match`` (absent: true) holds for an answer whose ETag is
    ``etag``: ``*``, or a tag strongly equal to it (a weak tag matches nothing, 13.1.1)."""
    if_match = _field(headers, b"if-match")
    if if_match is None:
        return True
    tags = _tags(if_match)
    return "*" in tags or (etag is not None and not etag.startswith("W/") and etag in tags)


def none_match_held(headers: list[tuple[bytes, bytes]], etags: list[str]) -> str | None:
    """The first of ``etags`` (the forms of one answer) that the request's
    ``If-None-Match`` names (``*`` names the first), by weak comparison (13.1.2): the
    tag of what the client holds, for a 304; None where it names none, or is absent."""
    if_none_match = _field(headers, b"if-none-match")
    if if_none_match is None:
        return None
    held = {t.removeprefix("W/") for t in _tags(if_none_match)}
    if "*" in held:
        return etags[0] if etags else "*"
    return next((tag for tag in etags if tag.removeprefix("W/") in held), None)


def evaluated(headers: list[tuple[bytes, bytes]], response: Response, request_id: str) -> Response:
    """A GET's 2xx ``response``, or the 412 or 304 its conditions make of it."""
    etag = response.headers.get("etag")
    if not if_match_holds(headers, etag):
        return problem_response(PreconditionFailed(
            f"If-Match {echo(_field(headers, b'if-match'))} names no current ETag of this resource"
            + (f" (it is {etag})" if etag else " (its answers carry none)")), request_id)
    if none_match_held(headers, [etag] if etag else []) is not None:
        kept = [(k, v) for k, v in response.raw_headers if k in _KEPT_IN_304]
        not_modified = Response(status_code=304)
        not_modified.raw_headers = kept
        return not_modified
    return response


def conditional(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request has a condition this module evaluates (most have none)."""
    return any(k == b"if-match" or k == b"if-none-match" for k, _ in headers)
