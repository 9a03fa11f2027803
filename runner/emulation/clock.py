"""Virtual clock: how long a training step *would* take on the emulated devices.

The testbed runs every client on whatever hardware is at hand (often a 2-core CI machine), so
wall time says nothing about a Jetson-class client on a 100 Mbit/s link. Like FedScale, we
keep a second, virtual time line computed from each device's description
(:class:`~runner.emulation.devices.DeviceSpec`) and what the step actually did (FLOPs run, bytes
sent). Both times go into the metrics; convergence-versus-time figures use the virtual one.

One synchronous SplitLoRA step (docs/method.md "Training step") on the virtual time line::

    start ──┬─ client i: forward  (FORWARD_SHARE * flops_i / F_i)
            │            upload   (bytes_up_i / bw_i + latency_i)   -> arrives at u_i
            │  server starts at max_i u_i (it batches every client's activations)
            │  server:   server_flops / F_server                     -> ends at s
            └─ client i: download (bytes_down_i / bw_i + latency_i)
                         backward ((1 - FORWARD_SHARE) * flops_i / F_i) -> finishes at f_i
    end = max_i f_i   (the next step starts when the slowest client is done)

Design choice: a client's segment FLOPs (``ModelCosts.flops_per_token_block``, 6 FLOPs per
multiply-accumulate: forward + backward) are split one third forward, two thirds backward,
the usual 1:2 ratio; the server compute sits between the two halves because the server
needs every activation before it can step and returns the gradients afterwards.

Availability (who takes part):

* a client with an availability *trace* (online windows ``[start_s, end_s)`` in virtual
  time) that is offline at the step's start time skips the step;
* a client with a per-round *dropout probability* is dropped for a whole round (an
  aggregation interval) with that probability; the draw is a seeded function of
  ``(seed, round, client)`` only, so it does not depend on who else took part or on the
  order of calls, and two runs with the same seed see the same dropouts.

If nobody can take part, the clock jumps to the earliest time a participant comes back
online (the step is empty), so a trainer loop can never spin at a fixed virtual time.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from runner.emulation.devices import DeviceSpec
from runner.errors import ConfigError

FORWARD_SHARE = 1.0 / 3.0  # design choice: forward : backward = 1 : 2 FLOPs


@dataclass(frozen=True)
class Availability:
    """When a client is online: a trace of online windows, a per-round dropout, or always."""

    windows: tuple[tuple[float, float], ...] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout probability must be in [0, 1), got {self.dropout}")
        if self.windows is not None:
            last = -math.inf
            for start, end in self.windows:
                if not (start < end and start >= last):
                    raise ConfigError(
                        f"availability windows must be sorted, non-overlapping [start, end) "
                        f"with start < end, got {list(self.windows)}")
                last = end

    def online_at(self, t: float) -> bool:
        """True when ``t`` lies in an online window (always True without a trace)."""
        if self.windows is None:
            return True
        return any(start <= t < end for start, end in self.windows)

    def next_online(self, t: float) -> float | None:
        """The earliest time ``>= t`` at which the client is online (None: never again)."""
        if self.online_at(t):
            return t
        if self.windows is None:
            return t
        later = [start for start, _ in self.windows if start > t]
        return min(later) if later else None


def dropped_in_round(seed: int, round_index: int, client: int, p: float) -> bool:
    """Whether client ``client`` (its index) sits out round ``round_index`` under a per-round
    dropout probability ``p``: a seeded function of ``(seed, round, client)`` only, shared by
    the in-process clock and the distributed server (runner/distributed/dropout.py), so both
    drop the same clients in the same rounds."""
    if p <= 0.0:
        return False
    # str seeds are hashed with SHA-512 by random.Random: stable across runs/processes.
    return random.Random(f"{seed}:{round_index}:{client}").random() < p


@dataclass(frozen=True)
class StepTiming:
    """Where one step sits on the virtual time line.

    ``finish`` holds each participating client's finish time; ``online`` the clients that
    took part; ``offline`` those outside their trace windows; ``dropped`` those removed by
    the per-round dropout draw.
    """

    index: int
    start: float
    end: float
    server_start: float
    server_end: float
    finish: dict[int, float]
    online: frozenset[int]
    offline: frozenset[int] = field(default_factory=frozenset)
    dropped: frozenset[int] = field(default_factory=frozenset)

    @property
    def duration(self) -> float:
        return self.end - self.start


def _per_client(values: Mapping[int, float] | Sequence[float] | float, who: int,
                name: str) -> float:
    """One client's value from a mapping, a sequence indexed by client, or a scalar."""
    if isinstance(values, int | float):
        return float(values)
    try:
        return float(values[who])
    except (KeyError, IndexError) as exc:
        raise ConfigError(f"{name} has no value for client {who}") from exc


