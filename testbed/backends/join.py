"""``testbed join``: a real device joins a running fleet as one of its clients.

Why: emulated clients answer what a method does under a profile's budgets; a researcher
with a Jetson-class board wants the same run with the board in it. ``testbed up --profile
NAME --join-slot client4`` (local backend) starts the broker, the server and every client
except ``client4``, and writes ``RUN/join/client4.json``: a join file (mode 0600) holding
what a device needs and nothing it must not see: the broker's URL, the run id, the client's
name and password, and the run's configuration (the training configuration, its device
description, the runtime options). Copy it to the device; there

    testbed join --broker mqtt://SERVER:PORT --run-id RUN --client client4 \\
        --credentials client4.json --model /path/to/the/stand-in --data /path/to/e2e.csv

runs ``python -m runner.client`` with that configuration, the broker address as the device
sees it, and the model and data at their paths on the device. The client finds its own
memory budget as every client does (runner/emulation/budget.py: NVML on a GPU, else its cgroup's
limit, else the profile's value, reported with its source) and reports it in its
heartbeats; the server treats it as any other client of the run (join, steps, repair,
offline detection): nothing on the server knows the client is real.

The run id and client name are given on the command line as well as in the file so that a
file copied to the wrong device fails at once, in one line, instead of joining as someone
else.

When the run's broker speaks TLS (``testbed up --listen 0.0.0.0``, or ``--tls on``), the join
file also carries the run's CA certificate and, with ``--mtls``, the client's own certificate
and private key (PEM text: the file is the one bundle to copy); ``prepare`` writes them into
the device's working directory (the key with mode 0600) and the broker URL must then be
``mqtts://``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from runner.distributed.broker import parse_broker_url, write_private
from runner.distributed.tls import ENV_CA, ENV_CERT, ENV_KEY, ClientTLS, write_secret
from runner.errors import UserError

FORMAT = "hsplitlora-join/1"
JOIN_DIR = "join"
ROOT = Path(__file__).resolve().parents[2]


def write_join_file(run_dir: Path, *, client: str, broker: str, run_id: str, password: str,
                    config_path: Path, tls: ClientTLS | None = None) -> Path:
    """``RUN/join/<client>.json`` for the device that will take ``client``'s slot. The
    devices file the configuration names is inlined (the device has no run directory), and
    so are the TLS files ``tls`` names (the CA; with mutual TLS the client's certificate and
    key)."""
    runtime = json.loads(Path(config_path).read_text())
    devices = runtime.get("train", {}).get("devices")
    inlined = json.loads(Path(devices).read_text()) if devices else None
    doc = {"format": FORMAT, "client": client, "run_id": run_id, "broker": broker,
           "password": password, "runtime": runtime, "devices": inlined}
    if tls is not None:
        doc["tls"] = {k: Path(v).read_text() for k, v in
                      (("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)) if v is not None}
    path = Path(run_dir) / JOIN_DIR / f"{client}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def read_join_file(path: Path) -> dict[str, Any]:
    """A join file, checked enough that every later read is safe (one-line errors)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read the credentials file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not a join file (not JSON: {exc.msg}, line "
                        f"{exc.lineno}); use the RUN/join/CLIENT.json `testbed up "
                        "--join-slot` wrote") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path} is not a join file ({FORMAT}); use the RUN/join/CLIENT.json "
                        "`testbed up --join-slot` wrote")
    for key in ("client", "run_id", "broker", "password", "runtime"):
        if key not in doc:
            raise UserError(f"{path}: the join file has no {key!r}")
    return doc


