"""The shared namespaces a function may rebind names in, put back after each batch.

Every function runs in the process that serves every other function, against the same
module objects. A function that rebinds a name in one of them changed every later
request of every function, and the engine's own computations, for as long as the
engine lived (measured): ``torch.autograd.grad = ...`` (or ``torch.func.vmap``) made
every later Jacobian of every function a 500 carrying the patch's error, with ``/readyz``
still 200; ``torch.sin = torch.cos`` or ``torch.Tensor.sin = ...`` would have made
every later ``sin`` silently ``cos``; ``sys.modules["orjson"] = None`` made a later
``import orjson`` fail.

:class:`Namespaces` takes the names of the modules the engine and the functions share
(torch and the parts of it the engine calls, numpy, builtins, orjson, the service's
own modules) and of ``sys.modules`` as the engine starts, and after each batch puts
back what a function rebound or deleted, naming it in the log once per function.
Names added to a module stay (torch and numpy bind submodules and caches as they are
lazily imported, legitimately); a name added to a class (``torch.Tensor``,
``torch.nn.Module`` and each of torch.nn's Module classes) shadows the method its base
defines, and is taken away again. In an engine process, the engine's own registry of
functions is guarded the same way (its table, each spec, each spec's inputs), and each
function's code and defaults (their pointers in the function object, read in the same
gather): one function could otherwise make another run its code. And each function's
module and closure cells: a name a function of another module rebinds there is put back
(``_modules_of``, ``_closures``).

The check after a batch costs a few microseconds, whatever the number of dicts
(~270): each dict's version tag (CPython's ``ma_version_tag``, which every change of the
dict bumps) is compared with the one taken, all of them read in one numpy gather
(``_gather``; one ctypes read each, ~60 ns, where the gather cannot be made), and only a
dict that changed is compared name by name. Where the tag cannot be read (another
Python), every dict is compared (~0.6 ms).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import operator
import sys
from collections.abc import Callable, Collection
from types import FunctionType, ModuleType
from typing import Any

log = logging.getLogger("jacobian_service.engine")

__all__ = ["Namespaces", "described", "version_reader"]

# The modules guarded, where imported: torch and the parts of it whose functions the
# engine calls by attribute (torch.func.jacrev, torch.autograd.grad, pytree.tree_map...),
# and what the engine encodes answers with.
# And the modules torch's own Python functions look their kernels up in as they run:
# ``torch.einsum`` calls ``torch._VF.einsum``, ``F.mse_loss`` ``torch._C._nn.mse_loss``.
# One a function patched doubled every later einsum's (mse_loss's) answer, silently.
_MODULES = (
    "torch.distributions", "torch.distributions.kl",
    "builtins", "numpy", "orjson", "torch", "torch.func", "torch.autograd", "torch.autograd.forward_ad",
    "torch.autograd.functional", "torch.autograd.graph", "torch.autograd.function", "torch.nn.functional",
    "torch.linalg", "torch.fft", "torch.special", "torch.functional", "torch._tensor", "torch._VF",
    "torch.utils._pytree", "torch._functorch.apis", "torch._functorch.eager_transforms", "torch._functorch.vmap",
    "torch._C", "torch._C._functorch", "torch._C._nn",
    # The standard library the engine's own loop calls by attribute: ``time.monotonic``
    # patched to run ahead put every later request of every function past its deadline
    # (504s, /readyz 200, for as long as the engine lived).
    "time", "os", "struct", "socket", "select", "selectors", "mmap", "math", "threading",
    # The global random generators' modules, which every function that draws calls by
    # attribute: ``random.random`` (``np.random.random_sample``) rebound to answer 0.25
    # made every later function's draws 0.25, with a 200 (``np.random``'s functions are
    # mtrand's, re-exported).
    "random", "numpy.random", "numpy.random.mtrand",
)
# In an engine process only: ``warnings.showwarning`` rebound to raise made every later
# function that warns on its way fail with the function's error (500), for the engine's
# life (measured); so would ``formatwarning``, or ``warn`` itself. (In-process, the
# caller's own code rebinds them as it runs: pytest's ``catch_warnings`` around each test.)
_OWN_PROCESS_MODULES = ("warnings",)
# Modules that find their names on demand (``__getattr__``): a name set there, none of
# their own, shadows the one they would find (``torch._VF.einsum``), and is taken away.
_SHADOWED = frozenset({"torch._VF"})
_SERVICE = "jacobian_service"  # the service's own modules: every one imported when the engine starts
# Each with the classes it inherits from (a name added shadows a base's method).
# ``torch.autograd.Function.apply`` patched doubled every later custom Function's answer
# (and Jacobian), silently; a ``sendmsg`` set on ``socket.socket`` (over the C method of
# its base) sent every later client's 3x3 float64 Jacobian as zeros, with a 200.
# ``random.Random.random`` set (over its C base's) made every later ``random.Random``'s
# draws 0.25, a generator a function keeps of its own, seeded, too.
_CLASSES = ("torch.Tensor", "torch.nn.Module", "torch.autograd.Function", "socket.socket",
            "selectors.DefaultSelector", "random.Random")
# What only functions call, never the engine's work on an answer: put back after the
# batch, the function named, its own answers not refused for it (``patched``).
_FUNCTIONS_ONLY = frozenset({"random", "numpy.random", "numpy.random.mtrand", "random.Random", "warnings"})
_IMMUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: a type no one can set a name on (3.10+)
# And every torch.nn.Module subclass of torch's own (``torch.nn.Linear``, ``Conv2d``...,
# ~190): ``torch.nn.Linear.forward`` rebound to double doubled every later function's
# Linear layer, and its Jacobian, silently. Each is one more dict's version tag, read in
# the one gather that reads them all (``_gather``): no cost per class that counts.
_NN_MODULES = "torch.nn."
# And torch.distributions (its functions, ``kl_divergence``, and each Distribution class
# of its own, ~50, Distribution itself with them), which only functions call: the engine
# never does. ``torch.distributions.Normal.log_prob`` rebound made every later function's
# Normal log-density the function's, ``Distribution.set_default_validate_args(False)``
# (a name of the class's dict) every later function's invalid parameters (a negative
# scale: torch's ValueError, a 500) a 200 of NaNs, ``torch.distributions.kl_divergence``
# rebound every later KL the function's, each with a 200, for the engine's life (measured).
_DISTRIBUTIONS = "torch.distributions"
# A name a class gets without anyone setting it: Python 3.10+ stores an empty
# ``__annotations__`` in a class's dict the first time it is read there (torch.jit reads it).
_CLASS_SKIP = frozenset({"__annotations__"})
# In an engine process, every name of the service's own modules is watched, not only what
# it calls: ``ipc._NONE`` rebound made every later answer's None (an evaluate's Jacobian
# slot) pack as 1.0. These are the ones the service rebinds itself as it runs.
# And torch's own: ``torch.set_default_dtype`` rebinds ``torch.Storage`` (the default
# dtype's storage class) from C; the dtype is a setting ``process_settings`` puts back,
# and torch.Storage with it. Watched, a function that set float64 was named for a
# rebinding, and its own answer refused.
_SERVICE_STATE = frozenset({("jacobian_service.heap", "_thawed"), ("torch", "Storage")})

_MISSING = object()
_VALUE = operator.attrgetter("value")


def version_reader() -> Any:
    """A function giving a view of a dict's version tag, or None where it cannot be trusted:
    CPython lays a dict out as its header, ``ma_used``, then the 64-bit tag (3.11-3.13);
    checked here on a dict of our own that every change bumps it."""
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return None
    offset = object.__basicsize__ + ctypes.sizeof(ctypes.c_ssize_t)

    def version(d: dict) -> Any:
        """A view of the tag, read by its ``value`` (~60 ns; making the view takes ~3 us,
        once per dict: each guarded dict lives as long as the process)."""
        return ctypes.c_uint64.from_address(id(d) + offset)

    probe: dict[str, Any] = {"a": 1}
    tag = version(probe)
    seen = tag.value
    for change in (lambda: probe.__setitem__("a", 2), lambda: probe.__setitem__("b", 1), lambda: probe.pop("a")):
        change()
        if tag.value == seen:
            return None
        seen = tag.value
    return version


def _gather(tags: list[Any]) -> Callable[[], bytes] | None:
    """One read of every version tag, as bytes: numpy's ``take`` over a window of this
    process's memory from the lowest tag to the highest (none read but the tags: the
    window is never touched elsewhere). Reading them one by one (``ctypes``' ``value``,
    ~60 ns each) cost a time per dict; this costs about one call, whatever their number.
    None where the window cannot be made (the tags not 8-byte aligned alike), or reads
    other than the tags do: then they are read one by one."""
    addresses = [ctypes.addressof(tag) for tag in tags]
    if not addresses:
        return None
    low, high = min(addresses), max(addresses)
    if any((a - low) % 8 for a in addresses):
        return None
    try:
        import numpy as np

        window = np.ctypeslib.as_array((ctypes.c_uint64 * ((high - low) // 8 + 1)).from_address(low))
        index = np.array([(a - low) // 8 for a in addresses], dtype=np.intp)
        take = window.take  # (bound now: a function that rebinds numpy's names cannot reach it)
        if take(index).tolist() != [tag.value for tag in tags]:
            return None
    except Exception:  # (an address space numpy cannot span)
        return None
    return lambda: take(index).tobytes()


def _packed(versions: list[Any]) -> bytes:
    """Versions as ``_gather`` reads them."""
    return b"".join(int(v).to_bytes(8, sys.byteorder) for v in versions)


def _nn_classes(package: str = "torch.nn", base: str = "Module", prefix: str = _NN_MODULES) -> list[type]:
    """torch.nn's own Module subclasses (those of torch.nn.* modules), imported now (or
    another package's own subclasses of its base: ``_DISTRIBUTIONS``)."""
    nn = sys.modules.get(package)
    root = getattr(nn, base, None)
    if not isinstance(root, type):
        return []
    found: list[type] = []
    todo = [root]
    while todo:
        for cls in type.__subclasses__(todo.pop()):
            if cls not in found:
                found.append(cls)
                todo.append(cls)
    return [cls for cls in found if str(getattr(cls, "__module__", "")).startswith(prefix)]


