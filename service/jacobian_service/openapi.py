"""The OpenAPI document, written from the routing table and the wire module's tables.

Named components (``Array`` in its three forms, one request and one response schema per
derivative endpoint, ``Problem``), short ``operationId``s and error responses generated
from :data:`jacobian_client.wire.PROBLEM_STATUS`, so that client generators
(openapi-python-client, openapi-generator) produce typed clients.
"""

from __future__ import annotations

import math

from typing import Any

from jacobian_client import wire

from . import __version__
from .parsing import OPTION_KINDS, OPTIONAL_VECTORS, Options, unused_options
from .registry import COMPLEX_DTYPES, FLOAT_DTYPES, FLOATING, Registry
from .responses import META_HEADERS
from .routes import Route

__all__ = ["build_openapi"]

_VECTORS = {"vjp": "cotangents", "jvp": "tangents", "hvp": "tangents"}
# JSON has no NaN or infinities: the wire spells them, in answers and requests alike
# (wire.encode_tree; a 0-d array's data, a plain number in a list or in aux), and the
# schemas said a number, so a 0-d NaN answer (evaluate's "data": "NaN") matched no
# array form, and a request carrying one spelled none the server takes.
_NON_FINITE = {"type": "string", "enum": sorted(wire.SPELLED_NON_FINITE),
               "description": "a non-finite number, spelled (JSON has none)"}
_NUMBER_TREE = {"description": "a number, or nested lists of numbers",
                "anyOf": [{"type": "number"}, _NON_FINITE, {"type": "array", "items": {}}]}

