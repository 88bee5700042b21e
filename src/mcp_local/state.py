"""What the server holds for its lifetime: settings, the job runner, the model session, subscribers."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus

from trainer import JobRunner
from trainer.engine.inference import ModelSession
from trainer.settings import default_home

SAMPLE_INTERVAL_ENV = "MCP_LOCAL_SAMPLE_INTERVAL"
MAX_CONCURRENT_ENV = "MCP_LOCAL_MAX_CONCURRENT"
MEMORY_BUDGET_ENV = "MCP_LOCAL_MEMORY_BUDGET_GB"


@dataclass(frozen=True)
class ServerSettings:
    home: Path
    sample_interval: float = 0.5
    max_concurrent: int = 1
    worker_env: dict[str, str] = field(default_factory=dict)
    #: None: the smaller of 16 GB and 75% of physical memory
    memory_budget_gb: float | None = None

    @classmethod
    def from_env(cls) -> ServerSettings:
        return cls(
            home=default_home(),
            sample_interval=float(os.environ.get(SAMPLE_INTERVAL_ENV, "0.5")),
            max_concurrent=int(os.environ.get(MAX_CONCURRENT_ENV, "1")),
            memory_budget_gb=float(os.environ[MEMORY_BUDGET_ENV]) if os.environ.get(MEMORY_BUDGET_ENV) else None,
        )


@dataclass
class AppState:
    settings: ServerSettings
    runner: JobRunner
    models: ModelSession
    bus: InMemorySubscriptionBus
    #: 2025-era `resources/subscribe`: uri -> {connection: session}
    legacy_subscriptions: dict[str, dict[object, ServerSession]] = field(default_factory=lambda: defaultdict(dict))
    #: every 2025-era connection seen, for list_changed
    legacy_sessions: dict[object, ServerSession] = field(default_factory=dict)
