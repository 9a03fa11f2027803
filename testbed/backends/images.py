"""Building the testbed's container images, online or fully offline.

Two images (images/):

* ``hsplitlora-testbed`` (images/Dockerfile): Python + the runtime's packages + ``runner/``;
  the server and every client run from it (``python -m runner.server|client``);
* ``hsplitlora-broker`` (images/broker.Dockerfile): Mosquitto 2 with the dynamic-security
  plugin; its per-run config is generated into the run directory and mounted.

Online (``testbed images build``): ``BASE_IMAGE=python:3.11-slim`` / ``debian:bookworm-slim``
pulled from a registry, packages from the package index, as users with a registry expect.

Offline (``testbed images build --offline``), for air-gapped labs and for CI, where no
container registry is reachable and containers cannot reach a package index:

1. a Debian base is bootstrapped on the host with ``debootstrap --variant=minbase`` (Python
   3.11, venv, CA certificates and Mosquitto included) from the host's own apt mirror, and
   imported with ``docker import`` as ``hsplitlora-base:bookworm``;
2. the host downloads the wheels (``pip download``, for the images' Python 3.11 whatever
   the host venv's) into ``images/wheelhouse`` with the host venv's exact versions as
   constraints, so containers compute what in-process runs do (a release that needs a newer
   Python than 3.11, such as numpy 2.5 on a 3.12 host, is left to pip);
3. both images are built FROM that base with ``--network none`` semantics (the build needs
   nothing outside the context).

Design choice: the host CLI drives the Docker Engine through the Docker SDK (the ``docker``
package), not the ``docker`` binary, so the build works whatever CLI/buildx version is
installed; the SDK honours ``.dockerignore`` (only ``runner/`` and ``images/`` are sent).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from runner.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = ROOT / "images"
WHEELHOUSE = IMAGES_DIR / "wheelhouse"
CONSTRAINTS = IMAGES_DIR / "constraints.txt"
REQUIREMENTS = IMAGES_DIR / "requirements-runtime.txt"
RUNTIME_IMAGE = "hsplitlora-testbed:latest"
BROKER_IMAGE = "hsplitlora-broker:latest"
OFFLINE_BASE = "hsplitlora-base:bookworm"
ONLINE_BASE = "python:3.11-slim"
ONLINE_BROKER_BASE = "debian:bookworm-slim"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "mosquitto")
SUITE = "bookworm"  # Debian 12: Python 3.11
# The images' Python (python:3.11-slim online, bookworm's python3 offline). The host venv may
# be 3.11-3.13: wheels are downloaded for this version, and a host package whose installed
# release needs a newer Python is not pinned (pip picks its newest release for this one).
IMAGE_PYTHON = "3.11"

Log = Callable[[str], None]


class ImageError(UserError):
    """A build step failed for a reason the user can fix (no daemon, no debootstrap...)."""


def docker_client() -> Any:
    """A Docker SDK client, or ImageError saying how to start a daemon."""
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise ImageError("the 'docker' Python package is missing; reinstall the project") from exc
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no daemon here"
        raise ImageError(
            "no Docker daemon answers (DOCKER_HOST or /var/run/docker.sock); start one "
            "(e.g. `dockerd &`) or use --backend local") from exc
    return client


def daemon_available() -> bool:
    """Whether a Docker daemon answers (used by ``--backend auto``)."""
    try:
        docker_client()
    except ImageError:
        return False
    return True


def image_exists(client: Any, name: str) -> bool:
    import docker

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


# ------------------------------------------------------------------------ wheels, pins
def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def write_constraints(path: Path = CONSTRAINTS) -> Path:
    """Pin every package of this interpreter (the host venv) to its installed version.

    Local version labels (``2.13.0+cpu``) are dropped: ``torch==2.13.0`` then matches the
    CPU build on a CPU host and whatever build the index serves elsewhere. The project
    itself is left out (it is not installed in the image; ``runner/`` is copied), and so is
    a package whose installed release does not run on the image's Python (a host on 3.12
    may have numpy 2.5, which needs 3.12; the image gets the newest numpy for 3.11).
    """
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    pins: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or _canonical(name) in ("hsplitlora-testbed", "pip", "setuptools"):
            continue
        try:
            if not SpecifierSet(dist.metadata.get("Requires-Python") or "").contains(
                    IMAGE_PYTHON):
                continue
        except InvalidSpecifier:
            pass
        pins[_canonical(name)] = str(dist.version).split("+", 1)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# generated by testbed/backends/images.py from the host venv; do not edit\n"
                    + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    return path


def download_wheels(wheelhouse: Path = WHEELHOUSE, log: Log = print) -> Path:
    """``pip download`` the runtime's wheels with the host's interpreter, for the image's
    Python (:data:`IMAGE_PYTHON`, whatever the host venv's) and the host's architecture."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse),
           "--only-binary=:all:", "--python-version", IMAGE_PYTHON,
           "-r", str(REQUIREMENTS), "-c", str(CONSTRAINTS)]
    log(f"downloading wheels into {wheelhouse}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ImageError(f"pip download failed: {tail[0]}; the host needs access to a "
                         "package index or a populated pip cache/find-links")
    return wheelhouse


