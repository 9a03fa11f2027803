"""Roofline of the split training step on this CPU: how close the step gets to the machine's
own matrix-product rate, and where the rest of its time goes.

Why: a LoRA step of a small decoder is almost all matrix products, so the rate at which this
CPU multiplies matrices *of the step's own shapes* is the ceiling of the step's speed. The
ratio of the step's achieved rate to that ceiling says how much there is to gain by removing
overhead (padding, copies, elementwise work, Python) before anything else; the profile says
where that overhead is.

What is measured, in one process:

1. **Matrix-product rate** (GFLOP/s) of every distinct product the step does, at its shapes
   (``T = batch x seq`` token rows): for each linear map ``din -> dout`` of a block (q, k, v,
   o, gate, up, down; the LoRA ``A`` and ``B`` maps of the adapted ones) and the LM head over
   the target rows, the forward ``x @ W^T`` ([T, din] x [din, dout]), the input gradient
   ``dy @ W`` and the weight gradient ``dy^T @ x``; plus the attention's batched products
   (scores ``Q K^T`` and context ``P V``, per head). fp32, and bf16 where the CPU has bf16
   arithmetic (``amx_bf16`` / ``avx512_bf16`` in /proc/cpuinfo, testbed/precision.py), at
   ``torch.set_num_threads(1)`` and ``(2)``. Each product is timed in loops of at least
   ``--min-time`` seconds, ``--reps`` loops, and the median loop rate kept; this is done in
   two passes, before and after the steps, and the faster pass counts (a neighbour's burst
   during one pass would lower the ceiling and flatter the fraction).
2. **The step's FLOPs**, counted from the model's shapes (only matrix products; norms,
   rotary, SiLU, softmax, dropout, the loss and AdamW are elementwise and not counted):

   * forward: ``2 m k n`` per product, every block projection on all ``T`` rows (padding
     included: it is computed);
   * backward of the frozen projections: the input gradient only (``2 m k n``), except
     q, k, v of block 0, whose input (the frozen embeddings) needs no gradient;
   * LoRA (rank r on the targets): forward ``x A^T`` and ``u B^T``; backward ``dB``, ``du``,
     ``dA`` and ``dx`` (``dx`` not in block 0);
   * attention: scores and context forward (``2 x 2 B H S^2 hd``), backward twice that
     (dP, dV, dQ, dK; SDPA computes them all);
   * LM head: forward and input gradient on the *target rows only* (``labels[:, 1:] !=
     -100``), as runner/model/split.py ``head_row_losses`` computes it; the head is tied to
     the frozen embeddings, so no weight gradient.

   The **matrix-product ceiling** of the step is the time its product mix takes at the rates
   of 1. (each product's count x FLOPs / its measured rate, summed); its rate is the FLOPs
   over that time.
3. **The step's achieved rate**: those FLOPs over the median wall time of the trainer's own
   split step (:meth:`runner.trainer.Trainer.train_step`, client blocks ``[0, k)`` + server
   ``[k, L)``, driven as bench/split_overhead.py drives it: ``StepRunner``, ``make_holder``,
   ``build_batches``), at 1 and 2 threads, fp32 and bf16 (autocast, runner/model/split.py).
   Steps of the four variants are interleaved (each step index runs every variant) so a
   shared machine's drift hits all of them alike. The ratio achieved / ceiling is the
   fraction of the roofline reached.
4. **A profile** (torch.profiler, one thread, ``--profile-steps`` steps per precision): the
   top operators by self CPU time, and that time grouped into matrix products, attention,
   copies/casts, elementwise, optimizer and what no operator accounts for (Python, dispatch,
   autograd bookkeeping).

The load average (``os.getloadavg()``) is printed at start and end: on a shared 2-core machine
a busy neighbour slows two-thread figures most; compare figures only within one run.

Usage::

    .venv/bin/python bench/roofline.py --model smollm2-135m --split 8 --batch 8 --seq 64 \\
        --threads 1,2 --steps 3 --warmup 1 [--bf16-sdpa] [--json PATH]

``--bf16-sdpa`` adds bf16 variants whose attention runs in bf16 under autocast, as it did
before runner/model/split.py ``use_fp32_attention``: that change's before and after, side
by side in one run.

A quick check (tests/test_bench.py): ``--model tiny-llama --split 2 --batch 2 --seq 16
--steps 1 --warmup 0 --reps 1 --min-time 0.002 --profile-steps 1``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))
sys.path.insert(0, str(REPO_ROOT))

from split_overhead import (  # noqa: E402
    DEFAULT_DATA,
    LABEL_SMOOTHING,
    LORA_ALPHA,
    LORA_DROPOUT,
    FixedBatches,
    StepRunner,
    build_batches,
    make_holder,
)

from runner.config import TrainConfig  # noqa: E402
from runner.dataset import data as data_mod  # noqa: E402
from runner.model import lora, split  # noqa: E402
from runner.model.models import load_config, load_tokenizer, model_info  # noqa: E402
from testbed.precision import cpu_bf16_flags  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHORT = ("q", "k", "v", "o", "gate", "up", "down")


# ------------------------------------------------------------------------------ the products
@dataclass
class Linear:
    """A linear map ``din -> dout`` applied to ``m`` rows, and how often the step does each
    of its three products (forward, input gradient, weight gradient)."""

    names: list[str]
    m: int
    din: int
    dout: int
    fwd: int = 0
    dgrad: int = 0
    wgrad: int = 0

    @property
    def flops(self) -> int:
        """FLOPs of one of its products (all three have the same: 2 m din dout)."""
        return 2 * self.m * self.din * self.dout


@dataclass
class Bmm:
    """A batched product [batch, m, k] x [batch, k, n] of the attention, ``count`` per step."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    fwd: int = 0
    bwd: int = 0

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


