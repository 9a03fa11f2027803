"""Message kinds and what each may carry and where it travels (the :data:`KINDS` table).

One table decides, for every kind, its tensors (fixed names and dtypes, or any names of
some dtypes), the channels it travels on (a client's, the server's), its direction, and
whether receivers deduplicate it. Topics, the broker's ACL, the encoder's and the
receiver's checks all read it, so a kind's rules are written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from runner.distributed.protocol.dtypes import FLOATS, INTS

# Tensor names of the fixed-layout kinds (what crosses the cut, see runner/trainer.py).
ACTS, MASK, LABELS, GRAD = "acts", "mask", "labels", "grad"
# What a state message may say (its meta.state).
STATES = frozenset({"online", "offline", "done"})


class Kind(StrEnum):
    """Message kinds; the value is also the last topic level."""

    ACT = "act"  # client -> server: boundary activations + attention mask + labels
    GRAD = "grad"  # server -> client: gradient w.r.t. the activations
    ADAPT = "adapt"  # client -> server: adapter state dict (for aggregation)
    GLOBAL = "global"  # server -> all: aggregated factors (NAA / FedAvg result)
    CONFIG = "config"  # server -> one client or all: configuration (split, ranks, weights)
    HB = "hb"  # heartbeat, client -> server or server -> all
    STATE = "state"  # online/offline/done, client -> server or server -> all; last will


@dataclass(frozen=True)
class KindSpec:
    """What a kind may carry and where it travels.

    ``fixed``: tensor name -> allowed dtypes, when the kind has a fixed layout; ``free``: the
    dtypes allowed for any tensor name (adapter state dicts), or empty for no tensors at all.
    ``on_client`` / ``on_server``: whether the kind travels on a client's channel
    (``hsl/<run>/c/<cid>/<kind>``) and/or the server's (``hsl/<run>/s/<kind>``).
    ``uplink``: on a client's channel the client writes it (else the server does).
    ``dedup``: receivers drop repeats of (client, kind, step, seq); heartbeats and states are
    "latest wins" and idempotent, and a last will is a fixed message that may legitimately
    repeat, so they are not deduplicated.
    """

    fixed: Mapping[str, frozenset[str]] | None = None
    free: frozenset[str] = frozenset()
    on_client: bool = True
    on_server: bool = False
    uplink: bool = True
    dedup: bool = True


KINDS: dict[Kind, KindSpec] = {
    Kind.ACT: KindSpec(fixed={ACTS: FLOATS, MASK: frozenset({"int64"}),
                              LABELS: frozenset({"int64"})}),
    Kind.GRAD: KindSpec(fixed={GRAD: FLOATS}, uplink=False),
    Kind.ADAPT: KindSpec(free=FLOATS),
    Kind.GLOBAL: KindSpec(free=FLOATS, on_client=False, on_server=True, uplink=False),
    Kind.CONFIG: KindSpec(free=FLOATS | INTS, on_server=True, uplink=False),
    Kind.HB: KindSpec(on_server=True, dedup=False),
    Kind.STATE: KindSpec(on_server=True, dedup=False),
}
UPLINK = tuple(k for k, s in KINDS.items() if s.on_client and s.uplink)
DOWNLINK = tuple(k for k, s in KINDS.items() if s.on_client and not s.uplink)
SERVER_KINDS = tuple(k for k, s in KINDS.items() if s.on_server)
