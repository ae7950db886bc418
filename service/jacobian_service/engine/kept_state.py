"""What a registered function keeps across its calls, taken before a call and compared
(and put back) after it.

A stacked batch (request batching) is one call of the function for all its members. A
function that keeps state across calls (a Python counter, ``global N; N += 1``, a
module-level buffer ``BUF.add_(1)``, an ``nn.Module``'s ``self.calls += 1``) then
changed that state once for every member, where each member's request alone changes it
once: four clients' ``x * N`` were all answered with one ``N`` (measured: ``2x`` each,
where one after another alone they are ``2x, 3x, 4x, 5x``). And a stacked call that
failed (vmap cannot run the function) had already changed the state before each member
ran again alone: every later request saw one call too many.

:class:`KeptState` walks what the function can reach besides its inputs (its closure
cells, defaults, the globals its code names, bound ``self``, a callable object's or an
``nn.Module``'s attributes, ``__slots__`` members and buffers, a function's own
attributes, the containers among them (deques too), and the functions of the user's own
modules that it names, a few levels deep; of the user's own modules and classes it reaches, the attributes its code names:
``mod.N += 1``, ``Model.calls += 1``, ``type(self).n += 1``, and the code of their
classmethods, staticmethods and properties), noting each container's
items, each tensor's version counter (copying the tensors, up to a bound, so they can be
put back), a numpy array's, ``array.array``'s or ``bytearray``'s bytes (up to a bound), a
paused Python generator's locals and position, and the state of a random generator object of its
own (``random.Random``, ``np.random.default_rng``, ``RandomState``, ``torch.Generator``)
or an ``itertools.count``'s position. :meth:`KeptState.changed` says whether a call
changed any of it; :meth:`KeptState.restore` puts it back as it was (a count, whose
position cannot be set, by a new count where the old one was). Library modules, classes
and code (the standard library, installed packages) are not walked: their caches change
legitimately, and a function's state lives in its own module.

The walk and its comparisons run none of the user's code: an object's own
``__getattr__``, ``__getattribute__``, ``__class__`` or ``__dict__`` property, a
metaclass's ``__getattr__``, a container subclass's ``__iter__``/``values``/``get``, a
``str`` subclass's ``__eq__``, a tensor subclass's ``__torch_function__`` or
``__torch_dispatch__`` are all passed by (read through the builtin types' own slots, the
classes' own namespaces, and with torch's subclass hooks off). They had run: a
forwarding ``__getattr__`` whose target was unset (a ``RecursionError``), a raising
``__dict__`` property or metaclass ``__getattr__`` failed every request of a function
that works in-process (a ``function_error``), and a counting tensor subclass in a global
counted 14 calls of its own that the function never made.

Until parity round 37 a module's, class's or function's attribute, a slotted object's member, a
numpy array written in place, a generator object's draws and an ``itertools.count`` were
not seen: a Hessian of ``(x**3).sum() * mod.N`` (``mod.N += 1``) was answered 13 steps
on, as round 36 found for a global; until round 39 an ``array.array``, a ``bytearray``,
a numpy array past 64 KiB and a Python generator's paused frame (``next(STEPS)``: its
locals, the ``range`` or list iterator its loop holds, the generator it delegates to with
``yield from``; one made but not started is replaced by a new one from the same function
and arguments, as a count) were not either. Not seen still: state a C extension keeps
elsewhere, a generator's position past any other iterator (a ``zip`` its loop holds), a
generator moved to another ``yield`` or run to its end (noticed, not put back), buffers
past _ARRAY_BYTES, a container whose items would take the walk past its bound of items (a
global lookup table of a million floats: its walk and comparison took ~0.5 s a request);
and a tensor past the copy bound, or a model's weight (a leaf requiring grad, never
copied), is noticed changed but not put back.
"""

from __future__ import annotations

import _random
import array
import ast
import builtins
import collections
import ctypes
import functools
import gc
import itertools
import random
import sys
import sysconfig
import threading
import types
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["KeptState", "Replay", "active", "reaches_uninitialized", "warm_up"]

# A bounded walk: a function reaching a large object graph (a model's many submodules)
# costs at most this many nodes; what lies past it is not watched.
_MAX_NODES = 4096
_MAX_DEPTH = 6
# Items of the containers noted (each copied and compared after a call): a container
# past what is left of it is not watched, as what lies past _MAX_NODES (~0.5 us an item
# in all: 16,384 of them ~8 ms, where a million took ~0.5 s a request).
_MAX_ITEMS = 1 << 14
# Tensors copied so a changed one can be put back (a model's buffers, a global buffer);
# past this total only their version counters are watched.
_COPY_BYTES = 16 << 20
# numpy arrays, ``array.array``s and ``bytearray``s copied and compared (no version
# counter tells a write), in all, a walk. Until round 39 64 KiB: a 512-float64 running
# sum written in place past it (a 256 x 256 buffer) was stepped at each of a Hessian's
# calls. A copy and a comparison cost ~0.1-0.3 ms a MiB (measured, np.copyto and
# array_equal on bytes), twice a request while watched (the first _STATE_WATCHED
# requests, or for good once the function is seen keeping state): a larger lookup
# table than this is not watched.
_ARRAY_BYTES = 4 << 20
_SMALL_ARRAY = 1 << 16
_MISSING = object()
_PLAIN = (type(None), bool, int, float, complex, str, bytes)
_PLAIN_IDS = frozenset(map(id, _PLAIN))  # (by id: ``in`` a tuple of types may run a metaclass's __eq__)
_PARTIAL = {name: functools.partial.__dict__[name] for name in ("func", "args", "keywords")}
_NO_DISPATCH = torch.Tensor.__dict__["__torch_dispatch__"]
# A lazy module's parameters and buffers before its first call (LazyLinear, LazyConv*,
# LazyBatchNorm*): materialised by that call, whose class then changes (see
# reaches_uninitialized)
_UNINITIALIZED = torch.nn.parameter.UninitializedTensorMixin
_FUNCTION_DICT = types.FunctionType.__dict__["__dict__"].__get__  # a function's own attributes
_TYPE_DICT = type.__dict__["__dict__"].__get__  # a class's own namespace, no descriptor of its run