_COMPONENTS: dict[str, Any] = {
    "ArrayData": {
        "type": "object",
        "description": (
            "an array: data nested or flat (C order, then shape says how); without shape, the "
            "nesting gives it; without dtype, the dtype the function declares (float32 for floating). "
            "complex64 and complex128 come in answers (evaluate's and jvp's output, aux, a complex "
            "input's vjp and hvp), in cotangents (a complex output's, for vjp and hvp), and as the "
            "inputs a function declares complex64 or complex128 and their tangents, each number a "
            "[real, imag] pair (plain lists for such an input are its pairs too)"
        ),
        "required": ["data"],
        "properties": {
            "dtype": {"type": "string", "enum": sorted(wire.DTYPES | wire.COMPLEX_DTYPES)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": _NUMBER_TREE,
        },
        "additionalProperties": False,
    },
    "ArrayBase64": {
        "type": "object",
        "description": (
            "an array as little-endian C-order bytes, base64-encoded; without dtype, "
            "the dtype the function declares (float32 for floating); complex64 and complex128 "
            "(answers, cotangents, inputs declared complex and their tangents) as [real, imag] pairs"
        ),
        "required": ["shape", "base64"],
        "properties": {
            "dtype": {"type": "string", "enum": sorted(wire.DTYPES | wire.COMPLEX_DTYPES)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "base64": {"type": "string", "contentEncoding": "base64"},
        },
        "additionalProperties": False,
    },
    "Array": {
        "description": "an array: a number, nested lists of numbers, {dtype, shape, data} or {dtype, shape, base64}",
        "anyOf": [
            {"type": "number"},
            _NON_FINITE,
            {"type": "array", "items": {}},
            {"$ref": "#/components/schemas/ArrayData"},
            {"$ref": "#/components/schemas/ArrayBase64"},
        ],
    },
    # Every Array form, as cotangents and tangents are read (a 0-d output's cotangent is
    # one number, SPEC 3.1's first form): it listed {dtype, shape, data} alone, and a
    # vjp's "cotangents": 1.0, which the server answers 200, matched no branch.
    "ArrayTree": {
        "description": ("an array, or a list (tuple) or object (dict) of array trees, nested as torch.func nests "
                        "results; in cotangents and tangents an array object gives its shape (one without is read "
                        "as a dict)"),
        "anyOf": [
            {"$ref": "#/components/schemas/Array"},
            {"type": "object", "additionalProperties": True},
        ],
    },
    "InputTree": {
        "description": (
            "a pytree parameter (an Input declared with a tree): its arrays nested as declared, "
            "a JSON list for a tuple or list, an object keyed as the dict; each leaf any Array form. "
            "Deeper levels are Arrays in this schema (an Array's list and object forms admit them): "
            "client generators (openapi-python-client) refuse a recursive union"
        ),
        "anyOf": [
            {"type": "array", "items": {"$ref": "#/components/schemas/Array"}},
            {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Array"}},
        ],
    },
    "Inputs": {
        "description": (
            "the function's inputs: positional (a list) or by parameter name (an object); "
            "a pytree parameter nested as its declaration says (see Input.tree)"
        ),
        "anyOf": [
            {"type": "array", "items": {"anyOf": [{"$ref": "#/components/schemas/Array"}, {"$ref": "#/components/schemas/InputTree"}]}},
            {"type": "object", "additionalProperties": {"anyOf": [{"$ref": "#/components/schemas/Array"}, {"$ref": "#/components/schemas/InputTree"}]}},
        ],
    },
    # SPEC 3.3: meta holds at least these, on every endpoint's answer; the schema required
    # none of them, so a generated client typed each as optional (Unset | float).
    "Meta": {
        "type": "object",
        "required": ["device", "chunk_size", "batch_size", "queue_ms", "compute_ms"],
        "properties": {
            "device": {"type": ["string", "null"]},
            "chunk_size": {"type": ["integer", "null"], "description": "rows (sparse: products) per vmap of a jacobian "
                                                                       "or hessian; null for evaluate, vjp, jvp and hvp"},
            "batch_size": {"type": "integer"},
            "mode": {"type": ["string", "null"], "description": "rev / fwd / bidirectional / symmetric (Jacobians), star or acyclic (sparse Hessians), or the Hessian strategy; null for evaluate, vjp, jvp and hvp"},
            "queue_ms": {"type": "number"},
            "compute_ms": {"type": "number"},
            "unbatched": {"type": "array", "items": {"type": "boolean"},
                          "description": "per-example evaluate: per output array, whether torch's vmap left it unbatched "
                                         "(it depends on no batched input); absent where the examples ran one by one"},
            "aux_unbatched": {"type": "array", "items": {"type": "boolean"},
                              "description": "per-example evaluate of a has_aux function: the same per aux leaf (a plain "
                                             "value: false)"},
            "bfloat16": {"type": "array", "items": {"type": "boolean"},
                         "description": "where half precision took part (an input sent in it, or a result of it): per "
                                        "array of the result (evaluate's output, the jacobian, hessian, vjp, jvp, hvp), "
                                        "whether it was bfloat16 (sent as float32: numpy has no bfloat16)"},
            "output_bfloat16": {"type": "array", "items": {"type": "boolean"},
                                "description": "the same per array of return_output's output (derivative routes)"},
            "aux_bfloat16": {"type": "array", "items": {"type": "boolean"},
                             "description": "the same per aux leaf of a has_aux function (a plain value: false)"},
            "lists": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {
                    "type": "array", "items": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}}},
                "description": "JSON and .npz have one sequence: per tree of the answer (output, aux, jacobian, "
                               "...), the paths of its Python lists, each a list of positions and dict keys from "
                               "the tree's root ([]: the tree itself); every other sequence is a tuple. Absent where "
                               "no tree holds a list",
                "example": {"output": [[], [1, "k"]]},
            },
            # sparse results only (sparsity other than dense)
            "sparsity": {"type": "string", "description": "what the request asked: auto or a declared name"},
            "pattern": {"type": "string", "description": "the pattern's name"},
            "source": {"type": "string", "enum": ["declared", "detected", "probed", "given"]},
            "exact": {"type": "boolean", "description": "false when detection assumed unknown ops dense"},
            "value_dependent": {"type": "boolean", "description": "the pattern depends on the input values: for this point only"},
            "conservative": {"type": "boolean", "description": "stored entries may be zeros here by a choice the values made (a where, clamp, max: a union), or exact is false"},
            "format": {"type": "string", "enum": [*wire.SPARSE_FIELDS, "dense"]},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "nnz": {"type": "integer"},
            "colors": {"type": "integer"},
            "products": {"type": "integer", "description": "JVPs, VJPs or HVPs computed"},
            "dense_products": {"type": "integer", "description": "what the dense computation takes"},
            "cached": {"type": ["string", "null"], "enum": ["memory", "disk", None]},
            "notes": {"type": "array", "items": {"type": "string"}, "description": "the pattern's notes (ops assumed dense, value dependence, no_grad, ...)"},
        },
    },
    "SparseMatrix": {
        "type": "object",
        "description": (
            "a sparse 2-D matrix, (output elements) x (input elements), both flattened in C order: "
            "CSR (indptr over the rows, indices the columns, data), CSC (indptr over the columns, indices the rows, "
            "data) or COO (row, col, data)"
        ),
        "required": ["format", "shape", "data"],
        "properties": {
            "format": {"type": "string", "enum": list(wire.SPARSE_FIELDS)},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 2, "maxItems": 2},
            "dtype": {"type": "string", "enum": sorted(wire.DTYPES)},
            "indptr": {"type": "array", "items": {"type": "integer"}},
            "indices": {"type": "array", "items": {"type": "integer"}},
            "row": {"type": "array", "items": {"type": "integer"}},
            "col": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {}},
        },
        "additionalProperties": False,
    },
    "SparsityPattern": {
        "type": "object",
        "required": ["function", "kind", "pattern", "coloring", "products", "matrix"],
        "properties": {
            "function": {"type": "string"},
            "kind": {"type": "string", "enum": ["jacobian", "hessian"]},
            "sparsity": {"type": "string"},
            "pattern": {
                "type": "object",
                "description": "name, source (declared / detected / probed), exact, value_dependent, conservative, shape, nnz, density, max_per_row, max_per_col, notes",
                "additionalProperties": True,
            },
            "coloring": {
                "type": "object",
                "description": "mode (fwd / rev / bidirectional / symmetric / star / acyclic), colors, products, lower_bound, strategy; fwd_products and rev_products for bidirectional",
                "additionalProperties": True,
            },
            "products": {"type": "integer"},
            "dense_products": {"type": "integer"},
            "cached": {"type": ["string", "null"]},
            "picture": {"type": "string", "description": "the pattern in braille characters"},
            "matrix": {"$ref": "#/components/schemas/SparseMatrix"},
            "meta": {"type": "object", "additionalProperties": True},
        },
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details with a stable code",
        "required": ["type", "title", "status", "detail", "code", "request_id"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": sorted(wire.PROBLEM_STATUS)},
            "request_id": {"type": "string"},
            # Extension members (RFC 9457 3.2) of some problems, for a client's code to read
            # rather than the detail's words.
            "field": {"type": "string", "description": "a 422 refusing an array for its shape: the body's member "
                                                       "(or query parameter) that gave it: `inputs`, `cotangents`, "
                                                       "`tangents`, or `shapes` (sparsity)"},
            "path": {"type": "string", "description": "with `field`: the refused array within it, as the detail "
                                                      "writes it: an input's name (a tree leaf's as `params.w`); a "
                                                      "vector leaf's path (`[0]`, `.a`; empty for one array)"},
            "expected_shape": {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                               "description": "with `field`: the shape the array must have: an input's declared "
                                              "shape, a size symbol bound by an earlier input as its size and one "
                                              "not bound as its name (any size); the function's output "
                                              "(cotangents) or input (tangents) at the request's inputs; `B` for "
                                              "a batch's dimension (`batched`, at its `in_dims`; "
                                              "`batched_vectors`)"},
            "got_shape": {"type": "array", "items": {"type": "integer"},
                          "description": "with `field`: the shape the request sent"},
            "limit": {"type": "integer", "description": "with `field` (`cotangents` or `tangents`): a 413 refusing "
                                                        "more arrays of it than a body may carry (`MAX_NPZ_MEMBERS`, "
                                                        "or the function's input arrays where more; an `.npz`: the "
                                                        "members it may hold, its inputs' and each vector key's)"},
            "unsupported": {"type": "string", "enum": ["forward_mode", "integer_output", "complex_output",
                                                       "complex_input"],
                            "description": "`forward_mode`: a 500 `function_error` of a `jvp` or `hvp` whose "
                                           "function has an op without a forward-mode rule (torch raised "
                                           "NotImplementedError in forward mode, its plain call having run): the "
                                           "reverse-mode request (`jacobian`, `hessian`) can answer. "
                                           "`integer_output`: a 422 of a reverse-mode request (`vjp`, `jacobian`, "
                                           "`hessian`) whose function has an integer or boolean output: "
                                           "`evaluate` and `jvp` answer it. `complex_output`: a 422 of a "
                                           "`jacobian` or `hessian` whose function has a complex output: "
                                           "`evaluate`, `jvp` and `vjp` (complex cotangents) answer it. "
                                           "`complex_input`: a 422 of a `jacobian` or `hessian` (or the "
                                           "sparsity query) of a function called with an input declared "
                                           "complex64 or complex128, which torch.func's jacrev and jacfwd "
                                           "refuse: `evaluate`, `vjp`, `jvp` and `hvp` answer it"},
            "missing": {"type": "array", "items": {"type": "string"},
                        "description": "a 422 for inputs left out (a JSON or `.npz` body without them, a JSON "
                                       "`inputs` list or the sparsity query's `shapes` that stops short, an "
                                       "`.npy` body of one for a function of more): the names of those left out"},
            "inputs": {"type": "array", "items": {"type": "string"},
                       "description": "with `missing`: the function's inputs, in order"},
            "not_one_array": {"type": "string", "enum": ["aux", "output", "tuple", "pytree", "several_arrays"],
                              "description": "a 406 to an `Accept` of `.npy` alone for a result that is not one "
                                             "bare array: what it holds besides (the function's aux, the output "
                                             "`return_output` asks for, a tuple `argnums`'s tuple, a pytree "
                                             "parameter's leaves, several outputs)"},
            "reason": {"type": "string", "description": "with `not_one_array`: its words, without the detail's "
                                                        "advice on formats"},
        },
    },
    "Input": {
        "type": "object",
        "required": ["name", "shape", "dtype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": ["array", "null"], "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
            "dtype": {"type": "string", "description": "for a tree: its leaves' one dtype, or \"mixed\""},
            "tree": {
                "$ref": "#/components/schemas/InputTreeSpec",
                "description": "present for a pytree parameter: the declared tuple/list/dict of arrays",
            },
        },
    },
    "InputTreeSpec": {
        "type": "object",
        "description": (
            "a declared pytree: {type: array, shape, dtype} at a leaf, {type: dict, items: {key: node}}, "
            "{type: tuple | list, items: [node, ...]}; Jacobians nest over it as jacrev does "
            "(in .npz, a leaf is the member `<input>/<key or position>/...`, e.g. `params/w`, `0/1/scale`)"
        ),
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["array", "dict", "tuple", "list"]},
            "shape": {"type": ["array", "null"], "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]}},
            "dtype": {"type": "string"},
            "items": {
                "anyOf": [
                    {"type": "array", "items": {"$ref": "#/components/schemas/InputTreeSpec"}},
                    {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/InputTreeSpec"}},
                ]
            },
        },
    },
    "Function": {
        "type": "object",
        "required": ["name", "description", "inputs", "has_aux"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Input"}},
            "has_aux": {"type": "boolean"},
            # (FunctionSpec.describe sends it where patterns are declared: a member the
            # schema did not name, so a generated client's Function dropped it.)
            "sparsity": {
                "type": "object",
                "description": "present where the function declares sparsity patterns: each by the name a request "
                               "gives as `sparsity`",
                "additionalProperties": {
                    "type": "object",
                    "required": ["kind", "params", "hessian"],
                    "properties": {
                        "kind": {"type": "string", "description": "the pattern's recipe (banded, callable, ...)"},
                        "params": {"type": "object", "additionalProperties": True},
                        "hessian": {"type": "boolean", "description": "a Hessian's pattern (else a Jacobian's)"},
                    },
                },
            },
        },
    },
    "Released": {
        "type": "object",
        "required": ["function", "released"],
        "properties": {
            "function": {"type": "string"},
            "released": {"type": "boolean", "description": "whether the function was quarantined (now released)"},
        },
    },
}


