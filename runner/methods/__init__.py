"""Training methods as plug-ins: their traits (:mod:`runner.methods.registry`), the interface
the engines call (:mod:`runner.methods.hooks`) and the look-up of each method's code
(:mod:`runner.methods.plugins`); the building blocks of HSplitLoRA (IWI: importance, ARMSC:
armsc, NAA and the other rules: aggregation, the memory model: memory); and each method's
code, one file per role: ``<method>.py`` (in-process trainer), ``<method>_server.py``,
``<method>_client.py``, with what the heterogeneous methods share in ``hetero*.py``.

docs/extending.md says how to add a method without editing an engine.
"""

from runner.methods.registry import Traits, get, having, names, register, traits

__all__ = ["Traits", "get", "having", "names", "register", "traits"]
