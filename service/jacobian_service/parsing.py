"""Request bodies and query strings -> a validated :class:`~jacobian_service.types.Call`.

Pure functions, no I/O and no torch: they run off the event loop for large bodies.
Options go through a small pydantic model; array data never does (it is decoded
straight to numpy by :mod:`jacobian_client.wire`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Annotated, Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from jacobian_client import wire
from jacobian_client.wire import dtype_name

from .header_params import bounded_field, parameters, split_unquoted
from .responses import echo
from .types import Call, tree_leaves
from .errors import InvalidInput, PayloadTooLarge, SparsityNotFound, UnsupportedMediaType, from_wire
from .registry import (COMPLEX_DTYPES, FLOAT_DTYPES, FLOATING, QUERY_INTEGER as _INTEGER, FunctionSpec, format_shape,
                       shape_fields)
from .vmap_dims import check_out_dims, in_dim_of, leaf_in_dims, query_dims

__all__ = ["KINDS", "OPTIONAL_VECTORS", "OPTION_KINDS", "Options", "check_head", "check_json_charset", "media_type_of",
           "parse_call", "parse_sparsity_query", "unused_options"]

Kind = Literal["jacobian", "hessian", "evaluate", "vjp", "jvp", "hvp"]
KINDS = tuple(wire.RESULT_KEY)  # the computing endpoints, in the order the docs list them
_VECTOR_KEY = {"vjp": "cotangents", "jvp": "tangents", "hvp": "tangents"}
# Vectors a kind may be given besides its own: hvp's cotangents, shaped like the output,
# ask for c . H t (any output) where a scalar function's H t needs none.
OPTIONAL_VECTORS = {"hvp": "cotangents"}
# The kinds each option is for: the one table the parser (which refuses an option on
# another kind), the OpenAPI document (which offers it there only) and the README follow.
# An option a kind does not take was silently ignored on some (batched on a vjp, sparsity
# on an evaluate) and refused on others (rows on a jvp): now each is a 422 naming it and
# the options the kind takes, unless it is given its default (null, false, 0, "dense"),
# which asks for nothing, or cannot change the answer there (_MOOT).
_DERIVATIVES = ("jacobian", "hessian", "vjp", "jvp", "hvp")
OPTION_KINDS: dict[str, tuple[str, ...]] = {
    "argnums": _DERIVATIVES,
    "chunk_size": ("jacobian", "hessian"),  # vjp/jvp/hvp run their vectors in one vmap
    "batched": ("jacobian", "hessian", "evaluate"),
    "in_dims": ("jacobian", "hessian", "evaluate"),
    "out_dims": ("jacobian", "hessian", "evaluate"),
    "return_output": _DERIVATIVES,  # an evaluate's answer is the output
    "rows": ("jacobian",),
    "mode": ("jacobian",),  # a Hessian's strategy is measured, never asked for
    "sparsity": ("jacobian", "hessian"),
    "sparse_format": ("jacobian", "hessian"),
    "batched_vectors": tuple(_VECTOR_KEY),
}
# Options that never change an answer are taken, and left unused, where they do not
# apply, whatever their value: SPEC 3.1 gives one request body for every endpoint and
# says of mode "the result never depends on it"; chunk_size only bounds memory; an
# evaluate's answer is the output whatever argnums or return_output say. A client
# sending one body shape everywhere (as SPEC's example does) must not be refused for
# them. The options that would change what is computed (batched on a vjp, rows on a
# Hessian, sparsity on an evaluate) are refused where they do not apply: ignoring one
# answered another question than the one asked.
_MOOT: dict[str, tuple[str, ...]] = {"chunk_size": KINDS, "mode": KINDS, "argnums": ("evaluate",),
                                     "return_output": ("evaluate",)}


def options_of(kind: str) -> list[str]:
    """The options ``kind`` takes, in the table's order (for messages and docs)."""
    return [name for name, kinds in OPTION_KINDS.items() if kind in kinds]


@functools.cache
def unused_options(kind: str) -> dict[str, bool]:
    """The options ``kind`` does not take, each with whether it is taken there whatever
    its value (moot: _MOOT) or at its default alone: what the parser accepts beyond
    ``options_of(kind)``, and the OpenAPI document's request schema with it."""
    return {name: kind in _MOOT.get(name, ()) for name, kinds in OPTION_KINDS.items() if kind not in kinds}


_INT64_MAX = 2**63 - 1
# Past int64 a number cannot travel to the engine (orjson refuses it): a 500 it was.
_Int64 = Annotated[StrictInt, Field(ge=-_INT64_MAX - 1, le=_INT64_MAX)]


# in_dims / out_dims: an int, null, or nested lists and objects of them (vmap_dims reads them)
_DIMS_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "null"}, {"type": "array", "items": {}},
                                          {"type": "object"}]}


# What argnums the server can take, for the OpenAPI document (the checks are _options's
# and FunctionSpec.argnums'): an int within int64, a name (never empty), a list of at
# least one, none twice. The schema said any integer, string or list, and "", [] and
# [0, 0] (each a 422) were requests a fuzzer built from it as valid.
_ARGNUM_SCHEMA: list[dict[str, Any]] = [{"type": "integer", "minimum": -_INT64_MAX - 1, "maximum": _INT64_MAX},
                                        {"type": "string", "minLength": 1}]
_ARGNUMS_SCHEMA: dict[str, Any] = {"anyOf": [*_ARGNUM_SCHEMA, {"type": "array", "items": {"anyOf": _ARGNUM_SCHEMA},
                                                               "minItems": 1, "uniqueItems": True}]}