def _title(kind: str) -> str:
    return kind.capitalize()


def _request_schema(kind: str) -> dict[str, Any]:
    # Only the options this kind takes (parsing.OPTION_KINDS): the body's schema listed
    # every option for every kind, chunk_size on a vjp, argnums on an evaluate.
    options = {name: prop for name, prop in Options.model_json_schema()["properties"].items()
               if kind in OPTION_KINDS[name]}
    props: dict[str, Any] = {"inputs": {"$ref": "#/components/schemas/Inputs"}, **options}
    required = ["inputs"]
    if kind in _VECTORS:
        key = _VECTORS[kind]
        props[key] = {"$ref": "#/components/schemas/ArrayTree"}
        required.append(key)
    if kind in OPTIONAL_VECTORS:  # hvp's cotangents: c . H t of any output
        props[OPTIONAL_VECTORS[kind]] = {
            "$ref": "#/components/schemas/ArrayTree",
            "description": "optional: shaped like the output (as vjp's); asks for c . H t, the jvp of the vjp, "
                           "of a function with any output (with batched_vectors, one per tangent, paired by index)"}
    # Beside its own, the server takes every other option where it cannot change the
    # answer (chunk_size and mode anywhere, argnums on an evaluate), and the rest at their
    # defaults, so that one body goes to every endpoint (parsing.unused_options): SPEC
    # 3.1's example body (batched, chunk_size) with a vjp's cotangents is a 200, which the
    # closed schema said no server would take (a gateway or client validating against it
    # refused it). Accepted, not offered: in patternProperties, which Swagger UI's sample
    # body and generated clients' models leave out, as they leave out these options.
    every = Options.model_json_schema()["properties"]
    accepted = {f"^{name}$": every[name] if any_value else {
        "const": Options.model_fields[name].default,
        "description": f"for {', '.join(OPTION_KINDS[name])}: taken here at its default alone"}
        for name, any_value in unused_options(kind).items()}
    # The server refuses any other member (an unknown option, a vjp's tangents, an
    # evaluate's cotangents; one this kind does not take, unless given its default):
    # 422, as the schema now says.
    return {"type": "object", "required": required, "properties": props, "patternProperties": accepted,
            "additionalProperties": False}


