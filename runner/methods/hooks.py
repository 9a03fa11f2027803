"""The interface a method plugs into the distributed runtime with (in the spirit of Flower's
Strategy): server-side hooks at the steps and the aggregation, client-side handlers of the
control messages it adds.

Why hooks rather than subclasses: a method used to subclass the engines
(``HeteroServer(Server)``, ``HeteroClient(Client)``), and an engine had to import its
subclasses to pick one: an import cycle per role. Now the engine (runner/server.py,
runner/client.py) builds the method's hooks object (named by the method's traits,
runner/methods/registry.py) and calls it; a method's module never imports an engine.

Every default below is the SplitLoRA / FedLoRA / CenLoRA / FT behaviour: it hands back to
the engine's own implementation (``engine.default_*``), so a method overrides only what it
changes. The engine object is passed in; its attributes are the engine's documented state
(docs/architecture.md, "The distributed runtime").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from runner.distributed import checkpoint
from runner.methods import aggregation

if TYPE_CHECKING:  # type names only
    from runner.distributed import protocol as P
    from runner.distributed.control import ActReport, AdaptReport, Control, Heartbeat, Resync
    from runner.emulation.vtime import StepClock
    from runner.trainer import Trainer

# The engines (runner.server.Server and its Peer records, runner.client.Client) import this
# module to build their hooks, so it names them without importing them, not even for type
# checking: the interface sits below the engines that call it.
Server = Any
Peer = Any
Client = Any


class ServerHooks:
    """Server side of a method. ``server`` is the engine (runner.server.Server)."""

    def __init__(self, server: Server):
        self.server = server

    # ------------------------------------------------------------------- set-up
    def make_trainer(self) -> Trainer:
        """The training maths the server runs (SplitLoRA: a ServerTrainer with a shadow
        client segment). Called while the engine is being built (``server.prep`` is set)."""
        return self.server.default_trainer()

    def ready(self) -> None:
        """The engine is built (trainer, peers): last set-up before the run directory opens."""

    def joined(self, p: Peer) -> bool:
        """Whether client ``p`` has joined and is ready to train (the start waits for all)."""
        return p.online and p.status.synced

    def start(self) -> None:
        """Work after the clients joined and before the first step (HSplitLoRA plans)."""

    def make_clock(self) -> StepClock | None:
        """The run's virtual clock (runner/emulation/vtime.py), or None."""
        return self.server.default_clock()

    # ------------------------------------------------------------------- steps
    def split_of(self, p: Peer) -> int:
        """Client ``p``'s split point (one for every client in SplitLoRA)."""
        return self.server.tr.k

    def upload_shapes(self, h: P.Header) -> dict[str, list[int]]:
        """The tensors an ``adapt`` message (header ``h``) must carry: names and shapes."""
        return self.server.adapter_shapes

    def step_plan(self) -> int | None:
        """The plan version a step needs, announced with it (HSplitLoRA); None: no plans."""
        return None

    def on_act(self, p: Peer, act: ActReport) -> bool:
        """An ``act`` message (decoded: runner/distributed/control.py) the method consumes
        itself (True), else the engine's."""
        return False

    def on_adapt(self, p: Peer, up: AdaptReport) -> bool:
        """An ``adapt`` message the method consumes itself (True), else the engine's."""
        return False

    def budget_changed(self, p: Peer, old: int | None, new: int, hb: Heartbeat) -> None:
        """Client ``p`` reported a new memory budget (first report or a >10 % change) in
        heartbeat ``hb``."""

    # ------------------------------------------------------------- aggregation
    def aggregate(self, step: int, participants: list[str]) -> dict[str, Any]:
        """Aggregate after ``step`` over the ``participants`` (client ids) that trained it;
        the bytes moved up and down. Default: FedAvg of the uploaded adapters."""
        return self.server.default_aggregate(step, participants)

    def average(self, states: list[dict[str, torch.Tensor]],
                weights: list[float]) -> tuple[dict[str, torch.Tensor], list[float]]:
        """The rule of the default aggregation: the uploaded states (client order) and their
        data weights -> the aggregate sent to every client, and the weights used. FedAvg,
        as the in-process ``Trainer.average``."""
        return aggregation.fedavg(states, weights)

    # ---------------------------------------------------------------- repairs
    def send_resync(self, p: Peer) -> None:
        """Bring client ``p`` (joined, returned or rolled back) to the current state."""
        self.server.default_resync(p)

    def stale(self, p: Peer, hb: Heartbeat, now: float) -> bool:
        """Whether a client's reported state needs a resync (beyond the global step)."""
        return False

    def global_grace(self) -> float:
        """Seconds after an aggregate went out before a client still behind it is resynced."""
        return self.server.o.repair_interval

    # ------------------------------------------------------------- checkpoints
    def model_state(self) -> dict[str, Any]:
        """The model part of a checkpoint (runner/distributed/checkpoint.py); SplitLoRA's:
        server adapters and optimizer, global client adapters. It is written at once and
        then dropped, so it may hold the live tensors (no copies of the model needed)."""
        return checkpoint.default_model_state(self.server.tr)

    def load_model_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`model_state` wrote (``--resume``)."""
        checkpoint.load_default_model_state(self.server.tr, state, self.server.full)


class ClientHooks:
    """Client side of a method. ``client`` is the engine (runner.client.Client)."""

    #: Keep in-memory snapshots at aggregations for an exact roll-back after a server
    #: restart (a method whose server sends the whole state on roll-back needs none).
    snapshots = True

    def __init__(self, client: Client):
        self.client = client

    def load_model(self) -> tuple[Any, dict[str, int]]:
        """The client's segment and ranks at the start (None: it arrives from the server)."""
        return self.client.default_model()

    def status(self) -> dict[str, Any]:
        """Extra heartbeat fields (the server's repair loop compares them)."""
        return {}

    def shapes(self, h: P.Header) -> dict[str, list[int | None]] | None:
        """The tensors a message from the server (header ``h``) must carry, or None."""
        return self.client.default_shapes(h)

    def handle(self, msg: P.Message, ctrl: Control | None) -> bool:
        """A message the method consumes itself (True), before the engine's handlers.
        ``ctrl``: a ``config`` message's typed operation, decoded by whichever module
        registered its op with runner/distributed/control.py (a method registers its own,
        e.g. runner/methods/hetero_wire.py); None for other kinds and for an unregistered
        ``op`` (read ``msg.meta``)."""
        return False

    def after_handle(self, msg: P.Message, ctrl: Control | None) -> None:
        """After the engine handled ``msg`` (e.g. a step announcement's extra fields)."""

    def advance(self) -> bool:
        """Work of the method's own, or a reason to wait: True stops the engine from starting
        the announced step now."""
        return False

    def resync(self, r: Resync, tensors: dict[str, Any]) -> None:
        """The server's ``resync``: rejoin or roll back."""
        self.client.default_resync(r, tensors)
