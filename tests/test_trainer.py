"""The in-process trainer: SplitLoRA's step, aggregation and the run directory."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from runner.config import TrainConfig
from runner.model import lora
from runner.rundir import RunDir, read_jsonl
from runner.trainer import Trainer, prepare


def _cfg(**kw) -> TrainConfig:
    base = dict(model="tiny-llama", data="synthetic", clients=1, split=2, steps=6,
                agg_interval=1, eval_every=3, eval_max_examples=16, max_len=256, lr=2e-3,
                batch_size=4, seed=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_splitlora_one_client_equals_cenlora(family):
    """Acceptance: splitlora with 1 client and I=1 matches cenlora step for step.

    LoRA dropout stays on (0.1): with one client the split forward draws its dropout masks
    in the same order as the unsplit forward, so even the random masks agree.
    """
    targets = ("q", "v") if family == "tiny-llama" else ("qkv", "fc")
    # Each trainer seeds the global RNG (dropout) when built: run one, then the other.
    a = Trainer(_cfg(method="splitlora", model=family, targets=targets))
    loss_a = [a.train_step(step)[0]["loss"] for step in range(6)]
    b = Trainer(_cfg(method="cenlora", model=family, targets=targets))
    loss_b = [b.train_step(step)[0]["loss"] for step in range(6)]
    for step, (la, lb) in enumerate(zip(loss_a, loss_b, strict=True)):
        assert abs(la - lb) <= 1e-5, (step, la, lb)
    assert loss_a[-1] < loss_a[0]
    # The adapters themselves agree after training.
    merged = {**lora.adapter_state(a.clients[0].seg.model),
              **lora.adapter_state(a.server.seg.model)}
    central = lora.adapter_state(b.clients[0].seg.model)
    assert set(merged) == set(central)
    worst = max(float((merged[k] - central[k]).abs().max()) for k in merged)
    assert worst <= 1e-5
    assert float(sum(p.abs().sum() for k, p in central.items() if "lora_B" in k)) > 0


def test_fedavg_aggregation_is_the_weighted_mean():
    tr = Trainer(_cfg(method="splitlora", clients=3, agg_interval=100))
    for step in range(2):
        tr.train_step(step)
    states = [{k: v.detach().clone() for k, v in lora.adapter_state(h.seg.model).items()}
              for h in tr.clients]
    assert not torch.equal(states[0]["model.layers.0.self_attn.q_proj.lora_A"],
                           states[1]["model.layers.0.self_attn.q_proj.lora_A"])
    weights = [h.weight for h in tr.clients]
    assert abs(sum(weights) - 1) < 1e-9
    tr.aggregate(1)
    for key in states[0]:
        expected = sum(w * s[key] for w, s in zip(weights, states, strict=True))
        for h in tr.clients:
            assert torch.allclose(lora.adapter_state(h.seg.model)[key], expected, atol=1e-7)


def _client_payloads(tr: Trainer) -> list:
    """One client forward per client: what each sends the server (acts, mask, labels, k)."""
    from runner.model import split

    payloads = []
    for h in tr.clients:
        batch = h.batches.next()
        acts = split.client_forward(h.seg, batch["input_ids"], batch["attention_mask"])
        payloads.append((acts.detach(), batch["attention_mask"], batch["labels"], h.seg.end))
    return payloads


def test_server_concatenation_equals_separate_passes():
    """Paper step a3: concatenating clients' activations gives each the same gradient."""
    tr = Trainer(_cfg(method="splitlora", clients=2, lora_dropout=0.0))
    payloads = _client_payloads(tr)
    server_state = {k: v.detach().clone()
                    for k, v in lora.adapter_state(tr.server.seg.model).items()}
    tr.server.opt = None  # no step: keep the server fixed for the comparison
    grads, losses = tr.server_step(payloads)
    total = sum(n for _, n in losses)
    for i, p in enumerate(payloads):
        lora.load_adapter_state(tr.server.seg.model, server_state)
        g, [(loss_sum, n)] = tr.server_step([p])
        # Alone, the loss is normalised by this client's tokens only: rescale to compare.
        assert abs(loss_sum - losses[i][0]) <= 1e-3
        assert torch.allclose(g[0] * n / total, grads[i], atol=1e-6)


