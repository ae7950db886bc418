"""Red team, round forty-eight: hostile clients, a matrix of every endpoint, format and
limit against a real server (``serve``, one front end, small limits); what it found.

Each case names what a user saw before.

- A sparsity pattern's braille picture (``GET /v1/functions/{name}/sparsity``'s
  ``picture``, and the SDK's ``pattern_string``) was drawn from numpy temporaries of
  every entry and one ``np.bitwise_or.at``: a cached ``GET
  /v1/functions/softmax/sparsity?shapes=4096`` (a 60-byte request, 16.7 M entries)
  held the engine, which serves no one else meanwhile, 5.5 s and grew it by 0.9 GB
  (1.86 GB peak, 256 MiB memory budget), at every repeat.
- An ``.npy`` body (or ``.npz`` member) whose header's dict is over numpy's 10,000 bytes
  was a 400 in numpy's words, cut at 200 characters: "Header info length (20086) is
  large and may not be safe to load securely. To allow loading, adjust
  `max_header_size` or fully trust the `.npy` file using `allow_pickle=True`. For safety
  against large ": advice on the server's own numpy call, which no client can take.
- A large sparse JSON answer (a pattern's, a sparse Jacobian's) was encoded in one
  ``orjson`` call, holding the GIL: the front end answered no one else meanwhile.
- A dense Hessian's pattern (``GET /v1/functions/norm_cubed/sparsity?shapes=4096&kind=hessian``)
  held the engine 56 s, near its deadline: its colouring built adjacency lists, gathered
  its entries by sorting and searching them all, and tried an acyclic colouring, where
  a complete graph has one colouring, a colour per vertex (now 16 s, 14 of them detection).
"""

from __future__ import annotations

import io
import math
import struct
import subprocess
import tracemalloc
import zipfile
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from jacobian_client.sparse import braille

from .conftest import assert_problem, live_server, npy_bytes


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(WORKERS=1, ENGINE_STANDBY="false", WARMUP="false") as served:
        yield served


