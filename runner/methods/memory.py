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
* On a CUDA device (docs/gpu.md "Budgets"), a budget is GPU memory: the process that plans
  (:func:`planning_costs`, called by runner/methods/hetero.py) calibrates the model on the
  device it trains on, at the training precision: per-block activation bytes per token from
  the CUDA allocator (``torch.cuda.memory_allocated`` around one block's forward,
  :func:`cuda_block_activations`) and the runtime reserve as the CUDA context (NVML's
  per-process figure less ``torch.cuda.memory_reserved``, :func:`cuda_context_reserve`),
  never process RSS, which does not see GPU memory. On the CPU nothing is measured: the
  analytic figures and :data:`DEFAULT_RESERVE` stay, so CPU plans are bit-identical.

docs/benchmarks.md compares predictions with measured peaks (bench/memory_model.py).
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from runner import device as placement
from runner.methods.importance import adapter_bytes, lora_activation_bytes
from runner.model.lora import all_candidates, block_of
from runner.model.models import family_of

ELEMENT = 4  # fp32
DEFAULT_RESERVE = 350 * 2**20  # measured on the CI machine type (docs/benchmarks.md)

log = logging.getLogger("runner.methods.memory")

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
    # The runtime reserve every estimate made from these costs adds (unless told another):
    # DEFAULT_RESERVE on the CPU, the measured CUDA context on a GPU (:func:`planning_costs`).
    # Kept here so every planner call (ARMSC, re-plans, reports) uses the one calibration.
    reserve: int = DEFAULT_RESERVE

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


def memory_seq(plan_seq: int, lengths: Iterable[int]) -> int:
    """The sequence length memory is planned for: the longest training example a client can
    draw, at least ``plan_seq``. A budget is a hard limit and one long batch is enough to
    exceed it (a client container planned for the average length was OOM-killed), while
    step times are planned for the typical length (``plan_seq``). ARMSC, the in-process
    budget check and the experiment grid's fairness rule all plan with it."""
    return max([plan_seq, *lengths])


