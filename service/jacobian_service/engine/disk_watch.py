"""The disk an engine's functions keep in temporary files, against a bound: past it, the
engine is recycled (its queue drains, the spare takes over), and its temporary directory
goes with it (``Supervisor._ended``).

Each engine has a temporary directory of its own (``TMPDIR``, under the run directory),
removed as it ends. But while it lives, a function that leaves a temporary file at each
call (``mkstemp``, ``NamedTemporaryFile(delete=False)``, a ``TemporaryFile`` it keeps open:
``O_TMPFILE``, in no listing) filled the disk for as long as the engine lived: measured,
8 MiB a call, 60 calls kept 480 MiB with no word in the log and no end; at the wall,
every function that writes a file, the sparsity cache, ``serve``'s log and every other
user of that file system fail with ENOSPC. Nothing else held it: the engine's memory
caps count no file, and RLIMIT_FSIZE bounds one file, not how many.

What is counted, once a second after a batch ran (every ``idle_every_s`` otherwise: a
thread a function left may write on): the blocks of every file under the directory (a
walk, ~10 us a file; one of more than ``max_entries`` entries is over the bound by
itself, so that a million empty files cannot make the walk dear), and of regular files
the engine holds open that have no name left (``/proc/self/fd``: what ``TemporaryFile``
makes; a memfd or a ``/dev/shm`` file is memory, ``memory_watch``'s). Growth is charged to
the functions run since the last count, by the free space each batch took (read
after each batch: a batch that took the room left has the count made at once).

And the files the engine's code opened for writing outside that directory (``/tmp``
named outright, ``$HOME``, the working directory): not watched, 8 MiB a call in ``/tmp``
took 96 MiB in 12 calls past a 32 MiB bound, nothing said (round 53). An audit hook
(``sys.addaudithook``: Python's ``open``, ``os.open``, ``tempfile``, ``numpy.save``; not
what C code or another process writes) notes each such path as it is opened, with the
blocks it had then (and follows it through a rename); so does the count, for a named file
the engine holds open for writing that the hook did not see (C code's: ``fopen`` through
ctypes, 8 MiB a write counted 0; its descriptor's flags, ``/proc/self/fdinfo``; not the
run directory's, the service's own). What each has grown by since counts
with the directory's files (one deleted is forgotten), as many as ``max_entries`` paths (past that, over by
itself). They are not removed as the engine ends: not its own directory's, they may be
the user's (one appended to, an output meant to stay, a name another process shares).
What C code writes and closes within one call (``torch.save`` to a path) and what a
child process writes outside are not seen: free space is every process's.
Files are charged as bytes are: the entries each batch added, by the same share (a
function that made 20,000 empty files had its engine recycled, never struck: no bytes grew).
The bound is ``ENGINE_MAX_TMP_BYTES``, by
default a quarter of the space free on that file system as the engine starts, at most
4 GiB. Torch-free; Linux only for the unlinked files (elsewhere: the directory alone).
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import sys

__all__ = ["DiskWatch"]

log = logging.getLogger("jacobian_service.engine")

_DEFAULT_MAX = 4 << 30
_FDS = "/proc/self/fd"
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_NOT_DISK = ("/dev/", "/proc/", "/sys/")  # (a /dev/shm file is memory: memory_watch's)


class DiskWatch:
    def __init__(self, directory: str | None, limit: int | None = None, every_s: float = 1.0,
                 idle_every_s: float = 10.0, max_entries: int = 20_000, shared: tuple[object, ...] = ()) -> None:
        self.directory = directory  # None: not watched (no directory of its own)
        # Directories the engine's own code writes to (the sparsity pattern cache): not the
        # functions' files. Noted, the patterns clients' shapes had the engine write were
        # charged to the function asked for, recycling its engine and striking it.
        self.shared = tuple(str(d) for d in shared if d)
        self.setting = limit
        self.every_s = every_s
        self.idle_every_s = idle_every_s
        self.max_entries = max_entries
        self.limit: int | None = None
        self._last = 0.0
        self._held = 0
        self._ran: set[str] = set()
        self._dropped: collections.Counter[str] = collections.Counter()  # free space each took since the count
        self._free: int | None = None
        self._grown: collections.Counter[str] = collections.Counter()
        self._entries = 0  # entries walked at the last count
        self._made: collections.Counter[str] = collections.Counter()  # entries each function's batches added
        self._written: dict[str, int] = {}  # paths opened for writing outside it -> their blocks' bytes then
        self._hooked = False
        self._own: tuple[str, ...] = ()  # the paths under which a file written is not noted
        self._service = "\0"  # the run directory (its files held open are the service's own)

    def _opened(self, event: str, args: tuple) -> None:
        """The audit hook: a path opened for writing outside the directory, noted with
        the bytes of its blocks then. Never raises (it would fail the open)."""
        if event == "os.rename":  # (os.replace too): a file noted, renamed, is still the same file
            try:
                src, dst = (os.path.abspath(os.fsdecode(p)) for p in args[:2])
                if src in self._written and not dst.startswith(self._own):
                    self._written[dst] = self._written.pop(src)
            except Exception:
                pass
            return
        if event != "open":
            return
        try:
            path, mode, flags = args
            if not (isinstance(mode, str) and any(c in mode for c in "wax+")
                    or isinstance(flags, int) and flags & _WRITING):
                return
            if isinstance(path, int) or path is None:
                return
            path = os.path.abspath(os.fsdecode(path))
            if path in self._written or path.startswith(_NOT_DISK) or path.startswith(self._own):
                return
            if len(self._written) > self.max_entries:
                return
            try:
                before = os.stat(path).st_blocks * 512
            except OSError:
                before = 0
            self._written[path] = before
        except Exception:
            pass

    def start(self) -> None:
        """Ready to serve: the bound, and what the directory holds already (nobody's)."""
        if self.directory is None or not os.path.isdir(self.directory):
            return
        if self.setting is not None:
            self.limit = self.setting
        else:
            try:
                fs = os.statvfs(self.directory)
                self.limit = min(_DEFAULT_MAX, fs.f_bavail * fs.f_frsize // 4)
            except OSError:
                self.limit = _DEFAULT_MAX
        if not self._hooked:  # (once a process: an audit hook cannot be removed)
            self._hooked = True
            # Not its own directory (walked), nor the caches compiled kernels are kept in
            # for every engine after (torch.compile's, triton's), which the engines share,
            # nor the engine's own (``shared``).
            cache = os.path.join(os.path.expanduser("~"), ".triton", "")
            self._own = tuple(os.path.join(os.path.abspath(d), "") for d in (
                self.directory, os.environ.get("TORCHINDUCTOR_CACHE_DIR") or self.directory,
                os.environ.get("TRITON_CACHE_DIR") or cache, *self.shared))
            sys.addaudithook(self._opened)
            self._service = os.path.join(os.path.dirname(os.path.abspath(self.directory)), "")
        self._held, self._entries = self.held()
        self._free = _free(self.directory)
        self._ran.clear()
        self._dropped.clear()
        self._grown.clear()
        self._made.clear()

    def after_run(self, function: str) -> None:
        """After a batch: the file system's free space (a ``statvfs``, ~2 us) says which
        batch took it, and one that took the room left has the count made now, not
        within the second (8 MiB a call, 20 calls took 160 MiB in 0.1 s)."""
        if self.limit is None:
            return
        function = function or "a function"
        self._ran.add(function)
        free, self._free = self._free, _free(self.directory)
        if free is not None and self._free is not None and free > self._free:
            self._dropped[function] += free - self._free
            if sum(self._dropped.values()) > self.limit - self._held:
                self._last = float("-inf")

    def held(self) -> tuple[int, int]:
        """Bytes of disk the directory's files, what the files written outside it grew
        by, and the engine's unnamed open files take, and the entries walked (stopped
        past ``max_entries``) and noted outside."""
        total, entries = 0, 0
        seen: set[tuple[int, int]] = set()
        stack = [self.directory]
        while stack and entries <= self.max_entries:
            try:
                with os.scandir(stack.pop()) as it:
                    for entry in it:
                        entries += 1
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            stack.append(entry.path)
                        elif (st.st_dev, st.st_ino) not in seen:  # (hard links: once)
                            seen.add((st.st_dev, st.st_ino))
                            total += st.st_blocks * 512
            except OSError:  # removed meanwhile, or its mode taken away
                continue
        entries += len(self._written)
        for path, before in list(self._written.items()):  # (a thread may note one meanwhile)
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:  # removed: forgotten
                self._written.pop(path, None)
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += max(0, st.st_blocks * 512 - before)
        try:
            names = os.listdir(_FDS)
        except OSError:
            names = []
        for name in names:
            try:
                st = os.stat(f"{_FDS}/{name}")
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 0 and (st.st_dev, st.st_ino) not in seen \
                        and self._hooked and len(self._written) <= self.max_entries:
                    self._held_open(name, st)  # (counted from the next count on)
                elif stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and (st.st_dev, st.st_ino) not in seen:
                    target = os.readlink(f"{_FDS}/{name}")
                    if not target.startswith(("/memfd:", "/dev/shm/")):  # memory: memory_watch's
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_blocks * 512
            except OSError:
                continue
        return total, entries

    def _held_open(self, fd: str, st: os.stat_result) -> None:
        """A named file outside the directory that the engine holds open for writing and
        that the audit hook did not see opened (C code: ``fopen`` through ctypes, a C++
        writer, a library's log), noted as the hook notes one: what it grows by from now
        on counts. (One written and closed within a call is not seen: round 55.)"""
        target = os.readlink(f"{_FDS}/{fd}")
        if target in self._written or not target.startswith("/") or target.startswith(_NOT_DISK) \
                or target.startswith(self._own) or target.startswith(self._service):
            return  # (the service's own files: its status board, its metrics' files, in its run directory)
        with open(f"/proc/self/fdinfo/{fd}") as info:  # (its flags: octal)
            flags = next((int(line.split()[1], 8) for line in info if line.startswith("flags:")), 0)
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            self._written[target] = st.st_blocks * 512

    def check(self, now: float) -> dict | None:
        """At most every ``every_s`` after a batch ran (``idle_every_s`` else): past the
        bound, what the board and the log say."""
        if self.limit is None or now - self._last < (self.every_s if self._ran else self.idle_every_s):
            return None
        self._last = now
        held, entries = self.held()
        if held > self._held and self._ran:
            # To the batches that took the file system's space, by what each took (other
            # processes write there too: a share, not a measure); failing that, to all run.
            dropped = sum(self._dropped.values())
            for function in self._ran:
                share = self._dropped[function] / dropped if dropped else 1 / len(self._ran)
                self._grown[function] += int((held - self._held) * share)
        if entries > self._entries and self._ran:
            # Files too, each function's by the same share: one that made 20,000 empty
            # files had its engine recycled, never struck (no bytes grown; round 55).
            dropped = sum(self._dropped.values())
            for function in self._ran:
                share = self._dropped[function] / dropped if dropped else 1 / len(self._ran)
                self._made[function] += int((entries - self._entries) * share)
        self._held, self._entries = held, entries
        self._ran = set()
        self._dropped.clear()
        if held <= self.limit and entries <= self.max_entries:
            return None
        return {"held": held, "limit": self.limit, "entries": entries,
                "grown": [[name, grown] for name, grown in self._grown.most_common(3) if grown > 0],
                "made": [[name, made] for name, made in self._made.most_common(3) if made > 0]}


def _free(directory: str | None) -> int | None:
    try:
        fs = os.statvfs(directory)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None
    return fs.f_bavail * fs.f_frsize
