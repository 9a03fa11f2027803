"""Virtual time for in-process runs: the trainer's steps on the emulated devices' clock.

Why: on one host every client computes at the host's speed, so wall time says nothing about
how long the step would take on the fleet a profile describes. :class:`StepClock` feeds each
step's real work (tokens through each client's blocks, bytes each way) into
:class:`runner.emulation.clock.VirtualClock` (FedScale-style: compute = FLOPs / FLOP/s,
communication = bytes / bandwidth + latency, the server after the slowest upload), so every metric
record also carries ``virtual_time``, and the devices' availability (online windows in virtual time,
or a per-round dropout probability) decides who takes part in a step.

Costs (design choice): a client segment of ``k`` blocks costs ``tokens * k * F_block``
FLOPs forward + backward (``F_block`` = ``ModelCosts.flops_per_token_block``, the linear
layers), a full-model client (fedlora, cenlora) adds the head; the server runs the other
``L - k`` blocks for every client plus the LM head at the target positions
(``6 * hidden * vocab`` FLOPs per target token). An aggregation moves each participant's
adapter bytes up and the global ones down over its own link.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.emulation.clock import Availability, StepTiming, VirtualClock
from runner.emulation.devices import GB, DeviceSpec, load_availability, load_devices
from runner.errors import ConfigError
from runner.methods.memory import ModelCosts

# The server when a device file describes none: a datacentre GPU.
DEFAULT_SERVER = DeviceSpec("server", 80 * GB, flops=100e12, bandwidth=1.25e9, latency=0.001)


def clock_devices(path: str | Path, n: int
                  ) -> tuple[list[DeviceSpec], DeviceSpec, list[dict[str, Any] | None]]:
    """The first ``n`` clients of a device file, its server (or :data:`DEFAULT_SERVER`) and
    the clients' availability entries: what a :class:`StepClock` needs."""
    devices, server = load_devices(Path(path))
    if len(devices) < n:
        raise ConfigError(f"{path} describes {len(devices)} clients; the run has {n}")
    return devices[:n], server or DEFAULT_SERVER, load_availability(Path(path))[:n]


