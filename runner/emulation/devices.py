"""Device descriptions: what ARMSC needs to know about each client and the server.

A device is one small record (FedScale's idea): memory budget, compute speed, link
bandwidth and latency. The trainer accepts a list of them now (``--devices FILE``, YAML or
JSON); the profiles issue produces them from a profile and NVML / cgroup readings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from runner.errors import ConfigError

GB = 10**9


@dataclass(frozen=True)
class DeviceSpec:
    """One device: memory budget (bytes), compute (FLOP/s), bandwidth (bytes/s), latency (s)."""

    name: str
    memory_bytes: int
    flops: float
    bandwidth: float = 12.5e6  # 100 Mbit/s
    latency: float = 0.02

    def __post_init__(self) -> None:
        for field_name in ("memory_bytes", "flops", "bandwidth"):
            if getattr(self, field_name) <= 0:
                raise ConfigError(f"device {self.name}: {field_name} must be > 0")
        if self.latency < 0:
            raise ConfigError(f"device {self.name}: latency must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSpec:
        try:
            return cls(name=str(d["name"]), memory_bytes=int(float(d["memory_bytes"])),
                       flops=float(d["flops"]), bandwidth=float(d.get("bandwidth", 12.5e6)),
                       latency=float(d.get("latency", 0.02)))
        except KeyError as exc:
            raise ConfigError(f"device description lacks field {exc.args[0]!r}: {d}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"device description has a bad value: {d} ({exc})") from exc


def load_devices(path: Path) -> tuple[list[DeviceSpec], DeviceSpec | None]:
    """Read ``{"clients": [...], "server": {...}}`` (or a bare list of clients)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read device file {path}: {exc.strerror}") from exc
    try:
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from exc
    clients_raw = raw.get("clients") if isinstance(raw, dict) else raw
    if not isinstance(clients_raw, list) or not clients_raw:
        raise ConfigError(f"{path}: expected a list of client devices under 'clients'")
    server_raw = raw.get("server") if isinstance(raw, dict) else None
    clients = [DeviceSpec.from_dict(d) for d in clients_raw]
    server = DeviceSpec.from_dict(server_raw) if server_raw else None
    return clients, server


def load_availability(path: Path) -> list[dict[str, Any] | None]:
    """Each client's optional ``availability`` entry of a device file: ``{"trace": [[start_s,
    end_s], ...]}`` (online windows in virtual time) or ``{"dropout": p}`` (per round), or
    None (always online). Kept apart from :class:`DeviceSpec`, which ARMSC consumes."""
    try:
        text = Path(path).read_text()
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read device file {path}: {exc}") from exc
    clients_raw = raw.get("clients") if isinstance(raw, dict) else raw
    out: list[dict[str, Any] | None] = []
    for d in clients_raw or []:
        a = d.get("availability") if isinstance(d, dict) else None
        if a is not None and not isinstance(a, dict):
            raise ConfigError(f"{path}: availability of {d.get('name')} must be a mapping")
        out.append(a or None)
    return out


def paper_spread(n: int, lo_gb: float = 5.0, hi_gb: float = 20.0) -> list[float]:
    """Budgets evenly spread over the paper's 5-20 GB range (in GB)."""
    if n == 1:
        return [hi_gb]
    return [lo_gb + (hi_gb - lo_gb) * i / (n - 1) for i in range(n)]
