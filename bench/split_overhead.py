"""Step-time overhead of in-process split training against the unsplit model.

What is measured: the wall-clock time of one training step (forward, loss, backward, optimizer
step) of

* **unsplit**: the whole model as one segment with LoRA (what ``cenlora`` trains), and
* **split**: the same model cut at block ``k`` into a client segment (embeddings + blocks
  ``[0, k)``) and a server segment (blocks ``[k, L)`` + norm + head), one client, in one
  process: client forward, detached "wire" activations, server forward/loss/backward/step,
  then the client backward from the returned gradient and the client step.

Both variants are loaded through :mod:`runner.model.split`, get LoRA on the same projections with
the same ranks and the same seeded initial adapters (:func:`runner.model.lora.attach_lora`), and are
driven by :meth:`runner.trainer.Trainer.train_step` itself (``_local_step`` for the unsplit
model, ``_split_step`` / ``server_step`` for the split one), so the timed code is the
trainer's code, not a re-implementation of it. Every step feeds both variants the *same*
batch of real E2E text, padded to exactly ``--seq`` tokens; the RNG is re-seeded before each
step, so LoRA dropout draws the same masks in both and their losses must agree (printed as a
sanity check that the two variants do the same arithmetic). The figure of merit is the ratio
of median step times, split / unsplit; the issue's target is <= 1.05 on smollm2-135m.

Why the runs are interleaved: on a shared machine (and on any CPU with frequency scaling,
thermal limits or a noisy neighbour) the speed drifts over a run. Timing all unsplit steps and
then all split steps would fold that drift into the ratio. Instead each step index runs both
variants back to back, alternating which goes first (A B, B A, A B, ...), so slow drift and
any "second in the pair" effect (warm caches, allocator state) hit both variants equally. The
per-pair ratios also give the spread of the ratio. The first ``--warmup`` pairs (allocator
growth, lazy initialisation, first-call dispatch) are discarded. The load average is recorded
because a busy CPU (more runnable threads than cores) slows torch's intra-op threads by orders
of magnitude; compare absolute times only between quiet runs (``--threads`` pins the count).

Usage::

    .venv/bin/python bench/split_overhead.py --model smollm2-135m --split 8 --rank 8 \\
        --batch 8 --seq 64 --steps 10 --warmup 2 [--json PATH]

A quick check (tests/test_bench.py): ``--model tiny-llama --split 2 --steps 1 --warmup 0
--batch 2 --seq 16``.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from rich.console import Console
from rich.table import Table

from runner.config import TrainConfig
from runner.dataset import data as data_mod
from runner.model import lora, split
from runner.model.models import load_tokenizer, model_info
from runner.trainer import Holder, Trainer, make_optimizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
TARGET = 1.05
LORA_ALPHA = 32.0
LORA_DROPOUT = 0.1
LABEL_SMOOTHING = 0.1
TARGETS = ("q", "v")


# ---------------------------------------------------------------------------------- batches
class FixedBatches:
    """Stands in for a holder's ``ClientBatches``: returns whatever batch the loop set."""

    def __init__(self) -> None:
        self.current: dict[str, torch.Tensor] | None = None

    def next(self) -> dict[str, torch.Tensor]:
        assert self.current is not None, "no batch set"
        return self.current


