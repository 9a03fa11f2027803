"""``--resume`` restores the optimizer state of every method (issue 16, part 4).

SplitLoRA, FedLoRA and CenLoRA clients keep in-memory snapshots of adapters, AdamW moments
and schedule at every aggregation (tests/test_distributed.py's kill -9 test covers SplitLoRA);
HSplitLoRA with NAA re-initialises adapters and optimizers at every aggregation, so its
checkpoint holds everything. The three methods tested here used to lose their AdamW moments on
a roll-back: hetlora and hsplitlora-no-naa (adapters and optimizer live across aggregations;
the roll-back resync carries the adapters only) and ft (whole-model snapshots were too large
to keep, so no snapshot at all). Each run's server is killed with SIGKILL after a checkpoint
and resumed; the per-step losses must still equal the uninterrupted in-process run's, which
they cannot when a single moment is lost (Adam's first step after a reset is lr * sign(g)).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner.distributed.broker import find_mosquitto
from runner.methods.plugins import build_trainer
from testbed.backends.local import LocalRun
from tests.test_distributed import (
    _cfg,
    _options,
    done_steps,
    events,
    finish,
    in_process,
    train_losses,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(find_mosquitto() is None,
                       reason="mosquitto not installed (apt-get install -y mosquitto)"),
    pytest.mark.timeout(360),
]


def _config(method: str):  # type: ignore[no-untyped-def]
    if method == "ft":
        return _cfg(method="ft", steps=8, eval_every=2, lr=1e-4)
    return _cfg(method=method, split=None, steps=8, agg_interval=2, eval_every=2)


@pytest.mark.parametrize("method", ["hetlora", "hsplitlora-no-naa", "ft"])
def test_server_killed_and_resumed_keeps_optimizer_state(tmp_path: Path, method: str) -> None:
    cfg = _config(method)
    with LocalRun(cfg, tmp_path / "run", _options(min_step_time=0.4)) as run:
        run.start()
        ckpt = run.run_dir / "checkpoint" / "server.pt"
        wait_until(lambda: ckpt.exists() and done_steps(run.run_dir) >= 4, 150,
                   "a checkpoint and step 4", run)
        run.kill("server")
        saved = torch.load(ckpt, weights_only=False)["step"]
        assert saved >= 1, "the kill must come after a checkpoint with trained state"
        run.spawn("server", resume=True)
        if method == "ft":  # its result is a whole model, not an adapter
            assert run.wait(200) == 0, run.log_tail("server")
            assert (run.run_dir / "model" / "model.safetensors").exists()
        else:
            finish(run, timeout=200)
    resumed = [e for e in events(run.run_dir) if e["event"] == "server_resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == saved + 1
    ref_trainer = build_trainer(cfg)
    dist, ref = train_losses(run.run_dir), in_process(cfg, ref_trainer)
    assert set(dist) == set(ref)
    after = [k for k in ref if k[0] > saved]
    assert after, "steps after the checkpoint were trained again"
    worst = max(abs(dist[k] - ref[k]) for k in ref)
    assert worst <= 1e-5, f"resumed {method} run diverges from the uninterrupted one: {worst}"
    logs = "\n".join((run.run_dir / "logs" / f"{c}.log").read_text(errors="replace")
                     for c in run.clients)
    if method == "ft":
        assert "rolled back to aggregation" in logs and "(exact)" in logs, logs[-2000:]
    else:
        assert "optimizer state of aggregation" in logs and ": exact" in logs, logs[-2000:]