# What a function runs, beside its dict: its code and its defaults (read in C, by
# identity: ~0.1 us a function for each).
_RUNS = ("__code__", "__defaults__", "__kwdefaults__")
_RUN_GETTERS = tuple(map(operator.attrgetter, _RUNS))


def _slots(functions: list[FunctionType], ids: list[int]) -> list[Any] | None:
    """Views of each function's code, defaults and keyword-defaults pointers (CPython's
    ``PyFunctionObject`` fields), to be read in the gather with the dicts' tags; None
    where their offsets are not found on a probe, or a view does not read the ids
    ``_codes`` gives."""
    def probe(a: Any = _MISSING, *, b: Any = _MISSING) -> None:
        pass

    where = []
    for want in (id(probe.__code__), id(probe.__defaults__), id(probe.__kwdefaults__)):
        at = [o for o in range(16, 256, 8) if ctypes.c_uint64.from_address(id(probe) + o).value == want]
        if len(at) != 1:
            return None
        where.append(at[0])
    if not functions:
        return []
    views = [ctypes.c_uint64.from_address(id(fn) + o) for o in where for fn in functions]  # (as _codes orders them)
    none = id(None)  # (a function without defaults holds NULL there: read as None)
    return views if [v.value or none for v in views] == ids else None


# torch's own registries, dicts that every function's answers are computed through, which
# a function may change in place (no name rebound): pytree's node of each container type.
# ``SUPPORTED_NODES[tuple]`` replaced by a node flattening in reverse had every later
# Jacobian of a function of two outputs answer each one's under the other's name, with a
# 200, for the engine's life (measured). Each type's node as the engine started is put
# back; a type registered since (a function's own class: ``register_pytree_node``) stays.
_REGISTRIES = (("torch.utils._pytree", "SUPPORTED_NODES"),)
_REGISTRY_LABELS = frozenset(f"{module}.{attr}" for module, attr in _REGISTRIES)


