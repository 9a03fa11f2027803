"""Cutting a causal LM into a client segment and a server segment.

docs/method.md "Notation": client ``i`` holds the embeddings and blocks ``[0, k_i)``; the server
holds blocks ``[min_i k_i, L)``, the final norm and the LM head. A segment here is the model's
own Hugging Face module tree (``LlamaForCausalLM`` / ``GPT2LMHeadModel``) in which every
part the holder does not own is an :class:`torch.nn.Identity` placeholder. That keeps module
names *global* (``model.layers.17.self_attn.q_proj`` is the same name on every holder), so
per-weight ranks, aggregation and PEFT adapter files line up across clients and server.

Weights are read tensor by tensor from the materialised safetensors (see
:mod:`runner.model.models`): a client never materialises the server's blocks and vice versa. The
forward functions below mirror ``LlamaModel.forward`` / ``GPT2Model.forward`` of transformers
5 step by step (same mask construction, same rotary / position embeddings), which is what
makes split training exact (tests/test_split.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask

from runner import device as placement
from runner.model.models import family_of, load_config


@dataclass
class Parts:
    """Handles on the sub-modules of one family's module tree (inside any PEFT wrapper)."""

    embed: nn.Module
    pos_embed: nn.Module | None  # GPT-2's learned positions (wpe)
    rotary: nn.Module | None  # Llama's rotary embedding
    drop: nn.Module | None  # GPT-2's embedding dropout
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module


