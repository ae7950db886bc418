"""Registered functions: ``@register``, ``Input`` specs, input checks, module loading.

``@register`` keeps no global state: it records the spec in the defining module's
``__jacobian_functions__`` list, and :meth:`Registry.from_modules` collects those lists
from the modules it imports. Importing this module does not import torch.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import FunctionNotFound, InvalidInput
from .sparsity.patterns import Declared, declared as _declared_patterns

__all__ = ["ENTRY_POINT_GROUP", "FunctionSpec", "Input", "Registry", "format_shape", "register"]

ENTRY_POINT_GROUP = "jacobian_service.functions"
BUILTIN_MODULE = "jacobian_service.examples"
FLOATING = "floating"
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
CONCRETE_DTYPES = FLOAT_DTYPES | {"bool", "int8", "int16", "int32", "int64", "uint8"}
Dim = int | str


@dataclass(frozen=True)
class Input:
    """One positional parameter: its name, shape (ints and symbols) and dtype.

    ``shape=None`` accepts any shape. A symbol binds to one size per call, across all
    inputs. ``dtype`` is a concrete name or ``"floating"`` (computes in the float dtype
    the caller sends, float32 for plain numbers).
    """

    name: str
    shape: tuple[Dim, ...] | None = None
    dtype: str = FLOATING

    def __post_init__(self) -> None:
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
            for dim in self.shape:
                if isinstance(dim, bool) or not isinstance(dim, (int, str)) or (isinstance(dim, int) and dim < 0):
                    raise ValueError(f"input {self.name!r}: dims are non-negative ints or symbol names")
        if self.dtype != FLOATING and self.dtype not in CONCRETE_DTYPES:
            raise ValueError(f"input {self.name!r}: unknown dtype {self.dtype!r}")

    @property
    def default_dtype(self) -> str:
        return "float32" if self.dtype == FLOATING else self.dtype

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}

    def resolve_dtype(self, sent: str) -> str:
        """The dtype this input computes in, given the one the caller sent."""
        if self.dtype == FLOATING:
            return sent if sent in FLOAT_DTYPES else "float32"
        wire = "float32" if sent == "bfloat16" else sent
        target = "float32" if self.dtype == "bfloat16" else self.dtype
        if sent == self.dtype or np.can_cast(np.dtype(wire), np.dtype(target), "same_kind"):
            return self.dtype
        raise InvalidInput(f"input {self.name!r}: expected {self.dtype}, got {sent} (no same_kind cast)")

    def bind(self, shape: tuple[int, ...], bindings: dict[str, tuple[int, str]]) -> None:
        """Check ``shape`` against the declared one, binding symbols in place."""
        if self.shape is None:
            return
        if len(shape) != len(self.shape) or any(
            isinstance(want, int) and want != got for want, got in zip(self.shape, shape)
        ):
            raise InvalidInput(f"input {self.name!r}: expected shape {format_shape(self.shape)}, got {format_shape(shape)}")
        for want, got in zip(self.shape, shape):
            if isinstance(want, str):
                size, owner = bindings.setdefault(want, (got, self.name))
                if size != got:
                    raise InvalidInput(
                        f"input {self.name!r}: expected shape {format_shape(self.shape)} with {want} = {size} "
                        f"(bound by {owner!r}), got {format_shape(shape)}"
                    )


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
        inputs = tuple(Input(i["name"], None if i["shape"] is None else tuple(i["shape"]), i["dtype"]) for i in doc["inputs"])
        # Declared patterns by name and kind (Jacobian or Hessian), so a front end can
        # refuse an unknown name before any compute; their recipes stay with the engines.
        sparsity = {name: Declared(d["kind"], _not_here, dict(d.get("params", {})), bool(d.get("hessian")))
                    for name, d in (doc.get("sparsity") or {}).items()}
        return cls(name=doc["name"], fn=_not_here, inputs=inputs, has_aux=doc["has_aux"], description=doc["description"],
                   sparsity=sparsity)

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


def _infer_inputs(fn: Callable[..., Any]) -> tuple[Input, ...]:
    params = inspect.signature(fn).parameters.values()
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

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        spec = FunctionSpec(
            name=name or f.__name__,
            fn=f,
            inputs=tuple(inputs) if inputs is not None else _infer_inputs(f),
            has_aux=has_aux,
            description=description if description is not None else inspect.cleandoc(f.__doc__ or ""),
            module=f.__module__,
            sparsity=patterns,
        )
        names = [i.name for i in spec.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{spec.name}: input names must be unique, got {names}")
        module = sys.modules.get(f.__module__)
        if module is not None:
            module.__dict__.setdefault("__jacobian_functions__", []).append(spec)
        f.__jacobian_spec__ = spec  # type: ignore[attr-defined]
        return f

    return decorate(fn) if fn is not None else decorate


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
        loaded = [importlib.import_module(m) for m in (modules or (BUILTIN_MODULE,))]
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
            close = difflib.get_close_matches(name, self._specs, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise FunctionNotFound(f"no function named {name!r}{hint}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[FunctionSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._specs)
