"""A run's certificate authority and the TLS settings of the broker and of each MQTT link.

Why TLS at all: when a fleet leaves one host (``testbed join`` from a device, a multi-node
swarm, a Kubernetes cluster), activations, gradients, adapters and every broker password
would otherwise cross the network as plain MQTT (docs/security.md says what is protected
from whom). Why a CA per run, made here: nobody has to provision anything, a certificate of
one run is worthless in another (a client presenting another run's certificate is refused),
and the CA's private key never touches the disk: the certificates of a run are issued once,
when the run is prepared, and the key is dropped with the process.

What is written (:func:`make_pki`, into ``RUN/tls/``, directory mode 0700):

* ``ca.crt``: the run's CA certificate (public; every participant verifies the broker with
  it, and with mutual TLS the broker verifies them);
* ``broker.crt`` + ``broker.key``: the broker's certificate, whose subjectAltName lists every
  name and address the participants reach the broker by (the links check it);
* with mutual TLS, ``<who>.crt`` + ``<who>.key`` for ``server``, ``monitor`` and each client:
  the Common Name is the identity, which the broker takes as the MQTT username
  (``use_identity_as_username``), so its ACL keeps that identity to its own topics;
* ``pki.json``: the run id, the broker's names, the identities and whether TLS is mutual.

Every ``.key`` file is written with mode 0600 and nothing here logs a key or its contents.

``cryptography`` is imported only to issue certificates (on the machine that prepares a
run); the server and client processes use the standard library's :mod:`ssl` (paho) or
libmosquitto's OpenSSL (native link) and need only the files.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Where a process finds its TLS files (runner/distributed/runtime.py reads them; the
# backends set them). CA only: the broker is verified; with CERT + KEY: mutual TLS.
ENV_CA = "TESTBED_TLS_CA"
ENV_CERT = "TESTBED_TLS_CERT"
ENV_KEY = "TESTBED_TLS_KEY"
TLS_PORT = 8883  # MQTT over TLS (IANA); plain MQTT is 1883
# A per-run CA: long enough for a CPU run of a whole profile (hours to days), short enough
# that a leaked certificate of an old run expires on its own.
VALIDITY_DAYS = 90
PKI_FILE = "pki.json"
CA_CERT = "ca.crt"
BROKER = "broker"
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


class TLSError(ValueError):
    """TLS files missing or unusable (names the file and what to do)."""


# -------------------------------------------------------------------------- client side
@dataclass(frozen=True)
class ClientTLS:
    """What one MQTT link needs for TLS: the CA that signs the broker's certificate (None:
    the system's trust store, for a broker with a public certificate) and, for mutual TLS,
    this identity's certificate and key. Paths as this process sees them."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TLSError("a client certificate needs its key and a key its certificate "
                           f"(set both {ENV_CERT} and {ENV_KEY}, or neither)")

    @property
    def mutual(self) -> bool:
        return self.cert is not None

    def check_files(self) -> None:
        """TLSError naming the first file that cannot be read (before any connect, so a
        wrong path is one line, not a handshake failure)."""
        for what, path in (("CA certificate", self.ca), ("certificate", self.cert),
                           ("key", self.key)):
            if path is not None and not os.access(path, os.R_OK):
                raise TLSError(f"TLS {what} {path} cannot be read; check the path (and that "
                               "the run's tls/ directory was copied with it)")

    def context(self) -> ssl.SSLContext:
        """A client context: the broker's certificate verified against :attr:`ca` and its
        name or address checked (``check_hostname``), TLS 1.2 at least; with mutual TLS our
        certificate and key loaded."""
        self.check_files()
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.cert is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def env(self) -> dict[str, str]:
        """The environment variables that give these files to a server or client process."""
        out = {ENV_CA: self.ca} if self.ca is not None else {}
        if self.cert is not None and self.key is not None:
            out.update({ENV_CERT: self.cert, ENV_KEY: self.key})
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClientTLS | None:
        """From ``TESTBED_TLS_CA`` / ``_CERT`` / ``_KEY``; None when none is set."""
        ca, cert, key = env.get(ENV_CA) or None, env.get(ENV_CERT) or None, \
            env.get(ENV_KEY) or None
        if ca is None and cert is None and key is None:
            return None
        return cls(ca, cert, key)


# -------------------------------------------------------------------------- broker side
@dataclass(frozen=True)
class BrokerTLS:
    """Mosquitto's TLS listener: its certificate and key, the CA it trusts, and whether a
    client must present a certificate of that CA (mutual TLS; the certificate's Common Name
    is then the client's username). Paths as the broker sees them (a container's)."""

    ca: str
    cert: str
    key: str
    require_certificate: bool = False

    def mosquitto_lines(self) -> list[str]:
        """The listener options of mosquitto.conf (they follow its ``listener`` line).

        ``use_identity_as_username``: with mutual TLS the Common Name of the verified client
        certificate replaces the MQTT username and Mosquitto no longer asks for a password
        (possession of the key is the credential), so a password alone gets nobody in and
        the ACL (dynamic security or acl_file) applies to the certificate's identity."""
        lines = [f"cafile {self.ca}", f"certfile {self.cert}", f"keyfile {self.key}",
                 "tls_version tlsv1.2"]  # the minimum (Mosquitto 2.0 also offers 1.3)
        if self.require_certificate:
            lines += ["require_certificate true", "use_identity_as_username true"]
        return lines


