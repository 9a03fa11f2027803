"""``--tls auto|on|off``, ``--mtls`` and ``--tls-name``: whether a fleet's MQTT links use TLS.

Why a rule per backend rather than one default: TLS costs a handshake per connection and
some CPU per byte (bench/transport.py, docs/benchmarks.md "TLS"), and buys nothing where no
other machine can see the traffic. So ``auto`` (the default) turns TLS on exactly when the
broker is reachable from beyond this host (docs/security.md):

* local backend: on when ``--listen`` is not a loopback address (``testbed join`` from a
  device, 0.0.0.0);
* compose: off, the traffic stays on one host's private container network (or its loopback
  with ``--host-network``);
* swarm: on when the swarm has more than one node (the overlay network crosses hosts), off
  on a one-node swarm;
* the Kubernetes export: on (a cluster's pod network spans nodes);
* an existing broker (``--broker URL``): its URL decides, ``mqtts://`` or ``mqtt://``.

``--tls on`` forces TLS anywhere (the tests use it on loopback), ``--tls off`` refuses it
anywhere, and ``--mtls`` (mutual TLS: every participant presents a certificate of the run's
CA, whose Common Name is its identity) implies TLS. ``testbed up`` prints the decision in one
line (:meth:`TLSChoice.line`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.distributed.tls import is_loopback
from runner.errors import UserError

MODES = ("auto", "on", "off")
TLS_HELP = ("auto (TLS when the broker is reachable beyond this host: --listen other than "
            "loopback, a swarm of several nodes, the Kubernetes export) | on | off; "
            "docs/security.md")
MTLS_HELP = ("Mutual TLS: every participant presents a certificate of the run's CA and the "
             "certificate is its identity (a stolen password alone gets nobody in); implies "
             "TLS")
NAME_HELP = ("An extra name or address for the broker's TLS certificate (a NAT's public "
             "address, a DNS alias; repeatable): devices must dial a name it lists")


@dataclass(frozen=True)
class TLSRequest:
    """What the user asked for (``--tls``, ``--mtls``, ``--tls-name``), before the backend
    is known; :meth:`decide` turns it into a :class:`TLSChoice`."""

    mode: str = "auto"
    mutual: bool = False
    names: tuple[str, ...] = ()

    def check(self) -> TLSRequest:
        """UserError (one line) for a mode that does not exist or contradicts --mtls."""
        if self.mode not in MODES:
            raise UserError(f"--tls must be auto, on or off, not {self.mode!r}")
        if self.mutual and self.mode == "off":
            raise UserError("--mtls is mutual TLS and needs TLS: drop --tls off")
        return self

    def decide(self, backend: str, *, listen: str = "127.0.0.1", nodes: int = 1,
               host_network: bool = False, external: str | None = None) -> TLSChoice:
        """On or off for ``backend`` (local, compose, swarm, k8s), with the reason.

        ``listen``: the local broker's address; ``nodes``: the swarm's size; ``external``:
        the URL of an existing broker (``--broker``), whose scheme decides."""
        self.check()
        if external is not None:
            return self._external(external)
        if self.mode == "on" or (self.mutual and self.mode == "auto"):
            why = "--mtls" if self.mode == "auto" else "--tls on"
            return TLSChoice(True, self.mutual, why, self.names)
        beyond, where = _reach(backend, listen, nodes, host_network)
        if self.mode == "off":
            return TLSChoice(False, False, "--tls off", exposed=beyond)
        return TLSChoice(beyond, self.mutual, where, self.names)

    def _external(self, url: str) -> TLSChoice:
        secure = url.startswith("mqtts://")
        if self.mutual:
            raise UserError("--mtls issues the run's own certificates, which an existing "
                            "broker (--broker) does not trust; drop --mtls (its operator "
                            "provides TESTBED_TLS_CERT / TESTBED_TLS_KEY)")
        if self.mode == "on" and not secure:
            raise UserError(f"--tls on, but --broker {url} is plain MQTT: give its TLS "
                            "address, mqtts://HOST:PORT")
        if self.mode == "off" and secure:
            raise UserError(f"--tls off, but --broker {url} speaks TLS: give mqtt://HOST:PORT "
                            "or drop --tls off")
        return TLSChoice(secure, False, f"the --broker URL is {url.split(':', 1)[0]}://",
                         external=True)


def _reach(backend: str, listen: str, nodes: int, host_network: bool) -> tuple[bool, str]:
    """Whether the broker is reachable beyond this host on ``backend``, and why."""
    if backend == "local":
        if is_loopback(listen):
            return False, f"the broker listens on {listen}, loopback only"
        return True, f"the broker listens on {listen}, beyond loopback"
    if backend == "k8s":
        return True, "a cluster's pod network spans its nodes"
    if backend == "swarm" and nodes > 1:
        return True, f"a swarm of {nodes} nodes: the overlay network crosses hosts"
    if host_network:
        return False, "every container on this host's network, the broker on loopback"
    if backend == "swarm":
        return False, "a one-node swarm: the overlay network stays on this host"
    return False, "one host's private container network"


@dataclass(frozen=True)
class TLSChoice:
    """The decision: TLS on or off, mutual or not, and the reason said in one line."""

    on: bool
    mutual: bool
    why: str
    names: tuple[str, ...] = ()
    exposed: bool = False  # off although the broker is reachable beyond this host
    external: bool = False  # an existing broker: no certificates of ours

    def line(self, ca: Path | str | None = None) -> str:
        """What ``testbed up`` prints: ``tls: on (...)`` / ``tls: off (...)``."""
        if self.on:
            kind = "on, mutual" if self.mutual else "on"
            tail = (f"; every link checks the broker's certificate against the run's CA "
                    f"({ca})" if ca is not None else "")
            if self.mutual:
                tail += "; each participant's certificate is its identity"
            return f"tls: {kind} ({self.why}){tail}"
        if self.exposed:
            return (f"tls: off ({self.why}): passwords, activations and gradients cross the "
                    "network in the clear")
        if self.external:
            return f"tls: off ({self.why})"
        return f"tls: off ({self.why}; --tls on encrypts anyway)"


__all__ = ["MODES", "MTLS_HELP", "NAME_HELP", "TLS_HELP", "TLSChoice", "TLSRequest"]
