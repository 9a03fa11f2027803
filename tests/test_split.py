"""Split forward/backward is exact: same loss and LoRA gradients as the unsplit HF model.

Acceptance (issue "Foundation"): for both families and several split points, fp32, max abs
difference <= 1e-5. The reference is transformers' own ``model(input_ids, labels=...)``
forward on the unsplit model, not our code path, so a mistake in our mask, rotary or
position handling would show here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from runner.model import lora, models, split

TOL = 1e-5


def _batch(tokenizer):
    texts = ["name[The Eagle], eatType[coffee shop] || The Eagle is a coffee shop.",
             "name[Zizzi] || Zizzi."]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :5] = -100  # loss on the "text" part only, as in training
    return enc["input_ids"], enc["attention_mask"], labels


def _ranks(config):
    """Per-weight ranks with a mix of values and a rank-0 hole."""
    names = lora.all_candidates(config)
    return {n: [0, 2, 4, 8][i % 4] for i, n in enumerate(names)}


def _nonzero_b(model, seed):
    """Give every B a value that depends only on its name, so any partition agrees."""
    with torch.no_grad():
        for key, p in lora.adapter_state(model).items():
            if key.endswith("lora_B"):
                gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_split_matches_unsplit_hf_model(name):
    info = models.model_info(name)
    tok = models.load_tokenizer(info.path)
    ids, mask, labels = _batch(tok)
    hf = models.load_full_model(info.path)
    hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss

    full = split.load_unsplit(info.path)
    ranks = _ranks(full.config)
    lora.attach_lora(full, ranks, alpha=32, dropout=0.0, seed=3)
    _nonzero_b(full.model, 7)
    loss_sum, n = split.token_loss(split.full_forward(full, ids, mask), labels)
    (loss_sum / n).backward()
    ref_grads = {k: p.grad.clone() for k, p in lora.adapter_state(full.model).items()}
    assert len(ref_grads) > 0

    for k in range(1, info.num_layers):
        client, server = split.load_client(info.path, k), split.load_server(info.path, k,
                                                                           info.num_layers)
        lora.attach_lora(client, ranks, alpha=32, dropout=0.0, seed=3)
        lora.attach_lora(server, ranks, alpha=32, dropout=0.0, seed=3)
        _nonzero_b(client.model, 7)
        _nonzero_b(server.model, 7)
        # B must be the same tensors as on the unsplit model (same names, same seed).
        for key, p in {**lora.adapter_state(client.model),
                       **lora.adapter_state(server.model)}.items():
            assert torch.equal(p, lora.adapter_state(full.model)[key]), key
        acts = split.client_forward(client, ids, mask)
        wire = acts.detach().requires_grad_(True)
        s_sum, s_n = split.token_loss(split.server_forward(server, wire, mask, k), labels)
        (s_sum / s_n).backward()
        acts.backward(wire.grad)
        grads = {key: p.grad for key, p in {**lora.adapter_state(client.model),
                                            **lora.adapter_state(server.model)}.items()}
        assert set(grads) == set(ref_grads)
        assert s_n == n
        assert abs(float(s_sum / s_n) - float(loss_sum / n)) <= TOL
        worst = max(float((grads[key] - ref_grads[key]).abs().max()) for key in grads)
        assert worst <= TOL, (k, worst)
    # With zero-initialised B the adapted model equals the base: our loss = HF's loss.
    base = split.load_unsplit(info.path)
    b_sum, b_n = split.token_loss(split.full_forward(base, ids, mask), labels)
    assert abs(float(b_sum / b_n) - float(hf_loss)) <= TOL


def test_segments_hold_only_their_blocks():
    info = models.model_info("tiny-llama")
    client = split.load_client(info.path, 1)
    server = split.load_server(info.path, 1, info.num_layers)
    c_names = {n for n, _ in client.model.named_parameters()}
    s_names = {n for n, _ in server.model.named_parameters()}
    assert any("embed_tokens" in n for n in c_names)
    assert not any(".layers.1." in n or ".layers.3." in n for n in c_names)
    assert not any(n.split("model.", 1)[-1] == "norm.weight" for n in c_names)
    assert not any(".layers.0." in n for n in s_names)
    assert any("lm_head" in n for n in s_names)
    assert not any("embed_tokens" in n for n in s_names)
    full_bytes = split.load_unsplit(info.path).parameters_bytes()
    assert client.parameters_bytes() < full_bytes
    with pytest.raises(ValueError):
        split.run_blocks(client, torch.zeros(1, 3, 64), None, 0, 2)


_PEAK = textwrap.dedent("""
    import json, resource, sys, torch
    from runner.model import models, split

    def resident_kib():  # current RSS, not the peak: earlier transients cannot mask growth
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024

    info = models.model_info("smollm2-135m")
    before = resident_kib()
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        if sys.argv[1] == "client":
            seg = split.load_client(info.path, int(sys.argv[2]))
            split.client_forward(seg, ids, None)
        else:
            seg = split.load_unsplit(info.path)
            split.full_forward(seg, ids, None)
    after = resident_kib()
    print(json.dumps({"delta_kib": after - before, "param_bytes": seg.parameters_bytes()}))
