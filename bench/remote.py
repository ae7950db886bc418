"""What a remote function costs inside the caller's own autodiff (issue 12): each
operation through the service's ``planar_arm`` next to the same operation fully local,
interleaved, medians.

* a torch training step (forward, ``backward``, ``SGD.step``) whose loss passes through
  ``jacobian_client.torch.remote`` vs the same model with the arm in-process;
* ``jax.jit(jax.grad(loss))`` through ``jacobian_client.jax.remote`` vs a jnp arm (skipped,
  with a note, when jax is not installed);
* ``scipy.optimize.least_squares`` on inverse kinematics with ``remote_objective``'s
  ``fun``/``jac`` vs local callables (torch value and ``jacrev``): one whole solve.

For each: the medians, the overhead per operation (remote minus local), the requests per
operation (counted by an httpx event hook on the SDK client, over every timed call) and
the overhead per request, and the ratio. The remote results are checked against the local
ones (the same losses after training side by side, the same gradient, the same solution in
the same number of evaluations); a mismatch fails the benchmark.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ._common import Context, Report, interleaved, median, ms

TITLE = "remote: remote functions inside torch, jax and scipy vs fully local"
FEATURES = [0.5, -1.0, 0.25, 2.0]
TARGET = [1.5, 1.2]  # torch / jax training target
SOLVE_TARGET = np.array([1.2, 1.5])  # least_squares (inverse kinematics)
Q0 = np.array([0.1, 0.2, 0.3])


class Counter:
    """Requests the SDK client sends, by endpoint (an httpx request hook)."""

    def __init__(self, client: Any) -> None:
        self.requests: list[str] = []
        client._http.event_hooks["request"] = [self._record]

    def _record(self, request: Any) -> None:
        endpoint = request.url.path.rsplit("/", 1)[-1]
        body = request.content if request.headers.get("content-type") == "application/json" else b""
        if request.url.params.get("return_output") == "true" or b'"return_output":true' in body:
            endpoint += " with output"
        self.requests.append(endpoint)

    def take(self) -> list[str]:
        out, self.requests = self.requests, []
        return out


def _counted(fn: Callable[[], Any], calls: list[int]) -> Callable[[], Any]:
    def run() -> Any:
        calls[0] += 1
        return fn()

    return run


def _pair(report: Report, rows: list[list[Any]], label: str, local: Callable[[], Any], remote: Callable[[], Any],
          counter: Counter, rounds: int, per_round: int) -> None:
    """Time one operation local vs remote (interleaved) and add its row; requests per
    operation are the ones counted over every remote call, warm-up included."""
    calls = [0]
    counter.take()
    samples = interleaved({"local": local, "remote": _counted(remote, calls)}, rounds, per_round, warmup=1)
    requests = counter.take()
    loc, rem = median(samples["local"]), median(samples["remote"])
    per_op = len(requests) / calls[0]
    kinds = sorted(set(requests))
    mix = " + ".join(f"{requests.count(k) / calls[0]:g} {k}" for k in kinds)
    rows.append([label, ms(loc), ms(rem), ms(rem - loc), f"{per_op:g} ({mix})", ms((rem - loc) / per_op) if per_op else "-",
                 f"{rem / loc:.1f}x"])


# --------------------------------------------------------------------------- torch


def _reference_row(report: Report, rows: list[list[Any]], client: Any, counter: Counter, rounds: int,
                   per_round: int) -> None:
    """The floor under every row: one bare SDK request (``client.evaluate``) vs the same
    forward in-process."""
    from jacobian_service import examples as ex

    q = np.array([0.3, -0.2, 0.5])
    tq = torch.from_numpy(q)
    _pair(report, rows, "reference: planar_arm forward, client.evaluate", lambda: ex.planar_arm(tq),
          lambda: client.evaluate("planar_arm", q), counter, rounds, per_round)


def _torch_row(ctx: Context, report: Report, rows: list[list[Any]], client: Any, counter: Counter, rounds: int,
               per_round: int) -> None:
    from jacobian_client.torch import remote
    from jacobian_service import examples as ex

    def model(arm: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Callable[[], float], torch.nn.Module]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        features = torch.tensor(FEATURES, dtype=torch.float64)
        target = torch.tensor(TARGET, dtype=torch.float64)

        def step() -> float:
            opt.zero_grad()
            loss = ((arm(net(features)) - target) ** 2).sum()
            loss.backward()
            opt.step()
            return loss.item()

        return step, net

    local_step, local_net = model(ex.planar_arm)
    remote_step, remote_net = model(remote(client, "planar_arm"))
    _pair(report, rows, "torch training step (forward + backward + SGD)", local_step, remote_step, counter, rounds,
          per_round)
    # Both models took the same number of steps from the same start: they must agree.
    for a, b in zip(local_net.parameters(), remote_net.parameters()):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-9):
            report.fail("torch: the remotely trained parameters differ from the local ones")
            break


# --------------------------------------------------------------------------- jax


def _jax_row(ctx: Context, report: Report, rows: list[list[Any]], client: Any, counter: Counter, rounds: int,
             per_round: int) -> None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:
        report.add(f"- jax row skipped: jax is not installed ({exc}); `pip install \"jacobian-service[jax]\"`")
        return
    from jacobian_client.jax import remote

    x64_before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        def planar_arm(q: Any) -> Any:
            c = jnp.cumsum(q, axis=-1)
            return jnp.stack([jnp.cos(c).sum(-1), jnp.sin(c).sum(-1)], axis=-1)

        target = jnp.array(TARGET)

        def loss_of(arm: Callable[[Any], Any]) -> Callable[[Any], Any]:
            return lambda q: jnp.sum((arm(q) - target) ** 2)

        local = jax.jit(jax.grad(loss_of(planar_arm)))
        far = jax.jit(jax.grad(loss_of(remote(client, "planar_arm"))))
        q = jnp.array([0.3, -0.2, 0.5])
        if not np.allclose(np.asarray(far(q)), np.asarray(local(q)), rtol=1e-10, atol=1e-10):
            report.fail("jax: jit(grad) through the remote function differs from the local one")
        _pair(report, rows, "jax.jit(jax.grad(loss))", lambda: local(q).block_until_ready(),
              lambda: far(q).block_until_ready(), counter, rounds, per_round)
    finally:
        jax.config.update("jax_enable_x64", x64_before)


# --------------------------------------------------------------------------- scipy


def _scipy_row(ctx: Context, report: Report, rows: list[list[Any]], client: Any, counter: Counter, rounds: int,
               per_round: int) -> None:
    from scipy.optimize import least_squares

    from jacobian_client.scipy import remote_objective
    from jacobian_service import examples as ex

    def local_fun(q: np.ndarray) -> np.ndarray:
        return ex.planar_arm(torch.from_numpy(np.asarray(q, dtype=np.float64))).numpy() - SOLVE_TARGET

    def local_jac(q: np.ndarray) -> np.ndarray:
        return torch.func.jacrev(ex.planar_arm)(torch.from_numpy(np.asarray(q, dtype=np.float64))).numpy()

    def solve_local() -> Any:
        return least_squares(local_fun, Q0, jac=local_jac)

    def solve_remote() -> Any:
        arm = remote_objective(client, "planar_arm")  # fresh: no cached point from the last solve
        return least_squares(lambda q: arm.fun(q) - SOLVE_TARGET, Q0, jac=arm.jac)

    want, got = solve_local(), solve_remote()
    if not (np.allclose(got.x, want.x, rtol=1e-10, atol=1e-10) and (got.nfev, got.njev) == (want.nfev, want.njev)):
        report.fail(f"scipy: remote least_squares found {got.x} in {got.nfev}/{got.njev} evaluations, "
                    f"local {want.x} in {want.nfev}/{want.njev}")
    _pair(report, rows, f"scipy least_squares, one solve ({want.nfev} fun, {want.njev} jac)", solve_local,
          solve_remote, counter, rounds, per_round)


def run(ctx: Context) -> Report:
    from jacobian_client import Client

    report = Report(TITLE)
    report.add(f"## {TITLE}\n")
    rounds = ctx.opt("rounds", 5, 1)
    steps, solves = (20, 4) if not ctx.quick else (3, 1)
    service = ctx.pool.service(ctx.service_env)
    rows: list[list[Any]] = []
    with Client(service.url, timeout=60) as client:
        counter = Counter(client)
        _reference_row(report, rows, client, counter, rounds, steps)
        _torch_row(ctx, report, rows, client, counter, rounds, steps)
        _jax_row(ctx, report, rows, client, counter, rounds, steps)
        _scipy_row(ctx, report, rows, client, counter, rounds, solves)
    report.add(f"\nplanar_arm (3 angles -> 2), float64, on the service (`serve`, loopback, device cpu) vs in this "
               f"process; {rounds} rounds x {steps} steps / calls and {solves} solves per variant, interleaved; "
               "requests counted on the client over every timed remote call.\n")
    report.table(["operation", "local ms", "remote ms", "overhead ms / op", "requests / op", "overhead ms / request",
                  "remote / local"], rows)
    return report
