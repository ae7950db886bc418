"""Registered functions: ``@register``, ``Input`` specs, input checks, module loading.

``@register`` keeps no global state: it records the spec in the defining module's
``__jacobian_functions__`` list, and :meth:`Registry.from_modules` collects those lists
from the modules it imports. Importing this module does not import torch.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import FunctionNotFound, InvalidInput
from .sparsity.patterns import Declared, declared as _declared_patterns

__all__ = ["COMPLEX_DTYPES", "ENTRY_POINT_GROUP", "FLOATING", "FLOAT_DTYPES", "QUERY_INTEGER", "Array", "FunctionModuleNotFound",
           "FunctionSpec", "Input", "Registry", "format_shape", "register", "shape_fields"]

ENTRY_POINT_GROUP = "jacobian_service.functions"
BUILTIN_MODULE = "jacobian_service.examples"
FLOATING = "floating"
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
#: An input declared one of these takes complex arrays (torch.func's vjp, jvp and hvp
#: differentiate them; jacrev and hessian refuse them). ``floating`` never takes them:
#: it is a real dtype, as SPEC's list says, and a complex array sent to it is refused.
COMPLEX_DTYPES = frozenset({"complex64", "complex128"})
CONCRETE_DTYPES = FLOAT_DTYPES | COMPLEX_DTYPES | {"bool", "int8", "int16", "int32", "int64", "uint8"}
Dim = int | str


#: An integer as a query string spells it (parsing reads argnums, rows and chunk_size so):
#: an input name it matches would be read as a position. (str.isdigit() also accepts
#: "²", which int() refuses.)
QUERY_INTEGER = re.compile(r"-?[0-9]+")


def _check_input_name(name: Any) -> None:
    """An input is named in an .npz member's path (``/`` separates a tree's levels), in
    a query's argnums (``,`` separates a list; digits are positions): a name holding
    those could be declared and never sent or selected."""
    if (not isinstance(name, str) or not name or not name.isprintable() or "/" in name or "," in name
            or QUERY_INTEGER.fullmatch(name)):
        raise ValueError(f"input names are printable, hold no '/' or ',', and are not a position; got {name!r}")


def _check_function_name(name: Any) -> None:
    """A function's name is one segment of its URLs: with a ``/`` (even sent as %2F),
    or as ``.`` / ``..`` (which clients resolve away), it would be listed and never
    reached (every call a 404)."""
    if not isinstance(name, str) or not name or not name.isprintable() or "/" in name or name in (".", ".."):
        raise ValueError(f"function names are printable, hold no '/', and are not '.' or '..'; got {name!r}")


def _shape_tuple(name: str, shape: Any) -> tuple[Dim, ...]:
    """A declared shape, as a tuple. ``shape="batch"`` was taken as five symbols ``('b',
    'a', 't', 'c', 'h')``, silently (every request then a 422 about a rank-5 shape), and
    ``shape=3`` failed "'int' object is not iterable", naming neither the input nor the fix."""
    if isinstance(shape, (str, int)):
        raise ValueError(f"input {name!r}: shape is a tuple of dims, ints and symbol names: "
                         f"shape=({shape!r},), not shape={shape!r}")
    try:
        return tuple(shape)
    except TypeError:
        raise ValueError(f"input {name!r}: shape is a tuple of dims, ints and symbol names (shape=(3,), "
                         f"shape=('n', 2)), not {shape!r}") from None


def _check_leaf(name: str, shape: tuple[Dim, ...] | None, dtype: str) -> None:
    if shape is not None:
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)) or (isinstance(dim, int) and dim < 0):
                raise ValueError(f"input {name!r}: dims are non-negative ints or symbol names")
    if dtype != FLOATING and dtype not in CONCRETE_DTYPES:
        # (torch.float32 and np.float32 are the commonest: said how to write them)
        named = str(dtype).removeprefix("torch.").removeprefix("<class 'numpy.").removesuffix("'>")
        hint = f" (a dtype is named by a string: dtype={named!r})" if named in CONCRETE_DTYPES else ""
        raise ValueError(f"input {name!r}: unknown dtype {dtype!r}; expected {FLOATING!r} or one of "
                         f"{sorted(CONCRETE_DTYPES)}{hint}")


@dataclass(frozen=True)
class Array:
    """One array of a pytree parameter (``Input(..., tree=...)``): shape and dtype as
    for :class:`Input`."""

    shape: tuple[Dim, ...] | None = None
    dtype: str = FLOATING

    def __post_init__(self) -> None:
        if self.shape is not None:
            object.__setattr__(self, "shape", _shape_tuple("array", self.shape))
        _check_leaf("array", self.shape, self.dtype)


@dataclass(frozen=True)
class Input:
    """One positional parameter: its name, shape (ints and symbols) and dtype.

    ``shape=None`` accepts any shape. A symbol binds to one size per call, across all
    inputs. ``dtype`` is a concrete name or ``"floating"`` (computes in the float dtype
    the caller sends, float32 for plain numbers). ``"complex64"`` / ``"complex128"``
    take complex arrays (and real ones, cast); plain JSON lists for such an input are its
    numbers' ``[real, imag]`` pairs.

    ``tree`` declares a pytree parameter instead of one array: a dict, tuple or list of
    :class:`Array` (nested as deep as needed), e.g. ``{"w": Array(("h", "n")), "b":
    Array(("h",))}``. The function receives it as that dict (tuple, list) of tensors,
    and Jacobians nest over it as ``torch.func.jacrev`` nests them. Dict leaves are
    ordered as declared (torch's pytree order).
    """

    name: str
    shape: tuple[Dim, ...] | None = None
    dtype: str = FLOATING
    tree: Any = field(default=None, hash=False)

    def __post_init__(self) -> None:
        _check_input_name(self.name)
        if self.shape is not None:
            object.__setattr__(self, "shape", _shape_tuple(self.name, self.shape))
        _check_leaf(self.name, self.shape, self.dtype)
        if self.tree is not None:
            if self.shape is not None or self.dtype != FLOATING:
                raise ValueError(f"input {self.name!r}: a tree input declares shape and dtype per Array, not for the whole")
            object.__setattr__(self, "tree", _frozen_tree(self.name, self.tree))
            if not _leaf_paths(self.tree):
                raise ValueError(f"input {self.name!r}: a tree needs at least one Array")

    @property
    def default_dtype(self) -> str:
        return "float32" if self.dtype == FLOATING else self.dtype

    def describe(self) -> dict[str, Any]:
        if self.tree is None:
            return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}
        dtypes = {leaf.dtype for leaf in self.leaves()}
        return {"name": self.name, "shape": None, "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
                "tree": _describe_tree(self.tree)}

    @classmethod
    def from_description(cls, doc: dict[str, Any]) -> "Input":
        if doc.get("tree") is not None:
            return cls(doc["name"], tree=_tree_from_description(doc["tree"]))
        return cls(doc["name"], None if doc["shape"] is None else tuple(doc["shape"]), doc["dtype"])

    def resolve_dtype(self, sent: str) -> str:
        """The dtype this input computes in, given the one the caller sent."""
        if sent in COMPLEX_DTYPES and self.dtype not in COMPLEX_DTYPES:
            # (the readers refuse it first; this keeps a floating input from taking
            # "float32" for it, its imaginary part dropped)
            raise InvalidInput(f"input {self.name!r}: expected {self.dtype}, got {sent}: only an input declared "
                               "complex64 or complex128 takes complex arrays")
        if self.dtype == FLOATING:
            return sent if sent in FLOAT_DTYPES else "float32"
        wire = "float32" if sent == "bfloat16" else sent
        target = "float32" if self.dtype == "bfloat16" else self.dtype
        if sent == self.dtype or np.can_cast(np.dtype(wire), np.dtype(target), "same_kind"):
            return self.dtype
        raise InvalidInput(f"input {self.name!r}: expected {self.dtype}, got {sent} (no same_kind cast)")

    def bind(self, shape: tuple[int, ...], bindings: dict[str, tuple[int, str]], field: str = "inputs") -> None:
        """Check ``shape`` against the declared one, binding symbols in place. A refusal
        carries the shapes as problem members (``field``: the body's member or query
        parameter that gave the shape), as a vector's does: a client's code reads them,
        not the detail's words."""
        if self.shape is None:
            return

        def refused(detail: str) -> InvalidInput:
            return InvalidInput(detail, fields=shape_fields(field, self.name, self.expected_shape(bindings), shape))

        if len(shape) != len(self.shape) or any(
            isinstance(want, int) and want != got for want, got in zip(self.shape, shape)
        ):
            raise refused(f"input {self.name!r}: expected shape {format_shape(self.shape)}, got {format_shape(shape)}")
        for want, got in zip(self.shape, shape):
            if isinstance(want, str):
                size, owner = bindings.setdefault(want, (got, self.name))
                if size != got:
                    raise refused(f"input {self.name!r}: expected shape {format_shape(self.shape)} with {want} = {size} "
                                  f"(bound by {owner!r}), got {format_shape(shape)}")

    def expected_shape(self, bindings: dict[str, tuple[int, str]]) -> list[Dim]:
        """The declared shape with the symbols bound so far as their sizes (others stay
        names: any size)."""
        assert self.shape is not None
        return [bindings[d][0] if isinstance(d, str) and d in bindings else d for d in self.shape]

    # ------------------------------------------------------------ pytree parameters

    def leaves(self) -> tuple["Input", ...]:
        """One array input per leaf, named by its path (``params.w``, ``pair[0]``), in
        torch's pytree order; ``(self,)`` for an array input."""
        if self.tree is None:
            return (self,)
        return tuple(Input(self.name + path, leaf.shape, leaf.dtype) for path, leaf in _leaf_paths(self.tree))

    def member_paths(self) -> list[str]:
        """The leaves' ``.npz`` member paths below the parameter (``w``, ``0/1``); ``[""]``
        for an array input."""
        if self.tree is None:
            return [""]
        return ["/".join(keys) for keys in _leaf_keys(self.tree)]

    def build(self, leaves: Iterator[Any]) -> Any:
        """The parameter from its leaves in pytree order (consumed from ``leaves``)."""
        return next(leaves) if self.tree is None else _build(self.tree, leaves)

    def match(self, given: Any, leaf: Callable[[Any, "Input"], Any]) -> list[Any]:
        """A caller's nested value (JSON lists for tuples, objects for dicts) -> one
        ``leaf(value, leaf_input)`` per leaf, in pytree order; mismatches name the path."""
        if self.tree is None:
            return [leaf(given, self)]
        out: list[Any] = []
        _match(self.tree, given, self.name, out, leaf)
        return out


def _frozen_tree(name: str, node: Any) -> Any:
    """A declared tree, checked; lists stay lists (the function gets what it declared)."""
    if isinstance(node, Array):
        return node
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"input {name!r}: tree keys are non-empty strings without '/', got {key!r}")
        return {k: _frozen_tree(name, v) for k, v in node.items()}
    if isinstance(node, (tuple, list)):
        return type(node)(_frozen_tree(name, v) for v in node)
    raise ValueError(f"input {name!r}: a tree holds Array, dict, tuple and list only, got {type(node).__name__} "
                     f"{node!r:.40}: a leaf is an Array (Array((3,)), Array(('n',), 'float64'))")