def _braille_whole(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], max_width: int,
                   max_height: int | None = None) -> str:
    """The picture as it was drawn before (every entry at once): the reference."""
    max_height = max_width if max_height is None else max_height
    m, n = shape
    scale = max(1.0, n / (2 * max_width), m / (4 * max_height))
    dots_x, dots_y = max(1, math.ceil(n / scale)), max(1, math.ceil(m / scale))
    width, height = math.ceil(dots_x / 2), math.ceil(dots_y / 4)
    bits = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.int64)
    r = (np.asarray(rows, np.int64) / scale).astype(np.int64)
    c = (np.asarray(cols, np.int64) / scale).astype(np.int64)
    cells = np.zeros((height, width), np.int64)
    np.bitwise_or.at(cells, (r // 4, c // 2), bits[r % 4, c % 2])
    return "\n".join("".join(chr(0x2800 + int(v)) for v in line) for line in cells)


def test_a_dense_patterns_picture_is_drawn_in_bounded_memory() -> None:
    """A 2,048 x 2,048 dense pattern (4.2 M entries, what ``GET .../sparsity`` of a
    2,048-input softmax pictures in the engine): 224 MB of numpy temporaries before
    (tracemalloc's peak), a few MB now; the picture the same, and the same as before
    for random patterns of every size, scale and index dtype."""
    m = 2048
    rows, cols = np.divmod(np.arange(m * m), m)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        picture = braille(rows, cols, (m, m), max_width=40)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # (before: 224 MB)
    assert picture == "\n".join(["\u28ff" * 40] * 20)  # (one scale: 25.6 entries a dot, 4 dots a line)
    rng = np.random.default_rng(48)
    for trial in range(300):
        m, n = (int(v) for v in rng.integers(1, 3000 if trial % 3 else 12, 2))
        k = int(rng.integers(0, 400))
        r, c = rng.integers(0, m, k), rng.integers(0, n, k)
        width, height = int(rng.integers(1, 70)), None if trial % 2 else int(rng.integers(1, 30))
        dtype = (np.int32, np.int64, np.uint32)[trial % 3]
        assert braille(r.astype(dtype), c.astype(dtype), (m, n), width, height) == _braille_whole(r, c, (m, n), width, height)


def _npy_with_dict(text: bytes, version: int) -> bytes:
    """An .npy of 4 float32 zeros whose header's dict is ``text`` (padded as numpy pads)."""
    prefix = 10 if version == 1 else 12
    text += b" " * (-(prefix + len(text) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text + bytes(16)


@pytest.mark.parametrize("version", [1, 2])
def test_an_npy_header_over_numpys_limit_is_refused_in_the_services_words(
        server: tuple[str, subprocess.Popen], version: int) -> None:
    url, _ = server
    big = _npy_with_dict(b"{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'x': '" + b"a" * 20_000 + b"'}",
                         version)
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", content=big, headers={"Content-Type": "application/x-npy"},
                   timeout=30)
    body = assert_problem(r, 400, "malformed_body")
    assert body["detail"] == (f".npy header of {len(big) - 16} bytes is over the limit: its dict may hold 10,000 "
                              "bytes, as numpy reads (numpy.save writes about 118)")
    assert "allow_pickle" not in r.text and "max_header_size" not in r.text  # (before: numpy's advice)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # the same header as an .npz member
        zf.writestr("x.npy", big)
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", content=buf.getvalue(),
                   headers={"Content-Type": "application/x-npz"}, timeout=30)
    body = assert_problem(r, 400, "malformed_body")
    assert "its dict may hold 10,000 bytes" in body["detail"] and "allow_pickle" not in r.text, body
    # A header at numpy's limit is read, and answered as torch answers it.
    edge = _npy_with_dict(b"{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }" + b" " * 9_800, version)
    r = httpx.post(f"{url}/v1/functions/sin/jacobian", content=edge,
                   headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"}, timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), np.eye(4, dtype=np.float32))
    assert npy_bytes(np.zeros(4, np.float32))[:6] == edge[:6]


def test_a_large_sparse_json_answer_is_encoded_a_block_at_a_time() -> None:
    """A sparse matrix in a JSON answer (a sparse Jacobian or Hessian POST's, and ``GET
    .../sparsity``'s pattern) was written by one ``wire.dumps`` call, which holds the GIL
    throughout, on the thread that encodes it: measured, while ``GET
    /v1/functions/softmax/sparsity?shapes=4096`` (113 MB of JSON; 192 MB as coo) was
    answered, a ``/healthz`` on the same front end waited up to 0.72 s (1.17 s as coo);
    0.09 s (0.15 s) now. Each piece is now at most a block of an index or value array, and
    the text is the same byte for byte."""
    sparse = pytest.importorskip("scipy.sparse")
    from jacobian_client import wire
    from jacobian_service.responses import json_pieces

    rng = np.random.default_rng(48)
    n = 1500
    for fmt in ("csr", "csc", "coo"):
        matrix = sparse.random(n, n, density=0.5, format=fmt, dtype=np.float32, random_state=rng)  # 1.1 M entries
        whole = wire.dumps(wire.encode_tree({"jacobian": matrix, "meta": {"mode": "rev"}}))
        pieces = list(json_pieces({"jacobian": matrix, "meta": {"mode": "rev"}}))
        assert b"".join(pieces) == whole
        assert max(map(len, pieces)) < 4 << 20, (fmt, max(map(len, pieces)))  # (before: one piece, 20 MB)
        from jacobian_service.responses import sparse_json_body  # (GET .../sparsity's body)

        doc = {"function": "f", "kind": "jacobian", "meta": {"device": "cpu"}}
        assert sparse_json_body(doc, "matrix", matrix) == wire.dumps({**doc, "matrix": wire.encode_sparse_json(matrix)})


def test_a_dense_hessians_colouring_is_told_from_its_row_counts(server: tuple[str, subprocess.Popen]) -> None:
    """A dense block's star colouring (one colour per vertex) is found from the row
    counts, its entries read where they are, and its lower bound said as the vertex
    count: 2,048 inputs 1.97 -> 0.10 s of CPU; a 4,096-input ``norm_cubed`` Hessian's
    pattern GET 56.8 -> 16.3 s on a real server (13.8 s of it detection). The colouring is the
    one it was, entry for entry, and the Hessian through it torch's."""
    from jacobian_service.sparsity import Pattern
    from jacobian_service.sparsity.coloring import hessian_coloring, star_coloring, star_gather

    for idx, n in [(np.arange(600), 600), (np.array([1, 3, 4]), 6), (np.array([0]), 3)]:
        rows, cols = (a.ravel() for a in np.meshgrid(idx, idx, indexing="ij"))
        p = Pattern((n, n), rows, cols)
        c = hessian_coloring(p, most_summed=8)
        assert c.mode == "star" and c.n_colors == len(idx) == c.lower_bound  # (before: lower bound 2)
        np.testing.assert_array_equal(c.colors[idx], np.arange(len(idx)))
        np.testing.assert_array_equal(c.gather, star_gather(p, c.colors, c.n_colors))
    # without its diagonal, the same colouring by the adjacency lists (the general check)
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(7), np.arange(7), indexing="ij"))
    off = rows != cols
    c = star_coloring(Pattern((7, 7), rows[off], cols[off]))
    assert c.n_colors == 7
    url, _ = server
    r = httpx.get(f"{url}/v1/functions/norm_cubed/sparsity", params={"shapes": "256", "kind": "hessian"}, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["pattern"]["nnz"] == 256 * 256
    assert doc["coloring"] == {"mode": "star", "colors": 256, "products": 256, "lower_bound": 256,
                               "strategy": "star_largest_first"}
    x = np.linspace(0.5, 1.5, 256, dtype=np.float32)
    r = httpx.post(f"{url}/v1/functions/norm_cubed/hessian", json={"inputs": [x.tolist()], "sparsity": "auto"},
                   timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["hessian"]
    import torch
    want = torch.func.hessian(lambda t: t.norm() ** 3)(torch.from_numpy(x)).numpy()
    dense = np.zeros((256, 256), np.float32)
    indptr, indices = np.asarray(got["indptr"]), np.asarray(got["indices"])
    for i in range(256):
        dense[i, indices[indptr[i]:indptr[i + 1]]] = got["data"][indptr[i]:indptr[i + 1]]
    np.testing.assert_allclose(dense, want, rtol=1e-4, atol=1e-4)
