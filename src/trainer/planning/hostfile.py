"""The hosts of a run over several machines, from a hostfile as `mlx.launch --hostfile` reads it: a JSON list of
hosts, or an object with a "hosts" list, each host with its SSH name and the IPs the other ranks reach it by. One
rank per host, in order; rank 0 runs where the server runs, so the first host must be this machine."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..errors import ConfigError


class Host(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    ssh: str = Field(
        min_length=1, pattern=r"^[^-\s][^\s]*$", description="What `ssh` is given to reach the host (not an option)."
    )
    ips: list[str] = Field(default_factory=list, description="Addresses the other ranks reach it by.")


_HOSTS = TypeAdapter(list[Host])


def read_hostfile(path: str, backend: str) -> list[Host]:
    """The hosts, checked for what `backend` needs; ConfigError naming the file and the fix otherwise."""
    where = Path(path).expanduser()
    example = '[{"ssh": "mac-1", "ips": ["10.0.0.1"]}, {"ssh": "mac-2", "ips": ["10.0.0.2"]}]'
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
        listed = data["hosts"] if isinstance(data, dict) else data
        hosts = _HOSTS.validate_python(listed)
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        # the reason by kind and place only: the file's contents never reach the caller
        raise ConfigError(
            f"hosts {path!r} is not a readable hostfile ({_why(exc)}); write one like {example}"
        ) from None
    if len(hosts) < 2:
        raise ConfigError(f"hosts {path!r} lists {len(hosts)} host(s); a run over several machines needs 2 or more")
    if backend == "ring" and any(not h.ips for h in hosts):
        missing = next(h.ssh for h in hosts if not h.ips)
        raise ConfigError(f"hosts {path!r}: host {missing!r} has no ips; the ring backend connects to IPs: {example}")
    if backend == "nccl" and not hosts[0].ips:
        raise ConfigError(f"hosts {path!r}: the first host needs an IP the others reach it by (NCCL meets there)")
    return hosts


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"entry {'.'.join(str(p) for p in e['loc'])}: {e['type']}" for e in exc.errors())[:300]
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"not a list of hosts ({type(exc).__name__})"