def base_model(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module inside a PEFT wrapper (or the model itself)."""
    inner = model
    # PeftModel.base_model is a LoraModel whose .model is the HF model.
    if hasattr(inner, "peft_config"):
        inner = inner.base_model.model
    return inner


def parts(model: nn.Module) -> Parts:
    """Locate embeddings, blocks, final norm and head for the Llama or GPT-2 family."""
    m = base_model(model)
    if family_of(m.config) == "llama":
        core = m.model
        return Parts(core.embed_tokens, None, core.rotary_emb, None, core.layers, core.norm,
                     m.lm_head)
    core = m.transformer
    return Parts(core.wte, core.wpe, None, core.drop, core.h, core.ln_f, m.lm_head)


def layer_prefix(config: PretrainedConfig) -> str:
    """Module-name prefix of the block list: ``model.layers`` or ``transformer.h``."""
    return "model.layers" if family_of(config) == "llama" else "transformer.h"


@dataclass
class Segment:
    """One holder's share of the model.

    ``start``/``end``: the blocks it owns; ``has_embed``: it runs the embeddings (clients and
    unsplit models); ``has_head``: it runs final norm + LM head (server and unsplit models).
    ``precision``: ``"fp32"``, or ``"bf16"`` for mixed precision (the forward functions below
    run under ``torch.autocast``; weights and optimizer state stay fp32).
    """

    model: nn.Module
    config: PretrainedConfig
    start: int
    end: int
    has_embed: bool
    has_head: bool
    precision: str = "fp32"

    @property
    def family(self) -> str:
        return family_of(self.config)

    def parameters_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        """Where this segment's weights are: what it creates and receives goes there."""
        return placement.of(self.model)


def _shell(config: PretrainedConfig, start: int, end: int, embed: bool, head: bool) -> nn.Module:
    """Build the module tree on the meta device and drop what this holder does not own."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    p = parts(model)
    for i in range(len(p.layers)):
        if not start <= i < end:
            p.layers[i] = nn.Identity()
    m = base_model(model)
    if family_of(config) == "llama":
        if not embed:
            m.model.embed_tokens = nn.Identity()
        if not head:
            m.model.norm = nn.Identity()
            m.lm_head = nn.Identity()
        # Rotary embedding holds computed (non-persistent) buffers: build it for real.
        m.model.rotary_emb = type(m.model.rotary_emb)(config=config)
    else:
        if not embed:
            m.transformer.wte = nn.Identity()
            m.transformer.wpe = nn.Identity()
        if not head:
            m.transformer.ln_f = nn.Identity()
            m.lm_head = nn.Identity()
    return model


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


class SharedFrozen(dict[tuple[str, str], torch.Tensor]):
    """Frozen tensors of the segments one process loads, keyed by (model directory,
    checkpoint key); see :func:`load_segment`. Tensors outside the blocks (embeddings, final
    norm, head) are always shared. ``blocks=True`` shares the block weights too: for a
    process whose segments are mirrors of one model (the distributed server's shadows of its
    clients, runner/methods/hetero_server.py), which must then merge an update into each
    distinct tensor once (runner/methods/hsplitlora.py ``_aggregate_naa``)."""

    def __init__(self, blocks: bool = False) -> None:
        super().__init__()
        self.blocks = blocks


def _shareable(name: str, config: PretrainedConfig, shared: SharedFrozen) -> bool:
    """Whether a tensor may be shared between segments: everything outside the blocks, and
    the blocks when ``shared.blocks``.

    Block weights are not shared by default: the in-process trainer's segments are separate
    devices, NAA merges into each holder's copy in place, and an offline client's copy lags
    until it returns (docs/method.md "NAA").
    """
    return shared.blocks or f"{layer_prefix(config)}." not in name


def _load_tensors(model: nn.Module, config: PretrainedConfig, path: Path,
                  shared: SharedFrozen | None = None,
                  device: torch.device | None = None) -> None:
    """Read exactly the tensors this segment owns from disk and assign them, on ``device``
    (None: the CPU).

    Checkpoints differ in prefixes (``transformer.h.0`` vs ``h.0`` for GPT-2) and tied heads
    are stored once; both are resolved here. With ``shared``, tensors outside the blocks are
    taken from (and added to) it instead of read again (:func:`load_segment`). Each tensor
    goes to the device as it is read, so a GPU segment never holds a CPU copy of its blocks
    (docs/gpu.md "Device placement").
    """
    where = torch.device("cpu") if device is None else device
    wanted = {name: p for name, p in model.named_parameters()}
    wanted.update({n: b for n, b in model.named_buffers() if b.is_meta})
    tie = bool(getattr(config, "tie_word_embeddings", False))
    llama = family_of(config) == "llama"
    embed_key = "model.embed_tokens.weight" if llama else "transformer.wte.weight"
    index: dict[str, Path] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                index[k] = f

    def source_key(name: str) -> str | None:
        candidates = [name, name.split(".", 1)[1] if "." in name else name]
        if name == "lm_head.weight" and tie:
            candidates += [embed_key, embed_key.split(".", 1)[1]]
        return next((c for c in candidates if c in index), None)

    by_file: dict[Path, list[tuple[str, str]]] = {}
    missing = []
    for name in wanted:
        key = source_key(name)
        if key is None:
            if name.endswith("attn.bias") or name.endswith("masked_bias"):
                continue
            missing.append(name)
            continue
        by_file.setdefault(index[key], []).append((name, key))
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
    state: dict[str, torch.Tensor] = {}
    for f, pairs in by_file.items():
        with safe_open(str(f), framework="pt") as sf:
            for name, key in pairs:
                slot = (str(path), key)
                if shared is not None and _shareable(name, config, shared):
                    if slot not in shared:
                        shared[slot] = sf.get_tensor(key).to(device=where,
                                                             dtype=torch.float32)
                    state[name] = shared[slot]
                else:
                    state[name] = sf.get_tensor(key).to(device=where, dtype=torch.float32)
    model.load_state_dict(state, strict=False, assign=True)
    if tie and "lm_head.weight" not in state and "lm_head.weight" in dict(
        model.named_parameters(remove_duplicate=False)
    ):
        # assign=True replaced the embedding Parameter; re-tie the head to it, as HF does.
        p = parts(model)
        p.head.weight = p.embed.weight
    # What was read is loaded, whatever its device (the device-placement tests run segments
    # on the meta device, tests/test_device.py); only what is still the shell's is missing.
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.is_meta and n not in state]
    if still_meta:
        raise RuntimeError(f"segment tensors left unloaded: {still_meta[:5]}")


def load_segment(path: Path, start: int, end: int, *, embed: bool, head: bool,
                 precision: str = "fp32", shared: SharedFrozen | None = None,
                 device: torch.device | None = None) -> Segment:
    """Load blocks ``[start, end)`` (+ embeddings and/or head) of the model at ``path``, on
    ``device`` (None: the CPU; ``shared`` then holds tensors of that one device).

    ``shared``: a process that holds several segments of one model (the in-process trainer,
    the server's shadows of its clients) passes one dict to every load, so the embedding
    matrix (113 MB fp32 for SmolLM2, also the tied LM head), the final norm and GPT-2's
    positions exist once instead of once per segment. Only for methods that keep them
    frozen (every LoRA method; not ``ft``): the segments hold the same tensor objects.
    """
    config = load_config(path)
    model = _shell(config, start, end, embed, head)
    _load_tensors(model, config, path, shared, device)
    if device is not None:
        model.to(device)  # what the shell built for real (Llama's rotary buffers)
    model.eval()
    if precision == "bf16" and placement.of(model).type == "cpu":
        use_fp32_attention(model, config)
    return Segment(model=model, config=config, start=start, end=end, has_embed=embed,
                   has_head=head, precision=precision)


def load_client(path: Path, k: int, precision: str = "fp32",
                shared: SharedFrozen | None = None,
                device: torch.device | None = None) -> Segment:
    """Client segment: embeddings + blocks ``[0, k)``."""
    return load_segment(path, 0, k, embed=True, head=False, precision=precision, shared=shared,
                        device=device)


def load_server(path: Path, k: int, num_layers: int, precision: str = "fp32",
                shared: SharedFrozen | None = None,
                device: torch.device | None = None) -> Segment:
    """Server segment: blocks ``[k, L)`` + final norm + LM head."""
    return load_segment(path, k, num_layers, embed=False, head=True, precision=precision,
                        shared=shared, device=device)


def load_unsplit(path: Path, precision: str = "fp32",
                 shared: SharedFrozen | None = None,
                 device: torch.device | None = None) -> Segment:
    """The whole model as one segment (cenlora, ft, fedlora clients)."""
    config = load_config(path)
    return load_segment(path, 0, int(config.num_hidden_layers), embed=True, head=True,
                        precision=precision, shared=shared, device=device)


#: The attention implementation of bf16 segments on the CPU (:func:`use_fp32_attention`).
FP32_ATTENTION = "sdpa_fp32"


def _sdpa_fp32(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs):
    """Transformers' SDPA attention computed in fp32, outside autocast."""
    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                      attention_mask, **kwargs)


AttentionInterface.register(FP32_ATTENTION, _sdpa_fp32)
AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)  # the masks of "sdpa"


