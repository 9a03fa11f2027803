"""Per-weight LoRA ranks through peft, and adapters in PEFT format."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from runner.errors import ConfigError
from runner.model import lora, models, split


@pytest.fixture(scope="module")
def info():
    return models.model_info("tiny-llama")


def test_per_weight_ranks_and_rank_zero(info):
    seg = split.load_unsplit(info.path)
    ranks = {n: 0 for n in lora.all_candidates(seg.config)}
    ranks["model.layers.0.self_attn.q_proj"] = 2
    ranks["model.layers.1.mlp.down_proj"] = 16
    ranks["model.layers.3.self_attn.v_proj"] = 4
    got = lora.attach_lora(seg, ranks, alpha=32, dropout=0.0, seed=0)
    assert got == {k: v for k, v in ranks.items() if v > 0}
    state = lora.adapter_state(seg.model)
    assert set(state) == {f"{n}.{ab}" for n in got for ab in ("lora_A", "lora_B")}
    assert state["model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 64)
    assert state["model.layers.1.mlp.down_proj.lora_B"].shape == (64, 16)
    assert state["model.layers.3.self_attn.v_proj.lora_A"].shape[0] == 4
    # Scaling is alpha / r per weight.
    mods = dict(seg.model.named_modules())
    assert mods["base_model.model.model.layers.1.mlp.down_proj"].scaling["default"] == 2.0
    assert mods["base_model.model.model.layers.0.self_attn.q_proj"].scaling["default"] == 16.0
    # Only adapter weights train.
    assert lora.trainable_parameters(seg.model) == sum(t.numel() for t in state.values())


def test_init_is_partition_independent(info):
    ranks = lora.uniform_ranks(split.load_unsplit(info.path).config, 4)
    full, client = split.load_unsplit(info.path), split.load_client(info.path, 2)
    lora.attach_lora(full, ranks, alpha=32, dropout=0.0, seed=9)
    lora.attach_lora(client, ranks, alpha=32, dropout=0.0, seed=9)
    fs, cs = lora.adapter_state(full.model), lora.adapter_state(client.model)
    assert cs and set(cs) < set(fs)
    for k, v in cs.items():
        assert torch.equal(v, fs[k])
    other = split.load_client(info.path, 2)
    lora.attach_lora(other, ranks, alpha=32, dropout=0.0, seed=10)
    key = "model.layers.0.self_attn.q_proj.lora_A"
    assert not torch.equal(lora.adapter_state(other.model)[key], cs[key])


def test_bad_rank_and_projection(info):
    config = split.load_unsplit(info.path).config
    with pytest.raises(ConfigError):
        lora.uniform_ranks(config, -1)
    with pytest.raises(ConfigError, match="unknown projection"):
        lora.weight_names(config, [0], ["qkv"])
    with pytest.raises(ConfigError):
        lora.lora_config({"model.layers.0.self_attn.q_proj": 0}, "llama", 32, 0.0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_split_adapter_saves_as_one_peft_adapter(tmp_path, name):
    """Client + server adapters become one PEFT adapter that PeftModel.from_pretrained loads
    onto the unsplit base, giving the split model's logits."""
    info = models.model_info(name)
    config = split.load_unsplit(info.path).config
    names = lora.all_candidates(config)
    ranks = {n: [2, 0, 4, 8][i % 4] for i, n in enumerate(names)}
    client = split.load_client(info.path, 2)
    server = split.load_server(info.path, 2, info.num_layers)
    for seg in (client, server):
        lora.attach_lora(seg, ranks, alpha=32, dropout=0.0, seed=1)
        with torch.no_grad():
            for k, p in lora.adapter_state(seg.model).items():
                if k.endswith("lora_B"):
                    p.normal_(0, 0.05)
    out = tmp_path / "adapter"
    lora.save_peft_adapter(out, [client, server], ranks, alpha=32, dropout=0.0,
                           base_path=str(info.path))
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["lora_alpha"] == 32
    loaded = PeftModel.from_pretrained(models.load_full_model(info.path), str(out))
    loaded.eval()
    client.model.eval()
    server.model.eval()
    ids = torch.randint(0, 250, (2, 9))
    with torch.no_grad():
        want = split.server_forward(server, split.client_forward(client, ids, None), None, 2)
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    # And the adapter really changes the model.
    with torch.no_grad():
        base = models.load_full_model(info.path)(input_ids=ids).logits
    assert (base - got).abs().max() > 1e-3
