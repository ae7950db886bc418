"""``in_dims`` / ``out_dims`` of per-example requests, read in the front end: no torch.

A per-example request is ``vmap(jacrev(f), in_dims, out_dims)`` (or hessian, or f).
torch.func users batch with ``in_dims=(0, None)`` (a parameter shared by every
example) and put the batch elsewhere in the result with ``out_dims``; without them a
shared parameter had to be sent once per example. Here ``in_dims`` is checked against
the registry's declared shapes (which dim of each array is the batch, and that the
rest is one example's declared shape) and handed to the engine one entry per leaf;
``out_dims`` is only checked for its form: the result's structure and ranks are known
once it is computed, where the engine checks it as torch's ``vmap`` does.
"""

from __future__ import annotations

from typing import Any

import orjson
from jacobian_client import wire

from .errors import InvalidInput
from .registry import FunctionSpec

__all__ = ["DEFAULT", "check_out_dims", "in_dim_of", "leaf_in_dims", "query_dims"]

DEFAULT = 0  # torch's default for both: every input's first dim, the batch first
# Dims nest as inputs and results do (pytrees of a few levels); the checks below recurse,
# and a query string's JSON has no depth limit of its own (900 levels: a RecursionError, 500)
MAX_DEPTH = 64


def _check_depth(option: str, value: Any) -> None:
    try:
        wire.check_depth(value, MAX_DEPTH)
    except wire.WireError:
        raise InvalidInput(f"{option} is nested deeper than {MAX_DEPTH} levels") from None


def _is_dim(value: Any) -> bool:
    # within int64: a dim past it is no dim of any array, and cannot travel to the engine
    # (orjson refuses it: a 500 it was, for ?out_dims=99999999999999999999)
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63)


def query_dims(value: str) -> Any:
    """The query string's form: ``1``, ``none``, ``0,none`` (one per input), or JSON
    text for nested dims (``[0,{"w":null,"b":0}]``)."""
    text = value.strip()
    if text[:1] in ("[", "{"):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            raise InvalidInput(f"in_dims / out_dims: {text[:40]!r} is not JSON") from None

    def one(word: str) -> Any:
        word = word.strip()
        if word.lower() in ("none", "null"):
            return None
        try:
            return int(word) if len(word) <= 20 else word
        except ValueError:
            return word  # refused by the checks below, named

    parts = [p for p in text.split(",")]
    return one(text) if len(parts) == 1 else [one(p) for p in parts if p.strip() != ""]


def _bad_dim(option: str, value: Any) -> InvalidInput:
    try:
        shown = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()[:60] if not isinstance(value, str) else repr(value[:40])
    except TypeError:  # an int past 64 bits
        shown = repr(value)[:60]
    return InvalidInput(f"{option}: got {shown} for an input but each dim must be an integer dimension or null "
                        f"(torch's vmap: in_dim must be either an integer dimension or None)" if option == "in_dims" else
                        f"{option}: got {shown} but each dim must be an integer dimension or null "
                        f"(torch's vmap: out_dims must be an int, None or a python collection of ints)")


def _structure(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_structure(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_structure(v)}" for k, v in value.items()) + "}"
    return "*"


def _declared(node: Any) -> str:
    """A declared input's structure, as _structure writes a dims tree."""
    from .registry import Array

    if node is None or isinstance(node, Array):
        return "*"
    if isinstance(node, dict):
        return "{" + ", ".join(f"{k}: {_declared(v)}" for k, v in node.items()) + "}"
    return "[" + ", ".join(_declared(v) for v in node) + "]"


