"""One Llama decoding step for several beam searches at once, with each search's own cache.

Why: generate() decodes one batch of MRs at a time, and a step's matrix products run on
``MRs x beams`` rows only; our beam search (runner/evaluation/beam.py) also lets MRs whose
search has ended leave their batch, so late in a batch the rows get few while the weights
(540 MB for SmolLM2 in fp32) are still read once per step. Running two batches' steps
together keeps the products large: every projection, norm and MLP runs on all rows at
once, and only the attention (each batch has its own prompt length, padding, mask and
key/value cache) runs per batch.

The arithmetic is ``LlamaModel.forward``'s (transformers 5.x) on the same inputs: the
same modules for the projections, norms and MLP, the same rotary embedding, the same
``create_causal_mask`` and attention function per batch. Each row of a matrix product gets
bit-identical results for any number of rows from beam.MIN_ROWS up, so the stacked step
gives every batch the logits it would get alone (tests/test_generation.py compares them
with the model's own forward bit for bit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


@dataclass
class Group:
    """One beam search's part of a step: its new tokens, their positions, its 2-D attention
    mask (None when its prompts are unpadded, as generate() drops it) and its cache."""

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    cache: object


def covers(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a plain Llama (the classes this step transcribes, not subclasses
    that could change their forward)."""
    base = getattr(model, "base_model", None)
    if type(base) is not LlamaModel:
        return False
    return all(type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
               for layer in base.layers)


def _attention(attn: LlamaAttention, hidden: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, groups: Sequence[Group], spans: Sequence[slice],
               masks: Sequence[object], layer_idx: int) -> torch.Tensor:
    """``LlamaAttention.forward`` with the rows of each group attending to its own cache."""
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    query = attn.q_proj(hidden).view(shape).transpose(1, 2)
    key = attn.k_proj(hidden).view(shape).transpose(1, 2)
    value = attn.v_proj(hidden).view(shape).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                      eager_attention_forward)
    outputs = []
    for group, span, mask in zip(groups, spans, masks, strict=True):
        keys, values = group.cache.update(key[span], value[span], layer_idx)
        out, _ = interface(attn, query[span], keys, values, mask, dropout=0.0,
                           scaling=attn.scaling)
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return attn.o_proj(out.reshape(*hidden.shape[:-1], -1).contiguous())


def step(model: torch.nn.Module, groups: Sequence[Group]) -> torch.Tensor:
    """The final hidden states ``[rows, 1, hidden]`` of every group's new tokens, stacked in
    group order (the caller applies the LM head)."""
    base: LlamaModel = model.base_model
    tokens = groups[0].tokens if len(groups) == 1 else torch.cat([g.tokens for g in groups])
    positions = (groups[0].positions if len(groups) == 1
                 else torch.cat([g.positions for g in groups]))
    spans, start = [], 0
    for group in groups:
        spans.append(slice(start, start + group.tokens.shape[0]))
        start = spans[-1].stop
    hidden = base.embed_tokens(tokens)
    masks = [create_causal_mask(config=base.config, inputs_embeds=hidden[span],
                                attention_mask=group.mask, cache=group.cache,
                                position_ids=group.positions)
             for group, span in zip(groups, spans, strict=True)]
    cos, sin = base.rotary_emb(hidden, positions)
    for idx, layer in enumerate(base.layers[:base.config.num_hidden_layers]):
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        hidden = residual + _attention(layer.self_attn, hidden, cos, sin, groups, spans, masks,
                                       idx)
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    return base.norm(hidden)
