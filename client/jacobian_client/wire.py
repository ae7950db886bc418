"""Array <-> JSON / .npy / .npz codecs: the one source of truth for the wire format.

Both the SDK and the server import this module, so it needs numpy and orjson only
(never torch). Everything here is pure: bytes in, arrays out, and back.

JSON arrays are ``{"dtype", "shape", "data"}`` (nested or flat ``data``) or
``{"dtype", "shape", "base64"}`` (little-endian, C order); a bare number or nested list
is accepted on input. Trees of arrays follow ``torch.func`` nesting: a tuple is a JSON
list, a dict a JSON object.

JSON and ``.npz`` have one kind of sequence, torch.func two (a function may return a
list; jax and ``tree_map`` tell a list from a tuple). An answer whose trees hold lists
says where in ``meta.lists`` (:func:`lists_meta`): per tree (``"output"``, ``"aux"``,
``"jacobian"``, ...) the paths of its list nodes, each path a JSON list of positions
(integers) and dict keys (strings) from the tree's root (``[]``: the tree itself). Every
other sequence is a tuple. The key is absent where no tree holds a list, so the answers
of list-free functions are as they were; a reader that does not know it reads tuples.

In an ``.npz`` every array of a tree is one member named by its path
(``jacobian.npy``, ``jacobian/0.npy``, ``jacobian/0/1.npy``, ``aux/key.npy``) and
``meta.json`` holds the response's meta (device, chunk size, ...) at its top level, the
aux values that are not arrays under ``"aux"``, and under ``"structure"`` a skeleton of
each tree in which every array is ``{"$npy": member}`` and every other value stands as
it is (so ``"aux"`` is the aux skeleton itself). Where two paths spell one name (a dict
key holding a ``/``), the later member is ``<path>~1.npy``: the skeleton says which.

bfloat16 has no numpy dtype: it travels as float32 in ``.npy``/``.npz`` and as numbers
(or 2-byte base64) in JSON, and is decoded to float32 with its name kept beside it.

complex64 and complex128 travel in answers (an output or aux that torch.func.jvp or a
plain call gives, a vjp of a complex input) and in requests as the inputs a function
declares complex, their tangents, and a complex output's cotangents (which
torch.func.vjp pulls back): as themselves in ``.npy``/``.npz``, and in JSON as ``data``
one level deeper, each number a ``[real, imag]`` pair (non-finite parts spelled), or
base64 of those pairs; plain nested lists where a complex dtype is the default (an input
declared complex, sent without one) are those pairs too. They are read where
``Limits.complex`` says so.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import itertools
import json
import math
import re
import secrets
import struct
import zipfile
from array import array
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import orjson
from numpy.lib import format as npy_format

__all__ = [
    "CAPABILITIES",
    "COMPLEX_DTYPES",
    "DTYPES",
    "FloatTexts",
    "JSON",
    "NO_FORWARD_AD_WORDS",
    "NPY",
    "NPZ",
    "PROBLEM",
    "PROBLEM_STATUS",
    "RESULT_KEY",
    "SPARSE_FIELDS",
    "SPELLED_NON_FINITE",
    "Limits",
    "SparseCOO",
    "WireError",
    "check_depth",
    "check_request_dtype",
    "check_shape",
    "check_unique_keys",
    "decode_json_array",
    "decode_sparse_json",
    "decode_tree",
    "dtype_name",
    "dumps",
    "encode_sparse_json",
    "encode_tree",
    "expanded_size",
    "flatten_tree",
    "is_array_object",
    "is_sparse",
    "is_sparse_npz",
    "is_sparse_object",
    "json_data",
    "list_paths",
    "lists_meta",
    "loads",
    "npy_header",
    "npy_header_length",
    "npy_nbytes",
    "parse_npy_header",
    "read_npy",
    "read_npz",
    "read_result_npz",
    "read_sparse_npz",
    "read_sparse_result_npz",
    "tree_from_paths",
    "typed_array",
    "vector_leaves",
    "with_lists",
    "write_npy",
    "write_npz",
    "write_sparse_npz",
]

JSON = "application/json"
NPY = "application/x-npy"
NPZ = "application/x-npz"
PROBLEM = "application/problem+json"

#: Each computing endpoint's kind -> the key of its result in a JSON answer and an
#: ``.npz`` member (SPEC 3.3): the server writes it and the SDK reads it by this one table.
RESULT_KEY = {"jacobian": "jacobian", "hessian": "hessian", "evaluate": "output", "vjp": "vjp", "jvp": "jvp", "hvp": "hvp"}

#: Problem ``code`` -> HTTP status (SPEC 3.4, plus the service's own few): the server
#: raises and the SDK maps errors by this one table.
PROBLEM_STATUS: dict[str, int] = {
    "malformed_body": 400,
    "malformed_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "function_not_found": 404,
    "method_not_allowed": 405,
    "not_acceptable": 406,
    "request_timeout": 408,
    "payload_too_large": 413,
    "result_too_large": 413,
    "precondition_failed": 412,
    "unsupported_media_type": 415,
    "expectation_failed": 417,
    "invalid_input": 422,
    "sparsity_not_found": 422,
    "overloaded": 429,
    "headers_too_large": 431,
    "client_closed": 499,
    "function_error": 500,
    "internal_error": 500,
    "unsupported_transfer_coding": 501,
    "unavailable": 503,
    "function_quarantined": 503,
    "timeout": 504,
    "out_of_memory": 507,
}

#: What ``GET /v1/info``'s ``capabilities`` lists: behaviours a client cannot tell from an
#: answer alone. ``"unsupported_member"``: a ``jvp`` / ``hvp`` that fails for want of a
#: forward-mode rule is a ``function_error`` with ``"unsupported": "forward_mode"``, so
#: the member's absence means the function failed otherwise. An older service (no such
#: list) answered the same failure without the member, and the SDK then reads torch's
#: words in the detail (:data:`NO_FORWARD_AD_WORDS`).
CAPABILITIES: tuple[str, ...] = ("unsupported_member",)

#: What torch says where forward-mode AD is missing, not merely failing: an op without a
#: forward formula, a custom ``autograd.Function`` without ``jvp`` (eager or under
#: ``torch.func``). The engine sets the member from them (and from torch's type for it,
#: ``NotImplementedError``); the SDK reads them in an older service's detail. And an op
#: whose forward formula torch has broken (``masked_scatter``'s backward under forward
#: over reverse sets a tangent of another op's size, a RuntimeError): /hvp answered its 500
#: without the member, so the SDK's ``hessp`` did not go on to the reverse-mode Hessian
#: the service answers (parity round 31).
NO_FORWARD_AD_WORDS: tuple[str, ...] = (
    "Trying to use forward AD with", "implement the jvp function for custom autograd.Function",
    "jvp is not implemented for", "Trying to set a forward gradient that has a different size")

#: dtype names accepted on the wire (bfloat16 decodes to float32; see module doc).
DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
    }
)


#: complex dtypes an answer (and a request's complex inputs, their tangents, a complex
#: output's cotangents) may hold (see module doc); not in DTYPES, which every real input
#: and its tangents take.
COMPLEX_DTYPES = frozenset({"complex64", "complex128"})


class WireError(ValueError):
    """A body or array that cannot be decoded.

    ``code`` is the problem code the server answers with: ``malformed_body`` (400),
    ``invalid_input`` (422) or ``payload_too_large`` (413).
    """

    def __init__(self, message: str, code: str = "malformed_body") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """Bounds checked from headers and shapes before any array is materialised."""

    max_elements: int = 1 << 28  # per array
    max_rank: int = 16
    max_members: int = 64  # per .npz
    max_bytes: int = 1 << 30  # declared uncompressed size of a whole .npz
    max_json_depth: int = 64
    # complex arrays are read (COMPLEX_DTYPES): an answer's reader (the SDK) sets it, and
    # the service's for cotangents, and for the inputs a function declares complex (and
    # their tangents); its other request readers leave it off: a real input stays real
    complex: bool = False
    # An integer array's data holding floats read without their texts (orjson's parse)
    # raises FloatTexts, for a reader that can read the body again with them
    # (loads(float_texts=True)): the service's request parser. Off, such floats are
    # judged by their doubles alone, as before.
    float_texts: bool = False


# --------------------------------------------------------------------------- JSON


# A JSON string from its opening quote. Escapes go two bytes at a time, and a string
# left open (or ending in a lone backslash) runs to the end of the body, so a match
# never fails once started: a failing one is retried from each later quote, and a body
# of escaped quotes took time in the square of its size (40 KB: 6 s of a front end).
_JSON_STRING = re.compile(rb'("[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z))', re.DOTALL)
# A bare token where a value stands: after [ : or , and before , ] } (spaces allowed);
# elsewhere ({NaN: 1}) it stays bare, and the body stays unreadable.
_BARE = re.compile(rb"([\[:,]\s*)(NaN|-?Infinity)(?=\s*(?:[,\]}]|\Z))")
# Bodies that write bare tokens (Python's json.dumps of arrays) hold few strings: a body
# with more is not rewritten at all, so the pieces below stay few.
_MAX_STRINGS = 1 << 16


# A number literal that may be past float64's range: an exponent of 300 or more, or 309
# digits before the point. Only these are looked at (float() says), so a body of a
# million ordinary numbers and one 1e309 costs one call per candidate, not per number;
# a body of more than _MAX_HUGE candidates is not rewritten (a Python call each: a body
# of nothing but 1e300s would cost the front end several times its parse).
_HUGE = re.compile(rb"([\[:,]\s*)(-?(?:0|[1-9]\d*)(?:\.\d+)?[eE]\+?(?:[3-9]\d\d|[1-9]\d{3,})"
                   rb"|-?[1-9]\d{308,}(?:\.\d+)?(?:[eE][+-]?\d+)?)(?=\s*(?:[,\]}]|\Z))")
_MAX_HUGE = 1 << 12
# An integer literal among them (309 digits or more, no point, no exponent) is spelled as
# this string, then read back as the integer it is (_with_integers): a JSON string no
# client writes (a NUL and a token of this process's), so orjson reads the body once at
# its own speed. (Read again whole by Python's json, a 48 MB body holding one such integer
# cost its front end 19 s of CPU where orjson reads it in 0.1 s, and a second tree of its
# numbers beside orjson's: 1.3 times the memory the body budget charged for it.)
_INTEGER_MARK = "\x00" + secrets.token_hex(8) + ":"
_INTEGER_MARK_JSON = b'"\\u0000' + _INTEGER_MARK[1:].encode()
# orjson's word for such a literal: only a body it refuses so is scanned by _HUGE (a scan
# tries the pattern at every separator: on a body of a million numbers, twice orjson's
# parse, which a body with a bare NaN should not pay).
_OVERFLOW = "number is infinity when parsed as double"


def _spell_huge(match: re.Match[bytes]) -> bytes:
    if match[2].lstrip(b"-").isdigit():  # an integer: an integer to Python's reader (see loads)
        return match[1] + _INTEGER_MARK_JSON + match[2] + b'"'
    value = float(match[2])
    if not math.isinf(value):
        return match[0]
    return match[1] + (b'"-Infinity"' if value < 0 else b'"Infinity"')


def _quote_non_finite(raw: bytes, huge: bool = False) -> bytes:
    """Bare NaN / Infinity / -Infinity values (``huge``: numbers past float64's range,
    integer literals among them as _INTEGER_MARK strings) -> the JSON strings that spell
    them; strings left as they are. Linear in the body's size."""
    if raw.count(b'"') > 2 * _MAX_STRINGS:
        return raw
    if huge and sum(1 for _ in itertools.islice(_HUGE.finditer(raw), _MAX_HUGE + 1)) > _MAX_HUGE:
        return raw
    pieces = _JSON_STRING.split(raw)  # outside, string, outside, string, ..., outside
    if huge:
        pieces[::2] = [_HUGE.sub(_spell_huge, p) for p in pieces[::2]]
    else:
        pieces[::2] = [_BARE.sub(rb'\1"\2"', p) if b"NaN" in p or b"Infinity" in p else p for p in pieces[::2]]
    return b"".join(pieces)


