"""gzip for the few large, fixed answers a browser fetches: the docs pages' scripts and
styles, and the OpenAPI document.

Each is compressed once, when first asked for, and kept: the answer then costs no CPU
per request (2.2 MB of Swagger UI and ReDoc go out as 0.5 MB, the 90 KB document as
6 KB). API answers are not compressed: results are numbers that compress poorly as
``.npy`` and cost the front end's loop seconds of CPU per hundred MB as JSON; a large
result is asked for as ``.npy`` instead.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from .header_params import bounded_field, parameters
from .responses import qvalue

__all__ = ["Compressible", "accepts_gzip"]


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` header allows gzip (RFC 9110 12.5.3): named (or
    as ``x-gzip``) with a weight above 0, or covered by ``*`` and not refused by name."""
    named: float | None = None
    star: float | None = None
    for part in bounded_field("Accept-Encoding", accept_encoding).lower().split(","):
        coding, *fields = part.split(";")
        coding = coding.strip()
        q = 1.0
        for key, value in parameters(fields):  # (a field with no "=" is none: header_params)
            if key == "q":
                q = qvalue(value)  # (as Accept's: one out of 0 to 1 is 0)
        if coding in ("gzip", "x-gzip"):
            named = q if named is None else max(named, q)
        elif coding == "*":
            star = q
    if named is not None:
        return named > 0
    return star is not None and star > 0


@dataclass
class Compressible:
    """A fixed body and, made on first use, its gzip form."""

    body: bytes
    _gzipped: bytes | None = field(default=None, repr=False)

    @property
    def gzipped(self) -> bytes:
        if self._gzipped is None:
            # mtime=0: the same bytes at every start, so caches and ETags agree.
            self._gzipped = gzip.compress(self.body, compresslevel=6, mtime=0)
        return self._gzipped

    def choose(self, accept_encoding: str) -> tuple[bytes, dict[str, str]]:
        """The body to send for this ``Accept-Encoding`` and the headers that go with
        it. ``Vary`` goes with both forms: a cache must not give the gzip form to a
        client that did not ask for it, nor keep the plain one for all."""
        if accept_encoding and accepts_gzip(accept_encoding):
            return self.gzipped, {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        return self.body, {"Vary": "Accept-Encoding"}