""")


def _peak(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_client_never_materialises_server_blocks():
    """A client at k=2 of SmolLM2 (30 blocks) loads ~embeddings + 2 blocks, not the model.

    Resident-memory growth of a fresh process across loading and one forward pass (weights
    are memory-mapped from safetensors, so only a forward pass makes them resident), measured
    and compared with the full model.
    """
    models.model_info("smollm2-135m")  # convert/cache once, outside the measured processes
    client = _peak("client", "2")
    full = _peak("full")
    mib = 1024
    # Parameter bytes: embeddings 49152*576*4 = 113 MB + 2 blocks ~ 14 MB each.
    assert client["param_bytes"] < 0.3 * full["param_bytes"]
    # Measured peak growth follows the parameter bytes: the client never holds the rest.
    assert client["delta_kib"] * 1024 < 0.5 * full["delta_kib"] * 1024
    assert client["delta_kib"] < (client["param_bytes"] / 1024) * 1.6 + 64 * mib
    assert full["delta_kib"] * 1024 > 0.9 * full["param_bytes"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_shared_frozen_tensors_exist_once(name):
    """Segments loaded with one ``shared`` dict hold one embedding (also the tied head) and
    their own block weights: NAA merges into each holder's blocks in place (issue 15)."""
    info = models.model_info(name)
    shared = split.SharedFrozen()
    a = split.load_client(info.path, 2, shared=shared)
    b = split.load_client(info.path, 1, shared=shared)
    srv = split.load_server(info.path, 1, info.num_layers, shared=shared)
    pa, pb, ps = split.parts(a.model), split.parts(b.model), split.parts(srv.model)
    assert pa.embed.weight.data_ptr() == pb.embed.weight.data_ptr() == ps.head.weight.data_ptr()
    assert pa.layers[0] is not pb.layers[0]
    wa = next(pa.layers[0].parameters())
    wb = next(pb.layers[0].parameters())
    assert wa.data_ptr() != wb.data_ptr()
    fresh = split.load_client(info.path, 2)
    torch.testing.assert_close(fresh.model.state_dict(), a.model.state_dict(), rtol=0, atol=0)
    assert split.parts(fresh.model).embed.weight.data_ptr() != pa.embed.weight.data_ptr()


def test_shared_blocks_are_one_copy():
    """``SharedFrozen(blocks=True)`` (the distributed server's shadows): every segment of the
    process holds the same block tensors, loaded with the same values."""
    info = models.model_info("tiny-llama")
    shared = split.SharedFrozen(blocks=True)
    a = split.load_client(info.path, 2, shared=shared)
    srv = split.load_segment(info.path, 0, info.num_layers, embed=False, head=True,
                             shared=shared)
    wa = dict(split.parts(a.model).layers[1].named_parameters())
    ws = dict(split.parts(srv.model).layers[1].named_parameters())
    assert wa.keys() == ws.keys()
    assert all(wa[n].data_ptr() == ws[n].data_ptr() for n in wa)
    fresh = split.load_client(info.path, 2)
    torch.testing.assert_close(fresh.model.state_dict(), a.model.state_dict(), rtol=0, atol=0)
