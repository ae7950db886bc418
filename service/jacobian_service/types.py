"""Request and result types shared by the HTTP front end and the engine: no torch here.

A :class:`Call` is one validated request; a :class:`Result` holds numpy trees. Both
cross the process boundary through :mod:`jacobian_service.ipc`, and both are what the
in-process engine client hands around, so the front end never needs torch to build or
read them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import orjson

from jacobian_client.wire import SPARSE_FIELDS

from .errors import Timeout
from .registry import FunctionSpec

__all__ = ["HELD_ANSWER_BYTES", "HOST_CHUNK_BYTES", "SPARSE_CHUNK_BYTES", "Call", "JobInfo", "Result", "example_shape", "gathered_at_most", "is_sparse_matrix", "never_cancelled", "stacked_liveness", "tree_leaves"]


# The most bytes of rows a streamed Jacobian's chunk the engine chooses holds on the host
# (its copy from the device, the copy on its way to the front end, the front end's).
# On the CPU the memory budget already keeps chunks near this (the 2 GB softmax's are
# 23.5 MB); on a GPU the budget is device memory, half of what is free: tens of GB, and a
# 2 GB Jacobian came to the host in one chunk. Here (no torch) for the front end too: it
# bounds what a stream holds there before the engine has said how large it is.
HOST_CHUNK_BYTES = 32 << 20
# A sparse Jacobian streamed densely: rows of about this many bytes a chunk (at least one).
SPARSE_CHUNK_BYTES = 1 << 20
# A gathered answer this large is held on the front end's stream budget, in its client's
# share, while its client takes it (routes._held_while_sent); smaller ones fit the
# socket's buffers. The engines refuse one there is no room for before computing it
# (Call.answer_room).
HELD_ANSWER_BYTES = 1 << 20


def tree_leaves(tree: Any) -> Iterator[Any]:
    """The leaves of a tree of tuples, lists and dicts, in order."""
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from tree_leaves(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from tree_leaves(item)
    else:
        yield tree


def example_shape(shape: tuple[int, ...], dim: int | None) -> tuple[int, ...]:
    """One example's shape of an input batched over ``dim`` (None: shared, all of it)."""
    return tuple(shape) if dim is None else tuple(shape[:dim]) + tuple(shape[dim + 1:])


def never_cancelled() -> bool:
    """A call's cancel check when no engine job is running it."""
    return False


def gathered_at_most(stream_threshold: int, max_result_bytes: int | None) -> int:
    """The most bytes of a ``.npy`` Jacobian the engines gather whole: a larger one
    streams, and a streamed ``.npy`` is not held to ``max_result_bytes``. (Gathered up to
    the stream threshold alone, one between the result limit and the threshold was a 413
    while every larger one streamed.) The front end's stream budget reads the same rule."""
    return stream_threshold if max_result_bytes is None else min(stream_threshold, max_result_bytes)


