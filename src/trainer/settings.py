"""The trainer's defaults, each in one place: where runs live, a run's memory budget, how often memory is sampled."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

HOME_ENV = "MCP_LOCAL_HOME"
#: seconds between memory samples of a worker, unless a run or the server says otherwise
DEFAULT_SAMPLE_INTERVAL_S = 0.5
#: a run's default budget is the smaller of this and BUDGET_RAM_SHARE of physical memory
BUDGET_CAP_GB = 16.0
BUDGET_RAM_SHARE = 0.75


def default_home() -> Path:
    """`$MCP_LOCAL_HOME`, else ~/.mcp-local."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".mcp-local").expanduser()


def default_budget_gb() -> float:
    """The smaller of 16 GB and 75% of physical memory."""
    return round(min(BUDGET_CAP_GB, BUDGET_RAM_SHARE * float(psutil.virtual_memory().total) / 1e9), 2)
