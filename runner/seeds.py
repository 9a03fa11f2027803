"""Seed derivation, defined once: every random stream of a run follows from ``cfg.seed``.

Why: the in-process trainer and the distributed processes must draw the same batches and
initialise the same adapters (the equivalence tests compare losses to the last bit), so each
stream's seed formula must be the same code on both sides. The constants are arbitrary but
fixed: changing one changes every run's numbers.
"""

from __future__ import annotations

_STREAM = 1000  # batch streams: seed * 1000 + client index
_STEP = 7919  # a prime: adapters re-initialised at step t use seed + 7919 t
_PROBE = 0x1A7E  # the first word of every probe batch's SeedSequence entropy


def batch_stream(seed: int, index: int) -> int:
    """Client ``index``'s mini-batch stream (runner.dataset.data.ClientBatches)."""
    return seed * _STREAM + index


def probe_batch(seed: int, index: int, step: int) -> tuple[int, int, int, int]:
    """Client ``index``'s IWI probe batch at ``step`` (ClientBatches.sample): a stream of
    its own, apart from the training batches, so probing never shifts the data a method
    trains on (the ablation without IWI sees the same batches at every step). A tuple is the
    entropy of a numpy SeedSequence: no integer formula of the other streams can collide
    with it."""
    return (_PROBE, seed, index, step)


def adapter_init(seed: int, step: int = 0) -> int:
    """LoRA initialisation of adapters (re-)attached at ``step`` (0: the run's start)."""
    return seed + _STEP * step


def client_process(seed: int, index: int) -> int:
    """A distributed client process's own torch RNG (LoRA dropout masks): per client, so
    processes do not share a stream (runs match in-process ones only with dropout 0)."""
    return seed * _STREAM + _STEP * (index + 1)
