"""Memory and step time of a distributed run as the fleet grows (issue 15 part 4).

For each method and number of clients N, one run of broker + ``python -m runner.server`` +
N ``python -m runner.client`` processes (testbed/backends/local.py, the local backend) trains a few
steps while this script samples, once a second, every process of the run:

* **peak RSS** (``VmHWM``) of the server and of each client;
* **PSS** (``/proc/PID/smaps_rollup``): resident memory with shared pages (the libraries'
  code, read-only data) divided among the processes that map them, so the sum over the run's
  processes is what the run costs the host; the figure of merit for "N clients on one host";
* the host's ``MemAvailable``: its drop from before the run to the lowest point during it
  (includes page cache and anything else running, so only meaningful on a quiet machine).

Step time is the median gap between the first ``train`` record of consecutive steps in the
run's metrics (the server writes them as each step closes), and ``server_s`` the server's
compute share of a step. ``--fork-clients`` forks the clients from one process that has
imported their runtime (runner/forkserver.py, sampled too), which shares its pages.
``--server-chunk`` (clients per server forward/backward) is passed to the runs: 0
concatenates all clients in one pass (docs/method.md "Training step"), whose autograd graph
grows with N; a positive value bounds it.

``--backend compose`` runs the fleet as containers instead (``testbed up --backend compose
--host-network``, testbed/backends/compose_run.py) on a profile of N devices: the five
Jetson-class devices of profiles/hetero-llama2.yaml repeated (client{i} is device i mod 5),
each container capped to its emulated budget plus the runtime reserve as ``testbed up``
does for any profile. Every container's main process is sampled through its host PID
(``docker inspect``), so the columns mean the same; containers share no anonymous pages, so
a container fleet's PSS is the figure to compare with ``--fork-clients``.

The table's last column is each row's server peak RSS against the same method's row with
the fewest clients (the issue's target: at most 1.5x at 32 clients against 5).

Usage::

    .venv/bin/python bench/fleet_scaling.py --model smollm2-135m --methods splitlora,hsplitlora \\
        --clients 5,10,20,32 --steps 2 --batch 2 --server-chunk 5 [--json PATH]

Containers (needs the images, ``testbed images build``)::

    .venv/bin/python bench/fleet_scaling.py --backend compose --methods splitlora \
        --clients 5,32 --steps 2 --batch 2 --server-chunk 5

A quick check (tests/test_bench.py): ``--model tiny-llama --methods splitlora --clients 2,3
--steps 2 --batch 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 2**20


def _kib(path: Path, field: str) -> int | None:
    """A ``field:  N kB`` line of a /proc file, in bytes (None when gone or absent)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Sampler:
    """Samples the run's processes and the host once a second in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.hwm: dict[str, int] = {}
        self.pss: dict[str, int] = {}
        self.pss_total = 0
        self.avail_before = _kib(Path("/proc/meminfo"), "MemAvailable") or 0
        self.avail_min = self.avail_before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(1.0)

    def sample(self) -> None:
        total = 0
        for who, pid in list(self.pids.items()):
            proc = Path(f"/proc/{pid}")
            hwm = _kib(proc / "status", "VmHWM")
            pss = _kib(proc / "smaps_rollup", "Pss")
            if hwm:
                self.hwm[who] = max(self.hwm.get(who, 0), hwm)
            if pss:
                self.pss[who] = max(self.pss.get(who, 0), pss)
                total += pss
        self.pss_total = max(self.pss_total, total)
        avail = _kib(Path("/proc/meminfo"), "MemAvailable")
        if avail:
            self.avail_min = min(self.avail_min, avail)


def fleet_profile(n: int, path: Path, memory_scale: float = 1.0) -> Path:
    """profiles/hetero-llama2.yaml with its five devices repeated to ``n`` clients, each
    device's memory budget times ``memory_scale``.

    Why the scale: hsplitlora's ARMSC plans every client to use its budget, so a container
    fleet needs the sum of its budgets in host memory; hetero-llama2's 5-20 GB devices map to
    0.74-1.9 GB SmolLM2 containers, ~38 GB for 32 of them. A fleet of smaller devices (the
    same spread, scaled) is what fits 32 on one 24 GiB host.
    """
    import yaml

    from testbed.profiles import PROFILES_DIR, parse_bytes

    doc = yaml.safe_load((PROFILES_DIR / "hetero-llama2.yaml").read_text())
    base = doc["devices"]
    if memory_scale != 1.0:
        base = [{**d, "memory": f"{parse_bytes(d['memory']) * memory_scale / 1e9:.4g}GB"}
                for d in base]
    doc["devices"] = [{**base[i % len(base)], "name": f"client{i}"} for i in range(n)]
    scaled = f", memory x {memory_scale:g}" if memory_scale != 1.0 else ""
    doc["description"] = (f"hetero-llama2's devices repeated to {n} clients{scaled} "
                          "(fleet_scaling)")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def container_pids(project: str, pids: dict[str, int]) -> None:
    """Add the host PID of each running server / client container of ``project`` to
    ``pids`` (a container's main process is ``python -m runner.server`` / ``runner.client``),
    as they appear."""
    from testbed.backends.compose_run import project_containers

    try:
        found = project_containers(project)
    except Exception:  # noqa: BLE001 - the daemon is busy: try again next second
        return
    for service, c in found.items():
        pid = int((c.attrs.get("State") or {}).get("Pid") or 0)
        if service != "broker" and pid > 0:
            pids[service] = pid


def run_containers(args: argparse.Namespace, method: str, n: int, out: Path,
                   tmp: Path) -> tuple[int, Sampler, str]:
    """``testbed up --backend compose`` on an n-device profile, sampled while it runs."""
    from testbed.backends.compose_run import project_name

    profile = fleet_profile(n, tmp / f"fleet-{n}.yaml", args.memory_scale)
    argv = [sys.executable, "-m", "testbed.cli", "up", "--profile", str(profile),
            "--backend", "compose", "--host-network", "--method", method,
            "--data", args.data, "--steps", str(args.steps), "--batch-size", str(args.batch),
            "--agg-interval", str(args.steps), "--eval-every", str(10**9),
            "--eval-max-examples", "8", "--max-len", str(args.max_len), "--seed", "0",
            "--server-chunk", str(args.server_chunk), "--step-timeout", "1800",
            "--join-timeout", "1800", "--offline-after", "300", "--heartbeat", "2",
            "--out", str(out), "--overwrite"]
    pids: dict[str, int] = {}
    project = project_name(out.name)
    log = tmp / "up.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        with Sampler(pids) as sampler:
            try:
                while proc.poll() is None:
                    container_pids(project, pids)
                    time.sleep(1.0)
            finally:
                if proc.poll() is None:  # interrupted: `testbed up` takes its fleet down
                    proc.send_signal(signal.SIGINT)
                    proc.wait(120)
    return proc.returncode, sampler, log.read_text()[-3000:]


def measure(args: argparse.Namespace, method: str, n: int) -> dict[str, Any]:
    from runner.config import TrainConfig
    from runner.distributed.runtime import RuntimeOptions
    from runner.rundir import read_jsonl
    from testbed.backends.local import LocalRun

    if args.backend == "compose":
        with tempfile.TemporaryDirectory(prefix="hsl-scaling-") as tmp:
            out = Path(tmp) / f"scaling-{method}-{n}"
            t0 = time.monotonic()
            rc, sampler, tail = run_containers(args, method, n, out, Path(tmp))
            if rc != 0:
                sys.exit(f"{method} x {n} (containers): testbed up exited with {rc}:\n{tail}")
            wall = time.monotonic() - t0
            train = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
        return summarise(args, method, n, sampler, train, wall)

    cfg = TrainConfig(method=method, model=args.model, data=args.data, clients=n,
                      steps=args.steps, batch_size=args.batch, max_len=args.max_len,
                      agg_interval=args.steps, eval_every=10**9, eval_max_examples=8,
                      server_chunk=args.server_chunk, seed=0)
    cfg.validate()
    with tempfile.TemporaryDirectory(prefix="hsl-scaling-") as tmp:
        out = Path(tmp) / "run"
        opts = RuntimeOptions(step_timeout=1800, join_timeout=1800, offline_after=300,
                              heartbeat=2.0)
        t0 = time.monotonic()
        with LocalRun(cfg, out, opts, fork_clients=args.fork_clients) as run:
            run.start()
            pids = {who: p.pid for who, p in run.procs.items() if who != "broker"}
            if run.forkserver is not None:  # its pages are the clients' shared runtime
                pids["forkserver"] = run.forkserver.pid
            with Sampler(pids) as sampler:
                rc = run.wait(args.timeout)
            if rc != 0:
                sys.exit(f"{method} x {n}: server exited with {rc}:\n{run.log_tail('server')}")
        wall = time.monotonic() - t0
        train = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    return summarise(args, method, n, sampler, train, wall)


def summarise(args: argparse.Namespace, method: str, n: int, sampler: Sampler,
              train: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """One table row from a run's samples and its ``train`` metrics records."""
    first: dict[int, float] = {}
    for r in train:
        first.setdefault(r["step"], r["wall_time"])
    steps = sorted(first)
    gaps = [first[b] - first[a] for a, b in zip(steps, steps[1:], strict=False) if b == a + 1]
    server_s = [r["server_s"] for r in train if r.get("server_s") is not None]
    clients = [v for who, v in sampler.hwm.items() if who.startswith("client")]
    client_pss = [v for who, v in sampler.pss.items() if who.startswith("client")]
    return {
        "method": method, "clients": n, "server_chunk": args.server_chunk,
        "fork_clients": args.fork_clients, "backend": args.backend,
        "server_peak_rss_mb": sampler.hwm.get("server", 0) / MB,
        "server_peak_pss_mb": sampler.pss.get("server", 0) / MB,
        "client_peak_rss_mb": [min(clients) / MB, statistics.median(clients) / MB,
                               max(clients) / MB] if clients else None,
        "client_peak_pss_median_mb": statistics.median(client_pss) / MB if client_pss else None,
        "run_pss_peak_mb": sampler.pss_total / MB,
        "host_drop_mb": (sampler.avail_before - sampler.avail_min) / MB,
        "step_s": statistics.median(gaps) if gaps else None,
        "server_s": statistics.median(server_s) if server_s else None,
        "wall_s": wall, "load_avg": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--methods", default="splitlora,hsplitlora")
    ap.add_argument("--clients", default="5,10,20,32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--server-chunk", type=int, default=0)
    ap.add_argument("--fork-clients", action="store_true",
                    help="fork the clients from one process that imported their runtime "
                         "(runner/forkserver.py)")
    ap.add_argument("--backend", choices=["local", "compose"], default="local",
                    help="local: processes (testbed/backends/local.py); compose: containers "
                         "on hetero-llama2's devices repeated to N (needs the images)")
    ap.add_argument("--memory-scale", type=float, default=1.0,
                    help="compose: multiply each device's memory budget (a fleet of smaller "
                         "devices; hsplitlora fills its budgets, so 32 hetero-llama2 devices "
                         "need ~38 GB)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("need --steps >= 2 (a step time is the gap between two consecutive steps)")
    if args.memory_scale <= 0:
        ap.error("--memory-scale must be > 0")
    if args.memory_scale != 1.0 and args.backend != "compose":
        ap.error("--memory-scale scales the container fleet's devices: use --backend compose")
    if args.backend == "compose" and args.fork_clients:
        ap.error("--fork-clients is for processes: containers cannot share a fork server's "
                 "pages (use --backend local)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N+1 processes share the cores
    # SIGTERM unwinds like Ctrl-C, so LocalRun stops the run's broker, server and clients
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = [int(x) for x in args.clients.split(",")]
    rows = []
    for method in args.methods.split(","):
        base = None
        for n in sizes:
            row = measure(args, method, n)
            base = base or row["server_peak_rss_mb"]
            row["server_vs_fewest"] = row["server_peak_rss_mb"] / base if base else None
            rows.append(row)
            lo, med, hi = row["client_peak_rss_mb"] or (0, 0, 0)
            print(f"{method:>10} {n:>3} clients: server peak RSS {row['server_peak_rss_mb']:7.0f} "
                  f"MB ({row['server_vs_fewest']:.2f}x of {sizes[0]} clients), PSS "
                  f"{row['server_peak_pss_mb']:6.0f} MB; clients peak RSS {lo:.0f}/{med:.0f}/"
                  f"{hi:.0f} MB (min/median/max), PSS median "
                  f"{row['client_peak_pss_median_mb'] or 0:.0f} MB; whole run PSS "
                  f"{row['run_pss_peak_mb']:7.0f} MB, host MemAvailable drop "
                  f"{row['host_drop_mb']:7.0f} MB; step {row['step_s'] or 0:.2f} s "
                  f"(server {row['server_s'] or 0:.2f} s); load {row['load_avg']:.2f}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
