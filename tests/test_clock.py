"""The virtual clock (runner/emulation/clock.py) against a schedule computed by hand.

No model, no torch: pure arithmetic on DeviceSpecs, so these tests take milliseconds.
"""

from __future__ import annotations

import pytest

from runner.emulation.clock import FORWARD_SHARE, Availability, VirtualClock
from runner.emulation.devices import DeviceSpec
from runner.errors import ConfigError

# Three clients and a server with round numbers so every time can be checked by hand.
#   c0: 1 GFLOP/s, 1 MB/s, 100 ms latency, always online
#   c1: 2 GFLOP/s, 2 MB/s,  50 ms latency, always online
#   c2: 1 GFLOP/s, 1 MB/s,   0 ms latency, online in [0, 5) and [12, 100)
#   server: 10 GFLOP/s
# Every step: each client runs 3 GFLOP (1 forward + 2 backward), sends 1 MB of activations
# and receives 1 MB of gradients; the server runs 10 GFLOP.
C0 = DeviceSpec("c0", 10**9, flops=1e9, bandwidth=1e6, latency=0.1)
C1 = DeviceSpec("c1", 10**9, flops=2e9, bandwidth=2e6, latency=0.05)
C2 = DeviceSpec("c2", 10**9, flops=1e9, bandwidth=1e6, latency=0.0)
SERVER = DeviceSpec("server", 10**10, flops=1e10)
TRACE_C2 = Availability(windows=((0.0, 5.0), (12.0, 100.0)))
FLOPS, UP, DOWN, SERVER_FLOPS = 3e9, 1e6, 1e6, 1e10


def _clock() -> VirtualClock:
    return VirtualClock([C0, C1, C2], SERVER, [None, None, TRACE_C2])


def test_forward_share_is_one_third() -> None:
    # The hand computation below assumes forward = 1 GFLOP, backward = 2 GFLOP of 3.
    assert abs(FORWARD_SHARE - 1 / 3) < 1e-12


def test_clock_reproduces_hand_computed_schedule() -> None:
    clock = _clock()

    # ---- step 0, start t = 0: everyone online (c2 is inside [0, 5)).
    # arrival = start + forward/F + up/bw + latency
    #   c0: 0 + 1e9/1e9 + 1e6/1e6 + 0.1  = 2.1
    #   c1: 0 + 1e9/2e9 + 1e6/2e6 + 0.05 = 1.05
    #   c2: 0 + 1.0     + 1.0     + 0    = 2.0
    # server: starts at max arrival 2.1, runs 1e10/1e10 = 1.0 s -> ends 3.1
    # finish = server end + down/bw + latency + backward/F
    #   c0: 3.1 + 1.0 + 0.1  + 2e9/1e9 = 6.2
    #   c1: 3.1 + 0.5 + 0.05 + 2e9/2e9 = 4.65
    #   c2: 3.1 + 1.0 + 0    + 2.0     = 6.1
    # step end = slowest client = 6.2
    s0 = clock.step(None, FLOPS, UP, DOWN, SERVER_FLOPS)
    assert s0.online == {0, 1, 2} and not s0.offline
    assert s0.start == 0.0
    assert s0.server_start == pytest.approx(2.1)
    assert s0.server_end == pytest.approx(3.1)
    assert s0.finish == pytest.approx({0: 6.2, 1: 4.65, 2: 6.1})
    assert s0.end == pytest.approx(6.2)

    # ---- step 1, start t = 6.2: c2 is offline (6.2 is in neither [0, 5) nor [12, 100)).
    #   c0 arrives 6.2 + 2.1 = 8.3, c1 arrives 6.2 + 1.05 = 7.25
    #   server 8.3 -> 9.3
    #   c0 finishes 9.3 + 1.0 + 0.1 + 2.0 = 12.4; c1 finishes 9.3 + 0.5 + 0.05 + 1.0 = 10.85
    s1 = clock.step(None, FLOPS, UP, DOWN, SERVER_FLOPS)
    assert s1.online == {0, 1} and s1.offline == {2}
    assert s1.start == pytest.approx(6.2)
    assert s1.server_start == pytest.approx(8.3)
    assert s1.server_end == pytest.approx(9.3)
    assert s1.finish == pytest.approx({0: 12.4, 1: 10.85})
    assert s1.end == pytest.approx(12.4)

    # ---- step 2, start t = 12.4: c2 is back (12 <= 12.4 < 100); step 0 shifted by 12.4.
    #   server 12.4 + 2.1 = 14.5 -> 15.5; c0 15.5 + 3.1 = 18.6, c1 15.5 + 1.55 = 17.05,
    #   c2 15.5 + 3.0 = 18.5
    s2 = clock.step(None, FLOPS, UP, DOWN, SERVER_FLOPS)
    assert s2.online == {0, 1, 2}
    assert s2.server_start == pytest.approx(14.5)
    assert s2.finish == pytest.approx({0: 18.6, 1: 17.05, 2: 18.5})
    assert s2.end == pytest.approx(18.6)
    assert clock.now == pytest.approx(18.6)
    assert [s.index for s in (s0, s1, s2)] == [0, 1, 2]