def _leaf_keys(node: Any, keys: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, Array):
        return [keys]
    items = node.items() if isinstance(node, dict) else enumerate(node)
    return [k for key, child in items for k in _leaf_keys(child, (*keys, str(key)))]


def _leaf_paths(node: Any, path: str = "") -> list[tuple[str, Array]]:
    if isinstance(node, Array):
        return [(path, node)]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaf_paths(v, f"{path}.{k}")]
    return [p for i, v in enumerate(node) for p in _leaf_paths(v, f"{path}[{i}]")]


def _build(node: Any, leaves: Iterator[Any]) -> Any:
    if isinstance(node, Array):
        return next(leaves)
    if isinstance(node, dict):
        return {k: _build(v, leaves) for k, v in node.items()}
    return type(node)(_build(v, leaves) for v in node)


def _match(node: Any, given: Any, path: str, out: list[Any], leaf: Callable[[Any, "Input"], Any]) -> None:
    if isinstance(node, Array):
        if isinstance(given, dict) and not _is_array_object(given):
            raise InvalidInput(f"input {path!r}: expected an array, got an object with keys {sorted(given)[:10]}")
        out.append(leaf(given, Input(path, node.shape, node.dtype)))
        return
    if isinstance(node, dict):
        if not isinstance(given, dict) or _is_array_object(given):
            raise InvalidInput(f"input {path!r}: expected an object with keys {list(node)}, got {_kind(given)}")
        missing = [k for k in node if k not in given]
        extra = sorted(k for k in given if k not in node)
        if missing or extra:
            raise InvalidInput(
                f"input {path!r}: expected keys {list(node)}"
                + (f"; missing {missing}" if missing else "") + (f"; unknown {extra[:10]}" if extra else "")
            )
        for k, v in node.items():
            _match(v, given[k], f"{path}.{k}", out, leaf)
        return
    if not isinstance(given, (list, tuple)) or len(given) != len(node):
        got = f"a list of {len(given)}" if isinstance(given, (list, tuple)) else _kind(given)
        raise InvalidInput(f"input {path!r}: expected a list of {len(node)} arrays (a tuple), got {got}")
    for i, (v, g) in enumerate(zip(node, given)):
        _match(v, g, f"{path}[{i}]", out, leaf)


