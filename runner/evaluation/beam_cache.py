"""A key/value cache laid out for beam search: preallocated, reordered only where beams differ.

Why not Hugging Face's ``DynamicCache`` as generate() uses it: every decoding step it grows
each layer's keys and values with ``torch.cat`` (a fresh copy of the whole cache) and then
reorders them for the surviving beams with ``index_select`` (a second copy): 60 copies of up
to tens of MB per step for SmolLM2 with 16 MRs x 10 beams. Yet a beam that takes over
another beam's place shares most of its history with the beam it replaces: the prompt
always (beams are only ever reordered within their MR), and usually all but its last few
generated tokens (81 % of the generated positions on the dev set, pretrained SmolLM2). The
keys and values of a position depend only on the tokens up to it, and a row's arithmetic on
nothing but its own inputs, so those positions already hold the right values, bit for bit.

Here each layer's keys and values live in one buffer sized for the whole generation,
``[rows, positions, heads, head_dim]``: a step writes its position in place, and a reorder
copies only the positions where a row's history differs from the history it takes over
(one gather and one scatter of whole ``heads x head_dim`` position vectors, contiguous in
this layout). The attention sees exactly what ``DynamicCache`` would hand it,
``[rows, heads, length, head_dim]`` with the same values, as a strided view: PyTorch's
scaled-dot-product attention gives bit-identical results for it (tests/test_generation.py
compares the logits and the search's scores bit for bit).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class BeamLayer(DynamicLayer):
    """One layer's keys and values in buffers ``[rows, prompt + max_new, heads, head_dim]``.

    ``keys``/``values`` are ``[rows, heads, length, head_dim]`` views of the first
    ``length`` positions, as a ``DynamicLayer`` holds them, so the model's attention and
    mask code read it unchanged.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int, capacity: int):
        super().__init__()
        self.prompt = keys.shape[2]
        self.length = self.prompt
        self.device = keys.device
        self.buffers = [self._fill(keys, repeats, capacity), self._fill(values, repeats, capacity)]
        self.is_initialized = True
        self._views()

    @staticmethod
    def _fill(states: torch.Tensor, repeats: int, capacity: int) -> torch.Tensor:
        """A buffer whose rows r*repeats .. r*repeats+repeats-1 (the beams of MR r) start with
        MR r's prompt states."""
        rows, heads, prompt, dim = states.shape
        buffer = states.new_empty((rows * repeats, capacity, heads, dim))
        buffer.view(rows, repeats, capacity, heads, dim)[:, :, :prompt].copy_(
            states.transpose(1, 2).unsqueeze(1))
        return buffer

    def _views(self) -> None:
        self.keys = self.buffers[0][:, :self.length].transpose(1, 2)
        self.values = self.buffers[1][:, :self.length].transpose(1, 2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys and values after the cached ones (in place, no copy of the
        cache) and return the views the attention reads."""
        end = self.length + key_states.shape[-2]
        if end > self.buffers[0].shape[1]:
            raise RuntimeError(f"beam cache full: {end} > {self.buffers[0].shape[1]} positions")
        self.buffers[0][:, self.length:end].copy_(key_states.transpose(1, 2))
        self.buffers[1][:, self.length:end].copy_(value_states.transpose(1, 2))
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def move(self, sources: torch.Tensor, targets: torch.Tensor) -> None:
        """Copy position vectors: flat index ``row * capacity + position`` ``sources[i]`` to
        ``targets[i]``, all read before any is written."""
        for buffer in self.buffers:
            flat = buffer.view(-1, buffer.shape[2] * buffer.shape[3])
            flat.index_copy_(0, targets, flat.index_select(0, sources))

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (MRs whose search has ended leave the batch)."""
        self.buffers = [buffer.index_select(0, rows) for buffer in self.buffers]
        self._views()


def beam_cache(cache: object, repeats: int, capacity: int) -> DynamicCache | None:
    """The prefill's ``DynamicCache`` turned into :class:`BeamLayer` layers with ``repeats``
    rows per prefill row and room for ``capacity`` positions, or None when the cache is of
    another kind (sliding windows, linear attention...): the caller then keeps Hugging
    Face's own cache and its reordering."""
    if type(cache) is not DynamicCache or not cache.layers:
        return None
    if any(type(layer) is not DynamicLayer or not layer.is_initialized
           for layer in cache.layers):
        return None
    cache.layers = [BeamLayer(layer.keys, layer.values, repeats, capacity)
                    for layer in cache.layers]
    return cache


def reorder(cache: DynamicCache, rows: torch.Tensor, history: torch.Tensor) -> None:
    """Row i of every :class:`BeamLayer` takes row ``rows[i]``'s keys and values, where
    ``history`` ``[rows, generated]`` holds the tokens each row has generated so far (before
    the reorder): only from the first position where row i's history and row ``rows[i]``'s
    differ (earlier positions hold the same values already). ``rows[i]`` must be a beam of
    the same MR as row i (the prompt is never copied)."""
    first: BeamLayer = cache.layers[0]
    generated = history.shape[1]
    if generated == 0:
        return
    differ = history != history.index_select(0, rows)
    # the first differing position of each row (generated: none differs)
    start = torch.where(differ.any(1), differ.to(torch.uint8).argmax(1),
                        torch.full_like(rows, generated))
    counts = generated - start
    total = int(counts.sum())
    if total == 0:
        return
    capacity = first.buffers[0].shape[1]
    targets = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
    # position within each row's run: 0, 1, ... counts[i] - 1, then the next row
    offsets = (torch.arange(total, device=rows.device)
               - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts))
    positions = first.prompt + start.index_select(0, targets) + offsets
    sources = rows.index_select(0, targets) * capacity + positions
    targets = targets * capacity + positions
    for layer in cache.layers:
        layer.move(sources, targets)