# orjson reads an integer literal past int64 and uint64 as a float. Past uint64 that float
# is past every integer dtype's range, and refused there; but every integer within 1024
# below -2**63 rounds to the float -2**63, which fits int64: -2**63 - 1 for an int64
# input was computed as -2**63, silently (and JavaScript's JSON.stringify writes int64's
# lowest as -9223372036854776000). Each of those integers starts so.
_ROUNDED_TO_INT64_MIN = b"-922337203685477"


def _may_be_rounded(body: bytes | str) -> bool:
    """Whether ``body`` may hold an integer orjson rounded to -2**63: a substring search,
    at memory speed, on every body."""
    if isinstance(body, str):
        return _ROUNDED_TO_INT64_MIN.decode() in body
    return _ROUNDED_TO_INT64_MIN in (body if isinstance(body, (bytes, bytearray)) else bytes(body))


def _exact_integers(body: bytes | str) -> Any:
    """``body`` read by Python's json, whose integers are exact (refused by an integer
    dtype they do not fit, taken as floats by a float one), for the few bodies that may
    hold an integer orjson rounds. orjson has read it already (its strictness holds);
    nesting past Python's recursion limit, refused by depth later, is read by orjson."""
    if not isinstance(body, (bytes, bytearray, str)):
        body = bytes(body)  # (a memoryview, which json.loads refuses)
    try:
        return json.loads(body, parse_constant=str)  # constants spelled, as orjson's retry reads them
    except Exception:  # noqa: BLE001
        return orjson.loads(body)


def _integer(text: str) -> int:
    """A JSON integer literal, exactly where int() takes it (4,300 digits), else its first
    4,000 digits: past every integer dtype and float64 alike (only that is read of it), and
    spelled as the client wrote it where a refusal quotes it."""
    return int(text if len(text) <= 4000 else text[:4000])


def _with_integers(doc: Any) -> Any:
    """``doc`` with each _INTEGER_MARK string (an integer literal past float64's range,
    at most _MAX_HUGE of them) the integer it spells (:func:`_integer`). Spelled
    "Infinity", a 400-digit integer was told to an int64 input as holding Infinity and
    argnums named the parameter 'Infinity'; an integer past float64 is an integer to
    Python's reader (an int64 input refuses it as not fitting, an option as past int64's
    range, a float input takes the infinity it rounds to: _number). Lists of numbers are
    passed over by their items' types, in C."""
    mark, n = _INTEGER_MARK, len(_INTEGER_MARK)
    if doc.__class__ is str:
        return _integer(doc[n:]) if doc.startswith(mark) else doc
    stack = [doc]
    while stack:
        node = stack.pop()
        if node.__class__ is dict:
            for key, value in node.items():
                if value.__class__ is str and value.startswith(mark):
                    node[key] = _integer(value[n:])
                elif value.__class__ in (dict, list):
                    stack.append(value)
            continue
        types = set(map(type, node))
        if str in types:
            node[:] = [_integer(v[n:]) if v.__class__ is str and v.startswith(mark) else v for v in node]
        if dict in types or list in types:
            stack.extend(v for v in node if v.__class__ in (dict, list))
    return doc


def _unreadable(raw: bytes, error: str) -> str:
    """Why a body is not JSON, in words a caller can act on. orjson says "str is not
    valid UTF-8: surrogates not allowed" of any body that is not UTF-8 (a UTF-16 one, a
    latin-1 accent), which names neither the encoding nor where it goes wrong."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) > 1 and b"\x00" in raw[:4]):
        return "the body is UTF-16 or UTF-32 (it has NUL bytes or a UTF-16 byte order mark); JSON bodies are UTF-8"
    if raw[:3] == b"\xef\xbb\xbf":
        return "the body starts with a UTF-8 byte order mark (EF BB BF); send JSON without one"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"the body is not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start} ({exc.reason}); "
                "JSON bodies are UTF-8 (a latin-1 or cp1252 text must be re-encoded)")
    return error


# orjson refuses a document nested deeper than this, saying "depth limit exceeded".
READER_MAX_DEPTH = 1024
_READER_TOO_DEEP = "depth limit exceeded"


def too_deep(limit: int) -> WireError:
    """The refusal of JSON nested deeper than ``limit``: one wording whichever reader
    finds it (:func:`check_depth` on a parsed document, or orjson itself, which parses
    nothing past ``READER_MAX_DEPTH``)."""
    return WireError(f"JSON nested deeper than {min(limit, READER_MAX_DEPTH)} levels")


def loads(body: bytes | str, exact_integers: bool = False, max_depth: int | None = None,
          float_texts: bool = False) -> Any:
    """JSON -> Python. Bare ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's
    ``json.dumps``, and so ``requests.post(json=...)``, writes) are read as the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, which array data already accepts; so is a
    number past float64's range (``1e309``, ``-1e400``), which Python's and JavaScript's
    JSON readers read as an infinity: orjson refused it, a 400 "unreadable JSON" for a
    body that is valid JSON, where the spelled ``"Infinity"`` was taken. orjson refuses
    both, so only a body it refuses and that holds one is rewritten (strings left alone)
    and parsed again: the common path keeps orjson's speed, and both keep its strictness
    and limits. ``exact_integers``: integers past int64 are Python's exact ints, not
    orjson's floats, for a caller that reads integer arrays (the search for them costs
    ~15 % of a large body's parse; a service's answers hold none). ``max_depth``: the
    nesting a caller refuses past (:func:`check_depth`), named in the refusal of a body
    nested past orjson's own limit as well: the service said "JSON nested deeper than 64
    levels" of a body 100 deep, and "unreadable JSON: depth limit exceeded: line 1
    column 1026" of one 1,025 deep, the same limit in other words. ``float_texts``: read
    by Python's json, integers exact, each float whose double is a whole number that its
    text is not (``1.0000000000000000001``, ``1e-400``) a :class:`_NotWhole` holding the
    text, for an integer array to refuse (:class:`FloatTexts`: only a body already read
    once, whose integer array holds floats, is read so)."""
    if float_texts:
        if not isinstance(body, (bytes, bytearray, str)):
            body = bytes(body)
        try:
            return json.loads(body, parse_constant=str, parse_float=_float_of_text)
        except Exception:  # noqa: BLE001  (nesting past Python's recursion limit: read as before)
            pass
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Its text, not the exception: a kept exception's traceback holds this frame,
        # and with it the body, in a cycle until the garbage collector runs.
        error = str(exc)
        if max_depth is not None and error.startswith(_READER_TOO_DEEP):
            raise too_deep(max_depth) from None
    else:
        if not exact_integers or not _may_be_rounded(body):
            return doc
        del doc  # (not held twice)
        return _exact_integers(body)
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    quoted, said = raw, error
    for huge in (False, True):  # bare tokens, then (where orjson says so) numbers past float64
        if not (_OVERFLOW in said if huge else b"NaN" in raw or b"Infinity" in raw):
            continue
        quoted = _quote_non_finite(quoted, huge)
        try:
            doc = orjson.loads(quoted)
        except orjson.JSONDecodeError as exc:
            said = str(exc)
            if max_depth is not None and said.startswith(_READER_TOO_DEEP):  # (NaN beside the nesting)
                raise too_deep(max_depth) from None
            continue
        marked = huge and _INTEGER_MARK_JSON in quoted
        if exact_integers and _may_be_rounded(quoted):
            del doc
            doc = _exact_integers(quoted)
        return _with_integers(doc) if marked else doc
    raise WireError(f"unreadable JSON: {_unreadable(raw, error)}") from None


def dumps(obj: Any) -> bytes:
    """Serialise a tree already passed through :func:`encode_tree`."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def is_array_object(obj: Any) -> bool:
    return isinstance(obj, dict) and "shape" in obj and ("data" in obj or "base64" in obj)


def _complex_refused(name: str) -> WireError:
    """A complex array where a real one is due (a real input, its tangents): the dtype is
    one the service writes in its answers, not an unknown one (JSON and .npy alike)."""
    return WireError(f"unsupported dtype {name} here: inputs and tangents are real unless the function declares the "
                     "input complex64 or complex128 (complex arrays are read for such inputs, their tangents, and "
                     "the cotangents of a complex output); send the real and imaginary parts as real arrays",
                     "invalid_input")


def _np_dtype(name: str, limits: Limits | None = None) -> np.dtype:
    if name in COMPLEX_DTYPES:
        if limits is not None and limits.complex:
            return np.dtype(name)
        raise _complex_refused(name)
    if name not in DTYPES:
        raise WireError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}", "invalid_input")
    return np.dtype("float32" if name == "bfloat16" else name)


_INT64_MAX = 2**63 - 1


def _check_shape(shape: Any, limits: Limits, dense: bool = True) -> tuple[int, ...]:
    """A shape's dimensions as Python ints, each within int64, whose non-zero
    dimensions multiply to at most ``max_elements``: an array with a zero dimension
    holds nothing, but numpy still refuses one whose other dimensions overflow.
    A sparse matrix (``dense=False``) holds only its entries, which its readers bound:
    its m x n may pass the limit (a 10^5-unknown Jacobian is 10^10 elements dense)."""
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise WireError("'shape' must be a list of integers", "invalid_input")
    if len(shape) > limits.max_rank:
        raise WireError(f"rank {len(shape)} is over the limit of {limits.max_rank}", "invalid_input")
    if any(d < 0 for d in shape):
        raise WireError(f"negative dimension in shape {shape}", "invalid_input")
    if any(d > _INT64_MAX for d in shape):
        raise WireError(f"shape {shape} has a dimension beyond int64", "invalid_input")
    if dense and math.prod(shape) > limits.max_elements:
        raise WireError(
            f"shape {shape} is over the limit of {limits.max_elements} elements", "payload_too_large"
        )
    if dense and math.prod(d for d in shape if d) > limits.max_elements:
        # Nothing to carry, so no 413 (it was 'over the limit of ... elements' for an
        # array of none): the shape itself is what cannot be taken. Derivatives multiply
        # shapes (a Hessian's is the output's and the input's twice), and a shape of no
        # elements whose sizes multiply far enough is one numpy and torch cannot stride.
        raise WireError(
            f"shape {shape} holds no elements, but its other sizes multiply to "
            f"{math.prod(d for d in shape if d)}, past the limit of {limits.max_elements} elements "
            "that every shape's sizes are held to", "invalid_input"
        )
    return tuple(shape)


# The service holds the shapes a query string names (GET .../sparsity?shapes=) to the same
# rule, so that one limit is answered with one status however the shape came.
check_shape = _check_shape


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of lists, stopping early past ``limit``."""
    depth = 0
    while isinstance(obj, list):
        depth += 1
        if depth > limit or not obj:
            break
        obj = obj[0]
    return depth


_SPELLED = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Integers from here on round to an infinity as floats (float() raises OverflowError).
_FLOAT64_PAST = 2**1024 - 2**970
SPELLED_NON_FINITE = tuple(_SPELLED)  # (the OpenAPI document's number forms)
# A null where a number belongs is, from a web page, almost always a non-finite number:
# JSON.stringify writes NaN and both infinities as null. The refusal said 'a missing
# value is "NaN"' (an infinity "fixed" so became a NaN), or of a 0-d input "got NoneType".
_NULL = ('null (JSON.stringify writes NaN, Infinity and -Infinity as null): spell them "NaN", "Infinity", '
         '"-Infinity"')


def _leaf_types(data: Any, ndim: int) -> set[type]:
    """The Python types of a regular nested list's numbers (C-speed iteration)."""
    leaves: Any = [data]
    for _ in range(ndim):
        leaves = itertools.chain.from_iterable(leaves)
    return set(map(type, leaves))