def _is_array_object(obj: Any) -> bool:
    return isinstance(obj, dict) and "shape" in obj and ("data" in obj or "base64" in obj)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an array object" if _is_array_object(value) else "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, np.ndarray):
        return f"one array of shape {list(value.shape)}"
    return type(value).__name__


def _describe_tree(node: Any) -> dict[str, Any]:
    """Tagged, so that a dict whose keys are "shape" and "dtype" is still a dict."""
    if isinstance(node, Array):
        return {"type": "array", "shape": None if node.shape is None else list(node.shape), "dtype": node.dtype}
    if isinstance(node, dict):
        return {"type": "dict", "items": {k: _describe_tree(v) for k, v in node.items()}}
    return {"type": "list" if isinstance(node, list) else "tuple", "items": [_describe_tree(v) for v in node]}


def _tree_from_description(doc: dict[str, Any]) -> Any:
    kind = doc["type"]
    if kind == "array":
        return Array(None if doc["shape"] is None else tuple(doc["shape"]), doc["dtype"])
    if kind == "dict":
        return {k: _tree_from_description(v) for k, v in doc["items"].items()}
    items = [_tree_from_description(v) for v in doc["items"]]
    return items if kind == "list" else tuple(items)


def shape_fields(field: str, path: str, expected: Sequence[Dim], got: Sequence[int]) -> dict[str, Any]:
    """The problem members of an array refused for its shape (errors.py): the body's
    ``field``, the array's ``path`` in it, the shape it must have (a name: any size;
    ``"B"``: a batch's) and the one it has."""
    return {"field": field, "path": path, "expected_shape": list(expected), "got_shape": list(got)}


