"""The server of a distributed HetLoRA run (docs/method.md "Baselines"): whole-model clients, a
rank per client, and after each aggregation every participant receives its share of the
padded average (``set``).

All of it is what HSplitLoRA's server shares (runner/methods/hetero_server.py): HetLoRA has
no server segment, no probe and no re-plan; its one plan (every client at split point L, its
rank) goes out at the start.
"""

from __future__ import annotations

from runner.methods.hetero_server import HeteroServerHooks, ShadowTrainer
from runner.methods.hetlora import HetLoRATrainer


class HetLoRAShadow(ShadowTrainer, HetLoRATrainer):
    """HetLoRATrainer on shadows of the client processes."""


class HetLoRAServerHooks(HeteroServerHooks):
    """Server side of hetlora."""

    shadow_class = HetLoRAShadow