class VirtualClock:
    """Advances virtual time one synchronous step at a time.

    ``devices`` are the clients (index = client id), ``server`` the server device;
    ``availability[i]`` (None or missing: always online) says when client ``i`` is online;
    ``agg_interval`` is the number of steps in a round (dropout draws are per round).
    """

    def __init__(self, devices: Sequence[DeviceSpec], server: DeviceSpec,
                 availability: Sequence[Availability | None] | None = None,
                 seed: int = 0, agg_interval: int = 1, start: float = 0.0):
        if agg_interval < 1:
            raise ConfigError(f"agg_interval must be >= 1, got {agg_interval}")
        self.devices = list(devices)
        self.server = server
        avail = list(availability or [])
        if len(avail) > len(self.devices):
            raise ConfigError(f"{len(avail)} availability entries for {len(self.devices)} "
                              "clients")
        avail += [None] * (len(self.devices) - len(avail))
        self.availability = [a or Availability() for a in avail]
        self.seed = seed
        self.agg_interval = agg_interval
        self.now = float(start)
        self.steps = 0

    def dropped_in_round(self, client: int, round_index: int) -> bool:
        """The seeded per-round dropout draw of one client (independent of everything else)."""
        return dropped_in_round(self.seed, round_index, client,
                                self.availability[client].dropout)

    def who_is_online(self, participants: Sequence[int] | None = None,
                      at: float | None = None) -> tuple[set[int], set[int], set[int]]:
        """Split participants into (online, offline by trace, dropped by dropout) at time ``at``
        (default: now) for the round the next step belongs to."""
        t = self.now if at is None else at
        wanted = range(len(self.devices)) if participants is None else participants
        round_index = self.steps // self.agg_interval
        online, offline, dropped = set(), set(), set()
        for i in wanted:
            if not 0 <= i < len(self.devices):
                raise ConfigError(f"participant {i} is not a client (0..{len(self.devices) - 1})")
            if not self.availability[i].online_at(t):
                offline.add(i)
            elif self.dropped_in_round(i, round_index):
                dropped.add(i)
            else:
                online.add(i)
        return online, offline, dropped

    def step(self, participants: Sequence[int] | None,
             client_flops: Mapping[int, float] | Sequence[float] | float,
             bytes_up: Mapping[int, float] | Sequence[float] | float,
             bytes_down: Mapping[int, float] | Sequence[float] | float,
             server_flops: float) -> StepTiming:
        """Advance the clock by one step and return its timing.

        ``participants`` (None: every client) are the clients that would take part; the
        clock removes those offline or dropped. ``client_flops``, ``bytes_up`` and
        ``bytes_down`` give each client's segment FLOPs (forward + backward) and the bytes
        it sends (activations) and receives (their gradients). ``server_flops`` is what the
        server runs for all clients together in this step.
        """
        start = self.now
        online, offline, dropped = self.who_is_online(participants)
        index = self.steps
        self.steps += 1
        if not online:
            wanted = range(len(self.devices)) if participants is None else participants
            back = [t for i in wanted if (t := self.availability[i].next_online(start))
                    is not None and t > start]
            end = min(back) if back else start
            self.now = end
            return StepTiming(index, start, end, start, start, {}, frozenset(),
                              frozenset(offline), frozenset(dropped))
        end, server_start, server_end, finish = self._exchange(
            start, online, client_flops, bytes_up, bytes_down, server_flops)
        self.now = end
        return StepTiming(index, start, end, server_start, server_end, finish,
                          frozenset(online), frozenset(offline), frozenset(dropped))

    def _exchange(self, start: float, online: Sequence[int],
                  client_flops: Mapping[int, float] | Sequence[float] | float,
                  bytes_up: Mapping[int, float] | Sequence[float] | float,
                  bytes_down: Mapping[int, float] | Sequence[float] | float,
                  server_flops: float) -> tuple[float, float, float, dict[int, float]]:
        """One split round trip of ``online`` from ``start``: client forwards, activations
        up, the server's pass over all of them, gradients down, client backwards. Returns
        (end, server start, server end, each client's finish)."""
        arrive: dict[int, float] = {}
        for i in online:
            dev = self.devices[i]
            flops = _per_client(client_flops, i, "client_flops")
            up = _per_client(bytes_up, i, "bytes_up")
            arrive[i] = start + FORWARD_SHARE * flops / dev.flops + up / dev.bandwidth \
                + dev.latency
        server_start = max(arrive.values())
        server_end = server_start + server_flops / self.server.flops
        finish: dict[int, float] = {}
        for i in online:
            dev = self.devices[i]
            flops = _per_client(client_flops, i, "client_flops")
            down = _per_client(bytes_down, i, "bytes_down")
            finish[i] = server_end + down / dev.bandwidth + dev.latency \
                + (1.0 - FORWARD_SHARE) * flops / dev.flops
        return max(finish.values()), server_start, server_end, finish

    def exchange(self, participants: Sequence[int],
                 client_flops: Mapping[int, float] | Sequence[float] | float,
                 bytes_up: Mapping[int, float] | Sequence[float] | float,
                 bytes_down: Mapping[int, float] | Sequence[float] | float,
                 server_flops: float) -> float:
        """Let a round trip that is not a training step pass (HSplitLoRA's importance
        probe): timed as a step of ``participants`` (the clients that took part, so no
        availability is drawn) but not counted as one, so the trace and the per-round
        dropout stay aligned with the training steps; returns now."""
        if participants:
            self.now, _, _, _ = self._exchange(self.now, participants, client_flops,
                                               bytes_up, bytes_down, server_flops)
        return self.now

    def advance(self, seconds: float) -> float:
        """Let virtual time pass (aggregation traffic, a reconfiguration); returns now."""
        if seconds < 0:
            raise ConfigError(f"cannot advance the virtual clock by {seconds} s")
        self.now += seconds
        return self.now
