"""A header's list items and parameters, split where RFC 9110 puts their separators.

``Accept`` is a comma-separated list, each item a media range and ``;`` parameters; a
``Content-Type`` is a media type and parameters. A parameter's value may be a quoted
string (RFC 9110 5.6.4, 5.6.6), which may hold either separator: split at every one,
``application/json; foo="a;charset=utf-16"`` was read as saying charset=utf-16 (a 415 for
a UTF-8 body), and ``Accept: application/json; ext="a;q=0"`` as refusing JSON (a 406).

A parameter is ``name=value``; a field with no ``=`` (``application/json; charset``,
``application/json; q``, ``gzip;q``), no name or no value (``charset=``) is none, and is
skipped, as WHATWG's MIME type parser skips it: each reader took it for a parameter with
an empty value, a charset of '' (415 "not as charset=''") or a weight of 0 (406 "allows
none of application/json", for an Accept that names JSON; gzip read as refused). A quoted
value whose closing quote is missing runs to the header's end (WHATWG's reading too):
``q="0.5`` was the weight ``"0.5``, no number, 0.
"""

from __future__ import annotations

import re

from .errors import HeadersTooLarge

__all__ = ["MAX_FIELD_CHARS", "MAX_FIELD_SEPARATORS", "bounded_field", "parameters", "split_unquoted", "unquote"]

# What one list or parameter header the service reads (Accept, Accept-Encoding, a
# Content-Type's parameters, If-Match, If-None-Match) may hold: its items and parameters
# are read in Python on the front end's event loop, microseconds each, and within the
# 32 KiB head limit an Accept of 3,200 "*/*;q=0.5" items took 24 ms a request (a plain
# request: 1 ms), a Content-Type's 15,000-character quoted parameter 19 ms, an
# Accept-Encoding of 3,900 codings 10 ms: four connections sending the first held every
# other client's /healthz at 34 ms median (1.6 ms alone). Past either bound, 431 before
# any of it is read. Browsers and HTTP libraries send a handful of each.
MAX_FIELD_SEPARATORS = 64  # "," and ";" together
MAX_FIELD_CHARS = 2048


def bounded_field(name: str, value: str) -> str:
    """``value``, the header ``name``'s, where it is within the bounds above (C-speed
    counts); else the 431 ``headers_too_large`` naming it."""
    if len(value) > MAX_FIELD_CHARS:
        raise HeadersTooLarge(f"the header {name} is {len(value)} characters long; at most {MAX_FIELD_CHARS} are read")
    separators = value.count(",") + value.count(";")
    if separators > MAX_FIELD_SEPARATORS:
        raise HeadersTooLarge(f"the header {name} holds {separators} separators (',' and ';' together); at most "
                              f"{MAX_FIELD_SEPARATORS} are read")
    return value

# A quoted string (its closing quote missing at the header's end: the rest is in it), or
# one separator. Matched left to right, a separator inside a quoted string is never seen.
_QUOTED_OR_SEPARATOR = re.compile(r'"(?:[^"\\]|\\.)*"?|[,;]')
_QUOTED_PAIR = re.compile(r"\\(.)")
_QUOTED_VALUE = re.compile(r'"((?:[^"\\]|\\.)*)"?', re.S)


def split_unquoted(text: str, separator: str) -> list[str]:
    """``text`` split at each ``separator`` (``,`` or ``;``) outside quoted strings."""
    if '"' not in text:  # (nearly every header: the plain split)
        return text.split(separator)
    parts: list[str] = []
    start = 0
    for match in _QUOTED_OR_SEPARATOR.finditer(text):
        if match[0] == separator:
            parts.append(text[start:match.start()])
            start = match.end()
    parts.append(text[start:])
    return parts


def unquote(value: str) -> str:
    """A parameter's value as meant: a quoted string's content, its quoted pairs
    (``\\"``) read as the characters they stand for; a token as it is (spaces around it
    dropped)."""
    value = value.strip()
    quoted = _QUOTED_VALUE.fullmatch(value)
    if quoted is not None:  # (one whose closing quote is missing runs to the end, as split: q="0.5 is 0.5)
        return _QUOTED_PAIR.sub(r"\1", quoted[1])
    return value


def parameters(fields: list[str]) -> list[tuple[str, str]]:
    """The ``;``-separated ``fields`` after a media type or coding, as (name lower-cased,
    value as meant: :func:`unquote`); a field that is no ``name=value`` is left out
    (module docstring). An unclosed quoted value runs to the header's end, as split."""
    params = []
    for field in fields:
        name, equals, value = field.partition("=")
        name = name.strip().lower()
        if equals and name and value.strip():  # (name= with nothing is none either; name="" is kept)
            params.append((name, unquote(value)))
    return params