def client_memory(costs: ModelCosts, k: int, ranks: Mapping[str, int], batch: int, seq: int,
                  reserve: int | None = None) -> MemoryEstimate:
    """Predicted peak training memory of a client holding embeddings + blocks [0, k).
    ``reserve`` None: the costs' own (``ModelCosts.reserve``)."""
    reserve = costs.reserve if reserve is None else reserve
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
                  seq: int, reserve: int | None = None) -> MemoryEstimate:
    """Predicted peak of the server: blocks [min k, L) + head, activations of every client's
    remaining blocks (concatenated batches), logits at target positions. ``reserve`` None:
    the costs' own."""
    reserve = costs.reserve if reserve is None else reserve
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
    """Peak resident set size of this process (Linux reports KiB). Host memory only: on a
    CUDA device the budget is GPU memory, see :func:`peak_bytes`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes(device: torch.device | None = None, *, cuda: Any = None) -> int:
    """Peak training memory of this process where ``device`` keeps it: on a CUDA device the
    caching allocator's peak (``torch.cuda.max_memory_allocated``; RSS does not see GPU
    memory, docs/gpu.md "Budgets"), else :func:`peak_rss_bytes`."""
    if device is None or device.type != "cuda":
        return peak_rss_bytes()
    cuda = cuda if cuda is not None else torch.cuda
    return int(cuda.max_memory_allocated(_cuda_index(device, cuda)))


def measure_runtime_reserve(device: torch.device | None = None, *, cuda: Any = None,
                            nvml: Any = None, env: Mapping[str, str] | None = None) -> int:
    """The runtime reserve of this process: on the CPU (``device`` None or not CUDA) its
    resident memory now (call it after imports, before loading a model); on a CUDA device
    the CUDA context (:func:`cuda_context_reserve`), :data:`DEFAULT_RESERVE` where NVML
    cannot measure it."""
    if device is not None and device.type == "cuda":
        measured = cuda_context_reserve(device, cuda=cuda, nvml=nvml, env=env)
        return DEFAULT_RESERVE if measured is None else measured
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


# ------------------------------------------------------------------- calibrated for CUDA
def _cuda_index(device: torch.device, cuda: Any) -> int:
    return int(device.index) if device.index is not None else int(cuda.current_device())


def cuda_context_reserve(device: torch.device, *, cuda: Any = None, nvml: Any = None,
                         env: Mapping[str, str] | None = None) -> int | None:
    """What this process holds on ``device`` outside its caching allocator: the CUDA context,
    cuBLAS/cuDNN handles and the kernels loaded so far. NVML's per-process used memory (found
    by the UUID CUDA reports, runner/emulation/resources.py) less
    ``torch.cuda.memory_reserved``. None where NVML does not list this process (no NVML, or a
    container without the host's PID namespace). Measure after a forward and backward ran
    (:func:`planning_costs` does): CUDA loads kernels lazily, the context grows with them."""
    from runner.emulation.resources import nvml_process_bytes

    cuda = cuda if cuda is not None else torch.cuda
    index = _cuda_index(device, cuda)
    try:
        uuid = str(cuda.get_device_properties(index).uuid) or None
    except Exception:  # noqa: BLE001 - an old torch without .uuid: the variables decide
        uuid = None
    used = nvml_process_bytes(os.getpid(), env, nvml, uuid)
    if used is None:
        return None
    return max(0, int(used) - int(cuda.memory_reserved(index)))


def cuda_block_activations(run_block: Callable[[], Any], tokens: int, device: torch.device,
                           *, after: Callable[[Any], None] | None = None,
                           cuda: Any = None) -> float:
    """Bytes per token one block keeps on ``device`` after its forward: what the CUDA
    allocator holds (``torch.cuda.memory_allocated``) while ``run_block()``'s output and
    autograd graph are alive, less what it held before (the input included), over
    ``tokens``. That is the block's saved tensors plus its output (the next block's saved
    input) at the kernels' dtypes under autocast, in the allocator's 512-byte blocks: what the
    cap (runner/emulation/gpu.py) counts, which saved-tensor hooks and RSS do not.
    ``after(output)`` runs once measured (the probe's backward)."""
    cuda = cuda if cuda is not None else torch.cuda
    index = _cuda_index(device, cuda)
    cuda.synchronize(index)
    before = int(cuda.memory_allocated(index))
    out = run_block()
    cuda.synchronize(index)
    held = int(cuda.memory_allocated(index)) - before
    if after is not None:
        after(out)
    del out
    return max(0, held) / tokens


@dataclass
class BlockProbe:
    """One block of a model, ready to run once under the training precision: ``run()``
    returns its output (graph alive, for :func:`cuda_block_activations`); ``backward(out)``
    runs its backward (so the context holds the backward kernels too); ``tokens`` it ran on;
    ``lora_bytes_per_token``: what its LoRA branches keep, counted apart by the model."""

    run: Callable[[], Any]
    backward: Callable[[Any], None]
    tokens: int
    lora_bytes_per_token: float


def block_probe(path: Path, config: PretrainedConfig, device: torch.device, precision: str,
                batch: int, seq: int, targets: Sequence[str], rank: int) -> BlockProbe:
    """Block 0 of the model at ``path`` alone on ``device`` (no embeddings, no head), LoRA
    of ``rank`` on ``targets`` as training has it (dropout 0), a random hidden state of
    ``[batch, seq, hidden]`` made on the device. The training's autocast applies
    (runner/model/split.py ``run_blocks``)."""
    from runner.model import lora, split

    seg = split.load_segment(path, 0, 1, embed=False, head=False, precision=precision,
                             device=device)
    ranks = lora.uniform_ranks(config, rank, tuple(targets))
    held = lora.attach_lora(seg, ranks, alpha=2.0 * rank, dropout=0.0, seed=0)
    seg.model.train()
    costs = ModelCosts.from_config(config)
    lora_per_token = float(sum(lora_activation_bytes(costs.shapes[n][0], r, 1)
                               for n, r in held.items()))
    x = torch.randn(batch, seq, costs.hidden, device=device, requires_grad=True)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)

    def backward(out: Any) -> None:
        out.float().sum().backward()

    return BlockProbe(run=lambda: split.run_blocks(seg, x, mask, 0, 1), backward=backward,
                      tokens=batch * seq, lora_bytes_per_token=lora_per_token)