class Options(BaseModel):
    """Everything a request may say besides its arrays."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Strict: 0.0 or true are not positions (torch.func refuses them too).
    argnums: StrictInt | StrictStr | list[StrictInt | StrictStr] = Field(
        0, json_schema_extra=_ARGNUMS_SCHEMA, description="int, parameter name, or a list of either"
    )
    # Strict too: JSON has numbers and booleans, so true is no chunk size and "yes" no
    # boolean (the query string's words are read in _query_value).
    chunk_size: StrictInt | None = Field(None, ge=1, le=_INT64_MAX, description="rows (sparse: products) per vmap; null lets the service choose")
    batched: StrictBool = Field(False, description="per-example results over the leading dimension")
    # torch.func.vmap's, checked by vmap_dims (the front end: against declared shapes;
    # the engine: out_dims against the result): JSON's forms of torch's ints, None, tuples and dicts.
    in_dims: Any = Field(
        0, json_schema_extra=_DIMS_SCHEMA, description=("batched: vmap's in_dims, the batch dim of each input: an int (every input), null (an input "
                        "shared by every example), or a list with one entry per input (an object: by name), nested "
                        "as a pytree parameter; negative dims count from the end"))
    out_dims: Any = Field(
        0, json_schema_extra=_DIMS_SCHEMA, description=("batched: vmap's out_dims, where the batch goes in the result: an int (every array, aux and "
                        "output too), or nested as the result is (null: a result the same for every example)"))
    return_output: StrictBool = False
    rows: tuple[_Int64, _Int64] | None = Field(None, description="[start, stop) rows of the flattened output")
    mode: Literal["rev", "fwd", "auto"] | None = Field(
        None, description="rev (default for dense), fwd or auto (default for sparse: fewer products)"
    )
    sparsity: StrictStr = Field(
        "dense", description="jacobian/hessian: dense (v1), auto (detected), or a declared pattern's name"
    )
    sparse_format: Literal["csr", "csc", "coo", "dense"] = Field(
        "csr", description="with sparsity other than dense: the result as CSR, CSC, COO, or a dense 2-D array (streamed as .npy when large)"
    )
    batched_vectors: StrictBool = Field(False, description="vjp/jvp: vectors carry a leading batch dimension")


_DEFAULT_OPTIONS = Options()


_BOOLEANS = frozenset({"batched", "return_output", "batched_vectors"})
_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _query_value(key: str, value: str) -> Any:
    if key in _BOOLEANS:
        return _WORDS.get(value.lower(), value)  # another word stays a string: refused
    if key in ("in_dims", "out_dims"):
        return query_dims(value)
    if key in ("argnums", "rows") and "," in value:
        return [_query_value(key, v) for v in value.split(",") if v != ""]
    if value.lower() in ("", "null", "none") and key in ("chunk_size", "rows"):
        return None
    if key in _INTEGER_OPTIONS and _INTEGER.fullmatch(value):
        # int() refuses more than 4,300 digits with a ValueError, which was a 500
        # internal_error (?chunk_size=999...9); no option means anything past int64.
        if len(value.lstrip("-").lstrip("0")) > 19:
            raise _past_int64(key, value)
        return int(value)
    return value


# The integer options: an integer past int64 there is refused in one wording, from the
# query string or from JSON.
_INTEGER_OPTIONS = ("argnums", "rows", "chunk_size")


def _past_int64(key: str, value: Any) -> InvalidInput:
    return InvalidInput(f"{key}: {echo(str(value), 40)} is beyond the range of int64")


def _check_int64(raw: Mapping[str, Any]) -> None:
    """An integer option (or an item of one) past int64 from JSON, refused as the query
    string's is: JSON's integers past float64 are read exactly (wire.loads), and said
    'Input should be less than or equal to 9223372036854775807', or quoted whole (a
    400-digit argnums), where the query string said 'beyond the range of int64'."""
    for key in _INTEGER_OPTIONS:
        value = raw.get(key)
        for v in value if isinstance(value, list) else (value,):
            if v.__class__ is int and not -_INT64_MAX - 1 <= v <= _INT64_MAX:
                raise _past_int64(key, v)


def _is_argnum(a: Any) -> bool:
    return isinstance(a, str) or (isinstance(a, int) and not isinstance(a, bool))


def _check_applies(kind: str, raw: Mapping[str, Any]) -> None:
    """An unknown option, or one ``kind`` does not take given anything but its default
    (and not moot there, ``_MOOT``): a 422 naming it and what ``kind`` takes (pydantic's "Extra inputs are not permitted"
    named neither the endpoint nor the options it has)."""
    if not raw:  # most requests give no option: nothing to refuse
        return
    takes = options_of(kind)
    unknown = sorted(k for k in raw if k not in OPTION_KINDS)
    if unknown:
        raise InvalidInput(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(echo, unknown))}; "
                           f"{kind} takes {', '.join(takes)}")
    refused = [k for k, any_value in unused_options(kind).items()
               if k in raw and not any_value and raw[k] != Options.model_fields[k].default]
    if refused:
        where = "; ".join(f"{k} is for {_and(OPTION_KINDS[k])}" for k in refused)
        raise InvalidInput(f"{', '.join(refused)} {'does' if len(refused) == 1 else 'do'} not apply to {kind} "
                           f"({where}); {kind} takes {', '.join(takes)}")


def _and(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _options(raw: Mapping[str, Any], kind: str | None = None) -> Options:
    if kind is not None:
        _check_applies(kind, raw)
    if not raw:  # most requests: the defaults, validated once (Options is frozen)
        return _DEFAULT_OPTIONS
    _check_int64(raw)
    argnums = raw.get("argnums", 0)
    if not (_is_argnum(argnums) or (isinstance(argnums, list) and all(_is_argnum(a) for a in argnums))):
        raise InvalidInput(f"argnums must be an int, a parameter name, or a list of them; got {argnums!r}")
    try:
        return Options.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidInput(problems) from None


def _decode(obj: Any, default_dtype: str | None, limits: wire.Limits, name: str | None = None) -> tuple[np.ndarray, str]:
    """One input leaf's JSON array; a refusal names the input (``name``: its path,
    ``params.w``, ``pair[0]``), as a shape's does and the vectors' (cotangents[0]: ...):
    "array data holds 1.5, not a whole number" said nothing of which of a function's
    integer inputs held it."""
    try:
        arr, sent = wire.decode_json_array(obj, default_dtype, limits)
    except wire.WireError as exc:
        raise from_wire(wire.WireError(f"input {name!r}: {exc}", exc.code) if name else exc) from None
    return arr, sent or dtype_name(arr.dtype)


def _leading_shape(obj: Any) -> tuple[int, ...]:
    """The shape a nested list has if it is a regular array: its length, its first
    item's length, and so on down (a number: ``()``). Only first items are looked at."""
    dims: list[int] = []
    while isinstance(obj, list):
        dims.append(len(obj))
        if not obj:
            break
        obj = obj[0]
    return tuple(dims)


def _is_vector_node(obj: Any) -> bool:
    """In cotangents / tangents, an object that is not an array is a dict node, and a
    list holding objects (or such lists) a tuple node; a list of numbers is one array.
    So is a list whose items differ in shape: the leaves of a tuple of differently
    shaped arrays written as plain lists (``[[1, 1, 1], 0.5]``: a vector's and a 0-d
    input's tangents, ``argnums=[0, 2]``), which as one array was a 422 "not a regular
    array". Only a list's items and their first items are looked at, never every number."""
    if isinstance(obj, dict):
        # An array object's shape is a list: one whose "shape" is an object is the dict
        # node of an output keyed "shape" and "data" (as torch's pytree takes any key),
        # whose cotangents were read as one array, a 422 "'dtype' must be a string" or
        # "'shape' must be a list of integers" on every vjp and hvp of it.
        return not wire.is_array_object(obj) or isinstance(obj["shape"], dict)
    if not isinstance(obj, list) or not obj:
        return False
    if isinstance(obj[0], list) and _is_vector_node(obj[0]):
        return True
    head = _leading_shape(obj[0])
    for v in obj:
        if isinstance(v, dict) or (_leading_shape(v) if isinstance(v, list) else ()) != head:
            return True
    return False


class _Room:
    """The arrays a body's cotangents or tangents may still hold, each key its own room:
    ``MAX_NPZ_MEMBERS``, or as many as the function has input arrays where it has more
    (tangents are shaped like them), in JSON and in an ``.npz`` alike. The same vectors as
    JSON were taken whatever their number, and each leaf costs the front end's event loop
    its decode, its frame to the engine and the engine its own (~50 us together): 50,000
    ragged one-number leaves in a 250 KB vjp body held every other client, /healthz
    included, for 4 s. An ``.npz`` counted its inputs' members against the same 64 as well
    (a function of 40 input arrays: its jvp's 40 tangents a 413 there, 200 in JSON)."""

    __slots__ = ("inputs", "left", "most")

    def __init__(self, most: int, inputs: int) -> None:
        self.most = self.left = most
        self.inputs = inputs

    @classmethod
    def of(cls, spec: FunctionSpec, limits: wire.Limits) -> _Room:
        return cls(max(limits.max_members, len(spec.leaf_inputs)), len(spec.leaf_inputs))

    def take(self, key: str, count: int = 1) -> None:
        self.left -= count
        if self.left < 0:
            raise PayloadTooLarge(
                f"{key} hold more than {self.most} arrays (an empty object counts as one); the limit is {self.most} "
                f"(MAX_NPZ_MEMBERS, or the function's input arrays where more): {_room_advice([key], self.inputs)}",
                fields={"field": key, "limit": self.most})


