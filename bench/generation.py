"""Generation throughput of `testbed eval` (MRs per CPU-second), decoding variants side by side.

What is measured: wall-clock time to beam-search one output for each of the first ``--mrs``
distinct MRs of the E2E dev set with docs/method.md's decoding (beam 10, length penalty 0.8, no
repeated 4-grams, at most 64 new tokens), on the adapter-less model (``--model``; a trained
run's model is merged before generation, so it has the same shapes and the same step time)
or on a run's trained model (``--run RUN``). The pretrained model rarely ends its text, so
its outputs run to the 64-token cap: the most work per MR; a trained model that ends its
sentences takes fewer steps, and a batch runs until its longest output ends.
Variants, named on the command line (``--variants``):

* ``legacyN``: the decoding loop as it was before this benchmark (batches of N in MR order
  under ``torch.no_grad``), kept here verbatim as the reference;
* ``bN``: :func:`runner.evaluation.evaluate.generate` with Hugging Face ``generate()``
  (``--decoder hf``: what `testbed eval` ran before our beam search; ``inference_mode``),
  batches of N in MR order; ``b16s`` is the reference our beam search is measured against;
* ``ownN``: the same with our beam search (runner/evaluation/beam.py, `testbed eval`'s
  default decoder);
* a trailing ``s`` (``bNs``, ``ownNs``): the MRs sorted by prompt length (less left padding
  per batch).

The figure of merit is MRs per CPU-second and each variant's speed-up over the first variant
(the reference); "identical" says whether every output is byte-identical to the
reference's, which is what makes a faster setting safe to use as `testbed eval`'s default.

Why the variants are interleaved: on a shared machine the speed drifts over a run, so the
variants run in rounds (A B C, then C B A, ...), each round timing every variant once over
all MRs, and the median over rounds is reported. One untimed warm-up generation (one MR)
runs first. The load average is recorded: compare absolute numbers only between quiet runs.
Both wall time and the process's CPU time (all threads) are recorded: on a machine where
other work competes for the cores, or where the process is paused (SIGSTOP) for a while,
the wall time is inflated and the CPU-time ratios are the ones to read (with ``--threads
1``: with more threads, spinning intra-op threads inflate CPU time under contention too).

Usage::

    .venv/bin/python bench/generation.py --model smollm2-135m --mrs 32 \\
        --variants b16s,own16s --rounds 2 --threads 1 [--json PATH]

(the command behind docs/benchmarks.md), and the same with ``--run RUN`` for a trained
model.

A quick check (tests/test_bench.py): ``--model tiny-llama --mrs 4 --variants legacy4,b2s,own2s
--beams 2 --max-new-tokens 4 --rounds 1``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table

from runner.dataset import data as data_mod
from runner.evaluation.evaluate import DecodeConfig, generate, load_run_model
from runner.model.models import load_full_model, load_tokenizer, model_info
from runner.rundir import RunDir
from testbed.tables import print_table

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
VARIANT = re.compile(r"^(legacy|b|own)(\d+)(s?)$")
CODE = {"legacy": "legacy", "b": "generate()", "own": "beam.py"}


@torch.no_grad()
def legacy_generate(model: torch.nn.Module, tokenizer: Any, mrs: list[str],
                    decode: DecodeConfig) -> list[str]:
    """runner.evaluation.evaluate.generate as it was before bench/generation.py (the reference)."""
    outputs: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(mrs), decode.batch_size):
            chunk = mrs[i:i + decode.batch_size]
            enc = tokenizer([data_mod.format_prompt(m) for m in chunk], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(
                **enc,
                num_beams=decode.num_beams,
                length_penalty=decode.length_penalty,
                no_repeat_ngram_size=decode.no_repeat_ngram_size,
                max_new_tokens=decode.max_new_tokens,
                early_stopping=True,
                do_sample=False,
                use_cache=True,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
    return outputs


@dataclass
class Variant:
    name: str
    decode: DecodeConfig
    run: Callable[[list[str]], list[str]]
    code: str
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def make_variants(spec: str, model: torch.nn.Module, tokenizer: Any,
                  args: argparse.Namespace) -> list[Variant]:
    variants = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        m = VARIANT.match(name)
        if m is None:
            raise SystemExit(f"bad variant {name!r}: use legacyN, bN[s] or ownN[s] "
                             "(e.g. b16s)")
        kind, batch, sort = m.group(1), int(m.group(2)), bool(m.group(3))
        if batch < 1 or (kind == "legacy" and sort):
            raise SystemExit(f"bad variant {name!r}: batch >= 1; legacy has no sorted form")
        decode = DecodeConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                              batch_size=batch, sort_by_length=sort,
                              decoder="beam" if kind == "own" else "hf")
        if kind == "legacy":
            def run(mrs: list[str], d: DecodeConfig = decode) -> list[str]:
                return legacy_generate(model, tokenizer, mrs, d)
        else:
            def run(mrs: list[str], d: DecodeConfig = decode) -> list[str]:
                return generate(model, tokenizer, mrs, d)
        variants.append(Variant(name, decode, run, code=CODE[kind]))
    if len({v.name for v in variants}) != len(variants) or not variants:
        raise SystemExit(f"--variants needs distinct names, got {spec!r}")
    return variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--run", type=Path, default=None,
                   help="a run directory: time its trained model (adapter merged, as `testbed "
                        "eval` loads it) instead of --model's pretrained weights")
    p.add_argument("--data", default=None,
                   help="E2E CSV or 'synthetic' (default: ../shared/data/e2e/devset.csv if "
                        "present, else synthetic)")
    p.add_argument("--mrs", type=int, default=32, help="distinct MRs, first in file order")
    p.add_argument("--variants", default="b16s,own16s",
                   help="comma-separated: legacyN | bN[s] (generate()) | ownN[s] (our beam "
                        "search); the first is the reference")
    p.add_argument("--rounds", type=int, default=2, help="timed passes over all variants")
    p.add_argument("--beams", type=int, default=DecodeConfig.num_beams)
    p.add_argument("--max-new-tokens", type=int, default=DecodeConfig.max_new_tokens)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: leave torch's default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.mrs < 1 or args.rounds < 1 or args.beams < 1 or args.max_new_tokens < 1:
        p.error("--mrs, --rounds, --beams and --max-new-tokens must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(soft_wrap=True)  # lines whole in a pipe (| tee log), as a user reads them
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else data_mod.SYNTHETIC)
    df = data_mod.load_e2e(data)
    mrs = list(dict.fromkeys(df["mr"]))[:args.mrs]
    if args.run is not None:  # a trained model stops its sentences: shorter outputs
        model, tokenizer, cfg = load_run_model(RunDir.open(args.run))
        model = model.to(args.device)
        args.model = f"{cfg.model} ({args.run})"
    else:
        info = model_info(args.model)
        tokenizer = load_tokenizer(info.path)
        model = load_full_model(info.path).to(args.device).eval()
    variants = make_variants(args.variants, model, tokenizer, args)
    prompt_tokens = [len(ids) for ids in tokenizer(
        [data_mod.format_prompt(m) for m in mrs], add_special_tokens=False)["input_ids"]]

    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": args.device, "loadavg_1m_start": os.getloadavg()[0], "model": args.model,
        "data": str(data), "mrs": len(mrs), "beams": args.beams,
        "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)],
    }
    console.print("[bold]generation throughput benchmark[/bold]  " + "  ".join(
        f"{key}={env[key]}" for key in ("torch", "transformers", "threads", "device", "model",
                                        "mrs", "beams", "max_new_tokens", "rounds")))
    console.print(f"data={data}  prompt tokens {min(prompt_tokens)}-{max(prompt_tokens)}  "
                  f"cpus={env['cpu_count']}  load(1m)={env['loadavg_1m_start']:.2f}",
                  highlight=False)

    variants[0].run(mrs[:1])  # warm-up: lazy initialisation, first-call dispatch
    gc.collect()
    gc.freeze()
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = v.run(mrs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            v.times.append(time.perf_counter() - t0)
            v.cpu_times.append(time.process_time() - c0)
            if v.outputs and out != v.outputs:  # decoding is deterministic: say so if not
                console.print(f"[yellow]warning:[/] {v.name}: outputs differ between rounds")
            v.outputs = out
            console.print(f"  round {r + 1}: {v.name:>9} {v.times[-1]:8.2f} s wall "
                          f"{v.cpu_times[-1]:8.2f} s CPU", highlight=False)
    env["loadavg_1m_end"] = os.getloadavg()[0]

    ref = variants[0]
    ref_s, ref_cpu = statistics.median(ref.times), statistics.median(ref.cpu_times)
    table = Table(title=f"{len(mrs)} MRs, beam {args.beams}, median of {args.rounds} round(s)")
    for col in ("variant", "batch", "sorted", "code", "wall s", "MRs/s", "speed-up",
                "CPU s", "CPU s/MR", "MRs/CPU-s", "speed-up (CPU)", "identical outputs"):
        table.add_column(col, justify="left" if col in ("variant", "code") else "right")
    rows = []
    for v in variants:
        med, cpu = statistics.median(v.times), statistics.median(v.cpu_times)
        same = sum(a == b for a, b in zip(v.outputs, ref.outputs, strict=True))
        row = {"variant": v.name, "batch": v.decode.batch_size,
               "sorted": v.decode.sort_by_length,
               "code": v.code,
               "times_s": v.times, "cpu_times_s": v.cpu_times, "median_s": med,
               "mrs_per_s": len(mrs) / med, "speedup": ref_s / med, "median_cpu_s": cpu,
               "cpu_s_per_mr": cpu / len(mrs), "mrs_per_cpu_s": len(mrs) / cpu,
               "speedup_cpu": ref_cpu / cpu,
               "identical": same, "of": len(mrs)}
        rows.append(row)
        table.add_row(v.name, str(row["batch"]), "yes" if row["sorted"] else "no", row["code"],
                      f"{med:.2f}", f"{row['mrs_per_s']:.3f}", f"{row['speedup']:.2f}x",
                      f"{cpu:.2f}", f"{row['cpu_s_per_mr']:.2f}", f"{row['mrs_per_cpu_s']:.3f}",
                      f"{row['speedup_cpu']:.2f}x",
                      f"{same}/{len(mrs)}")
    print_table(console, table)
    for row in rows[1:]:
        console.print(f"speed-up of {row['variant']} over {ref.name}: {row['speedup']:.3f} "
                      f"wall, {row['speedup_cpu']:.3f} CPU ({row['mrs_per_cpu_s']:.4f} vs "
                      f"{rows[0]['mrs_per_cpu_s']:.4f} MRs per CPU-second; "
                      f"{row['mrs_per_s']:.3f} vs {rows[0]['mrs_per_s']:.3f} MRs/s wall), "
                      "identical outputs "
                      f"{row['identical']}/{row['of']}", highlight=False)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "variants": rows,
                                         "outputs": {v.name: v.outputs for v in variants},
                                         "mrs": mrs}, indent=2) + "\n", encoding="utf-8")
        console.print(f"figures written to {args.json}", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
