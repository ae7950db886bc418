"""The import system's tables a function may plant a module of its own in, for another
function's first import of it to find.

A module a function imports at its first call is looked up by name, in tables every
function shares. Measured, each with a 200 and the other function's answer doubled (its
module's ``SCALE`` 2.0 in place of 1.0), for as long as the engine lived:

- ``sys.modules[name] = impostor`` for a module not yet imported: ``import name`` takes
  what it finds there without asking a finder;
- ``sys.path_importer_cache[directory] = finder`` (a directory the engine imports from,
  a package's): the path finder asks the finder cached for a directory, made by the path
  hooks the first time, and never asks the hooks again;
- a directory of its own put first on ``sys.path``, holding a module under a name of
  the standard library's (or of any module not yet imported).

(The finders on ``sys.meta_path`` and ``sys.path_hooks`` are ``process_settings``' own
setting.) After each batch, what a function planted is taken away, as its settings are:

- an entry added to ``sys.modules`` that no import made (``Imports``: a finder of the
  engine's own, first on ``sys.meta_path``, notes each module the import system looks
  for), under a name the import system's finders find a module for, is removed, and the
  next ``import`` of it imports it. One under a name nothing finds stays: that is how
  libraries alias their modules (``six.moves``); so does one a function put in place of a
  module it had just imported itself, as a change to a module already imported does;
- a cached path entry's finder that the path hooks did not make (of a type none of them
  makes, or a ``FileFinder`` of another directory) is dropped: Python makes the entry's
  own again;
- ``sys.path``'s entries as the engine started come first again, those added behind them
  (where they find only what nothing else would), as for the finders.
"""

from __future__ import annotations

import sys
from importlib import _bootstrap, _bootstrap_external  # type: ignore[attr-defined]
from typing import Any, Callable

from .namespaces import version_reader

__all__ = ["Imports", "path_changed", "path_entries", "put_path"]

_FileFinder = _bootstrap_external.FileFinder
# The frames a real import looks for a module from: ``_find_and_load_unlocked`` calls
# ``_find_spec``, which asks each finder. ``importlib.util.find_spec`` (a look, no
# import) calls ``_find_spec`` from elsewhere: not noted, or a function could have a name
# noted as imported, then plant it.
_FIND_SPEC = _bootstrap._find_spec.__code__
_FIND_AND_LOAD = _bootstrap._find_and_load_unlocked.__code__


class _Noted:
    """A finder first on ``sys.meta_path`` that finds nothing and notes the names the
    import system looked for while importing them (a real import: a name already in
    ``sys.modules`` asks no finder). A few hundred nanoseconds an import."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        try:
            caller = sys._getframe(1)
            if caller.f_code is _FIND_SPEC and caller.f_back is not None and caller.f_back.f_code is _FIND_AND_LOAD:
                self.names.add(name)
        except Exception:  # (a frame missing: never an import's failure)
            pass
        return None

    def invalidate_caches(self) -> None:
        pass


def _tag_of(d: dict) -> Callable[[], Any]:
    """A reader of ``d``'s version tag (every change of the dict changes it), or of its
    length where the tag cannot be read (another Python): a new entry changes that too."""
    version = version_reader()
    if version is None:
        return lambda: len(d)
    tag = version(d)
    return lambda: tag.value


class _Table:
    """One table's setting: its version as read, and what to do when it moved."""

    def __init__(self, table: dict, planted: Callable[[], list[str]], remove: Callable[[list[str]], None]) -> None:
        self.get = _tag_of(table)
        self._planted, self._remove = planted, remove
        self.seen = self.get()  # the version last found clean
        self.found: list[str] = []  # what the last change found planted, for the log

    def changed(self, now: Any, taken: Any) -> bool:
        if now == self.seen:
            return False
        found = self._planted()
        if not found:
            self.seen = now
        self.found = found
        return bool(found)

    # (``process_settings``: a version equal to the one last let be is no change, so the
    # pass that finds nothing changed compares it with the other values, in one step)
    changed.equal_is_unchanged = True  # type: ignore[attr-defined]

    def put(self, taken: Any) -> None:
        self._remove(self.found)
        self.seen = self.get()


class Imports:
    """``sys.modules`` and ``sys.path_importer_cache`` as an engine process takes them;
    ``modules`` and ``path_cache`` are their settings (``process_settings``). Made before
    the settings are taken: the finder that notes imports is then one of the engine's
    own, kept first with them."""

    def __init__(self) -> None:
        self._noted = _Noted()
        sys.meta_path.insert(0, self._noted)
        self._finders = [f for f in sys.meta_path if f is not self._noted]  # Python's own, as taken
        self._known = set(sys.modules)
        cache = sys.path_importer_cache
        self._hook_types = {type(f) for f in cache.values() if f is not None} | {_FileFinder}
        try:
            import zipimport

            self._hook_types.add(zipimport.zipimporter)
        except ImportError:  # pragma: no cover - built without zlib
            pass
        self.modules = _Table(sys.modules, self._planted_modules, self._remove_modules)
        self.path_cache = _Table(cache, self._planted_finders, self._remove_finders)

    # ------------------------------------------------------------ sys.modules

    def _planted_modules(self) -> list[str]:
        noted, known = self._noted.names, self._known
        added = [name for name in list(sys.modules) if name not in known]
        planted = [name for name in added if name not in noted and self._findable(name)]
        known.update(name for name in added if name not in planted)
        noted.clear()
        return planted

    def _findable(self, name: str) -> bool:
        """Whether the import system's finders, as the engine started, find a module for
        ``name`` (its package's ``__path__`` for a submodule): what ``import name`` would
        have imported, had nothing been planted."""
        parent, _, _ = name.rpartition(".")
        path = None
        if parent:
            package = sys.modules.get(parent)
            path = package.__dict__.get("__path__") if isinstance(package, type(sys)) else None
            if path is None:
                return False  # no package to import it from: nothing shadowed
        for finder in self._finders:
            try:
                if finder.find_spec(name, path) is not None:
                    return True
            except Exception:  # a finder that cannot say: not found by it
                continue
        return False

    @staticmethod
    def _remove_modules(names: list[str]) -> None:
        for name in names:
            sys.modules.pop(name, None)

    # ------------------------------------------------------------ sys.path_importer_cache

    def _planted_finders(self) -> list[str]:
        kinds = self._hook_types
        return [entry for entry, finder in list(sys.path_importer_cache.items())
                if finder is not None and (type(finder) not in kinds
                                           or (type(finder) is _FileFinder and finder.path != entry))]

    @staticmethod
    def _remove_finders(entries: list[str]) -> None:
        for entry in entries:
            sys.path_importer_cache.pop(entry, None)


def path_entries() -> tuple[Any, ...]:
    return tuple(sys.path)


def _path_repaired(now: tuple[Any, ...], taken: tuple[Any, ...]) -> tuple[Any, ...]:
    """The entries taken, in their order, then those added."""
    return (*taken, *(entry for entry in now if entry not in taken))


def path_changed(now: tuple[Any, ...], taken: tuple[Any, ...]) -> bool:
    return _path_repaired(now, taken) != now


def put_path(taken: tuple[Any, ...]) -> None:
    sys.path[:] = _path_repaired(path_entries(), taken)
