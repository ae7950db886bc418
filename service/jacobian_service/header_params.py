"""A header's list items and parameters, split where RFC 9110 puts their separators.

``Accept`` is a comma-separated list, each item a media range and ``;`` parameters; a
``Content-Type`` is a media type and parameters. A parameter's value may be a quoted
string (RFC 9110 5.6.4, 5.6.6), which may hold either separator: split at every one,
``application/json; foo="a;charset=utf-16"`` was read as saying charset=utf-16 (a 415 for
a UTF-8 body), and ``Accept: application/json; ext="a;q=0"`` as refusing JSON (a 406).
"""

from __future__ import annotations

import re

__all__ = ["split_unquoted", "unquote"]

# A quoted string (its closing quote missing at the header's end: the rest is in it), or
# one separator. Matched left to right, a separator inside a quoted string is never seen.
_QUOTED_OR_SEPARATOR = re.compile(r'"(?:[^"\\]|\\.)*"?|[,;]')
_QUOTED_PAIR = re.compile(r"\\(.)")


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
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", value[1:-1])
    return value