def format_shape(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "any shape"
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    fn: Callable[..., Any]
    inputs: tuple[Input, ...]
    has_aux: bool = False
    description: str = ""
    module: str = ""
    # Declared sparsity patterns by name (SPEC 7); torch-free recipes built per shape.
    sparsity: dict[str, Declared] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "description": self.description,
            "inputs": [i.describe() for i in self.inputs],
            "has_aux": self.has_aux,
        }
        if self.sparsity:  # only when declared: descriptions of other functions are unchanged
            out["sparsity"] = {name: d.describe() for name, d in self.sparsity.items()}
        return out

    @classmethod
    def from_description(cls, doc: dict[str, Any]) -> "FunctionSpec":
        """The metadata of :meth:`describe`, without the function: what a front end
        needs to validate requests, learned from an engine (no torch, no user modules)."""
        inputs = tuple(Input.from_description(i) for i in doc["inputs"])
        # Declared patterns by name and kind (Jacobian or Hessian), so a front end can
        # refuse an unknown name before any compute; their recipes stay with the engines.
        sparsity = {name: Declared(d["kind"], _not_here, dict(d.get("params", {})), bool(d.get("hessian")))
                    for name, d in (doc.get("sparsity") or {}).items()}
        return cls(name=doc["name"], fn=_not_here, inputs=inputs, has_aux=doc["has_aux"], description=doc["description"],
                   sparsity=sparsity)

    # ---------------------------------------------------------------- pytree parameters
    #
    # Requests and engines carry every input as a flat list of arrays, one per leaf (an
    # array input is its own one leaf), so that batching, IPC and the row engine see
    # arrays only; the parameters are rebuilt just before the function is called, and
    # results nest back over them.

    @functools.cached_property
    def has_trees(self) -> bool:
        return any(i.tree is not None for i in self.inputs)

    @functools.cached_property
    def takes_integers(self) -> bool:
        """Whether a leaf input is declared an integer dtype: only then must a JSON
        body's integers be read exactly (wire.loads), a float one taking them as floats."""
        return any(leaf.dtype.startswith(("int", "uint")) for leaf in self.leaf_inputs)

    @functools.cached_property
    def takes_complex(self) -> bool:
        """Whether a leaf input is declared complex: only then are complex tangents read
        (a complex input's; a real one's are refused as before)."""
        return any(leaf.dtype in COMPLEX_DTYPES for leaf in self.leaf_inputs)

    @functools.cached_property
    def leaf_inputs(self) -> tuple[Input, ...]:
        """Every input's leaves, in order: what a request's ``args`` hold."""
        return tuple(leaf for i in self.inputs for leaf in i.leaves())

    @functools.cached_property
    def _leaf_ranges(self) -> tuple[tuple[int, int], ...]:
        ranges, start = [], 0
        for inp in self.inputs:
            n = len(inp.leaves())
            ranges.append((start, start + n))
            start += n
        return tuple(ranges)

    def leaf_argnums(self, positions: Sequence[int]) -> tuple[int, ...]:
        """Parameter positions -> the positions of their leaves in ``args``."""
        return tuple(j for p in positions for j in range(*self._leaf_ranges[p]))

    def parameters(self, leaves: Sequence[Any]) -> list[Any]:
        """Flat leaves (all inputs) -> the function's positional arguments."""
        if not self.has_trees:
            return list(leaves)
        it = iter(leaves)
        return [inp.build(it) for inp in self.inputs]

    def group(self, positions: Sequence[int], as_tuple: bool, leaves: Sequence[Any]) -> Any:
        """Items for the differentiated leaves (in ``leaf_argnums`` order) nested as
        jacrev nests over ``argnums``: a tuple of parameters, or the one parameter."""
        it = iter(leaves)
        params = [self.inputs[p].build(it) for p in positions]
        return tuple(params) if as_tuple else params[0]

    def index_of(self, key: int | str) -> int:
        """A parameter's position from an index (negative allowed) or a name."""
        n = len(self.inputs)
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise InvalidInput(f"argnums entries are ints or parameter names, got {key!r}")
        if isinstance(key, str):
            for i, inp in enumerate(self.inputs):
                if inp.name == key:
                    return i
            raise InvalidInput(f"argnums: {key!r} is not a parameter of {self.name!r}; it has {[i.name for i in self.inputs]}")
        if not -n <= key < n:
            raise InvalidInput(f"argnums: {key} is out of range for {self.name!r}, which takes {n} inputs")
        return key % n

    def argnums(self, value: Any) -> tuple[tuple[int, ...], bool]:
        """``(positions, given_as_tuple)`` from an int, name or list of either."""
        if isinstance(value, (list, tuple)):
            if not value:
                raise InvalidInput("argnums must not be empty")
            positions = tuple(self.index_of(v) for v in value)
            if len(set(positions)) != len(positions):
                raise InvalidInput(f"argnums has duplicates: {list(value)}")
            return positions, True
        return (self.index_of(value),), False