def _response_schema(kind: str) -> dict[str, Any]:
    key = wire.RESULT_KEY[kind]
    result: dict[str, Any] = {"$ref": "#/components/schemas/ArrayTree"}
    if kind in ("jacobian", "hessian"):  # sparsity other than dense: a sparse object
        result = {"anyOf": [result, {"$ref": "#/components/schemas/SparseMatrix"}]}
    props = {
        "function": {"type": "string"},
        key: result,
        "aux": {"description": "the function's aux output (has_aux functions)"},
        "meta": {"$ref": "#/components/schemas/Meta"},
    }
    if key != "output":
        props["output"] = {"$ref": "#/components/schemas/ArrayTree"}
    return {"type": "object", "required": ["function", key, "meta"], "properties": props}


# Examples: every function's request body from its declared inputs, so that Swagger UI's
# pre-filled body (the first example, the first function, as the name list starts) and
# the one picked from its list are calls that succeed. Symbolic dimensions are bound to
# this size (the same name, the same size: n in params.w and x agree).
_EXAMPLE_SIZE = 3
# vjp's cotangents have the output's shape, which no declaration gives (the /docs page
# writes vjp's body from /evaluate's answer: docs_ui.py). hvp's tangents
# have the input's: its example is right wherever hvp is (a scalar output; the others
# are told so), where Swagger UI's body made from the schema was never right.
_EXAMPLE_KINDS = ("jacobian", "hessian", "evaluate", "jvp", "hvp")
# A function declaring a large input (4096 x 4096) gets no example: the document would
# carry its every number, on every fetch of /openapi.json.
_EXAMPLE_MAX_NUMBERS = 4096


class _TooLarge(Exception):
    pass


