"""The MQTT topic scheme: ids, topic names, and the filters each party subscribes and publishes to.

``hsl/<run>/c/<cid>/<kind>`` (a client's channel), ``hsl/<run>/s/<kind>`` (the server's)
and ``hsl/<run>/global`` (the aggregated factors). Separate from the envelope because the
topics are a contract of their own: the broker derives its ACL from them
(runner/distributed/broker.py), the transport subscribes by them, and the receiver checks
that a message's header agrees with the topic it came on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runner.distributed.protocol.errors import ProtocolError, Reason
from runner.distributed.protocol.kinds import DOWNLINK, KINDS, UPLINK, Kind

SERVER = "server"  # reserved "client id" of the server's own channel
ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOPIC_ROOT = "hsl"


def check_id(value: str, what: str = "id") -> str:
    """Run and client ids become topic levels and usernames: no '/', '+', '#', no spaces."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def topic(run: str, kind: Kind | str, client: str = SERVER) -> str:
    """The topic of ``kind`` on ``client``'s channel (or the server's when ``client`` is SERVER).

    ``hsl/<run>/c/<cid>/<kind>``, ``hsl/<run>/s/<kind>``, and ``hsl/<run>/global`` for the
    aggregated factors every client reads.
    """
    kind = Kind(kind)
    spec = KINDS[kind]
    check_id(run, "run id")
    if client == SERVER:
        if not spec.on_server:
            raise ValueError(f"kind {kind} does not travel on the server channel")
        if kind is Kind.GLOBAL:
            return f"{TOPIC_ROOT}/{run}/global"
        return f"{TOPIC_ROOT}/{run}/s/{kind.value}"
    if not spec.on_client:
        raise ValueError(f"kind {kind} does not travel on a client channel")
    check_id(client, "client id")
    return f"{TOPIC_ROOT}/{run}/c/{client}/{kind.value}"


@dataclass(frozen=True)
class TopicInfo:
    """A parsed topic: run, channel (a client id or SERVER) and kind."""

    run: str
    client: str
    kind: Kind


def parse_topic(name: str) -> TopicInfo:
    """Inverse of :func:`topic`; anything else is ``bad-topic``."""
    parts = name.split("/") if isinstance(name, str) else []
    try:
        if len(parts) == 3 and parts[0] == TOPIC_ROOT and parts[2] == "global":
            info = TopicInfo(check_id(parts[1]), SERVER, Kind.GLOBAL)
        elif len(parts) == 4 and parts[0] == TOPIC_ROOT and parts[2] == "s":
            info = TopicInfo(check_id(parts[1]), SERVER, Kind(parts[3]))
        elif len(parts) == 5 and parts[0] == TOPIC_ROOT and parts[2] == "c":
            if parts[3] == SERVER:
                raise ValueError("reserved id")
            info = TopicInfo(check_id(parts[1]), check_id(parts[3]), Kind(parts[4]))
        else:
            raise ValueError("shape")
        if topic(info.run, info.kind, info.client) != name:
            raise ValueError("kind not on this channel")
    except ValueError:
        raise ProtocolError(Reason.BAD_TOPIC, f"{name!r} is not a protocol topic") from None
    return info


def subscriptions(run: str, who: str) -> list[str]:
    """Topic filters ``who`` (a client id or SERVER) subscribes to; the broker ACL matches."""
    if who == SERVER:
        return [f"{TOPIC_ROOT}/{run}/c/+/{k.value}" for k in UPLINK]
    return ([topic(run, k, who) for k in DOWNLINK]
            + [topic(run, Kind.GLOBAL), f"{TOPIC_ROOT}/{run}/s/#"])


def publications(run: str, who: str) -> list[str]:
    """Topics (or filters) ``who`` may publish on; used to write the broker ACL."""
    if who == SERVER:
        return ([f"{TOPIC_ROOT}/{run}/c/+/{k.value}" for k in DOWNLINK]
                + [topic(run, Kind.GLOBAL), f"{TOPIC_ROOT}/{run}/s/#"])
    return [topic(run, k, who) for k in UPLINK]
