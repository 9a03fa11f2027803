"""The code that runs a method, found through its traits (runner/methods/registry.py).

A method names its in-process trainer and its server-side and client-side hooks for the
distributed runtime as ``"module:attribute"`` paths; they are imported here on first use.
Why dotted paths rather than imports: the engines (runner/trainer.py, runner/server.py,
runner/client.py) must not import the methods that plug into them (a method's module uses
the engines' building blocks, so a static import back would be a cycle), and a user's method
lives in a module the project does not know (docs/extending.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from runner.config import TrainConfig
from runner.errors import ConfigError
from runner.methods import registry
from runner.rundir import RunDir
from runner.trainer import Prepared, ProgressFn, Trainer


def resolve(path: str) -> Any:
    """The object a ``"package.module:attribute"`` path names."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"plug-in path {path!r} must read 'package.module:attribute'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load plug-in {path!r}: {e}") from e


def hooks(cfg: TrainConfig, role: str) -> type | None:
    """The hooks class of ``cfg``'s method for ``role`` ("server" or "client"), or None when
    the method runs on the engine's own SplitLoRA / FedAvg behaviour."""
    path = registry.traits(cfg).hooks.get(role)
    return resolve(path) if path else None


def build_trainer(cfg: TrainConfig, run: RunDir | None = None,
                  progress: ProgressFn | None = None,
                  prepared: Prepared | None = None) -> Trainer:
    """The in-process trainer of any registered method."""
    path = registry.traits(cfg).trainer
    cls = resolve(path) if path else Trainer
    return cls(cfg, run, progress, prepared)
