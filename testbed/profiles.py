"""Experiment profiles (``profiles/*.yaml``): devices, server and experiment in one file.

A profile is what a user picks with ``testbed up --profile NAME``. It is validated with a
pydantic schema; a bad profile is reported as ONE line that names the file and the field
(``profiles/x.yaml: devices[2].memory: must be > 0``), raised as a
:class:`~runner.errors.UserError` so the CLI exits with code 2.

Quantities may be written the way people think about hardware:

* memory: bytes, or ``"8GB"`` / ``"512MiB"`` (kB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB
  powers of 1024);
* compute: FLOP/s, or ``"1.3 TFLOPS"`` (k/M/G/T/P prefixes);
* bandwidth: bytes/s, or ``"100 Mbit/s"`` / ``"12.5 MB/s"``;
* latency: seconds, or ``"20 ms"`` / ``"500 us"`` / ``"1 s"``.

This module also holds the emulation rule (docs/emulation.md): when the reference model
(say LLaMA-2-7B) cannot be loaded here, the stand-in runs instead and every budget is
rescaled to cover the same fraction of the stand-in's training footprint as it covers of
the reference's. :func:`emulation_map` computes that mapping, :func:`device_specs` turns it
into :class:`~runner.emulation.devices.DeviceSpec` lists and :func:`write_devices_file` into the
``{"clients": [...], "server": {...}}`` file that ``testbed train --devices`` and the
runtime read.

Heavy imports (torch, transformers through ``runner.methods.memory``) happen only inside the
emulation functions, so ``testbed profiles list`` stays instant.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.errors import ConfigError, UserError
from runner.methods import registry
from testbed.yamlfile import read_yaml

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PretrainedConfig

    from runner.config import TrainConfig
    from runner.emulation.clock import Availability as ClockAvailability
    from runner.emulation.devices import DeviceSpec
    from runner.methods.memory import MemoryEstimate, ModelCosts

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class ProfileError(UserError):
    """A profile is missing, unreadable or fails validation (one line naming the field)."""


# ----------------------------------------------------------------------------- quantities
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_MEMORY_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def _quantity(value: Any, what: str) -> tuple[float, str] | float:
    """A number as-is, or ``(number, unit text)`` from a string such as ``"8 GB"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected {what}, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {what}, got {value!r}")
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([^\s0-9].*?)?\s*", value)
    if not m:
        raise ValueError(f"expected {what}, got {value!r}")
    return float(m.group(1)), (m.group(2) or "").strip()


def parse_bytes(value: Any) -> int:
    """``8GB`` / ``512MiB`` / ``1.5e9`` / 123 -> bytes (int)."""
    what = "bytes or a size like '8GB' / '512MiB'"
    q = _quantity(value, what)
    if isinstance(q, float):
        return int(q)
    number, unit = q
    if unit.lower() not in _MEMORY_UNITS:
        raise ValueError(f"unknown memory unit {unit!r} in {value!r} (use B, kB, MB, GB, TB, "
                         "KiB, MiB, GiB or TiB)")
    return int(number * _MEMORY_UNITS[unit.lower()])


def parse_flops(value: Any) -> float:
    """``1.3 TFLOPS`` / ``2e12`` -> FLOP/s."""
    q = _quantity(value, "FLOP/s or a speed like '1.3 TFLOPS'")
    if isinstance(q, float):
        return q
    number, unit = q
    m = re.fullmatch(r"([kKmMgGtTpP]?)FLOP(?:S|/s)?", unit, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"unknown compute unit {unit!r} in {value!r} (use e.g. '1.3 TFLOPS')")
    return number * _PREFIX[m.group(1).lower()]


def parse_bandwidth(value: Any) -> float:
    """``100 Mbit/s`` / ``12.5 MB/s`` / ``1.25e7`` -> bytes/s."""
    q = _quantity(value, "bytes/s or a rate like '100 Mbit/s'")
    if isinstance(q, float):
        return q
    number, unit = q
    m = re.fullmatch(r"([kKmMgGtT]?)(bit|bps|b|B)(?:/s)?", unit)
    if not m:
        raise ValueError(f"unknown bandwidth unit {unit!r} in {value!r} "
                         "(use e.g. '100 Mbit/s' or '12.5 MB/s')")
    scale = _PREFIX[m.group(1).lower()]
    bits = m.group(2) in ("bit", "bps", "b")
    return number * scale / (8.0 if bits else 1.0)


