"""IWI: the hook-based numerator equals the explicit sum of w * dL/dw."""

from __future__ import annotations

import math

import pytest
import torch

from runner.methods import importance
from runner.model import lora, models, split


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_hook_numerator_equals_explicit_sum(name):
    info = models.model_info(name)
    seg = split.load_unsplit(info.path)
    names = lora.all_candidates(seg.config)
    # Adapt a few weights (with non-zero B) so hooks must see through LoRA wrappers too.
    lora.attach_lora(seg, {names[0]: 4, names[5]: 2}, alpha=32, dropout=0.0, seed=0)
    with torch.no_grad():
        for k, p in lora.adapter_state(seg.model).items():
            if k.endswith("lora_B"):
                p.normal_(0, 0.1)
    seg.model.eval()
    ids = torch.randint(0, 250, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100

    def loss_of(hidden):
        h = split.run_blocks(seg, hidden, None, 0, seg.end)
        rows, counts = split.head_row_losses(seg, h, labels)
        return rows.sum() / counts.sum()

    # Hook-based: frozen weights stay frozen; only the input hidden states are a leaf.
    with importance.ImportanceProbe(seg.model, names) as probe:
        leaf = split.embed(seg, ids).detach().requires_grad_(True)
        torch.autograd.grad(loss_of(leaf), [leaf])
    # Explicit: materialise dL/dW of every frozen candidate weight.
    linears = importance.base_linears(seg.model, names)
    assert set(linears) == set(names)
    for m in linears.values():
        m.weight.requires_grad_(True)
    loss_of(split.embed(seg, ids)).backward()
    for key, m in linears.items():
        explicit = float((m.weight * m.weight.grad).sum())
        assert probe.numerators[key] == pytest.approx(explicit, rel=1e-4, abs=1e-7), key
    assert any(abs(v) > 1e-6 for v in probe.numerators.values())


def test_cost_and_smoothing():
    c = importance.weight_cost(576, 576, 8, tokens=512)
    assert c == 8 * 1152 * 4 * 4 + 512 * (576 + 8) * 4
    tr = importance.ImportanceTracker(total_steps=100)
    assert tr.update({"w": 2.0}, step=1) == {"w": 2.0}  # I_0 = I~_1
    out = tr.update({"w": 4.0}, step=50)
    g = 1 - math.exp(-(4.0 / 2.0) * 50 / 100)
    assert out["w"] == pytest.approx(g * 2.0 + (1 - g) * 4.0)
    cur = importance.current_importance({"a": -3.0, "b": 1.0}, {"a": 3, "b": 2})
    assert cur == {"a": 1.0, "b": 0.5}


def test_global_importance_is_data_weighted():
    client0 = ({"w1": 1.0, "w2": 2.0}, {"w1": 0.25, "w2": 0.25})
    client1 = ({"w1": 3.0}, {"w1": 0.5})
    server = ({"w2": 4.0}, {"w2": 0.75})
    g = importance.global_importance([client0, client1, server])
    assert g["w1"] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert g["w2"] == pytest.approx((0.25 * 2 + 0.75 * 4) / 1.0)
    assert importance.relative_change({"a": 1.0, "b": 1.0}, {"a": 1.5, "b": 1.0}) == 0.25
