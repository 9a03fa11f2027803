"""Adapter aggregation rules: FedAvg, NAA (HSplitLoRA), padded FedAvg, and HetLoRA's.

* FedAvg (SplitLoRA, FedLoRA): the data-weighted mean of every trained tensor, A and B
  separately; used by the in-process trainer and the distributed server alike (one formula,
  so their results are bit-identical).

The other three work on the LoRA factors of one adapted weight ``W`` held by several
participants ``j`` with data weights ``p_j``, ranks ``r_j`` and scalings ``s_j = alpha/r_j``.

* NAA (docs/method.md "NAA"):
  ``dW = sum_j p_j s_j B_j A_j = [p_1 s_1 B_1 | ... | p_n s_n B_n] [A_1; ...; A_n]``,
  exact for any mix of ranks; every holder merges ``dW`` into its frozen weight.
* Padded FedAvg (SplitLoRA's rule, the ``hsplitlora-no-naa`` ablation): zero-pad A and B to
  the largest rank and average them separately; the product ``(sum p B)(sum p A)`` carries the
  cross terms ``B_i A_j`` (the "noise" NAA removes).
* HetLoRA (Cho et al. 2024): zero-pad to the largest rank, average with weights
  proportional to ``p_j * ||B_j A_j||_F`` ("sparsity-weighted"), truncate back to each
  client's rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """One participant's adapter of one weight: ``A`` (r x d_in), ``B`` (d_out x r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float  # alpha / r
    weight: float  # p_j (already summed for the server's share)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """This participant's own update ``s B A`` (d_out x d_in)."""
        return self.scale * (self.B @ self.A)


def normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must have a positive sum")
    return [float(w) / total for w in weights]


def fedavg(states: Sequence[dict[str, torch.Tensor]],
           weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """FedAvg: ``sum_j p_j x_j`` of every tensor ``x`` the participants' ``states`` hold
    (keys of the first), with ``p_j`` the ``weights`` normalised over these participants
    (a round with dropped clients re-weights over those that answered). Returns the average
    and the normalised weights. The sum runs in participant order: callers pass clients in
    client order so that in-process and distributed runs agree to the bit."""
    norm = normalised(weights)
    with torch.no_grad():
        avg = {key: sum(w * s[key].detach() for w, s in zip(norm, states, strict=True))
               for key in states[0]}
    return avg, norm  # type: ignore[return-value]


def naa_concat(parts: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated factors ``(B_cat, A_cat)`` with ``p_j s_j`` folded into ``B``.

    Weights are normalised over the participants given, so a round with dropped clients
    re-weights over those that answered.
    """
    weights = normalised([p.weight for p in parts])
    b_cat = torch.cat([w * p.scale * p.B for w, p in zip(weights, parts, strict=True)], dim=1)
    a_cat = torch.cat([p.A for p in parts], dim=0)
    return b_cat, a_cat


def naa_delta(parts: Sequence[Factors]) -> torch.Tensor:
    """``dW = sum_j p_j s_j B_j A_j`` through the concatenated factors (exact)."""
    b_cat, a_cat = naa_concat(parts)
    return b_cat @ a_cat


def wire_bytes(d_out: int, d_in: int, total_rank: int, element: int = 4) -> tuple[int, str]:
    """Bytes to ship one aggregated update, and the form that costs fewer bytes.

    docs/method.md "NAA: on the wire": the concatenated factors, or the dense ``dW`` when
    that is smaller.
    """
    factors = total_rank * (d_out + d_in) * element
    dense = d_out * d_in * element
    return (factors, "factors") if factors <= dense else (dense, "dense")


def _pad(parts: Sequence[Factors]) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    r_max = max(p.rank for p in parts)
    a_pad, b_pad = [], []
    for p in parts:
        # on the factors' own device: a merge on the GPU pads on the GPU
        a = torch.zeros((r_max, p.A.shape[1]), dtype=p.A.dtype, device=p.A.device)
        a[: p.rank] = p.A
        b = torch.zeros((p.B.shape[0], r_max), dtype=p.B.dtype, device=p.B.device)
        b[:, : p.rank] = p.B
        a_pad.append(a)
        b_pad.append(b)
    return a_pad, b_pad, r_max


def padded_fedavg(parts: Sequence[Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average zero-padded ``A`` and ``B`` separately, weighted by ``p_j``."""
    weights = normalised([p.weight for p in parts])
    a_pad, b_pad, _ = _pad(parts)
    a = sum(w * a for w, a in zip(weights, a_pad, strict=True))
    b = sum(w * b for w, b in zip(weights, b_pad, strict=True))
    return a, b


def hetlora_weights(parts: Sequence[Factors]) -> list[float]:
    """HetLoRA's sparsity-weighted aggregation weights: ``p_j * ||s_j B_j A_j||_F``.

    Design choice: when every update is zero (first round, B = 0) the weights fall back to
    ``p_j``.
    """
    raw = [p.weight * float(torch.linalg.matrix_norm(p.delta())) for p in parts]
    if sum(raw) <= 0:
        raw = [p.weight for p in parts]
    return normalised(raw)


def hetlora_aggregate(parts: Sequence[Factors]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero-pad, sparsity-weighted average, truncate back: new ``(A_j, B_j)`` per participant.

    Design choice: HetLoRA's rank self-pruning is not applied; ranks stay as the budget set
    them, so the comparison isolates the aggregation rule.
    """
    weights = hetlora_weights(parts)
    a_pad, b_pad, _ = _pad(parts)
    a = sum(w * x for w, x in zip(weights, a_pad, strict=True))
    b = sum(w * x for w, x in zip(weights, b_pad, strict=True))
    return [(a[: p.rank].clone(), b[:, : p.rank].clone()) for p in parts]


def merge_into(weight: torch.Tensor, delta: torch.Tensor, *, transposed: bool) -> None:
    """``W <- W + dW`` in place; GPT-2's Conv1D stores ``W`` as (d_in, d_out)."""
    with torch.no_grad():
        weight.add_(delta.T if transposed else delta)


def participants(layer: int, splits: Sequence[int],
                 weights: Sequence[float]) -> tuple[list[int], float]:
    """Who trained an adapter of block ``layer`` (docs/method.md "NAA: participants").

    Returns the clients with ``k_i > layer`` (each trained a client-side copy) and the
    server's weight: the sum of ``p_i`` over clients with ``k_i <= layer`` (their activations
    trained the server's copy), 0 when no client's split point is at or below ``layer``.
    """
    clients = [i for i, k in enumerate(splits) if k > layer]
    server = float(sum(w for k, w in zip(splits, weights, strict=True) if k <= layer))
    return clients, server