def _not_here(*args: Any) -> Any:
    raise RuntimeError("this process holds the function's description only; engines run it")


def _infer_inputs(fn: Callable[..., Any], name: str) -> tuple[Input, ...]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins (torch.sin) and C functions have none to read
        raise TypeError(f"{name}: Python cannot read its signature ({fn!r}); declare its inputs: "
                        f"register(..., inputs=[Input('x')])") from None
    return tuple(Input(p.name) for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def register(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    inputs: Iterable[Input] | None = None,
    has_aux: bool = False,
    description: str | None = None,
    sparsity: Declared | dict[str, Declared] | None = None,
) -> Any:
    """Declare a function to serve; usable bare (``@register``) or with arguments.

    ``sparsity`` declares the Jacobian's (or, with ``hessian=True``, the Hessian's)
    sparsity pattern: one of :mod:`jacobian_service.sparsity`'s ``banded``,
    ``block_diagonal``, ``coo``, ``from_callable``, or a dict naming several; requests
    pick one by name (``sparsity: "<name>"``) or detect one (``sparsity: "auto"``).
    """
    patterns = _declared_patterns(sparsity)
    # The module calling register: where a callable that is not a Python function of its
    # own module is recorded (below).
    caller = sys._getframe(1).f_globals.get("__name__")

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(f):
            raise TypeError(f"register takes a function (or a callable), not {f!r}")
        fname = name or getattr(f, "__name__", None)
        if not isinstance(fname, str) or not fname:
            raise TypeError(f"register({f!r}): it has no __name__; give one: register(f, name='...')")
        if name is None and fname.startswith("<"):
            # A lambda's __name__ is "<lambda>": it was served at /v1/functions/<lambda>/...
            # (a URL a shell must quote and a browser percent-encodes), and a second
            # lambda took the same name.
            raise TypeError(f"register({fname}): a lambda has no name of its own to serve it under; "
                            f"give one: register(lambda x: ..., name='double', inputs=[...])")
        # A builtin (register(torch.sin)), a functools.partial or a callable object
        # (an nn.Module) names no module of the caller's as its own (torch.sin's is
        # "torch"): recorded there, it was never served. It is the registering module's.
        module = f.__module__ if inspect.isfunction(f) and f.__module__ in sys.modules else caller
        if isinstance(inputs, Input):  # ("'Input' object is not iterable")
            raise TypeError(f"{fname}: inputs is a list of Input, one per parameter: inputs=[{inputs!r}]")
        if not isinstance(has_aux, bool):  # (has_aux="no" was taken as True)
            raise TypeError(f"{fname}: has_aux is True or False, not {has_aux!r}")
        spec = FunctionSpec(
            name=fname,
            fn=f,
            inputs=tuple(inputs) if inputs is not None else _infer_inputs(f, fname),
            has_aux=has_aux,
            description=description if description is not None else _own_doc(f, caller),
            module=module,
            sparsity=patterns,
        )
        _check_function_name(spec.name)
        wrong = [i for i in spec.inputs if not isinstance(i, Input)]
        if wrong:  # (inputs=["x"] failed later, an AttributeError deep in the listing or the server's start)
            raise TypeError(f"{spec.name}: inputs are Input objects (Input('x', shape=('n',))), not {wrong[0]!r}")
        names = [i.name for i in spec.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{spec.name}: input names must be unique, got {names}")
        _check_takes_inputs(spec)
        _check_input_order(spec)
        owner = sys.modules.get(module) if module else None
        if owner is not None:
            owner.__dict__.setdefault("__jacobian_functions__", []).append(spec)
        try:
            f.__jacobian_spec__ = spec  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # a builtin takes no attributes (register(torch.sin))
            pass
        return f

    return decorate(fn) if fn is not None else decorate


def _check_takes_inputs(spec: FunctionSpec) -> None:
    """A function that cannot be called with its declared inputs (``f(x)`` declared with
    ``x`` and ``y``) registered, was listed and served, and failed every request as the
    caller's 500 ``function_error`` ("TypeError: f() takes 1 positional argument but 2 were
    given"): the author's mistake, said at import like the others. A callable whose
    signature Python cannot read (some builtins, C extensions) is taken as declared."""
    try:
        signature = inspect.signature(spec.fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*(i.name for i in spec.inputs))
    except TypeError as exc:
        raise TypeError(f"{spec.name}{signature} cannot be called with its {len(spec.inputs)} declared inputs "
                        f"{[i.name for i in spec.inputs]} (positionally, in that order): {exc}") from None


def _own_doc(f: Callable[..., Any], caller: str | None) -> str:
    """A function's docstring, as its description. A callable object's ``__doc__`` is its
    class's unless the instance has its own: an ``nn.Module`` instance (``register(net,
    name="net")``) was described by 150 lines of ``torch.nn.Linear``'s documentation, in
    the listing, ``/docs`` and ``jacobian-service functions``. A class of the registering
    module's own still describes its instances."""
    doc = getattr(f, "__doc__", None)
    if (not (inspect.isroutine(f) or inspect.isclass(f)) and doc is getattr(type(f), "__doc__", None)
            and type(f).__module__ != caller):
        doc = None
    return inspect.cleandoc(doc or "")


def _check_input_order(spec: FunctionSpec) -> None:
    """Inputs are passed positionally, in the declared order. One declared under the name
    of another of the function's parameters (``def f(x, y)`` declared ``[Input("y"),
    Input("x")]``) was served with its arguments swapped: ``{"inputs": {"x": X, "y": Y}}``
    computed ``f(Y, X)``, silently. A declared name that is not a parameter's (``"xx"``
    for ``x``) is only a name, and stays allowed."""
    try:
        params = [p.name for p in inspect.signature(spec.fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # no signature to read (builtins): taken as declared
        return
    for position, inp in enumerate(spec.inputs):
        if inp.name in params and params.index(inp.name) != position:
            takes = params[position] if position < len(params) else "*args"
            raise ValueError(
                f"{spec.name}: input {inp.name!r} is declared at position {position}, where the function takes "
                f"{takes!r}, but {inp.name!r} is its parameter at position {params.index(inp.name)}: inputs are "
                f"passed positionally in the declared order, so it would receive another input's value; declare "
                f"them in the signature's order {params[:len(spec.inputs)]}")


class FunctionModuleNotFound(ImportError):
    """A module named in FUNCTIONS that no path holds."""


def _import_functions(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # The named module itself (or a package above it) is missing: a new user's first
        # mistake, said in one line with the fix, not a 20-line traceback. A module that
        # the user's module imports and lacks stays its own error, traceback and all.
        if exc.name is None or not (module == exc.name or module.startswith(f"{exc.name}.")):
            raise
        raise FunctionModuleNotFound(
            f"cannot load the function module {module!r}: no module named {exc.name!r} on the path; run from "
            f"the folder that holds it, or put that folder on PYTHONPATH (PYTHONPATH=/path/to/folder "
            f"jacobian-service serve --functions {module})", name=exc.name) from None


_ECHO = 100  # the most of a name a 404 quotes back (a path may be ~32 KB long)


class Registry:
    """The functions one app serves, by name."""

    def __init__(self, specs: Iterable[FunctionSpec] = ()) -> None:
        self._specs: dict[str, FunctionSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"two functions named {spec.name!r} ({self._specs[spec.name].module}, {spec.module})")
            self._specs[spec.name] = spec

    @classmethod
    def from_modules(cls, modules: Sequence[str] = (), *, use_entry_points: bool = True) -> "Registry":
        """Import ``modules`` (the built-ins when empty) and the entry-point group."""
        loaded = [_import_functions(m) for m in (modules or (BUILTIN_MODULE,))]
        if use_entry_points:
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                obj = ep.load()
                loaded.append(obj if inspect.ismodule(obj) else sys.modules[obj.__module__])
        specs: list[FunctionSpec] = []
        seen: set[int] = set()
        for module in loaded:
            for spec in module.__dict__.get("__jacobian_functions__", []):
                if id(spec) not in seen:
                    seen.add(id(spec))
                    specs.append(spec)
        return cls(specs)

    def get(self, name: str) -> FunctionSpec:
        try:
            return self._specs[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._specs, n=3) if len(name) <= _ECHO else []
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            shown = repr(name) if len(name) <= _ECHO else f"{name[:_ECHO]!r}... ({len(name)} characters)"
            raise FunctionNotFound(f"no function named {shown}{hint}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[FunctionSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._specs)