def prepare(credentials: Path, workdir: Path, *, broker: str | None = None,
            run_id: str | None = None, client: str | None = None, model: str | None = None,
            data: str | None = None, device: str | None = None) -> dict[str, str]:
    """Write the device's own run configuration into ``workdir`` and return the environment
    ``python -m runner.client`` needs. Names given here must match the file's."""
    doc = read_join_file(credentials)
    if run_id is not None and run_id != doc["run_id"]:
        raise UserError(f"--run-id {run_id!r} but {credentials} is for run {doc['run_id']!r}")
    if client is not None and client != doc["client"]:
        raise UserError(f"--client {client!r} but {credentials} is the join file of "
                        f"{doc['client']!r}")
    url = broker or doc["broker"]
    address = parse_broker_url(url)  # BrokerError (a UserError): one line naming the URL
    tls = doc.get("tls")
    if tls is not None and not address.tls:
        raise UserError(f"the run's broker speaks TLS but --broker {url} is plain MQTT: use "
                        f"mqtts://{address.host}:{address.port}")
    if tls is None and address.tls:
        raise UserError(f"the run's broker speaks plain MQTT (the join file has no TLS "
                        f"certificates) but --broker {url} asks for TLS: use "
                        f"mqtt://{address.host}:{address.port}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runtime = dict(doc["runtime"])
    train = dict(runtime["train"])
    if model is not None:
        train["model"] = model
    if data is not None:
        train["data"] = data
    if device is not None:  # this device's own (runner/device.py); the run's otherwise
        train["device"] = device
    if doc.get("devices") is not None:
        (workdir / "devices.json").write_text(json.dumps(doc["devices"], indent=1) + "\n")
        train["devices"] = str(workdir / "devices.json")
    runtime.update({"train": train, "run_dir": str(workdir), "broker": url})
    (workdir / "runtime.json").write_text(json.dumps(runtime, indent=1, sort_keys=True) + "\n")
    write_private(workdir / "password", str(doc["password"]) + "\n")
    me = str(doc["client"])
    env = {k: v for k, v in os.environ.items()
           if k not in ("TESTBED_PASSWORD", "TESTBED_BUDGET_BYTES", ENV_CA, ENV_CERT, ENV_KEY)}
    if tls is not None:
        env.update(_write_tls(tls, workdir / "tls", credentials).env())
    env.update({"TESTBED_CONFIG": str(workdir / "runtime.json"), "TESTBED_BROKER": url,
                "TESTBED_RUN_ID": str(doc["run_id"]), "TESTBED_CLIENT_ID": me,
                "TESTBED_USERNAME": me, "TESTBED_PASSWORD_FILE": str(workdir / "password"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                            env.get("PYTHONPATH")]))})
    budget = _profile_budget(doc.get("devices"), me)
    if budget is not None:  # the last resort of runner/emulation/budget.py, after NVML and cgroups
        env["TESTBED_BUDGET_BYTES"] = str(budget)
    return env


def _write_tls(tls: Any, directory: Path, credentials: Path) -> ClientTLS:
    """The join file's TLS files on the device: ca.crt, and client.crt + client.key (mode
    0600) with mutual TLS."""
    if not isinstance(tls, dict) or not isinstance(tls.get("ca"), str) or (
            ("cert" in tls) != ("key" in tls)):
        raise UserError(f"{credentials}: the join file's tls entry is damaged (it needs the CA "
                        "and, with mutual TLS, both the certificate and the key); copy the "
                        "file again")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    (directory / "ca.crt").write_text(tls["ca"])
    if "cert" not in tls:
        return ClientTLS(str(directory / "ca.crt"))
    (directory / "client.crt").write_text(str(tls["cert"]))
    write_secret(directory / "client.key", str(tls["key"]).encode())
    return ClientTLS(str(directory / "ca.crt"), str(directory / "client.crt"),
                     str(directory / "client.key"))


def _profile_budget(devices: Any, me: str) -> int | None:
    """The profile's budget for ``me`` from an inlined devices file, if it has one."""
    rows = devices.get("clients") if isinstance(devices, dict) else devices
    for row in rows or []:
        if isinstance(row, dict) and row.get("name") == me and row.get("memory_bytes"):
            return int(row["memory_bytes"])
    return None


def run_client(env: dict[str, str]) -> int:
    """``python -m runner.client`` in the foreground, its log on this terminal."""
    proc = subprocess.run([sys.executable, "-m", "runner.client"], env=env, check=False)
    return proc.returncode


__all__ = ["JOIN_DIR", "prepare", "read_join_file", "run_client", "write_join_file"]
