"""Per-round dropout applied to the real clients of a distributed run.

A profile's ``availability: {dropout: p}`` (in the run's devices file) takes a client out
for whole rounds (``agg_interval`` steps), by the seeded draw the in-process virtual clock
makes (runner/emulation/clock.py ``dropped_in_round``), so a distributed run drops the same
clients in the same rounds as the in-process one. Central methods have no rounds, as
in-process (runner/emulation/vtime.py ``clock_devices``).

:class:`RoundDropout` decides; the server carries the decisions out (events, the ``away``
list of step announcements, the resync of a client whose round is over).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from runner.emulation.clock import dropped_in_round

if TYPE_CHECKING:
    from runner.distributed.liveness import Peer


class RoundDropout:
    """Each client's per-round dropout probability (client id -> p > 0) and the draw."""

    def __init__(self, odds: dict[str, float], seed: int, agg_interval: int):
        self.odds, self.seed, self.agg_interval = odds, seed, agg_interval

    @classmethod
    def from_devices(cls, devices: str | None, central: bool, peers: Iterable[Peer],
                     seed: int, agg_interval: int) -> RoundDropout:
        """The odds of the run's devices file (none without one, or for central methods)."""
        odds: dict[str, float] = {}
        if devices and not central:
            from runner.emulation.devices import load_availability

            entries = load_availability(Path(devices))
            for p in peers:
                entry = entries[p.index] if p.index < len(entries) else None
                p_out = float((entry or {}).get("dropout") or 0.0)
                if p_out > 0.0:
                    odds[p.cid] = p_out
        return cls(odds, seed, agg_interval)

    def __bool__(self) -> bool:
        return bool(self.odds)

    def round_of(self, step: int) -> int:
        return step // self.agg_interval

    def turn(self, step: int, peers: Iterable[Peer], offline_after: float,
             clock: Callable[[], float] = time.monotonic) -> Iterator[tuple[Peer, bool]]:
        """Before ``step``: who sits its round out and who comes back, one peer at a time in
        peer order (``(peer, True)``: leaves, ``(peer, False)``: returns; the caller acts on
        each before the next is judged). A client that is not online is not drawn; one whose
        round is over stops being away, and returns only if it was heard within
        ``offline_after`` (one that went silent while away stays offline). Updates the
        peers' ``away`` / ``online`` flags."""
        rnd = self.round_of(step)
        for p in peers:
            if p.unfit:  # away for as long as its device cannot hold its plan
                continue
            drawn = dropped_in_round(self.seed, rnd, p.index, self.odds.get(p.cid, 0.0))
            if drawn and p.online and not p.away:
                p.away, p.online = True, False
                yield p, True
            elif not drawn and p.away:
                p.away = False
                if clock() - p.last_seen < offline_after:
                    p.online = True
                    yield p, False


def away_ids(peers: Iterable[Peer]) -> tuple[str, ...]:
    """Clients sitting the current round out (named in step announcements)."""
    return tuple(sorted(p.cid for p in peers if p.away))
