"""Complex inputs: what torch.func does with them, over HTTP.

An input declared ``complex64`` / ``complex128`` takes complex arrays (JSON ``[real,
imag]`` pairs, plain or in an array object, base64, ``.npy``, ``.npz``). Measured
in-process (torch 2.13), torch.func:

- evaluates, and ``vjp``, ``jvp``, ``vmap`` of them, answer (conjugate Wirtinger: the
  pullback of a real output's cotangent 1 is ``dL/dRe + i dL/dIm``);
- ``jvp`` of a real tangent for a complex input answers as for the complex tangent of
  imaginary part 0 (or trips an internal assert: the service casts it);
- ``grad`` of a real scalar answers, so ``hvp`` (``jvp(grad(f))``) and ``c . H t``
  (``jvp`` of a ``vjp``) do;
- ``jacrev`` / ``jacfwd`` refuse any complex argument, differentiated or not ("Expected
  all inputs to be real ... idx"), and ``hessian`` (jacfwd of jacrev) in jacfwd's words:
  the service's ``jacobian`` and ``hessian`` (every mode, batched, sparse, the sparsity
  query) are the request's 422 quoting them, member ``unsupported: complex_input``.

``floating`` stays real (SPEC: float16 ... float64): a complex array sent to it, or as a
real input's tangent, is refused as before. Before this, a complex input could not be
declared at all (``ValueError: unknown dtype``) nor sent (422 "inputs and tangents are
real").

One in-process app serves tests/complex1_functions.py.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import Input, create_app
from jacobian_service.settings import Settings

from . import complex1_functions as F
from .conftest import assert_problem, sdk_over

f = torch.func
Z = np.array([1.0 + 2.0j, -0.5 + 0.25j, 0.3 - 1.5j])
T = np.array([0.5 - 1.0j, 2.0 + 0.5j, -1.0 + 0.75j])
X = np.array([0.7, -1.2, 2.0])


@pytest.fixture(scope="module")
def c() -> Iterator[TestClient]:
    settings = Settings(warmup=False, functions="tests.complex1_functions")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        yield client


def t(a: np.ndarray, dtype: Any = torch.complex128) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).to(dtype)


def pairs(a: np.ndarray) -> list[Any]:
    """A complex array's numbers as the [real, imag] pairs JSON carries."""
    return np.stack([a.real, a.imag], -1).tolist()


def typed(a: np.ndarray, dtype: str = "complex128") -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(a.shape), "data": pairs(a)}


def answer(r: Any, key: str) -> Any:
    assert r.status_code == 200, r.text
    return wire.decode_tree(r.json()[key], limits=wire.Limits(complex=True))