def _registries(version: Any) -> list[_Guarded]:
    found = []
    for module, attr in _REGISTRIES:
        d = getattr(sys.modules.get(module), attr, None)
        if isinstance(d, dict):
            found.append(_Guarded(f"{module}.{attr}", d, d, False, version, whole=True))
    return found


def _shown(key: Any) -> str:
    """A name as the log says it: a registry's keys are types (torch's and Python's own
    only: those taken as the engine started)."""
    return key if isinstance(key, str) else str(getattr(key, "__qualname__", None) or repr(key))


def _call_on(fn: Any) -> Callable[[Callable[[Any], Any]], Any]:
    return lambda getter: getter(fn)


def _registry(registry: Any, version: Any) -> list[_Guarded]:
    """The engine's functions as namespaces: the registry's table of them, each one's
    spec and its declared inputs (frozen dataclasses: ``object.__setattr__`` changes them
    all the same). A function that set another's ``fn`` to one of its own (through its
    module's ``__jacobian_functions__``) had every later request of that function run
    its code, with a 200, for the engine's life."""
    if registry is None:
        return []
    table = getattr(registry, "_specs", None)
    found = [_Guarded("the registry", table, table, True, version)] if isinstance(table, dict) else []
    for spec in registry:
        name = getattr(spec, "name", "?")
        # Every name watched; one added kept (a spec caches what it derives, has_trees...)
        found.append(_Guarded(f"the registry's {name}", spec, vars(spec), False, version, whole=True, items=True))
        for item in getattr(spec, "inputs", ()):
            if hasattr(item, "__dict__"):
                found.append(_Guarded(f"the registry's {name} ({getattr(item, 'name', '?')})", item, vars(item), False,
                                      version, whole=True, items=True))
    return found


