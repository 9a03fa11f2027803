"""Who is still there: the server's view of each client (:class:`Peer`) and the rules that
judge a client gone (:class:`Liveness`).

Why a module of its own: the rules are subtle (docs/protocol.md, "Runtime") and used to be
spread over the server's network loop. A client is judged offline when

* its last will arrived (the broker lost it) and, ``will_grace`` seconds later, neither our
  own link dropped meanwhile (Mosquitto publishes every will when it shuts down) nor the
  client spoke after it;
* it was silent for ``offline_after`` seconds, counted from the later of its last message,
  our own reconnection and the end of our last busy spell (after a long server step or
  evaluation the inbox holds heartbeats that arrived meanwhile: they are read first).

Past ``step_timeout`` the server keeps waiting (up to ten times that) for a client whose
heartbeat says it is computing the step in question (:meth:`Liveness.working`).

The server carries out the verdicts (``client_offline`` events, runner/server.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from runner.distributed.control import Heartbeat

if TYPE_CHECKING:
    from runner.distributed.runtime import RuntimeOptions
    from runner.distributed.transport import Transport


@dataclass
class Peer:
    """The server's view of one client."""

    cid: str
    index: int
    name: str
    weight: float
    online: bool = False
    inc: str | None = None  # incarnation (process) id from its messages
    last_seen: float = 0.0
    status: Heartbeat = field(default_factory=Heartbeat)  # its last heartbeat
    drawn: int = 0  # batches drawn, as of its last processed activations
    opt_steps: int = 0  # optimizer steps it has applied (as far as the server knows)
    agg_drawn: int = 0  # the same two at the last aggregation (checkpointed)
    agg_opt_steps: int = 0
    grad: tuple[int, torch.Tensor] | None = None  # last answered step and its gradient
    last_repair: float = 0.0
    away: bool = False  # sits the current round out (per-round dropout): offline meanwhile
    unfit: bool = False  # its device cannot hold its plan (not runnable): away until it can


class Liveness:
    """The liveness bookkeeping of one server (times: monotonic seconds)."""

    def __init__(self, o: RuntimeOptions):
        self.o = o
        self.wills: dict[str, tuple[float, int]] = {}  # client -> (time, our disconnects)
        self.connects = 1  # our own connections so far, as last seen
        self.reconnected_at = 0.0
        # the end of the server's last busy spell, and its last look at the inbox
        self.awake_at = self.last_pump = 0.0

    def woke(self, now: float) -> None:
        """Before reading the inbox: after a busy spell (a server step, an evaluation, a
        checkpoint) the heartbeats waiting there describe the clients as they were before;
        no client is judged (or repaired) on them."""
        if now - self.last_pump > self.o.repair_interval:
            self.awake_at = now

    def will(self, cid: str, now: float, disconnects: int) -> None:
        """Client ``cid``'s last will arrived (judged after ``will_grace``)."""
        self.wills[cid] = (now, disconnects)

    def link(self, t: Transport, now: float) -> float | None:
        """Notice our own link going down or coming back: silence meanwhile is not the
        clients' fault. The outage (seconds) when the link is back after one, else None."""
        if t.connected and t.connects == self.connects:
            return None
        outage = max(0.0, now - t.disconnected_at) if t.connected else None
        self.connects = t.connects
        self.reconnected_at = now
        return outage

    def gone(self, peers: dict[str, Peer], t: Transport, now: float) -> list[tuple[Peer, str]]:
        """The online clients to take offline now, each with its reason (``lost``: a will
        past its grace, ``heartbeat-timeout``: silence), wills first."""
        out: list[tuple[Peer, str]] = []
        for cid, (at, disconnects) in list(self.wills.items()):
            if now - at < self.o.will_grace:
                continue
            del self.wills[cid]
            p = peers[cid]
            # Mosquitto publishes every client's will when it shuts down: if our own
            # connection dropped too, or the client spoke after its will, it is not gone.
            if t.disconnects == disconnects and t.connected and p.last_seen < at and p.online:
                out.append((p, "lost"))
        taken = {p.cid for p, _ in out}
        out += [(p, "heartbeat-timeout") for p in peers.values()
                if p.cid not in taken and p.online and t.connected and now - max(
                    p.last_seen, self.reconnected_at, self.awake_at) > self.o.offline_after]
        return out

    def working(self, p: Peer, step: int, now: float) -> bool:
        """Whether ``p`` is alive and computing for ``step`` (its last heartbeat says so):
        past ``step_timeout`` the server waits on for it, up to ten times that."""
        s = p.status
        fresh = now - p.last_seen < max(3 * self.o.heartbeat, 1.0)
        return p.online and fresh and (
            s.busy is not None and s.busy[1] == step or s.pending == step)