def pad_to(batch: dict[str, torch.Tensor], seq: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a collated batch to exactly ``seq`` positions (mask 0, label -100)."""
    extra = seq - batch["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"batch is wider ({batch['input_ids'].shape[1]}) than --seq {seq}")
    if extra == 0:
        return batch
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": data_mod.IGNORE_INDEX}
    out = {}
    for key, t in batch.items():
        tail = torch.full((t.shape[0], extra), fills[key], dtype=t.dtype)
        out[key] = torch.cat([t, tail], dim=1)
    return out


def build_batches(tokenizer: Any, data: str | Path, n: int, batch: int, seq: int,
                  seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch`` E2E examples, each truncated/padded to ``seq`` tokens."""
    df = data_mod.load_e2e(data, seed=seed)
    need = n * batch
    rows = np.resize(np.random.default_rng(seed).permutation(len(df)), need)
    examples = data_mod.encode_frame(tokenizer, df.iloc[rows], max_len=seq)
    pad_id = int(tokenizer.pad_token_id)
    return [pad_to(data_mod.collate(examples[i:i + batch], pad_id), seq, pad_id)
            for i in range(0, need, batch)]


# ------------------------------------------------------------------------------- variants
class StepRunner(Trainer):
    """A :class:`Trainer` holding pre-built holders, used only for :meth:`train_step`.

    ``Trainer.__init__`` would prepare data, shard it and load the model itself; here the
    segments are loaded by the benchmark (so both variants see the same fixed batches), and
    only the attributes that ``train_step`` reads are set. The step code is the trainer's.
    """

    def __init__(self, cfg: TrainConfig, clients: list[Holder], server: Holder | None) -> None:
        self.cfg = cfg
        self.run = None
        self.progress = None
        self.clients = clients
        self.server = server
        self.offline: set[str] = set()
        self.unfit: dict[str, str] = {}  # no budgets: every client runs
        self.global_state = None
        self.vclock = None  # no virtual clock: wall time only


def make_holder(name: str, seg: split.Segment, ranks: lora.RankMap, cfg: TrainConfig,
                batches: FixedBatches | None) -> Holder:
    """Attach LoRA to ``seg`` and wrap it with AdamW (+ the trainer's schedule) in a Holder."""
    got = lora.attach_lora(seg, ranks, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, seed=cfg.seed)
    holder = Holder(name=name, seg=seg, ranks=got, batches=batches)  # type: ignore[arg-type]
    opt = make_optimizer(seg.model, cfg)
    if opt is not None:
        holder.opt, holder.sched = opt
    seg.model.train()
    return holder


@dataclass
class Variant:
    name: str
    runner: StepRunner
    feed: FixedBatches
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def step(self, step: int, batch: dict[str, torch.Tensor], seed: int) -> float:
        """One timed training step on ``batch``; returns seconds."""
        self.feed.current = batch
        torch.manual_seed(seed * 100_003 + step)  # same dropout masks in both variants
        gc.collect()
        t0 = time.perf_counter()
        records = self.runner.train_step(step)
        elapsed = time.perf_counter() - t0
        self.losses.append(float(records[0]["loss"]))
        return elapsed


def build_variants(args: argparse.Namespace, cfg: TrainConfig) -> tuple[Variant, Variant, Any]:
    info = model_info(args.model)
    info.check_split(args.split)
    path, k, L = info.path, args.split, info.num_layers

    seg = split.load_unsplit(path)
    ranks = lora.uniform_ranks(seg.config, args.rank, TARGETS)
    feed_u = FixedBatches()
    central = make_holder("central", seg, ranks, cfg, feed_u)
    unsplit = Variant("unsplit", StepRunner(cfg, [central], None), feed_u)

    feed_s = FixedBatches()
    client = make_holder("client0", split.load_client(path, k), ranks, cfg, feed_s)
    server = make_holder("server", split.load_server(path, k, L), ranks, cfg, None)
    splitv = Variant("split", StepRunner(cfg, [client], server), feed_s)
    return unsplit, splitv, info


# ---------------------------------------------------------------------------------- report
def summarise(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times),
            "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--split", type=int, default=8, help="split point k (client holds [0, k))")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64, help="tokens per row (truncate/pad)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="discarded steps per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None,
                   help=f"E2E CSV (default {DEFAULT_DATA} if present, else synthetic)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: leave torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = p.parse_args(argv)
    for name in ("rank", "batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.seq < 8:
        p.error("--seq must be >= 8")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else data_mod.SYNTHETIC)
    total = args.warmup + args.steps
    cfg = TrainConfig(method="splitlora", model=args.model, split=args.split, rank=args.rank,
                      targets=TARGETS, steps=total, batch_size=args.batch,
                      lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                      label_smoothing=LABEL_SMOOTHING, max_len=args.seq, seed=args.seed)

    unsplit, splitv, info = build_variants(args, cfg)
    tokenizer = load_tokenizer(info.path)
    batches = build_batches(tokenizer, data, total, args.batch, args.seq, args.seed)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    # Park everything built so far outside the collector, so the gc.collect() before each
    # step (keeping collections out of the timed region) is cheap.
    gc.collect()
    gc.freeze()

    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": "cpu",
        "loadavg_1m_start": os.getloadavg()[0],
        "model": args.model, "layers": info.num_layers, "k": args.split, "rank": args.rank,
        "targets": list(TARGETS), "batch": args.batch, "seq": args.seq,
        "real_tokens_per_batch": real_tokens, "steps": args.steps, "warmup": args.warmup,
        "seed": args.seed, "data": str(data),
    }
    console.print("[bold]split overhead benchmark[/bold]  " + "  ".join(
        f"{key}={env[key]}" for key in ("torch", "threads", "model", "layers", "k", "rank",
                                        "batch", "seq", "steps", "warmup")))
    console.print(f"data={data}  real tokens/batch={real_tokens:.0f}/{args.batch * args.seq}  "
                  f"python={env['python']}  transformers={env['transformers']}  "
                  f"peft={env['peft']}  cpus={env['cpu_count']}  "
                  f"load(1m)={env['loadavg_1m_start']:.2f}")

    pair_ratios: list[float] = []
    for step in range(total):
        order = (unsplit, splitv) if step % 2 == 0 else (splitv, unsplit)
        took = {v.name: v.step(step, batches[step], args.seed) for v in order}
        if step >= args.warmup:
            unsplit.times.append(took["unsplit"])
            splitv.times.append(took["split"])
            pair_ratios.append(took["split"] / took["unsplit"])

    env["loadavg_1m_end"] = os.getloadavg()[0]
    stats = {v.name: summarise(v.times) for v in (unsplit, splitv)}
    ratio = stats["split"]["median_s"] / stats["unsplit"]["median_s"]
    ratio_mean = stats["split"]["mean_s"] / stats["unsplit"]["mean_s"]
    pairs = {"median": statistics.median(pair_ratios), "min": min(pair_ratios),
             "max": max(pair_ratios)}
    loss_diff = max(abs(a - b) for a, b in zip(unsplit.losses, splitv.losses, strict=True))

    table = Table(title=f"step time, {args.steps} measured steps each (interleaved)")
    for col in ("variant", "median ms", "mean ms", "min ms", "max ms", "stdev ms"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name in ("unsplit", "split"):
        s = stats[name]
        table.add_row(name, *(f"{s[key] * 1e3:.1f}" for key in
                              ("median_s", "mean_s", "min_s", "max_s", "stdev_s")))
    table.add_row("split/unsplit", f"{ratio:.3f}", f"{ratio_mean:.3f}", "", "", "")
    console.print(table)
    console.print(f"per-pair ratio: median {pairs['median']:.3f}, min {pairs['min']:.3f}, "
                  f"max {pairs['max']:.3f}")
    console.print(f"sanity: max |loss(split) - loss(unsplit)| over all steps = {loss_diff:.2e}")
    print(f"split/unsplit step time ratio (median): {ratio:.3f} (target <= {TARGET})")

    if args.json is not None:
        out = {"env": env, "unsplit": {**stats["unsplit"], "times_s": unsplit.times},
               "split": {**stats["split"], "times_s": splitv.times},
               "ratio_median": ratio, "ratio_mean": ratio_mean, "pair_ratios": pair_ratios,
               "pair_ratio_median": pairs["median"], "pair_ratio_min": pairs["min"],
               "pair_ratio_max": pairs["max"], "target": TARGET, "within_target": ratio <= TARGET,
               "max_loss_diff": loss_diff, "losses": {"unsplit": unsplit.losses,
                                                      "split": splitv.losses}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
