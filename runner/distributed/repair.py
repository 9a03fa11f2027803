"""The server's repair policy: one heartbeat and the server's view -> at most one repair.

Why a pure function: the policy (docs/protocol.md, "Heartbeats carry the client's whole
state; the server repairs differences") decides which single message brings a client back
in step after a lost message, a pause, a restart or a server roll-back. It used to be read
out of the server's loose fields and an untyped heartbeat dict inside the network loop;
here both sides are typed values (the heartbeat decoded once by
runner/distributed/control.py), so every rule can be tested on its own (tests/test_repair.py)
and the server only carries out the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["resync", "answer", "announce", "resend", "upload"]


@dataclass(frozen=True)
class ClientStatus:
    """What a client's heartbeat (runner/client.py ``status``) says of its state: the part
    the policy compares. Decoded once, with the rest of the heartbeat, by
    runner/distributed/control.py (``decode_heartbeat``: fields that are missing or of the
    wrong type take the value that triggers no repair of their own)."""

    synced: bool = False
    epoch: str | None = None
    done: int = -1  # last step applied or skipped
    pending: int | None = None  # step whose gradient it waits for
    pending_age: float = 0.0
    global_: int = -1  # last aggregation it holds
    busy: tuple[str, int] | None = None  # what its main thread computes now


@dataclass(frozen=True)
class ServerView:
    """What the server knows when a heartbeat of one client arrives (times: monotonic)."""

    now: float
    epoch: str
    global_step: int  # last aggregation the server made
    global_settled: bool  # its broadcast is older than the grace a client gets to apply it
    stale: bool  # the method's own reason for a resync (ServerHooks.stale)
    closed_step: int  # last step whose gradients went out
    closed_at: float
    collecting: bool  # a step is being collected ...
    current: int  # ... this one
    step_started: float
    awaited: bool  # this client's activations of the current step are awaited
    agg_step: int | None  # an aggregation collecting uploads, or None
    upload_awaited: bool  # this client's upload of agg_step is awaited
    repair_interval: float
    heartbeat: float


def repair(s: ClientStatus, v: ServerView) -> Action | None:
    """The one repair a client needs, in the protocol's order, or None.

    1. resync: not synced, another epoch (the server restarted), an aggregation it missed
       (after the grace), or the method says so;
    2. answer: it waits for the gradient of a closed step (re-sent from the cache, or skip);
    3. announce / resend: the current step's activations are missing: it never heard of the
       step, or its activations got lost;
    4. upload: the aggregation's upload is missing.
    """
    if not s.synced or s.epoch != v.epoch or (s.global_ < v.global_step and v.global_settled) \
            or v.stale:
        return "resync"
    p = s.pending
    if p is not None and s.busy != ("grad", p) and (
            p < v.closed_step
            or p == v.closed_step and v.now - v.closed_at > v.repair_interval):
        return "answer"
    if v.collecting and v.awaited and v.now - v.step_started > v.repair_interval:
        if p is None and s.done < v.current:
            return "announce"
        if p == v.current and s.pending_age > 2 * v.heartbeat:
            return "resend"
        return None
    if (v.agg_step is not None and v.upload_awaited and p is None and s.done == v.agg_step
            and v.now - v.step_started > v.repair_interval):
        return "upload"
    return None