@dataclass
class Shapes:
    layers: int
    hidden: int
    kv: int
    inter: int
    vocab: int
    heads: int
    head_dim: int


def shapes_of(config: Any) -> Shapes:
    if getattr(config, "model_type", "") != "llama":
        raise SystemExit(f"roofline.py counts Llama-family FLOPs only, not {config.model_type}")
    heads = int(config.num_attention_heads)
    hd = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return Shapes(layers=int(config.num_hidden_layers), hidden=int(config.hidden_size),
                  kv=int(config.num_key_value_heads) * hd, inter=int(config.intermediate_size),
                  vocab=int(config.vocab_size), heads=heads, head_dim=hd)


def step_products(s: Shapes, batch: int, seq: int, targets: int,
                  ranks: dict[str, int]) -> tuple[list[Linear], list[Bmm]]:
    """Every product of one training step and its count (see the module docstring)."""
    t = batch * seq
    dims = {"q": (s.hidden, s.hidden), "k": (s.hidden, s.kv), "v": (s.hidden, s.kv),
            "o": (s.hidden, s.hidden), "gate": (s.hidden, s.inter), "up": (s.hidden, s.inter),
            "down": (s.inter, s.hidden)}
    table = lora.PROJECTIONS["llama"]
    linears: dict[tuple[int, int, int], Linear] = {}

    def add(name: str, m: int, din: int, dout: int, fwd: int, dgrad: int, wgrad: int) -> None:
        lin = linears.setdefault((m, din, dout), Linear([], m, din, dout))
        if name not in lin.names:
            lin.names.append(name)
        lin.fwd += fwd
        lin.dgrad += dgrad
        lin.wgrad += wgrad

    for layer in range(s.layers):
        for p in SHORT:
            din, dout = dims[p]
            first_in = layer == 0 and p in ("q", "k", "v")  # input: the frozen embeddings
            add(p, t, din, dout, 1, 0 if first_in else 1, 0)
            r = ranks.get(f"model.layers.{layer}.{table[p]}", 0)
            if r:
                add(f"{p}.lora_A", t, din, r, 1, 0 if first_in else 1, 1)
                add(f"{p}.lora_B", t, r, dout, 1, 1, 1)
    add("head", targets, s.hidden, s.vocab, 1, 1, 0)
    bh = batch * s.heads
    bmms = [Bmm("attn scores QK^T", bh, seq, s.head_dim, seq, s.layers, s.layers),
            Bmm("attn context PV", bh, seq, seq, s.head_dim, s.layers, 3 * s.layers)]
    return list(linears.values()), bmms