def availability_from(entries: Sequence[dict[str, Any] | None]) -> list[Availability | None]:
    """Device-file availability entries (runner.emulation.devices.load_availability) -> clock's."""
    out: list[Availability | None] = []
    for a in entries:
        if not a:
            out.append(None)
            continue
        trace = a.get("trace")
        try:
            out.append(Availability(
                windows=tuple((float(s), float(e)) for s, e in trace) if trace else None,
                dropout=float(a.get("dropout") or 0.0)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad availability entry {a}: {exc}") from exc
    return out


class StepClock:
    """One run's virtual clock, advanced by the trainer after every step and aggregation."""

    def __init__(self, costs: ModelCosts, names: Sequence[str], devices: Sequence[DeviceSpec],
                 server: DeviceSpec, availability: Sequence[Availability | None] = (),
                 seed: int = 0, agg_interval: int = 1):
        if len(devices) != len(names):
            raise ConfigError(f"{len(devices)} devices for {len(names)} clients")
        self.costs = costs
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.clock = VirtualClock(devices, server, list(availability), seed=seed,
                                  agg_interval=agg_interval)
        self.last: StepTiming | None = None

    @property
    def now(self) -> float:
        return self.clock.now

    def state(self) -> dict[str, float]:
        """What a checkpoint keeps of the clock: the time and the steps counted (the round
        a per-round dropout draw belongs to). Devices and traces come from the run's
        configuration again."""
        return {"now": self.clock.now, "steps": self.clock.steps}

    def restore(self, state: dict[str, float]) -> None:
        """Continue from :meth:`state` (a resumed server: virtual time goes on from the
        checkpoint instead of restarting at 0)."""
        self.clock.now = float(state["now"])
        self.clock.steps = int(state["steps"])

    def away(self) -> dict[str, str]:
        """Clients that sit out the next step, with the reason ("trace" or "dropout")."""
        _, offline, dropped = self.clock.who_is_online()
        out = {self.names[i]: "trace" for i in offline}
        out.update({self.names[i]: "dropout" for i in dropped})
        return out

    def client_flops(self, tokens: int, blocks: int, full_model: bool) -> float:
        head = 6.0 * self.costs.hidden * self.costs.vocab * tokens if full_model else 0.0
        return tokens * blocks * self.costs.flops_per_token_block + head

    def step(self, records: Sequence[dict[str, Any]], blocks: dict[str, int],
             full_model: bool) -> StepTiming:
        """Advance by one step of ``records`` (the trainer's per-client train records, each
        with ``seq_tokens``, ``tokens`` (targets), ``bytes_sent``, ``bytes_received``);
        ``blocks[name]`` is each client's number of blocks. Stamps ``virtual_time`` (that
        client's finish) into every record."""
        if not records:  # nobody trained: wait for the next online window, if that is why
            online, _, _ = self.clock.who_is_online()
            if online:  # away for another reason (a scheduled dropout): no time passes
                self.clock.steps += 1
                return StepTiming(self.clock.steps - 1, self.now, self.now, self.now,
                                  self.now, {}, frozenset(), frozenset(), frozenset())
            self.last = self.clock.step(None, 0.0, 0.0, 0.0, 0.0)
            return self.last
        timing = self.clock.step(*self._costs(records, blocks, full_model))
        for r in records:
            r["virtual_time"] = round(timing.finish.get(self.index[r["client"]], timing.end), 6)
        self.last = timing
        return timing

    def probe(self, records: Sequence[dict[str, Any]], blocks: dict[str, int]) -> float:
        """Advance by an importance probe of the clients in ``records`` (fields as a step's):
        what a split step of theirs costs, not counted as a step (VirtualClock.exchange);
        returns now."""
        if not records:
            return self.now
        return self.clock.exchange(*self._costs(records, blocks, full_model=False))

    def _costs(self, records: Sequence[dict[str, Any]], blocks: dict[str, int],
               full_model: bool) -> tuple[list[int], dict[int, float], dict[int, float],
                                          dict[int, float], float]:
        """Participants, client FLOPs, bytes up, bytes down and server FLOPs of a round
        trip of ``records``."""
        parts = [self.index[r["client"]] for r in records]
        flops = {self.index[r["client"]]: self.client_flops(
            int(r["seq_tokens"]), blocks[r["client"]], full_model) for r in records}
        up = {self.index[r["client"]]: float(r["bytes_sent"]) for r in records}
        down = {self.index[r["client"]]: float(r["bytes_received"]) for r in records}
        L = self.costs.num_layers
        server = 0.0 if full_model else sum(
            int(r["seq_tokens"]) * (L - blocks[r["client"]]) * self.costs.flops_per_token_block
            + 6.0 * self.costs.hidden * self.costs.vocab * int(r["tokens"]) for r in records)
        return parts, flops, up, down, server

    def aggregate(self, names: Sequence[str], bytes_up: int, bytes_down: int,
                  per_client: Mapping[str, Sequence[int]] | None = None) -> float:
        """Advance by an aggregation: each participant uploads and downloads its own bytes
        over its own link; the slowest one decides.

        ``per_client`` maps a client to the ``(up, down)`` bytes of its own adapters, which
        differ when clients hold different blocks or ranks (hsplitlora's NAA sends a client
        the merged factors of the blocks it holds only: a client with three blocks gets a
        tenth of what one with thirty gets). What the totals hold beyond ``per_client``
        (block hand-over after a reconfiguration, or every byte when ``per_client`` is not
        given, as for FedAvg of equal adapters) is shared equally among ``names``.
        """
        if not names:
            return self.clock.now
        own = {n: per_client.get(n, (0, 0)) for n in names} if per_client else {
            n: (0, 0) for n in names}
        rest_up = max(0, bytes_up - sum(u for u, _ in own.values())) / len(names)
        rest_down = max(0, bytes_down - sum(d for _, d in own.values())) / len(names)
        worst = max((own[n][0] + own[n][1] + rest_up + rest_down)
                    / self.clock.devices[self.index[n]].bandwidth
                    + 2 * self.clock.devices[self.index[n]].latency for n in names)
        return self.clock.advance(worst)

__all__ = ["DEFAULT_SERVER", "StepClock", "availability_from", "clock_devices"]