# The pages read the document into JavaScript objects keyed as the document is, and an
# object key that names a property every object inherits is not a plain key there: an
# example keyed by a function named hasOwnProperty left /redoc blank ("Cannot convert
# undefined or null to object"), and one keyed __proto__ vanished from Swagger UI (its
# Execute sent no inputs). A function so named gets no example; inputs so named are
# given by position, as the body may give them.
_JS_OBJECT_KEYS = frozenset({
    "__proto__", "constructor", "hasOwnProperty", "isPrototypeOf", "propertyIsEnumerable", "toLocaleString",
    "toString", "valueOf", "__defineGetter__", "__defineSetter__", "__lookupGetter__", "__lookupSetter__"})


def _tree_keys(node: dict[str, Any]) -> set[str]:
    """Every dict key of a declared tree (an Input's or a node's)."""
    node = node.get("tree") or node
    if node.get("type") == "dict":
        return set(node["items"]).union(*(_tree_keys(child) for child in node["items"].values()))
    if node.get("type") in ("tuple", "list"):
        return set().union(*(_tree_keys(child) for child in node["items"]))
    return set()


def _example_leaf(node: dict[str, Any], real: bool = False) -> Any:
    """``real``: a tangent's numbers (a complex input's real tangent is cast), not the
    ``[real, imag]`` pairs plain lists are for an input declared complex."""
    dims = [d if isinstance(d, int) else _EXAMPLE_SIZE for d in (node.get("shape") or [])]
    if math.prod(dims) > _EXAMPLE_MAX_NUMBERS:
        raise _TooLarge
    dtype = str(node.get("dtype", ""))
    value: Any = True if dtype == "bool" else 1 if dtype.startswith(("int", "uint")) else 0.5
    if dtype in COMPLEX_DTYPES and not real:
        value = [0.5, 0.5]
    for size in reversed(dims):
        value = [value] * size
    return value


def _example_input(node: dict[str, Any], real: bool = False) -> Any:
    """An Input (or a node of its declared tree) filled in: arrays as nested lists,
    dicts keyed and tuples / lists in order as declared."""
    node = node.get("tree") or node
    if node.get("type") == "dict":
        return {key: _example_input(child, real) for key, child in node["items"].items()}
    if node.get("type") in ("tuple", "list"):
        return [_example_input(child, real) for child in node["items"]]
    return _example_leaf(node, real)


def _leaf_dtypes(node: dict[str, Any]) -> list[str]:
    node = node.get("tree") or node
    if node.get("type") == "dict":
        return [d for child in node["items"].values() for d in _leaf_dtypes(child)]
    if node.get("type") in ("tuple", "list"):
        return [d for child in node["items"] for d in _leaf_dtypes(child)]
    return [str(node.get("dtype"))]


def _floating(node: dict[str, Any]) -> bool:
    """Whether an input (every leaf of its tree) can be differentiated (a complex one
    by vjp, jvp and hvp: jacobian and hessian have no example of a complex function)."""
    return all(d == FLOATING or d in FLOAT_DTYPES or d in COMPLEX_DTYPES for d in _leaf_dtypes(node))


def _request_examples(kind: str, functions: list[dict[str, Any]]) -> dict[str, Any]:
    examples = {}
    for function in functions:
        if function["name"] in _JS_OBJECT_KEYS or _JS_OBJECT_KEYS & set().union(*map(_tree_keys, function["inputs"])):
            continue
        try:
            inputs: Any = {i["name"]: _example_input(i) for i in function["inputs"]}
        except _TooLarge:
            continue
        if _JS_OBJECT_KEYS & set(inputs):
            inputs = list(inputs.values())
        body: dict[str, Any] = {"inputs": inputs}
        if kind in ("jacobian", "hessian") and COMPLEX_DTYPES.intersection(
                d for i in function["inputs"] for d in _leaf_dtypes(i)):
            continue  # torch.func refuses any complex argument there: no example that could succeed
        first = function["inputs"][0] if function["inputs"] else None
        if kind != "evaluate" and first is not None and not _floating(first):
            # argnums' default, 0, is an integer input here: "Try it out" answered the 422
            # refusing to differentiate it. The first floating input is differentiated.
            first = next((i for i in function["inputs"] if _floating(i)), None)
            if first is None:
                continue  # nothing to differentiate: no example that could succeed
            body["argnums"] = first["name"]
        if kind in ("jvp", "hvp") and first is not None:  # one tangent, shaped as the input differentiated
            body["tangents"] = _example_input(first, real=True)
        examples[function["name"]] = {"summary": function["name"], "value": body}
    return examples


