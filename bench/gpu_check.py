"""The GPU path in one run: does training on a CUDA GPU agree with the CPU, and do the
fleet's budgets hold on the card? (issue 27 part 6; docs/gpu.md)

One script, at most 8 minutes on one GPU, one table at the end:

1. **split step, device vs CPU**: the in-process trainer (``runner.trainer.Trainer``, the
   same code as every run) trains SplitLoRA for ``--steps`` steps on the device and on the
   CPU from the same seed, data and adapters, LoRA dropout 0 (no random draws, so the two
   runs do the same arithmetic): the losses must agree within fp32 tolerance
   (``--fp32-rtol`` relative at the first step, a pure forward; ten times that after the
   optimizer steps, which carry the rounding differences along; TF32 matmuls stay off,
   torch's default).
2. **bf16 vs fp32**: the same steps on the device under bf16 autocast (fp16 with a loss
   scaler where the GPU has no bf16): the loss moves by reduced-precision rounding only
   (``--bf16-rtol``).
3. **throughput**: median step time on the CPU over the device's (first step excluded).
4. **NVML and MIG listing**, read only: every GPU NVML sees, its memory and MIG mode, and
   each MIG instance by UUID with its own memory (runner/emulation/budget.py
   ``nvml_inventory``). The testbed never creates, changes or destroys MIG instances.
5. **fleet**: ``testbed up --profile hetero-llama2 --backend local --device DEVICE``: the
   paper's five clients and the server on this one GPU, hsplitlora on the stand-in
   (SmolLM2, ``--fleet-model``), ``--fleet-steps`` steps with validation, then ``testbed
   eval`` and ``testbed report``. Each client caps its CUDA allocator to its budget
   (runner/emulation/gpu.py); the table shows per client its budget (the emulation
   mapping's), its cap, the allocator's peak against the cap, what NVML says the process
   holds on the GPU (CUDA context included) and its host peak (CUDA's host runtime).

``--device cpu`` is the dry run: the same five parts with tiny settings (the ``tiny-llama``
model, 2 comparison steps, a 3-step fleet, 2 test MRs) in under about 2 minutes on a small
CPU; "device vs CPU" then compares the CPU with itself, so it checks the script, not a GPU.
tests/test_bench.py runs it, so the script cannot rot before a GPU runs it.

Usage (on a GPU host; ``make gpu-check``)::

    .venv/bin/python bench/gpu_check.py --device cuda [--out runs/gpu-check] [--json PATH]

Exit status 0 when every check holds, 1 otherwise (the table says which).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402 - after the path

REPO = Path(__file__).resolve().parents[1]
E2E = REPO.parent / "shared" / "data" / "e2e" / "devset.csv"
MIB = 2**20


@dataclass
class Row:
    """One line of the table: what was checked, what came out, and whether it holds
    (None: information only)."""

    check: str
    value: str
    ok: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- 1-3: split steps
def data_arg(given: str | None) -> str:
    """--data, else the shared E2E devset where present, else synthetic data."""
    if given:
        return given
    return str(E2E) if E2E.is_file() else "synthetic"


def split_run(args: argparse.Namespace, device: str, precision: str) -> dict[str, Any]:
    """``args.steps`` SplitLoRA steps of the in-process trainer on ``device``: the losses
    and the step times (each step waits for the device)."""
    from runner.config import TrainConfig
    from runner.trainer import Trainer

    cfg = TrainConfig(method="splitlora", model=args.model, data=data_arg(args.data),
                      clients=1, steps=args.steps, batch_size=args.batch, max_len=args.seq,
                      lora_dropout=0.0, eval_every=10**9, eval_max_examples=8, seed=0,
                      precision=precision, device=device)
    cfg.validate()
    tr = Trainer(cfg)
    cuda = tr.device.type == "cuda"
    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        records = tr.train_step(step)
        if cuda:
            torch.cuda.synchronize(tr.device)
        times.append(time.perf_counter() - t0)
        losses.append(float(records[0]["loss"]))
    del tr
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"device": device, "precision": precision, "losses": losses, "times": times}


def median_step(times: list[float]) -> float:
    """Median step time without the first step (lazy initialisation, kernel loading)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def reduced_precision(device: str) -> str:
    """bf16 where the device has it, else fp16 (with a loss scaler, runner/trainer.py)."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def step_rows(args: argparse.Namespace) -> list[Row]:
    dev = split_run(args, args.device, "fp32")
    cpu = split_run(args, "cpu", "fp32")
    low_name = reduced_precision(args.device)
    low = split_run(args, args.device, low_name)
    diffs = [abs(a - b) / max(abs(b), 1e-12)
             for a, b in zip(dev["losses"], cpu["losses"], strict=True)]
    first, rel = diffs[0], max(diffs)  # step 0: one forward; later: after AdamW steps
    rel_low = max(abs(a - b) / max(abs(b), 1e-12)
                  for a, b in zip(low["losses"], dev["losses"], strict=True))
    t_dev, t_cpu, t_low = (median_step(r["times"]) for r in (dev, cpu, low))
    losses = ", ".join(f"{x:.5f}" for x in dev["losses"])
    return [
        Row(f"split step {args.device} vs cpu (fp32 loss)",
            f"rel. diff {first:.1e} at step 0 (<= {args.fp32_rtol:g}), max {rel:.1e} over "
            f"{args.steps} steps (<= {10 * args.fp32_rtol:g}); losses {losses}",
            first <= args.fp32_rtol and rel <= 10 * args.fp32_rtol,
            {"device": dev, "cpu": cpu, "first_rel_diff": first, "max_rel_diff": rel}),
        Row(f"{low_name} vs fp32 loss on {args.device}",
            f"max rel. diff {rel_low:.1e} (<= {args.bf16_rtol:g})", rel_low <= args.bf16_rtol,
            {"reduced": low, "max_rel_diff": rel_low}),
        Row(f"step throughput {args.device} / cpu",
            f"{t_cpu / t_dev:.1f}x (median step {t_dev * 1e3:.0f} ms vs {t_cpu * 1e3:.0f} ms "
            f"on the CPU; {low_name} {t_low * 1e3:.0f} ms)", None,
            {"device_s": t_dev, "cpu_s": t_cpu, "reduced_s": t_low}),
    ]


# ----------------------------------------------------------------------- 4: NVML / MIG
def nvml_rows() -> list[Row]:
    """The read-only NVML listing (and what torch sees)."""
    from runner.emulation.budget import GPUError, nvml_inventory

    rows = []
    if torch.cuda.is_available():
        seen = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            seen.append(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB")
        rows.append(Row("torch CUDA devices", "; ".join(seen) + f" (CUDA {torch.version.cuda})"))
    else:
        rows.append(Row("torch CUDA devices", "none (torch " + torch.__version__ + ")"))
    try:
        gpus = nvml_inventory()
    except GPUError as e:
        rows.append(Row("NVML", f"no answer: {e}"))
        return rows
    if not gpus:
        rows.append(Row("NVML", "no GPU"))
    for g in gpus:
        mig = ("MIG off" if g["mig"] is None else
               f"MIG on, {len(g['mig'])} instance(s)")
        rows.append(Row(f"NVML GPU {g['index']}",
                        f"{g['name']} {g['memory_bytes'] / 2**30:.1f} GiB {g['uuid']}; {mig}",
                        None, g))
        for m in g["mig"] or []:
            rows.append(Row(f"  MIG slot {m['slot']}",
                            f"{m['name']} {m['memory_bytes'] / 2**30:.2f} GiB {m['uuid']}"))
    return rows


# ---------------------------------------------------------------------------- 5: fleet
def fleet_profile(model: str, steps: int, data: str, path: Path) -> Path:
    """profiles/hetero-llama2.yaml with ``model`` as the stand-in, ``steps`` steps and one
    validation at the end."""
    import yaml

    from testbed.profiles import PROFILES_DIR

    doc = yaml.safe_load((PROFILES_DIR / "hetero-llama2.yaml").read_text())
    doc["experiment"].update(standin_model=model, steps=steps, eval_every=steps, data=data)
    doc["description"] = f"hetero-llama2 on {model}, {steps} steps (bench/gpu_check.py)"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def testbed(*argv: str, log: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m testbed.cli ARGV`` with its output in ``log``; raises with the tail on a
    non-zero exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "testbed.cli", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write(f"$ testbed {' '.join(argv)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"testbed {argv[0]} exited {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


CAP_LINE = re.compile(r"CUDA memory cap on (\S+): (\d+) MiB of ([0-9.]+) GiB")


def fleet_rows(args: argparse.Namespace, out: Path) -> list[Row]:
    """The five-client fleet on this device, evaluated and reported; a row per client."""
    from runner.methods.memory import DEFAULT_RESERVE
    from runner.rundir import read_jsonl

    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    profile = fleet_profile(args.fleet_model, args.fleet_steps, data_arg(args.data),
                            out / "fleet-profile.yaml")
    run = out / "fleet"
    t0 = time.perf_counter()
    testbed("up", "--profile", str(profile), "--backend", "local", "--device", args.device,
            "--steps", str(args.fleet_steps), "--eval-max-examples", str(args.eval_examples),
            "--out", str(run), "--overwrite", log=log, timeout=args.fleet_timeout)
    train_s = time.perf_counter() - t0
    testbed("eval", str(run), "--max-mrs", str(args.mrs), "--beams", str(args.beams),
            "--max-new-tokens", str(args.max_new_tokens), log=log, timeout=args.fleet_timeout)
    testbed("report", str(run), "-o", str(run / "report.md"), log=log, timeout=300)
    wall = time.perf_counter() - t0

    metrics = read_jsonl(run / "metrics.jsonl")
    evals = [r for r in metrics if r.get("kind") == "eval"]
    ppl = evals[-1].get("val_ppl") if evals else None
    scores: dict[str, Any] = {}
    with_scores = run / "eval" / "scores.json"
    if with_scores.is_file():
        scores = json.loads(with_scores.read_text()).get("scores") or {}
    devices = json.loads((run / "devices.json").read_text())["clients"]
    events = read_jsonl(run / "events.jsonl")
    over = [e for e in events if e.get("event") == "budget_exceeded"]
    violations = sum(e.get("event") == "budget_violation" for e in events)
    bleu = scores.get("BLEU")
    rows = [Row(f"fleet: hsplitlora, 5 clients + server on {args.device}",
                f"{args.fleet_steps} steps of {args.fleet_model} in {train_s:.0f} s "
                f"(with eval + report {wall:.0f} s); validation PPL "
                f"{ppl if ppl is None else f'{ppl:.2f}'}; BLEU "
                f"{bleu if bleu is None else f'{bleu:.4f}'} ({args.mrs} MRs); "
                f"{len(over)} budget_exceeded, {violations} budget_violation events; "
                f"report {run / 'report.md'}",
                not over and (run / "report.md").is_file(),
                {"run": str(run), "ppl": ppl, "scores": scores, "budget_exceeded": over})]
    on_gpu = args.device.startswith("cuda")
    for dev in devices:
        name, budget = dev["name"], int(dev["memory_bytes"])
        recs = [r for r in metrics if r.get("kind") == "resources" and r.get("client") == name]

        def peak(key: str, recs: list[dict[str, Any]] = recs) -> int | None:
            vals = [r[key] for r in recs if isinstance(r.get(key), int)]
            return max(vals) if vals else None

        cap_text = "no cap (CPU)"
        cap = None
        client_log = run / "logs" / f"{name}.log"
        if client_log.is_file() and (m := CAP_LINE.search(client_log.read_text())):
            cap = int(m.group(2)) * MIB
            cap_text = f"cap {m.group(2)} MiB"
        elif on_gpu:
            want = (budget - DEFAULT_RESERVE) / MIB
            cap_text = f"no cap line in its log (expected ~{want:.0f} MiB)"
        reserved = peak("cuda_peak_reserved_bytes")
        gpu_total = peak("memory_peak_bytes") if recs and recs[-1].get(
            "memory_source") == "nvml" else None
        host = peak("host_memory_peak_bytes") or peak("memory_peak_bytes")
        parts = [f"budget {budget / MIB:.0f} MiB", cap_text]
        if reserved is not None:
            parts.append(f"allocator peak {reserved / MIB:.0f} MiB")
        if gpu_total is not None:
            parts.append(f"GPU (NVML, context incl.) {gpu_total / MIB:.0f} MiB = "
                         f"{gpu_total / budget:.2f} x budget")
        if host is not None:
            parts.append(f"host peak {host / MIB:.0f} MiB")
        ok: bool | None = None
        if on_gpu:  # the allocator stayed within its cap, and nobody ran out of memory
            ok = (cap is not None and reserved is not None and reserved <= cap
                  and not any(e.get("client") == name for e in over))
        rows.append(Row(f"  {name} GPU memory vs budget", "; ".join(parts), ok,
                        {"budget_bytes": budget, "cap_bytes": cap, "reserved_peak": reserved,
                         "gpu_peak": gpu_total, "host_peak": host}))
    return rows


# ------------------------------------------------------------------------------- table
def print_table(rows: list[Row], title: str) -> None:
    width = max(len(r.check) for r in rows)
    print(title)
    print(f"{'check':<{width}}  {'ok':<4}  result")
    print(f"{'-' * width}  ----  {'-' * 40}")
    for r in rows:
        mark = "-" if r.ok is None else ("yes" if r.ok else "NO")
        print(f"{r.check:<{width}}  {mark:<4}  {r.value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda",
                   help="cuda, cuda:N, or cpu (the dry run: tiny settings) [cuda]")
    p.add_argument("--model", help="split-step model [smollm2-135m; dry run tiny-llama]")
    p.add_argument("--fleet-model", help="the fleet's stand-in [smollm2-135m; dry run "
                                         "tiny-llama]")
    p.add_argument("--data", help="E2E CSV or 'synthetic' [the shared devset if present]")
    p.add_argument("--steps", type=int, help="split steps compared [5; dry run 2]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, help="max tokens per example [64; dry run 32]")
    p.add_argument("--fleet-steps", type=int, help="fleet steps [20; dry run 3]")
    p.add_argument("--eval-examples", type=int, help="validation examples [64; dry run 8]")
    p.add_argument("--mrs", type=int, help="test MRs generated [50; dry run 2]")
    p.add_argument("--beams", type=int, help="beam width [10; dry run 2]")
    p.add_argument("--max-new-tokens", type=int, help="[64; dry run 8]")
    p.add_argument("--fp32-rtol", type=float, default=1e-4,
                   help="device vs CPU: max relative loss difference [1e-4]")
    p.add_argument("--bf16-rtol", type=float, default=3e-2,
                   help="bf16/fp16 vs fp32: max relative loss difference [3e-2]")
    p.add_argument("--fleet-timeout", type=float, default=360.0)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check",
                   help="where the fleet's run and the log go [runs/gpu-check]")
    p.add_argument("--skip-fleet", action="store_true", help="parts 1-4 only")
    p.add_argument("--json", type=Path, help="write every figure here too")
    args = p.parse_args(argv)
    dry = args.device == "cpu"
    defaults = {"model": ("smollm2-135m", "tiny-llama"),
                "fleet_model": ("smollm2-135m", "tiny-llama"), "steps": (5, 2),
                "seq": (64, 32), "fleet_steps": (20, 3), "eval_examples": (64, 8),
                "mrs": (50, 2), "beams": (10, 2), "max_new_tokens": (64, 8)}
    for key, (gpu_value, dry_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, dry_value if dry else gpu_value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from runner.device import resolve
    from runner.errors import UserError

    try:
        resolved = resolve(args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = (torch.cuda.get_device_name(resolved) if resolved.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    dry = " - DRY RUN on the CPU" if args.device == "cpu" else ""
    title = f"GPU check on {resolved} ({name}){dry}; torch {torch.__version__}"
    print(title, flush=True)
    t0 = time.perf_counter()
    rows: list[Row] = []
    rows += step_rows(args)
    print(f"split steps done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows += nvml_rows()
    if not args.skip_fleet:
        try:
            rows += fleet_rows(args, args.out)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rows.append(Row("fleet", f"failed: {e}", False))
    total = time.perf_counter() - t0
    rows.append(Row("wall time", f"{total:.0f} s", None))
    print()
    print_table(rows, title)
    failed = [r.check.strip() for r in rows if r.ok is False]
    print(f"gpu_check: {sum(r.ok is not None for r in rows)} checks, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"title": title, "rows": [
            {"check": r.check.strip(), "value": r.value, "ok": r.ok, "data": r.data}
            for r in rows]}, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