def _class_attr(cls: type, name: str) -> Any:
    """``name`` as the class's MRO holds it, neither a metaclass's ``__getattr__`` nor a
    descriptor's ``__get__`` run (user code)."""
    for klass in type.__dict__["__mro__"].__get__(cls):
        namespace = _TYPE_DICT(klass)
        if name in namespace:
            return namespace[name]
    return _MISSING


def _cell_contents(cell: types.CellType) -> Any:
    """A closure cell's contents, or _MISSING for an empty one."""
    try:
        return cell.cell_contents
    except ValueError:
        return _MISSING


def _instance_dict(v: Any) -> dict[str, Any] | None:
    """``v.__dict__`` where it is the interpreter's own (a class's ``__dict__`` property,
    ``__getattr__`` or ``__getattribute__`` is user code: not run)."""
    slot = _class_attr(type(v), "__dict__")
    # (a member, not a getset: a C type's own, types.SimpleNamespace's; a class's own
    # __slots__ cannot name __dict__ so)
    if type(slot) is not types.GetSetDescriptorType and type(slot) is not types.MemberDescriptorType:
        return None
    try:
        attributes = slot.__get__(v)
    except Exception:  # (a C type's getset refusing this instance)
        return None
    return attributes if type(attributes) is dict else None


def _slots(v: Any, kind: type) -> list[Any]:
    """The ``__slots__`` members of ``v``'s Python classes (member descriptors, read and
    written through their own C slots: no descriptor of the user's runs)."""
    found = []
    for klass in type.__dict__["__mro__"].__get__(kind):
        namespace = _TYPE_DICT(klass)
        if "__slots__" not in namespace:
            continue
        for attr in namespace.values():
            if type(attr) is types.MemberDescriptorType and attr.__objclass__ is klass:
                found.append(attr)
    return found


def _slot_value(member: Any, v: Any) -> Any:
    try:
        return member.__get__(v)
    except AttributeError:  # (an unset slot)
        return _MISSING


def _users_file(name: Any) -> bool:
    return type(name) is str and not name.startswith(_LIBRARY) and "jacobian_service" not in name


def _namespace_of(v: Any, kind: type) -> Any:
    """A user's module's ``__dict__`` or a user's class's own namespace (a mappingproxy),
    or None: a library's, a builtin's, or one whose module has no file of the user's."""
    if issubclass(kind, types.ModuleType):
        attributes = _instance_dict(v)
        if attributes is None or not _users_file(dict.get(attributes, "__file__")):
            return None
        return attributes
    namespace = _TYPE_DICT(v)
    module = sys.modules.get(namespace.get("__module__")) if type(namespace.get("__module__")) is str else None
    attributes = _instance_dict(module) if module is not None else None
    if attributes is None or not _users_file(dict.get(attributes, "__file__")):
        return None
    return namespace


# (the builtin types' own members: a subclass's are not read)
_WRAPPED = {classmethod: (classmethod.__dict__["__func__"],), staticmethod: (staticmethod.__dict__["__func__"],),
            property: tuple(property.__dict__[name] for name in ("fget", "fset", "fdel"))}
_SPACES: dict[int, tuple[Any, Any]] = {}  # id(module) -> (module, its namespace if the user's, else None)


def _rng_state(kind: type) -> tuple[Callable[[Any], Any], Callable[[Any, Any], None]] | None:
    """(read, write) of a random generator's state, for the generators that keep it
    where no ``__dict__`` shows it: a function's own ``random.Random(0)``,
    ``np.random.default_rng(0)``, ``np.random.RandomState(0)`` or ``torch.Generator``
    drew anew at each of the engine's calls of one request (through the library's own
    methods: a subclass's overrides are user code)."""
    if issubclass(kind, random.Random) and not issubclass(kind, random.SystemRandom):
        return _random_state, _set_random_state
    if kind is np.random.Generator:
        return (lambda g: g.bit_generator.state), (lambda g, state: setattr(g.bit_generator, "state", state))
    if kind is np.random.RandomState:
        return (lambda g: np.random.RandomState.get_state(g, legacy=False)), np.random.RandomState.set_state
    if id(kind) in _BIT_GENERATORS:
        return (lambda g: g.state), (lambda g, state: setattr(g, "state", state))
    if kind is torch.Generator:
        return torch.Generator.get_state, torch.Generator.set_state
    if kind is itertools.count:
        # (no way to set a count's position: a new one is put where the old one was)
        return itertools.count.__repr__, None
    return None


def _random_state(g: random.Random) -> tuple[Any, Any]:
    # (its C state, and the gauss sample it keeps in its __dict__: random.Random.getstate
    # reads self.gauss_next, which a subclass's __getattribute__ would answer)
    attributes = _instance_dict(g)
    return _random.Random.getstate(g), _MISSING if attributes is None else dict.get(attributes, "gauss_next", _MISSING)


def _set_random_state(g: random.Random, state: tuple[Any, Any]) -> None:
    _random.Random.setstate(g, state[0])
    attributes = _instance_dict(g)
    if attributes is not None and state[1] is not _MISSING:
        dict.__setitem__(attributes, "gauss_next", state[1])


_BIT_GENERATORS = frozenset(id(getattr(np.random, name)) for name in ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")
                            if hasattr(np.random, name))


def _count_from(text: str) -> Any:
    """A new ``itertools.count`` at the position ``repr`` read (``count(5)``, ``count(1.5,
    2)``), or _MISSING where its numbers are no literals."""
    try:
        args = ast.literal_eval(text[len("count"):])
        return itertools.count(*(args if type(args) is tuple else (args,)))
    except Exception:
        return _MISSING


