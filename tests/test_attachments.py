"""Every binary answer (.npy, .npz) says it is a file: ``Content-Disposition: attachment``
with a name that says what it holds. Without it Swagger UI's "Try it out" shows the
bytes as text and its Download saves them as a corrupted .txt (it saves bytes as they
are only for octet-stream or an attachment), and a plain browser tab shows garbage."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings


@pytest.fixture(scope="module")
def streaming():
    """Every Jacobian .npy streamed from the engine (threshold 0)."""
    with TestClient(create_app(Settings(warmup=False, device="cpu", stream_threshold_bytes=0))) as c:
        yield c


def _disposition(response) -> str:
    assert response.status_code == 200, response.text
    return response.headers.get("content-disposition", "")


@pytest.mark.parametrize("n", [3, 600], ids=["one-body", "in-pieces"])  # 600: 1.4 MB, sent in pieces
def test_npy_answers_are_attachments(client, n):
    r = client.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5] * n]}, headers={"Accept": wire.NPY})
    assert _disposition(r) == 'attachment; filename="sin-jacobian.npy"'
    assert np.load(io.BytesIO(r.content)).shape == (n, n)
    r = client.post("/v1/functions/sin/evaluate", json={"inputs": [[0.5]]}, headers={"Accept": wire.NPY})
    assert _disposition(r) == 'attachment; filename="sin-output.npy"'


def test_streamed_npy_is_an_attachment(streaming):
    r = streaming.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]}, headers={"Accept": wire.NPY})
    assert "x-chunk-size" in r.headers and "x-compute-ms" not in r.headers  # the streamed path
    assert _disposition(r) == 'attachment; filename="sin-jacobian.npy"'


def test_npz_answers_are_attachments(client):
    r = client.post("/v1/functions/sin_aux/jacobian", json={"inputs": [[0.5]]}, headers={"Accept": wire.NPZ})
    assert _disposition(r) == 'attachment; filename="sin_aux-jacobian.npz"'
    zipfile.ZipFile(io.BytesIO(r.content)).testzip()
    r = client.post("/v1/functions/lorenz96/jacobian", json={"inputs": [[0.1] * 20], "sparsity": "band"},
                    headers={"Accept": wire.NPZ})
    assert _disposition(r) == 'attachment; filename="lorenz96-jacobian.npz"'
    assert "indptr.npy" in zipfile.ZipFile(io.BytesIO(r.content)).namelist()  # the sparse members
    r = client.get("/v1/functions/lorenz96/sparsity?shapes=20", headers={"Accept": wire.NPZ})
    assert _disposition(r) == 'attachment; filename="lorenz96-sparsity.npz"'


def test_json_answers_are_not_attachments(client):
    r = client.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5]]})
    assert r.status_code == 200 and "content-disposition" not in r.headers


def test_file_names_keep_to_safe_characters():
    from jacobian_service.responses import attachment

    assert attachment('a"b/c\\d é', "jacobian", wire.NPY) == {
        "Content-Disposition": 'attachment; filename="a_b_c_d__-jacobian.npy"; '
                               "filename*=UTF-8''a_b_c_d_%C3%A9-jacobian.npy"}
    assert attachment("sin", "jacobian", wire.NPY) == {"Content-Disposition": 'attachment; filename="sin-jacobian.npy"'}


def test_file_names_of_another_script_keep_their_letters():
    """A function named in another script was saved under underscores alone
    (``___-jacobian.npy`` for ``ヤコビ``, and so for every function named in it): the
    name now also goes in ``filename*`` (RFC 6266), which browsers prefer, letters and
    digits kept, anything else (a right-to-left override that would disguise the
    extension, a space) still ``_``."""
    import re
    import urllib.parse

    from jacobian_service.responses import attachment

    for name, want in [("ヤコビ", "ヤコビ-hessian.npz"), ("größe", "größe-hessian.npz"),
                       ("x\u202egpj.exe", "x_gpj.exe-hessian.npz"), ("a b", "a_b-hessian.npz")]:
        header = attachment(name, "hessian", wire.NPZ)["Content-Disposition"]
        parts = re.fullmatch(r'attachment; filename="([A-Za-z0-9._-]+)"(?:; filename\*=UTF-8\'\'([^;\s"]+))?', header)
        assert parts, header
        plain, extended = parts.groups()  # a browser takes filename* where it is given
        assert (urllib.parse.unquote(extended, errors="strict") if extended else plain) == want, header
