"""Memory model vs measured peak training memory of a client process.

For each (split point, rank) configuration a *fresh* subprocess imports the runtime, loads a
client segment of the model with LoRA, and trains a few steps (forward to the cut, backward
from a gradient of the boundary activations, AdamW step), then reports its peak RSS. The
parent predicts the same process's peak with :func:`runner.methods.memory.client_memory`, using:

* the runtime reserve measured once, in a separate fresh process, right after imports;
* per-block activation bytes calibrated once by one probe (saved-tensor hooks, one block).

Each configuration is measured twice: with glibc's default allocator settings and with
``MALLOC_MMAP_THRESHOLD_=65536`` (:data:`runner.methods.memory.ALLOCATOR_ENV`), which client
processes of the testbed set. With the default, glibc raises its mmap threshold after the
first large free and keeps later activations on the heap, so the peak RSS of a multi-step
run sits ~25 % above what the tensors need; with the fixed threshold, freed activations go
back to the OS and the peak follows the model.

Run: ``.venv/bin/python bench/memory_model.py --model smollm2-135m``; results go in
docs/benchmarks.md (issue: memory model within +-15 % for >= 3 configurations). A quick
check (tests/test_bench.py): ``--model tiny-llama --configs 2:4 --batch 2 --seq 16 --steps 1
--allocators fixed``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys, torch
    from runner.model import lora, models, split
    from runner.methods import memory
    torch.set_num_threads(1)
    name, k, rank, batch, seq, steps, targets = sys.argv[1:8]
    k, rank, batch, seq, steps = int(k), int(rank), int(batch), int(seq), int(steps)
    reserve = memory.measure_runtime_reserve()
    if k == 0:
        print(json.dumps({"reserve": reserve})); sys.exit(0)
    info = models.model_info(name)
    seg = split.load_client(info.path, k)
    ranks = lora.uniform_ranks(seg.config, rank, tuple(targets.split(",")))
    lora.attach_lora(seg, ranks, alpha=32, dropout=0.1, seed=0)
    seg.model.train()
    opt = torch.optim.AdamW([p for p in seg.model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, int(seg.config.vocab_size), (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    for _ in range(steps):
        acts = split.client_forward(seg, ids, mask)
        acts.backward(torch.randn_like(acts) * 1e-3)
        opt.step(); opt.zero_grad(set_to_none=True)
    print(json.dumps({"reserve": reserve, "peak": memory.peak_rss_bytes()}))
""")


def child(*args: object, allocator: str = "fixed") -> dict:
    from runner.methods.memory import ALLOCATOR_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if allocator == "fixed":
        env.update(ALLOCATOR_ENV)
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True,
                         text=True, check=True, timeout=900, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default="2:8,8:8,8:16,16:4,24:8",
                    help="comma-separated SPLIT:RANK pairs")
    ap.add_argument("--targets", default="q,v")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--allocators", choices=["both", "fixed"], default="both",
                    help="fixed: measure only with the testbed's allocator setting (one child "
                         "process per configuration instead of two; a quick run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from runner.methods import memory
    from runner.model import lora, models, split

    torch.set_num_threads(1)
    info = models.model_info(args.model)
    reserve = child(args.model, 0, 0, 0, 0, 0, args.targets)["reserve"]
    probe = split.load_client(info.path, 1)
    lora.attach_lora(probe, lora.uniform_ranks(probe.config, 8, tuple(args.targets.split(","))),
                     alpha=32, dropout=0.1, seed=0)
    probe.model.train()
    costs = memory.ModelCosts.from_config(probe.config)
    analytic = costs.act_bytes_per_token_block
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    measured = memory.calibrate_block_activations(
        probe.model, lambda x: split.run_blocks(probe, x, mask, 0, 1), costs.hidden,
        args.batch, args.seq)
    # The probe ran LoRA on its block; the model counts LoRA activations separately.
    lora_per_token = sum(memory.lora_activation_bytes(costs.shapes[n][0], r, 1)
                         for n, r in lora.held_ranks(lora.uniform_ranks(
                             probe.config, 8, tuple(args.targets.split(","))), probe).items())
    costs.act_bytes_per_token_block = measured - lora_per_token
    print(f"model={args.model} batch={args.batch} seq={args.seq} steps={args.steps} "
          f"targets={args.targets} torch={torch.__version__}")
    print(f"runtime reserve (fresh process after imports): {reserve / 2**20:.1f} MiB")
    print(f"per-block activation bytes/token: calibrated {costs.act_bytes_per_token_block:.0f}"
          f" (analytic default {analytic:.0f})")
    rows = []
    print(f"{'split':>5} {'rank':>4} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7}"
          f" {'glibc default MiB':>18} {'error':>7}")
    for pair in args.configs.split(","):
        k, r = (int(x) for x in pair.split(":"))
        ranks = lora.uniform_ranks(probe.config, r, tuple(args.targets.split(",")))
        pred = memory.client_memory(costs, k, ranks, args.batch, args.seq, reserve=reserve)
        run = (args.model, k, r, args.batch, args.seq, args.steps, args.targets)
        got = child(*run, allocator="fixed")["peak"]
        dflt = child(*run, allocator="default")["peak"] if args.allocators == "both" else None
        err = (pred.total - got) / got
        err_d = (pred.total - dflt) / dflt if dflt else None
        rows.append({"split": k, "rank": r, "predicted": pred.total, "measured": got,
                     "error": err, "measured_default_malloc": dflt, "error_default_malloc":
                     err_d, "parts": pred.parts})
        default_cols = (f" {dflt / 2**20:>18.1f} {err_d:>+7.1%}" if dflt and err_d is not None
                        else f" {'-':>18} {'-':>7}")
        print(f"{k:>5} {r:>4} {pred.total / 2**20:>14.1f} {got / 2**20:>13.1f} {err:>+7.1%}"
              + default_cols)
    worst = max(abs(r["error"]) for r in rows)
    print(f"max |error| (testbed allocator setting) = {worst:.1%} (target <= 15%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reserve": reserve, "act_bytes_per_token_block":
                       costs.act_bytes_per_token_block, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
