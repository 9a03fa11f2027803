"""``testbed export k8s`` (testbed/backends/k8s.py, exportdir.py, commands/export.py).

There is no cluster here: every written object is validated against the Kubernetes
OpenAPI schema that the ``kubernetes-validate`` package ships (strict: unknown fields are
errors) for :data:`K8S_VERSION`, and the fleet is checked structurally against the profile
and against what the compose backend generates for the same profile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from runner.errors import ConfigError, UserError
from runner.methods.memory import DEFAULT_RESERVE
from testbed.backends import k8s as K
from testbed.backends.compose import PAGE, generate_override, write_override
from testbed.exportdir import MARKER, write_tree
from testbed.profiles import EmulationMap, Profile, emulation_map, load_profile, parse_profile

K8S_VERSION = "1.33.0"  # docs/kubernetes.md states the same version
REPO = Path(__file__).resolve().parents[1]
MIG_UUID = "MIG-5f7c2a3e-1b2d-5c8e-9a0b-123456789abc"
ARCH = {"reference_model": "meta-llama/Llama-2-7b-hf", "standin_model": "tiny-llama",
        "method": "splitlora", "data": "synthetic"}


def gpu_profile(devices: list[dict[str, Any]] | None = None,
                server: dict[str, Any] | None = None) -> Profile:
    """Five clients: a whole GPU, MIG by profile (with and without its UUID), a second MIG
    size, none; the server on a whole GPU."""
    return parse_profile({
        "devices": devices or [
            {"name": "client0", "memory": "5GB", "compute": "1 TFLOPS", "gpu": 0},
            {"name": "client1", "memory": "10GB", "compute": "2 TFLOPS", "gpu": MIG_UUID,
             "mig": "1g.10gb"},
            {"name": "client2", "memory": "20GB", "compute": "4 TFLOPS", "mig": "3g.40gb"},
            {"name": "client3", "memory": "8GB", "compute": "0.5 TFLOPS",
             "node": "jetson-a"},
            {"name": "edge_4", "memory": "12GB", "compute": "3 TFLOPS", "gpu": "GPU-abc-1"},
        ],
        "server": server or {"memory": "80GB", "compute": "100 TFLOPS", "gpu": 1,
                             "node": "gpu-box"},
        "experiment": ARCH,
    }, "gpu.yaml", "gpu")


def load_tree(root: Path) -> dict[str, dict[str, Any]]:
    """Every YAML file under ``root`` (relative path -> object), as a user's tool reads it."""
    return {str(p.relative_to(root)): yaml.safe_load(p.read_text())
            for p in sorted(root.rglob("*.yaml"))}


