"""Training methods as plug-ins: their traits (:mod:`runner.methods.registry`) and the code
that runs each one's server and client side (:mod:`runner.methods.plugins`).

docs/extending.md says how to add a method without editing an engine.
"""

from runner.methods.registry import Traits, get, having, names, register, traits

__all__ = ["Traits", "get", "having", "names", "register", "traits"]