@dataclass
class Call:
    """One validated request, ready for an engine.

    ``args`` holds one array per leaf of the inputs (an array input is one leaf; a
    pytree parameter is several, see ``FunctionSpec.leaf_inputs``), and ``argnums``
    the differentiated leaves' positions among them. ``positions`` are the
    differentiated parameters as the caller named them; None means ``argnums`` (a
    function without pytree parameters, where the two agree).
    """

    spec: FunctionSpec
    args: list[np.ndarray]
    dtypes: list[str]  # compute dtype per leaf
    argnums: tuple[int, ...] = (0,)
    as_tuple: bool = False
    positions: tuple[int, ...] | None = None
    chunk_size: int | None = None
    batched: bool = False
    # vmap's in_dims, one per leaf of args (an int, or None: shared by every example);
    # None is every leaf's 0. out_dims: where the batch goes in the result (vmap_dims).
    in_dims: tuple[int | None, ...] | None = None
    out_dims: Any = 0
    mode: str = "rev"
    rows: tuple[int, int] | None = None
    return_output: bool = False
    vectors: Any = None  # cotangents (vjp) or tangents (jvp, hvp), as numpy trees
    cotangents: Any = None  # hvp's optional cotangents (c . H t), shaped like the output
    batched_vectors: bool = False
    deadline: float = math.inf  # time.monotonic() seconds: one clock for every process
    max_result_bytes: int | None = None
    # SPEC 7: "dense" (v1), "auto" or a declared pattern's name; and how a sparse
    # result travels: "csr" / "coo" (sparse) or "dense" (the same 2-D matrix, dense).
    sparsity: str = "dense"
    sparse_format: str = "csr"
    # Bytes the front end holds for this request's streamed row chunks (the one being
    # sent and the one asked for ahead), reserved before the engine runs anything: a
    # streamed Jacobian's chunks are sized to fit them (StreamBudget). None: not bounded.
    stream_room: int | None = None
    # Bytes of a gathered answer (HELD_ANSWER_BYTES or more) the front end could hold for
    # this request's client while sending it, as its stream budget stood when the request
    # was sent (None: any). Its size is known only after the forward pass: one past the
    # room was computed whole, then refused (429 or 503), again at every retry, at no cost
    # to a client that kept its share full by reading slowly. The engine refuses it after
    # the forward pass, before the derivative (errors.no_answer_room).
    answer_room: int | None = None
    # Whose request it is (clients.client_of: its API key or address): an engine takes its
    # queue's jobs in turn among clients (scheduler.Worker), not first come first served
    # only. None: one client among those with none.
    client: str | None = None
    cancelled: Callable[[], bool] = field(default=never_cancelled)  # the engine sets its job's check while it runs

    def signature(self, batched: bool = False) -> tuple[Any, ...]:
        """What equal requests share: function, argnums, per-example shapes and dtypes."""
        if batched:
            dims = self.in_dims or (0,) * len(self.args)
            shapes = tuple(example_shape(a.shape, d) for a, d in zip(self.args, dims))
        else:  # (every .npy Jacobian's stream key: no generator, no dims)
            shapes = tuple([a.shape for a in self.args])
        return (self.spec.name, self.argnums, self.as_tuple, shapes, tuple(self.dtypes), self.in_dims)

    @property
    def params(self) -> tuple[int, ...]:
        return self.argnums if self.positions is None else self.positions

    def group(self, leaves: Any) -> Any:
        """Per-differentiated-leaf items nested as jacrev nests over ``argnums``."""
        return self.spec.group(self.params, self.as_tuple, list(leaves))

    def single_primal(self) -> bool:
        """Whether the derivative is taken w.r.t. one plain array (no tuple argnums, no
        pytree parameter): only then is a Jacobian of one output one bare array."""
        return not self.as_tuple and len(self.argnums) == 1 and self.spec.inputs[self.params[0]].tree is None

    def row_nbytes(self) -> int:
        """Bytes of one Jacobian row on the wire (args hold bfloat16 as float32 already)."""
        return sum(self.args[i].nbytes for i in self.argnums)

    def gathered_at_most(self, stream_threshold: int) -> int:
        """:func:`gathered_at_most` under this call's result limit."""
        return gathered_at_most(stream_threshold, self.max_result_bytes)

    def check_alive(self) -> None:
        if self.cancelled():
            raise Timeout("the request was cancelled")
        if time.monotonic() > self.deadline:
            raise Timeout("the request ran past its deadline")


def stacked_liveness(calls: list[Call]) -> dict[str, Any]:
    """The ``deadline`` and ``cancelled`` of several requests computed as one (request
    batching): it stops only once no member can use it, each member past its own deadline
    or gone. It stopped at the earliest member's deadline: a request with a short
    X-Request-Timeout batched with another client's stopped the batch, and every member ran
    again alone (the other client: 1.17 s for 0.4 s of work, 3 runs where 2 were needed).
    The scheduler answers a member past its deadline 504 when the batch ends
    (``Worker._run_batch``), as its front end already has."""
    def gone() -> bool:
        now = time.monotonic()
        return all(c.cancelled() or now > c.deadline for c in calls)

    return {"deadline": max(c.deadline for c in calls), "cancelled": gone}


