"""One frozen settings class; every field is also ``JACOBIAN_SERVICE_<NAME>``."""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable, Literal, Mapping

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jacobian_client.wire import Limits

from .clients import parse_proxies

__all__ = ["FRONT_END_ONLY", "NULL_ORIGIN_HINT", "Settings", "SettingsError", "describe_invalid", "unknown_variables"]

# The settings only front ends use, as variables: the API keys, the operators' keys and the
# files holding them. ``serve`` hands the keys to its front ends itself and takes these out
# of its environment, which every engine's function can read (supervisor,
# server.forget_environment).
FRONT_END_ONLY = frozenset({"JACOBIAN_SERVICE_API_KEYS", "JACOBIAN_SERVICE_API_KEYS_FILE",
                            "JACOBIAN_SERVICE_ADMIN_KEYS", "JACOBIAN_SERVICE_ADMIN_KEYS_FILE"})


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _load_keys(name: str, listed: str, path: Path | None) -> tuple[str, ...]:
    """Keys from a setting (comma-separated) and its file (one a line; blank lines and #
    comments skipped). Fails closed: a file that cannot be read or holds no key is an
    error, never "auth off"."""
    keys = list(_split(listed))
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:  # fail closed too, saying why
            raise SettingsError(f"{name}_FILE {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        from_file = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise SettingsError(f"{name}_FILE {path} holds no keys; refusing to start without auth")
        keys.extend(from_file)
    return tuple(keys)


# What a browser sends as Origin: scheme://host[:port], nothing after it (RFC 6454).
_ORIGIN = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^/:?#@\[\]\s]+)"
                     r"(?::(?P<port>[0-9]{1,5}))?/?")
_HOST = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# A page opened from a file (file://), a data: URL or a sandboxed frame sends
# "Origin: null": any site can make one, so no list may name it. What to do instead.
NULL_ORIGIN_HINT = ("a page opened from a file (file://), a data: URL or a sandboxed frame sends Origin: null, which "
                    "CORS_ORIGINS cannot name (any site can send it): serve the page over http(s) and name its origin, "
                    "or allow '*'")


def _origin(entry: str) -> str:
    """One CORS_ORIGINS entry as a browser spells the Origin it sends: scheme and host in
    lower case, the scheme's default port and one trailing ``/`` dropped (as copied from
    the address bar). The match against Origin is exact, so anything else (a path, a
    query, a port out of range) could never match: refused, not silently ignored."""
    if entry == "*":
        return entry
    if entry.lower() == "null":  # what the refusal of such a page said it sent
        raise ValueError(f"CORS_ORIGINS entry {entry!r}: {NULL_ORIGIN_HINT}")
    m = _ORIGIN.fullmatch(entry)
    if m is None or not m["host"].isascii() or (m["port"] is not None and not 0 < int(m["port"]) < 65536):
        raise ValueError(
            f"CORS_ORIGINS entry {entry!r} is not an origin: write '*' or scheme://host[:port] as the browser "
            f"sends it in Origin (no path, query or user; an international host in its xn-- form), e.g. "
            f"https://app.example.org or http://localhost:5173"
        )
    scheme, host = m["scheme"].lower(), m["host"].lower()
    if host.startswith("["):  # browsers send an IPv6 host compressed: [::1], not [0:0::1]
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"CORS_ORIGINS entry {entry!r}: {host} is no IPv6 address") from None
    elif not _HOST.fullmatch(host):  # a wildcard (*.example.org), %-escapes: never in an Origin
        raise ValueError(f"CORS_ORIGINS entry {entry!r}: a host is letters, digits, '-' and '.' "
                         "(no wildcards: list each origin, or '*' for any)")
    port = int(m["port"]) if m["port"] is not None else None
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != _DEFAULT_PORTS.get(scheme) else "")


# The stream budget's size at the default MAX_REQUEST_BYTES (2 x 256 MiB): what a lowered
# upload limit leaves it (Settings.stream_budget).
_STREAM_BUDGET_AT_LEAST = 512 << 20


class SettingsError(ValueError):
    """A setting that cannot be served with, found after validation (a keys file)."""


