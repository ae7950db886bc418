"""``jacobian-service call`` (client/jacobian_client/_cli_call.py) against a real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

pytest.importorskip("jacobian_service.app")

from jacobian_client._cli_call import call_main  # noqa: E402

from ._client_support import real_server  # noqa: E402
from ._ports import dead_port  # noqa: E402

X = np.linspace(0.1, 1.0, 5, dtype=np.float32)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with real_server() as u:
        yield u


@pytest.fixture
def x_file(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, X)
    return path


def test_call_streams_to_an_npy_file(url: str, x_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "J.npy"
    assert call_main(["sin", "--url", url, "--input", str(x_file), "--out", str(out), "--chunk-size", "2"]) == 0
    np.testing.assert_allclose(np.load(out), np.diag(np.cos(X)), rtol=1e-6)
    assert "wrote" in capsys.readouterr().err


def test_call_one_argnum_in_a_tuple_streams_to_npy(url: str, x_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # "--argnums 1," is jacrev's argnums=(1,): one array, so it streams to a .npy like "1"
    # does (it was refused: "several Jacobians (tuple --argnums) need --out FILE.npz").
    hessian = np.zeros((5, 5, 5), np.float32)  # d2(x_i + y_i**2)/dy_j dy_k = 2 where i = j = k
    hessian[np.arange(5), np.arange(5), np.arange(5)] = 2
    for method, expected in (("jacobian", np.diag(2 * X)), ("hessian", hessian)):
        out = tmp_path / f"{method}.npy"
        assert call_main(["add_square", "--url", url, "-i", str(x_file), "-i", str(x_file), "--method", method,
                          "--argnums", "1,", "--out", str(out)]) == 0
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-6)
        assert f"wrote {out}: float32 {expected.shape}" in capsys.readouterr().err
    assert call_main(["add_square", "--url", url, "-i", str(x_file), "-i", str(x_file),
                      "--argnums", "0,1", "--out", str(tmp_path / "J.npy")]) == 2
    assert "several Jacobians (tuple --argnums) need --out FILE.npz" in capsys.readouterr().err


def test_call_tuple_argnums_to_npz_and_json_stdout(url: str, x_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "J.npz"
    args = ["add_square", "--url", url, "-i", str(x_file), "-i", str(x_file), "--argnums", "0,1"]
    assert call_main([*args, "--out", str(out)]) == 0
    with np.load(out) as z:
        np.testing.assert_allclose(z["jacobian/1"], np.diag(2 * X), rtol=1e-6)
    capsys.readouterr()
    assert call_main(["sin", "--url", url, "-i", str(x_file), "--method", "evaluate"]) == 0
    doc = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(doc["data"], np.sin(X), rtol=1e-6)
    assert call_main(["softmax", "--url", url, "-i", str(x_file), "--rows", "1:3"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [2, 5]


def test_call_errors(url: str, x_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert call_main(["nope", "--url", url, "-i", str(x_file)]) == 1
    assert "FunctionNotFound" in capsys.readouterr().err
    with dead_port() as port:  # (nothing answers there, for the call's whole time)
        assert call_main(["sin", "--url", f"http://127.0.0.1:{port}", "-i", str(x_file)]) == 1
    assert call_main(["sin", "--url", url, "-i", str(tmp_path / "missing.npy")]) == 2
    assert call_main(["sin", "--bogus"]) == 2
    assert call_main(["--help"]) == 0
    # A result of several arrays (aux, several outputs) cannot stream to one .npy: said in
    # the command's terms (it was the server's 406, "ask for application/x-npz").
    capsys.readouterr()
    for function in ("sin_aux", "polar"):
        inputs = ["-i", str(x_file)] * (2 if function == "polar" else 1)
        assert call_main([function, "--url", url, *inputs, "--out", str(tmp_path / "J.npy")]) == 2
        assert f"error: {function}'s result is more than one array (several outputs, or aux): use --out FILE.npz" \
            in capsys.readouterr().err
        assert call_main([function, "--url", url, *inputs, "--out", str(tmp_path / "J.npz")]) == 0