def _room_advice(keys: list[str], inputs: int) -> str:
    """What to do about vectors past their room, for each key sent: tangents are shaped
    like the inputs, so past the room they are more than the function has (raising
    MAX_NPZ_MEMBERS would not make them fit); cotangents like the output, which may have
    more arrays than that. (The tangents' 413 said the vjp's advice, the only one.)"""
    advice = {
        "tangents": f"tangents are shaped like the inputs, one array for each of the function's {inputs} input "
                    f"array{'s' if inputs != 1 else ''}",
        "cotangents": "cotangents are shaped like the output, one array for each of its arrays: an output with more "
                      "arrays than that needs MAX_NPZ_MEMBERS raised",
    }
    return "; ".join(advice[key] for key in keys)


def _vector_tree(obj: Any, limits: wire.Limits, path: str, room: _Room) -> Any:
    """Cotangents/tangents: one array, or lists (tuples) and dicts of them, nested as the
    responses nest trees. A leaf that cannot be read is an error naming its path
    (``cotangents.a[0]``), as an input leaf's is. Past ``room``'s arrays, a 413 before
    any more is read."""
    if isinstance(obj, dict) and _is_vector_node(obj):
        if not obj:  # (no array, but a node sent on to the engine all the same: 20,000 `{}` cost as arrays do)
            room.take(path.partition(".")[0].partition("[")[0])
        return {k: _vector_tree(v, limits, f"{path}.{k}", room) for k, v in obj.items()}
    if _is_vector_node(obj):
        return [_vector_tree(v, limits, f"{path}[{i}]", room) for i, v in enumerate(obj)]
    room.take(path.partition(".")[0].partition("[")[0])
    try:
        arr, sent = wire.decode_json_array(obj, None, limits)
    except wire.WireError as exc:
        raise from_wire(wire.WireError(f"{path}: {exc}", exc.code)) from None
    # Plain numbers carry no dtype (as an input's take the declared one): [1, 2, 3] is
    # three numbers, not int64 tangents, which torch.func.jvp refuses (the engine too)
    return arr.astype(np.float64) if sent is None and arr.dtype.kind in "iu" else arr


def _engine_vectors(tree: Any) -> Any:
    """The form the engine takes: one array, or lists (tuples) and dicts of them, nested
    as sent. The engine matches them against the output (or the inputs): nested as it
    is, or a flat list of all its leaves in pytree order, or one leaf (wire.vector_leaves
    says so). A tree of lists was flattened here in reading order, so any nesting of the
    right leaves in order was taken: ``[[v1, [v2, v3]]]`` for an output ``(x, (x, x))``
    (torch.func.vjp: "Expected pytree structure of cotangents to be the same as pytree
    structure of outputs"), or ``[v1, [v2], v3]``, answered 200, neither nested as the
    output is nor flat."""
    return tree


def _vector_limits(key: str, limits: wire.Limits, spec: FunctionSpec | None = None) -> wire.Limits:
    """The limits a request's ``key`` vectors are read under: cotangents may be complex
    (a complex output's, which torch.func.vjp pulls back: the engine checks their kind
    against the output's), and so may tangents where the function declares a complex
    input (the engine checks each against its input's kind); a real function's tangents
    may not. Complex cotangents were refused as an unknown dtype, so a complex output's
    vjp had none to send."""
    if key == "cotangents" or (key == "tangents" and spec is not None and spec.takes_complex):
        return dataclasses.replace(limits, complex=True)
    return limits


def _leaf_limits(leaf: Any, limits: wire.Limits) -> wire.Limits:
    """The limits an input leaf's array is read under: complex for an input declared
    complex64 or complex128 (torch.func's vjp, jvp and hvp differentiate it), real for
    every other (a complex array sent there refused in the wire's words, as before)."""
    return dataclasses.replace(limits, complex=True) if leaf.dtype in COMPLEX_DTYPES else limits


def _complex_heads(spec: FunctionSpec) -> set[str]:
    """The ``.npz`` member heads (name, position) of the inputs with a leaf declared
    complex: their members may be complex (each leaf checked in parse_call)."""
    return {head for i, inp in enumerate(spec.inputs) if any(leaf.dtype in COMPLEX_DTYPES for leaf in inp.leaves())
            for head in (inp.name, str(i))}


def _of_key(member: str, key: str | None) -> bool:
    """Whether an ``.npz`` member is one of ``key``'s vectors (``cotangents``, or a tree's
    ``cotangents/0``...)."""
    return bool(key) and (member == key or member.startswith(f"{key}/"))


def _check_real(members: dict[str, np.ndarray], cotangents: str | None, spec: FunctionSpec) -> None:
    """An ``.npz``'s members, read under :func:`_vector_limits`'s cotangents' limits:
    those that are not ``cotangents``, an input declared complex's or (where the
    function declares one) ``tangents`` refused where complex, in the words a member of
    any other dtype the service does not take is."""
    heads = _complex_heads(spec) if spec.takes_complex else set()
    for name, arr in members.items():
        if arr.dtype.kind == "c" and not _of_key(name, cotangents) and name.partition("/")[0] not in heads \
                and not (heads and _of_key(name, "tangents")):
            try:
                wire.check_request_dtype(arr.dtype)
            except wire.WireError as exc:
                raise from_wire(wire.WireError(f"member {name + '.npy'!r}: {exc}", exc.code)) from None


def _split_members(members: dict[str, np.ndarray], vector_key: str | None) -> tuple[dict[str, np.ndarray], Any]:
    inputs: dict[str, np.ndarray] = {}
    vectors: dict[str, np.ndarray] = {}
    for name, arr in members.items():
        if _of_key(name, vector_key):
            vectors[name.removeprefix(vector_key).removeprefix("/")] = arr
        else:
            inputs[name] = arr
    if not vectors:
        return inputs, None
    try:
        # Names kept as dict keys: `cotangents/0` may be a tuple output's first entry or
        # the key "0" of a dict output, which only the engine (after the forward pass) knows.
        return inputs, wire.tree_from_paths(vectors, f"{vector_key} member", positions=False)
    except wire.WireError as exc:
        raise from_wire(exc) from None


def _by_name(spec: FunctionSpec, given: Mapping[str, Any]) -> list[Any]:
    """Inputs given by parameter name (or position, as in an .npz) -> positional list."""
    names = [inp.name for inp in spec.inputs]
    unknown = sorted(set(given) - set(names) - {str(i) for i in range(len(names))})
    out: list[Any] = []
    for i, name in enumerate(names):
        if name in given and str(i) in given and name != str(i):
            raise InvalidInput(f"input {name!r} is given twice (by name and as {i})")
        if name in given:
            out.append(given[name])
        elif str(i) in given:
            out.append(given[str(i)])
        else:
            raise InvalidInput(f"missing input {name!r}; {spec.name} takes {names}" + _unknown(unknown),
                               fields=_missing_fields(names, [n for i, n in enumerate(names)
                                                              if n not in given and str(i) not in given]))
    if unknown:
        extra = ""
        if set(given) == {str(i) for i in range(len(given))}:
            # positions past the last input: an SDK call with one input too many (f(x, y)
            # of f(x)) read "unknown inputs ['1']", not that it gave more than f takes.
            # Only the keys the service reads as positions (str(i): "0", "1", ...), all of
            # them: str.isdigit() holds for "²" (int() raised, a 500) and "٣" (read as 3),
            # and keys "0" and "7" are no 8 inputs.
            extra = (f": {len(names)} input{'s' if len(names) != 1 else ''}, and {len(given)} were given "
                     "by position")
        raise InvalidInput(f"unknown inputs {unknown}; {spec.name} takes {names}{extra}" + _unknown([], unknown))
    return out


