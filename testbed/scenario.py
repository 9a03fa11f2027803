"""Fault scenarios: several faults in one distributed run, driven from the host.

Why: every fault is tested alone (tests/test_distributed.py), but fleets fail together:
devices drop every round, one never comes back, the broker restarts, the server is killed.
A scenario file (scenarios/*.yaml) names them once; ``testbed scenario run`` starts a
profile's fleet on the local backend (a Mosquitto, the server and the clients as
processes, as ``testbed up --backend local``), sets every client's per-round dropout
probability in the devices file (the server applies it, runner/server.py ``apply_dropout``),
injects each fault when the run has done its step, and prints the exactly-once audit
(analysis/audit.py). ``--fault-free`` runs the same profile, seed and steps without dropout
or faults: the baseline the scenario's final validation PPL is compared with.

A scenario file::

    description: ...
    dropout: 0.3                 # per-round dropout probability of every client
    steps: 12                    # optional: the run's length (else the profile's)
    options: {step_timeout: 20}  # optional RuntimeOptions
    faults:
      - {at_step: 2, kind: client-lost, client: client2}   # SIGKILL, never restarted
      - {at_step: 5, kind: broker-restart}                  # Mosquitto stopped and started
      - {at_step: 8, kind: server-kill, resume_after: 2}    # kill -9, then --resume

``at_step``: the fault is injected once the run has trained that many steps (a server kill
also waits for a checkpoint, so the resume has one to continue from). Every injection is
appended to ``events.jsonl`` as an ``inject`` event (``source: host``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runner.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"
KINDS = ("client-lost", "broker-restart", "server-kill")


class ScenarioError(UserError):
    """A scenario file that cannot be used (one line, exit code 2)."""


class Fault(BaseModel):
    """One fault: what, when (steps done), to whom."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    at_step: int = Field(ge=1)
    kind: Literal["client-lost", "broker-restart", "server-kill"]
    client: str | None = None
    resume_after: float = Field(default=2.0, ge=0.0)

    @model_validator(mode="after")
    def _client(self) -> Fault:
        if (self.kind == "client-lost") != (self.client is not None):
            raise ValueError("client-lost names a client; the other kinds take none")
        return self