def test_fit_writes_a_complete_run_directory(tmp_path):
    cfg = _cfg(method="splitlora", clients=2, steps=4, agg_interval=2, eval_every=2)
    run = RunDir.create(tmp_path / "run", {"train": cfg.to_dict()})
    summary = Trainer(cfg, run).fit()
    rows = read_jsonl(run.path / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert {(r["step"], r["client"]) for r in train} == {
        (s, c) for s in range(4) for c in ("client0", "client1")}
    for r in train:
        assert r["loss"] > 0 and r["tokens"] > 0 and r["bytes_sent"] > 0
        assert r["bytes_received"] > 0 and r["wall_time"] >= 0
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert summary["final_val_ppl"] == pytest.approx(evals[-1]["val_ppl"])
    events = [e["event"] for e in read_jsonl(run.path / "events.jsonl")]
    assert events[0] == "run_started" and events[-1] == "run_finished"
    assert events.count("aggregate") == 2
    adapter = run.adapters("final")
    cfg_json = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((run.path / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("method", ["fedlora", "ft"])
def test_other_methods_train(method):
    tr = Trainer(_cfg(method=method, clients=2, steps=3, lr=1e-3))
    before = tr.evaluate()["val_loss"]
    for step in range(3):
        tr.train_step(step)
        if tr.should_aggregate(step):
            tr.aggregate(step)
    after = tr.evaluate()["val_loss"]
    assert after < before
    if method == "ft":
        assert lora.trainable_parameters(tr.clients[0].seg.model) == sum(
            p.numel() for p in tr.clients[0].seg.model.parameters())
    else:
        assert len(tr.clients) == 2 and tr.server is None


def test_prepare_partitions_clients_disjointly():
    prep = prepare(_cfg(method="splitlora", clients=3))
    rows = Counter()
    for shard in prep.shards:
        assert len(shard) > 0
        rows.update(zip(shard["mr"], shard["ref"], strict=True))
    train = prep.frames["train"]
    assert rows == Counter(zip(train["mr"], train["ref"], strict=True))


def test_scheduled_dropout_reweights_and_resyncs(tmp_path):
    """A client offline for steps [2, 4): it is skipped, aggregation re-weights over the
    others, and on return it receives the global adapters before training again."""
    cfg = _cfg(method="splitlora", clients=3, steps=6, agg_interval=1, eval_every=6,
               dropouts=((1, 2, 4),))
    run = RunDir.create(tmp_path / "run", {"train": cfg.to_dict()})
    tr = Trainer(cfg, run)
    for step in range(4):
        records = tr.train_step(step)
        clients = {r["client"] for r in records}
        assert ("client1" in clients) == (step not in (2, 3))
        tr.aggregate(step)
    # Step 4: client1 comes back and is resynchronised to the last aggregate.
    tr.active(4)
    got = lora.adapter_state(tr.clients[1].seg.model)
    for key, value in tr.global_state.items():
        assert torch.equal(got[key], value)
    events = read_jsonl(run.path / "events.jsonl")
    kinds = [(e["event"], e.get("client"), e.get("step")) for e in events]
    assert ("client_offline", "client1", 2) in kinds
    assert ("client_online", "client1", 4) in kinds
    aggs = [e for e in events if e["event"] == "aggregate"]
    assert aggs[2]["participants"] == ["client0", "client2"]
    assert abs(sum(aggs[2]["weights"]) - 1) < 1e-9
    assert aggs[1]["participants"] == ["client0", "client1", "client2"]


def test_server_chunks_give_the_concatenated_gradient():
    """--server-chunk: chunks back-propagated one by one give every client the gradient and
    loss of the one concatenated pass, and the server's adapters the same gradient (up to
    float summation order)."""
    tr = Trainer(_cfg(method="splitlora", clients=5, lora_dropout=0.0))
    payloads = _client_payloads(tr)
    tr.server.opt = None  # keep the gradients (no step, no zero_grad)
    params = [p for p in tr.server.seg.model.parameters() if p.requires_grad]

    def run(chunk: int):
        tr.cfg.server_chunk = chunk
        for p in params:
            p.grad = None
        grads, losses = tr.server_step(payloads)
        return grads, losses, [p.grad.clone() for p in params]

    whole = run(0)
    for chunk in (1, 2, 3):
        grads, losses, pgrads = run(chunk)
        assert [n for _, n in losses] == [n for _, n in whole[1]]
        for (a, _), (b, _) in zip(losses, whole[1], strict=True):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
        for g, w in zip(grads, whole[0], strict=True):
            assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)
        assert any(float(w.abs().max()) > 0 for w in whole[2])
        for g, w in zip(pgrads, whole[2], strict=True):
            assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


def test_probe_chunks_give_the_whole_probe(monkeypatch):
    """The IWI probe's server side in chunks of the --server-chunk size: every client's
    gradient equals the one-graph probe's bit for bit (its part of the loss depends on its
    own activations only), and the server's numerators agree up to summation order."""
    from runner.methods.hsplitlora import probe_server

    tr = Trainer(_cfg(method="splitlora", clients=5, lora_dropout=0.0))
    payloads = _client_payloads(tr)
    seg = tr.server.seg
    names = [n for n in lora.all_candidates(seg.config) if lora.block_of(n) >= seg.start]
    assert names
    tr.server.seg.model.eval()
    whole_grads, whole_nums = probe_server(tr.server.seg, payloads, names)
    assert any(abs(v) > 0 for v in whole_nums.values())
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad",
                        lambda out, ins, **kw: calls.append(len(ins)) or real_grad(out, ins, **kw))
    for chunk in (1, 2, 3):
        calls.clear()
        grads, nums = probe_server(tr.server.seg, payloads, names, chunk)
        # one graph per chunk, each differentiated (and freed) before the next is built
        assert calls == [min(chunk, 5 - i) for i in range(0, 5, chunk)]
        for g, w in zip(grads, whole_grads, strict=True):
            assert torch.equal(g, w)
        assert nums.keys() == whole_nums.keys()
        for n, v in nums.items():
            assert abs(v - whole_nums[n]) <= 1e-5 * max(1.0, abs(whole_nums[n]))