def _shapes_examples(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """``shapes`` for the sparsity query, per function of plain array inputs (a pytree
    input has no one shape) that the query (argnums 0 as the example leaves it) can
    answer: as the jacobian's body examples, none for a function with a complex input
    (torch.func has no Jacobian of it) or whose first input is not floating (nothing at
    argnums 0 to differentiate). Each was offered, and each was a 422."""
    examples = {}
    for function in functions:
        dtypes = [str(i.get("dtype")) for i in function["inputs"]]
        if COMPLEX_DTYPES.intersection(dtypes) or (function["inputs"] and not _floating(function["inputs"][0])):
            continue
        if function["name"] not in _JS_OBJECT_KEYS and all(not i.get("tree") for i in function["inputs"]):
            shapes = ";".join(",".join(str(d if isinstance(d, int) else _EXAMPLE_SIZE) for d in (i["shape"] or []))
                              for i in function["inputs"])
            examples[function["name"]] = {"summary": function["name"], "value": shapes}
    return examples or {"one input": {"value": str(_EXAMPLE_SIZE)}}


# The options of a derivative request in its query string: the only place for them with
# an .npy / .npz body (SPEC 3.2), allowed beside a JSON body too (each option in one
# place). Made from Options, so that a new option is documented in both forms at once;
# a list is comma-separated there (parsing._query_value).
_QUERY_FORMS: dict[str, dict[str, Any]] = {
    # At least one position or name: the empty items of "0,,1" are dropped, and "" or ","
    # (none left) is a 422 (parsing._query_value), which a fuzzer sent as valid.
    "argnums": {
        "schema": {"type": "string", "pattern": "[^,]"},
        "description": ("0 when left out; a position or parameter name, or several comma-separated (a tuple of results, "
                        "as argnums=(0, 1); a trailing comma makes a tuple of one: 0,)"),
    },
    "in_dims": {
        "schema": {"type": "string"},
        "description": ("batched: vmap's in_dims, the batch dim of each input: 1, none, one per input comma-separated "
                        "(0,none: the second input shared by every example), or JSON for nested ones "
                        "([{\"w\":null,\"b\":0},0])"),
    },
    "out_dims": {
        "schema": {"type": "string"},
        "description": "batched: vmap's out_dims, where the batch goes in the result: an int, none, or JSON nested as the result",
    },
    "rows": {
        "schema": {"type": "string", "pattern": "^-?[0-9]+,-?[0-9]+$"},
        "description": "start,stop: rows [start, stop) of the flattened output",
    },
}
_QUERY_NOTE = " (query form of the body's option; with a JSON body, give it in one place)"


def _query_parameters(kind: str) -> list[dict[str, Any]]:
    """The options ``kind`` takes: one that a kind always refuses (rows on a hessian,
    batched_vectors on a jacobian) is not offered there, where Swagger UI showed it."""
    params = []
    for name, prop in Options.model_json_schema()["properties"].items():
        if kind not in OPTION_KINDS[name]:
            continue
        if name in _QUERY_FORMS:
            form = _QUERY_FORMS[name]
            schema, description = dict(form["schema"]), form["description"]
        else:
            schema = {k: v for k, v in prop.items() if k not in ("title", "description")}
            description = prop.get("description", name.replace("_", " "))
            # A query string has no null: the option left out is the default.
            if "anyOf" in schema:
                (schema_,) = [branch for branch in schema.pop("anyOf") if branch.get("type") != "null"]
                schema = {**schema_, **schema}
            # No default in the schema: Swagger UI fills every query parameter with its
            # default on "Try it out", and the body's own options would then be given
            # twice (a 422). The description says what leaving it out means.
            default = schema.pop("default", None)
            if default is not None:
                description += f" (left out: {wire.dumps(default).decode()})"
        params.append({"name": name, "in": "query", "required": False, "schema": schema,
                       "description": description + _QUERY_NOTE})
    return params


_REQUEST_TIMEOUT_HEADER = {
    "name": "X-Request-Timeout", "in": "header", "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "seconds: shortens the server's deadline (queue plus compute) for this request; 504 when passed",
}


# Response headers (SPEC 3: every response carries X-Request-ID), so that generated
# clients expose them and response checks (schemathesis) hold the server to them.
_REQUEST_ID = {"X-Request-ID": {"required": True, "schema": {"type": "string"},
                                "description": ("the client's X-Request-ID echoed (its first 128 characters), or a new one "
                                                "when it sent none or one with control characters; also a problem's request_id")}}
_STATUS_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string", "const": "Bearer"}}},
    429: {"Retry-After": {"required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}, "description": "seconds"}},
    503: {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"},
                          "description": "seconds (while an engine restarts or the server drains)"}},
}


# What the layers in front of every route answer, whichever route a request is for
# (middleware.py, framing.py, connections.py, app.py): a request the HTTP parser cannot
# read, or with Content-Type, Authorization or Host given twice (400
# malformed_request), headers or a body too slow (408), an Expect other than
# 100-continue (417), headers over the limit (431), a transfer coding other than chunked
# (501), every connection busy (503), a fault of the service's own (500). Each
# operation listed only its handler's codes (route.errors): a GET's document said 200
# alone where the server also answers these, so a generated client had no type for them
# and a response check (schemathesis') held such an answer for undocumented.
_ANY_ROUTE = ("malformed_request", "request_timeout", "expectation_failed", "headers_too_large",
              "unsupported_transfer_coding", "unavailable", "internal_error")
# The router evaluates every GET's conditions on its 2xx answer (preconditions.py): an
# If-Match naming no ETag of it is a 412, an If-None-Match ``*`` a 304 (no body).
_GET_ONLY = ("precondition_failed",)
_NOT_MODIFIED = {"description": "If-None-Match: * (the answer exists): no body",
                 "headers": dict(_REQUEST_ID)}


def _problems(codes: tuple[str, ...], auth: bool) -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys((*codes, *(("unauthorized", "forbidden") if auth else ()))):
        by_status.setdefault(wire.PROBLEM_STATUS[code], []).append(code)
    return {
        str(status): {
            "description": " / ".join(names),
            "headers": {**_REQUEST_ID, **_STATUS_HEADERS.get(status, {})},
            "content": {wire.PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status, names in sorted(by_status.items())
    }


# What each of META_HEADERS says (Markdown: literal values as code spans).
_META_HEADER_WORDS = {
    "device": "`meta.device`, on every answer: a bare .npy has no room for meta (e.g. `cpu`)",
    "chunk_size": "`meta.chunk_size` (a streamed answer's rows per chunk); absent where null",
    "batch_size": "`meta.batch_size`",
    "mode": "`meta.mode`; absent where null, and from a streamed answer (sent before its rows are computed)",
    "queue_ms": "`meta.queue_ms`",
    "compute_ms": "`meta.compute_ms`; absent from a streamed answer (sent before its rows are computed)",
    "bfloat16": "`meta.bfloat16`, one `true` / `false` per array of the result (evaluate's output, the derivative), "
                "comma-separated (`true`: a float32 array that stands for bfloat16); absent where no half precision "
                "took part",
    "unbatched": "`meta.unbatched` of a per-example evaluate, one `true` / `false` per output array, comma-separated; "
                 "absent where the examples ran one by one",
}
_EVALUATE_META = ("unbatched",)  # (an evaluate's only: per-example flags)
# How a Jacobian or Hessian was computed (engine.core, engine.batched, engine.hessian,
# engine.sparse set them): an evaluate, vjp, jvp or hvp runs its vectors in one call and
# says null in both, so its X-Chunk-Size and X-Mode, documented, were never sent.
_COMPUTED_META = {"chunk_size": ("jacobian", "hessian"), "mode": ("jacobian", "hessian")}
_FLAG_META = ("bfloat16", "unbatched")  # (one true / false per result array: engine.core's half-precision flags)
_FLAGS = "^(true|false)(, (true|false))*$"  # (responses._said: one per output array)


_SPARSITY_META = ("device", "queue_ms", "compute_ms")  # (routes.function_sparsity's meta)


def _operation(route: Route, functions: list[dict[str, Any]], guarded: frozenset[str]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary, "tags": [route.tag]}
    if "{name}" in route.path:
        names = [f["name"] for f in functions]
        op["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}]
    binary = {"schema": {"type": "string", "format": "binary"}}
    kind = route.params.get("kind")
    if kind is not None:
        op["parameters"] = [*op["parameters"], *_query_parameters(kind), _REQUEST_TIMEOUT_HEADER]
        op["requestBody"] = {
            "required": True,
            "content": {
                wire.JSON: {"schema": {"$ref": f"#/components/schemas/{_title(kind)}Request"}},
                wire.NPY: binary,
                wire.NPZ: binary,
            },
        }
        examples = _request_examples(kind, functions) if kind in _EXAMPLE_KINDS else {}
        if examples:
            op["requestBody"]["content"][wire.JSON]["examples"] = examples
        ok = {
            "description": "the result as JSON, .npy or .npz (by Accept)",
            "content": {
                wire.JSON: {"schema": {"$ref": f"#/components/schemas/{_title(kind)}Response"}},
                wire.NPY: binary,
                wire.NPZ: binary,
            },
        }
    elif route.operation_id == "listFunctions":
        ok = {"description": "OK", "content": {wire.JSON: {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Function"}}}}}
    elif route.operation_id == "getFunction":
        ok = {"description": "OK", "content": {wire.JSON: {"schema": {"$ref": "#/components/schemas/Function"}}}}
    elif route.operation_id == "getSparsity":
        ok = {
            "description": "the pattern as JSON, or as .npz (scipy.sparse.save_npz members, the rest in meta.json)",
            "content": {wire.JSON: {"schema": {"$ref": "#/components/schemas/SparsityPattern"}}, wire.NPZ: binary},
        }
    elif route.operation_id == "releaseFunction":
        ok = {"description": "OK", "content": {wire.JSON: {"schema": {"$ref": "#/components/schemas/Released"}}}}
    elif route.operation_id == "metrics":
        ok = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    else:
        ok = {"description": "OK", "content": {wire.JSON: {"schema": {"type": "object", "additionalProperties": True}}}}
    if route.doc.get("parameters"):
        params = [dict(p) for p in route.doc["parameters"]]
        for p in params:
            if p["name"] == "shapes":  # fits the functions served, each its own
                p["examples"] = _shapes_examples(functions)
            if p["name"] in _QUERY_FORMS:  # one grammar for an option in every query string (argnums)
                p["schema"] = {**p["schema"], **_QUERY_FORMS[p["name"]]["schema"]}
        op["parameters"] = [*op.get("parameters", []), *params, _REQUEST_TIMEOUT_HEADER]
    ok["headers"] = dict(_REQUEST_ID)
    # Descriptions are Markdown, which Swagger UI and ReDoc read with its HTML: a literal
    # value is a code span, or "<function>" was taken for a tag and dropped (the page said
    # filename="-.npy") and a leading "*" for a list's bullet (Vary's value went missing).
    if any(media in ok["content"] for media in (wire.NPY, wire.NPZ)):
        ok["headers"]["Content-Disposition"] = {
            "schema": {"type": "string"},
            "description": 'binary answers (.npy / .npz): `attachment; filename="<function>-<what>.npy"`',
        }
    if kind is not None or route.operation_id == "getSparsity":  # their meta in headers too (responses.META_HEADERS)
        for key, header in META_HEADERS.items():
            if (kind is None and key not in _SPARSITY_META) or (kind != "evaluate" and key in _EVALUATE_META) \
                    or (kind is not None and kind not in _COMPUTED_META.get(key, (kind,))):
                continue
            schema = {"type": "string", "pattern": _FLAGS} if key in _FLAG_META else {"type": "string"}
            ok["headers"][header] = {"schema": schema, "description": _META_HEADER_WORDS[key]}
        ok["headers"]["Server-Timing"] = {"schema": {"type": "string"},
                                          "description": "`queue;dur=<queue_ms>, compute;dur=<compute_ms>` (as X-Queue-Ms, X-Compute-Ms)"}
    if route.method == "POST":  # (middleware.VARY_ANY)
        ok["headers"]["Vary"] = {
            "schema": {"type": "string"},
            "description": "`*` on every answer, errors included: it depends on the body, which no cache keys",
        }
    elif route.negotiated:
        ok["headers"]["Vary"] = {
            "schema": {"type": "string"},
            "description": "Accept (the answer's media type is the one Accept picks; its errors say so too), "
                           "and Origin for a page's call",
        }
    codes = (*route.errors, *_ANY_ROUTE, *(_GET_ONLY if route.method == "GET" else ()))
    responses = {"200": ok, **_problems(codes, route.auth in guarded)}
    if route.method == "GET":
        responses["304"] = _NOT_MODIFIED
    op["responses"] = dict(sorted(responses.items()))
    if route.auth in guarded:
        op["security"] = [{"bearer": []}]
    return op


def _operators(api_keys: bool, admin_keys: bool) -> str:
    """What an operator's action (``auth="admin"``) wants of its caller (AuthMiddleware)."""
    if admin_keys:
        return "An operator's action: it wants an operator's key (`ADMIN_KEYS`); an API key is a 403 `forbidden`."
    if api_keys:
        return ("An operator's action, and this server has API keys but no operators' keys (`ADMIN_KEYS`): every "
                "call with a key is a 403 `forbidden` (without one, the 401 `unauthorized` of every guarded route). "
                "A quarantine lifts by itself after `QUARANTINE_COOLDOWN_S`.")
    return "An operator's action (`ADMIN_KEYS` guards it). This server has no keys: anyone may take it."


# OPTIONS and HEAD are the router's on every path (routes._allowed), not operations: as
# FastAPI leaves them out, and schemathesis treats them as implicit (its checks hold a
# plain OPTIONS's Allow, less those two, to the methods a path lists, and send every
# other method for a 405). Listed, each path would show Swagger UI and ReDoc an operation
# more, and client generators a function more, that calls nothing. The document says so
# once, where a reader of /docs and /redoc sees it.
_IMPLICIT_METHODS = (
    "Every path also answers `OPTIONS` (204, its `Allow` naming the methods it takes; a CORS preflight where "
    "`CORS_ORIGINS` allows the page) and, wherever it answers `GET`, `HEAD`: the server's own, not listed as "
    "operations. Any other method is a 405 `method_not_allowed` with that `Allow`.")


def build_openapi(routes: list[Route], registry: Registry, root_path: str = "", *, api_keys: bool = False,
                  metrics_auth: bool = True, admin_keys: bool = False) -> dict[str, Any]:
    """``api_keys`` / ``metrics_auth`` / ``admin_keys``: what the server in front of this
    document enforces. Only the routes that really want a key say so (``security``, 401/403): a
    document that demanded a key the server never checks sent generated clients and
    Swagger's Authorize after a key nobody has, and promised 401s that never came."""
    functions = [spec.describe() for spec in registry]
    guarded = frozenset(({"key"} | ({"metrics"} if metrics_auth else set())) if api_keys else ())
    # An operator's action is guarded wherever any key is set: with API keys and no
    # operators' keys, it is refused to every key (a 403 each).
    guarded |= {"admin"} if api_keys or admin_keys else set()
    paths: dict[str, Any] = {}
    for route in routes:
        op = paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, functions, guarded)
        if route.auth == "admin":
            op["description"] = _operators(api_keys, admin_keys)
    schemas = dict(_COMPONENTS)
    for kind in wire.RESULT_KEY:
        schemas[f"{_title(kind)}Request"] = _request_schema(kind)
        schemas[f"{_title(kind)}Response"] = _response_schema(kind)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "jacobian-service",
            "version": __version__,
            "description": "Jacobians of registered PyTorch functions, computed like torch.func.jacrev.\n\n"
                           + _IMPLICIT_METHODS,
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if guarded:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    if root_path:
        doc["servers"] = [{"url": root_path}]
    return doc