def close(got: Any, want: torch.Tensor, rtol: float = 1e-12) -> None:
    want_np = want.detach().resolve_conj().numpy()  # (torch may answer lazily conjugated: test_conj_bit)
    assert np.asarray(got).dtype == want_np.dtype, (np.asarray(got).dtype, want_np.dtype)
    np.testing.assert_allclose(got, want_np, rtol=rtol, atol=rtol)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def npz(**members: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


# --------------------------------------------------------------------------- declaring


def test_complex_dtypes_are_declared_and_described(c):
    assert Input("z", dtype="complex64").dtype == "complex64"
    with pytest.raises(ValueError, match=r"unknown dtype 'complex'; expected 'floating' or one of \[.*'complex128'"):
        Input("z", dtype="complex")
    doc = c.get("/v1/functions/abs2").json()
    assert doc["inputs"] == [{"name": "z", "shape": ["n"], "dtype": "complex128"}]
    # the OpenAPI example for it is pairs (a real tangent for jvp), none for jacobian
    spec = c.get("/openapi.json").json()
    examples = {path: op["post"]["requestBody"]["content"]["application/json"].get("examples", {})
                for path, op in spec["paths"].items() if "post" in op and "requestBody" in op["post"]}
    jvp = examples["/v1/functions/{name}/jvp"]["abs2"]["value"]
    evaluate = examples["/v1/functions/{name}/evaluate"]["abs2"]["value"]
    assert c.post("/v1/functions/abs2/evaluate", json=evaluate).status_code == 200
    assert c.post("/v1/functions/abs2/jvp", json=jvp).status_code == 200
    assert "abs2" not in examples["/v1/functions/{name}/jacobian"]
    assert "abs2" not in examples["/v1/functions/{name}/hessian"]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_reads_complex_inputs_in_every_form(c):
    want = F.csquare(t(Z))
    forms = [
        {"json": {"inputs": [pairs(Z)]}},  # plain lists: the declared dtype's pairs
        {"json": {"inputs": {"z": typed(Z)}}},
        {"json": {"inputs": [{"dtype": "complex128", "shape": [3],
                              "base64": base64.b64encode(Z.astype("<c16").tobytes()).decode()}]}},
        {"content": npy(Z), "headers": {"content-type": wire.NPY}},
        {"content": npz(z=Z), "headers": {"content-type": wire.NPZ}},
    ]
    for form in forms:
        close(answer(c.post("/v1/functions/csquare/evaluate", **form), "output"), want)
    # complex64 sent to a complex128 input is cast (same_kind), as a float64 one to float32
    close(answer(c.post("/v1/functions/csquare/evaluate", json={"inputs": [typed(Z, "complex64")]}), "output"),
          F.csquare(t(Z, torch.complex64).to(torch.complex128)))
    # a real array for a complex input: cast, imaginary part 0
    r = c.post("/v1/functions/csquare/evaluate", json={"inputs": [{"dtype": "float64", "shape": [3],
                                                                   "data": X.tolist()}]})
    close(answer(r, "output"), F.csquare(t(X)))
    # batched (vmap)
    zs = np.stack([Z, T])
    r = c.post("/v1/functions/real_part_sq/evaluate", json={"inputs": [typed(zs, "complex64")], "batched": True})
    close(answer(r, "output"), f.vmap(F.real_part_sq)(t(zs, torch.complex64)), rtol=1e-6)


def test_a_bare_number_for_a_complex_input_is_no_pair(c):
    r = c.post("/v1/functions/csquare/evaluate", json={"inputs": [[1.0, 2.0, 3.0]]})
    body = assert_problem(r, 422, "invalid_input")
    assert body["detail"] == "input 'z': complex128 data holds each number as a [real, imag] pair", body


# --------------------------------------------------------------------------- refused as torch refuses


def _torch_refusal(fn: Any) -> str:
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("options", [{}, {"mode": "fwd"}, {"batched": True}, {"sparsity": "auto"}])
def test_jacobian_of_a_complex_input_is_jacrevs_refusal(c, options):
    """TestJac.test_complex_error (C -> C): jacrev and jacfwd each raise "Expected all
    inputs" in their own name; mode=fwd quotes jacfwd."""
    fwd = options.get("mode") == "fwd"
    said = _torch_refusal(lambda: (f.jacfwd if fwd else f.jacrev)(F.abs2)(t(Z)))
    name = "jacfwd" if fwd else "jacrev"
    assert said == f"{name}: Expected all inputs to be real but received complex tensor at flattened input idx: 0"
    z = pairs(np.stack([Z, Z])) if options.get("batched") else pairs(Z)
    body = assert_problem(c.post("/v1/functions/abs2/jacobian", json={"inputs": [z], **options}), 422, "invalid_input")
    assert body["detail"] == (f"input 'z' is complex128: torch.func has no jacobian of a function of complex inputs "
                              f"(torch.func.{name}: {said}); vjp, jvp and hvp differentiate it"), body
    assert body["unsupported"] == "complex_input"


def test_hessian_and_a_complex_input_not_differentiated_are_refused_in_torchs_words(c):
    # jacrev checks every argument: the real x differentiated beside a complex z (idx 0)
    said = _torch_refusal(lambda: f.jacrev(lambda z, x: F.mixed(z, x)[0], argnums=1)(t(Z), t(X, torch.float64)))
    assert said.endswith("flattened input idx: 0")
    r = c.post("/v1/functions/mixed/jacobian", json={"inputs": [pairs(Z), X.tolist()], "argnums": "x"})
    assert f"(torch.func.jacrev: {said})" in assert_problem(r, 422, "invalid_input")["detail"]
    said = _torch_refusal(lambda: f.hessian(F.abs2)(t(Z)))
    assert said.startswith("jacfwd: Expected all inputs to be real")
    body = assert_problem(c.post("/v1/functions/abs2/hessian", json={"inputs": [pairs(Z)]}), 422, "invalid_input")
    assert body["detail"].endswith(f"(torch.func.hessian: {said}); vjp, jvp and hvp differentiate it"), body
    # the pytree's complex leaf is flattened input 0, its real one 1
    r = c.post("/v1/functions/tree_fn/jacobian", json={"inputs": [{"z": pairs(Z), "x": X.tolist()}]})
    assert "input 'p.z' is complex128" in assert_problem(r, 422, "invalid_input")["detail"]
    # the sparsity query says so too (its pattern is of a Jacobian torch refuses)
    body = assert_problem(c.get("/v1/functions/abs2/sparsity?shapes=3"), 422, "invalid_input")
    assert body["detail"].startswith("input 'z' is complex128: torch.func has no jacobian"), body


# --------------------------------------------------------------------------- vjp


def _wirtinger_fd(fn: Any, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """A real scalar's gradient as torch.func gives it: dL/dRe + i dL/dIm, centred."""
    g = np.zeros_like(z)
    for k in range(z.size):
        e = np.zeros_like(z)
        e[k] = h
        g[k] = ((fn(z + e) - fn(z - e)) + 1j * (fn(z + 1j * e) - fn(z - 1j * e))) / (2 * h)
    return g


def test_vjp_of_a_real_output_is_torchs_conjugate_gradient(c):
    got = answer(c.post("/v1/functions/abs2/vjp", json={"inputs": [pairs(Z)], "cotangents": 1.0}), "vjp")
    close(got, f.vjp(F.abs2, t(Z))[1](torch.tensor(1.0, dtype=torch.float64))[0])
    np.testing.assert_allclose(got, _wirtinger_fd(lambda z: float(F.abs2(t(z))), Z), rtol=1e-6)
    # complex64, a real vector output, stacked cotangents (batched_vectors)
    w = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    r = c.post("/v1/functions/real_part_sq/vjp", json={"inputs": [typed(Z, "complex64")], "cotangents": w.tolist(),
                                                       "batched_vectors": True})
    pull = f.vjp(F.real_part_sq, t(Z, torch.complex64))[1]
    close(answer(r, "vjp"), f.vmap(pull)(torch.tensor(w, dtype=torch.float32))[0], rtol=1e-6)


def test_torchs_conj_bit_case_is_its_grad(c):
    """TestGradTransform.test_conj_bit: grad(foo)(1+1j) == sgn(x), the vjp of cotangent 1
    (a 0-d complex input sent as one [real, imag] pair)."""
    x = torch.tensor(1 + 1j)
    want = f.grad(F.conj_abs)(x)
    torch.testing.assert_close(want, torch.sgn(x))
    close(answer(c.post("/v1/functions/conj_abs/vjp", json={"inputs": [[1, 1]], "cotangents": 1.0}), "vjp"), want,
          rtol=1e-6)


def test_vjp_of_a_complex_output_takes_complex_cotangents(c):
    r = c.post("/v1/functions/csquare/vjp", content=npz(z=Z, cotangents=T), headers={"content-type": wire.NPZ})
    close(answer(r, "vjp"), f.vjp(F.csquare, t(Z))[1](t(T))[0])
    # real cotangents of the complex output: torch's refusal, as for a real input's
    r = c.post("/v1/functions/csquare/vjp", json={"inputs": [pairs(Z)], "cotangents": [1.0, 1.0, 1.0]})
    assert "torch.func.vjp: For complex Tensors" in assert_problem(r, 422, "invalid_input")["detail"]


def test_vjp_of_a_complex_and_a_real_input_with_aux(c):
    r = c.post("/v1/functions/mixed/vjp", json={"inputs": [pairs(Z), X.tolist()], "cotangents": 2.0,
                                                "argnums": [0, 1]})
    assert r.status_code == 200, r.text
    out, pull, aux = f.vjp(lambda z, x: F.mixed(z, x), t(Z), t(X, torch.float64), has_aux=True)
    gz, gx = pull(torch.tensor(2.0, dtype=torch.float64))
    got = answer(r, "vjp")
    close(got[0], gz)
    close(got[1], gx)
    close(answer(r, "aux"), aux)
    # a pytree of a complex and a real leaf
    r = c.post("/v1/functions/tree_fn/vjp", json={"inputs": [{"z": pairs(Z), "x": X.tolist()}], "cotangents": 1.0})
    p = {"z": t(Z), "x": t(X, torch.float64)}
    want = f.vjp(F.tree_fn, p)[1](torch.tensor(1.0, dtype=torch.float64))[0]
    got = answer(r, "vjp")
    close(got["z"], want["z"])
    close(got["x"], want["x"])


# --------------------------------------------------------------------------- jvp, hvp


def test_jvp_of_complex_and_real_tangents(c):
    r = c.post("/v1/functions/csquare/jvp", json={"inputs": [pairs(Z)], "tangents": typed(T)})
    want = f.jvp(F.csquare, (t(Z),), (t(T),))[1]
    close(answer(r, "jvp"), want)
    h = 1e-6
    np.testing.assert_allclose(answer(r, "jvp"), (Z + h * T) ** 2 / (2 * h) - (Z - h * T) ** 2 / (2 * h), rtol=1e-6)
    # a real tangent (plain numbers) of a complex input: cast, as torch's complex one of imaginary part 0
    r = c.post("/v1/functions/abs2/jvp", json={"inputs": [pairs(Z)], "tangents": X.tolist()})
    close(answer(r, "jvp"), f.jvp(F.abs2, (t(Z),), (t(X),))[1])
    # stacked tangents (vmap of jvp), complex64, from an .npz
    z, ts = Z.astype(np.complex64), np.stack([T, Z, 1j * T]).astype(np.complex64)
    r = c.post("/v1/functions/real_part_sq/jvp?batched_vectors=true", content=npz(z=z, tangents=ts),
               headers={"content-type": wire.NPZ})
    want = f.vmap(lambda v: f.jvp(F.real_part_sq, (t(z, torch.complex64),), (v,))[1])(t(ts, torch.complex64))
    close(answer(r, "jvp"), want, rtol=1e-6)


def test_a_complex_tangent_of_a_real_input_is_refused(c):
    """torch.func.jvp would cast it to the real input's dtype, dropping its imaginary part
    with a warning alone; the service refuses it, as a complex output's real cotangent."""
    r = c.post("/v1/functions/mixed/jvp", json={"inputs": [pairs(Z), X.tolist()], "argnums": [0, 1],
                                                "tangents": [typed(T), typed(T)]})
    body = assert_problem(r, 422, "invalid_input")
    assert body["detail"] == ("tangents[1]: expected real tangents for the float64 input, got complex128 "
                              "(torch.func.jvp would drop its imaginary part: Casting complex values to real "
                              "discards the imaginary part); only an input declared complex64 or complex128 "
                              "takes complex tangents"), body
    # a function of real inputs only: the reader's refusal, as before
    r = c.post("/v1/functions/real_sin/jvp", json={"inputs": [X.tolist()], "tangents": typed(T)})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith(
        "tangents: unsupported dtype complex128 here: inputs and tangents are real unless the function declares")


def test_hvp_is_torchs_jvp_of_grad_and_c_h_t(c):
    r = c.post("/v1/functions/abs2/hvp", json={"inputs": [pairs(Z)], "tangents": typed(T)})
    close(answer(r, "hvp"), f.jvp(f.grad(F.abs2), (t(Z),), (t(T),))[1])
    ts = np.stack([T, Z, 1j * T])  # stacked (vmap over the tangents)
    r = c.post("/v1/functions/abs2/hvp", json={"inputs": [pairs(Z)], "tangents": typed(ts), "batched_vectors": True})
    close(answer(r, "hvp"), f.vmap(lambda v: f.jvp(f.grad(F.abs2), (t(Z),), (v,))[1])(t(ts)))
    # c . H t of a complex output, complex cotangents, from an .npz
    r = c.post("/v1/functions/csquare/hvp", content=npz(z=Z, tangents=T, cotangents=X.astype(complex)),
               headers={"content-type": wire.NPZ})
    want = f.jvp(lambda p: f.vjp(F.csquare, p)[1](t(X))[0], (t(Z),), (t(T),))[1]
    close(answer(r, "hvp"), want)


# --------------------------------------------------------------------------- real inputs stay real


def test_a_complex_array_for_a_real_input_is_refused_in_every_format(c):
    words = "unsupported dtype complex128 here: inputs and tangents are real unless the function declares the input"
    r = c.post("/v1/functions/real_sin/evaluate", json={"inputs": [typed(Z)]})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith(f"input 'x': {words}")
    r = c.post("/v1/functions/real_sin/evaluate", content=npy(Z), headers={"content-type": wire.NPY})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith(f"input 'x': {words}")
    # the real leaf of a tree beside a complex one, and the real input beside a complex one
    r = c.post("/v1/functions/tree_fn/evaluate", content=npz(**{"p/z": Z, "p/x": Z}),
               headers={"content-type": wire.NPZ})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith(f"input 'p.x': {words}")
    r = c.post("/v1/functions/mixed/evaluate", content=npz(z=Z, x=Z), headers={"content-type": wire.NPZ})
    assert assert_problem(r, 422, "invalid_input")["detail"].startswith(f"member 'x.npy': {words}")


# --------------------------------------------------------------------------- SDK


@pytest.mark.parametrize("transport", ["binary", "json"])
def test_the_sdk_sends_complex_inputs(c, transport):
    with sdk_over(c) as sdk:
        close(sdk.evaluate("csquare", Z, transport=transport), F.csquare(t(Z)))
        close(sdk.vjp("csquare", Z, cotangents=T, transport=transport), f.vjp(F.csquare, t(Z))[1](t(T))[0])
        close(sdk.jvp("abs2", Z, tangents=T, transport=transport), f.jvp(F.abs2, (t(Z),), (t(T),))[1])
        close(sdk.hvp("abs2", Z, tangents=T, transport=transport), f.jvp(f.grad(F.abs2), (t(Z),), (t(T),))[1])
        from jacobian_client import InvalidInput

        with pytest.raises(InvalidInput, match="torch.func has no jacobian"):
            sdk.jacobian("abs2", Z, transport=transport)


def test_the_torch_adapter_differentiates_complex_inputs_as_torch_does(c):
    """remote(client, f) of a complex input: backward and forward mode took only floating
    inputs (a complex one's grad was None, torch.func.vjp's wrong, jvp torch's internal
    assert), and per-example or second derivatives went by the batched Jacobian or
    Hessian, which the service refuses as torch does; now from vjp / jvp / hvp, example
    by example where batched."""
    from jacobian_client.torch import remote

    z, zs, two = t(Z), t(np.stack([Z, 2 * T])), torch.tensor(2.0, dtype=torch.float64)
    with sdk_over(c) as sdk:
        cases = [
            ("abs2", lambda h: f.grad(h)(z)),
            ("abs2", lambda h: f.jvp(h, (z,), (t(T),))[1]),
            ("abs2", lambda h: f.vmap(f.grad(h))(zs)),
            ("abs2", lambda h: f.vmap(lambda v: f.jvp(h, (v,), (v,))[1])(zs)),
            ("abs2", lambda h: f.jvp(f.grad(h), (z,), (t(T),))[1]),
            ("abs2", lambda h: f.vmap(lambda v: f.jvp(f.grad(h), (v,), (v,))[1])(zs)),
            ("abs2", lambda h: f.jvp(lambda v: f.vjp(h, v)[1](two)[0], (z,), (t(T),))[1]),
            ("csquare", lambda h: f.vjp(h, z)[1](t(T))[0]),
            ("csquare", lambda h: f.jvp(lambda v: f.vjp(h, v)[1](t(T))[0], (z,), (z,))[1]),
        ]
        for name, case in cases:
            close(case(remote(sdk, name)), case(getattr(F, name)), rtol=1e-10)
        leaf = z.clone().requires_grad_()
        F.abs2(leaf).backward()
        sent = z.clone().requires_grad_()
        remote(sdk, "abs2")(sent).backward()
        close(sent.grad, leaf.grad)


def test_the_jax_adapter_differentiates_complex_inputs_as_jax_does(c):
    """jax's remote of a complex input: its tangents were taken for zeros (only floating
    inputs differentiated), so jax.grad / jvp / vjp answered 0 silently. JAX's pullback is
    torch's conjugated (the transpose under Re(a . b), torch's adjoint under
    Re(conj(a) . b)): jax.grad(|z|^2) is 2 conj(z), where the service answers 2 z."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from jacobian_client.jax import remote

    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        z, v = jnp.asarray(Z), jnp.asarray(T)
        local = {"abs2": lambda q: (jnp.abs(q) ** 2).sum(), "csquare": lambda q: q**2}
        cases = [
            ("abs2", lambda h: jax.grad(h)(z)),
            ("abs2", lambda h: jax.jvp(h, (z,), (v,))[1]),
            ("abs2", lambda h: jax.vmap(jax.grad(h))(jnp.stack([z, v]))),
            ("abs2", lambda h: jax.jvp(jax.grad(h), (z,), (v,))[1]),
            ("abs2", lambda h: jax.grad(lambda q: jnp.abs(jax.grad(h)(q)).sum())(z)),
            ("csquare", lambda h: jax.vjp(h, z)[1](v)[0]),
            ("csquare", lambda h: jax.jvp(h, (z,), (v,))[1]),
        ]
        with sdk_over(c) as sdk:
            for name, case in cases:
                got, want = np.asarray(case(remote(sdk, name))), np.asarray(case(local[name]))
                assert got.dtype == want.dtype, name
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- engine processes


def test_a_real_server_hands_complex_arrays_to_its_engines_and_back():
    """The same numbers through ``serve``'s engine processes (the tests above run the
    in-process engine): small arrays in socket frames, large ones (16 KiB or more) in the
    front end's shared memory and the engine's sealed memfds, each way, many requests at
    once (a stacked batch of them)."""
    import concurrent.futures

    import httpx

    from .conftest import live_server

    with live_server(functions="tests.complex1_functions", warmup="false") as (url, _):
        def one(i: int) -> None:
            rng = np.random.default_rng(i)  # (one a thread: a Generator is not thread-safe)
            n = 3 if i % 2 else 4096  # 4096 complex128: 64 KiB each way
            z = rng.standard_normal(n) + 1j * rng.standard_normal(n)
            w = rng.standard_normal(n) + 1j * rng.standard_normal(n)
            r = httpx.post(f"{url}/v1/functions/csquare/vjp", content=npz(z=z, cotangents=w),
                           headers={"content-type": wire.NPZ, "accept": wire.NPY}, timeout=60)
            assert r.status_code == 200, r.text
            want = f.vjp(F.csquare, t(z))[1](t(w))[0]
            close(np.load(io.BytesIO(r.content)), want)
            r = httpx.post(f"{url}/v1/functions/abs2/vjp", json={"inputs": [pairs(z)], "cotangents": 1.0}, timeout=60)
            close(answer(r, "vjp"), f.vjp(F.abs2, t(z))[1](torch.tensor(1.0, dtype=torch.float64))[0])
            r = httpx.post(f"{url}/v1/functions/abs2/jacobian", content=npy(z),
                           headers={"content-type": wire.NPY}, timeout=60)
            assert r.status_code == 422 and r.json()["unsupported"] == "complex_input", r.text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(16)))
