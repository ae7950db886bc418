"""Global state of the standard library, numpy and libc that every function of an engine
shares, put back after each batch (settings of ``process_settings``).

Measured, each for as long as the engine lived, with no line in any log:

- ``decimal.getcontext().prec = 3`` in a function: another client's ``sqrt(2)`` taken in
  ``decimal`` answered 1.41, with a 200; a context of its own set with a trap on
  ``Inexact`` (``decimal.setcontext``) made every later function that rounds in decimal
  fail, 500 ``Inexact``. The context is the engine thread's, which runs every function;
- ``locale.setlocale(locale.LC_ALL, "C")``: every later function reading a UTF-8 text
  file with ``open()``'s default encoding (the locale's) failed, 500
  ``UnicodeDecodeError: 'ascii' codec can't decode``;
- ``random.seed(0)`` or ``np.random.seed(0)``: every later function drawing from Python's
  ``random`` or numpy's global ``np.random`` (noise, a Monte Carlo step) drew the same
  numbers after each of its calls, the ones that seed gives anywhere (as round
  seventeen found for ``torch.manual_seed``);
- ``os.putenv("PYTHONHOME", "/nonexistent")``, past ``os.environ``: every later function's
  ``subprocess.run([sys.executable, ...])`` failed (``ProgramEnvironment``).

decimal's context and the locale are put back as the engine started. A random generator
whose state a batch moved (a seed, a state set, or draws: which of them cannot be told
from the state) is re-seeded from the OS's entropy, as torch's is after a seed: the next
draws are no one's to know. A function that draws from them pays for that (~10 us for
Python's, ~20 us for numpy's a batch); the others read a few bytes of each generator's
state a batch (``ctypes``, as ``namespaces`` reads dict versions).
"""

from __future__ import annotations

import _locale
import _random
import ctypes
import decimal
import locale
import os
import random
import sys
from typing import Any, Callable

import numpy as np

__all__ = ["DecimalContext", "Generator", "ProgramEnvironment", "generators", "locale_now", "put_locale"]


# ------------------------------------------------------------ decimal


class DecimalContext:
    """decimal's context of the engine's thread: its settings (precision, exponent limits,
    traps, rounding, clamp, capitals; not its flags, which every operation sets), and the
    object itself (``setcontext`` replaces it). Put back as a fresh copy of the one taken,
    its flags as they were then."""

    def __init__(self) -> None:
        self.expected = decimal.getcontext()
        self._pristine = self.expected.copy()
        self._read = _context_reader()
        self._viewed: Any = None
        self._views: Callable[[], Any] = lambda: None

    def get(self) -> tuple[Any, Any]:
        ctx = decimal.getcontext()
        if ctx is not self._viewed:  # (a context set since: read there from now on)
            self._viewed, self._views = ctx, self._read(ctx)
        return ctx, self._views()

    def changed(self, now: tuple[Any, Any], taken: tuple[Any, Any]) -> bool:
        return now[0] is not self.expected or now[1] != taken[1]

    # (``process_settings``: equal values are no change, compared in one step with the others)
    changed.equal_is_unchanged = True  # type: ignore[attr-defined]

    def put(self, taken: tuple[Any, Any]) -> None:
        fresh = self._pristine.copy()
        decimal.setcontext(fresh)
        self.expected = fresh

    def shown(self, now: tuple[Any, Any], taken: tuple[Any, Any]) -> str:
        """The settings that differ from the engine's own, for the log."""
        was = _settings(self._pristine)
        return ", ".join(f"{name}={value!r}" for name, value in _settings(now[0]).items() if was[name] != value) or \
            "a context of its own"


def _settings(ctx: decimal.Context) -> dict[str, Any]:
    return {"prec": ctx.prec, "rounding": ctx.rounding, "Emax": ctx.Emax, "Emin": ctx.Emin, "capitals": ctx.capitals,
            "clamp": ctx.clamp, "traps": sorted(s.__name__ for s, on in ctx.traps.items() if on)}


