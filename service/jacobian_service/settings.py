"""One frozen settings class; every field is also ``JACOBIAN_SERVICE_<NAME>``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jacobian_client.wire import Limits

__all__ = ["Settings"]


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


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

    # Security and operations
    api_keys: str = ""
    # One key a line (blank lines and # comments skipped); adds to api_keys.
    api_keys_file: Path | None = None
    metrics_auth: bool = False
    log_format: Literal["json", "text"] = "text"
    warmup: bool = True
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

    @property
    def function_modules(self) -> tuple[str, ...]:
        return _split(self.functions)

    def load_api_keys(self) -> tuple[str, ...]:
        keys = list(_split(self.api_keys))
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return tuple(keys)

    @property
    def wire_limits(self) -> Limits:
        return Limits(
            max_elements=self.max_array_elements,
            max_rank=self.max_array_rank,
            max_members=self.max_npz_members,
            max_bytes=self.max_request_bytes,  # an .npz expands to no more than a body may hold
            max_json_depth=self.max_json_depth,
        )