def _short_fields(spec: FunctionSpec, given: int) -> dict[str, Any]:
    """``missing`` / ``inputs`` for inputs given by position (a JSON list, the sparsity
    query's shapes) that stop short: those past the last given; none for too many."""
    names = [inp.name for inp in spec.inputs]
    return _missing_fields(names, names[given:]) if given < len(names) else {}


def _missing_fields(names: list[str], missing: list[str]) -> dict[str, Any]:
    """A missing input's problem members: ``missing`` (every input left out) and
    ``inputs`` (what the function takes, in order), for a client to say in its own terms
    (the SDK: which inputs to pass, not which body format carries them). The function's
    names only: none of the request's keys, which may be as long as the body."""
    return {"missing": missing, "inputs": names}


def _unknown(shown: list[str], among: list[str] | None = None) -> str:
    """What a "missing" or "unknown" input's detail adds: the names that were sent, and,
    for numpy.savez's own positional names (``np.savez(f, x, y)`` writes ``arr_0``,
    ``arr_1``: a new user's first .npz), how to name them instead."""
    among = shown if among is None else among
    text = f"; unknown {shown[:10]}" if shown else ""
    if any(re.fullmatch(r"arr_\d+", name) for name in among):
        text += ("; numpy.savez(f, a, b) names its arrays arr_0, arr_1: name them by parameter, "
                 "numpy.savez(f, x=a, ...), or by position, numpy.savez(f, **{'0': a, '1': b})")
    return text


