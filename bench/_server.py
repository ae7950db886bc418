"""Servers for the benchmarks: the real service and a bare Starlette "HTTP floor", each in
its own subprocess on a loopback port, started once per run and shared by the benchmarks.

* :meth:`Pool.service` starts ``jacobian-service serve`` (the CLI, so the same uvicorn
  settings as production) with ``JACOBIAN_SERVICE_*`` overrides; the bench function
  module (:mod:`bench.functions`) is loaded beside the built-in examples.
* :meth:`Pool.floor` starts :mod:`bench._floor`: a Starlette app under the same
  ``uvicorn.run`` call as the CLI that answers ``POST /v1/functions/{name}/jacobian``
  with precomputed bytes (JSON or ``.npy`` by ``Accept``) without parsing anything.

A server's output goes to a log file (never a pipe that could fill up); the tail is shown
when a server fails to come up, and :meth:`Server.tracebacks` counts tracebacks in it.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import httpx
import numpy as np

from jacobian_service.procfs import cpu_seconds, descendants

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
FUNCTION_MODULES = "jacobian_service.examples,bench.functions"


_HTTP: httpx.Client | None = None


def loopback_client() -> httpx.Client:
    """One client for the run's small requests to its servers (readiness, ``/metrics``):
    each ``httpx.get`` builds a client, and each client an SSL context from certifi's CA
    bundle, ~55 ms of CPU for a loopback request that needs none. Waiting 40 s for two
    servers at 20 polls a second, the bench process spent ~6 CPU-s so, on the 2 cores the
    servers were starting on. (httpx.Client is safe to share between threads.)"""
    global _HTTP
    if _HTTP is None:
        _HTTP = httpx.Client(timeout=10)
    return _HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as fp:
        for line in fp:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (the service's supervisor, front ends and engines)."""
    return [pid, *descendants(pid)]


def process_label(pid: int) -> str:
    """A short name for one of the service's processes, from its command line."""
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv).decode(errors="replace")
    if "engine.process" in text:
        return "spare engine" if "--standby" in text else "engine"
    if "resource_tracker" in text:
        return "resource tracker"
    if "spawn_main" in text:
        return "front end"
    return "supervisor" if "serve" in text else text[:30]