def step_flops(linears: list[Linear], bmms: list[Bmm]) -> dict[str, float]:
    out = {"projections fwd": 0.0, "projections bwd": 0.0, "lora fwd": 0.0, "lora bwd": 0.0,
           "head fwd": 0.0, "head bwd": 0.0, "attention fwd": 0.0, "attention bwd": 0.0}
    for lin in linears:
        kind = ("head" if lin.names == ["head"] else
                "lora" if "lora" in lin.names[0] else "projections")
        out[f"{kind} fwd"] += lin.fwd * lin.flops
        out[f"{kind} bwd"] += (lin.dgrad + lin.wgrad) * lin.flops
    for b in bmms:
        out["attention fwd"] += b.fwd * b.flops
        out["attention bwd"] += b.bwd * b.flops
    return out


def real_token_flops(flops: dict[str, float], batches: list[dict[str, torch.Tensor]],
                     seq: int) -> float:
    """The same count on real tokens only (padding rows and padded attention removed)."""
    masks = [b["attention_mask"] for b in batches]
    tok = statistics.fmean(float(m.sum()) / m.numel() for m in masks)
    att = statistics.fmean(float((m.sum(dim=1).double() ** 2).sum()) / (m.shape[0] * seq * seq)
                           for m in masks)
    per_token = sum(v for k, v in flops.items() if not k.startswith(("head", "attention")))
    return (per_token * tok + (flops["attention fwd"] + flops["attention bwd"]) * att
            + flops["head fwd"] + flops["head bwd"])


# ----------------------------------------------------------------------- matrix-product rate
def timed_rate(fn: Callable[[], Any], flops: float, min_time: float, reps: int) -> float:
    """Median GFLOP/s of ``reps`` loops of ``fn``, each loop at least ``min_time`` seconds."""
    fn()
    fn()
    rates = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            took = time.perf_counter() - t0
            if took >= min_time:
                break
        rates.append(flops * n / took / 1e9)
    return statistics.median(rates)