# ------------------------------------------------------------------------ certificates
@dataclass(frozen=True)
class RunPKI:
    """The TLS files of one run in ``directory`` (see the module docstring)."""

    directory: Path
    run: str
    hosts: tuple[str, ...]
    identities: tuple[str, ...] = ()
    mutual: bool = False

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    def cert(self, who: str) -> Path:
        return self.directory / f"{who}.crt"

    def key(self, who: str) -> Path:
        return self.directory / f"{who}.key"

    def broker(self, inside: str | None = None) -> BrokerTLS:
        """The broker's listener settings; ``inside``: this directory's path in the broker's
        container (None: the host path)."""
        base = inside or str(self.directory)
        return BrokerTLS(f"{base}/{CA_CERT}", f"{base}/{BROKER}.crt", f"{base}/{BROKER}.key",
                         require_certificate=self.mutual)

    def client(self, who: str, inside: str | None = None) -> ClientTLS:
        """``who``'s link settings (its certificate and key only with mutual TLS)."""
        base = inside or str(self.directory)
        if not self.mutual:
            return ClientTLS(f"{base}/{CA_CERT}")
        if who not in self.identities:
            raise TLSError(f"no certificate for {who!r} in {self.directory}; identities: "
                           f"{', '.join(self.identities)}")
        return ClientTLS(f"{base}/{CA_CERT}", f"{base}/{who}.crt", f"{base}/{who}.key")

    @classmethod
    def load(cls, directory: Path) -> RunPKI:
        """The run's PKI as :func:`make_pki` wrote it (TLSError when it is not there)."""
        directory = Path(directory)
        try:
            doc = json.loads((directory / PKI_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise TLSError(f"{directory} holds no run certificates ({PKI_FILE}: {exc})") \
                from None
        return cls(directory, str(doc["run"]), tuple(doc["hosts"]),
                   tuple(doc.get("identities") or ()), bool(doc.get("mutual")))


def make_pki(directory: Path, *, run: str, hosts: Iterable[str],
             identities: Iterable[str] = (), mutual: bool = False) -> RunPKI:
    """Issue a run's CA, the broker's certificate for ``hosts`` (names and IP addresses the
    participants use to reach it) and, with ``mutual``, one client certificate per identity;
    write them into ``directory`` (keys 0600). Returns the :class:`RunPKI`.

    Keys are ECDSA P-256: as strong as RSA-3072 for TLS 1.2/1.3 and generated in
    milliseconds (a fleet of 32 clients gets its keys at once). The CA's key is never
    written: nothing is issued after this call.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = tuple(dict.fromkeys(h for h in hosts if h))
    identities = tuple(dict.fromkeys(identities)) if mutual else ()
    if not hosts:
        raise TLSError("the broker's certificate needs at least one name or address")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(
        days=VALIDITY_DAYS)
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"hsplitlora run {run}"[:64])

    def name(cn: str) -> x509.Name:
        return x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"hsplitlora CA of run {run}")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(ca_ski, critical=False)
               .sign(ca_key, hashes.SHA256()))

    def issue(cn: str, usage: x509.ObjectIdentifier,
              alt: list[x509.GeneralName] | None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(
                 digital_signature=True, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=True, key_cert_sign=False,
                 crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                 ca_ski), critical=False))
        if alt:
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        pem_key = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key

    def alt_name(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    write_public(directory / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    crt, key = issue(f"{BROKER} of run {run}", ExtendedKeyUsageOID.SERVER_AUTH,
                     [alt_name(h) for h in hosts])
    write_public(directory / f"{BROKER}.crt", crt)
    write_secret(directory / f"{BROKER}.key", key)
    for who in identities:
        if who == BROKER:
            raise TLSError(f"{BROKER!r} cannot be an identity: it names the broker's files")
        crt, key = issue(who, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        write_public(directory / f"{who}.crt", crt)
        write_secret(directory / f"{who}.key", key)
    pki = RunPKI(directory, run, hosts, identities, mutual)
    write_public(directory / PKI_FILE, (json.dumps(
        {"run": run, "hosts": list(hosts), "identities": list(identities), "mutual": mutual,
         "valid_until": end.isoformat(timespec="seconds")}, indent=1) + "\n").encode())
    return pki


def write_secret(path: Path, data: bytes) -> None:
    """A private key: created with mode 0600 (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


# ------------------------------------------------------------------------------ names
def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name the broker listens on) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def broker_hosts(listen: str, extra: Iterable[str] = ()) -> list[str]:
    """What the broker's certificate must name when it listens on ``listen``: the loopback
    names (processes on this host connect there), the address itself, and for a wildcard
    (0.0.0.0) this host's name and the IPv4 address of each of its interfaces, which is
    what a device on the network dials; ``extra`` (``--tls-name``) adds names the machine
    cannot know (a NAT's public address, a DNS alias)."""
    out = list(LOOPBACK_NAMES)
    if is_wildcard(listen):
        out += [socket.gethostname(), socket.getfqdn(), *interface_addresses()]
    else:
        out.append(listen)
    return list(dict.fromkeys([*out, *extra]))


def interface_addresses() -> list[str]:
    """The IPv4 address of every network interface (Linux: SIOCGIFADDR per interface)."""
    import fcntl
    import struct

    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                req = struct.pack("256s", name.encode()[:15])
                res = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
                found.append(socket.inet_ntoa(res[20:24]))
    return found


__all__ = ["ENV_CA", "ENV_CERT", "ENV_KEY", "TLS_PORT", "BrokerTLS", "ClientTLS", "RunPKI",
           "TLSError", "broker_hosts", "interface_addresses", "is_loopback", "is_wildcard",
           "make_pki", "write_secret"]