# --------------------------------------------------------------------------- base image
def apt_mirror(sources: Path = Path("/etc/apt")) -> str | None:
    """The Debian mirror this host's apt uses (deb822 ``URIs:`` or one-line ``deb URL``), so
    debootstrap reaches the same mirror (or proxy) apt does; None: debootstrap's default."""
    files = sorted(sources.glob("sources.list.d/*.sources")) + [sources / "sources.list"]
    files += sorted(sources.glob("sources.list.d/*.list"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            m = re.match(r"URIs:\s*(\S+)", line) or re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)",
                                                           line)
            if m and m.group(1).rstrip("/").endswith("/debian"):
                return m.group(1)
    return None


def build_base(client: Any, name: str = OFFLINE_BASE, *, rebuild: bool = False,
               log: Log = print) -> str:
    """debootstrap a minimal Debian (Python 3.11 + Mosquitto) and ``docker import`` it."""
    if image_exists(client, name) and not rebuild:
        log(f"base image {name} exists (pass --rebuild to make it again)")
        return name
    exe = shutil.which("debootstrap") or ("/usr/sbin/debootstrap"
                                          if os.path.exists("/usr/sbin/debootstrap") else None)
    if exe is None:
        raise ImageError("debootstrap not found; install it (apt-get install -y debootstrap) "
                         "or build online without --offline")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root; run `testbed images build --offline` as root")
    with tempfile.TemporaryDirectory(prefix="hsl-rootfs-") as rootfs:
        cmd = [exe, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
               rootfs]
        mirror = apt_mirror()
        if mirror:
            cmd.append(mirror)
        log(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}); about a minute")
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise ImageError(f"debootstrap failed: {tail[0]}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(Path(rootfs) / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            client.api.import_image(src=tar.stdout, stream_src=True,
                                    repository=name.split(":")[0],
                                    tag=name.split(":")[1] if ":" in name else "latest")
        finally:
            tar.stdout.close()
            tar.wait()
        log(f"base image {name} imported ({time.monotonic() - t0:.0f} s)")
    return name


# ---------------------------------------------------------------------------- the build
@dataclass
class BuildResult:
    """What ``build_images`` made, with timings (seconds)."""

    images: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


SOURCE_LABEL = "org.hsplitlora.source"


def source_digest() -> str:
    """SHA-256 of what goes into the runtime image from this tree (runner/ and images/):
    the image carries it as a label, so ``testbed up`` sees code that changed since the
    image was built and rebuilds rather than run stale code in the containers."""
    import hashlib

    h = hashlib.sha256()
    files = sorted([*(ROOT / "runner").rglob("*.py"), ROOT / "images" / "Dockerfile",
                    ROOT / "images" / "requirements-runtime.txt"])
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def image_source(client: Any, tag: str = "") -> str | None:
    """The source digest label of an image, or None (missing image or no label)."""
    import docker

    try:
        return (client.images.get(tag or RUNTIME_IMAGE).labels or {}).get(SOURCE_LABEL)
    except docker.errors.ImageNotFound:
        return None