def _has_bools(data: Any, ndim: int) -> bool:
    """Whether a regular nested list of numbers holds a boolean (row by row, C-speed)."""
    if ndim == 0:
        return data.__class__ is bool
    rows: Any = [data]
    for _ in range(ndim - 1):
        rows = itertools.chain.from_iterable(rows)
    return any(bool in map(type, row) for row in rows)


def _number(value: Any, dtype: np.dtype | None) -> Any:
    """One JSON value of array data, checked: the slow path, for data numpy did not read
    as plain numbers (spelled non-finite values, null, huge integers, ...)."""
    kind = value.__class__
    if kind is int and (dtype is None or dtype.kind == "f") and not -_FLOAT64_PAST < value < _FLOAT64_PAST:
        return math.inf if value > 0 else -math.inf  # (past float64, read exactly: see loads) as 1e309 is read
    if kind is float or kind is int:
        if dtype is not None and dtype.kind == "b" and not (kind is int and value in (0, 1)):
            # (numpy casts any number here by its truth: an integer past float64, read
            # exactly, was a True where 2 and 1e400 are refused, and with it 2 or 1.5 beside it)
            raise WireError("bool arrays take true/false (or 0/1)", "invalid_input")
        return value
    if kind is bool and dtype is not None and dtype.kind == "b":
        return value
    if kind is str and value in _SPELLED:
        if dtype is None or dtype.kind == "f":
            return _SPELLED[value]
        # (a number past float64's range, 1e309, arrives spelled too: see loads)
        raise WireError(f"array data does not fit {dtype}: it holds {value}", "invalid_input")
    if value is None:
        raise WireError(f"array data holds {_NULL}", "invalid_input")
    if kind is bool:
        raise WireError("array data holds booleans; only bool arrays take true/false", "invalid_input")
    if kind is str:
        allowed = "" if dtype is not None and dtype.kind != "f" else ' (besides "NaN", "Infinity", "-Infinity" in float arrays)'
        raise WireError(f"array data holds the string {value[:20]!r}; numbers are JSON numbers{allowed}", "invalid_input")
    hint = typed_array(value) if kind is dict else None
    raise WireError("array data holds " + hint if hint else "array data is not a regular array of numbers", "invalid_input")


# Every integer below 2^53 is a float64 of its own; from it on, a float stands for several
# (2^53 + 1 parses to 2^53).
_EXACT_IN_FLOAT64 = 2.0**53


class FloatTexts(Exception):
    """An integer array's data holds floats read without their texts (see
    ``Limits.float_texts``): whether each is the whole number its double is can only be
    told from its text, so the body is to be read again with them (``loads(...,
    float_texts=True)``). Not a WireError: no refusal, a request to read again."""


class _NotWhole(float):
    """A JSON number whose double is a whole number while its text is not one:
    ``1.0000000000000000001`` (17 significant digits and more round to 1.0),
    ``1e-400`` (below the smallest double: 0.0). Read as the double, an int64 input took
    1 and 0, silently, where ``1.5`` is a 422 (:func:`_whole_texts`)."""

    text = ""


def _float_of_text(text: str) -> float:
    """``float(text)``, or a :class:`_NotWhole` where that is a whole number and the
    text's exact decimal value is not (Python's json: ``parse_float``)."""
    v = float(text)
    if not math.isfinite(v) or v != math.trunc(v) or _is_whole_text(text):
        return v
    marked = _NotWhole(v)
    marked.text = text if len(text) <= 40 else text[:37] + "..."
    return marked


def _is_whole_text(text: str) -> bool:
    """Whether a JSON number's text (``-?int(.frac)?([eE][+-]?exp)?``) is exactly a whole
    number, from its digits: its value is digits x 10^(exp - len(frac)), whole where the
    exponent is not negative or the digits end in as many zeros as it takes away."""
    mantissa, _, exp = text.lower().partition("e")
    whole, _, frac = mantissa.lstrip("-").partition(".")
    digits = whole + frac
    if not digits.strip("0"):
        return True  # zero, however written (-0.0, 0e-999)
    shown = exp.lstrip("+-").lstrip("0")
    if len(shown) > 18:  # an exponent past any number of digits a body can hold
        return not exp.startswith("-")
    shift = (int(exp) if exp else 0) - len(frac)
    return shift >= 0 or len(digits) - len(digits.rstrip("0")) >= -shift


def _whole_texts(data: Any, ndim: int, dtype: np.dtype, limits: Limits) -> None:
    """An integer array's data that holds floats, each a whole number by its double:
    refused where one's text is not a whole number (:class:`_NotWhole`); where the floats
    were read without their texts and the reader can read them again, FloatTexts."""
    types = _leaf_types(data, ndim)
    if _NotWhole in types:
        leaves: Any = [data]
        for _ in range(ndim):
            leaves = itertools.chain.from_iterable(leaves)
        bad = next(v for v in leaves if v.__class__ is _NotWhole)
        raise WireError(f"array data holds {bad.text}, not a whole number (its nearest double is {float(bad)!r}); "
                        f"{dtype} takes whole numbers", "invalid_input")
    if float in types and limits.float_texts:
        raise FloatTexts()


def _integers_one_by_one(data: Any, shape: tuple[int, ...], dtype: np.dtype, limits: Limits) -> np.ndarray:
    """An integer array's data that numpy read as float64 with a value past 2^53, read
    number by number: a JSON integer exactly (``[9007199254740993, 1.0]`` had become
    ...992 through numpy's float64, silently), a float past 2^53 refused. A float there
    (``9007199254740993.0``, ``9.007199254740993e15``: what a page's ``JSON.stringify``
    writes past 1e21, or a float64 array cast by the caller) was rounded to a double when
    it was parsed, so which integer it stands for cannot be told: an int64 input computed
    with 9007199254740992 for 9007199254740993.0, silently (SPEC reads integers exactly;
    this is the number that was not sent as one)."""
    info, values = np.iinfo(dtype), []
    items = list(np.asarray(data, dtype=object).flat)
    # past the dtype's range first ("does not fit", as before): a float against exact bounds
    if not all(info.min <= v < 2.0 ** (info.bits - (dtype.kind == "i")) if v.__class__ is float
               else info.min <= v <= info.max for v in items):
        raise WireError(f"array data does not fit {dtype}", "invalid_input")
    for v in items:
        if v.__class__ is bool:
            raise WireError("array data holds booleans; only bool arrays take true/false", "invalid_input")
        if v.__class__ is float:
            if abs(v) >= _EXACT_IN_FLOAT64:
                raise WireError(
                    f"array data holds {v!r}, a float of 2^53 or more for {dtype}: parsed as a double, it stands for "
                    f"any of several integers (JavaScript's numbers, JSON.stringify's 1e+21, lose them likewise); "
                    f"write the integer's digits (JSON.rawJSON of a BigInt in a page), or send the array as "
                    f'{{"dtype": "{dtype}", "shape": ..., "base64": ...}} or .npy', "invalid_input")
            if v != math.trunc(v):
                raise WireError(f"array data holds {v!r}, not a whole number; {dtype} takes whole numbers",
                                "invalid_input")
            v = math.trunc(v)
        values.append(v)
    _whole_texts(items, 1, dtype, limits)  # (each float whole by its double: by its text too)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _from_numbers(data: Any, dtype: np.dtype | None, limits: Limits) -> np.ndarray:
    """JSON numbers (a number or regular nested lists) -> an array of ``dtype`` (None:
    as numpy infers it). Numbers only: null, strings (but the spelled non-finite values)
    and booleans (but in bool arrays) are refused, not converted."""
    if _depth(data, limits.max_rank) > limits.max_rank:
        raise WireError(f"array nested deeper than {limits.max_rank}", "invalid_input")
    arr = _flat_floats(data, dtype, limits)
    if arr is not None:
        return arr
    try:
        arr = np.asarray(data)  # numpy's own inference, at C speed, checks regularity
    except (ValueError, TypeError, OverflowError) as exc:
        raise WireError(f"array data is not a regular array of numbers: {exc}", "invalid_input") from None
    if arr.size > limits.max_elements:
        raise WireError(f"array has more than {limits.max_elements} elements", "payload_too_large")
    want_bool = dtype is not None and dtype.kind == "b"
    if arr.dtype.kind not in "biuf":  # strings ("NaN", "0.5"), null, huge ints or ragged lists
        try:
            objects = np.asarray(data, dtype=object)
            values = [_number(v, dtype) for v in objects.flat]
            with np.errstate(over="ignore"):  # as below: 1e10 among "NaN"s in a float16 array is inf
                arr = np.asarray(values, dtype=dtype).reshape(objects.shape)
        except (ValueError, TypeError, OverflowError) as exc:
            if isinstance(exc, WireError):
                raise
            if isinstance(exc, OverflowError) and dtype is not None:  # a Python int past 64 bits
                raise WireError(f"array data does not fit {dtype}", "invalid_input") from None
            raise WireError(f"array data is not a regular array of numbers: {exc}", "invalid_input") from None
        if arr.dtype == object and dtype is None and all(v.__class__ in (int, float) for v in values):
            # integers past uint64 (read exactly: see loads) among the numbers of an array
            # of no dtype (cotangents, tangents): floats, as numpy takes [2**63, -1]
            arr = np.asarray(values, dtype=np.float64).reshape(objects.shape)
        if arr.dtype.kind not in "biuf":
            raise WireError("array data must be numbers", "invalid_input")
    elif arr.dtype.kind == "b" and not want_bool:
        raise WireError("array data holds booleans; only bool arrays take true/false", "invalid_input")
    elif arr.dtype.kind != "b" and ((arr == 0) | (arr == 1)).any():
        # Booleans among numbers read as 0 and 1: look for them only when such values are there.
        if want_bool:
            if not _leaf_types(data, arr.ndim) <= {bool, int}:
                raise WireError("bool arrays take true/false (or 0/1)", "invalid_input")
        elif _has_bools(data, arr.ndim):
            raise WireError("array data holds booleans; only bool arrays take true/false", "invalid_input")
    if want_bool and arr.dtype.kind != "b" and arr.size and not (arr.dtype.kind in "iu" and ((arr == 0) | (arr == 1)).all()):
        raise WireError("bool arrays take true/false (or 0/1)", "invalid_input")
    if (dtype is not None and dtype.kind in "iu" and arr.dtype.kind == "f" and arr.size
            and not _leaf_types(data, arr.ndim) & {float, _NotWhole}):
        # numpy infers float64 for ints beyond int64 mixed with others: convert exactly
        # (with no float among them: one read with its text, _NotWhole, is a float too)
        try:
            arr = np.asarray(data, dtype=dtype)
        except (ValueError, OverflowError):
            raise WireError(f"array data does not fit {dtype}", "invalid_input") from None
    if (dtype is not None and dtype.kind in "iu" and arr.dtype.kind == "f" and arr.size
            and bool(np.isfinite(arr).all()) and bool((np.abs(arr) >= _EXACT_IN_FLOAT64).any())):
        return _integers_one_by_one(data, arr.shape, dtype, limits)
    if dtype is not None and dtype.kind in "iu" and arr.dtype.kind in "iuf" and arr.size:
        info = np.iinfo(dtype)
        if arr.dtype.kind == "f":
            # Against float bounds that are exact: int64's largest, 2**63 - 1, compared with
            # a float, is the float 2**63, which passed as fitting and was cast to -2**63
            # (a sign flip); uint64's 2**64 (a JSON integer past 64 bits, which orjson reads
            # as a float) was cast to 0. The smallest value is exact as a float.
            fits = bool(np.isfinite(arr).all()) and arr.min() >= info.min and arr.max() < 2.0 ** (info.bits - (dtype.kind == "i"))
        else:
            fits = info.min <= arr.min() and arr.max() <= info.max
        if not fits:
            raise WireError(f"array data does not fit {dtype}", "invalid_input")
        if arr.dtype.kind == "f" and not (arr == np.trunc(arr)).all():
            # The cast below truncates: 3.5 for an int64 input computed with 3, silently,
            # where a float32 array is refused (no same_kind cast to an integer)
            bad = float(arr.flat[np.flatnonzero(arr != np.trunc(arr))[0]])
            raise WireError(f"array data holds {bad!r}, not a whole number; {dtype} takes whole numbers",
                            "invalid_input")
        if arr.dtype.kind == "f":  # whole by their doubles: by their texts too
            _whole_texts(data, arr.ndim, dtype, limits)
    if dtype is not None and arr.dtype != dtype:
        with np.errstate(over="ignore", invalid="ignore"):  # 1e300 as float32 is inf, as numpy casts it
            try:
                arr = arr.astype(dtype)
            except (ValueError, OverflowError) as exc:
                raise WireError(f"array data does not fit {dtype}: {exc}", "invalid_input") from None
    return arr


