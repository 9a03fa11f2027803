"""In-process trainer: N clients and one server in one process, SplitLoRA's step exactly.

docs/method.md "Training step" (split federated learning, SplitLoRA Algorithm 1):

1. every client runs its segment on a mini-batch and hands over boundary activations,
   attention mask and labels;
2. the server concatenates the activations of clients with the same split point into one
   batch, runs blocks ``[k, L)``, computes the loss (mean over target tokens of the whole
   concatenated batch), back-propagates and steps its optimizer once;
3. each client receives the gradient w.r.t. its activations, back-propagates and steps;
4. every ``I`` steps the client-side adapters are aggregated (FedAvg of A and B, weighted by
   the data weights ``p_i``).

``fedlora`` runs the same loop with full-model clients and no server; ``cenlora`` and ``ft``
train one unsplit model on the pooled data. The distributed runtime (MQTT) reuses the
:class:`Client` / :class:`Server` pieces; only the transport between them changes.

Bytes are counted as they would be on the wire (the tensors' own sizes), so in-process runs
report the same communication figures as distributed ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner import device as placement
from runner import schedule, seeds
from runner.config import TrainConfig
from runner.dataset import data as data_mod
from runner.dataset.splits import DataProtocol
from runner.emulation.devices import DeviceSpec
from runner.emulation.vtime import StepClock, availability_from, clock_devices
from runner.errors import ConfigError
from runner.methods import aggregation, registry
from runner.methods.memory import ModelCosts, client_memory, memory_seq
from runner.model import lora, split
from runner.model.models import ModelInfo, load_config, load_tokenizer, model_info
from runner.rundir import RunDir
from runner.stopping import Stopper

ProgressFn = Callable[[int, dict[str, Any]], None]


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_optimizer(model: nn.Module, cfg: TrainConfig,
                   start_step: int = 0) -> tuple[torch.optim.Optimizer, Any] | None:
    """AdamW with linear warm-up then linear decay to zero (docs/method.md "Defaults").

    ``start_step``: a fresh optimizer created mid-run (after NAA re-initialisation) continues
    the run's schedule instead of warming up again.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return None
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warm, total = cfg.warmup, cfg.steps

    def factor(local: int) -> float:
        step = local + start_step
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler of a holder that trains in ``precision`` on ``device``: fp16 only.

    Why fp16 needs one and bf16 does not: float16 has bf16's precision but not its range, so
    small gradients of an fp16 backward underflow to zero unless the loss is scaled up first
    (and the scale lowered when a step overflows). Each holder scales its own backward
    (:meth:`Holder.backward`); what crosses the wire stays unscaled (docs/gpu.md "Device
    placement")."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


@dataclass
class Holder:
    """A segment with its optimizer: one client, the server, or a centralised model.

    ``scaler``: the fp16 loss scaler (:func:`grad_scaler`), None in fp32 and bf16, where
    :meth:`backward` and :meth:`step` are the plain ``backward()`` and ``opt.step()``.
    """

    name: str
    seg: split.Segment
    ranks: lora.RankMap
    opt: torch.optim.Optimizer | None = None
    sched: Any = None
    batches: data_mod.ClientBatches | None = None
    weight: float = 1.0  # data weight p_i
    n_examples: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    scaler: torch.amp.GradScaler | None = None

    def backward(self, loss: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Back-propagate ``loss`` (a scalar), or ``loss`` with the incoming gradient ``grad``
        (a client's activations with the server's gradient), scaled by the fp16 scaler."""
        if self.scaler is not None:
            if grad is None:
                loss = self.scaler.scale(loss)
            else:
                grad = self.scaler.scale(grad)
        loss.backward(grad)

    def unscaled(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradients this holder's scaled backward produced for tensors it does not own (the
        server's gradients w.r.t. the clients' activations), back at their true size: what
        crosses the wire is never scaled. After an overflow (the scaler then skips this
        holder's step) they are zero: a non-finite gradient would be refused on the wire."""
        if self.scaler is None:
            return grads
        inv = 1.0 / float(self.scaler.get_scale())
        return [torch.nan_to_num(g * inv, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]

    def step(self) -> None:
        if self.opt is None:
            return
        if self.scaler is not None:
            self.scaler.step(self.opt)  # unscales; skips the step after an overflow
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0] if self.sched is not None else 0.0


def local_train_step(h: Holder, batch: dict[str, torch.Tensor],
                     label_smoothing: float) -> tuple[float, int]:
    """One optimizer step of a holder that has the whole model (fedlora, cenlora, ft):
    forward, loss over target tokens, backward, step. Returns (mean loss, target tokens).
    The batch goes to the holder's device first (runner/device.py ``to``)."""
    batch = placement.to(batch, h.seg.device)
    hidden = split.run_blocks(h.seg, split.embed(h.seg, batch["input_ids"]),
                              batch["attention_mask"], 0, h.seg.end)
    rows, counts = split.head_row_losses(h.seg, hidden, batch["labels"], label_smoothing)
    loss_sum, n = rows.sum(), int(counts.sum())
    h.backward(loss_sum / max(n, 1))
    h.step()
    return float(loss_sum.detach()) / max(n, 1), n


@dataclass
class Prepared:
    """Data, model and tokenizer resolved once for a run."""

    info: ModelInfo
    tokenizer: Any
    frames: dict[str, Any]
    shards: list[Any]
    source: str
    protocol: DataProtocol | None = None  # which files train / validate / test (splits.py)

    def train_record(self, cfg: TrainConfig) -> dict[str, Any]:
        """config.json's ``train`` section: the TrainConfig plus the data protocol it used."""
        record = cfg.to_dict()
        if self.protocol is not None:
            record["data_protocol"] = self.protocol.to_dict()
        return record


def prepare(cfg: TrainConfig) -> Prepared:
    """Validate the config, resolve model and data, split them (official release files or by
    MR, runner/dataset/splits.py) and partition the training rows over clients."""
    cfg.validate()
    info = model_info(cfg.model)
    method = registry.traits(cfg)
    if method.split:
        info.check_split(split_point(cfg, info))
    if not method.full:  # bad --targets must fail before the run directory is written
        lora.weight_names(load_config(info.path), range(1), cfg.targets)
    tokenizer = load_tokenizer(info.path)
    protocol = DataProtocol.for_config(cfg)
    frames = protocol.training_frames()
    n_shards = 1 if method.central else cfg.clients
    shards = data_mod.partition(frames["train"], n_shards, cfg.partition, cfg.dirichlet_alpha,
                                cfg.partition_attribute, seed=cfg.seed)
    return Prepared(info, tokenizer, frames, shards, protocol.source, protocol)


def split_point(cfg: TrainConfig, info: ModelInfo) -> int:
    """The configured split point, or SplitLoRA's default L/4 (at least 1)."""
    return cfg.split if cfg.split is not None else max(1, info.num_layers // 4)


class Trainer:
    """Runs one method in-process and writes the run directory."""

    # Whether the segments this trainer holds share their frozen block weights
    # (split.SharedFrozen): no for the in-process trainer, whose clients are separate
    # devices; yes for the distributed server's mirrors of its clients (ShadowTrainer).
    share_blocks: bool = False

    def __init__(self, cfg: TrainConfig, run: RunDir | None = None,
                 progress: ProgressFn | None = None, prepared: Prepared | None = None):
        self.cfg = cfg
        self.run = run
        self.progress = progress
        self.prep = prepared or prepare(cfg)
        self.info = self.prep.info
        self.pad_id = int(self.prep.tokenizer.pad_token_id)
        self.traits = registry.traits(cfg)
        # Where every segment, batch and tensor of this trainer lives (docs/gpu.md "Device
        # placement"); resolved once, on this host.
        self.device = placement.resolve(cfg.device)
        torch.manual_seed(cfg.seed)
        self.k = split_point(cfg, self.info) if self.traits.split else self.info.num_layers
        self.clients: list[Holder] = []
        self.server: Holder | None = None
        # One copy of the frozen embedding/norm/head for all segments this process holds
        # (issue 15 part 4: a copy per client segment grew the server by 113 MB per client
        # for SmolLM2); full fine-tuning trains them, so every segment keeps its own.
        self.frozen: split.SharedFrozen | None = (
            None if self.traits.full else split.SharedFrozen(blocks=self.share_blocks))
        # virtual time on the devices: fit() (the distributed server: its fit) makes it;
        # work while building (HSplitLoRA's initial probe) finds None and is charged later
        self.vclock: StepClock | None = None
        # clients whose device cannot hold their configuration (name -> why): in-process
        # nothing would stop them, so they never train (docs/method.md "Budget violations")
        self.unfit: dict[str, str] = {}
        self._build()
        self.val_examples = data_mod.encode_frame(self.prep.tokenizer,
                                                  self.prep.frames["validation"], cfg.max_len)
        if cfg.eval_max_examples is not None:
            self.val_examples = self.val_examples[: cfg.eval_max_examples]
        self.history: list[dict[str, Any]] = []
        self.offline: set[str] = set()
        self.global_state: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------- set-up
    def _ranks(self, config) -> lora.RankMap:
        if self.traits.full:
            return {}
        return lora.uniform_ranks(config, self.cfg.rank, self.cfg.targets)

    def _adapt(self, seg: split.Segment, ranks: lora.RankMap) -> lora.RankMap:
        if self.traits.full:
            for p in seg.model.parameters():
                p.requires_grad_(True)
            return {}
        return lora.attach_lora(seg, ranks, alpha=self.cfg.lora_alpha,
                                dropout=self.cfg.lora_dropout,
                                seed=seeds.adapter_init(self.cfg.seed))

    def _build(self) -> None:
        cfg, path = self.cfg, self.info.path
        shards = self.prep.shards
        total = sum(len(s) for s in shards)
        for i, shard in enumerate(shards):
            if self.traits.split:
                seg = split.load_client(path, self.k, cfg.precision, self.frozen, self.device)
            else:
                seg = split.load_unsplit(path, cfg.precision, self.frozen, self.device)
            ranks = self._adapt(seg, self._ranks(seg.config))
            examples = data_mod.encode_frame(self.prep.tokenizer, shard, cfg.max_len)
            holder = Holder(
                name="central" if self.traits.central else f"client{i}",
                seg=seg, ranks=ranks, weight=len(shard) / total, n_examples=len(shard),
                batches=data_mod.ClientBatches(
                    examples, cfg.batch_size, self.pad_id, seed=seeds.batch_stream(cfg.seed, i),
                    multiple=data_mod.length_multiple(cfg.precision)),
                scaler=grad_scaler(cfg.precision, self.device),
            )
            opt = make_optimizer(seg.model, cfg)
            if opt is not None:
                holder.opt, holder.sched = opt
            self.clients.append(holder)
        if self.traits.split:
            self.server = self._server_holder()
        for h in self.all_holders():
            h.seg.model.train()
        self._check_budgets()

    def _check_budgets(self) -> None:
        """A fixed-configuration method (splitlora, fedlora) with a devices file: every client
        whose predicted peak (the memory model, at the longest batch it can draw) exceeds
        its device's budget is not runnable (:meth:`not_runnable`). These methods have no
        rule of their own to shrink; the experiment grid gives them the largest
        configuration that fits the smallest device (testbed/experiment/fairness.py)."""
        found = self.clock_devices()
        if found is None or self.traits.central:
            return
        devices = found[0]
        costs = ModelCosts.from_config(load_config(self.info.path))
        seq = memory_seq(self.cfg.plan_seq, (h.batches.longest for h in self.clients
                                             if h.batches is not None))
        blocks = self.client_blocks()
        for h, dev in zip(self.clients, devices, strict=True):
            need = client_memory(costs, blocks[h.name], h.ranks, self.cfg.batch_size,
                                 seq).total
            if need > dev.memory_bytes:
                self.not_runnable(0, h.name, need, dev.memory_bytes)

    def not_runnable(self, step: int, name: str, need: int, budget: int) -> None:
        """Client ``name`` cannot hold its configuration on its device (``need`` predicted
        bytes over ``budget``): it sits out every step from ``step`` (``active``) until a
        new plan fits it (:meth:`runnable`), and a ``not_runnable`` event and the summary
        say so. A device would fail such a client (a container is OOM-killed); training it
        in-process as if it fit would credit the method with memory it does not have."""
        detail = (f"{name}: predicted {need / 2**20:.1f} MiB exceeds its budget "
                  f"{budget / 2**20:.1f} MiB")
        if self.unfit.get(name) != detail:
            self.unfit[name] = detail
            self._event("not_runnable", step=step, client=name, predicted_bytes=int(need),
                        budget_bytes=int(budget), detail=detail)

    def runnable(self, name: str) -> None:
        """A new plan fits client ``name`` again: it trains from the next step (``active``
        resynchronises it as a returning client)."""
        self.unfit.pop(name, None)

    def _server_holder(self) -> Holder:
        """The server segment (blocks [k, L) + head) with its adapters and optimizer."""
        seg = split.load_server(self.info.path, self.k, self.info.num_layers,
                                self.cfg.precision, self.frozen, self.device)
        holder = Holder(name="server", seg=seg, ranks=self._adapt(seg, self._ranks(seg.config)),
                        scaler=grad_scaler(self.cfg.precision, self.device))
        opt = make_optimizer(seg.model, self.cfg)
        if opt is not None:
            holder.opt, holder.sched = opt
        return holder

    def all_holders(self) -> list[Holder]:
        return self.clients + ([self.server] if self.server is not None else [])

    def global_ranks(self) -> lora.RankMap:
        """The union of ranks over all holders: the adapter of the whole model."""
        out: lora.RankMap = {}
        for h in self.all_holders():
            out.update(h.ranks)
        return out

    # ------------------------------------------------------------------------ one step
    def active(self, step: int) -> list[Holder]:
        """Clients online at ``step`` under the dropout schedule; logs leave/rejoin events.

        A returning client resynchronises: it receives the current global client adapters
        (the last aggregate) before it trains again.
        """
        out = []
        by_clock = self.vclock.away() if self.vclock is not None else {}
        for i, h in enumerate(self.clients):
            scheduled = any(c == i and first <= step < end
                            for c, first, end in self.cfg.dropouts)
            unfit = h.name in self.unfit
            away = scheduled or unfit or h.name in by_clock
            if away and h.name not in self.offline:
                self.offline.add(h.name)
                self._event("client_offline", step=step, client=h.name,
                            reason="not_runnable" if unfit
                            else "scheduled" if scheduled else by_clock[h.name])
            elif not away and h.name in self.offline:
                self.offline.discard(h.name)
                self.resync(h, step)
                self._event("client_online", step=step, client=h.name, resync=True)
            if not away:
                out.append(h)
        return out

    def resync(self, h: Holder, step: int) -> None:
        """Give a returning client the current global client adapters (last aggregate)."""
        if self.global_state is not None:
            lora.load_adapter_state(h.seg.model, self.global_state)

    def eval_holder(self) -> Holder:
        """The client whose segment evaluates the global model: the first online one (it
        holds the global client adapters right after an aggregation)."""
        return next((h for h in self.clients if h.name not in self.offline), self.clients[0])

    def _event(self, kind: str, **fields: Any) -> None:
        if self.run is not None:
            self.run.event(kind, **fields)

    def train_step(self, step: int) -> list[dict[str, Any]]:
        """One synchronous step of every online client (and the server); metric records."""
        clients = self.active(step)
        if not clients:
            return []
        if self.server is not None:
            return self._split_step(step, clients)
        return self._local_step(step, clients)

    def _local_step(self, step: int, clients: list[Holder]) -> list[dict[str, Any]]:
        records = []
        for h in clients:
            batch = h.batches.next()
            t0 = time.perf_counter()
            lr = h.lr
            loss, n = local_train_step(h, batch, self.cfg.label_smoothing)
            records.append(dict(step=step, client=h.name, loss=loss, tokens=n,
                                seq_tokens=int(batch["attention_mask"].numel()),
                                bytes_sent=0, bytes_received=0, lr=lr,
                                compute_s=time.perf_counter() - t0))
        return records

    def _split_step(self, step: int, clients: list[Holder]) -> list[dict[str, Any]]:
        server = self.server
        assert server is not None
        sent: list[dict[str, Any]] = []
        # 1. client forward passes; what crosses the wire: acts, mask, labels.
        for h in clients:
            batch = placement.to(h.batches.next(), h.seg.device)
            t0 = time.perf_counter()
            acts = split.client_forward(h.seg, batch["input_ids"], batch["attention_mask"])
            wire = acts.detach()
            sent.append(dict(holder=h, acts=acts, wire=wire, mask=batch["attention_mask"],
                             labels=batch["labels"], k=h.seg.end,
                             up=tensor_bytes(wire, batch["attention_mask"], batch["labels"]),
                             compute_s=time.perf_counter() - t0))
        # 2. server: one concatenated batch per split point, deepest first (docs/method.md).
        t0 = time.perf_counter()
        grads, losses = self.server_step([(m["wire"], m["mask"], m["labels"], m["k"])
                                          for m in sent])
        server_s = time.perf_counter() - t0
        # 3. clients back-propagate the returned gradients and step.
        records = []
        for m, grad, (loss_sum, n) in zip(sent, grads, losses, strict=True):
            h = m["holder"]
            t0 = time.perf_counter()
            h.backward(m["acts"], grad)
            lr = h.lr
            h.step()
            records.append(dict(step=step, client=h.name, loss=loss_sum / max(n, 1), tokens=n,
                                seq_tokens=int(m["mask"].numel()),
                                bytes_sent=m["up"], bytes_received=tensor_bytes(grad), lr=lr,
                                compute_s=m["compute_s"] + time.perf_counter() - t0,
                                server_s=server_s))
        return records

    def server_step(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]
                    ) -> tuple[list[torch.Tensor], list[tuple[float, int]]]:
        """Server half of a step for client payloads ``(acts, mask, labels, k)``.

        Returns, per payload, the gradient w.r.t. its activations and its (loss sum, target
        tokens). Activations of equal split points are right-padded to a common length and
        concatenated; padded positions are masked, so the result equals separate passes.
        With ``cfg.server_chunk`` > 0, each group is cut into chunks of that many clients,
        each back-propagated at once (its graph freed before the next): the loss is the
        same sum over all target tokens, so the adapter gradient is the same up to float
        summation order, and the server's memory stops growing with the number of clients.
        The payloads are on the server's device (in-process: the clients' own; distributed:
        the transport lands what it decodes there, runner/distributed/transport.py ``recv``),
        and so are the gradients returned; with fp16 they are unscaled (``Holder.unscaled``).
        """
        server = self.server
        assert server is not None
        groups: dict[int, list[int]] = {}
        for idx, (_, _, _, k) in enumerate(batches):
            groups.setdefault(k, []).append(idx)
        leaves = [b[0].detach().requires_grad_(True) for b in batches]
        total_tokens = sum(int((b[2][:, 1:] != -100).sum()) for b in batches)
        per_client: list[tuple[float, int]] = [(0.0, 0)] * len(batches)
        chunk = self.cfg.server_chunk
        passes: list[tuple[int, list[int]]] = [
            (k, groups[k][part]) for k in sorted(groups, reverse=True)
            for part in server_chunks(len(groups[k]), chunk)]
        total_loss = None
        for k, idxs in passes:
            width = max(batches[i][0].shape[1] for i in idxs)
            acts = torch.cat([_pad(leaves[i], width, 0.0) for i in idxs])
            mask = torch.cat([_pad(batches[i][1], width, 0) for i in idxs])
            labels = torch.cat([_pad(batches[i][2], width, -100) for i in idxs])
            hidden = split.run_blocks(server.seg, acts, mask, k, server.seg.end)
            rows, _ = split.head_row_losses(server.seg, hidden, labels, self.cfg.label_smoothing)
            start = 0
            for i in idxs:
                b = batches[i][0].shape[0]
                n = int((batches[i][2][:, 1:] != -100).sum())
                per_client[i] = (float(rows[start:start + b].detach().sum()), n)
                start += b
            pass_loss = rows.sum() / max(total_tokens, 1)
            if chunk:
                server.backward(pass_loss)
            else:
                total_loss = pass_loss if total_loss is None else total_loss + pass_loss
        if total_loss is not None:
            server.backward(total_loss)
        # unscaled (fp16) before the step, which may change the scale
        grads = server.unscaled([leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                                 for leaf in leaves])
        server.step()
        return grads, per_client

    # ------------------------------------------------------------------- aggregation
    def aggregate(self, step: int) -> dict[str, int]:
        """FedAvg of client adapters (A and B separately), weighted by ``p_i``.

        Only online clients take part; their weights are renormalised to sum to one.
        Design choice: optimizer state is kept across aggregations (SplitLoRA's code keeps
        it); only the adapter values are replaced by the average.
        """
        online = [h for h in self.clients if h.name not in self.offline]
        if self.traits.central or not online:
            return {"bytes_up": 0, "bytes_down": 0}
        avg, weights = self.average([lora.adapter_state(h.seg.model) for h in online],
                                    [h.weight for h in online])
        with torch.no_grad():
            for h in online:
                lora.load_adapter_state(h.seg.model, avg)
        self.global_state = avg
        size = tensor_bytes(*avg.values())
        up, down = size * len(online), size * len(online)
        if self.run is not None:
            self.run.event("aggregate", step=step, participants=[h.name for h in online],
                           weights=weights, bytes_up=up, bytes_down=down)
            self.run.metric(kind="aggregate", step=step, client="server", bytes_sent=down,
                            bytes_received=up)
        return {"bytes_up": up, "bytes_down": down}

    def average(self, states: list[dict[str, torch.Tensor]],
                weights: list[float]) -> tuple[dict[str, torch.Tensor], list[float]]:
        """The aggregation rule of :meth:`aggregate` (FedAvg); a method with another rule
        overrides it (docs/extending.md). Returns the aggregate and the weights used."""
        return aggregation.fedavg(states, weights)

    # ---------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batch_size: int = 16) -> dict[str, float]:
        """Validation loss and PPL over target tokens, without label smoothing.

        Uses client 0 right after an aggregation, so every client's adapters are the global
        ones; dropout is off.
        """
        holders = self.all_holders()
        for h in holders:
            h.seg.model.eval()
        nll, n_tok = 0.0, 0
        try:
            for i in range(0, len(self.val_examples), batch_size):
                batch = placement.to(data_mod.collate(
                    self.val_examples[i:i + batch_size], self.pad_id,
                    data_mod.length_multiple(self.cfg.precision)), self.device)
                hidden, head_seg = self.forward_hidden(batch["input_ids"],
                                                       batch["attention_mask"])
                rows, counts = split.head_row_losses(head_seg, hidden, batch["labels"], 0.0)
                nll += float(rows.sum())
                n_tok += int(counts.sum())
        finally:
            for h in holders:
                h.seg.model.train()
        loss = nll / max(n_tok, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": n_tok}

    def forward_hidden(self, input_ids: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, split.Segment]:
        """Last hidden states of the global model, and the segment that holds the head.

        See :meth:`eval_holder`.
        """
        c = self.eval_holder()
        acts = split.client_forward(c.seg, input_ids, mask)
        if self.server is None:
            return acts, c.seg
        return split.run_blocks(self.server.seg, acts, mask, c.seg.end, self.server.seg.end), \
            self.server.seg

    # ------------------------------------------------------------------------- the run
    def should_aggregate(self, step: int) -> bool:
        return schedule.aggregates_after(self.cfg, step)

    def fit(self) -> dict[str, Any]:
        """Train for ``cfg.steps`` steps (or until a stopping rule fires, runner/stopping.py),
        evaluating and logging; returns the summary."""
        cfg, run = self.cfg, self.run
        if self.clients and len(self.unfit) == len(self.clients):  # before the run starts
            raise ConfigError("no client's device can hold its configuration: "
                              + "; ".join(self.unfit.values())
                              + ". Give the devices more memory or train a smaller "
                              "configuration (--rank, --split, --batch-size)")
        if run is not None:
            run.event("run_started", method=cfg.method, clients=len(self.clients), split=self.k)
        self.vclock = self.make_clock()
        self.clock_started()
        stopper = Stopper.from_config(cfg)
        self._event("stop_rule", **stopper.describe(self.vclock is not None))
        first = self.evaluate()
        self._log_eval(0, first)
        stopper.after_eval(0, first["val_ppl"])
        done = 0
        t_start = time.perf_counter()
        totals = {"bytes_sent": 0, "bytes_received": 0}
        last = first
        for step in range(cfg.steps):
            records = self.train_step(step)
            if self.vclock is not None:
                self.vclock.step(records, self.client_blocks(), full_model=self.server is None)
            for r in records:
                totals["bytes_sent"] += r["bytes_sent"]
                totals["bytes_received"] += r["bytes_received"]
                if run is not None:
                    run.metric(kind="train", **r)
            # A spent virtual-time budget ends the run after this step: aggregate (so the last
            # evaluation is of the global model) and evaluate now.
            out_of_time = stopper.after_step(self.vclock.now if self.vclock is not None
                                             else None)
            if self.should_aggregate(step) or (
                    out_of_time and not self.traits.central):
                agg = self.aggregate(step)
                extra = self.after_aggregate(step)  # bytes of a reconfiguration, on top
                agg = {**agg, **{k: agg.get(k, 0) + extra.get(k, 0)
                                 for k in ("bytes_up", "bytes_down")}}
                if self.vclock is not None:
                    self.vclock.aggregate([h.name for h in self.clients
                                           if h.name not in self.offline],
                                          agg["bytes_up"], agg["bytes_down"],
                                          agg.get("per_client"))
                totals["bytes_sent"] += agg["bytes_up"]
                totals["bytes_received"] += agg["bytes_down"]
            done = step + 1
            info: dict[str, Any] = {
                "loss": sum(r["loss"] for r in records) / max(len(records), 1)}
            early = False
            if schedule.evaluates_after(cfg, done) or out_of_time:
                last = self.evaluate()
                self._log_eval(done, last)
                info.update(last)
                early = stopper.after_eval(done, last["val_ppl"])
            if self.progress is not None:
                self.progress(done, info)
            if out_of_time or early:
                self._event("stopped", step=done, reason=stopper.reason,
                            val_ppl=last["val_ppl"], best_val_ppl=stopper.best_ppl,
                            best_step=stopper.best_step, stale_evaluations=stopper.stale,
                            **({"virtual_time": round(self.vclock.now, 6)}
                               if self.vclock is not None else {}))
                break
        summary = {
            "method": cfg.method,
            "steps": cfg.steps,
            "pretrained_val_ppl": first["val_ppl"],
            "final_val_ppl": last["val_ppl"],
            "final_val_loss": last["val_loss"],
            "train_time_s": time.perf_counter() - t_start,
            "client_trainable_params": sum(lora.trainable_parameters(h.seg.model)
                                           for h in self.clients) / len(self.clients),
            "server_trainable_params": (lora.trainable_parameters(self.server.seg.model)
                                        if self.server is not None else 0),
            **totals,
            **({"virtual_time_s": self.vclock.now} if self.vclock is not None else {}),
            **stopper.summary(done),
            "not_runnable": sorted(self.unfit),
            **self.summary_extra(),
        }
        if run is not None:
            self.save(run)
            run.write_summary(summary)
            run.event("run_finished", **{k: v for k, v in summary.items() if k != "method"})
        return summary

    def clock_devices(self) -> tuple[list[DeviceSpec], DeviceSpec, list[Any]] | None:
        """(clients, server, availability) for the virtual clock: from ``cfg.devices`` when
        given (a profile run), else None (no virtual time). HeteroTrainer always has devices."""
        if not self.cfg.devices or self.traits.central:
            return None
        return clock_devices(self.cfg.devices, len(self.clients))

    def make_clock(self) -> StepClock | None:
        """The run's virtual clock (runner/emulation/vtime.py), or None without device
        descriptions."""
        found = self.clock_devices()
        if found is None:
            return None
        devices, server, availability = found
        return StepClock(ModelCosts.from_config(load_config(self.info.path)),
                         [h.name for h in self.clients], devices, server,
                         availability_from(availability), seed=self.cfg.seed,
                         agg_interval=self.cfg.agg_interval)

    def clock_started(self) -> None:
        """Hook: the run's virtual clock (if any) now exists (both engines call it once they
        have made it); work done before it, such as HSplitLoRA's initial probe, is charged
        here."""

    def client_blocks(self) -> dict[str, int]:
        """Blocks each client runs: its segment (split methods) or the whole model."""
        return {h.name: (h.seg.end if self.server is not None else self.info.num_layers)
                for h in self.clients}

    def after_aggregate(self, step: int) -> dict[str, int]:
        """Hook for methods that reconfigure after aggregating (HSplitLoRA); extra bytes."""
        return {}

    def summary_extra(self) -> dict[str, Any]:
        """Hook: method-specific figures for summary.json."""
        return {}

    def _log_eval(self, step: int, result: dict[str, float]) -> None:
        self.history.append({"step": step, **result})
        extra = {"virtual_time": round(self.vclock.now, 6)} if self.vclock is not None else {}
        if self.run is not None:
            self.run.metric(kind="eval", step=step, client="global", **result, **extra)

    def save(self, run: RunDir) -> Path:
        """Write the final model: one PEFT adapter for LoRA methods, full weights for ft."""
        out = run.adapters("final")
        if self.traits.full:
            out = run.path / "model"
            split.base_model(self.clients[0].seg.model).save_pretrained(str(out))
            return out
        segs = [self.clients[0].seg] + ([self.server.seg] if self.server is not None else [])
        lora.save_peft_adapter(out, segs, self.global_ranks(), alpha=self.cfg.lora_alpha,
                               dropout=self.cfg.lora_dropout, base_path=str(self.info.path))
        return out


def server_chunks(n: int, chunk: int) -> list[slice]:
    """The passes ``--server-chunk`` cuts ``n`` clients' payloads into: slices of ``chunk``
    clients, or one slice of all of them when ``chunk`` is 0 (the concatenated pass)."""
    size = chunk if chunk > 0 else max(n, 1)
    return [slice(i, i + size) for i in range(0, n, size)]


def _pad(t: torch.Tensor, width: int, value: float | int) -> torch.Tensor:
    """Right-pad dimension 1 of ``t`` to ``width``."""
    extra = width - t.shape[1]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[1] = extra
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=1)