def describe_invalid(exc: ValidationError) -> list[str]:
    """A pydantic error about the environment, in the environment's names: a user who
    set JACOBIAN_SERVICE_MAX_QUEUE=lots read a traceback ending in 'max_queue: Input
    should be a valid integer'. One line per bad variable, with the value given."""
    lines = []
    for error in exc.errors():
        name = f"JACOBIAN_SERVICE_{str(error['loc'][0]).upper()}" if error["loc"] else "settings"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}={error['input']!r}: {message}" if "input" in error else f"{name}: {message}")
    return lines


# JACOBIAN_SERVICE_* names that are not server settings: the client CLI's (`call`), the
# compose files' (host-side), and what the supervisor hands its engines.
_OTHER_VARIABLES = frozenset({"URL", "API_KEY", "FUNCTIONS_DIR", "BIND", "IMAGE", "ISOLATE", "SKIP_WARMUP"})


def unknown_variables(environ: Mapping[str, str], fields: Iterable[str]) -> list[str]:
    """Warnings for JACOBIAN_SERVICE_* variables no setting reads: pydantic ignores them,
    so a typo (MAX_QUEU) went unnoticed, and so did the client's API_KEY set where the
    server's API_KEYS was meant: a server serving without auth."""
    names = {f.upper() for f in fields}
    out = []
    for variable in sorted(environ):
        name = variable.removeprefix("JACOBIAN_SERVICE_")
        if name == variable or name in names or not environ[variable]:
            continue
        if name == "API_KEY" and not environ.get("JACOBIAN_SERVICE_API_KEYS") \
                and not environ.get("JACOBIAN_SERVICE_API_KEYS_FILE"):
            out.append(f"{variable} is the key `jacobian-service call` sends; the server's keys are "
                       f"JACOBIAN_SERVICE_API_KEYS (or _API_KEYS_FILE), and with none set it serves without auth")
        elif name not in _OTHER_VARIABLES:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
            out.append(f"{variable} is no setting of the server, which ignores it"
                       + (f"; did you mean JACOBIAN_SERVICE_{close[0]}?" if close else ""))
    return out