def _modules_of(registry: Any, version: Any, guarded: list[_Guarded]) -> list[_Guarded]:
    """Each function's module (its globals) not guarded already, as a namespace its own
    functions may change and no other may: a function that rebound a name in another
    function's module (``victims.SCALE = 2.0``) had every later request of that module's
    functions answer with it (``x * 2.0`` for ``x * 1.0``), with a 200, for the engine's
    life. Every name watched (a constant as much as a function); one added kept."""
    found: dict[int, tuple[dict, str, list[str]]] = {}
    for spec in registry or ():
        d = getattr(getattr(spec, "fn", None), "__globals__", None)
        if isinstance(d, dict) and all(g.d is not d for g in guarded):
            found.setdefault(id(d), (d, str(d.get("__name__", "?")), []))[2].append(getattr(spec, "name", "?"))
    return [_Guarded(f"the module {name}", d, d, False, version, whole=True, owners=frozenset(names))
            for d, name, names in found.values()]


def _closures(registry: Any) -> list[tuple[str, Any, str, Any]]:
    """(function, its module, variable, cell) of each closure cell of the engine's
    functions: a function made by a factory (``make(scale)``) reads its ``scale`` there,
    and one of another module that set ``victim.__closure__[0].cell_contents = 2.0`` had
    every later request of it answer with that."""
    found: list[tuple[str, Any, str, Any]] = []
    for spec in registry or ():
        fn = getattr(spec, "fn", None)
        if isinstance(fn, FunctionType) and fn.__closure__:
            for variable, cell in zip(fn.__code__.co_freevars, fn.__closure__):
                if all(cell is not c for *_, c in found):
                    found.append((getattr(spec, "name", "?"), fn.__module__, variable, cell))
    return found


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # empty
        return _MISSING


def _cell_views(cells: list[Any]) -> list[Any] | None:
    """Views of each cell's contents pointer (CPython's ``PyCellObject``: after its
    header), to be read in the gather with the dicts' tags; None where a view does not
    read what the cell holds."""
    views = [ctypes.c_uint64.from_address(id(cell) + object.__basicsize__) for cell in cells]
    return views if [v.value for v in views] == _cell_ids([_contents(c) for c in cells]) else None


def _cell_ids(contents: list[Any]) -> list[int]:
    return [0 if value is _MISSING else id(value) for value in contents]


def _watched(value: Any) -> bool:
    return isinstance(value, ModuleType) or callable(value)


def _owner_watches(owner: Any, value: Any) -> bool:
    return owner is sys.modules or _watched(value)


def _class_dict(cls: type) -> dict:
    """The dict behind a class's read-only ``__dict__`` proxy (the one its attributes are
    set in)."""
    return next(r for r in gc.get_referents(cls.__dict__) if isinstance(r, dict))


