"""IWI: important-weight identification (RNGWP), docs/method.md "IWI".

Current importance of an adapted-weight candidate ``W``:
``I~_t(W) = |sum_j w_j * dL/dw_j| / C(W)``.

The numerator is computed without ever materialising ``dL/dW`` of the frozen weight: for
``y = W x + b``, ``sum_j w_j dL/dw_j = sum_tokens <dL/dy, W x>``, so a forward hook keeps
``W x = y - b`` and a tensor hook on ``y`` adds ``<dL/dy, W x>`` when the gradient arrives.
That costs one extra activation per hooked weight for one probe batch, not a d_out x d_in
gradient per weight, which is the point on a small device.

Design choices (ours; docs/method.md lists them): absolute value of the sum per weight
matrix; ``iwi_batches`` probe batches (default 1) at each aggregation; ``C(W)`` at the
reference rank; global importance is the data-weighted mean over all holders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from runner.model.lora import module_key

ELEMENT_BYTES = 4  # fp32 training


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D: (d_in, d_out)
    return int(w.shape[0]), int(w.shape[1])


def adapter_bytes(d_in: int, d_out: int, rank: int, element: int = ELEMENT_BYTES) -> int:
    """LoRA parameters + their gradients + two AdamW moments at ``rank``."""
    return rank * (d_in + d_out) * element * 4


def lora_activation_bytes(d_in: int, rank: int, tokens: int, element: int = ELEMENT_BYTES) -> int:
    """What a LoRA branch keeps for backward per mini-batch: its (dropped-out) input x and A x.

    Design choice: the dropout mask is counted as part of x (same size, bool in practice).
    """
    return tokens * (d_in + rank) * element


def weight_cost(d_in: int, d_out: int, rank: int, tokens: int) -> int:
    """``C(W)``: bytes needed to fine-tune ``W`` at ``rank`` for one mini-batch of ``tokens``."""
    return adapter_bytes(d_in, d_out, rank) + lora_activation_bytes(d_in, rank, tokens)


def base_linears(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Global name -> the frozen linear of each candidate (inside a LoRA wrapper if any)."""
    wanted = set(names) if names is not None else None
    out: dict[str, nn.Module] = {}
    for full, module in model.named_modules():
        if full.endswith(".base_layer"):
            continue
        key = module_key(full)
        if wanted is not None and key not in wanted:
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D":
            if wanted is None and not key.split(".")[-1].endswith(("proj", "c_attn", "c_fc")):
                continue
            out[key] = base
    return out


class ImportanceProbe:
    """Context manager accumulating ``sum_tokens <dL/dy, W x>`` for the hooked weights.

    Gradients only reach ``y`` if something upstream requires grad: probe passes make their
    input hidden states a leaf with ``requires_grad`` (see :func:`probe_numerators`).
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None):
        self.linears = base_linears(model, names)
        self.numerators: dict[str, float] = {k: 0.0 for k in self.linears}
        self._handles: list = []

    def _forward_hook(self, key: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            wx = output.detach()
            bias = getattr(module, "bias", None)
            if bias is not None:
                wx = wx - bias.detach()

            def on_grad(grad: torch.Tensor) -> None:
                self.numerators[key] += float((grad.detach() * wx).sum())

            output.register_hook(on_grad)

        return hook

    def __enter__(self) -> ImportanceProbe:
        for key, module in self.linears.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def current_importance(numerators: Mapping[str, float],
                       costs: Mapping[str, int]) -> dict[str, float]:
    """``I~_t(W) = |numerator| / C(W)``."""
    return {k: abs(v) / max(costs[k], 1) for k, v in numerators.items()}


@dataclass
class ImportanceTracker:
    """The paper's adaptive smoothing of importance over probes.

    ``I_t = g_t I_{t-1} + (1 - g_t) I~_t`` with ``g_t = 1 - exp(-(I~_t / I_{t-1}) t / T)``,
    ``I_0 = I~_1``; ``T`` is the run's total number of steps.
    """

    total_steps: int
    values: dict[str, float] = field(default_factory=dict)

    def update(self, current: Mapping[str, float], step: int) -> dict[str, float]:
        t = max(step, 1)
        for key, now in current.items():
            prev = self.values.get(key)
            if prev is None:
                self.values[key] = now
                continue
            ratio = now / prev if prev > 0 else 0.0
            g = 1.0 - math.exp(-ratio * t / max(self.total_steps, 1))
            self.values[key] = g * prev + (1.0 - g) * now
        return dict(self.values)


def global_importance(per_holder: Iterable[tuple[Mapping[str, float], Mapping[str, float]]]
                      ) -> dict[str, float]:
    """Data-weighted mean over holders: ``(importance, holder weight per weight name)``.

    A holder's weight for ``W`` is its ``p_i`` (client) or the summed ``p_i`` of the clients
    whose activations it processed at that block (server); holders not holding ``W`` give 0.
    """
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for values, weights in per_holder:
        for key, v in values.items():
            w = float(weights.get(key, 0.0))
            if w <= 0:
                continue
            num[key] = num.get(key, 0.0) + w * v
            den[key] = den.get(key, 0.0) + w
    return {k: num[k] / den[k] for k in num}


def relative_change(old: Mapping[str, float], new: Mapping[str, float]) -> float:
    """Relative L1 change of an importance vector (the ARMSC trigger's measure)."""
    keys = set(old) | set(new)
    base = sum(abs(old.get(k, 0.0)) for k in keys)
    if base == 0:
        return math.inf if any(new.get(k, 0.0) for k in keys) else 0.0
    return sum(abs(new.get(k, 0.0) - old.get(k, 0.0)) for k in keys) / base