# float32 and float64 arrays packed by struct: its native 'f' and 'd' items take a Python
# float (or int) as C's cast from double does, as numpy's float64 -> float32 astype does
# (1e300 is inf in both, with no error).
_ARRAY_CODES = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}
# The bytes of 0.0, -0.0 and 1.0 in each, as the array module stores them (native order).
_ZERO_ONE_BYTES = {code: tuple(array(code, [v]).tobytes() for v in (0.0, -0.0, 1.0)) for code in ("f", "d")}
# Numbers packed by one struct call: a call takes its numbers as one argument tuple, so
# a 100 MB answer's data is never held a second time as one (and a row of a few numbers,
# a complex array's [re, im] pairs, is not a call of its own).
_PACK_ITEMS = 4096
_FEW_NUMBERS = 1024  # up to here 0s and 1s are looked for in bytes (_zero_or_one)
_SHORT_ROW = 32  # rows shorter than this are joined: a call each cost more than their numbers
# From here on numpy reads a Python int among floats as an object, not as a float64 (see
# _flat_floats); a float32's or float64's magnitude this large sends the data there too.
_INT64_PAST = 2.0**63


@functools.lru_cache(maxsize=64)
def _packer(count: int, code: str) -> struct.Struct:
    return struct.Struct(f"{count}{code}")


def _pieces(rows: list[list[Any]], width: int) -> Iterator[list[Any]]:
    """Leaf rows of ``width`` numbers each, in pieces of at most _PACK_ITEMS numbers: a row
    as it is (a call's argument tuple is a copy of its pointers), a long one in slices,
    short ones joined (a list's += copies pointers; itertools.chain took ~20 instructions
    a number more)."""
    if width >= _SHORT_ROW:
        for row in rows:
            if width <= _PACK_ITEMS:
                yield row
            else:
                for start in range(0, width, _PACK_ITEMS):
                    yield row[start:start + _PACK_ITEMS]
        return
    step = _PACK_ITEMS // width
    for start in range(0, len(rows), step):
        piece: list[Any] = []
        for row in rows[start:start + step]:
            piece += row
        yield piece


def _packed(rows: list[list[Any]], width: int, count: int, code: str, dtype: np.dtype) -> np.ndarray:
    """Leaf rows packed into one new array, a piece at a time (struct.error where a value
    is no number)."""
    out = np.empty(count, dtype)
    into, offset = memoryview(out).cast("B"), 0
    try:
        for piece in _pieces(rows, width):
            # pack(*piece), not pack_into(out, offset, *piece): a call with arguments before
            # the starred ones builds a list of them all first (LIST_EXTEND), then its tuple;
            # a piece's bytes are copied in as they come (their list joined was the array
            # twice over)
            packed = _packer(len(piece), code).pack(*piece)
            into[offset:offset + len(packed)] = packed
            offset += len(packed)
    finally:
        into.release()
    return out


def _zero_or_one(values: np.ndarray, code: str) -> bool:
    """Whether a 0, -0.0 or 1 (what a boolean reads as; a value that only rounded to one is
    looked at too) may be among ``values`` (1-D). A few numbers: three substring searches
    of their bytes (numpy's (arr == 0) | (arr == 1) was four ufunc calls, ~25,000
    instructions on 128 numbers); a match across two items' bytes (only a zero or
    subnormal's top byte is 0) only says maybe. More: those ufuncs, whose cost per number
    is below the searches' (~7 instructions a byte), a slice at a time (their masks
    never a large array's size)."""
    if values.size <= _FEW_NUMBERS:
        raw = values.tobytes()
        zero, negative_zero, one = _ZERO_ONE_BYTES[code]
        return zero in raw or negative_zero in raw or one in raw
    for start in range(0, values.size, 1 << 16):
        part = values[start:start + (1 << 16)]
        if ((part == 0) | (part == 1)).any():
            return True
    return False


def _flat_floats(data: Any, dtype: np.dtype | None, limits: Limits) -> np.ndarray | None:
    """The common array data, a regular list (flat or nested, as an answer's rows are) of
    numbers led by a float, for a float32 or float64 array, packed by struct in C; None
    for anything else, which the general path reads (and refuses) as it always has.
    numpy's inference (it walks the lists twice and converts each number on its own),
    its 0/1 scan for booleans and the float64 -> float32 cast were ~2/3 of parsing a
    128-number JSON body, and half of the SDK's reading of a 64x128 JSON Jacobian (2.9M
    instructions of 5.8M; orjson's parse is the rest). The result is the general path's
    bit for bit: led by a float, numpy reads the lists as float64 (each int converted as
    a float, as here: a float32 is cast from that double, as struct's 'f' does) and
    casts; strings, null, lists where numbers go and ints past float64 make struct raise,
    ragged or mixed rows are seen before packing; booleans and 0/1 (which the general path
    must tell apart) are looked for, and an int past int64 (an object to numpy) sends the
    data there too."""
    code = _ARRAY_CODES.get(dtype) if dtype is not None else None
    if code is None or data.__class__ is not list or not data:
        return None
    shape = [len(data)]
    rows = [data]  # the lists of this level
    while True:
        first = rows[0][0]
        if first.__class__ is not list:
            break
        rows = list(itertools.chain.from_iterable(rows))  # one level down: each must be a list, all one length
        if set(map(type, rows)) != {list}:
            return None
        width = len(first)
        if width == 0 or set(map(len, rows)) != {width}:
            return None
        shape.append(width)
    if first.__class__ is not float:
        return None
    width = shape[-1]
    count = len(rows) * width
    if count > limits.max_elements:
        return None
    try:
        if len(rows) == 1 and count <= _PACK_ITEMS:  # a request's row: one call (a memoryview of the array cost more)
            out = np.frombuffer(bytearray(_packer(count, code).pack(*rows[0])), dtype)
        else:
            out = _packed(rows, width, count, code, dtype)
    except (struct.error, TypeError, OverflowError):
        return None
    # booleans read as 0 and 1: the lists' types are looked at only where such values are
    if _zero_or_one(out, code) and _has_bools(data, len(shape)):
        return None
    if (out.max() >= _INT64_PAST or out.min() <= -_INT64_PAST) and int in _leaf_types(data, len(shape)):
        return None
    return out.reshape(shape)


def _bfloat16_from_bytes(raw: bytes) -> np.ndarray:
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (halves << 16).view(np.float32)


def typed_array(obj: dict[str, Any]) -> str | None:
    """What is said of an object keyed '0', '1', ... in order where an array goes: a
    page's ``JSON.stringify`` of a typed array (a Float32Array: what WebGL, WebAssembly
    and file readers give) writes one. Such a page read "unknown array keys ['0', '1',
    '10', '100', '1000', ...]" (every index, in string order) for an input, "array data
    is not a regular array of numbers" for an array's data or rows, and for cotangents
    "expected one array of shape [3], got 3 entries of different shapes" (the engine's
    _vector_leaves): nothing of what it had done."""
    if not obj or not all(key == str(i) for i, key in enumerate(obj)):
        return None
    return (f"an object keyed '0' to '{len(obj) - 1}': what JSON.stringify makes of a typed array "
            "(Float32Array, Float64Array); send Array.from(it), or its bytes as "
            '{"dtype": ..., "shape": [...], "base64": ...}')


