"""torch's tables a function may edit in place, read through by other functions' calls:
put back after each batch (settings of ``process_settings``).

Measured, each for as long as the engine lived, with a 200 and no line in any log:

- ``register_kl(Normal, Normal)(f)`` in a function (or ``f`` planted in the memo that
  ``kl_divergence`` reads first, ``torch.distributions.kl._KL_MEMOIZE``): every later
  function's ``kl_divergence`` of two Normals answered ``f``'s values (zeros), and its
  Jacobian with them. One for a pair torch has none for (``Categorical``, ``Normal``)
  made another function's ``NotImplementedError`` (its own fallback) an answer of ``f``'s;
- ``torch.overrides.get_default_nowrap_functions().add(torch.Tensor.mul)``: every later
  tensor subclass's ``mul`` answered a plain Tensor (torch's default
  ``__torch_function__`` reads that cached set to decide), and a function calling its
  subclass's own method on it failed, 500 ``AttributeError``.

The KL registry's entries as the engine started are put back (a pair with a type of the
function's own, ``register_kl(MyDist, Normal)``, stays, as pytree's nodes of its own
classes do), and an entry of the memo that the registry would not give is taken away
with the whole memo (a cache: refilled on the next call). Both dicts' version tags are
read a batch (~0.2 us); only a change is looked into. The no-wrap set is compared whole
(three functions).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["KLTables", "NoWrap"]

_MISSING = object()


def _torch_own(cls: Any) -> bool:
    return isinstance(cls, type) and str(getattr(cls, "__module__", "")).startswith("torch.")


class KLTables:
    """``torch.distributions.kl``'s registry and memo, as vetted so far."""

    def __init__(self) -> None:
        import torch.distributions.kl as kl

        from .namespaces import version_reader

        self.kl = kl
        self.registry, self.memo = kl._KL_REGISTRY, kl._KL_MEMOIZE
        self.taken = dict(self.registry)
        version = version_reader()
        self._tags = (version(self.registry), version(self.memo)) if version is not None else None
        self.found: list[str] = []  # what the last look found changed
        self.vetted = self.get()

    def get(self) -> Any:
        if self._tags is not None:
            return self._tags[0].value, self._tags[1].value
        # (another Python: the entries themselves, ~5 us)
        return tuple(map(id, self.registry.values())), tuple(self.registry), tuple(map(id, self.memo.values()))

    def changed(self, now: Any, taken: Any) -> bool:
        """Whether an entry of torch's own was replaced, removed or added, or the memo
        holds what the registry would not give; what else changed (a pair of the
        function's own types, the memo filled by a call) is taken as the engine's."""
        if now == self.vetted:
            return False
        registry, found = self.registry, []
        for key, fn in self.taken.items():
            if registry.get(key, _MISSING) is not fn:
                found.append(f"{_pair(key)} replaced" if key in registry else f"{_pair(key)} removed")
        for key in list(registry):
            if key not in self.taken:
                if all(map(_torch_own, key)):
                    found.append(f"{_pair(key)} added")
                else:
                    self.taken[key] = registry[key]  # a pair with a type of the function's own
        if not found:
            for key, fn in list(self.memo.items()):
                if fn is not self._dispatch(*key):
                    found.append(f"{_pair(key)} planted in the memo")
        self.found = found
        if not found:
            self.vetted = now
        return bool(found)

    def _dispatch(self, type_p: type, type_q: type) -> Any:
        """What ``kl_divergence`` would find for the pair (torch's ``_dispatch_kl``, less
        its warning of an ambiguous pair)."""
        registry = self.registry
        matches = [(p, q) for p, q in list(registry) if issubclass(type_p, p) and issubclass(type_q, q)]
        if not matches:
            return NotImplemented
        return registry.get(min(self.kl._Match(*m) for m in matches).types, NotImplemented)

    def put(self, taken: Any) -> None:
        self.registry.clear()
        self.registry.update(self.taken)
        self.memo.clear()
        self.vetted = self.get()

    def shown(self, now: Any, taken: Any) -> str:
        return ", ".join(self.found[:5]) + (f" and {len(self.found) - 5} more" if len(self.found) > 5 else "")


def _pair(key: Any) -> str:
    return "(" + ", ".join(getattr(t, "__qualname__", repr(t)) for t in key) + ")"


class NoWrap:
    """``torch.overrides.get_default_nowrap_functions()``'s cached set."""

    def __init__(self) -> None:
        import torch.overrides

        self._live: Callable[[], set[Any]] = torch.overrides.get_default_nowrap_functions

    def get(self) -> frozenset[Any]:
        return frozenset(self._live())

    def put(self, taken: frozenset[Any]) -> None:
        live = self._live()
        live.clear()
        live.update(taken)

    @staticmethod
    def shown(now: frozenset[Any], taken: frozenset[Any]) -> str:
        added, removed = sorted(map(_named, now - taken)), sorted(map(_named, taken - now))
        return "; ".join(part for part in (", ".join(f"{n} added" for n in added),
                                           ", ".join(f"{n} removed" for n in removed)) if part)


def _named(fn: Any) -> str:
    """A function as the log names it: a property's getter (``__get__`` of its
    descriptor) by its property's name."""
    if getattr(fn, "__name__", None) == "__get__":
        fn = getattr(fn, "__self__", fn)
    return str(getattr(fn, "__qualname__", None) or repr(fn))
