"""PyTorch's own torch.func test cases, round 17, replayed over HTTP against
tests/parity17_functions.py and compared with in-process torch.func (values, shapes,
dtypes; torch's error where torch raises).

1. test_eager_transforms.py's TestAutogradFunction cases with a ``jvp`` staticmethod
   (``hessian`` / ``jacfwd(jacrev)`` of a custom Function), where the Function's jvp and
   backward disagree: torch.func.hessian differentiates the backward in forward mode,
   through the jvp; reverse over reverse the backward alone. Every route (dense, sparse,
   every chunk size, probed or traced) answers torch.func.hessian's, or, where that
   cannot run (no vmap rule), its error.

One in-process app serves the module (no server start), as rounds 7-16.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest
import torch
from jacobian_client import wire

from . import parity17_functions as F
from .conftest import assert_problem, ready_app
from .test_parity_round7 import same, t


@pytest.fixture(scope="module")
def c() -> Iterator[Any]:
    with ready_app("tests.parity17_functions") as client:
        yield client


def f64(a: np.ndarray) -> dict[str, Any]:
    return {"dtype": "float64", "shape": list(a.shape), "data": a.tolist()}


def _hessian(c: Any, name: str, x: np.ndarray, **options: Any) -> Any:
    r = c.post(f"/v1/functions/{name}/hessian", json={"inputs": [f64(x)], **options})
    if r.status_code != 200:
        return r
    h = r.json()["hessian"]
    return wire.decode_sparse_json(h).toarray() if "format" in h else wire.decode_tree(h)


# Every route a Hessian takes: dense (measured strategies, or a row at a time), sparse
# (traced: the products; probed: the dense fallback), each vmapped and one seed a chunk
ROUTES = ({}, {"chunk_size": 1}, {"sparsity": "auto"}, {"sparsity": "auto", "chunk_size": 1})


def test_a_hessian_through_a_function_whose_jvp_and_backward_disagree_is_torchs_or_its_error(c):
    """sum(cube(x) roll(x)), cube a Function whose jvp (2 a t) disagrees with its backward
    (3 a^2 g): torch.func.hessian's cross terms follow the jvp (not symmetric), reverse
    over reverse's the backward, 4.5 apart.

    - With a vmap rule, every route answers torch.func.hessian's (it did before).
    - Without one, torch.func.hessian raises ('You tried to vmap over ...'). The dense
      /hessian answered jacrev(grad)'s with a 200 (reverse over reverse, which agrees
      with differences of jacrev, and not with the HVP it was checked against), the
      traced sparse one the looped forward-over-reverse products' (200, 4.5 from the
      dense), the probed one either, by which pattern the probe found (n = 5: reverse
      over reverse, 200; n = 12: forward over reverse). Each is now torch's error, with
      a word on why (500 function_error, as a @once_differentiable backward's: round 13).
    - The same Function with a right jvp and no vmap rule is still answered, alike on
      every route: the looped forward-over-reverse Hessian, which reverse over reverse
      agrees with."""
    for n in (5, 12):
        x = np.linspace(0.6, 1.6, n)
        want = torch.func.hessian(F.wrong_jvp_energy)(t(x))
        assert not torch.allclose(want, want.T)  # the jvp's cross terms: not reverse over reverse
        for options in ROUTES:
            same(_hessian(c, "wrong_jvp_energy", x, **options), want)
        with pytest.raises(RuntimeError, match="vmap over") as caught:
            torch.func.hessian(F.wrong_jvp_energy_no_vmap)(t(x))
        error = f"RuntimeError: {str(caught.value).splitlines()[0]}"
        for name in ("wrong_jvp_energy_no_vmap", "wrong_jvp_energy_no_vmap_probed"):
            for options in ROUTES:
                r = _hessian(c, name, x, **options)
                assert not isinstance(r, np.ndarray), (name, n, options, "a 200", r)
                doc = assert_problem(r, 500, "function_error")
                assert doc["detail"].startswith(error) and "jvp and backward disagree" in doc["detail"], (name, options, doc)
        g = torch.func.grad(F.cube_energy_no_vmap)
        loop = torch.stack([torch.func.jvp(g, (t(x),), (e,))[1] for e in torch.eye(n, dtype=torch.float64)], -1)
        for options in ROUTES:
            same(_hessian(c, "cube_energy_no_vmap", x, **options), loop)
