"""A function registered from a user module is served like a built-in."""

from __future__ import annotations

import numpy as np
import torch

from jacobian_client import wire

from .conftest import DEFAULT_DEVICES, assert_tree_close, decode
from .user_functions import branchy, dict_out, scaled_norm


def test_listed_with_its_description(client):
    names = {f["name"] for f in client.get("/v1/functions").json()}
    assert {"scaled_norm", "branchy", "sin", "mlp"} <= names
    desc = client.get("/v1/functions/scaled_norm").json()
    assert desc == {
        "name": "scaled_norm",
        "description": "Row norms of x times scale, with mixed aux.",
        "inputs": [
            {"name": "x", "shape": ["n", 3], "dtype": "floating"},
            {"name": "scale", "shape": [], "dtype": "float64"},
            {"name": "power", "shape": [], "dtype": "int64"},
        ],
        "has_aux": True,
    }


def test_mixed_aux_json_and_npz(client):
    x = np.random.default_rng(0).standard_normal((4, 3))
    body = {"inputs": {"x": wire.encode_tree(x), "scale": 2.0, "power": 2}, "argnums": ["x", "scale"]}
    got, doc = decode(client.post("/v1/functions/scaled_norm/jacobian", content=wire.dumps(body)))
    tensors = (torch.from_numpy(x), torch.tensor(2.0, dtype=torch.float64), torch.tensor(2))
    # torch.func.jacrev itself refuses non-tensor aux ("Expected tensors"); the service
    # keeps it beside the transform, so compare with the output's Jacobian and the aux.
    want = torch.func.jacrev(lambda x, s: scaled_norm(x, s, tensors[2])[0], argnums=(0, 1))(*tensors[:2])
    aux = scaled_norm(*tensors)[1]
    assert_tree_close(got, want)
    assert doc["aux"]["label"] == "norms" and doc["aux"]["sizes"] == [4, 3]
    np.testing.assert_allclose(doc["aux"]["total"]["data"], aux["total"].item())

    import io

    buf = io.BytesIO()
    np.savez(buf, x=x, scale=np.float64(2.0), power=np.int64(2))
    response = client.post("/v1/functions/scaled_norm/jacobian?argnums=x,scale", content=buf.getvalue(), headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    got, doc = decode(response)
    assert_tree_close(got, want)
    assert doc["aux"]["label"] == "norms" and doc["aux"]["sizes"] == (4, 3)
    np.testing.assert_allclose(doc["aux"]["total"], aux["total"].item())


def test_vmap_failure_falls_back_to_loops(client):
    """branchy calls .item(): batched (vmap of f) falls back to a loop over examples."""
    xs = np.array([[1.0, 2.0], [-3.0, 1.0], [0.5, 0.5]])
    got, _ = decode(client.post("/v1/functions/branchy/jacobian", content=wire.dumps({"inputs": [wire.encode_tree(xs)], "batched": True})))
    want = np.stack([torch.func.jacrev(branchy)(torch.from_numpy(x)).numpy() for x in xs])
    np.testing.assert_allclose(got, want)
    for chunk in (None, 1, 2):
        got, _ = decode(client.post("/v1/functions/branchy/jacobian", json={"inputs": [[1.0, 2.0]], "chunk_size": chunk, "mode": "auto"}))
        np.testing.assert_allclose(got, torch.func.jacrev(branchy)(torch.tensor([1.0, 2.0])).numpy())
    got, _ = decode(client.post("/v1/functions/branchy/hessian", json={"inputs": [[1.0, 2.0]]}), "hessian")
    assert_tree_close(got, torch.func.hessian(branchy)(torch.tensor([1.0, 2.0])))


def test_dict_outputs_nest_like_jacrev(client):
    x = [1.0, 2.0, 3.0]
    got, _ = decode(client.post("/v1/functions/dict_out/jacobian", json={"inputs": [x]}))
    assert_tree_close(got, torch.func.jacrev(dict_out)(torch.tensor(x)))
    response = client.post("/v1/functions/dict_out/jacobian", json={"inputs": [x], "argnums": [0]}, headers={"accept": wire.NPZ})
    got, _ = decode(response)
    assert_tree_close(got, torch.func.jacrev(dict_out, argnums=(0,))(torch.tensor(x)))


def test_npz_response_readable_without_the_sdk(client):
    import io
    import json
    import zipfile

    body = {"inputs": {"x": [[1.0, 2.0, 2.0]], "scale": 1.0, "power": 1}, "argnums": ["x", "scale"]}
    response = client.post("/v1/functions/scaled_norm/jacobian", json=body, headers={"accept": wire.NPZ})
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert set(archive.namelist()) == {"jacobian/0.npy", "jacobian/1.npy", "aux/total.npy", "meta.json"}
    meta = json.loads(archive.read("meta.json"))
    assert meta["device"] == DEFAULT_DEVICES[0] and meta["function"] == "scaled_norm" and "chunk_size" in meta
    assert meta["aux"] == {"total": {"$npy": "aux/total.npy"}, "label": "norms", "sizes": [1, 3]}
    arrays = np.load(io.BytesIO(response.content))
    np.testing.assert_allclose(arrays["jacobian/0"], [[[1 / 3, 2 / 3, 2 / 3]]])
    np.testing.assert_allclose(arrays["aux/total"], 3.0)