# CPython's C decimal lays a context out as its object header, then libmpdec's context
# (prec, emax, emin as 64-bit values, the traps' bits, the status' (flags), a new trap,
# round, clamp, allcr), two object pointers and ``capitals``. Read there, a context's
# settings cost three reads of its memory (~0.2 us) where its attributes took ~2 us a
# batch; the offsets are checked on two contexts of known settings, else the attributes.
_MPD = object.__basicsize__  # where libmpdec's context starts


def _raw_reader(ctx: decimal.Context) -> Callable[[], Any]:
    limits = (ctypes.c_char * 28).from_address(id(ctx) + _MPD)  # prec, emax, emin, traps
    modes = (ctypes.c_char * 12).from_address(id(ctx) + _MPD + 36)  # round, clamp, allcr
    capitals = ctypes.c_int.from_address(id(ctx) + _MPD + 64)
    return lambda: (limits.raw, modes.raw, capitals.value)


def _attribute_reader(ctx: decimal.Context) -> Callable[[], Any]:
    return lambda: tuple(_settings(ctx).values())


def _context_reader() -> Callable[[decimal.Context], Callable[[], Any]]:
    """How to read a context's settings: in its memory, where the layout checks."""
    try:
        probes = [decimal.Context(prec=7, Emax=11, Emin=-13, rounding=decimal.ROUND_DOWN, clamp=1, capitals=0,
                                  traps=[decimal.Inexact]),
                  decimal.Context(prec=9, Emax=5, Emin=-3, rounding=decimal.ROUND_UP, clamp=0, capitals=1, traps=[])]
        (a_limits, a_modes, a_capitals), (b_limits, b_modes, b_capitals) = (_raw_reader(p)() for p in probes)
        if (int.from_bytes(a_limits[:8], sys.byteorder, signed=True), int.from_bytes(a_limits[8:16], sys.byteorder),
                int.from_bytes(a_limits[16:24], sys.byteorder, signed=True)) == (7, 11, -13) and \
                int.from_bytes(b_limits[:8], sys.byteorder) == 9 and a_limits[24:] != b_limits[24:] and \
                a_modes[4:8] != b_modes[4:8] and a_modes[:4] != b_modes[:4] and (a_capitals, b_capitals) == (0, 1) and \
                decimal.getcontext().__class__ is decimal.Context:
            return _raw_reader
    except Exception:  # another decimal (the pure-Python one): by its attributes
        pass
    return _attribute_reader


# ------------------------------------------------------------ the locale


def locale_now() -> str:
    """Every category's locale, as ``setlocale(LC_ALL)`` answers (one string)."""
    return _locale.setlocale(_locale.LC_ALL, None)


def put_locale(taken: str) -> None:
    locale.setlocale(locale.LC_ALL, taken)


# ------------------------------------------------------------ random generators


class Generator:
    """A global random generator: ``fingerprint`` reads a few bytes of its state that
    any seed, state set or draw changes; ``reseed`` seeds it from the OS's entropy."""

    def __init__(self, what: str, fingerprint: Callable[[], Any], reseed: Callable[[], None],
                 take: Callable[[], Callable[[], None]] | None = None) -> None:
        self.what, self.fingerprint, self._reseed = what, fingerprint, reseed
        # its whole state, copied out of its memory (~1 us, where getstate / get_state
        # took 10-35 us): a function that puts it back as it is now (kept_state.Replay)
        self.take = take
        self.expected = fingerprint()

    def changed(self, now: Any, taken: Any) -> bool:
        return now != self.expected

    changed.equal_is_unchanged = True  # type: ignore[attr-defined]

    def put(self, taken: Any) -> None:
        self._reseed()
        self.expected = self.fingerprint()


