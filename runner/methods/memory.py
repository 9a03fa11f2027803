"""Memory model: a client's (or the server's) peak training memory, as a documented function.

docs/method.md "Memory model":

    M_client(k, ranks) = embeddings + blocks[0,k) frozen weights
                         + sum over client-side adapted W of r*(d_in+d_out)*(param+grad+2 moments)
                         + b*seq*k*(per-block saved activation bytes)
                         + LoRA branch activations (input x and A x per adapted W)
                         + runtime reserve

* Weights, adapters and LoRA activations are counted from the config (no weights loaded).
* Per-block saved activation bytes per token come from an analytic default or from one
  calibration probe (:func:`calibrate_block_activations`): a forward pass of one block under
  ``torch.autograd.graph.saved_tensors_hooks`` that adds up the bytes autograd keeps.
* The runtime reserve is the resident memory of the Python + torch + transformers runtime
  before any model is loaded, plus the transient buffers of backward (one block's worth of
  activation gradients); :func:`measure_runtime_reserve` measures it on this machine.

docs/benchmarks.md compares predictions with measured peaks (bench/memory_model.py).
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from runner import device as placement
from runner.methods.importance import adapter_bytes, lora_activation_bytes
from runner.model.lora import all_candidates, block_of
from runner.model.models import family_of

ELEMENT = 4  # fp32
DEFAULT_RESERVE = 350 * 2**20  # measured on the CI machine type (docs/benchmarks.md)

# Client processes run with a fixed glibc mmap threshold: large freed buffers (activations)
# go back to the OS instead of staying on the heap, so peak RSS follows the tensors the
# model counts. Measured: without it a multi-step run peaks ~25 % higher (docs/benchmarks.md).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@dataclass
class ModelCosts:
    """Per-part sizes of a model, derived from its config."""

    family: str
    num_layers: int
    hidden: int
    vocab: int
    embed_bytes: int
    block_bytes: int
    head_bytes: int  # final norm (+ untied LM head)
    shapes: dict[str, tuple[int, int]]  # candidate weight -> (d_in, d_out)
    flops_per_token_block: float
    act_bytes_per_token_block: float
    calibrated: bool = False
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelCosts:
        family = family_of(config)
        h = int(config.hidden_size)
        v = int(config.vocab_size)
        L = int(config.num_hidden_layers)
        if family == "llama":
            heads = int(config.num_attention_heads)
            kv = int(getattr(config, "num_key_value_heads", heads))
            hd = int(getattr(config, "head_dim", h // heads))
            inter = int(config.intermediate_size)
            proj = {
                "self_attn.q_proj": (h, heads * hd), "self_attn.k_proj": (h, kv * hd),
                "self_attn.v_proj": (h, kv * hd), "self_attn.o_proj": (heads * hd, h),
                "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
                "mlp.down_proj": (inter, h),
            }
            norms = 2 * h
            embed = v * h
            # Analytic saved activations per token (fp32): norm inputs/outputs, q, k, v,
            # attention output, MLP gate/up/act products. Calibrate for exact figures.
            act = (4 * h + heads * hd + 2 * kv * hd + heads * hd + 4 * inter) * ELEMENT
        else:
            inter = int(getattr(config, "n_inner", None) or 4 * h)
            proj = {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h),
                    "mlp.c_fc": (h, inter), "mlp.c_proj": (inter, h)}
            norms = 4 * h
            embed = v * h + int(config.n_positions) * h
            act = (6 * h + 3 * h + 3 * inter) * ELEMENT
        linear = sum(a * b for a, b in proj.values())
        biases = 0 if family == "llama" else sum(b for _, b in proj.values())
        shapes = {}
        for name in all_candidates(config):
            suffix = name.split(".", 3)[-1]
            shapes[name] = proj[suffix]
        tied = bool(getattr(config, "tie_word_embeddings", True))
        head = h * ELEMENT * (2 if family == "gpt2" else 1) + (0 if tied else v * h * ELEMENT)
        return cls(
            family=family, num_layers=L, hidden=h, vocab=v, embed_bytes=embed * ELEMENT,
            block_bytes=(linear + biases + norms) * ELEMENT, head_bytes=head, shapes=shapes,
            flops_per_token_block=6.0 * linear,  # forward + backward, 2 FLOPs per MAC
            act_bytes_per_token_block=float(act),
        )


@dataclass
class MemoryEstimate:
    """A prediction with its parts, so reports can show where the bytes go."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))


def client_memory(costs: ModelCosts, k: int, ranks: Mapping[str, int], batch: int, seq: int,
                  reserve: int = DEFAULT_RESERVE) -> MemoryEstimate:
    """Predicted peak training memory of a client holding embeddings + blocks [0, k)."""
    tokens = batch * seq
    mine = {n: r for n, r in ranks.items() if r > 0 and block_of(n) < k}
    adapters = sum(adapter_bytes(*costs.shapes[n], r) for n, r in mine.items())
    lora_acts = sum(lora_activation_bytes(costs.shapes[n][0], r, tokens) for n, r in mine.items())
    return MemoryEstimate({
        "runtime_reserve": reserve,
        "embeddings": costs.embed_bytes,
        "blocks": k * costs.block_bytes,
        "adapters": adapters,
        "activations": int(tokens * k * costs.act_bytes_per_token_block),
        "lora_activations": lora_acts,
        "boundary": 2 * tokens * costs.hidden * ELEMENT,  # acts sent + gradient received
    })


def server_memory(costs: ModelCosts, splits: list[int], ranks: Mapping[str, int], batch: int,
                  seq: int, reserve: int = DEFAULT_RESERVE) -> MemoryEstimate:
    """Predicted peak of the server: blocks [min k, L) + head, activations of every client's
    remaining blocks (concatenated batches), logits at target positions."""
    lo = min(splits)
    tokens = batch * seq
    mine = {n: r for n, r in ranks.items() if r > 0 and block_of(n) >= lo}
    adapters = sum(adapter_bytes(*costs.shapes[n], r) for n, r in mine.items())
    blocks_run = sum(costs.num_layers - k for k in splits)
    lora_acts = sum(
        lora_activation_bytes(costs.shapes[n][0], r, tokens)
        * sum(1 for k in splits if k <= block_of(n))
        for n, r in mine.items())
    return MemoryEstimate({
        "runtime_reserve": reserve,
        "blocks": (costs.num_layers - lo) * costs.block_bytes + costs.head_bytes
        + costs.embed_bytes,  # tied head shares the embedding matrix
        "adapters": adapters,
        "activations": int(tokens * blocks_run * costs.act_bytes_per_token_block),
        "lora_activations": lora_acts,
        "logits": len(splits) * tokens * costs.vocab * ELEMENT * 2,
    })


def calibrate_block_activations(segment_model: torch.nn.Module, run_block, hidden: int,
                                batch: int, seq: int,
                                device: torch.device | None = None) -> float:
    """Bytes autograd saves per token for one block, measured with saved-tensor hooks.

    ``run_block(x)`` runs one block on ``x`` (shape ``[batch, seq, hidden]``). Storage is
    de-duplicated (views of one tensor count once); parameters are excluded (they are
    counted as weights). ``x`` is made on ``device`` (None: where the segment's weights are),
    so a CUDA segment is calibrated with CUDA kernels, whose saved tensors are what it keeps.
    """
    params = {p.data_ptr() for p in segment_model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    where = placement.of(segment_model) if device is None else device
    x = torch.randn(batch, seq, hidden, requires_grad=True, device=where)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_block(x)
    return total / (batch * seq)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_runtime_reserve() -> int:
    """Resident memory of this process now: call it after imports, before loading a model."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()
