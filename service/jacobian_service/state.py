"""What the app's lifespan owns, reached from a request as ``scope["service"]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .clients import parse_proxies
from .connections import BodyBudget
from .metrics import Metrics
from .registry import Registry
from .responses import EncodeBudget, StreamBudget
from .settings import Settings
from .types import gathered_at_most

__all__ = ["ServiceState"]


@dataclass
class ServiceState:
    settings: Settings
    engines: Any  # InProcessEngines | RemoteEngines: the same calls
    metrics: Metrics
    encode_budget: EncodeBudget
    body_budget: BodyBudget
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()  # operators' (ADMIN_KEYS): the routes marked auth="admin"
    front_ends: int = 1
    draining: bool = False
    streams: StreamBudget | None = None  # None: Settings.stream_budget's size (see __post_init__)
    proxies: tuple[Any, ...] = ()  # TRUSTED_PROXIES, parsed (see __post_init__)

    def __post_init__(self) -> None:
        if self.streams is None:
            s = self.settings
            self.streams = StreamBudget(s.stream_budget,
                                        gathered_at_most(s.stream_threshold_bytes, s.max_result_bytes),
                                        per_client=s.streams_per_client(self.front_ends), gauge=self.metrics.stream_bytes)
        self.proxies = parse_proxies(self.settings.trusted_proxies)  # (clients.client_of)

    @property
    def registry(self) -> Registry:
        return self.engines.registry
