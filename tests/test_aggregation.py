"""NAA, padded FedAvg and HetLoRA aggregation: exact algebra, property-tested."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.methods.aggregation import (
    Factors,
    hetlora_aggregate,
    hetlora_weights,
    merge_into,
    naa_concat,
    naa_delta,
    padded_fedavg,
    participants,
    wire_bytes,
)

D_OUT, D_IN, ALPHA = 12, 10, 32.0


def _factors(ranks, weights, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r, w in zip(ranks, weights, strict=True):
        out.append(Factors(A=torch.randn(r, D_IN, generator=gen, dtype=torch.float64),
                           B=torch.randn(D_OUT, r, generator=gen, dtype=torch.float64),
                           scale=ALPHA / r, weight=w))
    return out


@settings(max_examples=60, deadline=None)
@given(
    splits=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    raw_weights=st.lists(st.floats(0.05, 10.0), min_size=5, max_size=5),
    ranks=st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=6, max_size=6),
    layer=st.integers(0, 5),
    seed=st.integers(0, 10_000),
)
def test_naa_merge_is_exact_for_any_ranks_splits_and_weights(splits, raw_weights, ranks, layer,
                                                              seed):
    """Acceptance: merged weight == W + sum_j p_j s_j B_j A_j (fp32 tolerance)."""
    weights = raw_weights[: len(splits)]
    total = sum(weights)
    p = [w / total for w in weights]
    clients, server_w = participants(layer, splits, p)
    who = [(i, p[i]) for i in clients] + ([("server", server_w)] if server_w > 0 else [])
    assert abs(sum(w for _, w in who) - 1.0) < 1e-9  # every client's data counts once
    parts = _factors([ranks[j] for j in range(len(who))], [w for _, w in who], seed)
    expected = sum(w * f.scale * (f.B @ f.A) for (_, w), f in zip(who, parts, strict=True))
    base = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)
    for transposed in (False, True):
        w = (base.T if transposed else base).clone().float()
        merge_into(w, naa_delta(parts).float(), transposed=transposed)
        want = (base + expected).float()
        assert torch.allclose(w.T if transposed else w, want, atol=1e-4, rtol=1e-5)
    b_cat, a_cat = naa_concat(parts)
    assert a_cat.shape[0] == b_cat.shape[1] == sum(f.rank for f in parts)


def test_padded_fedavg_differs_by_exactly_the_cross_terms():
    """(sum p B)(sum p A) = NAA's sum p B A  +  cross terms p_i p_j B_i A_j (i != j) - ..."""
    parts = _factors([4, 4, 4], [0.5, 0.3, 0.2], seed=1)
    s = parts[0].scale
    a, b = padded_fedavg(parts)
    fedavg = s * (b @ a)
    naa = naa_delta(parts)
    p = [f.weight for f in parts]
    cross = sum(p[i] * p[j] * s * (parts[i].B @ parts[j].A)
                for i in range(3) for j in range(3) if i != j)
    diagonal_shrink = sum((p[i] ** 2 - p[i]) * s * (parts[i].B @ parts[i].A) for i in range(3))
    assert torch.allclose(fedavg, naa + cross + diagonal_shrink, atol=1e-10)
    assert float((fedavg - naa).abs().max()) > 1e-2  # the "noise" is real, not rounding


def test_hetlora_pads_weights_by_norm_and_truncates():
    parts = _factors([2, 4, 8], [0.2, 0.3, 0.5], seed=2)
    w = hetlora_weights(parts)
    norms = [f.weight * float(torch.linalg.matrix_norm(f.delta())) for f in parts]
    assert [round(x, 12) for x in w] == [round(n / sum(norms), 12) for n in norms]
    out = hetlora_aggregate(parts)
    assert [a.shape[0] for a, _ in out] == [2, 4, 8]
    assert [b.shape[1] for _, b in out] == [2, 4, 8]
    # Row 0 of A is the weighted mean of every client's row 0.
    assert torch.allclose(out[0][0][0], sum(wi * f.A[0] for wi, f in zip(w, parts, strict=True)))
    # Rows 4..7 only come from the rank-8 client (zero padding elsewhere).
    assert torch.allclose(out[2][0][4:], w[2] * parts[2].A[4:])
    # Zero updates (B = 0): weights fall back to p_j.
    zero = [Factors(f.A, torch.zeros_like(f.B), f.scale, f.weight) for f in parts]
    assert hetlora_weights(zero) == [0.2, 0.3, 0.5]


def test_participants_and_wire_form():
    assert participants(3, [2, 4, 6], [0.2, 0.3, 0.5]) == ([1, 2], 0.2)
    assert participants(0, [2, 4, 6], [0.2, 0.3, 0.5]) == ([0, 1, 2], 0.0)
    assert participants(6, [2, 4, 6], [0.2, 0.3, 0.5])[1] == 1.0
    assert wire_bytes(576, 576, 24) == (24 * 1152 * 4, "factors")
    assert wire_bytes(64, 64, 100) == (64 * 64 * 4, "dense")
