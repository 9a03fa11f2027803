"""Experiment files (``experiments/*.yaml``): a grid of methods x profiles x seeds x overrides.

An experiment file says what to compare and how to stop; ``testbed experiment run`` turns
it into cells (one training run each, testbed/experiment/run.py) and ``testbed experiment
report`` aggregates the seeds (analysis/experiment.py). docs/experiments.md is the user's
guide; this module is the schema and the expansion into cells.

Validation follows testbed/profiles.py: a pydantic schema with unknown keys forbidden, and
every problem reported as ONE line naming the file and the field
(``experiments/x.yaml: methods[1]: unknown method 'splitlor'; ...``), raised as
:class:`ExperimentError` (a UserError: exit 2 in the CLI, no traceback). Training settings
are TrainConfig fields (runner/config.py) checked by their own types, and every cell's
TrainConfig is validated before anything runs, so a typo never costs a half-run grid.

Paths in the file (``data``, ``devices``, ``test_data``, profile paths) are relative to the
working directory, as on the command line; cells get them absolute.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.config import CENTRAL_METHODS, TrainConfig
from runner.errors import ConfigError, UserError
from runner.methods import registry
from testbed.profiles import Profile, format_validation_error
from testbed.yamlfile import read_yaml

# TrainConfig fields the grid itself sets: they cannot appear under settings / overrides.
GRID_FIELDS = {
    "method": "set by the grid: list it under methods",
    "seed": "set by the grid: list it under seeds",
    "stop_virtual_time": "a stopping rule: use stop.virtual_time",
    "early_stop_patience": "a stopping rule: use stop.patience",
    "early_stop_min_delta": "a stopping rule: use stop.min_delta",
    "extra": "reserved for the testbed's own records",
}
PATH_FIELDS = ("data", "devices")
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0,
               "hour": 3600.0, "hours": 3600.0, "d": 86400.0}


class ExperimentError(UserError):
    """An experiment file is missing, unreadable or fails validation (one line)."""


def parse_duration(value: Any) -> float:
    """``600`` / ``"600 s"`` / ``"30 min"`` / ``"2 h"`` -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError(f"expected seconds or a time like '30 min', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _TIME_UNITS:
            raise ValueError(f"expected seconds or a time like '30 min' / '2 h', got {value!r}")
        seconds = float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"expected seconds or a time like '30 min', got {value!r}")
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError("must be > 0")
    return seconds


def _known_method(v: str) -> str:
    if v not in registry.names():  # plug-ins of $TESTBED_METHODS included
        raise ValueError(f"unknown method {v!r}; choose from {', '.join(registry.names())}")
    return v


Duration = Annotated[float, BeforeValidator(parse_duration)]
Method = Annotated[str, AfterValidator(_known_method)]


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently become a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StopSpec(_Strict):
    """Stopping rules (runner/stopping.py); ``settings.steps`` is always the cap."""

    virtual_time: Duration | None = None  # virtual seconds (the emulated devices' clock)
    patience: int | None = Field(default=None, ge=1)  # evaluations without improvement
    min_delta: float = Field(default=0.0, ge=0)  # PPL an evaluation must gain to count

    @model_validator(mode="after")
    def _delta_needs_patience(self) -> StopSpec:
        if self.min_delta and self.patience is None:
            raise ValueError("min_delta is the margin of early stopping: give patience too")
        return self


class FairnessSpec(_Strict):
    """Same per-device budgets for every method (testbed/experiment/fairness.py)."""

    enabled: bool = True
    # The uniform split of splitlora: "makespan" = the fitting split with the shortest
    # estimated step (ARMSC's objective), "deepest" = the deepest fitting split.
    split: Literal["makespan", "deepest"] = "makespan"


class EvalSpec(_Strict):
    """Per-cell `testbed eval` after training (beam search + the five E2E scores)."""

    enabled: bool = True
    max_mrs: int = Field(default=30, ge=0)  # 0 = every test MR
    beams: int = Field(default=10, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    test_data: str | None = None  # score this whole CSV instead of the run's test split


class ReportSpec(_Strict):
    """Defaults for `testbed experiment report` (the command line can override them)."""

    target_ppl: float | None = Field(default=None, gt=0)
    baseline: str | None = None
    # [from, to] profiles: per method, PPL(to) - PPL(from) paired by seed (e.g. the PPL
    # rise from a homogeneous to a heterogeneous fleet).
    contrast: tuple[str, str] | None = None


class ResourcesSpec(_Strict):
    """What cells may use together (the memory check before each start)."""

    memory: str | int | None = None  # "12GB"; default: memory available at the start
    threads: int | None = Field(default=None, ge=1)  # torch threads per cell

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | int | None) -> str | int | None:
        if v is None:
            return v
        from testbed.profiles import parse_bytes

        if parse_bytes(v) <= 0:
            raise ValueError("must be > 0")
        return v

    @property
    def memory_bytes(self) -> int | None:
        from testbed.profiles import parse_bytes

        return None if self.memory is None else parse_bytes(self.memory)