class Scenario(BaseModel):
    """A scenario file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = ""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    steps: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    faults: list[Fault] = Field(default_factory=list)


def load_scenario(name: str) -> Scenario:
    """``scenarios/NAME.yaml`` or a path -> :class:`Scenario` (ScenarioError: one line)."""
    from testbed.yamlfile import read_yaml

    path = Path(name)
    if not path.suffix and not path.exists():
        path = SCENARIOS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.yaml"))) or "none"
        raise ScenarioError(f"no scenario {name!r}; available: {known} (or give a .yaml path)")
    doc, _ = read_yaml(path, str(path), ScenarioError)
    try:
        return Scenario.model_validate(doc or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "file"
        raise ScenarioError(f"{path}: {where}: {err['msg']}") from None


def scenario_config(profile: str, sc: Scenario, out: Path, *, steps: int | None, seed: int,
                    fault_free: bool, data: str | None = None,
                    eval_examples: int | None = None) -> tuple[Any, Any]:
    """(TrainConfig, RuntimeOptions) of the scenario's run: the profile's experiment mapped
    onto its stand-in, the scenario's length, the devices file (with every client's dropout
    unless ``fault_free``) written into ``out``."""
    from runner.distributed.runtime import RuntimeOptions
    from testbed import profiles as P

    prof = P.load_profile(profile)
    mapping = P.emulation_map(prof)
    cfg = P.train_config(prof, mapping)
    n = steps or sc.steps
    cfg = replace(cfg, seed=seed, **({"steps": n} if n else {}),
                  **({"data": data} if data else {}),
                  **({"eval_max_examples": eval_examples} if eval_examples else {}))
    unknown = [f.client for f in sc.faults if f.client and f.client not in
               [d.name for d in prof.devices]]
    if unknown:
        raise ScenarioError(f"the scenario names {unknown[0]!r}, not a client of profile "
                            f"{profile!r}")
    avail = [P.AvailabilitySpec(dropout=sc.dropout) if sc.dropout and not fault_free
             else P.AvailabilitySpec() for _ in prof.devices]
    out.mkdir(parents=True, exist_ok=True)
    devices = P.write_devices_file(mapping, out / "devices.json", avail)
    cfg = replace(cfg, devices=str(devices))
    cfg.validate()
    try:
        opts = RuntimeOptions(**sc.options)
        opts.validate()
    except TypeError as exc:
        raise ScenarioError(f"scenario options: {exc}") from None
    return cfg, opts


def _done_steps(run_dir: Path) -> int:
    from runner.rundir import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    return max((int(r["step"]) for r in rows if r.get("kind") == "train"), default=-1) + 1


def run_scenario(profile: str, sc: Scenario, out: Path, *, steps: int | None = None,
                 seed: int = 0, fault_free: bool = False, overwrite: bool = False,
                 data: str | None = None, eval_examples: int | None = None,
                 timeout: float = 3600.0, say: Any = print) -> dict[str, Any]:
    """Run the scenario (or its fault-free baseline) to the end; the summary, with the
    audit under ``audit`` and the injections under ``injected``."""
    import json

    from analysis.audit import audit_run
    from testbed.backends.compose_run import append_event
    from testbed.backends.local import LocalRun

    out = Path(out).resolve()  # the broker and the processes run from elsewhere
    cfg, opts = scenario_config(profile, sc, out, steps=steps, seed=seed,
                                fault_free=fault_free, data=data, eval_examples=eval_examples)
    opts = replace(opts, overwrite=overwrite)
    faults = [] if fault_free else sorted(sc.faults, key=lambda f: f.at_step)
    injected: list[dict[str, Any]] = []
    run = LocalRun(cfg, out, opts)
    run.start()
    say(f"run {run.run_id}: {cfg.method}, {len(run.clients)} clients, {cfg.steps} steps, "
        f"seed {cfg.seed}, dropout {0.0 if fault_free else sc.dropout:g}/round, "
        f"{len(faults)} faults; logs in {run.logs}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise UserError(f"the scenario did not finish within {timeout:.0f} s; logs in "
                                f"{run.logs}")
            done = _done_steps(out)
            if faults and done >= faults[0].at_step:
                f = faults[0]
                if f.kind == "server-kill" and not (out / "checkpoint" / "server.pt").is_file():
                    pass  # no checkpoint yet: the resume would start over; wait for one
                else:
                    faults.pop(0)
                    injected.append(_inject(run, f, done, append_event, say))
                    continue
            rc = run.procs["server"].poll()
            if rc is not None:
                break
            time.sleep(0.2)
    finally:
        run.stop()
    if rc != 0:
        raise UserError(f"the server exited with code {rc}; see {run.logs / 'server.log'}")
    summary = json.loads((out / "summary.json").read_text())
    summary["audit"] = audit_run(out)
    summary["injected"] = injected
    return summary


def _inject(run: Any, f: Fault, done: int, append_event: Any, say: Any) -> dict[str, Any]:
    """Carry out one fault on the local run ``run``; what was done."""
    rec: dict[str, Any] = {"kind": f.kind, "at_step": done}
    # recorded first: the resumed server's own events must come after it
    append_event(run.run_dir, "inject", mode=f.kind, step=done,
                 **({"client": f.client} if f.client else {}))
    if f.kind == "client-lost":
        assert f.client is not None
        run.kill(f.client)
        rec["client"] = f.client
    elif f.kind == "broker-restart":
        assert run.broker is not None
        t0 = time.monotonic()
        run.broker.restart()
        run.write_state()
        rec["restart_s"] = round(time.monotonic() - t0, 3)
    else:
        run.kill("server")
        time.sleep(f.resume_after)
        run.spawn("server", resume=True)
        rec["resume_after"] = f.resume_after
    say(f"step {done}: {f.kind}" + (f" ({f.client})" if f.client else ""))
    return rec