def linear_rates(lin: Linear, dtype: torch.dtype, min_time: float,
                 reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(lin.m, lin.din, generator=g).to(dtype)
    w = torch.randn(lin.dout, lin.din, generator=g).to(dtype)
    dy = torch.randn(lin.m, lin.dout, generator=g).to(dtype)
    with torch.no_grad():
        return {"fwd": timed_rate(lambda: nn.functional.linear(x, w), lin.flops, min_time, reps),
                "dgrad": timed_rate(lambda: torch.mm(dy, w), lin.flops, min_time, reps),
                "wgrad": timed_rate(lambda: torch.mm(dy.t(), x), lin.flops, min_time, reps)}


def bmm_rate(b: Bmm, dtype: torch.dtype, min_time: float, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(b.batch, b.m, b.k, generator=g).to(dtype)
    c = torch.randn(b.batch, b.n, b.k, generator=g).to(dtype).transpose(1, 2)
    with torch.no_grad():
        return timed_rate(lambda: torch.bmm(a, c), b.flops, min_time, reps)


def measure_rates(linears: list[Linear], bmms: list[Bmm], precisions: list[str],
                  args: argparse.Namespace) -> dict[tuple[str, int], dict[str, Any]]:
    """Rates of every product, per (precision, threads)."""
    rates: dict[tuple[str, int], dict[str, Any]] = {}
    for prec in precisions:
        for threads in args.threads:
            torch.set_num_threads(threads)
            rates[(prec, threads)] = {
                "linear": [linear_rates(lin, DTYPES[prec], args.min_time, args.reps)
                           for lin in linears],
                "bmm": [bmm_rate(b, DTYPES[prec], args.min_time, args.reps) for b in bmms]}
    return rates


def faster(a: dict[tuple[str, int], dict[str, Any]],
           b: dict[tuple[str, int], dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per product, the higher of two passes' rates: on a shared machine a neighbour's burst
    during one pass would otherwise lower the ceiling (and flatter the fraction)."""
    return {key: {"linear": [{kind: max(x[kind], y[kind]) for kind in x}
                             for x, y in zip(a[key]["linear"], b[key]["linear"], strict=True)],
                  "bmm": [max(x, y) for x, y in zip(a[key]["bmm"], b[key]["bmm"], strict=True)]}
            for key in a}


def ceiling(linears: list[Linear], bmms: list[Bmm], rates: dict[str, Any]) -> tuple[float, float]:
    """(seconds, GFLOP/s) of the step's product mix at the measured rates."""
    seconds = flops = 0.0
    for i, lin in enumerate(linears):
        for kind in ("fwd", "dgrad", "wgrad"):
            n = getattr(lin, kind)
            seconds += n * lin.flops / (rates["linear"][i][kind] * 1e9)
            flops += n * lin.flops
    for i, b in enumerate(bmms):
        seconds += (b.fwd + b.bwd) * b.flops / (rates["bmm"][i] * 1e9)
        flops += (b.fwd + b.bwd) * b.flops
    return seconds, flops / seconds / 1e9


# ------------------------------------------------------------------------------ the step
@dataclass
class Variant:
    precision: str
    threads: int
    runner: StepRunner
    feed: FixedBatches
    times: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def label(self) -> str:
        return (f"{self.precision} {self.threads} thread{'s' if self.threads > 1 else ''}"
                + (f" {self.note}" if self.note else ""))

    def step(self, step: int, batch: dict[str, torch.Tensor], seed: int) -> float:
        torch.set_num_threads(self.threads)
        self.feed.current = batch
        torch.manual_seed(seed * 100_003 + step)
        gc.collect()
        t0 = time.perf_counter()
        self.runner.train_step(step)
        return time.perf_counter() - t0


def build_runner(args: argparse.Namespace, precision: str,
                 total: int) -> tuple[StepRunner, FixedBatches]:
    info = model_info(args.model)
    info.check_split(args.split)
    cfg = TrainConfig(method="splitlora", model=args.model, split=args.split, rank=args.rank,
                      targets=args.targets, steps=total, batch_size=args.batch,
                      lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                      label_smoothing=LABEL_SMOOTHING, max_len=args.seq, seed=args.seed,
                      precision=precision)
    config = load_config(info.path)
    ranks = lora.uniform_ranks(config, args.rank, args.targets)
    feed = FixedBatches()
    client = make_holder("client0", split.load_client(info.path, args.split, precision),
                         ranks, cfg, feed)
    server = make_holder("server", split.load_server(info.path, args.split, info.num_layers,
                                                     precision), ranks, cfg, None)
    return StepRunner(cfg, [client], server), feed


def bf16_attention(runner: StepRunner) -> None:
    """Put a bf16 runner's segments back on autocast's bf16 attention ("sdpa"), as before
    runner/model/split.py ``use_fp32_attention``: the before of that change, side by side."""
    for h in [*runner.clients, runner.server]:
        assert h is not None
        for cfg in (h.seg.config, split.base_model(h.seg.model).config):
            cfg._attn_implementation = "sdpa"


# ------------------------------------------------------------------------------- profile
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::linear", "aten::_mkldnn", "mkldnn")
COPY_OPS = ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::cat",
            "aten::contiguous", "aten::index", "aten::index_put", "aten::_index_put",
            "aten::fill_", "aten::zero_", "aten::zeros", "aten::full", "aten::empty",
            "aten::empty_strided", "aten::new_", "aten::expand", "aten::view", "aten::reshape",
            "aten::transpose", "aten::t", "aten::slice", "aten::select", "aten::unsqueeze",
            "aten::as_strided", "aten::permute", "aten::_unsafe_view", "aten::detach",
            "aten::nonzero", "aten::masked_select", "aten::repeat_interleave", "aten::stack",
            "aten::_reshape_alias", "aten::narrow", "aten::split", "aten::squeeze",
            "aten::alias", "aten::lift_fresh", "aten::resize_", "aten::set_")


def category(name: str) -> str:
    low = name.lower()
    if "adam" in low or "foreach" in low or "optimizer" in low or "lerp" in low:
        return "optimizer (AdamW)"
    if "scaled_dot_product" in low or "flash_attention" in low:
        return "attention (SDPA)"
    if name.startswith(MATMUL_OPS) or "mmbackward" in low or "addmmbackward" in low:
        return "matrix products"
    if name.startswith(COPY_OPS) or "copy" in low or "tocopy" in low:
        return "copies, casts, views"
    return "elementwise and other ops"


def profile_steps(variant: Variant, batches: list[dict[str, torch.Tensor]], first: int,
                  seed: int, rows: int) -> dict[str, Any]:
    """Profile ``len(batches)`` steps of ``variant`` at its thread count."""
    torch.set_num_threads(variant.threads)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i, batch in enumerate(batches):
            variant.feed.current = batch
            torch.manual_seed(seed * 100_003 + first + i)
            variant.runner.train_step(first + i)
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages()
              if not getattr(e, "is_user_annotation", False)
              and not e.key.startswith(("ProfilerStep", "Optimizer.", "## "))]
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    cats: dict[str, float] = {}
    for e in events:
        c = category(e.key)
        cats[c] = cats.get(c, 0.0) + e.self_cpu_time_total / 1e6
    cats["outside operators (Python, dispatch)"] = max(wall - total_self, 0.0)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {"wall_s": wall, "steps": len(batches), "self_s": total_self, "categories": cats,
            "top": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                     "category": category(e.key)} for e in top]}


