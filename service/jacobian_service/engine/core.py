"""The derivative engine for one device: torch only, no HTTP, no threads of its own.

Everything here runs on the one thread that owns the device: forward-mode AD keeps
global state and is not thread-safe (``jacfwd`` from 8 threads gave silently wrong
Jacobians and errors, while ``jacrev`` stayed clean).
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from jacobian_client import wire

from ..errors import InvalidInput, OutOfMemory, ResultTooLarge, no_answer_room
from ..registry import shape_fields
from ..types import HELD_ANSWER_BYTES, HOST_CHUNK_BYTES, Call, Result, tree_leaves
from . import batched as _batched
from . import vmap_dims as _vmap_dims
from . import hessian as _hessian
from . import sparse as _sparse
from .calling import (AuxBox, GradOffWatch, as_input_dtypes, dense_pullback, differentiable, fresh,
                      function_error, is_oom, lacks_forward_ad, look, serving)
from .devices import release_free_heap
from .dual_level import beside_a_held_dual_level
from .products import agrees_with_reverse, global_replay, one_agrees, over_vectors, rng_replay
from . import kept_state
from .kept_state import KeptState
from .profile import Profiles
from .rows import RowStream
from .shapes import MAX_SPAN_BYTES
from .namespaces import Namespaces
from .process_settings import ProcessSettings

__all__ = ["TORCH_DTYPES", "Engine", "Streamed", "derivative_half_meta", "host_dtype", "room_rows", "to_numpy"]


# What a 413's detail tells the caller to ask for instead, by what was asked. Only a
# Jacobian of one output with respect to one input, in reverse mode, streams (as .npy or
# JSON) with no limit: the others are gathered whole, and streaming was no remedy to offer.
_REMEDIES = {
    "jacobian": "Ask for fewer rows (rows=) or a smaller input; a Jacobian of one output with respect to one "
                "input streams without this limit as application/x-npy in reverse mode (mode=rev).",
    "vectors": "Ask for fewer vectors or a smaller input.",
    "evaluate": "Ask for fewer examples or a smaller input (the output is the function's own).",
    "hessian": "Ask for a smaller input, or a sparse Hessian (sparsity=auto) if it is mostly zeros.",
    "examples": "Ask for fewer examples or a smaller input.",
    "sparse": "Ask for a smaller input.",
    "sparse_dense": "Ask for the sparse matrix itself (sparse_format=csr, csc or coo), its dense form as "
                    "application/x-npy (streamed without this limit), or a smaller input.",
    "sparse_dense_parts": "Ask for the sparse matrix itself (sparse_format=csr, csc or coo), or a smaller input (its "
                          "dense form streams as application/x-npy only alone: without return_output, of a "
                          "function without aux).",
}

log = logging.getLogger("jacobian_service.engine")


def room_rows(call: Call, most: int, row_nbytes: int, total_rows: int | None = None) -> int:
    """Rows a streamed chunk may hold: ``most`` bytes of them, and within the front end's
    room for this stream (two chunks: ``Call.stream_room``); at least one. A room that
    holds the whole result (``total_rows``) bounds nothing: a stream holds at most its
    result (``responses.stream_hold``), so one reserved at its size, as a stream of a
    size known before is, was cut into two halves for nothing."""
    if call.stream_room is not None and (total_rows is None or call.stream_room < total_rows * row_nbytes):
        most = min(most, call.stream_room // 2)
    return max(1, most // max(1, row_nbytes))


# Read-only, as the tables below (``MappingProxyType``): a function that changed one in
# place (``TORCH_DTYPES["float64"] = torch.float32``) had every later float64 request of
# every function computed and answered in float32. Rebinding the name is put back after
# its batch (``namespaces``); changing the table now raises, in that function alone.
TORCH_DTYPES = MappingProxyType({
    "bool": torch.bool,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,  # (inputs declared so: registry.COMPLEX_DTYPES)
    "complex128": torch.complex128,
})

# numpy's dtype for each name a request's dtype may take where an array of it is copied
# as it is (bfloat16 travels as float32: none). Told by identity, not by ``dtype.name``,
# which numpy computes in Python at every read (~1 us, a few on a loaded machine); a
# dtype that is not the very object (another byte order) takes the converting path,
# which gives the same copy.
_AS_SENT = MappingProxyType({name: np.dtype(name) for name in TORCH_DTYPES if name != "bfloat16"})


def materialized(leaf: torch.Tensor) -> torch.Tensor:
    """``leaf`` detached, as a tensor with storage. Forward mode answers some tangents with
    torch's storage-less zero tensor (``slogdet``'s sign: ``jvp`` gives
    ``_efficientzerotensor``), which neither ``.numpy()`` nor a copy into pinned memory
    takes: that was a 500 ``internal_error`` for a plain ``jvp`` request. A lazily
    negated view (``z.conj().imag``: torch's negative bit) ``.numpy()`` refuses too: an
    ``evaluate`` of such a function was a 500 ``internal_error`` where torch answers it.
    So does a lazily conjugated complex tensor (``z.conj()``: the conjugate bit), an
    output, aux leaf or jvp tangent alike: resolved here, as torch's own printing does."""
    leaf = leaf.detach()
    if leaf._is_zerotensor():
        return torch.zeros_like(leaf)
    if leaf.is_conj():
        leaf = leaf.resolve_conj()
    return leaf.resolve_neg() if leaf.is_neg() else leaf


_HALF = (torch.float16, torch.bfloat16)


def _wire_leaves(tree: Any) -> list[Any]:
    """Leaves as the wire (and the SDK's ``flatten``) count them: anything but a tuple,
    list or dict, None included (torch's pytree counts None as no leaf)."""
    if isinstance(tree, (tuple, list)):
        return [leaf for t in tree for leaf in _wire_leaves(t)]
    if isinstance(tree, dict):
        return [leaf for t in tree.values() for leaf in _wire_leaves(t)]
    return [tree]


def bfloat16_meta(args: Sequence[Any], out: Any, aux: Any, has_aux: bool) -> dict[str, list[bool]]:
    """An evaluate's ``meta.bfloat16`` (per output leaf) and ``meta.aux_bfloat16`` (per
    aux leaf): which leaves were bfloat16 here and go over the wire as float32 (numpy has
    no bfloat16). Said whenever a half-precision tensor was an input or a result: the
    adapters gave every float32 leaf of a function called in half precision that
    precision back (a float32 leaf could not be told from a bfloat16 one), so an output
    the function returns in float32 (``x.float()``, a float32 buffer's product) came
    back rounded to float16 / bfloat16 where torch and JAX keep float32. Said nowhere
    else (the function computed in float32 or float64: nothing to tell)."""
    outs, auxs = _wire_leaves(out), (_wire_leaves(aux) if has_aux else [])
    tensors = [t for t in (*pytree.tree_leaves(list(args)), *outs, *auxs) if isinstance(t, torch.Tensor)]
    if not any(t.dtype in _HALF for t in tensors):
        return {}
    bf = lambda t: isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
    return {"bfloat16": [bf(t) for t in outs], **({"aux_bfloat16": [bf(t) for t in auxs]} if has_aux else {})}


def derivative_half_meta(call: Any, value: Any, output: Any, aux: Any, value_flags: list[bool] | None = None,
                         ) -> dict[str, list[bool]] | None:
    """A derivative answer's (jacobian, hessian, vjp, jvp, hvp) ``meta.bfloat16`` (per
    leaf of the result: which were bfloat16 here and go as float32), ``output_bfloat16``
    (``return_output``'s output) and ``aux_bfloat16``: the flags an evaluate's
    ``bfloat16_meta`` gives, said on every route. Only evaluate said them: a bfloat16
    function's Jacobian, vjp or returned output came back float32 with nothing to tell
    it from a float32 one. Said where half precision took part (an input sent in it, or a
    result leaf of it), as an evaluate's are. ``value_flags``: the result's flags where
    ``value`` is already on the host (the gathered reverse-mode Jacobian)."""
    bf = lambda t: isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
    flags = value_flags if value_flags is not None else [bf(t) for t in _wire_leaves(value)]
    outs = [bf(t) for t in _wire_leaves(output)] if call.return_output else []
    auxs = [bf(t) for t in _wire_leaves(aux)] if call.spec.has_aux else []
    half = [t for t in (*_wire_leaves(output), *(_wire_leaves(aux) if call.spec.has_aux else ()))
            if isinstance(t, torch.Tensor) and t.dtype in _HALF]
    if not (half or any(flags) or any(d in ("float16", "bfloat16") for d in call.dtypes)):
        return None
    return {"bfloat16": flags, **({"output_bfloat16": outs} if call.return_output else {}),
            **({"aux_bfloat16": auxs} if call.spec.has_aux else {})}


def _to_host(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        leaf = materialized(leaf)
        if leaf.dtype == torch.bfloat16:
            leaf = leaf.float()
        return leaf.cpu().numpy()
    return leaf


def to_numpy(tree: Any) -> Any:
    """Tensors -> numpy on the host (bfloat16 as float32); other leaves unchanged."""
    # The shapes every request has (no aux: None; a chunk's gradients: a tuple of
    # tensors) without pytree's walk, which cost more than the copies (~10 us a call,
    # three calls a small Jacobian).
    if tree is None:
        return None
    if type(tree) is tuple and all(type(leaf) is torch.Tensor for leaf in tree):
        return tuple(_to_host(leaf) for leaf in tree)
    return pytree.tree_map(_to_host, tree)


def _torch_name(dtype: np.dtype) -> str:
    """numpy's dtype name as torch spells it (bool_ is torch.bool)."""
    return "bool" if dtype.kind == "b" else dtype.name


def host_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` reaches the host (and the wire) in."""
    return np.dtype("float32") if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype



def _rows_per_vmap(chunk: int, rows: int) -> int:
    """``meta.chunk_size``: the rows one vmap took, never more than there were (a
    chunk_size of 100 over 3 rows ran 3 rows, and said 100)."""
    return max(1, min(chunk, rows))

@dataclass
class Streamed:
    """A Jacobian too large to gather: its ``.npy`` shape and dtype, known from the
    forward pass, and its rows as host arrays, one chunk per ``next()``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_size: int
    chunks: Iterator[np.ndarray]
    meta: dict[str, list[bool]] | None = None  # its derivative_half_meta, as a gathered one's (None: unsaid)


def _by_position(node: Any, ref: Any) -> Any:
    """An ``.npz``'s vectors come as dicts keyed by their member names (``cotangents/0``):
    against a dict with those very keys they stay a dict, matched by key; a dict keyed
    ``0`` to ``n - 1`` otherwise stands for a list (a tuple's entries, or the flat list
    of leaves). A dict output's keys that are not strings (``{1: a, 0: b}``: torch's
    pytrees allow any) come as their text, JSON's and ``.npz``'s only kind of key: they
    are matched by that text, not taken for positions (which paired ``"0"`` with the
    output's first entry, key ``1``: a wrong ``vjp``, silently)."""
    if isinstance(node, dict) and isinstance(ref, dict) and set(node) != set(ref):
        as_text = {str(k): k for k in ref}
        if len(as_text) == len(ref) and set(node) == set(as_text):
            return {as_text[k]: v for k, v in node.items()}
    if not isinstance(node, dict) or (isinstance(ref, dict) and set(node) == set(ref)):
        return node
    if set(node) != {str(i) for i in range(len(node))}:
        return node
    return [node[str(i)] for i in range(len(node))]


def _keys_as_sent(node: dict[Any, Any]) -> list[str]:
    """A dict's keys as the wire writes them (their text), sorted, for what a refusal says:
    sorted as they were, an output's keys of mixed kinds (``{1: a, "2": b}``) raised
    TypeError, and cotangents with a key missing were a 500 ``internal_error``, not the
    422 naming the keys to send."""
    return sorted(str.__str__(k) if isinstance(k, str) else str(k) for k in node)


def _tangents_by_name(tree: Any, call: Call) -> Any:
    """Tangents keyed by the names of the parameters ``argnums`` names, as ``inputs`` and
    ``argnums`` may name them (``{"x": tx, "y": ty}`` for ``argnums: ["x", "y"]``, what a
    page writes): in the parameters' order, as the tuple torch.func.jvp takes. Such an
    object was a 422 "tangents: expected 2 entries", two entries given. An object keyed by
    names other than those (``{"x": tx, "z": tz}``) is a 422 naming both sets."""
    if not isinstance(tree, dict):
        return tree
    names = [call.spec.inputs[p].name for p in call.params]
    if call.as_tuple and len(set(names)) == len(names):
        if set(tree) == set(names):
            return [tree[n] for n in names]
        if set(tree) != {str(i) for i in range(len(tree))}:  # (an .npz's members by position: _by_position)
            raise InvalidInput(f"tangents: keys {sorted(tree)} are not the names of the parameters argnums "
                               f"names, {names}: send an object keyed by those, or a list in that order")
    elif not call.as_tuple and list(tree) == names and call.spec.inputs[call.params[0]].tree is None:
        return tree[names[0]]  # (argnums naming one array parameter: {"x": tx})
    return tree


def _split_stack(tree: Any, ref_leaves: list[Any], batched: bool) -> Any:
    """One array where several leaves of equal shape are due: JSON reads a tuple of
    vectors written as plain lists (``[[1, 0], [0, 1]]`` for two 2-vectors) as one
    array, which can only mean its rows, one per leaf, in order."""
    if not isinstance(tree, np.ndarray) or len(ref_leaves) < 2 or tree.ndim == 0 or tree.shape[0] != len(ref_leaves):
        return tree
    if batched and tree.ndim < 2:  # each row must hold a batch
        return tree
    rest = tree.shape[2:] if batched else tree.shape[1:]
    return _rows(tree) if all(tuple(r.shape) == rest for r in ref_leaves) else tree


def _rows(arr: np.ndarray) -> list[np.ndarray]:
    """An array's rows as arrays: ``list()`` of a 1-d array gives numpy scalars, not
    0-d arrays, and the 0-d leaves they stood for were refused as no array."""
    return [arr[i, ...] for i in range(arr.shape[0])]



# Requests of a function watched (kept_state.Replay) before the watch (its snapshot, ~10
# us and a copy of the tensors it reaches) stops, unless _STATE_CHANGED of them changed
# its state: a counter changes it at every call, a cache filled on first use (the
# built-in mlp's weights per device) once, or once per dtype or device. Such a cache kept
# the mlp watched for good: each request copied its weights.
_STATE_WATCHED = 16
_STATE_CHANGED = 4


def _one_state(method: Callable[..., Any]) -> Callable[..., Any]:
    """An Engine entry point whose calls of the function, for one request, each begin
    from the state the first began in (kept_state.Replay), not within another entry
    point. ``batched`` requests too: torch's ``vmap(jacrev(f))`` calls the function once
    for all examples, where the engine calls it for one example's sizes, under ``vmap``,
    and for its checks: a counter's ``batched: true`` Jacobian stepped 5 times and was
    answered 5 steps on (its Hessian 13); the examples a failed ``vmap`` runs one by one
    are each a call of their own (``over_examples``: ``Replay.restart``)."""

    @functools.wraps(method)
    def entry(self: "Engine", call: Call, *args: Any, **kwargs: Any) -> Any:
        with serving(lambda: call.deadline):  # (calling.look: whether a second call fits)
            return _entered(self, call, *args, **kwargs)

    def _entered(self: "Engine", call: Call, *args: Any, **kwargs: Any) -> Any:
        profile = self.profiles[call.spec.name]
        if not profile.initialised and kept_state.active.replay is None:
            self.initialise(call)
        if kept_state.active.replay is not None or not (profile.keeps_state or profile.state_watched < _STATE_WATCHED):
            return method(self, call, *args, **kwargs)
        replay = kept_state.active.replay = kept_state.Replay(call.spec.fn)
        try:
            return method(self, call, *args, **kwargs)
        finally:
            kept_state.active.replay = None
            replay.end()
            if replay.calls:
                profile.state_watched += 1
                profile.state_changed += replay.keeps_state
                profile.keeps_state = profile.keeps_state or profile.state_changed >= _STATE_CHANGED

    return entry


class Engine:
    """Computes derivatives on one device. Not thread-safe: one thread owns it."""

    def __init__(self, device: torch.device, memory_budget: int, sparsity_cache_dir: Any = None,
                 sparsity_cache_max_bytes: int = 1 << 30) -> None:
        from ..sparsity import PatternCache

        self.device = device
        self.memory_budget = memory_budget
        self.profiles = Profiles()
        # Sparsity patterns and colourings, per function and shapes; on disk too when the
        # setting names a directory ("" keeps the environment from choosing one). In memory
        # they hold at most twice the memory budget: the largest pattern detection may hold
        # (budget / 16 entries, 24 bytes each with its colouring's gather map) fits, and
        # clients' shapes cannot grow the engine past it (count alone bounded it at 256).
        self.sparsity_cache = PatternCache(sparsity_cache_dir or "", max_bytes=2 * memory_budget,
                                           max_disk_bytes=sparsity_cache_max_bytes)
        self.process_settings = ProcessSettings()  # as the engine set them (threads): put back after each batch
        self.namespaces = Namespaces()  # the names of torch, numpy, the service...: put back after each batch
        self._shares_process = True  # with its caller's code (in-process), until ``take_settings``
        self._moved_device: set[str] = set()  # functions that left another current CUDA device
        self._draw_readers: list[Callable[[], Any]] | None = None  # (run_batch's: made at its first batch)

    def enter_thread(self) -> None:
        """In the thread that runs this engine's batches, before the first: CUDA's current
        device (what ``device="cuda"``, pinned memory and ``torch.cuda`` calls without a
        device use) is per thread, and 0 until set. An engine on a second GPU left it so:
        its functions' ``"cuda"`` tensors went to the first GPU (a device mismatch), and
        each engine process made a context there too."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def restore_early(self, function: str) -> None:
        """In-process, before a batch's answers leave: the process-wide settings
        ``function`` changed and the names it rebound put back (``process_settings``,
        ``namespaces``). Put back after them, what the caller's thread set once answered
        was taken for the function's and undone, the function named for it (a test's
        monkeypatch of ``sparsity.acyclic.substitution``, reverted mid-test by the tidying
        of the request before it; a caller's ``torch.set_default_dtype`` alike). An engine
        process shares its settings and names with no one: it puts them back after (~80 us
        a batch that is no caller's wait)."""
        if self._shares_process:
            self.process_settings.restore(function)
            self.namespaces.restore(function)

    def restore_settings(self, function: str) -> None:
        """After a batch: the process-wide settings and names as they were (an engine
        process's; in-process: ``restore_early``), and this engine's GPU as the current
        device (a function may have set another)."""
        if not self._shares_process:
            self.process_settings.restore(function)
            self.namespaces.restore(function)
        if self.device.type == "cuda" and torch.cuda.current_device() != self.device.index:
            if function not in self._moved_device:  # once per function, as process_settings logs
                self._moved_device.add(function)
                log.warning("%s changed the current CUDA device and left it so; put back to %s",
                            function or "a function", self.device)
            torch.cuda.set_device(self.device)

    @staticmethod
    def computing() -> Any:
        """Around each batch the scheduler runs: forward mode that works beside a dual
        level the caller's thread holds (the in-process layout; ``dual_level``)."""
        return beside_a_held_dual_level()

    def take_settings(self, registry: Any = None) -> None:
        """For an engine process, which owns its process: the settings as they are now
        (its memory limit set) are the ones to put back, the whole process's with them
        (signal handlers, timers, resource limits: ``process_settings``), and the
        ``registry``'s functions as they are (``namespaces``)."""
        from .torch_kernels import watch_direct

        watch_direct()  # (before the settings' kernels and the namespaces are taken)
        self.process_settings = ProcessSettings(own_process=True)
        self._shares_process = False
        # An error's words that run user code made in a child, killed past their bound
        # (the hooks registered from now on are the functions', set aside at that fork).
        from .. import errors
        from .process_settings import fork_hook_lists
        from .words import forked_words

        lists = fork_hook_lists()
        errors.use_words_maker(functools.partial(forked_words, lists, tuple(map(len, lists))))
        # with the functions' modules imported: what they bound as imported stays
        self.namespaces = Namespaces(own_process=True, registry=registry)

    # ----------------------------------------------------------------- device helpers

    def host(self, tree: Any) -> Any:
        """Results to numpy on the host. On CUDA the copies go through pinned memory,
        non-blocking, with one synchronisation for the whole tree."""
        if self.device.type != "cuda":
            return to_numpy(tree)

        def stage(leaf: Any) -> Any:
            if not isinstance(leaf, torch.Tensor):
                return leaf
            leaf = materialized(leaf)
            dtype = torch.float32 if leaf.dtype == torch.bfloat16 else leaf.dtype
            pinned = torch.empty(leaf.shape, dtype=dtype, pin_memory=True)  # cached by torch's host allocator
            return pinned.copy_(leaf, non_blocking=True)

        staged = pytree.tree_map(stage, tree)
        torch.cuda.current_stream(self.device).synchronize()
        return to_numpy(staged)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def tensors(self, call: Call) -> list[torch.Tensor]:
        out = []
        cuda = self.device.type == "cuda"
        for arr, dtype in zip(call.args, call.dtypes):
            # Always a copy, never the request's own array: a function may write into
            # its inputs, and a later call (the output for return_output, reverse mode
            # after forward mode failed) must start from the values sent.
            if not cuda and arr.dtype is _AS_SENT.get(dtype):  # nearly every request: one copy, by numpy
                out.append(torch.from_numpy(arr.copy()))
                continue
            writeable = arr.flags.writeable
            t = torch.from_numpy(arr if writeable else arr.copy())
            if cuda:  # a pinned staging copy lets the upload run asynchronously
                t = t.pin_memory()
            # Said by what was done, not asked of the arrays: ``arr.ctypes.data`` builds
            # a ctypes object (7 us, of 19 for this whole loop on a small input).
            out.append(t.to(device=self.device, dtype=TORCH_DTYPES[dtype], non_blocking=cuda,
                            copy=writeable and not cuda))
        return out

    @staticmethod
    def wire_itemsize(dtype: torch.dtype) -> int:
        return 4 if dtype == torch.bfloat16 else dtype.itemsize

    def guard(self, fn: Callable[[], Any], forward_mode: bool = False) -> Any:
        """``fn()``, its failure the function's problem (``forward_mode``: a jvp or hvp
        product's, after the plain call ran: calling.function_error)."""
        try:
            return fn()
        except BaseException as exc:
            raise function_error(exc, forward_mode=forward_mode) from None

    @staticmethod
    def check_result_size(call: Call, nbytes: int, asked: str = "jacobian", span: int = 0, room: bool = True) -> None:
        """413 before computing a result over the limit, saying what the caller can ask
        for instead of what was ``asked`` (a key of ``_REMEDIES``); and a gathered one
        larger than its front end can hold for its client now (``Call.answer_room``). ``span``: the bytes
        its largest block would take were its sizes of 0 taken as 1, what numpy and
        torch index it by: a Hessian of no elements of a (0, 2^28) input was torch's
        'Stride calculation overflowed', answered as the function's 500. ``room=False``:
        a result already computed, whose answer room is its front end's to check."""
        if call.max_result_bytes is not None and nbytes > call.max_result_bytes:
            raise ResultTooLarge(f"the result would take {nbytes} bytes; the limit is {call.max_result_bytes}. "
                                 f"{_REMEDIES[asked]}")
        if span > MAX_SPAN_BYTES:
            raise ResultTooLarge("the result's sizes, those of 0 taken as 1, multiply past 2^63 bytes, what an array "
                                 f"can be indexed by, though it may hold no elements. {_REMEDIES[asked]}")
        if room and call.answer_room is not None and HELD_ANSWER_BYTES <= nbytes and call.answer_room < nbytes:
            raise no_answer_room(nbytes)  # (its front end could not send it now: not computed)

    def mark_unbatchable(self, name: str, why: BaseException | None = None, refused: Any = None) -> None:
        """Remember that ``vmap`` cannot run ``name`` (learned once the same inputs ran
        one by one), so batched requests loop and request batching leaves it alone; or,
        given ``refused``, only what it refused (batched.over_examples)."""
        profile = self.profiles[name]
        if refused is not None:
            if refused not in profile.vmap_refused:
                log.info("vmap cannot batch %s's %s with in_dims %s (%s); looping over those examples from now on",
                         name, *refused, type(why).__name__ if why else "?")
                profile.vmap_refused[refused] = True
            return
        if profile.vmap_function:
            log.info("vmap cannot batch %s (%s); looping over examples from now on", name, type(why).__name__ if why else "?")
            profile.vmap_function = False

    def can_batch(self, name: str) -> bool:
        profile = self.profiles[name]
        return profile.vmap_function and profile.stacks

    # ----------------------------------------------------------------- jacobian

    def row_stream(self, call: Call) -> RowStream:
        if call.batched:
            raise InvalidInput("batched Jacobians are not streamed")
        stream = RowStream(self, call, self.tensors(call))
        if call.rows is not None:
            start, stop = call.rows
            if len(stream.leaves) != 1:
                raise InvalidInput("rows applies to functions with a single output")
            if not 0 <= start <= stop <= stream.total_rows:
                raise InvalidInput(f"rows [{start}, {stop}] is out of range for {stream.total_rows} output rows")
        self.profiles[call.spec.name].output_rows[stream.signature] = stream.total_rows
        return stream

    def initialise(self, call: Call) -> None:
        """A function reaching a lazy module not yet materialised (``nn.LazyLinear``,
        ``LazyConv*``, ``LazyBatchNorm*``) or an empty Parameter (its first call sets
        its ``.data``) run once plainly, outside any transform, on copies of ``call``'s
        inputs (a batched call's first example), before any transform calls it: the dry
        run PyTorch asks of lazy modules. Made inside ``jacrev``/``vmap``, that first
        call set a Parameter's ``.data`` to a tensor of the transform's level: SIGSEGV
        (kept_state.reaches_uninitialized; in-process ``torch.func`` crashes too), at the
        warm-up and then at the first request. What the dry run changed is left as a
        warm-up leaves it (the module materialised, a counter put back:
        kept_state.warm_up); its failure is the request's, and while a lazy module is
        left to materialise the next request tries again."""
        profile = self.profiles[call.spec.name]
        if not kept_state.reaches_uninitialized(call.spec.fn):
            profile.initialised = True
            return
        args = self.tensors(call)
        if call.batched:
            in_dims = _vmap_dims.dims(call)
            if not _vmap_dims.batch_size(args, in_dims):
                return  # (no example to run: vmap runs none either)
            args = _vmap_dims.example(args, in_dims, 0)
        spec = call.spec
        log.info("%s reaches a lazy module or an empty Parameter: run once outside torch.func first", spec.name)
        kept_state.warm_up(spec.fn, lambda: self.guard(lambda: spec.fn(*spec.parameters(fresh(args)))))
        # (a Parameter left empty is the function's own: not run so again)
        profile.initialised = kept_state.reaches_uninitialized(spec.fn) != "lazy"

    def warm_up(self, call: Call) -> Result:
        """A warm-up's Jacobian (the first jacrev of a function costs ~1 s), leaving what
        the function keeps across calls as a first request should find it
        (kept_state.warm_up): a counter's first request after a warm-up was answered one
        step on, where in-process the first call sees the state the module's import
        left; a cache it filled stays filled."""
        return kept_state.warm_up(call.spec.fn, lambda: self.jacobian(call))

    @_one_state
    def jacobian(self, call: Call, stream: RowStream | None = None) -> Result:
        """The whole Jacobian, gathered; ``stream`` reuses a forward pass already made."""
        if call.sparsity != "dense":
            return _sparse.sparse_derivative(self, call, "jacobian")
        if call.batched:
            return _batched.batched(self, call, "jacobian")
        if stream is None and call.rows is None and call.mode != "rev":
            forward = self._forward_jacobian(call)  # never runs the reverse pass
            if forward is not None:
                return forward
        stream = stream or self.row_stream(call)
        start, stop = call.rows or (0, stream.total_rows)
        self.check_result_size(call, (stop - start) * call.row_nbytes())
        output = self.host(stream.output) if call.return_output else None
        aux = self.host(stream.aux)
        chunk = call.chunk_size or stream.auto_chunk()
        value = self._gather(stream, start, stop, chunk)
        # (jacrev's blocks take their inputs' dtypes: per output leaf, one per differentiated leaf)
        flags = [call.dtypes[i] == "bfloat16" for i in call.argnums] * len(stream.leaves)
        half = derivative_half_meta(call, None, stream.output, stream.aux, flags)
        return Result(value, aux, call.spec.has_aux, output, _rows_per_vmap(stream.chunk_used or chunk, stop - start), "rev",
                      batch_meta=half)

    @_one_state
    def jacobian_npy(self, call: Call, stream_threshold: int) -> Result | Streamed:
        """A Jacobian bound for ``.npy``: gathered when small (or forward mode, or several
        outputs), else :class:`Streamed` row chunk by row chunk. The forward pass fixes
        the output shape, hence the header and length, before any row is computed."""
        if call.sparsity != "dense" and call.sparse_format == "dense":
            return _sparse.streamed_rows(self, call, stream_threshold, "jacobian")
        if call.batched or call.sparsity != "dense":
            return self.jacobian(call)
        if call.rows is None and call.mode != "rev":
            forward = self._forward_jacobian(call)
            if forward is not None:
                return forward
            # reverse mode after all (``auto``), streamed as ``mode=rev`` is: gathered, a
            # large one was a 413 where mode=rev streamed it
        stream = self.row_stream(call)
        start, stop = call.rows or (0, stream.total_rows)
        if (len(stream.leaves) != 1 or not call.single_primal()
                or (stop - start) * call.row_nbytes() <= call.gathered_at_most(stream_threshold)):
            return self.jacobian(call, stream)
        primal = stream.primals[0]
        shape = (stop - start, *primal.shape) if call.rows else (*stream.leaves[0].shape, *primal.shape)
        chunk = call.chunk_size or min(stream.auto_chunk(), room_rows(call, HOST_CHUNK_BYTES, call.row_nbytes(), stop - start))
        rows = stream.chunks(start, stop, chunk, calibrate=not call.chunk_size)

        def host() -> Iterator[np.ndarray]:
            for _, _, grads in rows:
                yield np.ascontiguousarray(self.host(grads[0]))
                release_free_heap()  # the last chunk's temporaries: back to the OS, not kept

        # said before any row runs: where rows are known to run one by one, that is 1
        per_vmap = chunk if self.profiles[call.spec.name].vmap_pullback else 1
        # (its flags as jacobian()'s gathered answer gives them: one array, its input's dtype)
        half = derivative_half_meta(call, None, stream.output, stream.aux, [call.dtypes[call.argnums[0]] == "bfloat16"])
        return Streamed(shape, host_dtype(primal.dtype), _rows_per_vmap(per_vmap, stop - start), host(), half)

    def _gather(self, stream: RowStream, start: int, stop: int, chunk: int) -> Any:
        """All rows ``start:stop`` written into preallocated host arrays, then nested.

        When one chunk holds every row its arrays are used as they are: no second copy
        of the Jacobian (jacrev's torch.cat would make one too)."""
        rows_only = stream.call.rows is not None
        leaves = stream.leaves[:1] if rows_only else stream.leaves
        offsets = list(itertools.accumulate(stream.sizes, initial=0))
        # (first row, row count) of each output's block in the flattened row space
        bounds = [(start, stop - start)] if rows_only else list(zip(offsets, stream.sizes))
        blocks: list[list[np.ndarray]] | None = None
        for s, e, grads in stream.chunks(start, stop, chunk):
            host = self.host(tuple(grads))  # one synchronisation per chunk on CUDA
            if s == start and e == stop:
                blocks = [[h[base - s : base - s + size] for h in host] for base, size in bounds]
                break
            if blocks is None:
                blocks = [[np.empty((size, *h.shape[1:]), h.dtype) for h in host] for _, size in bounds]
            for j, (base, size) in enumerate(bounds):
                lo, hi = max(s, base), min(e, base + size)
                if lo < hi:
                    for i, h in enumerate(host):
                        blocks[j][i][lo - base : hi - base] = h[lo - s : hi - s]
        if blocks is None:  # no rows at all
            blocks = [[np.empty((size, *p.shape), host_dtype(p.dtype)) for p in stream.primals] for _, size in bounds]
        nested = []
        for j, leaf in enumerate(leaves):
            shaped = [
                b.reshape((*leaf.shape, *p.shape)) if not rows_only else b for b, p in zip(blocks[j], stream.primals)
            ]
            nested.append(stream.call.group(shaped))  # over argnums, pytree parameters included
        return nested[0] if rows_only else stream.nest(nested)

    def _forward_jacobian(self, call: Call) -> Result | None:
        """jacfwd, when ``mode`` asks for it (``auto``: inputs fewer than outputs) and
        it gives jacrev's answer; None to use reverse mode (also where reverse mode
        cannot run: see :func:`agrees_with_reverse`). Sizes come from a plain forward
        call: the reverse pass comes only as the check."""
        profile = self.profiles[call.spec.name]
        if not profile.forward_ad or profile.grad_off:
            return None
        args = self.tensors(call)
        box = AuxBox(call.spec)
        g, primals = differentiable(box, args, call)
        watch = GradOffWatch()
        # (as reverse mode calls it where a plain call fails: calling.look; forward mode
        # then fails too, and reverse mode answers, as README's "whatever mode" says)
        out, _ = self.guard(lambda: watch.call(look, g, lambda: fresh(primals)))
        if watch.seen:  # forward mode would see through its no_grad: jacrev's answer
            profile.grad_off = True
            return None
        out_numel = sum(leaf.numel() for leaf in pytree.tree_leaves(out))
        in_numel = sum(p.numel() for p in pytree.tree_leaves(primals))
        if call.mode == "auto" and (in_numel >= out_numel or (
                call.max_result_bytes is not None and out_numel * call.row_nbytes() > call.max_result_bytes)):
            return None  # reverse mode: fewer passes, or (past the result limit) a .npy it can stream
        if call.chunk_size is not None and call.chunk_size < in_numel:
            # jacfwd pushes every input column in one vmap (it takes no chunk_size): the
            # bound asked for is kept by reverse mode's row chunks (the result is the same)
            return None
        self.check_result_size(call, out_numel * call.row_nbytes())
        argnums: int | tuple[int, ...] = tuple(range(len(primals))) if call.as_tuple else 0
        try:
            jac, aux_t = torch.func.jacfwd(g, argnums=argnums, has_aux=True)(*primals)
        except BaseException as exc:
            if is_oom(exc):
                raise OutOfMemory(f"out of memory: {type(exc).__name__}") from None
            if not isinstance(exc, Exception):
                raise function_error(exc) from None
            # `mode=fwd` too: the result never depends on the mode (a custom
            # autograd.Function without jvp has a jacrev); a function that fails of
            # itself fails again in reverse mode, with its own error.
            log.info("jacfwd failed for %s (%s); using reverse mode", call.spec.name, type(exc).__name__)
            # remembered only where forward AD is missing: a vmap failure (a custom Function
            # without a vmap rule, whose one-by-one JVPs the sparse route runs) or an error
            # of these inputs is no reason to keep the next request off forward mode
            profile.forward_ad = profile.forward_ad and not lacks_forward_ad(exc)
            return None
        g_check, _ = differentiable(AuxBox(call.spec), args, call)  # its own aux: the answer's stays whole
        if not agrees_with_reverse(g_check, primals, jac):
            log.info("jacfwd differs from jacrev for %s at this point; using reverse mode", call.spec.name)
            return None
        jac = as_input_dtypes(jac, primals, depth=1)  # jacrev's dtypes, not the output's
        output = self.host(out) if call.return_output else None  # f at the values sent
        # meta.chunk_size: what ran in one vmap, the input's columns (null when not asked)
        used = in_numel if call.chunk_size is not None else None
        aux = box.restore(aux_t)
        return Result(self.host(jac), self.host(aux), call.spec.has_aux, output, used, "fwd",
                      batch_meta=derivative_half_meta(call, jac, out, aux))

    # ----------------------------------------------------------------- hessian

    @_one_state
    def hessian(self, call: Call) -> Result:
        if call.sparsity != "dense":
            return _sparse.sparse_derivative(self, call, "hessian")
        if call.batched:
            return _batched.batched(self, call, "hessian")
        return _hessian.hessian(self, call)

    @_one_state
    def hessian_npy(self, call: Call, stream_threshold: int) -> Result | Streamed:
        """A sparse Hessian bound for a dense ``.npy`` (``sparse_format=dense``; the
        front end sends no other here): streamed as a sparse Jacobian's dense form is."""
        return _sparse.streamed_rows(self, call, stream_threshold, "hessian")

    # ----------------------------------------------------------------- sparsity patterns

    @_one_state
    def sparsity_jacobian(self, call: Call) -> Result:
        """The Jacobian's sparsity pattern and colouring (``GET .../sparsity``)."""
        return _sparse.describe(self, call, "jacobian")

    @_one_state
    def sparsity_hessian(self, call: Call) -> Result:
        return _sparse.describe(self, call, "hessian")

    # ----------------------------------------------------------------- evaluate, vjp, jvp, hvp

    @_one_state
    def evaluate(self, call: Call, allow_loop: bool = True) -> Result:
        args = self.tensors(call)
        box = AuxBox(call.spec, differentiated=False)
        batch_meta = None
        if call.batched:
            watch = _batched.UnbatchedOutputs(box)
            out, aux = _batched.over_examples(self, call, box, watch, args, allow_loop)
            batch_meta = watch.meta()
            if call.out_dims != 0:  # vmap's out_dims: the batch moved, as the last step
                in_dims = _vmap_dims.dims(call)
                out = _vmap_dims.lay_out(call, out, "output", _vmap_dims.torch_says_unbatched(
                    lambda *a: box(*a)[0], self.tensors(call), in_dims, out) if _vmap_dims.has_none(call) else None)
                aux = _vmap_dims.lay_out_extra(call, aux)
        else:
            out, aux_t = self.guard(lambda: box(*args))
            aux = box.restore(aux_t)
        # Its size is known only once it is computed, and then refusing it for want of room
        # saves nothing but its trip to the front end: refused so (errors.no_answer_room),
        # a request whose room had come back meanwhile was asked again (routes._computed)
        # and computed twice, a client's large evaluate answers each costing the engine two
        # runs. Its front end holds it or refuses it with the room there is now.
        self.check_result_size(call, sum(t.numel() * self.wire_itemsize(t.dtype) for t in pytree.tree_leaves(out)),
                               "evaluate", room=False)
        batch_meta = {**(batch_meta or {}), **bfloat16_meta(args, out, aux, call.spec.has_aux)} or None
        return Result(self.host(out), self.host(aux), call.spec.has_aux, batch_meta=batch_meta)

    def _vectors(self, tree: Any, like: Any, what: str, batched: bool) -> Any:
        """Check a cotangent/tangent tree against the shapes it must match; to tensors.

        Accepted: one array (a single leaf), the same nesting as ``like`` (lists for
        tuples, dicts by key), or a flat list of its leaves in order."""
        ref_leaves, ref_spec = pytree.tree_flatten(like)
        tree = _split_stack(tree, ref_leaves, batched)
        leaves = self._vector_leaves(tree, like, ref_leaves, what, batched)
        out = []
        # Each leaf's error names its path in the tree (cotangents.a[0]), as an input
        # leaf's does (params.w): "cotangents: expected shape [3]" left the caller to
        # find which of a tree's leaves was meant.
        for (path, arr), ref in zip(leaves, ref_leaves):
            if not isinstance(arr, np.ndarray):
                raise InvalidInput(f"{what}{path}: expected an array, got {type(arr).__name__}")
            want = ((arr.shape[0],) if batched and arr.ndim else ()) + tuple(ref.shape)
            if tuple(arr.shape) != want or (batched and arr.ndim == 0):
                shape = ("B", *ref.shape) if batched else tuple(ref.shape)
                # The shapes as fields too: a client's code reads them (jax's adapter
                # tells an output whose shape follows the values by them), not the words.
                hint = ""
                if ref.is_complex() and arr.dtype.kind != "c" and tuple(arr.shape) == (*want, 2):
                    # [real, imag] pairs sent as plain lists (as a complex input's plain
                    # lists are read): a vector's plain lists are real numbers, so the
                    # pairs were one dimension too many, and the 422 said only that
                    dtype = str(ref.dtype).removeprefix("torch.")
                    hint = (f" (complex {what} as [real, imag] pairs go in an array object that names the dtype: "
                            f'{{"dtype": "{dtype}", "shape": {list(arr.shape[:-1])}, "data": [[re, im], ...]}}; '
                            "plain lists here are real numbers)")
                raise InvalidInput(f"{what}{path}: expected shape {list(shape)}, got {list(arr.shape)}{hint}",
                                   fields=shape_fields(what, path, shape, arr.shape))
            if arr.dtype.kind not in "biufc":  # (complex tangents: checked against their input below)
                raise InvalidInput(f"{what}{path}: expected numbers, got {arr.dtype.name}")
            if what == "cotangents" and (arr.dtype.kind == "c") != ref.is_complex():
                # torch.func.vjp's pullback refuses a cotangent whose kind is not its
                # output's (a real one is cast within its kind, as here); a complex one
                # cast to a real output would drop its imaginary part without a word
                i = len(out)
                raise InvalidInput(f"{what}{path}: expected {'complex' if ref.is_complex() else 'real'} cotangents for "
                                   f"the {str(ref.dtype).removeprefix('torch.')} output, got {arr.dtype.name} (torch.func.vjp: For "
                                   "complex Tensors, both grad_output and output are required to have the same dtype. "
                                   f"Mismatch in dtype: grad_output[{i}] has a dtype of torch.{_torch_name(arr.dtype)} "
                                   f"and output[{i}] has a dtype of {ref.dtype}.)")
            if what == "tangents" and arr.dtype.kind == "c" and not ref.is_complex():
                # torch.func.jvp casts it to the real input's dtype, its imaginary part
                # dropped with a warning alone: refused, as a complex cotangent of a
                # real output is. (A real tangent of a complex input is cast below, its
                # imaginary part 0: torch.func.jvp's answer for the complex one.)
                raise InvalidInput(f"{what}{path}: expected real tangents for the {str(ref.dtype).removeprefix('torch.')} "
                                   f"input, got {arr.dtype.name} (torch.func.jvp would drop its imaginary part: Casting "
                                   "complex values to real discards the imaginary part); only an input declared "
                                   "complex64 or complex128 takes complex tangents")
            if what == "tangents" and arr.dtype.kind not in "fc":
                # torch.func.jvp refuses them (vjp casts integer cotangents): an int64
                # tangent (an .npz member, an explicit dtype) was cast and answered, 200
                raise InvalidInput(f"{what}{path}: expected floating tangents, got {arr.dtype.name} (torch.func.jvp: "
                                   f"Expected tangent to be floating point or complex, but got: torch.{_torch_name(arr.dtype)})")
            t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
            out.append(t.to(device=self.device, dtype=ref.dtype))
        batch_sizes = {t.shape[0] for t in out} if batched else set()
        if len(batch_sizes) > 1:
            sizes = ", ".join(f"{what}{path}: {t.shape[0]}" for (path, _), t in zip(leaves, out))
            raise InvalidInput(f"{what}: batched vectors disagree on the batch size ({sizes})")
        return pytree.tree_unflatten(out, ref_spec)

    @staticmethod
    def _vector_leaves(tree: Any, like: Any, ref_leaves: list[Any], what: str,
                       batched: bool = False) -> list[tuple[str, Any]]:
        """The leaves of ``tree`` in ``like``'s order, each with its path (``.a[0]``)."""
        if isinstance(tree, np.ndarray) and len(ref_leaves) == 1:
            if isinstance(like, (list, tuple)) and len(like) == 1 and tree.ndim == ref_leaves[0].dim() + 1 + batched \
                    and tree.shape[0] == 1 and tuple(tree.shape[1 + batched:]) == tuple(ref_leaves[0].shape):
                # A tuple of one vector (torch's (t,) for argnums=(0,), or for an output
                # (y,)) written as plain lists, [[1, 2, 3]]: JSON reads it as one array
                # with a leading 1, which can only mean its one row (as _split_stack
                # takes the rows of a tuple of several). It was a 422 "expected shape
                # [3], got [1, 3]" where [[1, 2, 3], [4, 5, 6]] for two was taken.
                return [("[0]", tree[0])]
            return [("", tree)]

        def nested(node: Any, ref: Any, path: str, sent: Any = None) -> list[Any]:
            # (sent: the node as the request gave it, for what is said of it)
            sent, node = node if sent is None else sent, _by_position(node, ref)
            if isinstance(node, np.ndarray) and isinstance(ref, (list, tuple)) and node.ndim > batched \
                    and node.shape[0] == len(ref):
                # JSON reads a tuple of equal-shaped leaves written as plain lists, at
                # any depth, as one array (``(a0, a1)`` of two 0-d tangents: ``[1, 2]``):
                # its rows are the tuple's entries (each holding the batch, if stacked).
                # Only the top level was split, so torch.func.jvp's own pytree primals
                # ((one, one), one) were a 422 "expected 2 entries".
                node = _rows(node)
            if isinstance(ref, torch.Tensor):
                if not isinstance(node, np.ndarray):
                    # A list here is one the front end could not read as one array
                    # (its entries differ in shape: parsing._is_vector_node).
                    got = (isinstance(sent, dict) and wire.typed_array(sent)) or (
                        f"{len(node)} entries of different shapes" if isinstance(node, list) else type(node).__name__)
                    raise InvalidInput(f"{what}{path}: expected one array of shape {list(ref.shape)}, got {got}")
                return [(path, node)]
            if isinstance(ref, dict):
                if not isinstance(node, dict) or set(node) != set(ref):
                    got = _keys_as_sent(node) if isinstance(node, dict) else type(node).__name__
                    raise InvalidInput(f"{what}{path}: expected keys {_keys_as_sent(ref)}, got {got}")
                return [leaf for k in ref for leaf in nested(node[k], ref[k], f"{path}.{k}")]
            if not isinstance(node, (list, tuple)) or len(node) != len(ref):
                raise InvalidInput(f"{what}{path}: expected {len(ref)} entries")
            return [leaf for i, (n, r) in enumerate(zip(node, ref)) for leaf in nested(n, r, f"{path}[{i}]")]

        sent, tree = tree, _by_position(tree, like)
        flat = isinstance(tree, (list, tuple)) and len(tree) == len(ref_leaves) and all(isinstance(v, np.ndarray) for v in tree)
        flat_leaves = [(f"[{i}]", v) for i, v in enumerate(tree)] if flat else []
        if flat and not (isinstance(like, (list, tuple)) and len(like) == len(tree)):
            return flat_leaves  # the leaves in order, for any nesting
        if isinstance(tree, dict) and isinstance(like, dict) and set(tree) != set(like):
            raise InvalidInput(f"{what} keys {_keys_as_sent(tree)} do not match {_keys_as_sent(like)}")
        try:
            return nested(tree, like, "", sent)
        except InvalidInput as exc:
            if flat:
                return flat_leaves
            if len(ref_leaves) < 2:
                raise
            # Lists nested otherwise than the tree (``[[c1, [c2, c3]]]`` for an output
            # ``(x, (x, x))``) are refused as torch.func refuses them; say what is taken.
            shaped = "the output is" if what == "cotangents" else "the differentiated inputs are"
            raise InvalidInput(f"{exc.detail}: {what} are nested as {shaped}, or a flat list of all "
                               f"{len(ref_leaves)} arrays in order (torch.func: Expected pytree structure of "
                               f"{what} to be the same as pytree structure of "
                               f"{'outputs' if what == 'cotangents' else 'primals'})", fields=exc.fields) from None

    @_one_state
    def vjp(self, call: Call) -> Result:
        args = self.tensors(call)
        box = AuxBox(call.spec, complex_ok=True)  # torch.func.vjp pulls back a complex cotangent
        g, primals = differentiable(box, args, call)
        batch = self._vector_batch(call)
        self.check_result_size(call, batch * call.row_nbytes(), "vectors")
        out, pullback, aux_t = self.guard(lambda: torch.func.vjp(g, *primals, has_aux=True))
        pullback = dense_pullback(pullback)
        cot = self._vectors(call.vectors, out, "cotangents", call.batched_vectors)
        if call.batched_vectors:
            grads = self.guard(lambda: over_vectors(call.spec.name, pullback, (cot,), *self._checked(call, "vjp"),
                                                    alive=call.check_alive))
        else:
            grads = self.guard(lambda: pullback(cot))
        value = tuple(grads) if call.as_tuple else grads[0]
        output = self.host(out) if call.return_output else None
        aux = box.restore(aux_t)
        return Result(self.host(value), self.host(aux), call.spec.has_aux, output,
                      batch_meta=derivative_half_meta(call, value, out, aux))

    @_one_state
    def jvp(self, call: Call) -> Result:
        args = self.tensors(call)
        box = AuxBox(call.spec, differentiated=False)  # torch.func.jvp answers integer outputs
        g, primals = differentiable(box, args, call)
        like = primals if call.as_tuple else primals[0]
        tangents = self._vectors(_tangents_by_name(call.vectors, call), like, "tangents", call.batched_vectors)
        tangents = tuple(tangents) if call.as_tuple else (tangents,)

        def push(*t: torch.Tensor) -> tuple[Any, Any, Any]:
            return torch.func.jvp(g, primals, t, has_aux=True)

        # The output's size (hence the result's) is known only after a forward pass:
        # take it from a plain call, before any product is computed, whose random draws
        # the products then make too (products.rng_replay).
        out, aux_t, replay = self._first_call(g, primals)
        per = sum(t.numel() * self.wire_itemsize(t.dtype) for t in pytree.tree_leaves(out))
        self.check_result_size(call, self._vector_batch(call) * per, "vectors")
        if call.batched_vectors:
            def again() -> Callable[..., Any]:
                g2, clean = differentiable(box, self.tensors(call), call)
                return lambda *t: torch.func.jvp(g2, fresh(clean), t, has_aux=True)[1]

            value = self.guard(lambda: over_vectors(call.spec.name, lambda *t: push(*t)[1], tangents,
                                                    *self._checked(call, "jvp"), again, replay=replay,
                                                    alive=call.check_alive), forward_mode=True)
        else:
            out, value, aux_t = self.guard(lambda: push(*tangents), forward_mode=True)
        output = self.host(out) if call.return_output else None
        aux = box.restore(aux_t)
        return Result(self.host(value), self.host(aux), call.spec.has_aux, output,
                      batch_meta=derivative_half_meta(call, value, out, aux))

    @_one_state
    def hvp(self, call: Call) -> Result:
        """Hessian-vector products, forward over reverse: ``jvp(grad(f), primals,
        tangents)`` of a scalar function; with ``cotangents`` (shaped like the output, any
        output), ``c . H t``: the jvp of the vjp, ``jvp(lambda p: vjp(f, p)[1](c), primals,
        tangents)``, one product per (cotangent, tangent) pair, so a non-scalar function's
        second-order product needs neither its whole Hessian (m n^2 numbers) nor a
        contraction on the client; with ``batched_vectors``, vmapped over the stacks."""
        args = self.tensors(call)
        box = AuxBox(call.spec, differentiated=call.cotangents is not None, complex_ok=True)  # c . H t: a vjp
        # (of a complex cotangent too, as torch.func.vjp's); t: a grad, which answers a scalar
        # integer output zeros, as torch.func's hvp (jvp of grad) does, and refuses a complex one (below)
        g, primals = differentiable(box, args, call)
        like = primals if call.as_tuple else primals[0]
        # The output first: no tangent can fix a function that is not scalar. Its random
        # draws are the products' too (products.rng_replay).
        out, aux_t, replay = self._first_call(g, primals, reverse=True)
        if call.cotangents is None and not (isinstance(out, torch.Tensor) and out.dim() == 0):
            raise InvalidInput("hvp needs a function with one scalar (0-d) output, or 'cotangents' shaped like "
                               "its output (c . H t, a vector-Hessian-vector product)")
        if call.cotangents is None and out.is_complex():
            # torch.func.grad refuses it (so torch's hvp, jvp of grad, does): the request
            # asked for a derivative the output has not, the 422 a complex output's
            # Hessian is; it was the function's 500 with torch's RuntimeError
            raise InvalidInput(f"the output is {str(out.dtype).removeprefix('torch.')}, which has no real derivative "
                               "(torch.func.grad: grad can be implicitly created only for real scalar outputs but "
                               f"got {out.dtype})")
        tangents = self._vectors(_tangents_by_name(call.vectors, call), like, "tangents", call.batched_vectors)
        tangents = tuple(tangents) if call.as_tuple else (tangents,)
        cot = None if call.cotangents is None else self._vectors(call.cotangents, out, "cotangents",
                                                                 call.batched_vectors)
        self.check_result_size(call, self._vector_batch(call) * call.row_nbytes(), "vectors")
        argnums = tuple(range(len(primals)))

        def product(g: Callable[..., Any], at: Callable[[], tuple[Any, ...]]) -> Callable[..., Any]:
            if cot is None:
                grad = _hessian.gradient(lambda *p: g(*p)[0], argnums)
                return lambda *t: torch.func.jvp(grad, at(), t)[1]
            # c first among the vectors: over_vectors maps every vector over its dim 0
            return lambda c, *t: torch.func.jvp(lambda *p: torch.func.vjp(g, *p, has_aux=True)[1](c), at(), t)[1]

        push = product(g, lambda: primals)
        vectors = tangents if cot is None else (cot, *tangents)

        def again() -> Callable[..., Any]:
            g2, clean = differentiable(box, self.tensors(call), call)
            return product(g2, lambda: fresh(clean))

        if call.batched_vectors:
            # c . H t is bilinear in (c, t): vmap's products are checked against one pair's
            # product, not by linearity over mixed vectors (products.one_agrees)
            check, kind = (None, "hvp") if cot is None else (one_agrees, "hvp_cotangents")
            value = self.guard(lambda: over_vectors(call.spec.name, push, vectors, *self._checked(call, kind), again,
                                                    check=check, replay=replay, alive=call.check_alive),
                               forward_mode=True)
        else:
            replay()
            value = self.guard(lambda: push(*vectors), forward_mode=True)
        value = tuple(value) if call.as_tuple else value[0]
        output = self.host(out) if call.return_output else None
        aux = box.restore(aux_t)
        return Result(self.host(value), self.host(aux), call.spec.has_aux, output,
                      batch_meta=derivative_half_meta(call, value, out, aux))

    def _first_call(self, g: Callable[..., Any], primals: tuple[Any, ...],
                    reverse: bool = False) -> tuple[Any, Any, Callable[[], None]]:
        """``(out, aux_t, replay)``: the plain call whose output a jvp / hvp answers, and
        what puts the random generators back as they were for it (products.rng_replay).
        Where it drew from numpy's or Python's global generator (their fingerprints, ~2
        us), which torch's vmap does not refuse, their states are taken now and the
        call made again from them (products.global_replay): every product then draws
        what that call drew."""
        replay = rng_replay()
        drawn = self._draws()
        # ``reverse``: the products differentiate it in reverse mode (an HVP's gradient),
        # so where a plain call fails it is called as reverse mode calls it (calling.look)
        first = (lambda: look(g, lambda: fresh(primals))) if reverse else (lambda: g(*fresh(primals)))
        out, aux_t = self.guard(first)
        if self._draws() != drawn:
            replay = global_replay()
            out, aux_t = self.guard(first)
        return out, aux_t, replay

    def _checked(self, call: Call, kind: str) -> tuple[Any, Any]:
        """Where :func:`products.vmap_agrees` verdicts are kept, and this request's key."""
        return self.profiles[call.spec.name].vmap_checked, (kind, call.signature(), self._vector_batch(call))

    @staticmethod
    def _vector_batch(call: Call) -> int:
        if not call.batched_vectors:
            return 1
        for leaf in tree_leaves(call.vectors):
            if isinstance(leaf, np.ndarray) and leaf.ndim:
                return int(leaf.shape[0])
        return 1

    # ----------------------------------------------------------------- request batching

    def run_batch(self, kind: str, calls: list[Call]) -> list[Result]:
        """Equal requests stacked into one call (:func:`batched.run_batch`), refused with
        :class:`batched.SharedDraws` where that call moved a global random generator that
        torch's vmap does not see: the scheduler then runs each request alone."""
        profile = self.profiles[calls[0].spec.name]
        if not profile.initialised:
            self.initialise(calls[0])
        drawn = self._draws()
        # What the function keeps across calls (a counter, a global buffer it adds to),
        # taken so a stacked call that changed it, or failed, can put it back: its
        # members then run alone, each changing it once as alone it would. Taken for its
        # first _STATE_WATCHED stacked batches that changed nothing, as a lone request's
        # watch (_one_state) stops: the walk cost every batch ~20 us for the built-in mlp
        # (engine CPU a request under wrk: 0.204 -> 0.227 ms), more for a function that
        # reaches a large model's modules, where a state it keeps shows in its first calls.
        watch = len(calls) > 1 and profile.stacked_unchanged < _STATE_WATCHED
        kept = KeptState(calls[0].spec.fn) if watch else None
        try:
            # (calling.look: whether a second call fits the latest member's deadline, as the
            # stacked call stops only once no member can use it: types.stacked_liveness)
            with serving(lambda: max(c.deadline for c in calls)):
                results = _batched.run_batch(self, kind, calls)
        except BaseException:
            # (a failed stacked call, vmap unable to run it: its members run again alone,
            # and its writes were one call too many for every later request)
            if kept is not None and kept.changed():
                self._kept_state(calls[0].spec.name, kept)
            raise
        if kept is not None and kept.changed():
            # One call for every member: four clients' ``x * N`` (``global N; N += 1``)
            # were all answered with one N, where one after another alone each gets its own
            self._kept_state(calls[0].spec.name, kept)
            raise _batched.SharedDraws(f"{calls[0].spec.name}'s stacked call changed state it keeps across calls, "
                                       "shared by its members")
        if kept is not None:
            profile.stacked_unchanged += 1
        if len(calls) > 1 and self._draws() != drawn:
            # One call of the function for every member: each client's draws were every
            # member's (np.random / random noise added to x: three clients' answers less
            # their x, the same three numbers), where alone each draws its own; torch's
            # vmap refuses its own generators' draws ("randomness error mode") and so
            # never reaches here with them. Never stacked again (batched=true keeps
            # torch's vmap, which shares such draws among examples as in-process).
            profile.stacks = False
            log.info("%s draws from a global random generator: its requests are no longer stacked", calls[0].spec.name)
            raise _batched.SharedDraws(f"{calls[0].spec.name}'s stacked call drew random numbers shared by its members")
        return results

    def _kept_state(self, name: str, kept: KeptState) -> None:
        """A stacked call of ``name`` changed what it keeps across calls: put back, and
        its requests never stacked again (``batched: true`` keeps torch's vmap, one call
        for all its examples, as in-process)."""
        whole = kept.restore()
        if self.profiles[name].stacks:
            self.profiles[name].stacks = False
            log.info("%s keeps state across calls: its requests are no longer stacked%s", name,
                     "" if whole else " (a tensor it changed, too large or a weight requiring grad, was not put back)")

    def _draws(self) -> tuple[Any, ...]:
        """The global random generators vmap does not see (Python's ``random``, numpy's
        ``np.random``) as a fingerprint of their states (~2 us); readers made once."""
        readers = self._draw_readers
        if readers is None:
            from .library_state import generators

            readers = self._draw_readers = [g.fingerprint for g in generators()]
        return tuple(read() for read in readers)