class _Guarded:
    """One namespace: its dict as taken, and the dict's version then. ``strict``: every
    name is watched, and one added is taken away (a class); ``whole``: every name is
    watched, one added kept (the service's modules in an engine process)."""

    def __init__(self, label: str, owner: Any, d: dict, strict: bool, version: Any, whole: bool = False,
                 skip: frozenset[str] = frozenset(), items: bool = False, owners: frozenset[str] | None = None) -> None:
        self.label, self.owner, self.d, self.strict, self.skip = label, owner, d, strict, skip
        # the engine's work on an answer goes through it
        self.answers = label not in _FUNCTIONS_ONLY and not label.startswith(_DISTRIBUTIONS)
        # A function's module: the functions whose changes there stay (``_modules_of``);
        # no answer is refused for it (none of the engine's work goes through it).
        self.owners = owners
        self.items = items  # put back through the dict itself (a frozen dataclass's attributes)
        self.whole = whole or strict or owner is sys.modules
        # A module's own state (a flag, a counter, a cache it rebinds as it runs) is not
        # watched: only what code calls or imports by name, functions, classes, modules.
        self.taken = {k: v for k, v in d.items() if (self.whole or _watched(v)) and k not in skip}
        self.tag = version(d) if version is not None else None
        self.version = self.tag.value if self.tag is not None else None

    def changed(self) -> list[tuple[str, Any]]:
        """(name, value taken or _MISSING) of each name a function rebound, deleted or
        (in a class) added; new names of a module become part of what is taken."""
        d, taken = self.d, self.taken
        found = [(k, v) for k, v in taken.items() if d.get(k, _MISSING) is not v]
        added = [k for k in d if k not in taken and k not in self.skip]  # (a module's unwatched names among them)
        if self.strict:
            found += [(k, _MISSING) for k in added]
        else:
            taken.update((k, d[k]) for k in added if self.whole or _owner_watches(self.owner, d[k]))
        return found

    def differs(self) -> list[str]:
        """The names ``changed`` would find, read only: nothing taken is updated (the
        put-back after the batch still finds them)."""
        d, taken = self.d, self.taken
        found = [k for k, v in taken.items() if d.get(k, _MISSING) is not v]
        if self.strict:
            found += [k for k in d if k not in taken and k not in self.skip]
        return found

    def put_back(self, name: str, value: Any) -> None:
        if self.owner is self.d or self.items:  # sys.modules, the registry: its items; a frozen spec: its dict
            if value is _MISSING:
                self.d.pop(name, None)
            else:
                self.d[name] = value
        elif value is _MISSING:
            delattr(self.owner, name)
        else:
            setattr(self.owner, name, value)  # through the class: its method cache is told


