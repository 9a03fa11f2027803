"""The server's liveness rules (runner/distributed/liveness.py) and per-round dropout
decisions (runner/distributed/dropout.py), without a broker: a stand-in for the transport's
link state is enough."""

from __future__ import annotations

from dataclasses import dataclass

from runner.distributed.control import Heartbeat
from runner.distributed.dropout import RoundDropout, away_ids
from runner.distributed.liveness import Liveness, Peer
from runner.distributed.runtime import RuntimeOptions
from runner.emulation.clock import dropped_in_round


@dataclass
class Link:
    connected: bool = True
    connects: int = 1
    disconnects: int = 0
    disconnected_at: float = 0.0


def _peers() -> dict[str, Peer]:
    return {c: Peer(c, i, f"client{i}", 0.5, online=True, inc="x", last_seen=100.0)
            for i, c in enumerate(["a", "b"])}


def test_a_will_counts_after_its_grace_unless_the_client_spoke() -> None:
    o = RuntimeOptions(will_grace=1.0, offline_after=5.0)
    live, peers, t = Liveness(o), _peers(), Link()
    live.will("a", 100.5, t.disconnects)
    assert live.gone(peers, t, 101.0) == []  # within the grace
    assert live.gone(peers, t, 101.6) == [(peers["a"], "lost")]
    assert live.wills == {}
    live.will("b", 100.5, t.disconnects)
    peers["b"].last_seen = 101.0  # spoke after its will
    assert live.gone(peers, t, 102.0) == []
    live.will("b", 102.0, t.disconnects)
    t.disconnects += 1  # our own link dropped too: the broker published every will
    assert live.gone(peers, t, 104.0) == []


def test_silence_counts_from_the_latest_of_seen_reconnected_awake() -> None:
    o = RuntimeOptions(offline_after=5.0, repair_interval=1.0)
    live, peers, t = Liveness(o), _peers(), Link()
    peers["b"].last_seen = 104.0
    assert live.gone(peers, t, 106.0) == [(peers["a"], "heartbeat-timeout")]
    live.last_pump = 100.0
    live.woke(103.0)  # a long busy spell: the inbox is read before judging
    assert live.awake_at == 103.0 and live.gone(peers, t, 106.0) == []
    # a will past its grace and silence at once: one verdict per client
    live.will("a", 100.5, t.disconnects)
    assert live.gone(peers, t, 108.5) == [(peers["a"], "lost")]


def test_link_outage_is_reported_once_when_back() -> None:
    live, t = Liveness(RuntimeOptions()), Link(connected=False, connects=1)
    assert live.link(t, 10.0) is None and live.reconnected_at == 10.0
    t.connected, t.connects, t.disconnected_at = True, 2, 9.0
    assert live.link(t, 12.0) == 3.0
    assert live.link(t, 13.0) is None and live.reconnected_at == 12.0


def test_working_reads_the_last_heartbeat() -> None:
    live, p = Liveness(RuntimeOptions(heartbeat=0.5)), _peers()["a"]
    p.status = Heartbeat(busy=("step", 4))
    assert live.working(p, 4, 100.5) and not live.working(p, 5, 100.5)
    assert not live.working(p, 4, 102.0)  # its heartbeat is old
    p.status = Heartbeat(pending=5)
    assert live.working(p, 5, 100.5)


def test_round_dropout_follows_the_seeded_draw() -> None:
    peers = _peers()
    d = RoundDropout({"a": 0.5}, seed=3, agg_interval=2)
    assert d and not RoundDropout({}, 3, 2)
    rnd = next(r for r in range(50) if dropped_in_round(3, r, 0, 0.5))
    back = next(r for r in range(rnd + 1, 99) if not dropped_in_round(3, r, 0, 0.5))
    assert list(d.turn(2 * rnd, peers.values(), 5.0, lambda: 100.0)) == [(peers["a"], True)]
    assert peers["a"].away and not peers["a"].online and away_ids(peers.values()) == ("a",)
    assert list(d.turn(2 * back, peers.values(), 5.0, lambda: 101.0)) == [(peers["a"], False)]
    assert peers["a"].online and not peers["a"].away
    list(d.turn(2 * rnd, peers.values(), 5.0, lambda: 100.0))
    # one that went silent while away stays offline when its round is over
    assert list(d.turn(2 * back, peers.values(), 5.0, lambda: 200.0)) == []
    assert not peers["a"].online and not peers["a"].away