def _equal(a: Any, b: Any) -> bool:
    """Two generator states (nested dicts, tuples, arrays, tensors) equal."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if type(a) is np.ndarray:
        return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return bool(a == b)


def _array_same(a: np.ndarray, copy: np.ndarray, data: bytes | None) -> bool:
    """An array's bytes as its copy's (bytes, not values: a NaN is its own); a small
    one's as bytes (~0.5 us, where array_equal's ufunc cost ~7)."""
    if a.shape != copy.shape or a.dtype != copy.dtype:
        return False
    if data is not None:
        return a.tobytes() == data
    now = a if a.flags.c_contiguous else np.ascontiguousarray(a)
    return bool(np.array_equal(now.reshape(-1).view(np.uint8), copy.reshape(-1).view(np.uint8)))


def _buffer_same(v: Any, copy: Any) -> bool:
    if type(copy) is bytearray:
        return bytearray.__eq__(v, copy) is True
    # (by bytes: an array of floats holding a NaN is not unequal to its copy)
    return array.array.tobytes(v) == array.array.tobytes(copy)


_ITERATORS = frozenset(type(iter(x)) for x in ([], (), range(0), range(1 << 64), "", reversed([])))
# (CPython before 3.13 writes a frame's locals back from its f_locals dict through this
# call; 3.13's f_locals is a proxy that writes through)
_LOCALS_TO_FAST = getattr(ctypes.pythonapi, "PyFrame_LocalsToFast", None) if sys.version_info < (3, 13) else None


def _lasti(g: types.GeneratorType, frame: Any) -> int:
    """Where a generator paused, -1 before it started (CPython's own f_lasti says
    otherwise from 3.11: its frame begins past its prologue)."""
    return frame.f_lasti if getattr(g, "gi_suspended", frame.f_lasti >= 0) else -1


def _unstarted(g: types.GeneratorType, frame: Any, locals_: dict[str, Any]) -> Any:
    """A new generator from the function that made one noted before it started
    (``STEPS = steps()`` at import, started by the function's first ``next``), called
    with the arguments it was made with; _MISSING where that cannot be."""
    code = frame.f_code
    if (code.co_flags & _GENERATOR) == 0:
        return _MISSING
    # (its frame holds the function it runs, closure and all; without it, one closing over
    # nothing is made again from its code)
    made = [held for held in gc.get_referents(g) if type(held) is types.FunctionType and held.__code__ is code]
    if made:
        maker = made[0]
    elif not code.co_freevars:
        maker = types.FunctionType(code, frame.f_globals, code.co_name)
    else:
        return _MISSING
    named = code.co_varnames
    n, k = code.co_argcount, code.co_kwonlyargcount
    try:
        args = [locals_[name] for name in named[:n]]
        kwargs = {name: locals_[name] for name in named[n:n + k]}
        rest = n + k
        if code.co_flags & _VARARGS:
            args.extend(locals_[named[rest]])
            rest += 1
        if code.co_flags & _VARKEYWORDS:
            kwargs.update(locals_[named[rest]])
    except (KeyError, IndexError, TypeError):
        return _MISSING
    # (calling a generator function runs none of its body: it makes the generator)
    return maker(*args, **kwargs)


_GENERATOR, _VARARGS, _VARKEYWORDS = 0x20, 0x04, 0x08  # (inspect.CO_GENERATOR, CO_VARARGS, CO_VARKEYWORDS)


def _position(it: Any) -> Any:
    """A builtin iterator's position (its own C __reduce__), _MISSING once run out."""
    reduced = it.__reduce__()
    return reduced[2] if len(reduced) > 2 else _MISSING


def _frame_same(g: types.GeneratorType, frame: Any, lasti: int, locals_: dict[str, Any],
                iterators: list[tuple[Any, Any]]) -> bool:
    if g.gi_frame is not frame or _lasti(g, frame) != lasti:
        return False
    now = frame.f_locals
    if len(now) != len(locals_) or any(not _same(now.get(k, _MISSING), v) for k, v in locals_.items()):
        return False
    return all(_position(it) == position for it, position in iterators)


def _put_frame(g: types.GeneratorType, frame: Any, lasti: int, locals_: dict[str, Any],
               iterators: list[tuple[Any, Any]]) -> bool:
    """A generator's frame put back where it paused: its locals and its loops' iterators.
    Not where the call moved it to another ``yield``, or ran it to its end (no frame can
    be moved back): whether it was put back."""
    if g.gi_frame is not frame or _lasti(g, frame) != lasti or g.gi_running:
        return False
    for it, position in iterators:
        if position is _MISSING:  # (an iterator run out stays so)
            if _position(it) is not _MISSING:
                return False
        else:
            it.__setstate__(position)
    if _LOCALS_TO_FAST is not None:
        now = frame.f_locals  # (synced from the frame: then set, and written back)
        now.clear()
        now.update(locals_)
        _LOCALS_TO_FAST(ctypes.py_object(frame), ctypes.c_int(1))
        return True
    if sys.version_info < (3, 13):
        return False
    proxy = frame.f_locals
    for name, value in locals_.items():
        proxy[name] = value
    return set(proxy.keys()) == set(locals_)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(sorted(d for d in dirs if d))


_LIBRARY = _library_dirs()


def _users(code: types.CodeType) -> bool:
    """Whether code is the user's (not the standard library's or an installed package's,
    nor the service's own)."""
    name = code.co_filename
    return not name.startswith(_LIBRARY) and not name.startswith("<frozen") and "jacobian_service" not in name


def _names(code: types.CodeType) -> set[str]:
    """The global names a code object and the code nested in it (lambdas, inner
    functions, comprehensions) may read or write."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    # (a float computed again to the same value is another object, and no change; the
    # builtin types only: a str subclass's __eq__ is user code)
    return type(a) is type(b) and id(type(a)) in _PLAIN_IDS and a == b


def _dict_changed(d: dict[Any, Any], items: dict[Any, Any]) -> bool:
    # No key hashed again (a key's __hash__ is user code): item by item in order, identity
    # first (a plain loop: a generator's any() cost ~0.5 us a dict); where the order
    # differs, by the keys' identities (an LRU's move_to_end changes no item)
    if dict.__len__(d) != len(items):
        return True
    for (a, va), (b, vb) in zip(dict.items(d), items.items()):
        if a is not b:
            return _items_changed(d, items)
        if va is not vb and not _same(va, vb):
            return True
    return False


def _items_changed(d: dict[Any, Any], items: dict[Any, Any]) -> bool:
    by_id = {id(k): v for k, v in items.items()}  # (items holds its keys: their ids stay theirs)
    return any(not _same(v, by_id.get(id(k), _MISSING)) for k, v in dict.items(d))


def _list_changed(lst: list[Any], items: list[Any]) -> bool:
    if list.__len__(lst) != len(items):
        return True
    for a, b in zip(list.__iter__(lst), items):
        if a is not b and not _same(a, b):
            return True
    return False


class KeptState:
    """A snapshot of what ``fn`` reaches besides its inputs (see the module's doc)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._seen: set[int] = set()
        self._keep: list[Any] = []  # what was walked, alive while this snapshot is
        self._dicts: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
        self._globals: list[tuple[dict[str, Any], str, Any]] = []
        self._lists: list[tuple[list[Any], list[Any]]] = []
        self._sets: list[tuple[set[Any], set[Any]]] = []
        self._cells: list[tuple[types.CellType, Any]] = []
        self._tensors: list[tuple[torch.Tensor, int, torch.Tensor | None]] = []
        self._slots: list[tuple[Any, Any, Any]] = []  # (object, member, value)
        self._class_attrs: list[tuple[type, str, Any]] = []
        self._arrays: list[tuple[np.ndarray, np.ndarray, bytes | None]] = []  # (array, its copy, a small one's bytes)
        self._buffers: list[tuple[Any, Any]] = []  # (an array.array or a bytearray, its copy)
        self._frames: list[tuple[types.GeneratorType, Any, int, dict[str, Any], list[tuple[Any, Any]]]] = []
        self._states: list[tuple[Any, Callable[[Any], Any], Any, Any]] = []  # (object, read, write, state)
        self._deques: list[tuple[collections.deque[Any], list[Any]]] = []
        self._spaces: list[tuple[Any, Any, int]] = []  # (module or class, its namespace, depth)
        # (an object walked, its class then, its __dict__): one whose class a call changed
        # is not put back (_moved)
        self._instances: list[tuple[Any, type, dict[str, Any] | None]] = []
        self.uninitialized = False  # (a lazy module's parameter or buffer was met)
        self.placeholder = False  # (an empty Parameter, for its first call to fill, was met)
        self._code_names: set[str] = set()
        self._copied = 0
        self._array_bytes = 0
        self._nodes = 0
        self._items = 0
        with torch._C.DisableTorchFunctionSubclass():  # (a tensor subclass's hooks are user code)
            self._walk(fn, 0)
            self._walk_spaces()

    # ------------------------------------------------------------------ walk

    def _first(self, v: Any) -> bool:
        if id(v) in self._seen or self._nodes >= _MAX_NODES:
            return False
        self._seen.add(id(v))
        self._keep.append(v)
        self._nodes += 1
        return True

    def _fits(self, n: int) -> bool:
        """Whether a container of ``n`` items fits what is left of _MAX_ITEMS."""
        if self._items + n > _MAX_ITEMS:
            return False
        self._items += n
        return True

    def _walk(self, v: Any, depth: int) -> None:
        # (types read with type(), never isinstance: that reads an object's own
        # __class__, which a property may make user code)
        kind = type(v)
        if depth > _MAX_DEPTH or issubclass(kind, _PLAIN):
            return
        if issubclass(kind, (type, types.ModuleType)):
            # A user's module or class: the attributes the code walked names (``mod.N +=
            # 1``, ``Model.calls += 1``), in _walk_spaces once every name is known. A
            # library's is not walked: its caches change legitimately.
            if issubclass(kind, type):  # (a class: once a walk, however many instances)
                if self._first(v) and (namespace := _namespace_of(v, kind)) is not None:
                    self._spaces.append((v, namespace, depth))
                return
            known = _SPACES.get(id(v))
            if known is not None and known[0] is v:  # (a module's verdict, kept: ~0.6 us each walk)
                namespace = known[1]
            else:
                namespace = _namespace_of(v, kind)
                if len(_SPACES) < 4096:
                    _SPACES[id(v)] = (v, namespace)  # (holding the module: its id stays its own)
            if namespace is not None and self._first(v):
                self._spaces.append((v, namespace, depth))
            return
        if not self._first(v):
            return
        if issubclass(kind, torch.Tensor):
            self._tensor(v)
        elif kind is np.ndarray:
            self._array(v)
        elif issubclass(kind, (array.array, bytearray)):
            self._buffer(v, kind)
        elif kind is types.GeneratorType:
            self._generator(v, depth)
        elif issubclass(kind, dict):
            if self._fits(dict.__len__(v)):
                items = dict.copy(v)
                self._dicts.append((v, items))
                for item in list(items.values()):
                    self._walk(item, depth + 1)
        elif issubclass(kind, list):
            if self._fits(list.__len__(v)):
                items = list.copy(v)
                self._lists.append((v, items))
                for item in items:
                    self._walk(item, depth + 1)
        elif issubclass(kind, tuple):
            if self._fits(tuple.__len__(v)):
                for item in tuple.__iter__(v):
                    self._walk(item, depth + 1)
        elif issubclass(kind, frozenset):
            if self._fits(frozenset.__len__(v)):
                for item in frozenset.__iter__(v):
                    self._walk(item, depth + 1)
        elif issubclass(kind, set):
            if self._fits(set.__len__(v)):
                self._sets.append((v, set.copy(v)))
        elif kind is types.FunctionType:
            self._function(v, depth)
        elif kind is types.MethodType:
            self._walk(v.__self__, depth + 1)
            self._walk(v.__func__, depth + 1)
        elif issubclass(kind, functools.partial):
            for name in ("func", "args", "keywords"):  # (partial's own slots: a subclass may shadow them)
                self._walk(_PARTIAL[name].__get__(v), depth + 1)
        elif issubclass(kind, (types.BuiltinFunctionType, types.CodeType)):
            return
        elif issubclass(kind, (classmethod, staticmethod, property)):
            # a class's methods and properties: the code they run (``cls.n += 1`` in a
            # classmethod the function calls names what the walk then watches)
            for member in _WRAPPED[kind] if kind in _WRAPPED else ():
                self._walk(member.__get__(v), depth + 1)
        elif issubclass(kind, collections.deque):
            if self._fits(collections.deque.__len__(v)):
                items = list(collections.deque.__iter__(v))
                self._deques.append((v, items))
                for item in items:
                    self._walk(item, depth + 1)
        elif (access := _rng_state(kind)) is not None:
            try:
                self._states.append((v, access[0], access[1], access[0](v)))
            except Exception:  # (a generator refusing its state)
                pass
        else:
            attributes = _instance_dict(v)
            self._instances.append((v, kind, attributes))
            if attributes is not None:
                self._walk(attributes, depth + 1)
            # __slots__ members (no __dict__ shows them: ``self.n += 1`` on a slotted object)
            for member in _slots(v, kind):
                value = _slot_value(member, v)
                self._slots.append((v, member, value))
                if value is not _MISSING:
                    self._walk(value, depth + 1)
            self._walk(kind, depth)  # its class's attributes the code names (``type(self).calls``)
            # a callable object's or a module's code: what its call reaches (forward's globals)
            for name in ("__call__", "forward"):
                method = _class_attr(kind, name)
                if type(method) is types.FunctionType:
                    self._walk(method, depth + 1)

    def _function(self, fn: types.FunctionType, depth: int) -> None:
        if depth and not _users(fn.__code__):  # the registered function itself always
            return
        for cell in fn.__closure__ or ():
            contents = _cell_contents(cell)
            self._cells.append((cell, contents))
            if contents is not _MISSING:
                self._walk(contents, depth + 1)
        self._walk(fn.__defaults__, depth + 1)
        self._walk(fn.__kwdefaults__, depth + 1)
        # its own attributes: ``f.calls += 1``, a function's "static" counter, was stepped
        # at each of the engine's calls (a Hessian 13 steps on)
        attributes = _FUNCTION_DICT(fn)
        if attributes:
            self._walk(attributes, depth + 1)
        namespace = fn.__globals__
        names = _names(fn.__code__)
        self._code_names |= names
        for name in sorted(names):
            if dict.__contains__(namespace, name) or not hasattr(builtins, name):
                value = dict.get(namespace, name, _MISSING)
                self._globals.append((namespace, name, value))
                if value is not _MISSING:
                    self._walk(value, depth + 1)

    def _walk_spaces(self) -> None:
        """The attributes of the user's modules and classes met in the walk that the code
        walked names (``mod.N``, ``Counter.calls``): again until walking them names no
        more (a function they hold names its own)."""
        done: set[tuple[int, str]] = set()
        while True:
            new = False
            names = sorted(self._code_names)
            for space, namespace, depth in list(self._spaces):
                is_class = type(namespace) is not dict
                for name in names:
                    if (id(space), name) in done or name not in namespace:
                        continue
                    done.add((id(space), name))
                    new = True
                    value = namespace[name]
                    if is_class:
                        self._class_attrs.append((space, name, value))
                    else:
                        self._globals.append((namespace, name, value))
                    self._walk(value, depth + 1)
            if not new:
                return

    def _array(self, a: np.ndarray) -> None:
        """A numpy array (no version counter): copied, and compared byte by byte after a
        call, within _ARRAY_BYTES (an object array's items are not)."""
        nbytes = a.nbytes
        if a.dtype.hasobject or a.dtype.itemsize == 0 or self._array_bytes + nbytes > _ARRAY_BYTES:
            return
        self._array_bytes += nbytes
        copy = np.array(a, copy=True, order="C")
        self._arrays.append((a, copy, copy.tobytes() if nbytes <= _SMALL_ARRAY else None))

    def _buffer(self, v: Any, kind: type) -> None:
        """An ``array.array`` or a ``bytearray`` (a running sum kept in one, written in
        place), copied within _ARRAY_BYTES through the builtin type's own methods."""
        base = array.array if issubclass(kind, array.array) else bytearray
        nbytes = base.__len__(v) * (array.array.__dict__["itemsize"].__get__(v) if base is array.array else 1)
        if self._array_bytes + nbytes > _ARRAY_BYTES:
            return
        self._array_bytes += nbytes
        self._buffers.append((v, base.__getitem__(v, slice(None))))

    def _generator(self, g: types.GeneratorType, depth: int) -> None:
        """A Python generator's paused frame (``next(STEPS)``, ``STEPS = steps()``, a
        generator function counting in a local): its position, its locals (walked: a list
        it appends to), and the positions of the builtin iterators its loops hold (``for
        i in range(...)``), read without running it."""
        frame = g.gi_frame
        if frame is None or g.gi_running:  # (done, or running now: nothing kept to put back)
            return
        locals_ = dict(frame.f_locals)
        iterators = []
        for held in gc.get_referents(g):  # (its frame's locals and value stack: a loop's iterator)
            if type(held) in _ITERATORS:
                iterators.append((held, _position(held)))
        self._frames.append((g, frame, _lasti(g, frame), locals_, iterators))
        for value in locals_.values():
            self._walk(value, depth + 1)
        if g.gi_yieldfrom is not None:  # (``yield from`` another: its frame as well)
            self._walk(g.gi_yieldfrom, depth + 1)

    def _tensor(self, t: torch.Tensor) -> None:
        kind = type(t)
        if issubclass(kind, _UNINITIALIZED):
            # (no storage of its own yet, nothing to copy: its first call materialises it,
            # see reaches_uninitialized)
            self.uninitialized = True
            return
        try:
            version = t._version
            nbytes = t.numel() * t.element_size() if t.layout == torch.strided else _COPY_BYTES + 1
        except Exception:  # a tensor without storage (a functional or batched wrapper): no word
            return
        if nbytes == 0 and issubclass(kind, torch.nn.Parameter):
            self.placeholder = True  # (``.data`` set at its first call: see reaches_uninitialized)
        copy = None
        if _class_attr(kind, "__torch_dispatch__") is not _NO_DISPATCH:
            nbytes = _COPY_BYTES + 1  # a subclass's own kernels (user code) would copy it: only watched
        elif t.requires_grad and t.is_leaf:
            # A model's weights (nn.Parameter): autograd refuses a write into one in place
            # where grad is on, so a call hardly changes it; copied, a 16 MiB weight cost
            # ~10 ms at every stacked batch and per-example request, beside a 4 ms forward
            # of 8 examples (measured, one thread). Watched by its version only.
            nbytes = _COPY_BYTES + 1
        if self._copied + nbytes <= _COPY_BYTES:
            try:
                copy = t.detach().clone()
                self._copied += nbytes
            except Exception:  # (a meta tensor, an exotic subclass): watched, not kept
                copy = None
        self._tensors.append((t, version, copy))

    # ------------------------------------------------------------------ after a call

    def changed(self) -> bool:
        """Whether what was taken changed since."""
        with torch._C.DisableTorchFunctionSubclass():
            return self._changed()

    def _changed(self) -> bool:
        for d, items in self._dicts:
            if _dict_changed(d, items):
                return True
        for namespace, name, value in self._globals:
            if not _same(dict.get(namespace, name, _MISSING), value):
                return True
        for lst, items in self._lists:
            if _list_changed(lst, items):
                return True
        for s, items in self._sets:
            if not set.__eq__(s, items):
                return True
        for cell, contents in self._cells:
            if not _same(_cell_contents(cell), contents):
                return True
        for t, version, _ in self._tensors:
            if t._version != version:
                return True
        for obj, member, value in self._slots:
            if not _same(_slot_value(member, obj), value):
                return True
        for cls, name, value in self._class_attrs:
            if not _same(_TYPE_DICT(cls).get(name, _MISSING), value):
                return True
        for a, copy, data in self._arrays:
            if not _array_same(a, copy, data):
                return True
        for v, copy in self._buffers:
            if not _buffer_same(v, copy):
                return True
        for g, frame, lasti, locals_, iterators in self._frames:
            if not _frame_same(g, frame, lasti, locals_, iterators):
                return True
        for obj, read, _, state in self._states:
            if not _equal(read(obj), state):
                return True
        for dq, items in self._deques:
            if _list_changed(list(collections.deque.__iter__(dq)), items):
                return True
        return False

    def restore(self) -> bool:
        """Put back what changed; whether all of it could be (a tensor past the copy
        bound, or one resized, cannot)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self._restore()

    def _moved(self) -> set[int]:
        """The ids of the objects whose class the call changed, and of what they hold
        (their ``__dict__``, the containers and tensors in it): a lazy module's first
        call materialises its parameters and becomes its ``cls_to_become`` (LazyLinear
        a Linear, each UninitializedParameter a Parameter), and removes its
        initialisation hook. Put back, its ``__dict__`` alone (the hook, ``in_features
        = 0``) made a Linear with a lazy module's hook and no ``initialize_parameters``
        (its class and its parameters' storage cannot be put back): a one-time
        initialisation, kept as the call left it, as a cache filled on first use is."""
        moved = [(v, attributes) for v, kind, attributes in self._instances if type(v) is not kind]
        held: set[int] = set()
        if not moved:
            return held
        stack: list[Any] = []
        for v, attributes in moved:
            held.add(id(v))
            if attributes is not None:
                stack.append(attributes)
        while stack and len(held) < _MAX_NODES:
            v = stack.pop()
            if id(v) in held:
                continue
            held.add(id(v))
            kind = type(v)
            # (containers only, through the builtin types' own methods; another object
            # is its own: a submodule whose class stayed is put back as it is)
            if issubclass(kind, dict):
                stack.extend(dict.values(v))
                continue
            for base in (list, tuple, set, frozenset, collections.deque):
                if issubclass(kind, base):
                    stack.extend(base.__iter__(v))
                    break
        return held

    def _restore(self) -> bool:
        # (through the builtin types' own methods: a subclass's are user code)
        whole = True
        moved = self._moved()
        if moved:
            whole = False
            self._dicts = [(d, items) for d, items in self._dicts if id(d) not in moved]
            self._lists = [(lst, items) for lst, items in self._lists if id(lst) not in moved]
            self._sets = [(s, items) for s, items in self._sets if id(s) not in moved]
            self._deques = [(dq, items) for dq, items in self._deques if id(dq) not in moved]
            self._tensors = [entry for entry in self._tensors if id(entry[0]) not in moved]
            self._slots = [entry for entry in self._slots if id(entry[0]) not in moved]
            self._instances = [entry for entry in self._instances if id(entry[0]) not in moved]
        for d, items in self._dicts:
            if _dict_changed(d, items):
                dict.clear(d)
                dict.update(d, items)
        for namespace, name, value in self._globals:
            if not _same(dict.get(namespace, name, _MISSING), value):
                if value is _MISSING:
                    dict.pop(namespace, name, None)
                else:
                    dict.__setitem__(namespace, name, value)
        for lst, items in self._lists:
            if _list_changed(lst, items):
                list.__setitem__(lst, slice(None), items)
        for s, items in self._sets:
            if not set.__eq__(s, items):
                set.clear(s)
                set.update(s, items)
        for cell, contents in self._cells:
            if not _same(_cell_contents(cell), contents):
                if contents is _MISSING:
                    del cell.cell_contents
                else:
                    cell.cell_contents = contents
        for t, version, copy in self._tensors:
            if t._version == version:
                continue
            if copy is None or copy.shape != t.shape or copy.dtype != t.dtype:
                whole = False
                continue
            grad = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)  # (not no_grad: see _plain)
            try:
                t.copy_(copy)
            finally:
                torch._C._set_grad_enabled(grad)
        for obj, member, value in self._slots:
            if not _same(_slot_value(member, obj), value):
                if value is _MISSING:
                    member.__delete__(obj)
                else:
                    member.__set__(obj, value)
        for cls, name, value in self._class_attrs:
            if not _same(_TYPE_DICT(cls).get(name, _MISSING), value):
                if value is _MISSING:
                    type.__delattr__(cls, name)
                else:
                    type.__setattr__(cls, name, value)
        for a, copy, data in self._arrays:
            if _array_same(a, copy, data):
                continue
            if a.shape != copy.shape or a.dtype != copy.dtype or not a.flags.writeable:
                whole = False
            else:
                np.copyto(a, copy)
        for v, copy in self._buffers:
            if not _buffer_same(v, copy):
                try:
                    type(copy).__setitem__(v, slice(None), copy)
                except BufferError:  # (a bytearray resized while a view of it is held)
                    whole = False
        for dq, items in self._deques:
            if _list_changed(list(collections.deque.__iter__(dq)), items):
                collections.deque.clear(dq)
                collections.deque.extend(dq, items)
        fresh: dict[int, Any] = {}
        for g, frame, lasti, locals_, iterators in self._frames:
            if not _frame_same(g, frame, lasti, locals_, iterators) and not _put_frame(g, frame, lasti, locals_, iterators):
                # (one the call started: a new one, not started, where it was, as a count)
                if lasti == -1 and (new := _unstarted(g, frame, locals_)) is not _MISSING:
                    fresh[id(g)] = new
                else:
                    whole = False
        for obj, read, write, state in self._states:
            if _equal(read(obj), state):
                continue
            if write is not None:
                write(obj, state)
            elif (new := _count_from(state)) is not _MISSING:
                fresh[id(obj)] = new
            else:
                whole = False
        if fresh:
            whole = self._put_fresh(fresh) and whole
        return whole

    def _put_fresh(self, fresh: dict[int, Any]) -> bool:
        """An object whose state cannot be set (an ``itertools.count``) replaced by a new
        one at its noted state wherever the walk found it (a global, a module's or
        class's attribute, a dict's or list's item, a cell, a slot): later calls step the
        new one; the old one, stepped by the call that is answered, is put back after
        (its place then differs from the later snapshot's). Whether each was placed."""
        placed: set[int] = set()
        for namespace, name, value in self._globals:
            if id(value) in fresh and dict.get(namespace, name, _MISSING) is value:
                dict.__setitem__(namespace, name, fresh[id(value)])
                placed.add(id(value))
        for d, items in self._dicts:
            for key, value in items.items():
                if id(value) in fresh and dict.get(d, key, _MISSING) is value:
                    dict.__setitem__(d, key, fresh[id(value)])
                    placed.add(id(value))
        for lst, items in self._lists:
            for i, value in enumerate(items):
                if id(value) in fresh and i < list.__len__(lst) and list.__getitem__(lst, i) is value:
                    list.__setitem__(lst, i, fresh[id(value)])
                    placed.add(id(value))
        for cell, value in self._cells:
            if id(value) in fresh and _cell_contents(cell) is value:
                cell.cell_contents = fresh[id(value)]
                placed.add(id(value))
        for obj, member, value in self._slots:
            if id(value) in fresh and _slot_value(member, obj) is value:
                member.__set__(obj, fresh[id(value)])
                placed.add(id(value))
        for cls, name, value in self._class_attrs:
            if id(value) in fresh and _TYPE_DICT(cls).get(name, _MISSING) is value:
                type.__setattr__(cls, name, fresh[id(value)])
                placed.add(id(value))
        return placed == set(fresh)


class Replay:
    """One request's calls of its function, each from the state the first one began in.

    The engine may call a function several times for one request (a Hessian's strategies
    and checks, forward mode's check against reverse, a jvp's output and its products)
    where ``torch.func`` calls it once. A function keeping state across calls stepped it
    at each: ``x * n`` (``n += 1`` a call) answered a ``mode=fwd`` Jacobian of ``4n``
    where ``torch.func.jacfwd`` answers ``n``, a Hessian of ``(x**3).sum() * n`` 7 steps
    on, and every later request saw the steps. Here the first call's state is noted
    (:class:`KeptState`); where that call changed it, every later call begins from the
    same state again, and once the request is done the state is left as the first call
    left it: one step a request, each call computing what the one call in-process does.
    Notes and writes are made with functorch's transforms off (a captured tensor written
    inside a ``grad`` transform is refused).

    The random generators are put back with the state (torch's, numpy's and Python's
    global ones, ~3 us to take: :func:`_generators`): a cache filled on first use with
    random weights (``CACHE["w"] = torch.randn(...)``, ``np.random.rand(3)``,
    ``random.random()``, a lazily initialised layer) was emptied for each later call, which
    drew weights of its own, and the first request's Hessian (its strategies, its check)
    came from weights other than those it left behind (measured: not torch.func's; with
    numpy's or Python's, until this round: a Hessian's diagonal 2.6 where torch.func's is
    3.3, from weights the cache did not keep)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0
        self.before: KeptState | None = None
        self.after: KeptState | None = None
        self._draws: Callable[[], None] | None = None  # the generators as the first call began
        self._drawn: Callable[[], None] | None = None  # and as it left them
        self.changed_state = False  # (any run of calls changed the state: see restart)
        self._origin: tuple[KeptState, Callable[[], None]] | None = None
        self.looped = False  # (its examples ran one by one, each a call of its own: see restart)

    def call(self, args: Any) -> Any:
        fn = self.fn
        if self.calls == 0:
            self.calls = 1
            with _plain():
                self.before = KeptState(fn)
            self._draws = _generators()
            try:
                return fn(*args)
            finally:
                with _plain():
                    if self.before.changed():
                        self.after = KeptState(fn)  # the state the one answered call leaves
                        self._drawn = _generators()
                        self.changed_state = True
                        if self._origin is None:  # (the state the request began in: restart)
                            self._origin = (self.before, self._draws)
                    else:
                        self.before = None  # it keeps nothing (so far): later calls as they are
        self.calls += 1
        if self.before is not None:
            with _plain():
                self.before.restore()
            self._draws()  # type: ignore[misc]  # (drawing again what the first call drew)
        return fn(*args)

    @property
    def keeps_state(self) -> bool:
        return self.changed_state

    def end(self) -> None:
        """The request is done: the state as the first call left it."""
        if self.after is not None and self.calls > 1:
            with _plain():
                if self.after.changed():
                    self.after.restore()
            self._drawn()  # type: ignore[misc]

    def restart(self, keep: bool) -> None:
        """A new run of calls, its first call one the function makes as a call of its own:
        a ``batched`` request's examples run one by one where ``vmap`` cannot run the
        function, each a call of its own in-process (``[f(x) for x in xs]``), each
        stepping a counter once. ``keep``: from the state the run so far left (as its
        first call left it, :meth:`end`); else from the state the request began in (a
        ``vmap`` that failed, or a strategy's loop given up: their steps undone, as the
        examples alone in turn never made them)."""
        if keep:
            self.end()
        elif self._origin is not None:
            with _plain():
                self._origin[0].restore()
            self._origin[1]()
        self.calls = 0
        self.before = self.after = None


def reaches_uninitialized(fn: Callable[..., Any]) -> str | None:
    """``"lazy"`` where ``fn`` reaches a lazy module's parameter or buffer not yet
    materialised (``torch.nn.LazyLinear``'s before its first call), ``"placeholder"``
    where it reaches an empty ``nn.Parameter`` (one its first call fills, ``p.data =
    ...``), else None. That first call inside a ``torch.func`` transform sets the
    parameter's ``.data`` to a tensor of the transform's level, which crashes the process
    (SIGSEGV: pytorch/pytorch#184876; in-process ``jacrev`` over a fresh ``LazyLinear``
    too, or where it survives, an INTERNAL ASSERT at every later call): the engine first
    runs such a function once outside any transform (Engine.initialise), the dry run
    PyTorch's lazy modules ask for."""
    with _plain():
        kept = KeptState(fn)
    return "lazy" if kept.uninitialized else "placeholder" if kept.placeholder else None


def warm_up(fn: Callable[..., Any], run: Callable[[], Any]) -> Any:
    """``run()``, a warm-up of ``fn`` that no client asked for (an engine's Jacobian of it
    before it says ready), leaving what ``fn`` keeps across calls as a client's first
    request should find it: a counter's first request after a warm-up was answered one
    step on (``2 x`` where the first ``torch.func`` call in-process, from the state the
    module's import left, gives ``x``), a generator made at import started, a seeded draw
    the second. State the warm-up changed is told apart by running it once more: one that
    changes at every call (a counter) is put back as the import left it, with the global
    random generators; one that the second run left alone (a cache filled on first use, a
    model loaded lazily: what a warm-up is for) is kept, and only that second run's draws
    undone. A warm-up that changed nothing has its draws undone."""
    with _plain():
        before = KeptState(fn)
    draws = _generators()

    def put_back() -> None:
        with _plain():
            if before.changed():
                before.restore()
        draws()

    try:
        result = run()
    except BaseException:
        put_back()
        raise
    with _plain():
        changed = before.changed()
    if not changed:
        draws()
        return result
    with _plain():
        first = KeptState(fn)
    drawn = _generators()
    try:
        run()
        with _plain():
            again = first.changed()
    except Exception:  # (its second run's failure is no warm-up's: the state put back)
        again = True
    if again:
        put_back()
    else:
        drawn()
    return result


def _generators() -> Callable[[], None]:
    """A function that puts the random generators back as they are now: torch's
    (products.rng_replay, ~2 us), numpy's and Python's global ones (copied out of their
    memory, library_state.Generator.take, ~1 us; their getstate / get_state took 45-110)."""
    from .products import rng_replay  # (products imports calling, which imports this module)

    if not _TAKES:  # (filled once, never rebound: the engine reads a rebound name of its own as a function's doing)
        from .library_state import generators

        _TAKES.append([g.take for g in generators() if g.take is not None])
    puts = [rng_replay(), *(take() for take in _TAKES[0])]

    def put() -> None:
        for each in puts:
            each()

    return put


_TAKES: list[list[Callable[[], Callable[[], None]]]] = []


class _plain:
    """functorch's transforms off, and no autograd, for the notes and writes of a Replay
    made from inside a transform's call of the function. Grad is switched off through
    torch's C switch, not ``torch.no_grad``: the engine's GradOffWatch reads a
    ``no_grad`` inside the function's call as the function's own (its Hessians are then
    torch's own strategy only: a function without forward AD had none that ran)."""

    def __enter__(self) -> None:
        self._off = torch._C._DisableFuncTorch()
        self._off.__enter__()
        self._grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        torch._C._set_grad_enabled(self._grad)
        self._off.__exit__(*exc)


class _Active(threading.local):
    """The request whose function is being called, where its calls are replayed: the
    thread's own. An engine's thread runs one request at a time, but an in-process server
    runs an engine per device, each in a thread of its own: one module-wide value was
    taken by the other engine's request (its Replay skipped, or ended under it, or its
    calls run through the other's), and a counted function's Hessian stepped its count
    up to 7 times there, as before the Replay (measured: two engines, two threads)."""

    replay: Replay | None = None


active = _Active()