def _npz_inputs(spec: FunctionSpec, members: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, str]]:
    """``.npz`` input members -> one ``(array, dtype)`` per leaf. A pytree parameter's
    leaves are members named by their paths below it (``params/w``, ``0/w``,
    ``pair/1/0``), exactly as declared; an array input is one member (``x`` or ``0``)."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in members.items():
        if "" in name.split("/"):  # `x/` beside `x` spelled the same input twice, the last winning
            raise InvalidInput(f".npz member {echo(name)}: empty name in the path")
        head, _, rest = name.partition("/")
        grouped.setdefault(head, {})[rest] = arr
    out: list[tuple[np.ndarray, str]] = []
    for inp, sub in zip(spec.inputs, _by_name(spec, grouped)):
        want = inp.member_paths()
        if set(sub) != set(want):
            label = next((h for h, g in grouped.items() if g is sub), inp.name)
            if inp.tree is None:
                raise InvalidInput(f"input {inp.name!r} is one array: send it as the member {label!r}, "
                                   f"not {sorted(f'{label}/{k}' for k in sub if k)[:5]}")
            missing = [f"{label}/{k}" for k in want if k not in sub]
            extra = sorted(f"{label}/{k}" if k else label for k in sub if k not in want)
            raise InvalidInput(
                f"input {inp.name!r} is a tree of {len(want)} arrays, members {[f'{label}/{k}' for k in want]}"
                + (f"; missing {missing}" if missing else "") + (f"; unknown {extra[:10]}" if extra else "")
            )
        out.extend((sub[k], dtype_name(sub[k].dtype)) for k in want)
    return out


_NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first local header, or an empty zip's end record


def _mislabelled(exc: wire.WireError, media_type: str, body: bytes) -> wire.WireError:
    """An unreadable body that is plainly another of the three formats, refused in the
    words of the one its ``Content-Type`` named: an ``.npy`` posted as JSON was "not
    UTF-8: byte 0x93 at offset 0 ... (a latin-1 or cp1252 text must be re-encoded)", a
    JSON body posted as ``.npy`` "bad magic". The refusal names the header to send."""
    if exc.code != "malformed_body":
        return exc
    head = bytes(body[:8])
    if head.startswith(b"\x93NUMPY"):
        looks = wire.NPY, "an .npy (numpy.save)"
    elif head[:4] in _NPZ_MAGIC:
        looks = wire.NPZ, "a zip archive (numpy.savez)"
    elif head.lstrip()[:1] in (b"{", b"["):
        looks = wire.JSON, "JSON"
    else:
        return exc
    if looks[0] == media_type:
        return exc
    return wire.WireError(f"{exc}; the body looks like {looks[1]}: send it with Content-Type: {looks[0]}", exc.code)


def _arity(spec: FunctionSpec, given: list[Any]) -> str:
    """A positional ``inputs`` of the wrong length. Its commonest cause is one array sent
    as the list itself (``{"inputs": [1, 2, 3]}`` for ``f(x)``: "takes 1 inputs, got 3"),
    which the bare count left the caller to puzzle out: the refusal shows the shape."""
    names = [i.name for i in spec.inputs]
    text = f"{spec.name} takes {len(names)} input{'s' if len(names) != 1 else ''} {names}, got {len(given)}"
    if len(names) == 1 and len(given) > 1 and not any(isinstance(v, (list, dict)) for v in given):
        return (f"{text}: 'inputs' holds one entry per input, so its one array goes as "
                f'{{"inputs": [[1, 2, 3]]}} (a list of one array) or {{"inputs": {{{wire.dumps(names[0]).decode()}: [1, 2, 3]}}}}')
    return f"{text}: 'inputs' holds one entry per input, in order (or an object keyed by their names)"


def _check_differentiable(spec: FunctionSpec, name: str, declared: str, dtype: str, sent: str) -> None:
    """Only floating inputs are differentiated. A `floating` input sent as integers or
    booleans (an .npy or an explicit dtype; plain JSON numbers carry none and take
    float32) is what jacrev refuses: "only Tensors of floating point dtype can require
    gradients". The refusal says what to do: a new user whose first input is an index
    (argnums defaults to 0) was told only what was wrong, not that argnums picks
    another input, nor which ones could be picked."""
    if dtype in COMPLEX_DTYPES:
        return  # (declared so: vjp, jvp and hvp differentiate it; _check_real_inputs refuses the rest)
    if dtype not in FLOAT_DTYPES or declared == FLOATING and sent not in FLOAT_DTYPES:
        if declared == FLOATING:
            hint = "send it as floats (a float32 or float64 array; plain JSON numbers without a dtype are float32)"
        else:
            floating = [i.name for i in spec.inputs
                        if all(leaf.dtype == FLOATING or leaf.dtype in FLOAT_DTYPES for leaf in i.leaves())]
            if floating:
                hint = (f"{spec.name} declares it {declared}: pick the inputs to differentiate with argnums (by "
                        f"position or name; left out, 0: the first), among {floating}")
            else:  # ("among []" left the caller nothing to pick, and no way forward)
                hint = (f"{spec.name} declares no floating input, so it has no derivative to compute (its "
                        f"/evaluate serves it); to differentiate one, its author declares it dtype='floating' "
                        f"(the default) or a float dtype")
        raise InvalidInput(f"input {name!r} is {sent}; only floating inputs can be differentiated: {hint}")


def _check_real_inputs(spec: FunctionSpec, kind: str, dtypes: list[str], mode: str | None = None) -> None:
    """``jacobian`` and ``hessian`` of a function called with a complex input, any one
    (not only those differentiated: torch checks every argument), are what torch.func
    refuses: jacrev and jacfwd (so hessian, jacfwd of jacrev) raise "Expected all inputs
    to be real". The request's 422 in those words, before any compute, naming the input,
    whose ``vjp``, ``jvp`` and ``hvp`` torch.func answers (its conjugate Wirtinger
    convention: the pullback of a real output's cotangent is the conjugate gradient).
    ``mode=fwd``'s Jacobian is quoted as jacfwd's (torch's test_complex_error asks each)."""
    if kind not in ("jacobian", "hessian"):
        return
    for i, (dtype, inp) in enumerate(zip(dtypes, spec.leaf_inputs)):
        if dtype in COMPLEX_DTYPES:
            said = ("torch.func.hessian: jacfwd" if kind == "hessian" else "torch.func.jacfwd: jacfwd" if mode == "fwd"
                    else "torch.func.jacrev: jacrev")
            raise InvalidInput(f"input {inp.name!r} is {dtype}: torch.func has no {kind} of a function of complex "
                               f"inputs ({said}: Expected all inputs to be real but received complex tensor at "
                               f"flattened input idx: {i}); vjp, jvp and hvp differentiate it",
                               fields={"unsupported": "complex_input"})


def _check_fits(name: str, arr: np.ndarray, target: np.dtype) -> None:
    """An integer array cast to a narrower integer input wraps what does not fit (an
    int64 2**40 + 3 for an int32 input computed with 3, a -1 for uint8 with 255), where
    the same number sent plain is refused: refuse it too. Floats keep numpy's cast
    (out of range is inf, as torch's ``.to`` gives)."""
    if target.kind not in "iu" or arr.dtype.kind not in "iu" or not arr.size:
        return
    info = np.iinfo(target)
    low, high = arr.min(), arr.max()
    if low < info.min or high > info.max:
        bad = int(low if low < info.min else high)
        raise InvalidInput(f"input {name!r}: {bad} does not fit {target.name}")


_SCALARS = frozenset({int, float, str, bool, type(None)})
_INTEGER_DTYPES = ("int", "uint")


def _names_integer_dtype(doc: Any) -> bool:
    """Whether an array object of a JSON body names an integer dtype. Such an array's
    numbers must be read exactly whatever the function's inputs are: orjson reads every
    integer literal within 1024 below -2**63 as the float -2**63, which fits int64, so
    ``{"dtype": "int64", "data": [-9223372036854775809]}`` sent to a float input (an
    ``evaluate``, int64 cotangents) was computed with -2**63, answered 200, where one past
    the top, 2**63, is a 422. (A float function's body is read as orjson reads it, and
    only one that names an integer dtype is read again, exactly: the search for such
    literals costs ~15 % of a large body's parse.) Objects are walked, and lists that
    hold more than numbers; a list of numbers is judged by its items' types, in C, as
    ``wire.check_depth`` does, and an array's data is not looked into at all. A body of
    plain lists has no object below its top: the caller skips it by its member count."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            dtype = node.get("dtype")
            if isinstance(dtype, str) and dtype.startswith(_INTEGER_DTYPES):
                return True
            if not wire.is_array_object(node):
                stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif node and (isinstance(node[0], (dict, list)) or not _SCALARS.issuperset(map(type, node))):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return False


def _no_inputs(spec: FunctionSpec, doc: dict[str, Any]) -> str:
    """A body without ``inputs`` was refused "the body has no 'inputs'", whatever it held:
    a new user's ``{"state": [...], "dt": 0.1}`` (the inputs at the top) or ``{"input":
    ...}`` was not told what the body should look like."""
    names = [i.name for i in spec.inputs]
    shape = "{" + ", ".join(f"{wire.dumps(n).decode()}: ..." for n in names[:8]) + (", ..." if len(names) > 8 else "") + "}"
    keys = list(doc)[:8]
    shown = ", ".join(repr(k) if len(k) <= 40 else repr(k[:40] + "...") for k in keys)
    if keys and set(keys) & set(names):
        why = f"the body's keys ({shown}) are {spec.name}'s inputs: they go under 'inputs'"
    elif keys:
        why = f"it has {shown}"
    else:
        why = "it is empty"
    return f"the body has no 'inputs' ({why}); send {{\"inputs\": {shape}}} (or a list of them, in order)"


def _json_parts(spec: FunctionSpec, kind: Kind, doc: dict[str, Any], raw_options: dict[str, Any],
                limits: wire.Limits) -> tuple[list[tuple[np.ndarray, str]], Any, Any]:
    """A JSON body's inputs (arrays and the dtypes sent), vectors and optional vectors;
    its options go into ``raw_options`` (beside the query's)."""
    vector_key = _VECTOR_KEY.get(kind)
    extra_key = OPTIONAL_VECTORS.get(kind)
    vectors: Any = None
    extra: Any = None
    if "inputs" not in doc:
        raise InvalidInput(_no_inputs(spec, doc))
    given = doc.pop("inputs")
    if vector_key:
        if vector_key not in doc:
            raise InvalidInput(f"{kind} needs '{vector_key}'")
        room = _Room.of(spec, limits)
        vectors = _engine_vectors(_vector_tree(doc.pop(vector_key), _vector_limits(vector_key, limits, spec),
                                               vector_key, room))
    if extra_key and extra_key in doc:
        extra = _engine_vectors(_vector_tree(doc.pop(extra_key), _vector_limits(extra_key, limits, spec), extra_key,
                                             _Room.of(spec, limits)))
    both = sorted(set(doc) & set(raw_options))
    if both:  # which one was meant? (the body's won, silently)
        raise InvalidInput(f"options {both} are given in both the query string and the body; give each once")
    raw_options.update(doc)
    if isinstance(given, dict):
        given = _by_name(spec, given)
    elif not isinstance(given, list):
        raise InvalidInput("'inputs' must be a list (positional) or an object (by name)")
    elif len(given) != len(spec.inputs):
        # (too few: the members a body by name or an .npy gets for the same inputs left
        # out; a page or the SDK read them there and found none here)
        raise InvalidInput(_arity(spec, given), fields=_short_fields(spec, len(given)))
    arrays = [
        leaf
        for obj, inp in zip(given, spec.inputs)
        for leaf in inp.match(obj, lambda value, leaf: _decode(value, leaf.default_dtype, _leaf_limits(leaf, limits),
                                                               leaf.name))
    ]
    return arrays, vectors, extra


def parse_call(
    spec: FunctionSpec,
    kind: Kind,
    media_type: str,
    body: bytes,
    query: Mapping[str, str],
    limits: wire.Limits,
    containers: int | None = None,
) -> Call:
    """Decode and check a request: arity, shapes, dtypes and argnums, before any compute.
    ``containers``: a JSON body's count of ``[`` and ``{`` bytes, where the caller has it
    (``wire.check_depth``: the route counts a small body's; a large one is not counted
    again here, two more passes over it for a scan that may cost less)."""
    vector_key = _VECTOR_KEY.get(kind)
    raw_options: dict[str, Any] = {k: _query_value(k, v) for k, v in query.items()}
    vectors: Any = None
    extra_key = OPTIONAL_VECTORS.get(kind)
    extra: Any = None
    try:
        if media_type == wire.JSON:
            doc = wire.loads(body, exact_integers=spec.takes_integers, max_depth=limits.max_json_depth)
            members = wire.check_depth(doc, limits.max_json_depth, containers)
            wire.check_unique_keys(body, members)
            if not isinstance(doc, dict):
                raise InvalidInput("the body must be a JSON object with an 'inputs' member")
            if not spec.takes_integers and members > len(doc) and _names_integer_dtype(doc):
                doc = wire.loads(body, exact_integers=True, max_depth=limits.max_json_depth)  # (rare: read again, its integers exact)
            query_options = dict(raw_options)
            try:
                arrays, vectors, extra = _json_parts(spec, kind, doc, raw_options,
                                                     dataclasses.replace(limits, float_texts=True))
            except wire.FloatTexts:
                # (rare: an integer array's data written as floats, each whole by its
                # double) read again, each float with its text: 1.0000000000000000001 and
                # 1e-400 are not the whole numbers 1 and 0 their doubles are, and an int64
                # input computed with them, silently, where 1.5 is a 422 (wire._whole_texts)
                doc = wire.loads(body, exact_integers=True, max_depth=limits.max_json_depth, float_texts=True)
                raw_options = query_options
                arrays, vectors, extra = _json_parts(spec, kind, doc, raw_options, limits)
        elif media_type == wire.NPY:
            _check_npy_carries(spec, kind)
            try:
                arr = wire.read_npy(body, _leaf_limits(spec.leaf_inputs[0], limits) if spec.inputs else limits)
            except wire.WireError as exc:
                if exc.code != "invalid_input":  # (the body's: unreadable, too large)
                    raise
                # the array's (its dtype): named as a JSON body's input is (_decode)
                raise wire.WireError(f"input {spec.inputs[0].name!r}: {exc}", exc.code) from None
            arrays = [(arr, dtype_name(arr.dtype))]
        elif media_type == wire.NPZ:
            # the inputs' members, and each vector key its own room beside them (_Room), as in JSON
            keys = [k for k in (vector_key, extra_key) if k]
            most = max(limits.max_members, len(spec.leaf_inputs) + len(keys) * _Room.of(spec, limits).most)
            try:
                members = wire.read_npz(body, dataclasses.replace(_vector_limits("cotangents", limits), max_members=most))
            except wire.WireError as exc:
                if not keys or exc.code != "payload_too_large" or "members" not in str(exc):
                    raise
                room = _Room.of(spec, limits).most  # said as JSON's refusal says it: per key
                raise PayloadTooLarge(
                    f".npz has more than {most} members: the function's {len(spec.leaf_inputs)} input arrays and "
                    f"{room} arrays of {' and of '.join(keys)}; the limit is {room} arrays of each (MAX_NPZ_MEMBERS, "
                    f"or the function's input arrays where more): {_room_advice(keys, len(spec.leaf_inputs))}",
                    fields={"field": keys[0], "limit": room}) from None
            for key in keys:
                _Room.of(spec, limits).take(key, sum(1 for m in members if _of_key(m, key)))
            if len(members) > limits.max_members and len(members) - sum(
                    1 for m in members for k in keys if _of_key(m, k)) > len(spec.leaf_inputs):
                # what is left is an input's or no one's: the .npz's own limit, as before
                raise PayloadTooLarge(f".npz has {len(members)} members; the limit is {limits.max_members}")
            _check_real(members, "cotangents" if "cotangents" in (vector_key, extra_key) else None, spec)
            given_by_name, vectors = _split_members(members, vector_key)
            vectors = _engine_vectors(vectors)
            if extra_key:
                given_by_name, extra = _split_members(given_by_name, extra_key)
                extra = _engine_vectors(extra)
            if vector_key and vectors is None:
                raise InvalidInput(f"{kind} needs '{vector_key}' members in the .npz")
            arrays = _npz_inputs(spec, given_by_name)
        else:
            raise _unsupported(media_type)
    except wire.WireError as exc:
        raise from_wire(_mislabelled(exc, media_type, body)) from None

    options = _options(raw_options, kind)
    _check_options(spec, kind, options)
    positions, as_tuple = _positions(spec, kind, options)
    argnums = spec.leaf_argnums(positions)
    in_dims, out_dims = _per_example(spec, options)

    args: list[np.ndarray] = []
    dtypes: list[str] = []
    bindings: dict[str, tuple[int, str]] = {}
    batch_sizes: set[int] = set()
    for i, ((arr, sent), inp) in enumerate(zip(arrays, spec.leaf_inputs)):
        if arr.dtype.kind == "c" and inp.dtype not in COMPLEX_DTYPES:
            # (a tree input's real leaf, its .npz read beside a complex one's: the readers
            # refuse every other complex array for a real input, in these words)
            try:
                wire.check_request_dtype(arr.dtype)
            except wire.WireError as exc:
                raise from_wire(wire.WireError(f"input {inp.name!r}: {exc}", exc.code)) from None
        dtype = inp.resolve_dtype(sent)
        shape = arr.shape
        dim = in_dims[i] if in_dims is not None else 0
        if options.batched and dim is not None:
            if arr.ndim == 0 and in_dims is None:
                raise InvalidInput(f"input {inp.name!r}: batched inputs need a leading batch dimension; in_dims null "
                                   "shares one input with every example (torch's vmap: Got in_dim=0 for some input, "
                                   "but that input is a Tensor of dimensionality 0)",
                                   fields=shape_fields("inputs", inp.name, ["B", *(inp.shape or ())], ()))
            dim = in_dim_of(inp.name, dim, arr.ndim)
            batch_sizes.add(shape[dim])
            shape = shape[:dim] + shape[dim + 1:]
        try:
            inp.bind(tuple(shape), bindings)
        except InvalidInput as exc:
            if not options.batched:
                raise
            # The members say the whole array's shapes, the batch's dimension "B" where
            # it goes (none for a shared input), as the detail says them
            expected = list(exc.fields["expected_shape"])
            if dim is not None:
                expected.insert(dim, "B")
            fields = shape_fields("inputs", inp.name, expected, arr.shape)
            if in_dims is not None:
                where = "shared (in_dims null)" if dim is None else f"batched over dim {dim} (in_dims)"
                raise InvalidInput(f"{exc.detail}, for each example: input {inp.name!r} of shape "
                                   f"{format_shape(arr.shape)} is {where}", fields=fields) from None
            # Said of the example alone ("expected shape (n,), got ()"), the 422 of a
            # request sent with batched=true and one example's inputs (Swagger UI's
            # example, the batched box ticked) did not say where the dimension went.
            raise InvalidInput(f"{exc.detail}, for each example: batched=true takes the leading dimension of "
                               f"{format_shape(arr.shape)} as the batch ({arr.shape[0]} examples); send "
                               f"(batch,) + {format_shape(inp.shape)}", fields=fields) from None
        wire_dtype = "float32" if dtype == "bfloat16" else dtype
        if arr.dtype != np.dtype(wire_dtype):
            _check_fits(inp.name, arr, np.dtype(wire_dtype))
            with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf
                arr = arr.astype(wire_dtype)
        args.append(arr)
        dtypes.append(dtype)
    if len(batch_sizes) > 1:
        raise InvalidInput(f"batched inputs disagree on the batch size: {sorted(batch_sizes)} (torch's vmap: Expected "
                           "all tensors to have the same size in the mapped dimension)")
    if extra is not None and options.batched_vectors:
        _check_pairs(vector_key or "", vectors, extra_key or "", extra)
    if kind != "evaluate":
        _check_real_inputs(spec, kind, dtypes, options.mode)
        for i in argnums:
            _check_differentiable(spec, spec.leaf_inputs[i].name, spec.leaf_inputs[i].dtype, dtypes[i], arrays[i][1])
    return Call(
        spec=spec,
        args=args,
        dtypes=dtypes,
        argnums=argnums,
        as_tuple=as_tuple,
        positions=positions if spec.has_trees else None,
        chunk_size=options.chunk_size,
        batched=options.batched,
        in_dims=in_dims,
        out_dims=out_dims,
        mode=options.mode or ("rev" if options.sparsity == "dense" else "auto"),
        rows=options.rows,
        return_output=options.return_output,
        vectors=vectors,
        cotangents=extra,
        batched_vectors=options.batched_vectors,
        sparsity=options.sparsity,
        sparse_format=options.sparse_format,
    )


def _positions(spec: FunctionSpec, kind: str, options: Options) -> tuple[tuple[int, ...], bool]:
    """The parameters ``argnums`` selects, and whether as a tuple (``spec.argnums``)."""
    if kind == "evaluate" and not spec.inputs:
        # Nothing to differentiate, nothing to select: evaluate answers f(), where the
        # default argnums=0 was a 422 "out of range" for a function that takes no inputs
        if options.batched:
            raise InvalidInput(f"batched needs inputs to batch over; {spec.name} takes none")
        return (), False
    return spec.argnums(options.argnums)


def _per_example(spec: FunctionSpec, options: Options) -> tuple[Any, Any]:
    """``in_dims`` (one per leaf input; None unless batched) and ``out_dims``, checked
    against the function's inputs."""
    given = [k for k in ("in_dims", "out_dims") if not (type(getattr(options, k)) is int and getattr(options, k) == 0)]
    if not options.batched and given:
        raise InvalidInput(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for per-example requests "
                           "(vmap's): add batched=true")
    in_dims = leaf_in_dims(spec, options.in_dims) if options.batched and spec.inputs else None
    return in_dims, check_out_dims(options.out_dims) if options.batched else 0


def _check_pairs(key: str, vectors: Any, extra_key: str, extra: Any) -> None:
    """Stacked cotangents and tangents (an hvp's ``c . H t``) pair up by index: one
    number of each, told before any compute (the shapes after the leading dimension are
    the engine's to check: only the forward pass gives the output's)."""
    sizes = {}
    for what, tree in ((extra_key, extra), (key, vectors)):
        leaves = [leaf for leaf in tree_leaves(tree) if isinstance(leaf, np.ndarray)]
        if any(leaf.ndim == 0 for leaf in leaves):
            raise InvalidInput(f"{what}: batched_vectors needs a leading dimension on every vector")
        sizes[what] = sorted({leaf.shape[0] for leaf in leaves})
    if len({n for found in sizes.values() for n in found}) > 1:
        raise InvalidInput(f"{extra_key} and {key} pair up by index: with batched_vectors, as many of each "
                           f"(leading dimensions {sizes[extra_key]} and {sizes[key]})")


def check_head(spec: FunctionSpec, kind: Kind, media_type: str, query: Mapping[str, str]) -> None:
    """What a request's head decides, checked before its body is read (parse_call checks
    it again, with the body's options): the query's options (unknown ones, ones ``kind``
    does not take, values that are wrong on their own, an argnums naming no parameter,
    per-example dims that do not fit) and whether an .npy body can carry the call. These were told only once the whole
    body had come and been parsed: a 256 MB upload for a 422 its URL had decided
    (``?sparsity=nope``, ``?chunk_size=lots``, an .npy for a function of two inputs)."""
    if media_type not in (wire.JSON, wire.NPY, wire.NPZ):
        raise _unsupported(media_type)
    if media_type == wire.NPY:
        _check_npy_carries(spec, kind)
    if query:  # (a JSON body's own options may refuse more, once read; none makes these right)
        options = _options({k: _query_value(k, v) for k, v in query.items()}, kind)
        _check_options(spec, kind, options)
        # An argnums naming no parameter (?argnums=y, ?argnums=7 for a function of one
        # input) was told only once the body had come and been parsed: a page uploading
        # a 64 MB .npy waited for all of it to read a 422 its URL had decided. So were
        # in_dims and out_dims that do not fit, or come without batched=true: decided
        # here where the body gives no options (.npy, .npz) or the query says batched.
        _positions(spec, kind, options)
        if media_type != wire.JSON or options.batched:
            _per_example(spec, options)


def _unsupported(media_type: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"Content-Type {echo(media_type) if media_type else '(none)'} is not supported; "
                                f"send {wire.JSON}, {wire.NPY} or {wire.NPZ}")


def _check_npy_carries(spec: FunctionSpec, kind: str) -> None:
    names = [inp.name for inp in spec.inputs]
    if len(names) > 1:
        # Said as a JSON body of one input is told (missing input 'y'; f takes [...]): an
        # SDK sends one array as .npy itself, so a caller who left an input out read "send
        # application/x-npz", a format they never chose, and not which input was missing.
        missing = ", ".join(repr(n) for n in names[1:])
        raise InvalidInput(
            f"missing input{'s' if len(names) > 2 else ''} {missing}; {spec.name} takes {names}, and an "
            "application/x-npy body carries one input: send them all as application/x-npz or JSON",
            fields=_missing_fields(names, names[1:]),
        )
    if len(names) != 1 or kind in _VECTOR_KEY:
        raise InvalidInput(
            f"an application/x-npy body carries one input; {spec.name} {kind} needs "
            "more: send application/x-npz"
        )
    if spec.has_trees:
        raise InvalidInput(
            f"an application/x-npy body carries one array; {spec.name}'s input "
            f"{spec.inputs[0].name!r} is a tree of {len(spec.leaf_inputs)}: send application/x-npz "
            f"(members {[f'{spec.inputs[0].name}/{p}' for p in spec.inputs[0].member_paths()][:5]}) or JSON"
        )


def _check_options(spec: FunctionSpec, kind: str, options: Options) -> None:
    if options.rows is not None and options.batched:
        raise InvalidInput("rows applies to non-batched jacobian requests only")
    if options.rows is not None and not 0 <= options.rows[0] <= options.rows[1]:
        raise InvalidInput(f"rows must satisfy 0 <= start <= stop, got {list(options.rows)}")
    _check_sparsity(spec, kind, options)


def _check_sparsity(spec: FunctionSpec, kind: str, options: Options) -> None:
    """``sparsity`` (SPEC 7): which requests may ask for it, and which names exist; told
    before any compute, from the declared names every front end knows."""
    name = options.sparsity
    if name == "dense":
        if options.sparse_format != _DEFAULT_OPTIONS.sparse_format:
            # It shapes the sparse path's matrix only: csc alone was answered jacrev's
            # dense array with a 200, as if read. (Its default asks for nothing, and
            # passes, as any option's default does where the option does not apply.)
            raise InvalidInput(f"sparse_format={options.sparse_format} applies to a sparse result: add sparsity=auto "
                               "(or a declared pattern's name); with sparsity=dense (the default) the answer is "
                               "jacrev's array")
        return
    if kind not in ("jacobian", "hessian"):
        raise InvalidInput(f"sparsity applies to jacobian and hessian requests only, not {kind}")
    if options.batched:  # one sparse matrix per answer: batched=true would need a list of them
        raise InvalidInput("sparsity other than dense does not combine with batched")
    if spec.has_trees:  # a sparse matrix is (output elements x input elements) of plain arrays
        raise InvalidInput(f"sparsity other than dense is for functions of plain arrays; {spec.name} takes a pytree parameter")
    if name == "auto":
        return
    declared = spec.sparsity.get(name)
    if declared is None:
        names = ", ".join(["dense", "auto", *sorted(spec.sparsity)])
        raise SparsityNotFound(f"{spec.name} declares no sparsity pattern named {echo(name)}; choose one of {names}")
    if declared.hessian != (kind == "hessian"):
        raise InvalidInput(
            f"the declared pattern {name!r} is for the {'Hessian' if declared.hessian else 'Jacobian'}; "
            f"this is a {kind} request"
        )


def media_type_of(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``; none means JSON."""
    if not content_type:
        return wire.JSON
    return content_type.split(";", 1)[0].strip().lower()


_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})  # ASCII is UTF-8


def check_json_charset(content_type: str | None) -> None:
    """A JSON body is read as UTF-8 (RFC 8259 8.1): one that says it is another charset
    (``charset=utf-16``, ``iso-8859-1``) would be misread, and was a 400 "str is not valid
    UTF-8: surrogates not allowed", which named neither. Now a 415 naming the charset."""
    if not content_type or ";" not in content_type:
        return
    for key, value in parameters(split_unquoted(bounded_field("Content-Type", content_type), ";")[1:]):  # (a quoted value may hold a ";")
        charset = value.strip('"').lower()
        if key == "charset" and charset not in _UTF8_CHARSETS:
            raise UnsupportedMediaType(f"a JSON body is read as UTF-8 (RFC 8259), not as charset={echo(charset, 40)}; "
                                       "send it in UTF-8 (charset=utf-8, or no charset)")


_SPARSITY_QUERY = frozenset({"shapes", "dtypes", "kind", "sparsity", "mode", "argnums", "format"})


def _shapes(text: str) -> list[tuple[int, ...]]:
    """``3,4;5`` -> ``[(3, 4), (5,)]``: one shape per input, ``;`` between inputs, ``,``
    between dims; an empty shape (``;5``, or ``shapes=`` for one input) is a 0-d input.
    Every size is a Python int within int64, as the JSON and ``.npy`` paths require
    (wire's shape check): a larger one is a 422, never an overflow further on."""
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.split(",") if d.strip() != ""]
        if not all(_INTEGER.fullmatch(d) and (d[0] != "-" or d.strip("-0") == "") for d in dims):  # "-0" is 0
            raise InvalidInput(f"shapes: {echo(part)} is not a comma-separated list of sizes")
        # Length first: int() refuses strings of more than 4,300 digits with a ValueError.
        if any(len(d.lstrip("0")) > 19 or int(d) > _INT64_MAX for d in dims):
            raise InvalidInput(f"shapes: {echo(part)} has a dimension beyond int64")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def parse_sparsity_query(spec: FunctionSpec, query: Mapping[str, str], limits: wire.Limits) -> tuple[str, Call]:
    """``GET /v1/functions/{name}/sparsity?shapes=...``: the derivative kind and a
    :class:`Call` at a fixed point of those shapes. Patterns are structural (detected or
    declared, never read off values), so the point only has to be one the function is
    defined at: pseudo-random values in [0.5, 1.5), the same every time."""
    unknown = set(query) - _SPARSITY_QUERY
    if unknown:
        raise InvalidInput(f"unknown query parameters {sorted(unknown)}; this endpoint takes {sorted(_SPARSITY_QUERY)}")
    if "shapes" not in query:
        raise InvalidInput("give the input shapes: shapes=3,4;5 (one shape per input, ';' between inputs)")
    shapes = _shapes(query["shapes"])
    if len(shapes) != len(spec.inputs):
        count = len(spec.inputs)
        raise InvalidInput(f"{spec.name} takes {count} input{'s' if count != 1 else ''} {[i.name for i in spec.inputs]}; "
                           f"shapes gives {len(shapes)}", fields=_short_fields(spec, len(shapes)))
    kind = query.get("kind", "jacobian")
    if kind not in ("jacobian", "hessian"):
        raise InvalidInput(f"kind is jacobian or hessian, not {echo(kind)}")
    fmt = query.get("format", "csr")
    if fmt not in wire.SPARSE_FIELDS:
        raise InvalidInput(f"format is csr, csc or coo, not {echo(fmt)}")
    dtype_names = query["dtypes"].split(";") if "dtypes" in query else [None] * len(shapes)
    if len(dtype_names) != len(shapes):
        raise InvalidInput(f"dtypes gives {len(dtype_names)} dtypes for {len(shapes)} inputs")
    raw = {k: _query_value(k, query[k]) for k in ("mode", "argnums") if k in query}
    options = _options({**raw, "sparsity": query.get("sparsity", "auto")})
    if options.sparsity == "dense":
        raise InvalidInput("sparsity=dense has no pattern to show; ask for auto or a declared pattern's name")
    _check_sparsity(spec, kind, options)
    argnums, _ = spec.argnums(options.argnums)
    rng = np.random.default_rng(0)
    args, dtypes, bindings = [], [], {}  # type: ignore[var-annotated]
    sent: list[str] = []
    total = 0
    for shape, name, inp in zip(shapes, dtype_names, spec.inputs):
        # The rule a body's array is held to (wire.check_shape), and its status: a shape
        # over the element limit was a 422 here where the same shape posted is a 413.
        try:
            wire.check_shape(list(shape), limits)
        except wire.WireError as exc:
            raise from_wire(wire.WireError(f"shapes: input {inp.name!r}: {exc}", exc.code)) from None
        total += math.prod(shape) * 8  # 8: the widest element a body may carry
        if total > limits.max_bytes:  # no more than a request body could carry
            raise PayloadTooLarge(f"these shapes hold more than {limits.max_bytes} bytes, the request limit")
        if name is not None and name in wire.COMPLEX_DTYPES and inp.dtype not in COMPLEX_DTYPES:
            # (a body's words: a real input, and why)
            try:
                wire.check_request_dtype(np.dtype(name))
            except wire.WireError as exc:
                raise from_wire(wire.WireError(f"dtypes: {exc}", exc.code)) from None
        if name is not None and name not in wire.DTYPES | COMPLEX_DTYPES:
            raise InvalidInput(f"dtypes: unknown dtype {echo(name)}")
        dtype = inp.resolve_dtype(name) if name is not None else inp.default_dtype
        sent.append(name or dtype)
        inp.bind(shape, bindings, field="shapes")
        wire_dtype = "float32" if dtype == "bfloat16" else dtype
        if np.dtype(wire_dtype).kind == "f":
            arr = rng.uniform(0.5, 1.5, shape).astype(wire_dtype)
        else:
            arr = np.ones(shape, dtype=wire_dtype)
        args.append(arr)
        dtypes.append(dtype)
    _check_real_inputs(spec, kind, dtypes, options.mode)  # (a complex input's pattern: of a Jacobian torch.func refuses)
    for i in argnums:  # as parse_call's
        _check_differentiable(spec, spec.inputs[i].name, spec.inputs[i].dtype, dtypes[i], sent[i])
    call = Call(spec=spec, args=args, dtypes=dtypes, argnums=argnums, mode=options.mode or "auto",
                sparsity=options.sparsity, sparse_format=fmt)
    return kind, call
