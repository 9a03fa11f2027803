"""What a distributed run records of its processes' resources: each client's memory budget
(``client_budget`` / ``budget_changed`` events), measured memory and compute time
(``resources`` records, runner/emulation/resources.py), and the server's own.

Why a class of its own: the server used to keep these records in loose fields among its
network state. :class:`ResourceLog` holds them; the server hands it each decoded heartbeat
(runner/distributed/control.py ``Heartbeat``) and its own step times.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from runner.emulation.resources import Meter, cuda_index, usage_fields

if TYPE_CHECKING:
    from runner.distributed.control import Heartbeat
    from runner.distributed.liveness import Peer
    from runner.rundir import RunDir


class ResourceLog:
    """Budgets, measured memory and compute times of a run's clients and server.

    ``event``: the server's event log (thread-safe); ``run``: the run directory, set once
    it is open; ``device``: where the server trains (its meter reads that GPU, ``cuda:N``)."""

    def __init__(self, event: Callable[..., None], device: Any = None):
        self.event = event
        self.run: RunDir | None = None
        self.budgets: dict[str, int] = {}  # client -> last recorded memory budget (bytes)
        self.compute_seen: dict[str, int] = {}  # client -> last step with a resources record
        self.meter = Meter(device=cuda_index(device))  # the server's own measured memory
        self.own_budget: int | None = None  # the server's budget, read at the first record

    def budget(self, p: Peer, hb: Heartbeat, step: int) -> tuple[int | None, int] | None:
        """Record a client's reported memory budget: the first report, and every change of
        more than 10 % (docs/method.md "ARMSC: Trigger": the threshold that re-triggers ARMSC
        for the heterogeneous methods; the homogeneous ones only log it). ``(old, new)`` when the
        recorded budget changed (the method's hooks hear of it), else None."""
        budget = hb.budget
        if budget is None:
            return None
        old = self.budgets.get(p.cid)
        if old is None or abs(budget - old) > 0.1 * old:
            self.budgets[p.cid] = budget
            self.event("client_budget" if old is None else "budget_changed",
                       step=step, client=p.name, budget_bytes=budget, source=hb.budget_source,
                       **({} if old is None else {"previous_bytes": old}))
            if budget != old:
                return old, budget
        return None

    def measured(self, p: Peer, usage: dict[str, Any]) -> dict[str, Any]:
        """A client's measured memory as a message reported it (``usage``: decoded by
        runner/emulation/resources.py ``usage_fields``, ``memory_bytes`` = its peak so far)
        and its last reported budget (``budget_bytes``): the fields its records carry."""
        out = dict(usage)
        if p.cid in self.budgets:
            out["budget_bytes"] = self.budgets[p.cid]
        return out

    def client(self, p: Peer, hb: Heartbeat, first_step: int) -> None:
        """A heartbeat that reports a step this client finished since its last one: one
        ``resources`` record (its compute time of that step: forward, backward + optimizer;
        its memory as measured at the heartbeat). Steps before ``first_step`` (this
        server's first: a resumed run) are not recorded again."""
        c = hb.compute
        if c is None or self.run is None:
            return
        if c.step < first_step or c.step <= self.compute_seen.get(p.cid, -1):
            return
        self.compute_seen[p.cid] = c.step
        self.run.metric(kind="resources", step=c.step, client=p.name, **c.times,
                        **self.measured(p, hb.usage))

    def _own_budget(self) -> int:
        """The server's budget (runner/emulation/gpu.py ``process_budget``): on the CPU its
        cgroup or ``TESTBED_BUDGET_BYTES``; on a CUDA device the planned budget (that
        variable, or the devices file's server row) within the GPU NVML finds by UUID, never
        the host GPU's size in an emulated run. Where it trains comes from the run's
        config (``train.device``), as the server itself resolved it. 0: none known."""
        from runner.config import TrainConfig
        from runner.emulation.gpu import process_budget
        from runner.errors import ConfigError
        from runner.rundir import CONFIG

        assert self.run is not None
        try:  # the config as this process wrote it (container paths, not the host's)
            train = json.loads((self.run.path / CONFIG).read_text()).get("train") or {}
            return process_budget(TrainConfig.from_dict(train), None).bytes
        except (ConfigError, OSError, ValueError, TypeError):
            return 0  # none: do not look again

    def server(self, step: int, server_s: float | None) -> None:
        """The server's own ``resources`` record (client ``server``) after each step: its
        measured memory (evaluation included when the step had one), its budget when one
        is known (runner/emulation/budget.py), its compute time for the step."""
        assert self.run is not None
        if self.own_budget is None:
            self.own_budget = self._own_budget()
        try:
            fields = self.meter.sample().fields()
        except Exception:  # noqa: BLE001 - a measurement must never stop training
            return
        fields = usage_fields(fields)
        if self.own_budget:
            fields["budget_bytes"] = self.own_budget
        if server_s is not None:
            fields["compute_s"] = server_s
        self.run.metric(kind="resources", step=step, client="server", **fields)