def parse_seconds(value: Any) -> float:
    """``20 ms`` / ``0.02`` / ``1 s`` -> seconds."""
    q = _quantity(value, "seconds or a time like '20 ms'")
    if isinstance(q, float):
        return q
    number, unit = q
    if unit.lower() not in _TIME_UNITS:
        raise ValueError(f"unknown time unit {unit!r} in {value!r} (use s, ms or us)")
    return number * _TIME_UNITS[unit.lower()]


def parse_gpu(value: Any) -> int | str | None:
    """GPU selector: an index (0, 1, ...), a ``MIG-...`` / ``GPU-...`` UUID, or none."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a GPU index, a MIG-/GPU- UUID or none, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"GPU index must be >= 0, got {value}")
        return value
    if isinstance(value, str):
        v = value.strip()
        if v.isdigit():
            return int(v)
        if re.fullmatch(r"(MIG|GPU)-[0-9A-Za-z/\-]+", v):
            return v
    raise ValueError(f"expected a GPU index, a MIG-/GPU- UUID or none, got {value!r}")


MIG_PROFILE = re.compile(r"[1-9][0-9]?g\.[0-9]+gb")


def parse_mig(value: Any) -> str | None:
    """MIG profile name (``1g.10gb``, ``3g.40gb``, ...) or none.

    Why a field of its own next to ``gpu``: Docker reserves a MIG instance by its UUID
    (``gpu: MIG-...``), while Kubernetes' NVIDIA device plugin (mixed strategy) schedules by
    the instance's profile, as the resource ``nvidia.com/mig-<profile>``, and cannot name a
    UUID. Media-extension profiles (``+me``) are refused: ``+`` is not allowed in a
    Kubernetes resource name."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and MIG_PROFILE.fullmatch(value.strip()):
        return value.strip()
    raise ValueError(f"expected a MIG profile such as '1g.10gb' or '3g.40gb', got {value!r}")


def _positive(v: float) -> float:
    if not v > 0 or math.isnan(v):
        raise ValueError("must be > 0")
    return v


def _non_negative(v: float) -> float:
    if not v >= 0:
        raise ValueError("must be >= 0")
    return v