def _build(client: Any, *, tag: str, dockerfile: str, buildargs: dict[str, str],
           offline: bool, log: Log, labels: dict[str, str] | None = None) -> None:
    """One ``docker build`` through the SDK, streaming its log; ImageError on failure."""
    import docker

    kwargs: dict[str, Any] = {"path": str(ROOT), "dockerfile": dockerfile, "tag": tag,
                              "buildargs": buildargs, "rm": True, "forcerm": True,
                              "decode": True, "pull": False}
    if labels:
        kwargs["labels"] = labels
    if offline:
        kwargs["network_mode"] = "none"
    last = ""
    try:
        for chunk in client.api.build(**kwargs):
            if "error" in chunk:
                raise ImageError(f"building {tag} failed: {chunk['error'].strip()}")
            text = str(chunk.get("stream", "")).strip()
            if text:
                last = text
                if text.startswith("Step "):
                    log(f"  {tag}: {text}")
    except docker.errors.APIError as exc:
        raise ImageError(f"building {tag} failed: {exc.explanation or exc}") from exc
    if not image_exists(client, tag):
        raise ImageError(f"building {tag} produced no image (last output: {last[:200]})")


def build_images(*, offline: bool = False, base_image: str | None = None,
                 broker_base: str | None = None, rebuild_base: bool = False,
                 download: bool = True, log: Log = print) -> BuildResult:
    """Build the runtime and broker images (see the module docstring)."""
    client = docker_client()
    result = BuildResult()
    t0 = time.monotonic()
    write_constraints()
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    if offline:
        base = base_image or build_base(client, rebuild=rebuild_base, log=log)
        broker = broker_base or base
        result.seconds["base"] = time.monotonic() - t0
        t1 = time.monotonic()
        if download or not any(WHEELHOUSE.glob("*.whl")):
            download_wheels(log=log)
        result.seconds["wheels"] = time.monotonic() - t1
    else:
        base = base_image or ONLINE_BASE
        broker = broker_base or ONLINE_BROKER_BASE
        for old in WHEELHOUSE.glob("*.whl"):  # an online build must not ship stale wheels
            old.unlink()
    for tag, dockerfile, args in (
            (RUNTIME_IMAGE, "images/Dockerfile",
             {"BASE_IMAGE": base, "OFFLINE": "1" if offline else "0"}),
            (BROKER_IMAGE, "images/broker.Dockerfile", {"BASE_IMAGE": broker})):
        t1 = time.monotonic()
        log(f"building {tag} FROM {args['BASE_IMAGE']}" + (" (offline)" if offline else ""))
        _build(client, tag=tag, dockerfile=dockerfile, buildargs=args, offline=offline,
               log=log, labels={SOURCE_LABEL: source_digest()} if tag == RUNTIME_IMAGE
               else None)
        result.images[tag] = args["BASE_IMAGE"]
        result.seconds[tag] = time.monotonic() - t1
    result.seconds["total"] = time.monotonic() - t0
    return result


def ensure_images(offline: bool = True, log: Log = print) -> None:
    """Build the images when either is missing or runner/ changed since the runtime image
    was built (``testbed up`` with the compose backend; Docker's layer cache makes a rebuild
    after a code change take seconds)."""
    client = docker_client()
    if image_exists(client, RUNTIME_IMAGE) and image_exists(client, BROKER_IMAGE):
        if image_source(client) == source_digest():
            return
        log("runner/ changed since the testbed image was built; rebuilding it")
    else:
        log("testbed images are missing; building them (`testbed images build"
            + (" --offline" if offline else "") + "`)")
    # pip download skips wheels already in the wheelhouse and fetches what a changed
    # requirements file added
    build_images(offline=offline, download=True, log=log)


__all__ = ["BROKER_IMAGE", "RUNTIME_IMAGE", "BuildResult", "ImageError", "apt_mirror",
           "image_source", "source_digest",
           "build_images", "daemon_available", "docker_client", "ensure_images",
           "write_constraints"]
