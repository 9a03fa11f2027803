"""The server's repair policy (runner/distributed/repair.py) rule by rule: a heartbeat and the
server's view -> the one repair docs/protocol.md prescribes. (Decoding a heartbeat into its
ClientStatus part: tests/test_control.py.)"""

from __future__ import annotations

from dataclasses import replace

import pytest

from runner.distributed.repair import ClientStatus, ServerView, repair

OK = ClientStatus(synced=True, epoch="e", done=4, pending=None, global_=3)
VIEW = ServerView(now=100.0, epoch="e", global_step=3, global_settled=True, stale=False,
                  closed_step=4, closed_at=99.8, collecting=False, current=4,
                  step_started=90.0, awaited=False, agg_step=None, upload_awaited=False,
                  repair_interval=1.0, heartbeat=0.25)


def test_in_step_needs_nothing() -> None:
    assert repair(OK, VIEW) is None


@pytest.mark.parametrize("status,view", [
    (replace(OK, synced=False), VIEW),
    (replace(OK, epoch="old"), VIEW),  # the server restarted since
    (replace(OK, global_=1), VIEW),  # missed an aggregation ...
    (OK, replace(VIEW, stale=True)),  # the method's own reason (a missed plan)
])
def test_resync(status: ClientStatus, view: ServerView) -> None:
    assert repair(status, view) == "resync"


def test_a_missed_aggregate_waits_for_its_grace() -> None:
    assert repair(replace(OK, global_=1), replace(VIEW, global_settled=False)) is None


def test_answer_a_closed_step() -> None:
    waiting = replace(OK, done=2, pending=3)
    assert repair(waiting, VIEW) == "answer"
    # the step that just closed: its gradient may still be on its way
    just = replace(OK, done=3, pending=4)
    assert repair(just, VIEW) is None
    assert repair(just, replace(VIEW, now=101.0)) == "answer"
    # busy applying that very gradient: nothing to repair
    assert repair(replace(waiting, busy=("grad", 3)), VIEW) is None


def test_announce_and_resend_during_a_step() -> None:
    view = replace(VIEW, collecting=True, current=5, awaited=True, step_started=98.0)
    assert repair(OK, view) == "announce"  # never heard of step 5
    lost = replace(OK, pending=5, pending_age=0.6)
    assert repair(lost, view) == "resend"  # its activations got lost
    assert repair(replace(lost, pending_age=0.4), view) is None  # give them a moment
    assert repair(OK, replace(view, step_started=99.5)) is None  # the step just began
    assert repair(OK, replace(view, awaited=False)) is None  # answered, or not in this round


def test_upload_missing_at_an_aggregation() -> None:
    view = replace(VIEW, agg_step=4, upload_awaited=True, step_started=98.0)
    assert repair(OK, view) == "upload"
    assert repair(OK, replace(view, upload_awaited=False)) is None
    assert repair(replace(OK, done=3), view) is None  # still training step 4

