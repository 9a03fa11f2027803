"""A client's resident memory over training steps, by precision and batch-length padding.

Why this exists: under bf16 autocast on a CPU, a client whose batches have free lengths (the
longest example of each batch, as fp32 training pads them) grew by about 18 MB a step with
no plateau, until the kernel OOM-killed it in its memory-capped container (the main job lost
4 of its 5 clients that way). oneDNN keeps state per matrix shape it meets; with lengths
rounded up to a multiple of 16 (runner/dataset/data.py ``BF16_LENGTH_MULTIPLE``) a run meets
a few shapes and the memory levels off.

Each variant runs in a *fresh* subprocess (its own allocator and oneDNN caches): a client
segment of the model with LoRA on all seven projections, trained ``--steps`` steps (forward
to the cut, backward from a gradient of the boundary activations, AdamW step) on batches
whose lengths are drawn from the same seeded stream in every variant. The subprocess
reports its resident memory after each step; this script prints, per variant, the memory
after the first step, at the end, the growth per step over the second half of the run, and
the peak, then the ratios of the peaks measured side by side.

Run: ``.venv/bin/python bench/bf16_memory.py --model smollm2-135m``; results go in
docs/benchmarks.md ("bf16 memory on CPU"). A quick check (tests/test_bench.py):
``--model tiny-llama --split 1 --steps 4 --batch 2 --max-len 24``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, random, sys, torch
    from runner.dataset import data
    from runner.model import lora, models, split
    from runner.methods import memory
    torch.set_num_threads(1)
    name, k, rank, batch, steps, lo, hi, precision, pad = sys.argv[1:10]
    k, rank, batch, steps, lo, hi = map(int, (k, rank, batch, steps, lo, hi))
    info = models.model_info(name)
    seg = split.load_client(info.path, k, precision)
    ranks = lora.uniform_ranks(seg.config, rank, ("q", "k", "v", "o", "gate", "up", "down"))
    lora.attach_lora(seg, ranks, alpha=32, dropout=0.1, seed=0)
    seg.model.train()
    opt = torch.optim.AdamW([p for p in seg.model.parameters() if p.requires_grad], lr=1e-4)
    multiple = data.length_multiple(precision) if pad == "padded" else 1
    rng = random.Random(0)
    rss = []
    for _ in range(steps):
        lengths = [rng.randint(lo, hi) for _ in range(batch)]
        examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
        b = data.collate(examples, 0, multiple)
        ids = torch.randint(0, int(seg.config.vocab_size), b["input_ids"].shape)
        acts = split.client_forward(seg, ids, b["attention_mask"])
        acts.backward(torch.randn_like(acts) * 1e-3)
        opt.step(); opt.zero_grad(set_to_none=True)
        with open("/proc/self/statm") as f:
            rss.append(int(f.read().split()[1]) * 4096)
    print(json.dumps({"rss": rss, "peak": memory.peak_rss_bytes()}))
""")

#: (precision, padding) of each variant, in the order printed.
VARIANTS = (("fp32", "free"), ("bf16", "free"), ("bf16", "padded"))


def run_variant(args: argparse.Namespace, precision: str, pad: str) -> dict:
    from runner.methods.memory import ALLOCATOR_ENV

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **ALLOCATOR_ENV)
    cmd = [sys.executable, "-c", CHILD, args.model, str(args.split), str(args.rank),
           str(args.batch), str(args.steps), str(args.min_len), str(args.max_len), precision,
           pad]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"variant {precision}/{pad} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", type=int, default=3, help="client blocks (default 3)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--min-len", type=int, default=20, help="shortest example, tokens")
    ap.add_argument("--max-len", type=int, default=64, help="longest example, tokens")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    mib = 1 << 20
    print(f"{args.model}: client of {args.split} blocks, LoRA rank {args.rank} on all seven "
          f"projections, batch {args.batch}, example lengths {args.min_len}-{args.max_len} "
          f"tokens (seeded), {args.steps} steps, {args.threads} thread(s), one fresh process "
          f"per variant")
    print(f"{'precision':>9} {'lengths':>12} {'after 1 step':>13} {'at the end':>11} "
          f"{'growth/step':>12} {'peak':>9}")
    peaks = {}
    for precision, pad in VARIANTS:
        out = run_variant(args, precision, pad)
        rss = out["rss"]
        half = len(rss) // 2
        growth = (rss[-1] - rss[half]) / max(1, len(rss) - 1 - half) / mib
        label = "longest" if pad == "free" else f"x{16 if precision == 'bf16' else 1}"
        peaks[(precision, pad)] = out["peak"]
        print(f"{precision:>9} {label:>12} {rss[0] / mib:>9.0f} MiB {rss[-1] / mib:>7.0f} MiB "
              f"{growth:>8.1f} MiB {out['peak'] / mib:>5.0f} MiB")
    free, padded, fp32 = peaks[("bf16", "free")], peaks[("bf16", "padded")], peaks[("fp32", "free")]
    print(f"peak ratio bf16 longest / bf16 padded: {free / padded:.2f}")
    print(f"peak ratio bf16 padded / fp32: {padded / fp32:.2f}")


if __name__ == "__main__":
    main()
