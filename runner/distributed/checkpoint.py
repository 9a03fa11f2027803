"""The server's checkpoint: what it holds, how it is written and how it is read back.

Why a module of its own: ``python -m runner.server --resume`` continues a run from the last
aggregation; what that takes (the checkpoint file ``RUN/checkpoint/server.pt``, its atomic
write, and the roll-back of ``metrics.jsonl`` to what the checkpoint includes) is one concept,
apart from the server's network loop. The server builds a :class:`ServerCheckpoint` after
every aggregation and applies the one :func:`read` returns when it resumes; the clients keep
matching in-memory snapshots (runner/client.py).

The model part is the method's (``ServerHooks.model_state`` / ``load_model_state``,
runner/methods/hooks.py): :func:`default_model_state` and :func:`load_default_model_state`
are SplitLoRA's (server adapters and optimizer, global client adapters); HSplitLoRA and
HetLoRA write their own (runner/methods/hetero_server.py).

The file is a ``torch.save`` of a plain dict (format version 1; the keys of
:meth:`ServerCheckpoint.to_state`). A server that trains on CUDA also saves the CUDA RNG
state of its device (``cuda_rng``): dropout masks drawn on a GPU come from that generator,
not the CPU's, so without it a resumed GPU run would draw other masks than the uninterrupted
one. The key is absent from a CPU server's checkpoint (the file is what it always was), and
a checkpoint without it (a CPU server's, or one written before) loads as before; it is
restored only where the resumed server trains on CUDA (docs/gpu.md "Device placement").
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runner.device import landed
from runner.model import lora
from runner.rundir import METRICS, SUMMARY, _clean, read_jsonl

if TYPE_CHECKING:
    from runner.trainer import Trainer

CHECKPOINT = Path("checkpoint") / "server.pt"
VERSION = 1


@dataclass(frozen=True)
class PeerPosition:
    """A client's stream and optimizer position at the checkpoint's aggregation; ``present``:
    it was online (or sitting a round out) then, so a resumed server waits for it."""

    drawn: int
    opt_steps: int
    present: bool = True


@dataclass
class ServerCheckpoint:
    """Everything the server needs to continue after aggregation ``step``."""

    step: int
    global_step: int
    model: dict[str, Any]  # the method's model part (ServerHooks.model_state)
    peers: dict[str, PeerPosition]
    history: list[Any]  # the trainer's evaluation history
    totals: dict[str, int]  # byte totals
    first: dict[str, float] | None  # the first and the last evaluation
    last: dict[str, float] | None
    rng: torch.Tensor
    elapsed: float  # seconds of the run so far (the run directory's clock)
    cuda_rng: torch.Tensor | None = None  # the CUDA device's RNG state; None on the CPU
    vclock: dict[str, float] | None = None  # the virtual clock (StepClock.state); None: none

    def to_state(self) -> dict[str, Any]:
        """The dict the file holds (``cuda_rng`` only when there is one)."""
        state = {
            "version": VERSION, "step": self.step, "global_step": self.global_step,
            "model": self.model,
            "peers": {cid: {"drawn": p.drawn, "opt_steps": p.opt_steps, "present": p.present}
                      for cid, p in self.peers.items()},
            "history": self.history, "totals": self.totals, "first": self.first,
            "last": self.last, "rng": self.rng, "elapsed": self.elapsed,
        }
        if self.cuda_rng is not None:
            state["cuda_rng"] = self.cuda_rng
        if self.vclock is not None:
            state["vclock"] = dict(self.vclock)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ServerCheckpoint:
        return cls(
            step=int(state["step"]), global_step=int(state["global_step"]),
            model=state["model"],
            peers={cid: PeerPosition(int(pos["drawn"]), int(pos["opt_steps"]),
                                     bool(pos.get("present", True)))
                   for cid, pos in state["peers"].items()},
            history=list(state["history"]), totals=dict(state["totals"]),
            first=state["first"], last=state["last"], rng=state["rng"],
            elapsed=float(state["elapsed"]), cuda_rng=state.get("cuda_rng"),
            vclock=state.get("vclock"))


def cuda_rng_state(device: torch.device | None, cuda: Any = None) -> torch.Tensor | None:
    """The RNG state of the CUDA device a process trains on (a CPU tensor, so the file
    loads anywhere), or None when it trains elsewhere: what a checkpoint or a client's
    snapshot keeps besides the CPU's state (module docstring). ``cuda``: ``torch.cuda``,
    injectable for tests."""
    if device is None or device.type != "cuda":
        return None
    cuda = cuda if cuda is not None else torch.cuda
    index = device.index if device.index is not None else cuda.current_device()
    return cuda.get_rng_state(index).cpu()


def restore_cuda_rng(state: torch.Tensor | None, device: torch.device | None,
                     cuda: Any = None) -> bool:
    """Set the CUDA device's RNG back to ``state`` (from :func:`cuda_rng_state`, maybe
    written on another GPU) when the process trains on CUDA; True when it did. A state saved
    on a GPU and resumed on the CPU, or none saved, leaves everything as it is."""
    if state is None or device is None or device.type != "cuda":
        return False
    cuda = cuda if cuda is not None else torch.cuda
    index = device.index if device.index is not None else cuda.current_device()
    cuda.set_rng_state(state.cpu(), index)
    return True


def write(run_path: Path, ckpt: ServerCheckpoint) -> None:
    """Write ``ckpt`` atomically (a temporary file renamed over the last one): a server
    killed while writing leaves the previous checkpoint whole."""
    path = run_path / CHECKPOINT
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt.to_state(), tmp)
    os.replace(tmp, path)


def read(run_path: Path) -> ServerCheckpoint | None:
    """The run's last checkpoint, or None when the server died before its first.

    Read onto the CPU whatever device wrote it (a GPU server's checkpoint resumes on any
    host); what restores it copies each tensor to the device the server trains on."""
    path = run_path / CHECKPOINT
    if not path.is_file():
        return None
    return ServerCheckpoint.from_state(torch.load(path, weights_only=False, map_location="cpu"))


@dataclass(frozen=True)
class Rewind:
    """What rolling ``metrics.jsonl`` back to a checkpoint found (the ``server_resumed``
    event's fields): records dropped, the step the killed server had reached, and how long
    ago it last wrote a record (None when unknown)."""

    dropped: int
    reached: int
    down_s: float | None


def rewind_metrics(run_path: Path, step: int) -> Rewind:
    """Keep only the records the checkpoint of aggregation ``step`` includes (train records
    up to ``step``, the evaluation after it; none when ``step`` is -1, no checkpoint), so no
    step appears twice after the resume; the summary of the killed run goes too.

    What the killed server had reached and how long ago it last wrote a record are what the
    exactly-once audit (analysis/audit.py) reports as steps run again and the outage."""
    metrics = run_path / METRICS
    rows = read_jsonl(metrics)
    reached = max((int(r["step"]) + 1 for r in rows if r.get("kind") == "train"), default=0)
    try:
        down: float | None = max(0.0, time.time() - metrics.stat().st_mtime)
    except OSError:
        down = None
    keep = [r for r in rows if step >= 0 and (
        r.get("step", 0) <= (step + 1 if r.get("kind") == "eval" else step))]
    tmp = metrics.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in keep))
    os.replace(tmp, metrics)
    (run_path / SUMMARY).unlink(missing_ok=True)
    return Rewind(len(rows) - len(keep), reached, down)


# ------------------------------------------------------------------ SplitLoRA's model part
def default_model_state(tr: Trainer) -> dict[str, Any]:
    """The model part of a checkpoint: server adapters and optimizer, global adapters."""
    srv = tr.server
    return {
        "global_state": tr.global_state,
        "server_adapters": ({k: v.detach().clone() for k, v in
                             lora.adapter_state(srv.seg.model).items()} if srv else None),
        "server_opt": srv.opt.state_dict() if srv and srv.opt else None,
        "server_sched": srv.sched.state_dict() if srv and srv.sched else None}


def load_default_model_state(tr: Trainer, state: dict[str, Any], full: bool) -> None:
    """Restore what :func:`default_model_state` wrote (``full``: whole weights travel, ft)."""
    srv = tr.server
    if srv is not None and state["server_adapters"] is not None:
        lora.load_adapter_state(srv.seg.model, state["server_adapters"])
        if srv.opt is not None:
            srv.opt.load_state_dict(state["server_opt"])
            srv.sched.load_state_dict(state["server_sched"])
    if state["global_state"] is not None:
        tr.global_state = landed(state["global_state"], tr.device)
        lora.load_trained_state(tr.clients[0].seg.model, state["global_state"], full)