def _python_random() -> Generator | None:
    """Python's ``random`` (its module's own ``Random``, CPython's Mersenne Twister: its
    position, then its first words of state, read as 16 bytes), where the layout checks
    against ``getstate``. (Not the first word alone: every seed by an array, as Python's
    are, sets it to 2^31.) With ``gauss_next``, the second of the pair ``gauss`` draws,
    kept for its next call: a function that set it (``random.setstate`` of the state as
    it was with one of its own, or the attribute) moved no word of the state, and another
    client's next ``random.gauss()`` answered it (1e9); a seed clears it."""
    inst = getattr(random, "_inst", None)
    if type(inst) is not random.Random:
        return None
    view = (ctypes.c_uint32 * 4).from_address(id(inst) + object.__basicsize__)
    _, state, _ = inst.getstate()
    if list(view) != [state[-1], *state[:3]]:
        return None
    raw = (ctypes.c_char * 16).from_buffer(view)
    # (its C struct past the object's header: the position and every word of state)
    whole = (ctypes.c_char * (_random.Random.__basicsize__ - object.__basicsize__)).from_address(
        id(inst) + object.__basicsize__)

    def take() -> Callable[[], None]:
        words, gauss = whole.raw, inst.gauss_next

        def put() -> None:
            whole.raw = words
            inst.gauss_next = gauss

        return put

    return Generator("the state of Python's random generator (random.seed, random.setstate, or draws)",
                     lambda: (raw.raw, inst.gauss_next), lambda: inst.seed(os.urandom(32)), take)


def _numpy_random() -> Generator | None:
    """numpy's global ``np.random`` (the legacy ``RandomState`` its functions draw from,
    an MT19937: its first words of state and its position, and the normal sample it
    keeps for its next normal draw), where the layout checks against ``get_state``."""
    try:
        rand = np.random.mtrand._rand
        address = rand._bit_generator.ctypes.state_address
        _, key, pos, _, _ = rand.get_state(legacy=True)
        cached = _numpy_cached_normal(rand)
    except Exception:  # another numpy
        return None
    words, position = (ctypes.c_uint32 * 3).from_address(address), ctypes.c_int.from_address(address + 4 * len(key))
    if list(words) != [int(k) for k in key[:3]] or position.value != pos or cached is None:
        return None
    raw = (ctypes.c_char * 12).from_buffer(words)
    bit_generator = rand._bit_generator

    def reseed() -> None:
        # ``np.random.set_bit_generator(MT19937(0))`` put a seeded generator of its own
        # under ``np.random``, whose words are read elsewhere: every later function's
        # ``np.random.random_sample()`` answered 0.4793..., known anywhere. Its own back.
        if rand._bit_generator is not bit_generator:
            np.random.set_bit_generator(bit_generator)
        rand.seed(np.frombuffer(os.urandom(32), dtype=np.uint32))

    # (MT19937's state: its words, then its position; and the normal sample kept)
    whole = (ctypes.c_char * (4 * len(key) + ctypes.sizeof(ctypes.c_int))).from_address(address)
    sample = cached.view  # type: ignore[attr-defined]

    def take() -> Callable[[], None]:
        # (a generator of its own put under np.random is set_bit_generator's: after each
        # batch it is taken away, process_settings; its state is not put back here)
        words, kept = whole.raw, sample.raw

        def put() -> None:
            whole.raw = words
            sample.raw = kept

        return put

    return Generator("the state of numpy's global random generator (np.random.seed, set_state, set_bit_generator, "
                     "or draws)", lambda: (raw.raw, position.value, cached(), rand._bit_generator is bit_generator),
                     reseed, take)