# ---------------------------------------------------------------------------------- report
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", type=int, default=8, help="split point k (client holds [0, k))")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,v", help="adapted projections (comma-separated)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64, help="tokens per row (truncate/pad)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="discarded steps per variant")
    p.add_argument("--threads", default="1,2", help="thread counts (comma-separated)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="fp32 and/or bf16 (bf16 is skipped where the CPU lacks it)")
    p.add_argument("--reps", type=int, default=5, help="timed loops per product")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per timed loop")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="profiled steps per precision at one thread (0: no profile)")
    p.add_argument("--top", type=int, default=15, help="operators listed per profile")
    p.add_argument("--bf16-sdpa", action="store_true",
                   help="also time bf16 steps with bf16 attention (before use_fp32_attention)"
                        " at each thread count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None,
                   help=f"E2E CSV (default {DEFAULT_DATA} if present, else synthetic)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    args.targets = tuple(t for t in args.targets.split(",") if t)
    args.threads = [int(t) for t in args.threads.split(",") if t]
    args.precisions = [x for x in args.precisions.split(",") if x]
    if any(t < 1 for t in args.threads) or not args.threads:
        p.error("--threads must list counts >= 1")
    if any(x not in DTYPES for x in args.precisions) or not args.precisions:
        p.error("--precisions: fp32 and/or bf16")
    for name in ("rank", "batch", "steps", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.profile_steps < 0 or args.min_time <= 0:
        p.error("--warmup and --profile-steps must be >= 0, --min-time > 0")
    if args.seq < 8:
        p.error("--seq must be >= 8")
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()
    flags = cpu_bf16_flags()
    precisions = [x for x in args.precisions if x == "fp32" or flags]
    skipped = [x for x in args.precisions if x not in precisions]
    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else data_mod.SYNTHETIC)
    info = model_info(args.model)
    config = load_config(info.path)
    s = shapes_of(config)
    total = args.warmup + args.steps + args.profile_steps
    tokenizer = load_tokenizer(info.path)
    batches = build_batches(tokenizer, data, total, args.batch, args.seq, args.seed)
    measured = batches[args.warmup:args.warmup + args.steps]
    targets = round(statistics.fmean(int((b["labels"][:, 1:] != -100).sum()) for b in measured))
    ranks = lora.uniform_ranks(config, args.rank, args.targets)
    linears, bmms = step_products(s, args.batch, args.seq, targets, ranks)
    flops = step_flops(linears, bmms)
    step_gflop = sum(flops.values()) / 1e9
    real_gflop = real_token_flops(flops, measured, args.seq) / 1e9

    print(f"roofline of the split training step  model={args.model} layers={s.layers} "
          f"k={args.split} rank={args.rank} targets={','.join(args.targets)} "
          f"batch={args.batch} seq={args.seq} steps={args.steps} warmup={args.warmup}")
    note = f"  (skipped, no bf16 arithmetic: {','.join(skipped)})" if skipped else ""
    print(f"cpu: {cpu_model()}  cpus={os.cpu_count()}  bf16 flags: {','.join(flags) or 'none'}"
          f"{note}  torch={torch.__version__}  data={data}")
    print("load average at start (1m, 5m, 15m): " + ", ".join(f"{x:.2f}" for x in load_start))

    # 1. matrix-product rates: one pass now, one after the steps (the faster of the two counts)
    first_pass = measure_rates(linears, bmms, precisions, args)

    print(f"\nFLOPs per step (matrix products only): {step_gflop:.2f} GFLOP "
          f"(on real tokens only: {real_gflop:.2f}; padding share "
          f"{1 - real_gflop / step_gflop:.1%}; head on {targets} target rows)")
    for k, v in flops.items():
        print(f"  {k:<16} {v / 1e9:>9.3f} GFLOP  {v / 1e9 / step_gflop:>6.1%}")

    # 2. the step, interleaved over variants, then the second pass of rates
    runners = {prec: build_runner(args, prec, total) for prec in precisions}
    variants = [Variant(prec, t, *runners[prec]) for prec in precisions for t in args.threads]
    if args.bf16_sdpa and "bf16" in precisions:
        before = build_runner(args, "bf16", total)
        bf16_attention(before[0])
        variants += [Variant("bf16", t, *before, note="bf16-attn") for t in args.threads]
    gc.collect()
    gc.freeze()
    for step in range(args.warmup + args.steps):
        order = variants if step % 2 == 0 else variants[::-1]
        for v in order:
            took = v.step(step, batches[step], args.seed)
            if step >= args.warmup:
                v.times.append(took)
    rates = faster(first_pass, measure_rates(linears, bmms, precisions, args))
    keys = list(rates)
    print(f"\nmatrix-product rate, GFLOP/s (median of {args.reps} loops >= {args.min_time} s, "
          "the faster of a pass before and one after the steps); count = products per step")
    head = f"{'product':<24} {'m':>6} {'k':>6} {'n':>6} {'count':>6}" + "".join(
        f" {p + ' ' + str(t) + 't':>9}" for p, t in keys)
    print(head)
    for i, lin in enumerate(linears):
        for kind, (m, k, n) in (("fwd", (lin.m, lin.din, lin.dout)),
                                ("dgrad", (lin.m, lin.dout, lin.din)),
                                ("wgrad", (lin.dout, lin.m, lin.din))):
            name = f"{'/'.join(lin.names)} {kind}"
            print(f"{name:<24} {m:>6} {k:>6} {n:>6} {getattr(lin, kind):>6}" + "".join(
                f" {rates[key]['linear'][i][kind]:>9.1f}" for key in keys))
    for i, b in enumerate(bmms):
        print(f"{b.name:<24} {b.m:>6} {b.k:>6} {b.n:>6} {b.fwd + b.bwd:>6}" + "".join(
            f" {rates[key]['bmm'][i]:>9.1f}" for key in keys) + f"  (x{b.batch} batched)")
    ceilings = {key: ceiling(linears, bmms, rates[key]) for key in keys}
    print(f"{'step mix (ceiling)':<24} {'':>6} {'':>6} {'':>6} {'':>6}" + "".join(
        f" {ceilings[key][1]:>9.1f}" for key in keys))

    print(f"\nsplit training step, {args.steps} measured steps each (interleaved)")
    print(f"{'variant':<27} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'GFLOP/s':>8} "
          f"{'ceiling':>8} {'fraction':>8}")
    results = []
    for v in variants:
        med = statistics.median(v.times)
        achieved = step_gflop / med
        ceil_s, ceil_rate = ceilings[(v.precision, v.threads)]
        frac = achieved / ceil_rate
        results.append({"variant": v.label, "precision": v.precision, "threads": v.threads,
                        "note": f" ({v.note})" if v.note else "",
                        "times_s": v.times,
                        "median_s": med, "achieved_gflops": achieved, "ceiling_gflops":
                        ceil_rate, "ceiling_s": ceil_s, "fraction": frac})
        print(f"{v.label:<27} {med * 1e3:>10.1f} {min(v.times) * 1e3:>9.1f} "
              f"{max(v.times) * 1e3:>9.1f} {achieved:>8.2f} {ceil_rate:>8.2f} {frac:>8.4f}")
    for r in results:
        name = f"{r['precision']} {r['threads']} thread(s){r['note']}"
        print(f"roofline fraction {name}: {r['fraction']:.4f} "
              f"(achieved {r['achieved_gflops']:.2f} GFLOP/s, ceiling "
              f"{r['ceiling_gflops']:.2f} GFLOP/s; step {r['median_s'] * 1e3:.1f} ms vs "
              f"{r['ceiling_s'] * 1e3:.1f} ms of products)")

    # 3. profile, one thread
    profiles = {}
    if args.profile_steps:
        first = args.warmup + args.steps
        for prec in precisions:
            v = next(x for x in variants if x.precision == prec and not x.note)
            one = Variant(prec, 1, v.runner, v.feed)
            prof = profile_steps(one, batches[first:first + args.profile_steps], first,
                                 args.seed, args.top)
            profiles[prec] = prof
            per = prof["wall_s"] / prof["steps"]
            print(f"\nprofile {prec}, 1 thread, {prof['steps']} step(s): {per * 1e3:.1f} ms "
                  "per step under the profiler")
            print(f"{'operator':<48} {'category':<28} {'self ms/step':>12} {'calls/step':>10}")
            for row in prof["top"]:
                print(f"{row['op'][:48]:<48} {row['category']:<28} "
                      f"{row['self_s'] / prof['steps'] * 1e3:>12.1f} "
                      f"{row['calls'] / prof['steps']:>10.0f}")
            print("by category:")
            for c, sec in sorted(prof["categories"].items(), key=lambda kv: -kv[1]):
                print(f"  {c:<40} {sec / prof['steps'] * 1e3:>9.1f} ms/step "
                      f"{sec / prof['wall_s']:>6.1%}")

    load_end = os.getloadavg()
    print("\nload average at end (1m, 5m, 15m): " + ", ".join(f"{x:.2f}" for x in load_end))
    if args.json is not None:
        out = {"model": args.model, "cpu": cpu_model(), "bf16_flags": flags,
               "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
               "split": args.split, "rank": args.rank, "targets": list(args.targets),
               "target_rows": targets, "flops": flops, "step_gflop": step_gflop,
               "real_token_gflop": real_gflop, "loadavg_start": load_start,
               "loadavg_end": load_end, "steps": results, "profiles": profiles,
               "rates": {f"{p} {t}": r for (p, t), r in rates.items()},
               "ceilings": {f"{p} {t}": c for (p, t), c in ceilings.items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
