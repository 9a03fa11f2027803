"""LoRA adapters with per-weight ranks, through peft.

An adapted weight is named by its global module name (``model.layers.3.self_attn.q_proj``);
a :data:`RankMap` maps such names to ranks, rank 0 meaning "not adapted" (docs/method.md
"ARMSC: Ranks"). Every holder (client segment, server segment, unsplit model) gets a peft
``LoraConfig`` whose ``target_modules`` are the names it holds with rank > 0 and whose
``rank_pattern`` carries the ranks, so the scaling is ``lora_alpha / r`` per weight.

Design choice: the initial ``A`` of each adapter is drawn from a generator seeded by
``(seed, module name)``; that makes the initial adapters independent of how the model is
partitioned, which is what lets split training be compared step for step with centralised
training (tests/test_trainer.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from runner.errors import ConfigError
from runner.model.models import family_of
from runner.model.split import Segment, layer_prefix

RankMap = dict[str, int]

PROJECTIONS: dict[str, dict[str, str]] = {
    "llama": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    "gpt2": {
        "qkv": "attn.c_attn",
        "o": "attn.c_proj",
        "fc": "mlp.c_fc",
        "proj": "mlp.c_proj",
        # SplitLoRA adapts q and v; GPT-2 fuses them into c_attn.
        "q": "attn.c_attn",
        "v": "attn.c_attn",
    },
}
DEFAULT_TARGETS = ("q", "v")


def weight_names(config: PretrainedConfig, layers: Iterable[int],
                 targets: Iterable[str]) -> list[str]:
    """Global module names of the given short projection names in the given blocks."""
    family = family_of(config)
    table = PROJECTIONS[family]
    unknown = [t for t in targets if t not in table]
    if unknown:
        raise ConfigError(
            f"unknown projection(s) {unknown} for {family}; choose from {sorted(set(table))}"
        )
    prefix = layer_prefix(config)
    names: list[str] = []
    for layer in layers:
        for t in targets:
            name = f"{prefix}.{layer}.{table[t]}"
            if name not in names:
                names.append(name)
    return names


def all_candidates(config: PretrainedConfig) -> list[str]:
    """Every linear projection of every block (docs/method.md "IWI: Candidates")."""
    family = family_of(config)
    short = ["q", "k", "v", "o", "gate", "up", "down"] if family == "llama" else [
        "qkv", "o", "fc", "proj"]
    return weight_names(config, range(int(config.num_hidden_layers)), short)


def candidates(config: PretrainedConfig, which: str, targets: Iterable[str]) -> list[str]:
    """The weights HSplitLoRA may adapt: ``"all"``, every linear projection of every block
    (the paper's method, :func:`all_candidates`), or ``"targets"``, only the projections in
    ``targets`` (q, v by default): the capacity-matched variant, which adapts what the
    baselines adapt, so a comparison separates the method from the capacity it trains
    (docs/method.md "Capacity")."""
    names = all_candidates(config)
    if which == "all":
        return names
    suffixes = tuple(n.split(".", 3)[-1] for n in weight_names(config, [0], targets))
    return [n for n in names if n.endswith(suffixes)]


def uniform_ranks(config: PretrainedConfig, rank: int,
                  targets: Iterable[str] = DEFAULT_TARGETS) -> RankMap:
    """The same rank on the given projections of every block (SplitLoRA's setting)."""
    if rank < 0:
        raise ConfigError(f"rank must be >= 0, got {rank}")
    return {n: rank for n in weight_names(config, range(int(config.num_hidden_layers)), targets)}


def block_of(name: str) -> int:
    """Block index of a global module name (``model.layers.7.mlp.up_proj`` -> 7)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"no block index in {name}")


def held_ranks(ranks: Mapping[str, int], seg: Segment) -> RankMap:
    """The part of a rank map that this segment holds, without rank-0 entries."""
    return {n: r for n, r in ranks.items() if r > 0 and seg.start <= block_of(n) < seg.end}


def lora_config(ranks: Mapping[str, int], family: str, alpha: float, dropout: float,
                base_path: str | None = None) -> LoraConfig:
    """A peft config adapting exactly ``ranks``' names at their ranks."""
    active = {n: r for n, r in ranks.items() if r > 0}
    if not active:
        raise ConfigError("no weight has a rank > 0: nothing to adapt")
    default_r = max(set(active.values()), key=list(active.values()).count)
    return LoraConfig(
        r=default_r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(active),
        rank_pattern={n: r for n, r in active.items() if r != default_r},
        fan_in_fan_out=family == "gpt2",
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def module_key(peft_name: str) -> str:
    """Global module name from a peft-wrapped module name."""
    return peft_name.removeprefix("base_model.model.")


def reinit_adapters(model: nn.Module, seed: int, names: Iterable[str] | None = None) -> None:
    """(Re-)initialise adapters as peft does (A Kaiming-uniform, B zero), seeded per name."""
    only = set(names) if names is not None else None
    for full, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        key = module_key(full)
        if only is not None and key not in only:
            continue
        # A CPU generator on purpose, whatever the adapter's device: the initial adapters are
        # the same numbers on a GPU as on the CPU (CUDA's generator draws other ones), and
        # copy_ moves them to the adapter's device.
        gen = torch.Generator().manual_seed(_seed_for(seed, key))
        a = module.lora_A["default"].weight
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear
        with torch.no_grad():
            a.copy_(torch.rand(a.shape, generator=gen) * 2 * bound - bound)
            module.lora_B["default"].weight.zero_()


def attach_lora(seg: Segment, ranks: Mapping[str, int], *, alpha: float, dropout: float,
                seed: int) -> RankMap:
    """Wrap ``seg.model`` with LoRA on the weights it holds; returns the ranks it got.

    A segment holding no adapted weight stays unwrapped (all its weights frozen).
    """
    mine = held_ranks(ranks, seg)
    for p in seg.model.parameters():
        p.requires_grad_(False)
    if not mine:
        return {}
    cfg = lora_config(mine, seg.family, alpha, dropout)
    seg.model = get_peft_model(seg.model, cfg)
    reinit_adapters(seg.model, seed)
    return mine


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors keyed ``<global module>.lora_A`` / ``.lora_B`` (no peft prefixes)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if "lora_A.default" in name or "lora_B.default" in name:
            key = module_key(name).replace(".default.weight", "")
            out[key] = p
    return out


def trained_state(model: nn.Module, full: bool = False) -> dict[str, torch.Tensor]:
    """What a client trains and uploads: its LoRA tensors (:func:`adapter_state`), or, for
    full fine-tuning (``ft``), every floating-point weight of the base model."""
    if not full:
        return adapter_state(model)
    from runner.model.split import base_model

    return {k: v for k, v in base_model(model).state_dict(keep_vars=True).items()
            if v.is_floating_point()}


def load_trained_state(model: nn.Module, state: Mapping[str, torch.Tensor],
                       full: bool = False) -> None:
    """Copy :func:`trained_state`-style tensors into the model (unknown keys are skipped)."""
    mine = trained_state(model, full)
    with torch.no_grad():
        for k, v in state.items():
            if k in mine:
                mine[k].copy_(v)


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors from :func:`adapter_state`-style keys into the model's adapters."""
    mine = adapter_state(model)
    with torch.no_grad():
        for k, v in state.items():
            if k in mine:
                mine[k].copy_(v)


def save_peft_adapter(out: Path, segments: Iterable[Segment], ranks: Mapping[str, int], *,
                      alpha: float, dropout: float, base_path: str) -> None:
    """Write one PEFT-format adapter for the whole model from several segments.

    Each adapted weight is taken from the first segment that holds it (callers pass the
    aggregated client segment first, then the server). ``PeftModel.from_pretrained`` on the
    unsplit base model loads the result (tests/test_lora.py).
    """
    segments = list(segments)
    family = segments[0].family
    state: dict[str, torch.Tensor] = {}
    for seg in segments:
        if not hasattr(seg.model, "peft_config"):
            continue
        for k, v in get_peft_model_state_dict(seg.model).items():
            # the file is device-independent: its tensors are written from the CPU
            state.setdefault(k, v.detach().to(device="cpu", dtype=torch.float32)
                             .contiguous().clone())
    cfg = lora_config(ranks, family, alpha, dropout, base_path=base_path)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "ranks.json").write_text(json.dumps(dict(sorted(ranks.items())), indent=1))


def load_peft_adapter(base: nn.Module, path: Path) -> PeftModel:
    """Load a saved adapter onto an unsplit base model, the standard PEFT way."""
    return PeftModel.from_pretrained(base, str(path))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
