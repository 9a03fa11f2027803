"""Every script in bench/ runs, on the tiny model for one step (or one small message), and
prints its ratio line: a benchmark nobody runs rots (``make bench`` once failed with
``AttributeError: 'StepRunner' object has no attribute 'vclock'``).

Each script runs as a subprocess whose stdout is a pipe, as a user's ``| tee log`` would.
What is checked is that it exits 0 and that its figure of merit parses as a positive number,
not the figure itself (timings on a shared 2-core machine mean nothing at this size).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner.distributed.broker import find_mosquitto

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None,
                                     reason="mosquitto not installed (apt-get install -y "
                                            "mosquitto)")


def _bench(script: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{script} exited {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    value = float(m.group(1))
    assert value > 0
    return value


def test_bench_scripts_are_all_covered() -> None:
    assert sorted(p.name for p in BENCH.glob("*.py")) == [
        "bf16_memory.py", "distributed_overhead.py", "fleet_scaling.py", "generation.py",
        "gpu_check.py", "memory_model.py", "roofline.py", "split_overhead.py", "transport.py"]


def test_split_overhead_one_step() -> None:
    out = _bench("split_overhead.py", "--model", "tiny-llama", "--split", "2", "--steps", "1",
                 "--warmup", "0", "--batch", "2", "--seq", "16", "--threads", "1")
    _number(rf"split/unsplit step time ratio \(median\): {NUMBER}", out)
    # both variants did the same arithmetic
    assert re.search(r"max \|loss\(split\) - loss\(unsplit\)\| over all steps = 0\.00e\+00",
                     out), out


def test_roofline_one_step() -> None:
    out = _bench("roofline.py", "--model", "tiny-llama", "--split", "2", "--batch", "2",
                 "--seq", "16", "--steps", "1", "--warmup", "0", "--reps", "1", "--min-time",
                 "0.002", "--profile-steps", "1", "--top", "5", "--threads", "1",
                 "--precisions", "fp32")
    _number(rf"FLOPs per step \(matrix products only\): {NUMBER} GFLOP", out)
    _number(rf"roofline fraction fp32 1 thread\(s\): {NUMBER} \(achieved {NUMBER} GFLOP/s, "
            rf"ceiling {NUMBER} GFLOP/s", out)
    assert "profile fp32, 1 thread, 1 step(s)" in out, out
    assert re.search(r"load average at end \(1m, 5m, 15m\): ", out), out


def test_memory_model_one_config() -> None:
    out = _bench("memory_model.py", "--model", "tiny-llama", "--configs", "2:4", "--batch",
                 "2", "--seq", "16", "--steps", "1", "--allocators", "fixed")
    _number(rf"runtime reserve \(fresh process after imports\): {NUMBER} MiB", out)
    row = re.search(rf"^\s+2\s+4\s+{NUMBER}\s+{NUMBER}\s+([-+][0-9.]+)%", out, re.MULTILINE)
    assert row, out
    predicted, measured = float(row.group(1)), float(row.group(2))
    assert predicted > 0 and measured > 0
    assert re.search(rf"max \|error\| \(testbed allocator setting\) = {NUMBER}%", out), out


def test_generation_three_variants() -> None:
    out = _bench("generation.py", "--model", "tiny-llama", "--data", "synthetic", "--mrs", "4",
                 "--variants", "legacy4,b2s,own2s", "--beams", "2", "--max-new-tokens", "4",
                 "--rounds", "1", "--threads", "1")
    _number(rf"speed-up of b2s over legacy4: {NUMBER} wall, {NUMBER} CPU", out)
    _number(rf"speed-up of own2s over legacy4: {NUMBER} wall, {NUMBER} CPU \({NUMBER} vs "
            rf"{NUMBER} MRs per CPU-second", out)
    # the sorted, re-batched decoding and our beam search gave the reference's outputs
    assert len(re.findall(r"identical outputs 4/4", out)) == 2, out


@needs_mosquitto
def test_transport_one_small_message() -> None:
    out = _bench("transport.py", "--sizes", "0.25", "--reps", "1", "--warmup", "0", "--tls")
    _number(rf"mqtt/tcp throughput ratio at 0\.25 MB: {NUMBER}", out)
    _number(rf"tls/plain at 0\.25 MB: paho {NUMBER}", out)  # the cost of TLS (issue 31)


@needs_mosquitto
def test_distributed_overhead_two_steps() -> None:
    # two steps: the distributed step time is the gap between consecutive steps
    out = _bench("distributed_overhead.py", "--model", "tiny-llama", "--steps", "2",
                 "--warmup", "0", "--clients", "2", "--batch", "2", "--max-len", "16",
                 "--threads", "1")
    _number(rf"in-process\s+median step\s+{NUMBER} ms", out)
    _number(rf"distributed median step\s+{NUMBER} ms", out)
    _number(rf"ratio distributed / in-process: {NUMBER}", out)


@needs_mosquitto
def test_fleet_scaling_two_sizes() -> None:
    out = _bench("fleet_scaling.py", "--model", "tiny-llama", "--methods", "splitlora",
                 "--clients", "2,3", "--steps", "2", "--batch", "2", "--max-len", "16",
                 "--server-chunk", "2")
    for n in (2, 3):
        line = next((x for x in out.splitlines() if f" {n} clients:" in x), "")
        _number(rf"server peak RSS\s+{NUMBER} MB", line)
        _number(rf"whole run PSS\s+{NUMBER} MB", line)
        _number(rf"step {NUMBER} s", line)
        # every client was sampled: the smallest client peak is a real figure
        _number(rf"clients peak RSS {NUMBER}/", line)


def test_fleet_profile_repeats_the_llama2_devices(tmp_path: Path) -> None:
    """The container fleet of ``fleet_scaling.py --backend compose`` is a valid profile whose
    client i is hetero-llama2's device i mod 5."""
    import importlib.util

    from testbed.profiles import load_profile

    spec = importlib.util.spec_from_file_location("fleet_scaling", BENCH / "fleet_scaling.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = load_profile("hetero-llama2")
    fleet = load_profile(str(mod.fleet_profile(12, tmp_path / "fleet.yaml")))
    assert [d.name for d in fleet.devices] == [f"client{i}" for i in range(12)]
    assert [d.memory for d in fleet.devices] == [base.devices[i % 5].memory for i in range(12)]
    assert fleet.experiment == base.experiment
    # --memory-scale: the same spread of smaller devices, everything else as it was
    half = load_profile(str(mod.fleet_profile(7, tmp_path / "half.yaml", 0.5)))
    assert [d.memory for d in half.devices] == pytest.approx(
        [base.devices[i % 5].memory / 2 for i in range(7)], rel=1e-3)
    assert [d.compute for d in half.devices] == [base.devices[i % 5].compute for i in range(7)]


@needs_mosquitto
def test_gpu_check_dry_run_on_the_cpu(tmp_path: Path) -> None:
    """``bench/gpu_check.py --device cpu``: the GPU check's dry run (issue 27 part 6), every
    part of it on tiny settings, so the script a GPU host runs once cannot rot. No GPU is
    faked: the device is the CPU (compared with itself), NVML answers nothing here, and the
    five-client fleet runs as local processes with a real Mosquitto."""
    out = _bench("gpu_check.py", "--device", "cpu", "--out", str(tmp_path / "check"),
                 "--json", str(tmp_path / "check.json"), timeout=400)
    assert "DRY RUN on the CPU" in out
    assert re.search(r"split step cpu vs cpu \(fp32 loss\)\s+yes\s+rel\. diff 0\.0e\+00 at "
                     r"step 0 \(<= 0\.0001\), max 0\.0e\+00", out), out
    assert re.search(r"bf16 vs fp32 loss on cpu\s+yes", out), out
    _number(rf"step throughput cpu / cpu\s+-\s+{NUMBER}x", out)
    assert re.search(r"^NVML\s+-\s+no answer", out, re.MULTILINE) or "NVML GPU 0" in out
    assert re.search(r"fleet: hsplitlora, 5 clients \+ server on cpu\s+yes\s+3 steps", out), out
    for i in range(5):
        _number(rf"client{i} GPU memory vs budget\s+-\s+budget {NUMBER} MiB", out)
    assert re.search(r"gpu_check: \d+ checks, 0 failed", out), out
    assert (tmp_path / "check" / "fleet" / "report.md").is_file()
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    fleet = next(r for r in rows if r["check"].startswith("fleet:"))
    assert fleet["ok"] and fleet["data"]["ppl"] > 0


def test_bf16_memory_three_variants() -> None:
    out = _bench("bf16_memory.py", "--model", "tiny-llama", "--split", "1", "--steps", "4",
                 "--batch", "2", "--max-len", "24")
    _number(rf"peak ratio bf16 longest / bf16 padded: {NUMBER}", out)
    _number(rf"peak ratio bf16 padded / fp32: {NUMBER}", out)
    assert len(re.findall(r"^\s+(fp32|bf16)\s+(longest|x16)\s", out, re.MULTILINE)) == 3, out