def planning_costs(config: PretrainedConfig, device: torch.device, *, path: Path | None = None,
                   precision: str = "fp32", batch: int = 1, seq: int = 1,
                   targets: Sequence[str] = ("q", "v"), rank: int = 8,
                   probe: Callable[[], BlockProbe] | None = None, cuda: Any = None,
                   nvml: Any = None, env: Mapping[str, str] | None = None) -> ModelCosts:
    """The costs a planner (ARMSC, runner/methods/armsc.py) plans with on ``device``.

    On the CPU (any device but CUDA) :meth:`ModelCosts.from_config` as always: nothing is
    measured, CPU plans stay bit-identical. On a CUDA device (docs/gpu.md "Budgets") one
    probe block (:func:`block_probe`, or ``probe()``; ``path`` is the model's directory) runs
    forward and backward at the training ``precision`` on ``batch`` x ``seq`` tokens:
    ``act_bytes_per_token_block`` becomes what the allocator held after its forward, less its
    LoRA branches (:func:`cuda_block_activations`), and ``reserve`` the CUDA context measured
    after it (:func:`cuda_context_reserve`). The reserve is never below
    :data:`DEFAULT_RESERVE`: each client's cap (runner/emulation/gpu.py ``cap_process``) is
    set to its budget less that before anything runs, so a smaller reserve would plan
    tensors past the cap (docs/gpu.md "Caps"). Where NVML cannot measure the context the
    reserve stays ``DEFAULT_RESERVE``. The probe runs under a forked RNG and its memory is
    released, so training sees neither."""
    costs = ModelCosts.from_config(config)
    if device.type != "cuda":
        return costs
    cuda = cuda if cuda is not None else torch.cuda
    if probe is None and path is None:
        raise ValueError("planning_costs on a CUDA device needs the model's path")
    model_path = path
    make = probe if probe is not None else (lambda: block_probe(
        Path(model_path), config, device, precision, batch, seq, targets, rank))
    # The probe's random input (and any init) must not move the run's RNG streams.
    forked = [_cuda_index(device, cuda)] if cuda is torch.cuda else []  # a fake has no RNG
    with torch.random.fork_rng(devices=forked):
        p = make()
        per_token = cuda_block_activations(p.run, p.tokens, device, after=p.backward,
                                           cuda=cuda)
        lora_per_token = p.lora_bytes_per_token
        del p  # the probe's block, input and graph: released before the context is read
        cuda.empty_cache()
        context = cuda_context_reserve(device, cuda=cuda, nvml=nvml, env=env)
    act = max(0.0, per_token - lora_per_token)
    reserve = DEFAULT_RESERVE if context is None else max(DEFAULT_RESERVE, context)
    log.info("memory model calibrated on %s (%s): %.0f activation bytes per token per block "
             "(analytic %.0f), runtime reserve %.0f MiB (CUDA context %s)", device, precision,
             act, costs.act_bytes_per_token_block, reserve / 2**20,
             "not measured" if context is None else f"{context / 2**20:.0f} MiB")
    extra = {**costs.extra, "analytic_act_bytes_per_token_block":
             costs.act_bytes_per_token_block}
    if context is not None:
        extra["cuda_context_bytes"] = float(context)
    return replace(costs, act_bytes_per_token_block=act, calibrated=True, reserve=reserve,
                   extra=extra)