class ExperimentSpec(_Strict):
    """A whole experiment file; ``name`` defaults to the file's stem."""

    name: str = Field(default="", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    methods: list[Method] = Field(min_length=1)
    profiles: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict)
    method_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stop: StopSpec = StopSpec()
    fairness: FairnessSpec = FairnessSpec()
    eval: EvalSpec | None = None
    report: ReportSpec = ReportSpec()
    resources: ResourcesSpec = ResourcesSpec()
    # Experiment directories whose finished cells with the same id and the same training
    # configuration are copied instead of trained again (experiments sharing cells).
    reuse: list[str] = Field(default_factory=list)
    path: str = Field(default="", exclude=True)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a method twice")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v):
            raise ValueError("seeds must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError("lists a seed twice")
        return v

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: list[str]) -> list[str]:
        stems = [Path(p).stem for p in v]
        if len(set(stems)) != len(stems):
            raise ValueError("lists a profile twice (profiles are named by their file stem)")
        return v

    @field_validator("overrides")
    @classmethod
    def _override_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(name)):
                raise ValueError(f"override name {name!r} must be letters, digits, _ or - "
                                 "(it becomes part of a directory name)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> ExperimentSpec:
        for m in self.method_settings:
            if m not in self.methods:
                raise ValueError(f"method_settings.{m}: not one of the experiment's methods "
                                 f"({', '.join(self.methods)})")
        if self.report.baseline is not None and self.report.baseline not in self.methods:
            raise ValueError(f"report.baseline: {self.report.baseline!r} is not one of the "
                             f"experiment's methods ({', '.join(self.methods)})")
        if self.report.contrast is not None:
            stems = [Path(p).stem for p in self.profiles]
            for p in self.report.contrast:
                if p not in stems:
                    raise ValueError(f"report.contrast: {p!r} is not one of the experiment's "
                                     f"profiles ({', '.join(stems) or 'none'})")
        return self

    @property
    def override_names(self) -> list[str]:
        """The override axis: the named variants, or one unnamed ``base``."""
        return list(self.overrides) or ["base"]

    @property
    def profile_names(self) -> list[str]:
        return [Path(p).stem for p in self.profiles]


# ----------------------------------------------------------------------------- settings
def _field_types() -> dict[str, Any]:
    """TrainConfig field -> its type (resolved annotations)."""
    import runner.config as config_module

    return typing.get_type_hints(TrainConfig, vars(config_module))


def check_settings(where: str, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Type-check TrainConfig fields given in ``section``; returns them typed (lists become
    tuples, numbers their field's type). One ExperimentError line for the first problem."""
    types = _field_types()
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in GRID_FIELDS:
            raise ExperimentError(f"{where}: {section}.{key}: {GRID_FIELDS[key]}")
        if key not in types:
            close = difflib.get_close_matches(key, [k for k in types if k not in GRID_FIELDS],
                                              n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ExperimentError(f"{where}: {section}.{key}: not a training setting{hint}; "
                                  "see runner/config.py TrainConfig")
        if key == "targets" and isinstance(value, str):  # "q,v" as on the command line
            value = [t.strip() for t in value.split(",") if t.strip()]
        if key == "eval_max_examples" and value == 0:  # 0 = all, as on the command line
            value = None
        try:
            out[key] = TypeAdapter(types[key]).validate_python(value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise ExperimentError(f"{where}: {section}.{key}: {msg} (got {value!r})") from None
    return out


# -------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One training run of the grid."""

    id: str
    method: str
    profile: str | None
    override: str
    seed: int
    config: TrainConfig
    fixed: list[str] = field(default_factory=list)  # settings the file set explicitly

    @property
    def group(self) -> tuple[str, str]:
        """(profile or "-", override): the seeds of one method in one setting."""
        return (self.profile or "-", self.override)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "method": self.method, "profile": self.profile,
                "override": self.override, "seed": self.seed, "fixed": list(self.fixed),
                "train": self.config.to_dict()}


def cell_id(method: str, profile: str | None, override: str | None, seed: int) -> str:
    """``method[.profile][.override].seedN``: a directory name that sorts by method."""
    parts = [method] + ([profile] if profile else []) + ([override] if override else [])
    return ".".join(parts + [f"seed{seed}"])


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and value != "synthetic":
        return str(Path(value).expanduser().resolve())
    return value


@dataclass
class Experiment:
    """A validated experiment file and what the grid needs from it."""

    spec: ExperimentSpec
    source: str  # the file as the user wrote it (kept in the experiment directory)
    settings: dict[str, Any]
    method_settings: dict[str, dict[str, Any]]
    overrides: dict[str, dict[str, Any]]
    profiles: dict[str, Profile]

    @property
    def name(self) -> str:
        return self.spec.name

    def base_config(self, profile: str | None) -> TrainConfig:
        """The TrainConfig of a profile's experiment section (its stand-in model, clients,
        steps, batch, ...), or TrainConfig's defaults without a profile."""
        if profile is None:
            return TrainConfig()
        from testbed.profiles import emulation_map, train_config

        prof = self.profiles[profile]
        try:
            return train_config(prof, emulation_map(prof))
        except ConfigError as exc:
            raise ExperimentError(f"{self.spec.path}: profile {profile}: {exc}") from None

    def cells(self) -> list[Cell]:
        """Every cell, seeds outermost (a partial grid compares every method on the first
        seeds), then profile, override and method."""
        where = self.spec.path
        profiles: list[str | None] = list(self.spec.profile_names) or [None]
        bases = {p: self.base_config(p) for p in profiles}
        named = bool(self.spec.overrides)
        stop = self.spec.stop
        out = []
        for seed in self.spec.seeds:
            for profile in profiles:
                for override in self.spec.override_names:
                    for method in self.spec.methods:
                        changes: dict[str, Any] = {}
                        changes.update(self.settings)
                        changes.update(self.method_settings.get(method, {}))
                        changes.update(self.overrides.get(override, {}))
                        fixed = sorted(changes)
                        changes = {k: (_absolute(v) if k in PATH_FIELDS else v)
                                   for k, v in changes.items()}
                        cfg = replace(bases[profile], method=method, seed=seed,
                                      stop_virtual_time=stop.virtual_time,
                                      early_stop_patience=stop.patience,
                                      early_stop_min_delta=stop.min_delta, **changes)
                        cid = cell_id(method, profile, override if named else None, seed)
                        try:
                            cfg.validate()
                        except ConfigError as exc:
                            raise ExperimentError(f"{where}: cell {cid}: {exc}") from None
                        out.append(Cell(cid, method, profile, override, seed, cfg, fixed))
        return out


def _check_paths(where: str, section: str, values: dict[str, Any]) -> None:
    """Data and device files must exist before a grid starts (not after an hour)."""
    for key in PATH_FIELDS:
        value = values.get(key)
        if isinstance(value, str) and value != "synthetic" and not Path(value).expanduser() \
                .exists():
            raise ExperimentError(f"{where}: {section}.{key}: {value} does not exist "
                                  "(paths are relative to the working directory)")


def parse_experiment(data: Any, where: str = "<experiment>", name: str = "",
                     source: str = "") -> Experiment:
    """Validate already-parsed YAML; ``where`` names the source in every error line."""
    from testbed.profiles import ProfileError, load_profile

    if not isinstance(data, dict):
        raise ExperimentError(f"{where}: expected a mapping with methods, seeds, settings, ...")
    if "path" in data:
        raise ExperimentError(f"{where}: path: is taken from the file; remove it")
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        line = format_validation_error(where, exc)
        raise ExperimentError(line.replace("profiles/smoke.yaml", "docs/experiments.md")) \
            from None
    spec = spec.model_copy(update={"name": spec.name or name or "experiment", "path": where})
    settings = check_settings(where, "settings", spec.settings)
    _check_paths(where, "settings", settings)
    method_settings = {}
    for m, values in spec.method_settings.items():
        method_settings[m] = check_settings(where, f"method_settings.{m}", values)
        _check_paths(where, f"method_settings.{m}", method_settings[m])
    overrides = {}
    for o, values in spec.overrides.items():
        overrides[o] = check_settings(where, f"overrides.{o}", values or {})
        _check_paths(where, f"overrides.{o}", overrides[o])
    if spec.eval is not None and spec.eval.test_data is not None \
            and not Path(spec.eval.test_data).expanduser().is_file():
        raise ExperimentError(f"{where}: eval.test_data: {spec.eval.test_data} does not exist")
    profiles = {}
    for i, p in enumerate(spec.profiles):
        try:
            profiles[Path(p).stem] = load_profile(p)
        except ProfileError as exc:
            raise ExperimentError(f"{where}: profiles[{i}]: {exc}") from None
    if profiles and any("devices" in s for s in (settings, *method_settings.values(),
                                                 *overrides.values())):
        raise ExperimentError(f"{where}: settings.devices: the profiles describe the devices; "
                              "drop devices or the profiles")
    if spec.stop.virtual_time is not None and all(m in CENTRAL_METHODS for m in spec.methods):
        raise ExperimentError(f"{where}: stop.virtual_time: {', '.join(spec.methods)} have no "
                              "virtual clock (centralised training); use settings.steps")
    exp = Experiment(spec, source, settings, method_settings, overrides, profiles)
    exp.cells()  # every cell's TrainConfig validates now, not after an hour of the grid
    return exp


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every problem is one ExperimentError line."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ExperimentError(f"{where}: no such experiment file (see experiments/*.yaml)")
    data, text = read_yaml(path, where, ExperimentError)
    return parse_experiment(data, where, path.stem, text)


def train_fields() -> list[str]:
    """The TrainConfig fields an experiment may set (docs and error hints)."""
    return [f.name for f in fields(TrainConfig) if f.name not in GRID_FIELDS]


__all__ = ["Cell", "Experiment", "ExperimentError", "ExperimentSpec", "cell_id",
           "check_settings", "load_experiment", "parse_duration", "parse_experiment",
           "train_fields"]
