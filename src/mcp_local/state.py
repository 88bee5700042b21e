"""What the server holds for its lifetime: settings, the job runner, the model session, subscribers."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus

from trainer import DEFAULT_SAMPLE_INTERVAL_S, JobRunner, ModelSession, RunDefaults, StoreUnavailable, default_home

SAMPLE_INTERVAL_ENV = "MCP_LOCAL_SAMPLE_INTERVAL"
MAX_CONCURRENT_ENV = "MCP_LOCAL_MAX_CONCURRENT"
TOKEN_ENV = "MCP_LOCAL_TOKEN"  # the bearer token of --http
MEMORY_BUDGET_ENV = "MCP_LOCAL_MEMORY_BUDGET_GB"


@dataclass(frozen=True)
class ServerSettings:
    home: Path
    sample_interval: float = DEFAULT_SAMPLE_INTERVAL_S
    max_concurrent: int = 1
    worker_env: dict[str, str] = field(default_factory=dict)
    #: None: the trainer's default (the smaller of 16 GB and 75% of physical memory)
    memory_budget_gb: float | None = None
    #: folders that model, data, adapter and adapter_dir paths must resolve into (the home is always one);
    #: None allows any path (programmatic use; the `mcp-local` command allows the home and its --root folders only)
    roots: tuple[Path, ...] | None = None
    max_queued: int = RunDefaults.model_fields["max_queued"].default  # the trainer's defaults, in one place
    max_dataset_mb: float = RunDefaults.model_fields["max_dataset_mb"].default

    @classmethod
    def from_env(cls) -> ServerSettings:
        budget = os.environ.get(MEMORY_BUDGET_ENV)
        return cls(
            home=default_home().resolve(),
            sample_interval=float(os.environ.get(SAMPLE_INTERVAL_ENV) or DEFAULT_SAMPLE_INTERVAL_S),
            max_concurrent=int(os.environ.get(MAX_CONCURRENT_ENV) or 1),
            memory_budget_gb=float(budget) if budget else None,
        )

    def models_root(self) -> Path:
        """Where GGUF imports go: the run defaults' models folder, under the home."""
        return self.run_defaults().models()

    def allowed_roots(self) -> tuple[Path, ...] | None:
        return None if self.roots is None else (self.home, *self.roots)

    def run_defaults(self) -> RunDefaults:
        return RunDefaults.for_home(
            self.home,
            memory_budget_gb=self.memory_budget_gb,
            sample_interval_s=self.sample_interval,
            roots=self.allowed_roots(),
            max_queued=self.max_queued,
            max_dataset_mb=self.max_dataset_mb,
        )


@dataclass
class AppState:
    settings: ServerSettings
    models: ModelSession
    bus: InMemorySubscriptionBus
    #: None when the home cannot hold runs (read-only, full): then `home_error` says why, and every run tool says it
    job_runner: JobRunner | None = None
    home_error: str = ""
    #: 2025-era `resources/subscribe`: uri -> {connection: session}
    legacy_subscriptions: dict[str, dict[object, ServerSession]] = field(default_factory=lambda: defaultdict(dict))
    #: every 2025-era connection seen, for list_changed
    legacy_sessions: dict[object, ServerSession] = field(default_factory=dict)

    @property
    def runner(self) -> JobRunner:
        """The job runner; StoreUnavailable saying why where the home cannot hold runs."""
        if self.job_runner is None:
            raise StoreUnavailable(self.home_error)
        return self.job_runner