@dataclass
class Result:
    value: Any  # tree of numpy arrays
    aux: Any = None
    has_aux: bool = False
    output: Any = None
    chunk_size: int | None = None
    mode: str | None = None
    sparse_meta: dict[str, Any] | None = None  # how a sparse result was computed (meta)
    # per-example evaluate: per output leaf (and aux leaf), whether torch's vmap left it unbatched (it
    # depends on no batched input): meta.unbatched (and aux_unbatched); None where the examples ran
    # one by one; and any evaluate's bfloat16 / aux_bfloat16 (engine.core.bfloat16_meta)
    batch_meta: dict[str, list[bool]] | None = None

    def nbytes(self) -> int:
        """Bytes the response will carry at least (value, aux and output): every array,
        every string and dict key as JSON writes it, and a number's worth for each plain
        number. Counting only arrays and characters let an aux of 900,000 floats, a 16 MB
        dict key or 4 MB of control characters (6 bytes each as JSON) past the result
        limit (a second red team), and 21 MB of JSON was then encoded on the event loop."""
        if self.aux is None and self.output is None and type(self.value) is np.ndarray:
            # Nearly every result (the engine checks each one it answers): one array, as
            # the walk below counts it, without the walk (~3/4 of its cost).
            return _leaf_nbytes(self.value) + 10  # (+ 5 for each None, as _leaf_nbytes)
        total = 0
        stack = [self.value, self.aux, self.output]
        while stack:
            node = stack.pop()
            if isinstance(node, (list, tuple)):
                stack.extend(node)
            elif isinstance(node, dict):
                total += sum(_text_nbytes(str.__str__(k) if isinstance(k, str) else str(k)) for k in node)
                stack.extend(node.values())
            else:
                total += _leaf_nbytes(node)
        return total


def _leaf_nbytes(leaf: Any) -> int:
    if leaf is None or isinstance(leaf, bool):  # first: no aux, no output (most results)
        return 5
    if isinstance(leaf, np.ndarray):
        return max(leaf.nbytes, _lists_nbytes(leaf.shape))
    if isinstance(leaf, str):
        return _text_nbytes(str.__str__(leaf))
    if is_sparse_matrix(leaf):  # a scipy CSR/CSC/COO array: its index and value arrays
        return leaf.data.nbytes + sum(getattr(leaf, name).nbytes for name in SPARSE_FIELDS[leaf.format])
    if isinstance(leaf, (int, float)):
        return 24  # the longest a float or a 64-bit integer takes as text
    return 0


def _lists_nbytes(shape: tuple[int, ...]) -> int:
    """The bytes JSON writes for an array's nested lists alone (brackets and commas): what
    an array of no elements still carries. A function's (2^28, 0) output (or a Jacobian
    of a (2^28, 0) input) holds nothing, so counted 0 bytes, and 2^28 empty lists (805 MB
    of JSON text) were then encoded on the front end's event loop: that request and every
    other client's waited minutes, until the front end was killed."""
    total, count = 2, 1  # the outer list's brackets; ``count`` lists at the level reached
    for size in shape[:-1]:  # each level's lists hold the next level's, with commas between
        children = count * size
        total += 2 * children + max(children - count, 0)
        count = children
        if not count:
            break
    return total


def _text_nbytes(text: str) -> int:
    """A string's size as JSON text (escapes, and UTF-8's bytes, included)."""
    try:
        return len(orjson.dumps(text))
    except (TypeError, orjson.JSONEncodeError):  # not UTF-8: the engine refuses those in aux
        return 6 * len(text)




def is_sparse_matrix(obj: Any) -> bool:
    """A scipy CSR, CSC or COO array, told without importing scipy (the front end may not have)."""
    return getattr(obj, "format", None) in SPARSE_FIELDS and hasattr(obj, "nnz") and hasattr(obj, "data")


@dataclass
class JobInfo:
    """How a job ran: on which device, in how large a batch, how long it queued and computed."""

    device: str | None = None
    batch_size: int = 1
    queue_s: float = 0.0
    compute_s: float = 0.0