class Namespaces:
    """The names of the shared namespaces as they are when made; :meth:`restore` puts
    back what a function changed."""

    def __init__(self, own_process: bool = False, registry: Any = None) -> None:
        """``own_process``: in an engine process, whose service modules nothing else
        changes, every name of them is watched (in-process, the caller's code may set
        them: a test's monkeypatch). ``registry``: the engine's functions, whose table,
        specs, declared inputs and code are watched too (``_registry``)."""
        if "torch" in sys.modules:
            # Imported by torch at the first backward pass of every jacrev (its
            # compiled_autograd), and then it rebinds torch.manual_seed (wrapped): imported
            # before the names are taken, not blamed on the first function to run.
            import torch._dynamo  # noqa: F401

            # And torch.compile's first use patches nn.Module's __init__ and __setstate__
            # (to tag modules made inside a compiled forward), once per process: done
            # now, as a compiled function's first call would, it is no function's
            # rebinding (one put back after each call, its answers refused for it).
            try:
                from torch._dynamo.mutation_guard import install_generation_tagging_init

                install_generation_tagging_init()
            except Exception as exc:  # another torch: its first compile is put back, as any rebinding
                log.debug("torch.compile's module tagging not installed: %s", exc)
        self._version = version_reader()
        self._modules = sys.modules
        guarded: list[_Guarded] = []
        names = [n for n in (*_MODULES, *(_OWN_PROCESS_MODULES if own_process else ())) if n in sys.modules]
        names += sorted(n for n in sys.modules if n == _SERVICE or n.startswith(_SERVICE + "."))
        for name in names:
            module = sys.modules[name]
            if not isinstance(module, ModuleType):
                continue
            own = own_process and (name == _SERVICE or name.startswith(_SERVICE + "."))
            skip = frozenset(attr for where, attr in _SERVICE_STATE if where == name)
            guarded.append(_Guarded(name, module, vars(module), name in _SHADOWED, self._version, whole=own, skip=skip))
        classes = []
        for path in _CLASSES:
            module, _, attr = path.rpartition(".")
            found = getattr(sys.modules.get(module), attr, None)
            classes += [(path if cls is found else "", cls) for cls in (found.__mro__ if isinstance(found, type) else ())]
        nn = sys.modules.get("torch.nn")
        classes += [(f"torch.nn.{cls.__name__}" if getattr(nn, cls.__name__, None) is cls else "", cls)
                    for cls in _nn_classes()]
        distributions = sys.modules.get(_DISTRIBUTIONS)
        classes += [(f"{_DISTRIBUTIONS}.{cls.__name__}" if getattr(distributions, cls.__name__, None) is cls else "",
                     cls) for cls in _nn_classes(_DISTRIBUTIONS, "Distribution", _DISTRIBUTIONS + ".")]
        base = getattr(distributions, "Distribution", None)  # (the root, which its subclasses' walk leaves out)
        classes += [(f"{_DISTRIBUTIONS}.Distribution", base)] if isinstance(base, type) else []
        for label, cls in classes:
            if cls is not object and not cls.__flags__ & _IMMUTABLE and all(g.owner is not cls for g in guarded):
                guarded.append(_Guarded(label or f"{cls.__module__}.{cls.__qualname__}", cls, _class_dict(cls), True,
                                        self._version, skip=_CLASS_SKIP))
        guarded.append(_Guarded("sys.modules", sys.modules, sys.modules, False, self._version))
        guarded += _registries(self._version)
        guarded += _registry(registry, self._version)
        guarded += _modules_of(registry, self._version, guarded)
        # A function's code or defaults swapped in place (``victim.__code__ =
        # other.__code__``, ``victim.__defaults__ = (3.0,)``): in no dict, so the objects'
        # identities are read, per function (a keyword-defaults dict changed in place is
        # a dict, guarded as the others).
        self._code = [(getattr(spec, "name", "?"), spec.fn) for spec in (registry or ())
                      if isinstance(getattr(spec, "fn", None), FunctionType)]
        self._functions = [fn for _, fn in self._code]
        self._code_objects = [tuple(map(_call_on(fn), _RUN_GETTERS)) for fn in self._functions]
        self._code_taken = self._codes()
        # Read in the gather below where CPython's function layout is found (``_slots``):
        # then nothing is read per function when nothing changed.
        slots = _slots(self._functions, self._code_taken) if self._version is not None else None
        guarded += [_Guarded(f"the registry's {name} (keyword defaults)", fn.__kwdefaults__, fn.__kwdefaults__, True,
                             self._version) for name, fn in self._code if isinstance(fn.__kwdefaults__, dict)]
        self._guarded = guarded
        self._tags = [g.tag for g in guarded]
        self._versions = [g.version for g in guarded]
        self._sizes = [len(g.d) for g in guarded]  # (``transient``: a dict of as many names as taken)
        self._moved = False  # whether ``patched``'s gather found a version tag moved
        # Namespaces whose dict changes with no name rebound in the engine's own work on
        # every batch (forward_ad's and functorch's levels, measured): ``transient``
        # passes them by. (Those a function's own batch moves are passed by in its own
        # batches only: ``transient``'s ``besides``.)
        self.own_state: set[str] = {"torch.autograd.forward_ad", "torch._functorch.eager_transforms"}
        # Every tag (and the functions' slots) in one read where it can be (``_gather``),
        # else one by one.
        # Each function's closure cells, as its module's globals are (``_closures``): their
        # contents' identities, read in the gather with the rest where the layout is found.
        self._cells = _closures(registry)
        self._module_of = {getattr(spec, "name", "?"): getattr(getattr(spec, "fn", None), "__module__", None)
                           for spec in (registry or ())}
        self._cell_taken = [_contents(cell) for *_, cell in self._cells]  # (kept alive: their ids stay theirs)
        cell_views = _cell_views([cell for *_, cell in self._cells]) if slots is not None else None
        self._cells_apart = bool(self._cells) and cell_views is None  # read on their own, at each check
        views = self._tags + (slots or []) + (cell_views or [])
        self._slot_taken = [view.value for view in slots] if slots else []
        self._cells_read = cell_views is not None
        self._codes_apart = not slots  # the functions' code read on its own, at each check
        gathered = _gather(views) if self._version is not None else None
        self._read = gathered if gathered is not None else (lambda: _packed(list(map(_VALUE, views))))
        self._read_taken = self._taken_read() if self._version is not None else b""
        self._named: set[tuple[str, str]] = set()  # (function, namespace) already logged

    def _taken_read(self) -> bytes:
        """What the gather reads when nothing changed since the last put-back."""
        return _packed(self._versions + self._slot_taken + (_cell_ids(self._cell_taken) if self._cells_read else []))

    def _unchanged(self) -> bool:
        """Nothing changed since the last put-back (one gather, nearly always)."""
        return self._version is not None and self._read() == self._read_taken and not (
            self._codes_apart and self._codes() != self._code_taken) and not (
            self._cells_apart and any(_contents(c) is not t for (*_, c), t in zip(self._cells, self._cell_taken)))

    def patched(self) -> list[tuple[str, list[str]]]:
        """(namespace, names) of what was rebound or deleted since the last put-back, read
        only, before it: what a batch's answers were computed, packed and sent under
        (the engine process refuses them: ``EngineServer._patched``). As cheap as ``restore``
        when nothing changed (the version tags); a dict changed only by names added (a
        lazy import) is compared name by name, and nothing is found."""
        found = [("sys", ["modules"])] if sys.modules is not self._modules else []
        self._moved = not self._unchanged()  # (``transient``, asked next, reads this: no second gather)
        if not self._moved:
            return found
        found += [(f"the registry's {name}", names) for name, _, names in self._swapped()]
        for guarded in self._guarded:
            if guarded.owners is None and guarded.answers and (
                    guarded.tag is None or guarded.tag.value != guarded.version):
                names = guarded.differs()
                if names:
                    found.append(("sys.modules" if guarded.label == "sys.modules" else guarded.label,
                                  sorted(map(_shown, names))))
        return found

    def transient(self, besides: Collection[str] = ()) -> list[str]:
        """The namespaces the engine's work goes through that changed since the last
        put-back and are as they were again (their version tags moved; no name rebound,
        added or deleted): a name rebound and put back within the batch, which ``patched``
        cannot see. Read only, before the put-back; as cheap as it when nothing changed.
        A thread another function left that rebound ``torch.sin`` to a doubler within a
        victim's batch and put it back before the batch ended had the victim answer twice
        its sine with a 200, nothing in any log (round 53). ``own_state``'s and ``besides``
        (what this batch's function moved in its own batches before) are passed by.
        Asked right after ``patched``, whose gather it reuses (a second one cost ~3.5 us a
        batch, on a latency path of ~60)."""
        if self._version is None or not self._moved:
            return []
        return [g.label for g, size in zip(self._guarded, self._sizes)
                if g.answers and g.owners is None and g.tag is not None and g.tag.value != g.version
                and g.label not in self.own_state and g.label not in besides and len(g.d) == size
                and not g.differs()]

    def restore(self, function: str) -> None:
        """Put back what differs now (nothing, nearly always: a version tag read each)."""
        self._put_back(function, {function})

    def restore_idle(self, left: list[str]) -> list[tuple[str, list[str]]]:
        """Before a batch, with threads (or processes) that the functions ``left`` started
        alive: what was rebound or deleted since the last put-back, while no function ran,
        put back, as (namespace, names). Only such a thread did it: one of ``left``'s,
        asleep between requests (no CPU: no stray), which rebound ``torch.sin`` to a
        doubler that put the original back as it was called, or another module's global
        (``victims.SCALE = 2.0``), had the next function's request answer twice its value
        with a 200, no line in any log (the put-back after that batch found nothing, or
        took the global for the victim's own: every later request of it wrong). A name
        one of ``left`` sets in its own module or closure (a cache its thread fills)
        stays, as it does after its own batch. As cheap as ``restore`` (one gather)."""
        if sys.modules is self._modules and self._unchanged():
            return []
        return self._put_back("", set(left), named=False)

    def _put_back(self, function: str, own: set[str], named: bool = True) -> list[tuple[str, list[str]]]:
        """Put back what differs now but what ``own``'s functions set in their own modules
        and closures; what was put back, as (namespace, names); logged as ``function``'s
        where ``named``."""
        put: list[tuple[str, list[str]]] = []

        def said(label: str, names: list[str]) -> None:
            put.append((label, names))
            if named:
                self._log(function, label, names)

        if sys.modules is not self._modules:  # the whole table rebound: the import system keeps the old one
            sys.modules = self._modules
            said("sys", ["modules"])
        if self._unchanged():
            return put
        own_modules = {self._module_of.get(f) for f in own}
        for name, fn, names in self._swapped():
            for attr, taken in zip(_RUNS, self._code_objects[self._functions.index(fn)]):
                if attr in names:
                    setattr(fn, attr, taken)
            said(f"the registry's {name}", names)
        for index, (name, module, variable, cell) in enumerate(self._cells):
            taken = self._cell_taken[index]
            if _contents(cell) is taken:
                continue
            if module in own_modules:  # a function of its own module: what it set stays
                self._cell_taken[index] = _contents(cell)
                continue
            if taken is _MISSING:
                del cell.cell_contents
            else:
                cell.cell_contents = taken
            said(f"the closure of {name}", [variable])
        for guarded in self._guarded:
            if guarded.tag is not None and guarded.tag.value == guarded.version:
                continue
            if guarded.owners is not None and not own.isdisjoint(guarded.owners):  # its own module: what it set stays
                guarded.taken = {k: v for k, v in guarded.d.items() if k not in guarded.skip}
                if guarded.tag is not None:
                    guarded.version = guarded.tag.value
                continue
            found = guarded.changed()
            for name, value in found:
                try:
                    guarded.put_back(name, value)
                except Exception as exc:  # a read-only attribute: nothing was changed there after all
                    log.debug("could not put back %s.%s: %s", guarded.label, name, exc)
            if found:
                said(guarded.label, [_shown(name) for name, _ in found])
            if guarded.tag is not None:
                guarded.version = guarded.tag.value
        self._versions = [g.version for g in self._guarded]
        self._sizes = [len(g.d) for g in self._guarded]
        if self._version is not None:
            self._read_taken = self._taken_read()
        return put

    def _codes(self) -> list[int]:
        """The ids of the functions' code objects and defaults (kept alive by
        ``_code_objects``), in one list."""
        functions = self._functions
        return [*map(id, map(_RUN_GETTERS[0], functions)), *map(id, map(_RUN_GETTERS[1], functions)),
                *map(id, map(_RUN_GETTERS[2], functions))]

    def _swapped(self) -> list[tuple[str, Any, list[str]]]:
        """(name, function, attributes) of each function whose code or defaults differ."""
        found = []
        for (name, fn), taken in zip(self._code, self._code_objects):
            names = [attr for attr, was in zip(_RUNS, taken) if getattr(fn, attr) is not was]
            if names:
                found.append((name, fn, names))
        return found

    def _log(self, function: str, label: str, names: list[str]) -> None:
        if (function, label) in self._named:
            return
        self._named.add((function, label))
        log.warning("%s rebound or deleted %s and left them so; put back for the other functions (they are "
                    "put back after each of its calls)", function or "a function", described(label, names))


def described(label: str, names: list[str]) -> str:
    """What was rebound where, as the log and a refused answer say it: ``names in
    torch._VF (einsum)``, ``sys.modules entries (orjson)``."""
    shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    where = ("sys.modules entries" if label == "sys.modules" else
             f"entries of {label}" if label in _REGISTRY_LABELS else f"names in {label}")
    return f"{where} ({shown})"
