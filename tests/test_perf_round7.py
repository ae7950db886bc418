"""Round 7 of the performance work: the small ``.npy`` request's front-end CPU.

numpy reads a ``.npy`` header's dict with ``ast.literal_eval``, a compile of the text at
every request: ~230,000 of the ~977,000 instructions the front end spent on bench's small
``mlp`` Jacobian over ``.npy`` (``bench.fe_callgrind``). The header recurs byte for byte,
so ``wire.parse_npy_header`` keeps what it read of small ones: a header seen before must
be read exactly as the first time, and a refused one refused each time.
"""

from __future__ import annotations

import ast
import io

import numpy as np
import pytest
from jacobian_client import wire


def _header(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    raw = buf.getvalue()
    return raw[:wire.npy_header_length(raw)]


def _uncached(header: bytes, complex_ok: bool = False):
    try:
        return wire._parse_npy_header(header, complex_ok)
    except wire.WireError as exc:
        return ("refused", str(exc), exc.code)


def _parsed(header: bytes, complex_ok: bool = False):
    try:
        return wire.parse_npy_header(header, complex_ok)
    except wire.WireError as exc:
        return ("refused", str(exc), exc.code)


_ARRAYS = [
    np.zeros(128, np.float32), np.zeros((3, 4), np.float64), np.zeros((3, 4), np.float64, order="F"),
    np.zeros((), np.int64), np.zeros((0, 5), np.uint8), np.zeros(2, ">f4"), np.zeros(2, np.bool_),
    np.zeros(2, np.complex64), np.zeros((1,) * 16, np.float16), np.zeros(2, "M8[s]"), np.zeros(2, "U3"),
]


@pytest.mark.parametrize("complex_ok", [False, True])
@pytest.mark.parametrize("version", [None, (2, 0)])
@pytest.mark.parametrize("i", range(len(_ARRAYS)))
def test_a_recurring_header_is_read_as_the_first_time(i, version, complex_ok):
    header = _header(_ARRAYS[i], version)
    expected = _uncached(header, complex_ok)
    assert _parsed(header, complex_ok) == expected
    assert _parsed(bytes(header), complex_ok) == expected  # (another bytes object, the same key)
    if expected[0] != "refused":
        assert (expected[0], expected[2]) == (_ARRAYS[i].shape, _ARRAYS[i].dtype)


def test_a_recurring_small_header_is_compiled_once(monkeypatch):
    evals = []
    real = ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda text: evals.append(text) or real(text))
    header = _header(np.arange(7, dtype=np.float32).reshape(7, 1))  # (a shape no other test reads)
    for _ in range(3):
        assert wire.parse_npy_header(header) == ((7, 1), False, np.dtype(np.float32))
        arr = wire.read_npy(header + np.arange(7, dtype=np.float32).tobytes())
        assert arr.tolist() == [[float(k)] for k in range(7)]
    assert len(evals) == 1


@pytest.mark.parametrize("text", [
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }",  # a negative size
    b"{'descr': '|O', 'fortran_order': False, 'shape': (3,), }",  # a pickle
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }",  # a bool for a size
    b"{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }",  # complex, refused in a request
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } junk",
])
def test_a_refused_header_is_refused_each_time(monkeypatch, text):
    evals = []
    real = ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda t: evals.append(t) or real(t))
    header = _written(text)
    first = _parsed(header)
    assert first[0] == "refused"
    once = len(evals)
    assert _parsed(header) == first
    assert len(evals) == 2 * once > 0  # (nothing kept of a refusal: read again, refused again)


def _written(text: bytes) -> bytes:
    """A version 1.0 header of ``text``, padded as numpy pads one."""
    body = text + b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def test_a_large_header_is_not_kept():
    shape = (1000,) * 40  # (a header over 256 bytes)
    header = _written(b"{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % repr(shape).encode())
    assert len(header) > wire._CACHED_NPY_HEADER
    before = wire._parse_small_npy_header.cache_info().currsize
    assert wire.parse_npy_header(header) == (shape, False, np.dtype(np.float32))
    assert wire._parse_small_npy_header.cache_info().currsize == before