def use_fp32_attention(model: nn.Module, config: PretrainedConfig) -> None:
    """Run the attention (scores, softmax, context) of a bf16 CPU segment in fp32.

    Why: under CPU autocast, torch's bf16 flash-attention *backward* is 4-5x slower than the
    fp32 one at our shapes (SmolLM2, 8 x 64 tokens: about 10 ms against 2 ms per block), a
    sixth of a bf16 training step (bench/roofline.py, docs/benchmarks.md "Roofline of the
    training step"); the attention is 3 % of the step's FLOPs, so fp32 costs little there.
    Its inputs are mostly fp32 already (the rotary embedding promotes q and k). Only the
    attention's precision changes: the projections stay bf16, fp32 segments are untouched
    (bit for bit), and so are GPU segments, whose bf16 attention is fast.
    """
    for cfg in {id(c): c for c in (config, base_model(model).config)}.values():
        if cfg._attn_implementation in (None, "sdpa"):
            cfg._attn_implementation = FP32_ATTENTION


#: The autocast dtype of each mixed precision (``TrainConfig.precision``; fp32: none).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextmanager
def autocast(seg: Segment) -> Iterator[None]:
    """Mixed precision for this segment's forward ops when it trains in bf16 or fp16.

    Why autocast and not bf16 weights: the LoRA weights, the optimizer state and what crosses
    the wire stay fp32 (a decoder block's residual add promotes its bf16 matmul outputs back
    to fp32, so boundary activations and their gradients keep the wire format), and autograd
    replays each op's backward in the dtype its forward ran in, so only forwards need the
    context. On a CPU with AMX a LoRA step of SmolLM2 runs 1.58x faster
    (../shared/docs/environment.md). fp16 (GPUs without bf16) works the same way, with a loss
    scaler on top (runner/trainer.py ``Holder``). The autocast device is the segment's own,
    so a CUDA segment autocasts its CUDA ops and a CPU one its CPU ops.
    """
    dtype = AUTOCAST_DTYPES.get(seg.precision)
    if dtype is None:
        yield
        return
    device = next(seg.model.parameters()).device.type
    with torch.autocast(device_type=device, dtype=dtype):
        yield