Memory = Annotated[int, BeforeValidator(lambda v: _positive(parse_bytes(v)))]
Flops = Annotated[float, BeforeValidator(lambda v: _positive(parse_flops(v)))]
Bandwidth = Annotated[float, BeforeValidator(lambda v: _positive(parse_bandwidth(v)))]
Latency = Annotated[float, BeforeValidator(lambda v: _non_negative(parse_seconds(v)))]
GpuSelector = Annotated[int | str | None, BeforeValidator(parse_gpu)]
MigProfile = Annotated[str | None, BeforeValidator(parse_mig)]
# a node label value (testbed/backends/swarm_run.py placement, testbed/backends/k8s.py
# nodeSelector): what a Docker node label and a Kubernetes label value both accept
NODE_LABEL = "hsplitlora.node"  # the node label whose value a profile's ``node:`` names
NodeName = Annotated[str | None, Field(
    default=None, pattern=r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")]


# ---------------------------------------------------------------------------- the schema
class _Strict(BaseModel):
    """Unknown keys are errors: a typo (``memroy:``) must not silently become a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_mig(gpu: int | str | None, mig: str | None) -> None:
    """``mig`` names the size of a MIG instance; ``gpu`` may name which one (``MIG-...``) but
    not a whole GPU at the same time."""
    if mig is not None and gpu is not None and not str(gpu).startswith("MIG-"):
        raise ValueError(f"mig: {mig!r} asks for a MIG instance but gpu: {gpu!r} names a whole "
                         "GPU; give gpu a MIG-... UUID or drop one of them")


class AvailabilitySpec(_Strict):
    """Either a trace of online windows ``[start_s, end_s)`` in virtual time, or a per-round
    dropout probability. Neither given: always online."""

    trace: list[tuple[float, float]] | None = None
    dropout: float | None = None

    @field_validator("trace")
    @classmethod
    def _windows(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one [start_s, end_s] online window")
        last = -math.inf
        for i, (start, end) in enumerate(v):
            if start < 0 or not start < end:
                raise ValueError(f"window {i} [{start}, {end}] needs 0 <= start < end")
            if start < last:
                raise ValueError(f"window {i} starts before window {i - 1} ends (windows "
                                 "must be sorted and must not overlap)")
            last = end
        return v

    @field_validator("dropout")
    @classmethod
    def _probability(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError("must be a probability in [0, 1)")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> AvailabilitySpec:
        if self.trace is not None and self.dropout is not None:
            raise ValueError("give either trace or dropout, not both")
        return self

    def describe(self) -> str:
        if self.trace is not None:
            return "online " + ", ".join(f"[{_num(a)}, {_num(b)})" for a, b in self.trace)
        if self.dropout:
            return f"dropout {self.dropout:g}/round"
        return "always"


class DeviceModel(_Strict):
    """One client device. ``memory`` is what the device gives to training (the container
    gets the runtime's overhead on top, see testbed.backends.compose)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    memory: Memory
    compute: Flops
    bandwidth: Bandwidth = 12.5e6  # 100 Mbit/s
    latency: Latency = 0.02
    availability: AvailabilitySpec = AvailabilitySpec()
    gpu: GpuSelector = None
    mig: MigProfile = None  # MIG profile, e.g. "1g.10gb" (Kubernetes: nvidia.com/mig-1g.10gb)
    node: NodeName = None  # swarm / Kubernetes node labelled hsplitlora.node=NAME to run on
    label: str = ""  # free text, e.g. "Jetson TX2-class"

    @model_validator(mode="after")
    def _gpu_or_mig(self) -> DeviceModel:
        _check_mig(self.gpu, self.mig)
        return self


class ServerModel(_Strict):
    """The server's device (always online)."""

    name: str = Field(default="server", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    memory: Memory
    compute: Flops
    bandwidth: Bandwidth = 1.25e9  # 10 Gbit/s
    latency: Latency = 0.001
    gpu: GpuSelector = None
    mig: MigProfile = None
    node: NodeName = None
    label: str = ""

    @model_validator(mode="after")
    def _gpu_or_mig(self) -> ServerModel:
        _check_mig(self.gpu, self.mig)
        return self


class ArchModel(_Strict):
    """Architecture numbers of a model (enough for the memory model, no weights)."""

    family: Literal["llama", "gpt2"]
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    vocab: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int | None = Field(default=None, gt=0)
    tied: bool = True
    positions: int = Field(default=1024, gt=0)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"


# Known architectures so the reference footprint needs no download (numbers from each
# model's config.json on the Hugging Face hub; dtype = the dtype it is fine-tuned in).
KNOWN_ARCHS: dict[str, ArchModel] = {
    "meta-llama/Llama-2-7b-hf": ArchModel(
        family="llama", hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32,
        kv_heads=32, tied=False, positions=4096, dtype="fp16"),
    "meta-llama/Llama-2-13b-hf": ArchModel(
        family="llama", hidden=5120, layers=40, intermediate=13824, vocab=32000, heads=40,
        kv_heads=40, tied=False, positions=4096, dtype="fp16"),
    "gpt2": ArchModel(family="gpt2", hidden=768, layers=12, intermediate=3072, vocab=50257,
                      heads=12, positions=1024),
    "gpt2-medium": ArchModel(family="gpt2", hidden=1024, layers=24, intermediate=4096,
                             vocab=50257, heads=16, positions=1024),
    "gpt2-large": ArchModel(family="gpt2", hidden=1280, layers=36, intermediate=5120,
                            vocab=50257, heads=20, positions=1024),
    "gpt2-xl": ArchModel(family="gpt2", hidden=1600, layers=48, intermediate=6400,
                         vocab=50257, heads=25, positions=1024),
    # SmolLM2-135M: our materialised copy is fp32 (runner.model.models converts the GGUF).
    "smollm2-135m": ArchModel(family="llama", hidden=576, layers=30, intermediate=1536,
                              vocab=49152, heads=9, kv_heads=3, tied=True, positions=8192),
    # runner.model.models.tiny_config (tests/test_profiles.py checks they agree).
    "tiny-llama": ArchModel(family="llama", hidden=64, layers=4, intermediate=128, vocab=260,
                            heads=4, kv_heads=2, tied=True, positions=512),
    "tiny-gpt2": ArchModel(family="gpt2", hidden=64, layers=4, intermediate=256, vocab=260,
                           heads=4, positions=512),
}
KNOWN_ARCHS["openai-community/gpt2-large"] = KNOWN_ARCHS["gpt2-large"]
KNOWN_ARCHS["HuggingFaceTB/SmolLM2-135M"] = KNOWN_ARCHS["smollm2-135m"]


class ExperimentModel(_Strict):
    """What to run: reference and stand-in models, method, data and the training knobs."""

    reference_model: str
    reference_arch: ArchModel | None = None  # needed when reference_model is not known
    reference_dtype: Literal["fp32", "fp16", "bf16"] | None = None  # default: the arch's
    standin_model: str = "smollm2-135m"
    method: str = "hsplitlora"
    data: str | None = None
    steps: int = Field(default=200, ge=1)
    batch: int = Field(default=8, ge=1)
    seq: int = Field(default=64, ge=1)  # planning sequence length (TrainConfig.plan_seq)
    rank: int = Field(default=8, ge=1)  # reference rank: footprints and fixed-rank methods
    targets: list[str] = Field(default_factory=lambda: ["q", "v"], min_length=1)
    rank_set: list[int] = Field(default_factory=lambda: [0, 2, 4, 8, 16], min_length=1)
    agg_interval: int = Field(default=5, ge=1)
    eval_every: int = Field(default=50, ge=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    seed: int = 0
    clients: int | None = Field(default=None, ge=1)  # if given, must equal len(devices)
    # Clients per server pass (TrainConfig.server_chunk; 0: all at once). A profile sets it
    # where the server's budget needs it: the one-graph pass grows with the fleet.
    server_chunk: int = Field(default=0, ge=0)

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in registry.names():  # plug-ins of $TESTBED_METHODS included
            raise ValueError(f"unknown method {v!r}; choose one of "
                             f"{', '.join(registry.names())}")
        return v

    @field_validator("rank_set")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if any(r < 0 for r in v) or not any(r > 0 for r in v):
            raise ValueError("ranks must be >= 0 and at least one must be > 0")
        if sorted(set(v)) != v:
            raise ValueError("must be sorted ascending without repeats")
        return v

    @model_validator(mode="after")
    def _arch_known(self) -> ExperimentModel:
        if self.reference_arch is None and self.reference_model not in KNOWN_ARCHS:
            raise ValueError(
                f"reference_model {self.reference_model!r} is not in the known-architecture "
                f"table ({', '.join(sorted(KNOWN_ARCHS))}); add experiment.reference_arch")
        return self

    @property
    def arch(self) -> ArchModel:
        """The reference architecture (explicit, else from the known table)."""
        return self.reference_arch or KNOWN_ARCHS[self.reference_model]

    @property
    def dtype(self) -> str:
        return self.reference_dtype or self.arch.dtype


class Profile(_Strict):
    """A whole profile; ``name`` and ``path`` come from the file, not from its content."""

    description: str = ""
    devices: list[DeviceModel] = Field(min_length=1)
    server: ServerModel
    experiment: ExperimentModel
    name: str = Field(default="", exclude=True)
    path: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        seen: dict[str, int] = {}
        for i, d in enumerate(self.devices):
            if d.name in seen or d.name == self.server.name:
                raise ValueError(f"devices[{i}].name: {d.name!r} is used twice (device names "
                                 "must be unique and differ from the server's)")
            seen[d.name] = i
        n = self.experiment.clients
        if n is not None and n != len(self.devices):
            raise ValueError(f"experiment.clients: is {n} but devices lists "
                             f"{len(self.devices)} (clients = len(devices); drop the field)")
        return self

    @property
    def clients(self) -> int:
        return len(self.devices)

    @property
    def uses_gpus(self) -> bool:
        return any(d.gpu is not None or d.mig is not None
                   for d in [self.server, *self.devices])

    def availabilities(self) -> list[ClockAvailability]:
        """Per-client availability for :class:`runner.emulation.clock.VirtualClock`."""
        from runner.emulation.clock import Availability

        out = []
        for d in self.devices:
            a = d.availability
            out.append(Availability(
                windows=tuple((float(s), float(e)) for s, e in a.trace) if a.trace else None,
                dropout=a.dropout or 0.0))
        return out


# ---------------------------------------------------------------------------- loading
def _num(x: float) -> str:
    return f"{x:g}" if not math.isinf(x) else "inf"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def format_validation_error(where: str, exc: ValidationError) -> str:
    """One line: ``FILE: field.path[i]: what is wrong`` for the first problem found."""
    errors = exc.errors()
    first = errors[0]
    kind, msg = first["type"], first["msg"]
    if kind == "missing":
        msg = "is required"
    elif kind == "extra_forbidden":
        msg = "unknown field (check the spelling; see profiles/smoke.yaml for the schema)"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    loc = _loc(tuple(first["loc"]))
    line = f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


def profiles_dir() -> Path:
    """``$TESTBED_PROFILES`` or the repository's ``profiles/`` folder."""
    env = os.environ.get("TESTBED_PROFILES")
    return Path(env) if env else PROFILES_DIR


def available_profiles(directory: Path | None = None) -> list[Path]:
    """Profile files in the profiles folder, sorted by name."""
    d = directory or profiles_dir()
    return sorted(d.glob("*.yaml")) if d.is_dir() else []


def profile_path(name: str, directory: Path | None = None) -> Path:
    """A profile name (``hetero-llama2``) or a path to a YAML file -> the file."""
    as_path = Path(name).expanduser()
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    candidate = (directory or profiles_dir()) / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    names = ", ".join(p.stem for p in available_profiles(directory)) or "none"
    raise ProfileError(f"unknown profile '{name}'; available: {names} (or give a .yaml path)")


def _display(path: Path) -> str:
    """The path as the user should read it (relative to the working directory if below it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_profile(data: Any, where: str = "<profile>", name: str = "") -> Profile:
    """Validate already-parsed YAML; ``where`` names the source in the error line."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping with devices, server and experiment")
    for key in ("name", "path"):
        if key in data:
            raise ProfileError(f"{where}: {key}: is taken from the file name; remove it")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(format_validation_error(where, exc)) from None
    return profile.model_copy(update={"name": name, "path": where})


def load_profile(name: str, directory: Path | None = None) -> Profile:
    """Find, read and validate a profile; every problem is one ProfileError line."""
    path = profile_path(name, directory)
    where = _display(path)
    data, _ = read_yaml(path, where, ProfileError)
    return parse_profile(data, where, path.stem)


# ------------------------------------------------------------------------- footprints
def arch_config(arch: ArchModel) -> PretrainedConfig:
    """A transformers config with these numbers (no weights), for ModelCosts."""
    from transformers import GPT2Config, LlamaConfig

    if arch.family == "llama":
        return LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden,
                           intermediate_size=arch.intermediate, num_hidden_layers=arch.layers,
                           num_attention_heads=arch.heads,
                           num_key_value_heads=arch.kv_heads or arch.heads,
                           max_position_embeddings=arch.positions,
                           tie_word_embeddings=arch.tied)
    return GPT2Config(vocab_size=arch.vocab, n_embd=arch.hidden, n_layer=arch.layers,
                      n_head=arch.heads, n_inner=arch.intermediate, n_positions=arch.positions,
                      tie_word_embeddings=arch.tied)


def model_costs(name: str, arch: ArchModel | None = None) -> ModelCosts:
    """ModelCosts of a model: from ``arch`` or the known table, else from its materialised
    config (which may convert or download it)."""
    from runner.methods.memory import ModelCosts

    arch = arch or KNOWN_ARCHS.get(name)
    if arch is not None:
        return ModelCosts.from_config(arch_config(arch))
    from runner.model.models import load_config, materialise

    return ModelCosts.from_config(load_config(materialise(name)))


def training_footprint(costs: ModelCosts, dtype: str, batch: int, seq: int, rank: int,
                       targets: tuple[str, ...] = ("q", "v")) -> MemoryEstimate:
    """What one client needs to fine-tune the WHOLE model (k = L), runtime reserve excluded.

    ``runner.methods.memory.client_memory`` arithmetic (fp32) with weights, activations and the
    boundary tensors rescaled to ``dtype``. Design choice: LoRA parameters, gradients and
    AdamW moments stay fp32 (mixed-precision training keeps trainable state in fp32).
    """
    from runner.methods.memory import ELEMENT, MemoryEstimate, client_memory
    from runner.model.lora import PROJECTIONS

    table = PROJECTIONS[costs.family]
    unknown = [t for t in targets if t not in table]
    if unknown:
        raise ConfigError(f"unknown projection(s) {unknown} for {costs.family}; choose from "
                          f"{sorted(set(table))}")
    suffixes = {table[t] for t in targets}
    ranks = {n: rank for n in costs.shapes if n.split(".", 3)[-1] in suffixes}
    est = client_memory(costs, costs.num_layers, ranks, batch, seq, reserve=0)
    scale = DTYPE_BYTES[dtype] / ELEMENT
    parts = {k: (v if k in ("adapters", "runtime_reserve") else int(v * scale))
             for k, v in est.parts.items()}
    parts.pop("runtime_reserve", None)
    return MemoryEstimate(parts)


# -------------------------------------------------------------------------- emulation
@dataclass(frozen=True)
class EmulatedDevice:
    """One row of the mapping: a device's reference budget, the fraction of the reference's
    footprint it covers, and the stand-in budget covering the same fraction."""

    name: str
    role: Literal["client", "server"]
    reference_bytes: int
    fraction: float
    standin_bytes: int  # training memory for the stand-in (container: overhead on top)
    memory_bytes: int  # DeviceSpec.memory_bytes = runtime reserve + standin_bytes
    flops: float  # FLOP/s the stand-in runs at (rescaled when speeds are scaled)
    bandwidth: float
    latency: float
    reference_flops: float
    reference_bandwidth: float


@dataclass(frozen=True)
class EmulationMap:
    """The whole mapping: reference vs stand-in footprints and one row per device."""

    profile: str
    reference: str
    standin: str
    emulated: bool
    reason: str
    reference_dtype: str
    reference_footprint: int
    standin_footprint: int
    reserve: int
    compute_scale: float
    bandwidth_scale: float
    devices: list[EmulatedDevice] = field(default_factory=list)

    @property
    def model(self) -> str:
        """The model that actually runs."""
        return self.standin if self.emulated else self.reference

    @property
    def clients(self) -> list[EmulatedDevice]:
        return [d for d in self.devices if d.role == "client"]

    @property
    def server(self) -> EmulatedDevice:
        return next(d for d in self.devices if d.role == "server")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def reference_loadable(profile: Profile, device: str = "auto") -> tuple[bool, str]:
    """Can the reference model run here? (Then nothing is emulated.)

    Design choice: yes when its weights are local (an alias, a model directory, or the
    Hugging Face cache; nothing is downloaded to find out) AND it can run: training runs on
    a CUDA device (``device``, ``--device`` resolved here: runner/device.py), or every
    client's reference footprint fits in half of this host's RAM. A GPU that is visible while
    the run trains on the CPU (``--device cpu``) does not count: the 7B reference would train
    in fp32 on the CPU inside 5-20 GB containers (docs/gpu.md "Device placement").
    """
    name = profile.experiment.reference_model
    from runner.model.models import ALIASES

    if name in ALIASES:
        return True, f"{name} is a built-in model"
    path = Path(name).expanduser()
    local = path.is_dir() and (path / "config.json").is_file()
    if not local and "/" in name and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            local = isinstance(try_to_load_from_cache(name, "config.json"), str)
        except Exception:  # noqa: BLE001 - no hub library / bad id: not local
            local = False
    if not local:
        return False, f"no local weights for {name} (nothing is downloaded)"
    from runner import device as placement

    where = placement.resolve(device)
    if placement.is_cuda(where):
        return True, f"{name} is local and training runs on a CUDA GPU ({where})"
    exp = profile.experiment
    need = training_footprint(model_costs(name, exp.reference_arch), exp.dtype, exp.batch,
                              exp.seq, exp.rank, tuple(exp.targets)).total * profile.clients
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need <= ram // 2:
        return True, f"{name} is local and fits in host memory"
    return False, (f"{name} is local but needs {need / 1e9:.1f} GB for {profile.clients} "
                   f"clients and there is no GPU ({ram / 1e9:.0f} GB RAM)")


def emulation_map(profile: Profile, emulate: bool | None = None,
                  scale_speed: bool = True, device: str = "auto") -> EmulationMap:
    """Map each device's budget from the reference to the stand-in (docs/emulation.md).

    ``emulate`` None decides with :func:`reference_loadable` (for training on ``device``,
    the ``--device`` spec). With emulation, device ``i``
    with budget ``B_i`` covers ``f_i = B_i / F_ref`` of the reference's training footprint
    and gets ``f_i * F_standin`` for the stand-in; the runtime reserve of this testbed's
    process comes on top (``memory_bytes``). ``scale_speed`` (design choice, on by default)
    also rescales compute by the per-block FLOPs ratio and bandwidth by the hidden-size
    ratio, so a stand-in step takes the same virtual time as a reference step and ARMSC
    sees the reference's compute/communication balance.
    """
    from runner.methods.memory import DEFAULT_RESERVE

    exp = profile.experiment
    if emulate is None:
        loadable, reason = reference_loadable(profile, device)
        emulate = not loadable
    else:
        reason = "emulation forced" if emulate else "emulation disabled"
    ref_costs = model_costs(exp.reference_model, exp.reference_arch)
    f_ref = training_footprint(ref_costs, exp.dtype, exp.batch, exp.seq, exp.rank,
                               tuple(exp.targets)).total
    if emulate:
        sub_costs = model_costs(exp.standin_model)
        f_sub = training_footprint(sub_costs, "fp32", exp.batch, exp.seq, exp.rank,
                                   tuple(exp.targets)).total
        compute_scale = (sub_costs.flops_per_token_block / ref_costs.flops_per_token_block
                         if scale_speed else 1.0)
        bandwidth_scale = sub_costs.hidden / ref_costs.hidden if scale_speed else 1.0
    else:
        f_sub, compute_scale, bandwidth_scale = f_ref, 1.0, 1.0
    rows = []
    devices: list[tuple[Literal["client", "server"], DeviceModel | ServerModel]] = [
        ("client", d) for d in profile.devices]
    devices.append(("server", profile.server))
    for role, d in devices:
        fraction = d.memory / f_ref
        standin = int(round(fraction * f_sub)) if emulate else d.memory
        rows.append(EmulatedDevice(
            name=d.name, role=role, reference_bytes=d.memory, fraction=fraction,
            standin_bytes=standin, memory_bytes=DEFAULT_RESERVE + standin,
            flops=d.compute * compute_scale, bandwidth=d.bandwidth * bandwidth_scale,
            latency=d.latency, reference_flops=d.compute, reference_bandwidth=d.bandwidth))
    return EmulationMap(
        profile=profile.name, reference=exp.reference_model, standin=exp.standin_model,
        emulated=emulate, reason=reason, reference_dtype=exp.dtype, reference_footprint=f_ref,
        standin_footprint=f_sub, reserve=DEFAULT_RESERVE, compute_scale=compute_scale,
        bandwidth_scale=bandwidth_scale, devices=rows)


def device_specs(mapping: EmulationMap) -> tuple[list[DeviceSpec], DeviceSpec]:
    """DeviceSpecs the trainer / ARMSC take: clients in profile order, then the server.

    Replaces ``runner.methods.hetero.emulated_devices``' hard-coded spread for profile runs.
    """
    from runner.emulation.devices import DeviceSpec

    def spec(d: EmulatedDevice) -> DeviceSpec:
        return DeviceSpec(d.name, d.memory_bytes, flops=d.flops, bandwidth=d.bandwidth,
                          latency=d.latency)

    return [spec(d) for d in mapping.clients], spec(mapping.server)


def write_devices_file(mapping: EmulationMap, path: Path,
                       availability: list[AvailabilitySpec] | None = None) -> Path:
    """Write ``{"clients": [...], "server": {...}}`` (JSON; runner.emulation.devices.load_devices),
    with each client's availability (trace or per-round dropout) when it has one, which the
    trainer's virtual clock applies (runner/trainer.py)."""
    clients, server = device_specs(mapping)
    rows = [c.to_dict() for c in clients]
    for row, avail in zip(rows, availability or [], strict=False):
        if avail is not None and (avail.trace is not None or avail.dropout):
            row["availability"] = ({"trace": [list(w) for w in avail.trace]}
                                   if avail.trace is not None else {"dropout": avail.dropout})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"clients": rows, "server": server.to_dict()}, indent=2)
                    + "\n")
    return path


