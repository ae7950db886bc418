"""``fun``, ``jac`` and ``hessp`` for :mod:`scipy.optimize` from a remote function (the
``scipy`` extra; this module itself needs only numpy).

::

    from scipy.optimize import least_squares, minimize
    from jacobian_client.scipy import remote_objective

    arm = remote_objective(client, "planar_arm")
    least_squares(lambda q: arm.fun(q) - target, q0, jac=arm.jac)

    rosen = remote_objective(client, "rosenbrock")
    minimize(rosen.fun, x0, jac=rosen.jac, hessp=rosen.hessp, method="trust-krylov")

Round trips: ``fun(x)`` asks for the value *and* the Jacobian (gradient, for a scalar
function) in one ``jacobian`` request with ``return_output=true`` and keeps both for that
``x``; ``jac(x)`` at the same ``x`` then costs nothing. So a solver that evaluates a
point and then differentiates it pays one request per point, not two. Solvers that
evaluate points they never differentiate (a rejected trust-region step) pay for a
Jacobian they do not use: pass ``prefetch=False`` to ask for the value alone there, and
the Jacobian only when ``jac`` is called (then one request each). Solvers that
differentiate few of the points they evaluate (stiff ODE solvers, ``solve_ivp``'s Radau,
BDF and LSODA, keep one Jacobian over many steps; MINPACK's ``hybrj`` updates its own) are
seen doing so: once 4 points were evaluated, a point's Jacobian is fetched with its value
only while at least 1 in 4 of the last 16 evaluated points had theirs asked for (a
Jacobian asked at a point evaluated without it costs its own request and counts too, so
prefetching comes back when the solver differentiates again). When a prefetched
Jacobian fails (the function raised while differentiated, or its Jacobian is too large or
too slow) ``fun(x)`` asks for the value alone, as a derivative-free solver (Nelder-Mead,
finite differences) needs, and where that answers the objective stops prefetching
(``prefetch`` becomes False); ``jac(x)`` still raises the service's error. ``fun_and_jac(x)``
(for ``minimize(..., jac=True)``) is always one request. ``hessp(x, p)`` is one ``hvp``
request (forward-over-reverse on the service) per call (a function without a forward-mode
rule: one ``hessian`` per point instead, see ``hessp``), ``hess(x)`` one ``hessian``
request (``x.size`` squared numbers: prefer ``hessp`` for large ``x``). A vector function
as a constraint (``NonlinearConstraint(c.fun, lb, ub, jac=c.jac, hess=c.constraint_hess)``
for ``trust-constr``): ``constraint_hess(x, v)``, the Hessian of ``v . c(x)``, is one
``hvp`` request.

``vectorized=True`` takes SciPy's vectorized ``x`` as well, ``k`` points as the columns
of an ``(n, k)`` array (``solve_ivp(vectorized=True)``, ``solve_bvp``,
``differential_evolution(vectorized=True)``): ``fun`` one batched ``evaluate``, ``jac``
one batched ``jacobian`` (``(m, n, k)``, ``solve_bvp``'s ``fun_jac``).

``sparsity="auto"`` (the pattern traced by the service) or the name of a pattern the
function declares makes ``jac`` and ``fun_and_jac`` return the Jacobian as a
``scipy.sparse`` CSR array, (output elements) x (input elements), computed from a few
compressed products, and ``hess`` the Hessian likewise: what ``least_squares(jac=)`` (its
``trf`` / ``dogbox`` methods with ``tr_solver="lsmr"``, chosen for a sparse Jacobian) and
``minimize(method="trust-constr", hess=)`` take (not MINPACK's ``root``, ``trust-exact``
or ``dogleg``, which factor dense matrices). A scalar function's gradient stays a dense
array, as ``minimize`` takes it. Without it the Jacobian is dense.

The inputs held fixed are the ``args`` given here, or SciPy's own ``args=`` when the
solver passes any (``minimize(f.fun, x0, args=(w,), jac=f.jac)``): every callable takes
them after its own arguments, as SciPy calls it.

Every call returns fresh arrays: a solver may write into what ``fun`` or ``jac`` gave it
(in-place scaling, say), and that must not change what the cache gives the next caller.
The cache is keyed by ``x`` and by the contents of ``args`` (the inputs held fixed), so
changing ``args`` between fits, in place or by rebinding, is seen. It holds the last two
points per thread (BDF's first Jacobian is at the point before its last evaluation): solves
running in threads (multi-start in a thread pool) may share an objective.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from ._arrays import Bfloat16, Plain
from ._errors import APIError, FunctionError, InvalidInput, OutOfMemory, ResultTooLarge, Timeout
from ._protocol import bind_inputs, input_leaves, input_tree
from ._remote import check_sync_client, lacks_forward_mode, no_forward_mode, with_hint
from .wire import is_sparse

__all__ = ["RemoteObjective", "remote_objective"]


def remote_objective(
    client: Any,
    name: str,
    *,
    args: Sequence[Any] | Mapping[str, Any] = (),
    argnum: int | str = 0,
    shape: tuple[int, ...] | None = None,
    prefetch: bool = True,
    sparsity: str | None = None,
    vectorized: bool = False,
    per_column: Sequence[int] = (),
) -> RemoteObjective:
    """SciPy callables for the remote function ``name`` as a function of one input.

    ``argnum`` says which of the function's inputs the optimizer's ``x`` is; ``args``
    are the other inputs in order, held fixed. Either may go by the names the function
    declares, as it is called in-process: ``argnum="x"``, ``args={"params": p}`` (the
    names asked once, here; a name it does not take, an input held twice or left out is a
    ``TypeError`` naming its inputs). ``shape`` reshapes the flat ``x`` SciPy
    works with into the input's shape (``jac`` is then flattened to match); without it, the
    input's declared shape where only one fits ``x`` (``()``, ``(2, 3)``, ``(n, 3)``), learned
    from the service's refusal of the flat one. An output of
    more than one dimension comes back flat from ``fun`` (C order), and ``jac`` is (output
    elements) x (``x.size``): SciPy's solvers take vectors and matrices only.
    ``sparsity`` (``"auto"`` or a declared pattern's name): sparse Jacobians and Hessians.
    ``vectorized=True``: ``fun`` and ``jac`` also take SciPy's vectorized ``x``, ``(n, k)``:
    ``k`` points as columns, one batched request (see ``RemoteObjective.fun``).
    ``per_column``: the positions (among the function's inputs) of inputs held beside ``x``
    that carry one value per column of a vectorized ``x``, on their last axis (``k`` long):
    ``solve_bvp``'s mesh for a time-dependent right-hand side, ``fun(x, y)`` as
    ``obj.fun(y, x)`` with ``argnum=1, per_column=(0,)``. They are mapped with the columns;
    a 0-d one (``solve_ivp``'s ``t``) is shared by them.
    """
    return RemoteObjective(client, name, args=args, argnum=argnum, shape=shape, prefetch=prefetch,
                           sparsity=sparsity, vectorized=vectorized, per_column=per_column)


def _by_name(client: Any, name: str, args: Sequence[Any] | Mapping[str, Any],
             argnum: int | str) -> tuple[tuple[Any, ...], int]:
    """``args`` and ``argnum`` by the function's declared names (one request, its
    description) as positions: ``argnum="y", args={"x": X}`` of ``f(x, y)`` is ``argnum=1,
    args=(X,)``. Checked as a call by name is: a name the function does not take, an input
    held in ``args`` that is also ``x``, one neither held nor ``x``."""
    names = tuple(i.name for i in client.function(name).inputs)
    label = f"remote_objective({name!r})"
    if isinstance(argnum, str):
        if argnum not in names:
            raise TypeError(f"{label}: argnum={argnum!r} names no input; its inputs are {', '.join(names)}")
        argnum = names.index(argnum)
    elif not -len(names) <= argnum < len(names):
        raise TypeError(f"{label}: argnum={argnum!r} is out of range for {len(names)} inputs ({', '.join(names)})")
    at = argnum % len(names)
    if not isinstance(args, Mapping):
        return tuple(args), at
    if names[at] in args:
        raise TypeError(f"{label}: input {names[at]!r} is x (argnum), and args holds it too")
    held = names[:at] + names[at + 1:]
    return bind_inputs(f"{label}'s args", held, (), {str(k): v for k, v in args.items()}), at


def _shaped(method: Any) -> Any:
    """A SciPy callable that, where the service refuses SciPy's flat ``x`` for its shape
    and says the shape it takes, sends it so from then on (``_learn_shape``)."""

    @functools.wraps(method)
    def call(self: RemoteObjective, x: Any, *rest: Any) -> Any:
        try:
            return method(self, x, *rest)
        except InvalidInput as exc:
            if not self._learn_shape(exc, x):
                if _stacked_points(self, exc, x):
                    raise with_hint(exc, f"remote_objective({self.name!r}) got an (n, k) x: SciPy's vectorized "
                                         "solvers (solve_ivp(vectorized=True), solve_bvp) pass k points as columns; "
                                         "make the objective with vectorized=True to send them as a batch") from None
                raise
        return method(self, x, *rest)

    return call


def _stacked_points(obj: RemoteObjective, exc: InvalidInput, x: Any) -> bool:
    """Whether ``exc`` refused, for its shape, a 2-D ``x`` that an objective without
    ``vectorized`` sent as one point (its refusal said only "got (3, 1)")."""
    expected = exc.problem.get("expected_shape")
    return (not obj.vectorized and np.ndim(x) == 2 and exc.problem.get("field") == "inputs"
            and exc.problem.get("got_shape") == list(np.shape(x)) and isinstance(expected, list) and len(expected) == 1)


class RemoteObjective:
    """``fun``, ``jac``, ``fun_and_jac`` and ``hessp`` of one remote function; see the
    module docstring for what each costs. ``client`` is a :class:`jacobian_client.Client`."""

    per_column: tuple[int, ...] = ()  # (an objective pickled before the option: none)

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        args: Sequence[Any] | Mapping[str, Any] = (),
        argnum: int | str = 0,
        shape: tuple[int, ...] | None = None,
        prefetch: bool = True,
        sparsity: str | None = None,
        vectorized: bool = False,
        per_column: Sequence[int] = (),
    ) -> None:
        check_sync_client(client)
        if isinstance(argnum, str) or isinstance(args, Mapping):
            args, argnum = _by_name(client, name, args, argnum)
        if isinstance(argnum, bool) or not isinstance(argnum, (int, np.integer)):
            # int("y") said "invalid literal for int() with base 10: 'y'"
            raise TypeError(f"remote_objective({name!r}): argnum is an input's position (an int) or name (a str), "
                            f"not {argnum!r}")
        if vectorized and sparsity is not None:
            raise ValueError("remote_objective: vectorized=True computes dense Jacobians (one per column); "
                             "pass sparsity= or vectorized=True, not both")
        per_column = tuple(per_column)
        if per_column and not vectorized:
            raise ValueError("remote_objective: per_column maps held inputs with the columns of a vectorized x; "
                             "pass vectorized=True with it")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in per_column):
            raise TypeError(f"remote_objective: per_column holds input positions (ints), not {per_column!r}")
        self.client = client
        self.name = name
        self.args = tuple(args)
        self.argnum = int(argnum)
        self.shape = None if shape is None else tuple(shape)
        self._declared: tuple[Any, ...] | None = None  # x's declared shape, learned where shape= is None
        self.prefetch = prefetch
        self.sparsity = sparsity
        self.vectorized = vectorized
        self.per_column = per_column
        self._last = threading.local()  # per thread: see _remember
        self._hvp_works = True  # False once an hvp failed where the Hessian answered (hessp)
        # the last evaluated points, each a one-item list set True when its Jacobian was
        # asked for: whether prefetching pays (_prefetch_pays)
        self._asked: collections.deque[list[bool]] = collections.deque(maxlen=_RECENT)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_last"]  # a thread-local cannot be pickled; a copy starts with no point cached
        state["_asked"] = list(self._asked)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        asked = state.pop("_asked", [])
        self.__dict__.update(state)
        self._last = threading.local()
        self._asked = collections.deque(asked, maxlen=_RECENT)

    # ----------------------------------------------------------------- helpers

    def _inputs(self, x: Any, args: tuple[Any, ...]) -> tuple[np.ndarray, list[Any]]:
        x = _real(x, "x")
        return x, self._placed(x.reshape(self._x_shape(x)), args)[0]

    def _placed(self, arr: Any, args: tuple[Any, ...]) -> tuple[list[Any], int]:
        """The function's inputs, ``arr`` at ``argnum`` among the ones held fixed, and its index."""
        inputs = list(self._held(args))
        # a negative argnum counts from the end, as the service reads it: list.insert(-1, x)
        # put x one before the last input, so the value was computed with x in another
        # place than the derivative was taken at, silently (out of range: the service's 422)
        position = max(self.argnum + len(inputs) + 1 if self.argnum < 0 else self.argnum, 0)
        inputs.insert(position, arr)
        return inputs, min(position, len(inputs) - 1)

    def _columns(self, x: Any, args: tuple[Any, ...], kind: str) -> np.ndarray:
        """``kind`` (evaluate or jacobian) at each column of SciPy's vectorized ``x``,
        ``(n, k)``, in one batched request: the points stacked first, the inputs held
        fixed sent once (``in_dims`` None), as ``vmap`` shares them. Returns the per-point
        results stacked first, each flat (``(k, m)``; ``(k, m, n)`` for a Jacobian, or
        ``(k,)`` / ``(k, n)`` for a scalar function).

        Without it, a vectorized solve (``solve_ivp(..., vectorized=True)``, whose every
        call is ``fun(t, y[:, None])``, ``solve_bvp``, which always passes ``(n, m)``)
        sent the stack as one point: the service's 422 ("expected shape (3,), got (3, 1)"),
        where the same function in-process, written for columns, runs."""
        cols = _real(x, "x")
        n, k = cols.shape
        point = self._x_shape(cols[:, 0]) if k else (n,)
        inputs, at = self._placed(np.ascontiguousarray(cols.T).reshape((k, *point)), args)
        in_dims = [0 if i == at else None for i in range(len(inputs))]
        mapped: dict[int, int] = {}
        for i in self.per_column:
            # solve_bvp's mesh beside y: one value per column, mapped with them. Held shared
            # (in_dims None), the (m,) mesh was refused for a per-point t of shape (); a
            # time-dependent fun(x, y) could not be served
            j = i + len(inputs) if i < 0 else i
            if not 0 <= j < len(inputs) or j == at:
                raise ValueError(f"remote_objective({self.name!r}): per_column={self.per_column!r} names input {i}, "
                                 f"which is {'x itself' if j == at else 'no input'} ({len(inputs)} inputs, x at {at})")
            if j in mapped:
                # (1, 1) or (1, -1) of two inputs: the input was moved a second time, its
                # columns' axis put back where it was; a square (k, k) input so went with
                # each column's row in place of its column, silently
                raise ValueError(f"remote_objective({self.name!r}): per_column={self.per_column!r} names input {j} "
                                 f"twice ({mapped[j]} and {i})")
            mapped[j] = i
            held = np.asarray(inputs[j])
            if held.ndim == 0:  # solve_ivp's t: one for every column
                continue
            if held.shape[-1] != k:
                raise ValueError(f"remote_objective({self.name!r}): input {j} (per_column) has shape {held.shape}; "
                                 f"its last axis is one value per column of x, {k} of them")
            inputs[j], in_dims[j] = np.ascontiguousarray(np.moveaxis(held, -1, 0)), 0
        options: dict[str, Any] = {"batched": True, "in_dims": tuple(in_dims)}
        if kind == "jacobian":
            options["argnums"] = self.argnum
        try:
            parts = self.client._parts(kind, self.name, inputs, options)
        except InvalidInput as exc:
            got, expected = exc.problem.get("got_shape"), exc.problem.get("expected_shape")
            if (exc.problem.get("field") == "inputs" and isinstance(got, list) and got and got[-1] == k
                    and isinstance(expected, list) and "B" not in expected):  # a shared input, one value per column
                raise with_hint(exc, f"remote_objective({self.name!r}) holds input {exc.problem.get('path')!r} "
                                     f"shared by the {k} columns of x; where it holds one value per column "
                                     "(solve_bvp's mesh for a time-dependent fun(x, y)), pass per_column=(its "
                                     "position,) to map it with them") from None
            raise
        out = np.asarray(self._one_array(parts["value"]))
        if kind == "evaluate":
            return out.reshape(k) if out.ndim == 1 else out.reshape(k, -1)
        scalar = out.ndim == 1 + len(point)  # (k, *point): a gradient per column
        return out.reshape(k, n) if scalar else out.reshape(k, -1, n)

    def _held(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The inputs held fixed: SciPy's ``args=`` (passed to every callable) when the
        solver gives any, else the ``args`` this objective was made with."""
        return args if args else self.args

    def _key_of(self, x: np.ndarray, args: tuple[Any, ...]) -> bytes:
        """What the cached value and Jacobian were computed from: ``x`` and the inputs held
        fixed, by content (a caller may change ``args`` between fits, in place or by
        rebinding: the cache answered the old ones' value, silently). Each leaf as it is
        sent (``input_tree``: bfloat16 as its words, lazy neg/conj views resolved, a tuple
        parameter or another mapping a tree, by path): a tuple parameter was one leaf here,
        ``np.asarray`` of it a ValueError for ragged leaves ({"c": (0.7, c1)}), and a
        mapping's key its ``repr``, which numpy and torch cut short past 1000 elements (an
        element changed in place in the middle of a large one, unseen)."""
        digest = hashlib.blake2b(digest_size=20)
        held = input_leaves([input_tree(a) for a in self._held(args)], "")
        for path, leaf in [("x", x), *held]:  # pytree inputs: by path
            if isinstance(leaf, (Bfloat16, Plain)):
                leaf = leaf.words if isinstance(leaf, Bfloat16) else leaf.value  # numbers: by their repr below
            # np.array, not np.ascontiguousarray, which makes a 0-d array (1,): the point
            # x = 0.5 was then x = [0.5]'s, and its Jacobian came back in the other's shape
            arr = np.array(leaf, order="C")
            digest.update(f"{path}:{arr.dtype.str}{arr.shape};".encode())
            digest.update(arr.tobytes() if arr.dtype != object else repr(leaf).encode())
        return digest.digest()

    def _points(self) -> collections.OrderedDict[bytes, tuple[Any, Any, list[bool]]]:
        """This thread's last points, oldest first: key -> (value, Jacobian, asked)."""
        points = getattr(self._last, "points", None)
        if points is None:
            points = self._last.points = collections.OrderedDict()
        return points

    def _remember(self, x: np.ndarray, args: tuple[Any, ...], value: Any = None, jac: Any = None) -> None:
        """Keep the value and/or Jacobian at ``x``: the last ``_CACHED`` points, per thread.
        Threads sharing an objective (multi-start solves in a thread pool) each have their
        own: one shared point, written and read in steps, gave a thread another thread's
        Jacobian (silently), and threads taking turns would evict each other's points.
        Each entry is one tuple, replaced whole. A point new here is one more evaluated
        point in the prefetch's count (``_asked``)."""
        key = self._key_of(x, args)
        points = self._points()
        known = points.pop(key, None)
        if known is not None:
            value = known[0] if value is None else value
            jac = known[1] if jac is None else jac
            asked = known[2]
        else:
            asked = [False]
            self._asked.append(asked)
        points[key] = (value, jac, asked)
        while len(points) > _CACHED:
            points.popitem(last=False)

    def _cached(self, x: np.ndarray, args: tuple[Any, ...]) -> tuple[Any, Any]:
        known = self._points().get(self._key_of(x, args))
        return (known[0], known[1]) if known is not None else (None, None)

    def _jacobian_asked(self, x: np.ndarray, args: tuple[Any, ...]) -> None:
        """``jac(x)`` (or ``fun_and_jac``) was called: a point whose Jacobian the solver uses."""
        known = self._points().get(self._key_of(x, args))
        if known is not None:
            known[2][0] = True

    def _prefetch_pays(self) -> bool:
        """Whether ``fun(x)`` fetches the Jacobian along: ``prefetch``, unless the solver
        asks few of the points it evaluates for one (a stiff ODE solver keeps one
        Jacobian over many steps: Radau evaluated 45 points of a Lorenz-96 system and
        differentiated 2, and every one of the 45 requests computed and sent a Jacobian,
        n x n numbers, where an evaluate sends n). From ``_MIN_SEEN`` points on, it pays
        while at least one in ``_PAYS_EVERY`` of the last ``_RECENT`` had its Jacobian
        asked for."""
        if not self.prefetch:
            return False
        recent = list(self._asked)
        return len(recent) < _MIN_SEEN or _PAYS_EVERY * sum(a[0] for a in recent) >= len(recent)

    def _value_of(self, output: Any) -> Any:
        out = np.asarray(self._one_array(output))
        return float(out) if out.ndim == 0 else out

    def _one_array(self, tree: Any) -> Any:
        """SciPy's objectives and residuals are one array (or a float). A function with
        several outputs (a tuple or a dict of arrays) has no such value: a dict failed
        deep in SciPy ("float() argument must be ... not 'dict'"), and a tuple of equal
        shapes was stacked silently into an array the function never returned."""
        if isinstance(tree, (tuple, list, dict)):
            what = f"a dict of {len(tree)} outputs" if isinstance(tree, dict) else f"a tuple of {len(tree)} outputs"
            raise TypeError(f"remote_objective: {self.name!r} returns {what}; SciPy needs one array (or a float). "
                            "Register a function that returns the one output to optimise, or use "
                            "Client.jacobian for the others.")
        return tree

    def _derivative_options(self) -> dict[str, Any]:
        """The request options of a ``jacobian`` or ``hessian``: ``sparsity`` when asked."""
        options: dict[str, Any] = {"argnums": self.argnum}
        if self.sparsity is not None:
            options["sparsity"] = self.sparsity
        return options

    def _flat_jac(self, jac: Any, x: np.ndarray, output: Any = None) -> Any:
        if is_sparse(jac):  # (output elements) x (input elements): flat already
            if np.ndim(self._one_array(output)) == 0:  # a scalar's 1 x n: minimize takes the gradient
                return np.asarray(jac.toarray()).reshape(x.size)
            return jac
        jac = np.asarray(self._one_array(jac))
        out_shape = jac.shape[: jac.ndim - len(self._x_shape(x))]
        # SciPy's Jacobian is (output elements) x (x.size), as a sparse one is: an output of
        # more dimensions (a grid) kept them, (h, w, x.size), which no solver takes
        return jac.reshape(x.shape) if not out_shape else jac.reshape(math.prod(out_shape), *x.shape)

    def _learn_shape(self, exc: InvalidInput, x: Any) -> bool:
        """Whether ``exc``, the service's refusal of SciPy's flat ``x`` for its shape, says
        the shape ``x`` is to be sent in; then it is kept (``_x_shape`` sends ``x`` in it).

        SciPy hands every solver's ``x`` flat (``minimize`` makes even a float ``x0`` an
        array of shape ``(1,)``), and without ``shape=`` it was sent so: ``minimize(
        obj.fun, 2.0, jac=obj.jac)`` of a function of one 0-d input failed with the
        service's 422 ("expected shape (), got (1,)"), and so did one of ``n`` points in
        3-D (``(n, 3)``, got ``(3 n,)``), where the same function in-process takes the
        reshaped array. The declared shape is the one reshape that fits: all of it fixed
        (``()``, ``(2, 3)``), or one symbol the size decides (``(n, 3)``: ``n = x.size / 3``;
        ``(n, n)``: its square root).
        Learned from the refusal (the function's description asked once, for the input's
        name), never asked up front: a caller who passes the right shape pays nothing. A
        shape it cannot decide (two symbols) is the 422 with what to pass."""
        if self.shape is not None:
            return False
        problem, x = exc.problem, np.asarray(x)
        expected, got = problem.get("expected_shape"), problem.get("got_shape")
        if (problem.get("field") != "inputs" or not isinstance(expected, list) or x.ndim > 1
                or got not in (list(x.shape), list(self._x_shape(x))) or problem.get("path") != self._x_name()):
            return False
        declared = tuple(expected)
        if _resolve(declared, x.size) is None:
            raise with_hint(exc, f"remote_objective({self.name!r}): SciPy's x is flat ({x.size} numbers); pass "
                                 f"shape= the input's shape for it (declared {declared})") from None
        if declared == self._declared:
            # learned since this x went flat (a solve in another thread): sent again in it;
            # refused in the learned shape itself, the 422 stands
            return got == list(x.shape) != list(self._x_shape(x))
        self._declared = declared
        return True

    def _x_name(self) -> str | None:
        """The name of the input ``x`` is (one request, the function's description)."""
        names = [i.name for i in self.client.function(self.name).inputs]
        return names[self.argnum] if -len(names) <= self.argnum < len(names) else None

    # ----------------------------------------------------------------- SciPy callables

    @_shaped
    def fun_and_jac(self, x: Any, *args: Any) -> tuple[Any, np.ndarray]:
        """Value and Jacobian (gradient for a scalar function) in one request."""
        x, inputs = self._inputs(x, args)
        value, jac = self._both(x, inputs, args)
        self._jacobian_asked(x, args)
        return _flat(_fresh(value)), _fresh(jac)

    def _both(self, x: np.ndarray, inputs: list[Any], args: tuple[Any, ...]) -> tuple[Any, np.ndarray]:
        """Value and Jacobian, the cached arrays themselves (callers hand out copies)."""
        value, jac = self._cached(x, args)
        if value is not None and jac is not None:
            return value, jac
        parts = self.client._parts("jacobian", self.name, inputs, {**self._derivative_options(), "return_output": True})
        value, jac = self._value_of(parts["output"]), self._flat_jac(parts["value"], x, parts["output"])
        self._remember(x, args, value, jac)
        return value, jac

    @_shaped
    def fun(self, x: Any, *args: Any) -> Any:
        """The value (a float for a scalar function): with ``prefetch``, fetched together
        with the Jacobian, which ``jac(x)`` then returns without a request.

        With ``vectorized=True``, an ``x`` of shape ``(n, k)`` is ``k`` points as columns
        (SciPy's vectorized convention: ``solve_ivp(vectorized=True)``, ``solve_bvp``,
        ``differential_evolution(vectorized=True)``): one batched ``evaluate``, the values
        as columns, ``(m, k)`` (``(k,)`` for a scalar function); not cached."""
        if self.vectorized and np.ndim(x) == 2:
            return self._columns(x, args, "evaluate").T.copy()
        x, inputs = self._inputs(x, args)
        value, _ = self._cached(x, args)
        jacobian_failed = False
        if value is None and self._prefetch_pays():
            try:
                value = self._both(x, inputs, args)[0]
            except _DERIVATIVE_ERRORS:
                # the Jacobian failed, not necessarily the value: a derivative-free solver
                # (Nelder-Mead, least_squares' finite differences) needs the value alone,
                # which in-process works for a function that cannot be differentiated
                jacobian_failed = True
        if value is None:
            parts = self.client._parts("evaluate", self.name, inputs, {})
            value = self._value_of(parts["value"])
            self._remember(x, args, value=value)
            if jacobian_failed:
                # the value works where the Jacobian does not: stop fetching Jacobians that
                # were never asked for (jac(x) still asks, and raises what the service
                # says). A value that fails too raised above and changes nothing: a caller
                # that turns such points into inf keeps prefetching elsewhere.
                self.prefetch = False
        return _flat(_fresh(value))

    @_shaped
    def jac(self, x: Any, *args: Any) -> np.ndarray:
        """The Jacobian at ``x`` (the gradient for a scalar function). With ``vectorized``,
        an ``(n, k)`` ``x`` gives the ``k`` columns' Jacobians stacked last, ``(m, n, k)``
        (``solve_bvp``'s ``fun_jac``; ``(n, k)`` for a scalar function): one batched
        ``jacobian``."""
        if self.vectorized and np.ndim(x) == 2:
            return np.moveaxis(self._columns(x, args, "jacobian"), 0, -1).copy()
        x, inputs = self._inputs(x, args)
        value, jac = self._cached(x, args)
        if jac is None and self.prefetch and value is None:  # a point never evaluated: its value comes along
            jac = self._both(x, inputs, args)[1]
        elif jac is None and self.sparsity is not None:
            # the output comes along: whether the function is scalar (its gradient is dense)
            parts = self.client._parts("jacobian", self.name, inputs,
                                       {**self._derivative_options(), "return_output": True})
            jac = self._flat_jac(parts["value"], x, parts["output"])
            self._remember(x, args, self._value_of(parts["output"]), jac)
        elif jac is None:
            parts = self.client._parts("jacobian", self.name, inputs, self._derivative_options())
            jac = self._flat_jac(parts["value"], x)
            self._remember(x, args, jac=jac)
        self._jacobian_asked(x, args)
        return _fresh(jac)

    @_shaped
    def hessp(self, x: Any, p: Any, *args: Any) -> np.ndarray:
        """The Hessian of a scalar function at ``x`` times ``p``: one hvp request. The
        service's hvp runs forward over reverse, which a function with an op without a
        forward-mode rule (a custom ``autograd.Function`` without ``jvp``) cannot: where
        the hvp fails so and the Hessian answers, ``H @ p`` from the Hessian, kept per
        ``x`` (one per thread, as the value is: a Krylov solver asks many products at one
        point), from then on, said once in a ``RuntimeWarning``."""
        x, inputs = self._inputs(x, args)
        self._scalar_only(x, args, "hessp(x, p)")  # else the service's 422 asks for cotangents hessp has none of
        p = _real(p, "p")
        if self._hvp_works:
            tangent = p.reshape(self._x_shape(x))
            try:
                parts = self.client._parts("hvp", self.name, inputs, {"argnums": self.argnum},
                                           vectors=("tangents", tangent))
                return np.asarray(parts["value"]).reshape(p.shape)
            except FunctionError as exc:
                if not lacks_forward_mode(self.client, exc):
                    raise
                try:
                    H = self._hessian_at(x, inputs, args)
                except APIError:
                    raise exc from None  # the function fails here whatever the strategy: its own error
                self._hvp_works = False
                no_forward_mode(self.name, "hvp", exc, "Hessian (hessp: H @ p, one Hessian per point)")
        else:
            H = self._hessian_at(x, inputs, args)
        return (H @ p.reshape(-1)).reshape(p.shape)

    def _hessian_at(self, x: np.ndarray, inputs: list[Any], args: tuple[Any, ...]) -> np.ndarray:
        """``hess(x)``, kept for the last ``x`` of this thread (hessp's fall-back)."""
        key = self._key_of(x, args)
        last = getattr(self._last, "hessian", None)
        if last is not None and last[0] == key:
            return last[1]
        parts = self.client._parts("hessian", self.name, inputs, {"argnums": self.argnum})
        H = np.asarray(parts["value"]).reshape(x.size, x.size)
        self._last.hessian = (key, H)
        return H

    @_shaped
    def hess(self, x: Any, *args: Any) -> Any:
        """The Hessian of a scalar function at ``x``, ``(x.size, x.size)``: one hessian
        request (for ``minimize(..., hess=)``: trust-exact, dogleg, Newton-CG; with
        ``sparsity``, a CSR array, for trust-constr). A function with a vector output has
        no such matrix (a constraint's: see ``constraint_hess``)."""
        x, inputs = self._inputs(x, args)
        self._scalar_only(x, args, "hess(x)")
        try:
            parts = self.client._parts("hessian", self.name, inputs, self._derivative_options())
        except InvalidInput as exc:
            if not args or self.args:
                raise
            # NonlinearConstraint(hess=obj.hess) calls hess(x, v): v was sent as an input
            raise with_hint(exc, f"remote_objective({self.name!r}).hess(x, *args) took {len(args)} more "
                                 "argument(s) as the function's inputs held fixed (SciPy's args=); "
                                 "NonlinearConstraint calls hess(x, v) with Lagrange multipliers v: pass "
                                 "hess=constraint_hess there") from None
        if is_sparse(parts["value"]):
            return parts["value"]
        H = np.asarray(parts["value"])
        if H.size != x.size * x.size:
            # a vector output's Hessians, one per element: reshaped, numpy's "cannot reshape array of
            # size 18 into shape (3,3)" said nothing of why
            raise self._not_scalar(H.shape[: H.ndim - 2 * len(self._x_shape(x))], "hess(x)")
        # a scalar x (newton's, root_scalar's: fprime2=obj.hess) has a scalar second
        # derivative, as jac's first is x-shaped: (1, 1) made newton's root a (1, 1) array
        return H.reshape(x.size, x.size) if x.ndim else H.reshape(())

    def _scalar_only(self, x: np.ndarray, args: tuple[Any, ...], call: str) -> None:
        """Refuse ``call`` (a scalar function's second derivative) where the value at ``x``,
        known already (a solver evaluates a point before its Hessian), is not a scalar."""
        value, _ = self._cached(x, args)
        if isinstance(value, np.ndarray) and value.size != 1:
            raise self._not_scalar(value.shape, call)

    def _not_scalar(self, out_shape: tuple[int, ...], call: str) -> TypeError:
        return TypeError(f"remote_objective: {self.name!r} returns an output of shape {list(out_shape)}; {call} is "
                         "for a scalar function (minimize's hess= and hessp=). For a vector function as a constraint "
                         "(NonlinearConstraint(hess=)), pass constraint_hess: the Hessian of v . f(x) for the "
                         "multipliers v")

    @_shaped
    def constraint_hess(self, x: Any, v: Any, *args: Any) -> np.ndarray:
        """The Hessian of ``v . f(x)``, ``sum_i v_i H_i(x)``, ``(x.size, x.size)``: what
        ``NonlinearConstraint(fun, lb, ub, jac=obj.jac, hess=obj.constraint_hess)`` takes
        (trust-constr's Lagrangian, ``v`` its multipliers, one per output element). One
        ``hvp`` request: the cotangent ``v`` paired with each of the ``x.size`` basis
        tangents, ``x.size`` products of (outputs + 2 x.size) numbers where the Hessians
        are outputs x x.size^2. The output's shape comes from the value at ``x`` (the
        solver's own, cached; else one request). A function without a forward-mode rule:
        its ``hessian``, contracted with ``v`` here (see ``hessp``)."""
        x, inputs = self._inputs(x, args)
        value, _ = self._cached(x, args)
        if value is None:
            self.fun(x, *args)
            value, _ = self._cached(x, args)  # the output's own shape, which the cotangents take
        out_shape = np.shape(value)
        v = _real(v, "v")
        if v.size != int(np.prod(out_shape)):
            raise ValueError(f"remote_objective: constraint_hess of {self.name!r} takes one multiplier per output "
                             f"element ({int(np.prod(out_shape))}, the output's shape {list(out_shape)}); "
                             f"got {v.size}")
        n = x.size
        arr_shape = self._x_shape(x)
        if self._hvp_works:
            tangents = np.eye(n).reshape((n, *arr_shape))
            cotangents = np.broadcast_to(v.reshape(out_shape), (n, *out_shape))
            try:
                parts = self.client._parts("hvp", self.name, inputs, {"argnums": self.argnum, "batched_vectors": True},
                                           vectors=[("tangents", tangents), ("cotangents", cotangents)])
                return np.asarray(parts["value"], dtype=np.float64).reshape(n, n)
            except FunctionError as exc:
                if not lacks_forward_mode(self.client, exc):
                    raise
                try:
                    H = self._hessians_at(inputs, n)
                except APIError:
                    raise exc from None
                self._hvp_works = False
                no_forward_mode(self.name, "hvp", exc, "Hessian (constraint_hess: v . H, one Hessian per call)")
        else:
            H = self._hessians_at(inputs, n)
        return np.tensordot(v.reshape(-1), H.reshape(-1, n, n), 1)

    def _hessians_at(self, inputs: list[Any], n: int) -> np.ndarray:
        parts = self.client._parts("hessian", self.name, inputs, {"argnums": self.argnum})
        return np.asarray(parts["value"], dtype=np.float64).reshape(-1, n, n)

    def _x_shape(self, x: np.ndarray) -> tuple[int, ...]:
        """The shape ``x`` is sent in (``shape``, else the declared one learned where it fits
        this ``x``, else SciPy's own)."""
        if self.shape is not None:
            return self.shape
        learned = _resolve(self._declared, x.size) if self._declared is not None else None
        return learned if learned is not None else x.shape


# The points whose values and Jacobians are kept, per thread (see _remember)
_CACHED = 2
# Prefetching's count (see _prefetch_pays): the last _RECENT evaluated points, judged from
# _MIN_SEEN on; it pays while one in _PAYS_EVERY of them was differentiated
_RECENT = 16
_MIN_SEEN = 4
_PAYS_EVERY = 4

# What a ``jacobian`` request can fail with where an ``evaluate`` of the same inputs may
# not: the function raised while differentiated (or refused to be: an integer output), or
# its Jacobian is too large, too slow or too big for memory. Not InvalidInput: a request
# the service refuses (an argnum out of range) is the caller's to fix, and an evaluate
# would answer for another placement of x, silently. Anything else (auth, an unknown
# function, an unavailable server) would fail the value too.
_DERIVATIVE_ERRORS = (FunctionError, ResultTooLarge, Timeout, OutOfMemory)


def _resolve(declared: tuple[Any, ...], size: int) -> tuple[int, ...] | None:
    """The one shape of ``size`` elements a declared shape allows (its numbers, and at most
    one symbol, which the size decides: named ``k`` times, its ``k``-th root), or None."""
    fixed = math.prod(d for d in declared if isinstance(d, int))
    symbols = [d for d in declared if not isinstance(d, int)]
    if len(set(symbols)) > 1 or (fixed == 0 and size) or (fixed and size % fixed) or (not symbols and fixed != size):
        return None
    # A symbol named twice (a matrix, ("n", "n")) was given the whole size at each place:
    # a flat 2x2 was reshaped to (4, 4), numpy's ValueError out of every SciPy callable.
    n = 0 if not symbols or not fixed else _root(size // fixed, len(symbols))
    return None if n is None else tuple(d if isinstance(d, int) else n for d in declared)


def _root(value: int, k: int) -> int | None:
    """The whole number whose ``k``-th power is ``value`` (``k >= 1``), or None."""
    guess = round(value ** (1.0 / k))
    return next((r for r in (guess - 1, guess, guess + 1) if r >= 0 and r**k == value), None)


def _flat(value: Any) -> Any:
    """A value as SciPy takes it: a float, or one vector. An output of more dimensions (a
    grid, ``reaction_diffusion``'s ``(h, w)``) is flattened in C order, the order of the
    Jacobian's rows: kept, ``least_squares`` refused it ("`fun` must return at most 1-d
    array_like"), ``root`` too, and ``NonlinearConstraint`` failed deep in trust-constr
    with an IndexError."""
    return value.reshape(-1) if isinstance(value, np.ndarray) and value.ndim > 1 else value


def _fresh(value: Any) -> Any:
    """A copy of a cached array, dense or sparse (floats are immutable and pass as they are)."""
    return value.copy() if isinstance(value, np.ndarray) or is_sparse(value) else value


def _real(value: Any, what: str) -> np.ndarray:
    """A solver's vector as the float64 array SciPy works in. A complex one cannot be sent
    (the service computes in real dtypes): SciPy's complex-step differentiation
    (``least_squares(jac="cs")``, ``minimize(jac="cs")``) evaluates ``fun(x + h i)``, and
    the cast to float64 dropped ``h i`` with numpy's ComplexWarning alone, so every
    difference was zero: ``least_squares`` stopped at once at ``x0``, a wrong answer."""
    arr = np.asarray(value)
    if np.iscomplexobj(arr):
        raise TypeError(f"remote_objective got a complex {what} ({arr.dtype}); the service computes in real "
                        "dtypes, so SciPy's complex-step differentiation (jac='cs') cannot run it: pass "
                        "jac=obj.jac (the service's exact Jacobian) or jac='2-point' / '3-point'")
    return arr.astype(np.float64, copy=False)