def test_per_client_values_and_participants() -> None:
    clock = _clock()
    # Only c1 takes part, with its own numbers: 6 GFLOP (2 fwd + 4 bwd), 4 MB up, 2 MB down.
    #   arrive: 0 + 2e9/2e9 + 4e6/2e6 + 0.05 = 3.05; server (5 GFLOP) 3.05 -> 3.55
    #   finish: 3.55 + 2e6/2e6 + 0.05 + 4e9/2e9 = 6.6
    s = clock.step([1], {1: 6e9}, {1: 4e6}, [0.0, 2e6, 0.0], 5e9)
    assert s.online == {1}
    assert s.server_end == pytest.approx(3.55)
    assert s.finish == pytest.approx({1: 6.6})
    with pytest.raises(ConfigError, match="client_flops has no value for client 0"):
        clock.step([0], {1: 1.0}, 0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="participant 7"):
        clock.step([7], 1.0, 0.0, 0.0, 0.0)


def test_nobody_online_jumps_to_the_next_window() -> None:
    clock = VirtualClock([C0], SERVER, [Availability(windows=((0.0, 1.0), (5.0, 10.0)))],
                         start=2.0)
    s = clock.step(None, FLOPS, UP, DOWN, SERVER_FLOPS)
    assert s.online == frozenset() and s.offline == {0}
    assert (s.start, s.end) == (2.0, 5.0)  # the empty step waits for the window at t = 5
    assert clock.step(None, FLOPS, UP, DOWN, SERVER_FLOPS).online == {0}
    clock.now = 50.0  # after the last window nobody ever comes back: time stands still
    s = clock.step(None, FLOPS, UP, DOWN, SERVER_FLOPS)
    assert s.end == s.start == 50.0


def test_dropout_is_per_round_seeded_and_order_independent() -> None:
    avail = [Availability(dropout=0.5), Availability(dropout=0.5), None]
    a = VirtualClock([C0, C1, C2], SERVER, avail, seed=7, agg_interval=2)
    b = VirtualClock([C0, C1, C2], SERVER, avail, seed=7, agg_interval=2)
    runs_a = [a.step(None, FLOPS, UP, DOWN, SERVER_FLOPS) for _ in range(40)]
    # b asks in a different way (explicit participants, reversed): same draws.
    runs_b = [b.step([2, 1, 0], FLOPS, UP, DOWN, SERVER_FLOPS) for _ in range(40)]
    assert [s.dropped for s in runs_a] == [s.dropped for s in runs_b]
    for first, second in zip(runs_a[::2], runs_a[1::2], strict=True):
        assert first.dropped == second.dropped  # one draw per round of 2 steps
    assert all(2 not in s.dropped for s in runs_a)  # no dropout probability, never dropped
    rate = sum(0 in s.dropped for s in runs_a[::2]) / 20
    assert 0.2 <= rate <= 0.8
    other = VirtualClock([C0, C1, C2], SERVER, avail, seed=8, agg_interval=2)
    runs_c = [other.step(None, FLOPS, UP, DOWN, SERVER_FLOPS) for _ in range(40)]
    assert [s.dropped for s in runs_c] != [s.dropped for s in runs_a]


def test_availability_validation() -> None:
    with pytest.raises(ConfigError):
        Availability(windows=((0.0, 5.0), (4.0, 6.0)))
    with pytest.raises(ConfigError):
        Availability(dropout=1.0)
    with pytest.raises(ConfigError):
        VirtualClock([C0], SERVER, agg_interval=0)
    assert Availability(windows=((1.0, 2.0),)).next_online(0.0) == 1.0
    assert Availability().next_online(3.0) == 3.0