def decode_json_array(obj: Any, default_dtype: str | None = None, limits: Limits = Limits()) -> tuple[np.ndarray, str | None]:
    """One JSON array -> ``(ndarray, dtype name sent or None)``.

    ``default_dtype`` applies when the client sent no dtype (plain numbers take the
    dtype the function declares). The returned name differs from ``arr.dtype`` only for
    bfloat16.
    """
    if isinstance(obj, dict):
        unknown = set(obj) - {"dtype", "shape", "data", "base64"}
        if unknown:
            listed = sorted(unknown)  # (ten at most: a stringified typed array's keys were every index)
            raise WireError(typed_array(obj) or f"unknown array keys {listed[:10]}"
                            + (f" and {len(listed) - 10} more" if len(listed) > 10 else ""), "invalid_input")
        # "dtype": null is no dtype, as left out (clients built from models send it so):
        # it took the data's own (int64, or float64) instead of the declared dtype.
        name = obj.get("dtype")
        if name is None:
            name = default_dtype
        elif not isinstance(name, str):
            raise WireError("'dtype' must be a string", "invalid_input")
        dtype = _np_dtype(name, limits) if name is not None else None
        if ("data" in obj) == ("base64" in obj):
            raise WireError("an array object needs exactly one of 'data' or 'base64'", "invalid_input")
        shape = _check_shape(obj["shape"], limits) if "shape" in obj else None
        if "base64" in obj:
            if dtype is None or shape is None:
                raise WireError("'base64' arrays need 'dtype' and 'shape'", "invalid_input")
            if not isinstance(obj["base64"], str):
                raise WireError("'base64' must be a string", "invalid_input")
            try:
                raw = base64.b64decode(obj["base64"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise WireError(f"invalid base64: {exc}", "invalid_input") from None
            itemsize = 2 if name == "bfloat16" else dtype.itemsize
            if len(raw) != math.prod(shape) * itemsize:
                raise WireError(
                    f"base64 holds {len(raw)} bytes; shape {list(shape)} of {name} needs "
                    f"{math.prod(shape) * itemsize}",
                    "invalid_input",
                )
            if name == "bfloat16":
                arr = _bfloat16_from_bytes(raw)
            else:
                arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
            return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape), name
        if dtype is not None and dtype.kind == "c":
            return _complex_from_pairs(obj["data"], dtype, shape, limits), name
        arr = _from_numbers(obj["data"], dtype, limits)
        if shape is not None:
            if arr.size != math.prod(shape):
                raise WireError(
                    f"data holds {arr.size} numbers; shape {list(shape)} needs {math.prod(shape)}",
                    "invalid_input",
                )
            arr = arr.reshape(shape)
        return arr, name
    if isinstance(obj, (bool, int, float, list)) or obj in _SPELLED:  # "NaN" alone, as in a list
        dtype = _np_dtype(default_dtype, limits) if default_dtype is not None else None
        if dtype is not None and dtype.kind == "c":
            # an input declared complex, sent as plain lists: its numbers are the [real,
            # imag] pairs an answer writes (a bare number is no pair: refused so)
            return _complex_from_pairs(obj, dtype, None, limits), default_dtype
        return _from_numbers(obj, dtype, limits), default_dtype
    got = _NULL if obj is None else f"the string {obj[:20]!r}" if isinstance(obj, str) else type(obj).__name__
    raise WireError(f"expected an array (number, list or object), got {got}", "invalid_input")


def _complex_from_pairs(data: Any, dtype: np.dtype, shape: tuple[int, ...] | None, limits: Limits) -> np.ndarray:
    """A complex array's JSON ``data``: its numbers' ``[real, imag]`` pairs, nested as
    the array is (or flat), read as the real arrays of the parts' dtype they are."""
    part = np.dtype(np.float32 if dtype == np.complex64 else np.float64)
    pairs = np.ascontiguousarray(_from_numbers(data, part, limits))
    if pairs.size == 0 and pairs.ndim and (shape is None or math.prod(shape) == 0):
        # no numbers, so no pairs to nest ([] for shape [0], [[], []] for [2, 0], as
        # _complex_pairs writes them): an empty complex output, or its cotangent, was
        # refused for want of pairs ("shape [0] needs 0 pairs")
        return np.zeros(pairs.shape if shape is None else shape, dtype)
    if pairs.ndim == 0 or pairs.shape[-1] != 2 or shape is not None and pairs.size != 2 * math.prod(shape):
        need = "" if shape is None else f": shape {list(shape)} needs {math.prod(shape)} pairs"
        raise WireError(f"{dtype.name} data holds each number as a [real, imag] pair{need}", "invalid_input")
    arr = pairs.view(dtype)[..., 0]
    return arr if shape is None else arr.reshape(shape)


def _complex_pairs(arr: np.ndarray) -> Any:
    """A complex array's JSON ``data``: ``[real, imag]`` pairs (see module doc)."""
    pairs = np.ascontiguousarray(arr).view(arr.real.dtype).reshape(*arr.shape, 2)
    return _spell_nonfinite(pairs) if not np.isfinite(pairs).all() else pairs


def _c_order(arr: np.ndarray) -> np.ndarray:
    """C-contiguous, native byte order; unlike np.ascontiguousarray it keeps 0-d arrays 0-d."""
    if arr.dtype.byteorder not in "=|":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def json_data(arr: np.ndarray) -> Any:
    """An array's values as nested lists for a JSON body, non-finite ones spelled (the SDK's
    ``transport="json"``; ``tolist`` gives floats that orjson writes as ``null``); a complex
    array's as ``[real, imag]`` pairs (a complex output's cotangents)."""
    if arr.dtype.kind == "c":
        pairs = _complex_pairs(arr)
        return pairs.tolist() if isinstance(pairs, np.ndarray) else pairs
    return _spell_nonfinite(arr) if arr.dtype.kind == "f" and not np.isfinite(arr).all() else arr.tolist()


def _spell_nonfinite(arr: np.ndarray) -> Any:
    """JSON has no NaN or infinities: spell them "NaN", "Infinity", "-Infinity" (as
    JavaScript prints them) rather than let them become an ambiguous null. The finite
    values stay numpy scalars, which orjson writes in their own precision as it writes a
    whole array (``astype(object)`` made Python floats of them: one NaN in a float32
    array had every other value written with float64's digits, 0.10000000149011612)."""
    spelled = np.empty(arr.shape, dtype=object)
    spelled.flat[:] = list(arr.flat)
    spelled[np.isnan(arr)] = "NaN"
    spelled[np.isposinf(arr)] = "Infinity"
    spelled[np.isneginf(arr)] = "-Infinity"
    return spelled.tolist()


_JSON_SCALARS = frozenset({int, float, str, bool, type(None)})


def check_depth(doc: Any, limit: int, containers: int | None = None) -> int:
    """Refuse JSON nested deeper than ``limit``. A row of numbers is looked at by the
    types of its items (in C), not walked number by number; a list is never judged by its
    first item alone: ``[1, {"a": {"a": ...}}]`` hid 900 levels that way (a second red
    team), and a parser further on overflowed Python's stack (500, a traceback).
    Returns the number of object members in ``doc`` (every object is visited), for
    :func:`check_unique_keys`. ``containers``: the body's count of ``[`` and ``{`` bytes,
    at least its number of lists and objects (each opens with one; strings may hold
    more). Once that many have been found, no list left holds another, and none is looked
    into: a request's array data, a row of numbers, was scanned item by item only to find
    nothing (~10 % of parsing a 128-number body)."""
    members = 0
    stack = [(doc, 1)]
    found = 1  # lists and objects met so far (each has one parent: met once)
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise too_deep(limit)
        if isinstance(node, dict):
            members += len(node)
            size = len(stack)
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
            found += len(stack) - size
        elif isinstance(node, list) and node and (containers is None or found < containers) and (
                isinstance(node[0], (dict, list)) or not _JSON_SCALARS.issuperset(map(type, node))):
            size = len(stack)
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
            found += len(stack) - size
    return members


def _unique_pairs(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            shown = key if len(key) <= 100 else key[:100] + "..."
            raise WireError(f"a JSON object gives the key {shown!r} twice; give each key once")
        seen.add(key)


def check_unique_keys(body: bytes, members: int) -> None:
    """Refuse a JSON body with an object that gives a key twice (orjson, like Python's
    json, keeps the last: ``{"inputs": A, "inputs": B}`` was answered for B, silently,
    whatever a proxy or a log in front read). ``members`` is the number of object
    members of the parsed body (:func:`check_depth`). Each member has one ``:`` outside
    strings, so a body with no more colons than that has no key twice: one count at
    memory speed for every ordinary body. Only a body with more (colons inside strings,
    or a repeated key) is parsed again to find out, by Python's json, objects as lists of
    pairs (in C, as its numbers: linear in the body, as the parse it repeats)."""
    if body.count(b":") <= members:
        return
    try:
        json.loads(body, object_pairs_hook=_unique_pairs)
    except WireError:
        raise
    except Exception:  # noqa: BLE001 (orjson read it; a difference between the two parsers is not this check's)
        pass


_AS_THEY_ARE = frozenset({str, int, bool, type(None)})


def encode_tree(tree: Any) -> Any:
    """Arrays -> ``{"dtype", "shape", "data"}``; sparse matrices -> sparse objects;
    tuples -> lists; the rest as is."""
    # An answer's document, its meta's leaves and its arrays come first: asked whether
    # it was sparse first, each looked for a ``format`` attribute it lacks (an
    # AttributeError made and dropped inside getattr): 2/3 of a small JSON answer's walk.
    kind = tree.__class__
    if kind in _AS_THEY_ARE:
        return tree
    if kind is float:
        return tree if math.isfinite(tree) else _spell_number(tree)  # a plain number (aux) as arrays spell theirs
    if kind is dict:  # (no sparse matrix is one)
        return {str(k): encode_tree(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):  # (nor is one an array)
        arr = _c_order(tree)
        # orjson serialises no 0-d arrays; a numpy scalar keeps its precision (item() would
        # write a float32 with float64's digits)
        data: Any = arr[()] if arr.ndim == 0 else arr
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            data = _spell_nonfinite(arr)
        elif arr.dtype.kind == "c":
            data = _complex_pairs(arr)
        return {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data": data}
    if is_sparse(tree):
        return encode_sparse_json(tree)
    if isinstance(tree, np.floating) and np.isfinite(tree):
        return tree  # written in its own precision (an aux's float32 scalar), as arrays are
    if isinstance(tree, np.generic):
        return encode_tree(tree.item())
    if isinstance(tree, (list, tuple)):
        return [encode_tree(t) for t in tree]
    if isinstance(tree, dict):
        return {str(k): encode_tree(v) for k, v in tree.items()}
    if isinstance(tree, float) and not math.isfinite(tree):
        return _spell_number(tree)  # a plain number (aux) as arrays spell theirs, never null
    return tree


def _spell_number(x: float) -> str:
    return "NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"


_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, kept per dtype: numpy computes it in Python at every read (a
    property, ~1 us), once per array read or written. Only numpy's own dtypes are kept
    (a bounded set); another (a structured one) is named as numpy names it."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = dtype.name
        if dtype.isbuiltin:
            _DTYPE_NAMES[dtype] = name
    return name


def decode_tree(tree: Any, sequence: type = tuple, limits: Limits = Limits()) -> Any:
    """Inverse of :func:`encode_tree`: array objects -> ndarrays, sparse objects ->
    sparse matrices (see :func:`decode_sparse_json`), lists -> ``sequence``."""
    if is_sparse_object(tree):
        return decode_sparse_json(tree, limits=limits)
    if is_array_object(tree):
        return decode_json_array(tree, limits=limits)[0]
    if isinstance(tree, list):
        return sequence(decode_tree(t, sequence, limits) for t in tree)
    if isinstance(tree, dict):
        return {k: decode_tree(v, sequence, limits) for k, v in tree.items()}
    if isinstance(tree, str) and tree in _SPELLED:  # a plain non-finite number, spelled (encode_tree)
        return _SPELLED[tree]
    return tree


def list_paths(tree: Any) -> list[list[int | str]]:
    """The paths of ``tree``'s list nodes (``meta.lists``: see the module's docstring),
    outer before inner, in the order the tree flattens. Tuples are not listed."""
    found: list[list[int | str]] = []
    stack: list[tuple[Any, list[int | str]]] = [(tree, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, (list, tuple)) and not is_sparse(node):  # (a SparseCOO is a NamedTuple)
            if isinstance(node, list):
                found.append(path)
            stack.extend((child, [*path, i]) for i, child in reversed(list(enumerate(node))))
        elif isinstance(node, dict):  # (an OrderedDict too; a sparse matrix is never one)
            stack.extend((child, [*path, str(k)]) for k, child in reversed(list(node.items())))
    return found


def lists_meta(trees: dict[str, Any]) -> dict[str, list[list[int | str]]]:
    """``meta.lists`` of an answer's ``trees`` (``{"output": ..., "aux": ...}``): each
    tree's list paths, for the trees that hold a list (``{}`` when none does)."""
    said = {}
    for name, tree in trees.items():
        if type(tree) is np.ndarray:  # nearly every answer: nothing to walk
            continue
        paths = list_paths(tree)
        if paths:
            said[name] = paths
    return said


def with_lists(tree: Any, paths: Any) -> Any:
    """``tree`` (decoded, its sequences tuples) with a list at each of ``paths`` (one
    tree's ``meta.lists`` entry). A path that names no sequence of the tree, or that is
    not a list of positions and keys, is a :class:`WireError`: the answer contradicts
    itself."""
    if not isinstance(paths, list) or not all(
            isinstance(p, list) and all(type(s) in (int, str) for s in p) for p in paths):
        raise WireError("meta.lists: each path is a list of positions and keys")
    wanted = {tuple(p) for p in paths}
    if not wanted:
        return tree
    done: set[tuple[Any, ...]] = set()

    def build(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, (list, tuple)) and not is_sparse(node):
            kids = [build(child, (*path, i)) for i, child in enumerate(node)]
            if path in wanted:
                done.add(path)
                return kids
            return tuple(kids)
        if isinstance(node, dict):
            return {k: build(v, (*path, k)) for k, v in node.items()}
        return node

    rebuilt = build(tree, ())
    if len(done) != len(wanted):
        missing = min(wanted - done, key=repr)
        raise WireError(f"meta.lists names {list(missing)!r}, which is no sequence of the answer's tree")
    return rebuilt


_POSITION = re.compile(r"0|[1-9][0-9]*")
_MAX_TREE_DEPTH = 64


def _is_node(node: Any) -> bool:
    return isinstance(node, (list, tuple, dict))


def vector_leaves(tree: Any, like: Any) -> list[Any]:
    """Cotangents / tangents matched against the tree they must be shaped like (the
    output, or the differentiated inputs): their leaves, in the order in which
    ``torch.utils._pytree.tree_flatten(like)`` puts ``like``'s leaves.

    ``tree`` is nested as ``like`` is (lists or tuples for tuples and lists, dicts for
    dicts, matched by key whatever their order), or a flat list of all the leaves in
    that order, or one leaf when ``like`` has one. Leaves are returned as they are
    (checking their shapes is the caller's). Torch-free: ``like`` may hold tensors."""
    want: list[Any] = []
    _leaves_of(like, want)
    if not _is_node(tree):
        if len(want) == 1:
            return [tree]
        raise WireError(f"expected {len(want)} arrays shaped like the tree, got one", "invalid_input")
    got: list[Any] = []
    problem = _match(tree, like, "", got)
    if problem is None:
        return got
    if isinstance(tree, (list, tuple)) and len(tree) == len(want) and not any(_is_node(t) for t in tree):
        return list(tree)  # the flat list of leaves
    raise WireError(f"{problem} (or send a flat list of all {len(want)} arrays)", "invalid_input")


def _leaves_of(like: Any, out: list[Any]) -> None:
    if isinstance(like, (list, tuple)):
        for node in like:
            _leaves_of(node, out)
    elif isinstance(like, dict):
        for node in like.values():  # insertion order, as torch's pytree flattens dicts
            _leaves_of(node, out)
    else:  # a leaf, None included (as torch's pytree has it)
        out.append(like)


def _match(tree: Any, like: Any, path: str, out: list[Any]) -> str | None:
    """Append ``tree``'s leaves to ``out`` in ``like``'s order; a mismatch's description."""
    where = f"at [{path.lstrip('/')}]" if path else "at the top"
    if isinstance(like, (list, tuple)):
        if not isinstance(tree, (list, tuple)):
            return f"{where}: expected a list of {len(like)}"
        if len(tree) != len(like):
            return f"{where}: expected a list of {len(like)}, got {len(tree)}"
        for i, (t, l) in enumerate(zip(tree, like)):
            if (problem := _match(t, l, f"{path}/{i}", out)) is not None:
                return problem
        return None
    if isinstance(like, dict):
        if not isinstance(tree, dict):
            return f"{where}: expected an object with keys {sorted(map(str, like))}"
        keys = {str(k): k for k in like}
        if set(tree) != set(keys):
            return f"{where}: keys {sorted(tree)} do not match {sorted(keys)}"
        for name, key in keys.items():
            if (problem := _match(tree[name], like[key], f"{path}/{name}", out)) is not None:
                return problem
        return None
    if _is_node(tree):
        return f"{where}: expected one array, got a {'list' if isinstance(tree, (list, tuple)) else 'object'}"
    out.append(tree)
    return None


def tree_from_paths(members: dict[str, Any], what: str = "member", positions: bool = True) -> Any:
    """``{"": a}`` -> ``a``; ``{"0": a, "1/0": b, "1/1": c}`` -> ``[a, [b, c]]``;
    ``{"k": a, "j/0": b}`` -> ``{"k": a, "j": [b]}``: the tree an ``.npz``'s member names
    spell (``cotangents/1/0``), lists where every name at a level is a position (``0``
    to ``n - 1``, each once), dicts where none is.

    ``positions=False`` makes every level a dict keyed by the names as they are, for a
    reader that knows the tree it expects: ``0`` and ``1`` may be a tuple's positions
    or a dict's keys (an output ``{"1": a, "0": b}``), and only that tree can tell."""
    deep = [p for p in members if p.count("/") >= _MAX_TREE_DEPTH]
    if deep:
        raise WireError(f"{what} {deep[0][:80]!r}...: nested deeper than {_MAX_TREE_DEPTH} levels", "invalid_input")
    if set(members) == {""}:
        return members[""]
    groups: dict[str, dict[str, Any]] = {}
    for path, value in members.items():
        head, _, rest = path.partition("/")
        if not head:
            raise WireError(f"{what} {path!r}: empty name in the path", "invalid_input")
        groups.setdefault(head, {})
        if rest == "" and "/" in path:
            raise WireError(f"{what} {path!r}: empty name in the path", "invalid_input")
        groups[head][rest] = value
    for head, sub in groups.items():
        if "" in sub and len(sub) > 1:
            raise WireError(f"{what} {head!r} is both an array and a tree", "invalid_input")
    if not positions:
        return {h: tree_from_paths(sub, what, positions) for h, sub in groups.items()}
    is_position = [bool(_POSITION.fullmatch(h)) for h in groups]
    if all(is_position):
        if sorted(map(int, groups)) != list(range(len(groups))):
            raise WireError(f"{what}s at positions {sorted(groups, key=int)}; expected 0 to {len(groups) - 1}", "invalid_input")
        return [tree_from_paths(groups[str(i)], what) for i in range(len(groups))]
    if any(is_position) or any(h.lstrip("-").isdigit() for h in groups):
        raise WireError(f"{what}s {sorted(groups)} mix positions and names, or a position is not 0, 1, ...", "invalid_input")
    return {h: tree_from_paths(sub, what) for h, sub in groups.items()}


# --------------------------------------------------------------------------- .npy


def npy_header(shape: tuple[int, ...], dtype: np.dtype | str) -> bytes:
    """The ``.npy`` header for a C-order array: known before any row is computed."""
    return _npy_header(tuple(int(d) for d in shape), np.dtype(dtype).str)


@functools.lru_cache(maxsize=1024)  # the same few shapes recur request after request
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    d = {"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    try:
        npy_format.write_array_header_1_0(buf, d)
    except ValueError:  # header over 64 KiB: only version 2.0 can say it
        buf = io.BytesIO()
        npy_format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def npy_nbytes(shape: tuple[int, ...], dtype: np.dtype | str) -> int:
    """Size of a whole ``.npy`` body: header plus data."""
    return len(npy_header(shape, dtype)) + math.prod(shape) * np.dtype(dtype).itemsize


def write_npy(arr: np.ndarray) -> list[bytes | memoryview]:
    """A ``.npy`` body as pieces (header, data view): no copy of the data."""
    arr = _c_order(arr)
    return [npy_header(arr.shape, arr.dtype), memoryview(arr.reshape(-1)).cast("B")]


def _checked_dtype(descr: np.dtype, complex_ok: bool = False) -> np.dtype:
    if descr.hasobject:
        raise WireError("object arrays (pickles) are refused", "malformed_body")
    if descr.fields is None and descr.subdtype is None and descr.name in COMPLEX_DTYPES:
        if complex_ok:
            return descr
        raise _complex_refused(descr.name)
    if descr.fields is not None or descr.subdtype is not None or descr.kind not in "biuf" or descr.name not in DTYPES:
        # float128 too: JSON's "dtype" refuses it, so .npy and .npz do (it was cast to float32)
        raise WireError(f"unsupported dtype {descr}; send one of {', '.join(sorted(DTYPES - {'bfloat16'}))}", "invalid_input")
    return descr


# numpy reads a header's dict of at most this many bytes (its max_header_size): past it
# its refusal told the client to "adjust `max_header_size` or fully trust the `.npy`
# file using `allow_pickle=True`", the server's own call, cut mid-sentence. Refused here,
# in this module's words, before numpy is asked (numpy.save writes 118 bytes of dict).
_MAX_NPY_DICT = 10_000
_MAX_NPY_HEADER = 12 + _MAX_NPY_DICT  # (magic, version and length field: 10 or 12 bytes)


def npy_header_length(prefix: bytes | memoryview) -> int | None:
    """Bytes of the ``.npy`` header (magic included) that ``prefix`` starts, or None while
    fewer than the 12 bytes that can tell have arrived. Lets a reader that receives a body
    piece by piece know when the header is whole."""
    prefix = bytes(prefix[:12])
    if prefix[:6] != npy_format.MAGIC_PREFIX[: len(prefix)]:
        raise WireError("not an .npy body (bad magic)")
    if len(prefix) < 10:
        return None
    if prefix[6] == 1:
        length = 10 + int.from_bytes(prefix[8:10], "little")
    elif prefix[6] in (2, 3):
        if len(prefix) < 12:
            return None
        length = 12 + int.from_bytes(prefix[8:12], "little")
    else:
        raise WireError(f"unsupported .npy version {prefix[6]}")
    if length - (10 if prefix[6] == 1 else 12) > _MAX_NPY_DICT:
        raise WireError(f".npy header of {length} bytes is over the limit: its dict may hold {_MAX_NPY_DICT:,} "
                        "bytes, as numpy reads (numpy.save writes about 118)")
    return length


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@functools.lru_cache(maxsize=1024)  # (a few dtypes, checked at every request)
def check_request_dtype(descr: np.dtype) -> None:
    """A request array's dtype, where complex ones are not taken (inputs, tangents): the
    refusal a ``.npy`` member of that dtype gets (see :func:`parse_npy_header`)."""
    _checked_dtype(descr)


def parse_npy_header(header: bytes, complex_ok: bool = False) -> tuple[tuple[int, ...], bool, np.dtype]:
    """A whole ``.npy`` header -> ``(shape, fortran_order, dtype)``; pickles, odd dtypes
    and negative shapes refused."""
    if type(header) is bytes and len(header) <= _CACHED_NPY_HEADER:  # (bytes: a hashable key)
        return _parse_small_npy_header(header, complex_ok)
    return _parse_npy_header(header, complex_ok)


def _parse_npy_header(header: bytes, complex_ok: bool) -> tuple[tuple[int, ...], bool, np.dtype]:
    if not header.endswith(b"\n"):
        # The .npy format ends its header with a newline (the dict, spaces, "\n"), which
        # numpy's reader does not check: a length field one short read the header well
        # and then blamed the data (".npy data holds 17 bytes; its header declares 16"),
        # one too long dumped the data's bytes as the "header" it could not parse.
        start = 12 if header[6:7] in (b"\x02", b"\x03") else 10
        ends = header.find(b"\n", start)
        where = f"its newline is byte {ends + 1}" if ends >= 0 else "no newline ends it there"
        raise WireError(f"unreadable .npy header: its length field says the header ends at byte {len(header)}, "
                        f"but {where}: the length field is wrong")
    fp = io.BytesIO(header)
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
        else:
            raise WireError(f"unsupported .npy version {version}")
    except WireError:
        raise
    except Exception as exc:  # numpy raises ValueError, SyntaxError, EOFError, ...
        # literal_eval's messages name its nodes with their addresses ("<ast.Call object
        # at 0x7fc5...>"): the process's memory layout is nobody's business.
        text = _ADDRESS.sub("", str(exc))[:200]
        raise WireError(f"unreadable .npy header: {text}") from None
    if fp.tell() != len(header):
        raise WireError("unreadable .npy header: its length field is wrong")
    dtype = _checked_dtype(dtype, complex_ok)
    if any(type(d) is not int for d in shape):
        # numpy's reader takes a boolean for a size (True is an int to isinstance), which
        # was then a 422 "'shape' must be a list of integers", words for a JSON array,
        # where a size of 2.0 is this 400: one malformed header, one answer
        raise WireError(f"unreadable .npy header: shape is not valid: {shape}")
    if any(d < 0 for d in shape):
        raise WireError(f".npy header declares a negative shape {shape}")
    return shape, fortran, dtype


# numpy reads a header's dict with ast.literal_eval (a compile of the text each time):
# ~230,000 of the front end's ~977,000 instructions for a small .npy request
# (bench.fe_callgrind), for a header that recurs byte for byte (one shape and dtype,
# request after request). The answer is a function of the bytes alone (a tuple of ints,
# a bool, a dtype), so a header seen before is answered from here, as parsed; refusals
# raise and are not kept. Only headers as small as numpy writes for up to ~16 dimensions
# are kept (128 of them, ~50 kB): a larger one is parsed each time.
_CACHED_NPY_HEADER = 256
_parse_small_npy_header = functools.lru_cache(maxsize=128)(_parse_npy_header)


def read_npy(body: bytes | memoryview, limits: Limits = Limits()) -> np.ndarray:
    """A whole ``.npy`` body -> array. Header checked before the data is touched."""
    end = npy_header_length(body)
    if end is None:
        raise WireError(f"unreadable .npy header: the body is cut short ({len(body)} bytes, before the header's length)")
    if end > len(body):
        raise WireError(f"unreadable .npy header: its length field says the header ends at byte {end}, past the "
                        f"body's {len(body)} bytes: the body is cut short or the length field is wrong")
    shape, fortran, dtype = parse_npy_header(bytes(body[:end]), limits.complex)
    offset = end
    _check_shape(list(shape), limits)
    count = math.prod(shape)
    need = count * dtype.itemsize
    have = len(body) - offset
    if have != need:
        raise WireError(f".npy data holds {have} bytes; its header declares {need}")
    arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if dtype.byteorder not in "=|":
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


# --------------------------------------------------------------------------- .npz


#: Deflate cannot expand more than about 1032 to 1; a member declaring more lies.
_MAX_DEFLATE_RATIO = 1100
_TINY_MEMBER = 64 << 10  # declared sizes this small are never worth questioning
_COMPRESSIONS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_ENCRYPTED = 0x1  # general purpose flag bit 0 (APPNOTE 4.4.4)
# zipfile's messages name a member by its repr; what a caller reads names it by its name.
_ZIPINFO = re.compile(r"<ZipInfo filename=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")[^>]*>")


def _zip_text(exc: BaseException) -> str:
    """An exception of zipfile's (or zlib's) as a caller may read it: members by name,
    no object reprs or addresses, at most 200 characters."""
    return _ADDRESS.sub("", _ZIPINFO.sub(r"\1", str(exc)))[:200]


# The most central-directory bytes one member may take (a 46-byte entry, its name and
# extra fields), for bounding a directory's size before zipfile reads it entry by entry.
_MAX_CD_ENTRY = 46 + 1024 + 256


def _central_directory_size(body: bytes | memoryview) -> int | None:
    """The size of a zip's central directory as zipfile itself will read it, None when
    there is no end record. zipfile reads the directory entry by entry, whatever the end
    record's entry count says (200,000 empty entries in 17 MB: 1.2 s), so the directory's
    size, not its count, bounds that work. It is zipfile's own reading of the end records
    (``_EndRecData``: ZIP64 whenever a locator is there, the last end record, the
    locator's record found where zipfile looks for it), not a second parser: a second
    one was told apart from zipfile's three ways by a red team (a ZIP64 record beside a
    plain size of 0, entry counts that spell the end record's signature, a locator whose
    offset points elsewhere)."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:  # (it has been there since Python 2; if it goes, no bound is better than a wrong one)
        return None
    try:
        found = end_record(io.BytesIO(body))
    except Exception:  # noqa: BLE001 (hostile bytes: zipfile will refuse them itself)
        return None
    if not found:
        return None
    return int(found[getattr(zipfile, "_ECD_SIZE", 5)])


def _npz_infos(body: bytes | memoryview, limits: Limits) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """An .npz's central directory, checked before any member is expanded: member count,
    compression (stored or deflate, as numpy.savez / savez_compressed write), each
    member's and the whole archive's declared size, and each member's expansion ratio."""
    cd_size = _central_directory_size(body)
    if cd_size is not None and cd_size > limits.max_members * _MAX_CD_ENTRY:
        raise WireError(f".npz central directory of {cd_size} bytes holds more than the {limits.max_members} "
                        "members allowed", "payload_too_large")
    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise WireError(f"unreadable .npz: {_zip_text(exc)}") from None
    if len(infos) > limits.max_members:
        raise WireError(f".npz has {len(infos)} members; the limit is {limits.max_members}", "payload_too_large")
    member_cap = _MAX_NPY_HEADER + limits.max_elements * 8  # 8: the widest dtype taken
    for info in infos:
        if info.flag_bits & _ENCRYPTED:
            # zipfile's own refusal came later and named the member by its ZipInfo repr
            # ("File <ZipInfo filename='x.npy' filemode='?rw-------' file_size=140> is encrypted").
            raise WireError(f".npz member {info.filename!r} is encrypted; send the arrays unencrypted, "
                            "as numpy.savez writes them")
        if info.compress_type not in _COMPRESSIONS:
            raise WireError(
                f".npz member {info.filename!r} uses compression method {info.compress_type}; "
                "only stored and deflate members are read (numpy.savez, numpy.savez_compressed)"
            )
        if info.file_size > member_cap:
            raise WireError(
                f".npz member {info.filename!r} declares {info.file_size} bytes, more than any array "
                f"of at most {limits.max_elements} elements takes",
                "payload_too_large",
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise WireError(f".npz member {info.filename!r} is stored but declares two sizes")
        if info.file_size > _TINY_MEMBER and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size:
            raise WireError(
                f".npz member {info.filename!r} declares {info.file_size} bytes from {info.compress_size}: "
                "more than deflate can expand"
            )
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_bytes:
        raise WireError(
            f".npz declares {declared} uncompressed bytes; the limit is {limits.max_bytes}", "payload_too_large"
        )
    return zf, infos


def expanded_size(body: bytes | memoryview, media_type: str, limits: Limits = Limits()) -> int:
    """What decoding ``body`` will take, in bytes, for deciding whether to decode it on
    or off the event loop: an ``.npz``'s declared uncompressed size (the sum of its
    central directory's member sizes; no member is expanded), else the body's length.
    Cheap: it reads the central directory only, whose size the body bounds."""
    if media_type != NPZ:
        return len(body)
    cd_size = _central_directory_size(body)
    if cd_size is not None and cd_size > limits.max_members * _MAX_CD_ENTRY:
        return len(body)  # more members than allowed: refused by _npz_infos before it is read
    try:
        infos = zipfile.ZipFile(io.BytesIO(body)).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError):
        return len(body)  # unreadable: refused as soon as it is parsed
    return max(len(body), sum(i.file_size for i in infos))


def _npz_members(body: bytes | memoryview, limits: Limits) -> Iterator[tuple[str, bytes]]:
    """``(member name, raw bytes)`` of a zip; its central directory checked first."""
    zf, infos = _npz_infos(body, limits)
    for info in infos:
        try:
            with zf.open(info) as member:
                raw = member.read(info.file_size + 1)  # never more than it declared
        except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, OSError, RuntimeError) as exc:
            raise WireError(f"unreadable .npz member {info.filename!r}: {_zip_text(exc)}") from None
        if len(raw) != info.file_size:
            raise WireError(f".npz member {info.filename!r} does not match its declared size")
        yield info.filename, raw


def _npz_arrays(members: Iterator[tuple[str, bytes]], limits: Limits) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for filename, raw in members:
        name = filename.removesuffix(".npy")
        if name in out:
            raise WireError(f".npz has two members named {name!r}")
        try:
            out[name] = read_npy(raw, limits)
        except WireError as exc:
            raise WireError(f"member {filename!r}: {exc}", exc.code) from None
    return out


def read_npz(body: bytes | memoryview, limits: Limits = Limits()) -> dict[str, np.ndarray]:
    """A request ``.npz`` (as ``numpy.savez`` writes it) -> ``{name: array}``."""
    return _npz_arrays(_npz_members(body, limits), limits)


def flatten_tree(prefix: str, tree: Any) -> tuple[Any, list[tuple[str, np.ndarray]]]:
    """Split a tree into a JSON skeleton and its arrays, each named by its path.

    A dict key may itself hold a ``/`` (``{"a/b": x, "a": {"b": y}}``): two paths would
    name one member, and the .npz held two members of one name (numpy reads the last for
    both; the SDK refused the answer). A name already taken gets ``~1``, ``~2``, ...: the
    skeleton's ``$npy`` says which member holds which array."""
    arrays: list[tuple[str, np.ndarray]] = []
    taken: set[str] = set()

    def walk(path: str, node: Any) -> Any:
        if isinstance(node, np.ndarray):
            name = path
            for n in itertools.count(1):
                if name not in taken:
                    break
                name = f"{path}~{n}"
            taken.add(name)
            arrays.append((name, node))
            return {"$npy": f"{name}.npy"}
        if isinstance(node, (list, tuple)):
            return [walk(f"{path}/{i}", n) for i, n in enumerate(node)]
        if isinstance(node, dict):
            return {str(k): walk(f"{path}/{k}", v) for k, v in node.items()}
        if isinstance(node, np.generic):
            node = node.item()
        if isinstance(node, float) and not math.isfinite(node):
            return _spell_number(node)  # JSON has none: spelled, as arrays spell theirs
        return node

    return walk(prefix, tree), arrays


def _write_member(zf: zipfile.ZipFile, name: str, pieces: list[bytes | memoryview]) -> None:
    with zf.open(name, "w", force_zip64=True) as fp:
        for piece in pieces:
            fp.write(piece)


def write_npz(trees: dict[str, Any], meta: dict[str, Any]) -> bytes:
    """Trees (``{"jacobian": ..., "aux": ...}``) and meta -> an ``.npz`` (stored, not deflated)."""
    buf = io.BytesIO()
    structure = {}
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, tree in trees.items():
            structure[key], arrays = flatten_tree(key, tree)
            for path, arr in arrays:
                _write_member(zf, f"{path}.npy", write_npy(arr))
        doc = {**meta, "structure": structure}
        if "aux" in structure:
            doc["aux"] = structure["aux"]
        zf.writestr("meta.json", dumps(doc))
    return buf.getvalue()


def _fill(node: Any, members: dict[str, Any]) -> Any:
    """A result's ``meta.json`` structure with each ``{"$npy": member}`` replaced by that
    member's array; JSON lists come back as tuples (``meta.lists`` says which were lists:
    :func:`with_lists`)."""
    if isinstance(node, dict) and set(node) == {"$npy"}:
        return members[node["$npy"].removesuffix(".npy")]
    if isinstance(node, list):
        return tuple(_fill(n, members) for n in node)
    if isinstance(node, dict):
        return {k: _fill(v, members) for k, v in node.items()}
    if isinstance(node, str) and node in _SPELLED:  # a plain non-finite number, spelled (flatten_tree)
        return _SPELLED[node]
    return node


def read_result_npz(body: bytes | memoryview, limits: Limits = Limits()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of :func:`write_npz`: ``(trees, meta)``; JSON lists come back as tuples
    (``meta.lists`` says which were lists: :func:`with_lists`)."""
    meta_json = b"{}"

    def arrays_only() -> Iterator[tuple[str, bytes]]:
        nonlocal meta_json
        for filename, raw in _npz_members(body, limits):
            if filename == "meta.json":
                meta_json = raw
            else:
                yield filename, raw

    members = _npz_arrays(arrays_only(), limits)
    doc = loads(meta_json)

    structure = doc.pop("structure", {})
    doc.pop("aux", None)
    return {k: _fill(v, members) for k, v in structure.items()}, doc


# --------------------------------------------------------------------------- sparse
#
# A sparse derivative is a 2-D matrix (output elements) x (input elements), both
# flattened in C order (SPEC 7). In JSON it is a sparse object
# ``{"format": "csr", "shape", "dtype", "indptr", "indices", "data"}``, the same with
# ``"format": "csc"`` (``indptr`` over the columns, ``indices`` the rows: what
# scipy's ``splu`` and Julia's ``SparseMatrixCSC`` hold) or
# ``{"format": "coo", "shape", "dtype", "row", "col", "data"}``; as a body it is an
# ``.npz`` with exactly the members ``scipy.sparse.save_npz`` writes (``format``,
# ``shape``, ``data``, ``indices`` + ``indptr`` or ``row`` + ``col``, ``_is_array``),
# so ``scipy.sparse.load_npz`` reads it, plus an optional ``meta.json``. scipy is never
# imported at module level: the SDK's base install has none, and then decodes to
# :class:`SparseCOO`; with scipy installed it returns ``scipy.sparse`` arrays.

#: Each sparse format's index arrays beside ``data``: the one table the JSON object, the
#: ``.npz`` members, the engines' IPC frames and the result's size are read from.
SPARSE_FIELDS = {"csr": ("indptr", "indices"), "csc": ("indptr", "indices"), "coo": ("row", "col")}


class SparseCOO(NamedTuple):
    """A sparse matrix without scipy: entries ``data[k]`` at ``(row[k], col[k])``."""

    row: np.ndarray
    col: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def format(self) -> str:
        return "coo"

    def tocoo(self) -> "SparseCOO":
        return self

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=self.data.dtype)
        np.add.at(out, (self.row, self.col), self.data)  # duplicates sum, as in scipy
        return out


def is_sparse(obj: Any) -> bool:
    """A scipy sparse matrix/array or a :class:`SparseCOO` (duck-typed: no scipy import)."""
    return isinstance(obj, SparseCOO) or (
        getattr(obj, "format", None) in ("csr", "csc", "coo", "bsr", "dia", "lil", "dok")
        and hasattr(obj, "tocoo") and hasattr(obj, "nnz")
    )


def is_sparse_object(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") in SPARSE_FIELDS and "shape" in obj and "data" in obj


def _sparse_arrays(matrix: Any) -> tuple[str, tuple[int, int], dict[str, np.ndarray]]:
    """``(format, shape, arrays)`` of a CSR, CSC or COO matrix (others become CSR)."""
    if isinstance(matrix, SparseCOO):
        return "coo", tuple(matrix.shape), {"row": matrix.row, "col": matrix.col, "data": matrix.data}  # type: ignore[return-value]
    if matrix.format not in SPARSE_FIELDS:
        matrix = matrix.tocsr()
    shape = tuple(int(d) for d in matrix.shape)
    fmt = matrix.format
    return fmt, shape, {name: getattr(matrix, name) for name in (*SPARSE_FIELDS[fmt], "data")}  # type: ignore[return-value]


def encode_sparse_json(matrix: Any) -> dict[str, Any]:
    """A sparse matrix -> the JSON sparse object (non-finite values spelled as in arrays)."""
    fmt, shape, arrays = _sparse_arrays(matrix)
    data = _c_order(np.asarray(arrays["data"]))
    out: dict[str, Any] = {"format": fmt, "shape": list(shape), "dtype": data.dtype.name}
    for name in SPARSE_FIELDS[fmt]:
        out[name] = _c_order(np.asarray(arrays[name]))
    if data.dtype.kind == "c":  # [real, imag] pairs, as a dense complex array's (orjson writes no complex)
        out["data"] = _complex_pairs(data)
    else:
        out["data"] = _spell_nonfinite(data) if data.dtype.kind == "f" and not np.isfinite(data).all() else data
    return out


def _check_sparse(fmt: str, shape: tuple[int, ...], arrays: dict[str, np.ndarray], limits: Limits) -> None:
    """Shapes, lengths and index ranges, so that a hostile body cannot index out of range."""
    if len(shape) != 2:
        raise WireError(f"a sparse matrix is 2-D, got shape {list(shape)}", "invalid_input")
    m, n = shape
    data = arrays["data"]
    if data.ndim != 1 or data.size > limits.max_elements:
        raise WireError("sparse 'data' must be 1-D and within the element limit", "invalid_input")
    for name in SPARSE_FIELDS[fmt]:
        a = arrays[name]
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise WireError(f"sparse {name!r} must be a 1-D integer array", "invalid_input")
    if fmt in ("csr", "csc"):  # compressed rows (csr) or columns (csc)
        major, minor = (m, n) if fmt == "csr" else (n, m)
        axis = 0 if fmt == "csr" else 1
        indptr, indices = arrays["indptr"], arrays["indices"]
        if indptr.size != major + 1 or indices.size != data.size or (indptr.size and (indptr[0] != 0 or indptr[-1] != data.size)) or np.any(np.diff(indptr) < 0):
            raise WireError(f"sparse {fmt}: indptr must rise from 0 to nnz over shape[{axis}] + 1 entries", "invalid_input")
        bad = indices.size and (indices.min() < 0 or indices.max() >= minor)
    else:
        row, col = arrays["row"], arrays["col"]
        if row.size != data.size or col.size != data.size:
            raise WireError("sparse coo: row, col and data must have one length", "invalid_input")
        bad = row.size and (row.min() < 0 or row.max() >= m or col.min() < 0 or col.max() >= n)
    if bad:
        raise WireError(f"sparse indices fall outside the shape {list(shape)}", "invalid_input")


def _to_matrix(fmt: str, shape: tuple[int, int], arrays: dict[str, np.ndarray], as_scipy: bool | None) -> Any:
    """scipy arrays when scipy is importable (or ``as_scipy=True``), else :class:`SparseCOO`."""
    sparse = None
    if as_scipy is not False:
        try:
            import scipy.sparse as sparse
        except ImportError:
            if as_scipy:
                raise
    if sparse is not None:
        if arrays["data"].dtype == np.float16:
            # scipy.sparse holds no float16 (the service sends float32 for it: see
            # engine.sparse): coo_array raised scipy's ValueError out of the SDK's reader,
            # and csr_array/csc_array built a matrix whose toarray() and products raise.
            # float16 -> float32 is exact.
            arrays = {**arrays, "data": arrays["data"].astype(np.float32)}
        if fmt in ("csr", "csc"):
            make = sparse.csr_array if fmt == "csr" else sparse.csc_array
            return make((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
        return sparse.coo_array((arrays["data"], (arrays["row"], arrays["col"])), shape=shape)
    if fmt == "csr":
        row = np.repeat(np.arange(shape[0]), np.diff(arrays["indptr"]))
        return SparseCOO(row, arrays["indices"], arrays["data"], shape)
    if fmt == "csc":
        col = np.repeat(np.arange(shape[1]), np.diff(arrays["indptr"]))
        return SparseCOO(arrays["indices"], col, arrays["data"], shape)
    return SparseCOO(arrays["row"], arrays["col"], arrays["data"], shape)


def decode_sparse_json(obj: Any, limits: Limits = Limits(), as_scipy: bool | None = None) -> Any:
    """The JSON sparse object -> a sparse matrix (scipy when installed, else SparseCOO)."""
    if not is_sparse_object(obj):
        raise WireError("expected a sparse object with format csr, csc or coo, shape and data", "invalid_input")
    fmt = obj["format"]
    unknown = set(obj) - {"format", "shape", "dtype", "data", *SPARSE_FIELDS[fmt]}
    if unknown:
        raise WireError(f"unknown sparse keys {sorted(unknown)}", "invalid_input")
    shape = _check_shape(obj["shape"], limits, dense=False)
    name = obj.get("dtype", "float64")
    if not isinstance(name, str):
        raise WireError("'dtype' must be a string", "invalid_input")
    # Complex as a dense array's: read where ``limits.complex`` allows it (an answer's
    # reader, the SDK), as [real, imag] pairs. Read without limits, a complex result was
    # refused as "inputs and tangents are real" by the SDK that reads complex dense ones.
    dtype = _np_dtype(name, limits)
    data = (_complex_from_pairs(obj["data"], dtype, None, limits) if dtype.kind == "c"
            else _from_numbers(obj["data"], dtype, limits))
    arrays = {"data": data.reshape(-1)}
    for name in SPARSE_FIELDS[fmt]:
        if name not in obj:
            raise WireError(f"sparse {fmt} needs {name!r}", "invalid_input")
        arrays[name] = _from_numbers(obj[name], np.dtype(np.int64), limits).reshape(-1)
    _check_sparse(fmt, shape, arrays, limits)
    return _to_matrix(fmt, shape, arrays, as_scipy)  # type: ignore[arg-type]


def _scalar_npy(value: np.ndarray) -> list[bytes | memoryview]:
    return [npy_header(value.shape, value.dtype), value.tobytes()]


def write_sparse_npz(matrix: Any, meta: dict[str, Any] | None = None, trees: dict[str, Any] | None = None) -> bytes:
    """A sparse matrix as the ``.npz`` ``scipy.sparse.save_npz`` writes (stored, not
    deflated), plus ``meta.json`` when ``meta`` is given. ``trees`` (a response's
    ``aux`` / ``output``) go beside as ``aux/...npy`` members, as :func:`write_npz`
    writes them, their structure in ``meta.json``: ``load_npz`` reads only its own
    members, so the body stays readable without the SDK."""
    fmt, shape, arrays = _sparse_arrays(matrix)
    buf = io.BytesIO()
    structure: dict[str, Any] = {}
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in SPARSE_FIELDS[fmt]:
            _write_member(zf, f"{name}.npy", write_npy(np.asarray(arrays[name])))
        _write_member(zf, "format.npy", _scalar_npy(np.array(fmt.encode("ascii"))))
        _write_member(zf, "shape.npy", write_npy(np.asarray(shape, dtype=np.int64)))
        _write_member(zf, "data.npy", write_npy(np.asarray(arrays["data"])))
        _write_member(zf, "_is_array.npy", write_npy(np.array(True)))  # load_npz: an array, not a matrix
        for key, tree in (trees or {}).items():
            if key in _SPARSE_MEMBERS:
                raise ValueError(f"{key!r} is a member name of the sparse matrix")
            structure[key], members = flatten_tree(key, tree)
            for path, arr in members:
                _write_member(zf, f"{path}.npy", write_npy(arr))
        if meta is not None or structure:
            zf.writestr("meta.json", dumps({**(meta or {}), **({"structure": structure} if structure else {})}))
    return buf.getvalue()


_SPARSE_MEMBERS = frozenset({"format", "shape", "data", "indices", "indptr", "row", "col", "_is_array"})


def is_sparse_npz(body: bytes | memoryview, limits: Limits = Limits()) -> bool:
    """Whether an ``.npz`` holds a sparse matrix (a ``format`` member, as save_npz writes)."""
    try:
        _, infos = _npz_infos(body, limits)
    except WireError:
        return False
    return any(info.filename == "format.npy" for info in infos)


def read_sparse_result_npz(
    body: bytes | memoryview, limits: Limits = Limits(), as_scipy: bool | None = None
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A sparse result body from :func:`write_sparse_npz`: ``(matrix, trees, meta)``,
    ``trees`` holding ``aux`` / ``output`` when the server sent them."""
    sparse_part: list[tuple[str, bytes]] = []
    tree_part: list[tuple[str, bytes]] = []
    meta_json = b"{}"
    for filename, raw in _npz_members(body, limits):
        if filename == "meta.json":
            meta_json = raw
        elif filename.removesuffix(".npy") in _SPARSE_MEMBERS:
            sparse_part.append((filename, raw))
        else:
            tree_part.append((filename, raw))
    matrix = _sparse_from_members(dict(sparse_part), limits, as_scipy)
    members = _npz_arrays(iter(tree_part), limits)
    meta = loads(meta_json)
    structure = meta.pop("structure", {}) if isinstance(meta, dict) else {}

    return matrix, {k: _fill(v, members) for k, v in structure.items()}, meta


def read_sparse_npz(body: bytes | memoryview, limits: Limits = Limits(), as_scipy: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Inverse of :func:`write_sparse_npz` (also reads ``scipy.sparse.save_npz`` files):
    ``(matrix, meta)``."""
    members: dict[str, bytes] = {}
    for filename, raw in _npz_members(body, limits):
        members[filename] = raw
    meta = loads(members.pop("meta.json")) if "meta.json" in members else {}
    return _sparse_from_members(members, limits, as_scipy), meta


def _sparse_from_members(members: dict[str, bytes], limits: Limits, as_scipy: bool | None) -> Any:
    raw_format = members.pop("format.npy", None)
    if raw_format is None:
        raise WireError("not a sparse .npz: no 'format' member")
    fmt = _read_format(raw_format)
    if fmt not in SPARSE_FIELDS:
        raise WireError(f"sparse format {fmt!r} is not supported; send csr, csc or coo", "invalid_input")
    members.pop("_is_array.npy", None)
    arrays = _npz_arrays(iter(members.items()), limits)
    need = {"shape", "data", *SPARSE_FIELDS[fmt]}
    if set(arrays) != need:
        raise WireError(f"sparse {fmt} .npz needs members {sorted(need)}, got {sorted(arrays)}")
    shape = tuple(int(d) for d in arrays.pop("shape").reshape(-1))
    _check_shape(list(shape), limits, dense=False)
    _check_sparse(fmt, shape, arrays, limits)
    return _to_matrix(fmt, shape, arrays, as_scipy)  # type: ignore[arg-type]


def _read_format(raw: bytes) -> str:
    """The ``format`` member: a 0-d byte (or unicode) string, which read_npy refuses."""
    end = npy_header_length(raw)
    if end is None or end > len(raw):
        raise WireError("unreadable sparse 'format' member")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, ...
        raise WireError(f"unreadable sparse 'format' member: {exc}") from None
    if arr.dtype.kind not in "SU" or arr.ndim != 0:
        raise WireError("sparse 'format' must be a short string")
    value = arr.item()
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