def train_config(profile: Profile, mapping: EmulationMap,
                 devices_file: Path | None = None) -> TrainConfig:
    """The TrainConfig a profile run uses (model = the stand-in when emulating)."""
    from runner.config import TrainConfig

    exp = profile.experiment
    cfg = TrainConfig(
        method=exp.method, model=mapping.model, data=exp.data, clients=profile.clients,
        rank=exp.rank, targets=tuple(exp.targets), steps=exp.steps, batch_size=exp.batch,
        agg_interval=exp.agg_interval, eval_every=exp.eval_every, partition=exp.partition,
        seed=exp.seed, devices=str(devices_file) if devices_file else None,
        rank_set=tuple(exp.rank_set), plan_seq=exp.seq, server_chunk=exp.server_chunk)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------- printing
def fmt_bytes(n: float) -> str:
    """Decimal units, as budgets are written in profiles (GB = 1e9)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9),
                        ("MFLOP/s", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP/s"


def fmt_rate(bytes_per_s: float) -> str:
    bits = bytes_per_s * 8
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def print_emulation(mapping: EmulationMap, console: Console) -> None:
    """The mapping as a rich table (printed before a profile run starts); whole values when
    the output is not a terminal (testbed/tables.py)."""
    from rich.table import Table

    from testbed.tables import print_table

    if mapping.emulated:
        title = (f"emulating {mapping.reference} ({mapping.reference_dtype}, training "
                 f"footprint {fmt_bytes(mapping.reference_footprint)}) with "
                 f"{mapping.standin} (fp32, {fmt_bytes(mapping.standin_footprint)})")
    else:
        title = (f"running {mapping.reference} itself (training footprint "
                 f"{fmt_bytes(mapping.reference_footprint)})")
    table = Table(title=title, title_justify="left")
    for col in ("device", "reference budget", "fraction", "stand-in budget",
                "container/ARMSC", "compute", "bandwidth"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for d in mapping.devices:
        name = d.name + (" (server)" if d.role == "server" else "")
        table.add_row(name, fmt_bytes(d.reference_bytes), f"{d.fraction:.3f}",
                      fmt_bytes(d.standin_bytes), fmt_bytes(d.memory_bytes),
                      fmt_flops(d.flops), fmt_rate(d.bandwidth))
    print_table(console, table)
    console.print(f"why: {mapping.reason}. Budgets cover the same fraction of the model's "
                  f"training footprint; the runtime reserve ({fmt_bytes(mapping.reserve)}) "
                  "comes on top (container/ARMSC column)."
                  + (f" Compute x{mapping.compute_scale:.3g}, bandwidth "
                     f"x{mapping.bandwidth_scale:.3g} keep the reference's step-time balance."
                     if mapping.emulated and (mapping.compute_scale != 1.0
                                              or mapping.bandwidth_scale != 1.0) else ""),
                  highlight=False, soft_wrap=True)


def _gpu_text(gpu: int | str | None, mig: str | None) -> str:
    """The gpu column: selector and MIG profile, '-' for neither."""
    parts = ([] if gpu is None else [str(gpu)]) + ([] if mig is None else [f"mig {mig}"])
    return " ".join(parts) or "-"


def print_profile(profile: Profile, console: Console) -> None:
    """A validated profile, pretty: experiment, then one row per device and the server (whole
    values when the output is not a terminal)."""
    from rich.table import Table

    from testbed.tables import print_table

    exp = profile.experiment
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("profile", f"{profile.name}  ({profile.path})")
    if profile.description:
        head.add_row("description", profile.description.strip())
    head.add_row("reference", f"{exp.reference_model} ({exp.dtype})")
    head.add_row("stand-in", exp.standin_model)
    head.add_row("method", exp.method)
    head.add_row("data", exp.data or "default ($TESTBED_DATA, cache, download)")
    head.add_row("steps / batch / seq", f"{exp.steps} / {exp.batch} / {exp.seq}")
    head.add_row("rank / targets", f"{exp.rank} / {','.join(exp.targets)}")
    head.add_row("rank set", ",".join(str(r) for r in exp.rank_set))
    head.add_row("aggregation", f"every {exp.agg_interval} steps")
    head.add_row("clients / seed", f"{profile.clients} / {exp.seed}")
    print_table(console, head)
    table = Table(title="devices", title_justify="left")
    for col in ("name", "memory", "compute", "bandwidth", "latency", "availability", "gpu",
                "label"):
        table.add_column(col, justify="right" if col in ("memory", "compute", "bandwidth",
                                                         "latency") else "left")
    for d in profile.devices:
        table.add_row(d.name, fmt_bytes(d.memory), fmt_flops(d.compute), fmt_rate(d.bandwidth),
                      fmt_seconds(d.latency), d.availability.describe(),
                      _gpu_text(d.gpu, d.mig), d.label)
    s = profile.server
    table.add_row(f"{s.name} (server)", fmt_bytes(s.memory), fmt_flops(s.compute),
                  fmt_rate(s.bandwidth), fmt_seconds(s.latency), "always",
                  _gpu_text(s.gpu, s.mig), s.label, style="dim")
    print_table(console, table)