class Settings(BaseSettings):
    # An empty variable counts as unset (the default applies): compose files pass every
    # setting through as ${JACOBIAN_SERVICE_X:-}.
    model_config = SettingsConfigDict(env_prefix="JACOBIAN_SERVICE_", frozen=True, extra="ignore",
                                      env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Comma-separated import paths; empty serves the built-in examples.
    functions: str = ""
    device: str = "auto"

    # Processes: HTTP front ends in front of one engine process per device. Unset:
    # the core count, at most 4 (each front end is one core's worth of HTTP work; the
    # engines need cores too). `serve --in-process` runs one process with an engine thread.
    workers: int | None = Field(None, ge=1, le=64)
    # Supervision: a job running past its deadline plus hang_grace_s, or an idle engine
    # silent for engine_heartbeat_s, gets its engine killed and restarted. A function
    # that takes its engine down quarantine_after times within quarantine_window_s is
    # refused for quarantine_cooldown_s (or until released).
    hang_grace_s: float = Field(5.0, ge=0)
    engine_heartbeat_s: float = Field(10.0, gt=0)
    quarantine_after: int = Field(3, ge=1)
    quarantine_window_s: float = Field(600.0, gt=0)
    quarantine_cooldown_s: float = Field(600.0, ge=0)
    # A spare engine process per device, started once its engine is up: loaded and warmed
    # up, it takes over when the engine dies, so a restart costs ~0.1 s instead of a
    # torch import and a warm-up (seconds; more on a busy host). Costs one more engine's
    # memory (on a GPU, one more CUDA context); false turns it off.
    engine_standby: bool = True
    # Each engine process is kept from acting on the server's other processes (signals,
    # nice, affinity, limits, traces: ``confinement``): a function that signalled its
    # parent took the whole service down. false: not confined (a kernel that refuses a
    # confinement leaves the engine unconfined all the same, and the engine logs it).
    engine_confine: bool = True
    # Engines and spares are forked from a zygote that imported torch once per serve
    # (``fork_server``): a start costs ~0.3 s of CPU instead of ~3 s of imports. Where it
    # cannot serve (down, starting, refused) engines are exec'd as before; false: always.
    engine_fork_server: bool = True
    # An address-space cap per engine process (bytes); unset: none.
    engine_memory_limit_bytes: int | None = Field(None, ge=1 << 26)
    # An engine whose resident memory, checked once a second, is over this (bytes) is
    # recycled: its queue drains (2 s at most), it exits, the spare takes over. For
    # functions that leak a little at each call. Unset: never.
    engine_max_rss_bytes: int | None = Field(None, ge=1 << 26)
    # An engine whose temporary files (in its own TMPDIR, and unnamed ones it holds open:
    # ``engine.disk_watch``) take more disk than this (bytes) is recycled the same way, and
    # its directory removed. Unset: a quarter of the space free there as it starts, at most 4 GiB.
    engine_max_tmp_bytes: int | None = Field(None, ge=1 << 20)
    # The same for the tensors an engine holds on its GPU between requests (what torch's
    # allocator has handed out, read after each batch): a function that keeps device
    # tensors in a global would leave every later request out of memory. Unset: 90 % of
    # the GPU's memory, acted on once a request has run out of memory (a model loaded on
    # a first call is not a leak); 0: never. Not used on the CPU.
    engine_max_device_bytes: int | None = Field(None, ge=0)
    # What each engine process writes to its standard output and error (a function's
    # prints, the engine's own log lines) goes to serve's, line by line, at most this many
    # bytes a second per engine, its spare and successors sharing the budget (16 seconds'
    # worth at once): the lines over it are dropped, counted and said in serve's log
    # (``output_relay``). A function's 1 GB write landed whole in serve's log.
    engine_output_bytes_per_s: int = Field(64 << 10, ge=1 << 10)
    # Shared memory each engine gives each front end for results, and each front end
    # each engine for inputs (arrays of 16 KiB and more): the reader takes them where the
    # writer put them, not through the socket. Pages are taken as blocks are first used;
    # a full segment sends on the socket. 0: this process offers none (engines and front
    # ends read the same setting, so 0 turns both ways off).
    shared_memory_bytes: int = Field(64 << 20, ge=0)
    # Serving under a path prefix behind a proxy (ASGI root_path).
    root_path: str = ""

    # Scheduler
    max_batch_size: int = Field(32, ge=1)
    max_batch_wait_ms: float = Field(0.0, ge=0)
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    # CPU threads for torch. Unset: half the cores (at least 1), leaving the rest to the
    # event loop and encoding; torch's own default (every core) made a small mlp Jacobian
    # 1.4-8x slower on a 2-core machine (bench/latency.py). 0 keeps torch's default.
    torch_threads: int | None = Field(None, ge=0)

    # Limits
    max_request_bytes: int = Field(256 << 20, ge=1)
    max_result_bytes: int = Field(512 << 20, ge=1)
    max_array_elements: int = Field(1 << 28, ge=1)
    max_array_rank: int = Field(16, ge=1, le=32)
    max_npz_members: int = Field(64, ge=1)
    max_json_depth: int = Field(64, ge=2)
    # Working set a Jacobian chunk may use; unset: 256 MiB on the CPU, half the free
    # memory on a GPU (measured at start).
    memory_budget_bytes: int | None = Field(None, ge=1)
    # .npy results above this size are streamed chunk by chunk instead of gathered.
    stream_threshold_bytes: int = Field(8 << 20, ge=0)
    # Sparsity patterns and colourings are cached in each engine's memory always (at most
    # 256 of them, holding at most twice MEMORY_BUDGET_BYTES, the oldest going first); with a
    # directory, also on disk, so a restarted server skips detection and colouring. Unset:
    # no disk cache. The entries outlive the run, so where they go (a volume that
    # persists) is the operator's choice; a default under the run directory would be
    # deleted with it and so buy nothing.
    sparsity_cache_dir: Path | None = None
    # ... holding at most about this many bytes there, the least recently used entries
    # going first (each engine counts the directory again whenever what it wrote since
    # would take it past the bound). Clients choose the shapes, each a new entry: without
    # a bound one API key filled the disk at 40 MB/s.
    sparsity_cache_max_bytes: int = Field(1 << 30, ge=1)

    # Connections (connections.py). Request bodies being received and parsed at once, per
    # front-end process (the server holds at most workers x this): a body is charged as
    # its bytes arrive, before they are buffered (a Content-Length that does not fit is
    # refused first, but holds nothing), a JSON body its parse cost, an .npz what it
    # expands to. Unset: twice max_request_bytes, at least 64 MiB.
    body_budget_bytes: int | None = Field(None, ge=1)
    # A connection's request headers must be in within header_timeout_s; each piece of a
    # body within read_idle_timeout_s and the whole body within read_timeout_s (408 and
    # the connection closed); each piece of a response must leave within send_timeout_s
    # (a client that stops reading has its connection aborted).
    header_timeout_s: float = Field(10.0, gt=0)
    read_idle_timeout_s: float = Field(30.0, gt=0)
    read_timeout_s: float = Field(300.0, gt=0)
    send_timeout_s: float = Field(30.0, gt=0)
    # ... and a client must take a response at this average rate (bytes a second) while
    # the server waits on it: the time its response's pieces wait for it to read may
    # reach send_timeout_s plus a second per this many bytes it has read, then the
    # connection is aborted (SendGuard). A client reading a streamed Jacobian just fast
    # enough for each piece to leave within send_timeout_s held its stream (the engine's
    # forward pass, a place in its queue, the front end's stream budget) for as long as it
    # liked. The default is the rate a 1 MiB piece in 30 s already asked; 0: no minimum.
    min_send_rate_bytes_per_s: int = Field(32 << 10, ge=0)
    # Streamed results are held at their client's pace (each an engine's queue place, its
    # forward pass, room on the stream budget): one client that opened MAX_QUEUE streams
    # and read none had every other client's every request refused (429). A client
    # (clients.py: its API key, else its address, or the one a trusted proxy forwarded
    # for) holds at most this many streams per front end, and half the stream budget.
    # Unset: MAX_QUEUE / (2 x front ends), at least 1 (a client's streams, over every
    # front end, hold at most half an engine's queue); 0: no share per client.
    max_streams_per_client: int | None = Field(None, ge=0)
    # Proxies (comma-separated addresses or networks) whose X-Forwarded-For names the
    # client: its last entry, the address the proxy appended.
    trusted_proxies: str = ""

    # Security and operations
    api_keys: str = ""
    # One key a line (blank lines and # comments skipped); adds to api_keys.
    api_keys_file: Path | None = None
    # Operators' keys: only these may take an operator's action (DELETE .../quarantine,
    # which lets a function that crashed or hung its engine run, and kill it, again); they
    # are API keys too. With API keys and none of these, no key may: any caller let in
    # with an API key released a quarantine and had the engine killed again, each time
    # costing every other client's request in flight there a retry (the cooldown still
    # lifts it). Without either, auth is off, that action included.
    admin_keys: str = ""
    admin_keys_file: Path | None = None
    # /metrics names every function and its traffic (calls, errors, timings, who is
    # quarantined): with API keys set it wants a key too, unless the operator opens it
    # (false: e.g. on a network only the scraper reaches). Without keys everything is open.
    metrics_auth: bool = True
    # /openapi.json lists every function: behind the key by default. The /docs and /redoc
    # pages load openly and ask for the key (docs_ui.py).
    docs_auth: bool = True
    # Web pages of these origins (comma-separated, e.g. https://app.example.org; "*" for
    # any) may call the API from a browser (CORS). Empty: only pages served from this
    # server's own origin, as browsers default to. Each entry is normalized as browsers
    # spell Origin (_origin); one that is no origin stops start-up.
    cors_origins: str = ""
    log_format: Literal["json", "text"] = "text"
    warmup: bool = True
    # An engine (or spare) whose warm-up of one function runs this long is killed, and the
    # engines after it skip that warm-up (an engine is not ready until every function's is
    # over): a function that never returns must not keep the server down.
    warmup_timeout_s: float = Field(120.0, gt=0)
    # On SIGTERM: /readyz answers 503 at once; after drain_delay_s the server stops
    # accepting connections and gives in-flight requests drain_grace_s to finish.
    drain_delay_s: float = Field(0.0, ge=0)
    drain_grace_s: float = Field(30.0, ge=0)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isascii() and value[5:].isdigit()):
            return value
        raise ValueError("device must be auto, cpu, cuda or cuda:N")

    @field_validator("root_path")
    @classmethod
    def _root_path(cls, value: str) -> str:
        # The prefix is written before every path (the OpenAPI document's servers, the
        # docs pages' own calls, a 404's hint): /jacobian/ was written /jacobian//v1/...,
        # which a proxy that does not merge slashes passed on as //v1/..., a 404 (the
        # vjp body /docs writes asked /evaluate there: Try it out of vjp was a 422).
        value = value.strip().rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError("root_path is a path prefix starting with '/', such as /jacobian")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        parse_proxies(value)  # (a ValueError names the entry that is no address or network)
        return value

    @field_validator("cors_origins")
    @classmethod
    def _cors_origins(cls, value: str) -> str:
        return ",".join(_origin(entry) for entry in _split(value))

    @property
    def function_modules(self) -> tuple[str, ...]:
        return _split(self.functions)

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return _split(self.cors_origins)

    def load_api_keys(self) -> tuple[str, ...]:
        """The keys in force. Fails closed: a keys file that exists but holds no key is
        an error, never "auth off"."""
        return _load_keys("API_KEYS", self.api_keys, self.api_keys_file)

    def load_admin_keys(self) -> tuple[str, ...]:
        """The operators' keys in force (ADMIN_KEYS, ADMIN_KEYS_FILE), failing closed as
        ``load_api_keys``."""
        return _load_keys("ADMIN_KEYS", self.admin_keys, self.admin_keys_file)

    @property
    def body_budget(self) -> int:
        return self.body_budget_bytes or max(2 * self.max_request_bytes, 64 << 20)

    @property
    def stream_budget(self) -> int:
        """Bytes of large answers being sent that a front end holds at once (StreamBudget):
        BODY_BUDGET_BYTES where set; unset, the body budget's size, at least what it is
        by default (512 MiB). It followed the body budget alone, a size drawn from
        MAX_REQUEST_BYTES, a limit on uploads: an operator who took uploads of 1 MiB at
        most had it fall from 512 MiB to 64 MiB (a client's share to 32 MiB), and a
        page's fourth 9 MB stream at once was a 429. (Not drawn from MAX_RESULT_BYTES
        either: streamed .npy has no result limit, and raising that limit should not
        let slow readers hold more of a front end.)"""
        return self.body_budget_bytes or max(self.body_budget, _STREAM_BUDGET_AT_LEAST)

    def streams_per_client(self, front_ends: int) -> int:
        if self.max_streams_per_client is not None:
            return self.max_streams_per_client
        return max(1, self.max_queue // (2 * front_ends))

    @property
    def front_end_count(self) -> int:
        return self.workers or max(1, min(4, os.cpu_count() or 1))

    @property
    def wire_limits(self) -> Limits:
        # an .npz expands to no more than a body may hold
        return _limits(self.max_array_elements, self.max_array_rank, self.max_npz_members, self.max_request_bytes,
                       self.max_json_depth)


@functools.lru_cache(maxsize=64)
def _limits(max_elements: int, max_rank: int, max_members: int, max_bytes: int, max_json_depth: int) -> Limits:
    """``Settings.wire_limits``, read at every request: a frozen dataclass made anew
    (five ``object.__setattr__``, ~3 us) for the same few values. A pure function of
    them, so what it keeps is never out of date (a copy of the settings with other
    limits, ``model_copy(update=...)``, asks with its own)."""
    return Limits(max_elements=max_elements, max_rank=max_rank, max_members=max_members, max_bytes=max_bytes,
                  max_json_depth=max_json_depth)
