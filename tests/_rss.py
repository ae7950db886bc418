"""Memory of a live server's processes, from /proc (Linux): which process is the front
end, and how far its resident set rose at its peak during an action."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

__all__ = ["front_end_pid", "peak_growth", "status_bytes"]


def status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def front_end_pid(server_pid: int) -> int:
    """The one front-end process of ``serve`` (WORKERS=1): a spawned child, not the
    engine process nor multiprocessing's resource tracker."""
    for child in _children(server_pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            return child
    raise LookupError(f"no front-end process under {server_pid}")


def peak_growth(pid: int, action: Callable[[], Any]) -> tuple[int, Any]:
    """(peak RSS during ``action`` minus RSS before it, in bytes; what ``action`` returned).
    The kernel's high-water mark is reset first (``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = status_bytes(pid, "VmRSS")
    out = action()
    return status_bytes(pid, "VmHWM") - before, out