def _expand(dims: Any, node: Any, path: str) -> list[int | None]:
    """One input's in_dims entry -> one dim per leaf of it: an int or None covers its
    whole subtree (torch: in_dims is a prefix of the inputs' pytree), a list or an
    object goes down a declared tuple or dict."""
    from .registry import Array

    if _is_dim(dims):
        if node is None or isinstance(node, Array):
            return [dims]
        items = node.values() if isinstance(node, dict) else node
        return [d for child in items for d in _expand(dims, child, path)]
    if isinstance(dims, list) and isinstance(node, (list, tuple)) and len(dims) == len(node):
        return [d for i, (sub, child) in enumerate(zip(dims, node)) for d in _expand(sub, child, f"{path}[{i}]")]
    if isinstance(dims, dict) and isinstance(node, dict) and set(dims) == set(node):
        return [d for key, child in node.items() for d in _expand(dims[key], child, f"{path}.{key}")]
    if not isinstance(dims, (list, dict)):
        raise _bad_dim("in_dims", dims)
    raise InvalidInput(f"in_dims for input {path!r}: {_structure(dims)} does not match its structure {_declared(node)} "
                       "(torch's vmap: in_dims is not compatible with the structure of `inputs`)")


def leaf_in_dims(spec: FunctionSpec, value: Any) -> tuple[int | None, ...] | None:
    """torch's ``in_dims`` -> one entry per leaf input (``spec.leaf_inputs`` order), or
    None for the default (every leaf's dim 0). An int or null is every input's; a list
    has one entry per input, as torch's tuple (an object: by parameter name), each an
    int, null, or nested as a pytree parameter is declared."""
    if value == DEFAULT and _is_dim(value):
        return None
    _check_depth("in_dims", value)
    names = [inp.name for inp in spec.inputs]
    if _is_dim(value):
        per_input = [value] * len(names)
    elif isinstance(value, list):
        if len(value) != len(names):
            raise InvalidInput(f"in_dims gives {len(value)} entries for the {len(names)} inputs {names} of {spec.name} "
                               "(torch's vmap: in_dims is not compatible with the structure of `inputs`)")
        per_input = value
    elif isinstance(value, dict):
        unknown = sorted(k for k in value if k not in names)
        if unknown:
            raise InvalidInput(f"in_dims names {unknown[:10]}, not inputs of {spec.name}; it takes {names}")
        per_input = [value.get(n, DEFAULT) for n in names]  # left out: torch's default, 0
    else:
        raise _bad_dim("in_dims", value)
    dims = tuple(d for dims_i, inp in zip(per_input, spec.inputs) for d in _expand(dims_i, inp.tree, inp.name))
    if all(d is None for d in dims):
        raise InvalidInput("in_dims is null for every input: nothing to batch over (torch's vmap: Expected at least "
                           "one Tensor to vmap over); leave batched out to compute one example")
    if all(d == 0 for d in dims):
        return None
    return dims


def in_dim_of(name: str, dim: int, ndim: int) -> int:
    """``dim`` of an input of ``ndim`` dimensions, made non-negative; torch's range."""
    if not -ndim <= dim < ndim:
        if ndim == 0:
            raise InvalidInput(f"input {name!r}: batched inputs need a batch dimension, and in_dims gives {dim} for a 0-d "
                               "array (torch's vmap: in_dim must satisfy -0 <= in_dim < 0); give it null to share it")
        raise InvalidInput(f"in_dims gives {dim} for input {name!r}, an array of {ndim} dimensions, so it must satisfy "
                           f"{-ndim} <= in_dim < {ndim} (torch's vmap: Got in_dim={dim} for some input, but that input "
                           f"is a Tensor of dimensionality {ndim} so expected in_dim to satisfy {-ndim} <= in_dim < {ndim}.)")
    return dim % ndim


def check_out_dims(value: Any) -> Any:
    """``out_dims``: an int, null, or a list / object of them nested as the result is
    (torch: a prefix of the outputs' pytree). Its fit to the result is the engine's to
    check, once the result's structure and ranks are known."""
    _check_depth("out_dims", value)
    return _out_dims(value)


def _out_dims(value: Any) -> Any:
    if _is_dim(value):
        return value
    if isinstance(value, list):
        return [_out_dims(v) for v in value]
    if isinstance(value, dict):
        return {k: _out_dims(v) for k, v in value.items()}
    raise _bad_dim("out_dims", value)