def of_kind(tree: dict[str, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in tree.values() if o.get("kind") == kind}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def env(obj: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(obj)["env"]}


def client_jobs(tree: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """client id -> its Job (by the client label)."""
    return {j["metadata"]["labels"][K.CLIENT_LABEL]: j for j in of_kind(tree, "Job").values()
            if j["metadata"]["labels"]["app.kubernetes.io/component"] == "client"}


@pytest.fixture(scope="module")
def gpu_export(tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Profile, EmulationMap, K.Manifests, Path]:
    profile = gpu_profile()
    mapping = emulation_map(profile, emulate=True)
    manifests = K.build(profile, mapping, K.ExportOptions(run_id="gpu-run"))
    out = tmp_path_factory.mktemp("k8s") / "gpu"
    write_tree(out, K.texts(manifests), manifests.secret_files, False, "test\n")
    return profile, mapping, manifests, out


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env_ = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=cwd, env=env_,
                          capture_output=True, text=True, timeout=300, check=False)


def assert_user_error(proc: subprocess.CompletedProcess[str], phrase: str) -> None:
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, detail
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), detail
    assert phrase in lines[0], detail


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI's export of the smoke profile (what a user gets)."""
    out = tmp_path_factory.mktemp("cli") / "smoke"
    proc = run_cli("export", "k8s", "--profile", "smoke", "-o", str(out), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "kubectl apply -k" in proc.stdout
    return out


# ---------------------------------------------------------------------------- schema
@pytest.mark.parametrize("which", ["smoke", "gpu"])
def test_every_object_validates_against_the_kubernetes_schema(
        which: str, smoke_export: Path, gpu_export: tuple[Any, ...]) -> None:
    import kubernetes_validate

    root = smoke_export if which == "smoke" else gpu_export[3]
    tree = load_tree(root)
    objects = {p: o for p, o in tree.items() if p != "kustomization.yaml"}
    assert len(objects) >= 10
    for path, obj in objects.items():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises when invalid
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == K.APP, path


def test_the_schema_check_catches_a_wrong_field(gpu_export: tuple[Any, ...]) -> None:
    """The validation above can fail: a typo'd field and a wrong type are refused."""
    import kubernetes_validate

    tree = load_tree(gpu_export[3])
    job = next(iter(client_jobs(tree).values()))
    container(job)["resouces"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    del container(job)["resouces"]
    job["spec"]["backoffLimit"] = "none"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_kustomization_lists_exactly_the_run_objects(smoke_export: Path) -> None:
    kust = yaml.safe_load((smoke_export / "kustomization.yaml").read_text())
    top = sorted(p.name for p in smoke_export.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == top
    # the model volume outlives a run and is applied first: not in the run's list
    assert (smoke_export / "model-volume" / "cache-claim.yaml").is_file()
    assert not any(r.startswith(("model-volume", "results")) for r in kust["resources"])
    assert {i["name"] for i in kust["images"]} == {"hsplitlora-testbed", "hsplitlora-broker"}
    tree = load_tree(smoke_export)
    images = {c["image"].split(":")[0] for o in tree.values() if o.get("kind") in
              ("Job", "Deployment") for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {i["name"] for i in kust["images"]}  # `kustomize edit set image` works


# ------------------------------------------------------------------------ structure
def test_every_client_has_a_job_with_the_compose_memory_limit(
        gpu_export: tuple[Any, ...]) -> None:
    profile, mapping, _, root = gpu_export
    tree = load_tree(root)
    jobs = client_jobs(tree)
    assert sorted(jobs) == sorted(d.name for d in profile.devices)
    compose = generate_override(profile, mapping)["services"]
    for row in mapping.clients:
        res = container(jobs[row.name])["resources"]
        expected = -(-(DEFAULT_RESERVE + row.standin_bytes) // PAGE) * PAGE
        assert int(res["limits"]["memory"]) == expected == compose[row.name]["mem_limit"]
        assert res["requests"]["memory"] == res["limits"]["memory"]  # no overcommit
        assert res["limits"]["cpu"] == f"{round(compose[row.name]['cpus'] * 1000)}m"
        assert env(jobs[row.name])["TESTBED_BUDGET_BYTES"] == str(row.memory_bytes)
    limits = [int(container(jobs[r.name])["resources"]["limits"]["memory"])
              for r in mapping.clients]
    assert len(set(limits)) == len(limits)  # unequal budgets stay unequal


def test_gpu_and_mig_requests_appear_exactly_where_the_profile_names_them(
        gpu_export: tuple[Any, ...]) -> None:
    profile, _, _, root = gpu_export
    tree = load_tree(root)
    jobs = client_jobs(tree)
    jobs["server"] = of_kind(tree, "Job")["hsl-gpu-run-server"]
    expected = {"client0": {"nvidia.com/gpu": 1}, "client1": {"nvidia.com/mig-1g.10gb": 1},
                "client2": {"nvidia.com/mig-3g.40gb": 1}, "client3": {},
                "edge_4": {"nvidia.com/gpu": 1}, "server": {"nvidia.com/gpu": 1}}
    assert set(expected) == {d.name for d in [profile.server, *profile.devices]}
    for who, want in expected.items():
        res = container(jobs[who]).get("resources") or {}
        for part in ("limits", "requests"):
            got = {k: v for k, v in (res.get(part) or {}).items()
                   if k.startswith("nvidia.com/")}
            assert got == want, (who, part)
    broker = of_kind(tree, "Deployment")["hsl-gpu-run-broker"]
    assert "resources" not in container(broker)


def test_a_profile_node_becomes_a_node_selector_exactly_there(
        gpu_export: tuple[Any, ...]) -> None:
    """``node:`` in a profile pins a pod to the node labelled hsplitlora.node=NAME, as the
    swarm backend's placement constraint does."""
    _, _, _, root = gpu_export
    tree = load_tree(root)
    jobs = client_jobs(tree)
    jobs["server"] = of_kind(tree, "Job")["hsl-gpu-run-server"]
    selectors = {who: job["spec"]["template"]["spec"].get("nodeSelector")
                 for who, job in jobs.items()}
    assert selectors == {"client0": None, "client1": None, "client2": None,
                         "client3": {"hsplitlora.node": "jetson-a"}, "edge_4": None,
                         "server": {"hsplitlora.node": "gpu-box"}}


def test_a_mig_uuid_without_its_profile_is_a_user_error() -> None:
    profile = gpu_profile(devices=[
        {"name": "client0", "memory": "5GB", "compute": "1 TFLOPS", "gpu": MIG_UUID}])
    with pytest.raises(UserError, match="add mig: PROFILE"):
        K.build(profile, emulation_map(profile, emulate=True))


def test_secrets_are_secrets_and_not_in_the_configmap(smoke_export: Path) -> None:
    tree = load_tree(smoke_export)
    (config,) = of_kind(tree, "ConfigMap").values()
    secrets = of_kind(tree, "Secret")
    passwords = [s["stringData"]["password"] for s in secrets.values()
                 if "password" in s["stringData"]]
    assert len(passwords) == 2 + 3  # server, monitor, three clients
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 16 for p in passwords)
    dynsec = next(s["stringData"]["dynsec.json"] for s in secrets.values()
                  if "dynsec.json" in s["stringData"])
    blob = yaml.safe_dump(config)
    for secret in [*passwords, *[line for line in dynsec.splitlines() if '"salt"' in line]]:
        assert secret.strip().rstrip(",") not in blob
    assert set(config["data"]) == {"runtime.json", "devices.json", "host-paths.json",
                                   "mosquitto.conf"}
    for path, obj in tree.items():  # credentials on disk: owner only
        mode = (smoke_export / path).stat().st_mode & 0o777
        assert mode == (0o600 if obj.get("kind") == "Secret" else 0o644), path
    # each pod mounts only its own password
    for job in of_kind(tree, "Job").values():
        (vol,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        who = env(job)["TESTBED_CLIENT_ID"]
        # ... and the run's CA (TLS is on by default in the export)
        assert vol["secret"]["items"] == [{"key": "password", "path": who},
                                          {"key": "ca.crt", "path": "ca.crt"}]
        assert env(job)["TESTBED_PASSWORD_FILE"] == f"/run/testbed/secrets/{who}"
        assert vol["secret"]["defaultMode"] == 0o400


def test_the_broker_service_is_what_every_pod_connects_to(smoke_export: Path) -> None:
    import json

    tree = load_tree(smoke_export)
    (service,) = of_kind(tree, "Service").values()
    (broker,) = of_kind(tree, "Deployment").values()
    (config,) = of_kind(tree, "ConfigMap").values()
    runtime = json.loads(config["data"]["runtime.json"])
    port = service["spec"]["ports"][0]
    urls = {env(j)["TESTBED_BROKER"] for j in of_kind(tree, "Job").values()}
    urls.add(runtime["broker"])
    assert urls == {f"mqtts://{service['metadata']['name']}:{port['port']}"}  # TLS: default
    assert urlsplit(runtime["broker"]).hostname == service["metadata"]["name"]
    pod_labels = broker["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert broker["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    ports = {p["name"]: p["containerPort"] for p in container(broker)["ports"]}
    assert ports[port["targetPort"]] == port["port"]
    assert f"listener {port['port']} 0.0.0.0" in config["data"]["mosquitto.conf"]
    for job in of_kind(tree, "Job").values():  # no other pod is selected by the Service
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert not service["spec"]["selector"].items() <= labels.items()


def test_commands_env_and_labels_follow_the_compose_backend(gpu_export: tuple[Any, ...]
                                                             ) -> None:
    profile, mapping, manifests, root = gpu_export
    tree = load_tree(root)
    compose = generate_override(profile, mapping)["services"]
    for name, job in client_jobs(tree).items():
        want = {**{k: str(v) for k, v in compose[name]["environment"].items()},
                "TESTBED_BROKER": "mqtts://hsl-gpu-run-broker:8883", "TESTBED_RUN_ID": "gpu-run",
                "TESTBED_CACHE": "/cache", "TESTBED_TLS_CA": "/run/testbed/secrets/ca.crt"}
        assert env(job) == want
        assert container(job)["command"] == ["python", "-m", "runner.client"]
        assert job["spec"]["backoffLimit"] == 0
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    server = of_kind(tree, "Job")["hsl-gpu-run-server"]
    assert container(server)["command"] == ["python", "-m", "runner.server"]
    assert env(server)["TESTBED_CLIENT_ID"] == "server"
    for obj in tree.values():
        if obj.get("kind") == "Kustomization":
            continue
        lab = obj["metadata"]["labels"]
        assert lab[K.RUN_LABEL] == "gpu-run"
        assert lab["app.kubernetes.io/instance"] == "hsl-gpu-run"
        assert lab["app.kubernetes.io/managed-by"] == K.MANAGED_BY
    # a device name that is no DNS label still gets a valid object name
    assert "hsl-gpu-run-edge-4" in of_kind(tree, "Job")
    assert manifests.run_id == "gpu-run"


def test_every_pod_gets_the_run_files_its_environment_names(smoke_export: Path) -> None:
    """TESTBED_CONFIG / TESTBED_DEVICES name files the init container copies from the
    ConfigMap into the run directory before the server or client starts."""
    tree = load_tree(smoke_export)
    (config,) = of_kind(tree, "ConfigMap").values()
    for name, job in of_kind(tree, "Job").items():
        spec = job["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        copied = {f"/run/testbed/{Path(src).name}" for src in init["command"][1:-1]
                  if src.startswith("/config/")}
        assert init["command"][0] == "cp" and init["command"][-1] == "/run/testbed/"
        assert {Path(p).name for p in copied} <= set(config["data"])
        e = env(job)
        assert {e["TESTBED_CONFIG"], e["TESTBED_DEVICES"]} <= copied, name
        assert init.get("resources") == container(job).get("resources")
        run_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
        assert run_mounts["run"] == "/run/testbed"
        assert {m["mountPath"] for m in container(job)["volumeMounts"]
                if m["name"] == "run"} == {"/run/testbed"}


def test_the_model_volume_is_named_in_one_place(gpu_export: tuple[Any, ...],
                                                tmp_path: Path) -> None:
    _, _, _, root = gpu_export
    tree = load_tree(root)
    jobs = of_kind(tree, "Job")
    claims = [v["persistentVolumeClaim"] for j in jobs.values()
              for v in j["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache"]
    assert claims == [{"claimName": K.MODEL_CLAIM, "readOnly": True}] * len(jobs)
    for job in jobs.values():
        mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
        assert mounts["/cache"]["readOnly"] is True
    assert of_kind(tree, "PersistentVolumeClaim")[K.MODEL_CLAIM]
    loader = of_kind(tree, "Pod")["hsl-gpu-run-model-loader"]
    assert loader["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == K.MODEL_CLAIM
    profile = gpu_profile()
    hostpath = K.build(profile, emulation_map(profile, emulate=True),
                       K.ExportOptions(model_hostpath="/srv/hsl-cache"))
    assert not any(p.startswith("model-volume/") for p in hostpath.files)
    for path, obj in hostpath.files.items():
        if obj["kind"] == "Job":
            (cache,) = [v for v in obj["spec"]["template"]["spec"]["volumes"]
                        if v["name"] == "cache"]
            assert cache == {"name": "cache", "hostPath": {"path": "/srv/hsl-cache",
                                                           "type": "Directory"}}, path


def test_object_names_collide_or_overflow_as_user_errors() -> None:
    with pytest.raises(UserError, match="both become"):
        K.object_names("r", ["server", "Client.A", "client-a"])
    with pytest.raises(UserError, match="shorter --run-id"):
        K.object_names("r" * 60, ["server"])
    assert K.object_names("Smoke_Run", ["server"])["broker"] == "hsl-smoke-run-broker"


# ------------------------------------------------------------------- profile schema
def test_mig_field_in_profiles() -> None:
    ok = gpu_profile()
    assert ok.devices[2].mig == "3g.40gb" and ok.uses_gpus
    for bad, phrase in [("1g.10gb+me", "MIG profile"), ("big", "MIG profile"),
                        (7, "MIG profile")]:
        with pytest.raises(UserError, match=phrase):
            gpu_profile(devices=[{"name": "c", "memory": "1GB", "compute": "1 TFLOPS",
                                  "mig": bad}])
    with pytest.raises(UserError, match="whole GPU"):
        gpu_profile(devices=[{"name": "c", "memory": "1GB", "compute": "1 TFLOPS",
                              "gpu": 0, "mig": "1g.10gb"}])


def test_compose_refuses_a_mig_profile_without_its_uuid(tmp_path: Path) -> None:
    profile = gpu_profile()  # client2 names 3g.40gb only: Docker cannot pick an instance
    with pytest.raises(ConfigError, match="client2: mig 3g.40gb"):
        write_override(profile, emulation_map(profile, emulate=True), tmp_path / "o.yaml")
    assert not (tmp_path / "o.yaml").exists()


def test_shipped_profiles_export(tmp_path: Path) -> None:
    for name in ("hetero-llama2", "homo-llama2", "hetero-gpt2l"):
        profile = load_profile(name)
        manifests = K.build(profile, emulation_map(profile, emulate=True))
        assert len([p for p in manifests.files if p.startswith("client-")]) == 5


# ------------------------------------------------------------------------ the CLI
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_user_error(run_cli("export", "k8s", "--profile", "nope", "-o", str(out),
                              cwd=REPO), "unknown profile 'nope'")
    assert not out.exists()
    afile = tmp_path / "file.yaml"
    afile.write_text("x")
    assert_user_error(run_cli("export", "k8s", "--profile", "smoke", "-o", str(afile),
                              cwd=REPO), "is a file")
    assert afile.read_text() == "x"
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert_user_error(run_cli("export", "k8s", "--profile", "smoke", "-o", str(full),
                              cwd=REPO), "--overwrite")
    assert_user_error(run_cli("export", "k8s", "--profile", "smoke", "-o", str(full),
                              "--overwrite", cwd=REPO), "did not write")
    # the old spellings: --force still replaces; --out (the run directory elsewhere) is refused
    assert_user_error(run_cli("export", "k8s", "--profile", "smoke", "-o", str(full),
                              "--force", cwd=REPO), "did not write")
    assert_user_error(run_cli("export", "k8s", "--profile", "smoke", "--out", str(out),
                              cwd=REPO), "--manifests-dir")
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    assert_user_error(run_cli("export", "k8s", "--profile", "smoke", "-o", str(out),
                              "--precision", "auto", cwd=REPO), "--precision")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs


def test_cli_help_explains() -> None:
    proc = run_cli("export", "k8s", "--help", cwd=REPO)
    assert proc.returncode == 0
    for phrase in ("kubectl apply -k", "--overwrite", "nvidia.com/mig", "--model-hostpath"):
        assert phrase in proc.stdout


def test_force_replaces_an_earlier_export_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_tree(out, {"a.yaml": "a: 1\n", "sub/b.yaml": "b: 2\n"}, set(), False, "m\n")
    assert (out / MARKER).is_file()
    with pytest.raises(UserError, match="not empty"):
        write_tree(out, {"c.yaml": "c: 3\n"}, set(), False, "m\n")
    write_tree(out, {"c.yaml": "c: 3\n"}, {"c.yaml"}, True, "m\n")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "c.yaml"])
    assert (out / "c.yaml").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


# ---------------------------------------------------------------------------------- TLS
def _pem_cert(text: str) -> Any:
    from cryptography import x509

    return x509.load_pem_x509_certificate(text.encode())


def _mounted(job: dict[str, Any], path: str) -> bool:
    """Whether ``path`` in the job's container is a file of its own Secret's items."""
    spec = job["spec"]["template"]["spec"]
    (vol,) = [v for v in spec["volumes"] if "secret" in v]
    (mount,) = [m for m in container(job)["volumeMounts"] if m["name"] == vol["name"]]
    return any(f"{mount['mountPath']}/{i['path']}" == path for i in vol["secret"]["items"])


def test_tls_export_wires_the_broker_certificate_and_each_pods_ca(smoke_export: Path
                                                                  ) -> None:
    """The default export: the broker listens with TLS on 8883 with its certificate from a
    Secret only the broker mounts; every pod verifies it against the CA in its own Secret,
    and the certificate names the Service every pod dials."""
    from cryptography import x509

    tree = load_tree(smoke_export)
    secrets = of_kind(tree, "Secret")
    broker_tls = secrets["hsl-smoke-broker-tls"]["stringData"]
    assert set(broker_tls) == {"ca.crt", "tls.crt", "tls.key"}
    (config,) = of_kind(tree, "ConfigMap").values()
    conf = config["data"]["mosquitto.conf"].splitlines()
    assert "listener 8883 0.0.0.0" in conf
    assert {"cafile /run/testbed/tls/ca.crt", "certfile /run/testbed/tls/tls.crt",
            "keyfile /run/testbed/tls/tls.key"} <= set(conf)
    assert "require_certificate true" not in conf
    (broker,) = of_kind(tree, "Deployment").values()
    bspec = broker["spec"]["template"]["spec"]
    (tls_vol,) = [v for v in bspec["volumes"] if v["name"] == "tls"]
    assert tls_vol["secret"]["secretName"] == "hsl-smoke-broker-tls"
    assert {"name": "tls", "mountPath": "/run/testbed/tls", "readOnly": True} in \
        container(broker)["volumeMounts"]
    ca, cert = _pem_cert(broker_tls["ca.crt"]), _pem_cert(broker_tls["tls.crt"])
    cert.verify_directly_issued_by(ca)
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (service,) = of_kind(tree, "Service").values()
    assert service["metadata"]["name"] in alt.get_values_for_type(x509.DNSName)
    assert service["spec"]["ports"][0]["port"] == 8883
    blob = yaml.safe_dump(config)
    for obj in tree.values():  # no private key outside a Secret; no Job mounts the broker's
        if obj.get("kind") == "Secret":
            continue
        assert "PRIVATE KEY" not in yaml.safe_dump(obj)
    assert "BEGIN CERTIFICATE" not in blob
    for job in of_kind(tree, "Job").values():
        who = env(job)["TESTBED_CLIENT_ID"]
        mine = secrets[f"hsl-smoke-{who}-password"]["stringData"]
        assert mine["ca.crt"] == broker_tls["ca.crt"] and "tls.key" not in mine
        assert env(job)["TESTBED_BROKER"].startswith("mqtts://")
        assert _mounted(job, env(job)["TESTBED_TLS_CA"])
        assert "hsl-smoke-broker-tls" not in yaml.safe_dump(job)


def test_mtls_and_plain_exports_validate_and_differ_where_they_should(tmp_path: Path) -> None:
    """--mtls: each pod's own certificate (Common Name = its identity) and key in its own
    Secret, and the broker asks for them; --tls off: the plain fleet of before. Both
    schema-validated as the default export is."""
    import kubernetes_validate
    from cryptography.x509.oid import NameOID

    profile = load_profile("smoke")
    mapping = emulation_map(profile)
    mutual = K.build(profile, mapping, K.ExportOptions(mutual=True))
    plain = K.build(profile, mapping, K.ExportOptions(tls=False))
    for manifests in (mutual, plain):
        for obj in manifests.files.values():
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    conf = mutual.files["config.yaml"]["data"]["mosquitto.conf"].splitlines()
    assert {"require_certificate true", "use_identity_as_username true"} <= set(conf)
    ca = _pem_cert(mutual.files["secret-broker-tls.yaml"]["stringData"]["ca.crt"])
    seen = set()
    for path, obj in mutual.files.items():
        if obj.get("kind") != "Job":
            continue
        who = env(obj)["TESTBED_CLIENT_ID"]
        data = mutual.files[f"secret-{who}.yaml"]["stringData"]
        cert = _pem_cert(data["tls.crt"])
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == who
        assert "PRIVATE KEY" in data["tls.key"]
        e = env(obj)
        assert e["TESTBED_TLS_CERT"] == "/run/testbed/secrets/tls.crt", path
        assert _mounted(obj, e["TESTBED_TLS_CERT"]) and _mounted(obj, e["TESTBED_TLS_KEY"])
        seen.add(data["tls.key"])
    assert len(seen) == 4  # server + 3 clients, each its own key
    assert "secret-broker-tls.yaml" not in plain.files
    assert plain.broker_url == "mqtt://hsl-smoke-broker:1883"
    assert "cafile" not in plain.files["config.yaml"]["data"]["mosquitto.conf"]
    for obj in plain.files.values():
        if obj.get("kind") == "Job":
            assert not any(k.startswith("TESTBED_TLS") for k in env(obj))