def _cpu_seconds(pid: int) -> float:
    return cpu_seconds(pid) or 0.0


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("jacobian-service")
    if script.exists():
        return [str(script)]
    found = shutil.which("jacobian-service")
    return [found] if found else [sys.executable, "-m", "jacobian_service.cli"]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server so far: every process of its tree (the
        supervisor, front ends and engines of ``serve``), all their threads."""
        return sum(_cpu_seconds(p) for p in tree_pids(self.pid))

    def pids(self) -> list[int]:
        return tree_pids(self.pid)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far, summed by role (``front end``, ``engine``, ...). The
        in-process layout's one process is ``supervisor`` here: it does everything."""
        roles: dict[str, float] = {}
        for p in tree_pids(self.pid):
            label = process_label(p)
            roles[label] = roles.get(label, 0.0) + _cpu_seconds(p)
        return roles

    def rss_bytes(self) -> int:
        return status_kib(self.pid, "VmRSS") * 1024

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def tracebacks(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("Traceback (most recent call last)")
        except OSError:
            return 0

    def traceback_summaries(self, skip: int = 0) -> list[str]:
        """The line before each traceback and its final (exception) line."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        starts = [i for i, l in enumerate(lines) if l.startswith("Traceback (most recent call last)")][skip:]
        for i in starts:
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("Traceback")
                                      or not lines[j].strip() or lines[j].startswith("During handling")
                                      or lines[j].startswith("The above exception")):
                j += 1
            out.append(f"{lines[i - 1][:160] if i else ''} ... {lines[j][:200] if j < len(lines) else ''}")
        return out

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{'name{labels}': value}`` (service only)."""
        text = loopback_client().get(self.url + "/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if loopback_client().get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Pool:
    """Servers started on demand, keyed by configuration, stopped together at the end.

    ``start_many`` launches several at once and then waits for all (start-up is mostly
    importing torch and warming functions up, so overlapping them saves seconds).
    """

    def __init__(self) -> None:
        self._servers: dict[Any, Server] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="jacobian-bench-"))

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()
        self._servers.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    # ------------------------------------------------------------------ service

    @staticmethod
    def _service_key(env: Mapping[str, str], tag: str, args: tuple[str, ...]) -> Any:
        return ("service", tag, tuple(sorted(env.items())), args)

    def _launch_service(self, env: Mapping[str, str], tag: str, args: tuple[str, ...] = ()) -> Server:
        key = self._service_key(env, tag, args)
        if key in self._servers:
            return self._servers[key]
        port = free_port()
        full = {
            "JACOBIAN_SERVICE_DEVICE": "cpu",
            "JACOBIAN_SERVICE_FUNCTIONS": FUNCTION_MODULES,
            "JACOBIAN_SERVICE_LOG_FORMAT": "text",
            **env,
        }
        log_path = self._dir / f"service-{len(self._servers)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*_cli(), "serve", "--host", LOOPBACK, "--port", str(port), *args],
                env=_env(full), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        server = Server(f"service {tag or dict(env)}", proc, port, log_path, "/readyz", dict(env))
        self._servers[key] = server
        return server

    def service(self, env: Mapping[str, str] | None = None, tag: str = "", args: tuple[str, ...] = ()) -> Server:
        """A ready service with these ``JACOBIAN_SERVICE_*`` overrides and ``serve`` arguments
        (``("--in-process",)``, ``("--workers", "2")``)."""
        server = self._launch_service(dict(env or {}), tag, tuple(args))
        server.wait_ready()
        return server

    # ------------------------------------------------------------------ floor

    def floor(self, payloads: Mapping[str, Mapping[str, bytes]]) -> Server:
        """The bare Starlette endpoint; ``payloads[function][media_type]`` are its answers.

        One floor process serves every payload registered so far; asking with new
        payloads restarts it with the union."""
        current = self._servers.get("floor")
        known: dict[str, dict[str, bytes]] = getattr(self, "_payloads", {})
        merged = {k: dict(v) for k, v in known.items()}
        for name, by_media in payloads.items():
            merged.setdefault(name, {}).update(by_media)
        if current is not None and merged == known:
            current.wait_ready()
            return current
        if current is not None:
            current.stop()
        self._payloads = merged
        directory = self._dir / "floor"
        directory.mkdir(exist_ok=True)
        for name, by_media in merged.items():
            for media, body in by_media.items():
                (directory / f"{name}.{'npy' if media.endswith('npy') else 'json'}").write_bytes(body)
        port = free_port()
        log_path = self._dir / "floor.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench._floor", "--host", LOOPBACK, "--port", str(port), "--dir", str(directory)],
                env=_env({}), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        server = Server("http floor", proc, port, log_path, "/readyz")
        self._servers["floor"] = server
        server.wait_ready()
        return server

    def prestart(self, configs: list[tuple[Any, ...]]) -> None:
        """Launch several service configurations at once (waited for on first use):
        ``(env, tag)`` or ``(env, tag, args)``."""
        for env, tag, *args in configs:
            self._launch_service(dict(env), tag, tuple(args[0]) if args else ())


# ---------------------------------------------------------------------- payloads


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def json_jacobian_bytes(function: str, jac: np.ndarray) -> bytes:
    """What the service answers in JSON for a single-array Jacobian (same size and shape)."""
    from jacobian_client import wire

    meta = {"device": "cpu", "chunk_size": int(jac.shape[0]), "batch_size": 1, "mode": "rev",
            "queue_ms": 0.123, "compute_ms": 0.456}
    return wire.dumps({"function": function, "jacobian": wire.encode_tree(jac), "meta": meta})


def json_request(*inputs: np.ndarray, **options: Any) -> bytes:
    from jacobian_client import wire

    return wire.dumps({"inputs": [wire.encode_tree(np.asarray(x)) for x in inputs], **options})


JSON_HEADERS = {"content-type": "application/json", "accept": "application/json"}
NPY_HEADERS = {"content-type": "application/x-npy", "accept": "application/x-npy"}