# transformers renamed create_causal_mask's ``past_key_values`` to ``cache`` during 5.x and
# removes the old name in 5.40, inside our pinned range: pass whichever this version takes.
_CACHE_ARG = ("cache" if "cache" in inspect.signature(create_causal_mask).parameters
              else "past_key_values")


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _mask(config: PretrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
          position_ids: torch.Tensor):
    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                              position_ids=position_ids, **{_CACHE_ARG: None})


def embed(seg: Segment, input_ids: torch.Tensor) -> torch.Tensor:
    """Token (+ position) embeddings, as the family's base model computes them."""
    p = parts(seg.model)
    hidden = p.embed(input_ids)
    if seg.family == "gpt2":
        hidden = hidden + p.pos_embed(_positions(hidden))
        hidden = p.drop(hidden)
    return hidden


def run_blocks(seg: Segment, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
               start: int, end: int) -> torch.Tensor:
    """Run blocks ``[start, end)`` of this segment on ``hidden``.

    The causal/padding mask and the rotary embeddings are recomputed from the 2-D attention
    mask exactly as the unsplit model computes them, so only the hidden states and the 2-D
    mask have to cross the wire.
    """
    if not seg.start <= start <= end <= seg.end:
        raise ValueError(f"blocks [{start},{end}) are not held by segment [{seg.start},{seg.end})")
    p = parts(seg.model)
    position_ids = _positions(hidden)
    mask = _mask(seg.config, hidden, attention_mask, position_ids)
    with autocast(seg):
        if seg.family == "llama":
            pos_emb = p.rotary(hidden, position_ids=position_ids)
            for i in range(start, end):
                hidden = p.layers[i](hidden, attention_mask=mask, position_embeddings=pos_emb,
                                     position_ids=position_ids, use_cache=False)
        else:
            for i in range(start, end):
                hidden = p.layers[i](hidden, None, mask, use_cache=False,
                                     position_ids=position_ids)
    return hidden


def head(seg: Segment, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head: logits."""
    p = parts(seg.model)
    with autocast(seg):
        return p.head(p.norm(hidden))


def client_forward(seg: Segment, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Client side of a split step: embeddings and blocks ``[0, k)``; returns boundary acts."""
    return run_blocks(seg, embed(seg, input_ids), attention_mask, 0, seg.end)


def server_forward(seg: Segment, acts: torch.Tensor, attention_mask: torch.Tensor | None,
                   k: int) -> torch.Tensor:
    """Server side: blocks ``[k, L)``, norm and head on a client's boundary activations."""
    return head(seg, run_blocks(seg, acts, attention_mask, k, seg.end))


def full_forward(seg: Segment, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Unsplit forward through the same code path (cenlora, ft, fedlora clients)."""
    hidden = run_blocks(seg, embed(seg, input_ids), attention_mask, 0, seg.end)
    return head(seg, hidden)


def head_row_losses(seg: Segment, hidden: torch.Tensor, labels: torch.Tensor,
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token cross-entropy, and target-token counts, from hidden states.

    Only positions whose next token is a target go through the final norm and the LM head:
    the loss is identical to computing logits everywhere (prompt and padding positions carry
    no loss), but with a 49k-token vocabulary it saves a large share of a CPU step
    (docs/benchmarks.md).
    """
    targets = labels[:, 1:]
    keep = targets != -100
    rows = keep.nonzero(as_tuple=True)[0]
    p = parts(seg.model)
    with autocast(seg):
        logits = p.head(p.norm(hidden[:, :-1][keep]))
    per_token = nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none",
                                            label_smoothing=label_smoothing)
    sums = torch.zeros(labels.shape[0], dtype=per_token.dtype,
                       device=per_token.device).index_add(0, rows, per_token)
    return sums, keep.sum(dim=1)


def token_loss(logits: torch.Tensor, labels: torch.Tensor,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count.

    Returning the sum lets the server average over *all* target tokens of a concatenated
    multi-client batch (docs/method.md "Training step").
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    n = int((shift_labels != -100).sum())
    loss = nn.functional.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100,
                                       reduction="sum", label_smoothing=label_smoothing)
    return loss, n