def _numpy_cached_normal(rand: Any) -> Callable[[], Any] | None:
    """A reader of the normal sample a ``RandomState`` keeps for its next normal draw
    (its ``has_gauss`` flag and ``gauss`` value, the last two fields of ``get_state``,
    in the object's own memory: found there on a ``RandomState`` of its own, whose
    sample is set twice to values of our own). ``np.random.set_state`` of the state as
    it was with a sample of its own (1e9) moved none of the words, and another client's
    next ``np.random.standard_normal()`` answered 1e9; a seed clears it."""
    probe = type(rand)(0)
    _, key, pos, _, _ = probe.get_state(legacy=True)
    offsets = None
    for value in (1234.5678, -98.25):
        probe.set_state(("MT19937", key, pos, 1, value))
        raw = ctypes.string_at(id(probe), type(probe).__basicsize__)
        found = {o for o in range(8, len(raw) - 7, 8) if raw[o:o + 8] == np.float64(value).tobytes() and
                 int.from_bytes(raw[o - 8:o - 4], sys.byteorder) == 1}
        offsets = found if offsets is None else offsets & found
    probe.set_state(("MT19937", key, pos, 0, 0.0))
    if len(offsets or ()) != 1 or ctypes.string_at(id(probe) + min(offsets) - 8, 4) != bytes(4):
        return None
    view = (ctypes.c_char * 16).from_address(id(rand) + min(offsets) - 8)  # has_gauss (and padding), gauss
    _, _, _, has_gauss, gauss = rand.get_state(legacy=True)
    if view.raw[:4] != int(has_gauss).to_bytes(4, sys.byteorder) or view.raw[8:] != np.float64(gauss).tobytes():
        return None
    read = lambda: view.raw  # noqa: E731
    read.view = view  # type: ignore[attr-defined]  # (written back by Generator.take's put)
    return read


def generators() -> list[Generator]:
    return [g for g in (_python_random(), _numpy_random()) if g is not None]


# ------------------------------------------------------------ the environment as programs get it


class ProgramEnvironment:
    """libc's own environment (``environ``), which the programs a function starts get:
    ``os.putenv`` (or ``setenv`` through ctypes) changes it past ``os.environ``, which
    the environment's own setting reads (``process_settings``).
    ``os.putenv("PYTHONHOME", "/nonexistent")`` failed every later function's
    ``subprocess.run([sys.executable, ...])`` (exit 1), for the engine's life. As there:
    a variable the engine started with is put back, and one that steers programs
    (``steering``) taken away. Read a batch as the array of its entries' pointers
    (a setenv, putenv or unsetenv changes it; ~0.2 us), walked only when it changed."""

    def __init__(self, steering: Callable[[bytes], bool]) -> None:
        libc = ctypes.CDLL(None)
        self._environ = ctypes.c_void_p.in_dll(libc, "environ")
        self._steering = steering
        self.taken = self._walk()
        self._view(self._environ.value)
        self.expected = self.get()
        self.found: list[str] = []

    def _view(self, pointer: int | None) -> None:
        """A view of the entries' pointers (and the NULL after them), as many as there
        are now: made again whenever libc moves the array."""
        self._pointer = pointer
        count = len(self._entries())
        self._pointers = (ctypes.c_char * (ctypes.sizeof(ctypes.c_void_p) * (count + 1))).from_address(pointer) if pointer else None

    def _entries(self) -> list[bytes]:
        pointer = self._environ.value
        if not pointer:
            return []
        entries = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_char_p))
        found = []
        while (entry := entries[len(found)]) is not None:
            found.append(entry)
        return found

    def _walk(self) -> dict[bytes, bytes]:
        return dict(entry.partition(b"=")[::2] for entry in self._entries())

    def get(self) -> tuple[Any, bytes]:
        pointer = self._environ.value
        if pointer != self._pointer:
            self._view(pointer)
        return pointer, self._pointers.raw if self._pointers is not None else b""

    def changed(self, now: Any, taken: Any) -> bool:
        if now == self.expected:
            return False
        env = self._walk()
        self.found = sorted({*(k for k, v in self.taken.items() if env.get(k) != v),
                             *(k for k in env if k not in self.taken and self._steering(k))})
        if not self.found:
            self.expected = now
        return bool(self.found)

    changed.equal_is_unchanged = True  # type: ignore[attr-defined]

    def put(self, taken: Any) -> None:
        for key in self.found:
            if key in self.taken:
                os.putenv(key, self.taken[key])
            else:
                os.unsetenv(key)
        self.expected = self.get()

    def shown(self, now: Any, taken: Any) -> str:
        return "other values of " + ", ".join(k.decode(errors="replace") for k in self.found)
