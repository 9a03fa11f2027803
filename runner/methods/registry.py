"""Every training method's name and traits, defined once.

Why: the engines (runner/trainer.py, runner/server.py, runner/client.py) and the control
plane used to pick behaviour by comparing method names (with ``"ft"``, with a set of split
methods), with the name sets written twice. Here each method is one :class:`Traits`
record; code asks a trait (``traits(cfg).split``), never a name, so a new method is one
``register`` call (docs/extending.md).

The ablations of HSplitLoRA are traits of it (``iwi``, ``armsc``, ``naa`` switched off), not
special cases scattered through the code.

This module is data: it imports nothing from the project but its error type (a user's
plug-in module, named in ``$TESTBED_METHODS``, is imported on the first look-up), so
:mod:`runner.config` (and everything under it) can read it without an import cycle. Which
code runs a method's server and client side is named by dotted paths (``hooks``), resolved
by :mod:`runner.methods.plugins`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.errors import ConfigError

# Modules (comma-separated) that define methods of their own: imported, so that their
# ``register`` calls run, when a process first looks a method up (docs/extending.md). Every
# process of a run inherits it: the CLI, the distributed server and the clients.
PLUGINS_ENV = "TESTBED_METHODS"

# Aggregation rules (runner/methods/aggregation.py): what happens to client adapters every I steps.
FEDAVG = "fedavg"  # FedAvg of A and B weighted by p_i
NAA = "naa"  # HSplitLoRA's noise-free concatenation, merged into the frozen weights
PADDED_FEDAVG = "padded-fedavg"  # zero-padded FedAvg over mixed ranks (hsplitlora-no-naa)
HETLORA = "hetlora"  # zero-pad, sparsity-weighted average, truncate back (HetLoRA)
NONE = "none"  # one model, nothing to aggregate (cenlora, ft)
RULES = (FEDAVG, NAA, PADDED_FEDAVG, HETLORA, NONE)  # built-in; a plug-in may name its own


@dataclass(frozen=True)
class Traits:
    """What a method is, as the engines need to know it (docs/method.md
    "Baselines", "Ablations").

    ``split``: clients hold blocks ``[0, k)`` and the server the rest (else every client holds
    the whole model). ``central``: one model trained on the pooled data (no clients to
    aggregate). ``full``: full fine-tuning (whole weights, not adapters). ``hetero``: split
    points and ranks per client from the devices (runner/methods/hetero.py's HeteroTrainer,
    the base of hsplitlora.py's and hetlora.py's trainers).
    ``iwi`` / ``armsc`` / ``naa``: HSplitLoRA's three parts (off in its ablations).
    ``fixed_config``: one split point and rank for every client, which the fairness rule
    (testbed/experiment/fairness.py) may choose for a profile. ``hooks``: ``"module:Class"`` of the
    method's server-side and client-side hooks in the distributed runtime (None: the
    SplitLoRA / FedAvg engines' own behaviour); ``trainer``: ``"module:function"`` that
    builds its in-process trainer (None: runner.trainer.Trainer).
    ``chooses``: TrainConfig fields the method decides per client by itself (ARMSC's split
    points and ranks; HetLoRA's rank from each device's budget), so the option that would set
    one value for every client is not used; choosing ``"rank"`` means choosing from
    ``rank_set``. ``ignores``: further fields a (plug-in) method does not use, field -> why,
    beyond what its other traits imply (:func:`unused_fields`).
    """

    name: str
    split: bool
    central: bool = False
    full: bool = False
    hetero: bool = False
    iwi: bool = False
    armsc: bool = False
    naa: bool = False
    aggregation: str = FEDAVG
    fixed_config: bool = False
    default_lr: float = 2e-4
    summary: str = ""
    hooks: dict[str, str] = field(default_factory=dict)  # role ("server", "client") -> path
    trainer: str | None = None
    chooses: tuple[str, ...] = ()
    ignores: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.aggregation:
            raise ValueError(f"{self.name}: name the aggregation rule (one of "
                             f"{', '.join(RULES)}, or the plug-in's own)")
        if self.central and (self.split or self.aggregation != NONE):
            raise ValueError(f"{self.name}: a central method has no split and no aggregation")

    @property
    def federated(self) -> bool:
        """Several clients whose models are aggregated."""
        return not self.central


# Each role of a method in a file of its own (runner/methods/); hetero*.py is what the two
# heterogeneous methods share (HetLoRA's clients need nothing beyond it).
_HSPLIT_TRAINER = "runner.methods.hsplitlora:HSplitLoRATrainer"
_HSPLIT_HOOKS = {"server": "runner.methods.hsplitlora_server:HSplitLoRAServerHooks",
                 "client": "runner.methods.hsplitlora_client:HSplitLoRAClientHooks"}
_HETLORA_TRAINER = "runner.methods.hetlora:HetLoRATrainer"
_HETLORA_HOOKS = {"server": "runner.methods.hetlora_server:HetLoRAServerHooks",
                  "client": "runner.methods.hetero_client:HeteroClientHooks"}


def _hsplit(name: str, summary: str, **off: bool) -> Traits:
    on = {"iwi": True, "armsc": True, "naa": True, **off}
    return Traits(name, split=True, hetero=True, aggregation=NAA if on["naa"] else PADDED_FEDAVG,
                  summary=summary, hooks=dict(_HSPLIT_HOOKS), trainer=_HSPLIT_TRAINER,
                  chooses=("split", "rank") if on["armsc"] else (), **on)


_REGISTRY: dict[str, Traits] = {}


def register(t: Traits, *, replace: bool = False) -> Traits:
    """Add a method (a user's own: docs/extending.md). A name is registered once."""
    if t.name in _REGISTRY and not replace and _REGISTRY[t.name] != t:
        raise ValueError(f"method {t.name!r} is already registered")
    _REGISTRY[t.name] = t
    return t


for _t in (
    Traits("splitlora", split=True, fixed_config=True,
           summary="SplitLoRA: fixed split k and rank r on every client, FedAvg"),
    Traits("fedlora", split=False, fixed_config=True,
           summary="federated LoRA: whole model per client, FedAvg"),
    Traits("cenlora", split=False, central=True, aggregation=NONE,
           summary="centralised LoRA on the pooled data"),
    Traits("ft", split=False, central=True, full=True, aggregation=NONE, default_lr=5e-5,
           summary="full fine-tuning on the pooled data"),
    Traits("hetlora", split=False, hetero=True, aggregation=HETLORA,
           hooks=dict(_HETLORA_HOOKS), trainer=_HETLORA_TRAINER, chooses=("rank",),
           summary="HetLoRA: whole model per client, rank from its budget"),
    _hsplit("hsplitlora", "HSplitLoRA: IWI + ARMSC + NAA"),
    _hsplit("hsplitlora-no-iwi", "ablation: uniform importance", iwi=False),
    _hsplit("hsplitlora-no-armsc", "ablation: fixed split and rank", armsc=False),
    _hsplit("hsplitlora-no-naa", "ablation: padded FedAvg instead of NAA", naa=False),
):
    register(_t)


class HasMethod(Protocol):
    method: str


_loaded: set[str] = set()


def load_plugins() -> None:
    """Import the modules ``$TESTBED_METHODS`` names that are not imported yet."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module not in _loaded:
            _loaded.add(module)
            try:
                importlib.import_module(module)
            except ImportError as e:
                _loaded.discard(module)
                raise ConfigError(f"{PLUGINS_ENV}: cannot import {module!r}: {e}") from e


def names() -> tuple[str, ...]:
    """Every registered method, in registration order (the built-in ones first), those of
    ``$TESTBED_METHODS`` included."""
    load_plugins()
    return tuple(_REGISTRY)


def get(name: str) -> Traits:
    """The traits of method ``name``; KeyError (listing the known names) if unknown."""
    if name not in _REGISTRY:
        load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") \
            from None


def traits(cfg: HasMethod) -> Traits:
    """The traits of a config's method (anything with a ``method`` attribute)."""
    return get(cfg.method)


def having(**wanted: Any) -> tuple[str, ...]:
    """Names of the methods registered so far whose traits equal ``wanted`` (no plug-in is
    loaded here: runner.config derives its name sets while it is being imported)."""
    return tuple(n for n, t in _REGISTRY.items()
                 if all(getattr(t, k) == v for k, v in wanted.items()))


def unused_fields(t: Traits) -> dict[str, str]:
    """The training options (TrainConfig fields) method ``t`` does not use, each with why.

    Why here, derived from the traits: whether a method reads ``split``, ``rank`` or
    ``devices`` follows from what it is (split or not, central, full fine-tuning, what it
    chooses itself), and the CLI must refuse an option a method would silently drop
    (testbed/options.py ``check_applies``) for every method, a plug-in's included, without a
    list of names per option to keep in step with the engines. What the engines read (so
    what is listed here) is pinned by tests/test_cli_consistency.py.
    """
    why: dict[str, str] = {}
    if t.central:
        pooled = "it trains one model on the pooled data"
        for name in ("clients", "partition", "dirichlet_alpha", "dropouts"):
            why[name] = f"{pooled} (no clients)"
        why["agg_interval"] = f"{pooled}: nothing to aggregate"
        why["devices"] = f"{pooled}: no client devices, no virtual clock"
        why["stop_virtual_time"] = f"{pooled}: no client devices, no virtual clock"
    if not t.split:
        why["split"] = "every client holds the whole model (no split point)"
        why["server_chunk"] = "there is no server pass to chunk (no split)"
    if t.full:
        for name in ("rank", "targets", "lora_dropout"):
            why[name] = "full fine-tuning trains the whole weights, no adapters"
    if "split" in t.chooses:
        why["split"] = "it chooses each client's split point for its device (ARMSC)"
    if "rank" in t.chooses:
        why["rank"] = "it chooses the ranks per client from the rank set under each " \
                      "device's memory budget"
    else:
        why["rank_set"] = "only the methods that choose ranks per client take a rank set"
    why.update(t.ignores)
    return why


def using(name: str) -> tuple[str, ...]:
    """The registered methods (plug-ins included) that use TrainConfig field ``name``."""
    return tuple(n for n in names() if name not in unused_fields(get(n)))
